"""What the instruments share (innersight.instruments.common and the registry): the one way an
answer is judged (scorer choice from the sample fields, soft scores, the correct/wrong cut),
answer lengths, sample checks, the files written, and the torch-free listing that must agree
with every registered instrument."""

from __future__ import annotations

import json

import pytest

from innersight.errors import UserInputError
from innersight.instruments import LISTINGS, MODULES, describe_instruments, get_instrument
from innersight.instruments import common as C


# ---------------------------------------------------------------------- choosing the scorer
@pytest.mark.parametrize("sample, key", [
    ({"answer": "7"}, "gqa/canonical"),
    ({"label": "yes", "answer": "yes"}, "pope/canonical"),  # micro-pope carries both: the label decides
    ({"answers": ["a"] * 10, "answer": "a"}, "textvqa/canonical"),
    ({"id": "micro-chair-val-1", "gt_objects": ["cross", "digit"], "answer": "x"}, "micro-chair/canonical"),
    ({"id": "x", "gt_objects": ["dog"]}, "chair/canonical"),
    ({"id": "x", "gt_objects": ["circle", "dog"]}, "chair/canonical"),  # not all micro kinds: COCO CHAIR
    ({"id": "direct_attributes/1", "question": "q", "options": ["red", "blue"], "answer_index": 0}, "vstar/letter"),
])
def test_auto_scorer_follows_the_sample_fields(sample, key):
    assert C.choose_scorer([sample]).key == key


def test_named_scorers_and_refusals():
    assert C.choose_scorer([{"answer": "7"}], "pope").key == "pope/canonical"  # a benchmark: its canonical variant
    assert C.choose_scorer([{"answer": "7"}], "gqa/vicrop").key == "gqa/vicrop"
    with pytest.raises(UserInputError, match="likelihood"):
        C.choose_scorer([{"options": ["a", "b"]}], "vstar/canonical")
    with pytest.raises(UserInputError, match="unknown scorer 'nonsense'"):
        C.choose_scorer([{"answer": "4"}], "nonsense")
    with pytest.raises(UserInputError, match="cannot tell"):
        C.choose_scorer([{"id": "q", "question": "q"}])
    with pytest.raises(UserInputError, match="no samples"):
        C.choose_scorer([])
    # auto decides by the first sample; a later sample without that field is refused up front
    with pytest.raises(UserInputError, match=r"pope/canonical.*1 sample\(s\) lack that field, e.g. 'b'"):
        C.choose_scorer([{"id": "a", "label": "no"}, {"id": "b", "answer": "no"}])


# ---------------------------------------------------------------------- judging one answer
def test_verdicts_and_soft_scores_by_hand():
    exact = C.choose_scorer([{"answer": "7"}])
    assert C.answer_score(exact, " 7. ", {"answer": "7"}) == 1.0 and C.is_correct(exact, "7", {"answer": "7"})
    assert C.answer_score(exact, "17", {"answer": "7"}) == 0.0 and not C.is_correct(exact, "17", {"answer": "7"})
    pope = C.choose_scorer([{"label": "no"}])
    assert C.is_correct(pope, "No, there is not.", {"label": "no"}) and not C.is_correct(pope, "Yes", {"label": "no"})
    # VQA soft accuracy (min(1, matches / 3) over the leave-one-out subsets): 1.0 and 0.6 count, 0.3 does not
    soft = C.choose_scorer([{"answers": ["a"]}])
    assert C.answer_score(soft, "cat", {"answers": ["cat"] * 10}) == 1.0
    assert C.answer_score(soft, "cat", {"answers": ["cat"] + ["dog"] * 9}) == pytest.approx(0.3)
    assert not C.is_correct(soft, "cat", {"answers": ["cat"] + ["dog"] * 9})
    assert C.is_correct(soft, "cat", {"answers": ["cat"] * 2 + ["dog"] * 8})  # 0.6 >= 0.5
    # COCO CHAIR: right when nothing is hallucinated
    chair = C.choose_scorer([{"gt_objects": ["dog"]}])
    assert C.answer_score(chair, "A dog on the grass.", {"gt_objects": ["dog"]}) == 1.0
    assert C.answer_score(chair, "A dog and a cat.", {"gt_objects": ["dog"]}) == 0.0
    # ANLS rows are soft scores too
    anls = C.choose_scorer([{"answers": ["x"]}], "docvqa")
    assert C.answer_score(anls, "invoice", {"answers": ["invoice"]}) == 1.0
    assert C.answer_score(anls, "zzzzzzz", {"answers": ["invoice"]}) == 0.0


def test_vstar_options_rendered_as_letters_and_scored():
    vstar = {"id": "direct_attributes/1", "question": "What colour?", "options": ["red", "blue"], "answer_index": 0}
    scorer = C.choose_scorer([vstar])
    question, scored = C.render(vstar, scorer)
    assert question.startswith("What colour?\n(A) ") and "(B) " in question
    right = "AB"[scored["answer_index"]]
    assert scored["options"][scored["answer_index"]] == "red"  # the shuffle keeps the right option marked
    assert C.is_correct(scorer, right, scored) and not C.is_correct(scorer, "AB"[1 - scored["answer_index"]], scored)
    plain = {"id": "d", "question": "What digit?", "answer": "7"}
    assert C.render(plain, C.choose_scorer([plain])) == ("What digit?", plain)


def test_a_scorer_that_cannot_read_the_sample_is_a_user_error():
    exact = C.choose_scorer([{"answer": "7"}])
    with pytest.raises(UserInputError, match="cannot read sample 'z'"):
        C.answer_score(exact, "7", {"id": "z"})  # no answer field


def test_generation_length():
    chair = C.choose_scorer([{"gt_objects": ["dog"]}])
    exact = C.choose_scorer([{"answer": "7"}])
    assert C.generation_length(chair, None) == C.DESCRIPTION_TOKENS == 48
    assert C.generation_length(exact, None) == C.SHORT_TOKENS == 8
    assert C.generation_length(exact, 3) == 3
    with pytest.raises(UserInputError, match="max_new_tokens"):
        C.generation_length(exact, 0)


# ---------------------------------------------------------------------- samples and files
def test_check_samples_refusals():
    assert C.check_samples(iter([{"id": "a", "image": "x.png", "question": "q?"}]), "probe") == [
        {"id": "a", "image": "x.png", "question": "q?"}]
    with pytest.raises(UserInputError, match="probe needs at least one sample"):
        C.check_samples([], "probe")
    with pytest.raises(UserInputError, match="sinks needs a 'image'.*'b'"):
        C.check_samples([{"id": "a", "image": "x", "question": "q"}, {"id": "b", "question": "q"}], "sinks")
    with pytest.raises(UserInputError, match="non-empty 'question'.*'c'"):
        C.check_samples([{"id": "c", "image": "x", "question": "  "}], "sinks")


def test_write_measurement_json_nan_and_png(tmp_path):
    from innersight import viz

    fig, ax = viz.pyplot().subplots()
    ax.plot([0, 1], [1, 2])
    result = C.Measurement("probe", "tiny", 2, {"summary": {"x": float("nan")}, "v": (1, 2)}, fig, {"seed": 3})
    json_path, png_path = C.write_measurement(result, tmp_path / "out")
    assert json_path == tmp_path / "out" / "probe.json" and png_path == tmp_path / "out" / "probe.png"
    data = json.loads(json_path.read_text())
    assert data == {"instrument": "probe", "model": "tiny", "n_samples": 2, "settings": {"seed": 3},
                    "numbers": {"summary": {"x": None}, "v": [1, 2]}}
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "file").write_text("")
    with pytest.raises(UserInputError, match="must be a folder"):
        C.write_measurement(result, tmp_path / "file")
    # no figure: JSON only
    bare = C.Measurement("probe", "tiny", 1, {}, None)
    assert C.write_files(bare, tmp_path / "b" / "n.json", tmp_path / "b" / "n.png") == (tmp_path / "b" / "n.json", None)
    assert not (tmp_path / "b" / "n.png").exists()


# ---------------------------------------------------------------------- the registry
def test_listings_agree_with_the_registered_instruments():
    """The torch-free listing (``innersight list``) equals what every module registers."""
    assert set(MODULES) == set(LISTINGS)
    listed = {d["name"]: d for d in describe_instruments()}
    for name in LISTINGS:
        inst = get_instrument(name)
        assert inst.name == name
        assert listed[name]["title"] == inst.title
        assert listed[name]["default_benchmark"] == inst.default_benchmark
        assert listed[name]["default_split"] == inst.default_split
        assert listed[name]["options"] == {k: o.default for k, o in inst.options.items()}
    with pytest.raises(UserInputError, match="unknown instrument 'nope'"):
        get_instrument("nope")


def test_register_refuses_a_taken_name_and_one_entry_lists_a_new_instrument(monkeypatch):
    """An instrument is defined once (its registry entry): a second registration under a taken
    name is refused and replaces nothing; a new entry is listed and runnable with no other line."""
    from innersight.instruments import INSTRUMENTS, Instrument, Option, register

    inst = get_instrument("probe")
    with pytest.raises(ValueError, match="registered twice"):
        register(Instrument("probe", "another title", inst.function, inst.default_benchmark, inst.default_split,
                            inst.options))
    assert get_instrument("probe").title == LISTINGS["probe"].title == "Linear probe per layer for object existence (DeCo)"

    monkeypatch.setattr("innersight.instruments.INSTRUMENTS", INSTRUMENTS.copy())
    register(Instrument("unlisted", "t", "probe:measure_probe", "micro-pope", options={"k": Option(int, 3, "k")}))
    listed = {d["name"]: d for d in describe_instruments()}
    assert listed["unlisted"] == {"name": "unlisted", "title": "t", "default_benchmark": "micro-pope",
                                  "default_split": None, "options": {"k": 3}}
    assert get_instrument("unlisted").function is inst.function
    assert get_instrument("unlisted").parse_options({"k": "5"}) == {"k": 5}


def test_option_defaults_named_after_module_constants_match_them():
    """The registry spells out three defaults that the modules also keep as constants."""
    from innersight.attend.sinks import FIRST_SINK_LAYER
    from innersight.instruments.outlier_overlap import MAX_RANK
    from innersight.instruments.sinks import TAU

    assert LISTINGS["sinks"].options["tau"].default == TAU
    assert LISTINGS["sinks"].options["first_layer"].default == FIRST_SINK_LAYER
    assert LISTINGS["outlier-overlap"].options["max_rank"].default == MAX_RANK
