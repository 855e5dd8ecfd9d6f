"""Prompt snapshots (issue 14, item 3): the exact text each family's template gives each
benchmark's default prompt, written by hand, and the three prompts ViCrop builds under the
``reference`` template (map question, generic prompt, answer with two images), which must equal
the ViCrop reference code's strings (``run.py``):

    <image>\\nUSER: {q} Answer the question using a single word or phrase.\\nASSISTANT:
    <image>\\nUSER: Write a general description of the image. Answer the question using a single word or phrase.\\nASSISTANT:
    <image><image>\\nUSER: {q} Answer the question using a single word or phrase.\\nASSISTANT:

and for InstructBLIP ``Question: {q} Short answer:`` (no instruction). The ``chat`` strings are
those of the tiny test processors' chat templates (a real checkpoint's template may differ).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from innersight.adapters import FAMILIES
from innersight.eval.benchmarks import get_benchmark
from innersight.look.vicrop import ViCrop, ViCropConfig
from innersight.methods import resolve_methods

SA = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
QWEN_HEAD = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_TAIL = "<|im_end|>\n<|im_start|>assistant\n"
OV_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
INTERNVL_HEAD = "<|im_start|>user\n<IMG_CONTEXT>\n"  # the -hf format: no system turn
GEMMA_HEAD = "<bos><start_of_turn>user\n<start_of_image>"
GEMMA_TAIL = "<end_of_turn>\n<start_of_turn>model\n"
SMOLVLM_HEAD = "<|im_start|>User:<image>"
SMOLVLM_TAIL = "<end_of_utterance>\nAssistant:"

# (benchmark, sample, question with the preset's own newline-joined instruction, that question in
# the LLaVA-1.5 reference's space-joined form, in InstructBLIP's reference form)
VSTAR_SAMPLE = {"id": "direct_attributes/sa_1", "question": "What is the color of the cup?",
                "options": ["red", "blue", "green", "white"], "answer_index": 0}
CASES = [
    ("textvqa", {"id": "1", "question": "what is written on the sign?"},
     f"what is written on the sign?\n{SA}", f"what is written on the sign? {SA}", "what is written on the sign?"),
    ("vqav2", {"id": "2", "question": "How many dogs are there?"},
     f"How many dogs are there?\n{SA}", f"How many dogs are there? {SA}", "How many dogs are there?"),
    ("gqa", {"id": "3", "question": "Is the cup to the left of the plate?"},
     f"Is the cup to the left of the plate?\n{SA}", f"Is the cup to the left of the plate? {SA}",
     "Is the cup to the left of the plate?"),
    ("aokvqa", {"id": "4", "question": "What is the man holding?"},
     f"What is the man holding?\n{SA}", f"What is the man holding? {SA}", "What is the man holding?"),
    ("docvqa", {"id": "5", "question": "What is the date on the letter?"},
     f"What is the date on the letter?\n{SA}", f"What is the date on the letter? {SA}", "What is the date on the letter?"),
    ("pope", {"id": "6", "question": "Is there a dog in the image?"},
     f"Is there a dog in the image?\n{SA}", f"Is there a dog in the image? {SA}", "Is there a dog in the image?"),
    ("vstar", VSTAR_SAMPLE,  # letter preset; option_order(id, 4) == [1, 2, 0, 3]
     f"What is the color of the cup?\n(A) blue\n(B) green\n(C) red\n(D) white\n{LETTER}",
     f"What is the color of the cup?\n(A) blue\n(B) green\n(C) red\n(D) white {LETTER}",
     "What is the color of the cup?\n(A) blue\n(B) green\n(C) red\n(D) white"),
    ("mme", {"id": "7", "question": "Is there a dog in this image? Please answer yes or no."},
     "Is there a dog in this image? Please answer yes or no.", "Is there a dog in this image? Please answer yes or no.",
     "Is there a dog in this image? Please answer yes or no."),
]
PRESET = {"vstar": "letter"}


def _expected(family: str, template: str, newline: str, spaced: str, blip: str) -> str:
    if family == "llava":
        return f"USER: <image>\n{newline} ASSISTANT:" if template == "chat" else f"<image>\nUSER: {spaced}\nASSISTANT:"
    if family == "llava_next":  # no ViCrop reference: llava-hf's format for both
        return f"USER: <image>\n{newline} ASSISTANT:"
    if family == "instructblip":  # no chat template: chat keeps the instruction, reference drops it
        return f"Question: {newline} Short answer:" if template == "chat" else f"Question: {blip} Short answer:"
    if family == "llava_onevision":  # llava-hf's template has no system turn; the official qwen_1_5 format has one
        system = OV_SYSTEM if template == "reference" else ""
        return f"{system}<|im_start|>user\n<image>\n{newline}{QWEN_TAIL}"
    if family == "internvl":  # the -hf chat format for both
        return f"{INTERNVL_HEAD}{newline}{QWEN_TAIL}"
    if family == "gemma3":  # the official chat format for both
        return f"{GEMMA_HEAD}{newline}{GEMMA_TAIL}"
    if family == "smolvlm":  # no paper reference: SmolVLM's chat format for both
        return f"{SMOLVLM_HEAD}{newline}{SMOLVLM_TAIL}"
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):  # Qwen: the official chat format for both
        return f"{QWEN_HEAD}{QWEN_IMAGE}{newline}{QWEN_TAIL}"
    raise AssertionError(f"no hand-written prompt snapshot for {family!r}: add one")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("template", ["chat", "reference"])
@pytest.mark.parametrize(("bench_name", "sample", "newline", "spaced", "blip"), CASES, ids=[c[0] for c in CASES])
def test_prompt_snapshot(tiny_mllm, family, template, bench_name, sample, newline, spaced, blip):
    bench = get_benchmark(bench_name)
    question, _ = bench.render(sample, bench.preset(PRESET.get(bench_name)))
    assert question == newline  # the preset's wording
    prompt = tiny_mllm(family).adapter.format_prompt(question, 1, template)
    assert prompt == _expected(family, template, newline, spaced, blip)


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (60, 90, 3), dtype=np.uint8))


def _recorded_prompts(monkeypatch, mllm) -> list[list[str]]:
    calls: list[list[str]] = []
    original = mllm.adapter.prepare

    def prepare(images, prompts):
        calls.append(list(prompts))
        return original(images, prompts)

    monkeypatch.setattr(mllm.adapter, "prepare", prepare)
    return calls


@pytest.mark.parametrize("variant", ["rel-att", "pure-grad"])
def test_vicrop_reference_prompts_equal_the_reference_code_llava(tiny_mllm, monkeypatch, variant):
    mllm = tiny_mllm("llava")
    calls = _recorded_prompts(monkeypatch, mllm)
    question = f"what is written on the sign?\n{SA}"  # TextVQA's default preset
    plan = resolve_methods([f"vicrop-{variant}"])
    (answer,) = plan.run(mllm, [_image()], [question], template="reference", max_new_tokens=2)
    assert calls[0] == [f"<image>\nUSER: what is written on the sign? {SA}\nASSISTANT:",
                        f"<image>\nUSER: Write a general description of the image. {SA}\nASSISTANT:"]
    assert answer.prompt == f"<image><image>\nUSER: what is written on the sign? {SA}\nASSISTANT:"


def test_vicrop_reference_prompts_equal_the_reference_code_instructblip(tiny_mllm, monkeypatch):
    mllm = tiny_mllm("instructblip")
    calls = _recorded_prompts(monkeypatch, mllm)
    plan = resolve_methods(["vicrop-rel-att"], {"vicrop": {"qformer_block": "1"}})  # the tiny Q-Former has 2 blocks
    (answer,) = plan.run(mllm, [_image()], [f"what is written on the sign?\n{SA}"], template="reference",
                         max_new_tokens=2)
    assert calls[0] == ["Question: what is written on the sign? Short answer:",
                        "Question: Write a general description of the image. Short answer:"]
    assert answer.prompt == "Question: what is written on the sign? Short answer:"


def test_vicrop_generic_prompt_carries_the_instruction_in_the_chat_template(tiny_mllm, monkeypatch):
    mllm = tiny_mllm("llava")
    calls = _recorded_prompts(monkeypatch, mllm)
    ViCrop(ViCropConfig(variant="rel-att")).apply(mllm, [[_image()]], [f"what is it?\n{SA}"], "chat")
    assert calls[0] == [f"USER: <image>\nwhat is it?\n{SA} ASSISTANT:",
                        f"USER: <image>\nWrite a general description of the image.\n{SA} ASSISTANT:"]
    calls.clear()
    ViCrop(ViCropConfig(variant="rel-att", generic_answer_format=False)).apply(mllm, [[_image()]], [f"what is it?\n{SA}"], "chat")
    assert calls[0][1] == "USER: <image>\nWrite a general description of the image. ASSISTANT:"
    calls.clear()
    ViCrop(ViCropConfig(variant="rel-att")).apply(mllm, [[_image()]], ["what is it?"], "chat")  # no instruction
    assert calls[0][1] == "USER: <image>\nWrite a general description of the image. ASSISTANT:"


def test_vicrop_vstar_maps_read_the_short_question(tiny_mllm, monkeypatch):
    """V*: the maps read the question without its option lines (the reference's short_question),
    the answer is generated for the full question with its options."""
    mllm = tiny_mllm("llava")
    calls = _recorded_prompts(monkeypatch, mllm)
    bench = get_benchmark("vstar")
    question, _ = bench.render(VSTAR_SAMPLE, bench.preset("letter"))
    (answer,) = resolve_methods(["vicrop-rel-att"]).run(mllm, [_image()], [question], template="reference",
                                                         max_new_tokens=2)
    assert calls[0] == [f"<image>\nUSER: What is the color of the cup? {LETTER}\nASSISTANT:",
                        f"<image>\nUSER: Write a general description of the image. {LETTER}\nASSISTANT:"]
    assert answer.prompt == ("<image><image>\nUSER: What is the color of the cup?\n(A) blue\n(B) green\n(C) red\n"
                             f"(D) white {LETTER}\nASSISTANT:")
    calls.clear()
    resolve_methods(["vicrop-rel-att"], {"vicrop": {"map_question": "full"}}).run(
        mllm, [_image()], [question], template="reference", max_new_tokens=2)
    assert calls[0][0] == ("<image>\nUSER: What is the color of the cup?\n(A) blue\n(B) green\n(C) red\n"
                           f"(D) white {LETTER}\nASSISTANT:")
