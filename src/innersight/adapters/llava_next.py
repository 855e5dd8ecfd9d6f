"""LLaVA-NeXT / LLaVA-1.6 (``LlavaNextForConditionalGeneration``, llava-hf checkpoints).

"Any resolution": the processor picks the best of ``image_grid_pinpoints`` for the image
(:func:`transformers.image_processing_utils.select_best_resolution`), resizes the image to fit it
keeping the aspect ratio, pads it (centred, zeros) to that resolution and cuts it into tiles of the
vision tower's input size; the whole image, stretched to one tile, is the base view. Every tile
goes through CLIP (penultimate layer, CLS dropped) and the projector.

The language model receives, per image (``pack_image_features`` in modeling_llava_next.py):

1. the base view's ``p x p`` features, row-major (``p = image_size // patch_size``);
2. the tiles' features stitched into one ``(tiles_h * p) x (tiles_w * p)`` grid, *unpadded*
   (whole rows or columns made mostly of padding removed symmetrically, judged from the original
   aspect ratio), row-major with one learned ``image_newline`` token after every row.

So an image has ``p*p + rows*(cols + 1)`` tokens, where ``rows x cols`` is the unpadded grid: the
count depends on the image size. The arithmetic here mirrors transformers exactly (including its
rounding) so that layouts agree with the processor's placeholder expansion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import UnsupportedModelError
from .base import Adapter, Batch
from .geometry import Box, GridView, processed_region, row_major_index
from .llava import LlavaModules


@dataclass(frozen=True)
class AnyresLayout:
    """The token arithmetic of one image of original ``(width, height)`` in LLaVA-NeXT.

    ``base_extra`` tokens (a kept CLS) precede the ``base_side x base_side`` base grid; the
    high-resolution grid has ``rows x cols`` feature cells after unpadding, each row followed by a
    newline token. Regions are in original-image pixels.
    """

    size: tuple[int, int]
    base_side: int
    base_extra: int
    best_resolution: tuple[int, int]  # (height, width) chosen among the grid pinpoints
    rows: int
    cols: int
    base_region: Box
    highres_region: Box

    @property
    def base_tokens(self) -> int:
        return self.base_extra + self.base_side * self.base_side

    @property
    def highres_tokens(self) -> int:
        """Unpadded feature cells plus one newline token per row."""
        return self.rows * (self.cols + 1)

    @property
    def num_tokens(self) -> int:
        return self.base_tokens + self.highres_tokens


def patch_output_size(width: int, height: int, target_h: int, target_w: int) -> tuple[int, int]:
    """(height, width) the image is resized to before padding to ``(target_h, target_w)``.

    Same arithmetic as ``transformers.image_processing_utils.get_patch_output_size``: the side
    with the smaller scale fills the target, the other is ``ceil``-ed and clipped.
    """
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def unpadded_grid(width: int, height: int, grid_h: int, grid_w: int) -> tuple[int, int, int, int]:
    """``(row0, rows, col0, cols)``: the part of a ``grid_h x grid_w`` feature grid that
    ``unpad_image`` (modeling_llava_next.py) keeps for an original image of ``width x height``."""
    if width / height > grid_w / grid_h:
        new_h = int(round(height * (grid_w / width), 7))
        pad = (grid_h - new_h) // 2
        return pad, grid_h - 2 * pad, 0, grid_w
    new_w = int(round(width * (grid_h / height), 7))
    pad = (grid_w - new_w) // 2
    return 0, grid_h, pad, grid_w - 2 * pad


def _field(size: Any, key: str) -> Any:
    """``size[key]`` for a dict, ``size.key`` for a transformers ``SizeDict``."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


class _SizesOnly:
    """A stand-in batch holding only ``image_sizes`` (:meth:`LlavaNextAdapter.tiles_per_image`)."""

    def __init__(self, image_sizes: Any):
        self.inputs = {"image_sizes": image_sizes}


class LlavaNextAdapter(LlavaModules, Adapter):
    """Modules and llava-hf's prompt template as LLaVA-1.5 (the papers used the same template)."""

    family = "llava_next"
    architectures = ("LlavaNextForConditionalGeneration",)

    # ------------------------------------------------------------------ modules
    @property
    def image_newline(self) -> Any:
        """The learned embedding appended after every row of the high-resolution grid."""
        return self.model.model.image_newline

    # ------------------------------------------------------------------ geometry
    @property
    def tile_size(self) -> int:
        """Pixel side of one tile (and of the base view) as the vision tower sees it."""
        return int(self.config.vision_config.image_size)

    @property
    def patches_per_side(self) -> int:
        """Vision patches (= LM feature cells) along one side of a tile."""
        vc = self.config.vision_config
        return int(vc.image_size) // int(vc.patch_size)

    @property
    def grid_pinpoints(self) -> list[list[int]]:
        """Candidate (height, width) resolutions of the tiled canvas."""
        return [list(p) for p in self.config.image_grid_pinpoints]

    def _base_extra(self) -> int:
        """Tokens before the base grid: the processor's count beyond ``p*p`` (a kept CLS)."""
        extra = int(getattr(self.processor, "num_additional_image_tokens", 0) or 0)
        strategy = getattr(self.processor, "vision_feature_select_strategy", None) or getattr(
            self.config, "vision_feature_select_strategy", "default"
        )
        if strategy == "default":
            extra -= 1
        if extra < 0:
            raise UnsupportedModelError(
                "llava_next: the processor's num_additional_image_tokens / vision_feature_select_strategy "
                "make fewer placeholders than the base view has features; the checkpoint cannot run"
            )
        return extra

    def _base_region(self, width: int, height: int) -> Box:
        """Original-image box of the base view.

        The processor stretches the whole image to ``size`` (a square of ``shortest_edge`` when
        size is given that way), then applies its usual resize and centre crop.
        """
        ip = self.processor.image_processor
        size = ip.size
        h, w = _field(size, "height"), _field(size, "width")
        if not (h and w):
            h = w = _field(size, "shortest_edge")
        stretched = {
            "do_pad": False,  # LLaVA-NeXT's do_pad pads the tile count for batching, not to a square
            "do_resize": getattr(ip, "do_resize", True),
            "size": size,
            "do_center_crop": getattr(ip, "do_center_crop", False),
            "crop_size": getattr(ip, "crop_size", None),
        }
        x0, y0, x1, y1 = processed_region(int(w), int(h), stretched)
        sx, sy = width / int(w), height / int(h)
        return (x0 * sx, y0 * sy, x1 * sx, y1 * sy)

    def anyres_layout(self, size: tuple[int, int]) -> AnyresLayout:
        """Token counts, grid shapes and regions for an original image of ``size = (width, height)``."""
        from transformers.image_processing_utils import select_best_resolution

        width, height = int(size[0]), int(size[1])
        p, tile = self.patches_per_side, self.tile_size
        best_h, best_w = select_best_resolution((height, width), self.grid_pinpoints)
        grid_h, grid_w = best_h // tile * p, best_w // tile * p  # feature grid before unpadding
        row0, rows, col0, cols = unpadded_grid(width, height, grid_h, grid_w)
        # where the resized image sits on the padded canvas (best resolution, canvas pixels)
        new_h, new_w = patch_output_size(width, height, best_h, best_w)
        paste_x, paste_y = (best_w - new_w) // 2, (best_h - new_h) // 2
        cell_w, cell_h = best_w / grid_w, best_h / grid_h  # canvas pixels per feature cell
        to_x, to_y = width / new_w, height / new_h  # original pixels per canvas pixel
        region = (
            (col0 * cell_w - paste_x) * to_x,
            (row0 * cell_h - paste_y) * to_y,
            ((col0 + cols) * cell_w - paste_x) * to_x,
            ((row0 + rows) * cell_h - paste_y) * to_y,
        )
        return AnyresLayout(
            size=(width, height), base_side=p, base_extra=self._base_extra(),
            best_resolution=(best_h, best_w), rows=rows, cols=cols,
            base_region=self._base_region(width, height), highres_region=region,
        )

    # ------------------------------------------------------------------ contract
    def num_image_tokens(self, batch: Batch, image_index: int, size: tuple[int, int]) -> int:
        return self.anyres_layout(size).num_tokens

    def views(self, batch: Batch, image_index: int, size: tuple[int, int]) -> tuple[GridView, ...]:
        """``(base, highres)``; the high-resolution view's ``token_index`` skips the newlines."""
        lay = self.anyres_layout(size)
        p = lay.base_side
        base = GridView("base", p, p, lay.base_region, row_major_index(p, p, start=lay.base_extra))
        highres = GridView(
            "highres", lay.rows, lay.cols, lay.highres_region,
            row_major_index(lay.rows, lay.cols, start=lay.base_tokens, row_stride=lay.cols + 1),
        )
        return (base, highres)

    def pixel_view(self, batch: Batch, tensor: Any, sample: int) -> tuple[Any, GridView]:
        """``pixel_values`` is [N_images, max_tiles, 3, S, S]; tile 0 is the base view."""
        first = sum(len(sizes) for sizes in batch.image_sizes[:sample])
        return tensor[first, 0], batch.layouts[sample][0].views[0]

    def newline_token_indices(self, size: tuple[int, int]) -> list[int]:
        """Indices (within the image's tokens) of the row-end newline tokens."""
        lay = self.anyres_layout(size)
        return [lay.base_tokens + r * (lay.cols + 1) + lay.cols for r in range(lay.rows)]

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["image_grid_pinpoints"] = self.grid_pinpoints
        out["tile_size"] = self.tile_size
        return out

    # ------------------------------------------------------------------ vision facet
    # The vision tower runs every tile of every image (base view first); outliers are scored and
    # taken on the base view only, and a negative image made of them ends with one newline token.

    #: ``get_image_features`` needs each image's size to pack its tiles
    image_feature_inputs = ("image_sizes",)

    def tiles_per_image(self, batch: Batch) -> list[int]:
        """Tiles (base view included) the vision tower runs for each image of ``batch``, flat,
        as the model computes them (``image_size_to_num_patches``)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return [int(image_size_to_num_patches(image_size=size, grid_pinpoints=self.grid_pinpoints,
                                              patch_size=self.tile_size))
                for size in batch.inputs["image_sizes"]]

    def same_image_inputs(self, a: dict[str, Any], b: dict[str, Any]) -> bool:
        """As the base, except that ``pixel_values`` [N_images, max_tiles, 3, S, S] is padded with
        tiles to the batch's largest image and the model keeps only each image's own tiles (by
        ``image_sizes``): equal sizes and equal tiles up to the shorter padding are the same images."""
        import torch

        if set(a) != set(b) or "pixel_values" not in a or "image_sizes" not in a:
            return super().same_image_inputs(a, b)
        sizes_a, sizes_b = a["image_sizes"], b["image_sizes"]
        pa, pb = a["pixel_values"], b["pixel_values"]
        if sizes_a.shape != sizes_b.shape or not torch.equal(sizes_a.cpu(), sizes_b.cpu()):
            return False
        if pa.dim() != 5 or pb.dim() != 5 or pa.shape[0] != pb.shape[0] or pa.shape[2:] != pb.shape[2:]:
            return False
        needed = self.tiles_per_image(_SizesOnly(sizes_a))
        tiles = min(pa.shape[1], pb.shape[1])
        if any(n > tiles for n in needed):
            return False
        return all(torch.equal(pa[i, :n].cpu(), pb[i, :n].cpu()) for i, n in enumerate(needed))

    def scored_vision_rows(self, batch: Batch, rows: int) -> Any:
        """The base view of each image: the first of its tiles in the vision tower's batch."""
        import torch

        from ..errors import MethodError

        tiles = self.tiles_per_image(batch)
        if sum(tiles) != rows:
            raise MethodError(f"{self.family}: the vision tower ran {rows} tiles but the batch's images have {sum(tiles)}")
        return torch.tensor([0, *tiles[:-1]]).cumsum(0)  # [N_images]

    def encode_vision_subset(self, batch: Batch, tokens: Any) -> list[Any]:
        """The kept base-view tokens plus one ``image_newline`` token (``[k + 1, D]``), as a
        packed LLaVA-NeXT image ends its rows."""
        import torch

        out = []
        for chosen in tokens:  # [k, D]
            newline = self.image_newline.to(device=chosen.device, dtype=chosen.dtype)[None]  # [1, D]
            out.append(torch.cat([chosen, newline], dim=0))  # [k + 1, D]
        return out
