"""DAMRO: the contrast closed form, outlier selection against eager attentions, the negative
branch's inputs per family, batched == serial == unbatched, KV-cache consistency, restoration."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from innersight.decode.contrast import (
    BRANCH_MODES,
    ContrastiveProcessor,
    contrast,
    plausibility_cutoff,
)
from innersight.decode.damro import (
    DAMRO,
    OFFICIAL_GENERATION,
    REDUCTIONS,
    DAMROConfig,
    OutlierCapture,
    cls_attention,
    received_attention,
    top_outliers,
)
from innersight.errors import MethodError
from innersight.methods import resolve_methods
from innersight.testing.faults import RaiseOnStep

NEG = float("-inf")
from innersight.adapters import FAMILIES  # noqa: E402

#: outlier count per tiny family (LLaVA 16 patches, LLaVA-NeXT 4 base patches, InstructBLIP 16
#: ViT patches, Qwen >= 2 merged tokens for the test images, LLaVA-OneVision 9 base patches, InternVL a 2x2-token
#: thumbnail / tile, Gemma 3 16 pooled tokens of 64 patches, SmolVLM 9 tokens a frame)
K = {"llava": 3, "llava_next": 2, "instructblip": 3, "qwen2_vl": 2, "qwen2_5_vl": 2, "qwen3_vl": 2, "llava_onevision": 3,
     "internvl": 2, "gemma3": 3, "smolvlm": 2}
QUESTIONS = ["what is it?", "is there a dog in the picture?"]
#: families whose negative image ends with one ``image_newline`` token after the kept base tokens
NEWLINE_FAMILIES = ("llava_next", "llava_onevision")


def _settings(family: str, **extra) -> dict:
    return {"damro": {"k": K[family], **extra}}


def _processor(mllm, batch, **config) -> ContrastiveProcessor:
    (proc,) = DAMRO(DAMROConfig(**config)).processors(mllm, batch, {})
    return proc


def _generate(mllm, batch, proc, steps=4, **kwargs):
    with proc:
        return mllm.generate(batch, max_new_tokens=steps, logits_processor=LogitsProcessorList([proc]), **kwargs)


# ---------------------------------------------------------------------- the contrast, synthetic
def test_contrast_closed_form_hand_computed():
    main = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    neg = torch.tensor([[1.0, 2.0, -3.0, 0.0]])
    # cutoff = 2 + log(0.3) = 0.796: tokens 0 (2.0) and 1 (1.0) kept; 2 (-1.0) and 3 (0.5) cut
    out = contrast(main, neg, alpha=2.0, beta=0.3)
    torch.testing.assert_close(out, torch.tensor([[3 * 2.0 - 2 * 1.0, 3 * 1.0 - 2 * 2.0, NEG, NEG]]))
    assert int(out.argmax()) == 0
    # a stronger contrast flips the choice: (1 + 5) * 2 - 5 * 1 = 7 vs 6 * 1 - 5 * (-1) = 11
    flipped = contrast(main, torch.tensor([[1.0, -1.0, 0.0, 0.0]]), alpha=5.0, beta=0.3)
    torch.testing.assert_close(flipped, torch.tensor([[7.0, 11.0, NEG, NEG]]))
    torch.testing.assert_close(plausibility_cutoff(main, 0.3), torch.tensor([[2.0 + math.log(0.3)]]))


def test_cutoff_is_the_probability_rule_and_rows_are_independent():
    gen = torch.Generator().manual_seed(0)
    main, neg = torch.randn(3, 50, generator=gen) * 3, torch.randn(3, 50, generator=gen)
    before = main.clone()
    out = contrast(main, neg, alpha=1.5, beta=0.1)
    p = torch.softmax(main.double(), -1)
    kept = p >= 0.1 * p.max(-1, keepdim=True).values
    assert torch.equal(torch.isfinite(out), kept)
    torch.testing.assert_close(out[kept], (2.5 * main - 1.5 * neg)[kept])
    for row in range(3):
        torch.testing.assert_close(contrast(main[row:row + 1], neg[row:row + 1], alpha=1.5, beta=0.1), out[row:row + 1])
    torch.testing.assert_close(main, before)  # pure


def test_alpha_zero_keeps_the_plausible_logits_and_the_argmax():
    main = torch.tensor([[0.3, 4.0, 3.5, -2.0]])
    out = contrast(main, torch.tensor([[9.0, -9.0, 9.0, 9.0]]), alpha=0.0, beta=0.1)
    # cutoff 4 + log 0.1 = 1.70: tokens 1 and 2 keep their logits, the argmax stays 1
    torch.testing.assert_close(out, torch.tensor([[NEG, 4.0, 3.5, NEG]]))


def test_contrast_shape_mismatch_refused():
    with pytest.raises(MethodError, match="do not match"):
        contrast(torch.zeros(2, 4), torch.zeros(1, 4), alpha=1.0, beta=0.1)


# ---------------------------------------------------------------------- scores, synthetic
def test_cls_attention_closed_form_both_reductions():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, 5, 4, generator=gen), torch.randn(2, 3, 5, 4, generator=gen)  # [N, H, L, d]
    for n in range(2):
        dots = [[sum(q[n, h, 0, c].item() * k[n, h, j, c].item() for c in range(4)) for j in range(5)] for h in range(3)]
        one_head = torch.softmax(torch.tensor([sum(dots[h][j] for h in range(3)) for j in range(5)]) / math.sqrt(12), 0)
        per_head = torch.stack([torch.softmax(torch.tensor(dots[h]) / 2.0, 0) for h in range(3)]).mean(0)
        torch.testing.assert_close(cls_attention(q, k, "sum_logits")[n], one_head)
        torch.testing.assert_close(cls_attention(q, k, "mean_heads")[n], per_head)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_received_attention_equals_the_full_matrix_in_any_chunking(reduction):
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 7, 4, generator=gen), torch.randn(2, 7, 4, generator=gen)  # [H, L, d]
    dots = q @ k.transpose(-1, -2)  # [H, L, L]
    if reduction == "sum_logits":
        full = torch.softmax(dots.sum(0) / math.sqrt(8), -1)  # [L, L]
    else:
        full = torch.softmax(dots / 2.0, -1).mean(0)
    expected = full.mean(0)  # attention each key receives, averaged over the queries
    for chunk in (1, 3, 256):
        torch.testing.assert_close(received_attention(q, k, reduction, chunk=chunk), expected)
    assert received_attention(q, k, reduction).sum().item() == pytest.approx(1.0, abs=1e-5)


def test_top_outliers_descending_and_k_checked():
    scores = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05]])
    assert top_outliers(scores, 3).tolist() == [[1, 3, 0]]
    with pytest.raises(MethodError, match="only 5 candidate"):
        top_outliers(scores, 6)


# ---------------------------------------------------------------------- config and registry
@pytest.mark.parametrize("kwargs", [{"alpha": -1.0}, {"alpha": float("nan")}, {"beta": 0.0}, {"beta": 1.5},
                                    {"k": 0}, {"head_reduction": "max"}, {"preset": "paper"}, {"branch": "loop"},
                                    {"task": "mme"}, {"vision_layer": -1}])
def test_invalid_settings_refused(kwargs):
    with pytest.raises(MethodError):
        DAMROConfig(**kwargs)


@pytest.mark.parametrize(("family", "task", "alpha", "k", "reduction"), [
    ("llava", "pope", 2.0, 10, "sum_logits"),
    ("llava_next", "chair", 2.0, 10, "sum_logits"),
    ("instructblip", "pope", 0.5, 4, "mean_heads"),
    ("instructblip", "chair", 1.5, 4, "mean_heads"),
    ("qwen2_vl", "pope", 2.0, 10, "mean_heads"),  # no published values: LLaVA's
])
def test_family_defaults(family, task, alpha, k, reduction):
    c = DAMROConfig(task=task)
    assert (c.resolved_alpha(family), c.resolved_k(family), c.resolved_reduction(family)) == (alpha, k, reduction)
    explicit = DAMROConfig(alpha=0.7, k=2, head_reduction="sum_logits")
    assert (explicit.resolved_alpha(family), explicit.resolved_k(family)) == (0.7, 2)
    assert explicit.resolved_reduction(family) == "sum_logits"


def test_registry_overrides_and_sources():
    plan = resolve_methods(["damro"], {"damro": {"k": "4", "alpha": "1.5", "head_reduction": "mean_heads",
                                                 "preset": "official", "branch": "serial"}})
    (method,) = plan.objects
    assert isinstance(method, DAMRO) and plan.at("decoding") == [method]
    assert method.config == DAMROConfig(k=4, alpha=1.5, head_reduction="mean_heads", preset="official",
                                        branch="serial")
    assert "2410.04514" in DAMROConfig.__dataclass_fields__["beta"].metadata["source"]
    with pytest.raises(MethodError, match="decoding point"):
        resolve_methods(["damro", "deco"])


def test_official_preset_generation_overrides():
    assert DAMRO().generation_overrides(None, {"do_sample": False}) == {}
    official = DAMRO(DAMROConfig(preset="official"))
    over = official.generation_overrides(None, {"max_new_tokens": 4, "temperature": 1.0})
    assert over == OFFICIAL_GENERATION
    assert over["do_sample"] is True and over["top_k"] == 0 and over["top_p"] == 1.0 and over["temperature"] == 1.0
    for clash in ({"temperature": 0.7}, {"do_sample": False}, {"top_p": 0.9}, {"num_beams": 2}):
        with pytest.raises(MethodError, match="official"):
            official.generation_overrides(None, clash)
    assert DAMROConfig(preset="official").shift and not DAMROConfig().shift
    assert not DAMROConfig(preset="official", official_shift=False).shift


# ---------------------------------------------------------------------- outlier selection vs eager
def _eager_vision(tower, pixels):
    """The vision tower's eager attentions (switched back to sdpa afterwards)."""
    previous = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return tower(pixels, output_attentions=True).attentions
    finally:
        tower.set_attn_implementation(previous)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_clip_outliers_equal_hand_computation_from_eager_attentions(tiny_mllm, image, family, reduction):
    mllm = tiny_mllm(family)
    adapter = mllm.adapter
    batch = mllm.prepare([image(0), image(1, 50, 80)], QUESTIONS)
    k = K[family]
    proc = _processor(mllm, batch, k=k, head_reduction=reduction)
    _generate(mllm, batch, proc, steps=1)
    capture = proc.contexts[0]
    pixels = batch.inputs["pixel_values"]
    base = pixels if family == "llava" else pixels[:, 0]  # LLaVA-NeXT: the base view is tile 0
    layer = adapter.outlier_vision_layer
    assert layer == len(adapter.vision_layers) - 2  # vision_feature_layer -2: the layer whose output the projector reads
    attn = _eager_vision(adapter.vision_tower, base)[layer][:, :, 0]  # [N, H, 1 + P] the [CLS] rows
    heads = attn.shape[1]
    if reduction == "mean_heads":
        expected = attn.mean(1)
    else:
        # one head over the full q/k: sum_h q_h.k / sqrt(H d) = sum_h (log p_h + c_h) / sqrt(H)
        expected = torch.softmax(attn.log().sum(1) / math.sqrt(heads), dim=-1)
    expected = expected[:, 1:]  # [N, P] patches
    for i in range(2):
        torch.testing.assert_close(capture.scores[i], expected[i], atol=1e-5, rtol=1e-4)
        assert capture.selected[i].tolist() == expected[i].topk(k).indices.tolist()


def test_instructblip_outliers_mean_heads_and_official_shift(tiny_mllm, image):
    mllm = tiny_mllm("instructblip")
    adapter = mllm.adapter
    batch = mllm.prepare([image(0)], QUESTIONS[:1])
    layer = adapter.outlier_vision_layer
    assert layer == len(adapter.vision_layers) - 2  # reference: encoder.layers[-2]
    attn = _eager_vision(adapter.vision_tower, batch.inputs["pixel_values"])[layer][:, :, 0]  # [1, H, 1 + P]
    expected = attn.mean(1)[0, 1:]
    order = expected.topk(3).indices
    with torch.no_grad():
        vit = adapter.vision_tower(batch.inputs["pixel_values"]).last_hidden_state[0]  # [1 + P, Dv]
    for preset, shift in (("default", 1), ("official", 0)):
        proc = _processor(mllm, batch, k=3, preset=preset)
        assert proc.contexts[0].reduction == "mean_heads"
        _generate(mllm, batch, proc, steps=1)
        capture = proc.contexts[0]
        torch.testing.assert_close(capture.scores[0], expected, atol=1e-5, rtol=1e-4)
        assert capture.selected[0].tolist() == order.tolist()
        # default: patch i is ViT token i + 1; official: the reference's index i (token i, [CLS] at 0)
        torch.testing.assert_close(capture.tokens[0], vit[order + shift])


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_queries_and_keys_reproduce_the_attention_output(tiny_mllm, image, family):
    """The q/k DAMRO reads from a vision attention module's input give back that module's own
    output (with the values and output projection added by hand): the right tensors, heads, rotary."""
    mllm = tiny_mllm(family)
    adapter = mllm.adapter
    batch = mllm.prepare([image(0), image(1, 50, 80)], QUESTIONS)
    module = adapter.vision_attention(adapter.outlier_vision_layer)
    seen = {}

    def pre(mod, args, kwargs):
        seen["hidden"], seen["kwargs"] = (args[0] if args else kwargs["hidden_states"]), dict(kwargs)

    def post(mod, args, kwargs, output):
        seen["out"] = output[0] if isinstance(output, tuple) else output

    handles = [module.register_forward_pre_hook(pre, with_kwargs=True),
               module.register_forward_hook(post, with_kwargs=True)]
    try:
        with torch.no_grad():
            mllm.model(**batch.inputs)
    finally:
        for h in handles:
            h.remove()
    hidden, kwargs = seen["hidden"], seen["kwargs"]
    with torch.no_grad():
        q, k = adapter.vision_query_key(module, hidden, kwargs)  # [N, H, L, d]
        heads = module.num_heads
        if hasattr(module, "v_proj"):  # CLIP / SigLIP (out_proj), InternViT (projection_layer)
            v = module.v_proj(hidden).view(*hidden.shape[:2], heads, -1).transpose(1, 2)
            out_proj = module.out_proj if hasattr(module, "out_proj") else module.projection_layer
            out = out_proj((torch.softmax(q @ k.transpose(-1, -2) * module.scale, -1) @ v)
                                  .transpose(1, 2).reshape(hidden.shape))
        elif hidden.dim() == 3:  # BLIP
            v = module.qkv(hidden).reshape(*hidden.shape[:2], 3, heads, -1).permute(2, 0, 3, 1, 4)[2]
            out = module.projection((torch.softmax(q @ k.transpose(-1, -2) * module.scale, -1) @ v)
                                    .transpose(1, 2).reshape(hidden.shape))
        else:  # Qwen: attention within each segment of cu_seqlens
            v = module.qkv(hidden).reshape(hidden.shape[0], 3, heads, -1)[:, 2].transpose(0, 1)  # [H, L, d]
            bounds = kwargs["cu_seqlens"].tolist()
            parts = []
            for s, e in zip(bounds[:-1], bounds[1:]):
                probs = torch.softmax(q[0, :, s:e] @ k[0, :, s:e].transpose(-1, -2) * module.scaling, -1)
                parts.append((probs @ v[:, s:e]).transpose(0, 1).reshape(e - s, -1))
            out = module.proj(torch.cat(parts))
    torch.testing.assert_close(out, seen["out"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_scores_are_received_attention_pooled_per_merged_token(tiny_mllm, image, family):
    """Extension beyond the paper: naive full attention matrices per image, mean over heads and
    queries, then a plain loop pooling patches into merged tokens through the adapter's map."""
    mllm = tiny_mllm(family)
    adapter = mllm.adapter
    batch = mllm.prepare([image(0), image(1, 50, 80)], QUESTIONS)
    module = adapter.vision_attention(adapter.outlier_vision_layer)
    seen = {}
    handle = module.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(hidden=args[0] if args else kwargs["hidden_states"], kwargs=dict(kwargs)),
        with_kwargs=True)
    proc = _processor(mllm, batch, k=2)
    try:
        _generate(mllm, batch, proc, steps=1)
    finally:
        handle.remove()
    capture = proc.contexts[0]
    with torch.no_grad():
        q, k = adapter.vision_query_key(module, seen["hidden"], seen["kwargs"])
    bounds = seen["kwargs"]["cu_seqlens"].tolist()
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        probs = torch.softmax(q[0, :, s:e] @ k[0, :, s:e].transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)  # [H, P, P]
        received = probs.mean(0).mean(0)  # [P]
        tokens = adapter.vision_patch_token_index(batch, i).tolist()
        merged = max(tokens) + 1
        expected = torch.tensor([sum(received[p].item() for p in range(e - s) if tokens[p] == m) / tokens.count(m)
                                 for m in range(merged)])
        torch.testing.assert_close(capture.scores[i], expected, atol=1e-5, rtol=1e-4)
        assert capture.selected[i].tolist() == expected.topk(2).indices.tolist()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_llava_onevision_scores_are_received_attention_on_each_images_base_row(tiny_mllm, image, reduction):
    """LLaVA-OneVision (SigLIP, no [CLS]; an extension beyond the paper): each image's scores are
    the mean attention its base-view patches receive at the layer the projector reads, from the
    eager attentions of the vision tower's own batch: tile 0 of an image alone in its sample, the
    only row of an image that shares its sample (here sample 0 holds two images, sample 1 one)."""
    mllm = tiny_mllm("llava_onevision")
    adapter = mllm.adapter
    batch = mllm.prepare([[image(0), image(1, 50, 80)], image(2, 70, 70)], QUESTIONS)
    layer = adapter.outlier_vision_layer
    assert layer == len(adapter.vision_layers) - 1  # vision_feature_layer -1: the last layer
    assert not adapter.vision_has_cls and DAMROConfig().resolved_reduction("llava_onevision") == "mean_heads"
    proc = _processor(mllm, batch, k=3, head_reduction=reduction)
    _generate(mllm, batch, proc, steps=1)
    capture = proc.contexts[0]
    pixels = batch.inputs["pixel_values"]  # [3, max_tiles, 3, S, S]
    base = torch.stack([pixels[0, 0], pixels[1, 0], pixels[2, 0]])  # every image's base (or only) view
    attn = _eager_vision(adapter.vision_tower, base)[layer]  # [3, H, P, P]
    heads = attn.shape[1]
    if reduction == "mean_heads":
        per_query = attn.mean(1)  # [3, P, P]
    else:  # one head over the full q/k, per query row
        per_query = torch.softmax(attn.log().sum(1) / math.sqrt(heads), dim=-1)
    expected = per_query.mean(1)  # [3, P] mean over the query patches
    assert len(capture.scores) == 3
    for i in range(3):
        assert capture.scores[i].shape == (adapter.patches_per_side ** 2,)
        torch.testing.assert_close(capture.scores[i], expected[i], atol=1e-5, rtol=1e-4)
        assert capture.selected[i].tolist() == expected[i].topk(3).indices.tolist()
    # the negative image: the 3 chosen base tokens, then one newline, per image
    neg = proc.branch.inputs
    assert neg.image_tokens == [[4, 4], [4]]


def test_smolvlm_scores_are_received_attention_on_the_global_frame_pooled_per_token(tiny_mllm, image):
    """No [CLS] (SigLIP): naive attention matrices of each image's global frame from the layer's
    own q_proj / k_proj, mean over heads and queries, then a plain loop over each token's 2x2 patch
    block (6x6 patches, 3x3 tokens). The global frame is the last of each image's 2x2 tiles + 1."""
    mllm = tiny_mllm("smolvlm")
    adapter = mllm.adapter
    batch = mllm.prepare([image(0), image(1, 50, 80)], QUESTIONS)
    module = adapter.vision_attention(adapter.outlier_vision_layer)
    seen = {}
    handle = module.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(hidden=args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    proc = _processor(mllm, batch, k=2)
    try:
        _generate(mllm, batch, proc, steps=1)
    finally:
        handle.remove()
    capture, hidden = proc.contexts[0], seen["hidden"]  # [10 frames, 36, Dv]
    assert hidden.shape[:2] == (10, 36)
    heads = 2
    for i, frame in enumerate((4, 9)):
        with torch.no_grad():
            q = module.q_proj(hidden[frame]).view(36, heads, -1).transpose(0, 1)  # [H, 36, d]
            k = module.k_proj(hidden[frame]).view(36, heads, -1).transpose(0, 1)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)  # [H, 36, 36]
        received = probs.mean(0).mean(0)  # [36]
        expected = torch.tensor([sum(received[(2 * r + a) * 6 + 2 * c + b].item() for a in (0, 1) for b in (0, 1)) / 4
                                 for r in range(3) for c in range(3)])
        torch.testing.assert_close(capture.scores[i], expected, atol=1e-5, rtol=1e-4)
        assert capture.selected[i].tolist() == expected.topk(2).indices.tolist()


# ---------------------------------------------------------------------- the negative branch's inputs
def _image_features(mllm, batch):
    """The model's own LM tokens of every image of ``batch`` (flat), through get_image_features."""
    from innersight.decode.vcd import image_features

    with torch.no_grad():
        return image_features(mllm, batch, batch.inputs["pixel_values"])


@pytest.mark.parametrize("family", FAMILIES)
def test_negative_inputs_hold_exactly_the_k_outlier_tokens(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    adapter = mllm.adapter
    k = K[family]
    batch = mllm.prepare([image(0), image(1, 50, 80)], QUESTIONS)
    proc = _processor(mllm, batch, k=k)
    _generate(mllm, batch, proc, steps=2)
    neg, capture = proc.branch.inputs, proc.contexts[0]
    image_id = adapter.image_token_id
    per_image = k + 1 if family in NEWLINE_FAMILIES else k
    if family == "instructblip":
        per_image = adapter.num_query_tokens  # the Q-Former's queries, run over the k ViT tokens
    assert neg.image_tokens == [[per_image], [per_image]]
    mask = batch.inputs["attention_mask"]
    for b in range(2):
        valid_ids = neg.input_ids[b][neg.attention_mask[b].bool().to(neg.input_ids.device)]
        assert int((valid_ids == image_id).sum()) == per_image
        main_len = int(mask[b].sum())
        if family == "smolvlm":
            # the image's whole span (its tiles with their markers, the global frame) becomes an
            # unsplit image of k tokens, as the processor writes one:
            # <fake_token_around_image><global-img> + k image tokens + <fake_token_around_image>
            start, stop = adapter.image_spans(batch, b)[0]
            pad = batch.input_ids.shape[1] - main_len
            fake, glob = adapter.tokenizer.convert_tokens_to_ids(["<fake_token_around_image>", "<global-img>"])
            ids = batch.input_ids[b].tolist()
            assert valid_ids.tolist() == ids[pad:start] + [fake, glob] + [image_id] * k + [fake] + ids[stop:]
            continue
        assert valid_ids.numel() == main_len - batch.layouts[b][0].num_tokens + per_image  # removed, not masked
        main_valid = batch.input_ids[b][mask[b].bool()]
        assert valid_ids[valid_ids != image_id].tolist() == main_valid[main_valid != image_id].tolist()
    # positions renumbered contiguously over the shortened prompt
    if neg.position_ids.dim() == 2:
        for b in range(2):
            pos = neg.position_ids[b][neg.attention_mask[b].bool()]
            assert pos.tolist() == list(range(pos.numel()))
    else:  # Qwen: text row contiguous; the k image tokens on a 1 x k M-RoPE grid
        for b in range(2):
            valid = neg.attention_mask[b].bool()
            ids = neg.input_ids[b][valid.to(neg.input_ids.device)]
            text_row, rope = neg.position_ids[0, b][valid], neg.position_ids[1:, b][:, valid]
            assert text_row.tolist() == list(range(ids.numel()))
            img = (ids == image_id).nonzero().flatten().tolist()
            start = int(rope[0, img[0]])
            assert rope[:, img].tolist() == [[start] * k, [start] * k, list(range(start, start + k))]
            after = img[-1] + 1  # the next text token continues after the widest grid side (k)
            assert rope[:, after].tolist() == [start + k] * 3
    # the spliced image tokens are the model's own projected tokens at the outlier indices
    embeds = neg.inputs_embeds
    if family == "instructblip":
        assert torch.stack(capture.tokens).shape[1] == k
        module = adapter.vision_tower

        def only_outliers(mod, args, output):  # the model's own Q-Former path over the k ViT tokens
            idx = torch.stack(capture.selected) + 1
            output.last_hidden_state = output.last_hidden_state.gather(
                1, idx[..., None].expand(-1, -1, output.last_hidden_state.shape[-1]))
            return output

        handle = module.register_forward_hook(only_outliers)
        try:
            feats = _image_features(mllm, batch)
        finally:
            handle.remove()
        expected = feats
    else:
        feats = _image_features(mllm, batch)
        expected = []
        for i, f in enumerate(feats):
            if family == "internvl":  # the candidates are the thumbnail's tokens, the image's last tile
                f = f[-adapter.tokens_per_tile:]
            chosen = f[capture.selected[i]]  # LLaVA-NeXT: the base view comes first in the packed tokens
            if family == "smolvlm":  # candidates: the global frame's tokens, after the image's 2x2 tiles
                chosen = f[4 * 9 + capture.selected[i]]
            if family in NEWLINE_FAMILIES:
                chosen = torch.cat([chosen, adapter.image_newline[None]])
            expected.append(chosen)
    for b in range(2):
        at = (neg.input_ids[b] == image_id) & neg.attention_mask[b].bool().to(neg.input_ids.device)
        torch.testing.assert_close(embeds[b][at.to(embeds.device)], expected[b], atol=1e-5, rtol=1e-4)
    # decoder injections (Qwen3-VL's DeepStack): each outlier keeps its own rows, in image-token order
    if not adapter.image_injection_layers:
        assert neg.injected is None
        return
    with torch.no_grad():
        rows = adapter.image_rows(batch, batch.inputs["pixel_values"])  # the model's own pass
    expected_rows = torch.cat([r.injected[:, capture.selected[i]] for i, r in enumerate(rows)], dim=1)  # [S, 2k, D]
    assert neg.injected.shape == (len(adapter.image_injection_layers), 2 * k, adapter.hidden_size)
    torch.testing.assert_close(neg.injected, expected_rows, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------- end to end, hand oracle
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_llava_generate_equals_a_hand_built_negative_and_contrast(tiny_mllm, image, reduction):
    """LLaVA-1.5: outliers from eager attentions, the negative prompt embedded by hand (k projected
    tokens in place of the image), both branches re-run in full each step, contrast by hand."""
    mllm = tiny_mllm("llava")
    adapter, model = mllm.adapter, mllm.model
    k, alpha, beta = 4, 3.0, 0.1
    for seed, question in ((0, "what is it?"), (3, "is there a dog?")):
        batch = mllm.prepare([image(seed)], [question])
        attn = _eager_vision(adapter.vision_tower, batch.inputs["pixel_values"])[adapter.outlier_vision_layer]
        cls = attn[0, :, 0]  # [H, 1 + P]
        score = cls.mean(0) if reduction == "mean_heads" else torch.softmax(cls.log().sum(0) / math.sqrt(cls.shape[0]), -1)
        outliers = score[1:].topk(k).indices
        feats = _image_features(mllm, batch)[0]  # [P, D]
        ids = batch.input_ids[0]
        pos = (ids == adapter.image_token_id).nonzero().flatten()
        embed = adapter.language_model.get_input_embeddings()
        with torch.no_grad():
            neg = torch.cat([embed(ids[: pos[0]]), feats[outliers], embed(ids[pos[-1] + 1:])])[None]  # [1, Ln, D]
        main_ids = batch.input_ids
        tokens = []
        stop = {adapter.tokenizer.eos_token_id, adapter.tokenizer.pad_token_id}
        for _ in range(4):
            with torch.no_grad():
                lm = model(input_ids=main_ids, pixel_values=batch.inputs["pixel_values"]).logits[0, -1].double()
                ln = model(inputs_embeds=neg).logits[0, -1].double()
            kept = lm >= lm.max() + math.log(beta)
            scores = torch.where(kept, (1 + alpha) * lm - alpha * ln, torch.full_like(lm, NEG))
            token = int(scores.argmax())
            if token in stop:
                break
            tokens.append(token)
            main_ids = torch.cat([main_ids, torch.tensor([[token]])], 1)
            with torch.no_grad():
                neg = torch.cat([neg, embed(torch.tensor([[token]]))], 1)
        got = mllm.answer(image(seed), question, methods=["damro"], max_new_tokens=4,
                          settings={"damro": {"k": k, "alpha": alpha, "head_reduction": reduction}})
        assert got.token_ids == tokens


def test_damro_changes_the_answer_when_strong(tiny_mllm, image):
    mllm = tiny_mllm("llava")
    plain = mllm.answer(image(0), "what is it?", max_new_tokens=5)
    damro = mllm.answer(image(0), "what is it?", methods=["damro"], settings={"damro": {"k": 3, "alpha": 3.0}},
                        max_new_tokens=5)
    assert damro.token_ids != plain.token_ids
    assert damro.details["configs"]["damro"]["k"] == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_zero_is_plain_greedy(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    images = [image(0), image(1, 50, 80)]
    plain = mllm.answer_batch(images, QUESTIONS, max_new_tokens=4)
    damro = mllm.answer_batch(images, QUESTIONS, methods=["damro"], settings=_settings(family, alpha=0.0),
                              max_new_tokens=4)
    assert [a.token_ids for a in damro] == [a.token_ids for a in plain]


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_unbatched_and_serial_equals_batched(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    images = [image(2), image(3, 50, 80)]
    runs = {}
    for mode in BRANCH_MODES:
        settings = _settings(family, alpha=3.0, branch=mode)
        both = mllm.answer_batch(images, QUESTIONS, methods=["damro"], settings=settings, max_new_tokens=4)
        alone = [mllm.answer(i, q, methods=["damro"], settings=settings, max_new_tokens=4)
                 for i, q in zip(images, QUESTIONS)]
        assert [a.token_ids for a in both] == [a.token_ids for a in alone]
        assert all(a.token_ids for a in both)
        runs[mode] = [a.token_ids for a in both]
    assert runs["batched"] == runs["serial"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", BRANCH_MODES)
def test_negative_cache_steps_equal_an_uncached_forward(tiny_mllm, image, family, mode):
    """Each step's negative logits (read from the shared or own cache) equal a full, uncached
    forward of the negative prompt plus the tokens generated so far."""
    mllm = tiny_mllm(family)
    batch = mllm.prepare([image(4), image(5, 50, 80)], QUESTIONS)
    proc = _processor(mllm, batch, k=K[family], alpha=2.0, branch=mode)
    record = []
    original = proc.branch.step_logits

    def spy(input_ids):
        out = original(input_ids)
        record.append((input_ids.clone(), out.clone()))
        return out

    proc.branch.step_logits = spy
    _generate(mllm, batch, proc, steps=4)
    assert proc.branch.mode == mode and len(record) >= 2
    neg = proc.branch.inputs
    module = mllm.adapter.generation_module
    embed = mllm.adapter.language_model.get_input_embeddings()
    prompt = batch.input_ids.shape[1]
    for input_ids, logits in record:
        new = input_ids[:, prompt:]  # [B, t]
        t = new.shape[1]
        step = torch.arange(1, t + 1, device=neg.position_ids.device)
        ids = torch.cat([neg.input_ids, new.to(neg.input_ids.device)], 1)  # [2, Ln + t]
        mask = torch.cat([neg.attention_mask, neg.attention_mask.new_ones(2, t)], 1)  # [2, Ln + t]
        with torch.no_grad(), mllm.adapter.injecting(ids, neg.injected):  # the outliers' DeepStack rows (Qwen3-VL)
            out = module(
                inputs_embeds=torch.cat([neg.inputs_embeds, embed(new)], 1),
                attention_mask=mask,
                position_ids=torch.cat([neg.position_ids, neg.position_ids[..., -1:] + step], -1),
                use_cache=False,
                **neg.extra_inputs(mllm.adapter, ids, mask),  # Gemma 3: the image block's token_type_ids
            )
        torch.testing.assert_close(out.logits[:, -1].float(), logits, atol=1e-4, rtol=1e-4)


def test_batched_and_serial_negative_logits_agree_step_by_step(tiny_mllm, image):
    mllm = tiny_mllm("qwen2_5_vl")
    batch = mllm.prepare([image(6), image(7, 50, 80)], QUESTIONS)
    logits = {}
    for mode in BRANCH_MODES:
        proc = _processor(mllm, batch, k=2, alpha=2.0, branch=mode)
        steps = []
        original = proc.branch.step_logits
        proc.branch.step_logits = lambda ids, original=original, steps=steps: steps.append(original(ids)) or steps[-1]
        _generate(mllm, batch, proc, steps=3)
        logits[mode] = torch.stack(steps)
        assert proc.branch.steps == len(steps)  # one negative forward per step, the prefill included
    torch.testing.assert_close(logits["batched"], logits["serial"], atol=1e-5, rtol=1e-5)


def test_without_a_cache_the_branch_runs_serially(tiny_mllm, image):
    mllm = tiny_mllm("llava")
    batch = mllm.prepare([image(0)], QUESTIONS[:1])
    cached = _processor(mllm, batch, k=3, alpha=3.0)
    with_cache = _generate(mllm, batch, cached)
    uncached = _processor(mllm, batch, k=3, alpha=3.0)
    without = _generate(mllm, batch, uncached, use_cache=False)
    assert (cached.branch.mode, uncached.branch.mode) == ("batched", "serial")
    assert with_cache == without


# ---------------------------------------------------------------------- presets, refusals, restoration
def test_official_preset_samples_purely_and_reproducibly(tiny_mllm, image, monkeypatch):
    mllm = tiny_mllm("llava")
    seen = []
    original = type(mllm).generate

    def spy(self, batch, **generation):
        seen.append(generation)
        return original(self, batch, **generation)

    monkeypatch.setattr(type(mllm), "generate", spy)
    settings = {"damro": {"k": 3, "preset": "official"}}
    torch.manual_seed(123)
    first = mllm.answer(image(0), "what is it?", methods=["damro"], settings=settings, max_new_tokens=6)
    after_call = torch.rand(3)
    torch.manual_seed(123)
    untouched = torch.rand(3)
    torch.manual_seed(7)
    second = mllm.answer(image(0), "what is it?", methods=["damro"], settings=settings, max_new_tokens=6)
    assert first.token_ids == second.token_ids  # seeded with 42 whatever the caller's RNG
    torch.testing.assert_close(after_call, untouched)  # the caller's RNG state is restored
    for key, value in OFFICIAL_GENERATION.items():
        assert seen[0][key] == value
    (proc,) = seen[0]["logits_processor"]
    assert isinstance(proc, ContrastiveProcessor) and proc.seed == 42
    with pytest.raises(MethodError, match="official"):
        mllm.answer(image(0), "what is it?", methods=["damro"], settings=settings, temperature=0.5)


def test_refusals(tiny_mllm, image):
    mllm = tiny_mllm("llava")
    with pytest.raises(MethodError, match="beam search"):
        mllm.answer(image(0), "what is it?", methods=["damro"], settings={"damro": {"k": 3}}, num_beams=2)
    with pytest.raises(MethodError, match="num_return_sequences"):
        mllm.answer(image(0), "what is it?", methods=["damro"], settings={"damro": {"k": 3}},
                    do_sample=True, num_return_sequences=2)
    # an attention method is no longer refused: VAR acts on the main rows, the negative branch
    # runs plain attention (tests/attend/test_var_contrast.py checks the semantics)
    deeper = tiny_mllm("llava", num_layers=4)  # VAR needs a layer between 2 and the last
    both = deeper.answer(image(0), "what is it?", methods=["damro", "var"], max_new_tokens=2,
                         settings={"damro": {"k": 3}, "var": {"sink_dims": "1", "tau": "2.0"}})
    assert both.token_ids and both.methods == ("damro", "var")
    assert deeper.model.config.get_text_config()._attn_implementation == "sdpa"
    with pytest.raises(MethodError, match="candidate tokens"):
        mllm.answer(image(0), "what is it?", methods=["damro"], settings={"damro": {"k": 17}}, max_new_tokens=2)


def _hooks(model) -> dict[str, tuple[int, int]]:
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}


@pytest.mark.parametrize("family", FAMILIES)
def test_model_restored_after_exit_and_after_exception(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    batch = mllm.prepare([image(8)], ["what is it?"])
    with torch.no_grad():
        before = mllm.model(**batch.inputs).logits
    hooks = _hooks(mllm.model)
    vision_impl = mllm.adapter.vision_tower.config._attn_implementation
    settings = _settings(family, alpha=3.0)
    mllm.answer(image(8), "what is it?", methods=["damro"], settings=settings, max_new_tokens=3)
    assert _hooks(mllm.model) == hooks
    with pytest.raises(RuntimeError, match="boom"):
        mllm.answer(image(8), "what is it?", methods=["damro"], settings=settings, max_new_tokens=5,
                    stopping_criteria=StoppingCriteriaList([RaiseOnStep(2)]))
    assert _hooks(mllm.model) == hooks
    assert mllm.adapter.vision_tower.config._attn_implementation == vision_impl
    with torch.no_grad():
        after = mllm.model(**batch.inputs).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_processor_context_is_single_use_and_trims_the_shared_cache(tiny_mllm, image):
    mllm = tiny_mllm("llava")
    batch = mllm.prepare([image(9), image(10, 50, 80)], QUESTIONS)
    proc = _processor(mllm, batch, k=3)
    with proc:
        with torch.no_grad():
            out = mllm.model.generate(**batch.inputs, max_new_tokens=3, do_sample=False,
                                      logits_processor=LogitsProcessorList([proc]), return_dict_in_generate=True,
                                      pad_token_id=mllm.adapter.tokenizer.pad_token_id)
        with pytest.raises(RuntimeError, match="already active"):
            proc.__enter__()
    assert proc.branch.mode == "batched"
    cache = out.past_key_values
    assert cache.layers[0].keys.shape[0] == 2  # the negative rows were cut off on exit
    assert isinstance(proc.contexts[0], OutlierCapture) and not proc.contexts[0]._handles


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_composes_with_vicrop_two_images_per_prompt(tiny_mllm, image, family, monkeypatch):
    """ViCrop adds the crop as a second image: each image is represented by its own k outliers."""
    mllm = tiny_mllm(family)
    seen = []
    original = DAMRO.processors

    def spy(self, mllm_, batch, generation):
        procs = original(self, mllm_, batch, generation)
        seen.extend(procs)
        return procs

    monkeypatch.setattr(DAMRO, "processors", spy)
    methods, settings = ["vicrop-rel-att", "damro"], {"damro": {"k": 2, "alpha": 3.0}}
    images, questions = [image(11, 120, 80), image(12, 70, 100)], ["what is the digit?", "is there a star?"]
    both = mllm.answer_batch(images, questions, methods=methods, settings=settings, max_new_tokens=3)
    assert seen[0].branch.inputs.image_tokens == [[2, 2], [2, 2]]
    alone = [mllm.answer(i, q, methods=methods, settings=settings, max_new_tokens=3) for i, q in zip(images, questions)]
    assert [a.token_ids for a in both] == [a.token_ids for a in alone]
    assert all(a.box is not None for a in both)
