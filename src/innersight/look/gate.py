"""The crop gate of ViCrop: crop only when the importance map is sharp enough.

ViCrop always adds a crop, so a question about something large (or about the whole image) pays
for a second image and may lose accuracy to a crop that cuts its object. The gate reads the map's
own statistics: the **peak-to-mean ratio** of the (non-negative) importance map over its cells::

    sharpness = max_c m_c / mean_c m_c        (1: flat map; the number of cells: one hot cell)

and keeps the crop only when ``sharpness >= threshold``; otherwise the model answers from the
original image alone (no second image, the plain prompt). A small detail concentrates the map on
a few cells (high peak); a large object or a general question spreads it (low peak).

The threshold depends on the map's resolution (the ratio is bounded by the number of cells) and
on the model; ``ViCropConfig.gate = None`` (default) is the paper's behaviour (always crop). The
``vicrop-gated`` method uses 20, calibrated on the micro model's 8x8 rel-att maps (BENCHMARKS.md,
"ViCrop crop gate"); recalibrate it for another model with the same measurement.
"""

from __future__ import annotations

import numpy as np

#: the threshold of the ``vicrop-gated`` preset (micro model, 64-cell rel-att maps)
MICRO_THRESHOLD = 20.0


def sharpness(importance: np.ndarray) -> float:
    """Peak-to-mean ratio of a map [rows, cols] (negative values clipped to 0; 0 for an all-zero map)."""
    values = np.clip(np.asarray(importance, dtype=np.float64), 0.0, None).ravel()
    mean = float(values.mean()) if values.size else 0.0
    if mean <= 0.0 or not np.isfinite(mean):
        return 0.0
    return float(values.max() / mean)


def keeps_crop(importance: np.ndarray, threshold: float | None) -> bool:
    """Whether the gate keeps the crop (always, when ``threshold`` is None)."""
    return threshold is None or sharpness(importance) >= threshold
