"""``innersight demo``: the micro model on fresh scenes of its world, with and without each method.

Four question sets are drawn from the procedural world with a seed never used in training:
reading small symbols, reading large symbols, existence questions about an absent co-occurring
object (hallucination), and POPE-style existence questions. Every set is answered plainly and
with each method; the accuracy table is printed and an HTML report shows, for some small-symbol
questions, the image with the rel-att map and the chosen box, the crop, and the answers.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: held-out seed: training draws from (seed=0, step); evaluation inside training uses other seeds
DEMO_SEED = 20261121

#: significance level of the demo's McNemar tests against plain
ALPHA = 0.05

#: every method the demo runs by default: the four papers' methods, ViCrop's crop gate, then the
#: training-free baselines users compare against (issue #18). On two idle CPU cores, 24 scenes per set
#: with all of them take about half a minute (BENCHMARKS.md, "The micro model"); ``--method`` picks fewer.
PAPER_METHODS: tuple[str, ...] = ("vicrop-rel-att", "vicrop-grad-att", "vicrop-pure-grad", "vicrop-gated", "deco",
                                  "damro", "var")
BASELINE_METHODS: tuple[str, ...] = ("dola", "vcd", "pai", "m3id", "icd", "vista", "only")
DEFAULT_METHODS: tuple[str, ...] = PAPER_METHODS + BASELINE_METHODS


@dataclass(frozen=True)
class DemoSet:
    name: str
    description: str
    kind: str  # "read" (exact symbol) or "exist" (yes/no)
    draw: Callable[[Any, int, int], list[Any]]  # (world, n, seed) -> samples


def _read(size: str) -> Callable[[Any, int, int], list[Any]]:
    def draw(world: Any, n: int, seed: int) -> list[Any]:
        return world.eval_samples("read", n, seed, size_class=size)

    return draw


SETS: tuple[DemoSet, ...] = (
    DemoSet("read-small", "read a small symbol (13-17 px on a 192 px canvas)", "read", _read("small")),
    DemoSet("read-large", "read a large symbol (40-52 px)", "read", _read("large")),
    DemoSet("hallucination", "is the usual partner of a present shape there? (always no)", "exist",
            lambda world, n, seed: world.hallucination_samples(n, seed)),
    DemoSet("pope", "POPE-style existence, half yes / half no", "exist",
            lambda world, n, seed: world.pope_samples(n, seed, "random")),
)


def normalise_answer(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def is_correct(kind: str, prediction: str, answer: str) -> bool:
    if kind == "exist":
        from ..eval.scorers.pope import parse_canonical

        return parse_canonical(prediction) == answer
    return normalise_answer(prediction) == normalise_answer(answer)


@dataclass
class DemoResult:
    model: str
    n: int
    seed: int
    methods: tuple[str, ...]
    #: set name -> method ("plain" or a method name) -> accuracy in [0, 1]
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    #: set name -> method -> right/wrong per scene (the same scenes for every method)
    correct: dict[str, dict[str, list[bool]]] = field(default_factory=dict)
    #: set name -> method -> bootstrap interval of the accuracy in percent (see :func:`add_statistics`)
    intervals: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: set name -> method -> McNemar test against plain on the same scenes
    versus_plain: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    report: str | None = None

    def significant(self, demo_set: str, run: str, alpha: float = ALPHA) -> bool:
        """Whether ``run`` differs from plain on ``demo_set`` with McNemar p < ``alpha``."""
        test = self.versus_plain.get(demo_set, {}).get(run)
        return test is not None and test.p_value < alpha

    def cell(self, demo_set: str, run: str, digits: int = 1, interval_digits: int | None = None) -> tuple[str, str]:
        """``(accuracy in percent with * when significant, "[low, high]")`` of one table cell."""
        value = f"{100 * self.accuracy[demo_set][run]:.{digits}f}" + ("*" if self.significant(demo_set, run) else "")
        interval = self.intervals.get(demo_set, {}).get(run)
        if interval is None or interval.low is None:
            return value, ""
        d = digits if interval_digits is None else interval_digits
        return value, f"[{interval.low:.{d}f}, {interval.high:.{d}f}]"

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "n_per_set": self.n, "seed": self.seed, "methods": list(self.methods),
                "accuracy": self.accuracy, "seconds_per_answer": self.seconds, "report": self.report,
                "intervals": {s: {r: i.to_json() for r, i in runs.items()} for s, runs in self.intervals.items()},
                "versus_plain": {s: {r: t.to_json() for r, t in runs.items()} for s, runs in self.versus_plain.items()},
                "alpha": ALPHA}


def add_statistics(result: DemoResult, *, resamples: int = 1000, seed: int = 0) -> DemoResult:
    """Fill in each accuracy's bootstrap 95% interval (resampling scenes, seeded) and each
    method's McNemar test against plain on the same scenes (:mod:`innersight.eval.stats`)."""
    from ..eval.stats import bootstrap_mean_ci, mcnemar

    for demo_set, runs in result.correct.items():
        for run, outcomes in runs.items():
            result.intervals.setdefault(demo_set, {})[run] = bootstrap_mean_ci(
                [float(o) for o in outcomes], scale=100.0, resamples=resamples, seed=seed)
            if run != "plain":
                result.versus_plain.setdefault(demo_set, {})[run] = mcnemar(runs["plain"], outcomes,
                                                                           resamples=resamples, seed=seed)
    return result


def markdown_table(result: DemoResult) -> str:
    """The accuracy table as README shows it: one row per run (plain first), one column per set,
    the 95% interval after each accuracy, * = differs from plain (McNemar p < 0.05), the best of
    each set in bold. Rows, not columns, per method: with the baselines there are fifteen runs."""
    runs = ["plain", *result.methods]
    lines = ["| method | " + " | ".join(s.description for s in SETS) + " |", "|---|" + "---|" * len(SETS)]
    best = {s.name: max(result.accuracy[s.name].values()) for s in SETS}
    for run in runs:
        cells = []
        for demo_set in SETS:
            value = f"{100 * result.accuracy[demo_set.name][run]:.1f}"
            if result.accuracy[demo_set.name][run] == best[demo_set.name]:
                value = f"**{value}**"
            if result.significant(demo_set.name, run):
                value += "\\*"
            cells.append(f"{value} {result.cell(demo_set.name, run)[1]}".strip())
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_demo(
    mllm: Any,
    *,
    n: int = 24,
    seed: int = DEMO_SEED,
    methods: Sequence[str] = DEFAULT_METHODS,
    batch_size: int = 16,
    output: Path | None = None,
    examples: int = 6,
    progress: bool = True,
    model_name: str = "micro",
) -> DemoResult:
    """Answer every demo set plainly and with each method; optionally write the HTML report."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .world import World, WorldConfig

    if output is not None:
        from ..outputs import check_output_dir

        check_output_dir(Path(output))  # before the answering, which takes the time
    world = World(WorldConfig())
    result = DemoResult(model_name, n, seed, tuple(methods))
    runs = ["plain", *methods]
    samples = {s.name: s.draw(world, n, seed + i) for i, s in enumerate(SETS)}
    answers: dict[tuple[str, str], list[Any]] = {}
    total = len(SETS) * len(runs) * n
    elapsed: dict[str, float] = dict.fromkeys(runs, 0.0)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not progress, transient=False) as bar:
        task = bar.add_task("answering", total=total)
        for demo_set in SETS:
            rows = samples[demo_set.name]
            for run in runs:
                bar.update(task, description=f"{demo_set.name:<13} {run:<16}")
                out: list[Any] = []
                for start in range(0, len(rows), batch_size):
                    chunk = rows[start : start + batch_size]
                    t0 = time.perf_counter()
                    out.extend(mllm.answer_batch([s.image for s in chunk], [s.question for s in chunk],
                                                 methods=[] if run == "plain" else [run], max_new_tokens=6,
                                                 batch_size=batch_size))
                    elapsed[run] += time.perf_counter() - t0
                    bar.advance(task, len(chunk))
                answers[(demo_set.name, run)] = out
                correct = [is_correct(demo_set.kind, a.text, s.answer) for a, s in zip(out, rows)]
                result.accuracy.setdefault(demo_set.name, {})[run] = sum(correct) / len(correct)
                result.correct.setdefault(demo_set.name, {})[run] = correct
    result.seconds = {run: elapsed[run] / (len(SETS) * n) for run in runs}
    add_statistics(result)
    if output is not None:
        result.report = str(write_report(result, samples, answers, Path(output), examples))
    return result


def _png_data(fig_or_image: Any) -> str:
    buf = io.BytesIO()
    if hasattr(fig_or_image, "savefig"):
        fig_or_image.savefig(buf, format="png", dpi=100)
    else:
        fig_or_image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _example_figure(sample: Any, vicrop_answer: Any) -> Any:
    from matplotlib.patches import Rectangle

    from ..viz import _pyplot, draw_map

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.3), gridspec_kw={"width_ratios": [1.25, 1]})
    region = tuple(vicrop_answer.details["vicrop-rel-att"]["map_region"])
    draw_map(axes[0], sample.image, vicrop_answer.maps["importance"], region, box=vicrop_answer.box,
             title="rel-att: dimmed where the map is low\nchosen box (white), target (green)")
    if sample.meta.get("box"):
        x0, y0, x1, y1 = sample.meta["box"]
        axes[0].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="lime", lw=1.5))
    axes[1].imshow(vicrop_answer.crop)
    axes[1].set_title("crop given as 2nd image", fontsize=9)
    axes[1].axis("off")
    fig.tight_layout()
    data = _png_data(fig)
    plt.close(fig)
    return data


def write_report(result: DemoResult, samples: dict[str, list[Any]], answers: dict[tuple[str, str], list[Any]],
                 out_dir: Path, examples: int) -> Path:
    """``out_dir/report.html`` (pictures embedded) and ``out_dir/results.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = ["plain", *result.methods]
    head = "".join(f"<th>{html.escape(r)}</th>" for r in runs)
    rows = []
    for demo_set in SETS:
        acc = result.accuracy[demo_set.name]
        best = max(acc.values())
        cells = "".join(
            f"<td{' class=best' if acc[r] == best else ''}>{html.escape(result.cell(demo_set.name, r)[0])}"
            f"<br><small>{html.escape(result.cell(demo_set.name, r)[1])}</small></td>" for r in runs)
        rows.append(f"<tr><td><b>{demo_set.name}</b><br><small>{html.escape(demo_set.description)}</small></td>{cells}</tr>")
    secs = "".join(f"<td>{1000 * result.seconds[r]:.0f}</td>" for r in runs)
    rows.append(f"<tr><td>ms per answer</td>{secs}</tr>")
    cards = []
    vicrop_run = next((m for m in result.methods if m == "vicrop-rel-att"), None)
    if vicrop_run is not None:
        for i, sample in enumerate(samples["read-small"][:examples]):
            plain = answers[("read-small", "plain")][i].text
            crop = answers[("read-small", vicrop_run)][i]
            def verdict(text: str, truth: str = sample.answer) -> str:
                return "ok" if is_correct("read", text, truth) else "wrong"

            cards.append(
                f"<div class=card><img src='{_example_figure(sample, crop)}'>"
                f"<p><b>Q:</b> {html.escape(sample.question)}<br><b>truth:</b> {html.escape(sample.answer)}<br>"
                f"<b>plain:</b> {html.escape(plain)} <span class={verdict(plain)}>{verdict(plain)}</span><br>"
                f"<b>with ViCrop rel-att:</b> {html.escape(crop.text)} "
                f"<span class={verdict(crop.text)}>{verdict(crop.text)}</span></p></div>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>innersight demo</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}} td:first-child{{text-align:left}}
.best{{background:#d8f5d8;font-weight:bold}} .card{{display:inline-block;width:520px;vertical-align:top;margin:8px;
border:1px solid #ddd;padding:6px}} .card img{{width:510px}} .ok{{color:green}} .wrong{{color:#c00}}</style></head>
<body><h1>innersight demo &mdash; {html.escape(result.model)}</h1>
<p>{result.n} fresh scenes per set (seed {result.seed}), greedy answers of at most 6 tokens.
Accuracy in percent with its bootstrap 95% interval (resampling scenes); * marks a difference from
plain with McNemar p &lt; 0.05 on the same scenes; the best of each row is highlighted.</p>
<table><tr><th>set</th>{head}</tr>{''.join(rows)}</table>
<h2>Where the model looks: small symbols</h2>{''.join(cards) or '<p>(vicrop-rel-att not among the methods)</p>'}
</body></html>"""
    path = out_dir / "report.html"
    path.write_text(page)
    (out_dir / "results.json").write_text(json.dumps(result.to_json(), indent=2))
    (out_dir / "table.md").write_text(markdown_table(result))
    return path
