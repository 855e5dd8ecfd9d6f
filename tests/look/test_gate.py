"""The ViCrop crop gate: its statistics by hand; the early gate's map against the joint-batch
question map; its decision path on a tiny model (no crop: the plain answer and no second pass;
crop: ViCrop's answer); batch == one by one with mixed decisions; the model restored; the
post-map gate still reachable; and on the shipped micro model the preset's answers are ViCrop's
where it crops and plain elsewhere."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from innersight.errors import MethodError
from innersight.look import gate as G
from innersight.look.gate import concentration, decide, keeps_crop, peak_to_mean, top_mass
from innersight.look.vicrop import ViCropConfig, importance_maps
from innersight.methods import METHODS, resolve_methods


# ---------------------------------------------------------------------- statistics (oracles)
def test_peak_to_mean_by_hand():
    assert peak_to_mean(np.ones((4, 4))) == pytest.approx(1.0)
    one_hot = np.zeros((8, 8))
    one_hot[3, 5] = 2.0
    assert peak_to_mean(one_hot) == pytest.approx(64.0)
    m = np.array([[1.0, 3.0], [-5.0, 0.0]])  # clipped: [1, 3, 0, 0], mean 1
    assert peak_to_mean(m) == pytest.approx(3.0)
    assert peak_to_mean(np.zeros((2, 2))) == 0.0
    assert keeps_crop(np.ones((2, 2)), None) and not keeps_crop(np.ones((2, 2)), 1.5)
    assert keeps_crop(one_hot, 64.0)


def test_top_mass_by_hand():
    # 32 cells -> the top ceil(32 / 16) = 2 cells
    m = np.zeros((4, 8))
    m[0, 0], m[1, 1], m[2, 2] = 5.0, 3.0, 2.0  # total 10, top two 8
    assert G.top_cells(32) == 2 and G.top_cells(64) == 4 and G.top_cells(3) == 1
    assert top_mass(m) == pytest.approx(0.8)
    assert top_mass(np.ones((8, 8))) == pytest.approx(4 / 64)
    assert top_mass(np.zeros((2, 2))) == 0.0


def test_concentration_by_hand():
    assert concentration(np.ones((4, 4))) == pytest.approx(0.0, abs=1e-12)
    one_hot = np.zeros((4, 4))
    one_hot[1, 2] = 7.0
    assert concentration(one_hot) == pytest.approx(1.0)
    # half the mass on each of 2 of 4 cells: H = log 2, 1 - log 2 / log 4 = 0.5
    assert concentration(np.array([[1.0, 1.0], [0.0, 0.0]])) == pytest.approx(0.5)
    p = np.array([0.5, 0.25, 0.125, 0.125])
    h = -(p * np.log(p)).sum()
    assert concentration(p.reshape(2, 2) * 3) == pytest.approx(1 - h / math.log(4))
    assert concentration(np.zeros((3, 3))) == 0.0


def test_decide_table():
    assert decide(5.0, 0.2, 4.0, 0.5) and not decide(3.0, 0.2, 4.0, 0.5) and not decide(5.0, 0.7, 4.0, 0.5)
    assert decide(5.0, 0.9, 4.0, None) and decide(1.0, 0.2, None, 0.5) and not decide(1.0, 0.5, None, 0.5)
    assert decide(None, None, None, None)  # no threshold: always crop (the paper)


def test_keeps_crop_answer_table():
    assert G.keeps_crop_answer(0.9, 0.1, False)  # no arbitration: ViCrop's answer always
    assert G.keeps_crop_answer(0.4, 0.5, True) and not G.keeps_crop_answer(0.5, 0.4, True)
    assert not G.keeps_crop_answer(0.5, 0.5, True)  # a tie keeps the plain answer


def test_config_checks_and_preset():
    with pytest.raises(MethodError, match="peak-to-mean"):
        ViCropConfig(gate=0.5)
    with pytest.raises(MethodError, match="top-mass"):
        ViCropConfig(gate=1.5, gate_statistic="top-mass")
    with pytest.raises(MethodError, match="gate_statistic"):
        ViCropConfig(gate_statistic="kurtosis")
    with pytest.raises(MethodError, match="gate_map"):
        ViCropConfig(gate_map="generic")
    with pytest.raises(MethodError, match="plain answer"):
        ViCropConfig(gate_map="rel-att", gate_confidence=0.5)
    with pytest.raises(MethodError, match="probability"):
        ViCropConfig(gate_confidence=1.5)
    with pytest.raises(MethodError, match="rel-att variant"):
        ViCropConfig(variant="grad-att", gate=5.0)
    with pytest.raises(MethodError, match="rel-att variant"):
        ViCropConfig(variant="grad-att", gate_arbitrate=True)
    with pytest.raises(MethodError, match="gate_arbitrate"):
        ViCropConfig(gate_map="rel-att", gate_arbitrate=True)
    # the paper's ViCrop: no gate, no arbitration, not the early path
    paper = ViCropConfig()
    assert paper.gate is None and paper.gate_confidence is None and not paper.gate_arbitrate
    assert not G.early_gate(paper) and G.early_gate(ViCropConfig(gate_arbitrate=True))
    spec = METHODS["vicrop-gated"]
    # the name fixes the variant; the thresholds are its defaults, which --set may change
    assert dict(spec.preset) == {"variant": "rel-att"}
    assert dict(spec.defaults) == {"gate": G.MICRO_THRESHOLD, "gate_confidence": G.MICRO_CONFIDENCE}
    (method,) = resolve_methods(["vicrop-gated"], {"vicrop": {"gate": "5"}}).objects
    assert method.config.gate == 5.0 and method.config.variant == "rel-att" and method.config.gate_map == "question"
    plain_vicrop = resolve_methods(["vicrop-rel-att"]).objects[0].config
    assert plain_vicrop.gate is None and plain_vicrop.gate_confidence is None and not G.early_gate(plain_vicrop)
    assert not plain_vicrop.gate_arbitrate


# ---------------------------------------------------------------------- on a tiny model
def _scene(seed: int, w: int = 240, h: int = 200) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


QUESTIONS = ["what is the digit in the red circle?", "is there a cat?", "what colour is the box?",
             "how many dots are there?"]


@pytest.fixture(scope="module")
def mllm(tiny_mllm):
    return tiny_mllm("llava")


def _ask(mllm, methods, settings=None, batch_size=4, n=4):
    images = [_scene(s) for s in range(n)]
    return mllm.answer_batch(images, QUESTIONS[:n], methods=methods, settings=settings, max_new_tokens=4,
                             batch_size=batch_size)


def _prefill_counter(mllm):
    """A forward pre-hook on the decoder counting prefills (forwards of more than one position)."""
    counts = {"prefill": 0}

    def hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and embeds.shape[1] > 1:
            counts["prefill"] += 1

    layers_owner = mllm.adapter.language_model
    return counts, layers_owner.register_forward_pre_hook(hook, with_kwargs=True)


def test_question_map_equals_the_joint_batch_question_map(mllm):
    """The prefill capture inside a padded batch generate gives each sample's question map as
    rel-att's own map computation does (one sample at a time, no padding)."""
    images = [_scene(s) for s in range(3)]
    questions = QUESTIONS[:3]
    answers = mllm.answer_batch(images, questions, methods=["vicrop-gated"],
                                settings={"vicrop": {"gate": "1e9", "layer": "1"}}, max_new_tokens=2, batch_size=3)
    for image, question, answer in zip(images, questions, answers):
        ((_, _, raw),) = importance_maps(mllm, [image], [question], ViCropConfig(layer=1))
        np.testing.assert_allclose(answer.maps["question"], raw["question"], rtol=1e-4, atol=1e-7)
        report = answer.details["vicrop-gated"]
        assert report["gate_value"] == pytest.approx(peak_to_mean(raw["question"]), rel=1e-4)
        # the confidence is the first answer token's probability under the plain model
        batch = mllm.prepare([image], [question])
        with torch.no_grad():
            logits = mllm.model(**batch.inputs).logits[0, -1].float()
        assert report["confidence"] == pytest.approx(float(torch.softmax(logits, -1).max()), rel=1e-4)
        assert int(logits.argmax()) == answer.token_ids[0]


def test_no_crop_is_the_plain_answer_with_one_pass(mllm, monkeypatch):
    plain = _ask(mllm, [])
    counts, handle = _prefill_counter(mllm)
    try:
        import innersight.look.vicrop as V

        def no_map(*args, **kwargs):
            raise AssertionError("the gate said no crop: no importance map may be computed")

        monkeypatch.setattr(V, "choose_crops", no_map)
        never = _ask(mllm, ["vicrop-gated"], {"vicrop": {"gate": "1e9"}})
        assert counts["prefill"] == 1  # the plain generate's prefill, nothing else
        confident = _ask(mllm, ["vicrop-gated"], {"vicrop": {"gate": "none", "gate_confidence": "1e-9"}})
        assert counts["prefill"] == 2
    finally:
        handle.remove()
    for g in (never, confident):
        assert [a.token_ids for a in g] == [a.token_ids for a in plain]
        assert [a.prompt for a in g] == [a.prompt for a in plain]
        assert all(a.crop is None and a.box is None and not a.details["vicrop-gated"]["cropped"] for a in g)


def test_crop_is_vicrops_answer(mllm):
    vicrop = _ask(mllm, ["vicrop-rel-att"])
    always = _ask(mllm, ["vicrop-gated"], {"vicrop": {"gate": "1", "gate_confidence": "none"}})
    assert [a.token_ids for a in always] == [a.token_ids for a in vicrop]
    assert [a.prompt for a in always] == [a.prompt for a in vicrop]
    assert [a.box for a in always] == [a.box for a in vicrop]
    assert all(a.details["vicrop-gated"]["cropped"] for a in always)
    # the crop answers continued from the map's prefix cache, as ViCrop's own do
    assert all(a.details["vicrop-gated"]["answer_prefix"]["reused"] for a in always)
    assert all(v.details["vicrop-rel-att"]["answer_prefix"]["reused"] for v in vicrop)
    for a, v in zip(always, vicrop):
        np.testing.assert_array_equal(a.maps["importance"], v.maps["importance"])


def test_mixed_decisions_batch_equals_one_by_one(mllm):
    probe = _ask(mllm, ["vicrop-gated"], {"vicrop": {"gate": "1", "gate_confidence": "none"}})
    values = sorted(a.details["vicrop-gated"]["gate_value"] for a in probe)
    threshold = (values[1] + values[2]) / 2  # two samples above, two below
    settings = {"vicrop": {"gate": repr(threshold), "gate_confidence": "none"}}
    batched = _ask(mllm, ["vicrop-gated"], settings, batch_size=4)
    single = _ask(mllm, ["vicrop-gated"], settings, batch_size=1)
    decisions = [a.details["vicrop-gated"]["cropped"] for a in batched]
    assert sorted(decisions) == [False, False, True, True]
    assert decisions == [a.details["vicrop-gated"]["cropped"] for a in single]
    assert [a.token_ids for a in batched] == [a.token_ids for a in single]
    assert [a.box for a in batched] == [a.box for a in single]
    # each row is the plain answer or ViCrop's, as decided
    plain, vicrop = _ask(mllm, []), _ask(mllm, ["vicrop-rel-att"])
    for a, p, v, crop in zip(batched, plain, vicrop, decisions):
        assert a.token_ids == (v.token_ids if crop else p.token_ids)
    # the image-only path (likelihood protocols) decides the same from one plain forward
    method = resolve_methods(["vicrop-gated"], settings).objects[0]
    lists, extras = method.apply(mllm, [[_scene(s)] for s in range(4)], QUESTIONS, "chat")
    assert [len(ims) == 2 for ims in lists] == decisions
    assert [e["details"]["vicrop-gated"]["cropped"] for e in extras] == decisions


ARBITRATED = {"vicrop": {"gate": "1", "gate_confidence": "none", "gate_arbitrate": "true"}}


def _first_token_probability(mllm, image_lists, questions):
    """Oracle: the largest softmax probability at the last prompt position, one row at a time."""
    out = []
    for ims, q in zip(image_lists, questions):
        batch = mllm.prepare([ims], [q])
        with torch.no_grad():
            logits = mllm.model(**batch.inputs).logits[0, -1].float()
        out.append(float(torch.softmax(logits, -1).max()))
    return out


def test_arbitration_keeps_the_more_confident_answer(mllm):
    """Every sample is cropped; each answer is ViCrop's where its first-token probability (checked
    against a forward on ViCrop's own images) beats the plain answer's, else the plain answer."""
    plain, vicrop = _ask(mllm, []), _ask(mllm, ["vicrop-rel-att"])
    arbitrated = _ask(mllm, ["vicrop-gated"], ARBITRATED)
    crop_lists = [[_scene(s), v.crop] for s, v in enumerate(vicrop)]
    oracle = _first_token_probability(mllm, crop_lists, QUESTIONS)
    for a, p, v, o in zip(arbitrated, plain, vicrop, oracle):
        report = a.details["vicrop-gated"]
        assert report["cropped"]
        assert report["crop_confidence"] == pytest.approx(o, rel=1e-4)
        assert report["kept"] == (report["crop_confidence"] > report["confidence"])
        assert a.token_ids == (v.token_ids if report["kept"] else p.token_ids)
        assert a.prompt == (v.prompt if report["kept"] else p.prompt)
        assert a.box == (v.box if report["kept"] else None)
        if not report["kept"]:  # the rejected crop's map and box are still reported
            assert report["crop_box"] == list(v.box) and a.crop is None
            np.testing.assert_array_equal(a.maps["importance"], v.maps["importance"])
    # without arbitration the same crops are all kept, with their confidences reported
    always = _ask(mllm, ["vicrop-gated"], {"vicrop": {"gate": "1", "gate_confidence": "none"}})
    assert all(a.details["vicrop-gated"]["kept"] for a in always)
    assert [a.details["vicrop-gated"]["crop_confidence"] for a in always] == pytest.approx(
        [a.details["vicrop-gated"]["crop_confidence"] for a in arbitrated], rel=1e-5)


def test_arbitration_both_branches_batch_equals_one_by_one(mllm, monkeypatch):
    """Arbitration forced to alternate (keep, reject, ...) in call order: the rejected rows are
    the plain answers, the kept ones ViCrop's, batched as one by one; the image-only path agrees."""
    def alternating():
        calls = {"n": 0}

        def keep(plain_confidence, crop_confidence, arbitrate):
            calls["n"] += 1
            return calls["n"] % 2 == 1

        return keep

    plain, vicrop = _ask(mllm, []), _ask(mllm, ["vicrop-rel-att"])
    monkeypatch.setattr(G, "keeps_crop_answer", alternating())
    batched = _ask(mllm, ["vicrop-gated"], ARBITRATED, batch_size=4)
    monkeypatch.setattr(G, "keeps_crop_answer", alternating())
    single = _ask(mllm, ["vicrop-gated"], ARBITRATED, batch_size=1)
    kept = [a.details["vicrop-gated"]["kept"] for a in batched]
    assert kept == [True, False, True, False] == [a.details["vicrop-gated"]["kept"] for a in single]
    for a, b, p, v, k in zip(batched, single, plain, vicrop, kept):
        assert a.token_ids == b.token_ids == (v.token_ids if k else p.token_ids)
    monkeypatch.setattr(G, "keeps_crop_answer", alternating())
    method = resolve_methods(["vicrop-gated"], ARBITRATED).objects[0]
    lists, extras = method.apply(mllm, [[_scene(s)] for s in range(4)], QUESTIONS, "chat")
    assert [len(ims) == 2 for ims in lists] == kept
    assert [e["details"]["vicrop-gated"]["kept"] for e in extras] == kept


def test_arbitration_image_only_path_uses_the_same_rule(mllm):
    """The likelihood protocols' path (no generate) arbitrates with one forward on the crop: its
    decisions equal the generated path's."""
    answers = _ask(mllm, ["vicrop-gated"], ARBITRATED)
    method = resolve_methods(["vicrop-gated"], ARBITRATED).objects[0]
    lists, extras = method.apply(mllm, [[_scene(s)] for s in range(4)], QUESTIONS, "chat")
    kept = [a.details["vicrop-gated"]["kept"] for a in answers]
    assert [len(ims) == 2 for ims in lists] == kept
    for e, a in zip(extras, answers):
        assert e["details"]["vicrop-gated"]["crop_confidence"] == pytest.approx(
            a.details["vicrop-gated"]["crop_confidence"], rel=1e-4)


@pytest.mark.parametrize("settings", [{"gate": "1"}, {"gate": "1e9"}, ARBITRATED["vicrop"]])
def test_restored_after_exit_and_exception(mllm, settings):
    from innersight.testing.steps import assert_restored_after_exit_and_exception

    assert_restored_after_exit_and_exception(mllm, _scene(9), "vicrop-gated", {"vicrop": settings},
                                             attention=True)


def test_post_map_gate_still_reachable(mllm):
    plain, vicrop = _ask(mllm, []), _ask(mllm, ["vicrop-rel-att"])
    settings = {"vicrop": {"gate_map": "rel-att", "gate_confidence": "none"}}
    never = _ask(mllm, ["vicrop-gated"], {"vicrop": {**settings["vicrop"], "gate": "1e9"}})
    always = _ask(mllm, ["vicrop-gated"], {"vicrop": {**settings["vicrop"], "gate": "1"}})
    assert [a.token_ids for a in never] == [a.token_ids for a in plain]
    assert [a.token_ids for a in always] == [a.token_ids for a in vicrop]
    assert all("importance" in a.maps for a in never)  # it paid for the map
    sharp = sorted(a.details["vicrop-gated"]["sharpness"] for a in always)
    threshold = (sharp[1] + sharp[2]) / 2
    mixed = _ask(mllm, ["vicrop-gated"], {"vicrop": {**settings["vicrop"], "gate": repr(threshold)}})
    for a, p, v in zip(mixed, plain, vicrop):
        crop = a.details["vicrop-gated"]["sharpness"] >= threshold
        assert a.details["vicrop-gated"]["cropped"] == crop
        assert a.token_ids == (v.token_ids if crop else p.token_ids)


# ---------------------------------------------------------------------- the shipped micro model
def test_gate_on_the_micro_model():
    import innersight
    from innersight.demo.world import World, WorldConfig

    mllm = innersight.load("micro")
    samples = World(WorldConfig()).eval_samples("read", 4, 7, size_class="small")
    images, questions = [s.image for s in samples], [s.question for s in samples]
    plain = mllm.answer_batch(images, questions, max_new_tokens=6)
    vicrop = mllm.answer_batch(images, questions, methods=["vicrop-rel-att"], max_new_tokens=6)
    gated = mllm.answer_batch(images, questions, methods=["vicrop-gated"], max_new_tokens=6)
    for a, v, p in zip(gated, vicrop, plain):
        report = a.details["vicrop-gated"]
        crop = report["gate_value"] >= G.MICRO_THRESHOLD and report["confidence"] < G.MICRO_CONFIDENCE
        assert report["cropped"] == crop == report["kept"]  # the preset does not arbitrate
        assert (report["crop_confidence"] is not None) == crop
        assert a.token_ids == (v.token_ids if crop else p.token_ids)
