"""VCD (baseline): visual contrastive decoding against a noised image.

Leng et al., "Mitigating Object Hallucinations in Large Vision-Language Models through Visual
Contrastive Decoding", CVPR 2024, arXiv 2311.16922; reference code DAMO-NLP-SG/VCD. The negative
branch is the same prompt with a distorted image: the processor's (normalised) ``pixel_values``
after ``T`` steps of the forward diffusion process (Sec. 3.2, Eq. 2)::

    x_T = sqrt(abar_T) * x_0 + sqrt(1 - abar_T) * eps,   eps ~ N(0, I)
    betas = sigmoid(linspace(-6, 6, 1000)) * (0.5e-2 - 1e-5) + 1e-5,  abar_T = prod_{t <= T} (1 - beta_t)

(the reference code's schedule; ``T = 500`` as in its scripts; no clamping). Each step contrasts
the two branches with the shared helper: ``cutoff = max(l) + log(beta)`` on the original logits,
``l' = (1 + alpha) l - alpha l_neg``, ``l < cutoff -> -inf`` (Eq. 3-4; ``alpha = 1``,
``beta = 0.1``).

Determinism: the noise of every image is drawn on the CPU from a ``torch.Generator`` seeded with
:attr:`VCDConfig.seed` (the same noise field for every image of a given shape), so a sample's
negative image does not depend on the device, on the global RNG, or on the other samples of its
batch. The noised image goes through the model's own vision path (``get_image_features``) and is
spliced into the embedded prompt (:func:`~.contrast.splice_images`), with the decoder injections
that the same pass computes where a family has them (Qwen3-VL's DeepStack rows of the noised
image: the adapter's ``image_rows``); the negative branch runs batched with the main branch by
default (:class:`~.contrast.NegativeBranch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters.base import ImageRows
from ..errors import MethodError
from .contrast import (
    BRANCH_MODES,
    NEGATIVE_CACHES,
    ContrastiveProcessor,
    NegativeBranch,
    NegativeInputs,
    check_generation,
    check_strength,
    features_per_sample,
    splice_images,
)

SOURCE = "arXiv 2311.16922 (VCD, CVPR 2024)"
CODE = "reference code DAMO-NLP-SG/VCD vcd_utils/vcd_add_noise.py"
#: steps of the reference noise schedule
NOISE_STEPS = 1000


@dataclass(frozen=True)
class VCDConfig:
    """VCD settings; defaults are the paper's."""

    #: contrast strength
    alpha: float = field(default=1.0, metadata={"source": SOURCE + " Sec. 4.1"})
    #: adaptive plausibility: keep tokens with p >= beta * max p
    beta: float = field(default=0.1, metadata={"source": SOURCE + " Sec. 4.1, Eq. 4"})
    #: diffusion step T of the image distortion (0..999)
    noise_step: int = field(default=500, metadata={"source": CODE + "; scripts noise_step=500"})
    #: seed of the noise generator
    seed: int = 0
    #: "batched" (negative rows in the main forward) or "serial" (one extra forward per step)
    branch: str = "batched"
    #: batched branch only: "packed" (the negative rows' keys and values kept at their own length)
    #: or "padded" (left-padded to the main prompt's length; the fallback, kept for comparison)
    negative_cache: str = "packed"

    def __post_init__(self) -> None:
        check_strength("vcd", self.alpha, self.beta)
        if not 0 <= self.noise_step < NOISE_STEPS:
            raise MethodError(f"vcd noise_step must be in 0..{NOISE_STEPS - 1}, not {self.noise_step}")
        if self.branch not in BRANCH_MODES:
            raise MethodError(f"vcd branch must be one of {', '.join(BRANCH_MODES)}, not {self.branch!r}")
        if self.negative_cache not in NEGATIVE_CACHES:
            raise MethodError(f"vcd negative_cache must be one of {', '.join(NEGATIVE_CACHES)}, "
                              f"not {self.negative_cache!r}")


def alpha_bar(step: int) -> float:
    """``prod_{t <= step} (1 - beta_t)`` of the reference schedule (float64)."""
    betas = torch.sigmoid(torch.linspace(-6, 6, NOISE_STEPS, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    return float(torch.cumprod(1 - betas, dim=0)[step])


def diffusion_noise(pixels: torch.Tensor, step: int, seed: int) -> torch.Tensor:
    """``pixels`` after ``step`` forward-diffusion steps, noise from a CPU generator seeded ``seed``."""
    a = alpha_bar(step)
    generator = torch.Generator().manual_seed(int(seed))
    eps = torch.randn(pixels.shape, generator=generator, dtype=torch.float32)  # drawn on the CPU
    noised = math.sqrt(a) * pixels.float() + math.sqrt(1 - a) * eps.to(pixels.device)
    return noised.to(pixels.dtype)


def noised_pixel_values(adapter: Any, batch: Any, step: int, seed: int) -> torch.Tensor:
    """``batch``'s ``pixel_values`` with every image noised independently of the others (each
    image's noise from a generator seeded ``seed``); where each image's pixels lie is the
    adapter's fact (:meth:`~innersight.adapters.base.Adapter.vision_input_index`: a leading row
    ``[N, 3, S, S]`` / ``[N, tiles, 3, S, S]``, or Qwen's flat patch rows)."""
    pixels = batch.inputs["pixel_values"]
    out = pixels.clone()
    num_images = sum(len(sizes) for sizes in batch.image_sizes)
    for i in range(num_images):
        where = adapter.vision_input_index(batch, i)
        out[where] = diffusion_noise(pixels[where], step, seed)
    return out


def image_features(mllm: Any, batch: Any, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """The language-model tokens of every image (flat over the batch) for ``pixel_values``, through
    the model's own vision path (the adapter's
    :meth:`~innersight.adapters.base.Adapter.image_features`): one [n_i, D] tensor per image."""
    return mllm.adapter.image_features(batch, pixel_values)


def image_rows(mllm: Any, batch: Any, pixel_values: torch.Tensor) -> list[ImageRows]:
    """:func:`image_features` with each image's decoder injections from the same pass (the
    adapter's :meth:`~innersight.adapters.base.Adapter.image_rows`): what a prompt built from
    these pixels must carry to be the prompt the model would see."""
    return mllm.adapter.image_rows(batch, pixel_values)


def negative_inputs(mllm: Any, batch: Any, config: VCDConfig) -> NegativeInputs:
    """The same prompts with every image noised (:func:`noised_pixel_values`)."""
    adapter = mllm.adapter
    with torch.no_grad():
        pixels = noised_pixel_values(adapter, batch, config.noise_step, config.seed)
        feats = image_rows(mllm, batch, pixels)
    per_sample = features_per_sample(batch, feats)
    for layouts, row in zip(batch.layouts, per_sample):
        for layout, f in zip(layouts, row):
            if f.num_tokens != layout.num_tokens:
                raise MethodError(f"vcd: a noised image gave {f.num_tokens} tokens, the prompt holds {layout.num_tokens}")
    return splice_images(adapter, batch, per_sample)


class VCD:
    """The ``vcd`` method: per generate call a fresh :class:`~.contrast.ContrastiveProcessor`
    whose negative branch sees every image noised."""

    def __init__(self, config: VCDConfig | None = None) -> None:
        self.config = config or VCDConfig()

    def processors(self, mllm: Any, batch: Any, generation: dict[str, Any]) -> list[Any]:
        check_generation(mllm, generation, "vcd")
        if "pixel_values" not in batch.inputs:
            raise MethodError("vcd needs images: its negative branch is the prompt with a noised image")
        c = self.config
        branch = NegativeBranch(mllm.adapter, lambda: negative_inputs(mllm, batch, c), mode=c.branch, negative_cache=c.negative_cache)
        return [ContrastiveProcessor(branch, alpha=c.alpha, beta=c.beta, name="vcd")]
