"""Visual attention sinks: which image tokens are sinks, how much attention they take, and whether
the answers need them (VAR).

Kang et al., "See What You Are Told: Visual Attention Sink in Large Multimodal Models", ICLR 2025,
arXiv 2503.03321. A few hidden dimensions of the base LLM carry *massive activations*; image tokens
that carry them ("visual sinks") receive much attention although they are irrelevant to the
text, and removing them does not change the answers. This instrument measures, on the model's own
greedy answers:

1. the **sink dimensions**, detected for the model (:func:`innersight.attend.sinks.sink_dims_for`:
   Sun et al.'s massive-activation rule on a few probe prompts, cached per model), with the
   published (unverified) table as a cross-check; or given with the ``dims`` option;
2. per decoder layer, the **share of image tokens that are sinks**: ``phi >= tau`` with
   ``phi = max_d |x[d]| / RMS(x)`` over the sink dims, on the hidden state entering the layer
   (:func:`innersight.attend.sinks.sink_mask`; VAR treats layers below ``first_layer`` = 2 as
   sink-free, the per-layer numbers are measured at every layer anyway);
3. per layer, the **attention mass on sink vs non-sink image tokens** from the answering position
   (the last prompt position, which produces the first answer token), averaged over heads; also
   per token;
4. the **effect on the answers of masking** the visual sink tokens (image tokens that are sinks at
   any layer from ``first_layer`` on) vs masking as many random non-sink image tokens (seeded per
   sample): the percent of answers that change and the accuracy (percent) under each. Masking removes the
   tokens from attention: in every decoder layer and every forward of ``generate`` (prefill and
   decoding steps), no query may attend to a masked key (an :mod:`innersight.attention` handler
   narrows the attention mask), except the masked token's own query to itself, which keeps its row
   defined. Positions (RoPE / M-RoPE) are unchanged, unlike a padding-style attention mask.

A model without massive activations (a random or untrained one) gets zero sink dims, zero sinks,
and masking changes nothing: the numbers say so (``summary``), nothing fails. The default benchmark
is ``micro-details`` (short answers with an exact-match score, so "answer changed" and "accuracy"
are crisp). Everything runs inside context managers: the model is unchanged afterwards, also
after an exception.
Answers are scored as every instrument scores them
(:func:`innersight.instruments.common.choose_scorer` and
:func:`~innersight.instruments.common.answer_score`: the mean per-answer score in [0, 1], in
percent, is the accuracy).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import torch

from ..attend.sinks import (
    FIRST_SINK_LAYER,
    DetectionConfig,
    SinkDetection,
    layer_inputs,
    sink_dims_for,
    sink_mask,
    sink_scores,
)
from ..attention import key_start, layer_handlers, row_probabilities, sdpa_forward
from ..errors import UserInputError
from .common import (
    Measurement,
    Sample,
    answer_score,
    batches,
    check_samples,
    choose_scorer,
    figure_title,
    generation_length,
    mean,
    percent,
    progress,
    render,
    sample_image,
)

SOURCE = "arXiv 2503.03321 (VAR, ICLR 2025)"
#: phi threshold of a sink token (arXiv 2503.03321: tau = 20)
TAU = 20.0


# ---------------------------------------------------------------------- masks
def allowed_keys(attention_mask: torch.Tensor | None, rows: int, lq: int, lk: int,
                 device: torch.device) -> torch.Tensor:
    """Which keys each query may attend to, as a bool mask [rows, 1, lq, lk] (True = attend).

    ``attention_mask``: the mask the attention function received (bool, additive float, or
    ``None`` = SDPA's causal fast path with no padding: query ``i`` sits at ``lk - lq + i``).
    """
    if attention_mask is None:
        qpos = torch.arange(lk - lq, lk, device=device)  # [lq]
        causal = torch.arange(lk, device=device)[None, :] <= qpos[:, None]  # [lq, lk]
        return causal[None, None].expand(rows, 1, lq, lk)
    mask = attention_mask[..., -lq:, :lk]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2  # additive: 0 = attend, large negative = masked
    return mask.expand(rows, mask.shape[1], lq, lk)


def removal_mask(attention_mask: torch.Tensor | None, removed: torch.Tensor, lq: int, lk: int,
                 key_offset: int = 0) -> torch.Tensor:
    """The attention mask with the ``removed`` keys taken out for every query but their own.

    ``removed`` [B, L0] bool marks prompt positions; later keys (generated tokens) are never
    removed. ``key_offset``: the sequence position of key column 0 (:func:`innersight.attention.key_start`;
    above 0 where a sliding-window cache layer dropped early keys), so key column ``j`` is
    position ``key_offset + j``. Returns bool [B, 1, lq, lk] (True = attend).
    """
    rows, device = int(removed.shape[0]), removed.device
    allowed = allowed_keys(attention_mask, rows, lq, lk, device)  # [B, 1, lq, lk]
    drop = torch.zeros(rows, lk, dtype=torch.bool, device=device)  # [B, lk]
    offset = max(0, int(key_offset))
    width = max(0, min(lk, int(removed.shape[1]) - offset))  # key columns that are prompt positions
    drop[:, :width] = removed[:, offset:offset + width]
    qpos = torch.arange(lk - lq, lk, device=device)  # [lq] absolute positions of the queries
    own = torch.arange(lk, device=device)[None, :] == qpos[:, None]  # [lq, lk]
    keep = ~drop[:, None, None, :] | own[None, None]  # [B, 1, lq, lk]
    return allowed.to(device) & keep


# ---------------------------------------------------------------------- one run of generate
class SinkProbe:
    """Inside the block, for every forward of one prepared batch:

    * ``capture``: forward pre-hooks read the hidden state entering every decoder layer at the
      prefill and keep its sink mask (``sinks[l]`` [B, L0] bool, padding never a sink) and the
      largest ``phi`` over each sample's image tokens (``peak_phi[l]`` [B]); handlers record the
      head-averaged attention row of the last prompt position at the prefill (``rows[l]`` [B, L0]
      fp32, with the removal applied when there is one);
    * ``remove`` [B, L0] bool: those prompt positions are removed from every layer's attention in
      every forward (:func:`removal_mask`); the outputs are SDPA's with the narrowed mask.

    A context manager; hooks and handlers are removed and the attention implementation restored
    on exit, also after an exception.
    """

    def __init__(self, mllm: Any, batch: Any, dims: Sequence[int], tau: float, *,
                 remove: torch.Tensor | None = None, capture: bool = True) -> None:
        self.model = mllm.model
        self.adapter = mllm.adapter
        self.dims = tuple(int(d) for d in dims)
        self.tau = float(tau)
        self.capture = bool(capture)
        ids = batch.input_ids  # [B, L0]
        self.prompt_length = int(ids.shape[1])
        mask = batch.inputs.get("attention_mask")
        self.valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)  # [B, L0]
        self.image = image_positions(batch)  # [B, L0]
        self.remove = remove.bool() if remove is not None else None
        if self.remove is not None and tuple(self.remove.shape) != tuple(ids.shape):
            raise ValueError(f"remove {tuple(self.remove.shape)} must match the batch {tuple(ids.shape)}")
        self.sinks: dict[int, torch.Tensor] = {}
        self.peak_phi: dict[int, torch.Tensor] = {}
        self.rows: dict[int, torch.Tensor] = {}
        self._masks: dict[tuple[int, int, str, int], torch.Tensor] = {}
        self._stack: contextlib.ExitStack | None = None

    # ------------------------------------------------------------------ hooks
    def observe(self, layer: int, hidden: torch.Tensor) -> None:
        """Pre-hook of decoder layer ``layer``: the sink mask of its input at the prefill."""
        if hidden.shape[1] != self.prompt_length:
            return  # a decoding step: generated tokens are never sinks
        valid = self.valid.to(hidden.device)  # [B, L0]
        self.sinks[layer] = sink_mask(hidden, self.dims, self.tau, valid).cpu()  # [B, L0]
        phi = sink_scores(hidden, self.dims)  # [B, L0]
        image = self.image.to(phi.device)
        self.peak_phi[layer] = phi.masked_fill(~image, 0.0).amax(dim=1).cpu()  # [B]

    def handler(self, layer: int) -> Any:
        def attend(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs: Any) -> Any:
            lq, lk = int(query.shape[2]), int(key.shape[2])
            mask = attention_mask
            if self.remove is not None:
                mask = self._removal(attention_mask, lq, lk, query.device, key_start(module, lq, lk))
            out = sdpa_forward(module, query, key, value, mask, scaling=scaling, **kwargs)
            if self.capture and lq == lk == self.prompt_length:
                scale = scaling if scaling is not None else query.shape[-1] ** -0.5
                probs = row_probabilities(query, key, mask, scale, slice(lq - 1, lq))  # [B, H, 1, L0]
                self.rows[layer] = probs[:, :, 0].mean(dim=1).cpu()  # [B, L0]
            return out

        return attend

    def _removal(self, attention_mask: torch.Tensor | None, lq: int, lk: int, device: torch.device,
                 offset: int = 0) -> torch.Tensor:
        """:func:`removal_mask` for this forward, built once per mask object and key offset the
        layers share (full and sliding-window layers get different ones); a new forward clears
        the cache."""
        key = (lq, lk, str(device), id(attention_mask), offset)
        if key not in self._masks:
            if any(k[:2] != (lq, lk) for k in self._masks):
                self._masks.clear()
            self._masks[key] = removal_mask(attention_mask, self.remove.to(device), lq, lk,
                                            offset)  # [B, 1, lq, lk]
        return self._masks[key]

    # ------------------------------------------------------------------ context
    def __enter__(self) -> SinkProbe:
        if self._stack is not None:
            raise RuntimeError("this probe is already active; build one per generate call")
        layers = range(self.adapter.num_layers)
        stack = contextlib.ExitStack()
        try:
            if self.capture:
                stack.enter_context(layer_inputs(self.adapter.decoder_layers, layers, self.observe))
            if self.capture or self.remove is not None:
                handlers = {idx: self.handler(idx) for idx in layers}
                stack.enter_context(layer_handlers(self.model, self.adapter.decoder_layers, handlers))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.__exit__(exc_type, exc, tb)


def image_positions(batch: Any) -> torch.Tensor:
    """Which prompt positions hold image tokens (every image of each sample): [B, L0] bool."""
    ids = batch.input_ids  # [B, L0]
    image = torch.zeros(ids.shape, dtype=torch.bool)
    for b, layouts in enumerate(batch.layouts):
        for layout in layouts:
            image[b, layout.positions.cpu()] = True
    return image


def random_like(removed: torch.Tensor, image: torch.Tensor, seeds: Sequence[Sequence[int]]) -> torch.Tensor:
    """As many random image tokens per sample as ``removed`` [B, L] holds, drawn from the image
    tokens that are not in it (all of them if too few), with a NumPy generator seeded by
    ``seeds[b]`` (e.g. ``[seed, sample index]``): [B, L] bool."""
    out = torch.zeros_like(removed)
    for b in range(removed.shape[0]):
        count = int(removed[b].sum())
        if count == 0:
            continue
        pool = (image[b] & ~removed[b]).nonzero().flatten().tolist()
        if len(pool) < count:
            pool = image[b].nonzero().flatten().tolist()
        rng = np.random.default_rng(seeds[b])
        picked = rng.choice(len(pool), size=min(count, len(pool)), replace=False)
        out[b, [pool[i] for i in picked]] = True
    return out


def parse_dims(text: str) -> tuple[int, ...] | None:
    """``""`` -> None (detect); ``"2533,1415"`` -> the dims."""
    text = str(text or "").strip()
    if not text or text.lower() in ("auto", "detect"):
        return None
    try:
        dims = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserInputError(f"dims expects comma-separated dimension indices like 2533,1415; got {text!r}") from None
    if any(d < 0 for d in dims):
        raise UserInputError(f"dims must be non-negative, got {text!r}")
    return dims


# ---------------------------------------------------------------------- the instrument
@dataclass
class SampleSinks:
    """One sample's record: per-layer numbers and the three answers."""

    id: str
    image_tokens: int
    share: list[float]  # per layer: visual sinks / image tokens
    sink_mass: list[float]  # per layer: attention on visual sinks
    nonsink_mass: list[float]  # per layer: attention on non-sink image tokens
    sinks_per_layer: list[int]
    text_sinks: list[int]
    peak_phi: list[float]
    masked: int
    answers: dict[str, str]
    scores: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "image_tokens": self.image_tokens, "visual_sinks_per_layer": self.sinks_per_layer,
                "text_sinks_per_layer": self.text_sinks, "peak_phi_per_layer": self.peak_phi,
                "sink_share": self.share, "sink_mass": self.sink_mass, "nonsink_mass": self.nonsink_mass,
                "masked_tokens": self.masked, "answers": self.answers, "scores": self.scores}


def measure_sinks(mllm: Any, samples: Sequence[Sample], *, model_name: str = "", show_progress: bool = False,
                  batch_size: int = 8, max_new_tokens: int | None = None, tau: float = TAU, dims: str = "",
                  first_layer: int = FIRST_SINK_LAYER, cache: bool = True, seed: int = 0,
                  scorer: str = "auto") -> Measurement:
    """Sink dims, per-layer sink share and attention mass, and the answers with sinks vs random
    image tokens masked (arXiv 2503.03321).

    Args:
        mllm: the model (any of the five families).
        samples: samples with ``image`` and ``question`` and a field a scorer reads (``answer``,
            ``answers``, ``label`` or ``gt_objects``); the first image of each is used.
        batch_size: samples per ``generate`` (left-padded).
        max_new_tokens: answer length (None: 48 for descriptions, 8 otherwise).
        tau: phi threshold of a sink token (paper: 20; ``phi <= sqrt(hidden size)``).
        dims: sink dims as ``"2533,1415"``; empty: detected (and cached) for the model.
        first_layer: the first layer whose sinks are masked and summarised (paper: 2).
        cache: keep detected dims in the user cache (``INNERSIGHT_CACHE_DIR``).
        seed: seed of the random tokens (sample ``i`` uses ``[seed, i]``).
        scorer: ``auto`` (from the samples' fields) or a registered scorer name.
    """
    samples = check_samples(samples, "sinks")
    if tau <= 0:
        raise UserInputError(f"tau must be positive, not {tau}")
    num_layers = int(mllm.adapter.num_layers)
    if not 0 <= first_layer < num_layers:
        raise UserInputError(f"first_layer {first_layer} outside the decoder's 0..{num_layers - 1}")
    score = choose_scorer(samples, scorer)
    new_tokens = generation_length(score, max_new_tokens)
    given = parse_dims(dims)
    detection: SinkDetection | None = None
    if given is None:
        detection = sink_dims_for(mllm, DetectionConfig(first_layer=min(first_layer, num_layers - 1)), cache=cache)
        sink_dims = tuple(detection.dims)
    else:
        sink_dims = given
    bad = [d for d in sink_dims if d >= mllm.adapter.hidden_size]
    if bad:
        raise UserInputError(f"sink dims {bad} are outside the hidden size {mllm.adapter.hidden_size}")
    records: list[SampleSinks] = []
    with progress(len(samples), "visual sinks", show_progress) as advance:
        for chunk in batches(samples, batch_size):
            start = len(records)
            rendered = [render(s, score) for s in chunk]  # [(question, scored sample)]
            batch = mllm.prepare([sample_image(s) for s in chunk], [q for q, _ in rendered])
            with SinkProbe(mllm, batch, sink_dims, tau) as probe:
                plain = mllm.generate(batch, max_new_tokens=new_tokens)
            image = probe.image  # [B, L0]
            removed = torch.zeros_like(image)
            for layer in range(first_layer, num_layers):
                removed |= probe.sinks[layer] & image
            random = random_like(removed, image, [[seed, start + b] for b in range(len(chunk))])
            if removed.any():
                with SinkProbe(mllm, batch, sink_dims, tau, remove=removed, capture=False):
                    masked_sinks = mllm.generate(batch, max_new_tokens=new_tokens)
                with SinkProbe(mllm, batch, sink_dims, tau, remove=random, capture=False):
                    masked_random = mllm.generate(batch, max_new_tokens=new_tokens)
            else:  # nothing to mask: the answers are the plain ones
                masked_sinks, masked_random = plain, plain
            for b, (sample, (_, scored)) in enumerate(zip(chunk, rendered)):
                records.append(_record(mllm, score, sample, scored, b, probe, removed, num_layers,
                                       {"plain": plain[b], "sinks": masked_sinks[b], "random": masked_random[b]}))
            advance(len(chunk))
    numbers = _numbers(records, sink_dims, detection, given is not None, tau, first_layer, num_layers, score.key)
    name = model_name or mllm.name
    settings = {"batch_size": batch_size, "max_new_tokens": new_tokens, "tau": tau, "dims": dims,
                "first_layer": first_layer, "cache": cache, "seed": seed, "scorer": score.key}
    result = Measurement("sinks", name, len(records), numbers, settings=settings)
    result.figure = draw(numbers, name, len(records))
    return result


def _record(mllm: Any, scorer: Any, sample: Sample, scored: Sample, b: int, probe: SinkProbe,
            removed: torch.Tensor, num_layers: int, ids: dict[str, list[int]]) -> SampleSinks:
    image = probe.image[b]  # [L0]
    n_image = int(image.sum())
    share, sink_mass, nonsink_mass, counts, text, peak = [], [], [], [], [], []
    for layer in range(num_layers):
        sinks = probe.sinks[layer][b]  # [L0]
        row = probe.rows[layer][b]  # [L0]
        visual = sinks & image
        counts.append(int(visual.sum()))
        text.append(int((sinks & ~image).sum()))
        share.append(counts[-1] / n_image if n_image else float("nan"))
        sink_mass.append(float(row[visual].sum()))
        nonsink_mass.append(float(row[image & ~sinks].sum()))
        peak.append(float(probe.peak_phi[layer][b]))
    answers = {key: mllm.decode(value) for key, value in ids.items()}
    scores = {key: answer_score(scorer, text_, scored) for key, text_ in answers.items()}
    return SampleSinks(id=str(sample.get("id", "")), image_tokens=n_image, share=share, sink_mass=sink_mass,
                       nonsink_mass=nonsink_mass, sinks_per_layer=counts, text_sinks=text, peak_phi=peak,
                       masked=int(removed[b].sum()), answers=answers, scores=scores)


def _numbers(records: Sequence[SampleSinks], dims: tuple[int, ...], detection: SinkDetection | None, given: bool,
             tau: float, first_layer: int, num_layers: int, scorer_key: str) -> dict[str, Any]:
    layers = range(num_layers)
    share = [mean(r.share[i] for r in records) for i in layers]
    sink_mass = [mean(r.sink_mass[i] for r in records) for i in layers]
    nonsink_mass = [mean(r.nonsink_mass[i] for r in records) for i in layers]
    per_sink = [mean(r.sink_mass[i] / r.sinks_per_layer[i] for r in records if r.sinks_per_layer[i]) for i in layers]
    per_other = [mean(r.nonsink_mass[i] / (r.image_tokens - r.sinks_per_layer[i]) for r in records
                      if r.image_tokens > r.sinks_per_layer[i]) for i in layers]
    changed = {key: percent(mean(float(r.answers[key] != r.answers["plain"]) for r in records))
               for key in ("sinks", "random")}  # percent of answers
    accuracy = {key: percent(mean(r.scores[key] for r in records)) for key in ("plain", "sinks", "random")}
    with_sinks = sum(1 for r in records if r.masked)
    published = None
    if detection is not None and detection.published is not None:
        published = {"name": detection.published_name, "dims": list(detection.published),
                     "agrees": detection.agrees_with_published, "verified": False}
    tail = range(first_layer, num_layers)
    numbers: dict[str, Any] = {
        "sink_dims": list(dims),
        "dims_source": "given" if given else "detected",
        "detection": None if detection is None else {
            "observations": detection.observations, "layers": list(detection.layers),
            "counts": detection.counts, "max_ratio": detection.max_ratio},
        "published": published,
        "tau": tau,
        "first_layer": first_layer,
        "per_layer": {
            "layers": list(layers),
            "sink_share": share,
            "sink_mass": sink_mass,
            "nonsink_mass": nonsink_mass,
            "sink_mass_per_token": per_sink,
            "nonsink_mass_per_token": per_other,
            "text_sinks": [mean(r.text_sinks[i] for r in records) for i in layers],
            "peak_image_phi": [mean(r.peak_phi[i] for r in records) for i in layers],
        },
        "masking": {
            "samples_with_visual_sinks": with_sinks,
            "masked_tokens_mean": mean(r.masked for r in records),
            "changed": changed,
            "accuracy": accuracy,
            "scorer": scorer_key,
            "random_tokens": "as many non-sink image tokens per sample, seeded by [seed, sample index]",
        },
        "per_sample": [r.to_json() for r in records],
    }
    summary: dict[str, Any] = {"sink dims": list(dims) if dims else "none detected (no massive activations)"}
    if published is not None:
        summary["published dims (unverified)"] = (f"{published['dims']} for {published['name']}: "
                                                  f"{'agrees' if published['agrees'] else 'differs'}")
    if not dims:
        summary["note"] = "no sink dimensions: zero sinks, masking changes nothing"
    summary[f"image tokens that are sinks (mean, layers {first_layer}+)"] = _fmt(mean(share[i] for i in tail))
    summary[f"attention on sink / non-sink image tokens (layers {first_layer}+)"] = (
        f"{_fmt(mean(sink_mass[i] for i in tail))} / {_fmt(mean(nonsink_mass[i] for i in tail))}")
    summary["answers changed (%): sinks masked / random masked"] = (
        f"{_pct(changed['sinks'])} / {_pct(changed['random'])}")
    summary["accuracy (%): plain / sinks masked / random masked"] = (
        f"{_pct(accuracy['plain'])} / {_pct(accuracy['sinks'])} / {_pct(accuracy['random'])}")
    numbers["summary"] = summary
    return numbers


def _fmt(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _pct(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.1f}"


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v if v is not None and math.isfinite(v) else float("nan") for v in values]


def draw(numbers: dict[str, Any], model: str, n: int) -> Any:
    """Three panels: sink share per layer; attention mass on sinks vs non-sinks per layer; answers
    changed and accuracy with sinks vs random image tokens masked."""
    from .. import viz

    plt = viz.pyplot()
    from matplotlib.ticker import MaxNLocator

    per = numbers["per_layer"]
    layers = per["layers"]
    first = numbers["first_layer"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.6))
    colors = ["lightgray" if i < first else "tab:purple" for i in layers]
    ax1.bar(layers, _finite(per["sink_share"]), color=colors)
    ax1.set_xlabel("decoder layer")
    ax1.set_ylabel("share of image tokens that are sinks")
    ax1.set_title(f"Visual sinks per layer (phi >= {numbers['tau']:g}; gray: before layer {first})", fontsize=10)
    ax1.set_ylim(0, max([v for v in _finite(per["sink_share"]) if math.isfinite(v)] + [0.0]) * 1.2 or 1.0)
    if not numbers["sink_dims"]:
        ax1.text(0.5, 0.5, "no sinks: no sink dimensions", transform=ax1.transAxes, ha="center", color="dimgray")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.plot(layers, _finite(per["sink_mass"]), marker="o", color="tab:purple", label="visual sink tokens")
    ax2.plot(layers, _finite(per["nonsink_mass"]), marker="s", color="tab:green", label="non-sink image tokens")
    ax2.set_xlabel("decoder layer")
    ax2.set_ylabel("attention mass (answer position, mean over heads)")
    ax2.set_title("Attention on sinks vs non-sinks", fontsize=10)
    ax2.legend(loc="best", fontsize=8)
    masking = numbers["masking"]
    styles = {"plain": ("none masked", "lightgray"), "sinks": ("visual sinks masked", "tab:purple"),
              "random": ("as many random image tokens masked", "tab:orange")}
    width = 0.26
    bars = [(0 - width / 2, "sinks", masking["changed"]["sinks"]), (0 + width / 2, "random", masking["changed"]["random"]),
            (1 - width, "plain", masking["accuracy"]["plain"]), (1, "sinks", masking["accuracy"]["sinks"]),
            (1 + width, "random", masking["accuracy"]["random"])]
    labelled: set[str] = set()
    for x, key, raw in bars:
        value = _finite([raw])[0]
        label, color = styles[key]
        bar = ax3.bar([x], [value if math.isfinite(value) else 0.0], width, color=color,
                      label=None if key in labelled else label)[0]
        labelled.add(key)
        ax3.annotate("n/a" if not math.isfinite(value) else f"{value:.1f}",
                     (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    handles, names = ax3.get_legend_handles_labels()
    order = [names.index(styles[k][0]) for k in ("plain", "sinks", "random") if styles[k][0] in names]
    ax3.set_xticks([0, 1], ["answers changed", f"accuracy ({masking['scorer']})"])
    ax3.set_ylim(0, 150)  # room for the legend above the bars
    ax3.set_yticks([0, 20, 40, 60, 80, 100])
    ax3.set_ylabel("% of samples")
    ax3.set_title(f"Masking sinks vs random tokens ({masking['samples_with_visual_sinks']} samples with sinks)",
                  fontsize=10)
    ax3.legend([handles[i] for i in order], [names[i] for i in order], loc="upper center", fontsize=7, ncol=1)
    dims = numbers["sink_dims"]
    label = f"sink dims {dims} ({numbers['dims_source']})" if dims else "no sink dims detected (no massive activations)"
    fig.suptitle(figure_title(f"Visual attention sinks (VAR): {label}", model, n))
    fig.tight_layout()
    return fig
