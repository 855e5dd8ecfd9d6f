"""CHAIR: object hallucination in image captions (Rohrbach et al., 2018, arXiv:1809.02156).

The canonical variant reproduces the official CHAIR script (``utils/chair.py`` of the authors'
``Hallucination`` repository) and its ``data/synonyms.txt``, shipped unedited as
``innersight/eval/data/coco_synonyms.txt``: 80 lines, one per COCO category, entries separated
by ``", "``, the first entry canonical. The file is read exactly as the script reads it (each
line stripped, then split on ``", "``), so its slips count as they do there: ``" motor bike"``
and ``" cheesecake"`` keep a leading space and never match a caption word, ``"iPhone"`` keeps
its capital and never matches a lower-cased caption, and ``panda`` is a bear. There is no
``grizzly``, ``meter``, ``novel``, ``dryer`` or ``hair dryer``.

Caption processing (:meth:`Vocabulary.words`, the script's ``caption_to_words``):

1. lower-case and tokenise (:func:`tokenize`, Treebank-style as ``nltk.word_tokenize``:
   punctuation marks are tokens of their own, hyphenated words stay whole, so ``"hot-dog"`` is
   one token and no object);
2. singularise every token (the script used pattern.en's ``singularize``; here the rule-based
   :func:`singularize` -- pattern.en is not installable offline);
3. merge two-token windows, left to right, through the script's double-word table
   (:data:`DOUBLE_WORDS`): the COCO two-word names map to themselves (``"train track"`` and
   ``"home plate"`` too: they are no objects, so ``"a train track"`` mentions nothing);
   ``baby``/``adult`` + one of the 12 words of :data:`ANIMAL_WORDS` -> that word (``"baby
   puppy"`` is not merged and counts a person and a dog; ``"baby animal"`` counts nothing);
   ``passenger jet``/``passenger train`` -> ``jet``/``train``; ``bow tie`` -> ``tie``;
   ``toilet seat`` -> ``toilet``; ``wine glas`` -> ``wine glass``;
4. if both ``toilet`` and ``seat`` remain, every ``seat`` is dropped (``"the seat of the
   toilet"`` mentions a toilet, not a chair);
5. keep the words that are table entries; each is one mention of its canonical object.

Variants (:data:`VARIANTS`): ``canonical`` (above); ``lemma`` -- the same table and rules with a
dictionary lemmatiser instead of the singulariser (most forks, e.g. OPERA's, lemmatise with
nltk's POS tagger + WordNet; here lemminflect's noun lemmas, which ship inside its wheel:
``pip install 'innersight[lemma]'``; no POS tagger, every token is lemmatised as a noun);
``tidy`` -- the official rules with the table's three formatting slips repaired (entries
stripped and lower-cased, so ``motor bike``, ``cheesecake`` and ``iphone`` count).

Per caption: mentions (with repeats), hallucinated mentions (canonical object not in the image's
ground truth), covered ground-truth objects (distinct), words (whitespace-separated).
Aggregate (x100): CHAIR_i = hallucinated mentions / mentions; CHAIR_s = captions with at least
one hallucinated mention / captions; recall = covered ground-truth objects / ground-truth
objects, both summed over captions (recall comes from the forks, the original reports none);
``avg_len``: mean number of words per caption.

Ground truth: a sample carrying ``coco_categories`` (its instance category names) and
``reference_captions`` (its COCO captions) gets them mapped with the variant's own processing
(:func:`ground_truth_objects`), as the script does; otherwise ``sample["gt_objects"]`` (names of
COCO categories or synonyms). Nothing here reads a pickle or downloads anything.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from .base import Row, Scorer, percent, require_rows

# --------------------------------------------------------------------------- singulariser

#: whole-word irregular plurals (compound-friendly endings are in IRREGULAR_SUFFIXES)
IRREGULAR_PLURALS: dict[str, str] = {
    "people": "person",
    "mice": "mouse",
    "geese": "goose",
    "teeth": "tooth",
    "feet": "foot",
    "oxen": "ox",
    "lice": "louse",
    "dice": "die",
    "lives": "life",
    "leaves": "leaf",
    "loaves": "loaf",
    "sheaves": "sheaf",
    "thieves": "thief",
    "scarves": "scarf",
    "dwarves": "dwarf",
    "hooves": "hoof",
    "skis": "ski",
    "cacti": "cactus",
    "fungi": "fungus",
    "octopi": "octopus",
    "radii": "radius",
}

#: irregular endings that also apply inside compounds (policemen, grandchildren, pocketknives,
#: minibuses, housewives, firemen); checked longest first
IRREGULAR_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("children", "child"),
    ("knives", "knife"),
    ("busses", "bus"),
    ("buses", "bus"),
    ("wives", "wife"),
    ("women", "woman"),
    ("men", "man"),
)

#: words that look plural but are not (or must stay as they are)
NOT_PLURAL: frozenset[str] = frozenset(
    {
        # end in "s" but are singular / not nouns
        "as", "has", "was", "yes", "its", "gas", "lens", "series", "species", "news", "canvas",
        "atlas", "always", "perhaps", "across", "bias", "christmas", "whereas", "chaos",
        # "-men" singulars
        "abdomen", "omen", "specimen", "stamen", "regimen", "semen", "amen", "acumen", "hymen", "yemen",
        # mass / pluralia tantum nouns kept whole
        "sheep", "deer", "fish", "moose", "aircraft", "cattle", "luggage", "scissors", "pants", "jeans",
        "trousers", "shorts",
    }
)  # fmt: skip

#: "-ies" plurals whose singular ends in "-ie" (drop only the "s")
IES_TO_IE: frozenset[str] = frozenset(
    {
        "cookies", "movies", "zombies", "calories", "brownies", "smoothies", "hoodies", "selfies",
        "rookies", "collies", "goalies", "birdies", "veggies", "hippies", "prairies", "boogies",
        "beanies", "budgies", "aussies", "sweeties", "doggies", "magpies", "pixies", "genies",
    }
)  # fmt: skip

#: "-lves" words that are not "-lf" plurals
LVES_NOT_LF: frozenset[str] = frozenset(
    {"valves", "solves", "resolves", "evolves", "revolves", "involves", "delves"}
)

#: "-oes" plurals whose singular ends in "-o" (all other "-oes" words just drop the "s")
OES_TO_O: frozenset[str] = frozenset(
    {"potatoes", "tomatoes", "heroes", "echoes", "volcanoes", "mangoes", "mosquitoes", "torpedoes",
     "buffaloes", "dominoes", "tornadoes", "vetoes"}
)  # fmt: skip

#: "-ches" plurals whose singular ends in "-che" (drop only the "s")
CHES_TO_CHE: frozenset[str] = frozenset(
    {"niches", "caches", "headaches", "moustaches", "mustaches", "avalanches", "quiches", "cliches", "creches"}
)  # fmt: skip

_SIBILANT_ES = ("sses", "shes", "ches", "xes", "zzes")


def singularize(word: str) -> str:
    """The singular of a lower-case English noun, by rule (only nouns matter for CHAIR).

    Order: short (<= 2 letters) or non-alphabetic words and :data:`NOT_PLURAL` unchanged;
    :data:`IRREGULAR_PLURALS`; :data:`IRREGULAR_SUFFIXES`; words ending in ``ss``/``us``/``is``
    unchanged (glass, grass, bus, tennis); ``-ies`` -> ``-y`` (``-ie`` for 4-letter words such as
    ties and for :data:`IES_TO_IE`); ``-lves`` -> ``-lf``; other ``-ves`` drop the ``s``
    (gloves, stoves); ``-sses/-shes/-ches/-xes/-zzes`` drop ``es``; ``-oes`` drop ``es`` for
    :data:`OES_TO_O`, else ``s``; other ``-s`` drop the ``s``.
    """
    if len(word) <= 2 or not word.isalpha() or word in NOT_PLURAL:
        return word
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    for suffix, replacement in IRREGULAR_SUFFIXES:
        if word.endswith(suffix):
            return word[: -len(suffix)] + replacement
    if word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies"):
        return word[:-1] if len(word) <= 4 or word in IES_TO_IE else word[:-3] + "y"
    if word.endswith("ves"):
        if word.endswith("lves") and word not in LVES_NOT_LF:
            return word[:-3] + "f"
        return word[:-1]
    if word.endswith(_SIBILANT_ES):
        return word[:-1] if word in CHES_TO_CHE else word[:-2]
    if word.endswith("oes"):
        return word[:-2] if word in OES_TO_O else word[:-1]
    if word.endswith("s"):
        return word[:-1]
    return word


# --------------------------------------------------------------------------- tokeniser

#: marks that are always tokens of their own (Treebank rules; "/" and "-" are not among them)
_ALWAYS_SPLIT = re.compile(r"""(\.\.\.|[;@#$%&?!()\[\]{}<>"`])""")
#: a comma or colon splits off unless a digit follows ("1,000" and "10:30" stay whole)
_COMMA_COLON = re.compile(r"([:,])(?!\d)")
#: clitics split from the end of a word: dog's -> dog 's, don't -> do n't
_CLITIC = re.compile(r"(?i)(\w)('s|'m|'d|'ll|'re|'ve|n't)$")


def tokenize(text: str) -> list[str]:
    """Treebank-style tokens of ``text`` (the official script calls ``nltk.word_tokenize``,
    whose sentence splitter needs data that cannot be shipped here; this follows its rules where
    they matter for CHAIR): punctuation and quotes are separate tokens, a word's final period
    is split off, clitics (``'s``, ``n't``...) are split, hyphens and slashes stay inside words.

    >>> tokenize("a hot-dog, the dog's ball.")
    ['a', 'hot-dog', ',', 'the', 'dog', "'s", 'ball', '.']
    """
    text = _COMMA_COLON.sub(r" \1 ", _ALWAYS_SPLIT.sub(r" \1 ", text))
    tokens: list[str] = []
    for chunk in text.split():
        tail: list[str] = []
        while len(chunk) > 1 and chunk[-1] in ".'":
            tail.insert(0, chunk[-1])
            chunk = chunk[:-1]
        if len(chunk) > 1 and chunk[0] == "'":
            tokens.append("'")
            chunk = chunk[1:]
        clitic = _CLITIC.search(chunk)
        if clitic is not None:
            tokens.extend([chunk[: clitic.start(2)], clitic.group(2)])
        else:
            tokens.append(chunk)
        tokens.extend(tail)
    return tokens


# --------------------------------------------------------------------------- vocabulary

#: the script's two-word COCO names, each mapped to itself (``stove top oven`` has three words and
#: can never match a two-token window; kept because the script lists it)
COCO_DOUBLE_WORDS: tuple[str, ...] = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "bow tie", "laptop computer", "stove top oven", "home plate", "train track",
)  # fmt: skip
#: ``baby X`` / ``adult X`` -> ``X`` for exactly these words (``animal`` and ``cub`` are no objects)
ANIMAL_WORDS: tuple[str, ...] = (
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub",
)  # fmt: skip
#: ``passenger X`` -> ``X``
VEHICLE_WORDS: tuple[str, ...] = ("jet", "train")


def double_words() -> dict[str, str]:
    """The script's double-word table: two-token window -> the word it is treated as."""
    table = {w: w for w in COCO_DOUBLE_WORDS}
    for animal in ANIMAL_WORDS:
        table[f"baby {animal}"] = animal
        table[f"adult {animal}"] = animal
    for vehicle in VEHICLE_WORDS:
        table[f"passenger {vehicle}"] = vehicle
    table["bow tie"] = "tie"
    table["toilet seat"] = "toilet"
    table["wine glas"] = "wine glass"
    return table


DOUBLE_WORDS: Mapping[str, str] = double_words()


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """A CHAIR protocol: the synonym table, the double-word rules and the singulariser."""

    #: canonical names in table order (80)
    objects: tuple[str, ...]
    #: every table entry as the table spells it -> canonical (the script's inverse synonym dict)
    synonyms: Mapping[str, str]
    #: two-token window -> the word it is treated as
    double_words: Mapping[str, str]
    #: token -> singular (or lemma)
    singularize: Callable[[str], str]

    def words(self, caption: str) -> list[str]:
        """Steps 1-4 of the module docstring: the caption's words after merging (all of them,
        not only objects; the script's ``double_words`` list)."""
        tokens = [self.singularize(t) for t in tokenize(caption.lower())]
        merged: list[str] = []
        i = 0
        while i < len(tokens):
            pair = " ".join(tokens[i : i + 2])
            if i + 1 < len(tokens) and pair in self.double_words:
                merged.append(self.double_words[pair])
                i += 2
            else:
                merged.append(tokens[i])
                i += 1
        if "toilet" in merged and "seat" in merged:
            merged = [w for w in merged if w != "seat"]
        return merged

    def mentions(self, caption: str) -> list[tuple[str, str]]:
        """``(word, canonical object)`` for every object word of ``caption``, in order."""
        return [(w, self.synonyms[w]) for w in self.words(caption) if w in self.synonyms]

    def canonical(self, name: str) -> str:
        """Canonical object of a category name or synonym (``"dog"``, ``"Puppies"`` -> ``"dog"``):
        the table entry itself, else the single object the name mentions as a caption."""
        key = name.strip().lower()
        if key in self.synonyms:
            return self.synonyms[key]
        found = {c for _, c in self.mentions(name)}
        if len(found) != 1:
            raise ValueError(f"{name!r} is not a COCO object or synonym")
        return found.pop()


def parse_synonyms(text: str, tidy: bool = False) -> list[list[str]]:
    """The table's lines as the script reads them: each line stripped, split on ``", "``, the
    entries kept as they are (a leading space or a capital stays). ``tidy``: entries stripped and
    lower-cased, empty ones dropped. Blank lines are skipped."""
    table = []
    for line in text.splitlines():
        if not line.strip():
            continue
        names = line.strip().split(", ")
        if tidy:
            names = [n.strip().lower() for n in names if n.strip()]
        table.append(names)
    return table


def build_vocabulary(table: Sequence[Sequence[str]], singularizer: Callable[[str], str] | None = None,
                     rules: Mapping[str, str] | None = None) -> Vocabulary:
    """A :class:`Vocabulary` from table lines (first entry canonical). An entry listed under two
    objects maps to the later one, as in the script; the canonical names must be distinct."""
    objects = tuple(names[0] for names in table)
    if len(set(objects)) != len(objects):
        raise ValueError("two lines of the synonym table share their canonical name")
    synonyms = {name: names[0] for names in table for name in names}
    return Vocabulary(objects, synonyms, dict(DOUBLE_WORDS if rules is None else rules),
                      singularizer or singularize)


def _table_text() -> str:
    return resources.files("innersight.eval").joinpath("data", "coco_synonyms.txt").read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def coco_vocabulary() -> Vocabulary:
    """The official CHAIR protocol (canonical variant)."""
    return build_vocabulary(parse_synonyms(_table_text()))


@lru_cache(maxsize=1)
def tidy_vocabulary() -> Vocabulary:
    """The ``tidy`` variant: the official rules, table entries stripped and lower-cased."""
    return build_vocabulary(parse_synonyms(_table_text(), tidy=True))


LEMMA_PACKAGE = "lemminflect"


def lemma_available() -> bool:
    """Whether the ``lemma`` variant's lemmatiser is installed."""
    import importlib.util

    return importlib.util.find_spec(LEMMA_PACKAGE) is not None


def noun_lemma(word: str) -> str:
    """lemminflect's first noun lemma of ``word`` (dictionary first, then its rules), or ``word``."""
    from lemminflect import getLemma

    if not word.isalpha():
        return word
    lemmas = getLemma(word, upos="NOUN")
    return lemmas[0] if lemmas else word


@lru_cache(maxsize=1)
def lemma_vocabulary() -> Vocabulary:
    """The ``lemma`` variant: the official table and rules, lemminflect noun lemmas."""
    if not lemma_available():
        raise ModuleNotFoundError("CHAIR variant 'lemma' needs lemminflect: pip install 'innersight[lemma]'")
    return build_vocabulary(parse_synonyms(_table_text()), singularizer=lru_cache(maxsize=65536)(noun_lemma))


#: variant -> (vocabulary factory, description)
VARIANTS: dict[str, tuple[Callable[[], Vocabulary], str]] = {
    "canonical": (coco_vocabulary, "official CHAIR script and synonym table, unedited (rule-based singulariser)"),
    "lemma": (lemma_vocabulary, "official table and rules, lemminflect noun lemmas instead of singularising "
                                "(the forks' lemmatiser variant; pip install 'innersight[lemma]')"),
    "tidy": (tidy_vocabulary, "official rules, table entries stripped and lower-cased (motor bike, cheesecake, "
                              "iphone count)"),
}


# --------------------------------------------------------------------------- caption -> objects


def extract_objects(caption: str, vocabulary: Vocabulary | None = None) -> list[str]:
    """Canonical COCO objects mentioned in ``caption``, in order, one entry per mention.

    ``"Two dogs and a hot dog."`` -> ``["dog", "hot dog"]``; ``"a baby elephant"`` ->
    ``["elephant"]``; ``"the seat of the toilet"`` -> ``["toilet"]``.
    """
    vocab = vocabulary or coco_vocabulary()
    return [canonical for _, canonical in vocab.mentions(caption)]


def ground_truth_objects(
    category_names: Iterable[str],
    reference_captions: Iterable[str] = (),
    vocabulary: Vocabulary | None = None,
) -> list[str]:
    """Sorted canonical ground truth of one image: its COCO instance categories (names or
    synonyms) united with the objects mentioned in its reference captions."""
    vocab = vocabulary or coco_vocabulary()
    objects = {vocab.canonical(name) for name in category_names}
    for caption in reference_captions:
        objects.update(extract_objects(caption, vocab))
    return sorted(objects)


# --------------------------------------------------------------------------- scorer


def score_caption(caption: str, gt_objects: Iterable[str], vocabulary: Vocabulary | None = None) -> Row:
    """Per-caption CHAIR counts. ``gt_objects``: names or synonyms of the image's objects."""
    vocab = vocabulary or coco_vocabulary()
    truth = {vocab.canonical(name) for name in gt_objects}
    mentions = extract_objects(caption, vocab)
    hallucinated = [m for m in mentions if m not in truth]
    covered = sorted(truth.intersection(mentions))
    return {
        "mentions": mentions,
        "hallucinated": hallucinated,
        "gt_objects": sorted(truth),
        "covered": covered,
        "n_mentions": len(mentions),
        "n_hallucinated": len(hallucinated),
        "n_gt": len(truth),
        "n_covered": len(covered),
        "n_words": len(caption.split()),
    }


def sample_truth(sample: Mapping[str, Any], vocabulary: Vocabulary) -> list[str]:
    """The sample's ground truth under ``vocabulary``: from ``coco_categories`` +
    ``reference_captions`` when it carries them, else ``gt_objects``."""
    if "coco_categories" in sample and "reference_captions" in sample:
        return ground_truth_objects(sample["coco_categories"], sample["reference_captions"], vocabulary)
    return list(sample["gt_objects"])


def _make_score_one(factory: Callable[[], Vocabulary]) -> Callable[[str, Mapping[str, Any]], Row]:
    def score_one(prediction: str, sample: Mapping[str, Any]) -> Row:
        """CHAIR counts of one generated caption against the sample's ground truth."""
        vocab = factory()
        return score_caption(prediction, sample_truth(sample, vocab), vocab)

    return score_one


score_one = _make_score_one(coco_vocabulary)


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``chair_i``, ``chair_s``, ``recall`` (x100), ``avg_len`` (words), ``n``."""
    require_rows(rows)
    n = len(rows)
    return {
        "chair_i": percent(sum(r["n_hallucinated"] for r in rows), sum(r["n_mentions"] for r in rows)),
        "chair_s": percent(sum(1 for r in rows if r["n_hallucinated"] > 0), n),
        "recall": percent(sum(r["n_covered"] for r in rows), sum(r["n_gt"] for r in rows)),
        "avg_len": sum(r["n_words"] for r in rows) / n,
        "n": n,
    }


HIGHER_IS_BETTER: dict[str, bool | None] = {
    "chair_i": False, "chair_s": False, "recall": True, "avg_len": None, "n": None,
}  # fmt: skip

SCORERS: tuple[Scorer, ...] = tuple(
    Scorer("chair", variant, HIGHER_IS_BETTER, _make_score_one(factory), aggregate, description,
           requires=(LEMMA_PACKAGE,) if variant == "lemma" else ())
    for variant, (factory, description) in VARIANTS.items()
)
