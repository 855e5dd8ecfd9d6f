"""The micro model shipped inside the package: loads offline by its short name and has learned its world.

Thresholds sit well below what the shipped weights measure (recorded in BENCHMARKS.md) and far
above chance, so a broken checkpoint, a wrong processor or a wrong prompt format fails them.
"""

from __future__ import annotations

import json

import pytest

import innersight
from innersight.demo.run import DEMO_SEED, is_correct
from innersight.demo.world import SYMBOLS, World, WorldConfig
from innersight.loading import micro_path

#: fixed held-out set: 32 large-symbol reading questions (seed never used in training)
LARGE_READ_N = 32
#: chance is 1/18 (0.056); the shipped model reads 26 of these 32 (0.81; 0.82 on 400, BENCHMARKS.md)
LARGE_READ_MIN = 0.6
#: 64 small-symbol questions: the shipped model reads 29 plainly and 47 with vicrop-rel-att
SMALL_READ_N = 64
SMALL_LIFT_MIN = 0.10


@pytest.fixture(scope="module")
def shipped():
    return innersight.load("micro")


def test_weights_ship_inside_the_package_and_are_small():
    files = {p.name: p.stat().st_size for p in micro_path().iterdir()}
    assert "config.json" in files and "model.safetensors" in files
    assert sum(files.values()) < 10 * 2**20
    training = json.loads((micro_path() / "training.json").read_text())
    assert training["seed"] == 0 and training["steps"] > 0


def test_shipped_model_reads_large_symbols(shipped):
    world = World(WorldConfig())
    samples = world.eval_samples("read", LARGE_READ_N, DEMO_SEED + 1, size_class="large")
    assert all(s.answer.upper() in SYMBOLS for s in samples)  # answers are lower-case words
    accuracy = _read_accuracy(shipped, samples)
    assert accuracy >= LARGE_READ_MIN, f"large-symbol accuracy {accuracy:.2f} < {LARGE_READ_MIN}"


def _read_accuracy(mllm, samples, methods=()):
    answers = mllm.answer_batch([s.image for s in samples], [s.question for s in samples], methods=list(methods),
                                max_new_tokens=4, batch_size=16)
    return sum(is_correct("read", a.text, s.answer) for a, s in zip(answers, samples)) / len(samples)


def test_cropping_where_the_shipped_model_looks_helps_on_small_symbols(shipped):
    samples = World(WorldConfig()).eval_samples("read", SMALL_READ_N, DEMO_SEED + 2, size_class="small")
    plain = _read_accuracy(shipped, samples)
    cropped = _read_accuracy(shipped, samples, ["vicrop-rel-att"])
    assert cropped - plain >= SMALL_LIFT_MIN, f"rel-att {cropped:.2f} vs plain {plain:.2f}"
