"""ViCrop's maps with the image and the prompt prefix holding it encoded once.

rel-att reads the last position's attention at one layer for two prompts about the same image:
the question q and the generic prompt q'. In the chat template both rows open with the same
tokens (system text, the image tokens, the start of the user turn) and differ only in their last
few dozen tokens. Run as two full rows (the joint batch of :func:`innersight.look.maps.attention_maps`),
the image goes through the vision tower twice and the shared prefix (about 600 tokens on
LLaVA-1.5) through the decoder twice.

Here (:func:`split_prefix`, :func:`prefix_pass`, :func:`suffix_pass`), per sample:

1. **prefix pass**: the prefix (it must hold every image token; for a pair, the two rows' common
   prefix; for one row, the prompt up to its last image token), one row per sample, left-padded,
   with the image's pixels (one vision pass per image), into a KV cache. rel-att stops right
   after the capture layer has written its keys and values (layers above it are never needed);
   the gradient maps and an answer that continues from the prefix
   (:mod:`innersight.look.answer_prefix`) need every layer's;
2. **suffix pass**: every row's remaining tokens (no image tokens) against that cache, the
   prefix rows repeated for the rows of a pair (``[prefix pads][prefix][suffix pads][suffix]``,
   position ids continuing each row's prefix).

Who uses it: rel-att's pair capture (:func:`shared_prefix_capture`, inference mode, stopping at
the capture layer); grad-att (:func:`innersight.look.maps.shared_prefix_grad_att`: the prefix
without a graph, the question's suffix with the graph from the capture layer on: dv/dA at the
last row never reaches an earlier position's keys); pure-grad
(:func:`innersight.look.pure_grad.shared_prefix_pixel_gradients`: the prefix with the graph from
the pixels, one forward for the question and the generic row, two backward passes). Per-key
values of the suffix pass are scattered back onto the joint batch's positions
(:meth:`PrefixSplit.scatter`), so the projection onto the image grid (the batch's layouts) is
unchanged. The maps equal the joint batch's up to float rounding
(``tests/look/test_vicrop_cost.py``).

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

from dataclasses import dataclass
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


@dataclass
class PrefixSplit:
    """A batch of ``k * n`` prompt rows (row ``r`` about sample ``r % n``) split into each
    sample's prefix (every image token, encoded once) and each row's suffix (no image token).

    Prefix tensors have one row per sample, left-padded to the widest prefix ``P``; suffix tensors
    one row per batch row, left-padded to the widest suffix ``S``. Positions are the joint batch's
    own (``[K, rows, width]``), so a suffix run on its prefix's cache sees the positions it had in
    the full prompt."""

    n: int
    k: int
    length: int  # L, the joint batch's length
    starts: list[int]  # left padding of each joint row
    common: list[int]  # prefix length of each sample
    suffix_lengths: list[int]  # suffix length of each suffix row
    prefix_ids: torch.Tensor  # [n, P]
    prefix_mask: torch.Tensor  # [n, P]
    prefix_positions: torch.Tensor  # [K, n, P]
    token_inputs: dict[str, torch.Tensor]  # each [n, P]
    suffix_ids: torch.Tensor  # [k n, S] sample-major
    suffix_mask: torch.Tensor  # [k n, S]
    suffix_positions: torch.Tensor  # [K, k n, S]
    image_inputs: dict[str, Any]  # the first n samples' image inputs (the adapter's rows)

    @property
    def width(self) -> int:
        return int(self.prefix_ids.shape[1])

    @property
    def order(self) -> list[int]:
        """Suffix rows are sample-major (sample ``i``'s ``k`` rows adjacent, as the cache's rows
        repeat): suffix row ``j`` is joint row ``order[j]``."""
        return [m * self.n + i for i in range(self.n) for m in range(self.k)]

    def sample_prefixes(self) -> list[torch.Tensor]:
        """Each sample's prefix ids without padding: n x [c_i]."""
        return [self.prefix_ids[i, self.width - c:] for i, c in enumerate(self.common)]

    def to_joint(self, rows: torch.Tensor) -> torch.Tensor:
        """Suffix-pass rows ``[k n, ...]`` (sample-major) in the joint batch's row order."""
        inverse = [0] * len(self.order)
        for j, r in enumerate(self.order):
            inverse[r] = j
        return rows[torch.tensor(inverse, device=rows.device)]

    def scatter(self, probs: torch.Tensor) -> torch.Tensor:
        """Per-key values of the suffix pass ``[k n, H, P + S]`` (suffix rows) onto the joint
        batch's rows and key positions: ``[k n, H, L]`` (zeros at the joint batch's padding)."""
        width, s_width = self.width, int(self.suffix_ids.shape[1])
        out = probs.new_zeros((probs.shape[0], probs.shape[1], self.length))  # [k n, H, L]
        for j, r in enumerate(self.order):
            c, s, start = self.common[r % self.n], self.suffix_lengths[j], self.starts[r]
            out[r, :, start:start + c] = probs[j, :, width - c:width]
            out[r, :, start + c:] = probs[j, :, width + s_width - s:]
        return out


def split_prefix(mllm: Any, batch: Batch, n: int, k: int) -> PrefixSplit | None:
    """``batch``'s rows split into prefixes and suffixes (:class:`PrefixSplit`), or None where
    this path does not apply (see the module docstring). ``k = 2``: rows ``i`` and ``n + i``
    share the longest common prefix of their ids; ``k = 1``: each row's prefix ends after its
    last image token."""
    inputs = batch.inputs
    adapter = mllm.adapter
    image_keys = frozenset(adapter.prefix_image_inputs)
    token_keys = frozenset(adapter.prefix_token_inputs)
    if not image_keys or n < 1 or k not in (1, 2) or len(batch) != k * n or "attention_mask" not in inputs:
        return None
    if set(inputs) - TEXT_INPUTS - image_keys - token_keys:
        return None  # an input the family did not declare: the joint batch
    ids, mask = inputs["input_ids"].cpu(), inputs["attention_mask"].cpu()  # [k n, L]
    length = ids.shape[1]
    starts = [int(length - mask[r].sum()) for r in range(k * n)]  # left padding of each row
    if any(int(mask[r, starts[r]:].min()) != 1 for r in range(k * n)):
        return None  # not left-padded
    rows = [ids[r, starts[r]:] for r in range(k * n)]
    group = [list(range(i, k * n, n)) for i in range(n)]  # the rows of sample i
    common = []
    for i in range(n):
        # every image token in the prefix, at least one suffix token in every row
        last_image = max(int(batch.layouts[r][j].positions.max()) - starts[r]
                         for r in group[i] for j in range(len(batch.layouts[r])))
        c = common_length(rows[i], rows[n + i]) if k == 2 else last_image + 1
        if c <= last_image or c >= min(rows[r].numel() for r in group[i]):
            return None
        common.append(c)
    positions = adapter.batch_positions(batch).cpu()  # [B, L] or [K, B, L] the joint batch's own
    positions = positions[None] if positions.dim() == 2 else positions  # [K, k n, L]
    prefix_rows = [positions[:, i, starts[i]:starts[i] + common[i]] for i in range(n)]  # n x [K, c_i]
    if any(not torch.equal(prefix_rows[i], positions[:, r, starts[r]:starts[r] + common[i]])
           for i in range(n) for r in group[i]):
        return None  # the rows place their common prefix differently
    device = inputs["input_ids"].device
    pad = int(ids[0, 0]) if starts[0] else 0
    tok = adapter.tokenizer
    if tok is not None and tok.pad_token_id is not None:
        pad = int(tok.pad_token_id)
    width = max(common)
    prefix_ids, prefix_mask = _left_pad([rows[i][:common[i]] for i in range(n)], width, pad)  # [n, P]
    token_inputs = {key: _left_pad([inputs[key][i, starts[i]:starts[i] + common[i]].cpu() for i in range(n)],
                                   width, 0)[0].to(device) for key in token_keys if key in inputs}  # each [n, P]
    order = [m * n + i for i in range(n) for m in range(k)]  # suffix row j is joint row order[j]
    suffixes = [rows[r][common[r % n]:] for r in order]
    s_width = max(s.numel() for s in suffixes)
    suffix_ids, suffix_mask = _left_pad(suffixes, s_width, pad)  # [k n, S] sample-major
    suffix_pos = _left_pad_positions([positions[:, r, starts[r] + common[r % n]:] for r in order],
                                     s_width)  # [K, k n, S]
    return PrefixSplit(n=n, k=k, length=length, starts=starts, common=common,
                       suffix_lengths=[s.numel() for s in suffixes],
                       prefix_ids=prefix_ids.to(device), prefix_mask=prefix_mask.to(device),
                       prefix_positions=_left_pad_positions(prefix_rows, width).to(device),
                       token_inputs=token_inputs, suffix_ids=suffix_ids.to(device),
                       suffix_mask=suffix_mask.to(device), suffix_positions=suffix_pos.to(device),
                       image_inputs=adapter.sample_image_inputs(batch, n))


def prefix_pass(mllm: Any, split: PrefixSplit, stop_layer: int, image_inputs: dict[str, Any] | None = None,
                keeper: Any = None) -> Any:
    """Run the prefixes (one row per sample, with their images: ``image_inputs``, default the
    split's) up to ``stop_layer``'s attention, whose keys and values are the last written; returns
    the ``DynamicCache``, handed to ``keeper`` (:func:`answer_keeper`) before any suffix grows it.
    The grad mode is the caller's."""
    from transformers import DynamicCache

    model, cache = mllm.model, DynamicCache()
    name = cache_argument(model.forward)
    with layer_handlers(model, mllm.adapter.decoder_layers, {stop_layer: stop_forward}):
        try:
            model(input_ids=split.prefix_ids, attention_mask=split.prefix_mask,
                  position_ids=_model_positions(split.prefix_positions), use_cache=True, **{name: cache},
                  **(split.image_inputs if image_inputs is None else image_inputs), **split.token_inputs)
        except StopForward:
            pass
    _check_length(cache, split.width, "prefix")
    if keeper is not None:
        keeper.keep(cache, split.sample_prefixes(), split.image_inputs)
    return cache


def _check_length(cache: Any, expected: int, which: str) -> None:
    """Fail loudly where the model did not fill the cache it was given (a renamed cache argument
    would otherwise run each pass on a fresh cache, silently dropping the prefix)."""
    if cache.get_seq_length() != expected:
        raise RuntimeError(f"the {which} pass left {cache.get_seq_length()} cached positions, not {expected}: "
                           "the model's forward did not take the KV cache it was given")


def answer_keeper(mllm: Any, batch: Batch) -> Any:
    """The keeper of the answer that may continue from the prefix of ``batch``
    (:mod:`innersight.look.answer_prefix`; its prefix pass must then run every layer, and the
    cache is kept before the suffix pass grows it); None when no answer will: outside a keeping
    scope, or for a family that cannot split its image inputs (the answer could not use the
    prefix, so the pass need not run past the capture layer)."""
    keeper = active_keeper()
    if keeper is None or mllm.adapter.split_image_inputs(batch, 1) is None:
        return None
    return keeper


def suffix_pass(mllm: Any, split: PrefixSplit, cache: Any, handlers: dict[int, Any], **kwargs: Any) -> Any:
    """Run every row's suffix on ``cache`` (its prefix rows repeated for the ``k`` rows of each
    sample) with ``handlers`` on the decoder layers; the model's output (rows in the suffix
    order, :meth:`PrefixSplit.to_joint`), or None when a handler stopped the forward. ``kwargs``: further model inputs (e.g. ``logits_to_keep``)."""
    model = mllm.model
    name = cache_argument(model.forward)
    if split.k > 1:
        # each prefix row k times, adjacent (the suffix rows' sample-major order); unlike a
        # reorder by index, its backward is a sum, not a scatter (pure-grad differentiates it)
        cache.batch_repeat_interleave(split.k)  # [k n] rows
    full_mask = torch.cat([split.prefix_mask.repeat_interleave(split.k, dim=0), split.suffix_mask], dim=1)  # [k n, P + S]
    output = None
    with layer_handlers(model, mllm.adapter.decoder_layers, handlers):
        try:
            output = model(input_ids=split.suffix_ids, attention_mask=full_mask,
                           position_ids=_model_positions(split.suffix_positions), use_cache=True, **{name: cache},
                           **kwargs)
        except StopForward:
            pass
    _check_length(cache, full_mask.shape[1], "suffix")
    return output


def shared_prefix_capture(mllm: Any, batch: Batch, n: int, layer: int,
                          capture_handler: Any, capture_probs: Any) -> torch.Tensor | None:
    """Attention probabilities [2n, H, L] of the last position of each row of ``batch`` (rows
    ``i`` and ``n + i`` the two prompts of sample ``i``, L the joint batch's length) at ``layer``,
    computed with each sample's shared prefix encoded once; None where this path does not apply
    (then the caller runs the joint batch).

    ``capture_handler`` is the capture's layer handler and ``capture_probs()`` reads what it
    recorded ([2n, H, Lk] over the suffix pass's keys).
    """
    split = split_prefix(mllm, batch, n, 2)
    if split is None:
        return None
    with torch.inference_mode():
        # the final answer may continue from this prefix: then every layer fills the cache
        keeper = answer_keeper(mllm, batch)
        stop_layer = layer if keeper is None else len(mllm.adapter.decoder_layers) - 1
        cache = prefix_pass(mllm, split, stop_layer, keeper=keeper)
        suffix_pass(mllm, split, cache, {layer: capture_handler})
    return split.scatter(capture_probs())  # [2n, H, L]
