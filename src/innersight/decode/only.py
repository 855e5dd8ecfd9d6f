"""ONLY: one-layer intervention, a textually-enhanced branch from a single layer of the same forward.

Wan et al., "ONLY: One-Layer Intervention Sufficiently Mitigates Hallucinations in Large
Vision-Language Models", ICCV 2025, arXiv 2507.00898; reference code zifuwan/ONLY (LLaVA's
``modeling_llama.py`` / ``llava_llama.py`` / ``only_sample.py``).

No second forward. In decoder layer ``layer`` (0 in the reference) the attention row of the
predicting position (the last row of every forward) gives, per head, the **text-to-visual entropy
ratio** (TVER)::

    p        = softmax row [Lk] of the head
    p_text   = p on text keys (valid, not image, not the first token), values > mean + std zeroed,
               renormalised;  p_image likewise on the image keys
    TVER_h   = H(p_text) / H(p_image)              (H: Shannon entropy)
    keep_h   = TVER_h >= mean over heads of TVER   (heads below the mean are removed)

The enhanced attention output is ``a_cd = o_proj(concat_h keep_h * p_h V_h)`` (removed heads give
zero). It skips the middle layers and is processed by the last decoder layer only, mixed with
that layer's (normal) input ``r``, then read out with the normal final state ``h``::

    x       = input_layernorm(a_cd) + 0.2 * r
    x       = x + mlp(post_attention_layernorm(x))
    l_cd    = lm_head(norm(x) + 0.5 * norm(h))

Each step compares ``l`` (the model's logits) with ``l_cd`` by ``d = sum |softmax(l) - softmax(l_cd)|``
(the reference's "tvd", per sample here: the reference sums over its batch of one) and::

    d <  gamma:  l' = l + alpha_pos * l_cd                        (collaborative)
    d >= gamma:  l' = (1 + alpha_neg) * l - alpha_neg * l_cd      (contrastive)
    l'[l < max(l) + log(beta)] = -inf

Defaults are the reference scripts' (``ritual_alpha_pos=3 ritual_alpha_neg=1 ritual_beta=0.1
js_gamma=0.2 enhance_layer_index=0``). ``alpha_pos = alpha_neg = 0`` is the plain model under the
cutoff (the top token always kept). The layer's attention is computed through the one switchable
attention implementation (SDPA for the model, the extra row statistics for the enhanced branch);
the last layer's input and output are read by forward hooks at the last position only. Every
sample must hold an image (the ratio needs image keys); beam search is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from transformers import LogitsProcessor

from ..attention import additive_mask, key_start, layer_handlers, repeat_kv, sdpa_forward
from ..errors import MethodError
from ..hooks import HookHandles
from .contrast import check_generation, plausibility_cutoff

SOURCE = "arXiv 2507.00898 (ONLY, ICCV 2025)"
SCRIPTS = "zifuwan/ONLY eval_bench/scripts: alpha_pos=3 alpha_neg=1 beta=0.1 js_gamma=0.2 enhance_layer_index=0"
CODE = "zifuwan/ONLY modeling_llama.py / llava_llama.py"


@dataclass(frozen=True)
class ONLYConfig:
    """ONLY settings; defaults are the reference's."""

    alpha_pos: float = field(default=3.0, metadata={"source": f"{SOURCE} Eq. 9; {SCRIPTS}"})
    alpha_neg: float = field(default=1.0, metadata={"source": f"{SOURCE} Eq. 9; {SCRIPTS}"})
    beta: float = field(default=0.1, metadata={"source": f"{SOURCE} (adaptive plausibility); {SCRIPTS}"})
    #: threshold on sum |p - p_cd| between collaborative and contrastive decoding
    gamma: float = field(default=0.2, metadata={"source": f"{SOURCE} Eq. 9; {SCRIPTS}"})
    #: the one decoder layer (0-based) whose heads are selected by TVER
    layer: int = field(default=0, metadata={"source": f"{SOURCE} Sec. 4; {SCRIPTS}"})
    #: weight of the last layer's normal input mixed into the enhanced state
    residual_weight: float = field(default=0.2, metadata={"source": CODE + " (last layer: 0.2 * residual)"})
    #: weight of the normal final state added before the LM head
    final_weight: float = field(default=0.5, metadata={"source": CODE + " (hidden_states_cd + 0.5 * outputs[0])"})

    def __post_init__(self) -> None:
        for name in ("alpha_pos", "alpha_neg", "gamma", "residual_weight", "final_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise MethodError(f"only {name} must be a finite number >= 0, not {value}")
        if not 0 < self.beta <= 1:
            raise MethodError(f"only beta must be in (0, 1], not {self.beta}")
        if self.layer < 0:
            raise MethodError(f"only layer must be >= 0, not {self.layer}")


# ---------------------------------------------------------------------- closed forms
def cleaned_entropy(probs: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Entropy of ``probs`` [..., K] restricted to ``columns`` (bool, broadcastable): values above
    mean + std of the selected entries zeroed, the rest renormalised; [...] float32."""
    cols = columns.expand_as(probs)
    n = cols.sum(dim=-1, keepdim=True).clamp_min(1).float()  # [..., 1]
    x = probs.float() * cols  # [..., K]
    mean = x.sum(dim=-1, keepdim=True) / n
    var = (((x - mean) ** 2) * cols).sum(dim=-1, keepdim=True) / (n - 1).clamp_min(1)
    x = torch.where(x > mean + var.sqrt(), torch.zeros_like(x), x)
    q = x / x.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return -(q * torch.log(q.clamp_min(1e-30))).sum(dim=-1)


def kept_heads(probs: torch.Tensor, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep [B, H] bool, TVER [B, H]) of attention rows ``probs`` [B, H, K] with key masks
    ``text`` and ``image`` [B, K]: heads whose ratio is below the mean over heads are removed."""
    ratio = cleaned_entropy(probs, text[:, None, :]) / cleaned_entropy(probs, image[:, None, :]).clamp_min(1e-30)
    return ratio >= ratio.mean(dim=-1, keepdim=True), ratio


def only_scores(logits: torch.Tensor, enhanced: torch.Tensor, *, alpha_pos: float, alpha_neg: float,
                gamma: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ONLY's scores [B, V] float32, collaborative rows [B] bool) from ``l`` and ``l_cd`` [B, V]."""
    lf = logits.float()
    ecd = enhanced.to(device=lf.device, dtype=torch.float32)
    distance = (torch.softmax(lf, -1) - torch.softmax(ecd, -1)).abs().sum(dim=-1)  # [B]
    collaborative = distance < gamma
    together = lf + alpha_pos * ecd
    apart = (1 + alpha_neg) * lf - alpha_neg * ecd
    out = torch.where(collaborative[:, None], together, apart)
    return out.masked_fill(lf < plausibility_cutoff(lf, beta), float("-inf")), collaborative


# ---------------------------------------------------------------------- the branch
class EnhancedBranch:
    """Hooks of one generate call: the enhanced attention output at ``layer`` and the last layer's
    input and output, last position only; :meth:`logits` gives ``l_cd`` [B, V] of the latest forward."""

    #: how the branch runs (for reports beside the negative branches): inside the main forward
    mode = "in-forward"
    #: extra forwards it costs: none
    steps = 0

    def __init__(self, mllm: Any, batch: Any, config: ONLYConfig) -> None:
        adapter = mllm.adapter
        if config.layer >= adapter.num_layers - 1:
            raise MethodError(f"only layer {config.layer} must come before the model's last layer "
                              f"({adapter.num_layers - 1})")
        last = adapter.decoder_layers[-1]
        for name in ("input_layernorm", "post_attention_layernorm", "mlp"):
            if not hasattr(last, name):
                raise MethodError(f"only needs a pre-norm decoder layer with {name}; {type(last).__name__} has none")
        self.mllm, self.config = mllm, config
        ids = batch.input_ids  # [B, L0]
        self.image = torch.zeros(ids.shape, dtype=torch.bool)  # [B, L0]
        for b, layouts in enumerate(batch.layouts):
            positions = [lay.positions.cpu() for lay in layouts if lay.num_tokens]
            if not positions:
                raise MethodError("only needs an image in every sample (its head ratio compares text and image "
                                  "attention)")
            self.image[b, torch.cat(positions)] = True
        mask = batch.inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        self.first = mask.cpu().long().argmax(dim=-1)  # [B] each prompt's first token (after left padding)
        self.enhanced: torch.Tensor | None = None  # [B, D]
        self.residual: torch.Tensor | None = None  # [B, D]
        self.final: torch.Tensor | None = None  # [B, D]
        self.keep: torch.Tensor | None = None  # [B, H] of the latest forward
        self._handles = HookHandles()
        self._attention: Any = None

    def __enter__(self) -> EnhancedBranch:
        adapter = self.mllm.adapter
        last = adapter.decoder_layers[-1]
        with self._handles.installing():
            self._handles.add(last.register_forward_pre_hook(self._input, with_kwargs=True))
            self._handles.add(last.register_forward_hook(self._output))
            self._attention = layer_handlers(self.mllm.model, adapter.decoder_layers, {self.config.layer: self._attend})
            try:
                self._attention.__enter__()
            except RuntimeError as exc:
                self._attention = None
                raise MethodError(f"only cannot share layer {self.config.layer}'s attention with another "
                                  f"attention method ({exc})") from exc
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if self._attention is not None:
                self._attention.__exit__(None, None, None)
        finally:
            self._attention = None
            self._handles.remove()

    def _input(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]  # [B, L, D]
        self.residual = hidden[:, -1].detach().clone()

    def _output(self, module: Any, args: tuple[Any, ...], output: Any) -> None:
        hidden = output[0] if isinstance(output, (tuple, list)) else output  # [B, L, D]
        self.final = hidden[:, -1].detach().clone()

    def _attend(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs: Any) -> tuple[Any, Any]:
        out, weights = sdpa_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        rows, heads, _, dim = query.shape
        lk = key.shape[2]
        scale = scaling if scaling is not None else dim ** -0.5
        q = query[:, :, -1:, :].float()  # [B, H, 1, d]
        z = torch.matmul(q, repeat_kv(key, heads).float().transpose(-1, -2)) * scale  # [B, H, 1, Lk]
        if attention_mask is not None:
            bias = additive_mask(attention_mask[:, :, -1:, :], torch.float32)  # [B|1, 1, 1, Lk]
            z = z + bias
            valid = (bias > torch.finfo(torch.float32).min / 2)[:, 0, 0, :].expand(rows, lk)  # [B, Lk]
        else:
            valid = torch.ones(rows, lk, dtype=torch.bool, device=query.device)
        probs = torch.softmax(z, dim=-1)[:, :, 0, :]  # [B, H, Lk]
        if rows != self.image.shape[0]:
            raise MethodError(f"only: the model ran {rows} rows but the prepared batch has {self.image.shape[0]}")
        # key column j is sequence position start + j (start > 0 where a sliding-window cache
        # layer hands over only its last keys); positions past the prompt are generated text
        start = key_start(module, int(query.shape[2]), lk)
        image = torch.zeros(rows, lk, dtype=torch.bool, device=query.device)
        width = max(0, min(lk, self.image.shape[1] - start))
        image[:, :width] = self.image[:, start:start + width].to(query.device)
        # the first token of each prompt (BOS / the template's first token) is not text, where it is
        # among the keys
        first = self.first.to(query.device) - start  # [B] its key column
        text = valid & ~image
        seen = (first >= 0) & (first < lk)
        text[torch.arange(rows, device=query.device)[seen], first[seen]] = False
        keep, _ = kept_heads(probs, text, image)  # [B, H]
        self.keep = keep
        heads_out = torch.matmul((probs * keep[..., None]).unsqueeze(2), repeat_kv(value, heads).float())  # [B, H, 1, d]
        flat = heads_out[:, :, 0, :].reshape(rows, heads * dim).to(module.o_proj.weight.dtype)  # [B, H * d]
        self.enhanced = module.o_proj(flat).detach()  # [B, D]
        return out, weights

    def logits(self) -> torch.Tensor:
        """``l_cd`` [B, V] float32 of the latest forward."""
        if self.enhanced is None or self.residual is None or self.final is None:
            raise MethodError("only: the enhanced branch was not captured (the hooks are not active)")
        adapter, c = self.mllm.adapter, self.config
        last = adapter.decoder_layers[-1]
        device = self.residual.device
        x = last.input_layernorm(self.enhanced.to(device)) + c.residual_weight * self.residual  # [B, D]
        x = x + last.mlp(last.post_attention_layernorm(x))
        norm = adapter.final_norm
        hidden = norm(x) + c.final_weight * norm(self.final.to(x.device))
        head = adapter.lm_head
        return head(hidden.to(head.weight.device)).float()  # [B, V]


class ONLYProcessor(LogitsProcessor):
    """ONLY's step; a context manager that activates its :class:`EnhancedBranch` for one call."""

    def __init__(self, branch: EnhancedBranch, config: ONLYConfig) -> None:
        self.branch, self.config = branch, config
        self.last_enhanced: torch.Tensor | None = None
        #: per step, how many rows decoded collaboratively
        self.collaborative: list[int] = []

    def __enter__(self) -> ONLYProcessor:
        self.branch.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.branch.__exit__(exc_type, exc, tb)

    def details(self) -> dict[str, Any]:
        return {"only": {"collaborative_steps": list(self.collaborative)}}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        enhanced = self.branch.logits()  # [B, V]
        self.last_enhanced = enhanced
        c = self.config
        out, together = only_scores(scores, enhanced, alpha_pos=c.alpha_pos, alpha_neg=c.alpha_neg, gamma=c.gamma,
                                    beta=c.beta)
        self.collaborative.append(int(together.sum()))
        return out.to(scores.dtype)


class ONLY:
    """The ``only`` method (decoding point): a fresh processor and branch per generate call."""

    def __init__(self, config: ONLYConfig | None = None) -> None:
        self.config = config or ONLYConfig()

    def processors(self, mllm: Any, batch: Any, generation: dict[str, Any]) -> list[Any]:
        check_generation(mllm, generation, "only")
        return [ONLYProcessor(EnhancedBranch(mllm, batch, self.config), self.config)]
