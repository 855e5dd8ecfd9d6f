"""POPE (object existence yes/no) in the official question files of the POPE repository.

Layout read::

    <data>/coco_pope_random.json        one JSON object per line (despite the .json name):
    <data>/coco_pope_popular.json         {"question_id": 1, "image": "COCO_val2014_...jpg",
    <data>/coco_pope_adversarial.json      "text": "Is there a snowboard in the image?", "label": "yes"}
    <data>/val2014/<image>              the COCO val2014 images (or images/, or beside the files)

The question files may also sit in ``output/coco/`` or ``coco/`` (the repository's own place).
Splits ``random``, ``popular``, ``adversarial`` read ``coco_pope_<split>.json``; the A-OKVQA and
GQA versions are the splits ``aokvqa-<split>`` and ``gqa-<split>`` (``aokvqa_pope_<split>.json``,
``gqa_pope_<split>.json``; their images: pass ``--images`` when they are not in ``images/``).
A ``.jsonl`` name is accepted as well.

Hosted copy (``--data hf:lmms-lab/POPE``, or a local copy of it): configuration ``default``,
split ``test``, 9000 rows with columns ``question_id``, ``question``, ``answer`` (yes/no),
``image_source``, ``image`` and ``category`` (random / popular / adversarial); a split of this
benchmark is the rows of its category. It holds the COCO questions only.

Presets: ``default`` -- the question and LLaVA-1.5's short-answer instruction; ``plain`` -- the
question as written; ``damro`` -- DAMRO's POPE prompt, the question + `` Please answer this
question with one word.`` (joined with a space); ``vcd`` -- the same prompt (VCD's POPE script
appends the same sentence) and VCD's POPE setting ``vcd.beta = 0.2`` (its scripts run
``--cd_alpha 1 --cd_beta 0.2``; the paper's Sec. 4.1 default is 0.1), applied when ``--method vcd``
is in the run. Both answer in up to 64 new tokens (the reference scripts set no short limit; the
answer stops at the end-of-sequence token). With ``--scorer-variant damro-vcd`` the default
preset is ``damro``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from ...errors import UserInputError
from .base import SHORT_ANSWER, Benchmark, Preset, Sample, image_folder, read_json_or_jsonl, require_keys
from .hub import HubSource, hub_images, int_if_digits, load_split, require_columns, text_rows

#: DAMRO's (and VCD's) POPE answer instruction, appended after a space
ONE_WORD = "Please answer this question with one word."

KINDS = ("random", "popular", "adversarial")
SOURCES = ("coco", "aokvqa", "gqa")
IMAGE_DIRS = ("val2014", "images", "")


def question_file_names(split: str) -> tuple[str, list[str]]:
    """``(source, [file names to try])`` of a POPE split name."""
    source, _, kind = split.rpartition("-")
    source = source or "coco"
    return source, [f"{source}_pope_{kind}.json", f"{source}_pope_{kind}.jsonl"]


class POPE(Benchmark):
    """POPE question files (JSON lines) plus their image folder."""

    name: ClassVar[str] = "pope"
    title: ClassVar[str] = "POPE"
    splits: ClassVar[tuple[str, ...]] = (
        *KINDS, *(f"{s}-{k}" for s in SOURCES[1:] for k in KINDS),
    )
    scorer: ClassVar[str] = "pope"
    presets: ClassVar[dict[str, Preset]] = {
        "default": Preset("default", "question + short-answer instruction (LLaVA-1.5)",
                          suffix="\n" + SHORT_ANSWER, max_new_tokens=8),
        "plain": Preset("plain", "the question as written", max_new_tokens=16),
        "damro": Preset("damro", "question + ' Please answer this question with one word.' (DAMRO)",
                        suffix=" " + ONE_WORD, max_new_tokens=64),
        "vcd": Preset("vcd", "question + ' Please answer this question with one word.', vcd.beta = 0.2 (VCD's POPE "
                      "scripts)", suffix=" " + ONE_WORD, max_new_tokens=64, method_settings={"vcd": {"beta": "0.2"}}),
    }
    main_metrics: ClassVar[tuple[str, ...]] = ("accuracy", "f1")
    options: ClassVar[dict[str, str]] = {"images": "folder of the images (default: val2014/ or images/)"}
    hosted: ClassVar[tuple[str, ...]] = ("lmms-lab/POPE",)
    layout: ClassVar[str] = (
        "coco_pope_<random|popular|adversarial>.json (JSON lines {question_id, image, text, label}) "
        "and the images in val2014/ or images/"
    )

    def default_preset(self, variant: str = "canonical") -> str:
        """``damro`` with the ``damro-vcd`` scorer (the protocol of DAMRO's table), else ``default``."""
        return "damro" if variant == "damro-vcd" else self.default_preset_name

    def _load(self, root: Path | None, split: str, **options: Any) -> list[Sample]:
        assert root is not None
        source, names = question_file_names(split)
        folders = [root, root / "output" / source, root / source]
        path = next((f / n for f in folders for n in names if (f / n).is_file()), None)
        if path is None:
            raise UserInputError(f"POPE: {names[0]} not found in {str(root)!r} (nor in output/{source}/ or "
                                 f"{source}/). Expected layout: {self.layout}")
        rows = read_json_or_jsonl(path, f"POPE {path.name}")
        for number, row in enumerate(rows, start=1):
            require_keys(row, ("question_id", "image", "text", "label"), f"POPE {path.name} row {number}")
        if not rows:
            return []
        folder = image_folder(root, IMAGE_DIRS, str(rows[0]["image"]), "POPE", self.layout, options.get("images"))
        return [
            {
                "id": str(row["question_id"]),
                "image": str(folder / str(row["image"])),
                "question": str(row["text"]),
                "label": str(row["label"]).strip().lower(),
                "question_id": row["question_id"],
                "image_name": str(row["image"]),
            }
            for row in rows
        ]

    def _load_hub(self, source: HubSource, split: str) -> list[Sample]:
        """The rows of the hosted ``test`` split whose ``category`` is this split's kind."""
        hosted_source, _, kind = split.rpartition("-")
        if hosted_source:
            raise UserInputError(f"POPE: the hosted copy holds the COCO splits only (random, popular, adversarial), "
                                 f"not {split!r}")
        table = load_split(source, None, "test", "POPE")
        columns = ("question_id", "question", "answer", "image_source", "category")
        require_columns(table, (*columns, "image"), "POPE", source)
        rows = text_rows(table, columns)
        images = hub_images(table, source, "POPE test")
        chosen = [i for i, row in enumerate(rows) if str(row["category"]).strip().lower() == kind]
        return [
            {
                "id": str(rows[i]["question_id"]),
                "image": images[i],
                "question": str(rows[i]["question"]),
                "label": str(rows[i]["answer"]).strip().lower(),
                "question_id": int_if_digits(rows[i]["question_id"]),
                "image_name": str(rows[i]["image_source"]),
            }
            for i in chosen
        ]
