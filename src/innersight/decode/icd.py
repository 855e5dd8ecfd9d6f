"""ICD: instruction contrastive decoding against a disturbed instruction.

Wang et al., "Mitigating Hallucinations in Large Vision-Language Models with Instruction
Contrastive Decoding", Findings of ACL 2024, arXiv 2403.18715. The negative branch is the same
prompt (same image) whose instruction is prefixed with a *role disturbance*, e.g. "You are a
confused object detector." (Sec. 3.2, Table 1's prefixes); each step contrasts the two with the
shared helper (Eq. 6-7, the VCD form with the adaptive plausibility constraint)::

    l' = (1 + alpha) * l - alpha * l_disturbed,   l < max(l) + log(beta) -> -inf

with ``alpha = 1`` and ``beta = 0.1`` (Sec. 4.1, following VCD).

Where the disturbance goes: right before the instruction, i.e. after each sample's last image
token and the special / whitespace tokens that close it (Qwen's ``<|vision_end|>``, LLaVA's
newline); a sample without images gets it before its first non-special token. The prefix is
tokenised alone (no special tokens). The image tokens of the disturbed prompt are the main
prompt's own input embeddings, captured at the main prefill (the vision tower runs once), with
the decoder injections that prefill carried where a family has them (Qwen3-VL's DeepStack rows,
``adapter.language_model_injections``; the disturbance adds no image token, so they keep their
order).
InstructBLIP's Q-Former also reads the instruction in the paper's setting; here only the language
model's instruction is disturbed (the Q-Former tokens are the main branch's).

The branch runs batched (:class:`~.contrast.NegativeBranch`) although the disturbed prompt is
*longer* than the main prompt: its rows keep their keys and values at their own length (the packed
negative cache; Gemma 3's sliding-window cache layers keep the last ``window - 1`` of their own
positions), so the main cache is untouched. Where the rows cannot be packed (an attention
implementation other than SDPA, an offloaded cache) the padded merge cannot hold them either, and
the branch runs serially (one extra forward per token, the same tokens) with the reason in the
answer's details; ``branch="serial"`` asks for that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch

from ..errors import MethodError
from ..hooks import HookHandles
from .contrast import (
    BRANCH_MODES,
    ContrastiveProcessor,
    NegativeBranch,
    NegativeInputs,
    _left_pad_start,
    check_generation,
    check_strength,
    left_padded,
)

SOURCE = "arXiv 2403.18715 (ICD, Findings of ACL 2024)"
#: the paper's role prefixes (Sec. 3.2); the first is the default
DISTURBANCES = (
    "You are a confused object detector.",
    "You are a confused image caption generator.",
    "You always give wrong answers.",
)


@dataclass(frozen=True)
class ICDConfig:
    """ICD settings; defaults are the paper's."""

    alpha: float = field(default=1.0, metadata={"source": SOURCE + " Sec. 4.1"})
    beta: float = field(default=0.1, metadata={"source": SOURCE + " Sec. 4.1 (adaptive plausibility)"})
    #: the role prefix of the disturbed instruction
    disturbance: str = field(default=DISTURBANCES[0], metadata={"source": SOURCE + " Sec. 3.2"})
    #: "batched" (default: one forward per step for both branches, the disturbed rows packed at
    #: their own length) or "serial" (one extra forward per step)
    branch: str = "batched"

    def __post_init__(self) -> None:
        check_strength("icd", self.alpha, self.beta)
        if not self.disturbance.strip():
            raise MethodError("icd disturbance must be a non-empty instruction prefix")
        if self.branch not in BRANCH_MODES:
            raise MethodError(f"icd branch must be one of {', '.join(BRANCH_MODES)}, not {self.branch!r}")


def insertion_points(adapter: Any, batch: Any) -> list[int]:
    """Per sample, the index (in the padded prompt) where the instruction starts: after the last
    image token and the special / whitespace-only tokens that follow it."""
    ids = batch.input_ids  # [B, L]
    mask = batch.inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    tok = adapter.tokenizer
    special = set(int(i) for i in getattr(tok, "all_special_ids", []))
    points: list[int] = []
    for b in range(ids.shape[0]):
        positions = [int(lay.positions.max()) for lay in batch.layouts[b] if lay.num_tokens]
        at = max(positions) + 1 if positions else _left_pad_start(mask[b])
        while at < ids.shape[1]:
            token = int(ids[b, at])
            if token in special or token == int(adapter.image_token_id) or not tok.decode([token]).strip():
                at += 1
            else:
                break
        points.append(at)
    return points


class PromptEmbeddings:
    """Captures the main prefill's input embeddings [B, L0, D] at the language model (the image
    features already spliced in by the model) and its decoder injections ``injected`` [S, N, D]
    (None for a family without); later forwards are ignored."""

    def __init__(self, adapter: Any, length: int) -> None:
        self.adapter = adapter
        self.length = length
        self.embeds: torch.Tensor | None = None
        self.injected: torch.Tensor | None = None
        self._handles = HookHandles()

    def __enter__(self) -> PromptEmbeddings:
        with self._handles.installing():
            self._handles.add(self.adapter.language_model.register_forward_pre_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._handles.remove()

    def _hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        embeds = kwargs.get("inputs_embeds")
        if self.embeds is None and isinstance(embeds, torch.Tensor) and embeds.shape[1] == self.length:
            self.embeds = embeds.detach()  # [B, L0, D]
            injected = self.adapter.language_model_injections(kwargs)  # [S, N, D] or None
            self.injected = None if injected is None else injected.detach()


def disturbed_inputs(adapter: Any, batch: Any, embeds: torch.Tensor, disturbance: str,
                     injected: torch.Tensor | None = None) -> NegativeInputs:
    """The prompts of ``batch`` with ``disturbance`` inserted before the instruction, embedded from
    the main prompt's embeddings ``embeds`` [B, L0, D], left-padded; ``injected`` [S, N, D] the
    main prompt's decoder injections (kept: no image token moves out of order)."""
    ids = batch.input_ids  # [B, L0]
    mask = batch.inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    embed = adapter.language_model.get_input_embeddings()
    device = embed.weight.device
    extra = torch.tensor(adapter.tokenizer(disturbance, add_special_tokens=False)["input_ids"], dtype=ids.dtype,
                         device=ids.device)  # [T]
    extra_emb = embed(extra.to(device)).to(embeds.dtype)  # [T, D]
    rows_ids, rows_emb = [], []
    for b, at in enumerate(insertion_points(adapter, batch)):
        start = _left_pad_start(mask[b])
        rows_ids.append(torch.cat([ids[b, start:at], extra, ids[b, at:]]))
        rows_emb.append(torch.cat([embeds[b, start:at].to(device), extra_emb, embeds[b, at:].to(device)], dim=0))
    counts = [[lay.num_tokens for lay in layouts] for layouts in batch.layouts]
    return left_padded(adapter, batch, rows_ids, rows_emb, counts, injected=injected)


class ICD:
    """The ``icd`` method: per generate call a fresh contrastive processor whose negative branch is
    the prompt with the disturbed instruction."""

    def __init__(self, config: ICDConfig | None = None) -> None:
        self.config = config or ICDConfig()

    def processors(self, mllm: Any, batch: Any, generation: dict[str, Any]) -> list[Any]:
        check_generation(mllm, generation, "icd")
        c = self.config
        adapter = mllm.adapter
        capture = PromptEmbeddings(adapter, int(batch.input_ids.shape[1]))

        def build() -> NegativeInputs:
            if capture.embeds is None:
                raise MethodError("icd: the main prompt's embeddings were not captured at the prefill")
            return disturbed_inputs(adapter, batch, capture.embeds, c.disturbance, capture.injected)

        branch = NegativeBranch(adapter, build, mode=c.branch)
        return [ContrastiveProcessor(branch, alpha=c.alpha, beta=c.beta, contexts=[capture], name="icd")]
