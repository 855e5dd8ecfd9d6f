"""A linear probe per layer for object existence (DeCo, arXiv 2410.11779, Sec. 3.1).

DeCo trains a linear classifier on each layer's hidden state to tell whether the asked-about
object is in the image, and finds that preceding layers know (~80% accuracy) even where the final
answer hallucinates. This instrument repeats that on yes/no samples (default benchmark
``micro-pope``; POPE works the same):

1. **States.** One forward pass per batch over each prompt; at the last prompt position (the
   position that predicts the answer) the state of every ``hidden_states`` index ``0..L`` is kept
   through :class:`innersight.decode.early_exit.EarlyExit` hooks (index 0 = the embeddings, ``i``
   = the output of decoder block ``i``, 1-based; block ``L``'s output is taken *before* the final
   norm, which is an affine map per sample and changes nothing a linear probe can do except its
   scale). The same forward gives the model's own answer: ``yes`` when the summed probability
   of the *yes* tokens exceeds that of the *no* tokens at the last layer (token sets as in
   :func:`innersight.instruments.early_exit.answer_token_ids`).
2. **Split.** Deterministic and stratified: the indices of each label are permuted with a
   ``torch.Generator`` seeded with ``split_seed``; the first ``ceil(n/2)`` of each label go to
   the training half, the rest to the test half. Each label needs at least two samples.
3. **Probe.** Per layer, logistic regression on standardised features (training-half mean and
   standard deviation; dimensions with zero spread stay zero): ``p(yes) = sigmoid(w.x + b)``,
   loss = mean binary cross-entropy + ``l2 / 2 * ||w||^2``, fitted full-batch with L-BFGS (strong
   Wolfe line search, at most ``max_iter`` iterations) in float64 on the CPU; the bias is not
   regularised. No scikit-learn.
4. **Scores.** Train and test accuracy per layer (prediction ``yes`` when ``p >= 0.5``), the
   best layer, and the model's own answer accuracy on the test half (and on all samples) for
   comparison, all in percent; the figure draws test accuracy against the layer with the model's
   accuracy and the 50 % chance line.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import UserInputError
from .common import Measurement, Sample, batches, check_samples, figure_title, percent, progress
from .early_exit import answer_token_ids, last_position_pass, questions_of, yes_no_label

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass
class ProbeStates:
    """The probe's inputs: last-position states of every layer and the model's own answers."""

    layers: list[int]
    features: torch.Tensor  # [N, n_layers, D] float32, CPU
    labels: torch.Tensor  # [N] bool, True = "yes"
    model_says_yes: torch.Tensor  # [N] bool


def collect_states(mllm: Any, samples: Sequence[Sample], *, template: str = "chat", suffix: str = "",
                   batch_size: int = 8, advance: Any = None) -> ProbeStates:
    """Hidden states ``0..L`` at the last prompt position and the model's yes/no answer of every
    sample (its ``label`` must be ``yes`` or ``no``)."""
    import torch

    adapter = mllm.adapter
    labels = yes_labels(samples)
    yes_ids = answer_token_ids(adapter.tokenizer, "yes")
    no_ids = answer_token_ids(adapter.tokenizer, "no")
    if not yes_ids or not no_ids:
        raise UserInputError("probe: this model's vocabulary has no token for 'yes' or 'no'")
    layers = list(range(adapter.num_layers + 1))
    feats: list[torch.Tensor] = []
    says_yes: list[torch.Tensor] = []
    for chunk in batches(list(samples), batch_size):
        batch = mllm.prepare([s["image"] for s in chunk], questions_of(chunk, suffix), template=template)
        seen = last_position_pass(mllm, batch, layers, logits=False)
        feats.append(seen.hidden)  # [B, L + 1, D]
        probs = torch.softmax(seen.final_logits, dim=-1)  # [B, V]
        p_yes = probs[:, list(yes_ids)].sum(dim=-1)  # [B]
        p_no = probs[:, list(no_ids)].sum(dim=-1)  # [B]
        says_yes.append((p_yes > p_no).cpu())
        if advance is not None:
            advance(len(chunk))
    return ProbeStates(layers, torch.cat(feats), torch.tensor(labels), torch.cat(says_yes))


def yes_labels(samples: Sequence[Sample]) -> list[bool]:
    """Each sample's label as ``True`` (yes) / ``False`` (no); a clear error for any other label."""
    labels = []
    for i, sample in enumerate(samples):
        label = yes_no_label(sample)
        if label is None:
            raise UserInputError(f"probe needs a yes/no 'label' on every sample (existence questions such as "
                                 f"micro-pope or pope); sample {sample.get('id', i)!r} has {sample.get('label')!r}")
        labels.append(label == "yes")
    return labels


def _check_fit(l2: float, max_iter: int) -> None:
    if not (math.isfinite(l2) and l2 >= 0):
        raise UserInputError(f"probe: l2 must be >= 0, got {l2}")
    if isinstance(max_iter, bool) or max_iter < 1:
        raise UserInputError(f"probe: max_iter must be >= 1, got {max_iter}")


def split_halves(labels: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified, seeded train / test indices (see the module docstring), each sorted."""
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    train, test = [], []
    for value in (False, True):
        idx = (labels == value).nonzero().flatten()  # [n_value]
        if idx.numel() < 2:
            raise UserInputError(f"probe needs at least two samples answered {'yes' if value else 'no'} "
                                 f"(one to train, one to test); got {idx.numel()}")
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        cut = math.ceil(idx.numel() / 2)
        train.append(idx[:cut])
        test.append(idx[cut:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


@dataclass
class LinearProbe:
    """A fitted logistic-regression probe on standardised features."""

    mean: torch.Tensor  # [D] float64
    scale: torch.Tensor  # [D] float64 (1 where a dimension has no spread)
    weight: torch.Tensor  # [D] float64
    bias: float

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``w . standardise(x) + b`` for ``x`` [N, D]; returns [N] float64."""
        z = (x.double() - self.mean) / self.scale  # [N, D]
        return z @ self.weight + self.bias

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Percent of ``x`` [N, D] whose prediction (``yes`` when p >= 0.5) equals ``y`` [N] bool."""
        return percent(((self.logits(x) >= 0) == y.bool()).double().mean())


def fit_probe(x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-2, max_iter: int = 200) -> LinearProbe:
    """Logistic regression on standardised ``x`` [N, D] for labels ``y`` [N] bool (see the
    module docstring); deterministic."""
    import torch

    _check_fit(l2, max_iter)
    x64 = x.detach().double().cpu()  # [N, D]
    target = y.detach().double().cpu()  # [N]
    mu = x64.mean(dim=0)  # [D]
    sd = x64.std(dim=0, unbiased=False)  # [D]
    flat = sd <= 1e-12 * max(float(sd.max()) if sd.numel() else 0.0, 1.0)
    sd = torch.where(flat, torch.ones_like(sd), sd)
    z = (x64 - mu) / sd  # [N, D]
    z[:, flat] = 0.0
    weight = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = z @ weight + bias  # [N]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(mu, sd, weight.detach().clone(), float(bias.detach()))


def fit_layer_probes(features: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, test: torch.Tensor, *,
                     l2: float = 1e-2, max_iter: int = 200) -> tuple[list[float], list[float]]:
    """Train and test accuracy (percent) of one probe per layer of ``features`` [N, n_layers, D]."""
    train_acc, test_acc = [], []
    for layer in range(features.shape[1]):
        x = features[:, layer]  # [N, D]
        probe = fit_probe(x[train], labels[train], l2=l2, max_iter=max_iter)
        train_acc.append(probe.accuracy(x[train], labels[train]))
        test_acc.append(probe.accuracy(x[test], labels[test]))
    return train_acc, test_acc


def _draw(numbers: dict[str, Any], model_name: str, n: int) -> Any:
    from .. import viz

    plt = viz.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.6))
    layers = numbers["layers"]
    ax.plot(layers, numbers["test_accuracy"], color="tab:blue", marker="o", markersize=4,
            label=f"probe, test half (n={numbers['n_test']})")
    ax.plot(layers, numbers["train_accuracy"], color="tab:blue", linestyle=":", alpha=0.6,
            label=f"probe, training half (n={numbers['n_train']})")
    ax.axhline(numbers["model_accuracy_test"], color="tab:red", linestyle="--",
               label=f"model's own yes/no answer, test half ({numbers['model_accuracy_test']:.1f} %)")
    ax.axhline(50.0, color="gray", linestyle="-.", label="chance (50 %)")
    ax.set_xlabel("hidden_states index (0 = embeddings, i = output of decoder block i)")
    ax.set_ylabel("accuracy (%): is the asked-about object\nin the image?")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(figure_title("Linear probe per layer for object existence (DeCo)", model_name, n))
    fig.tight_layout()
    return fig


def measure_probe(
    mllm: Any,
    samples: Sequence[Sample],
    *,
    model_name: str = "",
    show_progress: bool = False,
    batch_size: int = 8,
    template: str = "chat",
    suffix: str = "",
    split_seed: int = 0,
    l2: float = 1e-2,
    max_iter: int = 200,
) -> Measurement:
    """Per-layer linear probes for object existence, trained and scored on separate halves.

    Args:
        mllm: the loaded model.
        samples: yes/no existence samples (``image``, ``question``, ``label``).
        model_name: the name shown in the figure and the JSON.
        show_progress: draw a progress bar.
        batch_size: samples per forward pass.
        template: prompt template (``chat`` or ``reference``).
        suffix: text appended to every question.
        split_seed: seed of the stratified train / test split.
        l2: L2 penalty on the probe weights (standardised features).
        max_iter: L-BFGS iterations per probe.
    """
    samples = check_samples(samples, "probe")
    _check_fit(l2, max_iter)
    import torch

    labels = torch.tensor(yes_labels(samples))
    train, test = split_halves(labels, split_seed)  # validated before any forward pass
    with progress(len(samples), "probe states", show_progress) as advance:
        states = collect_states(mllm, samples, template=template, suffix=suffix, batch_size=batch_size,
                                advance=advance)
    train_acc, test_acc = fit_layer_probes(states.features, states.labels, train, test, l2=l2, max_iter=max_iter)
    right = states.model_says_yes == states.labels  # [N]
    best = max(range(len(test_acc)), key=lambda i: (test_acc[i], -i))
    numbers = {
        "summary": {
            "samples": len(samples),
            "best_layer": states.layers[best],
            "best_test_accuracy": test_acc[best],
            "last_layer_test_accuracy": test_acc[-1],
            "model_accuracy_test": percent(right[test].double().mean()),
        },
        "layers": states.layers,
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "model_accuracy_test": percent(right[test].double().mean()),
        "model_accuracy_all": percent(right.double().mean()),
        "n_train": int(train.numel()),
        "n_test": int(test.numel()),
        # accuracy (percent) of always answering the test half's majority label
        "test_majority_accuracy": percent(max(states.labels[test].double().mean(),
                                              1 - states.labels[test].double().mean())),
        "train_ids": [str(samples[i].get("id", i)) for i in train.tolist()],
        "test_ids": [str(samples[i].get("id", i)) for i in test.tolist()],
    }
    result = Measurement("probe", model_name or mllm.name, len(samples), numbers,
                         settings={"batch_size": batch_size, "template": template, "suffix": suffix,
                                   "split_seed": split_seed, "l2": l2, "max_iter": max_iter})
    result.figure = _draw(numbers, result.model, len(samples))
    return result
