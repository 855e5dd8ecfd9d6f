"""Contrastive decoding against a negative branch (DAMRO, VCD): the shared contrast with the
adaptive plausibility constraint, and the negative branch that owns its own inputs and KV cache.

The contrast (VCD, arXiv 2311.16922, Eq. 3-4; DAMRO, arXiv 2410.04514, Eq. 5-6) at each step,
with ``l`` the main branch's logits and ``l_neg`` the negative branch's::

    cutoff = max(l) + log(beta)                       # on the ORIGINAL logits l
    l'     = (1 + alpha) * l - alpha * l_neg
    l'[l < cutoff] = -inf                             # adaptive plausibility constraint

``p(x) >= beta * max p`` is ``l(x) >= max l + log(beta)``: the constraint is the same on logits
and on probabilities. With ``alpha = 0`` the kept tokens keep their logits and the argmax cannot
change (the top token is always kept), so greedy decoding is unchanged.

The negative branch
-------------------
:class:`NegativeBranch` holds a second set of inputs (:class:`NegativeInputs`: embeddings,
attention mask, positions) built by a method (the same prompt with a noised image for VCD, with
only the outlier tokens for DAMRO) and steps it alongside ``generate``: its prefill runs the
negative prompt, and every later step feeds the token the main branch just chose (the last column
of the ``input_ids`` a logits processor receives). It never sees pixels: image features are
spliced into the embedded prompt, so the same code serves every family. Two ways to run it:

* ``batched`` (default): the negative rows ride along in the main branch's own forward. Without
  patching ``generate``, this uses two forward hooks on the module ``generate`` drives (the
  ``...ForConditionalGeneration`` model; InstructBLIP's ``generate`` drives its inner language
  model, see ``Adapter.generation_module``):

  - at the prefill the main forward runs untouched; its forward hook then runs the negative prompt
    once on a fresh ``DynamicCache`` and puts those rows into the main cache: *packed* at their own
    length (the default, see "The packed negative cache" below), or, where that cannot apply,
    *padded* (appended as rows ``B..2B-1``, keys and values left-padded with zeros to the main
    length; the padded positions are masked);
  - at every decoding step a forward pre-hook appends the negative rows to the inputs (the same
    chosen token, the negative attention mask, the negative positions continuing its own
    numbering), and the forward hook splits the ``[2B, 1, V]`` logits: ``generate`` sees its ``B``
    rows, the processor reads the other ``B``.

  What this reads of ``generate``'s calls, and how it survives renames (transformers 5.25 renamed
  the cache argument ``past_key_values`` to ``cache``, which silently turned an earlier version of
  this branch serial): the KV cache is found by *type* among the call's keyword arguments
  (:func:`innersight.generation_calls.find_cache`, known names first, then any ``Cache``), and
  our own forwards pass the cache under the name the forward declares. The other inputs are
  public ``forward`` arguments: ``input_ids`` (one token per row at a step), ``attention_mask``
  (2D, or ``None`` without padding; a 4D mask of a compiled cache is refused) and
  ``position_ids`` (``[B, 1]``, or ``[4, B, 1]`` for Qwen's M-RoPE: text row + 3 M-RoPE rows),
  which ``generate`` passes at every step and the pre-hook extends; a missing one is refused
  loudly, never guessed. Greedy search and sampling never look at the cache's batch size. The
  main rows' keys, values, mask and positions are exactly those of a plain run. Sliding-window
  cache layers (Gemma 3) are packed too (below); in the padded merge each keeps the last
  ``window - 1`` positions, which for the left-padded negative prompt are its own last positions
  behind zeros. When the branch
  cannot batch (no cache found, ``use_cache=False``, a static or quantised cache) it runs
  serially with the same tokens and says so: :meth:`NegativeBranch.details`
  (copied into each answer's ``details`` and eval row) names the mode and the reason, and a
  ``logging`` warning is given once per reason (the CLI prints it as one ``warning:`` line).
  On exit the shared cache is cut back to the main rows.

  Why hooks and not a loop of our own: a ``custom_generate`` function or a hand-written decoding
  loop would not depend on ``generate``'s call convention at all, but it would have to
  re-implement what ``generate`` gives every other method and user (sampling warpers, stopping
  criteria, streamers, user logits processors) and would itself follow private helpers of
  ``generate`` that move as fast. The hooks rely on three public forward arguments and on a
  cache found by type; ``tests/decode/test_branch_conventions.py`` pins each supported name, and
  the family tests assert that the batched mode really runs on the installed transformers (CI
  runs them on the floor and the newest release).
* ``serial``: one extra forward per step on the branch's own cache (last position only through
  the LM head), called from the logits processor.

The packed negative cache
-------------------------
Padded, the negative rows cost the main row's length: DAMRO's negative prompt is the question
with ``k`` outlier tokens (about 30 tokens on LLaVA-1.5) but its rows would hold the ~600
positions of the main prompt, and every step ``DynamicCache.update`` copies them and the
attention runs over them, masked. Packed, they cost their own length. At the prefill merge each
plain ``DynamicLayer`` of the shared cache is replaced by a :class:`PackedLayer`, and each
``DynamicSlidingWindowLayer`` (Gemma 3's local layers) by a :class:`SlidingPackedLayer`: what
``generate`` and the model's bookkeeping read of it (``keys``, ``get_seq_length``,
``get_mask_sizes``) is the main rows, exactly as in a plain run; the negative rows' keys and values
are kept apart at their own length ``Ln + t`` (a sliding layer keeps what it would keep of the
negative rows alone: their last ``window - 1`` positions). A step is still one batched forward of
``2B`` rows inside ``generate``: ``update`` appends rows ``:B`` to the main store (and returns
it, as ``DynamicLayer`` does) and rows ``B:`` to the negative store; the model builds its
``[2B, 1, 1, Lm + t]`` mask as before (the pre-hook still passes the negative mask left-padded to
the main length), and the attention reads
the negative store through innersight's dispatcher (:func:`innersight.attention.packed_rows`):
the main rows run as usual (an attention method's handler, or SDPA), rows ``B..2B-1`` run SDPA on
the negative store with the branch's own ``[B, Ln + t]`` mask (at a decoding step the query is
one position, so the causal mask is the padding mask; on a sliding layer the query attends to the
store plus the new position, at most ``window`` positions, all inside its window, so the
sliding-window mask over the negative rows' own positions is the padding mask's last columns).
A window counts cache positions, padding included; the negative store's positions are the serial
branch's (its cache holds the negative prompt alone, left-padded to its own length ``Ln``), and
the padded merge shifts them all by the same ``Lm - Ln``, so the three see the same keys in every
window. For that the text attention runs through ``innersight`` (SDPA unless told otherwise) from
the merge to the branch's exit.

Everything this relies on is checked: at the merge (else the padded merge, with the reason in
:meth:`NegativeBranch.details` ``{"negative_cache": "padded", "why": ...}``): every cache layer a
plain ``DynamicLayer`` or ``DynamicSlidingWindowLayer`` (the negative cache's layer of the same type
and window; a sliding layer not recording its past states and holding its last ``window - 1``
positions), one cache layer per decoder layer with ``self_attn.layer_idx`` its index, no
offloading, and a text attention of ``sdpa`` (or already ``innersight``: the packed rows run
SDPA; an eager or flash model keeps its own kernel and the padded merge). At every step (else a
``MethodError``): ``2B`` rows reach each layer's ``update``, the attention receives the very keys
``update`` returned, one query position, and after the forward every layer's negative rows were
read (an attention that bypassed the dispatcher would, with one row, silently broadcast the main
keys to the negative row); on a sliding layer also at most ``window`` negative positions attended
and no past-state recording. ``PackedLayer`` refuses row reordering (beam search is refused
anyway), ``SlidingPackedLayer`` also any crop. On exit, also after an exception, each packed
layer is replaced by the plain layer it stood for, holding the main rows only (a sliding layer with
its position count), and the attention implementation is restored. Tokens and
scores equal the padded and the serial branch's (``tests/decode/test_packed_negative_cache.py``);
the config field ``negative_cache="padded"`` (DAMRO, VCD) keeps the padded merge for comparison.

Beam search (cache rows reordered by ``generate``) and several sequences per prompt are refused
with a clear error.

With an attention method (VAR)
------------------------------
An attention method acts on the **main rows only**; the negative rows run plain attention
(transformers' SDPA). The negative branch is a contrast reference: what the model says from the
outlier tokens (DAMRO) or the noised image (VCD) alone. Redistributing its attention would change
that reference, and VAR's state (sink masks found at the main prefill, image positions) is per
main row: it describes the main prompt, not the negative one (another length for DAMRO, other
image features for VCD). So ``DAMRO + VAR`` contrasts ``VAR(main)`` with the plain negative
branch: for the same tokens, its main logits are VAR alone's and its negative logits the contrast
alone's. The branch says which rows are which through
:func:`innersight.attention.handler_rows` on the decoder's attention modules, never by guessing
from shapes:

* its own forwards (the negative prefill, every serial step) run inside ``handler_rows(layers, 0)``:
  handlers, and the method hooks that follow the scope (VAR's sink detection), are bypassed;
* in ``batched`` mode, from the prefill on, ``handler_rows(layers, B)``: in a decoding step of
  ``2B`` rows the handlers see rows ``0..B-1`` (the main batch, as in a plain run) and rows
  ``B..2B-1`` run SDPA (on the packed negative store when packed). The main prefill has ``B``
  rows and is untouched by the scope.

Both scopes are removed when the branch's context exits, also after an exception.

A custom decoding loop (main and negative rows in one batch, not ``generate``) was considered and
not written: the hook path already runs the two branches as one batched forward per step inside
``generate`` and keeps every ``generate`` feature (sampling warpers, stopping criteria, streamers,
other processors), which a custom loop would have to re-implement.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from transformers import LogitsProcessor
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ..adapters.base import ImageRows
from ..attention import IMPLEMENTATION, handler_rows, innersight_text_attention, packed_rows, text_attention
from ..errors import MethodError
from ..generation_calls import cache_argument, find_cache, output_cache
from ..hooks import HookHandles

log = logging.getLogger(__name__)
_warned: set[str] = set()

BRANCH_MODES = ("batched", "serial")
#: how a batched branch stores its rows in the shared cache: at their own length ("packed") or
#: left-padded to the main prompt's length ("padded", the fallback)
NEGATIVE_CACHES = ("packed", "padded")


# ---------------------------------------------------------------------- the contrast
def plausibility_cutoff(scores: torch.Tensor, beta: float) -> torch.Tensor:
    """``max(l) + log(beta)`` per row of ``scores`` [B, V] (float32), shape [B, 1]."""
    return scores.float().max(dim=-1, keepdim=True).values + math.log(beta)


def contrast(scores: torch.Tensor, negative: torch.Tensor, *, alpha: float, beta: float) -> torch.Tensor:
    """The contrastive scores [B, V] (float32) of main logits ``scores`` and negative logits
    ``negative`` (both [B, V]): ``(1 + alpha) * l - alpha * l_neg`` where ``l >= max(l) + log(beta)``,
    ``-inf`` elsewhere (the cutoff is taken on the original logits)."""
    if scores.shape != negative.shape:
        raise MethodError(f"contrast: negative logits {tuple(negative.shape)} do not match scores {tuple(scores.shape)}")
    main = scores.float()  # [B, V]
    neg = negative.to(device=main.device, dtype=torch.float32)  # [B, V]
    out = (1.0 + alpha) * main - alpha * neg  # [B, V]
    return out.masked_fill(main < plausibility_cutoff(main, beta), float("-inf"))


def check_strength(name: str, alpha: float, beta: float) -> None:
    """Validate a contrast's ``alpha`` (finite, >= 0) and ``beta`` (in (0, 1])."""
    if not math.isfinite(alpha) or alpha < 0:
        raise MethodError(f"{name} alpha must be a finite number >= 0, not {alpha}")
    if not 0 < beta <= 1:
        raise MethodError(f"{name} beta must be in (0, 1], not {beta}")


# ---------------------------------------------------------------------- negative inputs
@dataclass
class NegativeInputs:
    """The negative branch's prompt, left-padded like the main batch.

    ``position_ids`` is ``[B, L]`` (1D positions) or ``[4, B, L]`` (Qwen: the text row, then the
    temporal / height / width M-RoPE rows, the layout ``generate`` uses). ``input_ids`` holds the
    prompt's tokens with the image token id at every image position (for inspection: the
    embeddings are what the model receives). ``image_tokens[b][i]``: how many tokens stand for
    image ``i`` of sample ``b``. ``injected``: the decoder injections of the image positions
    (``input_ids == image_token_id``, row-major), ``[S, N, D]``, for a family whose decoder adds
    image rows inside the stack (Qwen3-VL's DeepStack; ``adapters/base.py``, "decoder
    injections"); None for the others. A forward of these inputs runs inside
    ``adapter.injecting(input_ids, injected)`` (:meth:`forward_context`).
    """

    inputs_embeds: torch.Tensor  # [B, L, D]
    attention_mask: torch.Tensor  # [B, L] long
    position_ids: torch.Tensor  # [B, L] or [4, B, L] long
    input_ids: torch.Tensor  # [B, L] long
    image_tokens: list[list[int]] = field(default_factory=list)
    #: the batch the prompt was built from (for the adapter's :meth:`extra_inputs`)
    source: Any = None
    injected: torch.Tensor | None = None  # [S, N, D]

    def extra_inputs(self, adapter: Any, ids: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None) -> dict[str, Any]:
        """The model inputs this prompt needs beyond embeddings, mask and positions
        (:meth:`~innersight.adapters.base.Adapter.built_prompt_inputs`; Gemma 3: ``token_type_ids``),
        for the prompt itself or, given ``ids`` / ``mask`` [B, L'], for it followed by more tokens."""
        ids = self.input_ids if ids is None else ids
        mask = self.attention_mask if mask is None else mask
        return adapter.built_prompt_inputs(ids, mask, self.source)

    @property
    def rows(self) -> int:
        return int(self.inputs_embeds.shape[0])

    @property
    def length(self) -> int:
        return int(self.inputs_embeds.shape[1])

    def forward_context(self, adapter: Any) -> Any:
        """The context one forward of these inputs runs in: the adapter adds :attr:`injected`
        at the image positions (a no-op without injections)."""
        return adapter.injecting(self.input_ids, self.injected)


def _left_pad_start(mask_row: torch.Tensor) -> int:
    """Index of the first real token of a left-padded attention-mask row [L]."""
    valid = mask_row.bool()
    start = int(valid.long().argmax()) if bool(valid.any()) else int(valid.numel())
    if not bool(valid[start:].all()):
        raise MethodError("contrastive decoding needs left-padded inputs (padding only before the prompt)")
    return start


def features_per_sample(batch: Any, feats: Sequence[Any]) -> list[list[Any]]:
    """The flat per-image features of :func:`~.vcd.image_features` (or :class:`ImageRows`) grouped
    by sample: ``out[b][i]`` is image ``i`` of sample ``b``, [n_i, D]."""
    out, flat = [], 0
    for sizes in batch.image_sizes:
        out.append([feats[flat + i] for i in range(len(sizes))])
        flat += len(sizes)
    return out


def splice_images(
    adapter: Any,
    batch: Any,
    features: Sequence[Sequence[torch.Tensor | ImageRows]],
    grid_shapes: Sequence[Sequence[tuple[int, int]]] | None = None,
) -> NegativeInputs:
    """The prompts of ``batch`` with each image's tokens replaced by ``features[b][i]`` [n_i, D]
    (any number of tokens; the rest of the image's tokens removed, later positions renumbered
    contiguously), embedded and left-padded. A feature given as :class:`ImageRows` (the
    adapter's ``image_rows``) also carries its decoder injections into the result's ``injected``
    (all images alike: with injections or without).

    An image whose tokens are one contiguous run (``batch.layouts``) has the run replaced; one
    whose tokens are split by text tokens (SmolVLM's tiles) is handled by
    :func:`_splice_split_image` (the same count in place, another count replaces its whole span).
    For Qwen (M-RoPE)
    ``grid_shapes[b][i] = (rows, cols)`` places the new image tokens on a grid where the family's
    positions need one (Qwen's M-RoPE); positions come from ``adapter.prompt_positions``.
    """
    ids = batch.input_ids  # [B, L0]
    mask = batch.inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    embed = adapter.language_model.get_input_embeddings()
    device, dtype = embed.weight.device, embed.weight.dtype
    image_id = int(adapter.image_token_id)
    rows_ids: list[torch.Tensor] = []
    rows_emb: list[torch.Tensor] = []
    counts: list[list[int]] = []
    injected: list[torch.Tensor | None] = []  # per image, in prompt order: [S, n_i, D] or None
    if len(features) != len(batch):
        raise MethodError(f"negative inputs: {len(features)} feature lists for a batch of {len(batch)}")
    for b in range(len(batch)):
        layouts = batch.layouts[b]
        if len(features[b]) != len(layouts):
            raise MethodError(f"negative inputs: sample {b} has {len(layouts)} images but {len(features[b])} feature sets")
        start = _left_pad_start(mask[b])
        cursor = start
        pieces_ids: list[torch.Tensor] = []
        pieces_emb: list[torch.Tensor] = []
        row_counts: list[int] = []
        for i, (layout, image) in enumerate(zip(layouts, features[b])):
            rows = image if isinstance(image, ImageRows) else ImageRows(image)
            feats = rows.embeds
            injected.append(rows.injected)
            pos = layout.positions.to(ids.device)
            feats = feats.to(device=device, dtype=dtype)  # [n, D]
            if pos.numel():
                first, last = int(pos[0]), int(pos[-1])
                if first < cursor:
                    raise MethodError(f"{adapter.family}: the images of sample {b} overlap; cannot splice")
                if last - first + 1 != pos.numel():  # text tokens between the image's tokens (tiles)
                    cursor = _splice_split_image(adapter, batch, b, i, pos, feats, cursor, embed,
                                                 pieces_ids, pieces_emb)
                    row_counts.append(int(feats.shape[0]))
                    continue
            else:
                first = last = cursor - 1
            text = ids[b, cursor:first]  # [T]
            pieces_ids.append(text)
            pieces_emb.append(embed(text.to(device)))
            pieces_ids.append(torch.full((feats.shape[0],), image_id, dtype=ids.dtype, device=ids.device))
            pieces_emb.append(feats)
            row_counts.append(int(feats.shape[0]))
            cursor = last + 1
        tail = ids[b, cursor:]
        pieces_ids.append(tail)
        pieces_emb.append(embed(tail.to(device)))
        rows_ids.append(torch.cat(pieces_ids))
        rows_emb.append(torch.cat(pieces_emb, dim=0))
        counts.append(row_counts)
    return left_padded(adapter, batch, rows_ids, rows_emb, counts, grid_shapes, injected=joined_injections(injected))


def joined_injections(per_image: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """The decoder injections of images in prompt order (each ``[S, n_i, D]``, or None for a
    family without) as the rows of a whole prompt batch, ``[S, N, D]``; None when no image has any.

    Raises:
        MethodError: some images with injections and some without.
    """
    given = [x for x in per_image if x is not None]
    if not given:
        return None
    if len(given) != len(per_image):
        raise MethodError("negative inputs: some images carry decoder injections and some do not")
    return torch.cat(given, dim=1)  # [S, N, D]


def _splice_split_image(adapter: Any, batch: Any, b: int, i: int, pos: torch.Tensor, feats: torch.Tensor,
                        cursor: int, embed: Any, pieces_ids: list[torch.Tensor],
                        pieces_emb: list[torch.Tensor]) -> int:
    """Splice image ``i`` of sample ``b``, whose tokens ``pos`` [T] are not one contiguous run
    (text tokens between its tiles, SmolVLM), as ``feats`` [n, D]; append the pieces from
    ``cursor`` on and return the new cursor.

    As many features as the image has tokens: written at the image's own positions, every text
    token between them kept (the same prompt with other image features). Another count: the
    image's whole span (:meth:`~innersight.adapters.base.Adapter.image_spans`) replaced by the
    family's wrapping of ``n`` tokens (:meth:`~innersight.adapters.base.Adapter.image_wrapping`).
    """
    ids = batch.input_ids  # [B, L0]
    image_id = int(adapter.image_token_id)
    device = feats.device
    if feats.shape[0] == pos.numel():
        last = int(pos[-1])
        span = ids[b, cursor:last + 1]  # [T'] the text before the image, then the image with its markers
        emb = embed(span.to(device)).clone()  # [T', D]
        emb[(pos - cursor).to(device)] = feats
        pieces_ids.append(span)
        pieces_emb.append(emb)
        return last + 1
    start, stop = adapter.image_spans(batch, b)[i]
    if start < cursor:
        raise MethodError(f"{adapter.family}: the images of sample {b} overlap; cannot splice")
    before, after = adapter.image_wrapping(int(feats.shape[0]))
    text = torch.cat([ids[b, cursor:start], torch.tensor(before, dtype=ids.dtype, device=ids.device)])  # [T]
    tail = torch.tensor(after, dtype=ids.dtype, device=ids.device)  # [T2]
    pieces_ids += [text, torch.full((feats.shape[0],), image_id, dtype=ids.dtype, device=ids.device), tail]
    pieces_emb += [embed(text.to(device)), feats, embed(tail.to(device))]
    return stop


def left_padded(
    adapter: Any,
    batch: Any,
    rows_ids: Sequence[torch.Tensor],
    rows_emb: Sequence[torch.Tensor],
    image_tokens: list[list[int]],
    grid_shapes: Sequence[Sequence[tuple[int, int]]] | None = None,
    *,
    injected: torch.Tensor | None = None,
) -> NegativeInputs:
    """:class:`NegativeInputs` from unpadded rows a method built from ``batch``: token ids ``[n_b]``
    (the image token id at image positions) and embeddings ``[n_b, D]``, left-padded with the pad
    token's embedding; positions from ``adapter.prompt_positions``. ``injected`` [S, N, D]: the
    decoder injections of the image positions, row-major (see :class:`NegativeInputs`)."""
    ids = batch.input_ids
    embed = adapter.language_model.get_input_embeddings()
    device = embed.weight.device
    length = max(r.numel() for r in rows_ids)
    pad_id = getattr(adapter.tokenizer, "pad_token_id", None)
    pad_id = int(pad_id) if pad_id is not None else 0
    out_ids = torch.full((len(rows_ids), length), pad_id, dtype=ids.dtype, device=ids.device)  # [B, Ln]
    out_mask = torch.zeros((len(rows_ids), length), dtype=torch.long, device=ids.device)  # [B, Ln]
    pad_vec = embed(torch.tensor([pad_id], device=device))[0].to(rows_emb[0].dtype)  # [D]
    out_emb = pad_vec.expand(len(rows_ids), length, pad_vec.shape[-1]).clone()  # [B, Ln, D]
    for b, (row_ids, row_emb) in enumerate(zip(rows_ids, rows_emb)):
        n = row_ids.numel()
        out_ids[b, length - n:] = row_ids
        out_mask[b, length - n:] = 1
        out_emb[b, length - n:] = row_emb
    positions = adapter.prompt_positions(batch, out_ids, out_mask, image_tokens, grid_shapes)  # [B, L] / [4, B, L]
    if injected is not None:
        injected = injected.to(device=device, dtype=out_emb.dtype)
    return NegativeInputs(out_emb, out_mask.to(device), positions.to(device), out_ids, image_tokens, source=batch,
                          injected=injected)


# ---------------------------------------------------------------------- the negative branch
def _merge_into(main: Any, negative: Any, pad: int) -> bool:
    """Append the negative cache's rows to ``main`` (in place), each layer's keys and values
    left-padded with zeros to the main layer's stored length (the padded positions are masked).

    ``DynamicLayer``: the stored length is the prompt's, so the pad is ``pad`` (main minus negative
    prompt length). ``DynamicSlidingWindowLayer`` (Gemma 3, Mistral...): each side keeps only its
    last ``min(length, window - 1)`` positions, and the last ``window - 1`` positions of the
    left-padded negative prompt are its own last ones behind zeros, so padding the stored keys to
    the main layer's stored length is exactly the sliding cache of the padded prompt; the layer's
    position count (``cumulative_length``) stays the main prompt's, which the padded rows share.
    Any other layer type, or layers of different types or windows: False (nothing changed)."""
    main_layers, neg_layers = getattr(main, "layers", None), getattr(negative, "layers", None)
    if not main_layers or not neg_layers or len(main_layers) != len(neg_layers):
        return False
    for a, b in zip(main_layers, neg_layers):
        if type(a) is not type(b) or type(a) not in (DynamicLayer, DynamicSlidingWindowLayer):
            return False
        if not (a.is_initialized and b.is_initialized):
            return False
        if getattr(a, "sliding_window", None) != getattr(b, "sliding_window", None):
            return False
        if getattr(a, "record_past", False) or getattr(b, "record_past", False):
            return False
        if b.keys.shape[-2] > a.keys.shape[-2]:
            return False
    for a, b in zip(main_layers, neg_layers):
        n = int(a.keys.shape[-2]) - int(b.keys.shape[-2])  # DynamicLayer: == pad
        keys = torch.nn.functional.pad(b.keys, (0, 0, n, 0)).to(a.keys.device)  # [B, Hkv, Lm, d]
        values = torch.nn.functional.pad(b.values, (0, 0, n, 0)).to(a.values.device)  # [B, Hkv, Lm, d]
        a.keys = torch.cat([a.keys, keys], dim=0)  # [2B, Hkv, Lm, d]
        a.values = torch.cat([a.values, values], dim=0)
    return True


@dataclass
class _PackedState:
    """What the packed layers of one branch share: the negative rows' count and this step's
    attention mask over their own positions, ``[B, 1, 1, Ln + t]`` bool (None: no padding)."""

    rows: int
    mask: torch.Tensor | None = None


class PackedLayer(DynamicLayer):
    """A ``DynamicLayer`` of the shared cache whose negative rows are kept apart, at their own
    length (see the module doc, "The packed negative cache").

    What ``generate`` and the model's bookkeeping read (``keys``, ``values``, ``get_seq_length``,
    ``get_mask_sizes``) is the main rows' ``B`` rows, exactly as in a plain run. ``update`` takes
    the ``2B`` rows of a batched step: rows ``:B`` go to the main store (returned, as
    ``DynamicLayer`` does), rows ``B:`` to the negative store; the attention dispatcher
    (:func:`innersight.attention.packed_rows`) then asks :meth:`tail_inputs` for the negative
    keys, values and mask. Every convention this relies on is checked, loudly."""

    _layer_type = None  # never registered as a layer type of transformers' cache mappings

    def __init__(self, plain: Any, negative_keys: torch.Tensor, negative_values: torch.Tensor,
                 state: _PackedState) -> None:
        DynamicLayer.__init__(self)  # not super(): a sliding subclass's next __init__ wants a window
        self.__dict__.update(vars(plain))  # keys, values and the plain layer's own state
        self.plain = plain
        self.negative_keys = negative_keys  # [B, Hkv, Ln, d]
        self.negative_values = negative_values  # [B, Hkv, Ln, d]
        self.state = state
        #: the main keys the last update returned, until the attention has read the negative rows
        self.pending: torch.Tensor | None = None
        #: the negative keys and values the negative rows attend to in that forward
        self._pending_tail: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.state.rows
        if key_states.shape[0] != 2 * rows:
            raise MethodError(f"packed negative cache: a forward of {key_states.shape[0]} rows, not the "
                              f"{2 * rows} of a batched step (main + negative rows)")
        if self.pending is not None:
            raise MethodError("packed negative cache: the attention did not read the negative rows of the previous "
                              "forward (it does not run through innersight's attention dispatcher)")
        keys, values = super().update(key_states[:rows], value_states[:rows], *args, **kwargs)  # [B, Hkv, Lm+t, d]
        self._pending_tail = self._negative_update(key_states[rows:], value_states[rows:])
        self.pending = keys
        return keys, values

    def _negative_update(self, key_states: torch.Tensor,
                         value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the negative rows' new keys / values [B, Hkv, 1, d] to the negative store and
        return what they attend to: the whole store [B, Hkv, Ln+t, d]."""
        self.negative_keys = torch.cat([self.negative_keys, key_states], dim=-2)  # [B, Hkv, Ln+t, d]
        self.negative_values = torch.cat([self.negative_values, value_states], dim=-2)
        return self.negative_keys, self.negative_values

    def _negative_mask(self, mask: torch.Tensor, keys: int) -> torch.Tensor:
        """The negative rows' mask [B, 1, 1, keys] for the ``keys`` positions they attend to, from
        their padding mask over all their positions [B, 1, 1, Ln+t] (a full layer: all of it)."""
        return mask

    def tail_inputs(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any] | None:
        """The negative rows' ``(keys, values, mask)`` for the attention of the forward that just
        updated this layer (None when no update is pending: a forward on another cache)."""
        if self.pending is None:
            return None
        if key is not self.pending:
            raise MethodError("packed negative cache: the attention received other keys than its cache layer returned "
                              "(the model transforms them between the cache and the attention function)")
        if query.shape[0] != 2 * self.state.rows or query.shape[2] != 1:
            raise MethodError(f"packed negative cache: a query of shape {tuple(query.shape)}, not one position of "
                              f"{2 * self.state.rows} rows")
        assert self._pending_tail is not None
        keys, values = self._pending_tail
        mask = self.state.mask
        if mask is not None:
            if mask.shape[-1] != self.negative_length:
                raise MethodError("packed negative cache: the negative mask and the negative store disagree in length")
            mask = self._negative_mask(mask, int(keys.shape[-2]))
        self.pending = self._pending_tail = None
        return keys, values, mask

    @property
    def negative_length(self) -> int:
        """Positions of the negative rows so far (their own prompt plus the steps); this layer's
        negative store holds them all."""
        return int(self.negative_keys.shape[-2])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise MethodError("packed negative cache: crop to an absolute length is not supported")
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0:
            self.negative_keys = self.negative_keys[..., :tokens_to_remove, :]
            self.negative_values = self.negative_values[..., :tokens_to_remove, :]

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise MethodError("packed negative cache: generate reordered the cache rows (beam search is not supported)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise MethodError("packed negative cache: generate reordered the cache rows (beam search is not supported)")

    def unpacked(self) -> Any:
        """The plain layer this one replaced, holding the main rows' state now (keys, values and,
        for a sliding-window layer, its position count)."""
        for name in vars(self.plain):
            setattr(self.plain, name, self.__dict__[name])
        return self.plain


class SlidingPackedLayer(PackedLayer, DynamicSlidingWindowLayer):
    """A ``DynamicSlidingWindowLayer`` of the shared cache (Gemma 3's local layers) whose negative
    rows are kept apart: the main rows are the plain sliding layer's, exactly; the negative store
    keeps what that layer would keep of the negative rows alone, their last ``window - 1``
    positions, and counts all their positions (``negative_length``).

    At a step the negative rows attend to the store plus the new position (at most ``window``
    positions, as ``DynamicSlidingWindowLayer.update`` returns), and their mask is the
    sliding-window causal mask over their own positions: for one query at position ``p`` every
    kept position ``> p - window`` is in the window, so it is the padding mask's last columns.
    Past-state recording (assisted decoding) and crops are refused."""

    is_sliding = True

    def __init__(self, plain: Any, negative: Any, state: _PackedState) -> None:
        super().__init__(plain, negative.keys.to(plain.keys.device), negative.values.to(plain.values.device), state)
        #: positions of the negative rows so far (the store keeps the last ``window - 1``)
        self.negative_seen = int(negative.cumulative_length)
        if self.negative_keys.shape[-2] != min(self.negative_seen, self.sliding_window - 1):
            raise MethodError("packed negative cache: the negative sliding-window layer does not hold its last "
                              "window - 1 positions")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.record_past:
            raise MethodError("packed negative cache: a sliding-window layer recording its past states "
                              "(assisted decoding) is not supported")
        return super().update(key_states, value_states, *args, **kwargs)

    def _negative_update(self, key_states: torch.Tensor,
                         value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``DynamicSlidingWindowLayer.update``: return the store plus the new position
        [B, Hkv, min(Ln+t, window-1) + 1, d], keep its last ``window - 1`` positions."""
        self.negative_seen += int(key_states.shape[-2])
        keys = torch.cat([self.negative_keys, key_states], dim=-2)  # [B, Hkv, K + 1, d]
        values = torch.cat([self.negative_values, value_states], dim=-2)
        self.negative_keys = keys[:, :, -self.sliding_window + 1:, :]  # [B, Hkv, min(K + 1, w - 1), d]
        self.negative_values = values[:, :, -self.sliding_window + 1:, :]
        return keys, values

    def _negative_mask(self, mask: torch.Tensor, keys: int) -> torch.Tensor:
        """The last ``keys`` columns of the padding mask [B, 1, 1, Ln+t]: the query (the last
        position) sees every one of them through the window (``keys <= window``)."""
        if keys > self.sliding_window:
            raise MethodError(f"packed negative cache: {keys} negative positions exceed the sliding window "
                              f"({self.sliding_window})")
        return mask[..., -keys:]  # [B, 1, 1, keys]

    @property
    def negative_length(self) -> int:
        """Positions of the negative rows so far (their own prompt plus the steps); the store keeps
        the last ``window - 1`` of them."""
        return self.negative_seen

    def crop(self, tokens_to_remove: int) -> None:
        raise MethodError("packed negative cache: cropping a sliding-window layer is not supported")


def _packed_layer(plain: Any, negative: Any, state: _PackedState) -> PackedLayer:
    """The packed layer standing for ``plain`` (a ``DynamicLayer`` or ``DynamicSlidingWindowLayer``
    of the main rows) with ``negative``'s rows (the same type, the negative rows alone)."""
    if type(plain) is DynamicSlidingWindowLayer:
        return SlidingPackedLayer(plain, negative, state)
    return PackedLayer(plain, negative.keys.to(plain.keys.device), negative.values.to(plain.values.device), state)


def _why_not_packed(main: Any, negative: Any, layers: Any, model: Any) -> str | None:
    """Why the negative rows cannot be packed into ``main`` (None: they can). The packed layers
    replace plain ``DynamicLayer`` and ``DynamicSlidingWindowLayer`` layers only (the negative
    cache's layer ``i`` of the same type and window as the main one's, a sliding layer not recording
    its past and holding its last ``window - 1`` positions), and need the attention of decoder
    layer ``i`` to update cache layer ``i`` and to run through innersight's dispatcher (SDPA)."""
    main_layers, neg_layers = getattr(main, "layers", None), getattr(negative, "layers", None)
    if getattr(main, "offloading", False):
        return "the KV cache is offloaded"
    if not main_layers or not neg_layers or len(main_layers) != len(neg_layers) or len(main_layers) != len(layers):
        return "the KV cache's layers do not match the decoder's layers one to one"
    kinds = {type(x).__name__ for x in [*main_layers, *neg_layers] if type(x) not in _PACKABLE}
    if kinds:
        return (f"the KV cache holds {', '.join(sorted(kinds))} layers (only plain DynamicLayer and "
                "DynamicSlidingWindowLayer layers are packed)")
    if not all(x.is_initialized for x in [*main_layers, *neg_layers]):
        return "a KV cache layer was not filled at the prefill"
    for i, (a, b) in enumerate(zip(main_layers, neg_layers)):
        why = _why_not_packed_layer(a, b)
        if why is not None:
            return f"KV cache layer {i}: {why}"
    for i, layer in enumerate(layers):
        if getattr(layer.self_attn, "layer_idx", None) != i:
            return f"decoder layer {i}'s attention does not say it updates cache layer {i} (layer_idx)"
    current = text_attention(model)
    if current not in ("sdpa", IMPLEMENTATION):
        return f"the text attention is {current!r}; the packed rows run through innersight's SDPA dispatcher"
    return None


#: the cache layer types a packed layer can stand for
_PACKABLE = (DynamicLayer, DynamicSlidingWindowLayer)


def _why_not_packed_layer(main: Any, negative: Any) -> str | None:
    """Why the main cache layer ``main`` cannot be packed with the negative rows' layer
    ``negative`` (None: it can): layers of different types, sliding windows, a sliding layer
    recording its past states (assisted decoding) or not holding its last ``window - 1`` positions."""
    if type(main) is not type(negative):
        return f"the main rows' layer is a {type(main).__name__}, the negative rows' a {type(negative).__name__}"
    if type(main) is not DynamicSlidingWindowLayer:
        return None
    if main.sliding_window != negative.sliding_window:
        return f"sliding windows of {main.sliding_window} and {negative.sliding_window} positions"
    if main.record_past or negative.record_past:
        return "a sliding-window layer records its past states"
    if negative.keys.shape[-2] != min(int(negative.cumulative_length), main.sliding_window - 1):
        return "the negative rows' sliding-window layer does not hold its last window - 1 positions"
    return None


class NegativeBranch:
    """A negative prompt stepped alongside ``generate`` with its own KV cache (see the module doc).

    ``build()`` returns the :class:`NegativeInputs`; it is called once, at the main prefill (after
    the main branch has run its vision tower, so a method may build from what it captured there).
    Use as a context manager around one ``generate`` call; :meth:`step_logits` gives the negative
    logits of the step being scored. ``mode`` says how it actually ran (``batched`` / ``serial``).
    Attention-method handlers act on the main rows only (see the module doc).
    """

    def __init__(self, adapter: Any, build: Callable[[], NegativeInputs], *, mode: str = "batched",
                 negative_cache: str = "packed") -> None:
        if mode not in BRANCH_MODES:
            raise MethodError(f"negative branch mode must be one of {', '.join(BRANCH_MODES)}, not {mode!r}")
        if negative_cache not in NEGATIVE_CACHES:
            raise MethodError(f"negative cache must be one of {', '.join(NEGATIVE_CACHES)}, not {negative_cache!r}")
        self.adapter = adapter
        self.module = adapter.generation_module
        self._build = build
        self.requested = mode
        #: the batched mode's cache layout asked for, and the one used with the reason (None before)
        self.requested_cache = negative_cache
        self.negative_cache: str | None = None
        self.negative_cache_why: str | None = None
        self._packed: list[PackedLayer] = []  # the shared cache's packed layers (packed mode)
        self._packed_state: _PackedState | None = None
        #: how the branch ran: None before the prefill, then "batched" or "serial"
        self.mode: str | None = None
        self.inputs: NegativeInputs | None = None
        #: the negative logits of the latest step, [B, V] float32
        self.logits: torch.Tensor | None = None
        #: forwards of the negative rows so far (the prefill counts one)
        self.steps = 0
        self.cache: Any = None
        self._handles = HookHandles()
        #: the batched mode's handler-row scope (main rows only), open from the prefill to exit
        self._scope = contextlib.ExitStack()
        self._layers = adapter.decoder_layers
        self._active = False
        self._inside = False
        self._prefill_pending = False
        self._fresh = False
        self._rows = 0
        self._mask: torch.Tensor | None = None  # [B, L] negative attention mask so far
        self._next_positions: torch.Tensor | None = None  # [B, 1] or [4, B, 1]
        self._seen: int | None = None
        #: why the branch ran serially although ``batched`` was asked for (None otherwise)
        self.fallback: str | None = None
        self._main_cache: Any = None  # the cache generate passed to the main prefill
        self._prefill_called = False
        self._use_cache = True
        accepts = inspect.signature(self.module.forward).parameters
        self._logits_to_keep = "logits_to_keep" in accepts
        self._cache_arg = cache_argument(self.module.forward)

    # ------------------------------------------------------------------ context
    def __enter__(self) -> NegativeBranch:
        if self._active:
            raise RuntimeError("this negative branch is already active; build one per generate call")
        self._active = True
        if self.requested == "batched":
            with self._handles.installing():
                self._handles.add(self.module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
                self._handles.add(self.module.register_forward_hook(self._post_hook, with_kwargs=True))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._packed:
                self._unpack()  # the shared cache back to plain layers of the main rows
            elif self.mode == "batched" and self.cache is not None and self._rows:
                # the shared cache back to the main rows only (it may outlive generate)
                self.cache.batch_select_indices(torch.arange(self._rows))
        finally:
            self._packed = []
            self._scope.close()
            self._handles.remove()
            self.cache = None
            self._mask = self._next_positions = None
            self._active = False

    # ------------------------------------------------------------------ fallback
    def _fall_back(self, reason: str) -> None:
        """Record why the batched branch cannot run (the answer's details carry it) and warn once
        per reason and process: the serial branch gives the same tokens at a higher cost."""
        self.fallback = reason
        if reason not in _warned:
            _warned.add(reason)
            log.warning("the negative branch runs serially (one extra forward per token), not batched: %s", reason)

    def details(self) -> dict[str, Any]:
        """How the branch ran, for the answer's ``details``: ``{"mode": ..., "requested": ...}``
        plus ``"fallback"`` (the reason) when ``batched`` was asked for and could not be used; in
        the batched mode ``"negative_cache"``: ``"packed"`` (the negative rows at their own length)
        or ``"padded"`` with ``"why"`` (the reason, or ``"requested"``)."""
        out: dict[str, Any] = {"mode": self.mode, "requested": self.requested}
        if self.fallback is not None:
            out["fallback"] = self.fallback
        if self.mode == "batched" and self.negative_cache is not None:
            out["negative_cache"] = self.negative_cache
            if self.negative_cache_why is not None:
                out["why"] = self.negative_cache_why
        return out

    @property
    def negative_length(self) -> int | None:
        """Positions of the packed negative rows so far (their own prompt plus the steps; a
        sliding-window layer's store keeps the last ``window - 1`` of them); None unless the branch
        runs packed."""
        return self._packed[0].negative_length if self._packed else None

    # ------------------------------------------------------------------ the packed negative cache
    def _pack(self, main: Any, negative: Any) -> str | None:
        """Put the negative rows into ``main`` at their own length (:class:`PackedLayer`), route the
        decoder's attention through innersight's dispatcher for the rest of the call, and return
        None; or return why they cannot be packed (nothing changed)."""
        if self.requested_cache == "padded":
            return "requested"
        why = _why_not_packed(main, negative, self._layers, self.adapter.model)
        if why is not None:
            return why
        state = _PackedState(rows=self._rows)
        self._packed_state = state
        for i, (plain, neg) in enumerate(zip(main.layers, negative.layers)):
            layer = _packed_layer(plain, neg, state)
            main.layers[i] = layer
            self._packed.append(layer)
        self._scope.enter_context(packed_rows(self._layers, dict(enumerate(self._packed))))
        self._scope.enter_context(innersight_text_attention(self.adapter.model))
        return None

    def _unpack(self) -> None:
        """Replace each packed layer of the shared cache by the plain layer it stood for, holding the
        main rows' keys and values (the negative store is dropped)."""
        assert self.cache is not None
        for i, layer in enumerate(self.cache.layers):
            if isinstance(layer, PackedLayer):
                self.cache.layers[i] = layer.unpacked()

    def _check_packed_read(self) -> None:
        """After a batched step: every packed layer's negative rows were read by the attention."""
        for i, layer in enumerate(self._packed):
            if layer.pending is not None:
                layer.pending = layer._pending_tail = None
                raise MethodError(f"packed negative cache: layer {i}'s attention did not read the negative rows "
                                  "(it does not run through innersight's attention dispatcher)")

    # ------------------------------------------------------------------ forwards
    def _forward(self, cache: Any, *, mask: torch.Tensor, positions: torch.Tensor,
                 embeds: torch.Tensor | None = None, ids: torch.Tensor | None = None,
                 extra: dict[str, Any] | None = None, context: Any = None) -> torch.Tensor:
        """One forward of the negative rows alone on ``cache``, attention handlers bypassed, inside
        ``context`` (the prompt's decoder injections at the prefill); last-position logits [B, V]
        float32. ``extra``: further model inputs of the prompt (the prefill's
        :meth:`NegativeInputs.extra_inputs`)."""
        kwargs: dict[str, Any] = {"attention_mask": mask, "position_ids": positions, self._cache_arg: cache,
                                  "use_cache": True, "return_dict": True, **(extra or {})}
        if embeds is not None:
            kwargs["inputs_embeds"] = embeds
        else:
            kwargs["input_ids"] = ids
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        self._inside = True
        try:
            with handler_rows(self._layers, 0), context or contextlib.nullcontext():
                out = self.module(**kwargs)  # plain attention: the negative is a reference
        finally:
            self._inside = False
        self.steps += 1
        return out.logits[:, -1].float()  # [B, V]

    def _prefill(self, rows: int) -> Any:
        """Build the inputs and run the negative prompt on a fresh cache; returns that cache."""
        from transformers import DynamicCache

        inputs = self._build()
        if inputs.rows != rows:
            raise MethodError(f"the negative branch has {inputs.rows} rows but generate runs {rows}")
        self.inputs = inputs
        self._rows = rows
        cache = DynamicCache(config=self.module.config)
        self.logits = self._forward(cache, mask=inputs.attention_mask, positions=inputs.position_ids,
                                    embeds=inputs.inputs_embeds, extra=inputs.extra_inputs(self.adapter),
                                    context=inputs.forward_context(self.adapter))
        self._mask = inputs.attention_mask
        self._next_positions = inputs.position_ids[..., -1:] + 1  # [B, 1] or [4, B, 1]
        return cache

    def _serial_step(self, tokens: torch.Tensor) -> None:
        """Feed the chosen tokens [B, 1] on the branch's own cache."""
        assert self._mask is not None and self._next_positions is not None
        device = self._mask.device
        self._mask = torch.cat([self._mask, self._mask.new_ones(self._mask.shape[0], 1)], dim=1)  # [B, L + 1]
        positions = self._next_positions
        self.logits = self._forward(self.cache, mask=self._mask, positions=positions, ids=tokens.to(device))
        self._next_positions = positions + 1

    def step_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The negative logits [B, V] for the step whose ``input_ids`` [B, L + t] a processor got."""
        length = int(input_ids.shape[1])
        if self.mode == "batched":
            if not self._fresh:
                raise MethodError("the negative branch has no logits for this step: the model's forward ran "
                                  "outside the branch's hooks")
            self._fresh = False
            self._seen = length
            assert self.logits is not None
            return self.logits
        if self.mode is None:  # the prefill hook did not run (serial mode)
            if self.requested == "batched":
                if not self._prefill_called:
                    self._fall_back("generate's forward ran outside the model the branch hooks "
                                    f"({type(self.module).__name__})")
                elif not self._use_cache:
                    self._fall_back("generate ran without a KV cache (use_cache=False)")
                else:
                    self._fall_back("generate's prefill carried no KV cache the branch could find "
                                    "(an unknown calling convention of this transformers version)")
            self.cache = self._prefill(int(input_ids.shape[0]))
            self.mode = "serial"
        elif self._seen is not None:
            if length != self._seen + 1:
                raise MethodError(f"the negative branch lost step with generation ({self._seen} -> {length} tokens)")
            self._serial_step(input_ids[:, -1:])
        self._seen = length
        assert self.logits is not None
        return self.logits

    # ------------------------------------------------------------------ batched hooks
    def _pre_hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._inside:
            return None
        if self.mode is None:
            self._prefill_called = True
            _, cache = find_cache(kwargs)
            self._use_cache = kwargs.get("use_cache") is not False
            self._prefill_pending = self._use_cache and (cache is None or int(cache.get_seq_length()) == 0)
            self._main_cache = cache
            return None
        if self.mode != "batched":
            return None
        if args:
            raise MethodError("negative branch: the model was called with positional inputs")
        ids = kwargs.get("input_ids")  # [B, 1]
        rows = self._rows
        if ids is None or ids.shape != (rows, 1):
            raise MethodError("negative branch: a decoding step must feed one token per row")
        assert self._mask is not None and self._next_positions is not None
        kwargs["input_ids"] = torch.cat([ids, ids], dim=0)  # [2B, 1]
        _, cache = find_cache(kwargs)
        if cache is not self.cache:
            raise MethodError("negative branch: a decoding step did not carry the shared KV cache; "
                              "generate's calling convention changed under the branch")
        total = int(cache.get_seq_length()) + 1
        main_mask = kwargs.get("attention_mask")
        if isinstance(main_mask, dict):
            raise MethodError("negative branch: 4D attention masks (compiled caches) are not supported")
        if main_mask is None:
            main_mask = torch.ones(rows, total, dtype=torch.long, device=self._mask.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(rows, 1)], dim=1)  # [B, Lm + t] or packed [B, Ln + t]
        negative_mask = self._mask
        if self._packed_state is not None:
            own = int(self._mask.shape[1])
            if self._packed[0].negative_length + 1 != own:
                raise MethodError("negative branch: the negative mask and the packed negative cache disagree in length")
            # the model builds one [2B, 1, 1, Lm + t] mask; the packed rows read their own instead,
            # so their rows of it only need the main length (a longer negative prompt, ICD's, is cut)
            negative_mask = (torch.nn.functional.pad(self._mask, (total - own, 0)) if own <= total
                             else self._mask[:, own - total:])  # [B, Lm + t]
            self._packed_state.mask = None if bool(self._mask.all()) else self._mask[:, None, None, :].bool()
        if main_mask.shape[1] != negative_mask.shape[1]:
            raise MethodError("negative branch: the attention mask and the shared cache disagree in length")
        kwargs["attention_mask"] = torch.cat([main_mask.to(self._mask.device).long(), negative_mask], dim=0)
        positions = kwargs.get("position_ids")
        if positions is None:
            raise MethodError("negative branch: generate passed no position_ids; cannot batch the branches")
        neg = self._next_positions.to(positions.device)
        kwargs["position_ids"] = torch.cat([positions, neg], dim=-2)  # [2B, 1] or [4, 2B, 1]
        self._next_positions = self._next_positions + 1
        for key in ("mm_token_type_ids", "token_type_ids"):
            value = kwargs.get(key)
            if isinstance(value, torch.Tensor) and value.shape[0] == rows:
                kwargs[key] = torch.cat([value, torch.zeros_like(value)], dim=0)
        return args, kwargs

    def _post_hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if self._inside:
            return None
        if self.mode is None:
            if not self._prefill_pending:
                return None  # no cache (use_cache=False): the processor runs the branch serially
            self._prefill_pending = False
            rows = int(output.logits.shape[0])
            negative = self._prefill(rows)
            main = self._main_cache if self._main_cache is not None else output_cache(output)
            self._main_cache = None
            assert self.inputs is not None and self._mask is not None
            pad = int(main.get_seq_length()) - self.inputs.length if main is not None else -1
            if main is None:
                self._fall_back("generate's prefill carried no KV cache the branch could find "
                                "(an unknown calling convention of this transformers version)")
            else:
                self.negative_cache_why = self._pack(main, negative)
                if self.negative_cache_why is None:
                    self.negative_cache = "packed"  # self._mask stays [B, Ln], the negative rows' own
                elif pad < 0:  # padded rows cannot hold a prompt longer than the main one
                    self._fall_back(f"the negative prompt ({self.inputs.length} tokens) is longer than the main "
                                    f"prompt and cannot be packed: {self.negative_cache_why}")
                elif _merge_into(main, negative, pad):
                    self.negative_cache = "padded"
                    self._mask = torch.nn.functional.pad(self._mask, (pad, 0))  # [B, Lm]
                else:
                    self._fall_back(f"the KV cache ({type(main).__name__}) is not a plain DynamicCache "
                                    "(static or quantised caches cannot take extra rows)")
            if self.fallback is None:
                self.mode, self.cache = "batched", main
                # from now on forwards carry 2B rows: attention handlers see the first B only
                self._scope.enter_context(handler_rows(self._layers, rows))
            else:
                self.mode, self.cache = "serial", negative
            self._fresh = True
            return None
        if self.mode != "batched":
            return None
        self._check_packed_read()
        rows = self._rows
        logits = output.logits  # [2B, l, V]
        self.logits = logits[rows:, -1].float()  # [B, V]
        output.logits = logits[:rows]
        for name in ("hidden_states", "attentions"):
            value = getattr(output, name, None)
            if isinstance(value, tuple):
                setattr(output, name, tuple(v[:rows] if isinstance(v, torch.Tensor) else v for v in value))
        self.steps += 1
        self._fresh = True
        return output


# ---------------------------------------------------------------------- the processor
@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU and CUDA generators for the block, restoring their states afterwards."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class ContrastiveProcessor(LogitsProcessor):
    """``(1 + alpha) l - alpha l_neg`` under the plausibility cutoff, ``l_neg`` from a
    :class:`NegativeBranch`. A context manager: enters ``contexts`` (e.g. capture hooks), then the
    branch, and, when ``seed`` is given, seeds torch's generators for the call (restored after)."""

    def __init__(
        self,
        branch: NegativeBranch,
        *,
        alpha: float,
        beta: float,
        contexts: Sequence[Any] = (),
        seed: int | None = None,
        name: str = "contrast",
    ) -> None:
        check_strength(name, alpha, beta)
        self.branch = branch
        self.alpha, self.beta = float(alpha), float(beta)
        self.contexts = tuple(contexts)
        self.seed = seed
        self.name = name
        #: the negative logits used at the latest step, [B, V]
        self.last_negative: torch.Tensor | None = None
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> ContrastiveProcessor:
        if self._stack is not None:
            raise RuntimeError("this processor is already active; build one per generate call")
        stack = contextlib.ExitStack()
        try:
            if self.seed is not None:
                stack.enter_context(seeded(self.seed))
            for ctx in self.contexts:
                stack.enter_context(ctx)
            stack.enter_context(self.branch)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.__exit__(exc_type, exc, tb)

    def details(self) -> dict[str, Any]:
        """What this call did, for the answers' ``details``: ``{name: {"branch": {...}}}``, the
        branch's mode (``batched`` / ``serial``), the mode asked for, and any fallback's reason."""
        return {self.name: {"branch": self.branch.details()}}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        negative = self.branch.step_logits(input_ids)  # [B, V]
        self.last_negative = negative
        return contrast(scores, negative, alpha=self.alpha, beta=self.beta).to(scores.dtype)


# ---------------------------------------------------------------------- generation checks
def check_generation(mllm: Any, generation: dict[str, Any], name: str) -> None:
    """Refuse what a negative branch cannot follow: beam search and several sequences per prompt.
    An active attention method is fine: it acts on the main rows only (see the module doc)."""
    from .early_exit import beam_search

    if beam_search(mllm, generation):
        raise MethodError(f"{name} does not support beam search (num_beams > 1): use greedy decoding or sampling")
    sequences = generation.get("num_return_sequences")
    if sequences is None:
        sequences = getattr(getattr(mllm.model, "generation_config", None), "num_return_sequences", None)
    if int(sequences or 1) > 1:
        raise MethodError(f"{name} does not support num_return_sequences > 1; repeat the prompt in the batch instead")
