"""CHAIR: caption COCO images and count hallucinated objects.

Layout read (the official COCO 2014 downloads in one folder)::

    <data>/annotations/instances_val2014.json   images (id, file_name), categories, annotations
    <data>/annotations/captions_val2014.json    five reference captions per image
    <data>/val2014/COCO_val2014_<12 digits>.jpg (the ``file_name`` of the instances file)

The JSON files may also sit directly in ``<data>``. Image ids found only in the train2014
annotations are read from ``instances_train2014.json`` / ``captions_train2014.json`` and
``train2014/`` when those exist.

Which images to caption is a list of COCO image ids given by path (option ``image_ids``,
``--image-ids`` on the command line): one id per line (a COCO file name such as
``COCO_val2014_000000123456.jpg`` works too; blank lines and ``#`` comments are skipped), or a
JSON list. Without it the 500 ids packaged as ``innersight/eval/data/chair_500_ids.txt`` are
used: the images of OPERA's LLaVA-1.5 CHAIR evaluation, which DeCo-style evaluations reuse (the
file's header names its source).

Ground truth per image (``gt_objects``): its instance categories united with the COCO objects
its reference captions mention, through the synonym table
(:func:`innersight.eval.scorers.chair.ground_truth_objects`). The samples also carry the raw
``coco_categories`` and ``reference_captions``, so that every scorer variant maps them with its
own caption processing, as the official script does.

Presets: ``default`` -- "Please describe this image in detail.", 512 new tokens (DeCo);
``damro`` -- "Generate a short caption of this image." (DAMRO, on POPE-random images: give
those ids), 512 new tokens.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from ...errors import UserInputError
from ..scorers.chair import coco_vocabulary, ground_truth_objects
from .base import Benchmark, Preset, Sample, read_json, require_keys

DEFAULT_IDS_RESOURCE = "chair_500_ids.txt"
SUBSETS = ("val2014", "train2014")
_DIGITS = re.compile(r"(\d+)(?:\.\w+)?$")


def parse_image_ids(path: str | Path) -> list[int]:
    """COCO image ids from a text file (one per line) or a JSON list; duplicates refused."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserInputError(f"CHAIR: image id list {str(path)!r} not found")
    text = path.read_text(encoding="utf-8")
    return _parse_ids(text, str(path))


def _parse_ids(text: str, where: str) -> list[int]:
    ids: list[int] = []
    if text.lstrip().startswith("["):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"CHAIR: {where} is not a valid JSON list ({exc.msg})") from None
        items = [str(x) for x in raw]
    else:
        items = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    for number, item in enumerate(items, start=1):
        if not item:
            continue
        match = _DIGITS.search(item)
        if match is None:
            raise UserInputError(f"CHAIR: entry {number} of {where} is not a COCO image id: {item!r}")
        ids.append(int(match.group(1)))
    if not ids:
        raise UserInputError(f"CHAIR: the image id list {where} is empty")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserInputError(f"CHAIR: image id {dup} occurs twice in {where}")
    return ids


def default_image_ids() -> list[int] | None:
    """The packaged id list, or ``None`` when this version ships none."""
    resource = resources.files("innersight.eval") / "data" / DEFAULT_IDS_RESOURCE
    if not resource.is_file():
        return None
    return _parse_ids(resource.read_text(encoding="utf-8"), f"package data {DEFAULT_IDS_RESOURCE}")


def _annotation(root: Path, name: str) -> Path | None:
    for folder in (root / "annotations", root):
        if (folder / name).is_file():
            return folder / name
    return None


class _Subset:
    """One COCO subset's images, instance categories and captions, indexed by image id."""

    def __init__(self, root: Path, subset: str, instances: Path, captions: Path, image_dirs: list[Path]):
        what = f"CHAIR {instances.name}"
        data = read_json(instances, "CHAIR")
        require_keys(data, ("images", "annotations", "categories"), what)
        caps = read_json(captions, "CHAIR")
        require_keys(caps, ("annotations",), f"CHAIR {captions.name}")
        names = {c["id"]: c["name"] for c in data["categories"]}
        self.files = {img["id"]: img["file_name"] for img in data["images"]}
        self.categories: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            self.categories.setdefault(ann["image_id"], []).append(names[ann["category_id"]])
        self.captions: dict[int, list[str]] = {}
        for ann in caps["annotations"]:
            self.captions.setdefault(ann["image_id"], []).append(str(ann["caption"]))
        self.image_dirs = image_dirs
        self.subset = subset

    def image_path(self, image_id: int) -> Path:
        name = self.files[image_id]
        for folder in self.image_dirs:
            if (folder / name).is_file():
                return folder / name
        tried = ", ".join(str(f) for f in self.image_dirs)
        raise UserInputError(f"CHAIR: image {name!r} not found in {tried}")


class CHAIR(Benchmark):
    """CHAIR over a given list of COCO image ids, ground truth from the COCO annotations."""

    name: ClassVar[str] = "chair"
    title: ClassVar[str] = "CHAIR (COCO captions)"
    splits: ClassVar[tuple[str, ...]] = ("val2014",)
    scorer: ClassVar[str] = "chair"
    presets: ClassVar[dict[str, Preset]] = {
        "default": Preset("default", "'Please describe this image in detail.', 512 new tokens (DeCo)",
                          prompt="Please describe this image in detail.", max_new_tokens=512),
        "damro": Preset("damro", "'Generate a short caption of this image.' (DAMRO)",
                        prompt="Generate a short caption of this image.", max_new_tokens=512),
    }
    main_metrics: ClassVar[tuple[str, ...]] = ("chair_s", "chair_i")
    options: ClassVar[dict[str, str]] = {
        "image_ids": "file of COCO image ids to caption (one per line, or a JSON list; default: the packaged 500)",
        "images": "folder of the COCO images (default: val2014/ or images/)",
    }
    layout: ClassVar[str] = (
        "annotations/instances_val2014.json, annotations/captions_val2014.json and "
        "val2014/COCO_val2014_<id>.jpg (the packaged 500 image ids, or --image-ids)"
    )

    def _load(self, root: Path | None, split: str, **options: Any) -> list[Sample]:
        assert root is not None
        if options.get("image_ids") is not None:
            ids = parse_image_ids(options["image_ids"])
        else:
            packaged = default_image_ids()
            if packaged is None:
                raise UserInputError("CHAIR needs the list of COCO image ids to caption: pass --image-ids FILE "
                                     "(one id per line)")
            ids = packaged
        extra = [Path(options["images"]).expanduser()] if options.get("images") is not None else []
        subsets: list[_Subset] = []
        remaining = set(ids)
        for subset in SUBSETS:
            instances = _annotation(root, f"instances_{subset}.json")
            captions = _annotation(root, f"captions_{subset}.json")
            if instances is None or captions is None:
                if subset == "val2014":
                    raise UserInputError(f"CHAIR: instances_val2014.json and captions_val2014.json are needed in "
                                         f"{str(root)!r} or its annotations/ folder. Expected layout: {self.layout}")
                continue
            dirs = [*extra, root / subset, root / "images", root]
            loaded = _Subset(root, subset, instances, captions, dirs)
            subsets.append(loaded)
            remaining -= set(loaded.files)
            if not remaining:
                break
        if remaining:
            first = sorted(remaining)[0]
            if options.get("image_ids") is None:
                raise UserInputError(f"CHAIR: {len(remaining)} of the {len(ids)} packaged image ids ({DEFAULT_IDS_RESOURCE}) "
                                     f"are not in the COCO annotations in {str(root)!r} (first: {first}); use the full "
                                     f"instances/captions_val2014.json, or pass --image-ids FILE with your own list")
            raise UserInputError(f"CHAIR: {len(remaining)} image id(s) are not in the COCO annotations "
                                 f"(first: {first})")
        vocabulary = coco_vocabulary()
        question = self.presets["default"].prompt
        samples = []
        for image_id in ids:
            subset = next(s for s in subsets if image_id in s.files)
            categories = sorted(set(subset.categories.get(image_id, [])))
            captions = subset.captions.get(image_id, [])
            gt = ground_truth_objects(categories, captions, vocabulary)
            samples.append({
                "id": str(image_id),
                "image": str(subset.image_path(image_id)),
                "question": question,
                "gt_objects": gt,
                "coco_categories": categories,
                "reference_captions": list(captions),
                "image_id": image_id,
                "coco_subset": subset.subset,
            })
        return samples
