"""Shared fixtures: tiny random models of every family, built once per session, offline; the test tiers.

Tiers (README, "Tests"):

- full: ``pytest`` -- everything, every family (CI runs it on the newest transformers);
- fast: ``pytest -m "not slow"`` -- a test parametrised over the family registry
  (``@pytest.mark.parametrize("family", FAMILIES)``) runs for :data:`CORE_FAMILIES` only, and
  ``heavy`` tests are left out;
- floor: ``pytest -m "not heavy"`` -- every family, without the costly tests that do not depend
  on a family (CI runs it on the floor transformers).

A test parametrised over a hand-picked list of families is not a registry test: it stays in the
fast tier whatever families it names.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

#: families whose items of registry-parametrised tests stay in the fast tier: one per adapter
#: design (LLaVA's fixed grid, LLaVA-NeXT's tiles, InstructBLIP's Q-Former, Qwen2-VL's M-RoPE)
CORE_FAMILIES: frozenset[str] = frozenset({"llava", "llava_next", "instructblip", "qwen2_vl"})


def _family(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    value = callspec.params.get("family") if callspec is not None else None
    return value if isinstance(value, str) else None


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``slow``: every ``heavy`` item, and the items of a registry-parametrised test (its items
    cover every registered family) whose family is outside :data:`CORE_FAMILIES`."""
    from innersight.adapters import FAMILIES

    def test_of(item: pytest.Item) -> tuple[str, str]:
        return item.nodeid.split("::")[0], getattr(item, "originalname", item.name)

    covered: dict[tuple[str, str], set[str]] = {}
    for item in items:
        family = _family(item)
        if family is not None:
            covered.setdefault(test_of(item), set()).add(family)
    for item in items:
        family = _family(item)
        registry_test = family is not None and covered[test_of(item)] >= set(FAMILIES)
        if item.get_closest_marker("heavy") or (registry_test and family not in CORE_FAMILIES):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """``tiny_dir(family, **overrides) -> Path``: a saved tiny model of ``family`` (cached per
    family + overrides for the whole session)."""
    from innersight.testing.tiny import build

    cache: dict = {}

    def get(family: str, **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"tiny_{family}")
            cache[key] = build(family, path, **overrides)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_mllm(tiny_dir):
    """``tiny_mllm(family, **overrides)``: a loaded :class:`innersight.MLLM` (cached per session)."""
    import innersight

    cache: dict = {}

    def get(family: str, **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = innersight.load(str(tiny_dir(family, **overrides)), device="cpu")
        return cache[key]

    return get


@pytest.fixture(autouse=True)
def _close_figures() -> Iterator[None]:
    """Close every matplotlib figure a test left open (instruments return theirs to the caller)."""
    yield
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close("all")


@pytest.fixture(scope="module")
def benchmark_scripts() -> Iterator[object]:
    """``benchmark_scripts("bench_vicrop")``: a script of ``benchmarks/`` imported as a module
    (the folder is on ``sys.path`` for the test module's duration; the scripts import each other)."""
    import importlib
    from pathlib import Path

    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, folder)
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(folder)


#: the smallest settings of the benchmark scripts: smoke shape, one round, three tokens, in-process
BENCHMARK_SMOKE = ["--shape", "smoke", "--repeats", "1", "--tokens", "3", "--isolate", "none", "--threads", "1"]


@pytest.fixture
def smoke_table(tmp_path):
    """``smoke_table(script, *args)``: run the script's ``main`` at :data:`BENCHMARK_SMOKE` with
    ``args`` and return the main table's rows from its ``--json`` (every variant of the script's
    ``VARIANTS`` present, three steps each, finite ratios)."""
    import json
    import math

    def run(script, *args):
        out = tmp_path / f"{script.__name__}.json"
        assert script.main([*BENCHMARK_SMOKE, *args, "--json", str(out)]) == 0
        rows = json.loads(out.read_text())["rows"]
        expected = list(script.VARIANTS)
        assert list(rows) == [v for v in expected if v in rows] and set(rows) <= set(expected)
        for name, row in rows.items():
            assert row["steps"] == 3, name
            assert math.isfinite(row["x_plain_total"]) and row["total_s"] > 0, name
        return rows

    return run
