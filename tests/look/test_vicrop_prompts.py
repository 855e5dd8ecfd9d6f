"""ViCrop's prompts and answer length as its reference builds them (issue 14, items 2 and 7):
the generic prompt carries the question's answer-format instruction, V*'s maps read the short
question, and a benchmark run of the paper's tables answers in 20 new tokens."""

from __future__ import annotations

import pytest

from innersight.errors import MethodError
from innersight.eval.benchmarks import get_benchmark
from innersight.eval.runner import generation_defaults
from innersight.look.vicrop import PAPER_BENCHMARKS, ViCropConfig, generic_prompt, map_prompt
from innersight.methods import resolve_methods
from innersight.prompts import LETTER_INSTRUCTION, ONE_WORD, SHORT_ANSWER, split_answer_format

SA = "Answer the question using a single word or phrase."


@pytest.mark.parametrize(("text", "parts"), [
    (f"what is it?\n{SA}", ("what is it?", "\n", SA)),
    (f"what is it? {SA}", ("what is it?", " ", SA)),
    (f"what is it? {SA}  \n", ("what is it?", " ", SA)),  # trailing whitespace ignored
    (f"Is there a dog? {ONE_WORD}", ("Is there a dog?", " ", ONE_WORD)),
    (f"q\n(A) a\n(B) b\n{LETTER_INSTRUCTION}", ("q\n(A) a\n(B) b", "\n", LETTER_INSTRUCTION)),
    ("what is it?", ("what is it?", "", "")),
    ("Is it red? Please answer yes or no.", ("Is it red? Please answer yes or no.", "", "")),  # MME's: part of the question
    (SA, ("", "", SA)),
])
def test_split_answer_format_by_hand(text, parts):
    assert split_answer_format(text) == parts
    assert SHORT_ANSWER == SA


def test_generic_prompt_carries_the_instruction_with_the_same_separator():
    config = ViCropConfig()
    assert generic_prompt(f"what is it?\n{SA}", config) == f"Write a general description of the image.\n{SA}"
    assert generic_prompt(f"what is it? {SA}", config) == f"Write a general description of the image. {SA}"
    assert generic_prompt("what is it?", config) == "Write a general description of the image."
    assert generic_prompt(f"what is it?\n{SA}", ViCropConfig(generic_answer_format=False)) == \
        "Write a general description of the image."


def test_map_prompt_short_and_full():
    question = f"What is the color of the cup?\n(A) blue\n(B) red\n{LETTER_INSTRUCTION}"
    assert map_prompt(question, ViCropConfig()) == f"What is the color of the cup?\n{LETTER_INSTRUCTION}"
    assert map_prompt(question, ViCropConfig(map_question="full")) == question
    assert map_prompt(f"what is it?\n{SA}", ViCropConfig()) == f"what is it?\n{SA}"  # one line: unchanged
    assert map_prompt("what is it?", ViCropConfig()) == "what is it?"
    with pytest.raises(MethodError):
        ViCropConfig(map_question="first")
    with pytest.raises(MethodError):
        ViCropConfig(max_new_tokens=0)


def test_answer_length_defaults_to_the_references_twenty_tokens_on_the_papers_benchmarks():
    assert set(PAPER_BENCHMARKS) == {"textvqa", "vstar", "pope", "docvqa", "aokvqa", "gqa", "vqav2"}
    vicrop = resolve_methods(["vicrop-rel-att"])
    plain = resolve_methods([])
    textvqa = get_benchmark("textvqa")
    assert generation_defaults(textvqa.preset(), plain, "textvqa") == {"max_new_tokens": 16}  # the preset's
    assert generation_defaults(textvqa.preset(), vicrop, "textvqa") == {"max_new_tokens": 20}
    pope = get_benchmark("pope")
    assert generation_defaults(pope.preset(), vicrop, "pope") == {"max_new_tokens": 20}
    mme = get_benchmark("mme")  # not in the paper's tables: the preset's length
    assert generation_defaults(mme.preset(), vicrop, "mme") == {"max_new_tokens": 8}
    micro = get_benchmark("micro-details")
    assert generation_defaults(micro.preset(), vicrop, "micro-details") == {"max_new_tokens": micro.preset().max_new_tokens}
    off = resolve_methods(["vicrop-rel-att"], {"vicrop": {"max_new_tokens": "none"}})
    assert generation_defaults(textvqa.preset(), off, "textvqa") == {"max_new_tokens": 16}
