"""The ``outlier-overlap`` instrument (DAMRO, arXiv 2410.04514 Eq. 1-2): H_i and F on hand-built
attention rows, the decoder rows it captures against eager attention, planted decoder rows through
the whole instrument, every family, the hallucination split, refusals, and a restored model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from innersight.adapters import FAMILIES  # noqa: E402
from innersight.attention import set_text_attention, text_attention
from innersight.cli import main
from innersight.errors import UserInputError
from innersight.instruments import get_instrument
from innersight.instruments import outlier_overlap as O

#: ranked vision tokens per tiny family for a 90x60 image: LLaVA 4x4 patches, LLaVA-NeXT a 2x2 base
#: view, InstructBLIP 4x4 ViT patches, LLaVA-OneVision a 3x3 base view, InternVL the thumbnail tile's
#: 2x2 tokens (4x4 patches pooled 2x2), SmolVLM its 3x3 global frame
TOKENS = {"llava": 16, "llava_next": 4, "instructblip": 16, "llava_onevision": 9, "internvl": 4, "smolvlm": 9}
#: families (besides Qwen) whose vision encoder has no [CLS] (SigLIP)
NO_CLS = ("llava_onevision", "smolvlm", "gemma3")


def _image(seed: int, w: int = 90, h: int = 60) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _pope(n: int = 2) -> list[dict]:
    return [{"id": f"p{i}", "image": _image(i), "question": "is there a dog in the picture?",
             "label": "no" if i % 2 else "yes"} for i in range(n)]


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _handler_attrs(model) -> int:
    return sum(1 for m in model.modules() if hasattr(m, "_innersight_attention_handler"))


# ---------------------------------------------------------------------- H_i and F, by hand
def test_same_ranking_gives_h_one_and_f_by_hand():
    vision = torch.tensor([0.02, 0.40, 0.01, 0.25, 0.10, 0.07, 0.05, 0.04, 0.03, 0.015, 0.012, 0.011])
    # the decoder ranks the tokens as the ViT does, with other weights
    decoder = torch.tensor([0.06, 0.20, 0.03, 0.15, 0.14, 0.10, 0.09, 0.08, 0.07, 0.05, 0.04, 0.035])
    assert O.overlap_rates(vision, decoder) == [1.0] * 10
    # F: top-3 ViT outliers are tokens 1, 3, 4
    assert O.outlier_share(vision, decoder) == pytest.approx((0.20 + 0.15 + 0.14) / float(decoder.sum()))


def test_disjoint_sets_give_h_zero():
    vision = torch.zeros(20)
    vision[:10] = torch.arange(10, 0, -1).float()  # tokens 0..9 are the outliers
    decoder = torch.full((20,), 0.01)
    decoder[10:] = torch.arange(1, 11).float() / 10  # the decoder prefers tokens 10..19
    assert O.overlap_rates(vision, decoder) == [0.0] * 10
    assert O.outlier_share(vision, decoder) == pytest.approx(0.03 / float(decoder.sum()))


def test_partial_overlap_and_short_rows_by_hand():
    vision = torch.tensor([0.3, 0.2, 0.4, 0.1])  # order 2, 0, 1, 3
    decoder = torch.tensor([0.5, 0.05, 0.15, 0.3])  # order 0, 3, 2, 1
    # H_1: {2} vs {0}; H_2: {2,0} vs {0,3}; H_3: {2,0,1} vs {0,3,2}; H_4: all
    assert O.overlap_rates(vision, decoder) == pytest.approx([0.0, 0.5, 2 / 3, 1.0])  # only n = 4 ranks
    assert O.overlap_rates(vision, decoder, max_rank=2) == pytest.approx([0.0, 0.5])
    assert O.outlier_share(vision, decoder) == pytest.approx(0.5 + 0.15 + 0.05)
    assert math.isnan(O.outlier_share(vision, torch.zeros(4)))  # no decoder attention on the image: undefined
    with pytest.raises(ValueError):
        O.overlap_rates(vision, decoder[:3])


def test_group_means_by_hand():
    rows = [O.SampleOverlap("a", "", True, [1.0, 0.5], 0.2, 2), O.SampleOverlap("b", "", True, [0.0], 0.4, 1),
            O.SampleOverlap("c", "", False, [1.0, 1.0], 0.1, 2)]
    curves = O.group_curves(rows, 2)
    assert curves["h_i"]["hallucinated"] == pytest.approx([0.5, 0.5])  # H_2 over the sample with 2 tokens only
    assert curves["h_i"]["not_hallucinated"] == [1.0, 1.0]
    assert curves["f"]["hallucinated"] == pytest.approx(0.3) and curves["f"]["all"] == pytest.approx(0.7 / 3)
    assert curves["counts"] == {"hallucinated": 2, "not_hallucinated": 1, "all": 3}


def test_instructblip_mapping_through_the_qformer_by_hand():
    """ATT(patch j) = sum_q ATT(q) C[q, j] with C averaged over blocks and renormalised per query."""
    block0 = torch.tensor([[[0.6, 0.2, 0.0], [0.1, 0.1, 0.3]]])  # [N=1, Q=2, P=3] (CLS column dropped)
    block1 = torch.tensor([[[0.2, 0.2, 0.4], [0.3, 0.1, 0.1]]])
    qmap = O.query_to_patch([[block0], [torch.zeros(1, 2, 3), block1]])  # the latest record of each block
    torch.testing.assert_close(qmap[0], torch.tensor([[0.4, 0.2, 0.2], [0.2, 0.1, 0.2]]) / torch.tensor([[0.8], [0.5]]))

    class Adapter:
        family = "instructblip"

    class Layout:
        positions = torch.tensor([3, 4])

    row = torch.tensor([0.0, 0.0, 0.1, 0.3, 0.1, 0.5])  # queries at positions 3 and 4
    got = O.patch_attention(Adapter(), Layout(), row, qmap[0])
    torch.testing.assert_close(got, 0.3 * torch.tensor([0.5, 0.25, 0.25]) + 0.1 * torch.tensor([0.4, 0.2, 0.4]))
    with pytest.raises(Exception, match="not recorded"):
        O.query_to_patch([[]])


def test_parse_layers():
    assert O.parse_layers("all", 4) == (0, 1, 2, 3)
    assert O.parse_layers("3, 1-2", 4) == (1, 2, 3)
    with pytest.raises(UserInputError, match="outside"):
        O.parse_layers("4", 4)
    with pytest.raises(UserInputError, match="expects"):
        O.parse_layers("x", 4)


# ---------------------------------------------------------------------- the captured decoder rows
def _eager(mllm, inputs):
    previous = text_attention(mllm.model)
    set_text_attention(mllm.model, "eager")
    try:
        with torch.no_grad():
            out = mllm.model(**inputs, output_attentions=True)
    finally:
        set_text_attention(mllm.model, previous)
    if mllm.adapter.family == "instructblip":
        return out.language_model_outputs.attentions
    return out.attentions


@pytest.mark.parametrize("family", ["llava", "instructblip", "qwen2_vl"])
def test_answer_rows_equal_eager_attention_at_every_step(tiny_mllm, family):
    """Row s of the capture (the position producing answer token s, mean over heads and layers)
    equals the eager attention of a full forward over the prompt plus the generated tokens."""
    mllm = tiny_mllm(family)
    batch = mllm.prepare([_image(3)], ["what is it?"])
    capture = O.AnswerAttention(mllm, batch, range(mllm.adapter.num_layers))
    with capture:
        ids = mllm.generate(batch, max_new_tokens=3, min_new_tokens=3)
    assert len(ids[0]) == 3 and len(capture.steps) == 3
    inputs = dict(batch.inputs)
    new = torch.tensor([ids[0][:2]])
    inputs["input_ids"] = torch.cat([inputs["input_ids"], new], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(new)], dim=1)
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(new)], dim=1)
    attentions = _eager(mllm, inputs)
    length = batch.input_ids.shape[1]
    for step in range(3):
        expected = torch.stack([a[0, :, length - 1 + step, :length].mean(0) for a in attentions]).mean(0)  # [L0]
        got = capture.steps[step][0] / mllm.adapter.num_layers
        torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(capture.answer_row(0, 2), (capture.steps[0][0] + capture.steps[1][0]) / 2 /
                               mllm.adapter.num_layers)


# ---------------------------------------------------------------------- planted rows, whole instrument
def test_planted_decoder_rows_through_the_instrument(tiny_mllm, monkeypatch):
    """A decoder row planted on the model's own ViT outliers gives H_i = 1 and F by hand; one
    planted on other tokens gives H_i = 0."""
    mllm = tiny_mllm("llava")
    samples = _pope(2)
    first = O.measure_outlier_overlap(mllm, samples, show_progress=False, batch_size=1)
    tops = [r["vision_top"] for r in first.numbers["per_sample"]]
    assert all(len(t) == 10 for t in tops)
    positions = [mllm.prepare([s["image"]], [s["question"]]).layouts[0][0].positions for s in samples]
    weights = torch.tensor([0.3, 0.2, 0.1, 0.08, 0.07, 0.06, 0.05, 0.04, 0.03, 0.02])
    current = {"sample": 0}

    def planted_row(tokens):
        def answer_row(self, sample, n_tokens):
            row = torch.zeros(self.prompt_length)
            pos = positions[current["sample"]]
            row[pos] = 0.001  # every image token gets a little
            row[pos[tokens(current["sample"])]] = weights
            current["sample"] += 1
            return row
        return answer_row

    monkeypatch.setattr(O.AnswerAttention, "answer_row", planted_row(lambda b: torch.tensor(tops[b])))
    same = O.measure_outlier_overlap(mllm, samples, show_progress=False, batch_size=1)
    total = float(weights.sum()) + 0.001 * 6
    for record in same.numbers["per_sample"]:
        assert record["h"] == [1.0] * 10
        assert record["f"] == pytest.approx(0.6 / total)
        assert record["decoder_top"] == record["vision_top"]
    assert same.numbers["f"]["all"] == pytest.approx(0.6 / total)

    others = [torch.tensor([t for t in range(16) if t not in top[:5]][:10]) for top in tops]
    current["sample"] = 0
    monkeypatch.setattr(O.AnswerAttention, "answer_row", planted_row(lambda b: others[b]))
    apart = O.measure_outlier_overlap(mllm, samples, show_progress=False, batch_size=1, max_rank=5)
    for record in apart.numbers["per_sample"]:
        assert record["h"] == [0.0] * 5
        assert record["f"] == pytest.approx(0.003 / total)


def test_hallucination_split_pope(tiny_mllm, monkeypatch):
    mllm = tiny_mllm("llava")
    answers = iter(["Yes", "Yes", "No", "Yes"])
    monkeypatch.setattr(type(mllm), "decode", lambda self, ids: next(answers))
    samples = [{**s, "label": label} for s, label in zip(_pope(4), ["yes", "no", "no", "no"])]
    result = O.measure_outlier_overlap(mllm, samples, show_progress=False, batch_size=4)
    # a "yes" to an absent object hallucinates; a wrong "no" would be a miss, not a hallucination
    assert [r["hallucinated"] for r in result.numbers["per_sample"]] == [False, True, False, True]
    assert result.numbers["counts"] == {"hallucinated": 2, "not_hallucinated": 2, "all": 4}
    assert result.numbers["scorer"] == "pope/canonical"
    assert len(result.numbers["h_i"]["hallucinated"]) == 10


def test_hallucination_split_micro_chair(tiny_mllm, monkeypatch):
    mllm = tiny_mllm("llava")
    answers = iter(["a red circle and a blue cross", "a red circle"])
    monkeypatch.setattr(type(mllm), "decode", lambda self, ids: next(answers))
    samples = [{"id": f"micro-chair-val-{i}", "image": _image(i), "question": "What objects are in this picture?",
                "gt_objects": ["circle"]} for i in range(2)]
    result = O.measure_outlier_overlap(mllm, samples, show_progress=False, max_new_tokens=2)
    assert [r["hallucinated"] for r in result.numbers["per_sample"]] == [True, False]
    assert result.numbers["scorer"] == "micro-chair/canonical"


# ---------------------------------------------------------------------- every family

@pytest.mark.parametrize("family", FAMILIES)
def test_every_family(tiny_mllm, family):
    mllm = tiny_mllm(family)
    samples = _pope(2)
    batch = mllm.prepare([samples[0]["image"]], [samples[0]["question"]])
    with torch.no_grad():
        before = mllm.model(**batch.inputs).logits
    hooks, impl = _hooks(mllm.model), text_attention(mllm.model)
    result = O.measure_outlier_overlap(mllm, samples, show_progress=False, max_new_tokens=3)
    numbers = result.numbers
    assert result.n_samples == 2 and len(numbers["per_sample"]) == 2 and result.figure is not None
    for record in numbers["per_sample"]:
        n = record["n_tokens"]
        if family in TOKENS:
            assert n == TOKENS[family]
        else:  # Qwen, Gemma 3: one ranked token per (pooled) LM image token
            assert n == mllm.prepare([_image(0)], ["q"]).layouts[0][0].num_tokens
        assert len(record["h"]) == min(10, n)
        assert all(0.0 <= h <= 1.0 for h in record["h"]) and 0.0 < record["f"] <= 1.0
    no_cls = family.startswith("qwen") or family in NO_CLS  # the towers without a [CLS]: the substitute
    assert numbers["cls"] is (not no_cls)
    assert ("substitute" in numbers["vision_ranking"]) is no_cls
    assert numbers["decoder_layers"] == list(range(mllm.adapter.num_layers))
    assert _hooks(mllm.model) == hooks and text_attention(mllm.model) == impl and _handler_attrs(mllm.model) == 0
    with torch.no_grad():
        after = mllm.model(**batch.inputs).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_model_unchanged_after_an_exception(tiny_mllm, monkeypatch):
    mllm = tiny_mllm("instructblip")
    hooks, impl = _hooks(mllm.model), text_attention(mllm.model)
    seen = []

    def failing(batch, **kwargs):
        seen.append((_handler_attrs(mllm.model), _hooks(mllm.model) > hooks))
        raise RuntimeError("boom inside generate")

    monkeypatch.setattr(mllm, "generate", failing)
    with pytest.raises(RuntimeError, match="boom"):
        O.measure_outlier_overlap(mllm, _pope(1), show_progress=False)
    assert seen == [(mllm.adapter.num_layers, True)]  # handlers and hooks were in place when it failed
    assert _hooks(mllm.model) == hooks and text_attention(mllm.model) == impl and _handler_attrs(mllm.model) == 0


def test_refusals(tiny_mllm):
    mllm = tiny_mllm("llava")
    with pytest.raises(UserInputError, match="hallucination"):
        O.measure_outlier_overlap(mllm, [{"id": "d", "image": _image(0), "question": "q?", "answer": "4"}],
                                  show_progress=False)
    with pytest.raises(UserInputError, match="rows"):
        O.measure_outlier_overlap(mllm, _pope(1), show_progress=False, rows="all")
    with pytest.raises(UserInputError, match="outside"):
        O.measure_outlier_overlap(mllm, _pope(1), show_progress=False, layers="9")
    with pytest.raises(UserInputError, match="at least one"):
        O.measure_outlier_overlap(mllm, [], show_progress=False)
    inst = get_instrument("outlier-overlap")
    assert inst.default_benchmark == "micro-chair"
    assert inst.parse_options({"layers": "1-2", "rows": "first"})["layers"] == "1-2"


def test_cli_measure_writes_both_files(tiny_dir, tmp_path, capsys):
    code = 0
    try:
        main(["measure", "outlier-overlap", "--model", str(tiny_dir("llava")), "-o", str(tmp_path / "out"),
              "--benchmark", "micro-pope", "--limit", "2", "--option", "max_new_tokens=2"])
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads((tmp_path / "out" / "outlier-overlap.json").read_text())
    assert (tmp_path / "out" / "outlier-overlap.png").is_file()
    assert data["n_samples"] == 2 and data["settings"]["benchmark"] == "micro-pope"
    assert "H_1 hallucinated / not" in out and "F hallucinated / not" in out
