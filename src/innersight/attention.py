"""One switchable attention implementation that methods hook per layer, without copying models.

transformers 5.x dispatches every decoder attention layer through ``ALL_ATTENTION_FUNCTIONS``
keyed by ``config._attn_implementation``. We register one function, ``innersight``, with
:class:`~transformers.AttentionInterface` (and SDPA's mask builder with
:class:`~transformers.masking_utils.AttentionMaskInterface`, else the causal mask is silently
dropped). It runs SDPA unless the attention module carries a *layer handler* (an attribute we set
and remove ourselves); the handler then computes that layer's attention and may record or change
it. :func:`layer_handlers` switches only the language model to ``innersight`` (the vision tower
keeps its implementation), installs the handlers, and restores everything in ``finally``.

Handler rows. A forward may carry rows that are not the batch a method prepared for: a
contrastive negative branch (:class:`~innersight.decode.contrast.NegativeBranch`) appends its
rows to the main batch, or runs its own forwards. :func:`handler_rows` says so explicitly, per
attention module: inside ``handler_rows(layers, n)`` a handler sees only the first ``n`` rows of
every forward (query, key, value and a per-row mask sliced; other keyword arguments passed as
they are), the rows after them run transformers' SDPA untouched, and the two outputs are
concatenated in row order; ``n = 0`` bypasses the handlers (the whole forward runs SDPA).
:func:`handler_row_limit` reads the scope, for hooks that belong to a method (e.g. VAR's sink
detection on the layers' inputs) and must follow it too.

Packed rows. A batched negative branch may keep its rows' keys and values apart, at their own
length (:class:`~innersight.decode.contrast.PackedLayer`): its cache layer hands the attention the
main rows' keys only, and :func:`packed_rows` tells the dispatcher where the other rows' keys,
values and mask are; those rows run plain SDPA on them (never a handler).

Key columns. A handler's key column ``j`` is sequence position ``key_start(module, Lq, Lk) + j``
(:func:`key_start`): 0 for a full cache, but a sliding-window cache layer (Gemma 3, Mistral) hands
the attention only its last ``window - 1`` cached keys plus the new ones, so at a decoding step
column 0 is a later position. :func:`layer_handlers` records, per handled module and forward, how
many positions its cache layer held before the call.

Handlers see the same arguments as a transformers attention function::

    handler(module, query [B, H, Lq, D], key [B, Hkv, Lk, D], value [B, Hkv, Lk, D],
            attention_mask ([B, 1, Lq, Lk] bool/float) | None, scaling=..., dropout=..., **kw)
        -> (attn_output [B, Lq, H, D], attn_weights | None)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

IMPLEMENTATION = "innersight"
_HANDLER_ATTR = "_innersight_attention_handler"
_ROWS_ATTR = "_innersight_handler_rows"
_PAST_ATTR = "_innersight_cached_positions"
_PACKED_ATTR = "_innersight_packed_rows"

Handler = Callable[..., tuple[torch.Tensor, Any]]


class StopForward(Exception):
    """Raised by a handler once it has what it needs, to skip the remaining layers."""


def stop_forward(*args: Any, **kwargs: Any) -> Any:
    """A layer handler that ends the forward in its layer's attention (:class:`StopForward`): the
    layers below it (and this layer's cache entry) have run, nothing above it will."""
    raise StopForward


def sdpa_forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' own SDPA attention (the fast path)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _dispatch(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    packed = getattr(module, _PACKED_ATTR, None)
    tail = packed.tail_inputs(query, key) if packed is not None else None
    if tail is not None:
        return _packed_forward(module, query, key, value, attention_mask, tail, **kwargs)
    return _handled_forward(module, query, key, value, attention_mask, **kwargs)


def _handled_forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The handler (within its :func:`handler_rows` scope) or plain SDPA, for rows sharing ``key``."""
    handler = getattr(module, _HANDLER_ATTR, None)
    limit = getattr(module, _ROWS_ATTR, None)
    if handler is None or limit == 0:
        return sdpa_forward(module, query, key, value, attention_mask, **kwargs)
    rows = int(query.shape[0])
    if limit is None or limit >= rows:
        return handler(module, query, key, value, attention_mask, **kwargs)
    # the first ``limit`` rows through the handler, the others through plain SDPA
    head_mask = tail_mask = attention_mask  # [B, 1, Lq, Lk], or [1, ...] broadcast over rows
    if attention_mask is not None and attention_mask.shape[0] == rows:
        head_mask, tail_mask = attention_mask[:limit], attention_mask[limit:]
    head, head_weights = handler(module, query[:limit], key[:limit], value[:limit], head_mask, **kwargs)
    tail, tail_weights = sdpa_forward(module, query[limit:], key[limit:], value[limit:], tail_mask, **kwargs)
    return _joined(head, head_weights, tail, tail_weights)


def _joined(head: torch.Tensor, head_weights: Any, tail: torch.Tensor, tail_weights: Any) -> tuple[torch.Tensor, Any]:
    out = torch.cat([head, tail], dim=0)  # [B, Lq, H, D]
    weights = None
    if isinstance(head_weights, torch.Tensor) and isinstance(tail_weights, torch.Tensor) \
            and head_weights.shape[1:] == tail_weights.shape[1:]:
        weights = torch.cat([head_weights, tail_weights], dim=0)
    return out, weights


def _packed_forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None,
                    tail: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
                    **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """A forward whose cache layer keeps its tail rows apart (:func:`packed_rows`): ``key`` /
    ``value`` [B, Hkv, Lk, D] are the first ``B`` rows' (handlers as usual), the query's other rows
    [R, H, Lq, D] attend to ``tail = (keys [R, Hkv, Lt, D], values, mask [R, 1, Lq, Lt] | None)``
    with plain SDPA."""
    rows = int(key.shape[0])
    head_mask = attention_mask  # [2B, 1, Lq, Lk], or [1, ...] broadcast over rows
    if attention_mask is not None and attention_mask.shape[0] == query.shape[0]:
        head_mask = attention_mask[:rows]
    head, head_weights = _handled_forward(module, query[:rows], key, value, head_mask, **kwargs)
    tail_keys, tail_values, tail_mask = tail
    rest, rest_weights = sdpa_forward(module, query[rows:], tail_keys, tail_values, tail_mask, **kwargs)
    return _joined(head, head_weights, rest, rest_weights)


_registered = False


def register() -> None:
    """Register the ``innersight`` attention and mask functions with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, _dispatch)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    _registered = True


# ---------------------------------------------------------------------- tensor helpers
def repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, H, L, D] for grouped-query attention."""
    groups = num_heads // x.shape[1]
    if groups == 1:
        return x
    b, hkv, length, d = x.shape
    return x[:, :, None].expand(b, hkv, groups, length, d).reshape(b, hkv * groups, length, d)


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool (True = attend) or float additive mask as a float additive mask."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def row_probabilities(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float, rows: slice
) -> torch.Tensor:
    """Attention probabilities of the query rows ``rows`` only, in fp32: [B, H, R, Lk].

    ``query`` [B, H, Lq, D], ``key`` [B, Hkv, Lk, D] (expanded for GQA here). A ``None`` mask
    means SDPA's causal fast path with no padding; rows are then masked causally here.
    """
    q = query[:, :, rows, :].float()  # [B, H, R, D]
    k = repeat_kv(key, query.shape[1]).float()  # [B, H, Lk, D]
    logits = torch.matmul(q, k.transpose(-1, -2)) * scaling  # [B, H, R, Lk]
    if attention_mask is not None:
        logits = logits + additive_mask(attention_mask[:, :, rows, :], torch.float32)
    else:
        lq, lk = query.shape[2], key.shape[2]
        qpos = torch.arange(lq, device=query.device)[rows] + (lk - lq)  # absolute positions of the rows
        future = torch.arange(lk, device=query.device)[None, :] > qpos[:, None]  # [R, Lk]
        logits = logits.masked_fill(future, torch.finfo(torch.float32).min)
    return torch.softmax(logits, dim=-1)


# ---------------------------------------------------------------------- switching
def set_text_attention(model: Any, implementation: str) -> None:
    """Switch the language model's attention implementation only (vision tower untouched)."""
    text_key = _text_subconfig_key(model)
    if text_key is None:
        model.set_attn_implementation(implementation)
    else:
        model.set_attn_implementation({text_key: implementation})


def text_attention(model: Any) -> str:
    return model.config.get_text_config()._attn_implementation


def _text_subconfig_key(model: Any) -> str | None:
    text = model.config.get_text_config()
    for key in getattr(model.config, "sub_configs", {}):
        if getattr(model.config, key, None) is text:
            return key
    return None


_ABSENT = object()


@contextlib.contextmanager
def handler_rows(layers: Any, rows: int) -> Iterator[None]:
    """Inside the block, the handlers of the decoder ``layers`` (``adapter.decoder_layers``) see only
    the first ``rows`` rows of every forward; the later rows run plain SDPA. ``rows = 0``: every
    forward runs plain SDPA (handlers bypassed). Blocks nest; on exit (also after an exception) the
    outer scope, or none, is restored. It applies whether or not a handler is installed."""
    if rows < 0:
        raise ValueError(f"handler rows must be >= 0, not {rows}")
    modules = [layer.self_attn for layer in layers]
    saved = [getattr(attn, _ROWS_ATTR, _ABSENT) for attn in modules]
    try:
        for attn in modules:
            setattr(attn, _ROWS_ATTR, int(rows))
        yield
    finally:
        for attn, old in zip(modules, saved):
            if old is _ABSENT:
                with contextlib.suppress(AttributeError):
                    delattr(attn, _ROWS_ATTR)
            else:
                setattr(attn, _ROWS_ATTR, old)


@contextlib.contextmanager
def packed_rows(layers: Any, sources: dict[int, Any]) -> Iterator[None]:
    """Inside the block, decoder layer ``i``'s attention (``layers[i].self_attn``) asks
    ``sources[i]`` for its tail rows: a forward whose ``tail_inputs(query, key)`` returns
    ``(keys, values, mask)`` runs its first ``key.shape[0]`` rows as usual (handlers, within their
    :func:`handler_rows` scope) and its other rows with plain SDPA on those keys, values and mask
    (a contrastive negative branch whose rows keep their own, shorter KV cache:
    :class:`~innersight.decode.contrast.PackedLayer`); ``None`` runs the forward as usual. Applies
    only where the text attention is ``innersight`` (:func:`innersight_text_attention`); removed on
    exit, also after an exception."""
    modules = {i: layers[i].self_attn for i in sources}
    for i, attn in modules.items():
        if hasattr(attn, _PACKED_ATTR):
            raise RuntimeError(f"layer {i} already reads packed rows")
    try:
        for i, attn in modules.items():
            setattr(attn, _PACKED_ATTR, sources[i])
        yield
    finally:
        for attn in modules.values():
            with contextlib.suppress(AttributeError):
                delattr(attn, _PACKED_ATTR)


@contextlib.contextmanager
def innersight_text_attention(model: Any) -> Iterator[None]:
    """Inside the block, the language model's attention runs through ``innersight`` (SDPA unless
    a handler or packed rows say otherwise; the vision tower keeps its implementation); the previous
    implementation is restored on exit, also after an exception."""
    register()
    previous = text_attention(model)
    try:
        set_text_attention(model, IMPLEMENTATION)
        yield
    finally:
        set_text_attention(model, previous)


def handler_row_limit(module: Any) -> int | None:
    """How many leading rows of a forward the handler of attention ``module`` may see: ``None``
    (all rows, no :func:`handler_rows` scope), ``0`` (handlers bypassed) or ``n``."""
    return getattr(module, _ROWS_ATTR, None)


def _record_cached_positions(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Forward pre-hook of a handled attention module: how many positions its cache layer held
    before this call (None without a cache or a layer index)."""
    from .generation_calls import find_cache

    _, cache = find_cache(kwargs)
    index = getattr(module, "layer_idx", None)
    past = int(cache.get_seq_length(index)) if cache is not None and index is not None else None
    setattr(module, _PAST_ATTR, past)


def key_start(module: Any, query_length: int, key_length: int) -> int:
    """The sequence position of key column 0 in a forward of attention ``module`` (inside
    :func:`layer_handlers`) with ``query_length`` queries and ``key_length`` keys: the positions
    seen so far (cached + new) minus the keys handed over. 0 unless the layer's cache dropped early
    keys (a sliding window at a decoding step, or a prompt longer than the window); 0 as well when
    no cache was passed (the keys are the whole sequence)."""
    past = getattr(module, _PAST_ATTR, None)
    if past is None:
        return 0
    return max(0, int(past) + int(query_length) - int(key_length))


@contextlib.contextmanager
def layer_handlers(model: Any, layers: Any, handlers: dict[int, Handler]) -> Iterator[None]:
    """Route decoder layers ``handlers`` keys through their handler inside the block.

    ``layers`` is the decoder's layer list (``adapter.decoder_layers``). On exit (also after an
    exception) the handlers are removed and the previous attention implementation restored.
    """
    installed: list[Any] = []
    hooks: list[Any] = []
    try:
        with innersight_text_attention(model):
            for idx, handler in handlers.items():
                attn = layers[idx].self_attn
                if hasattr(attn, _HANDLER_ATTR):
                    raise RuntimeError(f"layer {idx} already has an innersight attention handler")
                setattr(attn, _HANDLER_ATTR, handler)
                installed.append(attn)
                hooks.append(attn.register_forward_pre_hook(_record_cached_positions, with_kwargs=True))
            yield
    finally:
        for hook in hooks:
            hook.remove()
        for attn in installed:
            for attr in (_HANDLER_ATTR, _PAST_ATTR):
                with contextlib.suppress(AttributeError):
                    delattr(attn, attr)
