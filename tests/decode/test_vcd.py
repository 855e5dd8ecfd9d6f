"""VCD: the noise closed form, per-image determinism, the spliced negative prompt reproducing the
main branch exactly, and the method on every family (batched == serial == unbatched)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from innersight.adapters import FAMILIES  # noqa: E402
from innersight.adapters.base import Batch
from innersight.decode.contrast import (
    BRANCH_MODES,
    ContrastiveProcessor,
    NegativeBranch,
    contrast,
    features_per_sample,
    splice_images,
)
from innersight.decode.vcd import (
    VCD,
    VCDConfig,
    alpha_bar,
    diffusion_noise,
    image_features,
    image_rows,
    negative_inputs,
    noised_pixel_values,
)
from innersight.errors import MethodError
from innersight.methods import resolve_methods
from innersight.testing.faults import RaiseOnStep

QUESTIONS = ["what is it?", "is there a dog in the picture?"]


def _reference_alpha_bar(step: int) -> float:
    """prod_{t <= step} (1 - beta_t), beta_t = sigmoid(-6 + 12 t / 999) * (0.5e-2 - 1e-5) + 1e-5."""
    prod = 1.0
    for t in range(step + 1):
        x = -6 + 12 * t / 999
        beta = 1 / (1 + math.exp(-x)) * (0.5e-2 - 1e-5) + 1e-5
        prod *= 1 - beta
    return prod


# ---------------------------------------------------------------------- noise, synthetic
@pytest.mark.parametrize("step", [0, 1, 500, 999])
def test_alpha_bar_is_the_reference_schedule(step):
    assert alpha_bar(step) == pytest.approx(_reference_alpha_bar(step), rel=1e-9)


def test_alpha_bar_hand_values():
    beta0 = 1 / (1 + math.exp(6)) * (0.5e-2 - 1e-5) + 1e-5  # 2.2353e-5
    assert alpha_bar(0) == pytest.approx(1 - beta0, rel=1e-12)
    assert 0.0 < alpha_bar(999) < alpha_bar(500) < alpha_bar(0) < 1.0
    assert alpha_bar(999) == pytest.approx(0.0812, abs=1e-3)  # T = 999: signal scaled by ~0.29


def test_diffusion_noise_closed_form_and_determinism():
    x = torch.linspace(-1, 1, 24).reshape(2, 3, 4)
    a = _reference_alpha_bar(500)
    eps = torch.randn((2, 3, 4), generator=torch.Generator().manual_seed(7))
    expected = math.sqrt(a) * x + math.sqrt(1 - a) * eps
    torch.testing.assert_close(diffusion_noise(x, 500, seed=7), expected)
    torch.testing.assert_close(diffusion_noise(x, 500, seed=7), diffusion_noise(x, 500, seed=7))
    assert not torch.equal(diffusion_noise(x, 500, seed=7), diffusion_noise(x, 500, seed=8))
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    diffusion_noise(x, 500, seed=7)
    torch.testing.assert_close(torch.rand(1), before)  # the global RNG is not used


@pytest.mark.parametrize("kwargs", [{"alpha": -0.5}, {"beta": 0.0}, {"beta": 2.0}, {"noise_step": 1000},
                                    {"noise_step": -1}, {"branch": "both"}])
def test_invalid_settings_refused(kwargs):
    with pytest.raises(MethodError):
        VCDConfig(**kwargs)


def test_defaults_and_registry():
    c = VCDConfig()
    assert (c.alpha, c.beta, c.noise_step) == (1.0, 0.1, 500)
    assert "2311.16922" in VCDConfig.__dataclass_fields__["alpha"].metadata["source"]
    plan = resolve_methods(["vcd"], {"vcd": {"noise_step": "999", "alpha": "0.5", "branch": "serial"}})
    (method,) = plan.objects
    assert isinstance(method, VCD) and method.config == VCDConfig(noise_step=999, alpha=0.5, branch="serial")
    with pytest.raises(MethodError, match="decoding point"):
        resolve_methods(["vcd", "damro"])


# ---------------------------------------------------------------------- on the models
@pytest.mark.parametrize("family", FAMILIES)
def test_each_image_is_noised_independently_of_its_batch(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    adapter = mllm.adapter
    both = mllm.prepare([image(0), image(1, 50, 80)], QUESTIONS)
    noised = noised_pixel_values(adapter, both, 500, seed=3)
    for i, (img, q) in enumerate(zip([image(0), image(1, 50, 80)], QUESTIONS)):
        alone = mllm.prepare([img], [q])
        single = noised_pixel_values(adapter, alone, 500, seed=3)
        if family.startswith("qwen"):
            start, stop = adapter.vision_patch_range(both, i)
            torch.testing.assert_close(noised[start:stop], single)
            clean = both.inputs["pixel_values"][start:stop]
        elif family == "internvl":  # the image's tiles: rows [offset, offset + tiles) of [N_tiles, 3, S, S]
            start = adapter.tile_offset(both, i)
            stop = start + adapter.num_tiles(both.image_sizes[i][0])
            assert (stop - start, single.shape[0]) == ((5, 5) if i == 0 else (3, 3))  # 90x60: 2x2 + 1; 50x80: 1x2 + 1
            torch.testing.assert_close(noised[start:stop], single)
            clean = both.inputs["pixel_values"][start:stop]
        else:
            torch.testing.assert_close(noised[i], single[0])
            clean = both.inputs["pixel_values"][i]
        torch.testing.assert_close(single.reshape(clean.shape), diffusion_noise(clean, 500, seed=3))
    assert not torch.equal(noised, both.inputs["pixel_values"])


def _clean_processor(mllm, batch, mode="batched", alpha=1.0):
    """A contrastive processor whose negative branch is the un-noised prompt, spliced by hand (the
    image rows of the model's own vision pass: its tokens and, where the family has them, the
    decoder injections of that pass, Qwen3-VL's DeepStack)."""
    def build():
        with torch.no_grad():
            feats = image_rows(mllm, batch, batch.inputs["pixel_values"])
        return splice_images(mllm.adapter, batch, features_per_sample(batch, feats))

    return ContrastiveProcessor(NegativeBranch(mllm.adapter, build, mode=mode), alpha=alpha, beta=0.1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", BRANCH_MODES)
def test_spliced_clean_prompt_reproduces_the_main_branch(tiny_mllm, image, family, mode):
    """The negative machinery (embedding splice, padding, positions incl. M-RoPE, shared or own
    cache) fed the model's own image tokens gives the main branch's logits at every step."""
    mllm = tiny_mllm(family)
    batch = mllm.prepare([image(2), image(3, 50, 80)], QUESTIONS)
    proc = _clean_processor(mllm, batch, mode=mode)
    seen = []
    original = ContrastiveProcessor.__call__

    def spy(input_ids, scores):
        out = original(proc, input_ids, scores)
        seen.append((scores.clone(), proc.last_negative.clone()))
        return out

    with proc:
        ids = mllm.generate(batch, max_new_tokens=4, logits_processor=LogitsProcessorList([spy]))
    assert proc.branch.mode == mode
    assert proc.branch.inputs.input_ids.shape == batch.input_ids.shape
    for scores, negative in seen:
        torch.testing.assert_close(negative, scores, atol=1e-4, rtol=1e-4)
    plain = mllm.generate(batch, max_new_tokens=4)
    assert ids == plain  # (1 + a) l - a l = l


def test_llava_onevision_multi_image_sample_splices_the_models_own_untiled_tokens(tiny_mllm, image):
    """LLaVA-OneVision tiles an image only when it is alone in its sample: with a two-image sample
    in the batch, the spliced clean prompt still reproduces the main branch (the image features
    are computed with the batch's images per sample), and the noised prompt has each image's
    token count (``p*p + 1`` for the shared sample's images)."""
    mllm = tiny_mllm("llava_onevision")
    batch = mllm.prepare([[image(2), image(3, 50, 80)], image(4, 70, 70)], QUESTIONS)
    proc = _clean_processor(mllm, batch)
    seen = []
    original = ContrastiveProcessor.__call__

    def spy(input_ids, scores):
        out = original(proc, input_ids, scores)
        seen.append((scores.clone(), proc.last_negative.clone()))
        return out

    with proc:
        ids = mllm.generate(batch, max_new_tokens=3, logits_processor=LogitsProcessorList([spy]))
    assert seen and ids == mllm.generate(batch, max_new_tokens=3)
    for scores, negative in seen:
        torch.testing.assert_close(negative, scores, atol=1e-4, rtol=1e-4)
    neg = negative_inputs(mllm, batch, VCDConfig(noise_step=500, seed=1))
    p2 = mllm.adapter.patches_per_side ** 2
    assert neg.image_tokens[0] == [p2 + 1, p2 + 1]
    assert neg.image_tokens == [[lay.num_tokens for lay in row] for row in batch.layouts]


@pytest.mark.parametrize("family", FAMILIES)
def test_negative_prompt_is_the_prompt_with_noised_image_tokens(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    batch = mllm.prepare([image(4), image(5, 50, 80)], QUESTIONS)
    config = VCDConfig(noise_step=500, seed=1)
    neg = negative_inputs(mllm, batch, config)
    assert torch.equal(neg.input_ids, batch.input_ids.to(neg.input_ids.device))
    assert torch.equal(neg.attention_mask.cpu(), batch.inputs["attention_mask"].cpu())
    with torch.no_grad():
        noisy = image_features(mllm, batch, noised_pixel_values(mllm.adapter, batch, 500, 1))
        clean = image_features(mllm, batch, batch.inputs["pixel_values"])
        embed = mllm.adapter.language_model.get_input_embeddings()
        text = embed(batch.input_ids)
    image_id = mllm.adapter.image_token_id
    for b in range(2):
        at = batch.input_ids[b] == image_id
        torch.testing.assert_close(neg.inputs_embeds[b][at], noisy[b])
        torch.testing.assert_close(neg.inputs_embeds[b][~at & batch.inputs["attention_mask"][b].bool()],
                                   text[b][~at & batch.inputs["attention_mask"][b].bool()])
        assert not torch.allclose(noisy[b], clean[b])
    # the decoder injections (Qwen3-VL's DeepStack) are the noised image's, in image-token order
    with torch.no_grad():
        rows = image_rows(mllm, batch, noised_pixel_values(mllm.adapter, batch, 500, 1))
    for f, r in zip(noisy, rows):
        torch.testing.assert_close(r.embeds, f)
    if not mllm.adapter.image_injection_layers:
        assert neg.injected is None and all(r.injected is None for r in rows)
    else:
        expected = torch.cat([r.injected for r in rows], dim=1)  # [S, N, D]
        assert expected.shape[:2] == (len(mllm.adapter.image_injection_layers), int((batch.input_ids == image_id).sum()))
        torch.testing.assert_close(neg.injected, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_vcd_steps_are_the_closed_form_of_both_branches(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    batch = mllm.prepare([image(6), image(7, 50, 80)], QUESTIONS)
    (proc,) = VCD(VCDConfig(alpha=1.0, beta=0.1)).processors(mllm, batch, {})
    seen = []
    original = ContrastiveProcessor.__call__

    def spy(input_ids, scores):
        out = original(proc, input_ids, scores)
        seen.append((input_ids.clone(), scores.clone(), proc.last_negative.clone(), out.clone()))
        return out

    with proc:
        mllm.generate(batch, max_new_tokens=4, logits_processor=LogitsProcessorList([spy]))
    assert proc.branch.mode == "batched" and seen
    neg = proc.branch.inputs
    module = mllm.adapter.generation_module
    embed = mllm.adapter.language_model.get_input_embeddings()
    prompt = batch.input_ids.shape[1]
    for input_ids, scores, negative, out in seen:
        kept = scores >= scores.max(-1, keepdim=True).values + math.log(0.1)
        torch.testing.assert_close(out[kept], (2.0 * scores - negative)[kept])
        assert torch.isinf(out[~kept]).all()
        # the negative logits: an uncached forward of the noised prompt + the tokens so far (with
        # the noised image's decoder injections where the family has them: Qwen3-VL's DeepStack)
        new = input_ids[:, prompt:]
        step = torch.arange(1, new.shape[1] + 1, device=neg.position_ids.device)
        ids = torch.cat([neg.input_ids, new.to(neg.input_ids.device)], 1)  # [B, Ln + t]
        mask = torch.cat([neg.attention_mask, neg.attention_mask.new_ones(new.shape)], 1)  # [B, Ln + t]
        with torch.no_grad(), mllm.adapter.injecting(ids, neg.injected):
            full = module(inputs_embeds=torch.cat([neg.inputs_embeds, embed(new)], 1), attention_mask=mask,
                          position_ids=torch.cat([neg.position_ids, neg.position_ids[..., -1:] + step], -1),
                          use_cache=False,
                          **neg.extra_inputs(mllm.adapter, ids, mask)).logits[:, -1].float()  # Gemma 3: token_type_ids
        torch.testing.assert_close(negative, full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(seen[0][3], contrast(seen[0][1], seen[0][2], alpha=1.0, beta=0.1))


@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_zero_is_plain_greedy(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    images = [image(0), image(1, 50, 80)]
    plain = mllm.answer_batch(images, QUESTIONS, max_new_tokens=4)
    vcd = mllm.answer_batch(images, QUESTIONS, methods=["vcd"], settings={"vcd": {"alpha": 0.0}}, max_new_tokens=4)
    assert [a.token_ids for a in vcd] == [a.token_ids for a in plain]


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_unbatched_and_serial_equals_batched(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    images = [image(8), image(9, 50, 80)]
    runs = {}
    for mode in BRANCH_MODES:
        settings = {"vcd": {"alpha": 3.0, "branch": mode}}
        both = mllm.answer_batch(images, QUESTIONS, methods=["vcd"], settings=settings, max_new_tokens=4)
        alone = [mllm.answer(i, q, methods=["vcd"], settings=settings, max_new_tokens=4)
                 for i, q in zip(images, QUESTIONS)]
        assert [a.token_ids for a in both] == [a.token_ids for a in alone]
        runs[mode] = [a.token_ids for a in both]
    assert runs["batched"] == runs["serial"]


def test_vcd_changes_the_answer_when_strong(tiny_mllm, image):
    mllm = tiny_mllm("llava")
    plain = mllm.answer(image(1, 50, 80), QUESTIONS[1], max_new_tokens=5)
    vcd = mllm.answer(image(1, 50, 80), QUESTIONS[1], methods=["vcd"], settings={"vcd": {"alpha": 3.0}},
                      max_new_tokens=5)
    assert vcd.token_ids != plain.token_ids
    assert vcd.details["configs"]["vcd"]["noise_step"] == 500


def test_sampling_is_seeded_by_the_caller(tiny_mllm, image):
    mllm = tiny_mllm("llava")
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(mllm.answer(image(0), "what is it?", methods=["vcd"], do_sample=True, max_new_tokens=6).token_ids)
    assert runs[0] == runs[1]


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_model_restored_after_exit_and_after_exception(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    batch = mllm.prepare([image(10)], ["what is it?"])
    with torch.no_grad():
        before = mllm.model(**batch.inputs).logits
    hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in mllm.model.named_modules()}
    mllm.answer(image(10), "what is it?", methods=["vcd"], max_new_tokens=3)
    with pytest.raises(RuntimeError, match="boom"):
        mllm.answer(image(10), "what is it?", methods=["vcd"], max_new_tokens=5,
                    stopping_criteria=StoppingCriteriaList([RaiseOnStep(2)]))
    assert hooks == {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in mllm.model.named_modules()}
    with torch.no_grad():
        after = mllm.model(**batch.inputs).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_refusals(tiny_mllm, image):
    mllm = tiny_mllm("qwen2_vl")
    with pytest.raises(MethodError, match="beam search"):
        mllm.answer(image(0), "what is it?", methods=["vcd"], num_beams=2)
    batch = mllm.prepare([image(0)], ["what is it?"])
    no_images = Batch(inputs={k: v for k, v in batch.inputs.items() if k != "pixel_values"}, prompts=batch.prompts,
                      image_sizes=[[]], layouts=[[]])
    with pytest.raises(MethodError, match="needs images"):
        VCD().processors(mllm, no_images, {})


def test_smolvlm_padding_frames_stay_zero(tiny_mllm, image):
    """SmolVLM's pixels are [B, F_max, 3, S, S] per sample; a sample with fewer frames is padded
    with all-zero frames, which the model drops. Only an image's own frames are noised: the
    padding stays zero (else the model would read noise as extra images) and the noised prompt
    still holds as many image tokens as the clean one."""
    mllm = tiny_mllm("smolvlm")
    adapter = mllm.adapter
    # 90x60: 2x2 tiles + global = 5 frames; 200x40 -> 96x20 -> a 96x48 canvas: 1x2 tiles + global = 3
    batch = mllm.prepare([image(0), image(1, 200, 40)], QUESTIONS)
    pixels = batch.inputs["pixel_values"]
    assert pixels.shape[:2] == (2, 5) and not pixels[1, 3:].any()
    noised = noised_pixel_values(adapter, batch, 500, seed=3)
    assert not noised[1, 3:].any()
    torch.testing.assert_close(noised[0], diffusion_noise(pixels[0], 500, seed=3))
    torch.testing.assert_close(noised[1, :3], diffusion_noise(pixels[1, :3], 500, seed=3))
    with torch.no_grad():
        feats = image_features(mllm, batch, noised)
    assert [f.shape[0] for f in feats] == [45, 27]
