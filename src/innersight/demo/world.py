"""The procedural world the bundled micro model is trained on (torch-free: numpy + PIL).

A scene is a square canvas (larger than the model's input, so small details blur away when the
processor shrinks it) with a noisy, cluttered background and a handful of objects:

* **plain shapes** — circle, square, triangle, star, diamond, cross — in one of six named colours;
* **labelled shapes** — a circle, square or diamond with a digit or letter printed inside;
* **glyphs** — a coloured digit or letter on the background.

Glyphs come from the dot-matrix font in :data:`FONT` (5x7 cells, scaled nearest-neighbour) and
shapes are rasterised here with numpy, so a scene renders to the same pixels on every machine and
Pillow version. Everything is drawn from a ``numpy.random.Generator``: no global state.

Question families (:data:`FAMILIES`): ``read`` (the symbol in/of an object), ``colour``,
``exist`` (POPE-style yes/no), ``describe`` (CHAIR-style object list) and ``generic`` — the
"Write a general description of the image." prompt that ViCrop's rel-att divides by
(arXiv 2502.17422, Sec. 3). Each family has several templates.

The co-occurrence prior is explicit: in training scenes the two shape kinds of
:attr:`WorldConfig.cooccur_pair` appear together in :attr:`WorldConfig.cooccur_rate` of the
scenes that hold either, so a language prior exists for existence questions to hallucinate from;
:meth:`World.hallucination_samples` asks about the partner in scenes where it is absent.

Two-image samples (full scene, then a crop of it, same question) mirror how ViCrop feeds a crop
back as a second image after the original.

Boxes are ``(x0, y0, x1, y1)`` in canvas pixels with exclusive ends (``x1 = x0 + width``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache, lru_cache
from typing import Any

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]

# ---------------------------------------------------------------------------------------- font
#: 5x7 dot-matrix bitmaps ("#" = ink), rows top to bottom. Letters that look like digits in a
#: dot matrix (O, I, S, Z, B, G) and the article-like A are left out on purpose.
FONT: dict[str, tuple[str, ...]] = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
}
FONT_ROWS, FONT_COLS = 7, 5
DIGITS: tuple[str, ...] = tuple("0123456789")
LETTERS: tuple[str, ...] = tuple("EFHKLPTX")
SYMBOLS: tuple[str, ...] = DIGITS + LETTERS

# ------------------------------------------------------------------------------ objects, colours
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 40, 40),
    "green": (34, 150, 60),
    "blue": (40, 84, 222),
    "yellow": (238, 200, 24),
    "purple": (140, 56, 196),
    "orange": (246, 128, 20),
}
#: colours on which a printed symbol is black instead of white
LIGHT_COLOURS = frozenset({"yellow", "orange"})
INK_WHITE = (250, 250, 250)
INK_BLACK = (24, 24, 24)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
#: shapes that can carry a printed symbol, with the glyph height as a fraction of the shape side
LABEL_FRACTION: dict[str, float] = {"circle": 0.58, "square": 0.62, "diamond": 0.48}
GLYPH_KINDS: tuple[str, ...] = ("digit", "letter")
CATEGORIES: tuple[str, ...] = ("shape", "labelled", "glyph")
SIZE_CLASSES: tuple[str, ...] = ("tiny", "small", "medium", "large")
FAMILIES: tuple[str, ...] = ("read", "colour", "exist", "describe", "generic")
#: families whose answer is one word (these also come as two-image samples)
SHORT_FAMILIES: tuple[str, ...] = ("read", "colour", "exist")

# ----------------------------------------------------------------------------------- templates
READ_LABELLED: tuple[str, ...] = (
    "What is the {cls} in the {colour} {kind}?",
    "Which {cls} is written in the {colour} {kind}?",
    "What {cls} is shown inside the {colour} {kind}?",
    "Read the symbol in the {colour} {kind}.",
    "What symbol is on the {colour} {kind}?",
)
READ_GLYPH: tuple[str, ...] = (
    "What is the {colour} {cls}?",
    "Which {cls} is {colour}?",
    "Read the {colour} {cls}.",
    "What {cls} is drawn in {colour}?",
    "Which {colour} {cls} is in the image?",
)
COLOUR_TEMPLATES: tuple[str, ...] = (
    "What colour is the {ref}?",
    "What color is the {ref}?",
    "What is the colour of the {ref}?",
    "Which color does the {ref} have?",
    "Tell me the colour of the {ref}.",
)
EXIST_TEMPLATES: tuple[str, ...] = (
    "Is there a {kind} in the image?",
    "Is there a {kind} in the picture?",
    "Does the image contain a {kind}?",
    "Can you see a {kind} in this image?",
    "Is a {kind} present in the image?",
)
DESCRIBE_TEMPLATES: tuple[str, ...] = (
    "Describe the objects in the image.",
    "List the objects in the image.",
    "What objects are in this picture?",
    "Please describe this image in detail.",
    "Describe this image briefly.",
)
#: the first one is ViCrop's generic instruction, verbatim; it is drawn most of the time
GENERIC_TEMPLATES: tuple[str, ...] = (
    "Write a general description of the image.",
    "Give a general description of the image.",
    "Describe the image in general.",
)
GENERIC_PROMPT = GENERIC_TEMPLATES[0]
#: the short-answer suffix of the ViCrop / LLaVA-1.5 evaluation prompts
SHORT_ANSWER_SUFFIX = " Answer the question using a single word or phrase."


def _default_glyph_sizes() -> dict[str, tuple[int, int]]:
    return {"tiny": (8, 10), "small": (13, 17), "medium": (22, 30), "large": (40, 52)}


def _default_shape_sizes() -> dict[str, tuple[int, int]]:
    return {"tiny": (9, 12), "small": (15, 20), "medium": (26, 36), "large": (46, 62)}


@dataclass(frozen=True)
class WorldConfig:
    """Everything that shapes the world's distribution.

    Size classes refer to an object's *detail size*: the glyph height (pixels) for glyphs and
    labelled shapes, the side for plain shapes. With the default 192 px canvas and a 64 px model
    input, the processor shrinks everything 3x, so ``small`` glyphs (13-17 px) become 4-6 px —
    hard to read — while a 64 px crop around them shows them at full resolution; ``large``
    glyphs (40-52 px) stay 13-17 px tall in the full view.
    """

    canvas: int = 192
    min_objects: int = 3
    max_objects: int = 6
    glyph_sizes: Mapping[str, tuple[int, int]] = field(default_factory=_default_glyph_sizes)
    shape_sizes: Mapping[str, tuple[int, int]] = field(default_factory=_default_shape_sizes)
    #: size-class weights of the objects that fill a scene around the target
    fill_size_weights: tuple[float, ...] = (0.25, 0.3, 0.3, 0.15)
    #: size-class weights of question targets in training
    target_size_weights: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)
    #: weights of the object categories ``shape``, ``labelled``, ``glyph`` among fill objects
    category_weights: tuple[float, ...] = (0.4, 0.35, 0.25)
    cooccur_pair: tuple[str, str] = ("triangle", "star")
    #: P(both kinds present | at least one present) in training scenes
    cooccur_rate: float = 0.9
    #: P(a training scene holds the pair group at all), when no target forces it
    pair_prob: float = 0.35
    family_weights: Mapping[str, float] = field(
        default_factory=lambda: {"read": 0.36, "colour": 0.14, "exist": 0.2, "describe": 0.14, "generic": 0.16}
    )
    #: probability that a generic sample uses :data:`GENERIC_PROMPT` rather than a variant
    generic_canonical_prob: float = 0.7
    #: probability of appending :data:`SHORT_ANSWER_SUFFIX` to a question
    suffix_prob: float = 0.25
    #: side range, in canvas pixels, of the crops of two-image samples
    crop_sides: tuple[int, int] = (48, 128)
    #: probability that a two-image crop is centred (with jitter) on the target
    crop_target_prob: float = 0.55
    #: probability that a crop *not* centred on the target is centred on another object instead
    #: (else anywhere): the crops a misled attention map picks, which the answer must see past
    crop_distractor_prob: float = 0.5
    #: probability that the second image is the whole canvas again (ViCrop's no-crop case)
    crop_full_prob: float = 0.08
    noise: int = 9
    margin: int = 3

    def __post_init__(self) -> None:
        if len(self.cooccur_pair) != 2 or self.cooccur_pair[0] == self.cooccur_pair[1]:
            raise ValueError("cooccur_pair must name two different shape kinds")
        for k in self.cooccur_pair:
            if k not in SHAPES or k in LABEL_FRACTION:
                raise ValueError(f"co-occurring kinds must be plain shapes without labels, not {k!r}")
        probabilities = ("cooccur_rate", "pair_prob", "crop_target_prob", "crop_distractor_prob", "crop_full_prob")
        for name in probabilities:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability, got {getattr(self, name)!r}")
        if set(self.family_weights) - set(FAMILIES):
            raise ValueError(f"unknown families in family_weights: {set(self.family_weights) - set(FAMILIES)}")
        if self.min_objects < 1 or self.max_objects < self.min_objects:
            raise ValueError("need 1 <= min_objects <= max_objects")
        for sizes in (self.glyph_sizes, self.shape_sizes):
            if tuple(sizes) != SIZE_CLASSES:
                raise ValueError(f"size ranges must be given for {SIZE_CLASSES} in that order")
        largest = max(self.glyph_sizes["large"][1] / min(LABEL_FRACTION.values()), self.shape_sizes["large"][1])
        if largest + 2 * self.margin > self.canvas:
            raise ValueError(f"a large object ({largest:.0f} px) does not fit on a {self.canvas} px canvas")


# -------------------------------------------------------------------------------- scene model
@dataclass(frozen=True)
class SceneObject:
    """One object of a scene.

    ``kind`` is a shape name for shapes and ``"digit"``/``"letter"`` for glyphs; ``symbol`` the
    printed character (labelled shapes and glyphs) or ``None``; ``glyph_box`` where the symbol's
    dot matrix sits; ``size_px`` the detail size (glyph height, or shape side).
    """

    kind: str
    colour: str
    symbol: str | None
    box: Box
    glyph_box: Box | None
    size_px: int
    size_class: str

    @property
    def category(self) -> str:
        """``shape``, ``labelled`` or ``glyph``."""
        if self.kind in GLYPH_KINDS:
            return "glyph"
        return "labelled" if self.symbol is not None else "shape"

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2.0, (y0 + y1) / 2.0

    @property
    def answer_symbol(self) -> str:
        """The symbol as the model answers it (lower case)."""
        if self.symbol is None:
            raise ValueError(f"a plain {self.kind} carries no symbol")
        return self.symbol.lower()

    def phrase(self) -> str:
        """How descriptions name the object: ``a red circle with 7``, ``an orange digit 3``."""
        article = "an" if self.colour[0] in "aeiou" else "a"
        if self.category == "glyph":
            return f"{article} {self.colour} {self.kind} {self.answer_symbol}"
        if self.category == "labelled":
            return f"{article} {self.colour} {self.kind} with {self.answer_symbol}"
        return f"{article} {self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """A canvas description; :meth:`render` turns it into pixels deterministically."""

    size: int
    background: tuple[int, int, int]
    clutter_seed: int
    objects: tuple[SceneObject, ...]
    noise: int = 9

    def kinds(self) -> set[str]:
        """Kinds present (shape names, ``digit``, ``letter``)."""
        return {o.kind for o in self.objects}

    def describe(self) -> str:
        """The ground-truth object list, largest objects first (ties: left to right)."""
        order = sorted(self.objects, key=lambda o: (-_area(o.box), o.box[0], o.box[1]))
        return join_phrases([o.phrase() for o in order])

    def render(self) -> Image.Image:
        """Draw the scene (RGB, ``size`` x ``size``)."""
        canvas = _background(self.size, self.background, self.clutter_seed, self.noise)  # [H, W, 3] float
        for obj in self.objects:
            _draw_object(canvas, obj)
        return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")


@dataclass(frozen=True)
class Sample:
    """One question about one scene.

    ``image`` is the full canvas; ``extra_images`` holds the second image of two-image samples
    (a crop of the canvas). ``meta`` holds at least ``scene`` (:class:`Scene`), ``box`` (the
    target's box or ``None``), ``size_class``, ``size_px``, ``template`` (index) and ``suffix``;
    two-image samples add ``crop_box`` and ``crop_has_target``.
    """

    image: Image.Image
    question: str
    answer: str
    family: str
    meta: dict[str, Any]
    extra_images: tuple[Image.Image, ...] = ()

    @property
    def images(self) -> tuple[Image.Image, ...]:
        """All images in prompt order (original first)."""
        return (self.image, *self.extra_images)


def join_phrases(phrases: Sequence[str]) -> str:
    """``a, b and c`` (the description format)."""
    if not phrases:
        return "nothing"
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


_PHRASE = re.compile(
    r"^(?:a |an )?(?P<colour>\w+) (?P<kind>\w+)(?: with (?P<label>\w)| (?P<glyph>\w))?$"
)


def parse_description(text: str) -> list[tuple[str, str, str | None]]:
    """Parse a description back into ``(colour, kind, symbol)`` triples (symbol lower case).

    Unparseable fragments are skipped; a fragment naming an unknown colour or kind is kept as
    written (so a CHAIR-style scorer can count it as a hallucination if it wants).
    """
    text = text.strip().lower().rstrip(".")
    out: list[tuple[str, str, str | None]] = []
    for part in re.split(r",| and ", text):
        m = _PHRASE.match(part.strip())
        if m is None:
            continue
        symbol = m.group("label") or m.group("glyph")
        out.append((m.group("colour"), m.group("kind"), symbol))
    return out


def _area(box: Box) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def _overlaps(a: Box, b: Box, margin: int) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def square_box(centre: tuple[float, float], side: int, canvas: int) -> Box:
    """A square of ``side`` around ``centre``, shifted to lie inside a ``canvas`` square."""
    side = int(min(max(side, 1), canvas))
    x0 = int(round(centre[0] - side / 2.0))
    y0 = int(round(centre[1] - side / 2.0))
    x0 = min(max(x0, 0), canvas - side)
    y0 = min(max(y0, 0), canvas - side)
    return (x0, y0, x0 + side, y0 + side)


def box_contains(outer: Box, inner: Box) -> bool:
    """Whether ``inner`` lies entirely inside ``outer``."""
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


# ----------------------------------------------------------------------------------- rasterising
@cache
def _font_array(symbol: str) -> np.ndarray:
    rows = FONT[symbol]
    return np.array([[c == "#" for c in row] for row in rows], dtype=bool)  # [7, 5]


def glyph_width(height: int) -> int:
    """Width of a glyph of ``height`` pixels (5:7 aspect, at least 3 px)."""
    return max(3, int(round(height * FONT_COLS / FONT_ROWS)))


def glyph_mask(symbol: str, height: int, width: int | None = None) -> np.ndarray:
    """The dot matrix of ``symbol`` scaled nearest-neighbour to ``height`` x ``width``: bool [h, w].

    Pixel ``(y, x)`` takes the font cell ``(floor((y + .5) * 7 / h), floor((x + .5) * 5 / w))``.
    """
    if symbol not in FONT:
        raise KeyError(f"no bitmap for {symbol!r}; known: {''.join(SYMBOLS)}")
    width = glyph_width(height) if width is None else width
    rows = np.minimum(((np.arange(height) + 0.5) * FONT_ROWS / height).astype(int), FONT_ROWS - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * FONT_COLS / width).astype(int), FONT_COLS - 1)
    return _font_array(symbol)[rows][:, cols]


def _star_vertices(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    verts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    # centre the star vertically in [-1, 1]
    verts[:, 1] += (-1.0 - verts[:, 1].min() + 1.0 - verts[:, 1].max()) / 2.0
    return verts


_TRIANGLE = np.array([[0.0, -0.95], [0.98, 0.9], [-0.98, 0.9]])
_STAR = _star_vertices()


def _polygon(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test for arrays of points ``(u, v)``."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(verts)
    for i in range(n):
        xi, yi = verts[i]
        xj, yj = verts[(i + 1) % n]
        if yi == yj:
            continue
        crosses = (yi > v) != (yj > v)
        x_at = (xj - xi) * (v - yi) / (yj - yi) + xi
        inside ^= crosses & (u < x_at)
    return inside


def shape_coverage(kind: str, side: int, supersample: int = 4) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of ``kind`` drawn in a ``side`` x ``side`` box: [side, side]."""
    ss = supersample
    t = (np.arange(side * ss) + 0.5) / (side * ss) * 2.0 - 1.0  # sample centres in [-1, 1]
    v, u = np.meshgrid(t, t, indexing="ij")  # [S, S]
    if kind == "circle":
        inside = u * u + v * v <= 1.0
    elif kind == "square":
        inside = (np.abs(u) <= 0.92) & (np.abs(v) <= 0.92)
    elif kind == "diamond":
        inside = np.abs(u) + np.abs(v) <= 1.0
    elif kind == "cross":
        inside = ((np.abs(u) <= 0.34) & (np.abs(v) <= 0.96)) | ((np.abs(v) <= 0.34) & (np.abs(u) <= 0.96))
    elif kind == "triangle":
        inside = _polygon(u, v, _TRIANGLE)
    elif kind == "star":
        inside = _polygon(u, v, _STAR)
    else:
        raise KeyError(f"unknown shape {kind!r}; known: {', '.join(SHAPES)}")
    return inside.reshape(side, ss, side, ss).mean(axis=(1, 3)).astype(np.float32)


_coverage_cache = lru_cache(maxsize=4096)(shape_coverage)


def _blend(canvas: np.ndarray, box: Box, alpha: np.ndarray, colour: Sequence[float] | np.ndarray) -> None:
    """Alpha-blend ``colour`` into ``canvas[box]`` (in place) with coverage ``alpha`` [h, w]."""
    x0, y0, x1, y1 = box
    region = canvas[y0:y1, x0:x1]  # [h, w, 3] view
    a = alpha[..., None].astype(np.float32, copy=False)
    region *= np.float32(1.0) - a
    region += a * np.asarray(colour, dtype=np.float32)


def _draw_object(canvas: np.ndarray, obj: SceneObject) -> None:
    colour = COLOURS[obj.colour]
    if obj.category == "glyph":
        assert obj.glyph_box is not None and obj.symbol is not None
        gx0, gy0, gx1, gy1 = obj.glyph_box
        mask = glyph_mask(obj.symbol, gy1 - gy0, gx1 - gx0).astype(np.float32)
        _blend(canvas, obj.glyph_box, mask, colour)
        return
    side = obj.box[2] - obj.box[0]
    _blend(canvas, obj.box, _coverage_cache(obj.kind, side), colour)
    if obj.symbol is not None:
        assert obj.glyph_box is not None
        gx0, gy0, gx1, gy1 = obj.glyph_box
        mask = glyph_mask(obj.symbol, gy1 - gy0, gx1 - gx0).astype(np.float32)
        ink = INK_BLACK if obj.colour in LIGHT_COLOURS else INK_WHITE
        _blend(canvas, obj.glyph_box, mask, ink)


def _line_pixels(p0: np.ndarray, p1: np.ndarray, width: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel rows and columns of a straight line ``width`` pixels wide (clipped to the canvas)."""
    n = int(np.ceil(np.abs(p1 - p0).max())) * 2 + 2
    t = np.linspace(0.0, 1.0, n)[:, None]
    pts = np.rint(p0 + t * (p1 - p0)).astype(np.int64)  # [n, 2] (x, y)
    xs = np.concatenate([pts[:, 0] + dx for dx in range(width)])
    ys = np.concatenate([pts[:, 1]] * width)
    return np.minimum(np.maximum(ys, 0), size - 1), np.minimum(np.maximum(xs, 0), size - 1)


@lru_cache(maxsize=8)
def _ramp(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(max(size - 1, 1)) - np.float32(0.5)
    return yy, xx  # [H, W] each, in [-0.5, 0.5]


_NOISE_BANK = 384


@lru_cache(maxsize=8)
def _noise_bank(noise: int) -> np.ndarray:
    """A fixed field of integer pixel noise that renders cut windows from: [N, N, 3] float32."""
    rng = np.random.default_rng(20250221)
    return rng.integers(-noise, noise + 1, size=(_NOISE_BANK, _NOISE_BANK, 3)).astype(np.float32)


def _background(size: int, base: tuple[int, int, int], seed: int, noise: int) -> np.ndarray:
    """Neutral base tone, a gentle gradient, muted patches, grey lines, speckles and pixel noise."""
    rng = np.random.default_rng(seed)
    base_arr = np.asarray(base, dtype=np.float32)
    # gradient
    angle = rng.uniform(0, 2 * np.pi)
    amp = rng.uniform(4, 14)
    yy, xx = _ramp(size)
    ramp = np.float32(amp * np.cos(angle)) * xx + np.float32(amp * np.sin(angle)) * yy  # [H, W]
    canvas = ramp[..., None] + base_arr  # [H, W, 3] float32
    # muted patches (ellipses and rectangles), low alpha, desaturated
    for _ in range(int(rng.integers(2, 6))):
        w, h = (int(v) for v in rng.integers(10, max(11, size // 3), size=2))
        x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        shift = rng.uniform(15, 40) * rng.choice([-1.0, 1.0]) + rng.uniform(-8, 8, size=3)
        if rng.random() < 0.5:
            t_y = (np.arange(h, dtype=np.float32) + 0.5) / h * 2 - 1
            t_x = (np.arange(w, dtype=np.float32) + 0.5) / w * 2 - 1
            alpha = (t_y[:, None] ** 2 + t_x[None, :] ** 2 <= 1.0).astype(np.float32) * np.float32(0.45)
        else:
            alpha = np.full((h, w), 0.35, dtype=np.float32)
        _blend(canvas, (x0, y0, x0 + w, y0 + h), alpha, base_arr + shift)
    # thin grey lines
    mean = float(base_arr.mean())
    for _ in range(int(rng.integers(3, 9))):
        p0, p1 = rng.uniform(0, size - 1, size=2), rng.uniform(0, size - 1, size=2)
        grey = mean + rng.uniform(25, 60) * rng.choice([-1.0, 1.0])
        ys, xs = _line_pixels(p0, p1, int(rng.integers(1, 3)), size)
        canvas[ys, xs] = grey
    # speckles (2x2 dots)
    count = int(rng.integers(20, 60))
    ys, xs = rng.integers(0, size - 1, size=count), rng.integers(0, size - 1, size=count)
    greys = (mean + rng.uniform(-50, 50, size=count)).astype(np.float32)[:, None]
    for dy in (0, 1):
        for dx in (0, 1):
            canvas[ys + dy, xs + dx] = greys
    # pixel noise: a window of a fixed noise field, at a random offset
    if noise > 0:
        ox, oy = (int(v) for v in rng.integers(0, _NOISE_BANK - size + 1, size=2)) if size <= _NOISE_BANK else (0, 0)
        bank = _noise_bank(noise)
        if size <= _NOISE_BANK:
            canvas += bank[oy : oy + size, ox : ox + size]
        else:
            canvas += np.tile(bank, (size // _NOISE_BANK + 1, size // _NOISE_BANK + 1, 1))[:size, :size]
    return canvas


# ------------------------------------------------------------------------------- scene planning
@dataclass
class _Plan:
    kind: str
    colour: str
    symbol: str | None
    size_class: str
    size_px: int
    mandatory: bool = False


@dataclass(frozen=True)
class TargetSpec:
    """Constraints on a question's target object."""

    categories: tuple[str, ...]
    size_class: str
    unique_kind: bool = False


class World:
    """Scenes, questions and training batches, all deterministic given a generator or seed."""

    def __init__(self, config: WorldConfig | None = None):
        self.config = config or WorldConfig()

    # ------------------------------------------------------------------ objects
    def _size(self, rng: np.random.Generator, category: str, size_class: str) -> int:
        table = self.config.shape_sizes if category == "shape" else self.config.glyph_sizes
        lo, hi = table[size_class]
        return int(rng.integers(lo, hi + 1))

    def _new_plan(
        self,
        rng: np.random.Generator,
        category: str,
        size_class: str,
        taken: set[tuple[str, str]],
        symbols: set[str],
        *,
        kind: str | None = None,
        forbid: frozenset[str] = frozenset(),
    ) -> _Plan | None:
        if kind is None:
            if category == "shape":
                pool = [k for k in SHAPES if k not in forbid]
            elif category == "labelled":
                pool = [k for k in LABEL_FRACTION if k not in forbid]
            else:
                pool = list(GLYPH_KINDS)
            if not pool:
                return None
            kind = str(rng.choice(pool))
        colours = [c for c in COLOURS if (c, kind) not in taken]
        if not colours:
            return None
        colour = str(rng.choice(colours))
        symbol: str | None = None
        if category != "shape":
            if category == "glyph":
                pool_s = [s for s in (DIGITS if kind == "digit" else LETTERS) if s not in symbols]
            else:
                pool_s = [s for s in SYMBOLS if s not in symbols]
            if not pool_s:
                return None
            symbol = str(rng.choice(pool_s))
        taken.add((colour, kind))
        if symbol is not None:
            symbols.add(symbol)
        return _Plan(kind, colour, symbol, size_class, self._size(rng, category, size_class))

    def _plans(self, rng: np.random.Generator, want: TargetSpec | None, pair_mode: str) -> list[_Plan]:
        cfg = self.config
        a, b = cfg.cooccur_pair
        taken: set[tuple[str, str]] = set()
        symbols: set[str] = set()
        plans: list[_Plan] = []
        forbid: set[str] = set()
        if want is not None:
            category = str(rng.choice(list(want.categories)))
            # outside the training prior the target never is one of the pair
            no_pair = frozenset() if pair_mode == "prior" else frozenset({a, b})
            plan = self._new_plan(rng, category, want.size_class, taken, symbols, forbid=no_pair)
            assert plan is not None
            plan.mandatory = True
            plans.append(plan)
            if want.unique_kind and category != "glyph":
                forbid.add(plan.kind)
        present = {p.kind for p in plans}
        # the co-occurring pair: P(both | either) = cooccur_rate in "prior" mode
        pair_kinds: list[str] = []
        if pair_mode == "prior":
            if present & {a, b}:
                other = b if a in present else a
                if rng.random() < cfg.cooccur_rate:
                    pair_kinds.append(other)
            elif rng.random() < cfg.pair_prob:
                pair_kinds.extend([a, b] if rng.random() < cfg.cooccur_rate else [str(rng.choice([a, b]))])
        elif pair_mode == "split":
            pair_kinds.append(str(rng.choice([a, b])))
        elif pair_mode != "none":
            raise ValueError(f"unknown pair mode {pair_mode!r}")
        for kind in pair_kinds:
            size_class = SIZE_CLASSES[int(rng.choice(len(SIZE_CLASSES), p=_norm(cfg.fill_size_weights)))]
            plan = self._new_plan(rng, "shape", size_class, taken, symbols, kind=kind)
            assert plan is not None
            plan.mandatory = True
            plans.append(plan)
        # fill objects never use the pair kinds: the pair's statistics are set above only
        fill_forbid = frozenset(forbid | {a, b})
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        tries = 0
        while len(plans) < n and tries < 4 * n:
            tries += 1
            category = CATEGORIES[int(rng.choice(len(CATEGORIES), p=_norm(cfg.category_weights)))]
            size_class = SIZE_CLASSES[int(rng.choice(len(SIZE_CLASSES), p=_norm(cfg.fill_size_weights)))]
            plan = self._new_plan(rng, category, size_class, taken, symbols, forbid=fill_forbid)
            if plan is not None:
                plans.append(plan)
        return plans

    def _place(self, rng: np.random.Generator, plans: list[_Plan]) -> list[SceneObject] | None:
        cfg = self.config
        size, margin = cfg.canvas, cfg.margin
        placed: list[tuple[_Plan, SceneObject]] = []
        boxes: list[Box] = []

        def footprint(p: _Plan) -> tuple[int, int]:
            if p.kind in GLYPH_KINDS:
                return glyph_width(p.size_px), p.size_px
            if p.symbol is not None:
                side = int(np.ceil(p.size_px / LABEL_FRACTION[p.kind]))
                return side, side
            return p.size_px, p.size_px

        order = sorted(range(len(plans)), key=lambda i: -footprint(plans[i])[0] * footprint(plans[i])[1])
        for i in order:
            p = plans[i]
            w, h = footprint(p)
            for _ in range(80):
                x0 = int(rng.integers(margin, size - margin - w + 1))
                y0 = int(rng.integers(margin, size - margin - h + 1))
                box = (x0, y0, x0 + w, y0 + h)
                if not any(_overlaps(box, other, margin) for other in boxes):
                    break
            else:
                if p.mandatory:
                    return None
                continue
            glyph_box: Box | None = None
            if p.kind in GLYPH_KINDS:
                glyph_box = box
            elif p.symbol is not None:
                gh = p.size_px
                gw = glyph_width(gh)
                gx0 = x0 + (w - gw) // 2
                gy0 = y0 + (h - gh) // 2
                glyph_box = (gx0, gy0, gx0 + gw, gy0 + gh)
            boxes.append(box)
            placed.append((i, SceneObject(p.kind, p.colour, p.symbol, box, glyph_box, p.size_px, p.size_class)))
        # plan order (the target, if any, is plan 0): stable and easy to find
        placed.sort(key=lambda t: t[0])
        return [o for _, o in placed]

    def scene(
        self,
        rng: np.random.Generator,
        *,
        want: TargetSpec | None = None,
        pair_mode: str = "prior",
    ) -> Scene:
        """Draw a scene. With ``want`` its first object is the question target that satisfies it.

        ``pair_mode``: ``prior`` (the training co-occurrence), ``split`` (exactly one of the pair
        present, the other absent) or ``none`` (neither of them).
        """
        cfg = self.config
        for _ in range(50):
            plans = self._plans(rng, want, pair_mode)
            objects = self._place(rng, plans)
            if objects is None:
                continue
            tint = rng.integers(-10, 11, size=3)
            grey = int(rng.integers(168, 218))
            background = tuple(int(v) for v in np.clip(grey + tint, 0, 255))
            return Scene(cfg.canvas, background, int(rng.integers(0, 2**31 - 1)), tuple(objects), cfg.noise)  # type: ignore[arg-type]
        raise RuntimeError("could not place the objects of a scene in 50 attempts; the canvas is too crowded")

    # ------------------------------------------------------------------ questions
    def _template(self, rng: np.random.Generator, templates: Sequence[str]) -> tuple[int, str]:
        i = int(rng.integers(len(templates)))
        return i, templates[i]

    def sample(
        self,
        rng: np.random.Generator,
        family: str,
        *,
        size_class: str | None = None,
        two_image: bool = False,
        suffix: bool | None = None,
        answer: str | None = None,
        pair_mode: str = "prior",
    ) -> Sample:
        """One question of ``family`` about a fresh scene.

        ``size_class`` fixes the target's size class (drawn from the training weights when
        ``None``); ``two_image`` adds a crop as a second image; ``suffix`` appends
        :data:`SHORT_ANSWER_SUFFIX` (drawn when ``None``); ``answer`` (``"yes"``/``"no"``) fixes
        the answer of an ``exist`` question.
        """
        cfg = self.config
        if family not in FAMILIES:
            raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
        if size_class is None:
            size_class = SIZE_CLASSES[int(rng.choice(len(SIZE_CLASSES), p=_norm(cfg.target_size_weights)))]
        if size_class not in SIZE_CLASSES:
            raise KeyError(f"unknown size class {size_class!r}")
        use_suffix = bool(rng.random() < cfg.suffix_prob) if suffix is None else suffix
        meta: dict[str, Any] = {"size_class": None, "size_px": None, "box": None, "target": None}
        target: SceneObject | None = None
        if family == "read":
            scene = self.scene(rng, want=TargetSpec(("labelled", "glyph"), size_class), pair_mode=pair_mode)
            target = scene.objects[0]
            assert target.symbol is not None
            cls = "digit" if target.symbol in DIGITS else "letter"
            if target.category == "labelled":
                t, tmpl = self._template(rng, READ_LABELLED)
                question = tmpl.format(cls=cls, colour=target.colour, kind=target.kind)
            else:
                t, tmpl = self._template(rng, READ_GLYPH)
                question = tmpl.format(cls=cls, colour=target.colour)
            answer_text = target.answer_symbol
        elif family == "colour":
            scene = self.scene(rng, want=TargetSpec(CATEGORIES, size_class, unique_kind=True), pair_mode=pair_mode)
            target = scene.objects[0]
            if target.category == "glyph":
                ref = f"{target.kind} {target.answer_symbol}"
            elif sum(o.kind == target.kind for o in scene.objects) == 1:
                ref = target.kind
            else:
                ref = f"{target.kind} with the {target.answer_symbol}"
            t, tmpl = self._template(rng, COLOUR_TEMPLATES)
            question = tmpl.format(ref=ref)
            answer_text = target.colour
        elif family == "exist":
            if answer not in (None, "yes", "no"):
                raise ValueError("answer must be 'yes' or 'no'")
            yes = bool(rng.random() < 0.5) if answer is None else answer == "yes"
            if yes:
                scene = self.scene(rng, want=TargetSpec(("shape", "labelled"), size_class), pair_mode=pair_mode)
                target = scene.objects[0]
                kind = target.kind
            else:
                # an ordinary scene, then a kind it lacks: the scene statistics stay the prior's
                for _ in range(100):
                    scene = self.scene(rng, pair_mode=pair_mode)
                    absent = [k for k in SHAPES if k not in scene.kinds()]
                    if absent:
                        break
                else:
                    raise RuntimeError("every scene holds every shape; lower max_objects")
                kind = str(rng.choice(absent))
            t, tmpl = self._template(rng, EXIST_TEMPLATES)
            question = tmpl.format(kind=kind)
            answer_text = "yes" if yes else "no"
            meta["kind"] = kind
        elif family == "describe":
            scene = self.scene(rng, pair_mode=pair_mode)
            t, question = self._template(rng, DESCRIBE_TEMPLATES)
            answer_text = scene.describe()
        else:  # generic
            scene = self.scene(rng, pair_mode=pair_mode)
            if rng.random() < cfg.generic_canonical_prob:
                t, question = 0, GENERIC_PROMPT
            else:
                t, question = self._template(rng, GENERIC_TEMPLATES)
            answer_text = scene.describe()
        if use_suffix:
            question += SHORT_ANSWER_SUFFIX
        meta.update(scene=scene, template=t, suffix=use_suffix)
        if target is not None:
            meta.update(size_class=target.size_class, size_px=target.size_px, box=target.box, target=0)
        sample = Sample(scene.render(), question, answer_text, family, meta)
        if two_image:
            others = [o.box for o in scene.objects if o.box != meta["box"]]
            sample = add_crop(sample, self._crop_box(rng, meta["box"], others))
        return sample

    def _crop_box(self, rng: np.random.Generator, target: Box | None, others: Sequence[Box] = ()) -> Box:
        cfg = self.config
        size = cfg.canvas
        if rng.random() < cfg.crop_full_prob:
            return (0, 0, size, size)
        side = int(rng.integers(cfg.crop_sides[0], min(cfg.crop_sides[1], size) + 1))
        centre_on = None
        if target is not None and rng.random() < cfg.crop_target_prob:
            centre_on = target
        elif others and cfg.crop_distractor_prob > 0 and rng.random() < cfg.crop_distractor_prob:
            centre_on = others[int(rng.integers(len(others)))]
        if centre_on is not None:
            cx = (centre_on[0] + centre_on[2]) / 2.0 + rng.uniform(-0.3, 0.3) * side
            cy = (centre_on[1] + centre_on[3]) / 2.0 + rng.uniform(-0.3, 0.3) * side
            return square_box((cx, cy), side, size)
        return square_box((rng.uniform(0, size), rng.uniform(0, size)), side, size)

    def training_sample(self, rng: np.random.Generator, *, two_image: bool = False) -> Sample:
        """A sample of the training mixture (families by :attr:`WorldConfig.family_weights`).

        Two-image samples are drawn from the short-answer families only.
        """
        weights = self.config.family_weights
        families = [f for f in FAMILIES if weights.get(f, 0.0) > 0 and (not two_image or f in SHORT_FAMILIES)]
        p = _norm([weights[f] for f in families])
        family = families[int(rng.choice(len(families), p=p))]
        return self.sample(rng, family, two_image=two_image)

    def batch(self, seed: int, step: int, batch_size: int, *, two_image: bool = False) -> list[Sample]:
        """The training batch of ``step``: a pure function of ``(seed, step)``."""
        rng = np.random.default_rng([seed, step, 1 if two_image else 0])
        return [self.training_sample(rng, two_image=two_image) for _ in range(batch_size)]

    # ------------------------------------------------------------------ evaluation sets
    def eval_samples(
        self,
        family: str,
        n: int,
        seed: int,
        *,
        size_class: str | None = None,
        suffix: bool = False,
        crop_side: int | None = None,
    ) -> list[Sample]:
        """``n`` held-out samples of one family (use a seed never used for training).

        ``exist`` samples alternate yes/no. ``crop_side`` adds an oracle crop: a square of that
        side centred on the target (samples without a target get a centred crop).
        """
        rng = np.random.default_rng([seed, FAMILIES.index(family), SIZE_CLASSES.index(size_class) + 1 if size_class else 0])
        out = []
        for i in range(n):
            answer = ("yes" if i % 2 == 0 else "no") if family == "exist" else None
            s = self.sample(rng, family, size_class=size_class, suffix=suffix, answer=answer)
            if crop_side is not None:
                box = s.meta["box"]
                c = self.config.canvas
                centre = ((box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0) if box else (c / 2.0, c / 2.0)
                s = add_crop(s, square_box(centre, crop_side, c))
            out.append(s)
        return out

    def hallucination_samples(self, n: int, seed: int, *, suffix: bool = False) -> list[Sample]:
        """Existence questions about the co-occurrence partner in scenes where it is absent.

        Exactly one kind of :attr:`WorldConfig.cooccur_pair` is present (``meta['anchor']``) and
        the question asks about the other (``meta['kind']``); the answer is always ``no``. The
        rate of ``yes`` answers measures prior-driven hallucination.
        """
        a, b = self.config.cooccur_pair
        rng = np.random.default_rng([seed, 7919])
        out = []
        for _ in range(n):
            scene = self.scene(rng, pair_mode="split")
            kinds = scene.kinds()
            anchor = a if a in kinds else b
            absent = b if anchor == a else a
            t, tmpl = self._template(rng, EXIST_TEMPLATES)
            q = tmpl.format(kind=absent) + (SHORT_ANSWER_SUFFIX if suffix else "")
            meta = {"scene": scene, "box": None, "size_class": None, "size_px": None, "target": None,
                    "template": t, "suffix": suffix, "kind": absent, "anchor": anchor}
            out.append(Sample(scene.render(), q, "no", "exist", meta))
        return out

    def pope_samples(self, n: int, seed: int, mode: str = "random", *, suffix: bool = False) -> list[Sample]:
        """POPE-style existence questions, half yes / half no.

        ``mode`` picks the negatives: ``random`` (any absent shape), ``adversarial`` (the absent
        co-occurrence partner of a present pair kind, as in POPE's co-occurrence sampling).
        """
        if mode not in ("random", "adversarial"):
            raise ValueError("mode must be 'random' or 'adversarial'")
        rng = np.random.default_rng([seed, 104729, 0 if mode == "random" else 1])
        out: list[Sample] = []
        negatives = self.hallucination_samples((n + 1) // 2, seed + 1, suffix=suffix) if mode == "adversarial" else []
        for i in range(n):
            if i % 2 == 0:
                out.append(self.sample(rng, "exist", answer="yes", suffix=suffix))
            elif mode == "adversarial":
                out.append(negatives[i // 2])
            else:
                out.append(self.sample(rng, "exist", answer="no", suffix=suffix))
        return out


def cell_objects(scene: Scene, region: Box, grid: int, *, min_cell: float = 0.25,
                 min_object: float = 0.5) -> list[SceneObject | None]:
    """Which object each cell of a ``grid`` x ``grid`` split of ``region`` shows (row-major).

    A cell takes the object whose box overlaps it most, provided the overlap covers at least
    ``min_cell`` of the cell or ``min_object`` of the object (so an object smaller than a cell
    still claims the cell that holds it); otherwise ``None`` (background). ``region`` is the
    part of the canvas an image shows: the whole canvas, or a crop box.
    """
    if not scene.objects:
        return [None] * (grid * grid)
    rx0, ry0, rx1, ry1 = region
    cw, ch = (rx1 - rx0) / grid, (ry1 - ry0) / grid
    edges_x = rx0 + cw * np.arange(grid + 1)  # [G+1]
    edges_y = ry0 + ch * np.arange(grid + 1)  # [G+1]
    boxes = np.array([o.box for o in scene.objects], dtype=np.float64)  # [K, 4]
    ox = np.clip(np.minimum(edges_x[1:, None], boxes[None, :, 2]) - np.maximum(edges_x[:-1, None], boxes[None, :, 0]), 0, None)  # [G, K]
    oy = np.clip(np.minimum(edges_y[1:, None], boxes[None, :, 3]) - np.maximum(edges_y[:-1, None], boxes[None, :, 1]), 0, None)  # [G, K]
    area = oy[:, None, :] * ox[None, :, :]  # [G rows, G cols, K]
    obj_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # [K]
    ok = (area > 0) & ((area >= min_cell * cw * ch) | (area >= min_object * obj_area))
    score = np.where(ok, area, -1.0).reshape(grid * grid, -1)  # [G*G, K]
    best = score.argmax(axis=1)  # first of equal overlaps
    has = score[np.arange(grid * grid), best] > 0
    return [scene.objects[int(k)] if h else None for k, h in zip(best, has, strict=True)]


def image_regions(sample: Sample) -> list[Box]:
    """The part of the canvas each of ``sample``'s images shows, in model order: the whole
    canvas, then ``meta['crop_box']`` for a two-image sample."""
    scene = sample.meta["scene"]
    regions: list[Box] = [(0, 0, scene.size, scene.size)]
    if len(sample.images) > 1:
        regions.append(sample.meta["crop_box"])
    return regions


def add_crop(sample: Sample, box: Box) -> Sample:
    """``sample`` with the ``box`` crop of its image appended as the second image."""
    crop = sample.image.crop(box)
    target = sample.meta.get("box")
    meta = dict(sample.meta)
    meta.update(crop_box=tuple(int(v) for v in box), crop_has_target=bool(target) and box_contains(box, target))
    return replace(sample, extra_images=(crop,), meta=meta)


def _norm(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"bad weights {list(weights)}")
    return w / w.sum()


def vocabulary() -> list[str]:
    """Every word the world's questions and answers use (lower case, sorted)."""
    words: set[str] = set()
    texts: list[str] = [
        *READ_LABELLED, *READ_GLYPH, *COLOUR_TEMPLATES, *EXIST_TEMPLATES, *DESCRIBE_TEMPLATES,
        *GENERIC_TEMPLATES, SHORT_ANSWER_SUFFIX, "a an with the and nothing yes no digit letter symbol",
    ]
    texts += list(COLOURS) + list(SHAPES) + [s.lower() for s in SYMBOLS]
    for text in texts:
        text = re.sub(r"\{[a-z]+\}", " ", text).lower()
        words.update(w for w in re.findall(r"\w+", text))
    return sorted(words)
