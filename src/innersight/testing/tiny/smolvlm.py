"""Tiny SmolVLM (``SmolVLMForConditionalGeneration``: SigLIP-style vision tower, pixel-shuffle
connector, Llama decoder), random weights, saved in the layout of the SmolVLM2 hub checkpoints.

The processor is saved as its parts plus ``processor_config.json`` (``image_seq_len`` and the
processor class), as the hub checkpoints ship it. The stock ``SmolVLMProcessor`` needs a video
processor (torchvision) and the ``num2words`` package; neither is needed for images, and
:meth:`innersight.adapters.smolvlm.SmolVLMAdapter.load_processor` rebuilds an image + text
processor from these parts when ``AutoProcessor`` cannot load them.

Defaults: tiles of ``image_size = 48`` px, ``patch_size = 8`` (6 x 6 patches), ``scale_factor = 2``
(3 x 3 = 9 language-model tokens per tile); images are first resized to a longest edge of
``2 * image_size = 96`` px, so an image is cut into at most 2 x 2 tiles plus the global view.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .tokenizer import build_tokenizer, set_special_ids

IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
CHAT_START = "<|im_start|>"

#: SmolVLM's chat format: ``<|im_start|>``, then per turn the capitalised role, ``:`` (no space
#: when the turn starts with an image), the images as ``<image>`` and the text in content order,
#: ``<end_of_utterance>`` and a newline; the generation prompt is ``Assistant:``.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def tile_tokens(max_tiles_per_side: int) -> list[str]:
    """``<row_r_col_c>`` for every tile position of a grid up to ``max_tiles_per_side`` a side."""
    n = max_tiles_per_side
    return [f"<row_{r}_col_{c}>" for r in range(1, n + 1) for c in range(1, n + 1)]


def build(
    out_dir: Path,
    *,
    seed: int = 0,
    image_size: int = 48,
    patch_size: int = 8,
    scale_factor: int = 2,
    longest_edge: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    do_image_splitting: bool = True,
) -> Path:
    """Write a tiny ``SmolVLMForConditionalGeneration`` and its processor parts to ``out_dir``.

    Every tile (and the global view) is an ``image_size`` px square; the vision tower cuts it
    into ``image_size // patch_size`` patches a side and the connector merges ``scale_factor``
    x ``scale_factor`` patches into one token, so a tile is
    ``((image_size // patch_size) // scale_factor) ** 2`` tokens. ``longest_edge`` (default
    ``2 * image_size``) is the side the processor first resizes every image's longest edge to.
    """
    import torch
    from transformers import LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

    # the module path: transformers 5.17's top-level name is a torchvision placeholder
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    side = image_size // patch_size
    if side % scale_factor:
        raise ValueError(f"{side} patches a side do not divide by scale_factor {scale_factor}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    longest = int(longest_edge or 2 * image_size)
    image_seq_len = (side // scale_factor) ** 2
    out_dir = Path(out_dir)
    specials = [IMAGE_TOKEN, FAKE_TOKEN, GLOBAL_TOKEN, CHAT_START, "<video>",
                *tile_tokens(max(1, math.ceil(longest / image_size)))]
    tok = build_tokenizer(specials, extra_words=("User", "Assistant"), eos=END_OF_UTTERANCE, add_bos=False)
    vision = SmolVLMVisionConfig(
        hidden_size=vision_hidden_size, intermediate_size=vision_hidden_size * 2, num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads, image_size=image_size, patch_size=patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config = SmolVLMConfig(vision_config=vision, text_config=text, scale_factor=scale_factor,
                           image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(config).eval()
    set_special_ids(model, tok)
    model.save_pretrained(out_dir)

    image_processor = SmolVLMImageProcessorPil(
        size={"longest_edge": longest}, max_image_size={"longest_edge": image_size},
        do_image_splitting=do_image_splitting,
    )
    image_processor.save_pretrained(out_dir)
    # name the processor class beside the image processor, as the hub checkpoints do
    pre = out_dir / "preprocessor_config.json"
    pre_dict = json.loads(pre.read_text())
    pre_dict["processor_class"] = "SmolVLMProcessor"
    pre.write_text(json.dumps(pre_dict, indent=2, sort_keys=True) + "\n")
    (out_dir / "processor_config.json").write_text(
        json.dumps({"image_seq_len": image_seq_len, "processor_class": "SmolVLMProcessor"}, indent=2) + "\n"
    )
    tok.save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").write_text(SMOLVLM_CHAT_TEMPLATE)
    return out_dir
