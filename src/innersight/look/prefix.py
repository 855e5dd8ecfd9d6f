"""rel-att's pair capture with the image and the shared prompt prefix encoded once.

rel-att reads the last position's attention at one layer for two prompts about the same image:
the question q and the generic prompt q'. In the chat template both rows open with the same
tokens (system text, the image tokens, the start of the user turn) and differ only in their last
few dozen tokens. Run as two full rows (the joint batch of :func:`innersight.look.maps.attention_maps`),
the image goes through the vision tower twice and the shared prefix (about 600 tokens on
LLaVA-1.5) through the decoder twice.

Here, per sample:

1. **prefix pass**: the common prefix of the two rows (it must hold every image token), one row
   per sample, left-padded, with the image's pixels (one vision pass per image); it stops right
   after the capture layer has written its keys and values into a KV cache (layers above it are
   never needed);
2. **suffix pass**: both rows' remaining tokens (no image tokens) against that cache, repeated
   for the two rows (``[prefix pads][prefix][suffix pads][suffix]``, position ids continuing
   each row's prefix), stopping at the capture layer as before.

The attention row read at the last position is then scattered back onto the joint batch's
positions, so the projection onto the image grid (the batch's layouts) is unchanged. The maps
equal the joint batch's up to float rounding (``tests/look/test_vicrop_cost.py``).

Positions are the joint batch's own (:meth:`~innersight.adapters.base.Adapter.batch_positions`:
counts of the mask on most families, ``[4, B, L]`` M-RoPE rows on Qwen2-VL, Qwen2.5-VL and Qwen3-VL),
sliced into the prefix's and the suffix's, so a suffix sees the positions it had in the full prompt.

Only for families whose image features do not depend on the prompt: the adapter says so by naming
the inputs that carry the images (:attr:`~innersight.adapters.base.Adapter.prefix_image_inputs`;
LLaVA-1.5 and LLaVA-NeXT: ``pixel_values``, ``image_sizes``; Qwen: ``pixel_values``,
``image_grid_thw``) and any per-token inputs that matter only at image positions
(:attr:`~innersight.adapters.base.Adapter.prefix_token_inputs`; Qwen: ``mm_token_type_ids``), which
the prefix pass gets sliced like its ids. Other families take the joint batch (InstructBLIP's
Q-Former, whose query tokens read the prompt so that the "image" differs between the rows; Gemma 3,
whose sliding-window layers count distances in the padded sequence), and so does a batch holding
any other input (this path would not know how to split it).
"""

from __future__ import annotations

from typing import Any

import torch

from ..adapters.base import Batch
from ..attention import StopForward, layer_handlers, stop_forward
from ..generation_calls import cache_argument
from .answer_prefix import active_keeper

#: the text inputs this path rebuilds itself (prefix and suffix ids, masks, positions)
TEXT_INPUTS = frozenset({"input_ids", "attention_mask"})


def common_length(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the common prefix of two 1-D id tensors."""
    m = min(a.numel(), b.numel())
    differ = (a[:m] != b[:m]).nonzero()
    return int(differ[0]) if differ.numel() else m


def _left_pad(rows: list[torch.Tensor], width: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D rows to ``width``: (values [B, width], mask [B, width] 1 = real)."""
    out = torch.full((len(rows), width), pad, dtype=rows[0].dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        if row.numel():
            out[r, width - row.numel():] = row
            mask[r, width - row.numel():] = 1
    return out, mask


def _left_pad_positions(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Left-pad position rows ``[K, l]`` to ``[K, len(rows), width]`` (0 at pads, which the mask hides)."""
    out = torch.zeros((rows[0].shape[0], len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        if row.shape[1]:
            out[:, r, width - row.shape[1]:] = row
    return out


def _model_positions(positions: torch.Tensor) -> torch.Tensor:
    """``[K, B, L]`` as the forward takes it: ``[B, L]`` for one row of plain positions."""
    return positions[0] if positions.shape[0] == 1 else positions


def shared_prefix_capture(mllm: Any, batch: Batch, n: int, layer: int,
                          capture_handler: Any, capture_probs: Any) -> torch.Tensor | None:
    """Attention probabilities [2n, H, L] of the last position of each row of ``batch`` (rows
    ``i`` and ``n + i`` the two prompts of sample ``i``, L the joint batch's length) at ``layer``,
    computed with each sample's shared prefix encoded once; None where this path does not apply
    (then the caller runs the joint batch).

    ``capture_handler`` is the capture's layer handler and ``capture_probs()`` reads what it
    recorded ([2n, H, Lk] over the suffix pass's keys).
    """
    inputs = batch.inputs
    adapter = mllm.adapter
    image_keys = frozenset(adapter.prefix_image_inputs)
    token_keys = frozenset(adapter.prefix_token_inputs)
    if not image_keys or n < 1 or len(batch) != 2 * n or "attention_mask" not in inputs:
        return None
    if set(inputs) - TEXT_INPUTS - image_keys - token_keys:
        return None  # an input the family did not declare: the joint batch
    ids, mask = inputs["input_ids"].cpu(), inputs["attention_mask"].cpu()  # [2n, L]
    length = ids.shape[1]
    starts = [int(length - mask[r].sum()) for r in range(2 * n)]  # left padding of each row
    if any(int(mask[r, starts[r]:].min()) != 1 for r in range(2 * n)):
        return None  # not left-padded
    rows = [ids[r, starts[r]:] for r in range(2 * n)]
    common = []
    for i in range(n):
        c = common_length(rows[i], rows[n + i])
        # every image token in the prefix, at least one suffix token in both rows
        last_image = max(int(batch.layouts[r][k].positions.max()) - starts[r]
                         for r in (i, n + i) for k in range(len(batch.layouts[r])))
        if c <= last_image or c >= min(rows[i].numel(), rows[n + i].numel()):
            return None
        common.append(c)
    positions = adapter.batch_positions(batch).cpu()  # [B, L] or [K, B, L] the joint batch's own
    positions = positions[None] if positions.dim() == 2 else positions  # [K, 2n, L]
    prefix_rows = [positions[:, i, starts[i]:starts[i] + common[i]] for i in range(n)]  # n x [K, c_i]
    if any(not torch.equal(prefix_rows[i], positions[:, n + i, starts[n + i]:starts[n + i] + common[i]])
           for i in range(n)):
        return None  # the two rows place their common prefix differently
    model = mllm.model
    device = inputs["input_ids"].device
    pad = int(ids[0, 0]) if starts[0] else 0
    tok = adapter.tokenizer
    if tok is not None and tok.pad_token_id is not None:
        pad = int(tok.pad_token_id)
    width = max(common)
    prefix_ids, prefix_mask = _left_pad([rows[i][:common[i]] for i in range(n)], width, pad)  # [n, P]
    prefix_pos = _left_pad_positions(prefix_rows, width)  # [K, n, P]
    token_inputs = {k: _left_pad([inputs[k][i, starts[i]:starts[i] + common[i]].cpu() for i in range(n)],
                                 width, 0)[0].to(device) for k in token_keys if k in inputs}  # each [n, P]
    suffixes = [rows[r][common[r % n]:] for r in range(2 * n)]
    s_width = max(s.numel() for s in suffixes)
    suffix_ids, suffix_mask = _left_pad(suffixes, s_width, pad)  # [2n, S]
    suffix_pos = _left_pad_positions([positions[:, r, starts[r] + common[r % n]:] for r in range(2 * n)],
                                     s_width)  # [K, 2n, S]

    from transformers import DynamicCache

    cache = DynamicCache()
    name = cache_argument(model.forward)
    image_inputs = adapter.sample_image_inputs(batch, n)  # the first n samples' images (adapter's rows)
    decoder_layers = adapter.decoder_layers
    # the final answer may continue from this prefix (one sample): then every layer fills the cache
    keeper = active_keeper() if n == 1 else None
    stop_layer = layer if keeper is None else keeper.stop_layer(decoder_layers)
    with torch.inference_mode():
        with layer_handlers(model, decoder_layers, {stop_layer: stop_forward}):
            try:
                model(input_ids=prefix_ids.to(device), attention_mask=prefix_mask.to(device),
                      position_ids=_model_positions(prefix_pos).to(device), use_cache=True, **{name: cache},
                      **image_inputs, **token_inputs)
            except StopForward:
                pass
        if keeper is not None:
            keeper.keep(cache, prefix_ids[0], image_inputs)
        cache.reorder_cache(torch.arange(n).repeat(2).to(device))  # [2n] rows i and n + i share prefix i
        full_mask = torch.cat([prefix_mask.repeat(2, 1), suffix_mask], dim=1)  # [2n, P + S]
        with layer_handlers(model, decoder_layers, {layer: capture_handler}):
            try:
                model(input_ids=suffix_ids.to(device), attention_mask=full_mask.to(device),
                      position_ids=_model_positions(suffix_pos).to(device), use_cache=True, **{name: cache})
            except StopForward:
                pass
    probs = capture_probs()  # [2n, H, P + S]
    out = probs.new_zeros((2 * n, probs.shape[1], length))  # [2n, H, L] the joint batch's positions
    for r in range(2 * n):
        c, s = common[r % n], suffixes[r].numel()
        out[r, :, starts[r]:starts[r] + c] = probs[r, :, width - c:width]
        out[r, :, starts[r] + c:] = probs[r, :, width + s_width - s:]
    return out
