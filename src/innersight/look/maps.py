"""ViCrop importance maps over the image-token grid (arXiv 2502.17422, Sec. 3).

Attention is read only where it is needed: the attending (last prompt) position's query against
the keys of one decoder layer, through :mod:`innersight.attention`; no layer ever materialises a
full attention matrix, and for rel-att the forward pass stops right after that layer.

From per-position values to a grid over the image (:func:`grid_projection`), as the adapter
says (:meth:`innersight.adapters.base.Adapter.token_grid`; no code here depends on the family):

* **patch tokens** (LLaVA, LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL): each image token is one cell of a
  grid view (``GridView.token_index``); the map is the values scattered onto that grid.
* **query tokens** (InstructBLIP): the language model sees ``num_query_tokens`` Q-Former queries,
  not patches. The map is two-stage, as in the paper: the values at the query positions
  (``1 x Q``) times the adapter's weights of those queries over the ViT patches (``Q x P``: the
  Q-Former cross-attention, heads averaged, CLS column dropped, at cross-attention block
  ``grid_block``) -> ``1 x P`` -> the ``vit_patches`` grid. (The released code slices 256 LM
  positions instead of the 32 queries and crashes; the intended slice is the queries.)

``grid_block`` is the neutral internal name of what users set as ``qformer_block`` (ViCrop's
config field and the attention-ratio option keep that name, the one users know); adapters whose
image tokens are grid cells ignore it.

For grad-att on query tokens the gradient flows to the language-model stage only: the values at
the query positions are ``A ⊙ ReLU(dv/dA)`` of the LM attention row, and the Q-Former
cross-attention enters the product as it is (no gradient through it), so that the LM stage is
weighted exactly as grad-att weights patch tokens and the second stage only carries each query's
weight to the patches it reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..adapters.base import Batch, ImageLayout, TokenGrid, token_grid_view
from ..adapters.geometry import GridView
from ..attention import StopForward, layer_handlers, row_probabilities, sdpa_forward
from ..generation_calls import last_logits_kwargs


@dataclass
class AttentionCapture:
    """The last query row's attention probabilities at one layer: [B, H, Lk] (fp32)."""

    layer: int
    stop_after: bool
    keep_graph: bool = False
    probs: torch.Tensor | None = None
    #: with ``keep_graph``: the [B, H, 1, Lk] probabilities the layer output was computed from
    graph_probs: torch.Tensor | None = None

    def handler(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs: Any):
        from ..attention import repeat_kv

        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        probs = row_probabilities(query, key, attention_mask, scale, slice(-1, None))  # [B, H, 1, Lk]
        if self.stop_after:
            self.probs = probs[:, :, 0, :].detach()
            raise StopForward
        out, weights = sdpa_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        if self.keep_graph:
            # recompute the last row from the captured probabilities so that d(answer)/d(probs) exists
            v = repeat_kv(value, query.shape[1])  # [B, H, Lk, D]
            last = torch.matmul(probs.to(v.dtype), v).transpose(1, 2)  # [B, 1, H, D]
            out = torch.cat([out[:, :-1], last.to(out.dtype)], dim=1)  # [B, Lq, H, D]
            self.graph_probs = probs
            self.probs = probs[:, :, 0, :].detach()
        else:
            self.probs = probs[:, :, 0, :].detach()
        return out, weights


#: the view a map is drawn on: the finest view whose cells are language-model tokens
map_view = token_grid_view


def token_map(values: torch.Tensor, layout: ImageLayout, view: GridView) -> np.ndarray:
    """Scatter per-position values [L] onto ``view``'s grid: [rows, cols] float64."""
    per_token = values[layout.positions]  # [T_img]
    index = torch.tensor(view.token_index, device=per_token.device)  # [rows, cols]
    return per_token[index].double().cpu().numpy()


#: values [L] at every position of sample b's sequence -> (map [rows, cols] float64, view)
Projection = Callable[[torch.Tensor, Batch, int], tuple[np.ndarray, GridView]]


def weighted_map(values: torch.Tensor, layout: ImageLayout, grid: TokenGrid) -> np.ndarray:
    """Per-position values [L] through ``grid.weights`` [T_img, rows * cols]: the image tokens'
    values times their weights over the cells, [rows, cols] float64."""
    view, weights = grid.view, grid.weights
    assert weights is not None
    tokens = values[layout.positions].double()  # [T_img]
    if tokens.numel() != weights.shape[0]:
        raise RuntimeError(f"{tokens.numel()} image-token positions but {weights.shape[0]} weight rows")
    if weights.shape[1] != view.rows * view.cols:
        raise RuntimeError(f"{weights.shape[1]} weight columns for a {view.rows}x{view.cols} view")
    cells = tokens @ weights.to(tokens.device).double()  # [rows * cols]
    return cells.reshape(view.rows, view.cols).cpu().numpy()


@contextlib.contextmanager
def grid_projection(adapter: Any, grid_block: int = 2) -> Iterator[Projection]:
    """The projection of per-position values onto each sample's first image grid, as
    ``adapter.token_grid(grid_block)`` locates the image tokens there.

    Forwards of the model must run *inside* the block (an adapter may record its weights during
    the forward); the projection may be called inside or after it and uses the last recorded
    forward.
    """
    with adapter.token_grid(grid_block) as locate:

        def project(values: torch.Tensor, batch: Batch, b: int) -> tuple[np.ndarray, GridView]:
            layout = batch.layouts[b][0]
            grid = locate(batch, b)
            if grid.weights is None:
                return token_map(values, layout, grid.view), grid.view
            return weighted_map(values, layout, grid), grid.view

        yield project


def forward_capture(mllm: Any, batch: Batch, layer: int, *, stop_after: bool) -> torch.Tensor:
    """Run the model on ``batch`` capturing the last row's attention at ``layer``: [B, H, L]."""
    capture = AttentionCapture(layer, stop_after=stop_after)
    adapter = mllm.adapter
    with torch.inference_mode(), layer_handlers(mllm.model, adapter.decoder_layers, {layer: capture.handler}):
        try:
            mllm.model(**batch.inputs, use_cache=False)
        except StopForward:
            pass
    assert capture.probs is not None
    return capture.probs


def pair_capture(mllm: Any, batch: Batch, layer: int) -> torch.Tensor | None:
    """The last row's attention at ``layer`` ([B, H, L]) for a batch of prompt pairs (rows ``i``
    and ``B/2 + i`` about the same image) with each pair's image and shared prefix encoded once
    (:mod:`innersight.look.prefix`); None where that path does not apply."""
    from .prefix import shared_prefix_capture

    if len(batch) % 2:
        return None
    capture = AttentionCapture(layer, stop_after=True)
    return shared_prefix_capture(mllm, batch, len(batch) // 2, layer, capture.handler, lambda: capture.probs)


def attention_maps(mllm: Any, batch: Batch, layer: int, *, grid_block: int = 2,
                   pairs: bool = False) -> list[tuple[np.ndarray, GridView]]:
    """Head-averaged attention of each row's last position over its first image: (map, view).

    ``grid_block``: where the adapter reads its image-token -> grid weights (the user's
    ``qformer_block``; see the module docstring). ``pairs``: rows ``i`` and ``B/2 + i`` share an
    image and a prompt prefix, encoded once where the family allows (:func:`pair_capture`).
    """
    with grid_projection(mllm.adapter, grid_block) as project:
        probs = pair_capture(mllm, batch, layer) if pairs else None
        if probs is None:
            probs = forward_capture(mllm, batch, layer, stop_after=True)  # [B, H, L]
    mean = probs.mean(dim=1)  # [B, L]
    return [project(mean[b], batch, b) for b in range(len(batch))]


def answer_confidence(logits: torch.Tensor) -> torch.Tensor:
    """v(x, q) = log of the largest softmax probability of the last position: [B]."""
    last = logits[:, -1, :].float()  # [B, V]
    return torch.log_softmax(last, dim=-1).max(dim=-1).values


@contextlib.contextmanager
def frozen_parameters(model: Any) -> Iterator[None]:
    """The model's parameters without ``requires_grad`` for the block (restored after): the
    gradient maps differentiate inputs only, so the forward need not keep what weight gradients
    would need, and the graph carries activations only."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


@contextlib.contextmanager
def grad_from(module: Any, model: Any) -> Iterator[None]:
    """Record the autograd graph from ``module``'s forward on only, its hidden-state input the
    leaf: everything before it (the vision tower, the decoder layers below) runs without a
    graph, since dv/dA at that layer never reaches them (its attention probabilities are the only
    thing differentiated). ``model``'s parameters are frozen for the block (:func:`frozen_parameters`)."""
    previous = torch.is_grad_enabled()

    def enable(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        torch.set_grad_enabled(True)
        if args:
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_(True)}

    handle = module.register_forward_pre_hook(enable, with_kwargs=True)
    try:
        torch.set_grad_enabled(False)
        with frozen_parameters(model):
            yield
    finally:
        handle.remove()
        torch.set_grad_enabled(previous)


def grad_attention_maps(mllm: Any, batch: Batch, layer: int, *, grid_block: int = 2,
                        shared_prefix: bool = True) -> list[tuple[np.ndarray, GridView]]:
    """grad-att: A ⊙ ReLU(dv/dA) at ``layer``, head-averaged, one pass with the question only.

    Where the adapter's image tokens reach the grid through weights (query tokens) this is the
    LM stage; the weights multiply it as they are (see the module docstring).

    ``shared_prefix``: where the family allows (:func:`innersight.look.prefix.split_prefix`), the
    prompt up to its last image token runs once without a graph and every layer keeps its keys
    and values; only the question's suffix runs with the graph (from ``layer`` on) and is
    differentiated (:func:`shared_prefix_grad_att`). Otherwise the whole prompt runs with the
    graph from ``layer`` on.
    """
    capture = AttentionCapture(layer, stop_after=False, keep_graph=True)
    adapter = mllm.adapter
    with grid_projection(adapter, grid_block) as project:
        weighted = shared_prefix_grad_att(mllm, batch, capture) if shared_prefix else None
        if weighted is None:
            with grad_from(adapter.decoder_layers[layer], mllm.model), \
                    layer_handlers(mllm.model, adapter.decoder_layers, {layer: capture.handler}):
                # the lm_head at the last position only: v reads nothing else
                logits = mllm.model(**batch.inputs, use_cache=False, **last_logits_kwargs(mllm.model)).logits  # [B, 1 or L, V]
                weighted = _grad_times_attention(logits, capture)  # [B, L]
    return [project(weighted[b], batch, b) for b in range(len(batch))]


def _grad_times_attention(logits: torch.Tensor, capture: AttentionCapture) -> torch.Tensor:
    """A ⊙ ReLU(dv/dA), head-averaged, from the capture's graph: [B, Lk]."""
    with torch.enable_grad():
        value = answer_confidence(logits).sum()  # rows are independent: one backward for all
    assert capture.graph_probs is not None and capture.probs is not None
    (grad,) = torch.autograd.grad(value, [capture.graph_probs])  # [B, H, 1, Lk]
    return (capture.probs * torch.relu(grad[:, :, 0, :])).mean(dim=1)  # [B, Lk]


def shared_prefix_grad_att(mllm: Any, batch: Batch, capture: AttentionCapture) -> torch.Tensor | None:
    """grad-att's weighted attention [B, L] (the joint batch's positions) with each prompt's
    prefix (every image token) run once without a graph; None where the split does not apply.

    Exact: dv/dA at the last position's attention row touches only that position's later hidden
    states, never an earlier position's keys or values, so the prefix's keys and values are
    constants of the derivative. The prefix pass runs every layer (the suffix attends to all of
    them); the prefix is kept for the final answer (:mod:`innersight.look.answer_prefix`).
    """
    from .prefix import answer_keeper, prefix_pass, split_prefix, suffix_pass

    split = split_prefix(mllm, batch, len(batch), 1)
    if split is None:
        return None
    adapter, model = mllm.adapter, mllm.model
    last = len(adapter.decoder_layers) - 1
    # no graph, but not inference mode: the suffix's graph reads these keys and values
    with torch.no_grad(), frozen_parameters(model):
        cache = prefix_pass(mllm, split, last, keeper=answer_keeper(mllm, batch))
    with grad_from(adapter.decoder_layers[capture.layer], model):
        output = suffix_pass(mllm, split, cache, {capture.layer: capture.handler}, **last_logits_kwargs(model))
        assert output is not None
        weighted = _grad_times_attention(output.logits, capture)  # [B, P + S]
    return split.scatter(weighted[:, None])[:, 0]  # [B, L]
