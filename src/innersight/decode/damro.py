"""DAMRO: contrastive decoding against the vision encoder's outlier tokens.

Gong et al., "DAMRO: Dive into the Attention Mechanism of LVLM to Reduce Object Hallucination",
EMNLP 2024, arXiv 2410.04514; reference code coder-gx/DAMRO. A ViT carries a few high-norm
"outlier" tokens, mostly on background patches, that soak up the [CLS] attention; the LLM decoder
attends to the same positions and hallucinates more when it does. DAMRO builds a negative branch
that sees **only** those outlier tokens and contrasts it away:

1. Outlier selection (Sec. 3.3, Eq. 3-4): ``A_cls = softmax(Q_cls K^T / sqrt(d))`` over the
   vision tokens at the layer whose output the projector consumes (the paper's "penultimate
   layer" for LLaVA-1.5: ``layers[22]`` of CLIP ViT-L's 24; the adapter fact
   :attr:`~innersight.adapters.base.Adapter.projector_vision_layer`, see
   :func:`default_vision_layer`), computed here from that layer's self-attention *input* (the
   queries and keys it projects; a forward pre-hook on the attention module during the main
   prefill: one ``[CLS]`` query row, the vision tower keeps its own attention implementation;
   nothing is encoded twice). The top-``k`` patches, in descending score order, are the outliers.
   Two reductions over heads (:attr:`DAMROConfig.head_reduction`):

   - ``sum_logits`` (LLaVA reference: one "head" over the un-split ``q_proj`` / ``k_proj``
     outputs): ``softmax(q_cls . k / sqrt(D))``, ``D`` the full vision width, i.e. the sum of the
     per-head dot products;
   - ``mean_heads`` (InstructBLIP reference): the per-head ``softmax(q_h . k_h / sqrt(d_h))``
     averaged over heads.

   The softmax runs over all vision tokens (the [CLS] column included, then dropped), as in the
   reference code.
2. Negative branch: the same prompt whose image is represented by only its ``k`` outlier tokens,
   projected by the model's own projector (gathered from the projector output: LLaVA's projector
   acts token by token), the other image tokens removed (positions renumbered contiguously); its
   own KV cache (:class:`~.contrast.NegativeBranch`, batched with the main branch by default).

   - LLaVA-1.5: ``k`` projected patch tokens.
   - LLaVA-NeXT: the base (global) view's top-``k`` tokens plus one ``image_newline`` token.
   - InstructBLIP: the Q-Former is run again over only the ``k`` ViT tokens (``post_layernorm``
     output, [CLS] excluded), with the same queries and instruction text; the negative image is
     still ``num_query_tokens`` tokens. The reference code gathers the patch indices from features
     that still include [CLS] (an off-by-one: index ``i`` picks patch ``i - 1``, and index 0 the
     [CLS] token); :attr:`DAMROConfig.official_shift` reproduces it in the ``official`` preset only.
   - Qwen2-VL / Qwen2.5-VL (**an extension beyond the paper**: the Qwen ViT has no [CLS]): the
     score of a patch is the mean attention it *receives* from all patches of its image at the
     last full-attention vision block (per-head softmax averaged over heads, or one head over the
     full ``q``/``k``), averaged over the 2x2 patches of each merged token (via
     :meth:`~innersight.adapters.qwen2_vl.Qwen2VLAdapter.vision_patch_token_index`, so Qwen2.5-VL's
     window order is handled); the ``k`` merged tokens with the highest scores form the negative
     image, placed on a ``1 x k`` M-RoPE grid by the model's own ``get_rope_index``.
3. Each step: ``cutoff = max(l) + log(beta)`` on the original logits,
   ``l' = (1 + alpha) l - alpha l_neg``, ``l < cutoff -> -inf`` (:func:`~.contrast.contrast`).

Presets. ``default``: ``generate``'s processors and warpers apply as usual (the DAMRO processor
runs before the sampling warpers). ``official``: the reference evaluation's decoding, pure
multinomial sampling at temperature 1 with no other processors or warpers (the reference
bypassed them), torch seeded with ``seed`` (42) for the call (the caller's RNG state restored
afterwards); the method asks the plan for these ``generate`` settings
(:meth:`DAMRO.generation_overrides`).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch

from ..errors import MethodError
from ..hooks import HookHandles
from .contrast import (
    BRANCH_MODES,
    ContrastiveProcessor,
    NegativeBranch,
    NegativeInputs,
    check_generation,
    check_strength,
    features_per_sample,
    splice_images,
)

SOURCE = "arXiv 2410.04514 (DAMRO, EMNLP 2024)"
CODE = "reference code coder-gx/DAMRO"
REDUCTIONS = ("sum_logits", "mean_heads")
PRESETS = ("default", "official")
TASKS = ("pope", "chair")

#: (alpha, k) per family and task; specs/damro.md Defaults table (arXiv 2410.04514, Sec. 4 / App.)
PAPER_DEFAULTS: dict[str, dict[str, tuple[float, int]]] = {
    "llava": {"pope": (2.0, 10), "chair": (2.0, 10)},
    "llava_next": {"pope": (2.0, 10), "chair": (2.0, 10)},
    "instructblip": {"pope": (0.5, 4), "chair": (1.5, 4)},
}
#: families without published values (Qwen2-VL / Qwen2.5-VL): LLaVA-1.5's
FALLBACK_DEFAULTS: tuple[float, int] = (2.0, 10)
#: head reduction of the reference code per family (LLaVA: one head over full q/k; InstructBLIP:
#: mean of per-head softmaxes); the Qwen extension averages per-head softmaxes
DEFAULT_REDUCTION: dict[str, str] = {"llava": "sum_logits", "llava_next": "sum_logits"}

#: generate settings of the ``official`` preset: pure multinomial sampling at temperature 1, no
#: processor or warper (transformers 5.23 ``_get_logits_processor`` adds none with these values)
OFFICIAL_GENERATION: dict[str, Any] = {
    "do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": None, "typical_p": 1.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None, "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0, "num_beams": 1,
}


@dataclass(frozen=True)
class DAMROConfig:
    """DAMRO settings; ``None`` fields take the paper's value for the model's family."""

    #: contrast strength; None: LLaVA-1.5 / LLaVA-NeXT 2.0, InstructBLIP 0.5 (POPE) / 1.5 (CHAIR),
    #: Qwen (no published value) LLaVA's 2.0
    alpha: float | None = field(default=None, metadata={"source": SOURCE + " defaults table; specs/damro.md"})
    #: number of outlier tokens; None: LLaVA 10, InstructBLIP 4, Qwen (no published value) 10
    k: int | None = field(default=None, metadata={"source": SOURCE + " defaults table; specs/damro.md"})
    #: adaptive plausibility: keep tokens with p >= beta * max p
    beta: float = field(default=0.1, metadata={"source": SOURCE + " Eq. 6"})
    #: which of the paper's InstructBLIP settings the default alpha follows: "pope" or "chair"
    task: str = field(default="pope", metadata={"source": SOURCE + " defaults table"})
    #: "sum_logits" (one head over the full q/k; LLaVA reference) or "mean_heads" (per-head
    #: softmax averaged; InstructBLIP reference); None: the family's reference (Qwen: mean_heads)
    head_reduction: str | None = field(default=None, metadata={"source": CODE})
    #: index of the vision encoder layer whose self-attention is read; None: the layer whose output
    #: the projector consumes (adapter.projector_vision_layer; LLaVA-1.5's vision_feature_layer=-2
    #: on CLIP ViT-L is layers[22] of 24), InstructBLIP one below it (layers[-2], reference code),
    #: Qwen the last full-attention block (see default_vision_layer)
    vision_layer: int | None = field(default=None, metadata={
        "source": SOURCE + " Sec. 3.3 (penultimate layer, the one the projector reads); " + CODE
                  + " llava-hf path: encoder.layers[vision_feature_layer]"})
    #: "default" (generate's processors and warpers as usual) or "official" (pure sampling at
    #: temperature 1, no processors or warpers, seeded; the reference evaluation)
    preset: str = field(default="default", metadata={"source": CODE + " sample_method/sample.py"})
    #: in the official preset, reproduce the reference's InstructBLIP off-by-one (patch indices
    #: applied to ViT features that still include [CLS]); never applied in the default preset
    official_shift: bool = field(default=True, metadata={"source": CODE + " modeling_instructblip.py"})
    #: torch seed of the official preset
    seed: int = field(default=42, metadata={"source": CODE + " README (seed 42)"})
    #: "batched" (negative rows in the main forward) or "serial" (one extra forward per step)
    branch: str = "batched"

    def __post_init__(self) -> None:
        if self.alpha is not None:
            check_strength("damro", self.alpha, self.beta)
        else:
            check_strength("damro", 0.0, self.beta)
        if self.k is not None and self.k < 1:
            raise MethodError(f"damro k must be at least 1, not {self.k}")
        if self.task not in TASKS:
            raise MethodError(f"damro task must be one of {', '.join(TASKS)}, not {self.task!r}")
        if self.head_reduction is not None and self.head_reduction not in REDUCTIONS:
            raise MethodError(f"damro head_reduction must be one of {', '.join(REDUCTIONS)}, not {self.head_reduction!r}")
        if self.preset not in PRESETS:
            raise MethodError(f"damro preset must be one of {', '.join(PRESETS)}, not {self.preset!r}")
        if self.branch not in BRANCH_MODES:
            raise MethodError(f"damro branch must be one of {', '.join(BRANCH_MODES)}, not {self.branch!r}")
        if self.vision_layer is not None and self.vision_layer < 0:
            raise MethodError(f"damro vision_layer must be a layer index >= 0, not {self.vision_layer}")

    # ------------------------------------------------------------------ family defaults
    def resolved_alpha(self, family: str) -> float:
        if self.alpha is not None:
            return float(self.alpha)
        return PAPER_DEFAULTS.get(family, {}).get(self.task, FALLBACK_DEFAULTS)[0]

    def resolved_k(self, family: str) -> int:
        if self.k is not None:
            return int(self.k)
        return PAPER_DEFAULTS.get(family, {}).get(self.task, FALLBACK_DEFAULTS)[1]

    def resolved_reduction(self, family: str) -> str:
        return self.head_reduction or DEFAULT_REDUCTION.get(family, "mean_heads")

    @property
    def shift(self) -> bool:
        """Whether the InstructBLIP off-by-one is reproduced (official preset only)."""
        return self.preset == "official" and self.official_shift


# ---------------------------------------------------------------------- scores
def cls_attention(query: torch.Tensor, key: torch.Tensor, reduction: str) -> torch.Tensor:
    """The [CLS] row of the attention over all tokens, ``[N, L]`` float32 (column 0 is [CLS]).

    ``query`` / ``key``: ``[N, H, L, d]`` projected (un-scaled) queries and keys of one layer.
    ``sum_logits``: ``softmax(sum_h q_h . k_h / sqrt(H * d))``; ``mean_heads``:
    ``mean_h softmax(q_h . k_h / sqrt(d))``.
    """
    q = query[:, :, :1].float()  # [N, H, 1, d]
    k = key.float()  # [N, H, L, d]
    dots = torch.matmul(q, k.transpose(-1, -2))[:, :, 0]  # [N, H, L]
    heads, dim = q.shape[1], q.shape[-1]
    if reduction == "sum_logits":
        return torch.softmax(dots.sum(dim=1) / math.sqrt(heads * dim), dim=-1)  # [N, L]
    if reduction == "mean_heads":
        return torch.softmax(dots / math.sqrt(dim), dim=-1).mean(dim=1)  # [N, L]
    raise MethodError(f"unknown head reduction {reduction!r}")


def received_attention(query: torch.Tensor, key: torch.Tensor, reduction: str, chunk: int = 256) -> torch.Tensor:
    """Mean attention each token receives from all tokens of one image, ``[L]`` float32.

    ``query`` / ``key``: ``[H, L, d]``. Rows are processed ``chunk`` queries at a time, so memory is
    ``H x chunk x L``, never ``H x L x L``.
    """
    q, k = query.float(), key.float()  # [H, L, d]
    heads, length, dim = q.shape
    total = torch.zeros(length, dtype=torch.float32, device=q.device)  # [L]
    for start in range(0, length, chunk):
        dots = torch.matmul(q[:, start:start + chunk], k.transpose(-1, -2))  # [H, c, L]
        if reduction == "sum_logits":
            probs = torch.softmax(dots.sum(dim=0) / math.sqrt(heads * dim), dim=-1)  # [c, L]
        elif reduction == "mean_heads":
            probs = torch.softmax(dots / math.sqrt(dim), dim=-1).mean(dim=0)  # [c, L]
        else:
            raise MethodError(f"unknown head reduction {reduction!r}")
        total += probs.sum(dim=0)
    return total / length


def top_outliers(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores of each row of ``scores`` [N, P], descending; [N, k]."""
    if k > scores.shape[-1]:
        raise MethodError(f"damro k = {k} but the image has only {scores.shape[-1]} candidate tokens; lower damro.k")
    return scores.topk(k, dim=-1, largest=True, sorted=True).indices


# ---------------------------------------------------------------------- vision-tower access
def vision_encoder_layers(adapter: Any) -> Any:
    """The vision encoder's layer list (the adapter's :attr:`~innersight.adapters.base.Adapter.vision_layers`)."""
    return adapter.vision_layers


def attention_module(layer: Any) -> Any:
    """A vision layer's self-attention module (``self_attn`` or Qwen's ``attn``)."""
    module = getattr(layer, "self_attn", None)
    if module is None:
        module = getattr(layer, "attn", None)
    if module is None:
        raise MethodError(f"cannot find the self-attention module of {type(layer).__name__}")
    return module


def default_vision_layer(adapter: Any) -> int:
    """The vision layer whose self-attention DAMRO reads by default (:attr:`DAMROConfig.vision_layer`).

    The paper (Sec. 3.3) scores the outliers at the layer whose output the projector consumes,
    an adapter fact (:attr:`~innersight.adapters.base.Adapter.projector_vision_layer`):

    - LLaVA-1.5 / LLaVA-NeXT: that layer itself (``vision_feature_layer = -2`` on CLIP ViT-L:
      ``layers[22]`` of 24, whose output is ``hidden_states[-2]``; the reference's llava-hf path
      hooks ``encoder.layers[vision_feature_layer]``, the same layer);
    - InstructBLIP: one below it, ``layers[-2]`` (the Q-Former reads the last layer; the reference
      code and the paper's "penultimate layer" read ``encoder.layers[-2]``);
    - Qwen2-VL / Qwen2.5-VL (extension): the last full-attention block at or below it (the merger
      reads the last block; windowed blocks do not see the whole image).
    """
    top = int(adapter.projector_vision_layer)
    family = adapter.family
    if family == "instructblip":
        return max(0, top - 1)
    if family.startswith("qwen"):
        full = getattr(adapter.config.vision_config, "fullatt_block_indexes", None)
        eligible = [int(i) for i in full or () if int(i) <= top]
        return max(eligible) if eligible else top
    return top


def vision_qk(module: Any, hidden: torch.Tensor, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected queries and keys of a vision attention module for its input ``hidden``.

    CLIP (``q_proj`` / ``k_proj``) and BLIP (fused ``qkv``): ``hidden`` [N, L, D] -> ``[N, H, L, d]``.
    Qwen (fused ``qkv``, rotary): ``hidden`` [L, D] -> ``[1, H, L, d]`` with the module's own
    rotary embedding applied (``position_embeddings`` from the call).
    """
    heads = int(module.num_heads)
    if hasattr(module, "q_proj") and hasattr(module, "k_proj"):
        n, length, _ = hidden.shape
        q = module.q_proj(hidden).view(n, length, heads, -1).transpose(1, 2)  # [N, H, L, d]
        k = module.k_proj(hidden).view(n, length, heads, -1).transpose(1, 2)
        return q, k
    if not hasattr(module, "qkv"):
        raise MethodError(f"cannot read queries and keys of {type(module).__name__}")
    if hidden.dim() == 3:  # BLIP: [N, L, D]
        n, length, _ = hidden.shape
        qkv = module.qkv(hidden).reshape(n, length, 3, heads, -1).permute(2, 0, 3, 1, 4)  # [3, N, H, L, d]
        return qkv[0], qkv[1]
    length = hidden.shape[0]  # Qwen: [L, D]
    q, k, _ = module.qkv(hidden).reshape(length, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)  # [L, H, d]
    rotary = kwargs.get("position_embeddings")
    if rotary is None:
        raise MethodError(f"{type(module).__name__} was called without position_embeddings")
    apply = getattr(importlib.import_module(type(module).__module__), "apply_rotary_pos_emb_vision", None)
    if apply is None:
        raise MethodError(f"cannot apply the rotary embedding of {type(module).__name__}")
    q, k = apply(q, k, rotary[0], rotary[1])
    return q.transpose(0, 1)[None], k.transpose(0, 1)[None]  # [1, H, L, d]


# ---------------------------------------------------------------------- capture
class OutlierCapture:
    """During the main prefill: each image's outlier scores (attention pre-hook on the chosen
    vision layer) and its ``k`` outlier tokens (from the projector / vision-tower output); then
    :meth:`negative_inputs` builds the negative prompt. A context manager; hooks removed on exit.

    After the prefill: ``scores[i]`` [P] (image ``i`` flat over the batch, its candidate tokens:
    patches, base-view patches for LLaVA-NeXT, merged tokens for Qwen), ``selected[i]`` [k]
    (indices into those candidates, descending score), ``features[i]`` [n_i, D] (the tokens that
    stand for the image in the negative prompt).
    """

    def __init__(self, mllm: Any, batch: Any, *, k: int, reduction: str, layer: int | None = None,
                 shift: bool = False) -> None:
        self.adapter = mllm.adapter
        self.batch = batch
        self.family = self.adapter.family
        self.k = int(k)
        self.reduction = reduction
        layers = vision_encoder_layers(self.adapter)
        self.layer = default_vision_layer(self.adapter) if layer is None else int(layer)
        if not 0 <= self.layer < len(layers):
            raise MethodError(f"damro vision_layer {self.layer} outside 0..{len(layers) - 1}")
        self.shift = bool(shift) and self.family == "instructblip"
        self.num_images = sum(len(sizes) for sizes in batch.image_sizes)
        self.scores: list[torch.Tensor] = []
        self.selected: list[torch.Tensor] = []
        self.features: list[torch.Tensor] = []
        self._vit_tokens: torch.Tensor | None = None  # InstructBLIP: [N, k, Dv]
        self._handles = HookHandles()

    # ------------------------------------------------------------------ context
    def __enter__(self) -> OutlierCapture:
        if self._handles:
            raise RuntimeError("this capture is already active; build one per generate call")
        attn = attention_module(vision_encoder_layers(self.adapter)[self.layer])
        with self._handles.installing():
            self._handles.add(attn.register_forward_pre_hook(self._score_hook, with_kwargs=True))
            if self.family in ("llava", "llava_next"):
                self._handles.add(self.adapter.projector.register_forward_hook(self._projector_hook))
            elif self.family == "instructblip":
                self._handles.add(self.adapter.vision_tower.register_forward_hook(self._vit_hook))
            elif self.family.startswith("qwen"):
                self._handles.add(self.adapter.vision_tower.register_forward_hook(self._merger_hook))
            else:
                raise MethodError(f"damro does not know the {self.family} family")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._handles.remove()

    # ------------------------------------------------------------------ hooks
    def _score_hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():
            q, k = vision_qk(module, hidden, kwargs)
            if self.family.startswith("qwen"):
                self.scores = self._merged_scores(q[0], k[0], kwargs)
            else:
                rows = self._candidate_rows(int(q.shape[0]))
                cls = cls_attention(q[rows], k[rows], self.reduction)  # [N, 1 + P]
                self.scores = list(cls[:, 1:])
            self.selected = [top_outliers(s[None], self.k)[0] for s in self.scores]

    def _candidate_rows(self, rows: int) -> torch.Tensor:
        """Rows of the vision batch that are images' candidate views (LLaVA-NeXT: the base view,
        the first tile of each image; otherwise every row is one image)."""
        if self.family != "llava_next":
            if rows != self.num_images:
                raise MethodError(f"damro: the vision tower ran {rows} images but the batch has {self.num_images}")
            return torch.arange(rows)
        tiles = self._tiles_per_image()
        if sum(tiles) != rows:
            raise MethodError(f"damro: the vision tower ran {rows} tiles but the batch's images have {sum(tiles)}")
        starts = torch.tensor([0, *tiles[:-1]]).cumsum(0)
        return starts

    def _tiles_per_image(self) -> list[int]:
        """LLaVA-NeXT: tiles (base view included) of every image, as the model computes them."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.adapter.config
        sizes = self.batch.inputs["image_sizes"]
        return [int(image_size_to_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                                              patch_size=config.vision_config.image_size)) for size in sizes]

    def _merged_scores(self, q: torch.Tensor, k: torch.Tensor, kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """Qwen: per image, mean attention received per patch pooled (mean) per merged token."""
        cu = kwargs.get("cu_seqlens")
        if cu is None:
            raise MethodError("damro: the Qwen vision block was called without cu_seqlens")
        bounds = [int(x) for x in cu.tolist()]
        if len(bounds) - 1 != self.num_images:
            raise MethodError(f"damro: vision layer {self.layer} attends within {len(bounds) - 1} segments but the "
                              f"batch has {self.num_images} images (choose a full-attention vision block)")
        out = []
        for i in range(self.num_images):
            s, e = bounds[i], bounds[i + 1]
            received = received_attention(q[:, s:e], k[:, s:e], self.reduction)  # [P_i]
            tokens = self.adapter.vision_patch_token_index(self.batch, i).to(received.device)  # [P_i]
            merged = int(tokens.max()) + 1
            sums = torch.zeros(merged, device=received.device).index_add_(0, tokens, received)
            count = torch.zeros(merged, device=received.device).index_add_(0, tokens, torch.ones_like(received))
            out.append(sums / count)  # [M_i]
        return out

    def _projector_hook(self, module: Any, args: tuple[Any, ...], output: torch.Tensor) -> None:
        """LLaVA / LLaVA-NeXT: gather the outliers from the projector output [rows, P', D]."""
        if not self.selected:
            raise MethodError("damro: the projector ran before the vision layer's attention was read")
        rows = self._candidate_rows(int(output.shape[0]))
        extra = int(output.shape[1]) - int(self.scores[0].numel())  # a kept [CLS] precedes the patches
        feats = []
        for image, row in enumerate(rows.tolist()):
            chosen = output[row, self.selected[image].to(output.device) + extra]  # [k, D]
            if self.family == "llava_next":
                newline = self.adapter.image_newline.to(device=chosen.device, dtype=chosen.dtype)[None]  # [1, D]
                chosen = torch.cat([chosen, newline], dim=0)  # [k + 1, D]
            feats.append(chosen.detach())
        self.features = feats

    def _vit_hook(self, module: Any, args: tuple[Any, ...], output: Any) -> None:
        """InstructBLIP: keep the ``k`` outlier tokens of ``post_layernorm(last hidden state)``."""
        if not self.selected:
            raise MethodError("damro: the vision tower finished before the vision layer's attention was read")
        tokens = output.last_hidden_state  # [N, 1 + P, Dv]
        offset = 0 if self.shift else 1  # the reference's off-by-one indexes tokens that include [CLS]
        index = torch.stack(self.selected).to(tokens.device) + offset  # [N, k]
        self._vit_tokens = tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1])).detach()

    def _merger_hook(self, module: Any, args: tuple[Any, ...], output: Any) -> None:
        """Qwen: gather the outliers from the merged tokens (``pooler_output``, row-major per image)."""
        if not self.selected:
            raise MethodError("damro: the vision tower finished before the vision layer's attention was read")
        merged = output.pooler_output  # [M_total, D]
        feats, start = [], 0
        for image in range(self.num_images):
            count = int(self.scores[image].numel())
            feats.append(merged[start:start + count][self.selected[image].to(merged.device)].detach())  # [k, D]
            start += count
        if start != merged.shape[0]:
            raise MethodError(f"damro: {merged.shape[0]} merged vision tokens but the images have {start}")
        self.features = feats

    # ------------------------------------------------------------------ the negative prompt
    def _qformer_features(self) -> list[torch.Tensor]:
        """InstructBLIP: the Q-Former over the ``k`` ViT tokens (same queries, same instruction),
        then the language projection: ``num_query_tokens`` tokens per image."""
        if self._vit_tokens is None:
            raise MethodError("damro: no ViT tokens were captured (the main prefill did not run the vision tower)")
        model = self.adapter.model
        tokens = self._vit_tokens  # [N, k, Dv]
        n = tokens.shape[0]
        qformer_ids = self.batch.inputs["qformer_input_ids"].to(tokens.device)  # [N, Lq]
        qformer_mask = self.batch.inputs.get("qformer_attention_mask")
        if qformer_mask is None:
            qformer_mask = torch.ones_like(qformer_ids)
        query = model.query_tokens.expand(n, -1, -1)  # [N, Q, Dq]
        query_mask = torch.ones(query.shape[:-1], dtype=torch.long, device=tokens.device)  # [N, Q]
        out = model.qformer(
            input_ids=qformer_ids,
            attention_mask=torch.cat([query_mask, qformer_mask.to(tokens.device)], dim=1),
            query_embeds=query,
            encoder_hidden_states=tokens,
            encoder_attention_mask=torch.ones(tokens.shape[:-1], dtype=torch.long, device=tokens.device),
            return_dict=True,
        )
        feats = model.language_projection(out.last_hidden_state[:, : query.shape[1]])  # [N, Q, D]
        return list(feats)

    def negative_inputs(self) -> NegativeInputs:
        """The negative prompt: every image represented by its outlier tokens only."""
        with torch.no_grad():
            feats = self._qformer_features() if self.family == "instructblip" else self.features
        if len(feats) != self.num_images:
            raise MethodError("damro: the outlier tokens were not captured during the main prefill "
                              "(was the vision tower run inside the processor's context?)")
        per_sample = features_per_sample(self.batch, feats)
        grids = [[(1, int(f.shape[0])) for f in row] for row in per_sample]
        return splice_images(self.adapter, self.batch, per_sample,
                             grid_shapes=grids if self.family.startswith("qwen") else None)


# ---------------------------------------------------------------------- the method
class DAMRO:
    """The ``damro`` method: per generate call a fresh :class:`~.contrast.ContrastiveProcessor`
    whose negative branch sees only each image's outlier tokens (captured during the main
    prefill by an :class:`OutlierCapture`)."""

    def __init__(self, config: DAMROConfig | None = None) -> None:
        self.config = config or DAMROConfig()

    def generation_overrides(self, mllm: Any, generation: dict[str, Any]) -> dict[str, Any]:
        """``generate`` settings this method needs: the official preset's pure sampling (a clear
        error when the call asked for something else), nothing for the default preset."""
        if self.config.preset != "official":
            return {}
        clashes = [f"{key}={generation[key]!r}" for key, value in OFFICIAL_GENERATION.items()
                   if key in generation and generation[key] is not None and generation[key] != value]
        if clashes:
            raise MethodError(f"damro preset 'official' samples at temperature 1 with no processors or warpers; "
                              f"it cannot honour {', '.join(clashes)}")
        return dict(OFFICIAL_GENERATION)

    def processors(self, mllm: Any, batch: Any, generation: dict[str, Any]) -> list[Any]:
        check_generation(mllm, generation, "damro")
        c, family = self.config, mllm.adapter.family
        capture = OutlierCapture(mllm, batch, k=c.resolved_k(family), reduction=c.resolved_reduction(family),
                                 layer=c.vision_layer, shift=c.shift)
        branch = NegativeBranch(mllm.adapter, capture.negative_inputs, mode=c.branch)
        seed = c.seed if c.preset == "official" else None
        return [ContrastiveProcessor(branch, alpha=c.resolved_alpha(family), beta=c.beta, contexts=[capture],
                                     seed=seed, name="damro")]
