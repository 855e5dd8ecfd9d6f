"""Adapters: the only place that knows architecture facts of each supported family.

:data:`ADAPTERS` maps a config ``model_type`` to ``module:Class``; modules are imported lazily so
that listing the supported families needs no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import UnsupportedModelError

ADAPTERS: dict[str, str] = {
    "llava": "llava:LlavaAdapter",
    "llava_next": "llava_next:LlavaNextAdapter",
    "llava_onevision": "llava_onevision:LlavaOnevisionAdapter",
    "instructblip": "instructblip:InstructBlipAdapter",
    "qwen2_vl": "qwen2_vl:Qwen2VLAdapter",
    "qwen2_5_vl": "qwen2_vl:Qwen25VLAdapter",
    "qwen3_vl": "qwen3_vl:Qwen3VLAdapter",
    "internvl": "internvl:InternVLAdapter",
    "gemma3": "gemma3:Gemma3Adapter",
    "smolvlm": "smolvlm:SmolVLMAdapter",
}

#: human names of the families, for `innersight list` and error messages
FAMILY_NAMES: dict[str, str] = {
    "llava": "LLaVA-1.5 (LlavaForConditionalGeneration)",
    "llava_next": "LLaVA-NeXT (LlavaNextForConditionalGeneration)",
    "llava_onevision": "LLaVA-OneVision (LlavaOnevisionForConditionalGeneration)",
    "instructblip": "InstructBLIP (InstructBlipForConditionalGeneration)",
    "qwen2_vl": "Qwen2-VL (Qwen2VLForConditionalGeneration)",
    "qwen2_5_vl": "Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration)",
    "qwen3_vl": "Qwen3-VL (Qwen3VLForConditionalGeneration)",
    "internvl": "InternVL 3 / 3.5 -hf (InternVLForConditionalGeneration)",
    "gemma3": "Gemma 3 (Gemma3ForConditionalGeneration)",
    "smolvlm": "SmolVLM / SmolVLM2 (SmolVLMForConditionalGeneration)",
}

#: every supported family (config ``model_type``), in registry order: what tests parametrise over
FAMILIES: tuple[str, ...] = tuple(ADAPTERS)


def adapter_class(model_type: str) -> Any:
    """The adapter class for a config ``model_type``; a clear error for anything else."""
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; innersight supports "
            + ", ".join(FAMILY_NAMES.values())
        )
    module, cls = ADAPTERS[model_type].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def adapter_for(model: Any, processor: Any) -> Any:
    """Build the adapter for an already loaded model, chosen from its config's model type."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    return adapter_class(model_type)(model, processor)
