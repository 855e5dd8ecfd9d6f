"""The crop gate of ViCrop: crop only when the model needs it, decided before the expensive work.

ViCrop always adds a crop, so a question about something large (or about the whole image) pays
for the two importance-map rows (question and generic prompt) and a second image, and may lose
accuracy to a crop that cuts its object. The gate lets such questions pay (almost) nothing.

**The early gate** (``ViCropConfig.gate_map = "question"``, the ``vicrop-gated`` preset):

1. the model answers plainly first: the plan's own generate with the original image only, while
   one layer handler (:mod:`innersight.attention`, at ViCrop's map layer) records, during the
   prefill only, the answering (last prompt) position's attention over the keys (:class:`PrefillCapture`);
   a logits observer records the first answer token's distribution (:class:`FirstStepConfidence`);
2. the raw question-attention map (heads averaged, projected onto the image grid as rel-att's
   maps are) and the plain answer's confidence decide (:func:`decide`);
3. "no crop": the plain answer **is** the answer (cost: one plain generate plus one attention
   row at one layer); "crop": ViCrop runs as usual on that sample and its answer replaces the
   plain one (cost: plain + ViCrop).

Signals (the statistics of the maps themselves and of the answer, each documented):

* ``peak-to-mean`` of the non-negative map ``m`` over its ``n`` cells: ``max_c m_c / mean_c m_c``
  (1: flat; ``n``: one hot cell). A small detail the question names concentrates attention on a
  few cells; a large object or a general question spreads it.
* ``top-mass``: the share of the map's mass in its ``ceil(n / 16)`` largest cells (the size of a
  small object's footprint on the grid; 1/16 of the cells is 4 of the micro model's 64).
* ``concentration``: ``1 - H(p) / log n`` with ``p = m / sum m`` (0: flat; 1: one cell), the
  normalised entropy's complement; the whole distribution, not its peak.
* ``confidence``: the plain answer's first-token probability (largest softmax probability of
  the scores ``generate`` picks from). A low maximum softmax probability is the standard signal
  that a prediction is likely wrong (Hendrycks & Gimpel, "A Baseline for Detecting
  Misclassified and Out-of-Distribution Examples", ICLR 2017, arXiv 1610.02136); ViCrop's own
  grad-att differentiates the same quantity's logarithm (arXiv 2502.17422, Sec. 3.2).

Rule: crop when the map statistic reaches ``gate`` (None: the map does not decide) **and** the
confidence is below ``gate_confidence`` (None: the confidence does not decide); both None (and no
arbitration) is the paper's ViCrop, always cropping. Thresholds depend on the model and the map's
resolution; recalibrate with ``benchmarks/bench_gate.py`` for another model.

The preset (:data:`MICRO_THRESHOLD`, :data:`MICRO_CONFIDENCE`) was chosen on the micro model with
the demo seed 20261121 only (200 + 200 scenes; BENCHMARKS.md, "ViCrop crop gate") by the rule: the
highest small-symbol accuracy among the settings whose large-symbol accuracy is at least plain's
**and** whose large-symbol crop rate is at most 3 %. The 3 % is the cost budget, from the cost of
the crop path measured in CPU seconds (one thread) on the demo seed's large set: a chunk of 16
plain scenes costs about 150 ms, the gate's capture about 10 ms more, and ViCrop on the k cropped
rows of a chunk about 32 ms + 20 ms per row (one map pass and a second generate with two images;
per scene, a cropped scene costs about 3.4 plain ones). With a crop rate r the expected cost of a
chunk is then 150 + 10 + (1 - (1 - r)^16) * 32 + 16 r * 20 ms: 1.21x plain at r = 3 %, 1.29x at
5 %, 1.36x at 7 %. Peak-to-mean >= 20 with confidence < 0.4 met the rule (calibration: small 64.5
/ large 83.5 vs plain 50.5 / 83.5, 2 % of large scenes cropped). The first recalibration used a
6 % budget from a cruder cost estimate (confidence < 0.6, peak-to-mean >= 20: small 69.0, large
84.0, 6 % cropped); on the held-out seed it cost 1.51x plain at batch 16, above the target, and is
kept reachable as ``--set vicrop.gate_confidence=0.6``; the early gate before it used peak-to-mean
>= 12 (``--set vicrop.gate=12 vicrop.gate_confidence=0.6``).

**Arbitration** (``gate_arbitrate``, off in the preset): where the gate crops, keep ViCrop's answer
only when its first-token probability is above the plain answer's (:func:`keeps_crop_answer`;
the same maximum-softmax-probability signal, compared between the two answers to one question).
Studied on the demo seed and not adopted: on large symbols the crop answer is the more confident
one on 44 % of scenes, where ViCrop and the plain answer are right equally often (80.5 %), so
the comparison does not tell the better answer apart; on small symbols it rejects some of
ViCrop's fixes (-1 point at every threshold). Where it is on, the image-only path (:func:`apply_rows`)
reads the crop's confidence from one forward, so both paths decide alike.

**The post-map gate** (``gate_map = "rel-att"``, the earlier design, kept reachable): the full
rel-att map is computed for every sample and the crop kept when its statistic reaches ``gate``;
it pays ViCrop's map cost on every question.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

#: the ``vicrop-gated`` preset (micro model, 64-cell maps, demo seed 20261121; BENCHMARKS.md):
#: crop when the question map's peak-to-mean reaches this (the earlier early gate: 12) ...
MICRO_THRESHOLD = 20.0
#: ... and the plain answer's first-token probability is below this
MICRO_CONFIDENCE = 0.4

#: which map the gate reads: the plain prefill's question attention (early) or the full rel-att map
GATE_MAPS = ("question", "rel-att")


def _cells(importance: np.ndarray) -> np.ndarray:
    """The map's cells as a flat non-negative float64 vector (negative values clipped to 0)."""
    return np.clip(np.asarray(importance, dtype=np.float64), 0.0, None).ravel()


def peak_to_mean(importance: np.ndarray) -> float:
    """``max / mean`` of a map [rows, cols] (negatives clipped to 0; 0 for an all-zero map)."""
    values = _cells(importance)
    mean = float(values.mean()) if values.size else 0.0
    if mean <= 0.0 or not np.isfinite(mean):
        return 0.0
    return float(values.max() / mean)


#: the earlier name of :func:`peak_to_mean`
sharpness = peak_to_mean


def top_cells(n: int) -> int:
    """How many cells ``top-mass`` sums: ``ceil(n / 16)``, at least 1."""
    return max(1, math.ceil(n / 16))


def top_mass(importance: np.ndarray) -> float:
    """Share of the mass in the :func:`top_cells` largest cells (0 for an all-zero map)."""
    values = _cells(importance)
    total = float(values.sum())
    if total <= 0.0 or not np.isfinite(total):
        return 0.0
    k = top_cells(values.size)
    return float(np.sort(values)[-k:].sum() / total)


def concentration(importance: np.ndarray) -> float:
    """``1 - H(p) / log n``, ``p`` the map normalised to sum 1 (0: flat or all-zero; 1: one cell)."""
    values = _cells(importance)
    total = float(values.sum())
    if values.size < 2 or total <= 0.0 or not np.isfinite(total):
        return 0.0
    p = values / total
    nz = p[p > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    return float(1.0 - entropy / math.log(values.size))


#: name -> statistic of a map; the value ``ViCropConfig.gate`` is compared with
STATISTICS: dict[str, Callable[[np.ndarray], float]] = {
    "peak-to-mean": peak_to_mean, "top-mass": top_mass, "concentration": concentration}
#: the admissible range of each statistic (a threshold outside it is an error)
STATISTIC_RANGES: dict[str, tuple[float, float]] = {
    "peak-to-mean": (1.0, math.inf), "top-mass": (0.0, 1.0), "concentration": (0.0, 1.0)}


def decide(statistic: float | None, confidence: float | None, threshold: float | None,
           confidence_below: float | None) -> bool:
    """Whether to crop: the map statistic reaches ``threshold`` and the plain answer's
    confidence is below ``confidence_below`` (a None threshold does not decide; both None:
    always crop)."""
    sharp = threshold is None or (statistic is not None and statistic >= threshold)
    unsure = confidence_below is None or (confidence is not None and confidence < confidence_below)
    return sharp and unsure


def keeps_crop(importance: np.ndarray, threshold: float | None, statistic: str = "peak-to-mean") -> bool:
    """The post-map gate: whether the crop is kept for this map (always, when ``threshold`` is None)."""
    return threshold is None or STATISTICS[statistic](importance) >= threshold


class PrefillCapture:
    """A layer handler recording the last prompt position's attention probabilities at its layer
    during the prefill of a ``generate`` (its first call): ``probs`` [B, H, Lk] fp32.

    The layer's output is transformers' SDPA, unchanged, on every call: the answer is the plain
    answer. Decoding steps pass straight through (nothing is recomputed there).
    """

    def __init__(self) -> None:
        self.probs: torch.Tensor | None = None
        self.calls = 0

    def handler(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs: Any) -> Any:
        from ..attention import row_probabilities, sdpa_forward

        self.calls += 1
        if self.probs is None:  # the prefill: query [B, H, L, D] over its own L keys
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            self.probs = row_probabilities(query, key, attention_mask, scale, slice(-1, None))[:, :, 0, :].detach()
        return sdpa_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


class FirstStepConfidence:
    """A logits processor that changes nothing and records the largest probability of the first
    step's scores (those ``generate`` picks the first answer token from): ``values`` [B]."""

    def __init__(self) -> None:
        self.values: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.values is None:
            self.values = torch.softmax(scores.float(), dim=-1).max(dim=-1).values.detach()  # [B]
        return scores


# ---------------------------------------------------------------------- the early gate's path
def early_gate(config: Any) -> bool:
    """Whether ``config`` (a ViCropConfig) asks for the early gate (plain answer first)."""
    return config.gate_map == "question" and (config.gate is not None or config.gate_confidence is not None
                                              or bool(config.gate_arbitrate))


def keeps_crop_answer(plain_confidence: float, crop_confidence: float, arbitrate: bool) -> bool:
    """Arbitration after cropping: whether the crop's answer replaces the plain one. Without
    arbitration always; with it only when the crop answer's first-token probability is strictly
    above the plain answer's (a tie keeps the plain answer, which costs nothing more)."""
    return not arbitrate or crop_confidence > plain_confidence


def question_maps(project: Any, batch: Any, probs: torch.Tensor) -> list[np.ndarray]:
    """Each row's head-averaged last-position attention ``probs`` [B, H, L] on its first image's
    grid through ``project`` (:func:`innersight.look.maps.grid_projection`, the projection
    rel-att's maps use, opened around the forward): [rows, cols] per row."""
    mean = probs.mean(dim=1)  # [B, L]
    return [project(mean[b], batch, b)[0] for b in range(len(batch))]


def gate_report(config: Any, qmap: np.ndarray, confidence: float | None, crop: bool,
                crop_confidence: float | None = None, kept: bool | None = None) -> dict[str, Any]:
    """What the gate saw and decided for one sample (the answer's details): ``cropped``, whether
    ViCrop ran on it; ``crop_confidence``, its answer's first-token probability (None: no crop, or
    no generated answer); ``kept``, whether its crop is in the answer (False where the gate did not
    crop or arbitration kept the plain answer)."""
    return {"gate_map": config.gate_map, "gate_statistic": config.gate_statistic,
            "gate_value": STATISTICS[config.gate_statistic](qmap), "confidence": confidence, "cropped": crop,
            "crop_confidence": crop_confidence, "kept": crop if kept is None else kept}


def plain_extras(method: Any, qmap: np.ndarray, report: dict[str, Any],
                 rejected: dict[str, Any] | None = None) -> dict[str, Any]:
    """A sample's extras where its answer is the plain one: no box, no crop; where arbitration
    rejected a crop, ``rejected`` (ViCrop's extras) still gives its maps and its box (``crop_box``)."""
    details = {"variant": method.config.variant, "box": None, **report}
    maps = {"question": qmap}
    if rejected is not None:
        maps = {**rejected["maps"], "question": qmap}
        details["crop_box"] = rejected["details"][method.name]["box"]
    return {"box": None, "crop": None, "maps": maps, "details": {method.name: details}}


def decisions(config: Any, maps: list[np.ndarray], confidences: list[float | None]) -> list[bool]:
    """Crop or not for each sample (:func:`decide` with ``config``'s thresholds)."""
    stat = STATISTICS[config.gate_statistic]
    return [decide(stat(m), c, config.gate, config.gate_confidence) for m, c in zip(maps, confidences)]


def answer_rows(method: Any, mllm: Any, image_lists: list[list[Any]], questions: list[str], template: str,
                generate: Callable[..., Any]) -> tuple[list[list[int]], list[str], list[dict[str, Any]], dict[str, Any]]:
    """ViCrop behind the early gate, for :meth:`innersight.flow.Plan.run`: the plain answer
    first through the plan's ``generate`` (capturing the question map and the confidence), then
    ViCrop's answer for the samples the gate crops only. Returns ``(ids, prompts, extras,
    details)`` per row in input order (details: the generate calls' reports merged)."""
    from ..attention import layer_handlers
    from .maps import grid_projection

    config = method.config
    adapter = mllm.adapter
    capture, confidence = PrefillCapture(), FirstStepConfidence()
    layer = config.resolve_layer(adapter)
    # the adapter may record what the projection needs during the forward: generate inside the block
    with grid_projection(adapter, config.qformer_block) as project, \
            layer_handlers(mllm.model, adapter.decoder_layers, {layer: capture.handler}):
        plain = generate(image_lists, questions, observers=[confidence])
        assert capture.probs is not None and confidence.values is not None
        maps = question_maps(project, plain.batch, capture.probs)
    confidences = [float(v) for v in confidence.values.tolist()]
    crop = decisions(config, maps, confidences)
    ids, prompts = list(plain.ids), list(plain.batch.prompts)
    details = dict(plain.details)
    extras = [plain_extras(method, m, gate_report(config, m, c, False)) for m, c in zip(maps, confidences)]
    chosen = [i for i, k in enumerate(crop) if k]
    if chosen:  # ViCrop on the cropped rows only: one map pass and one generate for k rows
        from .answer_prefix import answer_from_maps

        # the crop answer continues from the map's prefix cache where exact (look/answer_prefix.py)
        lists_in, asked = [image_lists[i] for i in chosen], [questions[i] for i in chosen]
        observed = FirstStepConfidence()
        second, _, more = answer_from_maps(method, lists_in, asked, generate,
                                           lambda: method.crop_rows(lists_in, asked, mllm, template),
                                           observers=[observed])
        assert observed.values is not None
        details.update(second.details)
        for j, (i, crop_confidence) in enumerate(zip(chosen, observed.values.tolist())):
            keep = keeps_crop_answer(confidences[i], crop_confidence, config.gate_arbitrate)
            report = gate_report(config, maps[i], confidences[i], True, crop_confidence, keep)
            if not keep:  # arbitration: the plain answer stands
                extras[i] = plain_extras(method, maps[i], report, rejected=more[j])
                continue
            ids[i], prompts[i] = second.ids[j], second.batch.prompts[j]
            more[j]["maps"]["question"] = maps[i]
            more[j]["details"][method.name].update(report)
            extras[i] = more[j]
    return ids, prompts, extras, details


def forward_decisions(method: Any, mllm: Any, image_lists: list[list[Any]], questions: list[str],
                      template: str) -> tuple[list[bool], list[np.ndarray], list[float]]:
    """The early gate without a generate (for callers that only change the images, e.g. the
    likelihood protocols): one plain forward with the same capture, the confidence read from its
    last position's logits (the raw model's, no logits processor). Returns (crop, maps,
    confidences)."""
    from ..attention import layer_handlers
    from ..generation_calls import last_logits_kwargs
    from .maps import grid_projection

    config = method.config
    adapter = mllm.adapter
    capture = PrefillCapture()
    batch = mllm.prepare(image_lists, questions, template=template)
    layer = config.resolve_layer(adapter)
    with torch.inference_mode(), grid_projection(adapter, config.qformer_block) as project, \
            layer_handlers(mllm.model, adapter.decoder_layers, {layer: capture.handler}):
        logits = mllm.model(**batch.inputs, use_cache=False, **last_logits_kwargs(mllm.model)).logits  # [B, 1 or L, V]
        assert capture.probs is not None
        maps = question_maps(project, batch, capture.probs)
    confidences = torch.softmax(logits[:, -1].float(), dim=-1).max(dim=-1).values.tolist()  # [B]
    return decisions(config, maps, confidences), maps, confidences


def forward_confidences(mllm: Any, image_lists: list[list[Any]], questions: list[str], template: str) -> list[float]:
    """The first answer token's probability (largest softmax probability at the last prompt
    position) of each row, from one plain forward: what ``generate``'s first step would pick with."""
    from ..generation_calls import last_logits_kwargs

    batch = mllm.prepare(image_lists, questions, template=template)
    with torch.inference_mode():
        logits = mllm.model(**batch.inputs, use_cache=False, **last_logits_kwargs(mllm.model)).logits  # [B, 1 or L, V]
    return torch.softmax(logits[:, -1].float(), dim=-1).max(dim=-1).values.tolist()  # [B]


def apply_rows(method: Any, mllm: Any, image_lists: list[list[Any]], questions: list[str],
               template: str) -> tuple[list[list[Any]], list[dict[str, Any]]]:
    """The early gate for callers that only change the images (:meth:`ViCrop.apply`): decided
    by :func:`forward_decisions`; the cropped samples get ViCrop's images, the others their own."""
    config = method.config
    crop, maps, confidences = forward_decisions(method, mllm, image_lists, questions, template)
    lists = [list(ims) for ims in image_lists]
    extras = [plain_extras(method, m, gate_report(config, m, c, False)) for m, c in zip(maps, confidences)]
    chosen = [i for i, k in enumerate(crop) if k]
    if chosen:
        texts = [questions[i] for i in chosen]
        more_lists, more = method.crop_rows([image_lists[i] for i in chosen], texts, mllm, template)
        # arbitration reads the crop's first-token probability from one forward (no answer here)
        crop_confidences: list[float | None] = (forward_confidences(mllm, more_lists, texts, template)
                                                if config.gate_arbitrate else [None] * len(chosen))
        for j, (i, crop_confidence) in enumerate(zip(chosen, crop_confidences)):
            keep = crop_confidence is None or keeps_crop_answer(confidences[i], crop_confidence, True)
            report = gate_report(config, maps[i], confidences[i], True, crop_confidence, keep)
            if not keep:
                extras[i] = plain_extras(method, maps[i], report, rejected=more[j])
                continue
            lists[i] = more_lists[j]
            more[j]["maps"]["question"] = maps[i]
            more[j]["details"][method.name].update(report)
            extras[i] = more[j]
    return lists, extras
