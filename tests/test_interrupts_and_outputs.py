"""Interrupts, output errors and the Python API's errors for bad input.

* Ctrl-C exits 130 with one line; eval's says where the finished samples are and how to resume,
  and the same command then finishes the run without redoing them.
* An output error in the middle of an eval (disk full) is one line, exit 2, and loses no
  finished rows.
* The API raises the project's own errors with the CLI's messages (device, paths, images,
  questions, unwritable outputs).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from PIL import Image

import innersight
from innersight.errors import ImageError, InnersightError, UserInputError
from innersight.testing.cli import run_cli

EVAL = ["eval", "--benchmark", "micro-details", "--model", "micro", "--limit", "4", "--batch-size", "2",
        "--max-new-tokens", "2", "--json"]


def rows_on_disk(out) -> list[dict]:
    found = []
    for path in out.rglob("samples.rank*.jsonl"):
        found += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return found


def fail_on_second_batch(monkeypatch, error: BaseException) -> None:
    """Make the eval's second batch of predictions raise ``error`` (the first is written)."""
    from innersight.eval import runner

    original = runner._Evaluator.predict
    calls = {"n": 0}

    def predict(self, jobs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise error
        return original(self, jobs)

    monkeypatch.setattr(runner._Evaluator, "predict", predict)


def test_ctrl_c_in_eval_says_how_to_resume(capsys, monkeypatch, tmp_path):
    out = tmp_path / "runs"
    fail_on_second_batch(monkeypatch, KeyboardInterrupt())
    code, _, err = run_cli([*EVAL, "-o", str(out)])
    assert code == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("interrupted: finished samples are kept in ") and "run the same command again" in err
    first = rows_on_disk(out)
    assert len(first) == 2
    monkeypatch.undo()
    code, stdout, err = run_cli([*EVAL, "-o", str(out)])
    assert code == 0, err
    results = json.loads(stdout)
    assert results["counts"]["samples"] == 4 and results["resumed"] is True
    assert len(rows_on_disk(out)) == 4  # the two finished rows were not redone


def test_ctrl_c_elsewhere_is_one_line(capsys, monkeypatch, tmp_path):
    from innersight import loading

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "read_model_type", interrupted)
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), "red").save(image)
    code, _, err = run_cli(["answer", "--model", "micro", "--image", str(image), "--question", "q?"])
    assert code == 130
    assert err.strip().splitlines() == ["interrupted: nothing was kept; run the command again to start over"]


def test_output_error_mid_eval_is_one_line_and_keeps_finished_rows(capsys, monkeypatch, tmp_path):
    out = tmp_path / "runs"
    full = OSError(errno.ENOSPC, "No space left on device", str(out / "x" / "samples.rank0.jsonl"))
    fail_on_second_batch(monkeypatch, full)
    code, _, err = run_cli([*EVAL, "-o", str(out)])
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "No space left on device" in err and "run the same command again" in err
    assert len(rows_on_disk(out)) == 2
    monkeypatch.undo()
    code, stdout, err = run_cli([*EVAL, "-o", str(out)])
    assert code == 0, err
    assert json.loads(stdout)["counts"] == {"samples": 4, "scored": 4, "errors": 0,
                                            "unknown": json.loads(stdout)["counts"]["unknown"]}


def test_eval_max_new_tokens_zero_leaves_no_run_folder(capsys, tmp_path):
    out = tmp_path / "runs"
    code, _, err = run_cli(["eval", "--benchmark", "micro-details", "--model", "micro", "-o", str(out),
                                    "--limit", "2", "--max-new-tokens", "0"])
    assert code == 2 and "--max-new-tokens must be at least 1" in err
    assert not out.exists()


# ---------------------------------------------------------------------- the Python API


@pytest.fixture(scope="module")
def micro():
    return innersight.load("micro", device="cpu")


@pytest.mark.parametrize("device, message", [
    ("tpu", "unknown device 'tpu'; use one of cpu, cuda, cuda:N"),
    ("cuda:99", "device 'cuda:99' requested"),
    ("auto:1", "unknown device"),
    (3, "device must be a string"),
])
def test_load_refuses_bad_devices(device, message):
    with pytest.raises(UserInputError, match=message):
        innersight.load("micro", device=device)


def test_load_without_cuda_says_so(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserInputError, match="CUDA is not available on this machine"):
        innersight.load("micro", device="cuda")


@pytest.mark.parametrize("image, message", [
    (Image.new("RGB", (0, 0)), "image has no pixels"),
    (Image.new("RGB", (5, 0)), "image has no pixels"),
    ("https://example.com/street.jpg", "https://example.com/street.jpg: URLs are not fetched"),
])
def test_api_bad_images(micro, image, message):
    with pytest.raises(ImageError, match=message):
        micro.answer(image, "what is it?", max_new_tokens=1)


def test_api_named_pipe_is_refused_not_read(micro, tmp_path):
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    with pytest.raises(ImageError, match="not a regular file"):  # would block forever if opened
        micro.answer(str(pipe), "what is it?", max_new_tokens=1)


@pytest.mark.parametrize("question, message", [
    (3, "the question must be a string, not int"),
    (None, "the question must be a string, not NoneType"),
    ("  ", "the question is empty"),
])
def test_api_bad_questions(micro, question, message):
    with pytest.raises(UserInputError, match=message):
        micro.answer(Image.new("RGB", (32, 32), "red"), question, max_new_tokens=1)


def test_api_unwritable_outputs(micro, tmp_path):
    from innersight.demo.run import run_demo
    from innersight.eval.runner import evaluate
    from innersight.instruments.common import Measurement, write_files, write_measurement

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(UserInputError, match="which is a file"):
        evaluate(micro, "micro-details", None, "all", output_dir=blocker / "run", limit=1, progress=False)
    with pytest.raises(UserInputError, match="is a file, not a folder"):
        evaluate(micro, "micro-details", None, "all", output_dir=blocker, limit=1, progress=False)
    result = Measurement("sinks", "micro", 0, {})
    with pytest.raises(UserInputError, match="which is a file"):
        write_measurement(result, blocker / "out")
    with pytest.raises(UserInputError, match="cannot write in /proc"):
        write_files(result, Path("/proc/innersight-no-such-dir/x.json"), tmp_path / "x.png")
    with pytest.raises(UserInputError, match="which is a file"):
        run_demo(micro, n=1, methods=("deco",), output=blocker / "demo", progress=False)


def test_api_evaluate_checks_max_new_tokens(micro, tmp_path):
    from innersight.eval.runner import evaluate

    with pytest.raises(UserInputError, match="--max-new-tokens must be a whole number of at least 1"):
        evaluate(micro, "micro-details", None, "all", output_dir=tmp_path / "run", limit=1, progress=False,
                 generation={"max_new_tokens": 0})
    assert not (tmp_path / "run").exists()


def test_api_scorer_variant_names_the_benchmark(micro, tmp_path):
    from innersight.eval.runner import evaluate

    with pytest.raises(InnersightError, match="benchmark 'micro-details' has no variant 'bogus'"):
        evaluate(micro, "micro-details", None, "all", output_dir=tmp_path / "run", limit=1, progress=False,
                 scorer_variant="bogus")


def test_micro_details_runs_are_named_micro_details(micro, tmp_path):
    from innersight.eval.runner import evaluate
    from innersight.instruments.common import choose_scorer, load_samples

    results = evaluate(micro, "micro-details", None, "all", output_dir=tmp_path / "run", limit=1, progress=False,
                       generation={"max_new_tokens": 2})
    assert results["scorer"]["name"] == "micro-details"
    assert "gqa" not in json.dumps(results["scorer"]).lower().replace("gqa's definition", "")
    assert choose_scorer(load_samples("micro-details", None, "all", 2)).key == "micro-details/canonical"
