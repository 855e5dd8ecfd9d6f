"""ViCrop's final answer continued from its map's prefix KV cache.

The map's prefix pass (:mod:`innersight.look.prefix`; rel-att and pure-grad: the prefix the
question and generic rows share, grad-att: the question's prompt up to its last image token) runs
the chat template's opening and the original image's tokens once, with the original image's
pixels. The final answer's prompt (LLaVA: ``USER: <image><image>\\n{question} ASSISTANT:``, the
original image first, then the crop) opens with the same tokens and the same image, and
re-encoding them (vision tower, every decoder layer over ~600 tokens on LLaVA-1.5) is most of the
answer's prefill.

Here, where that is exact:

1. the map's prefix pass runs through every decoder layer (it stops in the last layer's
   attention, once every layer has written its keys and values) and its KV cache is kept
   (:class:`PrefixKeeper`; the map capture at its layer is unchanged);
2. the answer batch's first tokens that equal the prefix's are taken from that cache; the
   answer prompt's remaining tokens but its last (the crop's image tokens and the question) are
   prefilled with the model's own forward on the cache, with the crop's image inputs only
   (:meth:`~innersight.adapters.base.Adapter.split_image_inputs`);
3. the plan's ``generate`` continues from that cache with the full ``input_ids`` and
   ``attention_mask`` and no image inputs (transformers' "continue from a cache": it runs the
   tokens the cache does not hold, here the prompt's last one, then decodes as usual).

A batch: the kept prefix has one left-padded row per sample; each answer row becomes ``[pads]
[its cached prefix][pads][the rest of its prompt]`` (:meth:`AnswerPrefix._start`): padding in the
middle is masked, and ``generate`` counts positions from the mask, so every token keeps the
position it has in its own prompt (the tests compare every step's scores with the left-padded
prompt batch's).

Exact only when: the answer's first images are the images the capture encoded (the adapter
compares the image inputs, :meth:`~innersight.adapters.base.Adapter.same_image_inputs`) and their
tokens all lie in the common prefix; the scope's captures (one per map chunk) ran over the
answer's samples, in order (a tiled image's captures are tiles: declined); the
plan has no other method and generation settings that add nothing to the prompt
(:meth:`innersight.flow.Plan.prefill_conflict`: attention methods, negative branches, VISTA...
read or change the prefill). Otherwise the answer is generated from the prompt as before, and
``details[<method>]["answer_prefix"]`` says which path ran and why.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..adapters.base import Batch
from ..attention import StopForward, layer_handlers, stop_forward
from ..generation_calls import cache_argument

#: the keeper of the current answer's capture prefix (None: no answer will continue from it)
_KEEPER: contextvars.ContextVar[PrefixKeeper | None] = contextvars.ContextVar("innersight_answer_prefix",
                                                                             default=None)


@dataclass
class KeptPrefix:
    """A map's prefix for its samples: each sample's prefix ids, the image inputs it encoded and
    every decoder layer's keys and values over the left-padded prefix rows."""

    ids: list[torch.Tensor]  # per sample: [c_i] the prefix's token ids (no padding)
    image_inputs: dict[str, Any]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer: keys, values [n, H_kv, P, D]

    @property
    def rows(self) -> int:
        return len(self.ids)


@dataclass
class PrefixKeeper:
    """Collects the map's prefixes while an answer that may continue from them is being prepared
    (:func:`keeping_prefix`): one :class:`KeptPrefix` per capture, in order (the map's chunks of
    samples; a tiled image's captures are tiles, which the answer then declines)."""

    parts: list[KeptPrefix] = field(default_factory=list)

    @property
    def kept(self) -> list[KeptPrefix] | None:
        """Every capture's prefix, in capture order; None when none ran."""
        return list(self.parts) or None

    def keep(self, cache: Any, prefix_ids: list[torch.Tensor], image_inputs: dict[str, Any]) -> None:
        """Record the prefix pass's cache (one left-padded row per sample, every layer filled
        over the widest prefix; ``prefix_ids``: each sample's ids, unpadded) before the suffix
        pass grows it. The tensors are referenced (detached), not copied: the suffix pass
        replaces them in the cache (row repeat, concatenation) and never writes into them."""
        # detached: a gradient map's prefix pass records a graph the answer must not keep alive
        layers = [(layer.keys.detach(), layer.values.detach()) for layer in cache.layers]
        rows, width = len(prefix_ids), max(int(ids.numel()) for ids in prefix_ids)
        if any(k.shape[0] != rows or k.shape[-2] != width or v.shape[:-1] != k.shape[:-1] for k, v in layers):
            raise RuntimeError(f"the prefix pass's KV cache is not {rows} row(s) of {width} positions per layer "
                               f"({[tuple(k.shape) for k, _ in layers]}): the transformers cache layout changed")
        images = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in image_inputs.items()}
        self.parts.append(KeptPrefix([ids.clone() for ids in prefix_ids], images, layers))


def active_keeper() -> PrefixKeeper | None:
    """The keeper of the current scope, None outside :func:`keeping_prefix`."""
    return _KEEPER.get()


@contextlib.contextmanager
def keeping_prefix() -> Iterator[PrefixKeeper]:
    """A scope whose pair capture keeps its full prefix cache (:class:`PrefixKeeper`); the scope
    is closed on exit, exception included."""
    keeper = PrefixKeeper()
    token = _KEEPER.set(keeper)
    try:
        yield keeper
    finally:
        _KEEPER.reset(token)


def aligned_cache(parts: list[KeptPrefix], common: list[int]) -> Any:
    """A new ``DynamicCache`` of the first ``common[i]`` prefix positions of each sample ``i``
    (the samples of ``parts`` in order), left-padded with zeros to ``max(common)`` (the padded
    positions are masked)."""
    from transformers import DynamicCache

    rows = [(part, r) for part in parts for r in range(part.rows)]  # sample i -> (its capture, its row)
    width = max(common)
    cache = DynamicCache()
    for index in range(len(parts[0].layers)):
        keys0, values0 = parts[0].layers[index]
        out_k = keys0.new_zeros((len(common), keys0.shape[1], width, keys0.shape[-1]))  # [B, H_kv, W, D]
        out_v = values0.new_zeros((len(common), values0.shape[1], width, values0.shape[-1]))
        for i, c in enumerate(common):
            part, r = rows[i]
            keys, values = part.layers[index]  # [n_part, H_kv, P_part, D]: row r's prefix at its last columns
            first = keys.shape[-2] - int(part.ids[r].numel())
            out_k[i, :, width - c:] = keys[r, :, first:first + c]
            out_v[i, :, width - c:] = values[r, :, first:first + c]
        cache.update(out_k, out_v, index)
    return cache


@dataclass
class AnswerPrefix:
    """The ``start`` of the answer's :meth:`innersight.flow.Plan.generate`: prefill the answer
    batch from the kept prefix, or say why not. ``outcome`` records what happened (the
    answer's ``answer_prefix`` detail)."""

    kept: list[KeptPrefix] | None
    outcome: dict[str, Any] = field(default_factory=lambda: {"reused": False, "why": "generate did not ask"})

    def __call__(self, mllm: Any, batch: Batch) -> Any:
        try:
            return self._start(mllm, batch)
        except _Fallback as why:
            self.outcome = {"reused": False, "why": str(why)}
            return None

    def _start(self, mllm: Any, batch: Batch) -> Any:
        """Row ``i`` of the answer batch becomes ``[pads][c_i cached prefix tokens][pads][the
        rest but the last token][the last token]``: the cache holds the first two parts (the
        kept prefix, left-padded to the widest) and the prefill the third (left-padded to the
        widest). generate's positions count the mask (``cumsum``), so every real token keeps the
        position it has in its own prompt, as in the left-padded prompt batch."""
        from ..flow import Continuation
        from .prefix import common_length  # prefix.py imports this module's keeper

        parts, adapter, model = self.kept, mllm.adapter, mllm.model
        if not parts:
            raise _Fallback("no prefix capture")
        rows = len(batch)
        kept_ids = [ids for part in parts for ids in part.ids]  # per sample, in order
        if rows != len(kept_ids) or any(len(p.layers) != len(parts[0].layers) for p in parts):
            raise _Fallback(f"the captures kept {len(kept_ids)} prefix rows for {rows} answer rows (tiles?)")
        ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]  # [B, L]
        length = ids.shape[1]
        starts = [int(length - mask[r].sum()) for r in range(rows)]
        if any(int(mask[r, starts[r]:].min()) != 1 for r in range(rows)):
            raise _Fallback("the prompt is not left-padded")
        if set(batch.inputs) - {"input_ids", "attention_mask"} - set(adapter.prefix_image_inputs):
            raise _Fallback("inputs beyond the ids, the mask and the image inputs")
        split = adapter.split_image_inputs(batch, 1)
        if split is None:
            raise _Fallback("the family cannot split its image inputs")
        _, tail = split
        first_sample = 0
        for part in parts:  # each capture's images against its samples' first images
            own = adapter.split_image_inputs(batch, 1, range(first_sample, first_sample + part.rows))
            if own is None or not adapter.same_image_inputs(own[0], part.image_inputs):
                raise _Fallback("the answer's first image is not the captured image")
            first_sample += part.rows
        common, rests, later_images = [], [], False
        for r in range(rows):
            row = ids[r, starts[r]:]  # [l_r] the prompt without its padding
            c = common_length(row.cpu(), kept_ids[r].cpu())
            layouts = batch.layouts[r]
            first_end = int(layouts[0].positions.max()) + 1 - starts[r]
            later = [int(p) - starts[r] for lay in layouts[1:] for p in (lay.positions.min(), lay.positions.max())]
            if c < first_end:
                raise _Fallback("the first image's tokens are not all in the common prefix")
            c = min(c, row.numel() - 1)  # generate runs at least the prompt's last token
            if later and (min(later) < c or max(later) >= row.numel() - 1):
                raise _Fallback("a later image's tokens straddle the cached prefix or the last token")
            later_images = later_images or bool(later)
            common.append(c)
            rests.append(row[c:-1])  # [l_r - 1 - c] prefilled on the cache
        cache = aligned_cache(parts, common)
        width, rest_width = max(common), max(int(t.numel()) for t in rests)
        device = ids.device
        pad = int(ids[0, 0]) if starts[0] else 0
        if adapter.tokenizer is not None and adapter.tokenizer.pad_token_id is not None:
            pad = int(adapter.tokenizer.pad_token_id)
        prefix_mask = torch.zeros((rows, width), dtype=mask.dtype, device=device)  # [B, W]
        rest_ids = torch.full((rows, rest_width), pad, dtype=ids.dtype, device=device)  # [B, R]
        rest_mask = torch.zeros((rows, rest_width), dtype=mask.dtype, device=device)  # [B, R]
        rest_positions = torch.zeros((rows, rest_width), dtype=torch.long, device=device)  # [B, R]
        prefix_ids = torch.full((rows, width), pad, dtype=ids.dtype, device=device)  # [B, W]
        for r in range(rows):
            c, n = common[r], int(rests[r].numel())
            prefix_mask[r, width - c:] = 1
            prefix_ids[r, width - c:] = ids[r, starts[r]:starts[r] + c]
            if n:
                rest_ids[r, rest_width - n:] = rests[r]
                rest_mask[r, rest_width - n:] = 1
                rest_positions[r, rest_width - n:] = torch.arange(c, c + n, device=device)
        name = cache_argument(model.forward)
        if rest_width:
            with torch.inference_mode(), layer_handlers(model, adapter.decoder_layers,
                                                        {len(adapter.decoder_layers) - 1: stop_forward}):
                try:
                    model(input_ids=rest_ids, attention_mask=torch.cat([prefix_mask, rest_mask], dim=1),
                          position_ids=rest_positions, use_cache=True, **{name: cache},
                          **(tail if later_images else {}))
                except StopForward:
                    pass
        if cache.get_seq_length() != width + rest_width:
            raise RuntimeError(f"the answer prefill left {cache.get_seq_length()} cached positions, not "
                               f"{width + rest_width}: the model did not fill the cache it was given")
        self.outcome = {"reused": True, "tokens": sum(common), "prefilled": sum(int(t.numel()) for t in rests)}
        last = ids[:, -1:]  # [B, 1] every row's last prompt token (left padding)
        inputs = {"input_ids": torch.cat([prefix_ids, rest_ids, last], dim=1),  # [B, W + R + 1]
                  "attention_mask": torch.cat([prefix_mask, rest_mask, torch.ones_like(last, dtype=mask.dtype)], dim=1)}
        total = width + rest_width + 1

        def verify() -> None:
            if cache.get_seq_length() < total:
                raise RuntimeError("generate did not continue from the prefilled KV cache "
                                   f"(still {cache.get_seq_length()} positions): its cache argument changed")

        return Continuation(replace(batch, inputs=inputs), {name: cache}, verify)


class _Fallback(Exception):
    """The answer prefix does not apply (the message says why): generate from the prompt."""


def _tiled(method: Any, image_lists: list[list[Any]]) -> bool:
    """Whether ViCrop maps any of these images in tiles (high-resolution mode)."""
    from .vicrop import tile_grid_for

    config = getattr(method, "config", None)
    return config is not None and any(tile_grid_for(ims[0], config) is not None for ims in image_lists if ims)


def answer_from_maps(method: Any, image_lists: list[list[Any]], questions: list[str], generate: Any,
                     map_rows: Callable[[], tuple[list[list[Any]], list[dict[str, Any]]]],
                     observers: Sequence[Any] = ()) -> tuple[Any, list[list[Any]], list[dict[str, Any]]]:
    """``map_rows()`` (ViCrop's maps, boxes and crops for ``image_lists``: the answer's image lists
    and extras), then one ``generate`` of the answers, continued from the maps' prefixes where
    exact (module docstring); records ``answer_prefix`` in each extra's ``details[method.name]``.
    Returns (generate's output, the image lists, the extras)."""
    conflict = getattr(generate, "prefill_conflict", "the caller's generate takes no prefill")
    if conflict is None and _tiled(method, image_lists):
        conflict = "a tiled image (its maps' prefixes are tiles)"
    kwargs: dict[str, Any] = {"observers": observers} if observers else {}
    if conflict is not None:
        lists, extras = map_rows()
        out = generate(lists, questions, **kwargs)
        outcome: dict[str, Any] = {"reused": False, "why": conflict}
    else:
        with keeping_prefix() as keeper:
            lists, extras = map_rows()
        start = AnswerPrefix(keeper.kept)
        out = generate(lists, questions, start=start, **kwargs)
        outcome = start.outcome
    for extra in extras:
        extra.setdefault("details", {}).setdefault(method.name, {})["answer_prefix"] = dict(outcome)
    return out, lists, extras


def answer_rows(method: Any, mllm: Any, image_lists: list[list[Any]], questions: list[str], template: str,
                generate: Any) -> tuple[list[list[int]], list[str], list[dict[str, Any]], dict[str, Any]]:
    """ViCrop's map, box and crop (``method.apply``), then one generate of the answers
    (:func:`answer_from_maps`)."""
    out, _, extras = answer_from_maps(method, image_lists, questions, generate,
                                      lambda: method.apply(mllm, image_lists, questions, template))
    return out.ids, list(out.batch.prompts), extras, out.details
