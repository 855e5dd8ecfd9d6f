"""DeCo, DoLa, DAMRO and VCD: per-token latency and peak memory, relative to plain generation in
the same run.

The model is LLaVA-1.5-shaped with random weights (no download), built in memory from a config.
Every variant answers the same question about the same random 640x480 image with the same fixed
answer length (``min_new_tokens = max_new_tokens = --tokens``, greedy). Compared: the plain
answer; DeCo; DoLa; DAMRO and VCD with their negative branch batched into the main forward (the
default: the negative rows' KV cache packed at its own length), batched with the negative rows
left-padded to the main prompt's length (``-padded``: the config field ``negative_cache="padded"``)
and run serially (one extra forward per step on its own cache: the config field
``branch="serial"``, i.e. ``--set damro.branch=serial`` / ``--set vcd.branch=serial``).
``--variants plain,damro,damro-padded`` measures a subset (``plain`` is always included).

    python benchmarks/bench_decoding.py                      # tiny LLaVA on CPU
    python benchmarks/bench_decoding.py --shape 7b --device cuda --dtype bf16   # LLaVA-1.5-7B shape

Timing. A stopping criterion stamps the clock after every generated token, so one call gives its
time to the first token (image processing, prefill, and for DAMRO / VCD the negative prefill) and
its decoding steps; ``per-token`` is the median step time of a call (first token excluded; the
median keeps a stall of a shared machine in one step out). Each figure is the median over
``--repeats`` calls after one warm-up. Repetitions are interleaved:
round ``r`` runs every variant once (the order rotated each round), so a slow spell of a shared
machine hits all variants alike and the ratios stay meaningful.

Processes. ``--isolate process`` (the default on CPU) keeps each variant in its own spawned
process holding its own copy of the model (same seed, same weights), driven one call at a time by
this process; ``--isolate none`` (the default on CUDA, where seven 7B copies would not fit) runs
every variant in this process on one model.

Peak memory of a call, above the memory in use just before it: on CUDA ``max_memory_allocated``
(exact, allocator level); on CPU the process's peak RSS (``VmHWM``, reset before each call through
``/proc/self/clear_refs``) above its RSS before the call, after giving the C heap's free memory
back to the OS (``malloc_trim``) so that memory an earlier call freed is counted again; coarse
(page granularity, allocator slack). The reported figure is the largest over the timed calls.

Targets (issue #4, per-token latency at 7B scale on a GPU): DeCo <= 1.10x plain, DAMRO and VCD
<= 1.5x plain. A tiny model on a CPU does not answer whether they hold at 7B scale.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: model shapes: LLaVA-1.5 geometry (336 px / patch 14 = 576 image tokens); ``vocab`` None = the
#: test tokenizer's size. ``7b``: Vicuna-7B decoder (4096 wide, 32 layers, MLP 11008, vocabulary
#: 32064) behind a CLIP ViT-L/14-336 vision tower (1024 wide, 24 layers). ``smoke``: for tests.
SHAPES: dict[str, dict[str, int | None]] = {
    "smoke": dict(image_size=56, patch_size=14, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                  vocab=None, vision_hidden=64, vision_intermediate=128, vision_layers=2, vision_heads=4),
    "tiny": dict(image_size=336, patch_size=14, hidden_size=256, intermediate_size=512, num_layers=8, num_heads=8,
                 vocab=None, vision_hidden=256, vision_intermediate=512, vision_layers=4, vision_heads=8),
    # the CPU proxy of the 7B shape: LLaVA-1.5 geometry (576 image tokens) and the real 32064-token
    # vocabulary (so lm_head costs count as at 7B), decoder 768 wide x 12 layers, a small vision tower
    "proxy": dict(image_size=336, patch_size=14, hidden_size=768, intermediate_size=2048, num_layers=12,
                  num_heads=12, vocab=32064, vision_hidden=256, vision_intermediate=512, vision_layers=4,
                  vision_heads=8),
    "7b": dict(image_size=336, patch_size=14, hidden_size=4096, intermediate_size=11008, num_layers=32,
               num_heads=32, vocab=32064, vision_hidden=1024, vision_intermediate=4096, vision_layers=24,
               vision_heads=16),
}

VARIANTS = ("plain", "deco", "dola", "damro", "damro-padded", "damro-serial", "vcd", "vcd-padded", "vcd-serial")
#: per-token latency x plain that issue #4 asks for at 7B scale
TARGETS = {"deco": 1.10, "damro": 1.5, "vcd": 1.5}
#: batched variant -> its serial counterpart (the issue asks for batched / serial)
SERIAL_PAIRS = {"damro": "damro-serial", "vcd": "vcd-serial"}
#: batched variant -> the same with the negative rows left-padded to the main prompt's length
PADDED_PAIRS = {"damro": "damro-padded", "vcd": "vcd-padded"}
QUESTION = "describe the image in detail ."

#: a variant's call: generate kwargs (the step timer) -> (answer token ids, what the method reported)
Call = Callable[[dict[str, Any]], tuple[list[int], dict[str, Any]]]
#: builds every variant's call for a loaded model: (mllm, options) -> {variant: call}
Factory = Callable[[Any, dict[str, Any]], dict[str, Call]]


# ---------------------------------------------------------------------- the model
def processor_dir(shape: str, out_dir: Path) -> Path:
    """A saved LLaVA processor (test tokenizer + image processor) for ``shape``'s image geometry.

    The tiny builder writes it beside a throwaway 1-layer model; only the processor is used."""
    from transformers.utils import logging as hf_logging

    from innersight.testing.tiny import build

    hf_logging.disable_progress_bar()
    s = SHAPES[shape]
    return build("llava", out_dir, image_size=s["image_size"], patch_size=s["patch_size"], hidden_size=32,
                 num_layers=1, num_heads=2, vision_layers=1, crop=True)


def make_mllm(shape: str, processor_path: str | Path, device: str = "cpu", dtype: str | None = None,
              seed: int = 0) -> Any:
    """A random-weight ``LlavaForConditionalGeneration`` of ``shape`` built in memory on ``device``
    (no weights written to disk), wrapped as an :class:`innersight.MLLM` with its adapter."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from innersight.adapters import adapter_class

    s = SHAPES[shape]
    cls = adapter_class("llava")
    processor = cls.load_processor(str(processor_path))
    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=s["vision_hidden"], intermediate_size=s["vision_intermediate"],
        num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_heads"],
        image_size=s["image_size"], patch_size=s["patch_size"], projection_dim=s["vision_hidden"],
    )
    text = LlamaConfig(
        vocab_size=s["vocab"] or len(tok), hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"], num_key_value_heads=s["num_heads"],
        max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    return random_mllm(LlavaForConditionalGeneration, config, processor, cls, f"random-llava-{shape}",
                       device, dtype, seed)


def random_mllm(model_class: Any, config: Any, processor: Any, adapter_cls: Any, name: str,
                device: str = "cpu", dtype: str | None = None, seed: int = 0) -> Any:
    """``model_class`` with random weights (seeded) built from ``config`` in memory on ``device``
    (SDPA attention, eval mode, the tokenizer's special ids), wrapped as an :class:`innersight.MLLM`
    with ``adapter_cls``."""
    import torch

    from innersight.loading import resolve_device, resolve_dtype
    from innersight.mllm import MLLM
    from innersight.testing.tiny.tokenizer import set_special_ids

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    torch.manual_seed(seed)
    with torch.device(dev):
        model = model_class._from_config(config, dtype=torch_dtype, attn_implementation="sdpa")
    model.eval()
    set_special_ids(model, processor.tokenizer)
    return MLLM(model, processor, adapter_cls(model, processor), name=name)


def random_image(seed: int = 0) -> Any:
    """A 640x480 RGB image of uniform noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))


# ---------------------------------------------------------------------- measuring one call
class StepTimer:
    """A stopping criterion that never stops: it stamps the clock after every generated token
    (after a device sync on CUDA), so ``stamps[0]`` ends the first token and the gaps between
    later stamps are the decoding steps."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.stamps: list[float] = []

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # [B] never done


def _proc_status_mb(key: str) -> float:
    """A ``/proc/self/status`` memory line (``VmRSS``, ``VmHWM``) in MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _trim_heap() -> None:
    """Give the C heap's free memory back to the OS (glibc ``malloc_trim``), so that a call's
    allocations show in its peak RSS even when an earlier call freed the same amount; a no-op
    without glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of one call above the memory in use when :meth:`start` ran (MiB)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.base = 0.0
        self.reset = False

    def start(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.base = float(torch.cuda.memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            return
        _trim_heap()
        self.base = _proc_status_mb("VmRSS")
        try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.reset = True
        except OSError:
            self.reset = False

    def stop(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        # without the reset: the process's lifetime peak (coarser still)
        peak = _proc_status_mb("VmHWM") if self.reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return max(0.0, peak - self.base)


@dataclass
class Measurement:
    """One timed call of one variant."""

    total_s: float
    #: from the call to the first generated token (image processing, prefill, negative prefill)
    first_s: float
    #: median time of the decoding steps after the first token (NaN with a single token)
    per_token_s: float
    steps: int
    peak_mb: float
    token_ids: list[int] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    #: CPU seconds of this process during the call (all its threads): on a shared CPU machine,
    #: less sensitive than wall time to other tenants (time the process waits is not counted)
    cpu_s: float = float("nan")


def timed(call: Call, device: str) -> Measurement:
    """Run ``call`` once with a :class:`StepTimer` and a :class:`PeakMemory` around it."""
    from transformers import StoppingCriteriaList

    timer = StepTimer(device.startswith("cuda"))
    memory = PeakMemory(device)
    memory.start()
    t0, c0 = time.perf_counter(), time.process_time()
    ids, info = call({"stopping_criteria": StoppingCriteriaList([timer])})
    cpu = time.process_time() - c0
    if timer.cuda:
        import torch

        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    peak = memory.stop()
    stamps = timer.stamps
    if not stamps:
        raise RuntimeError("the step timer never ran: generate ignored the stopping criteria")
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]  # decoding steps after the first token
    per_token = statistics.median(gaps) if gaps else float("nan")
    return Measurement(total_s=total, first_s=stamps[0] - t0, per_token_s=per_token, steps=len(stamps),
                       peak_mb=peak, token_ids=list(ids), info=info, cpu_s=cpu)


# ---------------------------------------------------------------------- the variants
def method_call(mllm: Any, name: str, settings: dict[str, dict[str, Any]] | None, image: Any, question: str,
                generation: dict[str, Any]) -> Call:
    """A call of registered method ``name`` with ``settings``; it reports how a contrastive
    method's negative branch actually ran (``branch``: batched / serial, ``negative_forwards``)."""
    from innersight.methods import resolve_methods

    plan = resolve_methods([name], settings)
    method = plan.objects[0]
    built: dict[str, list[Any]] = {}
    original = method.processors

    def processors(mllm_: Any, batch: Any, gen: dict[str, Any]) -> list[Any]:
        built["processors"] = original(mllm_, batch, gen)
        return built["processors"]

    method.processors = processors  # instance attribute: a spy on what this call built

    def call(extra: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
        answer = plan.run(mllm, [image], [question], **generation, **extra)[0]
        info: dict[str, Any] = {}
        for proc in built.get("processors", []):
            branch = getattr(proc, "branch", None)
            if branch is not None:
                info = {"branch": branch.mode, "negative_forwards": branch.steps}
                details = branch.details() if callable(getattr(branch, "details", None)) else {}
                cache = details.get("negative_cache")  # a negative branch's KV-cache layout (packed / padded)
                if cache is not None:
                    info["negative_cache"] = cache
        return answer.token_ids, info

    return call


def decoding_calls(mllm: Any, options: dict[str, Any]) -> dict[str, Call]:
    """Every variant of this benchmark for ``mllm`` (the same image, question and answer length)."""
    image = random_image()
    tokens = int(options["tokens"])
    generation = {"max_new_tokens": tokens, "min_new_tokens": tokens}

    def plain(extra: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
        return mllm.answer(image, QUESTION, **generation, **extra).token_ids, {}

    return {
        "plain": plain,
        "deco": method_call(mllm, "deco", None, image, QUESTION, generation),
        "dola": method_call(mllm, "dola", None, image, QUESTION, generation),
        "damro": method_call(mllm, "damro", {"damro": {"branch": "batched"}}, image, QUESTION, generation),
        "damro-padded": method_call(mllm, "damro", {"damro": {"branch": "batched", "negative_cache": "padded"}}, image,
                                    QUESTION, generation),
        "damro-serial": method_call(mllm, "damro", {"damro": {"branch": "serial"}}, image, QUESTION, generation),
        "vcd": method_call(mllm, "vcd", {"vcd": {"branch": "batched"}}, image, QUESTION, generation),
        "vcd-padded": method_call(mllm, "vcd", {"vcd": {"branch": "batched", "negative_cache": "padded"}}, image,
                                  QUESTION, generation),
        "vcd-serial": method_call(mllm, "vcd", {"vcd": {"branch": "serial"}}, image, QUESTION, generation),
    }


# ---------------------------------------------------------------------- running the rounds
def _load(options: dict[str, Any]) -> Any:
    import torch

    torch.set_num_threads(int(options["threads"]))
    return make_mllm(options["shape"], options["processor_dir"], options["device"], options["dtype"])


def _worker(conn: Any, factory: Factory, variant: str, options: dict[str, Any]) -> None:
    """A spawned process holding one variant: load, warm up, then one timed call per "run"."""
    try:
        mllm = _load(options)
        call = factory(mllm, options)[variant]
        call({})  # warm-up
        conn.send(("ready", None))
        while conn.recv() == "run":
            conn.send(("ok", timed(call, options["device"])))
    except BaseException:  # noqa: BLE001 - the parent re-raises with the child's traceback
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _expect(reply: tuple[str, Any], variant: str) -> Any:
    kind, value = reply
    if kind == "error":
        raise RuntimeError(f"variant {variant} failed in its process:\n{value}")
    return value


def measure(factory: Factory, variants: Sequence[str], options: dict[str, Any]) -> dict[str, list[Measurement]]:
    """``options["repeats"]`` interleaved rounds of every variant; round ``r`` rotates the order by
    ``r``. With ``options["isolate"] == "process"`` each variant lives in its own spawned process."""
    variants = list(variants)
    results: dict[str, list[Measurement]] = {v: [] for v in variants}
    repeats = int(options["repeats"])
    if options["isolate"] == "process":
        ctx = mp.get_context("spawn")
        workers: dict[str, tuple[Any, Any]] = {}
        try:
            for variant in variants:
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(child, factory, variant, options), daemon=True)
                proc.start()
                child.close()
                workers[variant] = (proc, parent)
            for variant, (_, conn) in workers.items():
                _expect(conn.recv(), variant)  # loaded and warmed up
            for r in range(repeats):
                for variant in variants[r % len(variants):] + variants[: r % len(variants)]:
                    conn = workers[variant][1]
                    conn.send("run")
                    results[variant].append(_expect(conn.recv(), variant))
        finally:
            for proc, conn in workers.values():
                try:
                    conn.send("stop")
                except (BrokenPipeError, OSError):
                    pass
                proc.join(timeout=60)
                if proc.is_alive():
                    proc.terminate()
        return results
    mllm = _load(options)
    calls = factory(mllm, options)
    for variant in variants:
        calls[variant]({})  # warm-up
    for r in range(repeats):
        for variant in variants[r % len(variants):] + variants[: r % len(variants)]:
            results[variant].append(timed(calls[variant], options["device"]))
    return results


# ---------------------------------------------------------------------- summaries
def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and math.isfinite(b) else float("nan")


def summarise(results: dict[str, list[Measurement]], baseline: str = "plain") -> dict[str, dict[str, Any]]:
    """Per variant: medians over its calls, largest peak, and ratios to ``baseline``."""
    rows: dict[str, dict[str, Any]] = {}
    for variant, calls in results.items():
        rows[variant] = {
            "first_s": statistics.median(c.first_s for c in calls),
            "per_token_s": statistics.median(c.per_token_s for c in calls),
            "total_s": statistics.median(c.total_s for c in calls),
            "cpu_s": statistics.median(c.cpu_s for c in calls),
            "peak_mb": max(c.peak_mb for c in calls),
            "steps": calls[-1].steps,
            "info": calls[-1].info,
            "token_ids": calls[-1].token_ids,
        }
    base = rows[baseline]
    for row in rows.values():
        row["x_plain_first"] = _ratio(row["first_s"], base["first_s"])
        row["x_plain_per_token"] = _ratio(row["per_token_s"], base["per_token_s"])
        row["x_plain_total"] = _ratio(row["total_s"], base["total_s"])
        row["x_plain_cpu"] = _ratio(row["cpu_s"], base["cpu_s"])
        row["x_plain_mem"] = _ratio(row["peak_mb"], base["peak_mb"])
    return rows


def header(args: argparse.Namespace) -> str:
    return (f"shape={args.shape} device={args.device} dtype={args.dtype or 'default'} tokens={args.tokens} "
            f"repeats={args.repeats} threads={args.threads} isolate={args.isolate} "
            f"load={os.getloadavg()[0]:.1f}")


def table(rows: dict[str, dict[str, Any]], extra: dict[str, Callable[[str, dict[str, Any]], str]]) -> str:
    """The results as a table (columns as wide as their widest cell); ``extra`` adds columns
    (title -> cell function)."""
    titles = ["variant", "first s", "x plain", "ms/token", "x plain", "total s", "x plain", "cpu x plain", "peak MB",
              "x mem", *extra]
    body = [[name, f"{r['first_s']:.3f}", f"{r['x_plain_first']:.2f}", f"{1000 * r['per_token_s']:.2f}",
             f"{r['x_plain_per_token']:.2f}", f"{r['total_s']:.3f}", f"{r['x_plain_total']:.2f}",
             f"{r.get('x_plain_cpu', float('nan')):.2f}", f"{r['peak_mb']:.1f}", f"{r['x_plain_mem']:.2f}",
             *[fn(name, r) for fn in extra.values()]]
            for name, r in rows.items()]
    widths = [max(len(line[i]) for line in [titles, *body]) for i in range(len(titles))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in [titles, *body])


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark of this kind shares."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=16, help="answer length (fixed with min_new_tokens), at least 2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--isolate", choices=("auto", "process", "none"), default="auto",
                   help="one process per variant (auto: on CPU) or all in this process (auto: on CUDA)")
    p.add_argument("--json", type=Path, default=None, help="write results here too")
    return p


def options_from(args: argparse.Namespace, processor_path: Path) -> dict[str, Any]:
    if args.tokens < 2:
        raise SystemExit("--tokens must be at least 2 (per-token latency needs two steps)")
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    if args.isolate == "auto":
        args.isolate = "none" if args.device.startswith("cuda") else "process"
    return {"shape": args.shape, "device": args.device, "dtype": args.dtype, "repeats": args.repeats,
            "tokens": args.tokens, "threads": args.threads, "isolate": args.isolate,
            "processor_dir": str(processor_path)}


def write_json(path: Path | None, args: argparse.Namespace, rows: dict[str, dict[str, Any]],
               results: dict[str, list[Measurement]], **extra: Any) -> None:
    if path is None:
        return
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
               "calls": {v: [asdict(c) for c in calls] for v, calls in results.items()}, **extra}
    path.write_text(json.dumps(payload, indent=2, default=str))


# ---------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every variant; returns ``{"rows": summary per variant, "serial": batched / serial}``."""
    with tempfile.TemporaryDirectory() as tmp:
        options = options_from(args, processor_dir(args.shape, Path(tmp) / "processor"))
        results = measure(decoding_calls, chosen_variants(getattr(args, "variants", None)), options)
    rows = summarise(results)
    serial = {}
    for batched, ser in SERIAL_PAIRS.items():
        if batched not in rows or ser not in rows:
            continue
        serial[batched] = {
            "per_token": _ratio(rows[batched]["per_token_s"], rows[ser]["per_token_s"]),
            "total": _ratio(rows[batched]["total_s"], rows[ser]["total_s"]),
            "mem": _ratio(rows[batched]["peak_mb"], rows[ser]["peak_mb"]),
            "same_tokens": rows[batched]["token_ids"] == rows[ser]["token_ids"],
        }
    return {"rows": rows, "serial": serial, "results": results}


def chosen_variants(spec: str | None) -> list[str]:
    """The variants named in ``spec`` (comma-separated; all when None), ``plain`` first."""
    if spec is None:
        return list(VARIANTS)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return ["plain", *[n for n in VARIANTS if n in names and n != "plain"]]


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--variants", default=None, help="comma-separated subset of: " + ", ".join(VARIANTS))
    args = p.parse_args(argv)
    out = run(args)
    rows, serial = out["rows"], out["serial"]

    def target(name: str, r: dict[str, Any]) -> str:
        key = name.split("-")[0]
        return f"<= {TARGETS[key]:.2f}x" if key in TARGETS and name == key else ""

    def branch(name: str, r: dict[str, Any]) -> str:
        info = r["info"]
        if "branch" not in info:
            return ""
        cache = f" {info['negative_cache']}" if "negative_cache" in info else ""
        return f"{info['branch']}{cache} ({info['negative_forwards']} fw)"

    print(header(args))
    print(table(rows, {"7B target (ms/token)": target, "negative branch": branch}))
    for name, s in serial.items():
        print(f"{name} batched / serial negative branch: ms/token x{s['per_token']:.2f}, total x{s['total']:.2f}, "
              f"peak MB x{s['mem']:.2f}, same answer tokens: {s['same_tokens']}")
    for name, padded in PADDED_PAIRS.items():
        if name in rows and padded in rows:
            print(f"{name} packed / padded negative cache: ms/token "
                  f"x{_ratio(rows[name]['per_token_s'], rows[padded]['per_token_s']):.2f}, "
                  f"peak MB x{_ratio(rows[name]['peak_mb'], rows[padded]['peak_mb']):.2f}, "
                  f"same answer tokens: {rows[name]['token_ids'] == rows[padded]['token_ids']}")
    write_json(args.json, args, rows, out["results"], serial=serial, targets=TARGETS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
