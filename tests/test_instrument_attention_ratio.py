"""ViCrop's instruments: attention ratio per layer and size sensitivity.

The ratio is checked on hand-built maps (a hand-worked 4x4 case, a planted box, uniform maps, a
pixel-level brute-force oracle for fractional boxes and padded grids), the capture against eager
attention, the whole instrument on planted attention rows with stubbed answers, every family end to
end (model unchanged afterwards), and the command line on the untrained micro model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from innersight.adapters import FAMILIES
from innersight.adapters.geometry import GridView, row_major_index
from innersight.attention import text_attention
from innersight.errors import UserInputError
from innersight.instruments import attention_ratio as AR
from innersight.instruments import get_instrument, write_measurement
from innersight.mllm import Answer


def _view(rows: int, cols: int, region=(0.0, 0.0, 4.0, 4.0)) -> GridView:
    return GridView("base", rows, cols, region, row_major_index(rows, cols))


# ---------------------------------------------------------------------------- the ratio on a grid
def test_ratio_by_hand_on_a_4x4_grid():
    # M[r, c] = 4r + c; the box is column 1, rows 1-2 (cells (1,1) and (2,1)): mass 5 + 9 = 14.
    # References: the 2x1 window at every whole-cell shift that does not overlap the box: columns
    # 0, 2, 3 at rows 0..2 (nine windows) with masses 8a + 4 + 2b -> 36, 48, 54 summed over a,
    # total 138, mean 138 / 9. Ratio = 14 / (138 / 9) = 21 / 23.
    maps = np.arange(16, dtype=float).reshape(4, 4)
    view = _view(4, 4)
    windows = AR.box_windows(view, (1.0, 1.0, 2.0, 3.0), (4, 4))
    assert windows.origin == (1, 1) and windows.kernel.tolist() == [[1.0], [1.0]]
    assert sorted(map(tuple, windows.references.tolist())) == [(a, b) for a in range(3) for b in (0, 2, 3)]
    ratio = AR.attention_ratio(maps, view, (1.0, 1.0, 2.0, 3.0), (4, 4))
    assert ratio == pytest.approx(21 / 23)


def test_planted_attention_on_the_box_gives_a_ratio_far_above_one():
    # 0.9 of the attention on the two box cells, 0.1 spread over the other 14: every reference
    # window holds two non-box cells, so the ratio is 0.9 / (2 * 0.1 / 14) = 63
    maps = np.full((4, 4), 0.1 / 14)
    maps[1, 1] = maps[2, 1] = 0.45
    ratio = AR.attention_ratio(maps, _view(4, 4), (1.0, 1.0, 2.0, 3.0), (4, 4))
    assert ratio == pytest.approx(63.0)


@pytest.mark.parametrize("box", [(1.0, 1.0, 2.0, 3.0), (0.3, 2.2, 1.7, 3.9), (2.5, 0.0, 4.0, 0.5)])
def test_uniform_attention_gives_ratio_one(box):
    layers = np.full((3, 4, 4), 1 / 16)  # three layers at once: [n_layers, rows, cols]
    ratio = AR.attention_ratio(layers, _view(4, 4), box, (4, 4))
    assert ratio.shape == (3,)
    np.testing.assert_allclose(ratio, 1.0, rtol=1e-12)


def _oracle(maps: np.ndarray, region, image_size, box, sx: int, sy: int) -> float:
    """Brute force at pixel level: each cell split into ``sx x sy`` unit pixels carrying
    1 / (sx sy) of its value; the box and every whole-cell shift of it that lies in the visible
    area and does not overlap it summed pixel by pixel (boxes on whole pixels)."""
    rows, cols = maps.shape
    density = np.kron(maps, np.ones((sy, sx))) / (sx * sy)  # [rows * sy, cols * sx]
    rx0, ry0 = region[0], region[1]
    vis = (max(region[0], 0), max(region[1], 0), min(region[2], image_size[0]), min(region[3], image_size[1]))

    def mass(b):
        x0, y0, x1, y1 = (int(round(b[0] - rx0)), int(round(b[1] - ry0)), int(round(b[2] - rx0)),
                          int(round(b[3] - ry0)))
        return density[y0:y1, x0:x1].sum()

    w, h = box[2] - box[0], box[3] - box[1]
    refs = []
    for dr in range(-rows, rows + 1):
        for dc in range(-cols, cols + 1):
            dx, dy = dc * sx, dr * sy
            s = (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)
            if s[0] < vis[0] or s[1] < vis[1] or s[2] > vis[2] or s[3] > vis[3]:
                continue
            if abs(dx) < w and abs(dy) < h:  # overlaps the box
                continue
            refs.append(mass(s))
    return mass(box) / np.mean(refs)


@pytest.mark.parametrize("region,image_size,box", [
    ((0.0, 0.0, 12.0, 12.0), (12, 12), (3.0, 5.0, 8.0, 7.0)),  # fractional cells, whole grid visible
    ((-3.0, 0.0, 9.0, 12.0), (6, 12), (1.0, 2.0, 3.0, 9.0)),  # one padded column at the left, right cut
    ((0.0, -6.0, 12.0, 18.0), (12, 12), (9.0, 1.0, 12.0, 4.0)),  # 3x6 px cells, padding above and below
])
def test_fractional_boxes_and_padding_match_a_pixel_level_oracle(region, image_size, box):
    rng = np.random.default_rng(0)
    rows, cols = 4, 4
    maps = rng.random((rows, cols))
    view = GridView("g", rows, cols, region, row_major_index(rows, cols))
    sx, sy = int((region[2] - region[0]) / cols), int((region[3] - region[1]) / rows)  # pixels per cell
    got = AR.attention_ratio(maps, view, box, image_size)
    assert got == pytest.approx(_oracle(maps, region, image_size, box, sx, sy), rel=1e-10)


def test_undefined_ratios_are_nan_with_a_reason():
    view = _view(4, 4)
    maps = np.ones((4, 4))
    # a box on the padding (region beyond the image) was never shown
    padded = GridView("g", 4, 4, (-2.0, 0.0, 2.0, 4.0), row_major_index(4, 4))
    assert np.isnan(AR.attention_ratio(maps, padded, (-2.0, 0.0, -1.0, 1.0), (2, 4)))
    assert "outside" in AR.skip_reason(padded, (-2.0, 0.0, -1.0, 1.0), (2, 4))
    # a box wider and taller than half the image has no same-sized box elsewhere
    assert np.isnan(AR.attention_ratio(maps, view, (0.5, 0.5, 3.5, 3.5), (4, 4)))
    assert "too large" in AR.skip_reason(view, (0.5, 0.5, 3.5, 3.5), (4, 4))
    assert AR.skip_reason(view, (1.0, 1.0, 2.0, 3.0), (4, 4)) is None
    # zero attention on every reference box
    planted = np.zeros((4, 4))
    planted[1, 1] = 1.0
    assert np.isnan(AR.attention_ratio(planted, view, (1.0, 1.0, 2.0, 2.0), (4, 4)))


# ---------------------------------------------------------------------------- boxes, crops, bins
def test_ground_truth_boxes_box_and_vstar_bbox():
    assert AR.ground_truth_box({"box": [1, 2, 5, 7]}) == (1.0, 2.0, 5.0, 7.0)
    assert AR.ground_truth_box({"bbox": [10, 20, 5, 6]}) == (10.0, 20.0, 15.0, 26.0)  # V*: x, y, w, h
    assert AR.ground_truth_box({"bbox": [[10, 20, 5, 6], [0, 30, 2, 2]]}) == (0.0, 20.0, 15.0, 32.0)
    assert AR.ground_truth_box({"id": "x"}) is None
    with pytest.raises(UserInputError, match="no area"):
        AR.ground_truth_box({"id": "x", "box": [5, 5, 5, 9]})
    with pytest.raises(UserInputError, match="four"):
        AR.ground_truth_box({"id": "x", "box": [1, 2, 3]})
    with pytest.raises(UserInputError, match=r"2 of 3 have none, e.g. 'b'.*micro-details"):
        AR.require_boxes([{"id": "a", "box": [0, 0, 1, 1]}, {"id": "b"}, {"id": "c", "box": None}], "attention-ratio")
    assert AR.relative_size((-10.0, 0.0, 10.0, 10.0), (100, 50)) == pytest.approx(100 / 5000)  # clipped


def test_context_box_by_hand():
    assert AR.context_box((10, 10, 20, 14), (100, 100)) == (5.0, 2.0, 25.0, 22.0)  # side 2 x 10, centred
    assert AR.context_box((0, 0, 10, 10), (100, 100)) == (0.0, 0.0, 20.0, 20.0)  # moved inside
    assert AR.context_box((0, 0, 30, 10), (40, 20)) == (0.0, 0.0, 40.0, 20.0)  # side 60 > image: whole
    assert AR.context_box((10, 10, 12, 12), (100, 100), 2.0, min_side=30) == (0.0, 0.0, 30.0, 30.0)  # side 30
    assert AR.context_box((40, 40, 50, 60), (100, 100), 3.0) == (15.0, 20.0, 75.0, 80.0)


def test_size_bins_quantile_and_log():
    edges, index = AR.size_bins([0.01, 0.02, 0.03, 0.04, 0.05, 0.06], 3)
    np.testing.assert_allclose(edges, [0.01, 0.01 + 0.05 / 3, 0.01 + 0.1 / 3, 0.06])
    assert index.tolist() == [0, 0, 1, 1, 2, 2]
    edges, index = AR.size_bins([0.005, 0.001, 0.1, 0.02], 2, "log")
    np.testing.assert_allclose(edges, [0.001, 0.01, 0.1])
    assert index.tolist() == [0, 0, 1, 1]
    edges, index = AR.size_bins([0.2, 0.2, 0.2], 4)
    assert edges.tolist() == [0.2, 0.2] and index.tolist() == [0, 0, 0]
    with pytest.raises(UserInputError, match="binning"):
        AR.size_bins([0.1, 0.2], 2, "linear")


# ---------------------------------------------------------------------------- the capture
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_layer_attention_equals_eager_attention_at_every_layer(family, tiny_dir, tiny_mllm):
    from transformers import AutoModelForImageTextToText

    mllm = tiny_mllm(family)
    eager = AutoModelForImageTextToText.from_pretrained(str(tiny_dir(family)), attn_implementation="eager").eval()
    images = [_scene(64, 48, 1), _scene(40, 60, 2)]
    batch = mllm.prepare(images, ["what is the colour of the small cat on the left?", "is it red?"])  # padded
    rows = AR.layer_attention(mllm, batch)  # [B, n_layers, L]
    with torch.no_grad():
        out = eager(**batch.inputs, output_attentions=True, use_cache=False)
    expected = torch.stack([a[:, :, -1, :].mean(dim=1) for a in out.attentions], dim=1)  # [B, n_layers, L]
    assert rows.shape == (2, mllm.adapter.num_layers, batch.input_ids.shape[1])
    torch.testing.assert_close(rows, expected.float(), rtol=1e-4, atol=1e-6)
    assert text_attention(mllm.model) == "sdpa"


# ---------------------------------------------------------------------------- planted instrument runs
def _scene(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _stub_answers(monkeypatch, mllm, decide):
    """Replace ``mllm.answer_batch`` (this instance only): ``decide(images, question) -> text``."""
    calls = []

    def answer_batch(images, questions, **kwargs):
        calls.append((list(images), list(questions)))
        return [Answer(text=decide(ims, q), question=q, prompt=q) for ims, q in zip(images, questions)]

    monkeypatch.setattr(mllm, "answer_batch", answer_batch)
    return calls


def test_attention_ratio_planted_rows_and_correct_wrong_split(tiny_mllm, monkeypatch):
    """Tiny LLaVA sees a 64x64 image as a 4x4 grid of 16 px cells; the box covers cells (1,1) and
    (2,1). The planted attention gives each box token ``f * (layer + 1)`` times the weight of every
    other image token, so every reference window holds two non-box tokens and the ratio is exactly
    ``f * (layer + 1)``; samples 0 and 2 are answered right, 1 and 3 wrong."""
    mllm = tiny_mllm("llava")
    factors = [2.0, 5.0, 3.0, 11.0]
    samples = [{"id": f"s{i}", "image": _scene(64, 64, i), "question": f"q{i} what is it?", "answer": f"ans{i}",
                "box": [16, 16, 32, 48]} for i in range(4)]
    n_layers = mllm.adapter.num_layers

    def planted(mllm_, batch):
        rows = torch.full((len(batch), n_layers, batch.input_ids.shape[1]), 0.01)  # text tokens
        for b in range(len(batch)):
            i = next(k for k in range(4) if f"q{k} " in batch.prompts[b])
            layout = batch.layouts[b][0]
            view = layout.views[0]
            assert view.region == (0.0, 0.0, 64.0, 64.0) and (view.rows, view.cols) == (4, 4)
            box_tokens = layout.positions[[view.token_index[1][1], view.token_index[2][1]]]
            for layer in range(n_layers):
                rows[b, layer, layout.positions] = 0.02
                rows[b, layer, box_tokens] = 0.02 * factors[i] * (layer + 1)
        return rows

    monkeypatch.setattr(AR, "layer_attention", planted)
    calls = _stub_answers(monkeypatch, mllm, lambda ims, q: f"ans{q[1]}" if int(q[1]) % 2 == 0 else "wrong")
    result = AR.measure_attention_ratio(mllm, samples, model_name="tiny", batch_size=3)
    nums = result.numbers
    assert [len(c[1]) for c in calls] == [3, 1]  # batched by batch_size
    assert nums["counts"] == {"correct": 2, "wrong": 2, "all": 4, "skipped": 0}
    assert [s["correct"] for s in nums["samples"]] == [True, False, True, False]
    layers = np.arange(1, n_layers + 1)
    np.testing.assert_allclose(nums["ratio"]["correct"], (2.0 + 3.0) / 2 * layers, rtol=1e-5)
    np.testing.assert_allclose(nums["ratio"]["wrong"], (5.0 + 11.0) / 2 * layers, rtol=1e-5)
    np.testing.assert_allclose(nums["ratio"]["all"], (2 + 5 + 3 + 11) / 4 * layers, rtol=1e-5)
    np.testing.assert_allclose(nums["samples"][3]["ratio"], 11.0 * layers, rtol=1e-5)
    assert nums["summary"]["best_layer"] == n_layers - 1
    assert nums["summary"]["best_ratio"] == pytest.approx(21 / 4 * n_layers, rel=1e-4)
    assert nums["summary"]["accuracy"] == 50.0 and nums["scorer"] == "gqa/canonical"
    assert result.figure is not None and "n = 4 samples" in result.figure.axes[0].get_title()
    labels = [t.get_text() for t in result.figure.axes[0].get_legend().get_texts()]
    assert "correct answers (n=2)" in labels and "wrong answers (n=2)" in labels


def test_uniform_attention_rows_give_ratio_one_through_the_instrument(tiny_mllm, monkeypatch):
    mllm = tiny_mllm("llava")
    samples = [{"id": "u", "image": _scene(64, 64, 9), "question": "what?", "answer": "x", "box": [5, 7, 30, 21]}]

    def uniform(mllm_, batch):
        return torch.full((len(batch), mllm.adapter.num_layers, batch.input_ids.shape[1]), 0.5)

    monkeypatch.setattr(AR, "layer_attention", uniform)
    _stub_answers(monkeypatch, mllm, lambda ims, q: "y")
    nums = AR.measure_attention_ratio(mllm, samples).numbers
    np.testing.assert_allclose(nums["ratio"]["wrong"], 1.0, rtol=1e-9)
    assert nums["counts"]["correct"] == 0 and np.isnan(nums["ratio"]["correct"]).all()


def test_size_sensitivity_bins_crops_and_accuracy_by_hand(tiny_mllm, monkeypatch):
    """Six 100x100 samples with boxes of side 4, 6, 10, 14, 30, 40 (relative sizes 0.0016 ...
    0.16), three quantile bins of two. The stub answers right with the crop always, and without it
    only when the box side is at least 10: accuracy per bin 0 / 100 / 100 % without, 100 % with."""
    mllm = tiny_mllm("llava")
    sides = [4, 6, 10, 14, 30, 40]
    samples = [{"id": f"s{i}", "image": _scene(100, 100, i), "question": f"q{i}", "answer": f"ans{i}",
                "box": [20, 30, 20 + s, 30 + s]} for i, s in enumerate(sides)]
    seen_crops = {}

    def decide(ims, q):
        i = int(q[1:])
        if isinstance(ims, list):  # [original, crop]
            assert ims[0] is not None and ims[0].size == (100, 100)
            seen_crops[i] = ims[1].size
            return f"ans{i}"
        return f"ans{i}" if sides[i] >= 10 else "no idea"

    calls = _stub_answers(monkeypatch, mllm, decide)
    result = AR.measure_size_sensitivity(mllm, samples, model_name="tiny", batch_size=4)
    nums = result.numbers
    assert len(calls) == 4  # two chunks, each answered without and with crops
    assert [b["n"] for b in nums["bins"]] == [2, 2, 2]
    assert [b["accuracy"] for b in nums["bins"]] == [0.0, 100.0, 100.0]
    assert [b["accuracy_crop"] for b in nums["bins"]] == [100.0, 100.0, 100.0]
    assert nums["overall"] == {"n": 6, "accuracy": pytest.approx(400 / 6), "accuracy_crop": 100.0}
    assert [s["bin"] for s in nums["samples"]] == [0, 0, 1, 1, 2, 2]
    assert nums["bins"][0]["median_size"] == pytest.approx((16 + 36) / 2 / 10000)
    # crops: squares of twice the box side around the box centre (no clipping needed here)
    assert seen_crops == {i: (2 * s, 2 * s) for i, s in enumerate(sides)}
    assert nums["samples"][5]["crop_box"] == [0, 10, 80, 90]  # box 20..60 x 30..70, centre (40, 50), side 80
    assert nums["summary"]["smallest_bin_accuracy"] == 0.0 and nums["summary"]["smallest_bin_accuracy_crop"] == 100.0
    assert result.figure is not None


def test_instruments_refuse_bad_input(tiny_mllm):
    mllm = tiny_mllm("llava")
    ok = [{"id": "a", "image": _scene(32, 32, 0), "question": "q", "answer": "a", "box": [0, 0, 8, 8]}]
    with pytest.raises(UserInputError, match="ground-truth box"):
        AR.measure_attention_ratio(mllm, [{"id": "b", "image": _scene(32, 32, 0), "question": "q", "answer": "a"}])
    with pytest.raises(UserInputError, match="at least one sample"):
        AR.measure_size_sensitivity(mllm, [])
    with pytest.raises(UserInputError, match="batch_size"):
        AR.measure_attention_ratio(mllm, ok, batch_size=0)
    with pytest.raises(UserInputError, match="context"):
        AR.measure_size_sensitivity(mllm, ok, context=0.5)
    with pytest.raises(UserInputError, match="binning"):
        AR.measure_size_sensitivity(mllm, ok, binning="linear")
    with pytest.raises(UserInputError, match="qformer_block"):
        AR.measure_attention_ratio(tiny_mllm("instructblip"), ok)  # the tiny Q-Former has 2 blocks


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _handler_attrs(model) -> int:
    return sum(1 for m in model.modules() if hasattr(m, "_innersight_attention_handler"))


@pytest.mark.parametrize("family", ["llava", "instructblip"])
def test_model_restored_after_an_exception_inside_the_capture(family, tiny_mllm, monkeypatch):
    """A failure in the last decoder layer during the attention forward leaves no handler, hook or
    attention implementation behind (InstructBLIP also records its Q-Former cross-attention)."""
    mllm = tiny_mllm(family)
    samples = [{"id": "a", "image": _scene(64, 64, 0), "question": "what?", "answer": "x", "box": [0, 0, 16, 16]}]
    _stub_answers(monkeypatch, mllm, lambda ims, q: "x")
    before = _logits(mllm)  # a first forward may install transformers' own (lasting) hooks
    hooks, impl = _hooks(mllm.model), text_attention(mllm.model)
    seen = []

    def boom(module, args):
        seen.append((_handler_attrs(mllm.model), text_attention(mllm.model)))
        raise RuntimeError("boom in the last layer")

    handle = mllm.adapter.decoder_layers[-1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            AR.measure_attention_ratio(mllm, samples, qformer_block=1)
    finally:
        handle.remove()
    assert seen == [(mllm.adapter.num_layers, "innersight")]  # the capture was in place when it failed
    assert _hooks(mllm.model) == hooks and text_attention(mllm.model) == impl and _handler_attrs(mllm.model) == 0
    torch.testing.assert_close(_logits(mllm), before, rtol=0, atol=0)


# ---------------------------------------------------------------------------- every family, end to end
def _logits(mllm):
    batch = mllm.prepare([_scene(64, 48, 3)], ["what is the colour?"])
    with torch.no_grad():
        return mllm.model(**batch.inputs).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_end_to_end_and_model_unchanged(family, tiny_mllm, tmp_path):
    from innersight.instruments.common import load_samples

    mllm = tiny_mllm(family)
    before = _logits(mllm)
    samples = load_samples("micro-details", None, "all", 3)
    extra = {"qformer_block": 1} if family == "instructblip" else {}
    ratio = get_instrument("attention-ratio").function(mllm, samples, model_name=family, batch_size=2,
                                                       max_new_tokens=3, **extra)
    n_layers = mllm.adapter.num_layers
    nums = ratio.numbers
    assert nums["layers"] == list(range(n_layers)) and nums["counts"]["all"] + nums["counts"]["skipped"] == 3
    assert nums["counts"]["correct"] + nums["counts"]["wrong"] == nums["counts"]["all"]
    for s in nums["samples"]:
        assert len(s["ratio"]) == n_layers and all(np.isfinite(s["ratio"])) and min(s["ratio"]) > 0
    size = get_instrument("size-sensitivity").function(mllm, samples, model_name=family, batch_size=2,
                                                       max_new_tokens=3, n_bins=2)
    assert sum(b["n"] for b in size.numbers["bins"]) == 3
    for result in (ratio, size):
        json_path, png_path = write_measurement(result, tmp_path)
        assert json.loads(json_path.read_text())["n_samples"] == 3 and png_path.stat().st_size > 0
    torch.testing.assert_close(_logits(mllm), before, rtol=0, atol=0)
    assert text_attention(mllm.model) == "sdpa"
    record = getattr(mllm.adapter, "qformer_cross_attention_module", None)
    if record is not None:
        assert not record(1)._forward_hooks


# ---------------------------------------------------------------------------- command line
def test_cli_measure_attention_ratio_and_size_sensitivity(tmp_path, capsys):
    from innersight.cli import main
    from innersight.demo import micro

    model_dir = micro.save(*micro.build_untrained(seed=0), tmp_path / "micro")
    for name in ("attention-ratio", "size-sensitivity"):
        out = tmp_path / name
        try:
            main(["measure", name, "--model", str(model_dir), "--limit", "4", "-o", str(out),
                  "--option", "max_new_tokens=4"])
        except SystemExit as exc:
            assert exc.code in (0, None)
        printed = capsys.readouterr().out
        data = json.loads((out / f"{name}.json").read_text())
        assert data["instrument"] == name and data["n_samples"] == 4
        assert data["settings"]["benchmark"] == "micro-details" and data["settings"]["max_new_tokens"] == 4
        assert (out / f"{name}.png").stat().st_size > 0
        assert "numbers:" in printed and "figure:" in printed
    ratio = json.loads((tmp_path / "attention-ratio" / "attention-ratio.json").read_text())
    assert len(ratio["numbers"]["layers"]) == micro.MicroConfig().text_layers
    assert "best_layer" in ratio["numbers"]["summary"]
