"""VISTA: visual information steering with token-logit augmentation.

Li et al., "The Hidden Life of Tokens: Reducing Hallucination of Large Vision-Language Models via
Visual Information Steering", ICML 2025, arXiv 2502.03628; reference code LzVv123456/VISTA.

Visual steering vector (VSV, Sec. 4.1). Before generating, the prompt *with* the image (positive)
and the same prompt *without* it (negative, :func:`~.image_free.image_free_inputs`) run as one
batch of ``2B`` rows; at every decoder block ``l`` the difference of their residual streams at
the last position is that sample's steering vector ``v_l = h_l^+ - h_l^-`` (plain attention: an attention method of the same call, e.g. VAR, acts on
the answer's forwards only). During generation
every block's output ``h`` (all positions, prefill and decoding steps) is steered towards it,
keeping its norm, as in the reference's in-context-vector layer::

    u  = v_l / |v_l|
    s  = 1 + max(0, cos(h, -u))                       # stronger where h points away from u
    h' = |h| * normalize(normalize(h) + lambda * s * u)

Where the steering applies: on the residual stream the next block reads. For most families that
is the block's output; a family whose decoder adds image rows to the image positions after some
blocks (Qwen3-VL's DeepStack: ``h_next = out_l + ds_l`` there; the adapter's decoder injections)
has its stream steered *after* that addition, ``h_next = steer(out_l + ds_l)``: the hook on block
``l`` returns ``steer(out_l + ds_l) - ds_l`` at those positions (the rows of the running forward,
from ``adapter.residual_additions``), so that the model's own addition completes it. Steering
``out_l`` alone would give ``steer(out_l) + ds_l``, which is neither norm-preserving nor the
formula on the stream. Text positions (where the vectors are read) are untouched by the injection.
The positive prompt of the vectors carries the image's injections too (``adapter.image_rows``),
so it is the model's own prefill.

Self-logits augmentation (SLA, Sec. 4.2). The early-exit logits of a window of late layers
(``hidden_states`` indices ``sla_start .. sla_end - 1``, read at the last position only by
:class:`~.early_exit.EarlyExit`) are averaged and mixed into the final logits::

    l' = (1 - alpha) * l + alpha * mean_{i in window} lm_head(norm(h_i))

Defaults are the reference scripts' for LLaVA-1.5 (``--vsv-lambda 0.17 --logits-layers 25,30
--logits-alpha 0.3``); the window is given for a 32-layer model and scaled to the model's depth
(at least one layer). ``lambda = 0`` installs no steering and ``alpha = 0`` leaves the logits as
they are: the plain model. The vectors come from one batched forward per generate call; the
steering hooks and the early-exit hooks are removed on exit, also after an exception.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from transformers import LogitsProcessor

from ..attention import handler_rows
from ..errors import MethodError
from ..hooks import HookHandles
from .contrast import NegativeInputs, check_generation, features_per_sample, joined_injections, splice_images
from .early_exit import EarlyExit
from .image_free import image_free_inputs, require_images
from .vcd import image_rows

SOURCE = "arXiv 2502.03628 (VISTA, ICML 2025)"
SCRIPTS = "LzVv123456/VISTA run scripts (LLaVA-1.5): --vsv-lambda 0.17 --logits-layers 25,30 --logits-alpha 0.3"
REFERENCE_DEPTH = 32


@dataclass(frozen=True)
class VISTAConfig:
    """VISTA settings; defaults are the reference's for LLaVA-1.5 (7B, 32 layers)."""

    #: steering strength lambda of the visual steering vector (0: no steering)
    lam: float = field(default=0.17, metadata={"source": f"{SOURCE} Sec. 4.1; {SCRIPTS}"})
    #: SLA mixing ratio (0: no augmentation)
    alpha: float = field(default=0.3, metadata={"source": f"{SOURCE} Sec. 4.2; {SCRIPTS}"})
    #: SLA window start (hidden_states index of a 32-layer model, scaled to the model)
    sla_start: int = field(default=25, metadata={"source": SCRIPTS})
    #: SLA window end (exclusive; same scale)
    sla_end: int = field(default=30, metadata={"source": SCRIPTS})

    def __post_init__(self) -> None:
        if not math.isfinite(self.lam) or self.lam < 0:
            raise MethodError(f"vista lam must be a finite number >= 0, not {self.lam}")
        if not 0 <= self.alpha <= 1:
            raise MethodError(f"vista alpha must be in [0, 1], not {self.alpha}")
        if not 0 <= self.sla_start < self.sla_end <= REFERENCE_DEPTH:
            raise MethodError(f"vista needs 0 <= sla_start < sla_end <= {REFERENCE_DEPTH}, not "
                              f"{self.sla_start}..{self.sla_end}")

    def window(self, num_layers: int) -> tuple[int, ...]:
        """The SLA layers (hidden_states indices) for a model of ``num_layers`` blocks."""
        start = max(1, self.sla_start * num_layers // REFERENCE_DEPTH)
        end = max(start + 1, self.sla_end * num_layers // REFERENCE_DEPTH)
        return tuple(range(start, min(end, num_layers + 1)))


# ---------------------------------------------------------------------- closed forms
def steer(hidden: torch.Tensor, vector: torch.Tensor, lam: float) -> torch.Tensor:
    """VSV steering of ``hidden`` [B, L, D] by per-sample ``vector`` [B, D] (float32 inside)."""
    h = hidden.float()
    u = torch.nn.functional.normalize(vector.float(), dim=-1)[:, None, :]  # [B, 1, D]
    norm = h.norm(dim=-1, keepdim=True)  # [B, L, 1]
    unit = torch.nn.functional.normalize(h, dim=-1)
    s = 1.0 + torch.relu((unit * -u).sum(dim=-1, keepdim=True))  # [B, L, 1]
    out = torch.nn.functional.normalize(unit + lam * s * u, dim=-1) * norm
    return out.to(hidden.dtype)


def augment(logits: torch.Tensor, early: torch.Tensor, alpha: float) -> torch.Tensor:
    """SLA: ``(1 - alpha) l + alpha * mean_i early[:, i]`` for ``logits`` [B, V], ``early`` [B, n, V]."""
    return (1.0 - alpha) * logits.float() + alpha * early.float().mean(dim=1)


def _stack(a: NegativeInputs, b: NegativeInputs) -> NegativeInputs:
    """Two left-padded prompt batches as one, padded on the left to the longer length."""
    length = max(a.length, b.length)

    def pad(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
        if n == 0:
            return x
        shape = list(x.shape)
        shape[dim] = n
        return torch.cat([x.new_zeros(shape), x], dim=dim)

    def grow(inputs: NegativeInputs) -> NegativeInputs:
        n = length - inputs.length
        return NegativeInputs(pad(inputs.inputs_embeds, n, 1), pad(inputs.attention_mask, n, 1),
                              pad(inputs.position_ids, n, -1), pad(inputs.input_ids, n, 1), inputs.image_tokens,
                              inputs.source, inputs.injected)

    a, b = grow(a), grow(b)
    dim = 1 if a.position_ids.dim() == 3 else 0
    # decoder injections follow the image positions row-major: a's rows come before b's
    injected = joined_injections([x for x in (a.injected, b.injected) if x is not None])
    return NegativeInputs(torch.cat([a.inputs_embeds, b.inputs_embeds]), torch.cat([a.attention_mask, b.attention_mask]),
                          torch.cat([a.position_ids, b.position_ids], dim=dim), torch.cat([a.input_ids, b.input_ids]),
                          a.image_tokens + b.image_tokens, a.source, injected)


def steering_vectors(mllm: Any, batch: Any) -> torch.Tensor:
    """``v_l = h_l^+ - h_l^-`` at the last position for every block ``l`` (1-based): [B, N, D]
    float32, from one forward of the positive and image-free prompts stacked as ``2B`` rows."""
    adapter = mllm.adapter
    with torch.no_grad():
        per_sample = features_per_sample(batch, image_rows(mllm, batch, batch.inputs["pixel_values"]))
        both = _stack(splice_images(adapter, batch, per_sample), image_free_inputs(adapter, batch))
        capture = EarlyExit(adapter, range(1, adapter.num_layers + 1))
        # an attention method of the same call (e.g. VAR) acts on the answer's forwards, not on this one
        with capture, handler_rows(adapter.decoder_layers, 0), both.forward_context(adapter):
            adapter.generation_module(inputs_embeds=both.inputs_embeds, attention_mask=both.attention_mask,
                                      position_ids=both.position_ids, use_cache=False, **both.extra_inputs(adapter))
            hidden = capture.hidden().float()  # [2B, N, D]
    rows = len(batch)
    return hidden[:rows] - hidden[rows:]


class Steering:
    """Forward hooks steering the residual stream after every block by the VSV for one generate
    call (the block's output, plus what the family adds to it before the next block reads it:
    see the module doc)."""

    def __init__(self, adapter: Any, vectors: torch.Tensor, lam: float) -> None:
        self.adapter, self.vectors, self.lam = adapter, vectors, float(lam)  # vectors [B, N, D]
        self._handles = HookHandles()
        self._additions = contextlib.ExitStack()
        self._added: Any = None

    def __enter__(self) -> Steering:
        try:
            self._added = self._additions.enter_context(self.adapter.residual_additions())
            with self._handles.installing():
                for i, block in enumerate(self.adapter.decoder_layers):
                    self._handles.add(block.register_forward_hook(self._hook(i)))
        except BaseException:
            self._additions.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self._handles.remove()
        finally:
            self._additions.close()
            self._added = None

    def _steer_stream(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block ``index``'s output ``hidden`` [B, L, D] such that the stream the next block reads
        is ``steer(hidden + added)`` (``added`` the family's rows at their positions, if any)."""
        vector = self.vectors[:, index].to(hidden.device)  # [B, D]
        added = self._added(index) if self._added is not None else None
        if added is None:
            return steer(hidden, vector, self.lam)
        mask, rows = added  # [B, L] bool, [N, D]
        mask, rows = mask.to(hidden.device), rows.to(device=hidden.device, dtype=hidden.dtype)
        stream = hidden.clone()
        stream[mask] = stream[mask] + rows  # [B, L, D]: what the next block would read unsteered
        steered = steer(stream, vector, self.lam)
        steered[mask] = steered[mask] - rows  # the model adds them back after this hook
        return steered

    def _hook(self, index: int) -> Any:
        def hook(module: Any, args: tuple[Any, ...], output: Any) -> Any:
            hidden = output[0] if isinstance(output, (tuple, list)) else output  # [B, L, D]
            if hidden.shape[0] != self.vectors.shape[0]:
                raise MethodError(f"vista: the model ran {hidden.shape[0]} rows but the vectors are for "
                                  f"{self.vectors.shape[0]}")
            steered = self._steer_stream(index, hidden)
            if isinstance(output, tuple):
                return (steered, *output[1:])
            if isinstance(output, list):
                return [steered, *output[1:]]
            return steered

        return hook


class VISTAProcessor(LogitsProcessor):
    """SLA on the scores; as a context it computes the vectors and installs steering, then the
    early-exit capture (so that SLA reads the steered states)."""

    def __init__(self, mllm: Any, batch: Any, config: VISTAConfig) -> None:
        self.mllm, self.batch, self.config = mllm, batch, config
        adapter = mllm.adapter
        self.source = EarlyExit(adapter, config.window(adapter.num_layers)) if config.alpha > 0 else None
        self.steering: Steering | None = None
        self._entered: list[Any] = []

    def __enter__(self) -> VISTAProcessor:
        try:
            if self.config.lam > 0:
                self.steering = Steering(self.mllm.adapter, steering_vectors(self.mllm, self.batch), self.config.lam)
                self.steering.__enter__()
                self._entered.append(self.steering)
            if self.source is not None:
                self.source.__enter__()
                self._entered.append(self.source)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        while self._entered:
            self._entered.pop().__exit__(exc_type, exc, tb)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.source is None:
            return scores
        early = self.source.logits()  # [B, n, V]
        return augment(scores, early.to(scores.device), self.config.alpha).to(scores.dtype)


class VISTA:
    """The ``vista`` method (decoding point: its processor also steers the residual stream)."""

    def __init__(self, config: VISTAConfig | None = None) -> None:
        self.config = config or VISTAConfig()

    def processors(self, mllm: Any, batch: Any, generation: dict[str, Any]) -> list[Any]:
        check_generation(mllm, generation, "vista")
        if self.config.lam > 0:
            require_images(batch, "vista")
        return [VISTAProcessor(mllm, batch, self.config)]
