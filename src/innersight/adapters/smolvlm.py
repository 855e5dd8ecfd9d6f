"""SmolVLM / SmolVLM2 (``SmolVLMForConditionalGeneration``, config ``model_type = "smolvlm"``;
the Idefics3 family's architecture).

Image -> SigLIP-style ViT (``model.model.vision_model``, no CLS token; the connector reads
``last_hidden_state`` = ``post_layernorm`` of the last layer's output) -> connector: pixel shuffle
(``scale_factor`` s: every s x s block of patches becomes one vector) and one linear layer ->
language-model tokens. The processor (transformers 5.x, ``image_processing_pil_smolvlm.py`` and
``processing_smolvlm.py``) does, per image of original ``W x H``:

1. resize so that the longest edge is ``size["longest_edge"]`` (L; up- or downscaled, aspect
   kept: the other side is ``int(L / aspect)`` made even by adding 1 when odd; both capped at
   4096), giving ``w1 x h1``;
2. with ``do_image_splitting``: stretch to a canvas whose sides are multiples of the tile side
   ``m = max_image_size["longest_edge"]``: the longer side ``ceil(side / m) * m``, the other
   ``ceil(int(longer' / aspect) / m) * m`` (aspect ``w1 / h1``). Both axes are stretched
   independently (no crop, no padding), so the canvas is the whole original image;
3. if the canvas is larger than one tile, cut it into ``rows x cols`` tiles of ``m x m``
   (row-major) and append the whole canvas stretched to ``m x m`` (the global view); otherwise the
   canvas itself is the only frame (``rows = cols = 0``). Without splitting, the image is
   stretched to ``m x m`` directly (one frame);
4. every frame goes through the ViT: ``p = image_size // patch_size`` patches a side (the last
   ``image_size - p * patch_size`` pixel rows and columns of a frame are never seen when the patch
   does not divide the tile, e.g. SmolVLM2-2.2B's 384 px / 14 px), then the pixel shuffle makes a
   ``g x g`` grid with ``g = p / s``, row-major (token ``(r, c)`` = patches ``r*s .. r*s+s-1``,
   ``c*s .. c*s+s-1``). ``image_seq_len = g * g`` tokens per frame.

The prompt text of one image (``<image>`` in the prompt expanded by the processor):

* split: for each tile row ``r`` and column ``c``: ``<fake_token_around_image><row_r_col_c>``
  then ``g*g`` ``<image>``; ``\\n`` after each tile row; then ``\\n<fake_token_around_image>
  <global-img>`` + ``g*g`` ``<image>`` + ``<fake_token_around_image>``;
* not split: ``<fake_token_around_image><global-img>`` + ``g*g`` ``<image>`` +
  ``<fake_token_around_image>``.

So an image has ``(rows * cols + 1) * g * g`` image tokens (tiles in row-major order, then the
global view) and its tokens are **not one contiguous run**: text tokens separate the tiles.
Views: ``base`` = the global view (``g x g`` over the whole image, the last ``g*g`` tokens),
``tiles`` = the tiles' grids stitched into one ``(rows*g) x (cols*g)`` grid over the whole image
(the finest view, what maps are drawn on), then one ``tile_r_c`` view per tile. Where the patch
does not divide the tile, the per-tile and base views are exact (they cover only the seen
pixels); the stitched view spreads each tile's ``g`` cells evenly over the whole tile, an error of
at most the unseen strip (6 of 384 px a tile for SmolVLM2-2.2B).

Positions are plain 1D (Llama RoPE); left padding works as for LLaVA. The processor's ``rows`` /
``cols`` are not returned with the inputs (``unused_input_names``), so the adapter recomputes the
split from the image size with the processor's arithmetic and checks the total against the image
tokens of each prompt.

Processor: the stock ``SmolVLMProcessor`` needs a video processor (torchvision) and the
``num2words`` package (videos only). :meth:`SmolVLMAdapter.load_processor` falls back to an image +
text subclass (:func:`image_text_processor_class`) built from the checkpoint's parts.

transformers 5.17 and 5.25 agree on everything used here (model, image processor arithmetic and
prompt strings); 5.17's processor validates the image count per prompt differently and keeps its
kwargs defaults in a ``SmolVLMProcessorKwargs`` class, which the subclass inherits unchanged. In
5.17 ``transformers.SmolVLMImageProcessorPil`` is a placeholder that demands torchvision (its lazy
import table lists the PIL class under the torchvision backend); the class itself needs no
torchvision and is imported from its module, ``transformers.models.smolvlm.image_processing_pil_smolvlm``.
``get_image_features(...).pooler_output`` is one ``[T_b, D]`` tensor per sample in 5.25 (all frames
of all its images) but one ``[frames, g*g, D]`` tensor for the whole batch in 5.17; flattened in
frame order, both are the image tokens in prompt order.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import MethodError, UnsupportedModelError
from .base import NO_VISION_CLS, Adapter, Batch
from .geometry import Box, GridView, row_major_index

if TYPE_CHECKING:  # pragma: no cover
    import torch


#: the image processor's absolute cap on either side after the first resize (``MAX_IMAGE_SIZE``)
MAX_IMAGE_SIDE = 4096

#: SmolVLM's chat format (default template of the hub checkpoints) written out literally, so that
#: ``reference`` does not depend on a checkpoint's template
SMOLVLM_REFERENCE_TEMPLATE = "<|im_start|>User:{images}{question}<end_of_utterance>\nAssistant:"

#: keyword arguments of ``from_pretrained`` that only say where the files are
_LOCATION_KWARGS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")


# ---------------------------------------------------------------------- processor arithmetic
def longest_edge_size(width: int, height: int, longest: int) -> tuple[int, int]:
    """(width, height) after the processor's first resize: the longest edge to ``longest``, the
    other side ``int(longest / aspect)`` rounded up to even, both capped at :data:`MAX_IMAGE_SIDE`
    (``get_resize_output_image_size`` of image_processing_pil_smolvlm.py)."""
    aspect = width / height
    if width >= height:
        w, h = longest, int(longest / aspect)
        h += h % 2
    else:
        h, w = longest, int(longest * aspect)
        w += w % 2
    h, w = max(h, 1), max(w, 1)
    # scale down below the absolute cap, keeping the aspect ratio of the result
    aspect = w / h
    if w >= h and w > MAX_IMAGE_SIDE:
        w, h = MAX_IMAGE_SIDE, int(MAX_IMAGE_SIDE / aspect)
    elif h > w and h > MAX_IMAGE_SIDE:
        h, w = MAX_IMAGE_SIDE, int(MAX_IMAGE_SIDE * aspect)
    return max(w, 1), max(h, 1)


def tile_canvas_size(width: int, height: int, tile: int) -> tuple[int, int]:
    """(width, height) of the canvas the image is stretched to before tiling: multiples of
    ``tile`` (``resize_for_vision_encoder`` of image_processing_pil_smolvlm.py)."""
    aspect = width / height
    if width >= height:
        w = math.ceil(width / tile) * tile
        h = math.ceil(int(w / aspect) / tile) * tile
    else:
        h = math.ceil(height / tile) * tile
        w = math.ceil(int(h * aspect) / tile) * tile
    return w, h


@dataclass(frozen=True)
class SplitLayout:
    """How the processor cuts one image of original ``size = (width, height)`` and how many
    language-model tokens it becomes.

    ``rows x cols`` tiles (0 x 0: the global view only), each and the global view ``g x g``
    tokens (``grid``); ``seen`` is the fraction of a frame's side the patches cover
    (``p * patch_size / image_size``, 1 when the patch divides the tile).
    """

    size: tuple[int, int]
    rows: int
    cols: int
    grid: int
    seen: float

    @property
    def tiles(self) -> int:
        return self.rows * self.cols

    @property
    def frame_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def num_tokens(self) -> int:
        """Tiles (row-major) then the global view, ``g * g`` tokens each."""
        return (self.tiles + 1) * self.frame_tokens

    def tile_region(self, row: int, col: int) -> Box:
        """Original-image box of the part of tile ``(row, col)`` that its patches cover."""
        w, h = self.size
        tw, th = w / self.cols, h / self.rows
        return (col * tw, row * th, col * tw + self.seen * tw, row * th + self.seen * th)

    @property
    def global_region(self) -> Box:
        """Original-image box that the global view's patches cover (the global frame is the whole
        image stretched to one tile)."""
        w, h = self.size
        return (0.0, 0.0, self.seen * w, self.seen * h)


# ---------------------------------------------------------------------- processor without videos
@functools.cache
def image_text_processor_class() -> type:
    """A subclass of transformers' ``SmolVLMProcessor`` made of an image processor and a tokenizer
    only (``SmolVLMImageTextProcessor``).

    The stock class needs a video processor (``SmolVLMVideoProcessor`` requires torchvision) and
    refuses to start without ``num2words`` (used for video prompts only); its
    ``apply_chat_template`` reads video defaults from the video processor. This subclass has no
    ``video_processor`` parameter, skips the ``num2words`` check and formats chats with the plain
    :class:`~transformers.ProcessorMixin` template code: prompts, images and chat templates work
    exactly as in the parent, videos not at all. Saving it records the parent's class name.
    """
    from transformers import SmolVLMProcessor
    from transformers.processing_utils import ProcessorMixin

    def __init__(self: Any, image_processor: Any = None, tokenizer: Any = None, image_seq_len: int = 169,
                 chat_template: Any = None) -> None:
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = int(image_seq_len)
        self.video_token = getattr(tokenizer, "video_token", "<video>")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def apply_chat_template(self: Any, conversation: Any, chat_template: Any = None, **kwargs: Any) -> Any:
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    def to_dict(self: Any) -> dict[str, Any]:
        out = SmolVLMProcessor.to_dict(self)
        out["processor_class"] = "SmolVLMProcessor"
        return out

    name = "SmolVLMImageTextProcessor"
    cls = type(name, (SmolVLMProcessor,), {
        "__init__": __init__, "apply_chat_template": apply_chat_template, "to_dict": to_dict,
        "__module__": __name__, "__qualname__": name,
        "__doc__": "SmolVLMProcessor without a video processor (images and text only).",
    })
    globals()[name] = cls  # importable by name (pickling)
    return cls


class SmolVLMAdapter(Adapter):
    """Adapter of SmolVLM2 checkpoints (``HuggingFaceTB/SmolVLM2-*``)."""

    family = "smolvlm"
    #: SigLIP has no [CLS]: DAMRO and the outlier-overlap instrument rank by attention received
    substitutes: ClassVar[dict[str, str]] = {"vision_has_cls": NO_VISION_CLS}
    architectures = ("SmolVLMForConditionalGeneration",)
    #: no paper evaluated SmolVLM: ``reference`` is the official chat format, written out literally
    reference_template = SMOLVLM_REFERENCE_TEMPLATE

    # ------------------------------------------------------------------ loading
    @classmethod
    def rebuild_processor(cls, path: str, **kwargs: Any) -> Any:
        """The processor built from a checkpoint's parts without torchvision or num2words: the image
        processor (``preprocessor_config.json``) in the PIL backend ``SmolVLMImageProcessorPil``, the
        tokenizer, ``image_seq_len`` from ``processor_config.json`` (else computed from the model
        config) and the chat template (``chat_template.jinja`` / ``.json`` or the tokenizer's)."""
        from transformers import AutoConfig, AutoTokenizer

        # the module path: transformers 5.17's top-level name is a torchvision placeholder
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

        location = {k: v for k, v in kwargs.items() if k in _LOCATION_KWARGS}
        image_processor = SmolVLMImageProcessorPil.from_pretrained(path, **location)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        processor_cls = image_text_processor_class()
        processor_dict, _ = processor_cls.get_processor_dict(path, **location)
        seq_len = processor_dict.get("image_seq_len")
        if seq_len is None:
            seq_len = image_seq_len(AutoConfig.from_pretrained(path, **kwargs))
        chat_template = processor_dict.get("chat_template") or getattr(tokenizer, "chat_template", None)
        return processor_cls(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=int(seq_len),
                             chat_template=chat_template)

    # ------------------------------------------------------------------ modules and sizes
    @property
    def language_model(self) -> Any:
        return self.model.model.text_model

    @property
    def vision_tower(self) -> Any:
        """The SigLIP-style ViT (``SmolVLMVisionTransformer``); no CLS token."""
        return self.model.model.vision_model

    @property
    def projector(self) -> Any:
        """The connector: pixel shuffle + ``modality_projection``."""
        return self.model.model.connector

    @property
    def vision_feature_layer(self) -> int:
        """-1: the connector reads ``post_layernorm`` of the last vision layer (no layer choice)."""
        return -1

    @property
    def projector_vision_layers(self) -> tuple[int, ...]:
        return (len(self.vision_layers) - 1,)

    @property
    def scale_factor(self) -> int:
        """Side of the block of vision patches the pixel shuffle merges into one token."""
        return int(self.config.scale_factor)

    @property
    def tile_size(self) -> int:
        """Pixel side of one tile and of the global view as the vision tower sees them."""
        return int(self.config.vision_config.image_size)

    @property
    def patches_per_side(self) -> int:
        vc = self.config.vision_config
        return int(vc.image_size) // int(vc.patch_size)

    @property
    def tokens_per_side(self) -> int:
        """``g``: language-model tokens along one side of a tile (patches / scale factor)."""
        return self.patches_per_side // self.scale_factor

    # ------------------------------------------------------------------ prompts and inputs
    def image_placeholder(self, num_images: int) -> str:
        """``<image>`` per image, nothing between them (the processor expands each)."""
        return "<image>" * num_images

    def _process(self, flat_images: list, prompts: list[str], counts: list[int]) -> Any:
        """The processor wants the images nested per prompt (it checks each prompt's count)."""
        kwargs: dict[str, Any] = {"text": prompts, "return_tensors": "pt", "padding": True}
        if flat_images:
            nested, start = [], 0
            for n in counts:
                nested.append(flat_images[start:start + n])
                start += n
            kwargs["images"] = nested
        return self.processor(**kwargs)

    # ------------------------------------------------------------------ geometry
    def _image_processor_setting(self, name: str) -> Any:
        return getattr(self.processor.image_processor, name)

    def split_layout(self, size: tuple[int, int]) -> SplitLayout:
        """Tiles, tokens and seen fraction of an original image of ``size = (width, height)``,
        with the processor's arithmetic (see the module docstring)."""
        width, height = int(size[0]), int(size[1])
        tile = int(_field(self._image_processor_setting("max_image_size"), "longest_edge"))
        if tile != self.tile_size:
            raise UnsupportedModelError(
                f"smolvlm: the processor's tiles are {tile} px but the vision tower's input is {self.tile_size} px"
            )
        g = self.tokens_per_side
        seq = int(getattr(self.processor, "image_seq_len", g * g))
        if seq != g * g:
            raise UnsupportedModelError(
                f"smolvlm: the processor's image_seq_len {seq} differs from the model's {g * g} tokens per tile"
            )
        seen = self.patches_per_side * int(self.config.vision_config.patch_size) / self.tile_size
        rows = cols = 0
        if self._image_processor_setting("do_image_splitting"):
            w, h = width, height
            if self._image_processor_setting("do_resize"):
                w, h = self._first_resize(width, height)
            canvas_w, canvas_h = tile_canvas_size(w, h, tile)
            if canvas_w > tile or canvas_h > tile:
                rows, cols = canvas_h // tile, canvas_w // tile
        return SplitLayout(size=(width, height), rows=rows, cols=cols, grid=g, seen=seen)

    def _first_resize(self, width: int, height: int) -> tuple[int, int]:
        """The processor's first resize: ``longest_edge``, or an exact ``height`` x ``width``."""
        size = self._image_processor_setting("size")
        longest = _field(size, "longest_edge")
        if longest:
            return longest_edge_size(width, height, int(longest))
        h, w = _field(size, "height"), _field(size, "width")
        if h and w:
            return int(w), int(h)
        raise UnsupportedModelError(f"smolvlm: cannot interpret the image processor's size {size!r}")

    # ------------------------------------------------------------------ contract
    def image_spans(self, batch: Batch, b: int) -> list[tuple[int, int]]:
        """Per image of sample ``b``: from the ``<fake_token_around_image>`` that opens its first
        frame (two tokens before its first image token: the fake token and ``<row_1_col_1>`` or
        ``<global-img>``) to the ``<fake_token_around_image>`` that closes its global view (one
        after its last image token), tile markers and row newlines included."""
        ids = batch.input_ids[b]  # [L]
        fake = self.tokenizer.convert_tokens_to_ids(getattr(self.processor, "fake_image_token",
                                                            "<fake_token_around_image>"))
        spans = []
        for layout in batch.layouts[b]:
            start, stop = int(layout.positions[0]) - 2, int(layout.positions[-1]) + 2
            if start < 0 or stop > ids.numel() or int(ids[start]) != fake or int(ids[stop - 1]) != fake:
                raise MethodError(f"{self.family}: an image of sample {b} is not wrapped in {fake!r} tokens as the "
                                  "processor writes them")
            spans.append((start, stop))
        return spans

    def num_image_tokens(self, batch: Batch, image_index: int, size: tuple[int, int]) -> int:
        return self.split_layout(size).num_tokens

    def views(self, batch: Batch, image_index: int, size: tuple[int, int]) -> tuple[GridView, ...]:
        """``base`` (global view), then with tiles ``tiles`` (all tiles stitched) and one
        ``tile_r_c`` per tile (1-based like the prompt's ``<row_r_col_c>``)."""
        lay = self.split_layout(size)
        g, n = lay.grid, lay.frame_tokens
        base = GridView("base", g, g, lay.global_region, row_major_index(g, g, start=lay.tiles * n))
        if not lay.tiles:
            return (base,)
        stitched = tuple(
            tuple((r // g * lay.cols + c // g) * n + (r % g) * g + c % g for c in range(lay.cols * g))
            for r in range(lay.rows * g)
        )
        w, h = lay.size
        views = [base, GridView("tiles", lay.rows * g, lay.cols * g, (0.0, 0.0, float(w), float(h)), stitched)]
        for r in range(lay.rows):
            for c in range(lay.cols):
                start = (r * lay.cols + c) * n
                views.append(GridView(f"tile_{r + 1}_{c + 1}", g, g, lay.tile_region(r, c),
                                      row_major_index(g, g, start=start)))
        return tuple(views)

    def pixel_view(self, batch: Batch, tensor: torch.Tensor, sample: int) -> tuple[torch.Tensor, GridView]:
        """``pixel_values`` is [B, N_frames_max, 3, S, S] per sample (tiles of each image, then its
        global view): sample ``sample``'s first image's global frame, cropped to the pixels its
        patches see, and the base view."""
        layout = batch.layouts[sample][0]
        lay = self.split_layout(layout.size)
        seen = self.patches_per_side * int(self.config.vision_config.patch_size)
        return tensor[sample, lay.tiles, :, :seen, :seen], layout.views[0]

    # ------------------------------------------------------------------ text and map facet
    @property
    def prefix_image_inputs(self) -> tuple[str, ...]:
        """``pixel_values`` [B, F_max, 3, S, S] and ``pixel_attention_mask`` [B, F_max, S, S]: the
        frames of each sample (one row per sample, not per image: :meth:`sample_image_inputs`).
        Positions are plain counts (1D RoPE) and the frames' tokens do not read the prompt, so a
        prompt's prefix may be encoded once."""
        return ("pixel_values", "pixel_attention_mask")

    def sample_image_inputs(self, batch: Batch, n: int) -> dict[str, Any]:
        """The first ``n`` rows: one row per sample holds all of its images' frames."""
        return {k: v[:n] for k, v in batch.inputs.items() if k in self.prefix_image_inputs}

    def split_image_inputs(self, batch: Batch, first: int, samples: range | None = None) -> None:
        """None: one row per sample holds every image's frames, not one row per image (the
        answer-prefix reuse runs the whole prompt)."""
        return None

    # ------------------------------------------------------------------ vision facet
    # The vision tower runs every real frame of the batch as one ``[frames, P, Dv]`` batch (tiles
    # of each image, then its global frame; all-zero padding frames dropped by the model), with
    # SigLIP attention (``q_proj`` / ``k_proj``, no [CLS]: the base answers). Outliers are scored on
    # the global frame (what the base view covers), per language-model token: the received
    # attention of its ``s x s`` patch block. The connector's output ``[frames, g*g, D]`` holds the
    # candidates already projected; a negative image made of ``k`` of them is written as the
    # processor writes an unsplit image (``<fake_token_around_image><global-img>`` ...
    # ``<fake_token_around_image>``).

    #: ``get_image_features`` reads the pixel mask of every frame
    image_feature_inputs = ("pixel_attention_mask",)

    def frames_per_image(self, batch: Batch) -> list[int]:
        """Frames (tiles + the global frame) the vision tower runs for each image of ``batch``, flat."""
        return [self.split_layout(size).tiles + 1 for sizes in batch.image_sizes for size in sizes]

    def scored_vision_rows(self, batch: Batch, rows: int) -> torch.Tensor:
        """The global frame of each image: the last of its frames in the vision tower's batch."""
        import torch

        frames = self.frames_per_image(batch)
        if sum(frames) != rows:
            raise MethodError(f"{self.family}: the vision tower ran {rows} frames but the batch's images have "
                              f"{sum(frames)}")
        return torch.tensor(frames).cumsum(0) - 1  # [N_images]

    def pool_vision_scores(self, batch: Batch, image_index: int, scores: torch.Tensor) -> torch.Tensor:
        """Per-patch scores ``[p * p]`` of a global frame (row-major) as the mean over each
        language-model token's ``s x s`` patch block, ``[g * g]`` row-major (the pixel shuffle's
        order: token ``(r, c)`` = patch rows ``r*s ..``, cols ``c*s ..``)."""
        p, s = self.patches_per_side, self.scale_factor
        if scores.numel() != p * p:
            raise MethodError(f"{self.family}: {scores.numel()} patch scores for a frame of {p} x {p} patches")
        g = p // s
        return scores.reshape(g, s, g, s).mean(dim=(1, 3)).reshape(g * g)  # [g * g]

    @property
    def vision_subset_source(self) -> Any:
        """The connector: its output ``[frames, g*g, D]`` holds every frame's tokens, projected."""
        return self.projector

    def image_features(self, batch: Batch, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Every image's tokens ``[T_i, D]`` (tiles, then the global frame), flat over the batch.

        ``get_image_features(...).pooler_output`` is one ``[T_b, D]`` tensor per sample
        (transformers 5.25) or one ``[frames, g*g, D]`` tensor for the batch (5.17); both flatten,
        in frame order, to the image tokens in prompt order, split here by each image's count."""
        import torch

        extra = {name: batch.inputs.get(name) for name in self.image_feature_inputs}
        pooled = self.model.get_image_features(pixel_values, **extra, return_dict=True).pooler_output
        flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in pooled])  # [T_total, D]
        counts = [layout.num_tokens for layouts in batch.layouts for layout in layouts]
        if sum(counts) != flat.shape[0]:
            raise MethodError(f"{self.family}: the vision path gave {flat.shape[0]} image tokens but the batch's "
                              f"images have {sum(counts)}")
        return list(flat.split(counts))

    def vision_input_index(self, batch: Batch, image_index: int) -> tuple[int, slice]:
        """``(sample, frames)``: image ``image_index``'s frames in ``pixel_values``
        ``[B, F_max, 3, S, S]`` (after the sample's earlier images' frames). The sample's padding
        frames (all zero, dropped by the model) are never part of an image.

        Raises:
            MethodError: the pixels do not hold the image's sample or frames.
        """
        pixels = batch.inputs["pixel_values"]
        frames = self.frames_per_image(batch)
        flat = 0
        for b, sizes in enumerate(batch.image_sizes):
            if image_index < flat + len(sizes):
                if b >= pixels.shape[0]:
                    raise MethodError(f"{self.family}: pixel_values hold {pixels.shape[0]} samples but the batch "
                                      f"has {len(batch.image_sizes)}")
                start = sum(frames[flat:image_index])
                stop = start + frames[image_index]
                if stop > pixels.shape[1]:
                    raise MethodError(f"{self.family}: pixel_values hold {pixels.shape[1]} frames per sample but "
                                      f"image {image_index} needs frames {start}..{stop - 1}")
                return b, slice(start, stop)
            flat += len(sizes)
        raise MethodError(f"{self.family}: image {image_index} outside the batch's {flat} images")

    def image_wrapping(self, num_tokens: int) -> tuple[list[int], list[int]]:
        """``<fake_token_around_image><global-img>`` before and ``<fake_token_around_image>``
        after: how the processor writes an unsplit image, around a shortened image's tokens."""
        tok = self.tokenizer
        fake = tok.convert_tokens_to_ids(getattr(self.processor, "fake_image_token", "<fake_token_around_image>"))
        glob = tok.convert_tokens_to_ids(getattr(self.processor, "global_image_token", "<global-img>"))
        return [int(fake), int(glob)], [int(fake)]

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(tile_size=self.tile_size, scale_factor=self.scale_factor,
                   tokens_per_tile=self.tokens_per_side**2)
        return out


def image_seq_len(config: Any) -> int:
    """Tokens per frame of a SmolVLM config: ``((image_size // patch_size) / scale_factor) ** 2``."""
    vc = config.vision_config
    return int((int(vc.image_size) // int(vc.patch_size)) ** 2 // int(config.scale_factor) ** 2)


def _field(size: Any, key: str) -> Any:
    """``size[key]`` for a dict, ``size.key`` for a transformers ``SizeDict``."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


__all__ = ["SmolVLMAdapter", "SplitLayout", "image_text_processor_class", "longest_edge_size", "tile_canvas_size"]
