"""Tiny Qwen3-VL (dynamic-resolution ViT with learned + rotary positions, 2x2 patch merger,
DeepStack mergers, Qwen3 decoder with interleaved M-RoPE), random weights, saved in the layout of
the ``Qwen/Qwen3-VL-*`` hub checkpoints.

As for Qwen2-VL (:mod:`innersight.testing.tiny.qwen2_vl`), the processor is saved as its parts:
``preprocessor_config.json`` (the PIL image processor, naming ``Qwen3VLProcessor``), the tokenizer
files and ``chat_template.jinja``; no video processor (it needs torchvision).
:meth:`innersight.adapters.qwen3_vl.Qwen3VLAdapter.load_processor` rebuilds an image + text
processor from these parts when ``AutoProcessor`` cannot load them.
"""

from __future__ import annotations

import json
from pathlib import Path

from .qwen2_vl import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS
from .tokenizer import build_tokenizer, set_special_ids

#: the released checkpoints normalise with mean = std = 0.5 (not CLIP's statistics)
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def interleaved_mrope_section(head_dim: int) -> list[int]:
    """Split ``head_dim / 2`` rotary frequencies into (temporal, height, width) sections for the
    interleaved M-RoPE of Qwen3-VL (24:20:20 for head_dim 128): height and width each take every
    third frequency from index 1 / 2 up to ``3 * section``, so ``3 * section <= head_dim / 2``."""
    half = head_dim // 2
    spatial = max(1, (5 * half) // 16)
    if half < 3 or 3 * spatial > half:
        raise ValueError(f"head_dim {head_dim} is too small for interleaved M-RoPE (needs at least 6)")
    return [half - 2 * spatial, spatial, spatial]


def build(
    out_dir: Path,
    *,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    patch_size: int = 16,
    merge_size: int = 2,
    min_pixels: int = 32 * 32,
    max_pixels: int = 32 * 32 * 16,
    num_position_embeddings: int = 64,
    deepstack_visual_indexes: tuple[int, ...] = (0, 1),
) -> Path:
    """Write a tiny ``Qwen3VLForConditionalGeneration`` and its processor parts to ``out_dir``.

    Images are resized by ``smart_resize`` to multiples of ``patch_size * merge_size`` (32) with
    ``min_pixels <= h * w <= max_pixels``: with the defaults a 64x48 image becomes 64x64 pixels, a
    4x4 patch grid, 2x2 = 4 language-model tokens. ``deepstack_visual_indexes`` names the vision
    blocks whose outputs, merged by their own mergers, are added to the hidden states of the image
    tokens after decoder layers ``0, 1, ...`` (one decoder layer per index; the default: vision
    blocks 0 and 1, after decoder layers 0 and 1; the released models use three levels).
    """
    import torch
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if len(deepstack_visual_indexes) > num_layers:
        raise ValueError(f"{len(deepstack_visual_indexes)} deepstack levels need at least as many decoder layers")
    out_dir = Path(out_dir)
    tok = build_tokenizer(QWEN_SPECIAL_TOKENS, extra_words=("You", "helpful"), add_bos=False)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = hidden_size // num_heads
    text = {
        "vocab_size": len(tok),
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                            "mrope_section": interleaved_mrope_section(head_dim), "mrope_interleaved": True},
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    vision = {
        "depth": vision_layers, "hidden_size": vision_hidden_size, "out_hidden_size": hidden_size,
        "intermediate_size": vision_hidden_size * 2, "num_heads": vision_heads, "patch_size": patch_size,
        "spatial_merge_size": merge_size, "temporal_patch_size": 2,
        "num_position_embeddings": num_position_embeddings,
        "deepstack_visual_indexes": list(deepstack_visual_indexes),
    }
    config = Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    set_special_ids(model, tok)
    model.save_pretrained(out_dir)

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size, merge_size=merge_size,
        temporal_patch_size=2, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
    )
    image_processor.save_pretrained(out_dir)
    # name the processor class in preprocessor_config.json, as the hub checkpoints do
    pre = out_dir / "preprocessor_config.json"
    pre_dict = json.loads(pre.read_text())
    pre_dict["processor_class"] = "Qwen3VLProcessor"
    pre.write_text(json.dumps(pre_dict, indent=2, sort_keys=True) + "\n")
    tok.save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE)
    return out_dir
