"""The three intervention points as typed contracts: what a method at each point must provide.

A method object (built by :meth:`innersight.methods.MethodSpec.build`) sits at one point:

=========  =========================================  ===============================================
point      protocol                                    hook the flow calls (:mod:`innersight.flow`)
=========  =========================================  ===============================================
input      :class:`InputMethod`                        ``apply(mllm, image_lists, questions, template)``
                                                       -> new image lists + per-sample extras
attention  :class:`AttentionMethod`                    ``activate(mllm, batch)`` -> a context manager
                                                       live around ``generate``
decoding   :class:`DecodingMethod`                     ``processors(mllm, batch, generation)`` ->
                                                       logits processors for this ``generate`` call
=========  =========================================  ===============================================

Optional hooks, each its own small protocol so the flow asks ``isinstance`` instead of probing
attributes:

- :class:`OverridesGeneration` (decoding): ``generation_overrides(mllm, generation)`` -> settings
  that replace the caller's (DAMRO's official preset samples at temperature 1).
- :class:`ScopedProcessor` (a decoding method's processor): a context manager entered before
  ``generate`` and exited after it (hooks, a negative branch's cache: live for one call only).
- :class:`ReportsDetails` (a processor): ``details()`` -> what it did in this call, merged into
  every answer's ``details``.
- :class:`BenchmarkGeneration` (any point): ``benchmark_generation(benchmark)`` -> generation
  settings a method asks for on a benchmark (ViCrop's answer length on its paper's tables).
- :class:`Configured` (any point): a frozen ``config`` dataclass, recorded with every answer.

The protocols are structural (``typing.Protocol``): a method class satisfies its point by having the
hook, with no base class to inherit, and ``isinstance(obj, InputMethod)`` checks that it does.
Nothing here imports torch or any other innersight module at run time.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from .adapters.base import Batch
    from .mllm import MLLM

__all__ = ["POINTS", "InputMethod", "AttentionMethod", "DecodingMethod", "Method", "OverridesGeneration",
           "ScopedProcessor", "ReportsDetails", "BenchmarkGeneration", "AnswersRows", "Configured", "PROTOCOLS", "HOOKS"]

#: the intervention points, in the order the flow visits them
POINTS: tuple[str, ...] = ("input", "attention", "decoding")

#: one sample's images: RGB PIL images, normalised once per answer by the flow
ImageList = list[Any]
#: what an input method hands back per sample besides the images: ``box``, ``crop``, ``maps``, ``details``
Extras = dict[str, Any]


@runtime_checkable
class InputMethod(Protocol):
    """What the model sees (ViCrop): change each sample's images before the prompt is built."""

    def apply(self, mllm: MLLM, image_lists: list[ImageList], questions: list[str],
              template: str) -> tuple[list[ImageList], list[Extras]]:
        """``image_lists[i]`` are sample i's images (RGB PIL); return the images the model will see
        (e.g. the original plus a crop) and one extras dict per sample (``box``, ``crop``, ``maps``
        for the answer; ``details`` merged into the answer's details)."""
        ...


@runtime_checkable
class AttentionMethod(Protocol):
    """How the model looks (VAR, PAI's attention part): change attention while ``generate`` runs."""

    def activate(self, mllm: MLLM, batch: Batch) -> AbstractContextManager[Any]:
        """A context manager that installs the change for ``batch`` on entry and restores the model
        on exit, also after an exception."""
        ...


@runtime_checkable
class DecodingMethod(Protocol):
    """What the model says (DeCo, DAMRO, DoLa, VCD, M3ID, ICD, PAI, ONLY, VISTA): logits processors."""

    def processors(self, mllm: MLLM, batch: Batch, generation: dict[str, Any]) -> list[Any]:
        """Fresh ``LogitsProcessor``s for one ``generate`` call on ``batch`` with the settings
        ``generation`` (state such as a negative branch's cache must not outlive the call). A
        processor may also be a :class:`ScopedProcessor` and a :class:`ReportsDetails`."""
        ...


@runtime_checkable
class OverridesGeneration(Protocol):
    """A decoding method that sets generation settings of its own (applied before its processors)."""

    def generation_overrides(self, mllm: MLLM, generation: dict[str, Any]) -> dict[str, Any]:
        """Settings that replace those in ``generation`` (which holds the caller's and earlier
        methods' settings)."""
        ...


@runtime_checkable
class ScopedProcessor(Protocol):
    """A processor that must be live only during its ``generate`` call (entered just before it)."""

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> Any: ...


@runtime_checkable
class ReportsDetails(Protocol):
    """A processor that reports what it did in its call (e.g. which negative branch ran)."""

    def details(self) -> dict[str, Any]: ...


@runtime_checkable
class BenchmarkGeneration(Protocol):
    """A method that asks for generation settings on a named benchmark (read by the runner)."""

    def benchmark_generation(self, benchmark: str) -> dict[str, Any]: ...


@runtime_checkable
class AnswersRows(Protocol):
    """An input method that generates through the plan itself (ViCrop's early crop gate: answer
    plainly first, then again with the crop only where the gate crops). ``generate(image_lists,
    questions, observers=())`` is the plan's own generate with the attention and decoding methods
    active (:meth:`innersight.flow.Plan.generate`, returning a :class:`innersight.flow.Generated`);
    the method returns ``(ids, prompts, extras, details)``, one row per question in input order."""

    def answer_rows(self, mllm: MLLM, image_lists: list[ImageList], questions: list[str], template: str,
                    generate: Any) -> tuple[list[list[int]], list[str], list[dict[str, Any]], dict[str, Any]]: ...


@runtime_checkable
class Configured(Protocol):
    """A method with a frozen config dataclass (its defaults are the paper's values)."""

    config: Any


#: a method at any point
Method = InputMethod | AttentionMethod | DecodingMethod

#: point -> the protocol its methods satisfy
PROTOCOLS: dict[str, type] = {"input": InputMethod, "attention": AttentionMethod, "decoding": DecodingMethod}
#: point -> the name of the hook the flow calls there (for error messages and docs)
HOOKS: dict[str, str] = {"input": "apply", "attention": "activate", "decoding": "processors"}
