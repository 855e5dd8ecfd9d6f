"""Gemma 3 (``Gemma3ForConditionalGeneration``, ``google/gemma-3-{4b,12b,27b}-it``; config
``model_type = "gemma3"``).

Per image (transformers 5.x source, ``image_processing_pil_gemma3.py``, ``processing_gemma3.py``
and ``modeling_gemma3.py``):

1. The image processor stretches the *whole* image to ``size`` (896x896 in the released
   checkpoints; no crop, no padding), so the token grid covers exactly the original image.
2. SigLIP (no CLS token) cuts ``s x s`` patches, ``s = image_size // patch_size`` (64 for 896 /
   14); the projector reads ``last_hidden_state`` (``post_layernorm`` of the last layer's output:
   :attr:`Gemma3Adapter.vision_feature_layer` is -1), reshapes it to the ``s x s`` grid,
   average-pools it with a ``k x k`` kernel and stride ``k``, ``k = s // t``,
   ``t = sqrt(mm_tokens_per_image)`` (16 for 256 tokens, so ``k = 4``), RMS-norms and projects. So
   an image is ``t * t`` language-model tokens, row-major, and token ``(r, c)`` is the mean of
   patches ``r*k .. r*k+k-1`` x ``c*k .. c*k+k-1``: a cell of the ``t x t`` grid is ``W / t`` by
   ``H / t`` original pixels (:meth:`Gemma3Adapter.vision_patch_token_index` maps patches to tokens).
3. The user text holds one ``<start_of_image>`` (boi) per image; the processor replaces it with
   ``processor.full_image_sequence`` = ``"\\n\\n<start_of_image>" + "<image_soft_token>" * t*t +
   "<end_of_image>\\n\\n"``. ``config.image_token_id`` is the soft token (``processor.image_token``
   and ``processor.image_token_id`` name the *boi* token, the placeholder of the text). The
   processor also returns ``token_type_ids`` (1 at the soft tokens).
4. **Bidirectional image attention.** With ``token_type_ids`` the model builds masks where the
   tokens of one image block attend to each other both ways (``OR(causal, blockwise)`` in global
   layers, ``AND(sliding window, OR(causal, blockwise))`` in sliding-window layers); without them
   the mask is purely causal. ``generate`` passes them at prefill only. Anything that runs the
   model on a prompt it builds itself must pass ``token_type_ids = (input_ids == image_token_id)``
   (:meth:`Gemma3Adapter.token_type_ids`) to see the images as the model was trained to.
5. Optional **pan-and-scan** (``do_pan_and_scan``, off by default; ``Gemma3Processor``'s own
   defaults override the image processor's saved values, so the adapter passes the settings on
   every call, :attr:`Gemma3Adapter.pan_and_scan_settings`): an image whose aspect ratio is
   at least ``pan_and_scan_min_ratio_to_activate`` is also cut into 2..``max_num_crops`` equal
   crops along its long side, each stretched to ``size`` and given its own full image sequence
   after the original's, with text between (``"Here is the original image ... and here are some
   crops to help you see better ..."``). The adapter reports the crops as extra views
   (``crop0``, ``crop1``...) whose regions follow ``pan_and_scan``'s arithmetic.

The text model scales token embeddings by ``sqrt(hidden_size)`` inside ``embed_tokens`` (image
features are not scaled); ``Gemma3ForConditionalGeneration`` applies no ``final_logit_softcapping``
to its logits in transformers 5.17 or 5.25 (only the text-only ``Gemma3ForCausalLM`` does), so the
early-exit logits of a layer are ``lm_head(norm(h))`` as for the other families.

The chat template starts with ``<bos>`` and the tokenizer adds one more: :meth:`Gemma3Adapter._process`
drops a leading ``<bos>`` from each prompt, so every sample starts with exactly one.

transformers 5.17 vs 5.25: the same token arithmetic and masks; 5.25 renames ``past_key_values`` to
``cache`` (the old name still accepted), returns ``image_outputs`` instead of
``image_hidden_states``, and ``Gemma3Processor`` counts boi placeholders per prompt
(``validate_inputs``) where 5.17 compared them with the images per prompt; both refuse a mismatch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import UnsupportedModelError
from .base import NO_VISION_CLS, Adapter, Batch
from .geometry import Box, GridView, row_major_index

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: the official Gemma 3 chat format for one user turn with images, written out literally
GEMMA3_REFERENCE_TEMPLATE = "<bos><start_of_turn>user\n{images}{question}<end_of_turn>\n<start_of_turn>model\n"

#: ``Gemma3Processor``'s pan-and-scan defaults (transformers 5.17 and 5.25), which it applies over
#: the image processor's saved values unless a call passes them
PAN_AND_SCAN_DEFAULTS: dict[str, Any] = {
    "do_pan_and_scan": False,
    "pan_and_scan_min_crop_size": 256,
    "pan_and_scan_max_num_crops": 4,
    "pan_and_scan_min_ratio_to_activate": 1.2,
}


def pan_and_scan_boxes(width: int, height: int, min_crop_size: int, max_num_crops: int,
                       min_ratio_to_activate: float) -> list[Box]:
    """Boxes (original pixels) of the pan-and-scan crops of a ``width x height`` image, in the
    processor's order (row-major), empty when it makes none.

    Same arithmetic as ``Gemma3ImageProcessorPil.pan_and_scan``: ``floor(ratio + 0.5)`` crops along
    the long side, at most ``long // min_crop_size`` and in ``[2, max_num_crops]``; crop sides are
    ``ceil``-ed, the last crop clipped at the image edge; no crops when the ratio is below
    ``min_ratio_to_activate`` or a crop would be smaller than ``min_crop_size``.
    """
    if width >= height:
        if width / height < min_ratio_to_activate:
            return []
        n_w = min(int(math.floor(width / min_crop_size)), int(math.floor(width / height + 0.5)))
        n_w, n_h = min(max_num_crops, max(2, n_w)), 1
    else:
        if height / width < min_ratio_to_activate:
            return []
        n_h = min(int(math.floor(height / min_crop_size)), int(math.floor(height / width + 0.5)))
        n_w, n_h = 1, min(max_num_crops, max(2, n_h))
    crop_w, crop_h = int(math.ceil(width / n_w)), int(math.ceil(height / n_h))
    if min(crop_w, crop_h) < min_crop_size:
        return []
    return [
        (float(x), float(y), float(min(x + crop_w, width)), float(min(y + crop_h, height)))
        for y in (crop_h * i for i in range(n_h))
        for x in (crop_w * j for j in range(n_w))
    ]


class Gemma3Adapter(Adapter):
    """Adapter of Gemma 3 vision-language checkpoints (``google/gemma-3-*-it``)."""

    family = "gemma3"
    architectures = ("Gemma3ForConditionalGeneration",)
    #: no paper evaluated Gemma 3: ``reference`` is the official chat format, written out literally
    reference_template = GEMMA3_REFERENCE_TEMPLATE

    def __init__(self, model: Any, processor: Any):
        super().__init__(model, processor)
        s, t = self.patches_per_side, self.tokens_per_side
        if t * t != int(self.config.mm_tokens_per_image) or s % t:
            raise UnsupportedModelError(
                f"gemma3: mm_tokens_per_image {self.config.mm_tokens_per_image} is not a square grid that "
                f"divides the {s}x{s} patch grid; the projector cannot pool it"
            )

    # ------------------------------------------------------------------ modules
    # language_model, vision_tower (SigLIP: no CLS, no pooling head) and projector
    # (Gemma3MultiModalProjector: average pool, RMS norm, linear map): the base's accessors

    @property
    def vision_post_layernorm(self) -> Any:
        """The LayerNorm SigLIP applies to its last layer's output before the projector reads it
        (``SiglipVisionModel`` holds it directly in transformers 5.x; older layouts nest it under
        ``vision_model``)."""
        tower = self.vision_tower
        return getattr(tower, "vision_model", tower).post_layernorm

    @property
    def vision_feature_layer(self) -> int:
        """-1: the projector reads ``last_hidden_state`` (no layer choice in Gemma 3)."""
        return -1

    @property
    def projector_vision_layers(self) -> tuple[int, ...]:
        """The projector reads ``post_layernorm`` of the last SigLIP layer's output."""
        return (len(self.vision_layers) - 1,)

    # ------------------------------------------------------------------ geometry
    @property
    def patches_per_side(self) -> int:
        """``s``: SigLIP patches along one side of the (square) processed image."""
        vc = self.config.vision_config
        return int(vc.image_size) // int(vc.patch_size)

    @property
    def tokens_per_side(self) -> int:
        """``t``: language-model tokens along one side of an image's grid (``sqrt(mm_tokens_per_image)``)."""
        return math.isqrt(int(self.config.mm_tokens_per_image))

    @property
    def pool_kernel(self) -> int:
        """``k``: side of the block of patches averaged into one language-model token."""
        return self.patches_per_side // self.tokens_per_side

    @property
    def tokens_per_view(self) -> int:
        """Soft tokens of one image sequence (the original image or one pan-and-scan crop)."""
        return self.tokens_per_side**2

    @property
    def pan_and_scan_settings(self) -> dict[str, Any]:
        """The pan-and-scan arguments every processor call gets: the image processor's own value of
        each where it is set, else ``Gemma3Processor``'s default (off; min crop 256 px, at most 4
        crops, from aspect ratio 1.2). ``Gemma3Processor`` would otherwise override the image
        processor's saved values with its defaults; passing them makes one source for the
        processing and for :meth:`crop_boxes`. Set ``processor.image_processor.do_pan_and_scan =
        True`` to switch crops on."""
        ip = self.processor.image_processor
        out = {}
        for key, default in PAN_AND_SCAN_DEFAULTS.items():
            value = getattr(ip, key, None)
            out[key] = type(default)(default if value is None else value)
        return out

    def crop_boxes(self, size: tuple[int, int]) -> list[Box]:
        """Pan-and-scan crops the processor makes for an image of ``size`` (none when off)."""
        cfg = self.pan_and_scan_settings
        if not cfg["do_pan_and_scan"]:
            return []
        return pan_and_scan_boxes(int(size[0]), int(size[1]), cfg["pan_and_scan_min_crop_size"],
                                  cfg["pan_and_scan_max_num_crops"], cfg["pan_and_scan_min_ratio_to_activate"])

    # ------------------------------------------------------------------ prompts and inputs
    def image_placeholder(self, num_images: int) -> str:
        """One ``<start_of_image>`` per image (the processor expands it to the full image sequence)."""
        return str(self.processor.boi_token) * num_images

    def _process(self, flat_images: list, prompts: list[str], counts: list[int]) -> Any:
        """The processor's inputs, with one ``<bos>`` per sample (the chat template writes one and
        the tokenizer adds one, so a leading ``<bos>`` is dropped from each prompt first), images
        nested per sample, and pan-and-scan as :attr:`pan_and_scan_settings` say."""
        bos = self.tokenizer.bos_token
        if bos:
            prompts = [p.removeprefix(str(bos)) for p in prompts]
        kwargs: dict[str, Any] = {"text": prompts, "return_tensors": "pt", "padding": True}
        if flat_images:
            # nested per sample: Gemma3Processor (5.25) counts the images of each prompt, and a flat
            # list reads as all images belonging to the first prompt
            starts = [sum(counts[:b]) for b in range(len(counts))]
            kwargs["images"] = [flat_images[start:start + n] for start, n in zip(starts, counts)]
            kwargs.update(self.pan_and_scan_settings)  # the settings crop_boxes reads
        return self.processor(**kwargs)

    def token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``token_type_ids`` [B, L] for ``input_ids`` [B, L]: 1 at image soft tokens. The model makes
        each image's tokens attend to each other bidirectionally only when these are passed."""
        return (input_ids == self.image_token_id).long()

    def built_prompt_inputs(self, ids: torch.Tensor, mask: torch.Tensor, batch: Batch | None) -> dict[str, Any]:
        """``token_type_ids`` of a prompt a method built (a spliced or noised image, outlier tokens,
        the image-free branch): without them the model attends to the image block causally, a
        silently different model from the one its processor's prompts run."""
        return {"token_type_ids": self.token_type_ids(ids)}

    # ------------------------------------------------------------------ layouts
    def num_image_tokens(self, batch: Batch, image_index: int, size: tuple[int, int]) -> int:
        """``t * t`` soft tokens for the image and as many again per pan-and-scan crop."""
        return self.tokens_per_view * (1 + len(self.crop_boxes(size)))

    def views(self, batch: Batch, image_index: int, size: tuple[int, int]) -> tuple[GridView, ...]:
        """``base``: the ``t x t`` token grid over the whole image (stretched, no crop); then one
        ``crop<i>`` view per pan-and-scan crop, whose tokens follow the previous view's."""
        t, n = self.tokens_per_side, self.tokens_per_view
        base = GridView("base", t, t, (0.0, 0.0, float(size[0]), float(size[1])), row_major_index(t, t))
        crops = tuple(
            GridView(f"crop{i}", t, t, box, row_major_index(t, t, start=(i + 1) * n))
            for i, box in enumerate(self.crop_boxes(size))
        )
        return (base, *crops)

    def pixel_view(self, batch: Batch, tensor: torch.Tensor, sample: int) -> tuple[torch.Tensor, GridView]:
        """``pixel_values`` is ``[N_views, 3, S, S]``: per image of the batch the original, then its
        crops. Sample ``sample``'s first image (its original view) and the ``base`` view."""
        first = sum(len(layout.views) for layouts in batch.layouts[:sample] for layout in layouts)
        return tensor[first], batch.layouts[sample][0].views[0]

    def vision_patch_token_index(self, batch: Batch | None = None, image_index: int = 0) -> torch.Tensor:
        """For each SigLIP patch of one view (row-major ``s x s``, the vision tower's order), the
        index of the language-model token (row-major ``t x t``) whose average pool it enters. ``[s*s]``."""
        import torch

        s, k, t = self.patches_per_side, self.pool_kernel, self.tokens_per_side
        rows = torch.arange(s).div(k, rounding_mode="floor")  # [s]
        return (rows[:, None] * t + rows[None, :]).flatten()  # [s * s]

    # ------------------------------------------------------------------ vision facet
    # SigLIP has no [CLS] (the base's check finds no class_embedding: DAMRO's documented substitute,
    # the attention each patch receives, ranks the patches) and runs one ``[N_views, s*s, D]``
    # sequence per view: each image's original, then its pan-and-scan crops. The projector
    # average-pools ``k x k`` patches into each language-model token, so an image's candidates are
    # the ``t*t`` tokens of its original view, read from the projector's output (already projected:
    # re-encoding a subset is the subset itself, the base's answer), and per-patch scores are
    # averaged over each token's patches.

    #: SigLIP has no [CLS] (class-level statement for ``innersight list``)
    substitutes: ClassVar[dict[str, str]] = {"vision_has_cls": NO_VISION_CLS}

    def views_per_image(self, batch: Batch) -> list[int]:
        """Sequences the vision tower runs for each image of ``batch`` (flat): the original plus one
        per pan-and-scan crop."""
        return [1 + len(self.crop_boxes(size)) for sizes in batch.image_sizes for size in sizes]

    def _view_starts(self, batch: Batch, rows: int, what: str) -> list[int]:
        """First row of each image among ``rows`` vision rows (``[N_views, ...]``); a row count
        that is not the batch's views is a clear error."""
        from ..errors import MethodError

        counts = self.views_per_image(batch)
        if sum(counts) != rows:
            raise MethodError(f"{self.family}: {what} hold {rows} views but the batch's images have {sum(counts)}")
        return [sum(counts[:i]) for i in range(len(counts))]

    def scored_vision_rows(self, batch: Batch, rows: int) -> torch.Tensor:
        """Each image's original view: the first of its rows (the crops follow it)."""
        import torch

        return torch.tensor(self._view_starts(batch, rows, "the vision tower's rows"), dtype=torch.long)

    def pool_vision_scores(self, batch: Batch, image_index: int, scores: torch.Tensor) -> torch.Tensor:
        """The mean score of the ``k x k`` patches average-pooled into each language-model token:
        ``[s*s]`` row-major patches -> ``[t*t]`` row-major tokens (:meth:`vision_patch_token_index`)."""
        import torch

        owner = self.vision_patch_token_index(batch, image_index).to(scores.device)  # [s*s]
        sums = torch.zeros(self.tokens_per_view, device=scores.device).index_add_(0, owner, scores.float())  # [t*t]
        return sums / float(self.pool_kernel**2)

    @property
    def vision_subset_source(self) -> Any:
        """The projector: its output ``[N_views, t*t, D]`` holds every view's tokens, projected."""
        return self.projector

    def image_features(self, batch: Batch, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Per image: the tokens of its original view and then of each crop, ``[n_i, D]`` (the
        prompt's order; ``get_image_features`` gives one row per view)."""
        import torch

        rows = self.model.get_image_features(pixel_values, return_dict=True).pooler_output  # [N_views, t*t, D]
        starts = self._view_starts(batch, int(rows.shape[0]), "the image features")
        counts = self.views_per_image(batch)
        return [torch.cat(list(rows[a:a + n]), dim=0) for a, n in zip(starts, counts)]

    def vision_input_index(self, batch: Batch, image_index: int) -> int | slice:
        """The image's rows of ``pixel_values`` ``[N_views, 3, S, S]``: one row (its index) without
        crops, else the original's row and its crops' rows."""
        starts = self._view_starts(batch, int(batch.inputs["pixel_values"].shape[0]), "pixel_values")
        count = self.views_per_image(batch)[image_index]
        start = starts[image_index]
        return start if count == 1 else slice(start, start + count)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(mm_tokens_per_image=self.tokens_per_view, patches_per_side=self.patches_per_side,
                   pool_kernel=self.pool_kernel,
                   sliding_window=getattr(self.text_config, "sliding_window", None))
        return out
