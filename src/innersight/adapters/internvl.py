"""InternVL 3 / 3.5 in transformers' native format (``InternVLForConditionalGeneration``, the
``OpenGVLab/InternVL3-*-hf`` and ``InternVL3_5-*-HF`` checkpoints; config ``model_type`` "internvl").

Per image (transformers 5.x source: ``image_processing_pil_got_ocr2.py``, ``processing_internvl.py``,
``modeling_internvl.py``):

1. Dynamic tiling (``crop_to_patches``, on by default in ``InternVLProcessor``): among the tile
   grids of ``cols x rows`` with ``min_patches <= cols * rows <= max_patches`` (ordered by tile
   count), the one whose aspect ratio ``cols / rows`` is closest to the image's ``W / H`` wins;
   on a tie the grid with more tiles wins while the image's area exceeds half the grid's pixel
   area (:func:`optimal_tile_grid`). The *whole* image is stretched (no crop, no padding) to
   ``cols * S x rows * S`` (``S`` the tower's input side, 448) and cut into ``cols * rows`` tiles,
   row-major. When there is more than one tile, a thumbnail (the whole image stretched to
   ``S x S``) is appended *after* them. Every tile and the thumbnail therefore covers a known
   box of the original image: tile ``(r, c)`` the box ``[c W / cols, (c+1) W / cols) x
   [r H / rows, (r+1) H / rows)``, the thumbnail all of it.
2. InternViT (a CLS token, then ``p x p`` patches, ``p = S / patch``; ``vision_feature_layer``,
   -1 = ``last_hidden_state``) runs on every tile; ``vision_feature_select_strategy="default"``
   drops the CLS. Pixel shuffle with ``downsample_ratio = 0.5`` folds every 2x2 block of patches
   into one feature (``p/2 x p/2`` per tile, row-major: token ``(i, j)`` of a tile holds patches
   rows ``2i, 2i+1``, columns ``2j, 2j+1``), and the MLP projector maps each to one LM token.
3. The processor replaces each image's ``<IMG_CONTEXT>`` placeholder by ``<img>``, then
   ``image_seq_length = (p/2)^2`` ``<IMG_CONTEXT>`` tokens per tile (tiles in order, thumbnail
   last), then ``</img>``. So an image has ``T * (p/2)^2`` image tokens, ``T = cols * rows (+1)``.

Views (:class:`~innersight.adapters.base.ImageLayout` wants the global view first, whatever the
token order): ``views[0]`` is the thumbnail ("base", its tokens are the *last* ``(p/2)^2`` of the
image) or, for a one-tile image, that single tile; a multi-tile image adds one "tiles" view that
stitches the tiles into one ``rows * p/2 x cols * p/2`` grid over the whole image (its
``token_index`` jumps from tile to tile), like LLaVA-NeXT's high-resolution view. A stitched grid
rather than one view per tile: maps are drawn on the finest token grid of an image
(``look.maps.map_view``), and the stitched grid is that grid; a tile's view would be a window of it.

Text model: Qwen2 (InternVL 3) or Qwen3 (InternVL 3.5), plain 1D RoPE, so left padding and the
base class's positions hold. transformers 5.17 and 5.25 differ only in ways handled here: the
processor's default ``crop_to_patches=True`` lives in ``InternVLProcessorKwargs._defaults`` on
5.17 and in the class attribute ``images_kwargs`` on 5.25 (read through ``_merge_kwargs``, whose
``(ModelProcessorKwargs, tokenizer_init_kwargs)`` call form both accept); the model's cache argument
is ``past_key_values`` on 5.17 and ``cache`` on 5.25 (``generation_calls`` handles both).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from ..errors import MethodError, UnsupportedModelError
from .base import Adapter, Batch
from .geometry import GridView, row_major_index

if TYPE_CHECKING:  # pragma: no cover
    import torch


IMAGE_PLACEHOLDER = "<IMG_CONTEXT>\n"

#: the InternVL -hf chat format (no default system turn; InternVL 3's original remote-code
#: ``chat()`` added a Chinese system turn, the -hf template and InternVL 3.5 do not), written out
#: literally so that ``reference`` does not depend on a checkpoint's template
INTERNVL_REFERENCE_TEMPLATE = "<|im_start|>user\n{images}{question}<|im_end|>\n<|im_start|>assistant\n"

#: keyword arguments of ``from_pretrained`` that only say where the files are
_LOCATION_KWARGS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")


@functools.cache
def image_text_processor() -> type:
    """A subclass of transformers' ``InternVLProcessor`` made of an image processor and a tokenizer.

    The stock class requires a video processor, which transformers only defines with torchvision
    installed. ``ProcessorMixin`` takes its sub-processors from the parameters of the subclass's
    ``__init__``; this one has no ``video_processor`` parameter, so the parent's ``None`` for it is
    dropped and images, prompts and chat templates work exactly as in the parent (videos do not).
    Saving it records the parent's class name, so the folder loads with ``AutoProcessor`` where
    torchvision is installed, and with :meth:`InternVLAdapter.load_processor` everywhere.
    """
    from transformers import InternVLProcessor

    def __init__(self: Any, image_processor: Any = None, tokenizer: Any = None, image_seq_length: int = 256,
                 chat_template: Any = None, **kwargs: Any) -> None:
        InternVLProcessor.__init__(self, image_processor, tokenizer, None, image_seq_length=image_seq_length,
                                   chat_template=chat_template, **kwargs)

    def to_dict(self: Any) -> dict[str, Any]:
        out = InternVLProcessor.to_dict(self)
        out["processor_class"] = "InternVLProcessor"
        return out

    name = "InternVLImageTextProcessor"
    cls = type(name, (InternVLProcessor,), {"__init__": __init__, "to_dict": to_dict, "__module__": __name__,
                                            "__qualname__": name,
                                            "__doc__": "InternVLProcessor without a video processor."})
    globals()[name] = cls  # importable by name (pickling)
    return cls


def tile_arrangements(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """Every ``(cols, rows)`` with ``min_tiles <= cols * rows <= max_tiles``, enumerated column
    count first and then stably sorted by tile count (the processor's candidate order)."""
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
             if min_tiles <= c * r <= max_tiles]
    return sorted(grids, key=lambda g: g[0] * g[1])


def optimal_tile_grid(width: int, height: int, tile_w: int, tile_h: int, min_tiles: int,
                      max_tiles: int) -> tuple[int, int]:
    """``(cols, rows)`` of the tile grid ``crop_to_patches`` picks for a ``width x height`` image.

    The closest aspect ratio wins; on an exact tie a later (larger) grid replaces the current one
    while the image's area exceeds half of the grid's pixel area (so 90x60 with 32 px tiles and up
    to 4 tiles: 1x1 and 2x1 both miss 1.5 by 0.5, and so does 2x2, which wins).
    """
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in tile_arrangements(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_w * tile_h * cols * rows:
            best = (cols, rows)
    return best


def _field(size: Any, key: str) -> Any:
    """``size[key]`` for a dict, ``size.key`` for a transformers ``SizeDict``."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


class InternVLAdapter(Adapter):
    """Adapter of InternVL 3 / 3.5 -hf checkpoints (``OpenGVLab/InternVL3-1B-hf`` ...)."""

    family = "internvl"
    architectures = ("InternVLForConditionalGeneration",)
    reference_template = INTERNVL_REFERENCE_TEMPLATE

    def __init__(self, model: Any, processor: Any):
        super().__init__(model, processor)
        strategy = getattr(self.config, "vision_feature_select_strategy", "default")
        if strategy != "default":
            raise UnsupportedModelError(
                f"internvl: vision_feature_select_strategy {strategy!r} keeps the CLS token, which the model's "
                "pixel shuffle cannot fold into its square grid; only 'default' checkpoints run")

    # ------------------------------------------------------------------ loading
    @classmethod
    def rebuild_processor(cls, path: str, **kwargs: Any) -> Any:
        """The processor built from a checkpoint's parts, without torchvision: the image processor
        (``preprocessor_config.json`` or the ``image_processor`` entry of ``processor_config.json``)
        into the PIL backend ``GotOcr2ImageProcessorPil``, the tokenizer, ``image_seq_length`` from
        ``processor_config.json`` and the chat template."""
        from transformers import AutoTokenizer, GotOcr2ImageProcessorPil

        location = {k: v for k, v in kwargs.items() if k in _LOCATION_KWARGS}
        processor_cls = image_text_processor()
        processor_dict, _ = processor_cls.get_processor_dict(path, **location)
        image_dict = processor_dict.get("image_processor")
        if isinstance(image_dict, dict):
            image_processor = GotOcr2ImageProcessorPil(**{k: v for k, v in image_dict.items()
                                                          if k not in ("image_processor_type", "processor_class")})
        else:
            image_processor = GotOcr2ImageProcessorPil.from_pretrained(path, **location)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        chat_template = processor_dict.get("chat_template") or getattr(tokenizer, "chat_template", None)
        extra = {"image_seq_length": int(processor_dict["image_seq_length"])} if "image_seq_length" in processor_dict else {}
        return processor_cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **extra)

    # ------------------------------------------------------------------ modules and sizes
    # language_model, vision_tower (InternViT: a CLS token then the patches of one tile) and
    # projector (LayerNorm + MLP over the pixel-shuffled features): the base's accessors

    @property
    def vision_layers(self) -> Any:
        """InternViT's layers: ``vision_tower.encoder.layer`` (singular, as in BEiT)."""
        return self.vision_tower.encoder.layer

    @property
    def tile_size(self) -> tuple[int, int]:
        """(height, width) in pixels of one tile as the vision tower sees it (448 x 448)."""
        size = self.config.vision_config.image_size
        return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of vision patches per tile (32 x 32 for 448 px / 14 px)."""
        patch = self.config.vision_config.patch_size
        ph, pw = (int(patch[0]), int(patch[1])) if isinstance(patch, (list, tuple)) else (int(patch), int(patch))
        th, tw = self.tile_size
        return th // ph, tw // pw

    @property
    def merge_size(self) -> int:
        """Side of the block of patches pixel shuffle folds into one token (1 / downsample_ratio = 2)."""
        return int(round(1 / float(self.config.downsample_ratio)))

    @property
    def tile_token_grid(self) -> tuple[int, int]:
        """(rows, cols) of language-model tokens per tile (16 x 16 for InternVL3). Not the base
        class's :meth:`~innersight.adapters.base.Adapter.token_grid` (where an image's tokens
        land on a map), which this family leaves to the base: each token is one grid cell."""
        rows, cols = self.patch_grid
        return rows // self.merge_size, cols // self.merge_size

    @property
    def tokens_per_tile(self) -> int:
        rows, cols = self.tile_token_grid
        return rows * cols

    @property
    def crop_base_size(self) -> int:
        """ViCrop's base crop side: the tower's tile side."""
        return self.tile_size[1]

    # ------------------------------------------------------------------ prompts
    def image_placeholder(self, num_images: int) -> str:
        """``<IMG_CONTEXT>\\n`` per image, as the -hf chat template writes it (the processor
        expands each to ``<img>``, the image's tokens and ``</img>``)."""
        return IMAGE_PLACEHOLDER * num_images

    # ------------------------------------------------------------------ tiling
    def tiling_settings(self) -> dict[str, Any]:
        """``crop_to_patches``, ``min_patches``, ``max_patches`` and the tile ``size`` the processor
        uses when called without image arguments: its merged defaults (the processor's own
        ``crop_to_patches=True`` wins over the image processor's ``False``), then the image
        processor's attributes."""
        proc, ip = self.processor, self.processor.image_processor
        merged = proc._merge_kwargs(proc.valid_processor_kwargs,
                                    tokenizer_init_kwargs=getattr(self.tokenizer, "init_kwargs", {}))["images_kwargs"]
        out = {key: merged.get(key, getattr(ip, key, None))
               for key in ("crop_to_patches", "min_patches", "max_patches", "size")}
        if out["size"] is None:
            height, width = self.tile_size
            out["size"] = {"height": height, "width": width}
        return out

    def tile_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """(cols, rows) of the tile grid for an image of original ``size = (width, height)``;
        ``(1, 1)`` when the processor does not tile."""
        settings = self.tiling_settings()
        if not settings["crop_to_patches"] or int(settings["max_patches"]) <= 1:
            return 1, 1
        tile_h, tile_w = int(_field(settings["size"], "height")), int(_field(settings["size"], "width"))
        return optimal_tile_grid(int(size[0]), int(size[1]), tile_w, tile_h, int(settings["min_patches"]),
                                 int(settings["max_patches"]))

    def num_tiles(self, size: tuple[int, int]) -> int:
        """Tiles the vision tower runs for an image of ``size``: the grid, plus a thumbnail when
        the grid has more than one tile."""
        cols, rows = self.tile_grid(size)
        return cols * rows + (1 if cols * rows > 1 else 0)

    # ------------------------------------------------------------------ contract
    def num_image_tokens(self, batch: Batch, image_index: int, size: tuple[int, int]) -> int:
        return self.num_tiles(size) * self.tokens_per_tile

    def views(self, batch: Batch, image_index: int, size: tuple[int, int]) -> tuple[GridView, ...]:
        """``(base,)`` for a one-tile image; ``(base, tiles)`` otherwise, ``base`` the thumbnail
        (the last tile in token order) and ``tiles`` the tiles stitched into one grid."""
        q_rows, q_cols = self.tile_token_grid
        per_tile = q_rows * q_cols
        cols, rows = self.tile_grid(size)
        whole = (0.0, 0.0, float(size[0]), float(size[1]))
        tiles = cols * rows
        if tiles == 1:
            return (GridView("base", q_rows, q_cols, whole, row_major_index(q_rows, q_cols)),)
        base = GridView("base", q_rows, q_cols, whole, row_major_index(q_rows, q_cols, start=tiles * per_tile))
        index = tuple(
            tuple((r // q_rows * cols + c // q_cols) * per_tile + (r % q_rows) * q_cols + c % q_cols
                  for c in range(cols * q_cols))
            for r in range(rows * q_rows)
        )
        return (base, GridView("tiles", rows * q_rows, cols * q_cols, whole, index))

    def tile_offset(self, batch: Batch, image_index: int) -> int:
        """Row of ``pixel_values`` ([N_tiles, 3, S, S], images in batch order) where image
        ``image_index`` (flat over the batch) starts."""
        flat = [size for sizes in batch.image_sizes for size in sizes]
        return sum(self.num_tiles(size) for size in flat[:image_index])

    def pixel_view(self, batch: Batch, tensor: torch.Tensor, sample: int) -> tuple[torch.Tensor, GridView]:
        """The [3, S, S] pixels (or gradients) of sample ``sample``'s first image's global tile (the
        thumbnail, the last of its tiles, or its only tile) and ``views[0]``, which that tile covers."""
        image_index = sum(len(sizes) for sizes in batch.image_sizes[:sample])
        return tensor[self.global_tile_row(batch, image_index)], batch.layouts[sample][0].views[0]

    def tile_rows(self, batch: Batch, image_index: int) -> slice:
        """Rows of ``pixel_values`` (and of the vision tower's batch) holding image
        ``image_index`` (flat over the batch): its tiles, row-major, then its thumbnail.

        Raises:
            MethodError: the pixels' rows are not the batch's tile count.
        """
        flat = [size for sizes in batch.image_sizes for size in sizes]
        total = sum(self.num_tiles(size) for size in flat)
        rows = int(batch.inputs["pixel_values"].shape[0])
        if rows != total:
            raise MethodError(f"{self.family}: pixel_values hold {rows} tiles but the batch's images have {total}")
        start = self.tile_offset(batch, image_index)
        return slice(start, start + self.num_tiles(flat[image_index]))

    def global_tile_row(self, batch: Batch, image_index: int) -> int:
        """Row of image ``image_index``'s global tile (``views[0]``): its thumbnail, the last of
        its tiles, or its only tile."""
        flat = [size for sizes in batch.image_sizes for size in sizes]
        return self.tile_offset(batch, image_index) + self.num_tiles(flat[image_index]) - 1

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        settings = self.tiling_settings()
        out.update(tile_size=self.tile_size, tokens_per_tile=self.tokens_per_tile,
                   crop_to_patches=bool(settings["crop_to_patches"]),
                   max_patches=int(settings["max_patches"]))
        return out

    # ------------------------------------------------------------------ text and map facet
    # The text-only path is the whole model (without pixel_values InternVLModel embeds the ids and
    # runs the decoder) and each image token is one cell of a grid: the base class's answers.

    @property
    def prefix_image_inputs(self) -> tuple[str, ...]:
        """Plain 1D positions and InternViT features that do not read the prompt: a common prefix
        may be encoded once. The images travel in ``pixel_values``, several rows (tiles) per
        image, which :meth:`sample_image_inputs` counts."""
        return ("pixel_values",)

    def sample_image_inputs(self, batch: Batch, n: int) -> dict[str, Any]:
        """``pixel_values`` of the first ``n`` samples: every tile of their images, which lead
        the tile rows (images in batch order)."""
        images = sum(len(sizes) for sizes in batch.image_sizes[:n])
        return {"pixel_values": batch.inputs["pixel_values"][: self.tile_offset(batch, images)]}

    def split_image_inputs(self, batch: Batch, first: int, samples: range | None = None) -> None:
        """None: not implemented for tile rows (the answer-prefix reuse runs the whole prompt)."""
        return None

    # ------------------------------------------------------------------ vision facet
    # InternViT runs every tile of every image as one sequence ``[N_tiles, 1 + p*p, Dv]`` (CLS
    # first); its attention is a layer's ``attention`` (q_proj / k_proj / v_proj, with q_norm /
    # k_norm over the full width when ``use_qk_norm``). DAMRO scores each image on its global tile
    # (the thumbnail, last of its tiles; cf. LLaVA-NeXT's base tile) with the CLS row, as in the
    # paper; the candidates are that tile's q*q language-model tokens (2x2 pixel shuffle of the
    # patches), gathered from the projector's output ``[N_tiles, q*q, D]`` (no prefix, no separator
    # tokens), so per-patch scores are pooled (mean) over each token's 2x2 patches.

    @property
    def vision_has_cls(self) -> bool:
        """InternViT prepends a learned ``cls_token`` (``embeddings.cls_token``, not CLIP's
        ``class_embedding``); ``vision_feature_select_strategy="default"`` drops it before the
        pixel shuffle, so it ranks the patches but never reaches the language model."""
        return True

    def vision_attention(self, layer: int) -> Any:
        """An InternViT layer's self-attention is its ``attention`` (``InternVLVisionAttention``)."""
        layers = self.vision_layers
        if not 0 <= int(layer) < len(layers):
            raise MethodError(f"{self.family}: vision layer {layer} outside 0..{len(layers) - 1}")
        return layers[int(layer)].attention

    def vision_query_key(self, module: Any, hidden: torch.Tensor,
                         call_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``q_proj`` / ``k_proj`` of ``hidden`` ``[N, L, Dv]``, then ``q_norm`` / ``k_norm``
        (RMSNorm over the full width, before the head split; identities unless ``use_qk_norm``,
        InternViT-6B), split into ``[N, H, L, d]``."""
        heads = int(module.num_heads)
        n, length, _ = hidden.shape
        q = module.q_norm(module.q_proj(hidden)).view(n, length, heads, -1).transpose(1, 2)  # [N, H, L, d]
        k = module.k_norm(module.k_proj(hidden)).view(n, length, heads, -1).transpose(1, 2)  # [N, H, L, d]
        return q, k

    def scored_vision_rows(self, batch: Batch, rows: int) -> torch.Tensor:
        """Each image's global tile among the ``rows`` tiles the tower ran: its last one."""
        import torch

        flat = [size for sizes in batch.image_sizes for size in sizes]
        total = sum(self.num_tiles(size) for size in flat)
        if rows != total:
            raise MethodError(f"{self.family}: the vision tower ran {rows} tiles but the batch's images have {total}")
        return torch.tensor([self.global_tile_row(batch, i) for i in range(len(flat))], dtype=torch.long)

    def pool_vision_scores(self, batch: Batch, image_index: int, scores: torch.Tensor) -> torch.Tensor:
        """Per-patch scores ``[p*p]`` (row-major over the tile's patches) -> the mean over the
        2x2 patches of each language-model token ``[q*q]``: patch ``(r, c)`` folds into token
        ``(r // 2) * q + c // 2`` (the model's pixel shuffle)."""
        m = self.merge_size
        q_rows, q_cols = self.tile_token_grid
        if scores.numel() != q_rows * m * q_cols * m:
            raise MethodError(f"{self.family}: {scores.numel()} patch scores for a tile of "
                              f"{q_rows * m} x {q_cols * m} patches")
        return scores.reshape(q_rows, m, q_cols, m).mean(dim=(1, 3)).flatten()  # [q*q]

    @property
    def vision_subset_source(self) -> Any:
        """The projector: its output ``[N_tiles, q*q, D]`` holds every tile's language-model tokens."""
        return self.projector

    def image_features(self, batch: Batch, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Per image, its tiles' language-model tokens in prompt order (tiles row-major, the
        thumbnail last): ``[T_i * q*q, D]`` from ``get_image_features``' ``[N_tiles, q*q, D]``."""
        out = self.model.get_image_features(pixel_values, return_dict=True).pooler_output  # [N_tiles, q*q, D]
        flat = [size for sizes in batch.image_sizes for size in sizes]
        total = sum(self.num_tiles(size) for size in flat)
        if int(out.shape[0]) != total:
            raise MethodError(f"{self.family}: {out.shape[0]} tiles of image features but the batch's images have {total}")
        feats, start = [], 0
        for size in flat:
            stop = start + self.num_tiles(size)
            feats.append(out[start:stop].reshape(-1, out.shape[-1]))  # [T_i * q*q, D]
            start = stop
        return feats

    def vision_input_index(self, batch: Batch, image_index: int) -> slice:
        """The image's tile rows of ``pixel_values`` ``[N_tiles, 3, S, S]`` (:meth:`tile_rows`)."""
        return self.tile_rows(batch, image_index)
