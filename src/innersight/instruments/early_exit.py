"""What preceding layers know (DeCo, arXiv 2410.11779): early-exit curves and the no-image prior.

Two instruments, the measurements behind DeCo's Sec. 3 ("MLLM can see? Dynamic correction
decoding for hallucination mitigation", ICLR 2025):

``early-exit`` (default benchmark ``micro-pope``)
    One forward pass per batch over each sample's prompt. At every decoder block ``i = 1..L``
    (``hidden_states`` index, 1-based; block ``L`` is the last) the last prompt position's state
    is read as if it were the last layer: ``softmax(lm_head(final_norm(h_i)))`` over the whole
    vocabulary, in float32 (:class:`innersight.decode.early_exit.EarlyExit`, which hooks the
    chosen blocks, keeps only the last position and norms block outputs exactly once, so layer
    ``L`` gives the model's own next-token distribution). Per sample it records the probability
    of

    * the **right** answer's first token: for yes/no samples (a ``label`` of ``yes``/``no``, e.g.
      POPE) the label; for samples with an ``answer`` (e.g. ``micro-details``) that answer;
    * the **hallucinated** token: for yes/no samples the wrong word (``yes`` when the label is
      ``no`` and vice versa, always defined); for ``answer`` samples the model's own final-layer
      prediction when it is wrong (undefined when the model is right).

    A word's "first token" is the set of distinct first tokens of its spellings ``word``,
    ``Word``, ``word`` lower-cased, each with and without a leading space, kept when the token
    decodes to a prefix of the word (so ``Yes``/``yes``/``▁Yes`` all count as *yes*); the
    probability of a word is the sum over that set. The model's answer is **correct** when the
    final layer's top-1 token (over the whole vocabulary) is one of the right tokens. Reported per
    layer: the mean probability of the right / hallucinated token and the share of samples whose
    top-1 token at that layer is a right token, split by correct / wrong final answers; and DeCo's
    observation: the share of wrong answers for which some *preceding* layer ``1..L-1`` ranks a
    right token first although the last layer does not. Samples whose answer has no token in the
    vocabulary are skipped (listed under ``skipped``).

``prior-overlap`` (default benchmark ``micro-chair``)
    Each sample's question (a description prompt) is answered twice, greedily: with the image
    (:meth:`innersight.MLLM.answer_batch`) and without it (:func:`generate_without_image`: the
    same prompt formatted with zero images). Objects are extracted from both answers with the
    benchmark's own parser (``micro``: :func:`innersight.demo.world.parse_description`, as the
    micro-CHAIR scorer; ``chair``: :func:`innersight.eval.scorers.chair.extract_objects` with COCO
    synonyms). A mentioned object that is not in the sample's ``gt_objects`` is hallucinated.
    Counted once per sample and object (distinct objects per answer), the instrument reports how
    many hallucinated objects also appear in the no-image answer (DeCo reports 91% for
    LLaVA-1.5), the same share for correctly mentioned objects as a baseline (a no-image answer
    that lists everything would make the first share meaningless), and the most frequent
    hallucinated objects.

    Text-only path: the module the adapter names
    (:attr:`~innersight.adapters.base.Adapter.text_only_module`). LLaVA-1.5, LLaVA-NeXT, Qwen2-VL
    and Qwen2.5-VL run the whole model with no ``pixel_values`` (their forwards skip the vision
    path; the prompt holds no image token). InstructBLIP's forward requires an image — its
    language model sees images only through the Q-Former queries — so its language model (e.g.
    Vicuna) runs alone on the same prompt without query placeholders. A family whose adapter
    names none is refused with a clear error.

Both leave the model unchanged: hooks are removed when their context exits, also after errors.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import MethodError, UserInputError
from .common import (
    Measurement,
    Sample,
    batches,
    check_samples,
    figure_title,
    is_micro_world,
    mean,
    percent,
    progress,
    require_field,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

SOURCE = "arXiv 2410.11779 (DeCo), Sec. 3"
YES_NO = ("yes", "no")
PARSERS = ("auto", "micro", "chair")


# ====================================================================== shared building blocks
def answer_token_ids(tokenizer: Any, word: str) -> tuple[int, ...]:
    """The distinct first-token ids of ``word``'s spellings (as written, lower case, capitalised;
    each with and without a leading space) whose token decodes to a prefix of the word.

    ``()`` when no spelling starts with a real token (e.g. a word-level tokenizer maps the word
    to its unknown token, which decodes to nothing).
    """
    word = word.strip()
    if not word:
        return ()
    target = word.lower()
    ids: list[int] = []
    for spelling in dict.fromkeys((word, word.lower(), word.capitalize())):
        for text in (spelling, " " + spelling):
            encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not encoded:
                continue
            first = int(encoded[0])
            piece = tokenizer.decode([first], skip_special_tokens=True).strip().lower()
            if piece and target.startswith(piece) and first not in ids:
                ids.append(first)
    return tuple(ids)


def yes_no_label(sample: Sample) -> str | None:
    """``"yes"``/``"no"`` when the sample's ``label`` is one of them (any case), else ``None``."""
    label = sample.get("label")
    if isinstance(label, str) and label.strip().lower() in YES_NO:
        return label.strip().lower()
    return None


def questions_of(samples: Sequence[Sample], suffix: str) -> list[str]:
    """Each sample's question with ``suffix`` appended."""
    return [f"{s['question']}{suffix}" for s in samples]


def _accepts_logits_to_keep(mllm: Any) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (named, or passed on through
    ``**kwargs`` to the language model that ``generate`` steps, as InstructBLIP does)."""
    if "logits_to_keep" in inspect.signature(mllm.model.forward).parameters:
        return True
    inner = mllm.adapter.generation_module
    return inner is not mllm.model and "logits_to_keep" in inspect.signature(inner.forward).parameters


@dataclass
class LastPosition:
    """What one forward pass leaves at the last prompt position of every row.

    ``hidden`` holds the raw states of the requested ``hidden_states`` indices (the last block's
    output *before* the final norm), ``layer_logits`` their early-exit logits (final norm
    applied, ``None`` unless asked for), ``final_logits`` the model's own next-token logits.
    """

    layers: tuple[int, ...]
    hidden: torch.Tensor  # [B, n, D] float32, CPU
    layer_logits: torch.Tensor | None  # [B, n, V] float32, on the LM head's device
    final_logits: torch.Tensor  # [B, V] float32, on the LM head's device


def last_position_pass(mllm: Any, batch: Any, layers: Sequence[int], *, logits: bool = True) -> LastPosition:
    """One forward of ``batch`` with :class:`~innersight.decode.early_exit.EarlyExit` hooks on
    ``layers`` (``hidden_states`` indices); the hooks are gone when this returns."""
    import torch

    from ..decode.early_exit import EarlyExit

    kwargs: dict[str, Any] = {"use_cache": False}
    if _accepts_logits_to_keep(mllm):
        kwargs["logits_to_keep"] = 1
    with torch.inference_mode(), EarlyExit(mllm.adapter, layers) as exit_:
        out = mllm.model(**batch.inputs, **kwargs)
        final = out.logits[:, -1].float()  # [B, V]
        hidden = exit_.hidden().float().cpu()  # [B, n, D]
        layer_logits = exit_.logits() if logits else None  # [B, n, V]
    return LastPosition(tuple(layers), hidden, layer_logits, final)


# ====================================================================== early-exit curves
@dataclass
class ExitCurve:
    """One sample's early-exit readings over layers ``1..L`` (lists of length ``L``)."""

    id: str
    kind: str  # "yes/no" or "answer"
    right: str
    right_tokens: list[str]
    correct: bool
    p_right: list[float]
    right_top1: list[bool]
    hallucinated: str | None = None
    p_hallucinated: list[float] | None = None
    final_top1: str = ""

    @property
    def recoverable(self) -> bool:
        """Wrong at the last layer, but some preceding layer ranks a right token first."""
        return not self.correct and any(self.right_top1[:-1])

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "right": self.right, "right_tokens": self.right_tokens,
                "correct": self.correct, "final_top1": self.final_top1, "hallucinated": self.hallucinated,
                "recoverable": self.recoverable, "p_right": self.p_right, "p_hallucinated": self.p_hallucinated,
                "right_top1_layers": [i + 1 for i, top in enumerate(self.right_top1) if top]}


@dataclass
class _Target:
    """What one sample asks the early-exit readout for."""

    index: int
    kind: str
    right: str
    right_ids: tuple[int, ...]
    wrong: str | None = None
    wrong_ids: tuple[int, ...] = ()


def _targets(tokenizer: Any, samples: Sequence[Sample]) -> tuple[list[_Target], list[str]]:
    """The readable samples' targets and the ids of those skipped (no token for the answer)."""
    targets: list[_Target] = []
    skipped: list[str] = []
    for i, sample in enumerate(samples):
        label = yes_no_label(sample)
        if label is not None:
            wrong = "no" if label == "yes" else "yes"
            target = _Target(i, "yes/no", label, answer_token_ids(tokenizer, label), wrong,
                             answer_token_ids(tokenizer, wrong))
            if not target.wrong_ids:
                target.right_ids = ()
        else:
            answer = sample.get("answer")
            if not isinstance(answer, str) or not answer.strip():
                raise UserInputError(
                    f"early-exit needs a yes/no 'label' (POPE-style) or an 'answer' on every sample; "
                    f"sample {sample.get('id', i)!r} has neither"
                )
            target = _Target(i, "answer", answer.strip(), answer_token_ids(tokenizer, answer))
        if target.right_ids:
            targets.append(target)
        else:
            skipped.append(str(sample.get("id", i)))
    return targets, skipped


def exit_curves(mllm: Any, samples: Sequence[Sample], *, template: str = "chat", suffix: str = "",
                batch_size: int = 8, advance: Callable[[int], None] | None = None) -> tuple[list[ExitCurve], list[str]]:
    """Early-exit readings of every sample (see the module docstring) and the skipped ids."""
    import torch

    adapter = mllm.adapter
    tokenizer = adapter.tokenizer
    depth = adapter.num_layers
    layers = tuple(range(1, depth + 1))
    targets, skipped = _targets(tokenizer, samples)
    curves: list[ExitCurve] = []
    if advance is not None and skipped:
        advance(len(skipped))
    for chunk in batches(targets, batch_size):
        chosen = [samples[t.index] for t in chunk]
        batch = mllm.prepare([s["image"] for s in chosen], questions_of(chosen, suffix), template=template)
        seen = last_position_pass(mllm, batch, layers)
        assert seen.layer_logits is not None
        probs = torch.softmax(seen.layer_logits, dim=-1)  # [B, L, V]
        top1 = probs.argmax(dim=-1).cpu()  # [B, L]
        for b, target in enumerate(chunk):
            right = torch.tensor(target.right_ids, device=probs.device)
            p_right = probs[b][:, right].sum(dim=-1).cpu()  # [L]
            right_top1 = torch.isin(top1[b], right.cpu())  # [L]
            final_top1 = int(top1[b, -1])
            correct = bool(right_top1[-1])
            hallucinated: str | None = None
            p_hall: list[float] | None = None
            if target.kind == "yes/no":
                wrong = torch.tensor(target.wrong_ids, device=probs.device)
                hallucinated = target.wrong
                p_hall = probs[b][:, wrong].sum(dim=-1).cpu().tolist()  # [L]
            elif not correct:
                hallucinated = tokenizer.decode([final_top1])
                p_hall = probs[b][:, final_top1].cpu().tolist()  # [L]
            sample = samples[target.index]
            curves.append(ExitCurve(
                id=str(sample.get("id", target.index)), kind=target.kind, right=target.right,
                right_tokens=[tokenizer.decode([t]) for t in target.right_ids], correct=correct,
                p_right=p_right.tolist(), right_top1=[bool(x) for x in right_top1.tolist()],
                hallucinated=hallucinated, p_hallucinated=p_hall, final_top1=tokenizer.decode([final_top1]),
            ))
        if advance is not None:
            advance(len(chunk))
    return curves, skipped


def _layer_means(rows: Sequence[Sequence[float]], depth: int) -> list[float]:
    return [mean(r[i] for r in rows) for i in range(depth)]


def summarise_curves(curves: Sequence[ExitCurve], depth: int) -> dict[str, Any]:
    """Per-layer means by group (``correct``, ``wrong``, ``all``) and DeCo's observation."""
    groups: dict[str, Any] = {}
    for name, members in (("correct", [c for c in curves if c.correct]),
                          ("wrong", [c for c in curves if not c.correct]), ("all", list(curves))):
        with_hall = [c for c in members if c.p_hallucinated is not None]
        groups[name] = {
            "n": len(members),
            "n_hallucinated": len(with_hall),
            "p_right": _layer_means([c.p_right for c in members], depth),
            "p_hallucinated": _layer_means([c.p_hallucinated for c in with_hall if c.p_hallucinated], depth),
            "right_top1_share": _layer_means([[float(x) for x in c.right_top1] for c in members], depth),
        }
    wrong = [c for c in curves if not c.correct]
    recoverable = [c for c in wrong if c.recoverable]
    first_layers = Counter(next(i + 1 for i, top in enumerate(c.right_top1[:-1]) if top) for c in recoverable)
    p_wrong = groups["wrong"]["p_right"]
    finite = [(p, i + 1) for i, p in enumerate(p_wrong[:-1]) if p == p]
    deco = {
        "wrong": len(wrong),
        "recoverable": len(recoverable),
        "share_of_wrong": len(recoverable) / len(wrong) if wrong else float("nan"),
        "share_of_all": len(recoverable) / len(curves) if curves else float("nan"),
        "first_right_layer_counts": {str(k): v for k, v in sorted(first_layers.items())},
        "peak_right_layer_when_wrong": max(finite)[1] if finite else None,
    }
    return {"layers": list(range(1, depth + 1)), "groups": groups, "deco": deco}


def _draw_curves(summary: dict[str, Any], model_name: str, n: int) -> Any:
    from .. import viz

    plt = viz.pyplot()
    layers = summary["layers"]
    fig, (ax_p, ax_top) = plt.subplots(1, 2, figsize=(12, 4.6))
    colours = {"correct": "tab:green", "wrong": "tab:red"}
    for group in ("correct", "wrong"):
        g = summary["groups"][group]
        if not g["n"]:
            continue
        ax_p.plot(layers, g["p_right"], color=colours[group], linestyle="-", marker="o", markersize=3,
                  label=f"answer {group} (n={g['n']}): right token")
        if g["n_hallucinated"]:
            ax_p.plot(layers, g["p_hallucinated"], color=colours[group], linestyle="--", marker="x", markersize=4,
                      label=f"answer {group} (n={g['n_hallucinated']}): hallucinated token")
        ax_top.plot(layers, [percent(v) for v in g["right_top1_share"]], color=colours[group], marker="o", markersize=3,
                    label=f"answer {group} (n={g['n']})")
    from matplotlib.ticker import MaxNLocator

    highest = max([v for g in summary["groups"].values() for key in ("p_right", "p_hallucinated")
                   for v in g[key] if v == v] or [1.0])
    ax_p.set_ylim(0.0, min(1.02, max(0.05, 1.15 * highest)))
    ax_top.set_ylim(-2, 102)
    for ax in (ax_p, ax_top):
        ax.set_xlabel("decoder layer (block output, 1-based) read through final norm + LM head")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax_p.set_ylabel("mean next-token probability")
    ax_p.set_title("probability of the right (solid) and hallucinated (dashed) token")
    ax_top.set_ylabel("% of samples (early-exit accuracy)")
    deco = summary["deco"]
    share = deco["share_of_wrong"]
    note = f"{100 * share:.0f}%" if share == share else "n/a"
    ax_top.set_title(f"right token ranked first at the layer\n(wrong answers recoverable "
                     f"from a preceding layer: {deco['recoverable']}/{deco['wrong']} = {note})")
    fig.suptitle(figure_title("Early exit: what preceding layers know (DeCo)", model_name, n))
    fig.tight_layout()
    return fig


def measure_early_exit(
    mllm: Any,
    samples: Sequence[Sample],
    *,
    model_name: str = "",
    show_progress: bool = False,
    batch_size: int = 8,
    template: str = "chat",
    suffix: str = "",
) -> Measurement:
    """Layer-wise early-exit curves of the right and the hallucinated token (DeCo, Sec. 3).

    Args:
        mllm: the loaded model.
        samples: benchmark samples with ``image``, ``question`` and a yes/no ``label`` or an
            ``answer``.
        model_name: the name shown in the figure and the JSON.
        show_progress: draw a progress bar.
        batch_size: samples per forward pass.
        template: prompt template (``chat`` or ``reference``).
        suffix: text appended to every question (e.g. LLaVA's
            ``"\\nAnswer the question using a single word or phrase."``).
    """
    samples = check_samples(samples, "early-exit")
    with progress(len(samples), "early exit", show_progress) as advance:
        curves, skipped = exit_curves(mllm, samples, template=template, suffix=suffix, batch_size=batch_size,
                                      advance=advance)
    if not curves:
        raise UserInputError(f"early-exit: no sample's answer is a token of this model's vocabulary "
                             f"(skipped {len(skipped)}: {skipped[:3]})")
    depth = mllm.adapter.num_layers
    summary = summarise_curves(curves, depth)
    deco = summary["deco"]
    numbers = {
        "summary": {
            "samples": len(curves),
            "accuracy": percent(sum(c.correct for c in curves) / len(curves)),  # percent
            "wrong": deco["wrong"],
            "recoverable_share_of_wrong": deco["share_of_wrong"],
            "peak_right_layer_when_wrong": deco["peak_right_layer_when_wrong"],
        },
        **summary,
        "skipped": skipped,
        "samples": [c.to_json() for c in curves],
    }
    result = Measurement("early-exit", model_name or mllm.name, len(curves), numbers,
                         settings={"batch_size": batch_size, "template": template, "suffix": suffix})
    result.figure = _draw_curves(summary, result.model, len(curves))
    return result


# ====================================================================== no-image prior overlap
def text_only_model(mllm: Any) -> Any:
    """The module that generates from a prompt without image, as the adapter names it (see the
    module docstring); a clear error where it names none."""
    module = mllm.adapter.text_only_module
    if module is None:
        raise MethodError(f"prior-overlap: no text-only (no-image) path is known for the "
                          f"{mllm.adapter.family!r} family")
    return module


def _cut(ids: Sequence[int], stop: set[int]) -> list[int]:
    out = []
    for t in ids:
        if t in stop:
            break
        out.append(int(t))
    return out


def generate_without_image(mllm: Any, questions: Sequence[str], *, template: str = "chat",
                           max_new_tokens: int = 64) -> list[str]:
    """Greedy answers to ``questions`` with no image: each prompt formatted for zero images
    (no image token), tokenised as the processor does for text, left-padded, generated by
    :func:`text_only_model`."""
    import torch

    adapter = mllm.adapter
    module = text_only_model(mllm)
    tok = adapter.tokenizer
    prompts = [adapter.format_prompt(q, 0, template) for q in questions]
    enc = tok(prompts, return_tensors="pt", padding=True)
    inputs = {"input_ids": enc["input_ids"].to(adapter.device),  # [B, L]
              "attention_mask": enc["attention_mask"].to(adapter.device)}  # [B, L]
    kwargs = mllm.generation_kwargs(max_new_tokens=max_new_tokens)
    eos = getattr(mllm.model.generation_config, "eos_token_id", None)
    if eos is not None:
        kwargs.setdefault("eos_token_id", eos)
    with torch.inference_mode():
        out = module.generate(**inputs, **kwargs)  # [B, L + new]
    stop = {tok.pad_token_id, tok.eos_token_id} - {None}
    return [mllm.decode(_cut(row, stop)) for row in out[:, inputs["input_ids"].shape[1]:].tolist()]


def describe(mllm: Any, samples: Sequence[Sample], questions: Sequence[str], *, with_image: bool,
             template: str, max_new_tokens: int) -> list[str]:
    """Greedy answers of one batch, with the samples' images or without any image."""
    if with_image:
        answers = mllm.answer_batch([s["image"] for s in samples], list(questions), template=template,
                                    batch_size=max(1, len(samples)), max_new_tokens=max_new_tokens)
        return [a.text for a in answers]
    return generate_without_image(mllm, questions, template=template, max_new_tokens=max_new_tokens)


def choose_parser(samples: Sequence[Sample], parser: str) -> str:
    """``micro`` or ``chair``; ``auto`` picks ``micro`` when every ground-truth object is a micro
    world kind (shape, digit, letter) and at least one sample has one, else ``chair``."""
    if parser not in PARSERS:
        raise UserInputError(f"prior-overlap: parser must be one of {', '.join(PARSERS)}, not {parser!r}")
    if parser != "auto":
        return parser
    return "micro" if is_micro_world(samples) else "chair"


def mentioned_objects(text: str, parser: str) -> list[str]:
    """Objects mentioned in ``text``, in order, one entry per mention."""
    if parser == "micro":
        from ..demo.world import parse_description

        return [kind for _, kind, _ in parse_description(text or "")]
    from ..eval.scorers.chair import extract_objects

    return extract_objects(text or "")


def ground_truth(sample: Sample, parser: str) -> set[str]:
    """The sample's ``gt_objects`` in the parser's names (COCO synonyms -> canonical)."""
    names = [str(o) for o in sample["gt_objects"]]
    if parser == "micro":
        return {n.lower() for n in names}
    from ..eval.scorers.chair import coco_vocabulary

    vocab = coco_vocabulary()
    out = set()
    for name in names:
        try:
            out.add(vocab.canonical(name))
        except ValueError:
            out.add(name.lower())
    return out


def prior_overlap_numbers(samples: Sequence[Sample], with_image: Sequence[str], without_image: Sequence[str],
                          parser: str, top: int = 10) -> dict[str, Any]:
    """The prior-overlap counts from the two answers of every sample (pure; see the module
    docstring). Objects count once per sample (distinct objects per answer)."""
    if not len(samples) == len(with_image) == len(without_image):
        raise ValueError("one answer with and one without the image per sample")
    rows = []
    hall_counts: Counter[str] = Counter()
    hall_in_prior: Counter[str] = Counter()
    totals = {"hallucinated": 0, "hallucinated_in_prior": 0, "correct": 0, "correct_in_prior": 0}
    for i, (sample, text, prior_text) in enumerate(zip(samples, with_image, without_image)):
        truth = ground_truth(sample, parser)
        mentioned = list(dict.fromkeys(mentioned_objects(text, parser)))
        prior = list(dict.fromkeys(mentioned_objects(prior_text, parser)))
        hallucinated = [m for m in mentioned if m not in truth]
        correct = [m for m in mentioned if m in truth]
        in_prior = [m for m in hallucinated if m in prior]
        totals["hallucinated"] += len(hallucinated)
        totals["hallucinated_in_prior"] += len(in_prior)
        totals["correct"] += len(correct)
        totals["correct_in_prior"] += sum(m in prior for m in correct)
        hall_counts.update(hallucinated)
        hall_in_prior.update(in_prior)
        rows.append({"id": str(sample.get("id", i)), "with_image": text, "without_image": prior_text,
                     "mentioned": mentioned, "mentioned_without_image": prior, "hallucinated": hallucinated,
                     "hallucinated_in_prior": in_prior})
    n_h, n_c = totals["hallucinated"], totals["correct"]
    ranked = sorted(hall_counts.items(), key=lambda kv: (-kv[1], kv[0]))[: max(0, top)]
    return {
        "summary": {
            "samples": len(rows),
            "hallucinated_objects": n_h,
            "also_without_image": totals["hallucinated_in_prior"],
            "share_in_prior": totals["hallucinated_in_prior"] / n_h if n_h else float("nan"),
            "correct_share_in_prior": totals["correct_in_prior"] / n_c if n_c else float("nan"),
        },
        "parser": parser,
        "samples_with_hallucination": sum(1 for r in rows if r["hallucinated"]),
        "correct_objects": n_c,
        "correct_also_without_image": totals["correct_in_prior"],
        "top_hallucinated": [{"object": k, "count": v, "also_without_image": hall_in_prior[k]} for k, v in ranked],
        "samples": rows,
    }


def _draw_prior(numbers: dict[str, Any], model_name: str, n: int) -> Any:
    from .. import viz

    plt = viz.pyplot()
    s = numbers["summary"]
    fig, (ax_bar, ax_top) = plt.subplots(1, 2, figsize=(12, 4.6))
    n_h, n_in = s["hallucinated_objects"], s["also_without_image"]
    n_c, n_c_in = numbers["correct_objects"], numbers["correct_also_without_image"]
    inside, outside, totals = [n_in, n_c_in], [n_h - n_in, n_c - n_c_in], [n_h, n_c]
    xs = [0.0, 1.0]
    ax_bar.bar([x - 0.2 for x in xs], inside, width=0.4, color="tab:red", label="also in the no-image answer")
    ax_bar.bar([x + 0.2 for x in xs], outside, width=0.4, color="tab:gray", label="not in the no-image answer")
    for k in range(2):
        for x, value in ((xs[k] - 0.2, inside[k]), (xs[k] + 0.2, outside[k])):
            share = f"\n({100 * value / totals[k]:.0f}%)" if totals[k] else ""
            ax_bar.text(x, value, f"{value}{share}", ha="center", va="bottom", fontsize=8)
    ax_bar.set_xticks(xs, [f"hallucinated objects (n={n_h})", f"correctly named objects (n={n_c})\nbaseline"])
    ax_bar.set_ylim(0, max(1, *inside, *outside) * 1.25)
    ax_bar.set_ylabel("objects (distinct per answer)")
    ax_bar.set_title("objects named with the image: named again without it?")
    ax_bar.legend(fontsize=8)
    top = numbers["top_hallucinated"]
    if top:
        names = [t["object"] for t in top][::-1]
        inside = [t["also_without_image"] for t in top][::-1]
        outside = [t["count"] - t["also_without_image"] for t in top][::-1]
        ax_top.barh(names, inside, color="tab:red", label="also in the no-image answer")
        ax_top.barh(names, outside, left=inside, color="tab:gray", label="not in the no-image answer")
        ax_top.legend(fontsize=8)
    else:
        ax_top.text(0.5, 0.5, "no hallucinated objects", ha="center", va="center", transform=ax_top.transAxes)
        ax_top.set_yticks([])
    ax_top.set_xlabel("times hallucinated")
    ax_top.set_title("most frequent hallucinated objects")
    share = s["share_in_prior"]
    what = f"share {100 * share:.0f}%" if share == share else "no hallucinations"
    fig.suptitle(figure_title(f"No-image prior: hallucinated objects also named without the image ({what})",
                              model_name, n))
    fig.tight_layout()
    return fig


def measure_prior_overlap(
    mllm: Any,
    samples: Sequence[Sample],
    *,
    model_name: str = "",
    show_progress: bool = False,
    batch_size: int = 8,
    template: str = "chat",
    max_new_tokens: int = 64,
    parser: str = "auto",
    top: int = 10,
) -> Measurement:
    """Share of hallucinated objects that the model also names without the image (DeCo, Sec. 3).

    Args:
        mllm: the loaded model.
        samples: benchmark samples with ``image``, ``question`` (a description prompt) and
            ``gt_objects``.
        model_name: the name shown in the figure and the JSON.
        show_progress: draw a progress bar.
        batch_size: samples per generate call.
        template: prompt template (``chat`` or ``reference``).
        max_new_tokens: answer length (DeCo's CHAIR runs use 512).
        parser: ``auto``, ``micro`` or ``chair`` (see :func:`choose_parser`).
        top: how many of the most frequent hallucinated objects to report.
    """
    samples = check_samples(samples, "prior-overlap")
    require_field(samples, "gt_objects", "prior-overlap", "the objects really in the image, e.g. micro-chair or chair")
    if max_new_tokens < 1:
        raise UserInputError("prior-overlap: max_new_tokens must be at least 1")
    chosen = choose_parser(samples, parser)
    text_only_model(mllm)  # refuse an unsupported family before any generation
    with_image: list[str] = []
    without_image: list[str] = []
    with progress(2 * len(samples), "prior overlap", show_progress) as advance:
        for chunk in batches(samples, batch_size):
            qs = [str(s["question"]) for s in chunk]
            with_image.extend(describe(mllm, chunk, qs, with_image=True, template=template,
                                       max_new_tokens=max_new_tokens))
            advance(len(chunk))
            without_image.extend(describe(mllm, chunk, qs, with_image=False, template=template,
                                          max_new_tokens=max_new_tokens))
            advance(len(chunk))
    numbers = prior_overlap_numbers(samples, with_image, without_image, chosen, top)
    result = Measurement("prior-overlap", model_name or mllm.name, len(samples), numbers,
                         settings={"batch_size": batch_size, "template": template, "max_new_tokens": max_new_tokens,
                                   "parser": chosen, "top": top})
    result.figure = _draw_prior(numbers, result.model, len(samples))
    return result
