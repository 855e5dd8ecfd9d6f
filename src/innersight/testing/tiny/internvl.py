"""Tiny InternVL 3 / 3.5 -hf (InternViT with a CLS token, 2x2 pixel shuffle, MLP projector, Qwen2 or
Qwen3 decoder), random weights, saved in the layout of the ``OpenGVLab/InternVL3-*-hf`` checkpoints.

The processor is saved as its parts plus ``processor_config.json`` (``image_seq_length``), the way
the hub checkpoints ship it, but without a video processor: ``InternVLProcessor`` needs one, video
processors need torchvision, and this package must work without it.
:meth:`innersight.adapters.internvl.InternVLAdapter.load_processor` rebuilds an image + text
processor from these parts when ``AutoProcessor`` cannot load them.
"""

from __future__ import annotations

import json
from pathlib import Path

from .tokenizer import build_tokenizer, set_special_ids

#: the -hf checkpoints' named multimodal tokens (``extra_special_tokens`` of tokenizer_config.json)
INTERNVL_NAMED_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
INTERNVL_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", *INTERNVL_NAMED_TOKENS.values())

#: The InternVL -hf chat format (transformers' conversion script): no default system turn, each
#: turn ``<|im_start|>role\n...<|im_end|>\n``, each image ``<IMG_CONTEXT>\n`` (the processor
#: expands it to ``<img>`` + one ``<IMG_CONTEXT>`` per token + ``</img>``).
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif part['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TEXT_MODELS = ("qwen2", "qwen3")


def build(
    out_dir: Path,
    *,
    seed: int = 0,
    text_model: str = "qwen2",
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    min_patches: int = 1,
    max_patches: int = 4,
) -> Path:
    """Write a tiny ``InternVLForConditionalGeneration`` and its processor parts to ``out_dir``.

    Every tile is an ``image_size`` px square of ``(image_size // patch_size) ** 2`` vision
    patches (4x4 with the defaults) that pixel shuffle turns into a quarter as many language-model
    tokens (2x2). ``crop_to_patches`` cuts each image into 1 to ``max_patches`` tiles of an
    aspect-matched grid, plus a thumbnail when there is more than one: a 90x60 image becomes a
    2x2 grid + thumbnail = 5 tiles = 20 tokens. ``text_model`` picks the decoder: ``qwen2``
    (InternVL 3) or ``qwen3`` (InternVL 3.5).
    """
    import torch
    from transformers import (
        AutoTokenizer,
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
    )

    from ...adapters.internvl import image_text_processor

    if text_model not in TEXT_MODELS:
        raise ValueError(f"unknown text model {text_model!r}; choose one of {', '.join(TEXT_MODELS)}")
    side = image_size // patch_size
    if image_size % patch_size or side % 2:
        raise ValueError(f"image_size {image_size} must be an even multiple of patch_size {patch_size} "
                         "(pixel shuffle merges 2x2 patches)")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(out_dir, AutoTokenizer)
    text = {
        "model_type": text_model,
        "vocab_size": len(tok),
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "max_position_embeddings": 2048,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "tie_word_embeddings": False,
    }
    vision = {
        "hidden_size": vision_hidden_size,
        "intermediate_size": vision_hidden_size * 2,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": vision_heads,
        "image_size": image_size,
        "patch_size": patch_size,
        "use_mean_pooling": True,
    }
    config = InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=tok.context_image_token_id,
        image_seq_length=(side // 2) ** 2, downsample_ratio=0.5, vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    _randomise_zero_initialised(model)
    set_special_ids(model, tok)
    model.save_pretrained(out_dir)

    image_processor = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size}, crop_to_patches=True,
        min_patches=min_patches, max_patches=max_patches,
    )
    processor = image_text_processor()(
        image_processor=image_processor, tokenizer=tok, image_seq_length=(side // 2) ** 2,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    return out_dir


def _tokenizer(out_dir: Path, auto_tokenizer: type):
    """The word-level tokenizer with InternVL's named multimodal tokens, written to ``out_dir``
    and read back, so that ``tokenizer_config.json`` carries them as the hub checkpoints do
    (``extra_special_tokens`` as a dict: ``tok.context_image_token``, ``tok.start_image_token_id``...)."""
    tok = build_tokenizer(INTERNVL_SPECIAL_TOKENS, add_bos=False)
    tok.save_pretrained(out_dir)
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["extra_special_tokens"] = dict(INTERNVL_NAMED_TOKENS)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return auto_tokenizer.from_pretrained(out_dir)


def _randomise_zero_initialised(model) -> None:
    """InternViT initialises its CLS token and position embeddings to zeros; give them small
    random values so that the tiny tower's CLS attention and patch order are not degenerate."""
    import torch

    embeddings = model.model.vision_tower.embeddings
    with torch.no_grad():
        embeddings.cls_token.normal_(std=0.5)
        if embeddings.position_embeddings is not None:
            embeddings.position_embeddings.normal_(std=0.5)

