"""The image-free negative branch shared by PAI, M3ID and VISTA: the same prompt with every
image's tokens removed (:func:`~.contrast.splice_images` with zero tokens per image), i.e. the
instruction and the answer so far without the picture. It never runs the vision tower and is
shorter than the main prompt, so :class:`~.contrast.NegativeBranch` batches it with the main rows.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import MethodError
from .contrast import NegativeInputs, splice_images


def image_free_inputs(adapter: Any, batch: Any) -> NegativeInputs:
    """``batch``'s prompts with no image tokens (text positions renumbered contiguously)."""
    embed = adapter.language_model.get_input_embeddings()
    width = int(embed.weight.shape[-1])
    empty = torch.zeros(0, width, dtype=embed.weight.dtype, device=embed.weight.device)  # [0, D]
    return splice_images(adapter, batch, [[empty for _ in layouts] for layouts in batch.layouts])


def require_images(batch: Any, name: str) -> None:
    """Refuse a batch without images: an image-free contrast is then the identity by construction."""
    if "pixel_values" not in batch.inputs or not any(batch.layouts):
        raise MethodError(f"{name} needs images: its contrast is with the same prompt without them")
