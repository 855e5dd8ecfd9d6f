"""Faults injected into generation, for the restore-after-an-exception tests."""

from __future__ import annotations

from typing import Any

import torch
from transformers import StoppingCriteria


class RaiseOnStep(StoppingCriteria):
    """A stopping criterion that raises ``RuntimeError`` at its ``step``-th call (1-based), i.e.
    in the middle of ``generate`` once ``step - 1`` tokens have been produced."""

    def __init__(self, step: int = 2) -> None:
        self.step = step
        self.calls = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.step:
            raise RuntimeError("boom mid-generation")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)
