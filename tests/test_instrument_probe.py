"""DeCo's per-layer linear probe for object existence (innersight.instruments.probe).

Oracles: hand-built hidden states with the label planted in one dimension of one layer (the
probe finds it at that layer only); the fitted probe is the regularised optimum (zero gradient);
a tiny model whose label is decided by one question word while the image is fixed (the
embedding layer cannot know it: exactly chance; every block after attention can: 100%); the
collected states equal ``output_hidden_states``; the model's own accuracy equals a hand count;
the model is unchanged afterwards; the CLI writes JSON and PNG.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from innersight.adapters import FAMILIES  # noqa: E402
from innersight.errors import UserInputError
from innersight.instruments import get_instrument, write_measurement
from innersight.instruments import probe as pr


def _image(seed: int, w: int = 90, h: int = 60) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _planted_samples(n: int = 16) -> list[dict]:
    """Same image everywhere; the label is decided by the word: 'cat' -> yes, 'dog' -> no."""
    image = _image(0)
    return [{"id": f"s{i:02d}", "image": image, "question": f"is there a {'cat' if i % 2 == 0 else 'dog'} in the image?",
             "label": "yes" if i % 2 == 0 else "no"} for i in range(n)]


def _hooks(mllm) -> list[tuple[int, int]]:
    modules = [*mllm.adapter.decoder_layers, mllm.adapter.final_norm, mllm.adapter.lm_head, mllm.model]
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in modules]


# ---------------------------------------------------------------------------------- split
def test_split_is_stratified_seeded_and_disjoint():
    labels = torch.tensor([True] * 7 + [False] * 5)
    train, test = pr.split_halves(labels, seed=3)
    assert sorted(train.tolist() + test.tolist()) == list(range(12))
    assert int(labels[train].sum()) == 4 and int((~labels[train]).sum()) == 3  # ceil(7/2), ceil(5/2)
    assert int(labels[test].sum()) == 3 and int((~labels[test]).sum()) == 2
    again = pr.split_halves(labels, seed=3)
    assert torch.equal(again[0], train) and torch.equal(again[1], test)
    others = {tuple(pr.split_halves(labels, seed=s)[0].tolist()) for s in range(6)}
    assert len(others) > 1  # the seed matters
    with pytest.raises(UserInputError, match="at least two samples answered no"):
        pr.split_halves(torch.tensor([True, True, False]))


# ---------------------------------------------------------------------------------- probe fitting
def test_planted_dimension_found_at_its_layer_only():
    gen = torch.Generator().manual_seed(0)
    n, layers, dim = 240, 4, 24
    labels = torch.arange(n) % 2 == 0
    features = torch.randn(n, layers, dim, generator=gen) * 3.0 + 5.0  # [N, L, D] noise
    # the label lives in layer 2, dimension 7 (well separated there: +-2 with noise 0.3)
    features[:, 2, 7] = torch.where(labels, 2.0, -2.0) + 0.3 * torch.randn(n, generator=gen)
    train, test = pr.split_halves(labels, seed=0)
    train_acc, test_acc = pr.fit_layer_probes(features, labels, train, test)
    assert test_acc[2] >= 95.0  # percent
    for layer in (0, 1, 3):
        assert abs(test_acc[layer] - 50.0) <= 15.0, (layer, test_acc)
        assert train_acc[layer] > test_acc[layer]  # noise is only memorised, not learned


def test_probe_is_the_regularised_optimum():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(60, 5, generator=gen)  # [N, D]
    x[:, 4] = 2.5  # a constant dimension: no spread, no weight
    y = (x[:, 0] + 0.5 * torch.randn(60, generator=gen)) > 0
    l2 = 0.1
    probe = pr.fit_probe(x, y, l2=l2)
    torch.testing.assert_close(probe.mean, x.double().mean(0))
    assert probe.weight[4] == 0.0
    # zero gradient of mean BCE + l2/2 |w|^2 at the fitted weights (bias unregularised)
    z = (x.double() - probe.mean) / probe.scale
    z[:, 4] = 0.0
    w = probe.weight.clone().requires_grad_(True)
    b = torch.tensor(probe.bias, dtype=torch.float64, requires_grad=True)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y.double()) + 0.5 * l2 * w.square().sum()
    gw, gb = torch.autograd.grad(loss, (w, b))
    assert float(gw.abs().max()) < 1e-6 and abs(float(gb)) < 1e-6
    assert probe.weight[0] > 0  # the informative dimension points at "yes"


def test_probe_logits_and_accuracy_by_hand():
    # standardise with mean 1, scale 2, then w = [1, -1], b = 0.5: logits of the four rows by hand
    probe = pr.LinearProbe(mean=torch.tensor([1.0, 1.0], dtype=torch.float64),
                           scale=torch.tensor([2.0, 2.0], dtype=torch.float64),
                           weight=torch.tensor([1.0, -1.0], dtype=torch.float64), bias=0.5)
    x = torch.tensor([[3.0, 1.0], [1.0, 3.0], [1.0, 1.0], [-3.0, 1.0]])  # z: [1,0], [0,1], [0,0], [-2,0]
    torch.testing.assert_close(probe.logits(x), torch.tensor([1.5, -0.5, 0.5, -1.5], dtype=torch.float64))
    # predictions yes, no, yes, no: three of four labels agree
    assert probe.accuracy(x, torch.tensor([True, False, False, False])) == 75.0  # percent


# ---------------------------------------------------------------------------------- tiny models
@pytest.mark.parametrize("family", FAMILIES)
def test_planted_question_word_on_tiny_models(tiny_mllm, family, tmp_path):
    mllm = tiny_mllm(family)
    samples = _planted_samples()
    depth = mllm.adapter.num_layers
    batch = mllm.prepare([s["image"] for s in samples], [s["question"] for s in samples])
    with torch.no_grad():
        plain = mllm.model(**batch.inputs, output_hidden_states=True)
    hs = mllm.adapter.decoder_hidden_states(plain)
    before_hooks = _hooks(mllm)
    result = get_instrument("probe").function(mllm, samples, model_name=f"tiny-{family}", batch_size=5)
    n = result.numbers
    assert n["layers"] == list(range(depth + 1)) and n["n_train"] == 8 and n["n_test"] == 8
    # the last prompt token's embedding is the same for every sample: exactly chance (balanced test half)
    assert n["test_accuracy"][0] == 50.0
    # after one block the last position has attended to the question word: separable
    assert n["test_accuracy"][1:] == [100.0] * depth and n["train_accuracy"][1:] == [100.0] * depth
    assert n["summary"]["best_layer"] == 1
    # the model's own answer: yes when p(yes) > p(no) at the last position, by hand
    tok = mllm.adapter.tokenizer
    probs = torch.softmax(plain.logits[:, -1].float(), -1)
    says_yes = probs[:, tok.convert_tokens_to_ids("yes")] > probs[:, tok.convert_tokens_to_ids("no")]
    labels = torch.tensor([s["label"] == "yes" for s in samples])
    assert n["model_accuracy_all"] == pytest.approx(100 * float((says_yes == labels).double().mean()))
    test_idx = [int(i[1:]) for i in n["test_ids"]]
    assert n["model_accuracy_test"] == pytest.approx(100 * float((says_yes == labels)[test_idx].double().mean()))
    # the states the probe read are output_hidden_states at the last position (the last before the norm)
    states = pr.collect_states(mllm, samples, batch_size=16)
    for i in range(depth):
        torch.testing.assert_close(states.features[:, i], hs[i][:, -1].float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mllm.adapter.final_norm(states.features[:, depth]), hs[depth][:, -1].float(),
                               rtol=1e-4, atol=1e-5)
    # the model is unchanged
    assert _hooks(mllm) == before_hooks
    with torch.no_grad():
        torch.testing.assert_close(mllm.model(**batch.inputs).logits, plain.logits)
    json_path, png_path = write_measurement(result, tmp_path)
    assert json.loads(json_path.read_text())["numbers"]["test_accuracy"][0] == 50.0
    assert png_path.stat().st_size > 0


def test_probe_input_errors(tiny_mllm):
    mllm = tiny_mllm("llava")
    samples = _planted_samples(4)
    samples[1] = {**samples[1], "label": "maybe"}
    with pytest.raises(UserInputError, match="yes/no 'label'"):
        pr.measure_probe(mllm, samples)
    with pytest.raises(UserInputError, match="at least two samples answered"):
        pr.measure_probe(mllm, _planted_samples(3))  # one 'no' only
    with pytest.raises(UserInputError, match="l2"):
        pr.fit_probe(torch.zeros(4, 2), torch.tensor([True, False, True, False]), l2=-1.0)
    # bad probe settings are refused before any forward pass
    forwards = []
    handle = mllm.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        with pytest.raises(UserInputError, match="max_iter"):
            pr.measure_probe(mllm, _planted_samples(4), max_iter=0)
        with pytest.raises(UserInputError, match="l2"):
            pr.measure_probe(mllm, _planted_samples(4), l2=float("nan"))
    finally:
        handle.remove()
    assert forwards == []


# ---------------------------------------------------------------------------------- CLI
def test_cli_probe_writes_json_and_png(tmp_path, capsys):
    from innersight.cli import main
    from innersight.demo import micro

    model_dir = micro.save(*micro.build_untrained(seed=0), tmp_path / "micro")
    out = tmp_path / "out"
    try:
        main(["measure", "probe", "--model", str(model_dir), "--limit", "4", "-o", str(out)])
    except SystemExit as exc:
        assert not exc.code
    printed = capsys.readouterr().out
    data = json.loads((out / "probe.json").read_text())
    assert data["instrument"] == "probe" and data["n_samples"] == 4
    assert data["numbers"]["n_train"] == 2 and data["numbers"]["n_test"] == 2
    assert len(data["numbers"]["test_accuracy"]) == 5  # embeddings + 4 micro decoder blocks
    assert (out / "probe.png").stat().st_size > 0
    assert "best_layer" in printed
