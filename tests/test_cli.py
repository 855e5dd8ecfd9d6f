"""The command line: answers, listings, and one-line errors (never tracebacks) for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from innersight.cli import main
from innersight.testing.cli import run_cli


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (80, 50), "red").save(path)
    return path


def test_list_does_not_import_torch():
    code = (
        "import sys; from innersight.cli import main\n"
        "try:\n    main(['list', '--json'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    families = {m["family"] for m in data["models"]}
    assert {"llava", "llava_next", "instructblip", "qwen2_vl", "qwen2_5_vl"} <= families
    instruments = {i["name"]: i for i in data["instruments"]}
    assert set(instruments) == {"attention-ratio", "size-sensitivity", "early-exit", "probe", "prior-overlap",
                                "outlier-overlap", "sinks"}
    assert instruments["sinks"]["default_benchmark"] == "micro-details"
    assert instruments["probe"]["options"]["split_seed"] == 0 and instruments["probe"]["default_split"] == "random"


def test_list_table(capsys):
    code, out, _ = run_cli("list")
    assert code == 0
    assert "Qwen2.5-VL" in out and "InstructBLIP" in out
    assert "Instruments" in out and "outlier-overlap" in out and "micro-chair" in out and "max_rank=10" in out


def test_answer_plain_and_json(capsys, tiny_dir, image_file):
    model = str(tiny_dir("llava"))
    code, out, err = run_cli("answer", "--model", model, "--image", str(image_file),
                             "--question", "what is the color?", "--max-new-tokens", "3")
    assert code == 0, err
    plain = out.strip()
    code, out, err = run_cli("answer", "--model", model, "--image", str(image_file),
                             "--question", "what is the color?", "--max-new-tokens", "3", "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["text"] == plain
    assert payload["prompt"] == "USER: <image>\nwhat is the color? ASSISTANT:"
    assert payload["methods"] == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "MISSING.png", "--question", "q?"], "MISSING.png"),
        (["--image", "{text}", "--question", "q?"], "not an image"),
        (["--image", "{img}", "--question", "   "], "question is empty"),
        (["--image", "{img}", "--question", "q?", "--method", "no-such-method"], "unknown method"),
        (["--image", "{img}", "--question", "q?", "--dtype", "int3"], "unknown dtype"),
    ],
)
def test_answer_bad_input_is_one_line(capsys, tiny_dir, image_file, tmp_path, args, message):
    text = tmp_path / "notes.txt"
    text.write_text("hello, not an image")
    args = [a.format(img=image_file, text=text) for a in args]
    code, out, err = run_cli("answer", "--model", str(tiny_dir("llava")), *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_answer_bad_model_is_one_line(capsys, image_file, tmp_path):
    code, _, err = run_cli("answer", "--model", str(tmp_path), "--image", str(image_file), "--question", "q?")
    assert code == 2 and "no config.json" in err and len(err.strip().splitlines()) == 1


def test_set_without_method(capsys, tiny_dir, image_file):
    code, _, err = run_cli("answer", "--model", str(tiny_dir("llava")), "--image", str(image_file),
                           "--question", "q?", "--set", "deco.alpha=0.5")
    assert code == 2 and "--set" in err


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "innersight", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "answer" in proc.stdout


def test_explain_writes_a_picture(capsys, tiny_dir, tmp_path):
    from PIL import Image as PILImage

    image = tmp_path / "wide.png"
    PILImage.new("RGB", (300, 200), "white").save(image)
    out = tmp_path / "explain.png"
    code, stdout, err = run_cli("explain", "--model", str(tiny_dir("llava")), "--image", str(image),
                                "--question", "what is the digit?", "--method", "grad-att", "-o", str(out),
                                "--max-new-tokens", "2", "--json")
    assert code == 0, err
    payload = json.loads(stdout)
    assert out.is_file() and PILImage.open(out).size[0] > 600
    x0, y0, x1, y1 = payload["box"]
    assert 0 <= x0 < x1 <= 300 and 0 <= y0 < y1 <= 200


def test_explain_rejects_unknown_map(capsys, tiny_dir, image_file, tmp_path):
    code, _, err = run_cli("explain", "--model", str(tiny_dir("llava")), "--image", str(image_file),
                           "--question", "q?", "--method", "deco", "-o", str(tmp_path / "x.png"))
    assert code == 2 and "rel-att, grad-att or pure-grad" in err


def test_train_micro_passes_its_arguments_to_the_trainer(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train-micro", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: innersight train-micro") and "--vision-steps" in out
    with pytest.raises(SystemExit) as exc:
        main(["train-micro", "--steps", "3"])  # --out is required
    assert exc.value.code == 2
    assert "--out" in capsys.readouterr().err
