"""Outlier overlap: do the LLM decoder's image tokens follow the ViT's [CLS] outliers? (DAMRO)

Gong et al., "DAMRO: Dive into the Attention Mechanism of LVLM to Reduce Object Hallucination",
EMNLP 2024, arXiv 2410.04514, Sec. 3.2. A ViT carries a few high-norm "outlier" tokens that soak
up the [CLS] attention (the top 3 take over 99% of it); the paper finds the LLM decoder attends to
the same tokens, and more so when it hallucinates. Two numbers per answer (paper Eq. 1-2):

* ``H_i = |S_v(i) ∩ S_l(i)| / i`` for ``i = 1..10``: ``S_v(i)`` the ``i`` image tokens with the
  highest vision-encoder [CLS] attention, ``S_l(i)`` the ``i`` image tokens with the highest LLM
  decoder attention;
* ``F = sum_{j=1..3} ATT(L_v(j)) / sum_{i=0..n-1} ATT(i)``: ``L_v(j)`` the position of the token
  with the ``j``-th highest [CLS] attention, ``ATT(i)`` the decoder attention on image token
  ``i``, ``n`` the number of image tokens: the share of the decoder's image attention that lands
  on the top-3 ViT outliers.

Both are split by hallucinated vs not. The paper captions 1000 COCO images ("What can you see in
this image") with LLaVA-1.5 and judges hallucination with CHAIR, at sentence level (a caption
with any hallucinated object) and at object level (the object words). This instrument works at
the sentence (answer) level: one ``H_i`` curve and one ``F`` per sample. Hallucinated means: for
POPE-style samples (a ``label``) a "yes" to an absent object; for CHAIR-style samples
(``gt_objects``) a description that mentions an object not in the image, both judged by the
project's scorers (POPE's canonical parser; micro-world CHAIR or COCO CHAIR).

Measurements, read during the model's own greedy ``generate`` (no extra forward):

* Vision side: :class:`~innersight.decode.damro.OutlierCapture` (DAMRO's own outlier scoring, at
  the vision layer and head reduction DAMRO uses for the family). Qwen2-VL / Qwen2.5-VL have no
  [CLS]: the scores are DAMRO's documented substitute (mean attention each patch *receives* at
  the last full-attention vision block, pooled per merged 2x2 token), an extension beyond the
  paper; the numbers say so under ``vision_ranking``.
* Decoder side: an :mod:`innersight.attention` handler on every chosen decoder layer computes the
  attention row of the position that produces each answer token (the prefill's last position,
  then every decoding step), averaged over heads; rows are averaged over the chosen layers and
  over the answer's tokens. The paper does not say which decoder layers its maps use (neither the
  spec nor the paper's text names any), so the default is the mean over all layers (``layers``
  option to choose).
* Mapping decoder image tokens to ViT tokens, per family (every fact from the adapter's vision
  facet: the first view's ``token_index``, or ``query_patch_blocks`` where the decoder sees queries):

  - LLaVA-1.5: one LM token per patch (the adapter's ``token_index``);
  - LLaVA-NeXT: the base (global) view's tokens only, since the [CLS] ranking covers the base view
    (the high-resolution tiles and newline tokens are left out of ``n``);
  - Qwen2-VL / Qwen2.5-VL: one LM token per merged token (the substitute ranks merged tokens);
  - InternVL 3 / 3.5: the global (thumbnail) tile's tokens only, one per 2x2 patches (the [CLS]
    ranking, pooled per token, covers that tile; the other tiles are left out of ``n``);
  - SmolVLM: the global frame's tokens only, one per ``s x s`` patches (the substitute ranking,
    pooled per token, covers that frame; the tiles and their markers are left out of ``n``);
  - InstructBLIP (an extension beyond the paper): the decoder sees the Q-Former's 32 queries, not
    patches. A query's attention is passed to the ViT patches through the Q-Former
    cross-attention ``C[q, j]`` (mean over heads and over every cross-attention block, [CLS]
    column dropped, each query's row renormalised over the patches):
    ``ATT(patch j) = sum_q ATT(query q) C[q, j]``.

The default benchmark is ``micro-chair``: the paper's analysis is on free-form descriptions judged
by CHAIR (an object mentioned that is not in the image), and descriptions give the decoder many
answer positions to average, where a POPE answer is one or two tokens. ``--benchmark micro-pope``
(or POPE) runs the yes/no variant. Only the first image of a sample is used.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch

from ..attention import key_start, layer_handlers, row_probabilities, sdpa_forward
from ..decode.damro import DAMROConfig, OutlierCapture, top_outliers
from ..errors import MethodError, UserInputError
from .common import (
    Measurement,
    Sample,
    batches,
    check_samples,
    choose_scorer,
    figure_title,
    generation_length,
    mean,
    progress,
    sample_image,
)

SOURCE = "arXiv 2410.04514 (DAMRO, EMNLP 2024), Sec. 3.2, Eq. 1-2"
#: H_i is reported for i = 1..MAX_RANK (paper Fig. 4)
MAX_RANK = 10
#: F counts the top-F_TOP ViT outliers (paper Eq. 2: the top 3 take > 99% of the [CLS] attention)
F_TOP = 3
ROWS = ("answer", "first")
#: the scorers that say whether an answer hallucinates
JUDGES = ("pope", "chair", "micro-chair")


# ---------------------------------------------------------------------- the paper's two numbers
def overlap_rates(vision: torch.Tensor, decoder: torch.Tensor, max_rank: int = MAX_RANK) -> list[float]:
    """``H_i = |S_v(i) ∩ S_l(i)| / i`` for ``i = 1..min(max_rank, n)`` (arXiv 2410.04514 Eq. 1).

    ``vision`` [n]: the ViT's [CLS] attention (or substitute score) per image token; ``decoder``
    [n]: the LLM decoder's attention on the same tokens. Ties are broken by ``topk``.
    """
    if vision.shape != decoder.shape or vision.dim() != 1:
        raise ValueError(f"vision {tuple(vision.shape)} and decoder {tuple(decoder.shape)} must be equal 1-d shapes")
    n = min(int(max_rank), int(vision.numel()))
    if n < 1:
        return []
    top_v = top_outliers(vision.float()[None], n)[0].tolist()  # [n] descending
    top_l = top_outliers(decoder.float()[None], n)[0].tolist()  # [n]
    return [len(set(top_v[:i]) & set(top_l[:i])) / i for i in range(1, n + 1)]


def outlier_share(vision: torch.Tensor, decoder: torch.Tensor, top: int = F_TOP) -> float:
    """``F``: the share of ``decoder`` [n] attention on the ``top`` tokens of ``vision`` [n]
    (arXiv 2410.04514 Eq. 2); ``nan`` when the decoder paid the image no attention."""
    if vision.shape != decoder.shape or vision.dim() != 1:
        raise ValueError(f"vision {tuple(vision.shape)} and decoder {tuple(decoder.shape)} must be equal 1-d shapes")
    index = top_outliers(vision.float()[None], min(int(top), int(vision.numel())))[0]  # [top]
    total = float(decoder.float().sum())
    return float(decoder.float()[index].sum()) / total if total > 0 else float("nan")


# ---------------------------------------------------------------------- decoder attention capture
class AnswerAttention:
    """Attention rows of the positions that produce the answer tokens, during ``generate``.

    One handler per chosen decoder layer (:func:`innersight.attention.layer_handlers`): each
    forward's last query row (the prefill's last prompt position, then each decoding step's new
    token), fp32, averaged over heads, restricted to the prompt's keys and summed over the
    layers. The attention outputs are SDPA's, untouched. A context manager; the model is restored
    on exit, also after an exception.

    After a ``generate``: ``steps[s]`` [B, L0] is the layer-summed row of forward ``s`` (forward
    ``s`` produces answer token ``s``); :meth:`answer_row` averages them.
    """

    def __init__(self, mllm: Any, batch: Any, layers: Sequence[int]) -> None:
        self.model = mllm.model
        self.adapter = mllm.adapter
        self.layers = tuple(int(i) for i in layers)
        if not self.layers:
            raise MethodError("outlier-overlap needs at least one decoder layer")
        self.prompt_length = int(batch.input_ids.shape[1])
        self.steps: list[torch.Tensor] = []
        self._calls: dict[int, int] = {}
        self._context: contextlib.AbstractContextManager[None] | None = None

    def handler(self, layer: int) -> Any:
        def attend(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs: Any) -> Any:
            out = sdpa_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
            lq = int(query.shape[2])
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            probs = row_probabilities(query, key, attention_mask, scale, slice(lq - 1, lq))  # [B, H, 1, Lk]
            # key column j is sequence position start + j (a sliding-window cache layer hands over
            # only its last keys); the prompt's keys land at their own positions, the others are 0
            start = key_start(module, lq, int(key.shape[2]))
            width = max(0, min(int(key.shape[2]), self.prompt_length - start))
            row = probs.new_zeros(probs.shape[0], self.prompt_length)  # [B, L0]
            row[:, start:start + width] = probs[:, :, 0, :width].mean(dim=1)
            step = self._calls.get(layer, 0)
            self._calls[layer] = step + 1
            if step == len(self.steps):
                self.steps.append(torch.zeros_like(row))
            self.steps[step] += row.to(self.steps[step].device)
            return out

        return attend

    def __enter__(self) -> AnswerAttention:
        if self._context is not None:
            raise RuntimeError("this capture is already active; build one per generate call")
        handlers = {idx: self.handler(idx) for idx in self.layers}
        context = layer_handlers(self.model, self.adapter.decoder_layers, handlers)
        context.__enter__()
        self._context = context
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        context, self._context = self._context, None
        if context is not None:
            context.__exit__(exc_type, exc, tb)

    def answer_row(self, sample: int, n_tokens: int) -> torch.Tensor:
        """Mean over layers and over the first ``max(n_tokens, 1)`` forwards of sample ``sample``'s
        rows: [L0] fp32 (an empty answer keeps the forward that produced its end token)."""
        if not self.steps:
            raise MethodError("outlier-overlap: no decoder attention was captured (did generate run?)")
        count = min(max(int(n_tokens), 1), len(self.steps))
        rows = torch.stack([self.steps[s][sample] for s in range(count)])  # [S, L0]
        return rows.mean(dim=0) / len(self.layers)


@contextlib.contextmanager
def query_patch_maps(adapter: Any) -> Iterator[list[list[torch.Tensor]]]:
    """For families whose language-model image tokens are queries, not grid cells: record every
    block that maps them onto the vision patches (the adapter's
    :attr:`~innersight.adapters.base.Adapter.query_patch_blocks`; InstructBLIP: each Q-Former
    cross-attention, ``record_query_patch_attention``) inside the block; yields one list of
    records per block."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(adapter.record_query_patch_attention(block))
               for block in range(adapter.query_patch_blocks)]


def query_to_patch(records: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """``C`` [N_images, Q, P]: the cross-attention of the latest forward, averaged over blocks,
    each query's row renormalised over the patches (the [CLS] column is already dropped)."""
    if not records or any(not r for r in records):
        raise MethodError("outlier-overlap: the Q-Former cross-attention was not recorded (no image encoded?)")
    maps = torch.stack([r[-1].float() for r in records]).mean(dim=0)  # [N, Q, P]
    return maps / maps.sum(dim=-1, keepdim=True).clamp_min(1e-30)


def patch_attention(adapter: Any, layout: Any, row: torch.Tensor, qmap: torch.Tensor | None) -> torch.Tensor:
    """The decoder's attention ``row`` [L0] on one image as attention per ranked vision token [P]
    (see the module docstring for the mapping of each family): through the query -> patch map
    ``qmap`` [Q, P] where the family's LM image tokens are queries (recorded when the adapter has
    ``query_patch_blocks``), else the first view's tokens in grid order (its ``token_index``)."""
    att = row[layout.positions.to(row.device)]  # [T_img]
    if qmap is not None:
        return att @ qmap.to(att.device)  # [Q] @ [Q, P] -> [P]
    token_index = layout.views[0].token_index
    if token_index is None:
        raise MethodError(f"outlier-overlap: the {adapter.family} image tokens are not grid cells and no "
                          f"query -> patch map was recorded")
    index = torch.tensor(token_index, dtype=torch.long, device=att.device).flatten()  # [P]
    return att[index]


def _layer_relation(adapter: Any, layer: int) -> str:
    """Where vision layer ``layer`` sits relative to the layer the projector reads."""
    below = int(adapter.projector_vision_layer) - int(layer)
    if below == 0:
        return "the layer the projector reads"
    if below > 0:
        return f"{below} below the layer the projector reads"
    return f"{-below} above the layer the projector reads"


def vision_ranking(adapter: Any, reduction: str, layout: Any = None) -> str:
    """One line saying how the vision tokens were ranked for this family (``layout``: an image's
    :class:`~innersight.adapters.base.ImageLayout`, naming the view that is ranked)."""
    layer = int(adapter.outlier_vision_layer)
    where = _layer_relation(adapter, layer)
    views = getattr(layout, "views", ()) or ()
    view = f" ({views[0].name} view)" if len(views) > 1 else ""
    if not adapter.vision_has_cls:
        return (f"no [CLS] in this vision encoder: DAMRO's substitute, mean attention received per patch{view} at "
                f"vision block {layer} ({where}, {reduction}), pooled per language-model image token (an extension "
                f"beyond the paper)")
    return f"[CLS] attention over the patches{view} at vision layer {layer}, {where} ({reduction})"


def decoder_tokens(adapter: Any, layout: Any = None) -> str:
    """One line saying which decoder image tokens ``n`` counts for this family (``layout``: an
    image's :class:`~innersight.adapters.base.ImageLayout`)."""
    if adapter.query_patch_blocks:
        return ("the query tokens the language model sees, mapped to ViT patches through the cross-attention "
                "that reads the patches (mean over heads and blocks): ATT(patch j) = sum_q ATT(q) C[q, j] "
                "(an extension beyond the paper)")
    views = getattr(layout, "views", ()) or ()
    if len(views) > 1:
        return f"the {views[0].name} view's tokens (the other views and separator tokens are left out)"
    if views:
        return f"the image's tokens of its {views[0].name} grid"
    return "the image's tokens"


def parse_layers(text: str, num_layers: int) -> tuple[int, ...]:
    """``"all"`` -> every decoder layer; ``"2,5"`` and ranges ``"4-7"`` -> those layers (checked)."""
    text = str(text).strip().lower()
    if text in ("", "all"):
        return tuple(range(num_layers))
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            chosen = range(int(lo), int(hi) + 1) if sep else [int(part)]
        except ValueError:
            raise UserInputError(f"layers expects 'all', indices like 2,5 or ranges like 4-7; got {text!r}") from None
        out.extend(chosen)
    bad = [i for i in out if not 0 <= i < num_layers]
    if bad or not out:
        raise UserInputError(f"layers {bad or text!r} outside the decoder's 0..{num_layers - 1}")
    return tuple(sorted(set(out)))


# ---------------------------------------------------------------------- the instrument
@dataclass
class SampleOverlap:
    """One sample's numbers."""

    id: str
    answer: str
    hallucinated: bool
    h: list[float]
    f: float
    n_tokens: int
    vision_top: list[int] = field(default_factory=list)
    decoder_top: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "answer": self.answer, "hallucinated": self.hallucinated, "h": self.h, "f": self.f,
                "n_tokens": self.n_tokens, "vision_top": self.vision_top, "decoder_top": self.decoder_top}


def hallucinates(scorer: Any, text: str, sample: Sample) -> bool:
    """Whether ``text`` hallucinates, by the scorer's own row: POPE, a "yes" to an absent object
    (a wrong "no" is a miss, not a hallucination); CHAIR, any mentioned object not in the image."""
    row = scorer.score_one(text, sample)
    if scorer.name == "pope":
        return row["label"] == "no" and row["parsed"] == "yes"
    if scorer.name in ("chair", "micro-chair"):
        return bool(row["hallucinated"])
    raise UserInputError(f"the {scorer.name!r} scorer does not judge hallucination")


def group_curves(rows: Sequence[SampleOverlap], max_rank: int) -> dict[str, Any]:
    """Mean ``H_i`` (over the samples with at least ``i`` tokens) and mean ``F`` per group."""
    groups = {"hallucinated": [r for r in rows if r.hallucinated],
              "not_hallucinated": [r for r in rows if not r.hallucinated], "all": list(rows)}
    h = {name: [mean(r.h[i - 1] for r in members if len(r.h) >= i) for i in range(1, max_rank + 1)]
         for name, members in groups.items()}
    f = {name: mean(r.f for r in members) for name, members in groups.items()}
    counts = {name: len(members) for name, members in groups.items()}
    return {"h_i": h, "f": f, "counts": counts}


def measure_outlier_overlap(mllm: Any, samples: Sequence[Sample], *, model_name: str = "", show_progress: bool = False,
                            batch_size: int = 8, max_new_tokens: int | None = None, layers: str = "all",
                            rows: str = "answer", scorer: str = "auto", max_rank: int = MAX_RANK) -> Measurement:
    """H_i and F (arXiv 2410.04514 Eq. 1-2) per sample, split by hallucinated vs not.

    Args:
        mllm: the model (any of the five families).
        samples: POPE-style (``label``) or CHAIR-style (``gt_objects``) samples with ``image`` and
            ``question``; the first image of each is used.
        batch_size: samples per ``generate`` (left-padded batches).
        max_new_tokens: answer length (None: 48 for descriptions, 8 otherwise).
        layers: decoder layers whose attention is averaged (``all``, ``2,5``, ``4-7``).
        rows: ``answer`` (every answer token's producing position, the paper's sentence level) or
            ``first`` (only the position that produces the first answer token).
        scorer: ``auto`` (from the samples' fields), ``pope``, ``chair`` or ``micro-chair``.
        max_rank: the largest ``i`` of ``H_i``.
    """
    samples = check_samples(samples, "outlier-overlap")
    if rows not in ROWS:
        raise UserInputError(f"outlier-overlap rows must be one of {', '.join(ROWS)}, not {rows!r}")
    if max_rank < 1:
        raise UserInputError(f"outlier-overlap max_rank must be at least 1, not {max_rank}")
    score = choose_scorer(samples, scorer)
    if score.name not in JUDGES:
        raise UserInputError(f"outlier-overlap splits answers by hallucination and needs POPE-style samples (a yes/no "
                             f"'label') or CHAIR-style samples ('gt_objects'); the {score.name!r} scorer judges neither")
    new_tokens = generation_length(score, max_new_tokens)
    adapter = mllm.adapter
    family = adapter.family
    chosen = parse_layers(layers, adapter.num_layers)
    reduction = DAMROConfig().resolved_reduction(family)
    results: list[SampleOverlap] = []
    sizes: list[int] = []
    first_layout: Any = None  # the first sample's image layout (names the ranked view)
    with progress(len(samples), "outlier overlap", show_progress) as advance:
        for chunk in batches(samples, batch_size):
            batch = mllm.prepare([sample_image(s) for s in chunk], [str(s["question"]) for s in chunk])
            with contextlib.ExitStack() as stack:
                capture = stack.enter_context(OutlierCapture(mllm, batch, k=1, reduction=reduction))
                attention = stack.enter_context(AnswerAttention(mllm, batch, chosen))
                records = stack.enter_context(query_patch_maps(adapter)) if adapter.query_patch_blocks else None
                ids = mllm.generate(batch, max_new_tokens=new_tokens)
            qmaps = query_to_patch(records) if records is not None else None  # [N, Q, P]
            if len(capture.scores) != len(chunk):
                raise MethodError(f"outlier-overlap: {len(capture.scores)} images ranked for {len(chunk)} samples")
            for b, sample in enumerate(chunk):
                vision = capture.scores[b].float().cpu()  # [P]
                n_tokens = 1 if rows == "first" else len(ids[b])
                row = attention.answer_row(b, n_tokens).cpu()  # [L0]
                first_layout = batch.layouts[b][0] if first_layout is None else first_layout
                decoder = patch_attention(adapter, batch.layouts[b][0], row, None if qmaps is None else qmaps[b].cpu())
                if decoder.shape != vision.shape:
                    raise MethodError(f"outlier-overlap: {decoder.numel()} decoder tokens but {vision.numel()} "
                                      f"ranked vision tokens for {family}")
                text = mllm.decode(ids[b])
                top = min(max_rank, int(vision.numel()))
                results.append(SampleOverlap(
                    id=str(sample.get("id", len(results))), answer=text, hallucinated=hallucinates(score, text, sample),
                    h=overlap_rates(vision, decoder, max_rank), f=outlier_share(vision, decoder),
                    n_tokens=int(vision.numel()),
                    vision_top=top_outliers(vision[None], top)[0].tolist(),
                    decoder_top=top_outliers(decoder[None], top)[0].tolist()))
                sizes.append(int(vision.numel()))
            advance(len(chunk))
    curves = group_curves(results, max_rank)
    ranking = vision_ranking(adapter, reduction, first_layout)
    numbers = {
        "h_i": curves["h_i"],
        "f": curves["f"],
        "counts": curves["counts"],
        # expected values for random top-i sets / uniform decoder attention, from the mean token count
        "chance": {"h_i": [min(1.0, i / mean(sizes)) for i in range(1, max_rank + 1)],
                   "f": min(F_TOP, mean(sizes)) / mean(sizes)},
        "vision_ranking": ranking,
        "cls": bool(adapter.vision_has_cls),
        "decoder_tokens": decoder_tokens(adapter, first_layout),
        "decoder_layers": list(chosen),
        "rows": rows,
        "scorer": score.key,
        "definition": {"h_i": "|S_v(i) ∩ S_l(i)| / i (Eq. 1)",
                       "f": "sum_{j=1..3} ATT(L_v(j)) / sum_{i<n} ATT(i) (Eq. 2)", "source": SOURCE},
        "per_sample": [r.to_json() for r in results],
    }
    h, f = curves["h_i"], curves["f"]
    last = min(max_rank, max(sizes)) - 1
    numbers["summary"] = {
        "samples hallucinated / not": f"{curves['counts']['hallucinated']} / {curves['counts']['not_hallucinated']}",
        "H_1 hallucinated / not": _pair(h["hallucinated"][0], h["not_hallucinated"][0]),
        f"H_{last + 1} hallucinated / not": _pair(h["hallucinated"][last], h["not_hallucinated"][last]),
        "F hallucinated / not": _pair(f["hallucinated"], f["not_hallucinated"]),
        "vision ranking": "[CLS] attention" if numbers["cls"] else "no [CLS]: received-attention substitute",
    }
    settings = {"batch_size": batch_size, "max_new_tokens": new_tokens, "layers": layers, "rows": rows,
                "scorer": score.key, "max_rank": max_rank}
    result = Measurement("outlier-overlap", model_name or mllm.name, len(results), numbers, settings=settings)
    result.figure = draw(numbers, model_name or mllm.name, len(results), max_rank)
    return result


def _pair(a: float, b: float) -> str:
    def fmt(x: float) -> str:
        return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"

    return f"{fmt(a)} / {fmt(b)}"


def draw(numbers: dict[str, Any], model: str, n: int, max_rank: int) -> Any:
    """H_i vs i for the two groups (with the chance line) and F as bars."""
    from .. import viz

    plt = viz.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.6), gridspec_kw={"width_ratios": [1.6, 1]})
    ranks = list(range(1, max_rank + 1))
    styles = {"hallucinated": ("tab:red", "o", "hallucinated"), "not_hallucinated": ("tab:blue", "s", "not hallucinated")}
    for group, (color, marker, label) in styles.items():
        values = [float("nan") if v is None else v for v in numbers["h_i"][group]]
        left.plot(ranks, values, marker=marker, color=color, label=f"{label} (n = {numbers['counts'][group]})")
    left.plot(ranks, numbers["chance"]["h_i"], linestyle=":", color="gray", label="chance (random top-i sets)")
    left.set_xlabel("i (top-i tokens)")
    left.set_ylabel("H_i = |S_v(i) ∩ S_l(i)| / i")
    left.set_ylim(0, 1.05)
    left.set_xticks(ranks)
    left.set_title("Overlap of ViT outliers and the decoder's top image tokens")
    left.legend(loc="best", fontsize=8)
    groups = list(styles)
    heights = [numbers["f"][g] if numbers["f"][g] is not None and math.isfinite(numbers["f"][g]) else 0.0
               for g in groups]
    bars = right.bar([styles[g][2] for g in groups], heights, color=[styles[g][0] for g in groups])
    for bar, g in zip(bars, groups):
        value = numbers["f"][g]
        text = "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"
        right.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    right.axhline(numbers["chance"]["f"], linestyle=":", color="gray", label="uniform decoder attention")
    right.set_ylabel(f"F: share of decoder image attention\non the top-{F_TOP} ViT outliers")
    right.set_ylim(0, max([*heights, numbers["chance"]["f"]]) * 1.25 or 1.0)
    right.set_title("F by group")
    right.legend(loc="best", fontsize=8)
    fig.suptitle(figure_title("ViT [CLS] outliers vs LLM decoder attention (DAMRO H_i and F)", model, n))
    fig.text(0.01, 0.005, f"vision ranking: {numbers['vision_ranking']}\ndecoder: {numbers['decoder_tokens']}; "
             f"layers {_span(numbers['decoder_layers'])}, mean over heads, rows: {numbers['rows']}",
             fontsize=7, color="dimgray", va="bottom")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def _span(layers: Sequence[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if list(layers) == list(range(layers[0], layers[-1] + 1)) else str(list(layers))
