"""Tiny Gemma 3 (SigLIP vision tower, average-pooling projector, Gemma 3 decoder with sliding-window
and global layers), random weights, saved in the layout of the ``google/gemma-3-*-it`` checkpoints.

With the defaults the vision tower sees 64 px images cut into 8 px patches (an 8x8 patch grid);
the projector average-pools 2x2 patch blocks into ``mm_tokens_per_image = 16`` language-model
tokens (a 4x4 grid). The decoder has the released 5:1 pattern: five sliding-window layers whose
window (20 tokens) is shorter than a prompt with an image, then one global layer. Six layers, not
two: the LM head is tied to the embeddings as in the released models, so DoLa's default candidate
layers skip the embeddings and a 2- or 4-layer model would leave its lower bucket empty.
"""

from __future__ import annotations

from pathlib import Path

from .tokenizer import build_tokenizer, set_special_ids

#: the Gemma 3 control tokens the tiny tokenizer knows (image: begin, soft token, end; chat turns)
GEMMA3_SPECIAL_TOKENS = ("<start_of_image>", "<image_soft_token>", "<end_of_image>", "<start_of_turn>", "<end_of_turn>")

#: The Gemma 3 chat format (written from the released template's behaviour): ``<bos>``, then per
#: turn ``<start_of_turn>role\n...<end_of_turn>\n`` with ``assistant`` called ``model``, a system
#: turn folded into the first user turn, each image as ``<start_of_image>`` (the processor expands it
#: to the full image sequence), text parts trimmed.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{% set prefix = messages[0]['content'] + '\n\n' %}"
    "{% else %}{% set prefix = messages[0]['content'][0]['text'] + '\n\n' %}{% endif %}"
    "{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_gemma3_tokenizer():
    """The word-level test tokenizer with Gemma's ``<bos>`` / ``<eos>`` and the image tokens
    registered as the named special tokens ``Gemma3Processor`` reads (``boi_token``,
    ``image_token``, ``eoi_token`` and their ids), as the released tokenizer config does."""
    from transformers import PreTrainedTokenizerFast

    base = build_tokenizer(GEMMA3_SPECIAL_TOKENS, extra_words=("model",), bos="<bos>", eos="<eos>")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=base.model_max_length,
        extra_special_tokens={"boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
                              "eoi_token": "<end_of_image>"},
    )
    tok.add_special_tokens({"additional_special_tokens": list(GEMMA3_SPECIAL_TOKENS)})
    return tok


def build(
    out_dir: Path,
    *,
    seed: int = 0,
    image_size: int = 64,
    patch_size: int = 8,
    tokens_per_side: int = 4,
    hidden_size: int = 64,
    num_layers: int = 6,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    sliding_window: int = 20,
    layer_types: list[str] | None = None,
    do_pan_and_scan: bool = False,
) -> Path:
    """Write a tiny ``Gemma3ForConditionalGeneration`` + ``Gemma3Processor`` to ``out_dir``.

    The image processor stretches every image to ``image_size`` square (no crop, no padding);
    ``(image_size // patch_size) ** 2`` patches are average-pooled in square blocks of
    ``image_size // patch_size // tokens_per_side`` patches a side into ``tokens_per_side ** 2``
    image tokens. ``layer_types`` defaults to sliding-window layers with a global layer last.
    """
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
    )

    patches = image_size // patch_size
    if image_size % patch_size or patches % tokens_per_side:
        raise ValueError(f"image_size {image_size} / patch_size {patch_size} must give a patch grid that "
                         f"tokens_per_side {tokens_per_side} divides")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must be a multiple of num_heads, num_heads of num_kv_heads")
    out_dir = Path(out_dir)
    tok = build_gemma3_tokenizer()
    head_dim = hidden_size // num_heads
    types = list(layer_types) if layer_types is not None else (
        ["sliding_attention"] * (num_layers - 1) + ["full_attention"]
    )
    text = {
        "vocab_size": len(tok),
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim,
        "max_position_embeddings": 2048,
        "sliding_window": sliding_window,
        "layer_types": types,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": vision_hidden_size,
        "intermediate_size": vision_hidden_size * 2,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": vision_heads,
        "image_size": image_size,
        "patch_size": patch_size,
        "vision_use_head": False,
    }
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=tokens_per_side**2,
        boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id, image_token_index=tok.image_token_id,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers initialises the projection to zeros: every image would be blank
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, vision_hidden_size**-0.5)
    set_special_ids(model, tok)
    ip = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size}, do_pan_and_scan=do_pan_and_scan,
        pan_and_scan_min_crop_size=image_size // 2, pan_and_scan_max_num_crops=4,
        pan_and_scan_min_ratio_to_activate=1.2,
    )
    processor = Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=GEMMA3_CHAT_TEMPLATE,
                                image_seq_length=tokens_per_side**2)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
