"""Run a model (with methods) over a benchmark: resumable, crash-safe, one or many processes.

Files in a run directory::

    config.json              the run's configuration, written when the run starts
    samples.rank<r>.jsonl    one JSON row per finished sample, appended by process r and
                             flushed + fsync'ed after every batch
    samples.jsonl            every row in benchmark order (written at the end by rank 0)
    results.json             metrics and provenance (written at the end by rank 0)

A row: ``id``, ``index`` (position in the benchmark), ``rank``, ``question`` (the rendered
question), ``prompt`` (the full prompt the model saw), ``prediction`` (the generated text, or one
mean token loss per option under V*'s likelihood protocol), ``parsed``, ``score`` (the scorer's
row), ``seconds`` (this sample's share of its batch's wall time), ``box`` and ``details`` (what
the methods report), ``error`` (``None``, or one line saying why the sample has no answer).

Crash safety. Rows are written whole, one ``write`` per batch followed by ``fsync``; a process
killed mid-write leaves at most one torn last line, which the next run detects (it does not end
in a newline), drops and truncates away before appending. Re-running the same command skips
every id that already has a row in any ``samples.rank*.jsonl``, so after a kill at any moment
the final rows are exactly those of an uninterrupted run: none lost, none duplicated.
``config.json`` and the final files are written atomically (temporary file + rename). A resume
whose configuration differs from ``config.json`` (model, methods and their configs, benchmark,
split, data, preset, template, scorer, generation settings, seed) is refused; ``limit``,
``batch_size`` and the number of processes may change between runs.

One writer. Each process holds a lock on its rank of the run folder for the whole run
(:mod:`innersight.eval.lock`); a second ``eval`` on the same folder is refused at once with a line
naming the holder's pid, instead of redoing the same samples beside it. The processes of one
``torchrun`` / ``accelerate launch`` run have different ranks and share the folder as before.

Errors. A sample whose image cannot be loaded becomes an error row. A batch that raises is
retried one sample at a time, so one bad sample does not take the others down; what still
fails becomes an error row, and the run goes on. If the first :data:`ABORT_AFTER` samples that
reach the model in a process all fail, the failure is systematic (a method that cannot run on
this model, say): the run stops with that error and writes no rows for them (rows that follow
model failures are held back until the first success). Error rows are not
scored; ``results.json`` counts them.

Several processes. Under ``accelerate launch`` or ``torchrun`` each process takes every
``world_size``-th sample (deterministic striding), writes its own JSONL, and rank 0 merges and
scores after all ranks are done (``wait_for_everyone``). Without a launcher it runs as one
process and needs no ``accelerate``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ImageError, InnersightError, MethodError, UserInputError
from ..outputs import check_output_dir
from ..points import BenchmarkGeneration
from .benchmarks import Benchmark, get_benchmark
from .benchmarks.base import Preset, Sample
from .benchmarks.hub import data_identity
from .lock import RunLock
from .scorers import Scorer, get_scorer, variants

if TYPE_CHECKING:  # pragma: no cover
    from ..flow import Plan
    from ..mllm import MLLM

ABORT_AFTER = 3
CONFIG = "config.json"
RESULTS = "results.json"
MERGED = "samples.jsonl"
_RANK_FILE = re.compile(r"^samples\.rank(\d+)\.jsonl$")
_UNKNOWN_PARSES = ("unknown", "other")

Row = dict[str, Any]


# ---------------------------------------------------------------------- processes


def _no_barrier() -> None:
    return None


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = field(default=_no_barrier, compare=False)
    #: the device accelerate assigned to this process (``None`` without a launcher)
    device: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """The number of processes a launcher (accelerate, torchrun, MPI) started; 1 without one."""
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        value = os.environ.get(key)
        if value and value.isdigit():
            return int(value)
    return 1


def process_info(device: str | None = None) -> ProcessInfo:
    """The current process under ``accelerate launch`` / ``torchrun`` (through accelerate's
    ``PartialState``), or a single process when no launcher started several.

    On a machine without CUDA (or with ``device="cpu"``) the processes talk over gloo
    (``PartialState(cpu=True)``); without it accelerate would treat each CPU process as a run
    of its own.
    """
    if launched_world_size() <= 1:
        return ProcessInfo()
    try:
        from accelerate import PartialState
    except ImportError as exc:  # pragma: no cover - accelerate is a dependency
        raise UserInputError("several processes were launched but accelerate is not installed") from exc
    import torch

    cpu = device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    return ProcessInfo(rank=state.process_index, world_size=state.num_processes,
                       barrier=state.wait_for_everyone, device=str(state.device))


def shard(n: int, rank: int, world_size: int) -> list[int]:
    """The sample indices process ``rank`` of ``world_size`` evaluates: every ``world_size``-th,
    starting at ``rank`` (all of them in one process)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for {world_size} processes")
    return list(range(rank, n, world_size))


# ---------------------------------------------------------------------- JSONL rows


def read_rows(path: Path) -> tuple[list[Row], int, bool]:
    """``(rows, valid_bytes, torn)`` of a JSONL file written by :class:`RowWriter`.

    Every row ends with a newline, so a last line without one was cut off by a kill: it is left
    out (``torn``), and ``valid_bytes`` is the length of the intact part. A complete line that is
    not JSON means the file was damaged otherwise: ``UserInputError`` naming the line.
    """
    if not path.exists():
        return [], 0, False
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    rows: list[Row] = []
    for number, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserInputError(f"line {number} of {str(path)!r} is damaged (not JSON); delete that line, "
                                 f"or the file to redo its samples") from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            raise UserInputError(f"line {number} of {str(path)!r} is not a sample row")
        rows.append(row)
    return rows, end, end < len(data)


class RowWriter:
    """Appends rows to one process's JSONL: one write per batch, flushed and fsync'ed."""

    def __init__(self, path: Path):
        self.path = path
        _, valid, torn = read_rows(path)
        if torn:  # cut off the partial line a kill left behind, before appending after it
            with path.open("r+b") as handle:
                handle.truncate(valid)
                handle.flush()
                os.fsync(handle.fileno())
        self.torn_dropped = torn
        self._handle = path.open("ab")

    def write(self, rows: Sequence[Row]) -> None:
        if not rows:
            return
        payload = "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in rows)
        self._handle.write(payload.encode("utf-8"))
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rank_files(run_dir: Path) -> list[Path]:
    """The run's ``samples.rank<r>.jsonl`` files, by rank."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _RANK_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def collect_rows(run_dir: Path) -> dict[str, Row]:
    """id -> row over every rank file (torn last lines ignored). An id with several rows (only
    possible after a run with ``retry_errors``) keeps its first successful row, else its first."""
    chosen: dict[str, Row] = {}
    for path in rank_files(run_dir):
        rows, _, _ = read_rows(path)
        for row in rows:
            current = chosen.get(row["id"])
            if current is None or (current.get("error") is not None and row.get("error") is None):
                chosen[row["id"]] = row
    return chosen


def done_ids(run_dir: Path, *, retry_errors: bool = False) -> set[str]:
    """Ids that need no more work: those with a row (with a successful row if ``retry_errors``)."""
    rows = collect_rows(run_dir)
    if retry_errors:
        return {i for i, r in rows.items() if r.get("error") is None}
    return set(rows)


# ---------------------------------------------------------------------- configuration


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def normalise(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples -> lists, paths -> strings...)."""
    return json.loads(json.dumps(value, default=_json_default, sort_keys=True))


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename (never half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, ensure_ascii=False, default=_json_default)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def check_config(run_dir: Path, identity: Mapping[str, Any]) -> bool:
    """``True`` if ``run_dir`` already holds a run of this configuration, ``False`` if it holds
    none; ``UserInputError`` naming the differences if it holds another one."""
    path = run_dir / CONFIG
    if not path.exists():
        if rank_files(run_dir):
            raise UserInputError(f"{str(run_dir)!r} holds sample rows but no {CONFIG}; it was not written by "
                                 f"this version of innersight eval -- use another --output")
        return False
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))["identity"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise UserInputError(f"{str(path)!r} is unreadable; delete the run folder to start again") from None
    if stored == identity:
        return True
    keys = sorted(set(stored) | set(identity))
    diffs = [k for k in keys if stored.get(k) != identity.get(k)]
    shown = "; ".join(f"{k}: {_short(stored.get(k))} -> {_short(identity.get(k))}" for k in diffs[:4])
    raise UserInputError(f"{str(run_dir)!r} holds a run with a different configuration ({shown}); resume it with "
                         f"the same settings, or choose another --output")


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=_json_default, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------- provenance


def library_versions() -> dict[str, str | None]:
    """Versions of innersight, torch, transformers, accelerate and Python."""
    from importlib import metadata

    import innersight

    out: dict[str, str | None] = {"innersight": innersight.__version__}
    for name in ("torch", "transformers", "accelerate"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def git_revision() -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout innersight runs from, or ``None`` when it is
    not run from a checkout that tracks it (an installed wheel, no git)."""
    package = Path(__file__).resolve().parents[1]
    marker = package / "__init__.py"

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    if git("ls-files", "--error-unmatch", str(marker)) is None:
        return None
    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status)}


def run_name(benchmark: str, split: str, model: str, methods: Iterable[str]) -> str:
    """Folder name of a run: ``<benchmark>-<split>-<model>-<methods or baseline>``."""
    model_part = Path(model.rstrip("/")).name or model
    parts = [benchmark, split, model_part, "+".join(methods) or "baseline"]
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", "-".join(parts))


# ---------------------------------------------------------------------- prediction


def generation_defaults(preset: Preset, plan: Plan, benchmark: str) -> dict[str, Any]:
    """The generation settings of a run before the caller's own: the preset's answer length, then
    what a method asks for on this benchmark (``method.benchmark_generation(name)``; e.g. ViCrop's
    20 new tokens on the benchmarks of its paper's tables)."""
    gen: dict[str, Any] = {"max_new_tokens": preset.max_new_tokens}
    for method in plan.objects:
        if isinstance(method, BenchmarkGeneration):
            gen.update(method.benchmark_generation(benchmark))
    return gen


def option_losses(mllm: MLLM, plan: Plan, images: Any, question: str, options: Sequence[str],
                  template: str = "chat") -> tuple[list[float], str]:
    """V*'s likelihood protocol: the mean token loss of each option as the assistant's answer.

    Input methods change the images first, attention methods are active during the forward
    pass; the options are scored in one batch (the prompt, a space, the option). Returns
    ``(losses, prompt)``.
    """
    import torch

    from ..flow import activate_attention, apply_input, load_image_lists

    if plan.at("decoding"):
        raise MethodError("the likelihood protocol scores options in one forward pass; decoding methods act on "
                          "generation -- use --scorer-variant letter with them")
    image_lists, _ = apply_input(plan, mllm, load_image_lists([images]), [question], template)
    ims = image_lists[0]
    adapter = mllm.adapter
    prompt = adapter.format_prompt(question, len(ims), template)
    base = adapter.prepare([ims], [prompt])
    n_prompt = int(base.inputs["attention_mask"][0].sum())
    batch = adapter.prepare([ims] * len(options), [f"{prompt} {option}" for option in options])
    with contextlib.ExitStack() as stack:
        activate_attention(stack, plan, mllm, batch)
        with torch.inference_mode():
            logits = mllm.model(**batch.inputs).logits  # [n_options, L, V]
    mask = batch.inputs["attention_mask"]  # [n_options, L]
    losses = []
    for i in range(len(options)):
        positions = torch.nonzero(mask[i], as_tuple=False).squeeze(1)  # [T_i] real tokens
        k = int(positions.numel()) - n_prompt
        if k < 1:
            raise UserInputError(f"option {options[i]!r} adds no tokens to the prompt")
        targets = batch.input_ids[i, positions[-k:]]  # [k]
        log_probs = torch.log_softmax(logits[i, positions[-k - 1 : -1]].float(), dim=-1)  # [k, V]
        nll = -log_probs.gather(1, targets[:, None]).squeeze(1)  # [k]
        losses.append(float(nll.mean()))
    return losses, prompt


def check_scorer_installed(scorer: Scorer) -> None:
    """``UserInputError`` when the scorer variant needs a package that is not installed."""
    hint = scorer.install_hint()
    if hint is not None:
        raise UserInputError(hint)


def check_protocol(scorer: Scorer, plan: Plan) -> None:
    """``MethodError`` when the methods cannot run under the scorer's protocol: a likelihood
    scorer (one forward pass per option) with decoding methods (which act on generation)."""
    if scorer.prediction == "option_losses" and plan.at("decoding"):
        names = ", ".join(s.name for s in plan.specs if s.point == "decoding")
        raise MethodError(f"{scorer.key} scores options by likelihood; decoding methods ({names}) act on "
                          f"generation -- use --scorer-variant letter with them")


@dataclass
class _Job:
    index: int
    sample: Sample
    question: str
    scored: Sample
    images: Any = None


class _Evaluator:
    """Runs jobs through the model and turns outcomes into rows (the body of :func:`evaluate`)."""

    def __init__(self, mllm: MLLM, plan: Plan, scorer: Scorer, template: str, generation: dict[str, Any],
                 rank: int):
        self.mllm, self.plan, self.scorer = mllm, plan, scorer
        self.template, self.generation, self.rank = template, generation, rank
        self.model_calls = 0  # samples that reached the model in this process
        self.model_successes = 0
        self.first_error: str | None = None

    def row(self, job: _Job, *, prompt: str | None = None, prediction: Any = None, seconds: float = 0.0,
            error: str | None = None, box: Any = None, details: Any = None) -> Row:
        score: Row | None = None
        if error is None:
            try:
                score = normalise(self.scorer.score_one(prediction, job.scored))
            except Exception as exc:  # a sample the scorer cannot read: keep the answer, say why
                error = f"scoring failed: {_one_line(exc)}"
        return {
            "id": job.sample["id"], "index": job.index, "rank": self.rank, "question": job.question,
            "prompt": prompt, "prediction": prediction,
            "parsed": score.get("parsed") if score else None, "score": score,
            "seconds": round(seconds, 6), "box": list(box) if box is not None else None,
            "details": normalise(details) if details else None, "error": error,
        }

    def load_images(self, jobs: list[_Job]) -> tuple[list[_Job], list[Row]]:
        """Jobs whose images loaded, and error rows for the others."""
        from ..flow import load_image_lists

        ready, failed = [], []
        for job in jobs:
            try:
                job.images = load_image_lists([job.sample["image"]])[0]
                ready.append(job)
            except (ImageError, UserInputError, OSError) as exc:
                failed.append(self.row(job, error=f"image: {_one_line(exc)}"))
        return ready, failed

    def predict(self, jobs: list[_Job]) -> list[Row]:
        """Rows for ``jobs`` (images loaded): one batch, or one at a time if the batch fails."""
        if not jobs:
            return []
        try:
            return self._run(jobs)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            if len(jobs) == 1:
                return [self._failed(jobs[0], exc)]
        rows = []
        for job in jobs:
            try:
                rows.extend(self._run([job]))
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:
                rows.append(self._failed(job, exc))
        return rows

    def _failed(self, job: _Job, exc: BaseException) -> Row:
        message = f"{type(exc).__name__}: {_one_line(exc)}"
        self.model_calls += 1
        if self.first_error is None:
            self.first_error = message
        if self.model_successes == 0 and self.model_calls >= ABORT_AFTER:
            raise InnersightError(f"the first {self.model_calls} samples all failed, stopping (first error: "
                                  f"{self.first_error})") from exc
        return self.row(job, error=message)

    def _run(self, jobs: list[_Job]) -> list[Row]:
        start = time.perf_counter()
        if self.scorer.prediction == "option_losses":
            outcomes = []
            for job in jobs:
                losses, prompt = option_losses(self.mllm, self.plan, job.images, job.question,
                                               job.scored["options"], self.template)
                outcomes.append((job, prompt, losses, None, None))
        else:
            answers = self.plan.run(self.mllm, [j.images for j in jobs], [j.question for j in jobs],
                                    template=self.template, **self.generation)
            outcomes = [(job, a.prompt, a.text, a.box, {k: v for k, v in a.details.items() if k != "configs"})
                        for job, a in zip(jobs, answers)]
        share = (time.perf_counter() - start) / len(jobs)
        self.model_calls += len(jobs)
        self.model_successes += len(jobs)
        return [self.row(job, prompt=prompt, prediction=pred, seconds=share, box=box, details=details)
                for job, prompt, pred, box, details in outcomes]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------------- the run


def evaluate(
    mllm: MLLM,
    benchmark: str | Benchmark,
    data: str | Path | None,
    split: str | None = None,
    methods: Iterable[str] | None = (),
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    output_dir: str | Path = "runs",
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    generation: Mapping[str, Any] | None = None,
    *,
    scorer_variant: str = "canonical",
    preset: str | None = None,
    template: str = "chat",
    options: Mapping[str, Any] | None = None,
    retry_errors: bool = False,
    progress: bool = True,
    process: ProcessInfo | None = None,
    after_batch: Callable[[list[Row]], None] | None = None,
    samples: Sequence[Sample] | None = None,
) -> dict[str, Any]:
    """Evaluate ``mllm`` with ``methods`` on ``benchmark`` and write the run to ``output_dir``.

    Args:
        mllm: a loaded :class:`~innersight.MLLM`.
        benchmark: a registered name (``innersight list``) or a :class:`Benchmark`.
        data: the benchmark's folder in its official layout.
        split: a split of the benchmark (default: its first).
        methods, settings: method names and config overrides, as for ``MLLM.answer``.
        output_dir: the run directory (created; an existing run of the same configuration is
            resumed, one of another configuration refused).
        limit: evaluate only the first ``limit`` samples (in the benchmark's order).
        batch_size: samples per generation batch.
        seed: seeds torch, numpy and random in every process.
        generation: generation settings (``max_new_tokens``...); unless given, the preset's
            ``max_new_tokens`` applies, or a method's default for this benchmark
            (:func:`generation_defaults`: ViCrop's 20 tokens on its paper's benchmarks).
        scorer_variant: the scorer variant (``canonical`` = the official definition).
        preset: the prompt preset (default: the benchmark's for this variant).
        template: ``chat`` (the model's own) or ``reference`` (the papers').
        options: loader options (e.g. CHAIR's ``image_ids``, ``images``).
        retry_errors: redo samples whose row is an error row.
        progress: show a progress bar (rank 0, on stderr).
        process: this process's rank and barrier (default: :func:`process_info`).
        after_batch: called with the rows of each batch once they are on disk.
        samples: the samples of ``benchmark`` / ``split`` already loaded from ``data`` (the
            CLI validates the data before loading the model); loaded here when ``None``.

    Returns:
        The results dict also written to ``results.json`` (rank 0); other ranks return
        ``{"rank": r, "written": n}``.
    """
    from ..methods import resolve_methods

    bench = get_benchmark(benchmark)
    split = bench.check_split(split)
    try:
        scorer = get_scorer(bench.scorer, scorer_variant)
    except KeyError:
        raise UserInputError(f"benchmark {bench.name!r} has no variant {scorer_variant!r}; variants: "
                             f"{', '.join(variants(bench.scorer))}") from None
    check_scorer_installed(scorer)
    chosen: Preset = bench.preset(preset, scorer_variant)
    if batch_size < 1:
        raise UserInputError("--batch-size must be at least 1")
    if limit is not None and limit < 1:
        raise UserInputError("--limit must be at least 1")
    plan = resolve_methods(list(methods or []), {k: dict(v) for k, v in (settings or {}).items()})
    if chosen.method_settings:  # the preset's method settings (e.g. VCD's POPE beta), under the user's --set
        settings = chosen.settings_for([s.key or s.name for s in plan.specs], settings)
        plan = resolve_methods(list(methods or []), settings)
    check_protocol(scorer, plan)
    gen = generation_defaults(chosen, plan, bench.name)
    gen.update(dict(generation or {}))  # the caller's settings win
    decoding = effective_generation(mllm, plan, gen)
    new_tokens = gen.get("max_new_tokens")
    if not isinstance(new_tokens, int) or isinstance(new_tokens, bool) or new_tokens < 1:
        # checked here, not per sample: a bad value would record every sample as failed
        raise UserInputError(f"--max-new-tokens must be a whole number of at least 1, not {new_tokens!r}")
    opts = {k: v for k, v in dict(options or {}).items() if v is not None}
    proc = process or process_info()

    run_dir = check_output_dir(Path(output_dir))  # before any work: a run that cannot be saved is lost
    samples = list(samples) if samples is not None else bench.load(data, split, **opts)
    if limit is not None:
        samples = samples[:limit]
    rendered = [bench.render(s, chosen) for s in samples]  # a preset that cannot apply fails here

    identity = normalise({
        "benchmark": bench.name, "split": split,
        "data": data_identity(data),
        "options": {k: str(Path(v).expanduser().resolve()) if k in ("image_ids", "images") else v
                    for k, v in opts.items()},
        "scorer": scorer.key, "preset": chosen.name, "template": template, "model": mllm.name,
        "methods": list(plan.names), "method_configs": plan.configs(), "generation": gen, "seed": seed,
    })
    started = time.time()
    if run_dir.exists() and not run_dir.is_dir():
        raise UserInputError(f"--output {str(run_dir)!r} is a file, not a folder")
    with RunLock(run_dir, proc.rank):  # one writer per rank file; a second process is refused, naming the first
        resumed = check_config(run_dir, identity)
        if proc.is_main and not resumed:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(run_dir / CONFIG, {"identity": identity, "created": _now(),
                                                 "innersight": library_versions()["innersight"]})
        done = done_ids(run_dir, retry_errors=retry_errors)
        proc.barrier()

        pending = [i for i in shard(len(samples), proc.rank, proc.world_size) if samples[i]["id"] not in done]
        _seed_everything(seed)
        evaluator = _Evaluator(mllm, plan, scorer, template, gen, proc.rank)
        written = 0
        held: list[Row] = []  # model failures before any success: kept back until the run proves sound
        try:
            with RowWriter(run_dir / f"samples.rank{proc.rank}.jsonl") as writer, \
                    _progress(progress and proc.is_main, len(pending), f"{bench.name} {split}") as advance:
                for start in range(0, len(pending), batch_size):
                    jobs = [_Job(i, samples[i], *rendered[i]) for i in pending[start : start + batch_size]]
                    ready, rows = evaluator.load_images(jobs)
                    rows += evaluator.predict(ready)
                    rows.sort(key=lambda r: r["index"])
                    advance(len(rows))
                    if evaluator.model_successes == 0 and evaluator.model_calls > 0:
                        held.extend(rows)
                        continue
                    rows, held = held + rows, []
                    writer.write(rows)
                    written += len(rows)
                    if after_batch is not None:
                        after_batch(rows)
                if held:  # fewer failures than ABORT_AFTER and no success: they are error rows after all
                    writer.write(held)
                    written += len(held)
                    if after_batch is not None:
                        after_batch(held)
        finally:
            proc.barrier()  # every rank reaches it, also after an error, so rank 0 never waits forever
        if not proc.is_main:
            return {"rank": proc.rank, "written": written}
        return finalize(run_dir, bench, split, scorer, chosen, samples, mllm_name=mllm.name, plan=plan,
                        settings=settings, generation=gen, seed=seed, template=template, limit=limit,
                        batch_size=batch_size, world_size=proc.world_size, data=data, options=opts,
                        wall_seconds=time.time() - started, resumed=resumed, decoding=decoding)


def effective_generation(mllm: MLLM, plan: Plan, generation: Mapping[str, Any]) -> dict[str, Any]:
    """The settings ``generate`` receives: ``generation`` with the decoding methods' own overrides
    (e.g. DAMRO's official preset samples at temperature 1), as recorded in ``results.json``
    under ``decoding`` so that reports can tell greedy from sampled runs."""
    from ..flow import decoding_generation

    return decoding_generation(plan, mllm, dict(generation))


def finalize(run_dir: Path, bench: Benchmark, split: str, scorer: Scorer, preset: Preset,
             samples: Sequence[Sample], *, mllm_name: str, plan: Plan, settings: Any, generation: dict[str, Any],
             seed: int, template: str, limit: int | None, batch_size: int, world_size: int, data: Any,
             options: Mapping[str, Any], wall_seconds: float, resumed: bool = False,
             decoding: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Merge the rank files, score, and write ``samples.jsonl`` and ``results.json`` (rank 0)."""
    by_id = collect_rows(run_dir)
    ids = [s["id"] for s in samples]
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise InnersightError(f"{len(missing)} sample(s) have no row (first: {missing[0]}); a process failed -- "
                              f"re-run the same command to finish them")
    rows = [by_id[i] for i in ids]
    ok = [r for r in rows if r.get("error") is None]
    metrics = scorer.aggregate([r["score"] for r in ok]) if ok else {}
    main = bench.main_metric(metrics)
    model_seconds = sum(float(r.get("seconds") or 0.0) for r in ok)
    tmp = run_dir / f".{MERGED}.tmp"
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, run_dir / MERGED)
    results = normalise({
        "benchmark": bench.name,
        "split": split,
        "data": data_identity(data),
        "options": dict(options),
        "scorer": {"name": scorer.name, "variant": scorer.variant, "description": scorer.description},
        "preset": preset.to_json(),
        "template": template,
        "model": mllm_name,
        "methods": list(plan.names),
        "method_configs": plan.configs(),
        "settings": {k: dict(v) for k, v in plan.settings.items()},  # keyed by method name
        "generation": generation,
        "decoding": dict(decoding) if decoding is not None else generation,
        "seed": seed,
        "limit": limit,
        "batch_size": batch_size,
        "num_processes": world_size,
        "versions": library_versions(),
        "git": git_revision(),
        "metrics": metrics,
        "main_metric": {"name": main, "value": metrics.get(main) if main else None,
                        "higher_is_better": scorer.higher_is_better.get(main) if main else None},
        "counts": {
            "samples": len(rows),
            "scored": len(ok),
            "errors": len(rows) - len(ok),
            "unknown": sum(1 for r in ok if r.get("parsed") in _UNKNOWN_PARSES),
        },
        "seconds_per_sample": model_seconds / len(ok) if ok else None,
        "model_seconds": model_seconds,
        "wall_seconds": wall_seconds,
        "resumed": resumed,
        "finished": _now(),
    })
    write_json_atomic(run_dir / RESULTS, results)
    return results


# ---------------------------------------------------------------------- small helpers


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _progress(show: bool, total: int, description: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr; yields ``advance(n)``."""
    if not show:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
