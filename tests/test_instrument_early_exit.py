"""DeCo's early-exit curves and no-image prior overlap (innersight.instruments.early_exit).

Oracles: early-exit probabilities recomputed by hand (final norm + LM head + softmax on the
``output_hidden_states`` of a plain forward; the last entry is already normed); the last layer's
readout equals the model's own next-token distribution; summaries of hand-built curves; prior
overlap counts from known answers (pure function and a stubbed generator); the no-image answer
equals a greedy loop over the bare language model; the model is unchanged afterwards.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from innersight.adapters import FAMILIES  # noqa: E402
from innersight.errors import MethodError, UserInputError
from innersight.instruments import early_exit as ee
from innersight.instruments import get_instrument, write_measurement


def _image(seed: int, w: int = 90, h: int = 60) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _pope_samples() -> list[dict]:
    return [
        {"id": "p0", "image": _image(0), "question": "is there a cat in the image?", "label": "yes"},
        {"id": "p1", "image": _image(1, 50, 80), "question": "is there a dog in the picture?", "label": "no"},
        {"id": "d0", "image": _image(2), "question": "what is the digit?", "answer": "7"},
    ]


def _hooks(mllm) -> list[tuple[int, int]]:
    modules = [*mllm.adapter.decoder_layers, mllm.adapter.final_norm, mllm.adapter.lm_head, mllm.model]
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in modules]


def _hand_probs(mllm, samples) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer next-token probabilities [B, L, V] from output_hidden_states, and the model's
    own next-token probabilities [B, V]."""
    adapter = mllm.adapter
    batch = mllm.prepare([s["image"] for s in samples], [s["question"] for s in samples])
    with torch.no_grad():
        out = mllm.model(**batch.inputs, output_hidden_states=True)
        hs = adapter.decoder_hidden_states(out)
        depth = adapter.num_layers
        layers = [adapter.lm_head(adapter.final_norm(hs[i][:, -1])) for i in range(1, depth)]
        layers.append(adapter.lm_head(hs[depth][:, -1]))  # already normed: never norm twice
        logits = torch.stack(layers, dim=1).float()  # [B, L, V]
    return torch.softmax(logits, -1), torch.softmax(out.logits[:, -1].float(), -1)


# ---------------------------------------------------------------------------------- tokens
def test_answer_token_ids(tiny_mllm):
    tok = tiny_mllm("llava").adapter.tokenizer
    assert ee.answer_token_ids(tok, "yes") == (tok.convert_tokens_to_ids("yes"),)
    assert ee.answer_token_ids(tok, " No ") == (tok.convert_tokens_to_ids("no"),)
    assert ee.answer_token_ids(tok, "zebra") == ()  # the word-level tokenizer has no such word
    assert ee.answer_token_ids(tok, "") == ()


class _CaseTokenizer:
    """A tokenizer with distinct tokens for 'Yes', 'yes', ' yes' and a lone 'Y'."""

    vocab = {"Yes": 1, "yes": 2, " yes": 3, " Yes": 4, "Y": 5, " ": 6}

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        if text in self.vocab:
            return {"input_ids": [self.vocab[text]]}
        return {"input_ids": [6, 5]}  # a space token first, then 'Y'

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        inverse = {v: k for k, v in self.vocab.items()}
        return "".join(inverse[i] for i in ids)


def test_answer_token_ids_collects_spellings_and_skips_blank_pieces():
    # 'yes', ' yes', 'Yes', ' Yes' are four tokens; a first token that decodes to blank is skipped
    assert sorted(ee.answer_token_ids(_CaseTokenizer(), "yes")) == [1, 2, 3, 4]
    # 'YES' as written has no token: its first piece is blank -> skipped, the others are found
    assert sorted(ee.answer_token_ids(_CaseTokenizer(), "YES")) == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------- curves
def test_curves_equal_hand_computation_on_tiny_llava(tiny_mllm):
    mllm = tiny_mllm("llava")
    samples = _pope_samples()
    tok = mllm.adapter.tokenizer
    probs, own = _hand_probs(mllm, samples)
    curves, skipped = ee.exit_curves(mllm, samples, batch_size=3)
    assert skipped == [] and [c.id for c in curves] == ["p0", "p1", "d0"]
    yes, no, seven = (tok.convert_tokens_to_ids(w) for w in ("yes", "no", "7"))
    depth = mllm.adapter.num_layers
    for b, (right, wrong) in enumerate([(yes, no), (no, yes), (seven, None)]):
        c = curves[b]
        assert len(c.p_right) == depth == len(c.right_top1)
        torch.testing.assert_close(torch.tensor(c.p_right), probs[b, :, right], rtol=1e-5, atol=1e-7)
        assert c.right_top1 == [bool(probs[b, i].argmax() == right) for i in range(depth)]
        assert c.correct == bool(own[b].argmax() == right)
        if wrong is not None:
            assert c.kind == "yes/no" and c.hallucinated == ("no" if right == yes else "yes")
            torch.testing.assert_close(torch.tensor(c.p_hallucinated), probs[b, :, wrong], rtol=1e-5, atol=1e-7)
        else:
            assert c.kind == "answer"
            top = int(own[b].argmax())
            if c.correct:
                assert c.hallucinated is None and c.p_hallucinated is None
            else:  # the model's own (wrong) final prediction
                assert c.hallucinated == tok.decode([top])
                torch.testing.assert_close(torch.tensor(c.p_hallucinated), probs[b, :, top], rtol=1e-5, atol=1e-7)
    # the same readings one sample at a time (padding must not matter)
    alone = [ee.exit_curves(mllm, [s], batch_size=1)[0][0] for s in samples]
    for a, c in zip(alone, curves):
        torch.testing.assert_close(torch.tensor(a.p_right), torch.tensor(c.p_right), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_last_layer_is_the_models_own_distribution(tiny_mllm, family):
    mllm = tiny_mllm(family)
    samples = _pope_samples()
    batch = mllm.prepare([s["image"] for s in samples], [s["question"] for s in samples])
    depth = mllm.adapter.num_layers
    with torch.no_grad():
        plain = mllm.model(**batch.inputs).logits[:, -1].float()  # [B, V]
    seen = ee.last_position_pass(mllm, batch, range(1, depth + 1))
    assert seen.layer_logits.shape == (3, depth, plain.shape[-1])
    assert seen.hidden.shape == (3, depth, mllm.adapter.hidden_size)
    torch.testing.assert_close(seen.layer_logits[:, -1], plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seen.final_logits, plain, rtol=1e-4, atol=1e-5)
    # a preceding layer is not the last one (the readout differs per layer)
    assert not torch.allclose(seen.layer_logits[:, 0], plain, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_early_exit_instrument_on_every_family(tiny_mllm, family, tmp_path):
    mllm = tiny_mllm(family)
    samples = _pope_samples()
    probs, own = _hand_probs(mllm, samples)
    before_hooks = _hooks(mllm)
    batch = mllm.prepare([s["image"] for s in samples], [s["question"] for s in samples])
    with torch.no_grad():
        before = mllm.model(**batch.inputs).logits
    result = get_instrument("early-exit").function(mllm, samples, model_name=f"tiny-{family}", batch_size=2)
    depth = mllm.adapter.num_layers
    numbers = result.numbers
    assert numbers["layers"] == list(range(1, depth + 1))
    tok = mllm.adapter.tokenizer
    right = [tok.convert_tokens_to_ids(w) for w in ("yes", "no", "7")]
    correct = [bool(own[b].argmax() == right[b]) for b in range(3)]
    assert numbers["summary"]["accuracy"] == pytest.approx(100 * sum(correct) / 3)  # percent
    assert [s["correct"] for s in numbers["samples"]] == correct
    # the last layer's right-token probability is the model's own next-token probability
    for b, s in enumerate(numbers["samples"]):
        assert s["p_right"][-1] == pytest.approx(float(own[b, right[b]]), rel=1e-4, abs=1e-6)
    all_group = numbers["groups"]["all"]
    assert all_group["n"] == 3 and len(all_group["p_right"]) == depth
    expected = probs[torch.arange(3), :, torch.tensor(right)].mean(0)  # [L]
    np.testing.assert_allclose(all_group["p_right"], expected.numpy(), rtol=1e-4, atol=1e-6)
    # the model is unchanged
    assert _hooks(mllm) == before_hooks
    with torch.no_grad():
        torch.testing.assert_close(mllm.model(**batch.inputs).logits, before)
    json_path, png_path = write_measurement(result, tmp_path)
    assert json.loads(json_path.read_text())["n_samples"] == 3 and png_path.stat().st_size > 0


@pytest.mark.parametrize("name", ["early-exit", "probe"])
def test_hooks_removed_after_an_exception(tiny_mllm, name):
    """A failure in the last decoder layer during the early-exit forward leaves no hook behind
    (the probe reads its states through the same pass)."""
    mllm = tiny_mllm("llava")
    samples = [{"id": f"p{i}", "image": _image(i), "question": "is there a cat?", "label": "yes" if i % 2 else "no"}
               for i in range(4)]
    before = _hooks(mllm)
    seen = []

    def boom(module, args):
        seen.append(_hooks(mllm))
        raise RuntimeError("boom in the last layer")

    handle = mllm.adapter.decoder_layers[-1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            get_instrument(name).function(mllm, samples)
    finally:
        handle.remove()
    assert len(seen) == 1 and sum(map(sum, seen[0])) > sum(map(sum, before)) + 1  # hooks were in place
    assert _hooks(mllm) == before


def _curve(cid: str, correct: bool, p_right: list[float], top1: list[bool], p_hall: list[float] | None) -> ee.ExitCurve:
    return ee.ExitCurve(id=cid, kind="yes/no", right="yes", right_tokens=["yes"], correct=correct, p_right=p_right,
                        right_top1=top1, hallucinated="no" if p_hall is not None else None, p_hallucinated=p_hall)


def test_summary_of_hand_built_curves():
    curves = [
        _curve("a", True, [0.2, 0.4, 0.9], [False, False, True], [0.1, 0.3, 0.05]),
        _curve("b", False, [0.6, 0.5, 0.2], [True, False, False], [0.3, 0.4, 0.7]),
        _curve("c", False, [0.1, 0.3, 0.1], [False, True, False], None),
        _curve("d", False, [0.1, 0.1, 0.1], [False, False, False], [0.5, 0.6, 0.8]),
    ]
    s = ee.summarise_curves(curves, 3)
    assert s["layers"] == [1, 2, 3]
    assert s["groups"]["correct"]["n"] == 1 and s["groups"]["wrong"]["n"] == 3
    np.testing.assert_allclose(s["groups"]["wrong"]["p_right"], [0.8 / 3, 0.9 / 3, 0.4 / 3])
    np.testing.assert_allclose(s["groups"]["wrong"]["p_hallucinated"], [0.4, 0.5, 0.75])  # b and d only
    assert s["groups"]["wrong"]["n_hallucinated"] == 2
    np.testing.assert_allclose(s["groups"]["wrong"]["right_top1_share"], [1 / 3, 1 / 3, 0.0])
    np.testing.assert_allclose(s["groups"]["all"]["p_right"], [0.25, 0.325, 0.325])
    deco = s["deco"]
    # b (layer 1) and c (layer 2) are recoverable from a preceding layer, d is not
    assert deco["wrong"] == 3 and deco["recoverable"] == 2
    assert deco["share_of_wrong"] == pytest.approx(2 / 3) and deco["share_of_all"] == pytest.approx(0.5)
    assert deco["first_right_layer_counts"] == {"1": 1, "2": 1}
    assert deco["peak_right_layer_when_wrong"] == 2  # 0.3 at layer 2 beats 0.267 at layer 1


def test_early_exit_input_errors(tiny_mllm):
    mllm = tiny_mllm("llava")
    with pytest.raises(UserInputError, match="at least one sample"):
        ee.measure_early_exit(mllm, [])
    with pytest.raises(UserInputError, match="label"):
        ee.measure_early_exit(mllm, [{"id": "x", "image": _image(0), "question": "what?"}])
    with pytest.raises(UserInputError, match="vocabulary"):
        ee.measure_early_exit(mllm, [{"id": "x", "image": _image(0), "question": "what?", "answer": "zebra"}])


# ---------------------------------------------------------------------------------- prior overlap
def test_prior_overlap_numbers_micro_parser():
    samples = [
        {"id": "a", "gt_objects": ["circle", "star"]},
        {"id": "b", "gt_objects": ["square"]},
        {"id": "c", "gt_objects": ["digit"]},
    ]
    with_image = [
        "a red circle, a blue triangle and a green square",  # triangle, square hallucinated
        "a red square and a blue triangle and a blue triangle",  # triangle hallucinated (once)
        "a red digit 7",  # nothing hallucinated
    ]
    without_image = ["a blue triangle and a red cross", "a red square", "a green circle"]
    parser = ee.choose_parser(samples, "auto")
    assert parser == "micro"
    n = ee.prior_overlap_numbers(samples, with_image, without_image, parser, top=5)
    s = n["summary"]
    assert s["hallucinated_objects"] == 3 and s["also_without_image"] == 1
    assert s["share_in_prior"] == pytest.approx(1 / 3)
    # circle (a), square (b), digit (c); only the square is named again without the image
    assert n["correct_objects"] == 3 and n["correct_also_without_image"] == 1
    assert s["correct_share_in_prior"] == pytest.approx(1 / 3)
    assert n["samples_with_hallucination"] == 2
    assert n["top_hallucinated"] == [{"object": "triangle", "count": 2, "also_without_image": 1},
                                     {"object": "square", "count": 1, "also_without_image": 0}]
    assert n["samples"][0]["hallucinated_in_prior"] == ["triangle"]


def test_prior_overlap_numbers_chair_parser():
    samples = [{"id": "a", "gt_objects": ["dogs", "sofa"]}, {"id": "b", "gt_objects": ["person"]}]
    assert ee.choose_parser(samples, "auto") == "chair"
    n = ee.prior_overlap_numbers(samples, ["A dog and a cat on a couch.", "A man holding a cup."],
                                 ["A cat sitting next to people.", "A woman and a clock."], "chair")
    # a: cat hallucinated (also without image); b: cup hallucinated (not without image)
    s = n["summary"]
    assert (s["hallucinated_objects"], s["also_without_image"]) == (2, 1)
    assert n["correct_objects"] == 3 and n["correct_also_without_image"] == 1  # person in b's prior
    with pytest.raises(UserInputError, match="parser"):
        ee.choose_parser(samples, "coco")


def test_prior_overlap_on_a_stubbed_generator(tiny_mllm, monkeypatch, tmp_path):
    mllm = tiny_mllm("llava")
    answers = {
        ("a", True): "a red circle and a blue star", ("a", False): "a blue star",
        ("b", True): "a red cross and a green star", ("b", False): "a green star and a red cross",
        ("c", True): "a blue diamond", ("c", False): "a red square",
    }
    calls = []

    def fake(mllm_, chunk, questions, *, with_image, template, max_new_tokens):
        calls.append((len(chunk), with_image, max_new_tokens))
        return [answers[(s["id"], with_image)] for s in chunk]

    monkeypatch.setattr(ee, "describe", fake)
    samples = [{"id": i, "image": _image(k), "question": "describe the objects in the image.", "gt_objects": gt}
               for k, (i, gt) in enumerate([("a", ["circle"]), ("b", ["cross"]), ("c", ["diamond", "circle"])])]
    result = get_instrument("prior-overlap").function(mllm, samples, model_name="stub", batch_size=2,
                                                      max_new_tokens=7)
    assert calls == [(2, True, 7), (2, False, 7), (1, True, 7), (1, False, 7)]
    s = result.numbers["summary"]
    assert (s["hallucinated_objects"], s["also_without_image"]) == (2, 2)  # star in a and in b
    assert s["share_in_prior"] == 1.0
    assert result.numbers["top_hallucinated"] == [{"object": "star", "count": 2, "also_without_image": 2}]
    assert result.numbers["correct_objects"] == 3 and result.numbers["correct_also_without_image"] == 1
    json_path, png_path = write_measurement(result, tmp_path)
    data = json.loads(json_path.read_text())
    assert data["numbers"]["summary"]["share_in_prior"] == 1.0 and data["settings"]["parser"] == "micro"
    assert png_path.stat().st_size > 0


def test_prior_overlap_reports_nan_share_without_hallucinations():
    n = ee.prior_overlap_numbers([{"gt_objects": ["circle"]}], ["a red circle"], [""], "micro")
    assert n["summary"]["hallucinated_objects"] == 0 and math.isnan(n["summary"]["share_in_prior"])


@pytest.mark.parametrize("family", FAMILIES)
def test_no_image_answer_is_the_language_model_alone(tiny_mllm, family):
    """The no-image answer equals a greedy loop over the bare decoder stack + LM head on the
    prompt formatted with zero images (batched with left padding)."""
    mllm = tiny_mllm(family)
    adapter = mllm.adapter
    tok = adapter.tokenizer
    questions = ["describe the objects in the image.", "what is it?"]
    got = ee.generate_without_image(mllm, questions, max_new_tokens=4)
    for question, text in zip(questions, got):
        prompt = adapter.format_prompt(question, 0)
        ids = tok(prompt, return_tensors="pt")["input_ids"]  # [1, L]
        assert adapter.image_token_id not in ids[0].tolist()
        new: list[int] = []
        for _ in range(4):
            with torch.no_grad():
                hidden = adapter.language_model(input_ids=ids).last_hidden_state  # [1, L, D]
                token = int(adapter.lm_head(hidden[:, -1]).argmax())
            if token in (tok.eos_token_id, tok.pad_token_id):
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        assert text == mllm.decode(new)


@pytest.mark.parametrize("family", FAMILIES)
def test_prior_overlap_runs_on_every_family(tiny_mllm, family):
    mllm = tiny_mllm(family)
    samples = [{"id": f"c{i}", "image": _image(i), "question": "describe the objects in the image.",
                "gt_objects": ["circle"]} for i in range(2)]
    before_hooks = _hooks(mllm)
    result = ee.measure_prior_overlap(mllm, samples, model_name=family, max_new_tokens=3)
    rows = result.numbers["samples"]
    assert len(rows) == 2 and all(isinstance(r["without_image"], str) for r in rows)
    with_image = [a.text for a in mllm.answer_batch([s["image"] for s in samples],
                                                    [s["question"] for s in samples], max_new_tokens=3)]
    assert [r["with_image"] for r in rows] == with_image
    assert _hooks(mllm) == before_hooks


def test_text_only_refuses_unknown_family():
    class Fake:
        class adapter:  # noqa: N801
            family = "blip3"
            text_only_module = None  # the adapter knows no text-only path

    with pytest.raises(MethodError, match="no text-only"):
        ee.text_only_model(Fake())


def test_prior_overlap_needs_gt_objects(tiny_mllm):
    with pytest.raises(UserInputError, match="gt_objects"):
        ee.measure_prior_overlap(tiny_mllm("llava"), [{"id": "x", "image": _image(0), "question": "describe"}])


# ---------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory):
    from innersight.demo import micro

    return micro.save(*micro.build_untrained(seed=0), tmp_path_factory.mktemp("micro") / "micro")


def test_cli_early_exit_writes_json_and_png(micro_dir, tmp_path, capsys):
    from innersight.cli import main

    out = tmp_path / "out"
    try:
        main(["measure", "early-exit", "--model", str(micro_dir), "--limit", "4", "-o", str(out)])
    except SystemExit as exc:  # typer may exit 0 explicitly
        assert not exc.code
    printed = capsys.readouterr().out
    data = json.loads((out / "early-exit.json").read_text())
    assert data["instrument"] == "early-exit" and data["n_samples"] == 4
    assert data["settings"]["benchmark"] == "micro-pope"
    assert len(data["numbers"]["layers"]) == 4  # the micro model's decoder depth
    assert (out / "early-exit.png").stat().st_size > 0
    assert "accuracy" in printed and "figure:" in printed


def test_cli_prior_overlap_writes_json_and_png(micro_dir, tmp_path, capsys):
    from innersight.cli import main

    out = tmp_path / "out"
    try:
        main(["measure", "prior-overlap", "--model", str(micro_dir), "--limit", "2", "-o", str(out),
              "--option", "max_new_tokens=4"])
    except SystemExit as exc:
        assert not exc.code
    data = json.loads((out / "prior-overlap.json").read_text())
    assert data["numbers"]["parser"] == "micro" and len(data["numbers"]["samples"]) == 2
    assert (out / "prior-overlap.png").stat().st_size > 0
