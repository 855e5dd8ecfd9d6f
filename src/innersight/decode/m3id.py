"""M3ID: multi-modal mutual-information decoding against the image-free branch.

Favero et al., "Multi-Modal Hallucination Control by Visual Information Grounding", CVPR 2024,
arXiv 2403.14003. The conditioned logits ``l_c`` (prompt with the image) are pushed away from the
unconditioned ones ``l_u`` (the same prompt without the image) by an amount that grows with the
number of generated tokens ``t``, because the model forgets the image as the answer grows
(Sec. 3, the visual-information "forgetting" with rate ``lambda``)::

    gamma_t = exp(-lambda * t)                               # t = 0 at the first new token
    l'      = l_c + (1 - gamma_t) / gamma_t * (l_c - l_u)    # = l_c + (exp(lambda t) - 1)(l_c - l_u)
    l'[l_c < max(l_c) + log(beta)] = -inf                    # adaptive plausibility constraint

``lambda = 0.02`` and ``beta = 0.1`` are the values of the paper's public re-implementations
used as the M3ID baseline (e.g. zifuwan/ONLY ``only_sample.py``: ``gamma_t = exp(-0.02 t)``,
cutoff ``log(0.1)``). ``lambda = 0`` gives ``l' = l_c`` under the cutoff (the top token is always
kept): greedy decoding is unchanged. The image-free branch is :func:`~.image_free.image_free_inputs`
stepped by :class:`~.contrast.NegativeBranch` (batched with the main rows by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MethodError
from .contrast import (
    BRANCH_MODES,
    ContrastiveProcessor,
    NegativeBranch,
    check_generation,
    plausibility_cutoff,
)
from .image_free import image_free_inputs, require_images

SOURCE = "arXiv 2403.14003 (M3ID, CVPR 2024)"


@dataclass(frozen=True)
class M3IDConfig:
    """M3ID settings; defaults are the paper's (via its reference re-implementation)."""

    #: forgetting rate: the contrast weight is exp(lambda * t) - 1 at generated token t
    lam: float = field(default=0.02, metadata={"source": SOURCE + " Sec. 3; zifuwan/ONLY only_sample.py 0.02"})
    #: adaptive plausibility: keep tokens with p_c >= beta * max p_c
    beta: float = field(default=0.1, metadata={"source": "arXiv 2311.16922 Eq. 4 (as in the M3ID baseline code)"})
    #: "batched" (negative rows in the main forward) or "serial" (one extra forward per step)
    branch: str = "batched"

    def __post_init__(self) -> None:
        if not math.isfinite(self.lam) or self.lam < 0:
            raise MethodError(f"m3id lam must be a finite number >= 0, not {self.lam}")
        if not 0 < self.beta <= 1:
            raise MethodError(f"m3id beta must be in (0, 1], not {self.beta}")
        if self.branch not in BRANCH_MODES:
            raise MethodError(f"m3id branch must be one of {', '.join(BRANCH_MODES)}, not {self.branch!r}")


def m3id_weight(step: int, lam: float) -> float:
    """``(1 - gamma_t) / gamma_t`` with ``gamma_t = exp(-lam * t)``."""
    return math.expm1(lam * step)


def m3id_scores(conditioned: torch.Tensor, unconditioned: torch.Tensor, *, step: int, lam: float,
                beta: float) -> torch.Tensor:
    """M3ID's scores [B, V] float32 from ``l_c`` and ``l_u`` [B, V] at generated token ``step``."""
    if conditioned.shape != unconditioned.shape:
        raise MethodError(f"m3id: unconditioned logits {tuple(unconditioned.shape)} do not match "
                          f"{tuple(conditioned.shape)}")
    lc = conditioned.float()  # [B, V]
    lu = unconditioned.to(device=lc.device, dtype=torch.float32)  # [B, V]
    out = lc + m3id_weight(step, lam) * (lc - lu)
    return out.masked_fill(lc < plausibility_cutoff(lc, beta), float("-inf"))


class M3IDProcessor(ContrastiveProcessor):
    """The M3ID step on a :class:`NegativeBranch` of the image-free prompt; ``t`` counts this
    call's steps (0 at the first generated token)."""

    def __init__(self, branch: NegativeBranch, *, lam: float, beta: float) -> None:
        super().__init__(branch, alpha=0.0, beta=beta, name="m3id")
        self.lam = float(lam)
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        negative = self.branch.step_logits(input_ids)  # [B, V]
        self.last_negative = negative
        out = m3id_scores(scores, negative, step=self.step, lam=self.lam, beta=self.beta)
        self.step += 1
        return out.to(scores.dtype)


class M3ID:
    """The ``m3id`` method: a fresh :class:`M3IDProcessor` per generate call."""

    def __init__(self, config: M3IDConfig | None = None) -> None:
        self.config = config or M3IDConfig()

    def processors(self, mllm: Any, batch: Any, generation: dict[str, Any]) -> list[Any]:
        check_generation(mllm, generation, "m3id")
        require_images(batch, "m3id")
        c = self.config
        branch = NegativeBranch(mllm.adapter, lambda: image_free_inputs(mllm.adapter, batch), mode=c.branch)
        return [M3IDProcessor(branch, lam=c.lam, beta=c.beta)]
