"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``, llava-hf ``llava-onevision-qwen2-*-hf``).

A relative of LLaVA-NeXT (:mod:`.llava_next`): SigLIP vision tower (no CLS token,
``vision_feature_select_strategy = "full"``, last layer), a two-layer MLP projector, a Qwen2
decoder and the same "any resolution" tiling. What differs, per image (transformers 5.17-5.25,
``image_processing_pil_llava_onevision.py``, ``processing_llava_onevision.py`` and
``pack_image_features`` in ``modeling_llava_onevision.py``):

*A sample with one image* (``batch_num_images[b] == 1``) is tiled as in LLaVA-NeXT: the base view
is the whole image stretched to the tile size (no centre crop), the tiles cut from the image
resized into the best of ``image_grid_pinpoints`` and padded (centred, zeros). The language
model receives

1. the base view's ``p x p`` features, row-major (``p = image_size // patch_size``, 27 for
   SigLIP-384/14: 729 tokens), with **no** newline;
2. the tiles' features stitched into one ``(tiles_h * p) x (tiles_w * p)`` grid and unpadded as
   in LLaVA-NeXT, giving ``R x C`` cells; then ``anyres_max_N`` (``config.vision_aspect_ratio``,
   ``N`` read by transformers as ``int(value.strip("anyres_max_"))``): with
   ``ratio = sqrt(R * C / (N * p * p))``, if ``ratio > 1.1`` the grid is bilinearly resized
   (``align_corners=False``) to ``int(R // ratio) x int(C // ratio)`` cells; finally one
   ``image_newline`` token after every row.

   So an image has ``p*p + R' * (C' + 1)`` tokens, where ``R' x C'`` is the grid after pooling.
   A pooled cell ``(r, c)`` is sampled at the centre of input cells ``[r * R / R', (r + 1) * R / R')``
   (bilinear, ``align_corners=False``: the output grid spans the input grid's extent), a
   non-integer block of original cells; its pixel region is that block of the unpadded grid's
   region, so the high-resolution view keeps the unpadded region and only its rows / columns
   change (:class:`GridView` cells split a region evenly).

*A sample with several images* (``batch_num_images[b] > 1``; also ViCrop's image + crop) gets no
tiles: each image is padded to a square (centred, filled with the CLIP mean colour) and resized
to the tile size; the language model receives its ``p x p`` features and **one** newline token
after them (``p*p + 1`` tokens). The layout of an image therefore depends on how many images its
sample holds; :meth:`LlavaOnevisionAdapter.prepare` passes the images per sample so that the
processor counts them as the model does.

Differences between transformers 5.17 and 5.25 for this class: none in the token arithmetic or
the image processor (identical files); 5.25 moved the vision tower's hidden-state selection to a
decorator and renamed ``past_key_values`` to ``cache`` (still accepted), which this adapter does
not touch. Both versions' ``LlavaOnevisionProcessor`` demand a video processor (torchvision):
:meth:`LlavaOnevisionAdapter.load_processor` falls back to an image + text subclass.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import UnsupportedModelError
from .base import NO_VISION_CLS, Batch
from .geometry import Box, GridView, processed_region, row_major_index
from .llava_next import AnyresLayout, LlavaNextAdapter, _field

#: the official LLaVA-OneVision conversation format (``conv_templates["qwen_1_5"]`` of the
#: LLaVA-NeXT reference code: default system turn, one user turn, generation prompt)
ONEVISION_REFERENCE_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n{images}{question}<|im_end|>\n"
    "<|im_start|>assistant\n"
)

#: keyword arguments of ``from_pretrained`` that only say where the files are
_LOCATION_KWARGS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")


@functools.cache
def image_text_processor_class() -> type:
    """A subclass of transformers' ``LlavaOnevisionProcessor`` made of an image processor and a
    tokenizer only.

    The stock class requires a video processor: ``ProcessorMixin`` type-checks every argument of
    ``__init__`` against the video-processor base class, which transformers only defines with
    torchvision installed, so even ``video_processor=None`` fails. A subclass whose ``__init__``
    has no ``video_processor`` parameter has no video attribute at all; prompts, images and chat
    templates work exactly as in the parent, videos not at all. Saving it records the parent's
    class name, so the saved folder loads with ``AutoProcessor`` where torchvision is installed.
    """
    import transformers
    from transformers.processing_utils import ProcessorMixin

    base = transformers.LlavaOnevisionProcessor
    name = "LlavaOnevisionImageTextProcessor"

    def __init__(
        self: Any,
        image_processor: Any = None,
        tokenizer: Any = None,
        num_image_tokens: int | None = None,
        vision_feature_select_strategy: str | None = None,
        chat_template: Any = None,
        image_token: str = "<image>",
        video_token: str = "<video>",
        vision_aspect_ratio: str = "anyres_max_9",
        **kwargs: Any,
    ) -> None:
        # the attributes the parent's __init__ sets, without its video processor
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self.video_token = getattr(tokenizer, "video_token", None) or video_token
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        self.vision_aspect_ratio = vision_aspect_ratio
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def to_dict(self: Any) -> dict[str, Any]:
        out = base.to_dict(self)
        out["processor_class"] = base.__name__
        return out

    cls = type(name, (base,), {"__init__": __init__, "to_dict": to_dict, "__module__": __name__,
                               "__qualname__": name,
                               "__doc__": "LlavaOnevisionProcessor without a video processor (images and text only)."})
    globals()[name] = cls  # importable by name (pickling)
    return cls


def max_num_patches(vision_aspect_ratio: str) -> int:
    """``N`` of ``anyres_max_N`` read as transformers reads it: ``strip`` of the *characters*
    ``a n y r e s _ m x`` from both ends, then ``int``."""
    try:
        return int(str(vision_aspect_ratio).strip("anyres_max_"))  # noqa: B005 - transformers' character-set strip
    except ValueError:
        raise UnsupportedModelError(
            f"llava_onevision: vision_aspect_ratio {vision_aspect_ratio!r} is not of the form 'anyres_max_N'"
        ) from None


def pooled_grid(rows: int, cols: int, p: int, max_patches: int) -> tuple[int, int]:
    """``(rows', cols')`` of an unpadded ``rows x cols`` feature grid after ``anyres_max`` pooling
    (``pack_image_features``: bilinear resize to ``int(rows // ratio) x int(cols // ratio)`` when
    ``ratio = sqrt(rows * cols / (max_patches * p * p)) > 1.1``; unchanged otherwise)."""
    ratio = math.sqrt(rows * cols / (max_patches * p**2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


@dataclass(frozen=True)
class OnevisionLayout:
    """The token arithmetic of one image of original ``(width, height)`` in LLaVA-OneVision.

    ``tiled`` images (alone in their sample) have the base grid, then ``rows x cols`` pooled
    high-resolution cells, each row followed by a newline; the others the base grid of the padded
    square and one newline. ``anyres`` is the LLaVA-NeXT arithmetic before pooling (tiled only).
    """

    size: tuple[int, int]
    base_side: int
    base_region: Box
    tiled: bool
    rows: int = 0
    cols: int = 0
    highres_region: Box | None = None
    anyres: AnyresLayout | None = None

    @property
    def base_tokens(self) -> int:
        return self.base_side * self.base_side

    @property
    def highres_tokens(self) -> int:
        """Pooled cells plus one newline per row (tiled), or the one trailing newline."""
        return self.rows * (self.cols + 1) if self.tiled else 1

    @property
    def num_tokens(self) -> int:
        return self.base_tokens + self.highres_tokens

    @property
    def newline_indices(self) -> list[int]:
        """Indices (within the image's tokens) of its ``image_newline`` tokens."""
        if not self.tiled:
            return [self.base_tokens]
        return [self.base_tokens + r * (self.cols + 1) + self.cols for r in range(self.rows)]


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-NeXT's modules and tiling, with SigLIP (no CLS), ``anyres_max`` pooling and the
    multi-image path (see the module docstring)."""

    family = "llava_onevision"
    architectures = ("LlavaOnevisionForConditionalGeneration",)
    reference_template = ONEVISION_REFERENCE_TEMPLATE

    def __init__(self, model: Any, processor: Any):
        super().__init__(model, processor)
        strategy = getattr(self.config, "vision_feature_select_strategy", "full")
        if strategy != "full":
            raise UnsupportedModelError(
                f"llava_onevision: vision_feature_select_strategy {strategy!r} drops a SigLIP patch (SigLIP has no "
                "CLS), which transformers' pack_image_features cannot tile; only 'full' checkpoints are supported"
            )

    # ------------------------------------------------------------------ loading
    @classmethod
    def rebuild_processor(cls, path: str, **kwargs: Any) -> Any:
        """The processor built from a checkpoint's parts without torchvision: the image processor
        (``preprocessor_config.json`` or the ``image_processor`` entry of ``processor_config.json``)
        into the PIL backend, the tokenizer, the processor's own settings (``num_image_tokens``,
        ``vision_feature_select_strategy``, ``vision_aspect_ratio``...) and the chat template."""
        import inspect

        from transformers import AutoTokenizer, LlavaOnevisionImageProcessorPil

        location = {k: v for k, v in kwargs.items() if k in _LOCATION_KWARGS}
        image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(path, **location)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        processor_cls = image_text_processor_class()
        processor_dict, _ = processor_cls.get_processor_dict(path, **location)
        accepted = set(inspect.signature(processor_cls.__init__).parameters) - {"self", "image_processor",
                                                                                 "tokenizer", "kwargs"}
        settings = {k: v for k, v in processor_dict.items() if k in accepted}
        settings["chat_template"] = settings.get("chat_template") or getattr(tokenizer, "chat_template", None)
        return processor_cls(image_processor=image_processor, tokenizer=tokenizer, **settings)

    # ------------------------------------------------------------------ modules and sizes
    @property
    def vision_feature_layer(self) -> int:
        """The SigLIP hidden state the projector reads (-1, the last layer, in the released models)."""
        layer = getattr(self.config, "vision_feature_layer", -1)
        return layer if isinstance(layer, int) else layer[-1]

    @property
    def max_num_patches(self) -> int:
        """``N`` of the model's ``vision_aspect_ratio = "anyres_max_N"``: pooling keeps a tiled
        image's high-resolution grid near ``N`` tiles' worth of cells."""
        return max_num_patches(getattr(self.config, "vision_aspect_ratio", "anyres_max_9"))

    # ------------------------------------------------------------------ prompts and inputs
    def _process(self, flat_images: list, prompts: list[str], counts: list[int]) -> Any:
        """The processor with the images nested per sample: it then tiles only the images that
        are alone in their sample, as the model expects (a flat list reads as one image each)."""
        kwargs: dict[str, Any] = {"text": prompts, "return_tensors": "pt", "padding": True}
        if flat_images:
            nested, start = [], 0
            for n in counts:
                nested.append(list(flat_images[start:start + n]))
                start += n
            kwargs["images"] = nested
        return self.processor(**kwargs)

    # ------------------------------------------------------------------ geometry
    def _base_extra(self) -> int:
        """SigLIP has no CLS and the strategy is 'full': nothing precedes the base grid."""
        return 0

    def _square_region(self, width: int, height: int) -> Box:
        """Original-image box of a multi-image sample's only view: ``pad_to_square`` (centred at
        ``(side - dim) // 2``), then a resize of the square to the tile size."""
        ip = self.processor.image_processor
        padded = {"do_pad": True, "pad_size": None, "do_resize": True, "size": ip.size, "do_center_crop": False}
        return processed_region(width, height, padded)

    def onevision_layout(self, size: tuple[int, int], tiled: bool = True) -> OnevisionLayout:
        """Token counts, grid shapes and regions of an image of ``size = (width, height)``;
        ``tiled`` when it is the only image of its sample."""
        width, height = int(size[0]), int(size[1])
        p = self.patches_per_side
        if not tiled:
            return OnevisionLayout(size=(width, height), base_side=p, base_region=self._square_region(width, height),
                                   tiled=False)
        anyres = self.anyres_layout((width, height))
        rows, cols = pooled_grid(anyres.rows, anyres.cols, p, self.max_num_patches)
        return OnevisionLayout(
            size=(width, height), base_side=p, base_region=anyres.base_region, tiled=True, rows=rows, cols=cols,
            highres_region=anyres.highres_region, anyres=anyres,
        )

    def is_tiled(self, batch: Batch | None, image_index: int) -> bool:
        """Whether image ``image_index`` (flat over the batch) is alone in its sample (then the
        processor tiles it). Without a batch: a single image."""
        if batch is None:
            return True
        counts = [len(sizes) for sizes in batch.image_sizes]
        start = 0
        for n in counts:
            if image_index < start + n:
                return n == 1
            start += n
        raise IndexError(f"image {image_index} is not in a batch of {start} images")

    # ------------------------------------------------------------------ contract
    def num_image_tokens(self, batch: Batch, image_index: int, size: tuple[int, int]) -> int:
        return self.onevision_layout(size, self.is_tiled(batch, image_index)).num_tokens

    def views(self, batch: Batch | None, image_index: int, size: tuple[int, int]) -> tuple[GridView, ...]:
        """``(base, highres)`` for a tiled image (the high-resolution view's cells are the pooled
        ones, newlines skipped); ``(base,)`` over the padded square otherwise."""
        lay = self.onevision_layout(size, self.is_tiled(batch, image_index))
        p = lay.base_side
        base = GridView("base", p, p, lay.base_region, row_major_index(p, p))
        if not lay.tiled:
            return (base,)
        assert lay.highres_region is not None
        highres = GridView(
            "highres", lay.rows, lay.cols, lay.highres_region,
            row_major_index(lay.rows, lay.cols, start=lay.base_tokens, row_stride=lay.cols + 1),
        )
        return (base, highres)

    def newline_token_indices(self, size: tuple[int, int], tiled: bool = True) -> list[int]:
        """Indices (within the image's tokens) of its ``image_newline`` tokens."""
        return self.onevision_layout(size, tiled).newline_indices

    def image_newline_indices(self, batch: Batch, sample: int) -> Sequence[list[int]]:
        """Per image of sample ``sample``: the indices of its newline tokens within its tokens."""
        first = sum(len(sizes) for sizes in batch.image_sizes[:sample])
        return [self.newline_token_indices(size, self.is_tiled(batch, first + i))
                for i, size in enumerate(batch.image_sizes[sample])]

    # ------------------------------------------------------------------ text and map facet
    @property
    def prefix_image_inputs(self) -> tuple[str, ...]:
        """As LLaVA-NeXT (1D positions, SigLIP features that do not read the prompt), plus
        ``batch_num_images``: the model tiles an image only when it is alone in its sample, so
        the prefix pass must say so too. It holds one row per *sample*; the shared-prefix path
        runs one image per sample (ViCrop's question / generic pair), where that is one row per
        image (a prefix with more images per sample fails loudly on the image-token count)."""
        return ("pixel_values", "image_sizes", "batch_num_images")

    def split_image_inputs(self, batch: Batch, first: int, samples: range | None = None) -> None:
        """None: an image is tiled only when alone in its sample (``batch_num_images``), so a
        prompt's first image is not the same tokens as that image alone; no split."""
        return None

    # ------------------------------------------------------------------ vision facet
    # SigLIP: no [CLS] (the base class reads that off the tower's embeddings), so DAMRO and the
    # outlier-overlap instrument rank the base view's patches by the attention they *receive* at
    # the layer the projector reads (DAMRO's documented substitute). The base view is 1:1 to the
    # language model's first ``p*p`` tokens of the image (no pooling there), so one candidate per
    # patch (the base default). Everything else is LLaVA-NeXT's: the projector's output holds every
    # candidate, the vision tower runs the base view first, then the tiles; a negative image is its
    # kept base tokens plus one ``image_newline``. What differs: an image sharing its sample with
    # others is not tiled (one vision row, then one newline), and ``get_image_features`` must be told
    # so (``batch_num_images``), else it tiles every image as if alone.

    #: ``get_image_features`` needs each image's size (to pack its tiles) and the images per
    #: sample (to tile only the images alone in their sample)
    image_feature_inputs = ("image_sizes", "batch_num_images")
    #: SigLIP has no [CLS] (class-level statement for ``innersight list``)
    substitutes: ClassVar[dict[str, str]] = {"vision_has_cls": NO_VISION_CLS}

    @property
    def vision_subset_prefix(self) -> int:
        """SigLIP has no [CLS]: the ``full`` strategy keeps every patch and nothing precedes them
        in the projector's output (LLaVA's ``full`` keeps CLIP's [CLS], this one has none)."""
        return 0

    def tiles_per_image(self, batch: Batch) -> list[int]:
        """Vision-tower rows of each image (flat): base view plus tiles for an image alone in its
        sample (``image_size_to_num_patches``, as LLaVA-NeXT), one row (the padded square) for an
        image that shares its sample (``get_image_features``' ``need_patching``)."""
        tiles = super().tiles_per_image(batch)
        return [t if self.is_tiled(batch, i) else 1 for i, t in enumerate(tiles)]

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["vision_aspect_ratio"] = getattr(self.config, "vision_aspect_ratio", None)
        size = self.processor.image_processor.size
        out["base_size"] = (_field(size, "height"), _field(size, "width"))
        return out
