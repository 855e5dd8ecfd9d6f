"""VAR: visual attention sink redistribution (arXiv 2503.03321, ICLR 2025).

"See What You Are Told: Visual Attention Sink in Large Multimodal Models". Some image tokens
receive a lot of attention although they are irrelevant to the text: they carry the base LLM's
massive activations (:mod:`innersight.attend.sinks`) and act as attention sinks. In heads that
already look at the image, VAR takes a share ``p`` of the attention paid to every sink token
(text and visual) and gives it to the non-sink image tokens, in proportion to their attention.

Per layer ``l`` (not 0, 1 or the last), per sample with at least one visual sink at ``l``, per
head and per query row after the sample's last image token (prefill) or generated (decoding):

* the row qualifies if its attention to image tokens is >= ``min_image_attention`` (0.2) and the
  share of that attention on non-sink image tokens is >= ``rho``;
* a qualifying row becomes ``a[sink] * (1 - p)`` at sink keys and
  ``a[j] + p * sum(a[sink]) * a[j] / sum(a[non-sink image])`` at non-sink image keys; the rest is
  unchanged and the row still sums to 1.

The sink masks are computed during the generation's own prefill (no extra forward), from the
hidden state that enters each layer (forward pre-hooks), and reused at every decoding step
(generated tokens are never sinks). Because the masks are only known once the prefill reaches a
layer, a handler sits on every modifiable layer; for a sample without a visual sink at that layer
it changes nothing. Only the rows VAR can change get explicit probabilities (fp32, K/V expanded
per query head for grouped-query attention); all other rows, and every head that does not
qualify, keep transformers' SDPA output. Positions assume a dynamic KV cache (``generate``'s
default): query row ``i`` of a forward with ``Lq`` queries and ``Lk`` keys sits at ``Lk - Lq + i``
(plus :func:`innersight.attention.key_start`'s offset where a sliding-window cache dropped keys).

With a contrastive negative branch (DAMRO, VCD) in the same ``generate`` call, VAR acts on the
main rows only and the negative rows run plain attention. The negative branch is a reference (what
the model says from the outlier tokens or the noised image alone); redistributing its attention
would change that reference, and VAR's state here (sink masks, image positions) is per main row.
The branch marks its rows with :func:`innersight.attention.handler_rows`: the handlers then see
only the main rows of a batched step and none of the branch's own forwards, and :meth:`VARRun.observe`
(the sink detection on the layers' inputs) follows the same scope, so a negative prompt of the
main prompt's length (VCD) never replaces the main sink masks.

Two conventions for ``p`` and ``rho`` (docs/faithfulness.md):

* the paper (Sec. 4, Eq. 3-4): a sink entry becomes ``(1 - p) a``, the budget is
  ``Omega = p * sum(a[sinks])``, so ``p`` is the share **moved**; a head/row is image-centric when
  its visual non-sink ratio ``r = a[non-sink image] / a[image] >= rho``. Its settings: ``p = 0.6``,
  ``rho`` 0.8 (general), 0.5 (hallucination), 0.9 (vision-centric).
* the reference code (``VARProcessor.attn_redist`` / ``HeadFork``): sinks are multiplied by
  ``p_code`` and the budget is ``(1 - p_code) * sum``, so ``p_code`` is the share **kept**
  (``p = 1 - p_code``); a row qualifies when the visual *sink* share ``<= rho_code``
  (``rho = 1 - rho_code``). Its example config (``tau 20, rho 0.5, p 0.6, summ 0.2``) therefore
  moves 40% of the sink attention (``p = 0.4``) with ``rho = 0.5``.

This API uses the paper's semantics throughout. ``preset="paper"`` (default) takes the paper's
values; ``preset="official"`` takes the reference example config's values, converted
(:data:`OFFICIAL_P`, :data:`OFFICIAL_RHO`); an explicit ``p`` or ``rho`` wins over either.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..attention import (
    handler_row_limit,
    key_start,
    layer_handlers,
    repeat_kv,
    row_probabilities,
    sdpa_forward,
)
from ..errors import MethodError
from .sinks import FIRST_SINK_LAYER, DetectionConfig, SinkDetection, layer_inputs, sink_dims_for, sink_mask

_WARNED: set[tuple[str, str]] = set()
log = logging.getLogger(__name__)

_SOURCE = "arXiv 2503.03321"
#: rho per task family (arXiv 2503.03321: general / hallucination / vision-centric tasks)
TASK_RHO = {"general": 0.8, "hallucination": 0.5, "vision-centric": 0.9}
#: the paper's p (share of the sink attention moved)
PAPER_P = 0.6
#: the reference code's example config (p_code 0.6, rho_code 0.5) in the paper's semantics
OFFICIAL_P_CODE, OFFICIAL_RHO_CODE = 0.6, 0.5
OFFICIAL_P, OFFICIAL_RHO = round(1 - OFFICIAL_P_CODE, 10), round(1 - OFFICIAL_RHO_CODE, 10)
PRESETS = ("paper", "official")
_CODE = "reference code MICV-yonsei/VisAttnSink (src/logic/logic.py, example experiment config)"


def from_reference(p_code: float, rho_code: float) -> tuple[float, float]:
    """``(p, rho)`` in the paper's semantics for the reference code's ``(p, rho)``: the code keeps
    ``p_code`` of the sink attention and bounds the visual sink share by ``rho_code``."""
    return round(1 - float(p_code), 10), round(1 - float(rho_code), 10)
_TINY = 1e-30


@dataclass(frozen=True)
class VARConfig:
    """VAR's settings with the paper's semantics and defaults."""

    #: share of the sink attention moved to non-sink image tokens (paper semantics: a sink entry
    #: becomes (1 - p) a); None: the preset's (paper 0.6, official 0.4)
    p: float | None = field(default=None, metadata={
        "source": f"{_SOURCE} Sec. 4 Eq. 4: sink a -> (1 - p) a, budget p * sum(sink a); p = 0.6",
        "reference_code": "1 - p",
        "official": f"{OFFICIAL_P} (the reference example config's p_code {OFFICIAL_P_CODE} keeps 60%, moves 40%; {_CODE})"})
    #: "paper" (the paper's p and rho) or "official" (the reference example config, converted)
    preset: str = field(default="paper", metadata={
        "source": f"{_SOURCE} (paper) / {_CODE} (official); docs/faithfulness.md"})
    #: the task preset that sets rho when rho is not given
    task: str = field(default="general", metadata={
        "source": f"{_SOURCE}: rho 0.8 general, 0.5 hallucination, 0.9 vision-centric tasks"})
    #: minimum share of a row's image attention on non-sink image tokens, the visual non-sink ratio
    #: (None: the paper preset's ``task`` value, the official preset's 0.5)
    rho: float | None = field(default=None, metadata={
        "source": f"{_SOURCE} Sec. 4 Eq. 3: image-centric when r >= rho",
        "reference_code": "1 - rho",
        "official": f"{OFFICIAL_RHO} (the reference's rho_code {OFFICIAL_RHO_CODE} bounds the visual sink share)"})
    #: minimum total attention of a row to image tokens for it to count as image-centric
    min_image_attention: float = field(default=0.2, metadata={"source": f"{_SOURCE}: image-centric heads"})
    #: phi threshold of a sink token
    tau: float = field(default=20.0, metadata={"source": f"{_SOURCE}: tau = 20"})
    #: sink dimensions of the hidden state; None: detected for the model (and cached)
    sink_dims: tuple[int, ...] | None = field(default=None, metadata={"source": f"{_SOURCE}: massive-activation dims"})
    #: first decoder layer that may hold sinks / be modified (layers 0 and 1 have no sinks)
    first_layer: int = field(default=FIRST_SINK_LAYER, metadata={"source": f"{_SOURCE}: sinks from layer 2"})
    #: sink-dimension detection (Sun et al. 2024 rule; arXiv 2402.17762)
    detect_min_abs: float | None = field(default=100.0, metadata={"source": "arXiv 2402.17762: |a| > 100"})
    detect_median_ratio: float = field(default=1000.0, metadata={"source": "arXiv 2402.17762: ~1000x median"})
    detect_rms_ratio: float | None = None
    detect_recurrence: float = 0.5
    #: keep detected dims in the user cache (``INNERSIGHT_CACHE_DIR``)
    cache: bool = True

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise MethodError(f"var preset must be one of {', '.join(PRESETS)}, not {self.preset!r}")
        if self.p is not None and not 0.0 <= self.p <= 1.0:
            raise MethodError(f"var p must be in [0, 1], not {self.p}")
        if self.task not in TASK_RHO:
            raise MethodError(f"var task must be one of {', '.join(TASK_RHO)}, not {self.task!r}")
        if self.rho is not None and not 0.0 <= self.rho <= 1.0:
            raise MethodError(f"var rho must be in [0, 1], not {self.rho}")
        if not 0.0 <= self.min_image_attention <= 1.0:
            raise MethodError("var min_image_attention must be in [0, 1]")
        if self.tau <= 0:
            raise MethodError("var tau must be positive")
        if self.sink_dims is not None and any(d < 0 for d in self.sink_dims):
            raise MethodError("var sink_dims must be non-negative dimension indices")
        if self.first_layer < 0:
            raise MethodError("var first_layer must be >= 0")
        self.detection()  # validates the detection fields

    @property
    def effective_p(self) -> float:
        """p if given, else the preset's: the paper's 0.6, or the reference example config's 0.4."""
        if self.p is not None:
            return float(self.p)
        return OFFICIAL_P if self.preset == "official" else PAPER_P

    @property
    def effective_rho(self) -> float:
        """rho if given, else the preset's: the paper's value for ``task``, or the reference example
        config's 0.5."""
        if self.rho is not None:
            return float(self.rho)
        return OFFICIAL_RHO if self.preset == "official" else TASK_RHO[self.task]

    def detection(self) -> DetectionConfig:
        return DetectionConfig(min_abs=self.detect_min_abs, median_ratio=self.detect_median_ratio,
                               rms_ratio=self.detect_rms_ratio, recurrence=self.detect_recurrence,
                               first_layer=self.first_layer)


# ---------------------------------------------------------------------- the closed form
def redistribute(probs: torch.Tensor, sinks: torch.Tensor, image: torch.Tensor, *, p: float, rho: float,
                 min_image_attention: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """VAR on attention rows: (new rows [..., K], which rows qualified [...]).

    ``probs`` [..., K] are softmax rows; ``sinks`` and ``image`` are bool key masks broadcastable
    to it (sink tokens, text and visual; image tokens). A row qualifies when its image attention
    is >= ``min_image_attention`` and the non-sink share of it is >= ``rho`` (and is positive);
    qualifying rows scale every sink entry by ``1 - p`` and add ``p * sum(sink attention)`` to
    the non-sink image tokens in proportion to their attention. Other rows are returned as given.
    """
    sinkf = sinks.to(probs.dtype)  # [..., K]
    target = (image & ~sinks).to(probs.dtype)  # non-sink image keys [..., K]
    image_mass = (probs * image.to(probs.dtype)).sum(dim=-1)  # [...]
    target_mass = (probs * target).sum(dim=-1)  # [...]
    sink_mass = (probs * sinkf).sum(dim=-1)  # [...]
    ratio = target_mass / image_mass.clamp_min(_TINY)
    qualifies = (image_mass >= min_image_attention) & (ratio >= rho) & (target_mass > 0)  # [...]
    gain = (p * sink_mass / target_mass.clamp_min(_TINY)).unsqueeze(-1)  # [..., 1]
    new = probs * (1.0 - p * sinkf) + gain * probs * target  # [..., K]
    return torch.where(qualifies.unsqueeze(-1), new, probs), qualifies


# ---------------------------------------------------------------------- one activation
@dataclass
class LayerStats:
    """What VAR did at one layer during one activation (summed over its forwards)."""

    #: visual sinks per sample at the last prefill
    visual_sinks: list[int]
    #: text sinks per sample at the last prefill
    text_sinks: list[int]
    #: (sample, head, row) triples that were redistributed
    changed_rows: int
    #: (sample, head, row) triples VAR was allowed to change (after the image, sample has a visual sink)
    eligible_rows: int


class VARRun:
    """The state of one :meth:`VAR.activate`: image positions, sink masks, per-layer handlers.

    Nothing in a decoding step waits for the device: the rows to compute are chosen from the image
    positions on the host, and the counters behind :attr:`stats` stay on the device until read.
    """

    def __init__(self, config: VARConfig, dims: tuple[int, ...], batch: Any, layers: tuple[int, ...]):
        self.config = config
        self.dims = dims
        self.layers = layers
        self.p, self.rho = config.effective_p, config.effective_rho
        ids = batch.input_ids  # [B, L0]
        self.batch_size, self.prompt_length = int(ids.shape[0]), int(ids.shape[1])
        mask = batch.inputs.get("attention_mask")
        self.valid = (mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)).cpu()  # [B, L0]
        self.image = torch.zeros(self.batch_size, self.prompt_length, dtype=torch.bool)  # [B, L0]
        #: last image position per sample (a sample without images has no visual sink: never changed)
        self.last_image = [self.prompt_length] * self.batch_size
        for b, layouts in enumerate(batch.layouts):
            positions = [lay.positions.cpu() for lay in layouts if lay.num_tokens]
            if positions:
                pos = torch.cat(positions)
                self.image[b, pos] = True
                self.last_image[b] = int(pos.max())
        self._last = torch.tensor(self.last_image, dtype=torch.long)  # [B]
        self._device_masks: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.pending: dict[int, torch.Tensor] = {}
        #: layer -> [B, L0] bool sink mask of the last prefill (one row per prepared sample)
        self.sinks: dict[int, torch.Tensor] = {}
        self._changed: dict[int, torch.Tensor] = {}
        self._eligible: dict[int, torch.Tensor] = {}
        #: layer -> its attention module, whose handler-row scope :meth:`observe` follows
        self.attention_modules: dict[int, Any] = {}

    @property
    def stats(self) -> dict[int, LayerStats]:
        """Per modifiable layer: sink counts at the last prefill, rows eligible and changed."""
        out = {}
        for idx in self.layers:
            sinks = self.sinks.get(idx)
            visual = (sinks.cpu() & self.image).sum(dim=1).tolist() if sinks is not None else []
            text = (sinks.cpu() & ~self.image).sum(dim=1).tolist() if sinks is not None else []
            changed = int(self._changed[idx]) if idx in self._changed else 0
            eligible = int(self._eligible[idx]) if idx in self._eligible else 0
            out[idx] = LayerStats(visual, text, changed, eligible)
        return out

    # ------------------------------------------------------------------ masks
    def _repeats(self, rows: int) -> int:
        """How many times each prepared sample is repeated in a forward of ``rows`` rows."""
        if rows % self.batch_size:
            raise MethodError(f"var: the model ran {rows} rows but the prepared batch has {self.batch_size}")
        return rows // self.batch_size

    def _prompt_masks(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(valid [B, L0], image [B, L0], last image position [B]) on ``device``, copied once."""
        if device not in self._device_masks:
            self._device_masks[device] = (self.valid.to(device), self.image.to(device), self._last.to(device))
        return self._device_masks[device]

    def _keys(self, mask: torch.Tensor, rows: int, length: int, start: int = 0) -> torch.Tensor:
        """A [B0, L0] prompt mask as [rows, length] keys for positions ``start .. start + length``
        (``start`` > 0 where a sliding-window cache dropped the earliest keys): repeated per expanded
        row (beam search, several sequences per prompt), False for generated positions."""
        repeats = self._repeats(rows)
        if repeats > 1:
            mask = mask.repeat_interleave(repeats, dim=0)
        end = start + length
        if end > mask.shape[1]:
            mask = torch.cat([mask, mask.new_zeros(rows, end - mask.shape[1])], dim=1)
        return mask[:, start:end]

    def observe(self, layer: int, hidden: torch.Tensor) -> None:
        """Forward pre-hook: sink mask of the hidden state entering ``layer`` [B, L, D] at prefill.

        Follows the layer's handler-row scope (:func:`innersight.attention.handler_rows`): nothing
        in a forward whose handlers are bypassed (a negative branch's own forward), only the
        first ``n`` rows under a scope of ``n`` (the main rows)."""
        module = self.attention_modules.get(layer)
        limit = handler_row_limit(module) if module is not None else None
        if limit == 0:
            return
        if limit is not None and limit < hidden.shape[0]:
            hidden = hidden[:limit]  # [n, L, D]
        if hidden.shape[1] != self.prompt_length:
            return  # a decoding step: its tokens are never sinks
        valid = self._keys(self._prompt_masks(hidden.device)[0], hidden.shape[0], self.prompt_length)
        self.pending[layer] = sink_mask(hidden, self.dims, self.config.tau, valid)  # [B, L0]

    def _sinks(self, layer: int, rows: int, lq: int, lk: int, device: torch.device, start: int = 0) -> torch.Tensor:
        """The sink key mask of this forward at ``layer``: [rows, lk] bool, key column 0 at
        sequence position ``start``."""
        if lq == lk:  # a prefill (no cached keys)
            if lk != self.prompt_length or layer not in self.pending:
                raise MethodError(f"var: a prompt of {lk} tokens reached layer {layer}, but VAR was activated "
                                  f"for a batch of {self.prompt_length}")
            self.sinks[layer] = self.pending.pop(layer)[:: self._repeats(rows)]  # [B0, L0]
        elif layer not in self.sinks:
            raise MethodError("var: a decoding step ran before any prefill inside the VAR context")
        self.pending.pop(layer, None)
        return self._keys(self.sinks[layer].to(device), rows, lk, start)

    # ------------------------------------------------------------------ the handler
    def handler(self, layer: int) -> Any:
        def attend(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs: Any):
            out, weights = sdpa_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
            offset = key_start(module, query.shape[2], key.shape[2])
            return self._redistribute(layer, out, query, key, value, attention_mask, scaling, offset), weights

        return attend

    def _redistribute(self, layer: int, out: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None,
                      offset: int = 0) -> torch.Tensor:
        """``out`` [B, Lq, H, D] with the rows and heads VAR changes recomputed from redistributed
        probabilities; everything else is SDPA's output untouched. ``offset``: the sequence position
        of key column 0 (:func:`innersight.attention.key_start`; > 0 only where a sliding-window
        cache handed over the last window of keys)."""
        rows, heads, lq, _ = query.shape
        lk = key.shape[2]
        device = query.device
        sinks = self._sinks(layer, rows, lq, lk, device, offset)  # [B, Lk]
        _, image0, last0 = self._prompt_masks(device)
        image = self._keys(image0, rows, lk, offset)  # [B, Lk]
        # the cache holds the keys of positions offset .. offset + lk - lq - 1 before this forward's:
        # query row i sits at position offset + lk - lq + i; the first row any sample may change is
        # the one after the earliest last image token
        first_query = offset + lk - lq
        start = max(0, min(self.last_image) + 1 - first_query)
        if start >= lq:
            return out
        position = torch.arange(first_query + start, first_query + lq, device=device)  # [R]
        last = last0.repeat_interleave(self._repeats(rows)) if rows != self.batch_size else last0  # [B]
        has_visual_sink = (sinks & image).any(dim=1)  # [B]
        eligible = (position[None, :] > last[:, None]) & has_visual_sink[:, None]  # [B, R]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        probs = row_probabilities(query, key, attention_mask, scale, slice(start, None))  # [B, H, R, Lk] fp32
        new, qualifies = redistribute(probs, sinks[:, None, None, :], image[:, None, None, :], p=self.p,
                                      rho=self.rho, min_image_attention=self.config.min_image_attention)
        changed = qualifies & eligible[:, None, :]  # [B, H, R]
        self._changed[layer] = self._changed.get(layer, 0) + changed.sum()
        self._eligible[layer] = self._eligible.get(layer, 0) + eligible.sum() * heads
        v = repeat_kv(value, heads).float()  # [B, H, Lk, D]
        recomputed = torch.matmul(new, v).transpose(1, 2).to(out.dtype)  # [B, R, H, D]
        select = changed.transpose(1, 2).unsqueeze(-1)  # [B, R, H, 1]
        tail = torch.where(select, recomputed, out[:, start:])  # [B, R, H, D]
        return torch.cat([out[:, :start], tail], dim=1)  # [B, Lq, H, D]


# ---------------------------------------------------------------------- the method
class VAR:
    """The attention-point method: ``with var.activate(mllm, batch): mllm.generate(batch)``."""

    point = "attention"

    def __init__(self, config: VARConfig | None = None, *, cache_dir: Path | None = None):
        self.config = config or VARConfig()
        self.cache_dir = cache_dir
        #: the state of the latest activation (sink counts, changed rows per layer)
        self.last_run: VARRun | None = None
        #: the detection behind the dims of the latest activation (None when dims were given)
        self.detection: SinkDetection | None = None

    def sink_dims(self, mllm: Any) -> tuple[int, ...]:
        """The configured sink dims, else the model's detected (cached) ones."""
        hidden = mllm.adapter.hidden_size
        if self.config.sink_dims is not None:
            dims = tuple(self.config.sink_dims)
        else:
            self.detection = sink_dims_for(mllm, self.config.detection(), cache=self.config.cache,
                                           directory=self.cache_dir)
            dims = self.detection.dims
        bad = [d for d in dims if d >= hidden]
        if bad:
            raise MethodError(f"var sink_dims {bad} are outside the hidden size {hidden}")
        return dims

    def layers(self, mllm: Any) -> tuple[int, ...]:
        """The layers VAR may modify: from ``first_layer`` up to, not including, the last."""
        return tuple(range(self.config.first_layer, mllm.adapter.num_layers - 1))

    @contextlib.contextmanager
    def activate(self, mllm: Any, batch: Any) -> Iterator[VARRun]:
        """Redistribute attention in every forward of ``batch`` inside the block (its prefill and
        its decoding steps); the model is restored on exit, also after an exception."""
        dims = self.sink_dims(mllm)
        layers = self.layers(mllm)
        run = VARRun(self.config, dims, batch, layers)
        self.last_run = run
        if not dims or not layers:
            why = "no sink dimensions were detected" if not dims else "the model has too few layers"
            key = (getattr(mllm, "name", ""), why)
            if key not in _WARNED:  # once per model, not once per batch
                _WARNED.add(key)
                log.warning("var changes nothing for %s: %s", key[0] or "this model", why)
            yield run
            return
        adapter = mllm.adapter
        run.attention_modules = {idx: adapter.decoder_layers[idx].self_attn for idx in layers}
        handlers = {idx: run.handler(idx) for idx in layers}
        with layer_inputs(adapter.decoder_layers, layers, run.observe), \
                layer_handlers(mllm.model, adapter.decoder_layers, handlers):
            yield run
