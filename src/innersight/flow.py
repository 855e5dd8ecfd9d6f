"""The flow of one answer, top to bottom: images -> input -> attention -> decoding -> generate -> answers.

:meth:`Plan.run` is the whole of it::

    image_lists = load_image_lists(images)                    # 1. normalise each sample's images, once
    image_lists, extras = apply_input(plan, mllm, ...)        # 2. input methods: what the model sees
    batch = build_batch(mllm.adapter, image_lists, ...)       #    prompts formatted, batch tokenised
    with ExitStack() as stack:
        activate_attention(stack, plan, mllm, batch)          # 3. attention methods: how it looks
        generation, processors = prepare_decoding(...)        # 4. decoding methods: what it says
        ids = mllm.generate(batch, **generation)              # 5. generate
    return make_answers(...)                                  # 6. decode, attach what methods report

Steps 3-5 are :meth:`Plan.generate`. An input method that must generate more than once (ViCrop's
early crop gate: the plain answer first, then the crop only where the gate crops) implements
:class:`innersight.points.AnswersRows` and calls that same ``generate`` itself.

A :class:`Plan` is the methods of one call, typed by point (:mod:`innersight.points`); it is made by
:func:`innersight.methods.resolve_methods`. Layering, with no import loop: ``mllm`` -> ``flow`` ->
``points``; ``methods`` -> ``flow``; ``mllm`` reaches ``methods`` only inside ``answer_batch``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import MethodError, UserInputError
from .points import (
    HOOKS,
    PROTOCOLS,
    AnswersRows,
    AttentionMethod,
    Configured,
    DecodingMethod,
    InputMethod,
    Method,
    OverridesGeneration,
    ReportsDetails,
    ScopedProcessor,
)

if TYPE_CHECKING:  # pragma: no cover
    from .adapters.base import Adapter, Batch
    from .methods import MethodSpec
    from .mllm import MLLM

__all__ = ["Answer", "Generated", "ImageLike", "Plan", "PlanGenerate", "Continuation", "load_image_lists",
           "build_batch", "apply_input", "activate_attention", "prepare_decoding", "decoding_generation", "merge_processors", "make_answers"]


# ---------------------------------------------------------------------- what goes in and what comes out
ImageLike = Any  # str | Path | PIL.Image.Image


@dataclass
class Answer:
    """One answer, plus what the methods that produced it want to show."""

    text: str
    question: str
    prompt: str
    methods: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    #: ViCrop: the chosen box (x0, y0, x1, y1) in original-image pixels, the crop, the maps
    box: tuple[float, float, float, float] | None = None
    crop: Any = None
    maps: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "question": self.question,
            "prompt": self.prompt,
            "methods": list(self.methods),
            "box": list(self.box) if self.box is not None else None,
            "details": self.details,
        }


def _as_image_list(item: ImageLike | Sequence[ImageLike]) -> list[Any]:
    from PIL import Image

    from .images import load_image

    def one(x: Any) -> Any:
        # images we already loaded (RGB PIL) are used as they are; anything else is loaded/checked
        if isinstance(x, Image.Image) and x.mode == "RGB" and min(x.size) >= 1:
            return x
        return load_image(x)  # checks it: a 0x0 image, a missing file... -> ImageError

    if isinstance(item, (list, tuple)):
        if not item:
            raise UserInputError("a sample needs at least one image")
        return [one(x) for x in item]
    return [one(item)]


def load_image_lists(images: Sequence[ImageLike | Sequence[ImageLike]]) -> list[list[Any]]:
    """Each sample's images as a list of RGB PIL images (a bare image -> a list of one)."""
    return [_as_image_list(item) for item in images]


def check_questions(images: Sequence[Any], questions: Sequence[str]) -> None:
    """``UserInputError`` unless ``questions`` is a list with one question per sample."""
    if isinstance(questions, str):
        raise UserInputError("questions must be a list; use answer() for a single question")
    if len(images) != len(questions):
        raise UserInputError(f"{len(images)} images for {len(questions)} questions")


def build_batch(adapter: Adapter, image_lists: list[list[Any]], questions: Sequence[str],
                template: str = "chat") -> Batch:
    """Prompts in the adapter's template (one image placeholder per image), tokenised as one
    left-padded batch; ``image_lists`` are already normalised (:func:`load_image_lists`)."""
    prompts = [adapter.format_prompt(q, len(ims), template) for q, ims in zip(questions, image_lists)]
    return adapter.prepare(image_lists, prompts)


@dataclass
class Generated:
    """One generate call of a plan: token ids per row, the batch it ran on, and what the decoding
    processors report of the call (e.g. which negative branch ran)."""

    ids: list[list[int]]
    batch: Batch
    details: dict[str, Any]


# ---------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """The methods of one call: their specs and objects in the caller's order, typed by point."""

    specs: tuple[MethodSpec, ...] = ()
    objects: tuple[Method, ...] = ()
    #: the caller's config overrides, keyed by method name (whichever key named them)
    settings: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    def at(self, point: str) -> list[Any]:
        """The method objects at ``point`` (``input``, ``attention`` or ``decoding``), in order."""
        return [obj for spec, obj in zip(self.specs, self.objects) if spec.point == point]

    @property
    def input_methods(self) -> list[InputMethod]:
        return self._typed("input")

    @property
    def attention_methods(self) -> list[AttentionMethod]:
        return self._typed("attention")

    @property
    def decoding_methods(self) -> list[DecodingMethod]:
        return self._typed("decoding")

    def _typed(self, point: str) -> list[Any]:
        """The objects at ``point``, each checked against its point's protocol: a method registered
        at a point whose hook it lacks is a clear error, not an ``AttributeError`` mid-generation."""
        out = []
        for spec, obj in zip(self.specs, self.objects):
            if spec.point != point:
                continue
            if not isinstance(obj, PROTOCOLS[point]):
                raise MethodError(f"method {spec.name!r} is registered at the {point} point but "
                                  f"{type(obj).__name__} has no {HOOKS[point]}() ({PROTOCOLS[point].__name__})")
            out.append(obj)
        return out

    def names_at(self, point: str) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs if s.point == point)

    def configs(self) -> dict[str, Any]:
        """name -> config dict, for result provenance."""
        return {spec.name: dataclasses.asdict(obj.config) if isinstance(obj, Configured) else {}
                for spec, obj in zip(self.specs, self.objects)}

    def run(self, mllm: MLLM, images: Sequence[ImageLike | Sequence[ImageLike]], questions: Sequence[str], *,
            template: str = "chat", **generation: Any) -> list[Answer]:
        """Answer ``questions`` about ``images`` (one batch) with this plan's methods.

        A ``logits_processor`` and ``stopping_criteria`` passed in ``generation`` are kept: the
        decoding methods' processors run first, then the caller's (see :func:`merge_processors`);
        stopping criteria are handed to ``generate`` unchanged."""
        check_questions(images, questions)
        image_lists = load_image_lists(images)  # 1. the only normalisation of this answer
        answering = [m for m in self.input_methods if isinstance(m, AnswersRows)]
        if answering:  # an input method that generates through the plan itself (ViCrop's early gate)
            generate = PlanGenerate(self, mllm, template, generation)
            ids, prompts, extras, details = answering[0].answer_rows(mllm, image_lists, list(questions), template,
                                                                     generate)
            return make_answers(self, mllm, ids, questions, prompts, extras, details)
        image_lists, extras = apply_input(self, mllm, image_lists, list(questions), template)  # 2.
        out = self.generate(mllm, image_lists, questions, template=template, generation=generation)  # 3.-5.
        return make_answers(self, mllm, out.ids, questions, out.batch.prompts, extras, out.details)  # 6.

    def generate(self, mllm: MLLM, image_lists: list[list[Any]], questions: Sequence[str], *, template: str,
                 generation: dict[str, Any], observers: Sequence[Any] = (), start: Any = None) -> Generated:
        """Steps 3-5 for these (final) images: the batch, the attention methods active, the decoding
        methods' processors, ``generate``. ``observers`` are logits processors run after every other
        (the methods', then the caller's) that read the final scores and return them unchanged (e.g.
        a confidence recorder).

        ``start(mllm, batch)``: a prefill the caller owns (ViCrop's answer from its map's
        prefix, :mod:`innersight.look.answer_prefix`), asked only when :meth:`prefill_conflict` is
        None: it returns a :class:`Continuation` (``generate`` continues from its KV cache) or None
        (the batch is generated as usual)."""
        batch = build_batch(mllm.adapter, image_lists, questions, template)
        continued = start(mllm, batch) if start is not None and self.prefill_conflict(generation) is None else None
        with contextlib.ExitStack() as stack:
            activate_attention(stack, self, mllm, batch)  # 3.
            generation, processors = prepare_decoding(stack, self, mllm, batch, generation)  # 4.
            if observers:
                merged = merge_processors(processors, generation.get("logits_processor"))
                merged.extend(observers)
                generation = {**generation, "logits_processor": merged}
            if continued is None:
                ids = mllm.generate(batch, **generation)  # 5.
            else:  # 5. from the caller's prefill: the prompt's ids and mask, its KV cache
                ids = mllm.generate(continued.batch, **generation, **continued.generation)
                continued.verify()
        return Generated(ids, batch, call_details(processors))

    def prefill_conflict(self, generation: dict[str, Any]) -> str | None:
        """Why a caller may not run the prompt's prefill itself and let ``generate`` continue from
        its KV cache (:meth:`generate`'s ``start``), or None when it may: the plan's only method is
        the one answering (no other method reads or changes the prefill: attention methods,
        decoding methods' processors and negative branches run on the prefill too), and the
        generation settings keep one row per sample with nothing but the prompt's ids
        (:data:`CONTINUABLE_GENERATION`)."""
        if len(self.objects) != 1:
            return "other methods in the plan"
        unsupported = sorted(k for k in generation if k not in CONTINUABLE_GENERATION)
        if unsupported:
            return f"generation settings {', '.join(unsupported)}"
        return None


#: the generation settings under which ``generate`` may continue from a prefilled KV cache with the
#: same tokens as from the prompt: none of them adds rows (beams, several sequences), inputs or a
#: cache of its own; the processors and stopping criteria read the ids and scores only
CONTINUABLE_GENERATION = frozenset({
    "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p",
    "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "pad_token_id", "eos_token_id",
    "bos_token_id", "logits_processor", "stopping_criteria", "renormalize_logits", "suppress_tokens"})


@dataclass
class Continuation:
    """What :meth:`Plan.generate` hands ``generate`` when a caller's prefill ran (its ``start``):
    the batch to continue (the prompt's ids and mask, no image inputs: they are in the cache),
    the extra generation arguments (the KV cache under its name) and ``verify()``, which raises
    when ``generate`` did not continue from that cache."""

    batch: Batch
    generation: dict[str, Any]
    verify: Any


@dataclass
class PlanGenerate:
    """The plan's steps 3-5 for an input method that generates itself (:class:`AnswersRows`):
    ``generate(lists, texts, observers=(), start=None)`` is :meth:`Plan.generate` with the call's
    template and generation settings; :attr:`prefill_conflict` says whether a ``start`` would be
    used."""

    plan: Plan
    mllm: Any
    template: str
    generation: dict[str, Any]

    def __call__(self, lists: list[list[Any]], texts: list[str], observers: Sequence[Any] = (),
                 start: Any = None) -> Generated:
        return self.plan.generate(self.mllm, lists, texts, template=self.template, generation=self.generation,
                                  observers=observers, start=start)

    @property
    def prefill_conflict(self) -> str | None:
        return self.plan.prefill_conflict(self.generation)


# ---------------------------------------------------------------------- the steps, in order
def apply_input(plan: Plan, mllm: MLLM, image_lists: list[list[Any]], questions: list[str],
                template: str) -> tuple[list[list[Any]], list[dict[str, Any]]]:
    """2. Input methods in order, each on the previous one's images; one extras dict per sample."""
    extras: list[dict[str, Any]] = [{} for _ in questions]
    for method in plan.input_methods:
        image_lists, extras = method.apply(mllm, image_lists, questions, template)
    return image_lists, extras


def activate_attention(stack: contextlib.ExitStack, plan: Plan, mllm: MLLM, batch: Batch) -> None:
    """3. Enter every attention method's context on ``stack`` (restored when the stack closes)."""
    for method in plan.attention_methods:
        stack.enter_context(method.activate(mllm, batch))


def decoding_generation(plan: Plan, mllm: MLLM, generation: dict[str, Any]) -> dict[str, Any]:
    """The generation settings after the decoding methods' own overrides (in order), e.g. DAMRO's
    official preset: pure sampling at temperature 1. Also what ``results.json`` records."""
    out = dict(generation)
    for method in plan.decoding_methods:
        if isinstance(method, OverridesGeneration):
            out = {**out, **method.generation_overrides(mllm, out)}
    return out


def prepare_decoding(stack: contextlib.ExitStack, plan: Plan, mllm: MLLM, batch: Batch,
                     generation: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """4. The settings ``generate`` receives and the decoding methods' processors, built fresh for
    this call; scoped processors (hooks, negative branches) are entered on ``stack``."""
    generation = decoding_generation(plan, mllm, generation)
    processors = [p for method in plan.decoding_methods for p in method.processors(mllm, batch, generation)]
    for processor in processors:
        if isinstance(processor, ScopedProcessor):  # e.g. early-exit hooks, live for this call only
            stack.enter_context(processor)
    if processors:
        generation = {**generation, "logits_processor": merge_processors(processors, generation.get("logits_processor"))}
    return generation, processors


def merge_processors(methods: Sequence[Any], user: Any = None) -> Any:
    """One ``LogitsProcessorList``: the decoding methods' processors, then the caller's.

    Order at each step (transformers' ``generate``): its own processors built from the generation
    settings (e.g. ``repetition_penalty``, ``min_new_tokens``) on the raw logits; then the methods'
    processors (DeCo, DoLa, DAMRO, VCD), which need the model's logits as they are; then the
    caller's ``logits_processor``, in its own order, which sees the methods' scores (so a token it
    bans or forces stays banned or forced); then the sampling warpers (temperature, top-k, top-p).
    ``user`` may be None, one processor, or a list of them.
    """
    from transformers import LogitsProcessorList

    if user is None:
        extra: list[Any] = []
    elif isinstance(user, (list, tuple)):  # LogitsProcessorList is a list
        extra = list(user)
    elif callable(user):
        extra = [user]
    else:
        raise MethodError(f"logits_processor must be a processor or a list of them, not {type(user).__name__}")
    return LogitsProcessorList([*methods, *extra])


def call_details(processors: Sequence[Any]) -> dict[str, Any]:
    """What each processor reports of its ``generate`` call (e.g. which negative branch ran)."""
    details: dict[str, Any] = {}
    for processor in processors:
        if isinstance(processor, ReportsDetails) and callable(processor.details):
            details.update(processor.details())
    return details


def make_answers(plan: Plan, mllm: MLLM, ids: list[list[int]], questions: Sequence[str], prompts: Sequence[str],
                 extras: list[dict[str, Any]], details: dict[str, Any]) -> list[Answer]:
    """6. One :class:`Answer` per sample: decoded text, the input methods' box / crop / maps, and
    in ``details`` the methods' configs, the input methods' details and ``details``, what the
    processors reported of the generate call(s) (:func:`call_details`)."""
    call_details = details
    answers = []
    for row, question, prompt, extra in zip(ids, questions, prompts, extras):
        answer = Answer(text=mllm.decode(row), question=question, prompt=prompt, methods=plan.names, token_ids=row)
        answer.box, answer.crop = extra.get("box"), extra.get("crop")
        answer.maps = extra.get("maps", {})
        answer.details = {"configs": plan.configs(), **extra.get("details", {}), **call_details}
        answers.append(answer)
    return answers
