"""ViCrop pure-grad: input-gradient importance, architecture-agnostic (arXiv 2502.17422 Sec. 3.2).

G = per-pixel L2 norm over channels of dv/dpixel_values, for the question and the generic
prompt; the map is G(q) / G(q'), masked by a high-pass edge mask of the image at model
resolution (image minus a Gaussian blur with kernel 3 and sigma 0.8, edges padded as the
reference pads them, channel L2 norm, median filter of size 7, keep pixels above the spatial
median), then mean-pooled over patch blocks down to the token grid.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import MethodError
from ..generation_calls import last_logits_kwargs
from .maps import answer_confidence, frozen_parameters

#: ViCrop's high-pass filter: Gaussian blur kernel 3 (sigma 0.8, torchvision's default for that
#: kernel: 0.3 * ((3 - 1) / 2 - 1) + 0.8), median filter size 7 (reference ``high_pass_filter``)
BLUR_SIGMA = 0.8
MEDIAN_SIZE = 7


def blur(pixels: np.ndarray) -> np.ndarray:
    """The reference's low-pass image: a 3x3 Gaussian blur (sigma 0.8) of each channel of a
    [3, H, W] array.

    Edges are padded like the reference (torchvision ``gaussian_blur``, torch ``reflect`` padding:
    ``d c b | a b c d | c b a``, the edge pixel not repeated), which is scipy's ``mirror`` mode,
    not scipy's ``reflect`` (``c b a | a b c d``).
    """
    from scipy import ndimage

    # kernel size 3 = radius 1 = truncate * sigma
    return np.stack([ndimage.gaussian_filter(c, sigma=BLUR_SIGMA, truncate=1.0 / BLUR_SIGMA, mode="mirror")
                     for c in pixels])


def edge_mask(pixels: np.ndarray) -> np.ndarray:
    """Binary high-pass mask of a [3, H, W] image: True where edges are above the median."""
    from scipy import ndimage

    high = np.sqrt(((pixels - blur(pixels)) ** 2).sum(axis=0))  # [H, W]
    # the reference's scipy.ndimage.median_filter with its default mode ("reflect")
    smooth = ndimage.median_filter(high, size=MEDIAN_SIZE, mode="reflect")
    return smooth > np.median(smooth)


def pool_to_grid(values: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Mean-pool an [H, W] array into [rows, cols] equal blocks (H, W divisible)."""
    h, w = values.shape
    if h % rows or w % cols:
        raise MethodError(f"pixel grid {h}x{w} does not divide into {rows}x{cols} patches")
    return values.reshape(rows, h // rows, cols, w // cols).mean(axis=(1, 3))


def pixel_gradients(mllm: Any, batch: Any, n: int, shared_prefix: bool = True) -> torch.Tensor:
    """dv/dpixel_values of every row of ``batch`` (rows ``i`` and ``n + i``: sample ``i``'s
    question and generic prompt), shaped like ``batch.inputs["pixel_values"]``.

    ``shared_prefix``: where the family allows (:func:`innersight.look.prefix.split_prefix`), each
    image and the prompt prefix the two rows share run once (one vision pass, one decoder pass
    with the graph), both suffixes continue from its cache, and the two gradients are two
    backward passes through that one graph (:func:`shared_prefix_pixel_gradients`). Otherwise the
    two rows run as one batch, each with its own copy of the image.
    """
    if shared_prefix:
        grad = shared_prefix_pixel_gradients(mllm, batch, n)
        if grad is not None:
            return grad
    pixel_values = batch.inputs["pixel_values"].detach().clone().requires_grad_(True)
    inputs = {**batch.inputs, "pixel_values": pixel_values}
    with torch.enable_grad(), frozen_parameters(mllm.model):
        # the lm_head at the last position only: v reads nothing else
        logits = mllm.model(**inputs, use_cache=False, **last_logits_kwargs(mllm.model)).logits  # [2n, 1 or L, V]
        (grad,) = torch.autograd.grad(answer_confidence(logits).sum(), [pixel_values])
    return grad.detach()


def shared_prefix_pixel_gradients(mllm: Any, batch: Any, n: int) -> torch.Tensor | None:
    """:func:`pixel_gradients` with each sample's image and shared prefix encoded once; None where
    the split does not apply or the family's image rows do not stack as the joint batch's.

    The prefix pass records the graph from the pixels through the vision tower and every decoder
    layer (the suffixes attend to all of them); the question rows' confidence and the generic
    rows' are differentiated separately (two backward passes through the shared graph: the two
    gradients differ and the prefix is one tensor). The prefix's keys and values are kept,
    detached, for the final answer (:mod:`innersight.look.answer_prefix`).
    """
    from .prefix import answer_keeper, prefix_pass, split_prefix, suffix_pass

    split = split_prefix(mllm, batch, n, 2)
    if split is None or "pixel_values" not in split.image_inputs:
        return None
    full = batch.inputs["pixel_values"]
    pixels = split.image_inputs["pixel_values"].detach().clone().requires_grad_(True)  # the first n samples' rows
    m = pixels.shape[0]
    if (2 * m, *pixels.shape[1:]) != tuple(full.shape) or not (torch.equal(full[:m], pixels.detach())
                                                                and torch.equal(full[m:], full[:m])):
        return None  # the joint batch's image rows are not the prefix's, twice
    model = mllm.model
    last = len(mllm.adapter.decoder_layers) - 1
    with torch.enable_grad(), frozen_parameters(model):
        cache = prefix_pass(mllm, split, last, {**split.image_inputs, "pixel_values": pixels},
                            keeper=answer_keeper(mllm, batch))
        output = suffix_pass(mllm, split, cache, {}, **last_logits_kwargs(model))
        assert output is not None
        value = split.to_joint(answer_confidence(output.logits))  # [2n] questions, then generic rows
        (question,) = torch.autograd.grad(value[:n].sum(), [pixels], retain_graph=True)
        (generic,) = torch.autograd.grad(value[n:].sum(), [pixels])
    return torch.cat([question, generic]).detach()  # like the joint batch's pixel_values


def pure_grad_maps(mllm: Any, images: list[Any], questions: list[str], config: Any,
                   template: str = "chat", generic: list[str] | None = None) -> list[tuple[np.ndarray, Any, dict[str, np.ndarray]]]:
    """(map [rows, cols], view, raw maps) per sample; question and generic prompt in one batch
    (``generic``: one generic prompt per question; None: ``config.generic_instruction``)."""
    adapter = mllm.adapter
    n = len(questions)
    generic = [config.generic_instruction] * n if generic is None else list(generic)
    batch = mllm.prepare(list(images) * 2, list(questions) + generic, template=template)
    grad = pixel_gradients(mllm, batch, n, shared_prefix=config.shared_prefix)
    eps = 0.0 if config.official else config.epsilon
    out = []
    for i in range(n):
        g_q, view = adapter.pixel_view(batch, grad, i)  # [3, H, W]
        g_g, _ = adapter.pixel_view(batch, grad, n + i)
        pix, _ = adapter.pixel_view(batch, batch.inputs["pixel_values"], i)
        norm_q = g_q.float().norm(dim=0).cpu().numpy()  # [H, W]
        norm_g = g_g.float().norm(dim=0).cpu().numpy()
        ratio = norm_q / (norm_g + eps)
        mask = edge_mask(pix.float().cpu().numpy())
        imap = pool_to_grid(ratio * mask, view.rows, view.cols)
        out.append((imap, view, {"grad_question": pool_to_grid(norm_q, view.rows, view.cols),
                                 "grad_generic": pool_to_grid(norm_g, view.rows, view.cols)}))
    return out
