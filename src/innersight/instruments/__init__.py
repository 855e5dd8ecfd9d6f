"""Instruments: the papers' measurements as functions that return numbers and draw a figure.

Every instrument is defined once, here, in :data:`INSTRUMENTS` (a
:class:`~innersight.registry.Registry`): its name (``innersight measure <name>``), title, the
``module:function`` that measures (imported on first use, the modules import torch), the
benchmark it reads by default (a micro-world one, so every instrument runs offline on the bundled
model) and its options with their types, defaults and help. ``innersight list`` reads the
registry without importing any instrument module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserInputError
from ..registry import Registry
from .common import Measurement, write_measurement

__all__ = ["INSTRUMENTS", "LISTINGS", "MODULES", "Instrument", "Measurement", "Option",
           "describe_instruments", "get_instrument", "register", "write_measurement"]


@dataclass(frozen=True)
class Option:
    """One ``--option name=value`` of an instrument."""

    type: type
    default: Any
    help: str

    def parse(self, name: str, text: str) -> Any:
        if self.type is bool:
            low = text.strip().lower()
            if low in {"1", "true", "yes", "on"}:
                return True
            if low in {"0", "false", "no", "off"}:
                return False
            raise UserInputError(f"option {name} expects true or false, got {text!r}")
        try:
            return self.type(text)
        except ValueError:
            raise UserInputError(f"option {name} expects {self.type.__name__}, got {text!r}") from None


@dataclass(frozen=True)
class Instrument:
    """A registered instrument.

    ``implementation`` is the function ``(mllm, samples, *, model_name, show_progress, **options)
    -> Measurement``, or its ``"module:function"`` in this package, imported on first use.
    """

    name: str
    title: str
    implementation: Callable[..., Measurement] | str
    default_benchmark: str
    default_split: str | None = None
    options: Mapping[str, Option] = field(default_factory=dict)

    @property
    def module(self) -> str:
        """The module of this package that holds the function ('' for a function given as is)."""
        return self.implementation.split(":")[0] if isinstance(self.implementation, str) else ""

    @property
    def function(self) -> Callable[..., Measurement]:
        if not isinstance(self.implementation, str):
            return self.implementation
        module, attr = self.implementation.split(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)

    def parse_options(self, items: Mapping[str, str]) -> dict[str, Any]:
        """Defaults overridden by ``items`` (raw strings from the command line)."""
        unknown = sorted(set(items) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise UserInputError(f"instrument {self.name!r} has no option {', '.join(unknown)} (options: {known})")
        out = {k: o.default for k, o in self.options.items()}
        out.update({k: self.options[k].parse(k, v) for k, v in items.items()})
        return out


#: name -> instrument, in registration order: the one definition (``innersight list``, ``measure``)
INSTRUMENTS: Registry[Instrument] = Registry(
    "instrument", missing="unknown instrument {name!r}; choose one of: {choices}", error=UserInputError)


def register(instrument: Instrument) -> Instrument:
    """Add ``instrument`` to :data:`INSTRUMENTS` (``ValueError`` if its name is taken)."""
    return INSTRUMENTS.register(instrument.name, instrument)


# ---------------------------------------------------------------------- the instruments
_BATCH = Option(int, 8, "samples per forward / generate call")
_TEMPLATE = Option(str, "chat", "prompt template: chat (the model's own) or reference (the papers')")
_SUFFIX = Option(str, "", "text appended to every question (e.g. a short-answer instruction)")
_VICROP_OPTIONS: dict[str, Option] = {
    "batch_size": _BATCH,
    "max_new_tokens": Option(int, 16, "answer length (greedy)"),
    "template": _TEMPLATE,
    "scorer": Option(str, "auto", "correctness: auto (the benchmark's scorer from the sample fields) or <benchmark>/<variant>"),
}

register(Instrument(
    "attention-ratio", "Attention ratio per layer on the ground-truth box, correct vs wrong answers (ViCrop)",
    "attention_ratio:measure_attention_ratio", "micro-details", "all",
    {**_VICROP_OPTIONS,
     "qformer_block": Option(int, 2, "InstructBLIP: Q-Former cross-attention block of the map's second stage")}))
register(Instrument(
    "size-sensitivity", "Accuracy by relative object size, with and without a ground-truth crop (ViCrop)",
    "attention_ratio:measure_size_sensitivity", "micro-details", "all",
    {**_VICROP_OPTIONS,
     "n_bins": Option(int, 3, "number of relative-size bins"),
     "binning": Option(str, "quantile", "quantile (equal counts) or log (equal log10 steps)"),
     "context": Option(float, 2.0, "crop side = context x the box's longer side"),
     "min_side": Option(int, 0, "smallest crop side in pixels (0: none)")}))
register(Instrument(
    "early-exit", "Early-exit probability of the right / hallucinated token per layer (DeCo)",
    "early_exit:measure_early_exit", "micro-pope", "random",
    {"batch_size": _BATCH, "template": _TEMPLATE, "suffix": _SUFFIX}))
register(Instrument(
    "probe", "Linear probe per layer for object existence (DeCo)", "probe:measure_probe", "micro-pope", "random",
    {"batch_size": Option(int, 8, "samples per forward pass"),
     "template": _TEMPLATE,
     "suffix": _SUFFIX,
     "split_seed": Option(int, 0, "seed of the stratified train / test split"),
     "l2": Option(float, 1e-2, "L2 penalty on the probe weights (standardised features)"),
     "max_iter": Option(int, 200, "L-BFGS iterations per probe")}))
register(Instrument(
    "prior-overlap", "Share of hallucinated objects also named without the image (DeCo)",
    "early_exit:measure_prior_overlap", "micro-chair", "val",
    {"batch_size": _BATCH, "template": _TEMPLATE,
     "max_new_tokens": Option(int, 64, "answer length of both descriptions"),
     "parser": Option(str, "auto", "object parser: auto, micro (micro world) or chair (COCO synonyms)"),
     "top": Option(int, 10, "how many of the most frequent hallucinated objects to report")}))
register(Instrument(
    "outlier-overlap", "ViT [CLS] outliers vs LLM decoder image attention: H_i and F, hallucinated vs not (DAMRO)",
    "outlier_overlap:measure_outlier_overlap", "micro-chair", None,
    {"batch_size": Option(int, 8, "samples per generate call"),
     "max_new_tokens": Option(int, None, "answer length (default: 48 for descriptions, 8 otherwise)"),
     "layers": Option(str, "all", "decoder layers averaged: all, 2,5 or 4-7 (the paper names none)"),
     "rows": Option(str, "answer", "answer (every answer token, sentence level) or first (first token only)"),
     "scorer": Option(str, "auto", "hallucination judge: auto, pope, chair or micro-chair"),
     "max_rank": Option(int, 10, "largest i of H_i (outlier_overlap.MAX_RANK)")}))
register(Instrument(
    "sinks", "Visual attention sinks: sink dims, sinks per layer, attention on them, masking them vs random (VAR)",
    "sinks:measure_sinks", "micro-details", None,
    {"batch_size": Option(int, 8, "samples per generate call"),
     "max_new_tokens": Option(int, None, "answer length (default: 48 for descriptions, 8 otherwise)"),
     "tau": Option(float, 20.0, "phi threshold of a sink token (paper: 20; sinks.TAU)"),
     "dims": Option(str, "", "sink dims, e.g. 2533,1415 (default: detected for the model and cached)"),
     "first_layer": Option(int, 2, "first layer whose sinks are masked and summarised (paper: 2; "
                                   "attend.sinks.FIRST_SINK_LAYER)"),
     "cache": Option(bool, True, "cache detected sink dims (INNERSIGHT_CACHE_DIR)"),
     "seed": Option(int, 0, "seed of the random image tokens"),
     "scorer": Option(str, "auto", "answer scorer: auto or a registered name (innersight list)")}))

#: the registry under its former name (``innersight list`` and the CLI read it)
LISTINGS = INSTRUMENTS
#: instrument name -> module of this package that holds its function
MODULES: dict[str, str] = {name: inst.module for name, inst in INSTRUMENTS.items()}


def describe_instruments() -> list[dict[str, Any]]:
    """Every instrument as ``innersight list`` shows it (name, title, default benchmark and split,
    options with defaults): no instrument module (nor torch) is imported."""
    return [{"name": name, "title": item.title, "default_benchmark": item.default_benchmark,
             "default_split": item.default_split, "options": {k: o.default for k, o in item.options.items()}}
            for name, item in INSTRUMENTS.items()]


def get_instrument(name: str) -> Instrument:
    """The registered instrument ``name``; a clear error for an unknown one."""
    return INSTRUMENTS.lookup(name)
