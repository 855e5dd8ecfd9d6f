"""Loading: local directories through the user path, clear errors for everything else."""

from __future__ import annotations

import json

import pytest

import innersight
from innersight.errors import ModelLoadError, UnsupportedModelError, UserInputError
from innersight.loading import resolve_dtype, resolve_model_path


def test_load_tiny_llava_from_directory(tiny_dir):
    import torch

    mllm = innersight.load(str(tiny_dir("llava")), device="cpu")
    assert mllm.adapter.family == "llava"
    assert next(mllm.model.parameters()).dtype == torch.float32  # fp32 default on CPU
    assert not mllm.model.training
    assert mllm.adapter.tokenizer.padding_side == "left"


def test_dtype_choice(tiny_dir):
    import torch

    mllm = innersight.load(str(tiny_dir("llava")), device="cpu", dtype="bf16")
    assert next(mllm.model.parameters()).dtype == torch.bfloat16
    assert resolve_dtype(None, "cuda") == torch.bfloat16
    assert resolve_dtype(None, "cpu") == torch.float32
    with pytest.raises(UserInputError, match="unknown dtype"):
        resolve_dtype("int3", "cpu")


def test_unsupported_family_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnsupportedModelError, match="LLaVA-1.5.*Qwen2.5-VL"):
        innersight.load(str(tmp_path), device="cpu")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_missing_local_path():
    with pytest.raises(ModelLoadError, match="no such directory"):
        resolve_model_path("./does/not/exist")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="cannot load model"):
        innersight.load("nobody-here/not-a-real-model-xyz", device="cpu")


def test_cuda_requested_without_cuda(tiny_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserInputError, match="CUDA is not available"):
        innersight.load(str(tiny_dir("llava")), device="cuda")


# ---------------------------------------------------------------------- model_kwargs and wrap()
def test_model_kwargs_reach_from_pretrained_and_win(tiny_dir):
    import torch

    path = str(tiny_dir("llava"))
    mllm = innersight.load(path, device="cpu", model_kwargs={"attn_implementation": "eager", "dtype": torch.bfloat16})
    assert mllm.adapter.language_model.config._attn_implementation == "eager"  # not innersight's sdpa
    assert next(mllm.model.parameters()).dtype == torch.bfloat16  # not the CPU's fp32 default
    legacy = innersight.load(path, device="cpu", model_kwargs={"torch_dtype": torch.float16})
    assert next(legacy.model.parameters()).dtype == torch.float16
    with pytest.raises(UserInputError, match="model_kwargs must be a dict"):
        innersight.load(path, device="cpu", model_kwargs=[("dtype", "bf16")])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "instructblip", "smolvlm"])
def test_wrap_gives_the_answers_of_load(tiny_dir, family):
    from PIL import Image

    from innersight.adapters import adapter_class

    path = str(tiny_dir(family))
    loaded = innersight.load(path, device="cpu")
    cls = adapter_class(family)
    model = cls.model_class().from_pretrained(path, attn_implementation="sdpa")
    model.train()  # wrap puts it in eval mode
    processor = cls.load_processor(path)
    wrapped = innersight.wrap(model, processor, name="mine")
    assert wrapped.model is model and not model.training and wrapped.name == "mine"
    assert wrapped.adapter.family == loaded.adapter.family
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    a = wrapped.answer(image, "what colour is it?", methods=["deco"], max_new_tokens=4)
    b = loaded.answer(image, "what colour is it?", methods=["deco"], max_new_tokens=4)
    assert a.token_ids == b.token_ids and a.token_ids


def test_wrap_refuses_what_it_cannot_serve(tiny_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    from innersight.adapters import adapter_class

    path = str(tiny_dir("llava"))
    processor = adapter_class("llava").load_processor(path)
    with pytest.raises(UserInputError, match="needs a transformers model"):
        innersight.wrap(object(), processor)
    text_only = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(UnsupportedModelError):
        innersight.wrap(text_only, processor)
    model = adapter_class("llava").model_class().from_pretrained(path)
    with pytest.raises(UserInputError, match="processor"):
        innersight.wrap(model, None)
