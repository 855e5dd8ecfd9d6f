"""DeCo: dynamic correction decoding from preceding layers.

"MLLM Can See? Dynamic Correction Decoding for Hallucination Mitigation", ICLR 2025,
arXiv 2410.11779. Probes on intermediate hidden states recognise whether an object is present
even when the final output hallucinates it: the language prior suppresses the visual evidence in
the last layers. At each decoding step DeCo therefore borrows the logits of the preceding layer
that is most confident about a plausible token:

1. ``p = softmax(final logits)``; candidates = the top-``k`` tokens of ``p`` cut at the first
   index where the cumulative probability reaches ``top_p`` (that crossing token kept). A top
   token with ``p >= top_p`` is the only candidate: DeCo cannot change that choice.
2. Early-exit logits ``lm_head(final_norm(h_i))`` at the last position for each layer ``i`` of
   the preceding range; softmax over the full vocabulary; the candidate columns ``[n_layers, C]``.
3. Anchor layer = the layer holding the single largest probability there; ``max_prob`` = it.
4. ``logits = final_logits + alpha * max_prob * anchor_logits`` (raw logits); non-candidates
   ``-inf``. Under beam search the processor receives log-probabilities: the correction is added
   to them, non-candidates masked, and the result re-normalised with ``log_softmax``.

Every row of a batch has its own candidate set and anchor layer (the reference code runs batch
size 1 only). Softmaxes are float32 (the reference keeps early-exit logits in fp16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor

from ..errors import MethodError
from .early_exit import EarlyExitDecoding, HookedProcessorMixin, LayerLogits

SOURCE = "arXiv 2410.11779 (DeCo, ICLR 2025), implementation details; specs/deco.md Defaults table"

#: the preceding-layer range (1-based ``hidden_states`` indices, inclusive) as fractions of the
#: decoder depth. LLaVA-1.5-7B: layers 20..28 of 32 (paper); InstructBLIP Vicuna-7B: 15..24 of 32
#: (authors' hint). LLaVA-NeXT shares LLaVA-1.5's language model family; no range is published.
#: Published data keyed by family name (kept beside its source rather than in the adapters): a
#: lookup, not a branch; other families take :data:`DEFAULT_LAYER_FRACTION`, any family
#: ``layers=`` from the user.
PAPER_LAYER_FRACTIONS: dict[str, tuple[float, float]] = {
    "llava": (20 / 32, 28 / 32),
    "llava_next": (20 / 32, 28 / 32),
    "instructblip": (15 / 32, 24 / 32),
}
#: any other model (Qwen2-VL / Qwen2.5-VL: none published): LLaVA-1.5's range scaled by depth,
#: e.g. 17..24 of 28 layers
DEFAULT_LAYER_FRACTION: tuple[float, float] = (20 / 32, 28 / 32)


@dataclass(frozen=True)
class DeCoConfig:
    """DeCo settings; defaults are the paper's values for LLaVA-1.5-7B."""

    #: strength of the preceding-layer correction
    alpha: float = field(default=0.6, metadata={"source": SOURCE})
    #: candidate tokens: at most this many top tokens of the final distribution ...
    top_k: int = field(default=20, metadata={"source": SOURCE})
    #: ... cut where their cumulative probability reaches this (the crossing token kept)
    top_p: float = field(default=0.9, metadata={"source": SOURCE})
    #: (first, last) preceding layers, 1-based ``hidden_states`` indices, inclusive; None: the
    #: paper's range for the family as a fraction of depth (LLaVA-1.5-7B 20..28, InstructBLIP
    #: 15..24 of 32), else LLaVA-1.5's fraction (Qwen2-VL 7B: 17..24 of 28)
    layers: tuple[int, int] | None = field(default=None, metadata={"source": SOURCE})

    def __post_init__(self) -> None:
        if not math.isfinite(self.alpha) or self.alpha < 0:
            raise MethodError(f"deco alpha must be a finite number >= 0, not {self.alpha}")
        if self.top_k < 1:
            raise MethodError(f"deco top_k must be at least 1, not {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MethodError(f"deco top_p must be in (0, 1], not {self.top_p}")
        if self.layers is not None:
            if len(self.layers) != 2 or not 1 <= self.layers[0] <= self.layers[1]:
                raise MethodError(f"deco layers must be (first, last) with 1 <= first <= last, not {self.layers}")

    def resolve_layers(self, adapter: Any) -> tuple[int, ...]:
        """The preceding layers (``hidden_states`` indices) for ``adapter``'s model."""
        depth = int(adapter.num_layers)
        if self.layers is not None:
            first, last = self.layers
            if last > depth:
                raise MethodError(f"deco layers {first}..{last} outside 1..{depth} for this model")
            return tuple(range(first, last + 1))
        lo, hi = PAPER_LAYER_FRACTIONS.get(adapter.family, DEFAULT_LAYER_FRACTION)
        first = max(1, math.floor(lo * depth + 1e-9))
        last = math.floor(hi * depth + 1e-9)
        if depth > 1:
            last = min(last, depth - 1)  # preceding layers: never the final one by default
        last = max(first, min(last, depth))
        return tuple(range(first, last + 1))


def candidates(probs: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate tokens of each row of ``probs`` [B, V]: ``(ids [B, k], keep [B, k])``, the
    top-``k`` ids in descending probability and which of them are candidates (a prefix: cut at
    the first index whose cumulative probability reaches ``top_p``, that index kept)."""
    k = min(top_k, probs.shape[-1])
    top, ids = probs.topk(k, dim=-1)  # [B, k]
    before = top.cumsum(dim=-1) - top  # [B, k] probability mass strictly before each index
    keep = (before < top_p) & (top > 0)  # [B, k]; tokens already excluded (-inf) never return
    keep[:, 0] = True
    return ids, keep


def deco_correct(
    scores: torch.Tensor,
    layer_logits: torch.Tensor,
    *,
    alpha: float,
    top_k: int,
    top_p: float,
    log_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DeCo step on a batch.

    ``scores`` [B, V]: final-layer logits (or log-probabilities when ``log_probs``: beam search);
    ``layer_logits`` [B, N, V]: early-exit logits of the N preceding layers. Returns the new
    scores [B, V] (float32), the anchor's index into the N layers [B] and ``max_prob`` [B].
    """
    if layer_logits.dim() != 3 or layer_logits.shape[0] != scores.shape[0] or layer_logits.shape[2] != scores.shape[1]:
        raise MethodError(
            f"deco: early-exit logits {tuple(layer_logits.shape)} do not match scores {tuple(scores.shape)}; "
            "expected [B, layers, V]"
        )
    final = scores.float()  # [B, V]
    ids, keep = candidates(torch.softmax(final, dim=-1), top_k, top_p)  # [B, k], [B, k]
    layer_logits = layer_logits.to(device=final.device, dtype=torch.float32)  # [B, N, V]
    n_layers, k = layer_logits.shape[1], ids.shape[1]
    layer_probs = torch.softmax(layer_logits, dim=-1)  # [B, N, V]
    cand = layer_probs.gather(2, ids[:, None, :].expand(-1, n_layers, -1))  # [B, N, k]
    cand = cand.masked_fill(~keep[:, None, :], -1.0)  # non-candidates never win
    flat = cand.flatten(1).argmax(dim=1)  # [B] first maximum, layer-major
    anchor = torch.div(flat, k, rounding_mode="floor")  # [B]
    rows = torch.arange(final.shape[0], device=final.device)
    max_prob = cand.flatten(1)[rows, flat]  # [B]
    anchor_logits = layer_logits[rows, anchor]  # [B, V]
    out = final + alpha * max_prob[:, None] * anchor_logits  # [B, V]
    allowed = torch.zeros_like(out, dtype=torch.bool).scatter(1, ids, keep)  # [B, V]
    out = out.masked_fill(~allowed, float("-inf"))
    if log_probs:
        out = torch.log_softmax(out, dim=-1)
    return out, anchor, max_prob


class DeCoProcessor(HookedProcessorMixin, LogitsProcessor):
    """The DeCo correction as a ``LogitsProcessor`` (pure: never modifies ``scores`` in place).

    ``source.logits()`` gives the preceding layers' early-exit logits [B, N, V] of the step being
    scored; ``layers`` names them (``hidden_states`` indices) for :attr:`last_anchor`. Used as a
    context manager it activates the source's hooks (an :class:`~.early_exit.EarlyExit`).
    ``log_probs``: the scores are log-probabilities (beam search).
    """

    def __init__(
        self,
        source: LayerLogits,
        *,
        alpha: float = 0.6,
        top_k: int = 20,
        top_p: float = 0.9,
        log_probs: bool = False,
        layers: tuple[int, ...] | None = None,
    ) -> None:
        DeCoConfig(alpha=alpha, top_k=top_k, top_p=top_p)  # validation
        self.source = source
        self.alpha, self.top_k, self.top_p = float(alpha), int(top_k), float(top_p)
        self.log_probs = log_probs
        self.layers = layers
        #: the anchor layer of each row at the latest step (``hidden_states`` index when
        #: ``layers`` is given, else the index into the source's layers) and its ``max_prob``
        self.last_anchor: torch.Tensor | None = None
        self.last_max_prob: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out, anchor, max_prob = deco_correct(
            scores, self.source.logits(), alpha=self.alpha, top_k=self.top_k, top_p=self.top_p,
            log_probs=self.log_probs,
        )
        if self.layers is not None:
            anchor = torch.tensor(self.layers, device=anchor.device)[anchor]
        self.last_anchor, self.last_max_prob = anchor, max_prob
        return out.to(scores.dtype)


class DeCo(EarlyExitDecoding):
    """The ``deco`` method: a fresh :class:`DeCoProcessor` (with its own early-exit hooks) per
    generate call; greedy, sampling and beam search."""

    def __init__(self, config: DeCoConfig | None = None) -> None:
        self.config = config or DeCoConfig()

    def layers(self, adapter: Any) -> tuple[int, ...]:
        return self.config.resolve_layers(adapter)

    def build_processor(self, source: LayerLogits, log_probs: bool) -> DeCoProcessor:
        c = self.config
        layers = getattr(source, "layers", None)
        return DeCoProcessor(source, alpha=c.alpha, top_k=c.top_k, top_p=c.top_p, log_probs=log_probs,
                             layers=tuple(layers) if layers is not None else None)
