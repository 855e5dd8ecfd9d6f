"""Where the model looks, and how object size hurts: ViCrop's two measurements (arXiv 2502.17422).

"MLLMs Know Where to Look: Training-Free Perception of Small Visual Details with Multimodal
LLMs" (ICLR 2025) rests on two findings, each an instrument here:

* ``attention-ratio`` (Sec. 3, Fig. 2): at every decoder layer, how much more attention the
  answering position gives to the ground-truth box than to boxes of the same size elsewhere,
  split by whether the model answered right. A ratio above 1 for wrong answers too is the
  paper's "the model knows where to look even when it answers wrong".
* ``size-sensitivity`` (Sec. 2, Fig. 1): accuracy by the object's relative size (box area /
  image area), once on the image alone and once with a ground-truth crop given as a second image
  after the original, the way ViCrop shows its own crops.

**Attention ratio, precisely.** For one sample and one layer:

1. The answering position is the last prompt token (the position whose next-token logits give
   the first answer token). Its attention probabilities at that layer, averaged over heads, are
   read through :mod:`innersight.attention` handlers (one row per layer, never a full attention
   matrix), and projected onto the image grid exactly as ViCrop's maps are
   (:func:`innersight.look.maps.grid_projection`, as the adapter's
   :meth:`~innersight.adapters.base.Adapter.token_grid` says): patch-token families scatter the
   image tokens' values onto their finest token grid (LLaVA-NeXT: the high-resolution tiles; the
   base view's tokens are not part of the map), InstructBLIP multiplies the LM attention over its
   Q-Former queries by the queries' cross-attention over the ViT patches (``qformer_block``, the
   option's name users know; the adapter decides what it means).
2. The grid spans ``view.region`` of the original image (it may extend past the image as padding
   or cover only a centre crop); only the *visible* part ``V = region ∩ image`` counts. The
   ground-truth box is clipped to ``V``; a box with no area left was never shown to the model and
   the sample gets no ratio (counted under ``skipped``).
3. Each grid cell is weighted by the fraction of its area that the clipped box covers
   (``coverage [rows, cols]``); the box's attention mass is ``m_in = Σ map · coverage``.
4. The reference boxes are the same box shifted by whole cells, ``(Δrow, Δcol) ≠ (0, 0)``, to
   *every* position where it lies entirely inside ``V`` and does not overlap the ground-truth box
   (touching edges allowed). Shifting by whole cells keeps the coverage pattern, so each reference
   box has exactly the box's size and sub-cell phase; its mass is ``Σ map · shifted coverage``.
5. ``ratio = m_in / mean(reference masses)``: the attention per unit area inside the box over
   the attention per unit area in a same-sized box elsewhere, averaged over all such positions
   (no sampling, hence deterministic without a seed). Uniform attention gives exactly 1. A box too
   large to fit elsewhere (more than half the visible area along both axes) has no reference and
   no ratio (``skipped``); so does a zero reference mass (softmax attention is never exactly zero).

Per layer, the figure and ``numbers["ratio"]`` show the mean of the per-sample ratios over the
correct answers, the wrong ones and all of them. Correctness comes from the benchmark's own scorer
(:mod:`innersight.eval.scorers`), chosen from the sample's fields unless ``scorer`` names one
(:func:`innersight.instruments.common.choose_scorer`; a soft score of at least 0.5 counts as
correct, :func:`~innersight.instruments.common.is_correct`). Answers are generated with the untouched model
(:meth:`innersight.MLLM.answer_batch`, greedy); the attention comes from one separate forward of
the same prompts, which stops right after the last layer's attention.

**Ground-truth boxes.** ``box`` ``[x0, y0, x1, y1]`` in original-image pixels (the micro
benchmarks), or V*Bench's ``bbox`` ``[x, y, w, h]`` (a list of them, one per target object: the
enclosing box of all targets is used).

**Size sensitivity.** Relative size = area of the box (clipped to the image) / image area. The
samples are split into ``n_bins`` bins, by quantiles of their relative sizes (equal counts,
default) or by equal steps of ``log10`` size between the smallest and the largest (``binning=log``).
The crop is a square of side ``context × max(box width, box height)`` (at least ``min_side``
pixels) centred on the box, moved inside the image and clipped to it (the rule ViCrop uses for
its own crops, :func:`innersight.look.boxes.select_box`), cut with
:func:`innersight.look.boxes.crop`, and given after the original image in the same prompt, as
:class:`innersight.look.vicrop.ViCrop` does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..adapters.base import Batch
from ..adapters.geometry import Box, GridView
from ..errors import UserInputError
from .common import (
    Measurement,
    Sample,
    batches,
    check_samples,
    choose_scorer,
    figure_title,
    is_correct,
    progress,
    render,
    sample_image,
)

SOURCE = "arXiv 2502.17422 (ICLR 2025), Sec. 2-3, Fig. 1-2"
BINNINGS = ("quantile", "log")
_EPS = 1e-9


# ---------------------------------------------------------------------- ground-truth boxes
def _four_numbers(raw: Any, sample_id: str, key: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in raw)
    except (TypeError, ValueError):
        raise UserInputError(f"sample {sample_id!r}: {key} must be four numbers, got {raw!r}") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise UserInputError(f"sample {sample_id!r}: {key} must be four finite numbers, got {raw!r}")
    return values  # type: ignore[return-value]


def ground_truth_box(sample: Sample) -> Box | None:
    """The sample's ground-truth box ``(x0, y0, x1, y1)`` in original-image pixels, or ``None``.

    ``box`` is read as ``[x0, y0, x1, y1]``; V*Bench's ``bbox`` as ``[x, y, w, h]`` or a list of
    those (one per target object), whose enclosing box is returned.
    """
    sid = str(sample.get("id", "?"))
    if sample.get("box") is not None:
        x0, y0, x1, y1 = _four_numbers(sample["box"], sid, "box")
    elif sample.get("bbox") is not None:
        raw = sample["bbox"]
        many = isinstance(raw, (list, tuple)) and len(raw) > 0 and isinstance(raw[0], (list, tuple))
        boxes = [_four_numbers(b, sid, "bbox") for b in (raw if many else [raw])]
        if any(w <= 0 or h <= 0 for _, _, w, h in boxes):
            raise UserInputError(f"sample {sid!r}: bbox [x, y, w, h] needs positive w and h, got {raw!r}")
        x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        x1, y1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    else:
        return None
    if x1 <= x0 or y1 <= y0:
        raise UserInputError(f"sample {sid!r}: the box {[x0, y0, x1, y1]} has no area (x1 > x0 and y1 > y0 needed)")
    return (x0, y0, x1, y1)


def require_boxes(samples: Sequence[Sample], instrument: str) -> list[Box]:
    """Every sample's ground-truth box; a clear error when some sample has none."""
    if not samples:
        raise UserInputError(f"{instrument} needs at least one sample")
    boxes = [ground_truth_box(s) for s in samples]
    missing = [str(s.get("id", "?")) for s, b in zip(samples, boxes) if b is None]
    if missing:
        raise UserInputError(
            f"{instrument} needs a ground-truth box on every sample ('box' [x0, y0, x1, y1] in pixels, or "
            f"V*Bench's 'bbox' [x, y, w, h]); {len(missing)} of {len(samples)} have none, e.g. {missing[0]!r}. "
            f"Use a benchmark with boxes: micro-details (default) or vstar")
    return [b for b in boxes if b is not None]


def intersect(a: Box, b: Box) -> Box | None:
    """The overlap of two boxes, ``None`` when it has no area."""
    box = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    return box if box[2] > box[0] and box[3] > box[1] else None


def relative_size(box: Box, image_size: tuple[int, int]) -> float:
    """Area of ``box`` inside the image / image area (0 when the box lies outside it)."""
    width, height = image_size
    inside = intersect(box, (0.0, 0.0, float(width), float(height)))
    if inside is None:
        return 0.0
    return (inside[2] - inside[0]) * (inside[3] - inside[1]) / float(width * height)


# ---------------------------------------------------------------------- the ratio on a grid
@dataclass(frozen=True)
class BoxWindows:
    """The ground-truth box and its same-sized reference boxes on one grid view.

    ``kernel [kh, kw]``: the fraction of each cell that the (clipped) box covers, over the
    smallest block of cells holding the box, whose top-left cell is ``origin`` (row, col).
    ``references [K, 2]``: the top-left cells (row, col) of the kernel at every reference position.
    """

    kernel: np.ndarray
    origin: tuple[int, int]
    references: np.ndarray


def _overlaps(lo: float, hi: float, n: int) -> np.ndarray:
    """Length of ``[lo, hi]`` inside each unit cell ``[i, i + 1]``, ``i < n``: [n]."""
    cells = np.arange(n, dtype=np.float64)
    return np.clip(np.minimum(cells + 1.0, hi) - np.maximum(cells, lo), 0.0, 1.0)


def box_windows(view: GridView, box: Box, image_size: tuple[int, int]) -> BoxWindows | None:
    """The box's coverage kernel and reference positions on ``view`` (module docstring, steps 2-4);
    ``None`` when the box does not intersect the visible part of the grid."""
    width, height = image_size
    rx0, ry0, rx1, ry1 = view.region
    visible = intersect((rx0, ry0, rx1, ry1), (0.0, 0.0, float(width), float(height)))
    clipped = intersect(box, visible) if visible is not None else None
    if clipped is None or visible is None:
        return None
    cw, ch = view.cell_size

    def cells(b: Box) -> tuple[float, float, float, float]:  # pixels -> cell units
        return ((b[0] - rx0) / cw, (b[1] - ry0) / ch, (b[2] - rx0) / cw, (b[3] - ry0) / ch)

    bx0, by0, bx1, by1 = cells(clipped)
    vx0, vy0, vx1, vy1 = cells(visible)
    cover = np.outer(_overlaps(by0, by1, view.rows), _overlaps(bx0, bx1, view.cols))  # [rows, cols]
    rows_nz, cols_nz = np.nonzero(cover.sum(axis=1))[0], np.nonzero(cover.sum(axis=0))[0]
    if rows_nz.size == 0 or cols_nz.size == 0:
        return None
    r0, r1, c0, c1 = int(rows_nz[0]), int(rows_nz[-1]) + 1, int(cols_nz[0]), int(cols_nz[-1]) + 1
    kernel = cover[r0:r1, c0:c1]  # [kh, kw]
    kh, kw = kernel.shape
    top, left = np.meshgrid(np.arange(view.rows - kh + 1), np.arange(view.cols - kw + 1), indexing="ij")
    dr, dc = top - r0, left - c0  # [nr, nc] whole-cell shifts of every kernel position
    inside = ((bx0 + dc >= vx0 - _EPS) & (bx1 + dc <= vx1 + _EPS)
              & (by0 + dr >= vy0 - _EPS) & (by1 + dr <= vy1 + _EPS))
    apart = (np.abs(dc) >= (bx1 - bx0) - _EPS) | (np.abs(dr) >= (by1 - by0) - _EPS)
    keep = inside & apart
    references = np.stack([top[keep], left[keep]], axis=1).astype(np.int64)  # [K, 2]
    return BoxWindows(kernel=kernel, origin=(r0, c0), references=references)


def window_masses(maps: np.ndarray, windows: BoxWindows) -> tuple[np.ndarray, np.ndarray]:
    """(box mass [...], reference masses [..., K]) of maps [..., rows, cols]."""
    kh, kw = windows.kernel.shape
    r0, c0 = windows.origin
    inside = (maps[..., r0:r0 + kh, c0:c0 + kw] * windows.kernel).sum(axis=(-2, -1))  # [...]
    if len(windows.references) == 0:
        return inside, np.zeros(maps.shape[:-2] + (0,))
    views = np.lib.stride_tricks.sliding_window_view(maps, (kh, kw), axis=(-2, -1))  # [..., nr, nc, kh, kw]
    rows, cols = windows.references[:, 0], windows.references[:, 1]
    picked = views[..., rows, cols, :, :]  # [..., K, kh, kw]
    return inside, (picked * windows.kernel).sum(axis=(-2, -1))


def attention_ratio(maps: np.ndarray, view: GridView, box: Box, image_size: tuple[int, int]) -> np.ndarray:
    """The attention ratio of ``box`` on ``maps`` [..., rows, cols] over ``view``: [...].

    NaN where it is undefined: the box is not visible on the grid, it has no same-sized reference
    position, or the reference mass is zero (see the module docstring).
    """
    maps = np.asarray(maps, dtype=np.float64)
    if maps.shape[-2:] != (view.rows, view.cols):
        raise ValueError(f"maps of shape {maps.shape} for a {view.rows}x{view.cols} view")
    windows = box_windows(view, box, image_size)
    if windows is None or len(windows.references) == 0:
        return np.full(maps.shape[:-2], np.nan)
    inside, refs = window_masses(maps, windows)
    reference = refs.mean(axis=-1)  # [...]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(reference > 0, inside / np.where(reference > 0, reference, 1.0), np.nan)


def skip_reason(view: GridView, box: Box, image_size: tuple[int, int]) -> str | None:
    """Why a sample's box gets no ratio on ``view`` (``None``: it gets one, unless the reference
    attention is zero)."""
    windows = box_windows(view, box, image_size)
    if windows is None:
        return "the box lies outside the part of the image the model sees"
    if len(windows.references) == 0:
        return "the box is too large for a same-sized box to fit elsewhere"
    return None


# ---------------------------------------------------------------------- attention capture
def layer_attention(mllm: Any, batch: Batch) -> torch.Tensor:
    """Head-averaged attention of each row's last position at every decoder layer: [B, n_layers, L]
    (fp32, on the device of ``batch``'s inputs). One forward; it stops after the last layer's
    attention (no MLP, norm or LM head over the sequence)."""
    from ..attention import StopForward, layer_handlers
    from ..look.maps import AttentionCapture

    adapter = mllm.adapter
    n = adapter.num_layers
    captures = [AttentionCapture(i, stop_after=i == n - 1) for i in range(n)]
    with torch.inference_mode(), layer_handlers(mllm.model, adapter.decoder_layers,
                                                {c.layer: c.handler for c in captures}):
        try:
            mllm.model(**batch.inputs, use_cache=False)
        except StopForward:
            pass
    device = batch.input_ids.device
    rows = []
    for capture in captures:
        if capture.probs is None:
            raise RuntimeError(f"no attention was captured at layer {capture.layer}")
        rows.append(capture.probs.mean(dim=1).float().to(device))  # [B, L]
    return torch.stack(rows, dim=1)  # [B, n_layers, L]


def layer_maps(mllm: Any, batch: Batch, grid_block: int = 2) -> list[tuple[np.ndarray, GridView]]:
    """Per sample of ``batch``: (maps [n_layers, rows, cols] over its first image, the view);
    ``grid_block`` as :func:`innersight.look.maps.grid_projection` takes it."""
    from ..look.maps import grid_projection

    with grid_projection(mllm.adapter, grid_block) as project:
        rows = layer_attention(mllm, batch)  # [B, n_layers, L]
        out = []
        for b in range(len(batch)):
            projected = [project(rows[b, layer], batch, b) for layer in range(rows.shape[1])]
            out.append((np.stack([m for m, _ in projected]), projected[0][1]))
    return out


# ---------------------------------------------------------------------- answers
def _check_common(batch_size: int, max_new_tokens: int) -> None:
    if isinstance(batch_size, bool) or batch_size < 1:
        raise UserInputError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise UserInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")


def _check_qformer_block(adapter: Any, block: int) -> None:
    """Before any work: ``block`` (the user's ``qformer_block``) must index one of the blocks the
    adapter's token grid reads from (:attr:`~innersight.adapters.base.Adapter.token_grid_blocks`);
    an adapter with none ignores it."""
    count = adapter.token_grid_blocks
    if count == 0:
        return
    if isinstance(block, bool) or not isinstance(block, int) or not -count <= block < count:
        raise UserInputError(f"qformer_block {block} does not exist: this model's image-token map reads "
                             f"{count} cross-attention block(s); pass --option qformer_block=<0..{count - 1}>")


def _answer(mllm: Any, images: list[Any], questions: list[str], template: str, max_new_tokens: int) -> list[str]:
    """Greedy answers of the untouched model, one batch."""
    answers = mllm.answer_batch(images, questions, template=template, batch_size=max(1, len(questions)),
                                max_new_tokens=max_new_tokens)
    return [a.text for a in answers]


def _layers_mean(values: list[np.ndarray], n_layers: int) -> list[float]:
    """Mean over samples of per-layer values [n_layers] (nan when there are none)."""
    if not values:
        return [float("nan")] * n_layers
    return [float(v) for v in np.mean(np.stack(values), axis=0)]


# ---------------------------------------------------------------------- attention-ratio
def measure_attention_ratio(
    mllm: Any,
    samples: Sequence[Sample],
    *,
    model_name: str = "",
    show_progress: bool = False,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    template: str = "chat",
    scorer: str = "auto",
    qformer_block: int = 2,
) -> Measurement:
    """Attention ratio per decoder layer (ground-truth box vs same-sized boxes elsewhere), split by
    correct / wrong answers (module docstring for the definition).

    ``numbers``: ``layers``; ``ratio`` {correct, wrong, all}: per-layer mean ratios; ``counts``
    {correct, wrong, all, skipped}: samples behind each line (skipped: no ratio, see
    ``skipped``); ``accuracy`` (percent, all answered samples); ``samples``: per sample its
    answer, verdict, relative size and per-layer ratios; ``summary``: the best layer (highest
    mean ratio over all samples) and its ratios.
    """
    _check_common(batch_size, max_new_tokens)
    _check_qformer_block(mllm.adapter, qformer_block)
    samples = check_samples(samples, "attention-ratio")
    boxes = require_boxes(samples, "attention-ratio")
    judge = choose_scorer(samples, scorer)
    n_layers = mllm.adapter.num_layers
    records: list[dict[str, Any]] = []
    with progress(len(samples), "attention ratio", show_progress) as advance:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            chunk_boxes = boxes[start:start + batch_size]
            images = [sample_image(s) for s in chunk]
            rendered = [render(s, judge) for s in chunk]
            questions = [q for q, _ in rendered]
            texts = _answer(mllm, images, questions, template, max_new_tokens)
            batch = mllm.prepare(images, questions, template=template)
            maps = layer_maps(mllm, batch, qformer_block)
            for sample, box, image, (_, scored), text, (layer_map, view) in zip(
                    chunk, chunk_boxes, images, rendered, texts, maps):
                ratios = attention_ratio(layer_map, view, box, image.size)  # [n_layers]
                reason = skip_reason(view, box, image.size)
                if reason is None and not np.all(np.isfinite(ratios)):
                    reason = "no attention on the reference boxes"
                records.append({"id": sample.get("id"), "answer": text, "correct": is_correct(judge, text, scored),
                                "relative_size": relative_size(box, image.size), "view": view.name,
                                "ratio": None if reason else [float(r) for r in ratios], "skipped": reason})
            advance(len(chunk))
    measured = [r for r in records if r["ratio"] is not None]
    groups = {"correct": [np.asarray(r["ratio"]) for r in measured if r["correct"]],
              "wrong": [np.asarray(r["ratio"]) for r in measured if not r["correct"]],
              "all": [np.asarray(r["ratio"]) for r in measured]}
    ratio = {k: _layers_mean(v, n_layers) for k, v in groups.items()}
    counts = {k: len(v) for k, v in groups.items()}
    counts["skipped"] = len(records) - len(measured)
    accuracy = 100.0 * sum(r["correct"] for r in records) / len(records)
    summary: dict[str, Any] = {"samples_with_ratio": counts["all"], "correct": counts["correct"],
                               "wrong": counts["wrong"], "accuracy": round(accuracy, 2)}
    if measured:
        best = int(np.argmax(ratio["all"]))
        summary.update({"best_layer": best, "best_ratio": round(ratio["all"][best], 4),
                        "best_ratio_correct": _rounded(ratio["correct"][best]),
                        "best_ratio_wrong": _rounded(ratio["wrong"][best])})
    numbers = {"layers": list(range(n_layers)), "ratio": ratio, "counts": counts, "accuracy": accuracy,
               "scorer": judge.key, "samples": records, "summary": summary,
               "skipped": [{"id": r["id"], "reason": r["skipped"]} for r in records if r["skipped"]]}
    figure = _ratio_figure(numbers, model_name or mllm.name, len(samples))
    return Measurement("attention-ratio", model_name or mllm.name, len(samples), numbers, figure,
                       settings={"scorer": judge.key, "max_new_tokens": max_new_tokens, "template": template,
                                 "batch_size": batch_size, "qformer_block": qformer_block})


def _rounded(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None


def _ratio_figure(numbers: Mapping[str, Any], model: str, n: int) -> Any:
    from ..viz import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    layers = numbers["layers"]
    for key, label, style in (("correct", "correct answers", "o-"), ("wrong", "wrong answers", "s-")):
        count = numbers["counts"][key]
        if count:
            ax.plot(layers, numbers["ratio"][key], style, label=f"{label} (n={count})", markersize=4)
        else:
            ax.plot([], [], style, label=f"{label} (none)")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="no preference (ratio 1)")
    ax.set_xlabel("decoder layer (0 = first)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("attention ratio (mean over samples)\nground-truth box / same-sized boxes")
    ax.set_title(figure_title("Attention on the ground-truth box per layer (ViCrop)", model, n), fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------- size-sensitivity
def context_box(box: Box, image_size: tuple[int, int], context: float = 2.0, min_side: float = 0.0) -> Box:
    """The ground-truth crop: a square of side ``max(context × max(box w, h), min_side)`` centred on
    ``box``, moved inside the image, then clipped to it (an axis shorter than the side is kept whole)."""
    width, height = (float(v) for v in image_size)
    side = max(context * max(box[2] - box[0], box[3] - box[1]), float(min_side))
    half = side / 2.0
    cx = min(max((box[0] + box[2]) / 2.0, half), width - half)
    cy = min(max((box[1] + box[3]) / 2.0, half), height - half)
    return (max(0.0, cx - half), max(0.0, cy - half), min(width, cx + half), min(height, cy + half))


def size_bins(sizes: Sequence[float], n_bins: int, binning: str = "quantile") -> tuple[np.ndarray, np.ndarray]:
    """(edges [n + 1], bin index of each size [N]); bins are ``[lo, hi)``, the last one ``[lo, hi]``.

    ``quantile``: edges at the quantiles of ``sizes`` (equal counts; repeated edges merge, so
    there may be fewer bins than asked); ``log``: equal steps of log10 size from the smallest to the
    largest. A single distinct size gives one bin.
    """
    values = np.asarray(sizes, dtype=np.float64)  # [N]
    if values.size == 0:
        raise UserInputError("no sizes to bin")
    if np.any(values <= 0) or not np.all(np.isfinite(values)):
        raise UserInputError("relative sizes must be positive and finite")
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        edges = np.array([lo, hi])
    elif binning == "quantile":
        edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, n_bins + 1)))
    elif binning == "log":
        edges = np.logspace(math.log10(lo), math.log10(hi), n_bins + 1)
        edges[0], edges[-1] = lo, hi  # exact ends despite rounding in logspace
    else:
        raise UserInputError(f"binning must be one of {', '.join(BINNINGS)}, not {binning!r}")
    index = np.searchsorted(edges[1:-1], values, side="right")  # [N] in 0 .. len(edges) - 2
    return edges, index


def measure_size_sensitivity(
    mllm: Any,
    samples: Sequence[Sample],
    *,
    model_name: str = "",
    show_progress: bool = False,
    n_bins: int = 3,
    binning: str = "quantile",
    context: float = 2.0,
    min_side: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    template: str = "chat",
    scorer: str = "auto",
) -> Measurement:
    """Accuracy by relative object size, on the image alone and with the ground-truth crop as a
    second image (module docstring for the bins and the crop).

    ``numbers``: ``bins`` (per bin: ``lo``, ``hi``, ``n``, ``median_size``, ``accuracy``,
    ``accuracy_crop``, percent), ``overall``, ``samples`` (per sample: relative size, bin, crop box,
    answers, verdicts), ``summary``.
    """
    _check_common(batch_size, max_new_tokens)
    if isinstance(n_bins, bool) or n_bins < 1:
        raise UserInputError(f"n_bins must be at least 1, got {n_bins}")
    if binning not in BINNINGS:
        raise UserInputError(f"binning must be one of {', '.join(BINNINGS)}, not {binning!r}")
    if not (math.isfinite(context) and context >= 1.0):
        raise UserInputError(f"context must be at least 1 (the crop holds the whole box), got {context}")
    if min_side < 0:
        raise UserInputError(f"min_side must be >= 0 pixels, got {min_side}")
    from ..look.boxes import crop, round_box

    samples = check_samples(samples, "size-sensitivity")
    boxes = require_boxes(samples, "size-sensitivity")
    judge = choose_scorer(samples, scorer)
    records: list[dict[str, Any]] = []
    with progress(2 * len(samples), "size sensitivity", show_progress) as advance:
        for chunk_index in batches(range(len(samples)), batch_size):
            chunk = [samples[i] for i in chunk_index]
            images = [sample_image(s) for s in chunk]
            rendered = [render(s, judge) for s in chunk]
            questions = [q for q, _ in rendered]
            sizes = [relative_size(boxes[i], im.size) for i, im in zip(chunk_index, images)]
            for sample, size in zip(chunk, sizes):
                if size <= 0:
                    raise UserInputError(f"sample {sample.get('id', '?')!r}: the box lies outside the image")
            crop_boxes = [round_box(context_box(boxes[i], im.size, context, min_side), im.size)
                          for i, im in zip(chunk_index, images)]
            plain = _answer(mllm, images, questions, template, max_new_tokens)
            advance(len(chunk))
            cropped = _answer(mllm, [[im, crop(im, cb)] for im, cb in zip(images, crop_boxes)], questions, template,
                              max_new_tokens)
            advance(len(chunk))
            for sample, size, cb, (_, scored), a, b in zip(chunk, sizes, crop_boxes, rendered, plain, cropped):
                records.append({"id": sample.get("id"), "relative_size": size, "crop_box": list(cb),
                                "answer": a, "answer_crop": b, "correct": is_correct(judge, a, scored),
                                "correct_crop": is_correct(judge, b, scored)})
    edges, index = size_bins([r["relative_size"] for r in records], n_bins, binning)
    bins = []
    for k in range(len(edges) - 1):
        members = [r for r, i in zip(records, index) if i == k]
        for r in members:
            r["bin"] = k
        bins.append({"lo": float(edges[k]), "hi": float(edges[k + 1]), "n": len(members),
                     "median_size": float(np.median([r["relative_size"] for r in members])) if members else None,
                     "accuracy": _percent(sum(r["correct"] for r in members), len(members)),
                     "accuracy_crop": _percent(sum(r["correct_crop"] for r in members), len(members))})
    overall = {"n": len(records), "accuracy": _percent(sum(r["correct"] for r in records), len(records)),
               "accuracy_crop": _percent(sum(r["correct_crop"] for r in records), len(records))}
    filled = [b for b in bins if b["n"]]
    summary = {"accuracy": round(overall["accuracy"], 2), "accuracy_crop": round(overall["accuracy_crop"], 2),
               "smallest_bin_accuracy": round(filled[0]["accuracy"], 2),
               "smallest_bin_accuracy_crop": round(filled[0]["accuracy_crop"], 2), "bins": len(bins)}
    numbers = {"bins": bins, "overall": overall, "scorer": judge.key, "samples": records, "summary": summary}
    figure = _size_figure(numbers, model_name or mllm.name, len(samples), context)
    return Measurement("size-sensitivity", model_name or mllm.name, len(samples), numbers, figure,
                       settings={"scorer": judge.key, "n_bins": n_bins, "binning": binning, "context": context,
                                 "min_side": min_side, "max_new_tokens": max_new_tokens, "template": template,
                                 "batch_size": batch_size})


def _percent(k: int, n: int) -> float:
    return 100.0 * k / n if n else float("nan")


def _size_figure(numbers: Mapping[str, Any], model: str, n: int, context: float) -> Any:
    from ..viz import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    filled = [b for b in numbers["bins"] if b["n"]]
    xs = [b["median_size"] for b in filled]
    ax.plot(xs, [b["accuracy"] for b in filled], "o-", label="image only")
    ax.plot(xs, [b["accuracy_crop"] for b in filled], "s--",
            label=f"image + ground-truth crop (square, {context:g}x the box)")
    for x, b in zip(xs, filled):
        ax.annotate(f"n={b['n']}", (x, max(b["accuracy"], b["accuracy_crop"])), textcoords="offset points",
                    xytext=(0, 8), fontsize=7, ha="center")
    ax.set_xscale("log")
    ax.set_ylim(-5, 110)
    ax.set_xlabel("relative object size (box area / image area, bin median)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(figure_title("Accuracy by object size, with and without a ground-truth crop (ViCrop)", model, n),
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


__all__ = ["BoxWindows", "attention_ratio", "box_windows", "context_box", "ground_truth_box", "layer_attention",
           "layer_maps", "measure_attention_ratio", "measure_size_sensitivity", "relative_size", "size_bins",
           "window_masses"]
