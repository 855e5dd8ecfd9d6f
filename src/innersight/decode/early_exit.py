"""Early-exit logits at the last position, and what early-exit decoders share.

Early exit reads a preceding layer as if it were the last one: ``lm_head(final_norm(h_i))``
where ``h_i`` is ``hidden_states[i]``, the output of decoder block ``i`` counting from 1
(``i = 0`` is the input of the first block, i.e. the embeddings). :class:`EarlyExit` registers
forward hooks on the chosen decoder blocks only (via ``adapter.decoder_layers``); each hook
keeps the **last position** of its block's output for the latest forward (the prefill and then
every cached decode step), shape ``[B, D]``, and drops the rest at once. Logits are computed on
demand for those positions and layers only; nothing else goes through the LM head.

Facts this relies on (transformers 5.x): decoder blocks return the hidden-state tensor (older
versions returned a tuple; both are handled); the model applies the final norm after the last
block and ``hidden_states[-1]`` is that normed tensor, so the raw block output we capture must be
normed once, never twice. For ``i = num_layers`` the early-exit logits are the model's own logits.

The hooks are removed by handle when the context exits, even after an exception. Layers may sit
on different devices (``device_map="auto"``): states are moved to the final norm's device and
then to the LM head's device before use. Softmaxes downstream are taken in float32.

Decoders built on early exit (DeCo, DoLa) share two facts of ``generate`` (transformers 5.23,
``generation/utils.py``), handled by :class:`EarlyExitDecoding`:

* it hands logits processors raw float32 logits for greedy search and sampling
  (``_sample``: ``logits_processor(input_ids, next_token_logits)``) but ``log_softmax`` of them for
  beam search (``_beam_search``); a processor must know which it gets;
* ``_get_logits_processor`` merges user processors into its list *before* it appends the sampling
  warpers (temperature, top-k, top-p, min-p...), so the warpers see the corrected scores, as in
  the papers; no re-ordering is needed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Protocol

import torch

from ..errors import MethodError
from ..hooks import HookHandles


def module_device(module: Any) -> torch.device | None:
    """The device of ``module``'s first real parameter (None for none / meta: offloaded)."""
    param = next(iter(module.parameters()), None)
    if param is None or param.device.type == "meta":
        return None
    return param.device


class EarlyExit:
    """Context manager capturing the last position of chosen layers; early-exit logits on demand.

    ``layers`` are ``hidden_states`` indices: ``0`` the embeddings (input of block 1), ``i >= 1``
    the output of block ``i`` (1-based), ``num_layers`` the last block (before the final norm).
    """

    def __init__(self, adapter: Any, layers: Sequence[int], fuse_norm: bool | None = None) -> None:
        depth = int(adapter.num_layers)
        layers = tuple(int(i) for i in layers)
        if not layers:
            raise MethodError("early exit needs at least one layer")
        outside = [i for i in layers if not 0 <= i <= depth]
        if outside:
            raise MethodError(f"early-exit layers {outside} outside 0..{depth} (hidden_states indices)")
        if len(set(layers)) != len(layers):
            raise MethodError(f"early-exit layers {list(layers)} repeat a layer")
        self.adapter = adapter
        self.layers = layers
        self._states: dict[int, torch.Tensor] = {}  # layer -> [B, D] of the latest forward
        self._handles = HookHandles()
        #: fused mode: the early-exit rows ride along in the model's own lm_head call (normed
        #: with the final norm when True, raw when False); None: a separate lm_head call
        self.fuse_norm = fuse_norm
        self._fused: torch.Tensor | None = None  # [B, n, V] of the latest forward (fused mode)
        self._fused_count = 0  # the model's lm_head calls that carried the early-exit rows
        self._head_split: int | None = None  # the model's own rows in the current fused lm_head call

    # ------------------------------------------------------------------ hooks
    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> EarlyExit:
        if self._handles:
            raise RuntimeError("this EarlyExit is already active; build one per generate call")
        blocks = self.adapter.decoder_layers
        with self._handles.installing():
            for layer in self.layers:
                if layer == 0:
                    self._handles.add(blocks[0].register_forward_pre_hook(self._input_hook(layer), with_kwargs=True))
                else:
                    self._handles.add(blocks[layer - 1].register_forward_hook(self._output_hook(layer)))
            if self.fuse_norm is not None:
                head = self.adapter.lm_head
                self._handles.add(head.register_forward_pre_hook(self._head_pre_hook))
                self._handles.add(head.register_forward_hook(self._head_hook))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._remove()

    def _remove(self) -> None:
        self._handles.remove()
        self._states.clear()
        self._fused = None

    # ------------------------------------------------------------------ fused lm_head
    def _head_pre_hook(self, module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """Append the early-exit rows of this forward to the model's own lm_head input:
        [B, L, D] -> [B, L + n, D] (nothing when the rows of this forward are not all there)."""
        self._fused = None
        self._head_split = None
        if not args or len(self._states) != len(self.layers):
            return None
        hidden = args[0]  # [B, L, D]
        if hidden.dim() != 3 or any(s.shape[0] != hidden.shape[0] for s in self._states.values()):
            return None
        extra = self.hidden()  # [B, n, D]
        if self.fuse_norm:
            extra = self.adapter.final_norm(extra)
        self._head_split = int(hidden.shape[1])
        fused = torch.cat([hidden, extra.to(device=hidden.device, dtype=hidden.dtype)], dim=1)  # [B, L + n, D]
        return (fused, *args[1:])

    def _head_hook(self, module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        """Split the fused output: the model keeps [B, L, V]; the early-exit logits [B, n, V]
        are kept for :meth:`logits`."""
        split = self._head_split
        if split is None:
            return None
        self._head_split = None
        self._fused = output[:, split:].float()  # [B, n, V]
        self._fused_count += 1
        return output[:, :split]

    def _keep(self, layer: int, hidden: torch.Tensor) -> None:
        self._fused = None  # a new forward: fused logits of the previous one are stale
        # clone: a view of the last position would keep the whole [B, L, D] prefill tensor alive
        self._states[layer] = hidden[:, -1].detach().clone()  # [B, D]

    def _input_hook(self, layer: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]  # [B, L, D]
            self._keep(layer, hidden)

        return hook

    def _output_hook(self, layer: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output  # [B, L, D]
            self._keep(layer, hidden)

        return hook

    # ------------------------------------------------------------------ readout
    def hidden(self) -> torch.Tensor:
        """The captured last-position states of the latest forward, ``[B, n_layers, D]`` (in
        ``self.layers`` order), on the final norm's device."""
        missing = [i for i in self.layers if i not in self._states]
        if missing:
            state = "active" if self.active else "not active (enter it around generate)"
            raise MethodError(f"no hidden state captured for layers {missing}: the early-exit hooks are {state}")
        device = module_device(self.adapter.final_norm)
        states = [self._states[i] if device is None else self._states[i].to(device) for i in self.layers]
        return torch.stack(states, dim=1)  # [B, n, D]

    def logits(self, norm: bool = True) -> torch.Tensor:
        """Early-exit logits of the latest forward's last position, ``[B, n_layers, V]`` float32,
        on the LM head's device. ``norm=False`` skips the final norm (the DoLa reference code).

        In fused mode (``fuse_norm`` set to ``norm``) these are the rows the model's own lm_head
        call of that forward computed with its final row (one lm_head call per step); otherwise,
        or when that forward did not carry them, one separate lm_head call for the n layers."""
        if self._fused is not None and self.fuse_norm is not None and bool(norm) == self.fuse_norm:
            return self._fused
        hidden = self.hidden()  # [B, n, D]
        if norm:
            hidden = self.adapter.final_norm(hidden)
        head = self.adapter.lm_head
        device = module_device(head)
        if device is not None:
            hidden = hidden.to(device)
        return head(hidden).float()  # [B, n, V]


class LayerLogits(Protocol):
    """What an early-exit decoder reads each step: ``[B, n_layers, V]`` logits of the latest
    forward's last position (an :class:`EarlyExit`, or fixed tensors in tests)."""

    def logits(self, norm: bool = True) -> torch.Tensor: ...


class HookedProcessorMixin:
    """Makes a processor a context manager that activates its layer source (if it has hooks)."""

    source: Any

    def __enter__(self) -> Any:
        if hasattr(self.source, "__enter__"):
            self.source.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if hasattr(self.source, "__exit__"):
            self.source.__exit__(exc_type, exc, tb)


# ---------------------------------------------------------------------- generation plumbing
def beam_search(mllm: Any, generation: dict[str, Any]) -> bool:
    """Whether ``mllm.generate(batch, **generation)`` runs beam search (``num_beams > 1`` from the
    call, else the model's generation config), i.e. hands processors log-probabilities."""
    num_beams = generation.get("num_beams")
    if num_beams is None:
        num_beams = getattr(getattr(mllm.model, "generation_config", None), "num_beams", None)
    return int(num_beams or 1) > 1


class EarlyExitDecoding(ABC):
    """Base of decoding methods that read early-exit logits (DeCo, DoLa).

    Subclasses set ``config`` and implement :meth:`layers` and :meth:`build_processor`.
    :meth:`processors` builds a fresh processor with its own :class:`EarlyExit`; the processor is
    a context manager, entered by the plan around the generate call only.
    """

    config: Any

    @abstractmethod
    def layers(self, adapter: Any) -> tuple[int, ...]:
        """The ``hidden_states`` indices this method reads for ``adapter``'s model."""

    @abstractmethod
    def build_processor(self, source: LayerLogits, log_probs: bool) -> Any:
        """The method's processor reading ``source`` (``log_probs``: beam search inputs)."""

    def early_exit_norm(self) -> bool:
        """Whether the method reads the early-exit rows through the final norm (the fused
        lm_head call normalises them accordingly)."""
        return True

    def processors(self, mllm: Any, batch: Any, generation: dict[str, Any]) -> list[Any]:
        source = EarlyExit(mllm.adapter, self.layers(mllm.adapter), fuse_norm=self.early_exit_norm())
        return [self.build_processor(source, log_probs=beam_search(mllm, generation))]
