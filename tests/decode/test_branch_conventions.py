"""The batched negative branch reads what ``generate`` passes under every name the supported
transformers range uses, and never changes cost silently: a fallback to the serial branch is
recorded in the answer's details and the eval row, and the CLI prints one warning line."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import DynamicCache, StaticCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from innersight.adapters import FAMILIES  # noqa: E402
from innersight.decode import contrast
from innersight.decode.contrast import NegativeBranch
from innersight.generation_calls import CACHE_NAMES, cache_argument, find_cache, output_cache
from innersight.testing.cli import run_cli

K = {"llava": 3, "llava_next": 2, "instructblip": 3, "qwen2_vl": 2, "qwen2_5_vl": 2, "qwen3_vl": 2, "llava_onevision": 3, "internvl": 2, "gemma3": 3, "smolvlm": 2}
QUESTIONS = ["what is it?", "is there a dog in the picture?"]


def _settings(method: str, family: str, **extra) -> dict:
    if method == "damro":
        return {"damro": {"k": K[family], "alpha": 2.0, **extra}}
    return {"vcd": {"alpha": 2.0, **extra}}


# ---------------------------------------------------------------------- the names, pinned
def test_the_supported_cache_names_are_pinned():
    # 5.25 and later pass ``cache``; 5.17 to 5.24 pass ``past_key_values``
    assert CACHE_NAMES == ("cache", "past_key_values")


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_find_cache_reads_each_supported_name(name):
    cache = DynamicCache()
    assert find_cache({"input_ids": torch.ones(1, 1), name: cache, "use_cache": True}) == (name, cache)


def test_find_cache_finds_a_renamed_cache_by_its_type_and_reports_none_when_there_is_none():
    cache = DynamicCache()
    assert find_cache({"kv_state": cache, "attention_mask": torch.ones(1, 2)}) == ("kv_state", cache)
    assert find_cache({"attention_mask": torch.ones(1, 2), "past_key_values": None}) == (None, None)
    # a value under a known name that is not a cache is not taken for one
    assert find_cache({"cache": "not a cache"}) == (None, None)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_output_cache_reads_each_supported_field(name):
    cache = DynamicCache()

    class Output:
        pass

    out = Output()
    setattr(out, name, cache)
    assert output_cache(out) is cache
    assert output_cache({"logits": torch.zeros(1), "something_new": cache}) is cache
    assert output_cache(CausalLMOutputWithPast(logits=torch.zeros(1))) is None


def test_cache_argument_is_the_name_the_forward_declares():
    def new(input_ids=None, cache=None, **kwargs): ...
    def old(input_ids=None, past_key_values=None, **kwargs): ...
    def both(input_ids=None, past_key_values=None, cache=None): ...
    def only_kwargs(input_ids=None, **kwargs): ...
    def none(input_ids=None): ...

    assert cache_argument(new) == "cache"
    assert cache_argument(old) == "past_key_values"
    assert cache_argument(both) == "cache"
    assert cache_argument(only_kwargs) == "cache"
    with pytest.raises(LookupError):
        cache_argument(none)


def test_the_installed_models_take_a_supported_name(tiny_mllm):
    for family in FAMILIES:
        module = tiny_mllm(family).adapter.generation_module
        assert cache_argument(module.forward) in CACHE_NAMES


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_the_branch_recognises_the_prefill_under_each_name(tiny_mllm, name):
    mllm = tiny_mllm("llava")
    branch = NegativeBranch(mllm.adapter, lambda: None)
    cache = DynamicCache(config=branch.module.config)
    branch._pre_hook(branch.module, (), {"input_ids": torch.ones(1, 5, dtype=torch.long), name: cache,
                                         "use_cache": True})
    assert branch._prefill_pending and branch._main_cache is cache


# ---------------------------------------------------------------------- which branch ran
@pytest.mark.parametrize("method", ["damro", "vcd"])
@pytest.mark.parametrize("family", FAMILIES)
def test_answers_record_that_the_batched_branch_ran(tiny_mllm, image, family, method, caplog):
    mllm = tiny_mllm(family)
    with caplog.at_level(logging.WARNING, logger="innersight"):
        answers = mllm.answer_batch([image(1), image(2, 50, 80)], QUESTIONS, methods=[method],
                                    settings=_settings(method, family), max_new_tokens=3)
    # every family packs, Gemma 3's sliding-window cache layers included
    expected = {"mode": "batched", "requested": "batched", "negative_cache": "packed"}
    for a in answers:
        assert a.details[method]["branch"] == expected
    assert not [r for r in caplog.records if "serially" in r.getMessage()]


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Each fallback reason warns once per process: forget the ones already given."""
    monkeypatch.setattr(contrast, "_warned", set())


def test_a_cache_it_cannot_find_falls_back_loudly_with_the_same_tokens(tiny_mllm, image, monkeypatch, caplog,
                                                                       fresh_warnings):
    mllm = tiny_mllm("qwen2_vl")
    settings = _settings("damro", "qwen2_vl")
    images = [image(3), image(4, 50, 80)]
    batched = mllm.answer_batch(images, QUESTIONS, methods=["damro"], settings=settings, max_new_tokens=4)
    # a transformers whose calls carry the cache where the branch cannot see it
    monkeypatch.setattr(contrast, "find_cache", lambda kwargs: (None, None))
    monkeypatch.setattr(contrast, "output_cache", lambda output: None)
    with caplog.at_level(logging.WARNING, logger="innersight"):
        fallen = mllm.answer_batch(images, QUESTIONS, methods=["damro"], settings=settings, max_new_tokens=4)
        mllm.answer_batch(images, QUESTIONS, methods=["damro"], settings=settings, max_new_tokens=4)
    assert [a.token_ids for a in fallen] == [a.token_ids for a in batched]
    branch = fallen[0].details["damro"]["branch"]
    assert branch["mode"] == "serial" and branch["requested"] == "batched"
    assert "no KV cache the branch could find" in branch["fallback"]
    warned = [r.getMessage() for r in caplog.records if "serially" in r.getMessage()]
    assert len(warned) == 1 and "no KV cache the branch could find" in warned[0]  # once per reason


def test_use_cache_false_and_a_static_cache_are_recorded(tiny_mllm, image, fresh_warnings):
    mllm = tiny_mllm("llava")
    settings = _settings("vcd", "llava")
    (a,) = mllm.answer_batch([image(5)], QUESTIONS[:1], methods=["vcd"], settings=settings, max_new_tokens=3,
                             use_cache=False)
    assert a.details["vcd"]["branch"] == {"mode": "serial", "requested": "batched",
                                          "fallback": "generate ran without a KV cache (use_cache=False)"}
    (b,) = mllm.answer_batch([image(5)], QUESTIONS[:1], methods=["vcd"], settings=settings, max_new_tokens=3,
                             cache_implementation="static")
    assert b.details["vcd"]["branch"]["mode"] == "serial"
    assert StaticCache.__name__ in b.details["vcd"]["branch"]["fallback"]
    assert b.token_ids == a.token_ids


def test_asking_for_the_serial_branch_is_no_fallback(tiny_mllm, image):
    mllm = tiny_mllm("llava")
    (a,) = mllm.answer_batch([image(6)], QUESTIONS[:1], methods=["vcd"], settings=_settings("vcd", "llava",
                             branch="serial"), max_new_tokens=3)
    assert a.details["vcd"]["branch"] == {"mode": "serial", "requested": "serial"}


# ---------------------------------------------------------------------- the CLI and the eval row
def test_the_cli_prints_one_warning_line_and_the_json_says_which_branch_ran(tmp_path, monkeypatch, fresh_warnings):
    from PIL import Image

    path = tmp_path / "img.png"
    Image.new("RGB", (64, 48), "red").save(path)
    args = ["answer", "--model", "micro", "--image", str(path), "--question", "what colour is the circle?",
            "--method", "damro", "--json"]
    code, out, err = run_cli(args)
    assert code == 0, err
    assert json.loads(out)["details"]["damro"]["branch"]["mode"] == "batched"
    assert "warning" not in err
    monkeypatch.setattr(contrast, "find_cache", lambda kwargs: (None, None))
    monkeypatch.setattr(contrast, "output_cache", lambda output: None)
    code, out, err = run_cli(args)
    assert code == 0, err
    assert json.loads(out)["details"]["damro"]["branch"]["mode"] == "serial"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: the negative branch runs serially"), err


def test_eval_rows_record_which_branch_ran(tiny_mllm, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
    try:
        from test_runner import make_pope
    finally:
        sys.path.pop(0)
    from innersight.eval.runner import evaluate

    pope = make_pope(tmp_path / "pope", n=4)
    out = tmp_path / "run"
    evaluate(tiny_mllm("llava"), "pope", pope, "random", ["vcd"], None, out, 4, 2, 0, {"max_new_tokens": 2},
             progress=False)
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert all(r["details"]["vcd"]["branch"] == {"mode": "batched", "requested": "batched", "negative_cache": "packed"}
               for r in rows)
