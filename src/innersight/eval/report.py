"""Compare finished runs with statistics people can trust (``innersight report``).

Reads the ``results.json`` and ``samples.jsonl`` that :func:`innersight.eval.runner.evaluate`
writes (no torch) and produces, for every run:

* the main metric with a seeded **bootstrap 95% interval** (resampling samples; the scorer's own
  ``aggregate`` is recomputed on each resample, so corpus-level metrics such as CHAIR_i are
  resampled correctly);
* against the plain run of its comparison group on the same samples, a **paired test**:
  McNemar (exact binomial below 25 discordant pairs) when the main metric is the share of
  correct answers, a paired bootstrap otherwise (ANLS, VQA soft accuracy, CHAIR...), with the
  p-value and the paired difference with its interval;
* the **controls** of arXiv 2504.10020 ("The Mirage of Performance Gains") that apply to the
  harness: the yes-ratio of every yes/no run beside its accuracy, and each method's greedy and
  sampled runs side by side, each compared with the plain run decoded the same way.

Runs are compared only under **matched settings**: a comparison group is one benchmark and one
decoding mode (greedy or sampling); inside a group the data, split, samples, scorer variant,
preset, template, max new tokens, sampling settings, seed and model must agree, otherwise
:func:`analyse` raises :class:`MismatchedRunsError` listing the differences (``allow_mismatch``
overrides it and marks the comparisons as unmatched).

Outputs: a markdown table, a CSV, a JSON file and a PNG (score against seconds per sample with
the intervals as error bars, one legend entry per run, repeated runs numbered, runs with failed
samples drawn hollow and named).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserInputError
from .runner import CONFIG, MERGED, RESULTS, collect_rows, read_rows
from .stats import (
    LEVEL,
    RESAMPLES,
    Interval,
    PairedTest,
    bootstrap_ci,
    bootstrap_mean_ci,
    mcnemar,
    paired_bootstrap,
)


def find_runs(paths: Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """``(finished, unfinished)`` run folders under ``paths``.

    A path is a run folder (holds ``results.json``, or only ``config.json`` when unfinished) or a
    folder of run folders (one level down). A path with neither is a ``UserInputError``.
    """
    finished: list[Path] = []
    unfinished: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file() and path.name == RESULTS:
            path = path.parent
        if not path.is_dir():
            raise UserInputError(f"{str(path)!r} is not a run folder")
        if (path / RESULTS).is_file():
            finished.append(path)
            continue
        if (path / CONFIG).is_file():
            unfinished.append(path)
            continue
        children = sorted(p for p in path.iterdir() if p.is_dir())
        inner_done = [p for p in children if (p / RESULTS).is_file()]
        inner_open = [p for p in children if not (p / RESULTS).is_file() and (p / CONFIG).is_file()]
        if not inner_done and not inner_open:
            raise UserInputError(f"no run in {str(path)!r} (no {RESULTS} in it or in its subfolders)")
        finished.extend(inner_done)
        unfinished.extend(inner_open)
    unique = list(dict.fromkeys(p.resolve() for p in finished))
    return unique, list(dict.fromkeys(p.resolve() for p in unfinished))


def load_results(run: Path) -> dict[str, Any]:
    """The run's ``results.json`` plus ``run`` (its folder)."""
    try:
        data = json.loads((run / RESULTS).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserInputError(f"cannot read {str(run / RESULTS)!r} ({exc})") from None
    if not isinstance(data, dict) or "benchmark" not in data or "metrics" not in data:
        raise UserInputError(f"{str(run / RESULTS)!r} is not an innersight results file")
    data["run"] = str(run)
    return data


class MismatchedRunsError(UserInputError):
    """Runs of one comparison group were made under different settings."""


#: the settings that must agree inside a comparison group, in the order they are listed
GUARDED: tuple[str, ...] = ("model", "data", "split", "samples", "scorer", "preset", "template", "max_new_tokens",
                            "sampling", "seed")
#: the label of a run without methods
PLAIN = "plain"


def decoding_settings(result: Mapping[str, Any]) -> dict[str, Any]:
    """The generate settings the run decoded with, without ``max_new_tokens``: the recorded
    ``decoding`` (what generate received after the methods' own overrides, e.g. DAMRO's official
    preset samples) or, for older results, the requested ``generation``."""
    recorded = result.get("decoding")
    if not isinstance(recorded, Mapping):
        recorded = result.get("generation") or {}
    return {k: v for k, v in sorted(recorded.items()) if k != "max_new_tokens" and v is not None}


def decoding_mode(result: Mapping[str, Any]) -> str:
    """``"sampling"`` when the run sampled (``do_sample``), else ``"greedy"``."""
    return "sampling" if decoding_settings(result).get("do_sample") else "greedy"


def run_settings(result: Mapping[str, Any]) -> dict[str, Any]:
    """The values of :data:`GUARDED` for one run (what must match to compare it with another)."""
    preset = result.get("preset") or {}
    counts = result.get("counts") or {}
    return {
        "model": str(result.get("model", "")),
        "data": {"data": result.get("data"), "options": result.get("options") or {}},
        "split": result.get("split"),
        "samples": {"limit": result.get("limit"), "n": counts.get("samples")},
        "scorer": (result.get("scorer") or {}).get("variant"),
        "preset": {k: preset.get(k) for k in ("name", "suffix", "prompt")},
        "template": result.get("template"),
        "max_new_tokens": (result.get("generation") or {}).get("max_new_tokens"),
        "sampling": decoding_settings(result),
        "seed": result.get("seed"),
    }


def _show(value: Any, limit: int = 48) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def setting_differences(results: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> list[str]:
    """One line per guarded setting on which ``results`` disagree: ``name: label=value; ...``."""
    settings = [run_settings(r) for r in results]
    lines = []
    for key in GUARDED:
        values = [s[key] for s in settings]
        if all(v == values[0] for v in values[1:]):
            continue
        lines.append(f"{key}: " + "; ".join(f"{label}={_show(v)}" for label, v in zip(labels, values)))
    return lines


# ---------------------------------------------------------------------- one run with its samples


@dataclass
class RunReport:
    """One finished run as the report shows it."""

    run: str
    result: dict[str, Any]
    benchmark: str
    mode: str
    label: str
    metric: str | None
    value: float | None
    higher_is_better: bool | None
    n: int | None
    errors: int
    seconds_per_sample: float | None
    interval: Interval | None = None
    yes_ratio: float | None = None
    #: scored rows by sample id (error rows left out)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    versus: PairedTest | None = None
    versus_label: str | None = None
    matched: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def is_plain(self) -> bool:
        return not self.result.get("methods")

    @property
    def group(self) -> tuple[str, str]:
        return self.benchmark, self.mode

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run, "benchmark": self.benchmark, "mode": self.mode, "label": self.label,
            "model": str(self.result.get("model", "")), "methods": list(self.result.get("methods") or []),
            "scorer": (self.result.get("scorer") or {}).get("variant"), "metric": self.metric, "value": self.value,
            "higher_is_better": self.higher_is_better,
            "interval": self.interval.to_json() if self.interval else None, "yes_ratio": self.yes_ratio,
            "n": self.n, "errors": self.errors, "seconds_per_sample": self.seconds_per_sample,
            "versus": self.versus_label, "paired": self.versus.to_json() if self.versus else None,
            "matched": self.matched, "settings": run_settings(self.result), "notes": list(self.notes),
        }


def load_rows(run: Path) -> dict[str, dict[str, Any]]:
    """Sample id -> the scorer's row, for the run's scored samples (``samples.jsonl``)."""
    merged = run / MERGED
    rows = read_rows(merged)[0] if merged.is_file() else list(collect_rows(run).values())
    return {r["id"]: r["score"] for r in rows if r.get("error") is None and isinstance(r.get("score"), dict)}


def _statistic(result: Mapping[str, Any], metric: str) -> Callable[[Sequence[Mapping[str, Any]]], float] | None:
    """``rows -> metric`` through the run's own scorer, or ``None`` when it is not registered."""
    from .scorers import get_scorer

    info = result.get("scorer") or {}
    try:
        scorer = get_scorer(str(info.get("name")), str(info.get("variant", "canonical")))
    except KeyError:
        return None

    def statistic(rows: Sequence[Mapping[str, Any]]) -> float:
        return float(scorer.aggregate(rows)[metric])

    return statistic


def correctness(rows: Sequence[Mapping[str, Any]], metric: str | None, value: float | None) -> list[bool] | None:
    """The per-sample right/wrong outcomes when the main metric is the share of correct answers
    (every row has a boolean ``correct`` and the metric is 100 x their mean), else ``None``: a
    graded score (ANLS, VQA soft accuracy, CHAIR) is compared with a paired bootstrap instead."""
    if metric != "accuracy" or value is None or not rows:
        return None
    outcomes = [r.get("correct") for r in rows]
    if not all(isinstance(o, bool) for o in outcomes):
        return None
    if abs(100.0 * sum(outcomes) / len(outcomes) - float(value)) > 1e-6:
        return None
    return [bool(o) for o in outcomes]


def _interval(report: RunReport, resamples: int, level: float, seed: int) -> Interval | None:
    ordered = list(report.rows.values())
    if not ordered or report.metric is None or report.value is None:
        return None
    outcomes = correctness(ordered, report.metric, report.value)
    if outcomes is not None:
        return bootstrap_mean_ci([float(o) for o in outcomes], scale=100.0, resamples=resamples, level=level,
                                 seed=seed)
    statistic = _statistic(report.result, report.metric)
    if statistic is None:
        return None
    return bootstrap_ci(ordered, statistic, resamples=resamples, level=level, seed=seed)


def paired_test(plain: RunReport, method: RunReport, *, resamples: int = RESAMPLES, level: float = LEVEL,
                seed: int = 0) -> PairedTest | None:
    """``method`` against ``plain`` on the samples both scored (``None`` without common samples or
    a metric): McNemar for accuracy-type metrics, a paired bootstrap of the metric otherwise."""
    ids = [i for i in plain.rows if i in method.rows]
    if not ids or plain.metric is None or plain.metric != method.metric:
        return None
    a = [plain.rows[i] for i in ids]
    b = [method.rows[i] for i in ids]
    right_a = correctness(list(plain.rows.values()), plain.metric, plain.value)
    right_b = correctness(list(method.rows.values()), method.metric, method.value)
    if right_a is not None and right_b is not None:
        return mcnemar([bool(r["correct"]) for r in a], [bool(r["correct"]) for r in b], resamples=resamples,
                       level=level, seed=seed)
    statistic = _statistic(method.result, method.metric)
    if statistic is None:
        return None
    return paired_bootstrap(a, b, statistic, resamples=resamples, level=level, seed=seed)


# ---------------------------------------------------------------------- the whole report


@dataclass
class Report:
    """Every run, its interval and paired test, the controls and what was noticed."""

    runs: list[RunReport]
    resamples: int
    level: float
    seed: int
    alpha: float = 0.05
    controls: list[dict[str, Any]] = field(default_factory=list)
    mismatches: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"resamples": self.resamples, "level": self.level, "seed": self.seed, "alpha": self.alpha,
                "runs": [r.to_json() for r in self.runs], "controls": self.controls,
                "mismatches": self.mismatches, "notes": self.notes}


def _labels(runs: list[RunReport]) -> None:
    """``methods`` (``plain`` without), the model when several are compared, ``#k`` for repeats."""
    models = {str(r.result.get("model", "")) for r in runs}
    seen: dict[tuple[str, str, str], int] = {}
    for r in runs:
        methods = list(r.result.get("methods") or [])
        base = " + ".join(methods) if methods else PLAIN
        if len(models) > 1:
            base += f" ({Path(str(r.result.get('model', ''))).name})"
        key = (r.benchmark, r.mode, base)
        seen[key] = seen.get(key, 0) + 1
        r.label = base if seen[key] == 1 else f"{base} #{seen[key]}"
    for r in runs:  # the first of a repeated label gets #1 too, so repeats read as repeats
        key = (r.benchmark, r.mode, r.label)
        if seen.get(key, 0) > 1:
            r.label = f"{r.label} #1"


def analyse(results: Sequence[dict[str, Any]], *, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0,
            alpha: float = 0.05, allow_mismatch: bool = False,
            rows: Sequence[dict[str, dict[str, Any]]] | None = None) -> Report:
    """Intervals, paired tests and controls for finished runs (``results`` as :func:`load_results`
    returns them; the sample rows are read from each ``run`` folder unless ``rows`` gives them).

    Raises:
        MismatchedRunsError: runs of one benchmark and decoding mode differ in a guarded
            setting (unless ``allow_mismatch``); the message lists every difference.
    """
    if resamples < 1:
        raise UserInputError(f"--resamples must be at least 1, got {resamples}")
    if not 0 < level < 1:
        raise UserInputError(f"--level must be in (0, 1), got {level}")
    runs: list[RunReport] = []
    for i, result in enumerate(results):
        main = result.get("main_metric") or {}
        counts = result.get("counts") or {}
        metrics = result.get("metrics") or {}
        run = RunReport(
            run=str(result.get("run", "")), result=dict(result),
            benchmark=f"{result['benchmark']}/{result.get('split', '')}".rstrip("/"), mode=decoding_mode(result),
            label="", metric=main.get("name"), value=main.get("value"), higher_is_better=main.get("higher_is_better"),
            n=counts.get("samples"), errors=int(counts.get("errors") or 0),
            seconds_per_sample=result.get("seconds_per_sample"),
            yes_ratio=metrics.get("yes_ratio") if isinstance(metrics.get("yes_ratio"), (int, float)) else None,
            rows=dict(rows[i]) if rows is not None else (load_rows(Path(result["run"])) if result.get("run") else {}),
        )
        runs.append(run)
    _labels(runs)
    report = Report(runs, resamples, level, seed, alpha)

    groups: dict[tuple[str, str], list[RunReport]] = {}
    for r in runs:
        groups.setdefault((str(r.result["benchmark"]), r.mode), []).append(r)
    problems = []
    for (bench, mode), members in groups.items():
        diffs = setting_differences([m.result for m in members], [m.label for m in members])
        if diffs:
            report.mismatches[f"{bench} ({mode})"] = diffs
            problems.append(f"{bench} ({mode}) runs differ in " + " | ".join(diffs))
    if problems and not allow_mismatch:
        raise MismatchedRunsError("refusing to compare runs made under different settings: " + " || ".join(problems)
                                  + " -- compare matched runs, or pass --allow-mismatch to show them anyway")

    for r in runs:
        r.interval = _interval(r, resamples, level, seed)
        if r.errors:
            r.notes.append(f"{r.errors} sample(s) failed and are not scored")
    for (bench, mode), members in groups.items():
        plains = [m for m in members if m.is_plain]
        unmatched = f"{bench} ({mode})" in report.mismatches
        if not plains:
            if any(not m.is_plain for m in members):
                report.notes.append(f"{bench}: no plain run decoded {mode}ly with the same settings; no paired test")
            continue
        reference = plains[0]
        for m in members:
            if m is reference:
                continue
            m.versus = paired_test(reference, m, resamples=resamples, level=level, seed=seed)
            m.versus_label = reference.label
            m.matched = not unmatched
            if m.versus is not None and m.versus.n < max(len(m.rows), len(reference.rows)):
                m.notes.append(f"paired on the {m.versus.n} samples both runs scored")
            if m.versus is None:
                m.notes.append(f"no sample in common with {reference.label}; no paired test")
    report.controls = _controls(runs)
    return report


def _controls(runs: Sequence[RunReport]) -> list[dict[str, Any]]:
    """arXiv 2504.10020's controls: every method run under both greedy and sampling decoding."""
    by_key: dict[tuple[str, str], dict[str, RunReport]] = {}
    for r in runs:
        if r.is_plain:
            continue
        by_key.setdefault((r.benchmark, r.label), {}).setdefault(r.mode, r)
    out = []
    for (bench, label), modes in by_key.items():
        entry: dict[str, Any] = {"benchmark": bench, "run": label}
        for mode in ("greedy", "sampling"):
            r = modes.get(mode)
            entry[mode] = None if r is None else {
                "value": r.value, "interval": r.interval.to_json() if r.interval else None, "yes_ratio": r.yes_ratio,
                "difference": r.versus.difference if r.versus else None,
                "p_value": r.versus.p_value if r.versus else None, "sampling": decoding_settings(r.result)}
        out.append(entry)
    return out


# ---------------------------------------------------------------------- writing it out


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ci(interval: Interval | None) -> str:
    if interval is None or interval.low is None or interval.high is None:
        return "-"
    return f"[{interval.low:.2f}, {interval.high:.2f}]"


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _versus(r: RunReport, alpha: float) -> tuple[str, str]:
    """``(difference cell, p cell)`` of a run's paired test."""
    if r.versus is None:
        return ("(reference)" if r.is_plain and r.versus_label is None else "-"), "-"
    t = r.versus
    ci = "" if t.low is None or t.high is None else f" [{t.low:+.2f}, {t.high:+.2f}]"
    star = " *" if t.significant(alpha) else ""
    mark = "" if r.matched else " (unmatched)"
    return f"{t.difference:+.2f}{ci}{star}{mark}", f"{_p(t.p_value)} ({t.test})"


HEADER = ["benchmark", "scorer", "model", "methods", "decoding", "main metric", "95% CI", "yes %", "vs plain",
          "p (test)", "n", "errors", "s/sample"]


def markdown_table(report: Report) -> str:
    """The report as GitHub-flavoured markdown: the table, then controls and notes."""
    level = f"{100 * report.level:g}% CI"
    header = [level if h == "95% CI" else h for h in HEADER]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in report.runs:
        diff, p = _versus(r, report.alpha)
        metric = f"{r.metric} = {_fmt(r.value)}" if r.metric else "-"
        cells = [r.benchmark, str((r.result.get("scorer") or {}).get("variant", "")), str(r.result.get("model", "")),
                 r.label, r.mode, metric, _ci(r.interval), _fmt(r.yes_ratio, 1), diff, p, _fmt(r.n), _fmt(r.errors),
                 _fmt(r.seconds_per_sample, 3)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines.append("")
    lines.append(f"Intervals: percentile bootstrap over samples ({report.resamples} resamples, seed {report.seed}). "
                 f"vs plain: method minus the plain run of the same benchmark and decoding on the samples both "
                 f"scored; McNemar (exact below 25 discordant pairs) for accuracy, paired bootstrap for graded "
                 f"scores; * p < {report.alpha:g}.")
    both = [c for c in report.controls if c["greedy"] and c["sampling"]]
    if any(r.yes_ratio is not None for r in report.runs) or report.controls:
        lines += ["", "Controls (arXiv 2504.10020): yes % is the share of 'yes' answers (50 on balanced POPE data); "
                      "a gain that only moves it is a bias shift, not better perception."]
    if both:
        lines += ["", "| benchmark | run | greedy | vs plain (greedy) | sampling | vs plain (sampling) |",
                  "|---|---|---|---|---|---|"]
        for c in both:
            g, s = c["greedy"], c["sampling"]
            lines.append(f"| {c['benchmark']} | {c['run']} | {_fmt(g['value'])} | {_fmt(g['difference'])} | "
                         f"{_fmt(s['value'])} | {_fmt(s['difference'])} |")
    elif report.controls:
        lines.append("No method was run under both greedy and sampling decoding; the control compares a method with "
                     "plain under each (innersight eval --temperature).")
    for group, diffs in report.mismatches.items():
        lines.append(f"\nWARNING: {group} runs were made under different settings (--allow-mismatch): "
                     + "; ".join(diffs))
    for note in report.notes:
        lines.append(f"\nNote: {note}")
    for r in report.runs:
        for note in r.notes:
            lines.append(f"\nNote ({r.benchmark} {r.label}): {note}")
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["run", "benchmark", "mode", "label", "model", "methods", "scorer", "metric", "value", "ci_low",
              "ci_high", "yes_ratio", "versus", "difference", "diff_low", "diff_high", "p_value", "test", "significant",
              "matched", "n", "paired_n", "errors", "seconds_per_sample"]


def csv_table(report: Report) -> str:
    """One CSV row per run (intervals and paired test as separate columns)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in report.runs:
        t = r.versus
        writer.writerow({
            "run": r.run, "benchmark": r.benchmark, "mode": r.mode, "label": r.label,
            "model": r.result.get("model", ""), "methods": "+".join(r.result.get("methods") or []),
            "scorer": (r.result.get("scorer") or {}).get("variant", ""), "metric": r.metric, "value": r.value,
            "ci_low": r.interval.low if r.interval else None, "ci_high": r.interval.high if r.interval else None,
            "yes_ratio": r.yes_ratio, "versus": r.versus_label, "difference": t.difference if t else None,
            "diff_low": t.low if t else None, "diff_high": t.high if t else None, "p_value": t.p_value if t else None,
            "test": t.test if t else None, "significant": t.significant(report.alpha) if t else None,
            "matched": r.matched, "n": r.n, "paired_n": t.n if t else None, "errors": r.errors,
            "seconds_per_sample": r.seconds_per_sample,
        })
    return buffer.getvalue()


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """One row of the old summary: benchmark, model, methods, main metric, n, errors, seconds per sample."""
    main = result.get("main_metric") or {}
    counts = result.get("counts") or {}
    methods = result.get("methods") or []
    return {
        "run": result.get("run"),
        "benchmark": f"{result['benchmark']}/{result.get('split', '')}".rstrip("/"),
        "scorer": f"{(result.get('scorer') or {}).get('variant', '')}",
        "model": str(result.get("model", "")),
        "methods": " + ".join(methods) if methods else "baseline",
        "metric": main.get("name"),
        "value": main.get("value"),
        "higher_is_better": main.get("higher_is_better"),
        "n": counts.get("samples"),
        "errors": counts.get("errors"),
        "seconds_per_sample": result.get("seconds_per_sample"),
    }


_MARKERS = "osD^vP*Xh<>p"


def _dodged(members: Sequence[RunReport]) -> list[float]:
    """x positions (seconds per sample) with runs that would sit on top of each other (within 6%
    of the panel's spans) moved sideways by 8% of the x span each, so every run stays visible
    (when every run has the same latency, the span is half of it)."""
    points = [(r.seconds_per_sample, r.value) for r in members]
    xs = [float(x) for x, y in points if x is not None and y is not None]
    ys = [float(y) for x, y in points if x is not None and y is not None]
    if not xs:
        return [0.0] * len(members)
    x_span = (max(xs) - min(xs)) or max(abs(max(xs)) * 0.5, 1e-3)
    y_span = (max(ys) - min(ys)) or max(abs(max(ys)) * 0.2, 1e-3)
    placed: list[tuple[float, float]] = []
    out = []
    for x, y in points:
        if x is None or y is None:
            out.append(0.0)
            continue
        near = sum(1 for px, py in placed if abs(px - x) <= 0.06 * x_span and abs(py - y) <= 0.06 * y_span)
        placed.append((float(x), float(y)))
        out.append(float(x) + near * 0.08 * x_span)
    return out


def plot(report: Report, path: str | Path) -> Path:
    """Score (main metric, with its interval as an error bar) against seconds per sample; one
    panel per benchmark, decoding mode and metric. Every run is its own legend entry, numbered
    on the plot (no label is drawn over another); repeated runs are numbered apart (``#2``);
    runs with failed samples are drawn hollow and say how many failed; ``*`` marks a difference
    from plain with p < alpha. Runs without a score or timing are listed under the panel."""
    from ..viz import _pyplot

    plt = _pyplot()
    groups: dict[tuple[str, str, str], list[RunReport]] = {}
    for r in report.runs:
        groups.setdefault((r.benchmark, r.mode, str(r.metric)), []).append(r)
    panels = max(1, len(groups))
    most = max((len(m) for m in groups.values()), default=1)
    fig, axes = plt.subplots(1, panels, figsize=(6.0 * panels, 4.0 + 0.28 * most), squeeze=False)
    if not groups:
        ax = axes[0][0]
        ax.text(0.5, 0.5, "no finished run with a score", ha="center", va="center", transform=ax.transAxes)
    colours = plt.get_cmap("tab10")
    for ax, ((bench, mode, metric), members) in zip(axes[0], sorted(groups.items())):
        handles, texts, missing = [], [], []
        xs = _dodged(members)
        for k, r in enumerate(members):
            number = k + 1
            if r.value is None or r.seconds_per_sample is None:
                missing.append(f"{number}. {r.label}")
                continue
            colour = colours(k % 10)
            x = xs[k]
            err = None
            if r.interval is not None and r.interval.low is not None and r.interval.high is not None:
                err = [[max(0.0, r.value - r.interval.low)], [max(0.0, r.interval.high - r.value)]]
            container = ax.errorbar([x], [r.value], yerr=err, fmt=_MARKERS[k % len(_MARKERS)],
                                    color=colour, ecolor=colour, capsize=4, markersize=8,
                                    markerfacecolor="none" if r.errors else colour, markeredgewidth=1.6)
            ax.annotate(str(number), (x, r.value), textcoords="offset points", xytext=(7, 7),
                        fontsize=8, color=colour)
            text = f"{number}. {r.label}: {r.value:.1f} {_ci(r.interval)}"
            if r.versus is not None and r.versus.significant(report.alpha):
                text += " *"
            if r.errors:
                text += f" ({r.errors} failed)"
            handles.append(container)
            texts.append(text)
        better = members[0].higher_is_better
        suffix = " (higher is better)" if better is True else " (lower is better)" if better is False else ""
        ax.set_title(f"{bench} ({mode})")
        ax.set_xlabel("seconds per sample")
        ax.set_ylabel(f"{metric}{suffix}")
        ax.grid(True, alpha=0.3)
        ax.margins(0.2)
        timed = {r.seconds_per_sample for r in members if r.seconds_per_sample is not None and r.value is not None}
        if len(timed) == 1:  # one latency: show it with room around, not a magnified sliver
            (only,) = timed
            ax.set_xlim(only * 0.7, only * 1.3 + 1e-6)
        if missing:
            texts_missing = "not plotted (no score or timing): " + ", ".join(missing)
            ax.text(0.0, -0.12, texts_missing, transform=ax.transAxes, fontsize=7, va="top")
        if handles:
            ax.legend(handles, texts, loc="upper left", bbox_to_anchor=(0.0, -0.16 if missing else -0.13),
                      fontsize=7.5, frameon=False, ncol=1)
    fig.suptitle(f"innersight: score vs latency ({100 * report.level:g}% bootstrap intervals; * p < {report.alpha:g} "
                 f"vs plain; hollow = failed samples;\nruns at the same place are spread sideways)", fontsize=9, y=1.03)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def write_report(report: Report, png: str | Path) -> dict[str, Path]:
    """The PNG and, beside it, the markdown table (``.md``), the CSV (``.csv``) and the JSON (``.json``)."""
    png = Path(png)
    figure = plot(report, png)
    paths = {"figure": figure, "table": png.with_suffix(".md"), "csv": png.with_suffix(".csv"),
             "json": png.with_suffix(".json")}
    paths["table"].write_text(markdown_table(report), encoding="utf-8")
    paths["csv"].write_text(csv_table(report), encoding="utf-8")
    paths["json"].write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n", encoding="utf-8")
    return paths
