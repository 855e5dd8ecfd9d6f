"""The micro model: a real ``LlavaForConditionalGeneration`` small enough to ship in the package.

CLIP vision tower (64 px input, 8 px patches -> an 8x8 grid of image tokens) + Llama decoder,
with a word-level tokenizer over the closed vocabulary of :mod:`innersight.demo.world`, built in
code. Prompts follow llava-hf: ``USER: <image>\\n{question} ASSISTANT:`` (one ``<image>\\n`` per
image), and the saved processor carries the matching chat template, so everything that works on
``llava-hf/llava-1.5-7b-hf`` works on the micro model.

Differences from LLaVA-1.5 worth knowing: the image processor stretches to 64x64 (no centre
crop, so the token grid covers the whole image), the projector reads the *last* vision layer
(``vision_feature_layer=-1``: with only four layers, the LLaVA default of -2 would leave one
untrained), and the tokenizer lower-cases its input.

Weights are trained by :mod:`innersight.demo.train`; :func:`save` stores them in float16 (half
the bytes) while the config says float32, so ``from_pretrained`` upcasts on load and the model
runs in float32 on CPU.
"""

from __future__ import annotations

import copy
import json
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .world import vocabulary

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image
    from transformers import LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"

#: llava-hf's conversation format: images first, then the question.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    " {% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

#: common words beyond the world's own, so that free-form questions mostly tokenise to words
EXTRA_WORDS: tuple[str, ...] = tuple(
    (
        "user assistant system question answer short caption detail details object objects thing things "
        "is are was be do does can could would should will there here this that these those it its "
        "what which where who whom whose why how many much any some all each every one two three four "
        "five six seven eight nine ten zero number numbers count colors colours shape shapes word words "
        "in on at to of for from by with without inside outside near next above below left right top "
        "bottom middle center centre corner side big small large tiny little huge medium size "
        "a an the and or not no yes i you we they he she me my your see look find show tell give "
        "picture photo image images scene view background foreground text written printed sign label "
        "black white gray grey brown pink dark light bright color colour letters digits symbols "
        "rectangle oval hexagon heart arrow line lines dot dots plus"
    ).split()
)


@dataclass(frozen=True)
class MicroConfig:
    """Sizes of the micro model. The defaults make ~1.8M parameters (~3.6 MB in float16)."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 512
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 4
    text_intermediate: int = 384
    max_positions: int = 1024
    vision_feature_layer: int = -1

    @property
    def image_tokens(self) -> int:
        """Language-model tokens per image (the CLS token is dropped)."""
        return (self.image_size // self.patch_size) ** 2


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The micro model's tokenizer: WordLevel over a fixed vocabulary, lower-casing, splitting on
    whitespace and punctuation, ``<s>`` prepended; ``<image>`` is a single special token.

    The vocabulary order is fixed (specials, then sorted words, digits, letters, punctuation), so
    the same ids come out on every machine.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(vocabulary()) | set(EXTRA_WORDS))
    vocab: dict[str, int] = {}
    for tok in [PAD, BOS, EOS, UNK, IMAGE_TOKEN, *words, *string.digits, *string.ascii_lowercase,
                *string.punctuation]:
        vocab.setdefault(tok, len(vocab))
    tk = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=4096, clean_up_tokenization_spaces=True, extra_special_tokens={},
    )
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def build_processor(config: MicroConfig | None = None) -> LlavaProcessor:
    """A ``LlavaProcessor`` whose PIL image processor stretches images to the model input."""
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    cfg = config or MicroConfig()
    image_processor = LlavaImageProcessorPil(
        size={"height": cfg.image_size, "width": cfg.image_size}, do_center_crop=False,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=cfg.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )


def build_config(config: MicroConfig, tokenizer: Any) -> Any:
    """The ``LlavaConfig`` of the micro model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=config.vision_hidden, intermediate_size=config.vision_intermediate,
        num_hidden_layers=config.vision_layers, num_attention_heads=config.vision_heads,
        image_size=config.image_size, patch_size=config.patch_size, projection_dim=config.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_hidden, intermediate_size=config.text_intermediate,
        num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
        num_key_value_heads=config.text_kv_heads, max_position_embeddings=config.max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=config.vision_feature_layer, vision_feature_select_strategy="default",
        image_seq_length=config.image_tokens,
    )


def build_untrained(seed: int = 0, config: MicroConfig | None = None) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A freshly initialised micro model (float32, train mode off) and its processor.

    The initial weights are a function of ``seed`` only (``torch.manual_seed`` is set, then
    restored to the caller's RNG state).
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    cfg = config or MicroConfig()
    processor = build_processor(cfg)
    tok = processor.tokenizer
    llava_config = build_config(cfg, tok)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(llava_config).eval()
    finally:
        torch.random.set_rng_state(state)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    gen.do_sample = False
    gen.max_new_tokens = 48
    return model, processor


def count_parameters(model: Any) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def save(model: Any, processor: Any, out_dir: str | Path, *, storage_dtype: str = "float16",
         extra: dict[str, Any] | None = None) -> Path:
    """Write model + processor with ``save_pretrained`` so that
    ``AutoModelForImageTextToText.from_pretrained(out_dir)`` and
    ``AutoProcessor.from_pretrained(out_dir)`` load them offline.

    Weights are stored in ``storage_dtype`` (``float16`` or ``float32``); the config's dtype is set
    to float32 either way, so loading with the default ``dtype="auto"`` gives a float32 model.
    ``extra`` is written beside them as ``micro.json`` (e.g. the :class:`MicroConfig`).
    """
    import torch

    if storage_dtype not in ("float16", "float32"):
        raise ValueError("storage_dtype must be 'float16' or 'float32'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    to_save = copy.deepcopy(model).to(getattr(torch, storage_dtype))
    to_save.save_pretrained(out)
    processor.save_pretrained(out)
    config_path = out / "config.json"
    cfg = json.loads(config_path.read_text())
    _set_dtype(cfg, "float32")
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if extra is not None:
        (out / "micro.json").write_text(json.dumps(extra, indent=2, sort_keys=True, default=str) + "\n")
    return out


def _set_dtype(cfg: dict[str, Any], dtype: str) -> None:
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = dtype
    for value in cfg.values():
        if isinstance(value, dict):
            _set_dtype(value, dtype)


def load(path: str | Path) -> tuple[Any, Any]:
    """Load a saved micro model (float32, eval mode) and its processor, offline."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(path), local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    return model, processor


def config_dict(config: MicroConfig) -> dict[str, Any]:
    """``config`` as a JSON-ready dict."""
    return asdict(config)


# ------------------------------------------------------------------------------------ prompts
def prompt(question: str, num_images: int = 1) -> str:
    """The generation prompt, identical to the processor's chat template with
    ``add_generation_prompt=True``: ``USER: <image>\\n...{question} ASSISTANT:``."""
    return "USER: " + "<image>\n" * num_images + question + " ASSISTANT:"


def pixel_values(images: list[Image.Image], processor: Any) -> torch.Tensor:
    """The processor's ``pixel_values`` for ``images``, computed directly: [N, 3, S, S] float32.

    Equal to ``processor.image_processor(images)`` for this model's settings (stretch resize
    with the processor's resample filter, rescale, normalise) but about 3x faster — the
    training loop calls it for every batch.
    """
    import numpy as np
    import torch

    ip = processor.image_processor
    height, width = int(ip.size["height"]), int(ip.size["width"])
    if getattr(ip, "do_center_crop", False) or getattr(ip, "do_pad", False):
        raise ValueError("pixel_values() supports the micro model's stretch-only image processor")
    resample = int(ip.resample)
    arrays = [np.asarray(im.convert("RGB").resize((width, height), resample), dtype=np.float32) for im in images]
    batch = np.stack(arrays) * np.float32(ip.rescale_factor)  # [N, H, W, 3]
    mean = np.asarray(ip.image_mean, dtype=np.float32)
    std = np.asarray(ip.image_std, dtype=np.float32)
    batch = (batch - mean) / std
    return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))  # [N, 3, H, W]
