"""ONLY: the decoding rule and the head selection by hand, the enhanced logits against an oracle
built from the model's own eager attention weights and per-head outputs, identity at zero
strength, batch == unbatched, the model restored, refusals."""

from __future__ import annotations

import math

import pytest
import torch

from innersight.adapters import FAMILIES  # noqa: E402
from innersight.attention import set_text_attention, text_attention
from innersight.decode.only import ONLY, ONLYConfig, cleaned_entropy, kept_heads, only_scores
from innersight.errors import MethodError
from innersight.methods import resolve_methods
from innersight.testing.steps import assert_restored_after_exit_and_exception

QUESTIONS = ["what is it?", "is there a dog in the picture?"]


def _entropy_by_hand(values: list[float]) -> float:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    kept = [0.0 if v > mean + std else v for v in values]
    total = sum(kept)
    return -sum(v / total * math.log(v / total) for v in kept if v > 0)


def test_cleaned_entropy_and_head_selection_by_hand():
    text_cols = torch.tensor([False, True, True, True, False, False, False])
    image_cols = torch.tensor([False, False, False, False, True, True, True])
    rows = torch.tensor([[0.1, 0.2, 0.2, 0.2, 0.1, 0.1, 0.1],    # flat text
                         [0.1, 0.6, 0.05, 0.05, 0.1, 0.05, 0.05],  # peaked text
                         [0.1, 0.1, 0.1, 0.1, 0.5, 0.05, 0.05]])   # peaked image
    for h in range(3):
        t = _entropy_by_hand([float(rows[h, i]) for i in range(1, 4)])
        assert float(cleaned_entropy(rows[h], text_cols)) == pytest.approx(t, abs=1e-6)
    keep, ratio = kept_heads(rows[None], text_cols[None], image_cols[None])
    by_hand = [_entropy_by_hand(rows[h, 1:4].tolist()) / _entropy_by_hand(rows[h, 4:].tolist()) for h in range(3)]
    torch.testing.assert_close(ratio[0], torch.tensor(by_hand), atol=1e-5, rtol=1e-5)
    mean = sum(by_hand) / 3
    assert keep[0].tolist() == [r >= mean for r in by_hand]


def test_decoding_rule_by_hand():
    lg = torch.tensor([[2.0, 1.0, -5.0], [2.0, 1.0, -5.0]])
    cd = torch.tensor([[2.0, 1.0, -5.0], [0.0, 3.0, 0.0]])  # row 0 agrees (d = 0), row 1 does not
    out, together = only_scores(lg, cd, alpha_pos=3.0, alpha_neg=1.0, gamma=0.2, beta=0.1)
    assert together.tolist() == [True, False]
    torch.testing.assert_close(out[0, :2], (lg + 3 * cd)[0, :2])
    torch.testing.assert_close(out[1, :2], (2 * lg - cd)[1, :2])
    assert torch.isinf(out[:, 2]).all()  # e^-7 < 0.1 max p
    plain, _ = only_scores(lg, cd, alpha_pos=0.0, alpha_neg=0.0, gamma=0.2, beta=1e-9)
    torch.testing.assert_close(plain, lg)


def _oracle(mllm, batch, config):
    """l_cd of the prompt's last position from the eager attention weights, the per-head outputs
    entering o_proj, and output_hidden_states."""
    adapter = mllm.adapter
    attn = adapter.decoder_layers[config.layer].self_attn
    heads_in = {}

    def keep_input(module, args):
        heads_in.setdefault("x", args[0][:, -1])  # [B, H * d] of the prompt's last position

    handle = attn.o_proj.register_forward_pre_hook(keep_input)
    previous = text_attention(mllm.model)
    try:
        set_text_attention(mllm.model, "eager")
        with torch.no_grad():
            out = mllm.model(**batch.inputs, output_attentions=True, output_hidden_states=True)
    finally:
        set_text_attention(mllm.model, previous)
        handle.remove()
    attentions = out.attentions if hasattr(out, "attentions") else out.language_model_outputs.attentions
    probs = attentions[config.layer][:, :, -1, :].float()  # [B, H, L]
    valid = batch.inputs["attention_mask"].bool()
    image = torch.zeros_like(valid)
    for b, layouts in enumerate(batch.layouts):
        for lay in layouts:
            image[b, lay.positions] = True
    text = valid & ~image
    for b in range(valid.shape[0]):
        text[b, int(valid[b].long().argmax())] = False
    keep, _ = kept_heads(probs, text, image)
    b, heads = probs.shape[:2]
    per_head = heads_in["x"].reshape(b, heads, -1) * keep[..., None]  # [B, H, d]
    enhanced = attn.o_proj(per_head.reshape(b, -1))
    hs = adapter.decoder_hidden_states(out)
    last = adapter.decoder_layers[-1]
    with torch.no_grad():
        x = last.input_layernorm(enhanced) + 0.2 * hs[-2][:, -1]
        x = x + last.mlp(last.post_attention_layernorm(x))
        return adapter.lm_head(adapter.final_norm(x) + 0.5 * hs[-1][:, -1]).float(), out.logits[:, -1].float()


@pytest.mark.parametrize("family", FAMILIES)
def test_enhanced_logits_are_the_eager_oracle(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    batch = mllm.prepare([image(3), image(4, 50, 80)], QUESTIONS)
    config = ONLYConfig()
    (proc,) = ONLY(config).processors(mllm, batch, {})
    with proc, torch.no_grad():
        logits = mllm.model(**batch.inputs).logits[:, -1].float()
        enhanced = proc.branch.logits()
    expected, plain = _oracle(mllm, batch, config)
    torch.testing.assert_close(logits, plain, atol=1e-4, rtol=1e-4)  # the model's own logits untouched
    torch.testing.assert_close(enhanced, expected, atol=1e-4, rtol=1e-4)
    assert 0 < int(proc.branch.keep.sum()) < proc.branch.keep.numel()  # some heads removed, some kept


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_strength_is_plain_and_batch_equals_unbatched(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    images = [image(8), image(9, 50, 80)]
    plain = [a.token_ids for a in mllm.answer_batch(images, QUESTIONS, max_new_tokens=4)]
    zero = mllm.answer_batch(images, QUESTIONS, methods=["only"], max_new_tokens=4,
                             settings={"only": {"alpha_pos": "0", "alpha_neg": "0"}})
    assert [a.token_ids for a in zero] == plain
    for settings in ({"only": {"gamma": "0"}}, {"only": {"gamma": "2.1"}}):  # all contrastive / collaborative
        both = mllm.answer_batch(images, QUESTIONS, methods=["only"], settings=settings, max_new_tokens=4)
        alone = [mllm.answer(i, q, methods=["only"], settings=settings, max_new_tokens=4).token_ids
                 for i, q in zip(images, QUESTIONS)]
        assert [a.token_ids for a in both] == alone


def test_strong_only_changes_the_answer(tiny_mllm, image):
    mllm = tiny_mllm("llava")
    plain = mllm.answer(image(0), QUESTIONS[1], max_new_tokens=6)
    only = mllm.answer(image(0), QUESTIONS[1], methods=["only"], settings={"only": {"gamma": "0", "alpha_neg": "5"}},
                       max_new_tokens=6)
    assert only.token_ids != plain.token_ids
    steps = only.details["only"]["collaborative_steps"]
    assert steps and set(steps) == {0}  # gamma = 0: every step contrastive


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_model_restored_after_exit_and_after_exception(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    assert_restored_after_exit_and_exception(mllm, image(10), "only", None, attention=True)


def test_refusals(tiny_mllm, image):
    mllm = tiny_mllm("llava")
    for bad in ({"alpha_pos": -1.0}, {"beta": 0.0}, {"gamma": float("nan")}, {"layer": -1}):
        with pytest.raises(MethodError):
            ONLYConfig(**bad)
    with pytest.raises(MethodError, match="before the model's last layer"):
        mllm.answer(image(0), "what is it?", methods=["only"], settings={"only": {"layer": "1"}})
    with pytest.raises(MethodError, match="beam search"):
        mllm.answer(image(0), "what is it?", methods=["only"], num_beams=2)
    batch = mllm.prepare([image(0), [image(1), image(2)]], ["a?", "b?"])
    batch.layouts[0] = []
    with pytest.raises(MethodError, match="an image in every sample"):
        ONLY().processors(mllm, batch, {})
    assert "2507.00898" in ONLYConfig.__dataclass_fields__["alpha_pos"].metadata["source"]
    assert resolve_methods(["only"], {"only": {"layer": "0"}}).objects[0].config.layer == 0
