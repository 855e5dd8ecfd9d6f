"""The adapter contract: every architecture fact a method may need, in one place per family.

Methods never hard-code 576 tokens, a 24x24 grid, a layer index or a module path: they ask the
adapter. An adapter wraps a loaded model and its processor and answers

* which modules are the vision tower, the decoder layers, the final norm and the LM head;
* how many layers / heads / KV heads the decoder has;
* how to format a prompt with one or more images, and how to batch inputs (left padding);
* which sequence positions hold each image's tokens and which pixel region of the original
  image each token covers (:class:`ImageLayout`);
* the text and map facet: which module generates without an image, how the image tokens land on
  an image grid (:class:`TokenGrid`), and whether a prompt's prefix may be encoded once.

Some facets are *optional* (:data:`OPTIONAL_MEMBERS`: the base refuses, a family provides them by
overriding) or assume something a family's models may lack (:data:`FAMILY_FACTS`: the family states
its documented substitute in :attr:`Adapter.substitutes`). :meth:`Adapter.support` answers, from
the class alone (no model), how the family serves each facet; ``innersight list`` builds its
method x family matrix from it (:mod:`innersight.support`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import MethodError, UserInputError
from .geometry import GridView

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

TEMPLATES = ("chat", "reference")

#: optional members of the contract: the base refuses with this reason (after the family's name) and
#: a family provides the member by overriding it; a method that needs one names it in
#: ``MethodSpec.needs`` and ``innersight list`` shows the reason where a family lacks it
OPTIONAL_MEMBERS: dict[str, str] = {
    "pixel_view": "no pixel-space view of its images (pixel_view): pixel-space maps (pure-grad) are not available",
    "vision_subset_source": "names no module whose output holds an image's candidate tokens (vision_subset_source): "
                            "a subset of them cannot be re-encoded (DAMRO's negative image)",
}

#: what a family's models may lack: fact -> what it assumes. Each fact is named after the boolean
#: adapter property that answers it on a loaded model; a family whose models lack it states its
#: documented substitute in :attr:`Adapter.substitutes` under that name (and the property is False)
FAMILY_FACTS: dict[str, str] = {
    "vision_has_cls": "a [CLS] token in the vision encoder whose attention row ranks the patches",
}

#: the documented substitute of a vision encoder without [CLS] (DAMRO, outlier-overlap), for
#: :attr:`Adapter.substitutes`
NO_VISION_CLS = "no [CLS]; ranks patches by the mean attention they receive (an extension beyond the paper)"

#: how a family serves a facet (:meth:`Adapter.support`)
SUPPORT_LEVELS = ("yes", "substitute", "refuses")
#: invisible, zero-width; breaks a control-token string in user text into plain characters
WORD_JOINER = "\u2060"


@dataclass(frozen=True)
class ImageLayout:
    """Where one image lives in one sample's token sequence, and what each token covers.

    ``positions`` are the sequence positions (after padding) of the image's language-model
    tokens, in the order the model receives them. ``views[0]`` is the base (global) view; models
    with tiles add more views. ``size`` is the original image's (width, height).
    """

    positions: torch.Tensor  # [T_img] long
    size: tuple[int, int]
    views: tuple[GridView, ...]

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())


@dataclass(frozen=True)
class TokenGrid:
    """How one image's language-model tokens land on an image grid (:meth:`Adapter.token_grid`).

    ``weights`` None: each token is one cell of ``view`` (``view.token_index``; patch tokens).
    Otherwise ``[T_img, rows * cols]`` fp32 (``T_img`` the image's tokens in layout order, the
    cells row-major over ``view``): a value per token maps to the grid as ``values @ weights``
    (InstructBLIP: each query token's cross-attention over the ViT patches)."""

    view: GridView
    weights: torch.Tensor | None = None


@dataclass(frozen=True)
class ImageRows:
    """What stands for one image in a prompt a method builds (:meth:`Adapter.image_rows`): the
    input embeddings of its ``n`` language-model tokens and, for a family whose decoder adds
    per-token image rows to the hidden states of the image positions *inside* the stack
    (Qwen3-VL's DeepStack), those rows: ``injected[j]`` is added after decoder layer
    :attr:`Adapter.image_injection_layers` ``[j]``. ``injected`` None: the family adds nothing."""

    embeds: torch.Tensor  # [n, D]
    injected: torch.Tensor | None = None  # [S, n, D]

    @property
    def num_tokens(self) -> int:
        return int(self.embeds.shape[0])


def token_grid_view(layout: ImageLayout) -> GridView:
    """The view a token map is drawn on: the finest of ``layout``'s views whose cells are
    language-model tokens (LLaVA-NeXT: the high-resolution view rather than the base view)."""
    views = [v for v in layout.views if v.token_index is not None]
    if not views:
        raise MethodError("this model's image tokens do not form a patch grid; use a family-specific map")
    return max(views, key=lambda v: v.rows * v.cols)


@dataclass
class Batch:
    """Model inputs for a batch of samples plus what is needed to interpret them."""

    inputs: dict[str, Any]  # BatchFeature: input_ids [B, L], attention_mask [B, L], pixel_values, ...
    prompts: list[str]
    image_sizes: list[list[tuple[int, int]]]  # per sample, per image: original (width, height)
    layouts: list[list[ImageLayout]] = field(default_factory=list)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]

    def __len__(self) -> int:
        return len(self.prompts)


def _equal_inputs(a: Any, b: Any) -> bool:
    """Equal model inputs: tensors of the same shape and values, anything else by ``==``."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and torch.equal(a.cpu(), b.cpu()))
    return bool(a == b)


class Adapter(ABC):
    """Base class of the per-family adapters. Subclasses set the class variables and override
    the abstract methods; everything that is common to decoder-only LLM backbones lives here."""

    family: ClassVar[str]
    #: names of the transformers model classes this adapter handles
    architectures: ClassVar[tuple[str, ...]]
    #: the paper-reference prompt template (``{image}`` stands for one image placeholder each)
    reference_template: ClassVar[str] = "{images}{question}"
    #: the documented substitutes this family uses where its models lack a :data:`FAMILY_FACTS`
    #: fact: fact -> one line (``{"vision_has_cls": NO_VISION_CLS}`` for a vision encoder without
    #: [CLS]). Class-level, so that ``innersight list`` reads it without a model; the instance
    #: facts (:attr:`vision_has_cls`) must agree on the family's models (tests/test_support_matrix.py)
    substitutes: ClassVar[dict[str, str]] = {}

    def __init__(self, model: Any, processor: Any):
        self.model = model
        self.processor = processor
        tok = self.tokenizer
        if tok is not None:
            tok.padding_side = "left"
            if tok.pad_token is None and tok.eos_token is not None:
                tok.pad_token = tok.eos_token

    # ------------------------------------------------------------------ loading
    @classmethod
    def model_class(cls) -> Any:
        """The transformers class that loads this family's checkpoints."""
        import transformers

        return getattr(transformers, cls.architectures[0])

    @classmethod
    def load_processor(cls, path: str, **kwargs: Any) -> Any:
        """Load the processor saved beside the model (offline-safe; no torchvision needed):
        ``AutoProcessor`` when it works; otherwise the processor a family rebuilds from the
        checkpoint's parts (:meth:`rebuild_processor`; e.g. a stock processor that also builds a video
        processor, which needs torchvision); a family with no rebuild re-raises ``AutoProcessor``'s error."""
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(path, **kwargs)
        except Exception as exc:  # ImportError, AttributeError, ValueError... depending on the version
            log.info("AutoProcessor failed for %s (%s); trying the family's image + text rebuild", path, exc)
            try:
                rebuilt = cls.rebuild_processor(path, **kwargs)
            except Exception as rebuild_exc:
                raise rebuild_exc from exc
            if rebuilt is None:
                raise
            return rebuilt

    @classmethod
    def rebuild_processor(cls, path: str, **kwargs: Any) -> Any:
        """The image + text processor built from a checkpoint's parts where ``AutoProcessor``
        cannot build the stock one here; None (the base): this family has no such rebuild."""
        return None

    # ------------------------------------------------------------------ facet support (class-level)
    @classmethod
    def implements(cls, member: str) -> bool:
        """Whether this family provides the optional member ``member`` (:data:`OPTIONAL_MEMBERS`):
        some class between it and :class:`Adapter` overrides the base's refusal."""
        if member not in OPTIONAL_MEMBERS:
            raise ValueError(f"{member!r} is no optional adapter member; optional: {', '.join(OPTIONAL_MEMBERS)}")
        return getattr(cls, member) is not getattr(Adapter, member)

    @classmethod
    def support(cls, facet: str) -> tuple[str, str]:
        """How this family serves ``facet`` (an optional member or a family fact), from the class
        alone: ``("yes", "")``, ``("substitute", the documented substitute)`` or ``("refuses",
        the reason a method that needs it fails with)``. What ``innersight list`` shows."""
        if facet in OPTIONAL_MEMBERS:
            return ("yes", "") if cls.implements(facet) else ("refuses", OPTIONAL_MEMBERS[facet])
        if facet not in FAMILY_FACTS:
            known = ", ".join([*OPTIONAL_MEMBERS, *FAMILY_FACTS])
            raise ValueError(f"unknown facet {facet!r}; facets: {known}")
        return ("substitute", cls.substitutes[facet]) if facet in cls.substitutes else ("yes", "")

    def _missing(self, member: str) -> MethodError:
        """The refusal of optional member ``member`` (its :data:`OPTIONAL_MEMBERS` reason)."""
        return MethodError(f"{self.family}: {OPTIONAL_MEMBERS[member]}")

    # ------------------------------------------------------------------ modules and sizes
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def text_config(self) -> Any:
        return self.model.config.get_text_config()

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", None)

    @property
    def language_model(self) -> Any:
        """The decoder stack without LM head (has ``.layers``, ``.norm``, ``.embed_tokens``): the
        transformers 5.x layout of ``*ForConditionalGeneration``, ``model.model.language_model``."""
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> Any:
        return self.language_model.layers

    @property
    def final_norm(self) -> Any:
        return self.language_model.norm

    @property
    def lm_head(self) -> Any:
        return self.model.lm_head

    @property
    def generation_module(self) -> Any:
        """The module ``generate`` runs one forward of per decoding step (hooks that must see
        every step go here): the whole model, unless a family's ``generate`` delegates."""
        return self.model

    @property
    def vision_tower(self) -> Any:
        """The vision encoder module (transformers 5.x layout: ``model.model.vision_tower``)."""
        return self.model.model.vision_tower

    @property
    def projector(self) -> Any:
        """The module that maps vision features into the language model's embedding space
        (transformers 5.x layout: ``model.model.multi_modal_projector``)."""
        return self.model.model.multi_modal_projector

    @property
    def vision_feature_layer(self) -> int:
        """Index into the vision encoder's ``hidden_states`` that the projector consumes (the
        last of them when the config lists several)."""
        layer = getattr(self.config, "vision_feature_layer", -1)
        return layer if isinstance(layer, int) else layer[-1]

    @property
    def vision_layers(self) -> Any:
        """The vision encoder's list of transformer layers (CLIP / BLIP:
        ``vision_model.encoder.layers`` or ``encoder.layers``; Qwen: ``blocks``)."""
        tower = self.vision_tower
        if hasattr(tower, "blocks"):
            return tower.blocks
        model = getattr(tower, "vision_model", tower)
        encoder = getattr(model, "encoder", None)
        if encoder is None or not hasattr(encoder, "layers"):
            raise MethodError(f"{self.family}: cannot find the vision encoder's layers")
        return encoder.layers

    @property
    def projector_vision_layers(self) -> tuple[int, ...]:
        """0-based indices into :attr:`vision_layers` of the layers whose **outputs** the
        projector consumes, in config order.

        ``hidden_states`` of a vision encoder with ``n`` layers has ``n + 1`` entries: index 0 is
        the patch embeddings and index ``j >= 1`` the output of ``layers[j - 1]``. So LLaVA-1.5's
        ``vision_feature_layer = -2`` on CLIP ViT-L (24 layers) is ``hidden_states[23]``, the
        output of ``layers[22]`` (the penultimate layer). Families whose projector reads the last
        layer override nothing: ``vision_feature_layer = -1`` maps to ``n - 1``.

        Raises:
            MethodError: a configured index that names the patch embeddings (no layer) or lies
                outside ``hidden_states``.
        """
        config = getattr(self.config, "vision_feature_layer", None)
        indices = [self.vision_feature_layer] if config is None or isinstance(config, int) else list(config)
        n = len(self.vision_layers)
        out = []
        for index in indices:
            if not -(n + 1) <= int(index) <= n:
                raise MethodError(f"{self.family}: vision_feature_layer {index} lies outside the {n + 1} hidden states "
                                  f"of a {n}-layer vision encoder")
            hidden = int(index) % (n + 1)
            if hidden == 0:
                raise MethodError(f"{self.family}: vision_feature_layer {index} names the patch embeddings, which "
                                  f"no vision layer outputs")
            out.append(hidden - 1)
        return tuple(out)

    @property
    def projector_vision_layer(self) -> int:
        """The deepest of :attr:`projector_vision_layers`: the vision layer whose output the
        projector consumes (its self-attention is the one DAMRO and the outlier-overlap
        instrument read, arXiv 2410.04514 Sec. 3.3)."""
        return max(self.projector_vision_layers)

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.text_config, "num_key_value_heads", None) or self.num_heads)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.text_config, "head_dim", None) or self.hidden_size // self.num_heads)

    @property
    def crop_base_size(self) -> int:
        """ViCrop's base crop side in original pixels: the vision encoder's input side."""
        return int(getattr(self.config.vision_config, "image_size", None) or 224)

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings (first stage under device_map)."""
        return self.model.get_input_embeddings().weight.device

    # ------------------------------------------------------------------ prompts and inputs
    def format_prompt(self, question: str, num_images: int = 1, template: str = "chat") -> str:
        """The text prompt for ``question`` about ``num_images`` images, ready for the processor.

        ``chat`` uses the processor's chat template when it has one (the model's own format),
        ``reference`` the template the papers evaluated with.
        """
        if not isinstance(question, str):
            raise UserInputError(f"the question must be a string, not {type(question).__name__}")
        if not question.strip():
            raise UserInputError("the question is empty")
        if template not in TEMPLATES:
            raise UserInputError(f"unknown prompt template {template!r}; choose one of {', '.join(TEMPLATES)}")
        question = self.as_plain_text(question)
        if template == "chat" and getattr(self.processor, "chat_template", None):
            content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
            messages = [{"role": "user", "content": content}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if template == "reference":
            question = self.reference_question(question)
        return self.reference_template.format(images=self.image_placeholder(num_images), question=question)

    def reference_question(self, question: str) -> str:
        """The question as the family's ``reference`` template writes it: how a trailing
        answer-format instruction (:data:`innersight.prompts.ANSWER_FORMATS`) attaches to the
        question in the paper's code. The base: as given."""
        return question

    # ------------------------------------------------------------------ user text
    @property
    def text_tokenizers(self) -> tuple[Any, ...]:
        """Every tokenizer that reads the prompt text (InstructBLIP adds its Q-Former's)."""
        found = (self.tokenizer, getattr(self.processor, "qformer_tokenizer", None))
        return tuple(t for t in found if t is not None)

    @functools.cached_property
    def control_strings(self) -> tuple[str, ...]:
        """The strings that the processor or a tokenizer reads as control tokens wherever they
        appear in the text (``<image>``, ``<|image_pad|>``, ``<|vision_start|>``, ``</s>``,
        ``[SEP]``...), longest first."""
        return control_strings(self.text_tokenizers, self.processor)

    def as_plain_text(self, text: str) -> str:
        """``text`` from a user made unable to produce control tokens (see :func:`as_plain_text`)."""
        return as_plain_text(text, self.control_strings, self.text_tokenizers)

    def image_placeholder(self, num_images: int) -> str:
        """Text that stands for ``num_images`` images in a reference-template prompt."""
        return "<image>\n" * num_images

    def prepare(self, images: Sequence[Sequence[Image.Image]], prompts: Sequence[str]) -> Batch:
        """Tokenise a batch (left-padded) and compute every image's layout.

        ``images[b]`` is the list of images of sample ``b`` (in prompt order), ``prompts[b]`` its
        formatted prompt.
        """
        if len(images) != len(prompts):
            raise UserInputError(f"{len(images)} image lists for {len(prompts)} prompts")
        flat = [im for ims in images for im in ims]
        inputs = self._process(flat, list(prompts), [len(ims) for ims in images])
        inputs = inputs.to(self.device)
        sizes = [[tuple(im.size) for im in ims] for ims in images]
        batch = Batch(inputs=inputs, prompts=list(prompts), image_sizes=sizes)
        batch.layouts = self.image_layouts(batch)
        return batch

    def _process(self, flat_images: list, prompts: list[str], counts: list[int]) -> Any:
        kwargs: dict[str, Any] = {"text": prompts, "return_tensors": "pt", "padding": True}
        if flat_images:
            kwargs["images"] = flat_images
        return self.processor(**kwargs)

    # ------------------------------------------------------------------ positions
    def prompt_positions(
        self,
        batch: Batch,
        ids: torch.Tensor,
        mask: torch.Tensor,
        image_tokens: Sequence[Sequence[int]],
        grid_shapes: Sequence[Sequence[tuple[int, int]]] | None = None,
    ) -> torch.Tensor:
        """Position ids, in the layout ``generate`` passes them, of a prompt a method built from
        ``batch`` (spliced or shortened images, another instruction): ``ids`` [B, L] with the image
        token id at each image position, ``mask`` [B, L] left-padded, ``image_tokens[b][i]`` how
        many tokens stand for image ``i`` of sample ``b`` and, where a family places image tokens
        on a grid, ``grid_shapes[b][i] = (rows, cols)``. The base: 1D positions [B, L] as
        ``generate`` makes them (cumsum of the mask - 1, 0 at pads)."""
        positions = mask.long().cumsum(-1) - 1  # [B, L]
        return positions.masked_fill(mask == 0, 0)

    def built_prompt_inputs(self, ids: torch.Tensor, mask: torch.Tensor, batch: Batch) -> dict[str, Any]:
        """Extra model inputs for a prompt a method built from ``batch`` and runs itself (spliced or
        shortened images, the image-free branch, stacked prompts): ``ids`` [B', L] hold the image
        token id at every image position, ``mask`` [B', L] is left-padded. Whatever the model's
        forward needs beyond ids / embeddings, mask and positions to see the prompt as its own
        processor would have built it (Gemma 3: ``token_type_ids`` for bidirectional image
        attention). The base: nothing."""
        return {}

    # ------------------------------------------------------------------ layouts
    def image_layouts(self, batch: Batch) -> list[list[ImageLayout]]:
        """Per sample, per image: the positions of its tokens and the grid views they form."""
        out: list[list[ImageLayout]] = []
        image_offset = 0
        for b in range(len(batch)):
            sizes = batch.image_sizes[b]
            positions = self.image_token_positions(batch, b)
            counts = [self.num_image_tokens(batch, image_offset + i, sizes[i]) for i in range(len(sizes))]
            if sum(counts) != positions.numel():
                raise RuntimeError(
                    f"{self.family}: sample {b} holds {positions.numel()} image tokens but its images "
                    f"need {counts}"
                )
            layouts = []
            start = 0
            for i, size in enumerate(sizes):
                pos = positions[start : start + counts[i]]
                layouts.append(ImageLayout(pos, size, self.views(batch, image_offset + i, size)))
                start += counts[i]
            image_offset += len(sizes)
            out.append(layouts)
        return out

    def image_spans(self, batch: Batch, b: int) -> list[tuple[int, int]]:
        """Per image of sample ``b``: the ``(start, stop)`` sequence span that stands for it, i.e.
        what the processor expanded its placeholder into (image tokens and any text tokens the
        family wraps them in). Removing the span leaves the prompt as if it had no image. The
        base: the image's tokens, which must be one contiguous run."""
        spans = []
        for layout in batch.layouts[b]:
            pos = layout.positions
            if not pos.numel():
                raise MethodError(f"{self.family}: an image of sample {b} has no tokens")
            first, last = int(pos[0]), int(pos[-1])
            if last - first + 1 != pos.numel():
                raise MethodError(f"{self.family}: an image's tokens are not one contiguous run")
            spans.append((first, last + 1))
        return spans

    def image_wrapping(self, num_tokens: int) -> tuple[list[int], list[int]]:
        """The text token ids written before and after ``num_tokens`` image tokens that replace an
        image's whole :meth:`image_spans` span when a method builds a prompt in which the image has
        another token count (DAMRO's ``k`` outlier tokens): what the processor would write around
        an image of that size. Only asked for images whose tokens are not one contiguous run (a
        contiguous run is replaced in place, its surroundings kept). The base: nothing, since its
        span is the image tokens themselves (SmolVLM: the unsplit image's markers)."""
        return [], []

    def image_token_positions(self, batch: Batch, b: int) -> torch.Tensor:
        """Sequence positions of all image tokens of sample ``b`` (all images, in order)."""
        return (batch.input_ids[b] == self.image_token_id).nonzero().flatten()

    @abstractmethod
    def num_image_tokens(self, batch: Batch, image_index: int, size: tuple[int, int]) -> int:
        """How many language-model tokens image ``image_index`` (flat over the batch) becomes."""

    @abstractmethod
    def views(self, batch: Batch, image_index: int, size: tuple[int, int]) -> tuple[GridView, ...]:
        """The grid views of image ``image_index`` (flat over the batch) of original ``size``."""

    # ------------------------------------------------------------------ text and map facet
    # (text-only forward, image tokens on the grid, prefix sharing)
    # What the instruments (prior-overlap, attention-ratio), ViCrop's maps (look/maps.py,
    # look/prefix.py) ask beyond the modules above (decoder_layers, final_norm, lm_head; DeCo and
    # DoLa read only those). The base answers for the common convention: a whole model that runs
    # without pixels, one language-model token per grid cell, no prefix sharing (opt-in, since a
    # wrong yes gives silently wrong maps).

    @property
    def text_only_module(self) -> Any:
        """The module that generates from a prompt holding no image token (``input_ids``,
        ``attention_mask`` only); None where the family has no text-only path (refused with a clear
        error). Used by the prior-overlap instrument (:func:`innersight.instruments.early_exit.generate_without_image`).

        The base: the whole model, whose forward skips the vision path when no ``pixel_values``
        are given. A family whose forward requires an image returns its language model."""
        return self.model

    @property
    def token_grid_blocks(self) -> int:
        """How many blocks :meth:`token_grid` can read its image-token -> grid weights from: 0
        where the image tokens are grid cells themselves (any ``block`` is ignored). Callers check
        a user's block against it before any work (the attention-ratio instrument)."""
        return 0

    @contextlib.contextmanager
    def token_grid(self, block: int = 2) -> Iterator[Callable[[Batch, int], TokenGrid]]:
        """How the language-model tokens of each sample's first image land on an image grid:
        yields ``locate(batch, b) -> TokenGrid`` for sample ``b``. ViCrop's rel-att / grad-att maps
        and the attention-ratio instrument project per-position values through it
        (:func:`innersight.look.maps.grid_projection`).

        Forwards of the model must run *inside* the block where a family records the weights
        during the forward (``locate`` then reads the latest forward); ``locate`` may be called
        inside or after the block. ``block`` chooses where such weights are read (an index into
        :attr:`token_grid_blocks`, negative from the end); a bad block is a clear
        :class:`MethodError`.

        The base (patch tokens): each image token is one cell of the finest view whose cells are
        tokens (:func:`token_grid_view`); no weights, nothing recorded, ``block`` ignored."""

        def locate(batch: Batch, b: int) -> TokenGrid:
            return TokenGrid(token_grid_view(batch.layouts[b][0]))

        yield locate

    @property
    def prefix_image_inputs(self) -> tuple[str, ...]:
        """The batch inputs that carry the images when a prompt's common prefix (holding every
        image token) may be encoded once and continued from its KV cache by several prompts
        (ViCrop rel-att's question / generic pair, :mod:`innersight.look.prefix`); their rows
        (first dimension) are the images', as :meth:`sample_image_inputs` says. Only families whose
        image features do not read the prompt, and whose prompt is continued exactly by a cache and
        the positions of :meth:`batch_positions`, qualify.

        The base: empty, the family cannot share a prefix (the caller runs the joint batch)."""
        return ()

    @property
    def prefix_token_inputs(self) -> tuple[str, ...]:
        """Per-token batch inputs (``[B, L]``, aligned with ``input_ids``) that the shared-prefix
        path may carry: they matter only at image positions, so the prefix pass (which holds every
        image token) gets them sliced like its ids and the suffix pass (which holds none) runs
        without them. A batch holding an input named neither here nor in
        :attr:`prefix_image_inputs` takes the joint batch.

        The base: none (Qwen: ``mm_token_type_ids``, read only to compute M-RoPE positions, which
        :meth:`batch_positions` gives explicitly)."""
        return ()

    def batch_positions(self, batch: Batch) -> torch.Tensor:
        """Position ids of ``batch``'s own prompts as the model computes them for its forward, in
        the layout of :meth:`prompt_positions` (``[B, L]``; ``[4, B, L]`` for M-RoPE: the text row,
        then temporal / height / width). The shared-prefix path slices a prefix's and a suffix's
        positions out of them (:mod:`innersight.look.prefix`), so a suffix run against the
        prefix's cache sees the positions it had in the full prompt.

        Every family: :meth:`prompt_positions` with the batch's ids, mask and image token counts
        (the base: counts of the mask)."""
        ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]  # [B, L]
        counts = [[layout.num_tokens for layout in layouts] for layouts in batch.layouts]
        return self.prompt_positions(batch, ids, mask, counts)

    def sample_image_inputs(self, batch: Batch, n: int) -> dict[str, Any]:
        """The :attr:`prefix_image_inputs` of ``batch``'s first ``n`` samples (the shared-prefix
        pass encodes their images once, :mod:`innersight.look.prefix`).

        The base: one leading row per image, so the first rows, one per image of those samples
        (``[:n]`` for one image per sample). A family with several rows per image (InternVL's
        tiles) overrides it."""
        images = sum(len(sizes) for sizes in batch.image_sizes[:n])
        return {k: v[:images] for k, v in batch.inputs.items() if k in self.prefix_image_inputs}

    def split_image_inputs(self, batch: Batch, first: int,
                           samples: range | None = None) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The :attr:`prefix_image_inputs` of ``batch`` split after each sample's first ``first``
        images: (those images' inputs, the later images' inputs), each in sample order; only the
        samples in ``samples`` (default: all). Prompts
        whose first images are already in a KV cache continue with the later images' inputs only
        (ViCrop's answer from its map's prefix, :mod:`innersight.look.answer_prefix`).

        The base: one leading row per image in every input, as :meth:`sample_image_inputs`
        assumes; None (no split: the caller runs the whole prompt) where the family shares no
        prefix or an input's rows are not one per image. A family whose rows are not one per
        image (tiles, one row per sample, per-sample counts) overrides it."""
        import torch

        if not self.prefix_image_inputs:
            return None
        keys = [k for k in self.prefix_image_inputs if k in batch.inputs]
        head: list[int] = []
        tail: list[int] = []
        offset = 0
        chosen = range(len(batch.image_sizes)) if samples is None else samples
        for b, sizes in enumerate(batch.image_sizes):  # the images of each sample, in order
            m = len(sizes)
            if b in chosen:
                head.extend(range(offset, offset + min(first, m)))
                tail.extend(range(offset + min(first, m), offset + m))
            offset += m
        if any(int(batch.inputs[k].shape[0]) != offset for k in keys):
            return None
        pick = lambda rows, k: batch.inputs[k][torch.tensor(rows, dtype=torch.long, device=batch.inputs[k].device)]  # noqa: E731
        return ({k: pick(head, k) for k in keys}, {k: pick(tail, k) for k in keys})

    def same_image_inputs(self, a: dict[str, Any], b: dict[str, Any]) -> bool:
        """Whether two sets of :attr:`prefix_image_inputs` (e.g. from :meth:`sample_image_inputs`
        and :meth:`split_image_inputs` of two batches) give the language model the same image
        features. The base: the same keys, every tensor equal (shape and values)."""
        if set(a) != set(b):
            return False
        return all(_equal_inputs(a[k], b[k]) for k in a)

    def decoder_hidden_states(self, outputs: Any) -> tuple[torch.Tensor, ...]:
        """The decoder's ``hidden_states`` from a forward with ``output_hidden_states=True``:
        ``num_layers + 1`` tensors [B, L, D], index 0 the embeddings, the last already normed."""
        return outputs.hidden_states

    def pixel_view(self, batch: Batch, tensor: torch.Tensor, sample: int) -> tuple[torch.Tensor, GridView]:
        """The [3, H, W] pixels (or pixel gradients) of sample ``sample``'s first image, shaped
        like ``batch.inputs["pixel_values"]``, and the grid view those pixels cover (ViCrop's
        pure-grad map). Optional: the base refuses (:data:`OPTIONAL_MEMBERS`)."""
        raise self._missing("pixel_view")

    # ---- vision facet: what the vision path does, for outlier analyses and image contrasts --------
    #
    # Asked by DAMRO (decode/damro.py: outlier scoring and its negative branch), the outlier-overlap
    # instrument (instruments/outlier_overlap.py) and the image-contrast methods (decode/vcd.py,
    # decode/vista.py: the image features of a batch). Terms used below:
    #
    # * the *scored view* of an image: the vision-encoder sequence whose self-attention ranks the
    #   image's tokens (the image itself; LLaVA-NeXT: its base view, not the tiles);
    # * its *candidates*: the units an outlier is chosen among, in order. For families whose
    #   language-model tokens are grid cells, one candidate per LM token of the first view (CLIP
    #   patches; Qwen merged 2x2 tokens); where the LM sees other tokens (InstructBLIP's Q-Former
    #   queries), the vision patches those tokens read.
    #
    # Defaults follow the CLIP / SigLIP / BLIP convention (``[N, L, D]`` per image or tile, a
    # ``self_attn`` module with ``q_proj`` / ``k_proj``); a family overrides only what differs, and
    # a fact the base cannot know raises MethodError naming the family and the missing fact.

    @property
    def outlier_vision_layer(self) -> int:
        """Index into :attr:`vision_layers` of the layer whose self-attention ranks the vision
        tokens by default (DAMRO's ``vision_layer`` left unset, the outlier-overlap instrument).

        Base: :attr:`projector_vision_layer`, the layer whose output the projector consumes (the
        paper's choice, arXiv 2410.04514 Sec. 3.3; LLaVA-1.5's ``vision_feature_layer = -2`` on
        CLIP ViT-L is ``layers[22]`` of 24, the layer the reference's llava-hf path hooks)."""
        return self.projector_vision_layer

    @property
    def vision_has_cls(self) -> bool:
        """Whether the vision encoder's sequence starts with a [CLS] token whose attention row
        ranks the patches (DAMRO, outlier-overlap). Without one, DAMRO uses its documented
        substitute: the mean attention each token *receives* (an extension beyond the paper). A
        family whose models have none also states it at class level, ``substitutes =
        {"vision_has_cls": NO_VISION_CLS}``, for ``innersight list``.

        Base: the CLIP / BLIP convention, a ``class_embedding`` on the vision tower's
        ``embeddings`` module (SigLIP has none: False; InternViT's is a ``cls_token``, its adapter
        says so).

        Raises:
            MethodError: the tower has no ``embeddings`` module, so the family must say.
        """
        tower = self.vision_tower
        embeddings = getattr(getattr(tower, "vision_model", tower), "embeddings", None)
        if embeddings is None:
            raise MethodError(f"{self.family}: cannot tell whether the vision encoder has a [CLS] token "
                              f"(no embeddings module on {type(tower).__name__}); the adapter must set vision_has_cls")
        return hasattr(embeddings, "class_embedding")

    def vision_attention(self, layer: int) -> Any:
        """The self-attention module of vision layer ``layer`` (an index into
        :attr:`vision_layers`): DAMRO reads its queries and keys with a forward pre-hook.
        Base: the layer's ``self_attn`` (CLIP, SigLIP, BLIP).

        Raises:
            MethodError: ``layer`` out of range, or a layer without ``self_attn``.
        """
        layers = self.vision_layers
        if not 0 <= int(layer) < len(layers):
            raise MethodError(f"{self.family}: vision layer {layer} outside 0..{len(layers) - 1}")
        module = getattr(layers[int(layer)], "self_attn", None)
        if module is None:
            raise MethodError(f"{self.family}: vision layer {type(layers[int(layer)]).__name__} has no self_attn; "
                              f"the adapter must name its attention module (vision_attention)")
        return module

    def vision_query_key(self, module: Any, hidden: torch.Tensor,
                         call_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected, un-scaled queries and keys ``[N, H, L, d]`` of vision attention ``module``
        (:meth:`vision_attention`) for its input ``hidden`` (``[N, L, D]``), exactly what its
        attention scores come from; ``call_kwargs`` are the keyword arguments of the call (where a
        family's attention needs them: rotary embeddings, segment bounds). Used by DAMRO's
        outlier scoring. Base: separate ``q_proj`` / ``k_proj`` (CLIP, SigLIP).

        Raises:
            MethodError: a module without ``q_proj`` / ``k_proj``.
        """
        if not (hasattr(module, "q_proj") and hasattr(module, "k_proj")):
            raise MethodError(f"{self.family}: cannot read the queries and keys of {type(module).__name__} "
                              f"(no q_proj / k_proj); the adapter must override vision_query_key")
        heads = int(module.num_heads)
        n, length, _ = hidden.shape
        q = module.q_proj(hidden).view(n, length, heads, -1).transpose(1, 2)  # [N, H, L, d]
        k = module.k_proj(hidden).view(n, length, heads, -1).transpose(1, 2)  # [N, H, L, d]
        return q, k

    def scored_vision_rows(self, batch: Batch, rows: int) -> torch.Tensor:
        """Which of the ``rows`` sequences the vision tower ran for ``batch`` is each image's
        scored view: ``[N_images]`` long, images flat over the batch. Base: one sequence per image.

        Raises:
            MethodError: ``rows`` is not the batch's image count.
        """
        import torch

        images = sum(len(sizes) for sizes in batch.image_sizes)
        if rows != images:
            raise MethodError(f"{self.family}: the vision tower ran {rows} sequences but the batch has {images} images")
        return torch.arange(rows)

    def vision_attention_per_image(self, batch: Batch, query: torch.Tensor, key: torch.Tensor,
                                   call_kwargs: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image (flat over the batch), the queries and keys ``[H, L_i, d]`` of its scored
        view, from :meth:`vision_query_key`'s ``[N, H, L, d]``: what DAMRO's [CLS] row (or
        substitute) is computed over. Base: the rows :meth:`scored_vision_rows` names."""
        rows = self.scored_vision_rows(batch, int(query.shape[0]))
        return [(query[r], key[r]) for r in rows.tolist()]

    def pool_vision_scores(self, batch: Batch, image_index: int, scores: torch.Tensor) -> torch.Tensor:
        """Per-token scores ``[P]`` of image ``image_index``'s scored view (the [CLS] column
        already dropped) as scores per candidate ``[M]``, in candidate order (DAMRO picks its
        outliers among these; outlier-overlap ranks them). Base: one candidate per token."""
        return scores

    @property
    def vision_subset_source(self) -> Any:
        """The module whose forward output holds every image's candidates as the model itself
        encodes them: DAMRO gathers its outliers there during the main prefill (nothing is
        encoded twice) and hands them to :meth:`encode_vision_subset`.

        Optional (:data:`OPTIONAL_MEMBERS`): a family without it cannot run DAMRO.

        Raises:
            MethodError: in the base class: the family must name it.
        """
        raise self._missing("vision_subset_source")

    @property
    def vision_subset_prefix(self) -> int:
        """Tokens before the candidates in each sequence of :attr:`vision_subset_source`'s
        output (a kept [CLS]). Base: none."""
        return 0

    def vision_candidates(self, batch: Batch, output: Any, *, with_prefix: bool = False) -> list[torch.Tensor]:
        """Per image (flat over the batch), its candidates ``[M_i, D]`` in candidate order, read
        from :attr:`vision_subset_source`'s forward ``output``. ``with_prefix`` keeps the
        :attr:`vision_subset_prefix` tokens in front (``[prefix + M_i, D]``), so that candidate
        indices count from the sequence start: DAMRO's ``official`` preset reproduces a reference
        off-by-one with it. Base: a tensor ``[rows, prefix + M, D]`` (or an output's
        ``last_hidden_state``) at :meth:`scored_vision_rows`."""
        tokens = output if _is_tensor(output) else output.last_hidden_state  # [rows, prefix + M, D]
        start = 0 if with_prefix else self.vision_subset_prefix
        rows = self.scored_vision_rows(batch, int(tokens.shape[0]))
        return [tokens[r, start:] for r in rows.tolist()]

    def encode_vision_subset(self, batch: Batch, tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The language-model tokens ``[n_i, D]`` that stand for image ``i`` (flat over the batch)
        when only ``tokens[i]`` (a subset of its :meth:`vision_candidates`, ``[k, Dc]``) is left of
        it: DAMRO's negative image. Base: the candidates themselves (they are projector outputs)."""
        return list(tokens)

    #: names of ``batch.inputs`` entries that the model's ``get_image_features`` needs besides the
    #: pixels (passed by keyword; a missing one as None)
    image_feature_inputs: ClassVar[tuple[str, ...]] = ()

    def image_features(self, batch: Batch, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The language-model tokens ``[n_i, D]`` of every image of ``batch`` (flat) for
        ``pixel_values`` (the batch's own, or a method's distorted copy), through the model's own
        vision path (``get_image_features``); VCD's noised image and VISTA's visual tokens."""
        extra = {name: batch.inputs.get(name) for name in self.image_feature_inputs}
        out = self.model.get_image_features(pixel_values, **extra, return_dict=True)
        return [f.reshape(-1, f.shape[-1]) for f in out.pooler_output]

    def vision_input_index(self, batch: Batch, image_index: int) -> int | slice | tuple[int, slice]:
        """Where image ``image_index`` (flat over the batch) lies in ``batch.inputs["pixel_values"]``
        (an index of the tensor: VCD noises each image on its own). Base: one leading row per image
        (``[N, 3, S, S]``, or ``[N, tiles, 3, S, S]``); a family may answer rows (a slice) or
        ``(sample, frames)`` for per-sample pixels ``[B, F, 3, S, S]``.

        Raises:
            MethodError: the pixels' leading dimension is not the batch's image count.
        """
        images = sum(len(sizes) for sizes in batch.image_sizes)
        rows = int(batch.inputs["pixel_values"].shape[0])
        if rows != images:
            raise MethodError(f"{self.family}: pixel_values hold {rows} images but the batch has {images}")
        return int(image_index)

    @property
    def query_patch_blocks(self) -> int:
        """How many blocks map the language model's image tokens onto the vision patches, for
        families whose LM image tokens are not grid cells (InstructBLIP: the Q-Former
        cross-attention blocks, read with ``record_query_patch_attention(block)``); the
        outlier-overlap instrument averages them. Base: 0 (the LM image tokens are the cells of
        the first view's ``token_index``)."""
        return 0

    # ---- decoder injections: image rows the decoder adds inside the stack ------------------------
    #
    # Most families hand the language model their image tokens once, as input embeddings. A family
    # may also add per-token image rows to the hidden states of the image positions after some
    # decoder layers (Qwen3-VL's DeepStack), and computes them only from pixels. A prompt a method
    # builds on ``inputs_embeds`` (an image spliced, noised, reduced to its outliers; an
    # instruction disturbed) must carry those rows too, or it is not the prompt the model would
    # see. Asked by decode/contrast.py (splice_images, the negative branch's prefill), vcd.py,
    # damro.py, icd.py and vista.py. The base: no injections; every hook below is a no-op, so the
    # other families run exactly as before.

    @property
    def image_injection_layers(self) -> tuple[int, ...]:
        """Decoder layers after whose output the family adds per-token image rows at the image
        positions (:class:`ImageRows` ``injected[j]`` after layer ``[j]``). Base: none."""
        return ()

    def image_rows(self, batch: Batch, pixel_values: torch.Tensor) -> list[ImageRows]:
        """:meth:`image_features` with each image's decoder injections, from one pass of the
        model's vision path (VCD's noised image, VISTA's positive prompt). Base: no injections."""
        return [ImageRows(f) for f in self.image_features(batch, pixel_values)]

    def vision_candidate_injections(self, batch: Batch, output: Any) -> list[torch.Tensor] | None:
        """Per image (flat over the batch), the decoder injections ``[S, M_i, D]`` of its
        :meth:`vision_candidates` (same order, no prefix), read from the same
        :attr:`vision_subset_source` ``output``: DAMRO's negative image keeps its outliers' rows.
        Base: None (no injections)."""
        return None

    def language_model_injections(self, call_kwargs: dict[str, Any]) -> torch.Tensor | None:
        """The decoder injections ``[S, N, D]`` a call of :attr:`language_model` carries (its
        keyword arguments, read by a forward pre-hook), rows in the order of the image positions
        (``input_ids == image_token_id``, row-major over the batch): ICD keeps them for its
        disturbed prompt. Base: None."""
        return None

    @contextlib.contextmanager
    def injecting(self, ids: torch.Tensor, injected: torch.Tensor | None) -> Iterator[None]:
        """Around one forward of a built prompt on ``inputs_embeds``: make the decoder add
        ``injected`` ``[S, N, D]`` at the prompt's image positions (``ids`` [B, L] equal to the
        image token id, row-major). ``injected`` None: nothing to do (the base's only case).

        Raises:
            MethodError: injections for a family that takes none.
        """
        if injected is not None:
            raise MethodError(f"{self.family}: the decoder takes no image injections")
        yield

    @contextlib.contextmanager
    def residual_additions(self) -> Iterator[Callable[[int], tuple[torch.Tensor, torch.Tensor] | None]]:
        """What the family adds to decoder layer ``i``'s output before the next layer reads it, in
        the latest forward run inside the block: yields ``added(i) -> (mask [B, L] bool,
        rows [N, D]) | None`` (rows in mask order). The residual stream after layer ``i`` is the
        layer's output plus these rows (VISTA steers that stream). Base: nothing, ever."""
        yield lambda layer: None

    # ------------------------------------------------------------------ description
    def describe(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "class": type(self.model).__name__,
            "layers": self.num_layers,
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
            "hidden_size": self.hidden_size,
            "vision_feature_layer": self.vision_feature_layer,
            "projector_vision_layer": self.projector_vision_layer,
        }


def _is_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor (torch imported only when asked)."""
    import torch

    return isinstance(value, torch.Tensor)


def control_strings(tokenizers: Sequence[Any], processor: Any = None) -> tuple[str, ...]:
    """Every string that ``processor`` or one of ``tokenizers`` reads as a control token wherever
    it appears in a text: the tokenizers' special tokens and the processor's image/video
    placeholders; longest first."""
    found: set[str] = set()
    for tok in tokenizers:
        found.update(str(t) for t in getattr(tok, "all_special_tokens", ()) or ())
        decoder = getattr(tok, "added_tokens_decoder", None) or {}
        found.update(str(t.content) for t in decoder.values() if getattr(t, "special", False))
    for attr in ("image_token", "video_token", "audio_token", "boi_token", "eoi_token"):
        value = getattr(processor, attr, None)
        value = getattr(value, "content", value)  # an AddedToken or its text
        if isinstance(value, str):
            found.add(value)
    return tuple(sorted((t for t in found if t.strip()), key=lambda t: (-len(t), t)))


def as_plain_text(text: str, strings: Sequence[str], tokenizers: Sequence[Any]) -> str:
    """``text`` from a user (a question, a benchmark question, an lmms-eval context) made unable to
    produce control tokens.

    Every control string in it (one of ``strings``) gets an invisible WORD JOINER (U+2060) after
    its first character: the processor no longer counts it as an image placeholder, and the
    tokenizers, which match control tokens as exact substrings, read it as the plain characters
    it shows (byte-level BPE encodes the joiner as bytes; BERT's normaliser removes it after the
    special tokens were matched). Text without control strings is returned unchanged.

    Raises:
        UserInputError: a control string that cannot be broken this way (one character long, or
            still read as a control token by one of ``tokenizers`` afterwards).
    """
    present = [t for t in strings if t in text]
    if not present:
        return text
    for t in present:
        if len(t) < 2:
            raise UserInputError(f"the question contains {t!r}, a control token of this model that cannot be "
                                 "written as plain text; remove it")
    pattern = re.compile("|".join(re.escape(t) for t in present))  # longest first: alternation order
    plain = pattern.sub(lambda m: m.group(0)[0] + WORD_JOINER + m.group(0)[1:], text)
    for tok in tokenizers:
        unk = getattr(tok, "unk_token_id", None)  # unknown characters are not control tokens
        special_ids = {i for i in getattr(tok, "all_special_ids", ()) or () if i != unk}
        special_ids.update(i for i, t in (getattr(tok, "added_tokens_decoder", None) or {}).items()
                           if getattr(t, "special", False) and i != unk)
        ids = tok(plain, add_special_tokens=False)["input_ids"]
        leaked = [i for i in ids if i in special_ids]
        if leaked:
            raise UserInputError(
                f"the question contains {tok.convert_ids_to_tokens(leaked[0])!r}, a control token that this "
                "model's tokenizer cannot read as plain text; remove it"
            )
    return plain
