"""V*Bench (191 high-resolution images; attribute and spatial-relation multiple choice).

Layout read (the official release, as on the ``craigwu/vstar_bench`` dataset repository)::

    <data>/direct_attributes/<name>.jpg     the image
    <data>/direct_attributes/<name>.json    {"question": ..., "options": [correct, other, ...],
                                             "target_object": [...], "bbox": [...]}
    <data>/relative_position/<name>.jpg + <name>.json    (same)

Every image has one question; the correct option is the first of ``options`` in the JSON.
Splits: ``all`` (both folders), ``direct_attributes``, ``relative_position``.

Hosted copies (``--data hf:...``): split ``test``, 191 rows with columns ``image``, ``text`` (the
question with its options written in it, see :func:`split_options`), ``label`` (the letter of the
correct option), ``category`` (``direct_attributes`` / ``relative_position``; a split of this
benchmark is the rows of its category, rows of other categories are skipped) and
``question_id``. Two layouts:

- ``craigwu/vstar_bench`` (the official repository; its table is ``test_questions.jsonl``):
  ``image`` is a path relative to the repository (``direct_attributes/sa_4690.jpg``). The
  category folders are fetched beside the table (``huggingface_hub``; a folder source is used as
  it is), so ``image`` is that file and the id is the official one. Where the official
  annotation JSON lies beside the image, the sample is the official one: question, option order,
  ``target_object`` and ``bbox`` come from it, after checking that it has the same options and
  the same correct option as the row (a disagreement is an error). Without it, ``target_object``
  and ``bbox`` are ``None``.
- ``lmms-lab/vstar-bench`` / ``lmms-lab-encoder/vstar-bench`` (lmms-eval's copies): ``image``
  holds the encoded image, so ``target_object`` and ``bbox`` are ``None`` (the table has no
  box). The id is ``<category>/<file stem>`` when the image cells keep the original file names
  (as the official ids), else ``<category>/<question_id>``.

Either way the options are the ones of ``text`` with the correct one moved first (the others
keep their order) and ``answer_index`` is 0, as in the official layout, so the likelihood scorer
(lowest loss wins, ties to the lowest index) scores a row exactly as the official sample. Where
no annotation JSON fixes their order, the wrong options may be listed in another order than in
the official JSON; that changes only the shuffled order the ``letter`` preset shows (as do
``<category>/<question_id>`` ids, which seed that shuffle). Samples whose ids are file names come in the official order
(category, then file name); the others in row order.

Presets and the scorer variant they go with:

- ``likelihood`` (canonical, the official protocol): the question alone; the runner scores each
  option as the assistant's answer by its mean token loss, options in the official order.
- ``letter``: the question, then the options as ``(A) ...`` lines and "Answer with the option's
  letter from the given choices directly."; the generated letter is parsed. The options are
  shown in a deterministic per-sample shuffled order (a fixed hash of the sample id), so that
  the right answer is not always (A); the scored sample carries that order.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from ...errors import UserInputError
from ...prompts import LETTER_INSTRUCTION
from .base import IMAGE_SUFFIXES, Benchmark, Preset, Sample, read_json, require_keys
from .hub import (
    HubSource,
    hub_images,
    image_names,
    load_split,
    repository_folder,
    require_columns,
    stores_images,
    text_rows,
)

CATEGORIES = ("direct_attributes", "relative_position")
#: the columns every hosted copy has
HUB_COLUMNS = ("image", "text", "label", "category", "question_id")
#: one option line of a hosted question: ``(B) red``
OPTION_LINE = re.compile(r"\(([A-Z])\)\s*(.*)")


class VStarBench(Benchmark):
    """V*Bench from its two official folders of image + JSON pairs."""

    name: ClassVar[str] = "vstar"
    title: ClassVar[str] = "V*Bench"
    splits: ClassVar[tuple[str, ...]] = ("all", *CATEGORIES)
    scorer: ClassVar[str] = "vstar"
    presets: ClassVar[dict[str, Preset]] = {
        "likelihood": Preset("likelihood", "question only; options scored by mean token loss (official)"),
        "letter": Preset("letter", "lettered options (shuffled per sample), answer with the letter",
                         suffix="\n" + LETTER_INSTRUCTION, max_new_tokens=8),
    }
    default_preset_name: ClassVar[str] = "likelihood"
    hosted: ClassVar[tuple[str, ...]] = ("craigwu/vstar_bench", "lmms-lab/vstar-bench", "lmms-lab-encoder/vstar-bench")
    layout: ClassVar[str] = (
        "direct_attributes/ and relative_position/, each holding <name>.jpg + <name>.json "
        "with question and options (correct first)"
    )

    def default_preset(self, variant: str = "canonical") -> str:
        """``likelihood`` for the canonical scorer; ``letter`` for generated answers."""
        return "likelihood" if variant == "canonical" else "letter"

    def _load(self, root: Path | None, split: str, **options: Any) -> list[Sample]:
        assert root is not None
        categories = CATEGORIES if split == "all" else (split,)
        missing = [c for c in categories if not (root / c).is_dir()]
        if missing:
            raise UserInputError(f"V*Bench: folder(s) {', '.join(missing)} not found in {str(root)!r}. "
                                 f"Expected layout: {self.layout}")
        samples = []
        for category in categories:
            folder = root / category
            images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise UserInputError(f"V*Bench: no images in {str(folder)!r}. Expected layout: {self.layout}")
            for image in images:
                annotation = image.with_suffix(".json")
                if not annotation.is_file():
                    raise UserInputError(f"V*Bench: {image.name} has no annotation {annotation.name} in {str(folder)!r}")
                record = read_json(annotation, "V*Bench")
                require_keys(record, ("question", "options"), f"V*Bench {category}/{annotation.name}")
                opts = record["options"]
                if not isinstance(opts, list) or len(opts) < 2:
                    raise UserInputError(f"V*Bench {category}/{annotation.name}: 'options' must list at least 2 options")
                samples.append(vstar_sample(f"{category}/{image.stem}", str(image), category, str(record["question"]),
                                            [str(o) for o in opts], record.get("target_object"), record.get("bbox")))
        return samples

    def _load_hub(self, source: HubSource, split: str) -> list[Sample]:
        """The rows of the hosted ``test`` split whose category is in ``split`` (see the module
        docstring for the two layouts)."""
        what = "V*Bench"
        table = load_split(source, None, "test", what)
        require_columns(table, HUB_COLUMNS, what, source)
        embedded = stores_images(table, "image", what, source)
        rows = text_rows(table, HUB_COLUMNS[1:] if embedded else HUB_COLUMNS)
        wanted = CATEGORIES if split == "all" else (split,)
        known = [i for i, row in enumerate(rows) if str(row["category"]).strip() in CATEGORIES]
        chosen = [i for i in known if str(rows[i]["category"]).strip() in wanted]
        parsed = {i: hub_row(rows[i], f"{what} {source} row {i} (question_id {rows[i]['question_id']!r})")
                  for i in chosen}
        if embedded:
            return _embedded_samples(table, source, rows, known, chosen, parsed)
        return _file_samples(source, rows, chosen, parsed, wanted)

    def render(self, sample: Sample, preset: Preset) -> tuple[str, Sample]:
        """``likelihood``: the question alone. ``letter``: shuffled lettered options (see module)."""
        if preset.name == "likelihood":
            return str(sample["question"]), sample
        order = option_order(sample["id"], len(sample["options"]))
        options = [sample["options"][i] for i in order]
        lines = [f"({string.ascii_uppercase[i]}) {o}" for i, o in enumerate(options)]
        shown = {**sample, "options": options, "answer_index": order.index(int(sample.get("answer_index", 0))),
                 "option_lines": lines}
        return "\n".join([str(sample["question"]), *lines]) + preset.suffix, shown


def option_order(sample_id: str, n: int) -> list[int]:
    """A permutation of ``range(n)`` fixed by ``sample_id``: the indices sorted by the SHA-256 of
    ``"<id>/<index>"`` (the same on every machine and Python version)."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{sample_id}/{i}".encode()).hexdigest())


def vstar_sample(sample_id: str, image: Any, category: str, question: str, options: list[str],
                 target_object: Any = None, bbox: Any = None) -> Sample:
    """A V*Bench sample: ``options`` with the correct one first (``answer_index`` 0)."""
    return {
        "id": sample_id,
        "image": image,
        "question": question,
        "options": options,
        "answer_index": 0,
        "category": category,
        "target_object": target_object,
        "bbox": bbox,
    }


def split_options(text: str, what: str) -> tuple[str, list[str], str]:
    """``(question, options, letters)`` of a hosted V* question that carries its options.

    The hosted ``text`` reads ``"What is the material of the glove?\\n(A) rubber\\n(B) cotton..."``.
    Parsing rule:

    1. the text is cut into lines at every line break (``\\n``, ``\\r\\n``, ...); each line loses
       its surrounding whitespace and empty lines are dropped;
    2. the first line that starts with a capital letter in brackets, ``(X)``, opens the options;
       it and every line after it must be such an option line, lettered ``A``, ``B``, ``C``...
       in this order with none skipped, and there must be at least two;
    3. an option is the text after its ``(X)`` (whitespace after the bracket dropped); it must
       not be empty;
    4. the question is the lines before the options, joined with ``\\n``; it must not be empty.

    Returns ``letters``: the option letters in order (``"ABCD"``).

    Raises:
        UserInputError: the text does not follow this rule (no options, one option, letters out
            of order, an empty option or question, a line after the options that is not one);
            the message names ``what`` (the row).
    """
    lines = [line.strip() for line in str(text).splitlines()]
    lines = [line for line in lines if line]
    start = next((k for k, line in enumerate(lines) if OPTION_LINE.match(line)), None)
    expected = "the question, then one line per option: (A) ..., (B) ..., at least two"
    if start is None:
        raise UserInputError(f"{what}: no options in its text {_short(text)!r}; expected {expected}")
    question = "\n".join(lines[:start])
    if not question:
        raise UserInputError(f"{what}: its text {_short(text)!r} has options but no question before them")
    if len(lines) - start > len(string.ascii_uppercase):
        raise UserInputError(f"{what}: more than {len(string.ascii_uppercase)} option lines in {_short(text)!r}")
    options: list[str] = []
    for letter, line in zip(string.ascii_uppercase, lines[start:]):
        match = OPTION_LINE.match(line)
        if match is None or match.group(1) != letter:
            raise UserInputError(f"{what}: option ({letter}) expected, found the line {line!r} in {_short(text)!r}; "
                                 f"expected {expected}")
        option = match.group(2).strip()
        if not option:
            raise UserInputError(f"{what}: option ({letter}) is empty in {_short(text)!r}")
        options.append(option)
    if len(options) < 2:
        raise UserInputError(f"{what}: only one option in {_short(text)!r}; expected {expected}")
    return question, options, string.ascii_uppercase[: len(options)]


def hub_row(row: dict[str, Any], what: str) -> tuple[str, str, list[str]]:
    """``(category, question, options with the correct one first)`` of a hosted row (columns
    ``text``, ``label``, ``category``); the label is one of the option letters (surrounding
    whitespace and case ignored).

    Raises:
        UserInputError: the text does not parse (:func:`split_options`) or the label is not the
            letter of one of its options.
    """
    question, options, letters = split_options(str(row["text"]), what)
    label = str(row["label"] if row["label"] is not None else "").strip().upper()
    if len(label) != 1 or label not in letters:
        raise UserInputError(f"{what}: label {row['label']!r} is not one of the option letters {', '.join(letters)}")
    k = letters.index(label)
    return str(row["category"]).strip(), question, [options[k], *options[:k], *options[k + 1:]]


def _short(text: Any, limit: int = 120) -> str:
    value = str(text)
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _official_order(samples: list[tuple[str, str, Sample]]) -> list[Sample]:
    """``samples`` given as ``(category, file name, sample)``, in the order of the official loader:
    category (as in :data:`CATEGORIES`), then file name."""
    return [s for _, _, s in sorted(samples, key=lambda t: (CATEGORIES.index(t[0]), Path(t[1])))]


def _embedded_samples(table: Any, source: HubSource, rows: Sequence[dict[str, Any]], known: Sequence[int],
                      chosen: Sequence[int], parsed: dict[int, tuple[str, str, list[str]]]) -> list[Sample]:
    """Samples of a copy whose ``image`` column holds the images (lmms-eval's copies)."""
    images = hub_images(table, source, "V*Bench test")
    names = image_names(table)
    keys = [(str(rows[i]["category"]).strip(), Path(names[i]).stem) if names[i] else None for i in known]
    by_name = all(key is not None for key in keys) and len(set(keys)) == len(keys)
    if by_name:
        return _official_order([
            (parsed[i][0], str(names[i]),
             vstar_sample(f"{parsed[i][0]}/{Path(str(names[i])).stem}", images[i], *parsed[i]))
            for i in chosen
        ])
    return [vstar_sample(f"{parsed[i][0]}/{rows[i]['question_id']}", images[i], *parsed[i]) for i in chosen]


def _file_samples(source: HubSource, rows: Sequence[dict[str, Any]], chosen: Sequence[int],
                  parsed: dict[int, tuple[str, str, list[str]]], wanted: Sequence[str]) -> list[Sample]:
    """Samples of a copy whose ``image`` column holds paths relative to the repository
    (``craigwu/vstar_bench``): the files and their annotation JSONs are read from it."""
    root = repository_folder(source, "V*Bench", [f"{c}/*" for c in wanted])
    samples = []
    for i in chosen:
        category, question, options = parsed[i]
        what = f"V*Bench {source} row {i} (question_id {rows[i]['question_id']!r})"
        relative = rows[i]["image"]
        if not relative:
            raise UserInputError(f"{what}: no image path")
        path = root / str(relative)
        if not path.is_file():
            raise UserInputError(f"{what}: image {str(relative)!r} not found in {str(root)!r} (the table names files "
                                 f"of the repository: give its whole snapshot)")
        target_object = bbox = None
        annotation = path.with_suffix(".json")
        if annotation.is_file():
            record = read_json(annotation, "V*Bench")
            require_keys(record, ("question", "options"), f"V*Bench {annotation.parent.name}/{annotation.name}")
            official = [str(o) for o in record["options"]] if isinstance(record["options"], list) else []
            if len(official) < 2 or official[0].strip() != options[0] or \
                    sorted(o.strip() for o in official) != sorted(options):
                raise UserInputError(f"{what}: its options {options[1:]} with correct option {options[0]!r} disagree "
                                     f"with {annotation.parent.name}/{annotation.name} (options {official}, the "
                                     f"first is correct); read the folder in the official layout instead "
                                     f"(--data {root})")
            question, options = str(record["question"]), official
            target_object, bbox = record.get("target_object"), record.get("bbox")
        sample = vstar_sample(f"{category}/{path.stem}", str(path), category, question, options, target_object, bbox)
        samples.append((category, path.name, sample))
    return _official_order(samples)
