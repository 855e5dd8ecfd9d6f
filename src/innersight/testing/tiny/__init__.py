"""Builders of tiny random-weight models, one module per family.

Each module exposes ``build(out_dir, *, seed=0, **overrides) -> Path`` that writes a model and
its processor to ``out_dir`` so that ``innersight.load(out_dir)`` loads it back offline through
the same code path users hit. :data:`FAMILIES` maps family name -> builder module name.
"""

from __future__ import annotations

import importlib
from pathlib import Path

FAMILIES = {
    "llava": "llava",
    "llava_next": "llava_next",
    "llava_onevision": "llava_onevision",
    "instructblip": "instructblip",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_vl",
    "qwen3_vl": "qwen3_vl",
    "internvl": "internvl",
    "gemma3": "gemma3",
    "smolvlm": "smolvlm",
}


def build(family: str, out_dir: str | Path, **kwargs) -> Path:
    """Build the tiny model of ``family`` into ``out_dir`` and return the directory."""
    if family not in FAMILIES:
        raise KeyError(f"no tiny builder for {family!r}; known: {', '.join(FAMILIES)}")
    module = importlib.import_module(f"{__name__}.{FAMILIES[family]}")
    if FAMILIES[family] == "qwen2_vl":  # one builder, two variants
        kwargs.setdefault("variant", family)
    return module.build(Path(out_dir), **kwargs)
