"""The :class:`Benchmark` interface, prompt presets, and the file helpers every loader shares.

A benchmark turns a folder laid out the way its authors ship it into a list of samples. A
sample is a plain dict (JSON-serialisable apart from ``image``, which may be a PIL image):

- ``id``: a string, unique within the split and stable across runs (resume keys on it);
- ``image``: a path (``str``), a ``PIL.Image.Image``, or a list of those (several images in
  one prompt, in prompt order);
- ``question``: the question as the benchmark states it (without any prompt suffix);
- whatever the benchmark's scorer reads (``answers``, ``label``, ``options``, ``gt_objects``...,
  see :mod:`innersight.eval.scorers`) plus provenance fields (original question / image ids).

What the model is asked is :meth:`Benchmark.render`: a :class:`Preset` decides the wording
(a suffix such as LLaVA's "Answer the question using a single word or phrase.", or a fixed
prompt for captioning) and its default answer length. This module imports neither torch nor
transformers.

``data`` may also name a hosted copy, ``hf:<repo id or folder>`` (see
:mod:`innersight.eval.benchmarks.hub`): benchmarks that know a hosted layout implement
:meth:`Benchmark._load_hub` and list the repositories in :attr:`Benchmark.hosted`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ...errors import UserInputError
from ...prompts import SHORT_ANSWER as _SHORT_ANSWER
from .hub import HubSource, is_hub_source, parse_hub_source

Sample = dict[str, Any]

#: LLaVA-1.5's short-answer instruction, appended after a newline by the VQA presets
SHORT_ANSWER = _SHORT_ANSWER

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Preset:
    """How a benchmark's questions are put to the model.

    Attributes:
        name: the preset's name (``--preset``).
        description: one line for help texts and result files.
        suffix: appended to the question (include the separating newline).
        prompt: when set, replaces the question entirely (captioning benchmarks).
        max_new_tokens: the answer length this protocol uses unless the user overrides it.
        method_settings: config overrides this protocol uses for a method, ``{method key: {field:
            value text}}`` (as ``--set method.field=value``); applied only to methods in the run,
            and a ``--set`` of the same field wins (e.g. VCD's POPE scripts use ``beta = 0.2``).
    """

    name: str
    description: str
    suffix: str = ""
    prompt: str | None = None
    max_new_tokens: int = 32
    method_settings: Mapping[str, Mapping[str, str]] = field(default_factory=dict, hash=False)

    def settings_for(self, methods: Iterable[str], settings: Mapping[str, Mapping[str, Any]] | None = None
                     ) -> dict[str, dict[str, Any]]:
        """``settings`` (the user's overrides) with this preset's :attr:`method_settings` filled in
        for the method keys in ``methods``; the user's values win field by field."""
        merged = {k: dict(v) for k, v in (settings or {}).items()}
        for key in methods:
            for name, value in self.method_settings.get(key, {}).items():
                merged.setdefault(key, {}).setdefault(name, value)
        return merged

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "suffix": self.suffix,
                "prompt": self.prompt, "max_new_tokens": self.max_new_tokens,
                "method_settings": {k: dict(v) for k, v in self.method_settings.items()}}


class Benchmark(ABC):
    """One benchmark: its splits, its scorer, its presets and a loader for its official layout.

    Subclasses set the class variables and implement :meth:`_load`; :meth:`load` validates the
    split, the data path and the ids around it. Instances hold no state, so one registered
    instance serves every run.
    """

    #: registry name (``--benchmark``)
    name: ClassVar[str]
    #: human-readable name
    title: ClassVar[str]
    #: the splits :meth:`load` accepts; the first is the default
    splits: ClassVar[tuple[str, ...]]
    #: the benchmark name of its scorer in :data:`innersight.eval.scorers.SCORERS`
    scorer: ClassVar[str]
    #: preset name -> :class:`Preset`
    presets: ClassVar[Mapping[str, Preset]]
    #: the preset used when none is named (see also :meth:`default_preset`)
    default_preset_name: ClassVar[str] = "default"
    #: the metric a one-number summary shows, in order of preference (first present wins)
    main_metrics: ClassVar[tuple[str, ...]] = ("accuracy",)
    #: extra keyword options :meth:`load` accepts (name -> help text), e.g. CHAIR's image ids
    options: ClassVar[Mapping[str, str]] = {}
    #: whether :meth:`load` needs a data folder (procedurally generated benchmarks do not)
    needs_data: ClassVar[bool] = True
    #: the files and folders the loader reads (shown when the layout is wrong)
    layout: ClassVar[str] = ""
    #: hosted copies whose columns :meth:`_load_hub` maps (``--data hf:<one of these>``)
    hosted: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ loading
    def load(self, data: str | Path | None, split: str | None = None, **options: Any) -> list[Sample]:
        """Read the samples of ``split`` from ``data`` (the benchmark's folder).

        Raises:
            UserInputError: unknown split or option, missing folder or files, a layout that is
                not the official one, duplicate ids, or no samples at all.
        """
        split = self.check_split(split)
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            takes = ", ".join(sorted(self.options)) or "none"
            raise UserInputError(f"benchmark {self.name!r} takes no option {', '.join(unknown)} (options: {takes})")
        if is_hub_source(data):
            source = parse_hub_source(data)
            if not self.hosted:
                raise UserInputError(f"benchmark {self.name!r} has no loader for hosted copies (--data {source}); "
                                     f"give its folder in the official layout: {self.layout}")
            given = sorted(k for k, v in options.items() if v is not None)
            if given:
                raise UserInputError(f"option(s) {', '.join(given)} do not apply to a hosted copy (--data {source})")
            samples = self._load_hub(source, split)
            if not samples:
                raise UserInputError(f"{self.name} split {split!r} in {source} holds no samples")
            check_unique_ids(samples, f"{self.name} {split}")
            return samples
        root: Path | None = None
        if self.needs_data:
            if data is None or str(data) == "":
                raise UserInputError(f"benchmark {self.name!r} needs --data: {self.layout}")
            root = Path(data).expanduser()
            if not root.exists():
                raise UserInputError(f"{self.name} data folder {str(root)!r} does not exist")
            if not root.is_dir():
                raise UserInputError(f"{self.name} data must be a folder, not the file {str(root)!r}: {self.layout}")
        samples = self._load(root, split, **{k: v for k, v in options.items() if v is not None})
        if not samples:
            raise UserInputError(f"{self.name} split {split!r} in {str(root)!r} holds no samples")
        check_unique_ids(samples, f"{self.name} {split}")
        return samples

    @abstractmethod
    def _load(self, root: Path | None, split: str, **options: Any) -> list[Sample]:
        """Read the samples; ``root`` exists and is a folder (``None`` if not :attr:`needs_data`)."""

    def _load_hub(self, source: HubSource, split: str) -> list[Sample]:
        """Read the samples of ``split`` from a hosted copy (only called when :attr:`hosted` is
        not empty); the samples equal those of :meth:`_load` except that ``image`` is a
        :class:`~innersight.eval.benchmarks.hub.HubImage`."""
        raise UserInputError(f"benchmark {self.name!r} has no loader for hosted copies")

    def check_split(self, split: str | None) -> str:
        """``split`` if known (``None`` -> the default split); ``UserInputError`` otherwise."""
        if split is None or split == "":
            return self.splits[0]
        if split not in self.splits:
            raise UserInputError(f"{self.name} has no split {split!r}; splits: {', '.join(self.splits)}")
        return split

    # ------------------------------------------------------------------ prompts
    def default_preset(self, variant: str = "canonical") -> str:
        """The preset used with scorer ``variant`` when the user names none."""
        return self.default_preset_name

    def preset(self, name: str | None = None, variant: str = "canonical") -> Preset:
        """The preset ``name`` (``None`` -> :meth:`default_preset` for ``variant``)."""
        key = name or self.default_preset(variant)
        if key not in self.presets:
            raise UserInputError(f"{self.name} has no preset {key!r}; presets: {', '.join(self.presets)}")
        return self.presets[key]

    def render(self, sample: Sample, preset: Preset) -> tuple[str, Sample]:
        """``(question text sent to the model, sample the scorer sees)``.

        The default: the preset's fixed prompt, or the question followed by the preset's
        suffix; the sample is scored as loaded. Benchmarks whose prompt changes what is scored
        (lettered options in a shuffled order) override this.
        """
        if preset.prompt is not None:
            return preset.prompt, sample
        return f"{sample['question']}{preset.suffix}", sample

    def main_metric(self, metrics: Mapping[str, Any]) -> str | None:
        """The first of :attr:`main_metrics` present in ``metrics`` (``None`` if none is)."""
        for name in self.main_metrics:
            if name in metrics:
                return name
        return None

    def describe(self) -> dict[str, Any]:
        """What ``innersight list`` shows for this benchmark."""
        return {
            "name": self.name,
            "title": self.title,
            "splits": list(self.splits),
            "scorer": self.scorer,
            "presets": {p.name: p.description for p in self.presets.values()},
            "default_preset": self.default_preset_name,
            "options": dict(self.options),
            "layout": self.layout,
            "hosted": list(self.hosted),
        }


# ---------------------------------------------------------------------- helpers for loaders


def check_unique_ids(samples: Iterable[Mapping[str, Any]], what: str) -> None:
    """``UserInputError`` if two samples share an id, or an id is not a non-empty string."""
    seen: set[str] = set()
    for sample in samples:
        sid = sample.get("id")
        if not isinstance(sid, str) or not sid:
            raise UserInputError(f"{what}: every sample needs a non-empty string id, got {sid!r}")
        if sid in seen:
            raise UserInputError(f"{what}: sample id {sid!r} occurs twice")
        seen.add(sid)


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file; a missing or malformed file is a one-line ``UserInputError``."""
    if not path.is_file():
        raise UserInputError(f"{what}: {str(path)!r} not found")
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{what}: {str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{what}: cannot read {str(path)!r} ({exc})") from None


def read_json_or_jsonl(path: Path, what: str) -> list[Any]:
    """Rows of a file that is either one JSON list or one JSON object per line (POPE ships the
    latter under a ``.json`` name)."""
    if not path.is_file():
        raise UserInputError(f"{what}: {str(path)!r} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{what}: cannot read {str(path)!r} ({exc})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{what}: {str(path)!r} is not valid JSON ({exc.msg})") from None
        return list(rows)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{what}: line {number} of {str(path)!r} is not JSON ({exc.msg})") from None
    return rows


def first_existing(candidates: Iterable[Path]) -> Path | None:
    """The first path of ``candidates`` that exists."""
    for path in candidates:
        if path.exists():
            return path
    return None


def find_file(root: Path, names: Iterable[str], what: str, layout: str) -> Path:
    """The first of ``root / name`` that is a file; otherwise a ``UserInputError`` naming them."""
    names = list(names)
    for name in names:
        path = root / name
        if path.is_file():
            return path
    tried = ", ".join(names)
    raise UserInputError(f"{what}: none of {tried} found in {str(root)!r}. Expected layout: {layout}")


def find_dir(root: Path, names: Iterable[str], what: str, layout: str) -> Path:
    """The first of ``root / name`` that is a folder; otherwise a ``UserInputError``."""
    names = list(names)
    for name in names:
        path = root / name if name else root
        if path.is_dir():
            return path
    tried = ", ".join(n or "." for n in names)
    raise UserInputError(f"{what}: no image folder ({tried}) in {str(root)!r}. Expected layout: {layout}")


def image_folder(root: Path, names: Iterable[str], probe: str, what: str, layout: str,
                 override: str | Path | None = None) -> Path:
    """The folder holding the images: ``override`` if given, else the first of ``root / name``
    that contains the file ``probe`` (the first sample's image), so that a wrong folder is
    reported before the run starts rather than as thousands of error rows."""
    if override is not None:
        folder = Path(override).expanduser()
        if not folder.is_dir():
            raise UserInputError(f"{what}: image folder {str(folder)!r} does not exist")
        if not (folder / probe).is_file():
            raise UserInputError(f"{what}: image {probe!r} not found in {str(folder)!r}")
        return folder
    names = list(names)
    for name in names:
        folder = root / name if name else root
        if (folder / probe).is_file():
            return folder
    tried = ", ".join(str(root / n) if n else str(root) for n in names)
    raise UserInputError(f"{what}: image {probe!r} not found in any of {tried}. Expected layout: {layout}")


def require_keys(record: Any, keys: Iterable[str], what: str) -> None:
    """``UserInputError`` unless ``record`` is a dict with every key of ``keys``."""
    if not isinstance(record, dict):
        raise UserInputError(f"{what}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise UserInputError(f"{what}: missing field(s) {', '.join(missing)} -- not the official layout")
