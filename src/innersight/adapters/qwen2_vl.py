"""Qwen2-VL (``Qwen2VLForConditionalGeneration``) and Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``).

Dynamic resolution, no tiles and no CLS token. Per image (transformers 5.x source,
``image_processing_pil_qwen2_vl.py`` and ``modeling_qwen2_vl.py`` / ``modeling_qwen2_5_vl.py``):

1. ``smart_resize`` stretches the *whole* image (no crop, no padding) to a height and a width
   that are multiples of ``patch_size * merge_size`` (28), each rounded to the nearest multiple,
   then scaled down or up as a whole if ``h * w`` falls outside ``[min_pixels, max_pixels]``.
   Both axes are stretched independently, so the token grid always covers exactly the original
   image and a cell of an ``R x C`` grid is ``W / C`` by ``H / R`` original pixels.
2. The processor cuts ``h / 14 x w / 14`` patches and reports ``image_grid_thw = [1, h/14, w/14]``.
   Patches are emitted merge-block by merge-block: blocks of ``merge x merge`` patches in
   row-major block order, the patches of one block consecutive (row-major inside the block).
   Qwen2-VL's vision-tower hidden states and attention maps are in this order; Qwen2.5-VL
   regroups the blocks into attention windows before its first vision block and only undoes
   that after the merger (:meth:`Qwen2VLAdapter.vision_patch_token_index` maps both).
3. The merger concatenates each block's patches after the *last* vision block (there is no
   layer choice: :attr:`Qwen2VLAdapter.vision_feature_layer` is -1) and projects them to one
   language-model token, so the image's ``<|image_pad|>`` tokens are the merged grid
   ``(h / 28) x (w / 28)`` in row-major order; M-RoPE gives them (row, column) positions in the
   same order (``get_rope_index``).

Left padding is safe: ``get_rope_index`` drops padded positions using the attention mask before
assigning M-RoPE positions, and decoding steps offset the mask's cumulative sum by the stored
``rope_deltas``. The model needs the processor's ``mm_token_type_ids`` in its inputs whenever
images are given (it raises otherwise); :meth:`Adapter.prepare` keeps every processor output.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from .base import NO_VISION_CLS, Adapter, Batch
from .geometry import GridView, row_major_index

if TYPE_CHECKING:  # pragma: no cover
    import torch


IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"

#: the official Qwen2-VL / Qwen2.5-VL chat format (default system turn, one user turn, generation
#: prompt) written out literally, so that ``reference`` does not depend on a checkpoint's template
QWEN_REFERENCE_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n{images}{question}<|im_end|>\n"
    "<|im_start|>assistant\n"
)

#: keyword arguments of ``from_pretrained`` that only say where the files are
_LOCATION_KWARGS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")


@functools.cache
def image_text_processor_class(base_name: str) -> type:
    """A subclass of transformers' ``base_name`` (``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor``)
    made of an image processor and a tokenizer only.

    The stock classes require a video processor: ``ProcessorMixin.__init__`` type-checks every
    argument of ``__init__`` against ``VideoProcessorMixin``, which transformers only defines with
    torchvision installed, so even ``video_processor=None`` fails there. A subclass whose
    ``__init__`` has no ``video_processor`` parameter has no video attribute at all; prompts,
    images and chat templates work exactly as in the parent, videos not at all (the parent skips
    them when ``video_processor`` is absent). Saving it records the parent's class name, so the
    saved folder loads with ``AutoProcessor`` where torchvision is installed, and with
    :meth:`Qwen2VLAdapter.load_processor` everywhere.
    """
    import transformers
    from transformers.processing_utils import ProcessorMixin

    base = getattr(transformers, base_name)
    name = f"{base_name.removesuffix('Processor')}ImageTextProcessor"

    def __init__(self: Any, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None) -> None:
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def to_dict(self: Any) -> dict[str, Any]:
        out = base.to_dict(self)
        out["processor_class"] = base_name
        return out

    cls = type(name, (base,), {"__init__": __init__, "to_dict": to_dict, "__module__": __name__,
                               "__qualname__": name,
                               "__doc__": f"{base_name} without a video processor (images and text only)."})
    globals()[name] = cls  # importable by name (pickling)
    return cls


class Qwen2VLAdapter(Adapter):
    """Adapter of Qwen2-VL checkpoints (``Qwen/Qwen2-VL-*``)."""

    family = "qwen2_vl"
    architectures = ("Qwen2VLForConditionalGeneration",)
    #: Qwen has no plain prompt format in the papers (ViCrop's reference code evaluates Qwen2.5-VL
    #: through its chat template), so ``reference`` is the official chat format, written out literally
    reference_template = QWEN_REFERENCE_TEMPLATE
    #: the transformers processor class of this family
    processor_class_name: ClassVar[str] = "Qwen2VLProcessor"

    # ------------------------------------------------------------------ loading
    @classmethod
    def rebuild_processor(cls, path: str, **kwargs: Any) -> Any:
        """The processor built from a checkpoint's parts, without torchvision.

        Reads the image processor (``preprocessor_config.json``, or the ``image_processor`` entry of
        ``processor_config.json``) into the PIL backend ``Qwen2VLImageProcessorPil``, the tokenizer
        files, and the chat template (``chat_template.jinja``, legacy ``chat_template.json``, or
        the tokenizer's own), as in the hub checkpoints' layout.
        """
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

        location = {k: v for k, v in kwargs.items() if k in _LOCATION_KWARGS}
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **location)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        processor_cls = image_text_processor_class(cls.processor_class_name)
        processor_dict, _ = processor_cls.get_processor_dict(path, **location)
        chat_template = processor_dict.get("chat_template") or getattr(tokenizer, "chat_template", None)
        return processor_cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)

    # ------------------------------------------------------------------ modules and sizes
    @property
    def vision_tower(self) -> Any:
        """The ViT with its patch merger (``model.model.visual``); no CLS token."""
        return self.model.model.visual

    @property
    def vision_feature_layer(self) -> int:
        """-1: the merger consumes the last vision block's output (no layer choice in Qwen)."""
        return -1

    @property
    def projector_vision_layers(self) -> tuple[int, ...]:
        """The patch merger reads the last vision block's output."""
        return (len(self.vision_layers) - 1,)

    @property
    def spatial_merge_size(self) -> int:
        """Side of the block of vision patches merged into one language-model token (2)."""
        return int(self.config.vision_config.spatial_merge_size)

    @property
    def patch_size(self) -> int:
        """Vision patch side in processed pixels (14)."""
        return int(self.config.vision_config.patch_size)

    # ------------------------------------------------------------------ prompts
    def image_placeholder(self, num_images: int) -> str:
        """One vision-start / image-pad / vision-end triple per image (the processor expands the pad)."""
        return IMAGE_PLACEHOLDER * num_images

    # ------------------------------------------------------------------ layouts
    def grid_thw(self, batch: Batch, image_index: int) -> tuple[int, int, int]:
        """(temporal, height, width) of image ``image_index`` (flat over the batch) in vision patches."""
        grid = batch.inputs["image_grid_thw"][image_index]  # [3]
        t, h, w = (int(v) for v in grid.tolist())
        return t, h, w

    def num_image_tokens(self, batch: Batch, image_index: int, size: tuple[int, int]) -> int:
        t, h, w = self.grid_thw(batch, image_index)
        return t * h * w // self.spatial_merge_size**2

    def views(self, batch: Batch, image_index: int, size: tuple[int, int]) -> tuple[GridView, ...]:
        """One view, ``merged``: the merged-token grid, row-major, over the whole original image
        (``smart_resize`` stretches without cropping or padding)."""
        t, h, w = self.grid_thw(batch, image_index)
        if t != 1:
            raise ValueError(f"image {image_index} has temporal grid {t}; only still images are supported")
        merge = self.spatial_merge_size
        rows, cols = h // merge, w // merge
        region = (0.0, 0.0, float(size[0]), float(size[1]))
        return (GridView("merged", rows, cols, region, row_major_index(rows, cols)),)

    def pixel_view(self, batch: Batch, tensor: torch.Tensor, sample: int) -> tuple[torch.Tensor, GridView]:
        """Sample ``sample``'s first image as ``[3, H, W]`` processed pixels (``H = rows * 28``,
        ``W = cols * 28``), rebuilt from the flat patch rows of ``tensor`` (``pixel_values`` or its
        gradient, ``[P_total, 3 * temporal * 14 * 14]``), and its merged view.

        A still image is repeated over the ``temporal_patch_size`` frames of each patch; this takes
        the mean over them: the pixels themselves, and for a gradient ``1 / temporal_patch_size``
        of the gradient with respect to the image (a constant factor).
        """
        image_index = sum(len(sizes) for sizes in batch.image_sizes[:sample])
        start, stop = self.vision_patch_range(batch, image_index)
        t, h, w = self.grid_thw(batch, image_index)
        if t != 1:
            raise ValueError(f"image {image_index} has temporal grid {t}; only still images are supported")
        vc = self.config.vision_config
        m, ps = self.spatial_merge_size, self.patch_size
        channels, frames = int(vc.in_channels), int(vc.temporal_patch_size)
        patches = tensor[start:stop].reshape(h // m, w // m, m, m, channels, frames, ps, ps)
        pixels = patches.mean(dim=5)  # [h/m, w/m, m, m, C, ps, ps]
        pixels = pixels.permute(4, 0, 2, 5, 1, 3, 6).reshape(channels, h * ps, w * ps)  # [C, H, W]
        return pixels, batch.layouts[sample][0].views[0]

    # ------------------------------------------------------------------ text and map facet
    # The base's answers hold for the text-only path (the whole model generates without pixels, no
    # image_grid_thw then) and the grid (each merged token is one cell of the merged grid). A
    # common prefix may be shared: the suffix continues the prefix's cache with the M-RoPE
    # positions of the full prompt (batch_positions, through prompt_positions), which the forward
    # takes as given; the vision tower encodes each image on its own (cu_seqlens), so the first
    # samples' images alone give the same features; Qwen3-VL's DeepStack rows are computed from
    # the pixels in the prefix pass and added at its image positions, all of which it holds.

    @property
    def prefix_image_inputs(self) -> tuple[str, ...]:
        """The images travel in ``pixel_values`` (flat patch rows, ``t * h * w`` per image) and
        ``image_grid_thw`` (one ``[t, h, w]`` row per image): :meth:`sample_image_inputs` cuts them."""
        return ("pixel_values", "image_grid_thw")

    @property
    def prefix_token_inputs(self) -> tuple[str, ...]:
        """``mm_token_type_ids`` (1 at image tokens): the model reads it only to compute M-RoPE
        positions, which the shared-prefix path passes explicitly."""
        return ("mm_token_type_ids",)

    def split_image_inputs(self, batch: Batch, first: int, samples: range | None = None) -> None:
        """No split: the pixel rows are flat patches (not one row per image), and a prompt
        continued after its first image would need its M-RoPE positions continued too; ViCrop's
        answer runs the whole prompt (the shared-prefix capture still applies)."""
        return None

    def sample_image_inputs(self, batch: Batch, n: int) -> dict[str, Any]:
        """The first ``n`` samples' images: their leading ``image_grid_thw`` rows and the patch
        rows those grids cover (:meth:`vision_patch_range`)."""
        images = sum(len(sizes) for sizes in batch.image_sizes[:n])
        stop = self.vision_patch_range(batch, images - 1)[1] if images else 0
        return {"pixel_values": batch.inputs["pixel_values"][:stop],  # [P_first, C * T * ps * ps]
                "image_grid_thw": batch.inputs["image_grid_thw"][:images]}  # [N_first, 3]

    # ------------------------------------------------------------------ vision-tower order
    def vision_patch_range(self, batch: Batch, image_index: int) -> tuple[int, int]:
        """(start, stop) rows of image ``image_index`` in the vision tower's sequence (all images
        of the batch are concatenated there, ``t * h * w`` patches each)."""
        grids = batch.inputs["image_grid_thw"]  # [N_images, 3]
        start = int(grids[:image_index].prod(-1).sum()) if image_index else 0
        return start, start + int(grids[image_index].prod())

    def vision_patch_token_index(self, batch: Batch, image_index: int) -> torch.Tensor:
        """For each row of image ``image_index`` in the vision tower's hidden states and
        attention maps (tower order, see :meth:`vision_patch_range`), the index of the
        language-model token (within the image, row-major merged grid) it is merged into. ``[P]`` long.

        Pool per-patch vision quantities into merged tokens with this, never by assuming an order.
        """
        t, h, w = self.grid_thw(batch, image_index)
        unit = self.spatial_merge_size**2
        return self._tower_block_order(t, h // self.spatial_merge_size, w // self.spatial_merge_size).repeat_interleave(
            unit
        )

    def _tower_block_order(self, t: int, rows: int, cols: int) -> torch.Tensor:
        """Merged-token index of each merge block in tower order: Qwen2-VL keeps the processor's
        row-major block order. ``[t * rows * cols]`` long."""
        import torch

        return torch.arange(t * rows * cols)

    def prompt_positions(
        self,
        batch: Batch,
        ids: torch.Tensor,
        mask: torch.Tensor,
        image_tokens: Sequence[Sequence[int]],
        grid_shapes: Sequence[Sequence[tuple[int, int]]] | None = None,
    ) -> torch.Tensor:
        """``[4, B, L]`` positions (M-RoPE): the text row as ``generate`` makes it, then the
        temporal / height / width rows from the model's own ``get_rope_index`` with one
        ``[1, rows * m, cols * m]`` grid per image (``m`` the spatial merge). An image keeps its
        original grid when its token count is unchanged, else ``(1, n)`` unless ``grid_shapes``
        says otherwise."""
        import torch

        from ..errors import MethodError

        merge = self.spatial_merge_size
        original = batch.inputs.get("image_grid_thw")
        grids: list[list[int]] = []
        flat = 0
        for b, row_counts in enumerate(image_tokens):
            for i, n in enumerate(row_counts):
                if grid_shapes is not None:
                    rows, cols = grid_shapes[b][i]
                elif original is not None and int(original[flat].prod()) // merge**2 == n:
                    _, h, w = (int(v) for v in original[flat].tolist())
                    rows, cols = h // merge, w // merge
                else:
                    rows, cols = 1, n
                if rows * cols != n:
                    raise MethodError(f"{self.family}: a grid of {rows}x{cols} cannot hold {n} image tokens")
                grids.append([1, rows * merge, cols * merge])
                flat += 1
        text = super().prompt_positions(batch, ids, mask, image_tokens, grid_shapes)  # [B, L]
        if not grids:
            return text[None].expand(4, -1, -1).clone()
        types = (ids == int(self.image_token_id)).long()  # [B, L] 1 = image, 0 = text
        grid = torch.tensor(grids, dtype=torch.long, device=ids.device)  # [N_img, 3]
        rope, _ = self.model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid,
                                                  attention_mask=mask)
        return torch.cat([text[None], rope.to(text.device)], dim=0)  # [4, B, L]

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(spatial_merge_size=self.spatial_merge_size, patch_size=self.patch_size)
        return out

    # ------------------------------------------------------------------ vision facet
    # The Qwen ViT has no [CLS] and runs every image of the batch as one flat sequence ``[L, D]``
    # (images bounded by ``cu_seqlens``), with a fused ``qkv`` and 2D rotary embeddings. An image's
    # candidates are its merged tokens (one per language-model token, row-major), read from the
    # merger's output; per-patch scores are pooled into them through vision_patch_token_index.

    #: the transformers module of this family's modeling code (its vision rotary embedding)
    modeling_module: ClassVar[str] = "transformers.models.qwen2_vl.modeling_qwen2_vl"
    #: ``get_image_features`` needs each image's patch grid
    image_feature_inputs = ("image_grid_thw",)

    #: the Qwen ViT has no [CLS]: DAMRO's documented substitute ranks the (merged) tokens
    substitutes: ClassVar[dict[str, str]] = {"vision_has_cls": NO_VISION_CLS}

    @property
    def vision_has_cls(self) -> bool:
        """No [CLS] (:attr:`substitutes` says so): DAMRO's substitute (attention received per
        patch) ranks the tokens."""
        return "vision_has_cls" not in self.substitutes

    @property
    def vision_full_attention_layers(self) -> tuple[int, ...]:
        """Indices of the vision blocks that attend over whole images (Qwen2-VL: every block)."""
        return tuple(range(len(self.vision_layers)))

    @property
    def outlier_vision_layer(self) -> int:
        """The last full-attention block at or below :attr:`projector_vision_layer` (the merger
        reads the last block; a windowed block does not see the whole image)."""
        top = self.projector_vision_layer
        eligible = [i for i in self.vision_full_attention_layers if i <= top]
        return max(eligible) if eligible else top

    def vision_attention(self, layer: int) -> Any:
        """A Qwen vision block's attention is its ``attn``."""
        from ..errors import MethodError

        layers = self.vision_layers
        if not 0 <= int(layer) < len(layers):
            raise MethodError(f"{self.family}: vision layer {layer} outside 0..{len(layers) - 1}")
        return layers[int(layer)].attn

    def vision_query_key(self, module: Any, hidden: torch.Tensor,
                         call_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused ``qkv`` over the flat sequence ``hidden`` [L, D], with the block's own rotary
        embedding (``position_embeddings`` of the call) applied: ``[1, H, L, d]``."""
        import importlib

        from ..errors import MethodError

        heads = int(module.num_heads)
        length = hidden.shape[0]
        q, k, _ = module.qkv(hidden).reshape(length, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)  # [L, H, d]
        rotary = call_kwargs.get("position_embeddings")
        if rotary is None:
            raise MethodError(f"{self.family}: {type(module).__name__} was called without position_embeddings")
        apply = importlib.import_module(self.modeling_module).apply_rotary_pos_emb_vision
        q, k = apply(q, k, rotary[0], rotary[1])  # [L, H, d]
        return q.transpose(0, 1)[None], k.transpose(0, 1)[None]  # [1, H, L, d]

    def vision_attention_per_image(self, batch: Batch, query: torch.Tensor, key: torch.Tensor,
                                   call_kwargs: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each image's segment ``[H, P_i, d]`` of the flat sequence, bounded by the call's
        ``cu_seqlens`` (a windowed block has more segments than images and is refused)."""
        from ..errors import MethodError

        cu = call_kwargs.get("cu_seqlens")
        if cu is None:
            raise MethodError(f"{self.family}: the vision block was called without cu_seqlens")
        bounds = [int(x) for x in cu.tolist()]
        images = sum(len(sizes) for sizes in batch.image_sizes)
        if len(bounds) - 1 != images:
            raise MethodError(f"{self.family}: this vision block attends within {len(bounds) - 1} segments but the "
                              f"batch has {images} images (choose a full-attention vision block)")
        q, k = query[0], key[0]  # [H, L, d]
        return [(q[:, s:e], k[:, s:e]) for s, e in zip(bounds[:-1], bounds[1:])]

    def pool_vision_scores(self, batch: Batch, image_index: int, scores: torch.Tensor) -> torch.Tensor:
        """The mean score of the patches merged into each language-model token: ``[P]`` in tower
        order -> ``[M]`` row-major (:meth:`vision_patch_token_index`)."""
        import torch

        tokens = self.vision_patch_token_index(batch, image_index).to(scores.device)  # [P]
        merged = int(tokens.max()) + 1
        sums = torch.zeros(merged, device=scores.device).index_add_(0, tokens, scores)  # [M]
        count = torch.zeros(merged, device=scores.device).index_add_(0, tokens, torch.ones_like(scores))  # [M]
        return sums / count

    @property
    def vision_subset_source(self) -> Any:
        """The vision tower: its ``pooler_output`` ``[M_total, D]`` holds the merged tokens of
        every image, row-major per image."""
        return self.vision_tower

    def vision_candidates(self, batch: Batch, output: Any, *, with_prefix: bool = False) -> list[torch.Tensor]:
        """Each image's merged tokens ``[M_i, D]`` from the merger's ``pooler_output`` (no prefix)."""
        from ..errors import MethodError

        merged = output.pooler_output  # [M_total, D]
        out, start = [], 0
        for image in range(sum(len(sizes) for sizes in batch.image_sizes)):
            count = self.num_image_tokens(batch, image, (0, 0))
            out.append(merged[start:start + count])  # [M_i, D]
            start += count
        if start != merged.shape[0]:
            raise MethodError(f"{self.family}: {merged.shape[0]} merged vision tokens but the images have {start}")
        return out

    def vision_input_index(self, batch: Batch, image_index: int) -> slice:
        """The image's rows of the flat patch rows ``[P_total, C * T * ps * ps]`` (:meth:`vision_patch_range`)."""
        start, stop = self.vision_patch_range(batch, image_index)
        return slice(start, stop)


class Qwen25VLAdapter(Qwen2VLAdapter):
    """Adapter of Qwen2.5-VL checkpoints (``Qwen/Qwen2.5-VL-*``): same token layout as Qwen2-VL;
    the vision tower uses window attention internally (undone before the merger's output)."""

    family = "qwen2_5_vl"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    processor_class_name: ClassVar[str] = "Qwen2_5_VLProcessor"
    modeling_module: ClassVar[str] = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"

    def _tower_block_order(self, t: int, rows: int, cols: int) -> torch.Tensor:
        """Qwen2.5-VL regroups merge blocks into square attention windows of
        ``window_size / patch_size / merge`` blocks a side before its first vision block: windows
        row-major over the (possibly ragged) window grid, blocks row-major inside a window, frame
        after frame. Every vision block, full-attention ones included, sees this order; the merger's
        output is put back into row-major order."""
        import torch

        vc = self.config.vision_config
        side = max(1, int(vc.window_size) // self.spatial_merge_size // int(vc.patch_size))
        order = []
        for frame in range(t):
            for r0 in range(0, rows, side):
                for c0 in range(0, cols, side):
                    for r in range(r0, min(r0 + side, rows)):
                        for c in range(c0, min(c0 + side, cols)):
                            order.append(frame * rows * cols + r * cols + c)
        return torch.tensor(order, dtype=torch.long)

    # ------------------------------------------------------------------ vision facet
    @property
    def vision_full_attention_layers(self) -> tuple[int, ...]:
        """The blocks of ``vision_config.fullatt_block_indexes``; the others attend within windows."""
        full = getattr(self.config.vision_config, "fullatt_block_indexes", None)
        return tuple(int(i) for i in full) if full else super().vision_full_attention_layers
