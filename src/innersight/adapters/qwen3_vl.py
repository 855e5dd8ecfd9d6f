"""Qwen3-VL (``Qwen3VLForConditionalGeneration``, config ``model_type = "qwen3_vl"``; dense models
only, the MoE variant ``qwen3_vl_moe`` is not covered).

A relative of Qwen2-VL (:mod:`.qwen2_vl`): the same image processor class, token layout and
M-RoPE scheme, with a new vision tower and DeepStack. Per image (transformers 5.x source,
``image_processing_pil_qwen2_vl.py`` and ``modeling_qwen3_vl.py``):

1. ``smart_resize`` stretches the whole image (no crop, no padding) to a height and a width that
   are multiples of ``patch_size * merge_size`` = 16 * 2 = **32** (Qwen2-VL: 28), rounded to the
   nearest multiple, then scaled down or up as a whole if ``h * w`` falls outside
   ``[shortest_edge, longest_edge]`` (the ``size`` of the preprocessor config). A cell of the
   ``R x C`` token grid is ``W / C`` by ``H / R`` original pixels. Pixels are normalised with
   mean = std = 0.5 in the released checkpoints.
2. ``image_grid_thw = [1, h/16, w/16]``; patches are emitted merge-block by merge-block
   (``2 x 2`` patches consecutive, blocks row-major). The vision tower keeps this order in every
   block (full attention, no windows as in Qwen2.5-VL): learned position embeddings interpolated
   bilinearly from a square table plus a 2D rotary embedding, both in block order.
3. The merger concatenates each block's patches after the **last** vision block and projects them
   to one language-model token: ``(h / 32) x (w / 32)`` ``<|image_pad|>`` tokens, row-major.
4. **DeepStack**: for every ``j``, the output of vision block ``deepstack_visual_indexes[j]`` goes
   through its own merger (``deepstack_merger_list[j]``, same 2x2 grouping) and is **added to the
   hidden states of the image positions after decoder layer ``j``**
   (``Qwen3VLTextModel._deepstack_process`` with ``visual_pos_masks``, the image-token mask, and
   ``deepstack_visual_embeds[j]``, ``[N_image_tokens, D]`` in the order of the image tokens). The
   model computes them only from ``pixel_values``: a forward on ``inputs_embeds`` without pixels
   (a spliced prompt) runs without DeepStack unless the caller passes ``visual_pos_masks`` and
   ``deepstack_visual_embeds`` to the language model itself (:meth:`Qwen3VLAdapter.injecting`,
   the family's answer to the base's "decoder injections"). Decoder ``hidden_states`` (from
   ``output_hidden_states``) are recorded at each decoder layer's output, i.e. *before* the
   DeepStack addition of that layer; text positions are never touched.
5. M-RoPE is interleaved (height / width frequencies every third of ``mrope_section``), and an
   image advances the text position by ``max(h, w) / 32`` after it; ``get_rope_index`` takes the
   same arguments as Qwen2-VL's, so :meth:`Qwen2VLAdapter.prompt_positions` serves unchanged.

The decoder is Qwen3's (``q_norm`` / ``k_norm`` on each head before RoPE; an explicit ``head_dim``).

transformers 5.17 vs 5.25: 5.17's ``get_image_features`` returns ``deepstack_features`` as one
tensor per level over all images of the batch, 5.25 as one tuple of per-image tensors per level
(:meth:`Qwen3VLAdapter.deepstack_features` gives the flat form on both); the KV cache argument is
``past_key_values`` on 5.17 and ``cache`` on 5.25 (handled by :mod:`innersight.generation_calls`).
``AutoProcessor`` has no ``qwen3_vl`` entry on either: the processor is found through the
``processor_class`` that the preprocessor config names, and without torchvision it is rebuilt from
its parts exactly as for Qwen2-VL.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import MethodError
from .base import Batch, ImageRows
from .qwen2_vl import Qwen2VLAdapter

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: processor attributes of ``Qwen3VLProcessor`` beyond Qwen2-VL's (set in its own ``__init__``,
#: which the image + text rebuild does not run)
_VISION_MARKERS = {"vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Adapter of Qwen3-VL checkpoints (``Qwen/Qwen3-VL-*``, dense)."""

    family = "qwen3_vl"
    architectures = ("Qwen3VLForConditionalGeneration",)
    processor_class_name: ClassVar[str] = "Qwen3VLProcessor"

    # ------------------------------------------------------------------ loading
    @classmethod
    def rebuild_processor(cls, path: str, **kwargs: Any) -> Any:
        """Qwen2-VL's rebuild, plus the vision start / end markers that ``Qwen3VLProcessor``
        defines in its own ``__init__`` (it reads them when it expands videos)."""
        processor = super().rebuild_processor(path, **kwargs)
        tok = processor.tokenizer
        for attr, default in _VISION_MARKERS.items():
            token = getattr(tok, attr, None) or default
            setattr(processor, attr, token)
            setattr(processor, f"{attr}_id", tok.convert_tokens_to_ids(token))
        return processor

    # ------------------------------------------------------------------ DeepStack
    @property
    def deepstack_vision_layers(self) -> tuple[int, ...]:
        """Indices into :attr:`vision_layers` whose outputs feed the DeepStack mergers, in the
        order of the decoder layers they are added after (``deepstack_visual_indexes``)."""
        return tuple(int(i) for i in self.config.vision_config.deepstack_visual_indexes)

    @property
    def deepstack_decoder_layers(self) -> tuple[int, ...]:
        """Decoder layers after which DeepStack features are added to the image positions:
        ``0 .. len(deepstack_visual_indexes) - 1``."""
        return tuple(range(len(self.deepstack_vision_layers)))

    @property
    def projector_vision_layers(self) -> tuple[int, ...]:
        """Every vision layer whose output reaches the language model, ascending: the DeepStack
        levels and the last block (the main merger's input). The deepest, the last block, is
        :attr:`projector_vision_layer`."""
        return tuple(sorted({*self.deepstack_vision_layers, len(self.vision_layers) - 1}))

    def deepstack_features(self, image_outputs: Any) -> list[torch.Tensor]:
        """The DeepStack features of a ``get_image_features`` output, one ``[N_tokens, D]``
        tensor per level, rows in image-token order over all images (the flat form the language
        model adds at ``visual_pos_masks``), on transformers 5.17 and 5.25 alike."""
        import torch

        levels = image_outputs.deepstack_features
        return [torch.cat(list(level), dim=0) if isinstance(level, (list, tuple)) else level for level in levels]

    # ------------------------------------------------------------------ decoder injections
    # DeepStack is the family's decoder injection (base.py, "decoder injections"): level j of an
    # image token is added to its hidden state after decoder layer j. The model computes the rows
    # only from pixels; a built prompt on ``inputs_embeds`` gets them through :meth:`injecting`,
    # a forward pre-hook on the language model that sets the two arguments
    # ``Qwen3VLModel.forward`` passes it explicitly (``visual_pos_masks``,
    # ``deepstack_visual_embeds``; the same on transformers 5.17 and 5.25, so they cannot travel
    # through the outer model's ``**kwargs``).

    @property
    def image_injection_layers(self) -> tuple[int, ...]:
        """The DeepStack decoder layers (:attr:`deepstack_decoder_layers`)."""
        return self.deepstack_decoder_layers

    def image_rows(self, batch: Batch, pixel_values: torch.Tensor) -> list[ImageRows]:
        """One ``get_image_features`` call: each image's merged tokens ``[n_i, D]`` and its
        DeepStack rows ``[S, n_i, D]`` (the levels of the same call, split per image)."""
        import torch

        extra = {name: batch.inputs.get(name) for name in self.image_feature_inputs}
        out = self.model.get_image_features(pixel_values, **extra, return_dict=True)
        feats = [f.reshape(-1, f.shape[-1]) for f in out.pooler_output]  # N x [n_i, D]
        levels = torch.stack(self.deepstack_features(out))  # [S, N_tokens, D]
        return [ImageRows(f, rows) for f, rows in zip(feats, self._split_tokens(levels, feats))]

    def vision_candidate_injections(self, batch: Batch, output: Any) -> list[torch.Tensor]:
        """The DeepStack rows ``[S, M_i, D]`` of each image's merged tokens, from the vision
        tower's output (``deepstack_features``: one ``[M_total, D]`` per level, row-major per image:
        the tower has no windows, so tower order is the merged grid's)."""
        import torch

        levels = torch.stack(self.deepstack_features(output))  # [S, M_total, D]
        return self._split_tokens(levels, self.vision_candidates(batch, output))

    def language_model_injections(self, call_kwargs: dict[str, Any]) -> torch.Tensor | None:
        """The call's ``deepstack_visual_embeds`` stacked ``[S, N, D]`` (None on a call without)."""
        import torch

        levels = call_kwargs.get("deepstack_visual_embeds")
        return None if levels is None else torch.stack(list(levels))

    @contextlib.contextmanager
    def injecting(self, ids: torch.Tensor, injected: torch.Tensor | None) -> Iterator[None]:
        """A forward pre-hook (run before any other) on the language model that passes
        ``visual_pos_masks = ids == image_token_id`` [B, L] and ``deepstack_visual_embeds`` (the
        ``S`` levels of ``injected``, each ``[N, D]`` in mask order) to the forward run inside the
        block, which must be on a prompt of ``ids``' shape carrying no DeepStack of its own."""
        if injected is None:
            yield
            return
        mask = ids == int(self.image_token_id)  # [B, L]
        levels = len(self.image_injection_layers)
        if injected.dim() != 3 or injected.shape[0] != levels or injected.shape[1] != int(mask.sum()):
            raise MethodError(f"{self.family}: DeepStack rows {tuple(injected.shape)} do not fit {levels} levels "
                              f"x {int(mask.sum())} image positions")

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            embeds = kwargs.get("inputs_embeds")
            if embeds is None or tuple(embeds.shape[:2]) != tuple(mask.shape):
                raise MethodError(f"{self.family}: DeepStack rows were given for a prompt of shape "
                                  f"{tuple(mask.shape)} but the language model ran another")
            if kwargs.get("deepstack_visual_embeds") is not None:
                raise MethodError(f"{self.family}: the forward already carries DeepStack features (pixels given?)")
            kwargs["visual_pos_masks"] = mask.to(embeds.device)
            kwargs["deepstack_visual_embeds"] = list(injected.to(embeds.device).unbind(0))
            return args, kwargs

        handle = self.language_model.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def residual_additions(self) -> Iterator[Callable[[int], tuple[torch.Tensor, torch.Tensor] | None]]:
        """Records the ``visual_pos_masks`` and ``deepstack_visual_embeds`` of each language-model
        call (a pre-hook that runs after :meth:`injecting`'s); ``added(j)`` gives level ``j``'s
        mask and rows for decoder layer ``j`` of the latest call, None for other layers and for
        calls without DeepStack (decoding steps)."""
        seen: dict[str, Any] = {}

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen["mask"] = kwargs.get("visual_pos_masks")
            seen["levels"] = kwargs.get("deepstack_visual_embeds")

        def added(layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
            mask, levels = seen.get("mask"), seen.get("levels")
            if mask is None or levels is None or not 0 <= layer < len(levels):
                return None
            return mask, levels[layer]

        handle = self.language_model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield added
        finally:
            handle.remove()

    def _split_tokens(self, levels: torch.Tensor, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """``levels`` [S, N_total, D] cut per image along the tokens, as ``feats`` (N x [n_i, D]) are."""
        counts = [int(f.shape[0]) for f in feats]
        if sum(counts) != levels.shape[1]:
            raise MethodError(f"{self.family}: {levels.shape[1]} DeepStack rows for {sum(counts)} image tokens")
        return list(levels.split(counts, dim=1))

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(deepstack_vision_layers=list(self.deepstack_vision_layers),
                   deepstack_decoder_layers=list(self.deepstack_decoder_layers))
        return out
