"""What every instrument shares: the sample source, the result record, the files it writes.

An instrument is a function ``measure_<name>(mllm, samples, **options) -> Measurement``. It
returns numbers (JSON-ready) and draws a matplotlib figure; :func:`write_measurement` stores
``<name>.json`` and ``<name>.png`` side by side in the output folder. The command line
(``innersight measure <name>``) loads the model and the samples, runs the function with a
progress bar and writes the files. This module imports neither torch nor transformers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserInputError

Sample = dict[str, Any]


@dataclass
class Measurement:
    """The outcome of one instrument run.

    Attributes:
        instrument: the instrument's registry name (also the stem of the files written).
        model: the model's name as the user gave it.
        n_samples: how many samples the numbers rest on.
        numbers: JSON-serialisable results (lists, dicts, floats; ``nan`` is written as null).
        figure: the matplotlib figure (not serialised); ``None`` until drawn.
        settings: the options the instrument ran with (written into the JSON).
    """

    instrument: str
    model: str
    n_samples: int
    numbers: dict[str, Any]
    figure: Any = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"instrument": self.instrument, "model": self.model, "n_samples": self.n_samples,
                "settings": _jsonable(self.settings), "numbers": _jsonable(self.numbers)}


def _jsonable(value: Any) -> Any:
    """Plain JSON: tuples become lists, numpy/torch scalars floats, nan/inf ``None``."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    return str(value)


def write_measurement(result: Measurement, out_dir: str | Path) -> tuple[Path, Path | None]:
    """Write ``<instrument>.json`` (and ``<instrument>.png`` when a figure was drawn) into
    ``out_dir`` (created); returns the two paths."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserInputError(f"-o must be a folder, not the file {str(out)!r}")
    return write_files(result, out / f"{result.instrument}.json", out / f"{result.instrument}.png")


def write_files(result: Measurement, json_path: Path, png_path: Path) -> tuple[Path, Path | None]:
    """Write the numbers to ``json_path`` (atomically) and the figure, if drawn, to ``png_path``
    (then closed); folders are created. Returns ``(json_path, png_path or None)``.

    Raises UserInputError naming the path when either cannot be written (nothing is written then)."""
    from ..outputs import check_output_file

    json_path, png_path = Path(json_path), Path(png_path)
    check_output_file(json_path)
    if result.figure is not None:
        check_output_file(png_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    tmp.replace(json_path)
    if result.figure is None:
        return json_path, None
    png_path.parent.mkdir(parents=True, exist_ok=True)
    result.figure.savefig(png_path, dpi=120, bbox_inches="tight")
    from .. import viz

    viz.close(result.figure)
    return json_path, png_path


def figure_title(what: str, model: str, n_samples: int) -> str:
    """The title line every instrument figure carries: what it shows, the model, the count."""
    return f"{what}\nmodel: {model}   n = {n_samples} samples"


def load_samples(benchmark: str, data: str | Path | None, split: str | None = None, limit: int | None = None,
                 **options: Any) -> list[Sample]:
    """Samples of a registered benchmark (``innersight list``), e.g. ``micro-details`` (no data
    needed), ``vstar`` or ``pope`` from their official folders; the first ``limit`` of them."""
    from ..eval.benchmarks import get_benchmark

    if limit is not None and limit <= 0:
        raise UserInputError(f"--limit must be positive, got {limit}")
    bench = get_benchmark(benchmark)
    samples = bench.load(data, split, **{k: v for k, v in options.items() if v is not None})
    return samples[:limit] if limit is not None else samples


def sample_image(sample: Sample) -> Any:
    """The sample's (first) image as an RGB PIL image."""
    from ..images import load_image

    image = sample["image"]
    if isinstance(image, (list, tuple)):
        image = image[0]
    return load_image(image)


def require_field(samples: Sequence[Sample], key: str, instrument: str, hint: str) -> None:
    """Refuse samples that lack ``key`` with a message that names the instrument and the fix."""
    missing = [s.get("id", "?") for s in samples if s.get(key) is None]
    if missing:
        raise UserInputError(f"{instrument} needs a {key!r} on every sample ({hint}); "
                             f"{len(missing)} of {len(samples)} lack it, e.g. {missing[0]!r}")


def check_samples(samples: Sequence[Sample], instrument: str) -> list[Sample]:
    """``samples`` as a list; refused when empty or when a sample lacks its image or has no
    (or a blank) question, with a message that names the instrument and the sample."""
    samples = list(samples)
    if not samples:
        raise UserInputError(f"{instrument} needs at least one sample")
    require_field(samples, "image", instrument, "each sample is a question about an image")
    blank = [s.get("id", "?") for s in samples if not str(s.get("question") or "").strip()]
    if blank:
        raise UserInputError(f"{instrument} needs a non-empty 'question' on every sample; {len(blank)} of "
                             f"{len(samples)} have none, e.g. {blank[0]!r}")
    return samples


# ---------------------------------------------------------------------- judging answers
#: a per-answer soft score (VQA accuracy, ANLS) at or above this counts as a correct answer
SOFT_CORRECT = 0.5
#: answer length when none is given: descriptions (CHAIR) need room, short answers do not
DESCRIPTION_TOKENS = 48
SHORT_TOKENS = 8
#: ``auto`` scorer choice: the first of these fields that the first sample carries decides
AUTO_SCORERS: tuple[tuple[str, str], ...] = (
    ("options", "vstar/letter"), ("label", "pope/canonical"), ("gt_objects", "chair/canonical"),
    ("size_class", "micro-details/canonical"), ("answers", "textvqa/canonical"), ("answer", "gqa/canonical"),
)


def is_micro_world(samples: Sequence[Sample]) -> bool:
    """Whether every ground-truth object of ``samples`` (``gt_objects``) is a micro-world kind
    (shape, digit, letter) and there is at least one: such samples are scored by micro-world
    CHAIR, others by COCO CHAIR."""
    from ..demo.world import GLYPH_KINDS, SHAPES

    kinds = set(SHAPES) | set(GLYPH_KINDS)
    objects = [str(o).lower() for s in samples for o in (s.get("gt_objects") or ())]
    return bool(objects) and all(o in kinds for o in objects)


def choose_scorer(samples: Sequence[Sample], name: str = "auto") -> Any:
    """The :class:`~innersight.eval.scorers.base.Scorer` that judges the generated answers to
    ``samples`` -- the one way every instrument decides whether an answer is right.

    ``name``: a registered ``"<benchmark>/<variant>"`` or ``"<benchmark>"`` (its canonical
    variant; ``innersight list``) that scores generated text, or ``"auto"``: the benchmark's own
    scorer read off the first sample's fields (:data:`AUTO_SCORERS`): ``options`` -> V*Bench with
    lettered options; ``label`` -> POPE; ``gt_objects`` -> CHAIR (micro-world CHAIR when every
    object is a micro-world kind, :func:`is_micro_world`); ``size_class`` -> micro-details (exact
    match); ``answers`` -> VQA soft accuracy; ``answer`` -> exact match after VQA normalisation
    (GQA). With ``auto``
    every sample must carry the deciding field.
    """
    from ..eval.scorers import SCORERS

    if not samples:
        raise UserInputError("no samples to score")
    if name != "auto":
        key = name if "/" in name else f"{name}/canonical"
        if key not in SCORERS:
            raise UserInputError(f"unknown scorer {name!r}; use auto or one of: {', '.join(sorted(SCORERS))}")
        scorer = SCORERS[key]
        hint = scorer.install_hint()
        if hint is not None:
            raise UserInputError(hint)
        if scorer.prediction != "text":
            raise UserInputError(f"scorer {key} scores option likelihoods, not generated answers; "
                                 f"choose a variant that reads text (e.g. vstar/letter)")
        return scorer
    first = samples[0]
    chosen = next(((f, k) for f, k in AUTO_SCORERS if first.get(f) is not None), None)
    if chosen is None:
        raise UserInputError(f"cannot tell how to score sample {first.get('id', '?')!r}: it has none of "
                             f"{', '.join(repr(f) for f, _ in AUTO_SCORERS)}; name a scorer with "
                             f"--option scorer=<benchmark>/<variant>")
    field_name, key = chosen
    missing = [s.get("id", "?") for s in samples if s.get(field_name) is None]
    if missing:
        raise UserInputError(f"the first sample is scored by {key} (it has {field_name!r}), but {len(missing)} "
                             f"sample(s) lack that field, e.g. {missing[0]!r}; score them with one scorer "
                             f"(--option scorer=<benchmark>/<variant>) or split the data")
    if key == "chair/canonical" and is_micro_world(samples):
        key = "micro-chair/canonical"
    return SCORERS[key]


def render(sample: Sample, scorer: Any) -> tuple[str, Sample]:
    """(question sent to the model, sample the scorer sees): multiple-choice samples scored by
    a V*Bench scorer get their options as lettered lines (V*Bench's ``letter`` preset); other
    questions go as they are."""
    if sample.get("options") is not None and scorer.name == "vstar":
        from ..eval.benchmarks import get_benchmark

        bench = get_benchmark("vstar")
        return bench.render(sample, bench.preset("letter"))
    return str(sample["question"]), sample


def answer_score(scorer: Any, text: str, scored: Sample) -> float:
    """One answer's score in [0, 1] from the scorer's row: its ``correct`` verdict (0 or 1), a
    soft score (VQA ``accuracy``, ``anls``), or for COCO CHAIR 1 when nothing is hallucinated.
    ``scored`` is the sample as :func:`render` returns it."""
    try:
        row = scorer.score_one(text, scored)
    except (KeyError, ValueError, TypeError) as exc:
        raise UserInputError(f"scorer {scorer.key} cannot read sample {scored.get('id', '?')!r}: {exc}") from None
    if "correct" in row:
        return float(bool(row["correct"]))
    for key in ("accuracy", "anls"):
        if key in row:
            return float(row[key])
    if "n_hallucinated" in row:
        return float(row["n_hallucinated"] == 0)
    raise UserInputError(f"scorer {scorer.key} gives no per-answer verdict; choose another with "
                         f"--option scorer=<benchmark>/<variant>")


def is_correct(scorer: Any, text: str, scored: Sample) -> bool:
    """Whether an answer is right: its :func:`answer_score` is at least :data:`SOFT_CORRECT`."""
    return answer_score(scorer, text, scored) >= SOFT_CORRECT


def generation_length(scorer: Any, max_new_tokens: int | None) -> int:
    """``max_new_tokens`` if given (checked), else :data:`DESCRIPTION_TOKENS` for descriptions
    (CHAIR scorers) and :data:`SHORT_TOKENS` otherwise."""
    if max_new_tokens is None:
        return DESCRIPTION_TOKENS if scorer.name in ("chair", "micro-chair") else SHORT_TOKENS
    if isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise UserInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    return int(max_new_tokens)


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of ``items`` of at most ``size``."""
    if size <= 0:
        raise UserInputError(f"batch size must be positive, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


@contextmanager
def progress(total: int, description: str, show: bool = True) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr; yields ``advance(n)`` (a no-op when ``show`` is false)."""
    if not show:
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def percent(share: float) -> float:
    """A share in [0, 1] (accuracy, answers changed) in percent, the one unit every instrument
    reports accuracy in (NaN stays NaN)."""
    return 100.0 * float(share)


def mean(values: Iterable[float]) -> float:
    """Mean of the finite values (``nan`` when there are none)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else float("nan")
