"""AMBER (arXiv 2311.07397; github.com/junyangwang0410/AMBER) from its official layout.

Files (the repository's ``data/`` folder and the image archive; the ``data/`` level may be left
out)::

    data/annotations.json                 id -> type, truth (and hallu for generative ids)
    data/relation.json                    object -> associated words (the object vocabulary)
    data/safe_words.txt                   words that are never hallucinations (one per line)
    data/query/query_generative.json      [{"id": 1, "image": "AMBER_1.jpg", "query": "Describe this image."}]
    data/query/query_discriminative.json  (and query_discriminative-{existence,attribute,relation}.json)
    image/AMBER_1.jpg ...                 (or images/)

Two benchmarks: ``amber-g`` (generative: free descriptions, CHAIR / Cover / Hal / Cog) and
``amber-d`` (discriminative yes/no questions; splits ``all``, ``existence``, ``attribute``,
``relation``). The annotation of a query is the entry with its id (the official script indexes
``annotations[id - 1]``; a mismatch between the two is reported).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from ...errors import UserInputError
from ..scorers.amber import dimension
from .base import Benchmark, Preset, Sample, find_file, image_folder, read_json, require_keys

LAYOUT = ("data/annotations.json, data/relation.json, data/safe_words.txt, data/query/query_*.json and image/ "
          "(AMBER's repository data folder and image archive)")
_DATA = ("data/", "")
_QUERY = ("data/query/", "query/", "data/", "")


def _file(root: Path, prefixes: tuple[str, ...], name: str, what: str) -> Path:
    return find_file(root, [f"{p}{name}" for p in prefixes], what, LAYOUT)


def _annotations(root: Path) -> dict[int, dict[str, Any]]:
    rows = read_json(_file(root, _DATA, "annotations.json", "AMBER annotations"), "AMBER annotations")
    if not isinstance(rows, list):
        raise UserInputError("AMBER annotations.json must be a list -- not the official layout")
    out: dict[int, dict[str, Any]] = {}
    for position, row in enumerate(rows, start=1):
        require_keys(row, ("id", "type", "truth"), f"AMBER annotation {position}")
        if int(row["id"]) != position:
            raise UserInputError(f"AMBER annotations.json: entry {position} has id {row['id']} (the official "
                                 f"scorer reads annotation id-1; the file is out of order)")
        out[int(row["id"])] = row
    return out


def _queries(root: Path, name: str) -> list[dict[str, Any]]:
    rows = read_json(_file(root, _QUERY, name, "AMBER queries"), "AMBER queries")
    if not isinstance(rows, list):
        raise UserInputError(f"AMBER {name} must be a list -- not the official layout")
    for i, row in enumerate(rows):
        require_keys(row, ("id", "image", "query"), f"AMBER {name} entry {i}")
    return rows


def _images(root: Path, probe: str, override: Any) -> Path:
    return image_folder(root, ["image", "images", "data/image", ""], probe, "AMBER", LAYOUT, override)


class AMBERGenerative(Benchmark):
    name = "amber-g"
    title = "AMBER generative (descriptions: CHAIR, Cover, Hal, Cog)"
    splits = ("generative",)
    scorer = "amber-g"
    main_metrics = ("chair", "hal")
    options: ClassVar[dict[str, str]] = {"images": "folder of AMBER_<n>.jpg (default: image/ beside data/)"}
    layout = LAYOUT
    presets: ClassVar[dict[str, Preset]] = {
        "default": Preset("default", "the query as AMBER states it ('Describe this image.')", max_new_tokens=512)}

    def _load(self, root: Path | None, split: str, **options: Any) -> list[Sample]:
        assert root is not None
        annotations = _annotations(root)
        association = read_json(_file(root, _DATA, "relation.json", "AMBER relations"), "AMBER relations")
        if not isinstance(association, dict):
            raise UserInputError("AMBER relation.json must map objects to lists of words")
        safe_path = _file(root, _DATA, "safe_words.txt", "AMBER safe words")
        safe = frozenset(line.strip() for line in safe_path.read_text(encoding="utf-8").splitlines() if line.strip())
        vocabulary = frozenset([*association, *(w for words in association.values() for w in words)])
        queries = _queries(root, "query_generative.json")
        folder = _images(root, str(queries[0]["image"]), options.get("images"))
        samples = []
        for q in queries:
            note = annotations.get(int(q["id"]))
            if note is None or note["type"] != "generative":
                raise UserInputError(f"AMBER generative query {q['id']} has no generative annotation")
            samples.append({"id": str(q["id"]), "image": str(folder / q["image"]), "question": q["query"],
                            "truth": list(note["truth"]), "hallu": list(note.get("hallu", [])),
                            "association": association, "vocabulary": vocabulary, "safe_words": safe})
        return samples


class AMBERDiscriminative(Benchmark):
    name = "amber-d"
    title = "AMBER discriminative (yes/no: existence, attribute, relation)"
    splits = ("all", "existence", "attribute", "relation")
    scorer = "amber-d"
    options: ClassVar[dict[str, str]] = {"images": "folder of AMBER_<n>.jpg (default: image/ beside data/)"}
    layout = LAYOUT
    presets: ClassVar[dict[str, Preset]] = {
        "default": Preset("default", "the question as AMBER states it", max_new_tokens=8)}

    def _load(self, root: Path | None, split: str, **options: Any) -> list[Sample]:
        assert root is not None
        annotations = _annotations(root)
        name = "query_discriminative.json" if split == "all" else f"query_discriminative-{split}.json"
        queries = _queries(root, name)
        folder = _images(root, str(queries[0]["image"]), options.get("images"))
        samples = []
        for q in queries:
            note = annotations.get(int(q["id"]))
            if note is None or not str(note["type"]).startswith("discriminative"):
                raise UserInputError(f"AMBER discriminative query {q['id']} has no discriminative annotation")
            samples.append({"id": str(q["id"]), "image": str(folder / q["image"]), "question": q["query"],
                            "label": str(note["truth"]).strip().lower(), "type": note["type"],
                            "dimension": dimension(str(note["type"]))})
        return samples
