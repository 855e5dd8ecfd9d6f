"""What ``generate`` hands the model, read the same way on every supported transformers.

innersight never patches ``generate``. Where a method must follow generation from inside (the
batched negative branch of DAMRO/VCD rides along in the forward calls ``generate`` makes), it
reads the keyword arguments of those calls with a forward pre-hook. Those names are not a
documented interface, and they change: transformers 5.25 renamed the cache argument from
``past_key_values`` to ``cache`` (the model outputs' field too). This module is the one place
that knows those conventions, and it reads them so that a future rename cannot go unnoticed:

* **the cache** is found by *type*, not only by name: :func:`find_cache` looks under every name
  the supported range uses (:data:`CACHE_NAMES`), then for any ``transformers`` ``Cache``
  instance among the arguments. A call that carries no cache at all is reported as ``None``:
  the caller then records why it cannot batch and warns (never a silent change of cost);
* **the name a forward takes** for a cache we pass ourselves is read from its signature
  (:func:`cache_argument`), so our own forwards never use a deprecated name;
* **the attention mask, position ids and input ids** are public ``forward`` arguments, stable
  across 4.x and 5.x; a missing ``position_ids`` is refused loudly by the caller.

``tests/test_generation_calls.py`` pins each supported name, and the family tests assert that
the batched branch really runs batched on the installed transformers (CI runs them on the floor
and on the newest release).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

#: the cache argument's names over the supported range, newest first
#: (5.25+: ``cache``; 5.17-5.24: ``past_key_values``)
CACHE_NAMES: tuple[str, ...] = ("cache", "past_key_values")


def is_cache(value: Any) -> bool:
    """Whether ``value`` is a transformers KV cache (``transformers.cache_utils.Cache``)."""
    from transformers.cache_utils import Cache

    return isinstance(value, Cache)


def find_cache(kwargs: Mapping[str, Any]) -> tuple[str | None, Any]:
    """``(name, cache)`` of the KV cache among a forward call's keyword arguments, ``(None, None)``
    when the call carries none. Known names first (:data:`CACHE_NAMES`), then any argument that
    is a ``Cache`` (a future rename is still found)."""
    for name in CACHE_NAMES:
        value = kwargs.get(name)
        if value is not None and is_cache(value):
            return name, value
    for name, value in kwargs.items():
        if is_cache(value):
            return name, value
    return None, None


def output_cache(output: Any) -> Any:
    """The KV cache a model output carries (``cache`` or ``past_key_values`` or any ``Cache``
    field), or None."""
    for name in CACHE_NAMES:
        value = getattr(output, name, None)
        if value is not None and is_cache(value):
            return value
    if isinstance(output, Mapping):
        for value in output.values():
            if is_cache(value):
                return value
    return None


def cache_argument(forward: Any) -> str:
    """The name under which ``forward`` takes a KV cache: the newest of :data:`CACHE_NAMES` its
    signature declares. A forward that declares none of them (e.g. one that only takes
    ``**kwargs``) gets the newest name; :class:`LookupError` if it takes no keyword arguments."""
    parameters = inspect.signature(forward).parameters
    for name in CACHE_NAMES:
        if name in parameters:
            return name
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return CACHE_NAMES[0]
    raise LookupError(f"{getattr(forward, '__qualname__', forward)} takes no KV cache argument")


def last_logits_kwargs(model: Any) -> dict[str, Any]:
    """Keyword arguments that make ``model``'s forward compute the lm_head at the last position
    only (``logits_to_keep=1``), or ``{}`` where it cannot.

    Read from the signatures: LLaVA, LLaVA-NeXT and Qwen2-VL / Qwen2.5-VL declare
    ``logits_to_keep``; InstructBLIP does not, but hands its ``**kwargs`` to a decoder-only
    language model, whose forward declares it (an encoder-decoder one, Flan-T5, gets ``{}``).
    A caller must read the last position only (``logits[:, -1]``): the other rows are absent.
    """
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return {"logits_to_keep": 1}
    config = getattr(model, "config", None)
    language_model = getattr(model, "language_model", None)
    if (language_model is not None and getattr(config, "use_decoder_only_language_model", False)
            and "logits_to_keep" in inspect.signature(language_model.forward).parameters):
        return {"logits_to_keep": 1}
    return {}
