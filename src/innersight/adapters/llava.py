"""LLaVA-1.5 (``LlavaForConditionalGeneration``, llava-hf checkpoints).

Image -> CLIP ViT (penultimate layer, CLS dropped) -> MLP projector -> one LM token per patch,
row-major over a square grid (24x24 for 336 px / patch 14). llava-hf's processor resizes the
shortest edge and centre-crops, so on a non-square image the grid covers only the central
square; a ``do_pad`` processor pads to a square instead (grid covers more than the image).
"""

from __future__ import annotations

from typing import Any

from ..prompts import split_answer_format, with_answer_format
from .base import Adapter, Batch
from .geometry import GridView, processed_region, row_major_index


class LlavaModules:
    """What the LLaVA families share beyond the base's module accessors: llava-hf's prompt
    template and their text and map facet (prefix sharing)."""

    model: Any
    # llava-hf's documented prompt format, no system prompt (LLaVA-NeXT's reference; LLaVA-1.5
    # overrides it with ViCrop's reference prompt)
    reference_template = "USER: {images}{question} ASSISTANT:"

    # ------------------------------------------------------------------ text and map facet
    @property
    def prefix_image_inputs(self) -> tuple[str, ...]:
        """Prompt positions are plain counts and the CLIP features do not read the prompt, so a
        common prefix may be encoded once: the images travel in ``pixel_values`` (one row per
        image) and, for LLaVA-NeXT, ``image_sizes`` (one ``(height, width)`` row per image)."""
        return ("pixel_values", "image_sizes")

    # ------------------------------------------------------------------ vision facet
    # CLIP ViT: [CLS] + patches per image (LLaVA-NeXT: per tile), ``self_attn`` with q_proj /
    # k_proj: the base class's defaults. The projector acts token by token, so an image's
    # candidates are its projected patch tokens, gathered from the projector's output.

    @property
    def vision_subset_source(self) -> Any:
        """The projector: its output ``[rows, prefix + P, D]`` holds every patch already projected."""
        return self.projector

    @property
    def vision_subset_prefix(self) -> int:
        """1 when the ``full`` feature strategy keeps the [CLS] before the patches, else 0."""
        return 1 if getattr(self.config, "vision_feature_select_strategy", "default") == "full" else 0


class LlavaAdapter(LlavaModules, Adapter):
    family = "llava"
    architectures = ("LlavaForConditionalGeneration",)
    #: ViCrop's reference prompt for llava-hf LLaVA-1.5 (reference code ``run.py``): the images
    #: first, then ``USER: <question> <instruction>`` and ``ASSISTANT:`` on a new line
    reference_template = "{images}\nUSER: {question}\nASSISTANT:"

    def image_placeholder(self, num_images: int) -> str:
        """``<image>`` per image, with nothing between them (``<image><image>`` in the reference)."""
        return "<image>" * num_images

    def reference_question(self, question: str) -> str:
        """The reference joins the question and its answer-format instruction with a space."""
        core, _, instruction = split_answer_format(question)
        return with_answer_format(core, " ", instruction)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of the vision patch grid."""
        vc = self.config.vision_config
        side = int(vc.image_size) // int(vc.patch_size)
        return side, side

    @property
    def keeps_cls(self) -> bool:
        return getattr(self.config, "vision_feature_select_strategy", "default") == "full"

    def num_image_tokens(self, batch: Batch, image_index: int, size: tuple[int, int]) -> int:
        rows, cols = self.patch_grid
        return rows * cols + (1 if self.keeps_cls else 0)

    def pixel_view(self, batch: Batch, tensor: Any, sample: int) -> tuple[Any, GridView]:
        """``pixel_values`` is [N_images, 3, S, S] in batch order: the sample's first image."""
        first = sum(len(sizes) for sizes in batch.image_sizes[:sample])
        return tensor[first], batch.layouts[sample][0].views[0]

    def views(self, batch: Batch, image_index: int, size: tuple[int, int]) -> tuple[GridView, ...]:
        rows, cols = self.patch_grid
        region = processed_region(size[0], size[1], self.processor.image_processor)
        start = 1 if self.keeps_cls else 0
        return (GridView("base", rows, cols, region, row_major_index(rows, cols, start=start)),)
