"""innersight: make multimodal LLMs use what they already know, training-free, at inference time.

>>> import innersight
>>> mllm = innersight.load("llava-hf/llava-1.5-7b-hf")          # doctest: +SKIP
>>> mllm.answer("street.jpg", "What is written on the sign?").text  # doctest: +SKIP

Heavy imports (torch, transformers) happen only when a model is loaded.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load", "wrap", "MLLM", "Answer"]


def load(model: str, *, device: str | None = None, dtype: Any = None, trust_remote_code: bool = False,
         model_kwargs: dict[str, Any] | None = None):
    """Load a supported multimodal LLM; see :func:`innersight.loading.load`."""
    from .loading import load as _load

    return _load(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, model_kwargs=model_kwargs)


def wrap(model: Any, processor: Any, *, name: str | None = None):
    """Wrap an already-loaded model and processor (quantized, fine-tuned...); see
    :func:`innersight.loading.wrap`."""
    from .loading import wrap as _wrap

    return _wrap(model, processor, name=name)


def __getattr__(name: str) -> Any:
    if name in ("MLLM", "Answer"):
        from . import mllm

        return getattr(mllm, name)
    raise AttributeError(f"module 'innersight' has no attribute {name!r}")
