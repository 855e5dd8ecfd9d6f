"""The procedural world of the micro model: determinism, glyphs, geometry, answers, statistics."""

from __future__ import annotations

import numpy as np
import pytest

from innersight.demo.world import (
    COLOURS,
    FAMILIES,
    LABEL_FRACTION,
    SHAPES,
    SIZE_CLASSES,
    Scene,
    SceneObject,
    TargetSpec,
    World,
    WorldConfig,
    add_crop,
    glyph_mask,
    join_phrases,
    parse_description,
    shape_coverage,
    square_box,
)


def pixels(sample) -> np.ndarray:
    return np.asarray(sample.image)


# ------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_sample(family: str) -> None:
    w = World()
    a = w.sample(np.random.default_rng(11), family, two_image=family in ("read", "colour", "exist"))
    b = w.sample(np.random.default_rng(11), family, two_image=family in ("read", "colour", "exist"))
    assert a.question == b.question and a.answer == b.answer
    assert np.array_equal(pixels(a), pixels(b))
    assert len(a.images) == len(b.images)
    for x, y in zip(a.images, b.images, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert a.meta["scene"] == b.meta["scene"]


def test_different_seed_different_sample() -> None:
    w = World()
    a = w.sample(np.random.default_rng(1), "read")
    b = w.sample(np.random.default_rng(2), "read")
    assert not np.array_equal(pixels(a), pixels(b))
    assert a.meta["scene"] != b.meta["scene"]


def test_batches_are_a_function_of_seed_and_step() -> None:
    w = World()
    first = w.batch(3, 10, 4)
    again = w.batch(3, 10, 4)
    other_step = w.batch(3, 11, 4)
    other_seed = w.batch(4, 10, 4)
    assert [s.question for s in first] == [s.question for s in again]
    assert all(np.array_equal(pixels(x), pixels(y)) for x, y in zip(first, again, strict=True))
    assert not np.array_equal(pixels(first[0]), pixels(other_step[0]))
    assert not np.array_equal(pixels(first[0]), pixels(other_seed[0]))


def test_no_global_random_state_is_used() -> None:
    w = World()
    np.random.seed(0)
    a = w.sample(np.random.default_rng(5), "describe")
    np.random.seed(12345)
    b = w.sample(np.random.default_rng(5), "describe")
    assert np.array_equal(pixels(a), pixels(b))


# ------------------------------------------------------------------------------------ glyphs
def test_glyph_seven_dot_matrix_at_scale_ten() -> None:
    m = glyph_mask("7", 70)  # 10 px per font cell; width round(70 * 5 / 7) = 50
    assert m.shape == (70, 50)
    # "7": row 0 "#####", row 1 "....#", row 6 ".#..."
    cell = lambda r, c: bool(m[r * 10 + 5, c * 10 + 5])  # noqa: E731
    assert all(cell(0, c) for c in range(5))
    assert cell(1, 4) and not cell(1, 0) and not cell(1, 2)
    assert cell(6, 1) and not cell(6, 0) and not cell(6, 3)
    assert int(m.sum()) == 100 * (5 + 1 + 1 + 1 + 1 + 1 + 1)  # 11 ink cells of 10x10 px


def test_glyph_e_and_zero_cells() -> None:
    e = glyph_mask("E", 14, 10)  # 2 px per cell
    # "E": rows 0, 3 (first four cells), 6 full; column 0 always ink; row 1 right part blank
    assert e[0].all() and e[13].all()
    assert e[:, 0].all()
    assert e[6, :8].all() and not e[6, 8:].any()
    assert not e[2, 2:].any()
    zero = glyph_mask("0", 7, 5)  # one pixel per cell: the bitmap itself
    expected = np.array([[c == "#" for c in row] for row in
                         (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###.")])
    assert np.array_equal(zero, expected)


def test_glyphs_are_distinct() -> None:
    from innersight.demo.world import SYMBOLS

    masks = {s: glyph_mask(s, 7, 5).tobytes() for s in SYMBOLS}
    assert len(set(masks.values())) == len(SYMBOLS)


def test_rendered_glyph_pixels_have_the_object_colour() -> None:
    obj = SceneObject("digit", "red", "4", (20, 30, 70, 100), (20, 30, 70, 100), 70, "large")
    scene = Scene(192, (190, 190, 190), 3, (obj,))
    img = np.asarray(scene.render()).astype(int)
    # "4": row 4 is "#####", row 0 is "...#." -> cell (0, 3) ink, cell (0, 0) background
    assert tuple(img[30 + 45, 20 + 5]) == COLOURS["red"]  # row 4, col 0
    assert tuple(img[30 + 5, 20 + 35]) == COLOURS["red"]  # row 0, col 3
    assert tuple(img[30 + 5, 20 + 5]) != COLOURS["red"]  # row 0, col 0: background
    assert abs(img[30 + 5, 20 + 5].mean() - 190) < 70


def test_labelled_symbol_ink_contrasts_with_the_shape() -> None:
    obj = SceneObject("square", "blue", "1", (10, 10, 81, 81), (30, 23, 61, 67), 44, "large")
    img = np.asarray(Scene(192, (180, 180, 180), 1, (obj,)).render()).astype(int)
    # "1" row 6 ".###." -> cell (6, 2) ink (white on blue); cell (6, 0) is the blue shape
    gh, gw = 44, 31
    y = 23 + int((6 + 0.5) * gh / 7)
    assert tuple(img[y, 30 + int((2 + 0.5) * gw / 5)]) == (250, 250, 250)
    assert tuple(img[y, 30 + int((0 + 0.5) * gw / 5)]) == COLOURS["blue"]


def test_shape_coverage_areas() -> None:
    side = 80
    circle = shape_coverage("circle", side).sum() / side**2
    diamond = shape_coverage("diamond", side).sum() / side**2
    square = shape_coverage("square", side).sum() / side**2
    assert circle == pytest.approx(np.pi / 4, abs=0.01)
    assert diamond == pytest.approx(0.5, abs=0.01)
    assert square == pytest.approx(0.92**2, abs=0.01)
    star = shape_coverage("star", side)
    assert star[side // 2, side // 2] == 1.0 and star[0, 0] == 0.0
    tri = shape_coverage("triangle", side)
    assert tri[int(side * 0.8), side // 2] == 1.0 and tri[int(side * 0.1), 2] == 0.0


# ---------------------------------------------------------------------------------- geometry
def test_boxes_inside_canvas_and_disjoint() -> None:
    w = World()
    rng = np.random.default_rng(0)
    for _ in range(150):
        scene = w.scene(rng, want=TargetSpec(("shape", "labelled", "glyph"), str(rng.choice(SIZE_CLASSES))))
        boxes = [o.box for o in scene.objects]
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= scene.size and 0 <= y0 < y1 <= scene.size
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
        for o in scene.objects:
            if o.glyph_box is not None:
                gx0, gy0, gx1, gy1 = o.glyph_box
                assert o.box[0] <= gx0 and o.box[1] <= gy0 and gx1 <= o.box[2] and gy1 <= o.box[3]


def test_size_classes_as_specified() -> None:
    cfg = WorldConfig()
    w = World(cfg)
    rng = np.random.default_rng(1)
    for size in SIZE_CLASSES:
        for _ in range(25):
            s = w.sample(rng, "colour", size_class=size)
            obj = s.meta["scene"].objects[0]
            assert s.meta["size_class"] == size == obj.size_class
            lo, hi = (cfg.shape_sizes if obj.category == "shape" else cfg.glyph_sizes)[size]
            assert lo <= s.meta["size_px"] <= hi
            if obj.category == "shape":
                assert obj.box[2] - obj.box[0] == obj.size_px
            else:
                assert obj.glyph_box[3] - obj.glyph_box[1] == obj.size_px
            if obj.category == "labelled":
                assert obj.box[2] - obj.box[0] >= obj.size_px / LABEL_FRACTION[obj.kind]


def test_small_glyphs_are_smaller_than_the_model_input_cell() -> None:
    # the design: a 192 px canvas shrunk to 64 px makes small glyphs (<= 17 px) at most 6 px tall
    cfg = WorldConfig()
    assert cfg.canvas / 64 == 3
    assert cfg.glyph_sizes["small"][1] / 3 < 6
    assert cfg.glyph_sizes["large"][0] / 3 > 13


def test_square_box_is_clamped_inside() -> None:
    assert square_box((5, 5), 64, 192) == (0, 0, 64, 64)
    assert square_box((190, 100), 64, 192) == (128, 68, 192, 132)
    assert square_box((96, 96), 300, 192) == (0, 0, 192, 192)


# -------------------------------------------------------------------------- answers vs scene
def test_read_answers_match_the_target() -> None:
    w = World()
    rng = np.random.default_rng(2)
    for _ in range(40):
        s = w.sample(rng, "read")
        target = s.meta["scene"].objects[0]
        assert s.answer == target.symbol.lower()
        assert target.colour in s.question
        if target.category == "labelled":
            assert target.kind in s.question
        # the reference is unique: no other object has the same colour and kind
        same = [o for o in s.meta["scene"].objects if (o.colour, o.kind) == (target.colour, target.kind)]
        assert len(same) == 1
        assert s.meta["box"] == target.box


def test_colour_answers_match_the_target() -> None:
    w = World()
    rng = np.random.default_rng(3)
    for _ in range(40):
        s = w.sample(rng, "colour")
        target = s.meta["scene"].objects[0]
        assert s.answer == target.colour
        assert s.answer not in s.question.lower()
        assert target.kind in s.question


def test_exist_answers_match_the_scene() -> None:
    w = World()
    rng = np.random.default_rng(4)
    answers = set()
    for _ in range(60):
        s = w.sample(rng, "exist")
        kinds = s.meta["scene"].kinds()
        assert s.meta["kind"] in SHAPES and s.meta["kind"] in s.question
        assert (s.answer == "yes") == (s.meta["kind"] in kinds)
        answers.add(s.answer)
    assert answers == {"yes", "no"}


def test_descriptions_list_every_object() -> None:
    w = World()
    rng = np.random.default_rng(5)
    for family in ("describe", "generic"):
        for _ in range(15):
            s = w.sample(rng, family)
            objects = s.meta["scene"].objects
            truth = sorted((o.colour, o.kind, o.symbol.lower() if o.symbol else None) for o in objects)
            assert sorted(parse_description(s.answer)) == truth


def test_description_format_and_parse() -> None:
    assert join_phrases(["a red circle"]) == "a red circle"
    text = join_phrases(["a red circle with 7", "an orange digit 3", "a blue star"])
    assert text == "a red circle with 7, an orange digit 3 and a blue star"
    assert parse_description(text) == [("red", "circle", "7"), ("orange", "digit", "3"), ("blue", "star", None)]
    assert parse_description("A green letter K.") == [("green", "letter", "k")]


def test_generic_prompt_is_vicrop_s_sentence() -> None:
    w = World()
    rng = np.random.default_rng(6)
    questions = [w.sample(rng, "generic", suffix=False).question for _ in range(40)]
    assert questions.count("Write a general description of the image.") >= 20
    assert len(set(questions)) > 1


def test_templates_vary_within_a_family() -> None:
    w = World()
    rng = np.random.default_rng(7)
    for family in FAMILIES:
        templates = {w.sample(rng, family).meta["template"] for _ in range(40)}
        assert len(templates) >= 3, family


# --------------------------------------------------------------------------- co-occurrence
def _both_given_either(world: World, n: int, seed: int) -> tuple[float, int]:
    a, b = world.config.cooccur_pair
    rng = np.random.default_rng(seed)
    either = both = 0
    wants = [None, TargetSpec(("shape", "labelled"), "small"), TargetSpec(("shape", "labelled", "glyph"), "large")]
    for i in range(n):
        kinds = world.scene(rng, want=wants[i % 3]).kinds()
        if a in kinds or b in kinds:
            either += 1
            both += a in kinds and b in kinds
    return both / either, either


@pytest.mark.parametrize("rate", [0.9, 0.5])
def test_cooccurrence_rate_is_the_configured_one(rate: float) -> None:
    world = World(WorldConfig(cooccur_rate=rate))
    observed, n = _both_given_either(world, 1500, seed=8)
    assert n > 400
    assert observed == pytest.approx(rate, abs=4 * np.sqrt(rate * (1 - rate) / n) + 0.01)


def test_hallucination_samples_have_the_anchor_but_not_the_partner() -> None:
    w = World()
    a, b = w.config.cooccur_pair
    samples = w.hallucination_samples(30, seed=9)
    anchors = set()
    for s in samples:
        kinds = s.meta["scene"].kinds()
        assert s.answer == "no" and s.family == "exist"
        assert s.meta["anchor"] in kinds and s.meta["kind"] not in kinds
        assert {s.meta["anchor"], s.meta["kind"]} == {a, b}
        assert s.meta["kind"] in s.question
        anchors.add(s.meta["anchor"])
    assert anchors == {a, b}


def test_pope_adversarial_is_balanced() -> None:
    w = World()
    samples = w.pope_samples(10, seed=10, mode="adversarial")
    assert [s.answer for s in samples] == ["yes", "no"] * 5
    for s in samples[1::2]:
        assert "anchor" in s.meta


# ----------------------------------------------------------------------------- two images
def test_two_image_sample_is_full_scene_then_crop() -> None:
    w = World()
    rng = np.random.default_rng(12)
    for _ in range(20):
        s = w.sample(rng, "read", two_image=True)
        assert len(s.images) == 2
        x0, y0, x1, y1 = s.meta["crop_box"]
        assert x1 - x0 == y1 - y0 and 0 <= x0 and 0 <= y0 and x1 <= 192 and y1 <= 192
        assert np.array_equal(np.asarray(s.images[1]), pixels(s)[y0:y1, x0:x1])
        tb = s.meta["box"]
        inside = x0 <= tb[0] and y0 <= tb[1] and tb[2] <= x1 and tb[3] <= y1
        assert s.meta["crop_has_target"] == inside


def _centres_in_crop(sample) -> tuple[bool, bool]:
    """(target centre inside the crop, some other object's centre inside the crop)."""
    x0, y0, x1, y1 = sample.meta["crop_box"]

    def inside(box) -> bool:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        return x0 <= cx <= x1 and y0 <= cy <= y1

    others = [o.box for o in sample.meta["scene"].objects if o.box != sample.meta["box"]]
    return inside(sample.meta["box"]), any(inside(b) for b in others)


@pytest.mark.parametrize("distractor", [0.0, 1.0])
def test_distractor_crops_are_centred_on_another_object(distractor: float) -> None:
    cfg = WorldConfig(crop_target_prob=0.0, crop_distractor_prob=distractor, crop_full_prob=0.0,
                      crop_sides=(48, 56), min_objects=4)
    rng = np.random.default_rng(15)
    hits = [_centres_in_crop(World(cfg).sample(rng, "read", two_image=True))[1] for _ in range(40)]
    if distractor == 1.0:
        assert all(hits)  # the crop centre is within 0.3 side of an object centre, clamping keeps it in
    else:
        assert sum(hits) < 30  # random placement often shows no other object's centre


def test_target_crops_hold_the_target_centre() -> None:
    cfg = WorldConfig(crop_target_prob=1.0, crop_full_prob=0.0)
    rng = np.random.default_rng(16)
    assert all(_centres_in_crop(World(cfg).sample(rng, "colour", two_image=True))[0] for _ in range(40))


def test_crop_probabilities_are_checked() -> None:
    with pytest.raises(ValueError, match="crop_distractor_prob"):
        WorldConfig(crop_distractor_prob=1.5)


def test_oracle_crop_is_centred_on_the_target() -> None:
    w = World()
    for s in w.eval_samples("read", 6, seed=13, size_class="small", crop_side=64):
        x0, y0, x1, y1 = s.meta["crop_box"]
        assert (x1 - x0, y1 - y0) == (64, 64)
        assert s.meta["crop_has_target"]
        assert s.images[1].size == (64, 64)


def test_add_crop_keeps_the_question() -> None:
    w = World()
    s = w.sample(np.random.default_rng(14), "colour")
    c = add_crop(s, (0, 0, 100, 100))
    assert c.question == s.question and c.answer == s.answer and c.images[0] is s.image
    assert c.images[1].size == (100, 100)


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        WorldConfig(cooccur_pair=("circle", "star"))  # circles carry labels
    with pytest.raises(ValueError):
        WorldConfig(canvas=64)
    with pytest.raises(KeyError):
        World().sample(np.random.default_rng(0), "count")


def test_cell_objects_hand_computed() -> None:
    from innersight.demo.world import cell_objects

    big = SceneObject("circle", "red", None, (30, 30, 50, 50), None, 20, "small")
    tiny = SceneObject("square", "blue", None, (100, 100, 108, 108), None, 8, "tiny")
    scene = Scene(192, (180, 180, 180), 0, (big, tiny))
    cells = cell_objects(scene, (0, 0, 192, 192), 8)  # 24 px cells
    # big covers 18x18 of cell (1, 1) (>= 1/4 of 576) but only 18x2 of cell (1, 2): no claim there
    # tiny (8x8) lies inside cell (4, 4): less than 1/4 of the cell, but all of the object
    claimed = {i: o.kind for i, o in enumerate(cells) if o is not None}
    assert claimed == {1 * 8 + 1: "circle", 4 * 8 + 4: "square"}
    # a crop (24, 24)-(72, 72) split 2x2: 24 px cells again, big in the top-left one only
    crop_cells = cell_objects(scene, (24, 24, 72, 72), 2)
    assert [o.kind if o else None for o in crop_cells] == ["circle", None, None, None]
