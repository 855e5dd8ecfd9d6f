"""Stage 1 of micro-model training: teach the vision tower to see objects before the LLM reads.

LLaVA starts from a CLIP encoder that already recognises things; the micro model's encoder
starts random. Trained only through the answer tokens, the two halves wait on each other (the
decoder cannot learn *where* to look before the encoder says *what* is there, and the encoder
gets no useful gradient before the decoder looks), and in a first 3000-step CPU run reading
stayed at chance. This stage breaks the loop with direct supervision of the encoder alone:

* **per object**: the final-layer tokens of the cells an object covers (:func:`cell_objects`)
  are mean-pooled and three linear heads classify its colour, kind and symbol;
* **per cell**: a linear head classifies each token's colour, with a background class, so the
  encoder also learns where nothing is.

Images are whole canvases and, on alternate steps, crops (so objects are seen at every zoom the
model meets, including ViCrop's). Stage 1 draws its crops with :data:`CROP_MIX` — mostly on a
question's target, never deliberately on another object — whatever stage 2's world uses: stage 1
only has to see objects, stage 2 also has to learn to see past a crop that shows the wrong one. The heads are thrown away afterwards; the encoder (and only
the encoder) moves on to stage 2 (:mod:`innersight.demo.train`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .world import COLOURS, GLYPH_KINDS, SHAPES, SYMBOLS, Sample, cell_objects, image_regions

if TYPE_CHECKING:  # pragma: no cover
    import torch

OBJ_COLOURS: tuple[str, ...] = tuple(COLOURS)
OBJ_KINDS: tuple[str, ...] = (*SHAPES, *GLYPH_KINDS)
OBJ_SYMBOLS: tuple[str, ...] = SYMBOLS
#: per-cell colour classes (index 0: background)
CELL_COLOURS: tuple[str, ...] = ("none", *COLOURS)
#: loss weights of the colour, kind and symbol heads (symbols are the slowest to learn)
HEAD_WEIGHTS: tuple[float, float, float] = (0.5, 1.0, 2.0)
#: crop settings of stage 1's world (see the module docstring)
CROP_MIX: dict[str, float] = {"crop_target_prob": 0.7, "crop_distractor_prob": 0.0}
#: linear warm-up steps of stage 1's learning rate (then cosine decay, see train.warmup_cosine)
WARMUP_STEPS = 100


@dataclass(frozen=True)
class ObjectTargets:
    """Which tokens each object covers and what it is.

    ``image``: [K] image index of object k; ``cells``: [K, T] float mask of its tokens (rows sum
    to >= 1); ``labels``: [K, 3] colour / kind / symbol class (symbol -100 when it has none);
    ``size``: [K] size-class index (for the log); ``cell_colour``: [N_images, T] per-token colour
    class (0 = background).
    """

    image: torch.Tensor
    cells: torch.Tensor
    labels: torch.Tensor
    size: torch.Tensor
    cell_colour: torch.Tensor


def object_targets(samples: Sequence[Sample], grid: int) -> ObjectTargets:
    """Targets for the images of ``samples`` in model order (first image = whole canvas, a
    second one = ``meta['crop_box']``)."""
    import torch

    from .world import SIZE_CLASSES

    image_idx: list[int] = []
    cells: list[np.ndarray] = []
    labels: list[tuple[int, int, int]] = []
    sizes: list[int] = []
    cell_colour: list[list[int]] = []
    n = 0
    for s in samples:
        scene = s.meta["scene"]
        for region in image_regions(s):
            owners = cell_objects(scene, region, grid)
            cell_colour.append([0 if o is None else CELL_COLOURS.index(o.colour) for o in owners])
            for obj in scene.objects:
                mask = np.array([o is obj for o in owners], dtype=np.float32)  # [T]
                if not mask.any():
                    continue
                image_idx.append(n)
                cells.append(mask)
                symbol = OBJ_SYMBOLS.index(obj.symbol) if obj.symbol is not None else -100
                labels.append((OBJ_COLOURS.index(obj.colour), OBJ_KINDS.index(obj.kind), symbol))
                sizes.append(SIZE_CLASSES.index(obj.size_class))
            n += 1
    return ObjectTargets(
        image=torch.tensor(image_idx, dtype=torch.long),  # [K]
        cells=torch.from_numpy(np.stack(cells)) if cells else torch.zeros((0, grid * grid)),  # [K, T]
        labels=torch.tensor(labels, dtype=torch.long).reshape(-1, 3),  # [K, 3]
        size=torch.tensor(sizes, dtype=torch.long),  # [K]
        cell_colour=torch.tensor(cell_colour, dtype=torch.long),  # [N_images, T]
    )


def make_heads(hidden: int) -> torch.nn.ModuleDict:
    """Linear heads on the encoder's tokens (training only)."""
    import torch

    return torch.nn.ModuleDict({
        "colour": torch.nn.Linear(hidden, len(OBJ_COLOURS)),
        "kind": torch.nn.Linear(hidden, len(OBJ_KINDS)),
        "symbol": torch.nn.Linear(hidden, len(OBJ_SYMBOLS)),
        "cell": torch.nn.Linear(hidden, len(CELL_COLOURS)),
    })


def encoder_tokens(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """The patch tokens the projector reads (``vision_feature_layer`` -1, no [CLS]):
    [N_images, T, H]."""
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def object_logits(heads: Any, tokens: torch.Tensor, targets: ObjectTargets) -> list[torch.Tensor]:
    """Colour, kind and symbol logits per object from its mean-pooled tokens: [K, C] each."""
    cells = targets.cells.to(tokens.dtype)  # [K, T]
    pooled = (tokens[targets.image] * cells[..., None]).sum(1) / cells.sum(1, keepdim=True)  # [K, H]
    return [heads["colour"](pooled), heads["kind"](pooled), heads["symbol"](pooled)]


def vision_loss(heads: Any, tokens: torch.Tensor, targets: ObjectTargets) -> torch.Tensor:
    """Weighted object losses plus the per-cell colour loss."""
    import torch.nn.functional as F

    loss = tokens.new_zeros(())
    for k, (logits, weight) in enumerate(zip(object_logits(heads, tokens, targets), HEAD_WEIGHTS, strict=True)):
        target = targets.labels[:, k]
        if (target != -100).any():
            loss = loss + weight * F.cross_entropy(logits.float(), target, ignore_index=-100)
    cell = heads["cell"](tokens)  # [N, T, C]
    return loss + 0.5 * F.cross_entropy(cell.reshape(-1, cell.shape[-1]).float(), targets.cell_colour.reshape(-1))


def object_accuracy(heads: Any, tokens: torch.Tensor, targets: ObjectTargets) -> dict[str, float]:
    """Per head and size class: accuracy of the object classifications (for the log)."""
    from .world import SIZE_CLASSES

    out: dict[str, float] = {}
    for name, logits, k in zip(("colour", "kind", "symbol"), object_logits(heads, tokens, targets), range(3), strict=True):
        pred = logits.argmax(-1)
        target = targets.labels[:, k]
        for c, size in enumerate(SIZE_CLASSES):
            on = (target != -100) & (targets.size == c)
            if on.any():
                out[f"{name}/{size}"] = float((pred[on] == target[on]).float().mean())
    return out
