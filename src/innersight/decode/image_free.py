"""The image-free negative branch shared by PAI, M3ID and VISTA: the same prompt with every
image removed, i.e. the instruction and the answer so far without the picture. What stands for an
image is the adapter's :meth:`~innersight.adapters.base.Adapter.image_spans` (its tokens, plus the
text tokens a family wraps them in, such as SmolVLM's tile markers); later positions are renumbered
contiguously. It never runs the vision tower and is shorter than the main prompt, so
:class:`~.contrast.NegativeBranch` batches it with the main rows.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import MethodError
from .contrast import NegativeInputs, _left_pad_start, left_padded


def image_free_inputs(adapter: Any, batch: Any) -> NegativeInputs:
    """``batch``'s prompts with every image's span removed (text positions renumbered contiguously)."""
    ids = batch.input_ids  # [B, L0]
    mask = batch.inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    embed = adapter.language_model.get_input_embeddings()
    rows_ids: list[torch.Tensor] = []
    for b in range(len(batch)):
        keep = torch.zeros(ids.shape[1], dtype=torch.bool, device=ids.device)  # [L0]
        keep[_left_pad_start(mask[b]):] = True
        for start, stop in adapter.image_spans(batch, b):
            keep[start:stop] = False
        rows_ids.append(ids[b][keep])  # [n_b]
    rows_emb = [embed(row.to(embed.weight.device)) for row in rows_ids]  # [n_b, D] each
    return left_padded(adapter, batch, rows_ids, rows_emb, [[0 for _ in layouts] for layouts in batch.layouts])


def require_images(batch: Any, name: str) -> None:
    """Refuse a batch without images: an image-free contrast is then the identity by construction."""
    if "pixel_values" not in batch.inputs or not any(batch.layouts):
        raise MethodError(f"{name} needs images: its contrast is with the same prompt without them")
