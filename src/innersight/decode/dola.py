"""DoLa baseline: decoding by contrasting layers.

Chuang et al., "DoLa: Decoding by Contrasting Layers Improves Factuality in Large Language
Models", ICLR 2024, arXiv 2309.03883. Implemented here as a ``LogitsProcessor`` (transformers
removed ``generate(dola_layers=...)`` from its core in 2025). At each step:

1. ``q_N = softmax(final logits)``; ``q_j = softmax(early-exit logits of layer j)`` for every
   candidate premature layer ``j`` of a bucket.
2. Premature layer ``M = argmax_j JSD(q_N || q_j)`` (chosen per row, per step).
3. Adaptive plausibility constraint: ``V_head = {x : q_N(x) >= alpha * max_w q_N(w)}``,
   ``alpha = 0.1``.
4. ``F(x) = log q_N(x) - log q_M(x)`` for ``x`` in ``V_head``, ``-inf`` elsewhere. Under beam
   search (log-probability inputs) ``F`` is re-normalised with ``log_softmax``.

The repetition penalty the paper adds for open-ended generation is not part of DoLa here; use
``generate``'s ``repetition_penalty`` if wanted.

The reference code (voidism/DoLa, its transformers-4.28.1 fork: ``lm_head(hidden_states[j])``;
likewise transformers < 4.53 ``_dola_decoding``) projects the premature hidden states **without**
the final norm; :attr:`DoLaConfig.final_norm` (default False) follows it. Candidate buckets follow
the reference: even layers, lower or upper half of the depth (20 layers at each end for models
deeper than 40), layer 0 (the embeddings) skipped when the LM head is tied to them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor

from ..errors import MethodError
from .early_exit import EarlyExitDecoding, HookedProcessorMixin, LayerLogits

SOURCE = "arXiv 2309.03883 (DoLa, ICLR 2024) Sec. 2; reference code voidism/DoLa"
BUCKETS = ("low", "high")


@dataclass(frozen=True)
class DoLaConfig:
    """DoLa settings; defaults are the paper's."""

    #: adaptive plausibility constraint: keep tokens with q_N >= alpha * max q_N
    alpha: float = field(default=0.1, metadata={"source": SOURCE})
    #: candidate premature layers: "low" (lower half; the authors' advice for long answers such
    #: as descriptions) or "high" (upper half; short answers such as TruthfulQA)
    bucket: str = field(default="low", metadata={"source": SOURCE + " README / HF dola_layers docs"})
    #: explicit candidate premature layers (``hidden_states`` indices, 0 = embeddings); overrides bucket
    layers: tuple[int, ...] | None = None
    #: apply the final norm to premature hidden states (the reference code does not)
    final_norm: bool = field(default=False, metadata={"source": "voidism/DoLa modeling_llama.py early_exit_layers"})

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise MethodError(f"dola alpha must be in (0, 1], not {self.alpha}")
        if self.bucket not in BUCKETS:
            raise MethodError(f"dola bucket must be one of {', '.join(BUCKETS)}, not {self.bucket!r}")
        if self.layers is not None and not self.layers:
            raise MethodError("dola layers must name at least one layer")

    def resolve_layers(self, adapter: Any) -> tuple[int, ...]:
        """The candidate premature layers for ``adapter``'s model."""
        depth = int(adapter.num_layers)
        if self.layers is not None:
            outside = [i for i in self.layers if not 0 <= i < depth]
            if outside:
                raise MethodError(f"dola layers {outside} outside 0..{depth - 1} (the final layer is the mature one)")
            return tuple(self.layers)
        layers = bucket_layers(depth, self.bucket, skip_embeddings=lm_head_tied(adapter))
        if not layers:
            raise MethodError(f"dola bucket {self.bucket!r} is empty for a {depth}-layer model; set dola.layers")
        return layers


def bucket_layers(depth: int, bucket: str, skip_embeddings: bool = False) -> tuple[int, ...]:
    """Even candidate layers of the lower or upper half of ``depth`` layers (at most 20 layers
    at each end for deeper models), as in the reference code and transformers < 4.53."""
    start = 2 if skip_embeddings else 0
    if depth <= 40:
        low, high = range(start, depth // 2, 2), range(depth // 2, depth, 2)
    else:
        low, high = range(start, 20, 2), range(depth - 20, depth, 2)
    return tuple(low if bucket == "low" else high)


def lm_head_tied(adapter: Any) -> bool:
    """Whether the LM head shares its weight with the input embeddings."""
    head = getattr(adapter.lm_head, "weight", None)
    embed = getattr(adapter.language_model.get_input_embeddings(), "weight", None)
    return head is not None and embed is not None and head.data_ptr() == embed.data_ptr()


def dola_contrast(
    scores: torch.Tensor,
    layer_logits: torch.Tensor,
    *,
    alpha: float = 0.1,
    log_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DoLa step on a batch.

    ``scores`` [B, V]: final-layer logits (or log-probabilities: beam search); ``layer_logits``
    [B, N, V]: early-exit logits of the N candidate premature layers. Returns the contrast scores
    [B, V] (float32), the premature layer's index into the N layers [B] and the JSDs [B, N].
    """
    if layer_logits.dim() != 3 or layer_logits.shape[0] != scores.shape[0] or layer_logits.shape[2] != scores.shape[1]:
        raise MethodError(
            f"dola: early-exit logits {tuple(layer_logits.shape)} do not match scores {tuple(scores.shape)}; "
            "expected [B, layers, V]"
        )
    final = torch.log_softmax(scores.float(), dim=-1)  # [B, V] log q_N
    layers = torch.log_softmax(layer_logits.to(device=final.device, dtype=torch.float32), dim=-1)  # [B, N, V]
    p = final.exp()[:, None, :]  # [B, 1, V]
    q = layers.exp()  # [B, N, V]
    m = 0.5 * (p + q)  # [B, N, V]
    kl_p = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(dim=-1)  # [B, N] KL(q_N || m)
    kl_q = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(dim=-1)  # [B, N] KL(q_j || m)
    jsd = 0.5 * (kl_p + kl_q)  # [B, N]
    premature = jsd.argmax(dim=-1)  # [B]
    rows = torch.arange(final.shape[0], device=final.device)
    contrast = final - layers[rows, premature]  # [B, V]
    head = final >= final.max(dim=-1, keepdim=True).values + math.log(alpha)  # [B, V]
    out = contrast.masked_fill(~head, float("-inf"))
    if log_probs:
        out = torch.log_softmax(out, dim=-1)
    return out, premature, jsd


class DoLaProcessor(HookedProcessorMixin, LogitsProcessor):
    """DoLa as a ``LogitsProcessor`` (pure). ``source.logits(norm=final_norm)`` gives the
    candidate premature layers' early-exit logits [B, N, V] of the step being scored."""

    def __init__(
        self,
        source: LayerLogits,
        *,
        alpha: float = 0.1,
        final_norm: bool = False,
        log_probs: bool = False,
        layers: tuple[int, ...] | None = None,
    ) -> None:
        DoLaConfig(alpha=alpha)  # validation
        self.source = source
        self.alpha = float(alpha)
        self.final_norm = final_norm
        self.log_probs = log_probs
        self.layers = layers
        #: the premature layer of each row at the latest step (``hidden_states`` index when
        #: ``layers`` is given, else the index into the source's layers)
        self.last_premature: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out, premature, _ = dola_contrast(scores, self.source.logits(norm=self.final_norm), alpha=self.alpha,
                                          log_probs=self.log_probs)
        if self.layers is not None:
            premature = torch.tensor(self.layers, device=premature.device)[premature]
        self.last_premature = premature
        return out.to(scores.dtype)


class DoLa(EarlyExitDecoding):
    """The ``dola`` method: a fresh :class:`DoLaProcessor` with its own early-exit hooks per
    generate call."""

    def __init__(self, config: DoLaConfig | None = None) -> None:
        self.config = config or DoLaConfig()

    def layers(self, adapter: Any) -> tuple[int, ...]:
        return self.config.resolve_layers(adapter)

    def early_exit_norm(self) -> bool:
        return bool(self.config.final_norm)

    def build_processor(self, source: LayerLogits, log_probs: bool) -> DoLaProcessor:
        layers = getattr(source, "layers", None)
        return DoLaProcessor(source, alpha=self.config.alpha, final_norm=self.config.final_norm,
                             log_probs=log_probs, layers=tuple(layers) if layers is not None else None)
