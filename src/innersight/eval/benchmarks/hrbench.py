"""HR-Bench 4K / 8K (arXiv 2408.15556; DreamMr/HR-Bench) from its official TSV files.

Layout: ``hr_bench_4k.tsv`` and ``hr_bench_8k.tsv`` in one folder; one row per question with the
columns ``index``, ``question``, ``answer`` (A-D), ``category`` (``single`` / ``cross``),
``cycle_category`` (which rotation of the options the row is), ``A`` ... ``D`` and ``image``
(the image file, base64). The images stay encoded until the model needs them
(:class:`Base64Image`), so holding the split costs about the size of the file.

The prompt is lmms-eval's: the question, one ``X. option`` line per option, then "Answer the
option letter directly.".
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import sys
from pathlib import Path
from typing import Any, ClassVar

from ...errors import UserInputError
from .base import Benchmark, Preset, Sample

FILES = {"4k": "hr_bench_4k.tsv", "8k": "hr_bench_8k.tsv"}
COLUMNS = ("index", "question", "answer", "category", "A", "B", "C", "D", "image")
LAYOUT = "hr_bench_4k.tsv and/or hr_bench_8k.tsv (HR-Bench's TSV files: index, question, answer, category, A-D, image)"
SUFFIX = "Answer the option letter directly."


class Base64Image(io.RawIOBase):
    """A base64-encoded image as a read-only binary file, decoded on each open (not kept)."""

    def __init__(self, text: str, name: str):
        super().__init__()
        self._text, self._name, self._data, self._pos = text, name, None, 0

    @property
    def name(self) -> str:  # type: ignore[override]
        return self._name

    def _bytes(self) -> bytes:
        if self._data is None:
            try:
                self._data = base64.b64decode(self._text, validate=False)
            except (binascii.Error, ValueError) as exc:
                raise OSError(f"{self._name}: the image column is not base64 ({exc})") from None
        return self._data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        size = len(self._bytes())
        self._pos = {0: offset, 1: self._pos + offset, 2: size + offset}[whence]
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        data = self._bytes()
        chunk = data[self._pos : self._pos + len(buffer)]
        buffer[: len(chunk)] = chunk
        self._pos += len(chunk)
        if self._pos >= len(data):
            self._data = None  # drop the decoded bytes once read to the end
            self._pos = len(data)
        return len(chunk)


class HRBench(Benchmark):
    name = "hrbench"
    title = "HR-Bench 4K / 8K (multiple choice on high-resolution images)"
    splits = ("4k", "8k")
    scorer = "hrbench"
    layout = LAYOUT
    presets: ClassVar[dict[str, Preset]] = {
        "default": Preset("default", "question, lettered options, 'Answer the option letter directly.' (lmms-eval)",
                          suffix=SUFFIX, max_new_tokens=16)}

    def _load(self, root: Path | None, split: str, **options: Any) -> list[Sample]:
        assert root is not None
        path = root / FILES[split]
        if not path.is_file():
            raise UserInputError(f"HR-Bench: {str(path)!r} not found. Expected layout: {LAYOUT}")
        csv.field_size_limit(sys.maxsize)
        samples = []
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise UserInputError(f"HR-Bench: {path.name} lacks column(s) {', '.join(missing)} -- not the "
                                     f"official TSV")
            for line, row in enumerate(reader, start=2):
                opts = {k: row[k].strip() for k in "ABCD" if row.get(k) not in (None, "") and row[k].strip()}
                answer = (row["answer"] or "").strip().upper()
                if answer not in opts:
                    raise UserInputError(f"HR-Bench: line {line} of {path.name}: answer {row['answer']!r} is not "
                                         f"one of its options {sorted(opts)}")
                samples.append({
                    "id": f"{split}-{row['index']}", "index": row["index"],
                    "image": Base64Image(row["image"], f"{path.name} row {row['index']}"),
                    "question": row["question"].strip(), "options": opts, "answer": answer,
                    "category": row["category"].strip(), "cycle_category": (row.get("cycle_category") or "").strip(),
                })
        return samples

    def render(self, sample: Sample, preset: Preset) -> tuple[str, Sample]:
        lines = "".join(f"{k}. {v}\n" for k, v in sample["options"].items())
        return f"{sample['question']}\n{lines}{preset.suffix}", sample
