"""PAI: pay attention to image (attention point) plus its contrast with the image-free input
(decoding point).

Liu, Zheng and Chen, "Paying More Attention to Image: A Training-Free Method for Alleviating
Hallucination in LVLMs", ECCV 2024, arXiv 2407.21771; reference code shikiw/PAI.

Attention (Sec. 3.2, Eq. 4): in decoder layers ``start_layer .. end_layer - 1``, for the query row
that predicts the next token (the last row of every forward: the prompt's last token at the
prefill, the new token at each decoding step), every head's pre-softmax attention logit ``z_j``
at an image key ``j`` is amplified along its own direction before the softmax::

    z_j <- z_j + alpha * |z_j|          (image keys only; text keys and other rows unchanged)

Decoding (Sec. 3.3, Eq. 6): the log-probabilities ``s`` of the main branch are pushed away from
those of the same prompt without the image ``u`` (the image-free branch,
:func:`~.image_free.image_free_inputs`, batched with the main rows)::

    out = gamma * s - (gamma - 1) * u = u + gamma * (s - u),    s < max(s) + log(beta) -> -inf

``alpha = 0.2``, ``gamma = 1.1``, layers ``2 .. 32`` are the reference scripts' values for
LLaVA-1.5 (``--alpha 0.2 --gamma 1.1 --start-layer 2 --end-layer 32``); ``beta = 0.1`` is the
reference's plausibility cutoff. ``end_layer = None`` means the model's last layer. With
``alpha = 0`` and ``gamma = 1`` the scores are ``log_softmax`` of the plain logits under the
cutoff: greedy decoding is unchanged.

The amplification runs through the one switchable attention implementation
(:func:`innersight.attention.layer_handlers`): SDPA for every row, then the last row recomputed in
float32 with the amplified logits. Only the main rows are changed: the image-free branch's rows
run plain attention (:func:`innersight.attention.handler_rows`), and it has no image keys anyway.

Two method names share the config key ``pai``: ``pai`` (both parts, the paper's method; decoding
point, its processor also switches the attention for the call) and ``pai-attention`` (the
attention part alone, attention point: it composes with a decoding method such as ``vcd``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..attention import additive_mask, key_start, layer_handlers, repeat_kv, sdpa_forward
from ..errors import MethodError
from .contrast import (
    BRANCH_MODES,
    ContrastiveProcessor,
    NegativeBranch,
    check_generation,
    plausibility_cutoff,
)
from .image_free import image_free_inputs, require_images

SOURCE = "arXiv 2407.21771 (PAI, ECCV 2024)"
SCRIPTS = "reference scripts shikiw/PAI: --alpha 0.2 --gamma 1.1 --start-layer 2 --end-layer 32"


@dataclass(frozen=True)
class PAIConfig:
    """PAI settings; defaults are the reference's for LLaVA-1.5."""

    #: amplification of image attention logits: z + alpha |z|
    alpha: float = field(default=0.2, metadata={"source": f"{SOURCE} Eq. 4; {SCRIPTS}"})
    #: contrast with the image-free input: gamma s - (gamma - 1) u (1 = no contrast)
    gamma: float = field(default=1.1, metadata={"source": f"{SOURCE} Eq. 6; {SCRIPTS}"})
    #: adaptive plausibility cutoff of the contrast
    beta: float = field(default=0.1, metadata={"source": "shikiw/PAI CFG logits processor: log(0.1) cutoff"})
    #: first decoder layer (0-based) whose attention is amplified
    start_layer: int = field(default=2, metadata={"source": SCRIPTS})
    #: one past the last amplified layer; None: the model's number of layers (32 for 7B LLaVA)
    end_layer: int | None = field(default=None, metadata={"source": SCRIPTS})
    #: "batched" (image-free rows in the main forward) or "serial"
    branch: str = "batched"

    def __post_init__(self) -> None:
        if not math.isfinite(self.alpha) or self.alpha < 0:
            raise MethodError(f"pai alpha must be a finite number >= 0, not {self.alpha}")
        if not math.isfinite(self.gamma) or self.gamma < 1:
            raise MethodError(f"pai gamma must be a finite number >= 1, not {self.gamma}")
        if not 0 < self.beta <= 1:
            raise MethodError(f"pai beta must be in (0, 1], not {self.beta}")
        if self.start_layer < 0 or (self.end_layer is not None and self.end_layer <= self.start_layer):
            raise MethodError(f"pai layers must satisfy 0 <= start_layer < end_layer, not "
                              f"{self.start_layer}..{self.end_layer}")
        if self.branch not in BRANCH_MODES:
            raise MethodError(f"pai branch must be one of {', '.join(BRANCH_MODES)}, not {self.branch!r}")

    def layers(self, num_layers: int) -> tuple[int, ...]:
        end = num_layers if self.end_layer is None else self.end_layer
        if self.start_layer >= num_layers or end > num_layers:
            raise MethodError(f"pai layers {self.start_layer}..{end} are outside the model's {num_layers} layers; "
                              "set pai.start_layer / pai.end_layer")
        return tuple(range(self.start_layer, end))


#: the attention-only method reads the same config
PAIAttentionConfig = PAIConfig


# ---------------------------------------------------------------------- the closed forms
def amplify(logits: torch.Tensor, image: torch.Tensor, alpha: float) -> torch.Tensor:
    """``z + alpha |z|`` at image keys: ``logits`` [..., K], ``image`` bool broadcastable to it
    (other keys untouched, also masked ones at ``-inf``)."""
    return torch.where(image, logits + alpha * logits.abs(), logits)


def guidance(scores: torch.Tensor, unconditional: torch.Tensor, *, gamma: float, beta: float) -> torch.Tensor:
    """PAI's decoding scores [B, V] float32: ``u + gamma (s - u)`` on log-softmaxed ``scores`` and
    ``unconditional`` [B, V], ``-inf`` where ``s < max(s) + log(beta)``."""
    if scores.shape != unconditional.shape:
        raise MethodError(f"pai: image-free logits {tuple(unconditional.shape)} do not match {tuple(scores.shape)}")
    s = torch.log_softmax(scores.float(), dim=-1)  # [B, V]
    u = torch.log_softmax(unconditional.to(device=s.device, dtype=torch.float32), dim=-1)  # [B, V]
    out = u + gamma * (s - u)
    return out.masked_fill(s < plausibility_cutoff(s, beta), float("-inf"))


class ImageAttention:
    """The attention handlers of one activation: the last query row of each forward, image keys
    amplified. ``image`` [B, L0] marks each prepared sample's image positions."""

    def __init__(self, batch: Any, alpha: float) -> None:
        ids = batch.input_ids  # [B, L0]
        self.alpha = float(alpha)
        self.image = torch.zeros(ids.shape, dtype=torch.bool)  # [B, L0]
        for b, layouts in enumerate(batch.layouts):
            for layout in layouts:
                if layout.num_tokens:
                    self.image[b, layout.positions.cpu()] = True
        self.calls = 0

    def keys(self, rows: int, length: int, device: torch.device, start: int = 0) -> torch.Tensor:
        """[rows, length] image-key mask of the keys at sequence positions ``start .. start + length``
        (rows a multiple of the batch: beams; generated keys False). ``start`` > 0 where a
        sliding-window cache layer hands over only its last keys (:func:`~innersight.attention.key_start`)."""
        image = self.image
        if rows % image.shape[0]:
            raise MethodError(f"pai: the model ran {rows} rows but the prepared batch has {image.shape[0]}")
        image = image.repeat_interleave(rows // image.shape[0], dim=0)
        if start + length > image.shape[1]:
            image = torch.cat([image, image.new_zeros(rows, start + length - image.shape[1])], dim=1)
        return image[:, start:start + length].to(device)

    def __call__(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs: Any) -> tuple[Any, Any]:
        out, weights = sdpa_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        rows, heads, _, dim = query.shape
        scale = scaling if scaling is not None else dim ** -0.5
        q = query[:, :, -1:, :].float()  # [B, H, 1, d]
        k = repeat_kv(key, heads).float()  # [B, H, Lk, d]
        z = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, 1, Lk]
        start = key_start(module, int(query.shape[2]), int(key.shape[2]))  # sequence position of key 0
        image = self.keys(rows, key.shape[2], query.device, start)[:, None, None, :]  # [B, 1, 1, Lk]
        # amplify the logits, then mask: an image key the row may not see (outside a sliding window)
        # stays masked (amplifying the mask's finfo.min would make it the largest logit, or inf)
        z = amplify(z, image, self.alpha)
        if attention_mask is not None:
            z = z + additive_mask(attention_mask[:, :, -1:, :], torch.float32)  # the last row's visible keys
        probs = torch.softmax(z, dim=-1)  # [B, H, 1, Lk]
        last = torch.matmul(probs, repeat_kv(value, heads).float()).transpose(1, 2)  # [B, 1, H, d]
        self.calls += 1
        return torch.cat([out[:, :-1], last.to(out.dtype)], dim=1), weights  # [B, Lq, H, d]


@contextlib.contextmanager
def amplified_attention(mllm: Any, batch: Any, config: PAIConfig) -> Iterator[ImageAttention]:
    """PAI's attention in the configured layers inside the block (restored on exit)."""
    adapter = mllm.adapter
    layers = config.layers(adapter.num_layers)
    handler = ImageAttention(batch, config.alpha)
    try:
        context = layer_handlers(mllm.model, adapter.decoder_layers, {i: handler for i in layers})
        context.__enter__()
    except RuntimeError as exc:
        raise MethodError(f"pai cannot share its layers' attention with another attention method ({exc})") from exc
    try:
        yield handler
    finally:
        context.__exit__(None, None, None)


class PAIAttention:
    """The ``pai-attention`` method (attention point): the amplification alone."""

    point = "attention"

    def __init__(self, config: PAIConfig | None = None) -> None:
        self.config = config or PAIConfig()

    def activate(self, mllm: Any, batch: Any) -> Any:
        return amplified_attention(mllm, batch, self.config)


class PAIProcessor(ContrastiveProcessor):
    """PAI's guidance step on a :class:`NegativeBranch` of the image-free prompt; as a context it
    also switches PAI's attention for the call (``contexts``)."""

    def __init__(self, branch: NegativeBranch, *, gamma: float, beta: float, contexts: Any = ()) -> None:
        super().__init__(branch, alpha=0.0, beta=beta, contexts=contexts, name="pai")
        self.gamma = float(gamma)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        negative = self.branch.step_logits(input_ids)  # [B, V]
        self.last_negative = negative
        return guidance(scores, negative, gamma=self.gamma, beta=self.beta).to(scores.dtype)


class PAI:
    """The ``pai`` method (decoding point): amplified image attention + image-free guidance."""

    def __init__(self, config: PAIConfig | None = None) -> None:
        self.config = config or PAIConfig()

    def processors(self, mllm: Any, batch: Any, generation: dict[str, Any]) -> list[Any]:
        check_generation(mllm, generation, "pai")
        require_images(batch, "pai")
        c = self.config
        c.layers(mllm.adapter.num_layers)  # refuse bad layers before generate
        branch = NegativeBranch(mllm.adapter, lambda: image_free_inputs(mllm.adapter, batch), mode=c.branch)
        attention = amplified_attention(mllm, batch, c)
        return [PAIProcessor(branch, gamma=c.gamma, beta=c.beta, contexts=[attention])]
