"""DAMRO: contrastive decoding against the vision encoder's outlier tokens.

Gong et al., "DAMRO: Dive into the Attention Mechanism of LVLM to Reduce Object Hallucination",
EMNLP 2024, arXiv 2410.04514; reference code coder-gx/DAMRO. A ViT carries a few high-norm
"outlier" tokens, mostly on background patches, that soak up the [CLS] attention; the LLM decoder
attends to the same positions and hallucinates more when it does. DAMRO builds a negative branch
that sees **only** those outlier tokens and contrasts it away:

1. Outlier selection (Sec. 3.3, Eq. 3-4): ``A_cls = softmax(Q_cls K^T / sqrt(d))`` over the
   vision tokens at the layer whose output the projector consumes (the paper's "penultimate
   layer" for LLaVA-1.5: ``layers[22]`` of CLIP ViT-L's 24; the adapter fact
   :attr:`~innersight.adapters.base.Adapter.outlier_vision_layer`), computed here from that
   layer's self-attention *input* (the
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
   The per-family facts below are the adapters' vision facet (``adapters/base.py``: the scored
   view, [CLS] or its substitute, the candidates, how a subset of them is re-encoded); this module
   holds no family decision.

   - LLaVA-1.5: ``k`` projected patch tokens.
   - LLaVA-NeXT: the base (global) view's top-``k`` tokens plus one ``image_newline`` token.
   - InternVL 3 / 3.5: the [CLS] row of each image's global tile (the thumbnail, its last tile),
     averaged over the 2x2 patches each pixel-shuffled token holds; ``k`` projected tokens.
   - InstructBLIP: the Q-Former is run again over only the ``k`` ViT tokens (``post_layernorm``
     output, [CLS] excluded), with the same queries and instruction text; the negative image is
     still ``num_query_tokens`` tokens. The reference code gathers the patch indices from features
     that still include [CLS] (an off-by-one: index ``i`` picks patch ``i - 1``, and index 0 the
     [CLS] token); :attr:`DAMROConfig.official_shift` reproduces it in the ``official`` preset only.
   - Qwen2-VL / Qwen2.5-VL (**an extension beyond the paper**: the Qwen ViT has no [CLS]): the
     score of a patch is the mean attention it *receives* from all patches of its image at the
     last full-attention vision block (per-head softmax averaged over heads, or one head over the
     full ``q``/``k``), averaged over the 2x2 patches of each merged token (the adapter's
     ``pool_vision_scores``, so Qwen2.5-VL's window order is handled); the ``k`` merged tokens with
     the highest scores form the negative image, placed on a ``1 x k`` grid (M-RoPE positions from
     ``adapter.prompt_positions``). Any family without a [CLS] gets the same substitute.
   - Qwen3-VL: as Qwen2-VL (no [CLS], full attention in every block: the last block scores), and
     each outlier keeps its DeepStack rows (the decoder adds them at its position after the first
     decoder layers; the adapter's decoder injections), so the negative image is the outliers as
     the model itself would see them.
   - SmolVLM (SigLIP, no [CLS]; the same extension): the substitute on each image's global frame
     (its last frame, after the tiles), averaged over the ``s x s`` patches each pixel-shuffled
     token holds; the negative image is ``k`` connector tokens written as the processor writes
     an unsplit image (``<fake_token_around_image><global-img>`` ... ``<fake_token_around_image>``),
     the tiles and their markers removed.
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

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch

from ..adapters.base import ImageRows
from ..errors import MethodError
from ..hooks import HookHandles
from .contrast import (
    BRANCH_MODES,
    NEGATIVE_CACHES,
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

# Per-family data of the paper and its reference code. They stay here, looked up by family name
# with a documented fallback, rather than in the adapters: they are DAMRO's published settings and
# the behaviour of DAMRO's reference code for the models it evaluated, not facts of an
# architecture; a family the paper did not evaluate gets the fallback (LLaVA-1.5's values, the
# correct indexing), never another family's path. What the method needs of the architecture
# itself (layers, [CLS] or its substitute, candidates, re-encoding) comes from the adapter.

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
#: families whose reference code indexes the candidates from the sequence start ([CLS] included:
#: an off-by-one reproduced by the ``official`` preset only); any other family: correct indexing
REFERENCE_INDEXES_WITH_PREFIX: dict[str, bool] = {"instructblip": True}

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
    #: index of the vision encoder layer whose self-attention is read; None: the adapter's
    #: outlier_vision_layer, the layer whose output the projector consumes (LLaVA-1.5's
    #: vision_feature_layer=-2 on CLIP ViT-L is layers[22] of 24), InstructBLIP one below it
    #: (layers[-2], reference code), Qwen the last full-attention block
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
    #: batched branch only: "packed" (the negative rows' keys and values kept at their own length)
    #: or "padded" (left-padded to the main prompt's length; the fallback, kept for comparison)
    negative_cache: str = "packed"

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
        if self.negative_cache not in NEGATIVE_CACHES:
            raise MethodError(f"damro negative_cache must be one of {', '.join(NEGATIVE_CACHES)}, "
                              f"not {self.negative_cache!r}")
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


# ---------------------------------------------------------------------- per-image scores
def image_scores(adapter: Any, batch: Any, views: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 reduction: str) -> list[torch.Tensor]:
    """Each image's outlier score per candidate, ``[M_i]`` float32, from the queries and keys
    ``[H, L_i, d]`` of its scored view (:meth:`~innersight.adapters.base.Adapter.vision_attention_per_image`).

    With a [CLS] (:attr:`~innersight.adapters.base.Adapter.vision_has_cls`): its attention row
    over the view (:func:`cls_attention`, [CLS] column dropped). Without one (**an extension beyond
    the paper**): the mean attention each token receives from the view (:func:`received_attention`).
    The adapter then pools per-token scores into candidates
    (:meth:`~innersight.adapters.base.Adapter.pool_vision_scores`; Qwen: per merged 2x2 token).
    """
    if adapter.vision_has_cls:
        if len({tuple(q.shape) for q, _ in views}) == 1:  # one batched product when the views agree
            cls = cls_attention(torch.stack([q for q, _ in views]), torch.stack([k for _, k in views]), reduction)
            per_token = list(cls[:, 1:])  # N x [P]
        else:
            per_token = [cls_attention(q[None], k[None], reduction)[0, 1:] for q, k in views]
    else:
        per_token = [received_attention(q, k, reduction) for q, k in views]  # N x [P_i]
    return [adapter.pool_vision_scores(batch, i, scores) for i, scores in enumerate(per_token)]


# ---------------------------------------------------------------------- capture
class OutlierCapture:
    """During the main prefill: each image's outlier scores (a pre-hook on the chosen vision
    layer's attention) and its ``k`` outlier tokens (a hook on the module whose output holds the
    candidates); then :meth:`negative_inputs` builds the negative prompt. A context manager; hooks
    removed on exit. Every family fact comes from the adapter's vision facet.

    After the prefill: ``scores[i]`` [M_i] (image ``i`` flat over the batch, per candidate:
    patches, base-view patches for LLaVA-NeXT, merged tokens for Qwen), ``selected[i]`` [k]
    (indices into the candidates, descending score), ``tokens[i]`` [k, Dc] (the selected
    candidates as the model encoded them; :meth:`negative_inputs` re-encodes them), and
    ``injected[i]`` [S, k, D] where the family's decoder adds image rows inside the stack (Qwen3-VL's
    DeepStack: the outliers' own rows, same indices; the adapter's ``vision_candidate_injections``),
    else empty.
    """

    def __init__(self, mllm: Any, batch: Any, *, k: int, reduction: str, layer: int | None = None,
                 shift: bool = False) -> None:
        self.adapter = mllm.adapter
        self.batch = batch
        self.family = self.adapter.family
        self.k = int(k)
        self.reduction = reduction
        layers = self.adapter.vision_layers
        self.layer = self.adapter.outlier_vision_layer if layer is None else int(layer)
        if not 0 <= self.layer < len(layers):
            raise MethodError(f"damro vision_layer {self.layer} outside 0..{len(layers) - 1}")
        self.shift = bool(shift) and REFERENCE_INDEXES_WITH_PREFIX.get(self.family, False)
        self.num_images = sum(len(sizes) for sizes in batch.image_sizes)
        self.scores: list[torch.Tensor] = []
        self.selected: list[torch.Tensor] = []
        self.tokens: list[torch.Tensor] = []
        self.injected: list[torch.Tensor] = []
        self._handles = HookHandles()

    # ------------------------------------------------------------------ context
    def __enter__(self) -> OutlierCapture:
        if self._handles:
            raise RuntimeError("this capture is already active; build one per generate call")
        attn = self.adapter.vision_attention(self.layer)
        source = self.adapter.vision_subset_source
        with self._handles.installing():
            self._handles.add(attn.register_forward_pre_hook(self._score_hook, with_kwargs=True))
            self._handles.add(source.register_forward_hook(self._source_hook))
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
        """The vision layer's attention input: score every image's candidates, pick the top ``k``."""
        hidden = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():
            q, k = self.adapter.vision_query_key(module, hidden, kwargs)  # [N, H, L, d]
            views = self.adapter.vision_attention_per_image(self.batch, q, k, kwargs)
            if len(views) != self.num_images:
                raise MethodError(f"damro: vision layer {self.layer} scored {len(views)} images but the batch has "
                                  f"{self.num_images}")
            self.scores = image_scores(self.adapter, self.batch, views, self.reduction)
            self.selected = [top_outliers(s[None], self.k)[0] for s in self.scores]

    def _source_hook(self, module: Any, args: tuple[Any, ...], output: Any) -> None:
        """The candidates' module output: keep each image's ``k`` selected candidates."""
        if not self.selected:
            raise MethodError("damro: the image tokens were encoded before the vision layer's attention was read")
        with torch.no_grad():
            candidates = self.adapter.vision_candidates(self.batch, output, with_prefix=self.shift)
        if len(candidates) != self.num_images:
            raise MethodError(f"damro: {len(candidates)} images of candidate tokens but the batch has {self.num_images}")
        # official shift: indices count from the sequence start ([CLS] at 0), as the reference did
        self.tokens = [c[sel.to(c.device)].detach() for c, sel in zip(candidates, self.selected)]  # N x [k, Dc]
        with torch.no_grad():
            rows = self.adapter.vision_candidate_injections(self.batch, output)  # N x [S, M_i, D] or None
        self.injected = [] if rows is None else [r[:, sel.to(r.device)].detach()  # N x [S, k, D]
                                                 for r, sel in zip(rows, self.selected)]

    # ------------------------------------------------------------------ the negative prompt
    def negative_inputs(self) -> NegativeInputs:
        """The negative prompt: every image represented by its outlier tokens only, re-encoded by
        the adapter (:meth:`~innersight.adapters.base.Adapter.encode_vision_subset`; InstructBLIP:
        the Q-Former over the ``k`` ViT tokens) and placed on a ``1 x n`` grid where the family's
        positions need one (Qwen's M-RoPE; ignored by 1D positions)."""
        if len(self.tokens) != self.num_images:
            raise MethodError("damro: the outlier tokens were not captured during the main prefill "
                              "(was the vision tower run inside the processor's context?)")
        with torch.no_grad():
            feats = self.adapter.encode_vision_subset(self.batch, self.tokens)
        grids = [[(1, n) for n in row] for row in features_per_sample(self.batch, [int(f.shape[0]) for f in feats])]
        if self.injected:  # each outlier keeps its decoder injections (Qwen3-VL's DeepStack rows)
            if any(f.shape[0] != r.shape[1] for f, r in zip(feats, self.injected)):
                raise MethodError(f"damro: {self.family} re-encodes the outlier tokens into another number of "
                                  "tokens, so their decoder injections cannot follow them")
            feats = [ImageRows(f, r) for f, r in zip(feats, self.injected)]
        per_sample = features_per_sample(self.batch, feats)
        return splice_images(self.adapter, self.batch, per_sample, grid_shapes=grids)


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
        branch = NegativeBranch(mllm.adapter, capture.negative_inputs, mode=c.branch, negative_cache=c.negative_cache)
        seed = c.seed if c.preset == "official" else None
        return [ContrastiveProcessor(branch, alpha=c.resolved_alpha(family), beta=c.beta, contexts=[capture],
                                     seed=seed, name="damro")]
