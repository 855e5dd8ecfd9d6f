"""The ``innersight`` command line. Heavy imports (torch, transformers) stay inside commands."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .errors import InnersightError
from .instruments import LISTINGS

if TYPE_CHECKING:  # pragma: no cover
    from .instruments.common import Measurement

app = typer.Typer(
    name="innersight",
    help="Make multimodal LLMs use what they already know: training-free, at inference time.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Hub id, local checkpoint directory, or 'micro'.")]
MethodOpt = Annotated[
    list[str] | None,
    typer.Option("--method", help="Method to apply (repeatable; see `innersight list`)."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a method config field: method.field=value (repeatable)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:N or auto (several GPUs).")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="float32, float16 or bfloat16 (default: bf16 on GPU, fp32 on CPU).")]


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _parse_sets(items: list[str] | None) -> dict[str, dict[str, str]]:
    """``["deco.alpha=0.5"]`` -> ``{"deco": {"alpha": "0.5"}}`` (values are parsed by the method)."""
    out: dict[str, dict[str, str]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        method, dot, fld = key.partition(".")
        if not sep or not dot or not method or not fld:
            raise InnersightError(f"--set expects method.field=value, got {item!r}")
        out.setdefault(method, {})[fld] = value
    return out


def _check_common(*, device: str | None = None, max_new_tokens: int | None = None, batch_size: int | None = None,
                  limit: int | None = None) -> None:
    """Arguments every command shares, checked before any data or model is loaded."""
    from .loading import check_device

    check_device(device)
    if max_new_tokens is not None and max_new_tokens < 1:
        _fail(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    if batch_size is not None and batch_size < 1:
        _fail(f"--batch-size must be at least 1, not {batch_size}")
    if limit is not None and limit < 1:
        _fail(f"--limit must be at least 1, not {limit}")


def _check_methods(names: list[str], settings: dict[str, dict[str, str]]) -> None:
    """Method names, combinations and ``--set`` values, checked before the model loads."""
    from .methods import resolve_methods

    resolve_methods(names, settings)


#: what to tell the user when they interrupt a command (the eval command says how to resume)
_RESUME: dict[str, str] = {}


@app.command()
def answer(
    model: ModelOpt,
    image: Annotated[list[str], typer.Option("--image", "-i", help="Image file (repeat for several images in one prompt).")],
    question: Annotated[str, typer.Option("--question", "-q", help="The question to ask.")],
    method: MethodOpt = None,
    set_: SetOpt = None,
    template: Annotated[str, typer.Option(help="Prompt template: chat (the model's own) or reference (the papers').")] = "chat",
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.")] = 32,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Answer one question about an image."""
    from .images import load_images

    if not question.strip():
        _fail("the question is empty")
    _check_common(device=device, max_new_tokens=max_new_tokens)
    settings = _parse_sets(set_)
    if settings and not method:
        _fail("--set given but no --method to apply it to")
    _check_methods(method or [], settings)
    images = load_images(image)  # validate before the (slow) model load
    import innersight

    mllm = innersight.load(model, device=device, dtype=dtype)
    import torch

    torch.manual_seed(seed)
    result = mllm.answer(images, question, methods=method or [], settings=settings, template=template,
                         max_new_tokens=max_new_tokens)
    if as_json:
        payload = {"model": model, **result.to_json()}
        typer.echo(json.dumps(payload, indent=2))
    else:
        typer.echo(result.text)


@app.command()
def demo(
    model: Annotated[str, typer.Option("--model", "-m", help="Model to demonstrate (default: the bundled micro model).")] = "micro",
    n: Annotated[int, typer.Option("--n", help="Scenes per question set.")] = 24,
    method: MethodOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for report.html and results.json.")] = Path("innersight-demo"),
    seed: Annotated[int | None, typer.Option(help="Scene seed (default: the held-out demo seed).")] = None,
    batch_size: Annotated[int, typer.Option(help="Questions per batch.")] = 16,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Offline demonstration: the bundled micro model on fresh scenes, with and without each method."""
    from .demo.run import DEFAULT_METHODS, DEMO_SEED, SETS, run_demo

    if n < 1:
        _fail("--n must be at least 1")
    _check_common(device=device, batch_size=batch_size)
    methods = tuple(method) if method else DEFAULT_METHODS
    from .methods import resolve_methods

    for name in methods:
        resolve_methods([name])  # unknown names fail before any work
    from .outputs import check_output_dir

    check_output_dir(output)
    import innersight

    mllm = innersight.load(model, device=device)
    result = run_demo(mllm, n=n, seed=DEMO_SEED if seed is None else seed, methods=methods, batch_size=batch_size,
                      output=output, progress=not as_json, model_name=model)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    runs = ["plain", *methods]
    # one row per method, one column per question set: stays readable in an 80-column terminal
    table = Table(title=f"innersight demo: {model}, {n} fresh scenes per set, accuracy % [95% interval]")
    table.add_column("method", no_wrap=True)
    for demo_set in SETS:
        table.add_column(demo_set.name, justify="right")
    table.add_column("ms/ans", justify="right")
    best = {s.name: max(result.accuracy[s.name].values()) for s in SETS}
    for run in runs:
        cells = []
        for demo_set in SETS:
            value, interval = result.cell(demo_set.name, run, interval_digits=0)
            value = f"[bold green]{value}[/]" if result.accuracy[demo_set.name][run] == best[demo_set.name] else value
            cells.append(f"{value}\n[dim]{interval}[/]" if interval else value)
        table.add_row(run, *cells, f"{1000 * result.seconds[run]:.0f}")
    console = Console()
    console.print(table)
    console.print("bootstrap 95% intervals over scenes; * differs from plain (McNemar p < 0.05, same scenes)")
    console.print(f"report: {result.report}")


@app.command("train-micro", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                             "help_option_names": []})
def train_micro(ctx: typer.Context) -> None:
    """Train the micro model on its procedural world (all options: `innersight train-micro --help`).

    Same as `python -m innersight.demo.train`; e.g. `innersight train-micro --out DIR --steps 4000
    --vision-steps 2000 --threads 2 --seed 0` reproduces the bundled weights.
    """
    from .demo.train import main as train_main

    raise typer.Exit(train_main(list(ctx.args), prog="innersight train-micro"))


@app.command()
def explain(
    model: ModelOpt,
    image: Annotated[str, typer.Option("--image", "-i", help="Image file.")],
    question: Annotated[str, typer.Option("--question", "-q", help="The question to ask.")],
    method: Annotated[str, typer.Option("--method", help="rel-att, grad-att or pure-grad (ViCrop map).")] = "rel-att",
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG to write.")] = Path("explain.png"),
    set_: SetOpt = None,
    template: Annotated[str, typer.Option(help="Prompt template: chat or reference.")] = "chat",
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.")] = 32,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Draw where the model looks (ViCrop map, box, crop) and answer with and without the crop."""
    from .images import load_image
    from .methods import METHODS

    name = method if method.startswith("vicrop-") else f"vicrop-{method}"
    if name not in METHODS or METHODS[name].key != "vicrop":
        _fail(f"--method must be rel-att, grad-att or pure-grad, not {method!r}")
    if not question.strip():
        _fail("the question is empty")
    if output.suffix.lower() != ".png":
        _fail(f"--output must be a .png file, not {output}")
    _check_common(device=device, max_new_tokens=max_new_tokens)
    settings = _parse_sets(set_)
    _check_methods([name], settings)
    from .outputs import check_output_file

    check_output_file(output)
    picture = load_image(image)
    import innersight

    from .viz import explain_figure

    mllm = innersight.load(model, device=device, dtype=dtype)
    plain = mllm.answer(picture, question, template=template, max_new_tokens=max_new_tokens)
    cropped = mllm.answer(picture, question, methods=[name], settings=settings, template=template,
                          max_new_tokens=max_new_tokens)
    region = tuple(cropped.details[name]["map_region"])
    explain_figure(picture, cropped.maps["importance"], region, cropped.box, cropped.crop, question=question,
                   answers=[("without crop", plain.text), (f"with {name}", cropped.text)], method=name,
                   model=model, path=output)
    if as_json:
        typer.echo(json.dumps({"model": model, "question": question, "answer_plain": plain.text,
                               "answer_vicrop": cropped.text, "box": list(cropped.box), "figure": str(output)},
                              indent=2))
    else:
        typer.echo(f"without crop: {plain.text}")
        typer.echo(f"with {name}: {cropped.text}")
        typer.echo(f"box: ({', '.join(f'{v:.0f}' for v in cropped.box)})  figure: {output}")


@app.command("eval")
def eval_(
    benchmark: Annotated[str, typer.Option("--benchmark", "-b", help="Benchmark name (see `innersight list`).")],
    model: ModelOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder of runs (a run folder is created in it) or an existing run folder to resume.")],
    data: Annotated[Path | None, typer.Option("--data", help="The benchmark's folder, in its official layout, or hf:REPO_ID / hf:FOLDER for a hosted copy (pip install datasets).")] = None,
    split: Annotated[str | None, typer.Option("--split", help="Benchmark split (default: its first).")] = None,
    method: MethodOpt = None,
    set_: SetOpt = None,
    scorer_variant: Annotated[str, typer.Option("--scorer-variant", help="Scorer variant (canonical = the official definition).")] = "canonical",
    preset: Annotated[str | None, typer.Option("--preset", help="Prompt preset of the benchmark (default: its own for the scorer variant).")] = None,
    template: Annotated[str, typer.Option(help="Prompt template: chat (the model's own) or reference (the papers').")] = "chat",
    limit: Annotated[int | None, typer.Option("--limit", help="Evaluate only the first N samples.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per generation batch.")] = 8,
    max_new_tokens: Annotated[int | None, typer.Option(help="Longest answer in tokens (default: the preset's; vicrop on its paper's benchmarks: 20).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    temperature: Annotated[float, typer.Option(help="0: greedy (default); > 0: sample at this temperature (seeded by --seed).")] = 0.0,
    top_p: Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling mass, with --temperature > 0.")] = None,
    image_ids: Annotated[Path | None, typer.Option("--image-ids", help="CHAIR: file of COCO image ids to caption.")] = None,
    images: Annotated[Path | None, typer.Option("--images", help="Folder of the benchmark's images, when not in the official place.")] = None,
    retry_errors: Annotated[bool, typer.Option("--retry-errors", help="Redo samples whose earlier attempt failed.")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a model (with methods) on a benchmark; resumable, one row per sample as it finishes."""
    from .eval.benchmarks import get_benchmark
    from .eval.scorers import get_scorer, variants

    bench = get_benchmark(benchmark)
    split = bench.check_split(split)
    _check_common(device=device, max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit)
    settings = _parse_sets(set_)
    if settings and not method:
        _fail("--set given but no --method to apply it to")
    if temperature < 0 or (top_p is not None and not 0 < top_p <= 1):
        _fail("--temperature must be >= 0 and --top-p in (0, 1]")
    if top_p is not None and temperature == 0:
        _fail("--top-p applies only when sampling (--temperature > 0)")
    try:
        scorer = get_scorer(bench.scorer, scorer_variant)
    except KeyError:
        _fail(f"benchmark {bench.name!r} has no variant {scorer_variant!r}; variants: "
              f"{', '.join(variants(bench.scorer))}")
    from .eval.runner import check_scorer_installed

    check_scorer_installed(scorer)
    bench.preset(preset, scorer_variant)
    options = {k: v for k, v in (("image_ids", image_ids), ("images", images)) if v is not None}
    samples = bench.load(data, split, **options)  # validate the data before the (slow) model load
    from .eval.lock import RunLock
    from .eval.runner import CONFIG, check_protocol, evaluate, process_info, run_name
    from .methods import resolve_methods

    plan = resolve_methods(method or [], settings)
    check_protocol(scorer, plan)
    from .outputs import check_output_dir

    check_output_dir(output)
    sampled = f"-T{temperature:g}" + (f"-p{top_p:g}" if top_p else "") if temperature > 0 else ""
    run_dir = output if (output / CONFIG).is_file() else output / (run_name(bench.name, split, model, plan.names) + sampled)
    check_output_dir(run_dir)
    _RESUME["hint"] = (f"finished samples are kept in {run_dir}; run the same command again to resume "
                       "where it stopped")
    proc = process_info(device)
    RunLock(run_dir, proc.rank).check_free()  # another eval writing this folder: say so before the model loads
    import innersight

    mllm = innersight.load(model, device=device or proc.device, dtype=dtype)
    generation: dict[str, Any] = {"max_new_tokens": max_new_tokens} if max_new_tokens is not None else {}
    if temperature > 0:
        generation.update({"do_sample": True, "temperature": temperature, **({"top_p": top_p} if top_p else {})})
    results = evaluate(mllm, bench, data, split, method or [], settings, run_dir, limit, batch_size, seed, generation,
                       scorer_variant=scorer_variant, preset=preset, template=template, options=options,
                       retry_errors=retry_errors, progress=not as_json, process=proc, samples=samples)
    if not proc.is_main:
        return
    if as_json:
        typer.echo(json.dumps({"run": str(run_dir), **results}, indent=2))
        return
    main = results["main_metric"]
    counts = results["counts"]
    value = f"{main['name']} = {main['value']:.2f}" if main["name"] and main["value"] is not None else "no score"
    typer.echo(f"{results['benchmark']}/{results['split']} {' + '.join(results['methods']) or 'baseline'}: {value} "
               f"(n={counts['samples']}, errors={counts['errors']}, unknown={counts['unknown']})")
    typer.echo(f"results: {run_dir / 'results.json'}")
    if counts["errors"]:
        typer.echo(f"warning: {counts['errors']} sample(s) failed and are not scored; see the 'error' field in "
                   f"{run_dir / 'samples.jsonl'} (--retry-errors redoes them)", err=True)


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (or folders of runs).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG to write (the table goes beside it as .md, .csv and .json).")] = Path("report.png"),
    allow_mismatch: Annotated[bool, typer.Option("--allow-mismatch", help="Compare runs even when their data, split, scorer, prompt, max new tokens, sampling, seed or model differ (they are marked).")] = False,
    resamples: Annotated[int, typer.Option("--resamples", help="Bootstrap resamples for the intervals and paired tests.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap resampling.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Compare finished runs: scores with bootstrap intervals, paired tests against plain, controls."""
    from .eval.report import analyse, find_runs, load_results, markdown_table, write_report

    if output.suffix.lower() != ".png":
        _fail(f"--output must be a .png file, not {output}")
    if resamples < 1:
        _fail("--resamples must be at least 1")

    from .outputs import check_output_file

    check_output_file(output)
    check_output_file(output.with_suffix(".md"), "--output (its table)")
    finished, unfinished = find_runs(runs)
    if not finished:
        _fail("no finished run among " + ", ".join(str(r) for r in runs) + " (re-run their eval commands to finish)")
    analysed = analyse([load_results(r) for r in finished], resamples=resamples, seed=seed,
                       allow_mismatch=allow_mismatch)
    paths = write_report(analysed, output)
    if as_json:
        typer.echo(json.dumps({**analysed.to_json(), "unfinished": [str(u) for u in unfinished],
                               **{k: str(v) for k, v in paths.items()}}, indent=2))
        return
    typer.echo(markdown_table(analysed), nl=False)
    typer.echo(f"\nfigure: {paths['figure']}\ntable: {paths['table']}\ncsv: {paths['csv']}\njson: {paths['json']}")
    for u in unfinished:
        typer.echo(f"warning: {u} is unfinished (no results.json); re-run its eval command", err=True)


def _parse_options(items: list[str] | None) -> dict[str, str]:
    """``["layer=5"]`` -> ``{"layer": "5"}`` (values are parsed by the instrument)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InnersightError(f"--option expects name=value, got {item!r}")
        out[key.strip()] = value
    return out


def _run_instrument(name: str, model: str, benchmark: str | None, data: Path | None, split: str | None,
                    limit: int | None, options: dict[str, str], device: str | None, dtype: str | None, seed: int,
                    show_progress: bool) -> Measurement:
    """Load the samples and the model, run instrument ``name``; returns its ``Measurement``
    (figure drawn, settings filled in, nothing written yet). ``seed`` seeds torch and becomes the
    instrument's own ``seed`` option when it has one and ``--option seed=`` was not given."""
    from .instruments import get_instrument
    from .instruments.common import load_samples

    inst = get_instrument(name)
    _check_common(device=device, limit=limit)
    parsed = inst.parse_options(options)
    if "seed" in inst.options and "seed" not in options:
        parsed["seed"] = seed
    bench = benchmark or inst.default_benchmark
    split = split or (inst.default_split if benchmark is None else None)
    samples = load_samples(bench, data, split, limit)
    import innersight

    mllm = innersight.load(model, device=device, dtype=dtype)
    import torch

    torch.manual_seed(seed)
    result = inst.function(mllm, samples, model_name=model, show_progress=show_progress, **parsed)
    result.settings = {"benchmark": bench, "split": split, "limit": limit, "seed": seed, **parsed, **result.settings}
    return result


def _report_instrument(result: Measurement, json_path: Path, png_path: Path | None, as_json: bool) -> None:
    """Print where the files went and the instrument's summary (or everything as JSON)."""
    if as_json:
        typer.echo(json.dumps({"json": str(json_path), "figure": str(png_path) if png_path else None,
                               **result.to_json()}, indent=2))
        return
    summary = result.numbers.get("summary")
    if isinstance(summary, dict):
        for key, value in summary.items():
            typer.echo(f"{key}: {value}")
    typer.echo(f"numbers: {json_path}")
    if png_path is not None:
        typer.echo(f"figure: {png_path}")


BenchmarkOpt = Annotated[str | None, typer.Option("--benchmark", "-b", help="Benchmark the samples come from (default: the instrument's micro-world one).")]
DataOpt = Annotated[Path | None, typer.Option("--data", help="The benchmark's folder, in its official layout.")]


@app.command()
def measure(
    instrument: Annotated[str, typer.Argument(help=f"One of: {', '.join(LISTINGS)} (see `innersight list`).")],
    model: ModelOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for <instrument>.json and <instrument>.png.")],
    benchmark: BenchmarkOpt = None,
    data: DataOpt = None,
    split: Annotated[str | None, typer.Option("--split", help="Benchmark split.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Use only the first N samples.")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", help="Instrument option name=value (repeatable; see the instrument's doc).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run one of the papers' measurements; writes numbers (JSON) and a figure (PNG)."""
    from .instruments import get_instrument, write_measurement
    from .outputs import check_output_dir, check_output_file

    get_instrument(instrument)  # an unknown name fails before the paths are looked at
    check_output_dir(output)
    for suffix in (".json", ".png"):
        check_output_file(output / f"{instrument}{suffix}")
    result = _run_instrument(instrument, model, benchmark, data, split, limit, _parse_options(option), device, dtype,
                             seed, show_progress=not as_json)
    json_path, png_path = write_measurement(result, output)
    _report_instrument(result, json_path, png_path, as_json)


@app.command()
def sinks(
    model: ModelOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG to write (the numbers go beside it as .json).")] = Path("sinks.png"),
    benchmark: BenchmarkOpt = None,
    data: DataOpt = None,
    split: Annotated[str | None, typer.Option("--split", help="Benchmark split.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Use only the first N samples.")] = 16,
    option: Annotated[list[str] | None, typer.Option("--option", help="Instrument option name=value (repeatable): tau, dims, first_layer, seed, ...")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (also of the randomly masked image tokens).")] = 0,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Detected visual sink dimensions and per-layer sink statistics (VAR), drawn to a PNG."""
    if output.suffix.lower() != ".png":
        _fail(f"--output must be a .png file, not {output}")
    if output.is_dir():
        _fail(f"--output {output} is a folder; give a .png file name")
    from .outputs import check_output_file

    check_output_file(output)
    check_output_file(output.with_suffix(".json"), "--output (its numbers)")
    result = _run_instrument("sinks", model, benchmark, data, split, limit, _parse_options(option), device, dtype,
                             seed, show_progress=not as_json)
    from .instruments.common import write_files

    json_path, png_path = write_files(result, output.with_suffix(".json"), output)
    _report_instrument(result, json_path, png_path, as_json)


@app.command("list")
def list_(as_json: JsonOpt = False) -> None:
    """List supported model families, methods, benchmarks and instruments (no model is loaded)."""
    from .adapters import FAMILY_NAMES
    from .eval.benchmarks import BENCHMARKS
    from .eval.scorers import variants
    from .instruments import describe_instruments
    from .methods import METHODS
    from .support import matrix_json

    data = {
        "models": [{"family": k, "name": v} for k, v in FAMILY_NAMES.items()]
        + [{"family": "llava", "name": "micro (bundled, offline)"}],
        "methods": [
            {"name": s.name, "set_names": list(dict.fromkeys((s.name, s.key or s.name))), "point": s.point,
             "summary": s.summary, "source": s.source, "needs": list(s.needs)} for s in METHODS.values()
        ],
        "support_matrix": matrix_json(),
        "benchmarks": [{**b.describe(), "scorer_variants": variants(b.scorer)} for b in BENCHMARKS.values()],
        "instruments": describe_instruments(),
    }
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    models = Table(title="Model families")
    models.add_column("family")
    models.add_column("model")
    for m in data["models"]:
        models.add_row(m["family"], m["name"])
    console.print(models)
    methods = Table(title="Methods")
    widest = max((len(m["name"]) for m in data["methods"]), default=4)
    methods.add_column("name (--set NAME.field=v)", min_width=widest)  # names never cut
    for col in ("point", "summary", "source"):
        methods.add_column(col)
    for m in data["methods"]:
        also = [n for n in m["set_names"] if n != m["name"]]
        shown = m["name"] + "".join(f"\nor {n}" for n in also)
        methods.add_row(shown, m["point"], m["summary"], m["source"])
    if not data["methods"]:
        console.print("Methods: none in this version yet.")
    else:
        console.print(methods)
        _print_support_matrix(console)
    benchmarks = Table(title="Benchmarks")
    for col in ("name", "splits", "scorer variants", "presets"):
        benchmarks.add_column(col)
    for b in data["benchmarks"]:
        benchmarks.add_row(b["name"], ", ".join(b["splits"]), ", ".join(b["scorer_variants"]), ", ".join(b["presets"]))
    console.print(benchmarks)
    instruments = Table(title="Instruments (innersight measure NAME; options: --option name=value)")
    for col in ("name", "title", "default benchmark", "options (defaults)"):
        instruments.add_column(col, overflow="fold")
    for i in data["instruments"]:
        bench = i["default_benchmark"] + (f" ({i['default_split']})" if i["default_split"] else "")
        instruments.add_row(i["name"], i["title"], bench, "\n".join(f"{k}={_shown(v)}" for k, v in i["options"].items()))
    console.print(instruments)


def _print_support_matrix(console: Any) -> None:
    """The method x family matrix (:mod:`innersight.support`): methods as rows, families as
    columns (numbered, with a key, where the names do not fit the terminal), one mark per cell,
    then a legend and one note per substitute or refusal."""
    from .support import LEGEND, MARKS, grouped_notes, support_matrix

    matrix = support_matrix()
    families = list(next(iter(matrix.values()), {}))
    # one word per line ("llava_next" -> "llava" / "next") keeps the columns narrow
    table = _matrix_table(matrix, ["\n".join(f.split("_")) for f in families])
    natural = console.measure(table, options=console.options.update(max_width=10_000)).maximum  # unclamped
    if natural > console.width:
        table = _matrix_table(matrix, [str(i) for i in range(1, len(families) + 1)])
        console.print("families: " + ", ".join(f"{i} {f}" for i, f in enumerate(families, 1)), highlight=False)
    console.print(table)
    console.print("  ".join(f"{MARKS[level]} {level}: {text}" for level, text in LEGEND.items()), highlight=False)
    for method, level, reason, where in grouped_notes(matrix):
        console.print(f"{MARKS[level]} {method} on {', '.join(where)}: {reason}", highlight=False)


def _matrix_table(matrix: dict[str, Any], headers: list[str]) -> Any:
    """The marks of ``matrix`` (method -> family -> Cell) under one column header per family."""
    from rich.table import Table

    table = Table(title="Method x family support (from each method's needs and the adapters' facets)")
    table.add_column("method", no_wrap=True)
    for header in headers:
        table.add_column(header, justify="center", no_wrap=True)
    for method, row in matrix.items():
        table.add_row(method, *(c.mark for c in row.values()))
    return table


def _shown(value: object) -> str:
    """An option default as ``innersight list`` prints it: None -> auto, '' -> ''."""
    if value is None:
        return "auto"
    return repr(value) if value == "" else str(value)


class _WarningLine(logging.Handler):
    """innersight's warnings (e.g. a negative branch that had to run serially, VAR finding no
    sinks) as one ``warning: ...`` line each on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(f"warning: {record.getMessage()}\n")


def _show_warnings() -> None:
    logger = logging.getLogger("innersight")
    if not any(isinstance(h, _WarningLine) for h in logger.handlers):
        handler = _WarningLine(level=logging.WARNING)
        logger.addHandler(handler)  # root has no handler in a CLI run: logging's last resort stays silent


def _interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` (typer turns Ctrl-C into ``Exit(130)``) was caused by a KeyboardInterrupt."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback;
    Ctrl-C exits 130 with one line that says how to resume (eval) or that nothing was finished."""
    _RESUME.clear()
    _show_warnings()
    try:
        app(args=argv, standalone_mode=True)
    except InnersightError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _say_interrupted()
        sys.exit(130)
    except SystemExit as exc:
        if exc.code == 130 and _interrupted(exc):
            _say_interrupted()
        raise
    except OSError as exc:  # a disk that fills up or goes read-only while writing
        where = f" {exc.filename}" if exc.filename else ""
        hint = f"; {_RESUME['hint']}" if "hint" in _RESUME else ""
        typer.echo(f"error: cannot read or write{where}: {exc.strerror or exc}{hint}", err=True)
        sys.exit(2)


def _say_interrupted() -> None:
    hint = _RESUME.get("hint", "nothing was kept; run the command again to start over")
    typer.echo(f"interrupted: {hint}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
