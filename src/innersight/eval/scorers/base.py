"""The :class:`Scorer` record shared by every benchmark family, and the small helpers they use.

A scorer is two pure functions and some metadata:

- ``score_one(prediction, sample) -> row``: score one model output against one benchmark sample.
  The row is a flat, JSON-serialisable dict holding the parsed answer, the per-sample score and
  every field that ``aggregate`` needs (so aggregation never has to look at the samples again).
- ``aggregate(rows) -> metrics``: reduce the rows of a run to the benchmark's metrics.

Conventions shared by all families: rates and accuracies in ``aggregate`` are reported in
percent (x100); per-sample scores in rows stay in ``[0, 1]``; counts are plain integers;
``higher_is_better`` maps every metric name that ``aggregate`` can return to ``True``,
``False`` or ``None`` (a diagnostic or count with no better direction, e.g. POPE's yes-ratio).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

Row = dict[str, Any]
Metrics = dict[str, Any]
ScoreOne = Callable[[Any, Mapping[str, Any]], Row]
Aggregate = Callable[[Sequence[Mapping[str, Any]]], Metrics]

#: what ``score_one`` expects as its ``prediction`` argument
PREDICTION_KINDS = ("text", "option_losses")


@dataclass(frozen=True)
class Scorer:
    """One benchmark's scoring protocol: a named variant of its parse + metric definition.

    Attributes:
        name: the benchmark, e.g. ``"pope"``, ``"textvqa"``.
        variant: ``"canonical"`` for the official definition, otherwise the name of the
            non-standard protocol it reproduces (e.g. ``"vicrop"``, ``"substring"``).
        higher_is_better: every metric ``aggregate`` may return -> ``True`` / ``False`` /
            ``None`` (no better direction).
        score_one: ``(prediction, sample) -> row``.
        aggregate: ``(rows) -> metrics``.
        description: one line naming the definition (shown in CLI help and result files).
        prediction: what ``score_one`` takes as prediction: ``"text"`` (the generated answer) or
            ``"option_losses"`` (one mean token loss per option, V* likelihood protocol).
        requires: importable modules the variant needs beyond the core install (an optional
            extra); :meth:`missing` names those that are absent.
    """

    name: str
    variant: str
    higher_is_better: Mapping[str, bool | None] = field(hash=False)
    score_one: ScoreOne
    aggregate: Aggregate
    description: str = ""
    prediction: str = "text"
    requires: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTION_KINDS:
            raise ValueError(f"prediction must be one of {PREDICTION_KINDS}, got {self.prediction!r}")
        object.__setattr__(self, "higher_is_better", MappingProxyType(dict(self.higher_is_better)))

    @property
    def key(self) -> str:
        """Registry key, ``"<name>/<variant>"``."""
        return f"{self.name}/{self.variant}"

    def missing(self) -> list[str]:
        """The modules of :attr:`requires` that are not installed (checked before a run starts)."""
        import importlib.util

        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def install_hint(self) -> str | None:
        """``None`` when everything :attr:`requires` is installed, else a one-line message saying
        what to install."""
        missing = self.missing()
        if not missing:
            return None
        extras = sorted({EXTRAS.get(m, m) for m in missing})
        return f"scorer {self.key} needs {', '.join(missing)}: pip install 'innersight[{','.join(extras)}]'"


#: optional module -> the extra of pyproject.toml that installs it
EXTRAS: dict[str, str] = {"lemminflect": "lemma"}


def percent(numerator: float, denominator: float) -> float:
    """``100 * numerator / denominator``; ``0.0`` when the denominator is 0 (nothing to rate)."""
    return 100.0 * numerator / denominator if denominator else 0.0


def require_rows(rows: Sequence[Mapping[str, Any]]) -> None:
    """Raise ``ValueError`` for an empty run: no metric is defined over zero samples."""
    if len(rows) == 0:
        raise ValueError("cannot aggregate zero rows")


def yes_no_label(sample: Mapping[str, Any]) -> str:
    """The ground-truth yes/no of a sample: ``sample["label"]`` (POPE JSONL) or ``sample["answer"]``.

    Lower-cased and stripped; anything but ``yes``/``no`` raises ``ValueError``.
    """
    if "label" in sample:
        raw = sample["label"]
    elif "answer" in sample:
        raw = sample["answer"]
    else:
        raise KeyError("sample has neither 'label' nor 'answer'")
    label = str(raw).strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"yes/no label expected, got {raw!r}")
    return label


def text_answers(sample: Mapping[str, Any], key: str = "answers") -> list[str]:
    """The reference answers of a sample as strings.

    Accepts a list of strings or a list of dicts with an ``"answer"`` field (the VQAv2 annotation
    layout). Raises ``ValueError`` when there are none.
    """
    raw = sample[key]
    if isinstance(raw, str):
        raise TypeError(f"sample[{key!r}] must be a list of answers, not a string")
    answers = [str(a["answer"]) if isinstance(a, Mapping) else str(a) for a in raw]
    if not answers:
        raise ValueError(f"sample[{key!r}] is empty")
    return answers
