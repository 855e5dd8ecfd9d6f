"""Pictures: importance maps over the original image, boxes, crops. Matplotlib, headless."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

Box = tuple[float, float, float, float]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the headless Agg backend (for the instruments' figures)."""
    return _pyplot()


def close(figure: Any) -> None:
    """Free a figure's memory once it is saved."""
    _pyplot().close(figure)


def map_to_image_grid(imap: np.ndarray, region: Box, size: tuple[int, int]) -> np.ndarray:
    """Resample a [rows, cols] map that spans ``region`` onto the image's pixel grid [H, W].

    Pixels outside the region get NaN (the model did not see them, e.g. llava-hf's centre crop).
    Nearest cell lookup keeps the map's tokens visible as tokens.
    """
    width, height = size
    rows, cols = imap.shape
    x0, y0, x1, y1 = region
    xs = (np.arange(width) + 0.5 - x0) / (x1 - x0) * cols  # [W] cell coordinate of each pixel
    ys = (np.arange(height) + 0.5 - y0) / (y1 - y0) * rows  # [H]
    ci, ri = np.floor(xs).astype(int), np.floor(ys).astype(int)
    inside = (ri[:, None] >= 0) & (ri[:, None] < rows) & (ci[None, :] >= 0) & (ci[None, :] < cols)
    out = imap[np.clip(ri, 0, rows - 1)[:, None], np.clip(ci, 0, cols - 1)[None, :]].astype(float)
    out[~inside] = np.nan
    return out


def normalise(values: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros_like(values)
    lo, hi = float(finite.min()), float(finite.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


#: colour scale of importance maps (perceptually uniform, readable in grey; no blue-red jet)
MAP_CMAP = "inferno"
MAP_LABEL = "importance (0 = map's min, 1 = its max)"
#: spotlight: brightness of the image where the map is at its minimum (1 where at its maximum)
SPOTLIGHT_FLOOR = 0.4


def _draw_boxes(ax: Any, region: Box, box: Box | None) -> None:
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = region
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="white", ls=":", lw=1))
    if box is not None:
        bx0, by0, bx1, by1 = box
        ax.add_patch(Rectangle((bx0, by0), bx1 - bx0, by1 - by0, fill=False, ec="white", lw=2.5))
        ax.add_patch(Rectangle((bx0, by0), bx1 - bx0, by1 - by0, fill=False, ec="black", lw=1))


def spotlight(image: Any, imap: np.ndarray, region: Box, floor: float = SPOTLIGHT_FLOOR) -> np.ndarray:
    """The image [H, W, 3] (uint8) darkened where the map is low: each pixel times
    ``floor + (1 - floor) * m`` with ``m`` the normalised map at that pixel (0 outside the region the
    model saw). Darkening keeps every pixel's hue, and where the map is at its maximum the pixels
    are the image's own."""
    pixels = np.asarray(image.convert("RGB"), dtype=float)  # [H, W, 3]
    grid = np.nan_to_num(normalise(map_to_image_grid(imap, region, image.size)), nan=0.0)  # [H, W]
    shown = pixels * (floor + (1.0 - floor) * grid)[..., None]  # [H, W, 3]
    return np.clip(np.rint(shown), 0, 255).astype(np.uint8)


def draw_map(ax: Any, image: Any, imap: np.ndarray, region: Box, *, box: Box | None = None,
             title: str = "", style: str = "spotlight", colorbar: bool = True) -> Any:
    """The map over the image, the region the model saw (dotted) and the chosen box (white).

    ``style="spotlight"`` keeps the image's own colours where the map is high and darkens it where
    the map is low (:func:`spotlight`; hue is kept everywhere), so questions about colours stay
    readable; its colour bar gives the brightness for each map value. ``style="heat"`` paints the
    map's cells in :data:`MAP_CMAP` over a grey copy of the image, with that colour scale
    (0 = the map's minimum, 1 = its maximum). The bar is drawn beside ``ax`` unless ``colorbar``
    is False. Returns the colour-mapped artist.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LinearSegmentedColormap, Normalize

    if style not in ("spotlight", "heat"):
        raise ValueError(f"style must be 'spotlight' or 'heat', not {style!r}")
    width, height = image.size
    if style == "heat":
        grey = np.asarray(image.convert("L"), dtype=float) / 255.0  # [H, W]
        ax.imshow(0.2 + 0.6 * grey, cmap="gray", vmin=0, vmax=1)  # muted, so the map's colours read
        grid = normalise(map_to_image_grid(imap, region, image.size))  # [H, W], NaN outside region
        artist = ax.imshow(np.ma.masked_invalid(grid), cmap=MAP_CMAP, alpha=0.65, vmin=0, vmax=1)
        label = MAP_LABEL
    else:
        ax.imshow(spotlight(image, imap, region))
        dim = LinearSegmentedColormap.from_list("spotlight", [(SPOTLIGHT_FLOOR,) * 3, (1.0, 1.0, 1.0)])
        artist = ScalarMappable(norm=Normalize(0, 1), cmap=dim)
        label = "brightness: image dimmed where\nthe map is low (0 = min, 1 = max)"
    _draw_boxes(ax, region, box)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    if colorbar:
        bar = ax.figure.colorbar(artist, ax=ax, fraction=0.046, pad=0.02)
        bar.set_label(label, fontsize=8)
        bar.ax.tick_params(labelsize=7)
    return artist


def explain_figure(image: Any, imap: np.ndarray, region: Box, box: Box, crop: Any, *, question: str,
                   answers: Sequence[tuple[str, str]], method: str, model: str, path: str | Path) -> Path:
    """Four panels: the image in its own colours, dimmed where the map is low, with the chosen box;
    the map as a heat map; (both with their scale) the crop; the answers. Saved as PNG."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4), gridspec_kw={"width_ratios": [1.3, 1.3, 1, 1]})
    draw_map(axes[0], image, imap, region, box=box, title="own colours where the map is high; chosen box")
    draw_map(axes[1], image, imap, region, box=box, style="heat", title=f"{method} map")
    axes[2].imshow(crop)
    axes[2].set_title(f"crop {crop.size[0]}x{crop.size[1]} px (shown as a 2nd image)", fontsize=9)
    axes[2].axis("off")
    axes[3].axis("off")
    lines = [f"Q: {question}", ""] + [f"{name}:\n  {text}" for name, text in answers]
    axes[3].text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=10, wrap=True, family="monospace")
    fig.suptitle(f"innersight explain - {model}", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
