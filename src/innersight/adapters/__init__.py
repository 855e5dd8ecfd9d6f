"""Adapters: the only place that knows architecture facts of each supported family.

:data:`ADAPTERS` maps a config ``model_type`` to ``module:Class`` (a module of this package) and
:data:`FAMILY_NAMES` gives its human name: adding a family is one line in each. :data:`REGISTRY`
(the families registry, :class:`innersight.registry.Registry`) is built from them; modules are
imported lazily so that listing the supported families needs no torch.
"""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModelError
from ..registry import Registry

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

#: config ``model_type`` -> adapter class (imported on first use): the families registry
REGISTRY: Registry[Any] = Registry(
    "model type", missing="model type {name!r} is not supported; innersight supports {choices}",
    error=UnsupportedModelError, choices=lambda: list(FAMILY_NAMES.values()))


def register_family(model_type: str, target: str, name: str) -> None:
    """Register an adapter: ``target`` is ``module:Class`` in this package (``"llava:LlavaAdapter"``)
    or a full ``package.module:Class``; ``name`` is the family's human name."""
    module = target.split(":")[0]
    REGISTRY.register(model_type, target=target if "." in module else f"{__name__}.{target}")
    FAMILY_NAMES.setdefault(model_type, name)


for _model_type, _target in ADAPTERS.items():
    if _model_type not in FAMILY_NAMES:
        raise ValueError(f"add {_model_type!r} to innersight.adapters.FAMILY_NAMES (its human name)")
    register_family(_model_type, _target, FAMILY_NAMES[_model_type])

#: every supported family (config ``model_type``), in registry order: what tests parametrise over
FAMILIES: tuple[str, ...] = tuple(REGISTRY)


def adapter_class(model_type: str) -> Any:
    """The adapter class for a config ``model_type``; a clear error for anything else."""
    return REGISTRY.lookup(model_type)


def adapter_for(model: Any, processor: Any) -> Any:
    """Build the adapter for an already loaded model, chosen from its config's model type."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    return adapter_class(model_type)(model, processor)
