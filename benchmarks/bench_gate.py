"""The ViCrop crop gate on the shipped micro model: the early gate's signals per sample and the
accuracy / crop rate of the gated answer for sweeps of thresholds.

For each sample of the small- and large-symbol reading sets (drawn as the demo draws them): the
plain answer with, from its own prefill, the raw question-attention map at ViCrop's layer (its
statistics: peak-to-mean, top-mass, concentration; :mod:`innersight.look.gate`) and the first
answer token's probability (confidence); and ViCrop rel-att's answer. The gated answer at a
threshold is ViCrop's where the gate crops and the plain answer elsewhere: what ``vicrop-gated``
answers with those thresholds (``tests/look/test_gate.py`` checks that identity on the model).

    python benchmarks/bench_gate.py --seed 20261121 --n 200    # calibration (the demo seed)
    python benchmarks/bench_gate.py --seed 20262121 --n 200    # held-out sweep (not used to choose)

``--post-map`` adds the earlier post-map gate (peak-to-mean of the full rel-att map) for comparison.
``--time`` instead times plain, ``vicrop-rel-att`` and ``vicrop-gated`` (its preset) per set in CPU
seconds (one torch thread: the work done, unlike wall time on a shared machine),
interleaved chunk by chunk (``--batch`` scenes, 16 as the demo, 1 for the cost per scene) in this
one process, with each run's accuracy and crop rate:

    python benchmarks/bench_gate.py --seed 20262121 --n 200 --time              # the demo's batch size
    python benchmarks/bench_gate.py --seed 20262121 --n 200 --time --batch 1    # per scene
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

SWEEPS = {
    "peak-to-mean": (2, 3, 4, 5, 6, 8, 10, 15, 20),
    "top-mass": (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5),
    "concentration": (0.02, 0.05, 0.1, 0.15, 0.2, 0.3),
    "confidence<": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99),
}

#: the two-signal sweep: crop when confidence < c and the question map's peak-to-mean >= t,
#: without and with arbitration (keep the crop answer only when its confidence beats the plain one's)
PAIR_CONFIDENCE = (0.3, 0.4, 0.5, 0.6, 0.7)
PAIR_MAP = (1, 8, 12, 15, 20)
#: the gate's settings that crop every sample (ViCrop rel-att's answer and its confidence)
ALWAYS = {"gate": "1", "gate_confidence": "none", "gate_arbitrate": "false"}


def gated_answer(s: dict[str, np.ndarray], crop: np.ndarray, arbitrate: bool) -> tuple[np.ndarray, np.ndarray]:
    """(correct, cropped) per sample of the gated answer for the crop decisions ``crop``."""
    keep = crop & (s["crop_confidence"] > s["confidence"]) if arbitrate else crop
    return np.where(keep, s["ok_vicrop"], s["ok_plain"]), crop


def plain_signals(mllm: Any, images: list[Any], questions: list[str], batch_size: int = 16) -> dict[str, np.ndarray]:
    """Plain answers (token ids), question-map statistics and confidence, in chunks."""
    from innersight.attention import layer_handlers
    from innersight.look.gate import STATISTICS, FirstStepConfidence, PrefillCapture
    from innersight.look.maps import grid_projection
    from innersight.look.vicrop import ViCropConfig

    config = ViCropConfig()
    adapter = mllm.adapter
    layer = config.resolve_layer(adapter)
    out: dict[str, list[Any]] = {"ids": [], "confidence": [], **{k: [] for k in STATISTICS}}
    for start in range(0, len(questions), batch_size):
        batch = mllm.prepare(images[start:start + batch_size], questions[start:start + batch_size])
        capture, confidence = PrefillCapture(), FirstStepConfidence()
        with grid_projection(adapter, config.qformer_block) as project, \
                layer_handlers(mllm.model, adapter.decoder_layers, {layer: capture.handler}):
            out["ids"] += mllm.generate(batch, max_new_tokens=6, logits_processor=[confidence])
        mean = capture.probs.mean(dim=1)  # [B, L]
        for b in range(len(batch)):
            qmap, _ = project(mean[b], batch, b)
            for name, stat in STATISTICS.items():
                out[name].append(stat(qmap))
        out["confidence"] += confidence.values.tolist()
    return {k: (np.array(v) if k != "ids" else v) for k, v in out.items()}


RUNS = ("plain", "vicrop-rel-att", "vicrop-gated")


def time_runs(mllm: Any, world: Any, n: int, seed: int, chunk: int = 16,
              settings: dict[str, dict[str, str]] | None = None) -> None:
    """Seconds per answer (CPU and wall), accuracy and crop rate of each run on each reading set,
    the runs interleaved ``chunk`` scenes at a time.

    The cost is the process's CPU seconds (``time.process_time``; run with one torch thread,
    ``--threads 1``, it is the work done, whatever else runs on the machine); wall seconds are
    printed beside it but on a shared machine they follow the other jobs' load."""
    import time

    from innersight.demo.run import is_correct

    print("| set | " + " | ".join(f"{r} CPU s/answer" for r in RUNS) + " | gated / plain (CPU) | gated / plain (wall) | "
          + " | ".join(f"{r} acc" for r in RUNS) + " | gated cropped |")
    print("|---|" + "---|" * (2 * len(RUNS) + 3))
    for i, size in enumerate(["small", "large"]):  # the demo draws set i with seed + i
        samples = world.eval_samples("read", n, seed + i, size_class=size)
        cpu, wall = dict.fromkeys(RUNS, 0.0), dict.fromkeys(RUNS, 0.0)
        correct = {r: 0 for r in RUNS}
        cropped = 0
        for start in range(0, n, chunk):
            part = samples[start:start + chunk]
            images, questions = [s.image for s in part], [s.question for s in part]
            for run in RUNS:
                c0, t0 = time.process_time(), time.perf_counter()
                answers = mllm.answer_batch(images, questions, methods=[] if run == "plain" else [run],
                                            settings=settings if run == "vicrop-gated" else None,
                                            max_new_tokens=6, batch_size=chunk)
                cpu[run] += time.process_time() - c0
                wall[run] += time.perf_counter() - t0
                correct[run] += sum(is_correct("read", a.text, s.answer) for a, s in zip(answers, part))
                if run == "vicrop-gated":
                    cropped += sum(bool(a.details[run]["cropped"]) for a in answers)
        per = {r: cpu[r] / n for r in RUNS}
        print(f"| {size} | " + " | ".join(f"{per[r]:.4f}" for r in RUNS)
              + f" | {per['vicrop-gated'] / per['plain']:.2f} | {wall['vicrop-gated'] / wall['plain']:.2f} | "
              + " | ".join(f"{100 * correct[r] / n:.1f}" for r in RUNS) + f" | {100 * cropped / n:.0f}% |")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=20262121)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--post-map", action="store_true", help="also sweep the post-map gate (full rel-att maps)")
    p.add_argument("--time", action="store_true", help="time plain, vicrop-rel-att and vicrop-gated per set")
    p.add_argument("--batch", type=int, default=16,
                   help="--time: scenes per answer_batch call and per interleaved chunk (16: the demo's; 1: per scene)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="--time: a vicrop setting for the vicrop-gated run (e.g. gate_confidence=0.6; default: its preset)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: 1 with --time, so that CPU seconds measure the work; else torch's)")
    args = p.parse_args(argv)
    if args.time or args.threads is not None:
        import torch

        torch.set_num_threads(args.threads or 1)

    import innersight
    from innersight.demo.run import is_correct
    from innersight.demo.world import World, WorldConfig
    from innersight.look.gate import peak_to_mean
    from innersight.look.vicrop import ViCropConfig, importance_maps

    mllm = innersight.load("micro")
    world = World(WorldConfig())
    if args.time:
        settings = dict(item.split("=", 1) for item in args.settings)
        time_runs(mllm, world, args.n, args.seed, chunk=args.batch, settings={"vicrop": settings} if settings else None)
        return 0
    per_set: dict[str, dict[str, np.ndarray]] = {}
    for i, size in enumerate(["small", "large"]):  # the demo draws set i with seed + i
        samples = world.eval_samples("read", args.n, args.seed + i, size_class=size)
        images, questions = [s.image for s in samples], [s.question for s in samples]
        signals = plain_signals(mllm, images, questions)
        # ViCrop rel-att's answers through the gate set to always crop (the same answers:
        # tests/look/test_gate.py), which also reports each crop answer's first-token probability
        vicrop = mllm.answer_batch(images, questions, methods=["vicrop-gated"], max_new_tokens=6, batch_size=16,
                                   settings={"vicrop": ALWAYS})
        signals["crop_confidence"] = np.array([a.details["vicrop-gated"]["crop_confidence"] for a in vicrop])
        signals["ok_plain"] = np.array([is_correct("read", mllm.decode(ids), s.answer)
                                        for ids, s in zip(signals["ids"], samples)])
        signals["ok_vicrop"] = np.array([is_correct("read", a.text, s.answer) for a, s in zip(vicrop, samples)])
        if args.post_map:
            maps = importance_maps(mllm, images, questions, ViCropConfig())
            signals["post-map peak-to-mean"] = np.array([peak_to_mean(m) for m, _, _ in maps])
        per_set[size] = signals
        medians = "  ".join(f"{k} median {np.median(signals[k]):.3g}"
                            for k in ("peak-to-mean", "top-mass", "concentration", "confidence"))
        print(f"{size}: plain {100 * signals['ok_plain'].mean():.1f}  vicrop-rel-att "
              f"{100 * signals['ok_vicrop'].mean():.1f}  {medians}")
        # where ViCrop helps and hurts, by the plain answer's confidence
        helps = signals["ok_vicrop"] & ~signals["ok_plain"]
        hurts = ~signals["ok_vicrop"] & signals["ok_plain"]
        print(f"  vicrop fixes {helps.sum()} (median confidence {np.median(signals['confidence'][helps]) if helps.any() else float('nan'):.3f}),"
              f" breaks {hurts.sum()} (median confidence {np.median(signals['confidence'][hurts]) if hurts.any() else float('nan'):.3f})")
    sweeps = dict(SWEEPS)
    if args.post_map:
        sweeps["post-map peak-to-mean"] = (10, 15, 20, 25, 30)
    for name, thresholds in sweeps.items():
        print(f"\n| {name} | small acc | small cropped | large acc | large cropped |")
        print("|---|---|---|---|---|")
        for t in thresholds:
            cells = []
            for size in ("small", "large"):
                s = per_set[size]
                keep = s["confidence"] < t if name == "confidence<" else s[name] >= t
                cells += [f"{100 * np.where(keep, s['ok_vicrop'], s['ok_plain']).mean():.1f}", f"{100 * keep.mean():.0f}%"]
            print(f"| {t:g} | " + " | ".join(cells) + " |")
    for size in ("small", "large"):
        s = per_set[size]
        wins = s["crop_confidence"] > s["confidence"]
        print(f"\n{size}: crop answer more confident than plain on {100 * wins.mean():.0f}%; among those ViCrop "
              f"right {100 * s['ok_vicrop'][wins].mean():.1f}, plain right {100 * s['ok_plain'][wins].mean():.1f}; "
              f"elsewhere ViCrop right {100 * s['ok_vicrop'][~wins].mean():.1f}, plain {100 * s['ok_plain'][~wins].mean():.1f}")
    print("\n| confidence < \\ peak-to-mean >= | arbitration | " + " | ".join(f"{t:g}" for t in PAIR_MAP) + " |")
    print("|---|---|" + "---|" * len(PAIR_MAP))
    for c in PAIR_CONFIDENCE:  # each cell: small acc / small cropped, large acc / large cropped
        for arbitrate in (False, True):
            cells = []
            for t in PAIR_MAP:
                parts = []
                for size in ("small", "large"):
                    s = per_set[size]
                    ok, crop = gated_answer(s, (s["confidence"] < c) & (s["peak-to-mean"] >= t), arbitrate)
                    parts.append(f"{100 * ok.mean():.1f}/{100 * crop.mean():.0f}%")
                cells.append(", ".join(parts))
            print(f"| {c:g} | {'yes' if arbitrate else 'no'} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
