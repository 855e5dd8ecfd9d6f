"""The ViCrop crop gate on the shipped micro model: per-sample map sharpness (peak-to-mean ratio),
plain and ViCrop rel-att answers on the small- and large-symbol reading sets, and the accuracy and
crop rate of the gated answer for a sweep of thresholds (the gated answer is ViCrop's where the
map passes, the plain answer elsewhere: what ``vicrop-gated`` answers at that threshold).

    python benchmarks/bench_gate.py --seed 20262121 --n 200      # the held-out sweep in BENCHMARKS.md

The threshold 20 of ``vicrop-gated`` was chosen with ``--seed 20261121 --n 64`` (the demo seed).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=20262121)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--thresholds", default="5,10,15,20,25,30,40")
    args = p.parse_args(argv)

    import innersight
    from innersight.demo.run import is_correct
    from innersight.demo.world import World, WorldConfig
    from innersight.look.gate import sharpness
    from innersight.look.vicrop import ViCropConfig, importance_maps

    mllm = innersight.load("micro")
    world = World(WorldConfig())
    per_set = {}
    for i, size in enumerate(["small", "large"]):  # the demo draws set i with seed + i
        samples = world.eval_samples("read", args.n, args.seed + i, size_class=size)
        images, questions = [s.image for s in samples], [s.question for s in samples]
        maps = importance_maps(mllm, images, questions, ViCropConfig())
        plain = mllm.answer_batch(images, questions, max_new_tokens=6, batch_size=16)
        vicrop = mllm.answer_batch(images, questions, methods=["vicrop-rel-att"], max_new_tokens=6, batch_size=16)
        sharp = np.array([sharpness(m) for m, _, _ in maps])
        ok_plain = np.array([is_correct("read", a.text, s.answer) for a, s in zip(plain, samples)])
        ok_vicrop = np.array([is_correct("read", a.text, s.answer) for a, s in zip(vicrop, samples)])
        per_set[size] = (sharp, ok_plain, ok_vicrop)
        print(f"{size}: plain {100 * ok_plain.mean():.1f}  vicrop-rel-att {100 * ok_vicrop.mean():.1f}  "
              f"sharpness median {np.median(sharp):.1f}")
    print("| threshold | small acc | small cropped | large acc | large cropped |")
    print("|---|---|---|---|---|")
    for t in (float(x) for x in args.thresholds.split(",")):
        cells = []
        for size in ("small", "large"):
            sharp, ok_plain, ok_vicrop = per_set[size]
            keep = sharp >= t
            cells += [f"{100 * np.where(keep, ok_vicrop, ok_plain).mean():.1f}", f"{100 * keep.mean():.0f}%"]
        print(f"| {t:g} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
