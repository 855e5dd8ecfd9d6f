"""Tiny LLaVA-OneVision (SigLIP vision tower, any-resolution tiling with ``anyres_max`` pooling,
Qwen2 decoder), random weights, saved in the layout of llava-hf's ``llava-onevision-qwen2-*-hf``
checkpoints.

The processor is saved as its parts plus ``processor_config.json`` (naming
``LlavaOnevisionProcessor``), with no video processor: video processors need torchvision, and this
package must work without it. :meth:`innersight.adapters.llava_onevision.LlavaOnevisionAdapter.load_processor`
rebuilds an image + text processor from these parts when ``AutoProcessor`` cannot load them.
"""

from __future__ import annotations

from pathlib import Path

from .llava_next import default_pinpoints
from .tokenizer import build_tokenizer, set_special_ids

ONEVISION_SPECIAL_TOKENS = ("<image>", "<video>", "<|im_start|>")

#: llava-hf's LLaVA-OneVision chat format: each turn ``<|im_start|>role\n``, the turn's images
#: first (one ``<image>\n`` each), then its text, then ``<|im_end|>\n``; no default system turn.
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build(
    out_dir: Path,
    *,
    seed: int = 0,
    image_size: int = 42,
    patch_size: int = 14,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_layers: int = 2,
    image_grid_pinpoints: list[list[int]] | None = None,
    vision_aspect_ratio: str = "anyres_max_2",
) -> Path:
    """Write a tiny ``LlavaOnevisionForConditionalGeneration`` and its processor parts to ``out_dir``.

    The base view and every tile are ``image_size`` px squares of ``p = image_size // patch_size``
    patches a side (3 by default: 9 base tokens); ``image_grid_pinpoints`` defaults to 1x1, 1x2,
    2x1 and 2x2 tiles. ``vision_aspect_ratio = "anyres_max_2"`` bilinearly shrinks an unpadded
    high-resolution grid of more than ``1.21 * 2 * p * p`` (21.78) cells, as ``anyres_max_9`` does
    for 729-token tiles: a 2x2-tile image's 6x6 grid becomes 4x4 and a 4x6 one 3x5, so pooled
    cells cover non-integer blocks of feature cells, as in the released models.
    """
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
    )

    from ...adapters.llava_onevision import image_text_processor_class

    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    pinpoints = [list(p) for p in (image_grid_pinpoints or default_pinpoints(image_size))]
    bad = [p for p in pinpoints if p[0] % image_size or p[1] % image_size]
    if bad:
        raise ValueError(f"image_grid_pinpoints {bad} are not multiples of image_size={image_size}")
    out_dir = Path(out_dir)
    tok = build_tokenizer(ONEVISION_SPECIAL_TOKENS, extra_words=("You", "helpful"), bos="<|endoftext|>",
                          eos="<|im_end|>", add_bos=False)
    vision = {
        "model_type": "siglip_vision_model", "hidden_size": hidden_size, "intermediate_size": hidden_size * 2,
        "num_hidden_layers": vision_layers, "num_attention_heads": num_heads, "image_size": image_size,
        "patch_size": patch_size, "vision_use_head": False,
    }
    text = {
        "model_type": "qwen2", "vocab_size": len(tok), "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2, "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads, "max_position_embeddings": 2048,
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
    }
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full", image_grid_pinpoints=pinpoints, vision_aspect_ratio=vision_aspect_ratio,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    set_special_ids(model, tok)
    model.save_pretrained(out_dir)
    # llava-hf: size 384x384 stretched (no centre crop), tiles of the same size
    ip = LlavaOnevisionImageProcessorPil(size={"height": image_size, "width": image_size},
                                         image_grid_pinpoints=pinpoints)
    processor_cls = image_text_processor_class()
    processor = processor_cls(
        image_processor=ip, tokenizer=tok, num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full", vision_aspect_ratio=vision_aspect_ratio,
        chat_template=ONEVISION_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    return out_dir
