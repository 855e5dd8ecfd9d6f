"""The evaluation runner on the tiny LLaVA: rows, results, resume after kills, errors, several
processes, the CLI and the report."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from innersight.cli import main
from innersight.errors import InnersightError, MethodError, UserInputError
from innersight.eval.runner import (
    ProcessInfo,
    evaluate,
    read_rows,
    run_name,
    shard,
)
from innersight.testing.cli import run_cli

N = 40  # POPE fixture size (the kill test needs a run that lasts a while)
SHORT = "\nAnswer the question using a single word or phrase."
WORDS = ["dog", "cat", "car", "person", "chair", "cup", "bus", "kite"]
GEN = {"max_new_tokens": 4}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def pope_parse(text: str) -> str:
    """POPE's rule, written out independently: words before the first '.', commas dropped."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def make_pope(root: Path, n: int = N) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        name = f"COCO_val2014_{i:012d}.jpg"
        (root / "val2014").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / "val2014" / name)
        lines.append(json.dumps({"question_id": i + 1, "image": name, "label": ["yes", "no"][i % 2],
                                 "text": f"Is there a {WORDS[i % len(WORDS)]} in the image?"}))
    (root / "coco_pope_random.json").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def pope(tmp_path_factory):
    return make_pope(tmp_path_factory.mktemp("pope"))


@pytest.fixture(scope="module")
def model_dir(tiny_dir):
    return tiny_dir("llava")


@pytest.fixture(scope="module")
def mllm(tiny_mllm, model_dir):
    return tiny_mllm("llava")


def run(mllm, pope, out, **kw):
    args = {"limit": 12, "batch_size": 2, "seed": 0, "generation": GEN, "progress": False, **kw}
    limit, batch_size, seed, generation = args.pop("limit"), args.pop("batch_size"), args.pop("seed"), args.pop("generation")
    return evaluate(mllm, "pope", pope, "random", [], None, out, limit, batch_size, seed, generation, **args)


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def essence(rows: list[dict]) -> list[tuple]:
    """What must not depend on how the run was cut up: no timings, no ranks."""
    return [(r["id"], r["index"], r["prompt"], r["prediction"], r["parsed"], json.dumps(r["score"], sort_keys=True),
             r["error"]) for r in rows]


@pytest.fixture(scope="module")
def reference(mllm, pope, tmp_path_factory):
    """An uninterrupted run: 12 samples, batches of 2."""
    out = tmp_path_factory.mktemp("ref") / "run"
    return out, run(mllm, pope, out)


# ---------------------------------------------------------------------- one run


def test_rows_and_results_of_a_run(mllm, pope, reference):
    out, results = reference
    rows = rows_of(out)
    questions = [f"Is there a {WORDS[i % len(WORDS)]} in the image?" for i in range(12)]
    assert [r["id"] for r in rows] == [str(i + 1) for i in range(12)]
    assert [r["prompt"] for r in rows] == [f"USER: <image>\n{q}{SHORT} ASSISTANT:" for q in questions]
    assert len({r["prediction"] for r in rows}) > 1  # the random model answers differently per image
    for i in (0, 5):  # the runner asks exactly what a user would ask one at a time
        alone = mllm.answer(str(pope / "val2014" / f"COCO_val2014_{i:012d}.jpg"), questions[i] + SHORT, **GEN)
        assert rows[i]["prediction"] == alone.text
    labels = [["yes", "no"][i % 2] for i in range(12)]
    for row, label in zip(rows, labels):
        assert row["parsed"] == pope_parse(row["prediction"])
        assert row["score"] == {"label": label, "parsed": row["parsed"], "correct": row["parsed"] == label}
        assert row["error"] is None and row["seconds"] > 0
    correct = sum(pope_parse(r["prediction"]) == lab for r, lab in zip(rows, labels))
    assert results["metrics"]["accuracy"] == pytest.approx(100 * correct / 12)
    assert results["main_metric"]["name"] == "accuracy"
    assert results["counts"] == {"samples": 12, "scored": 12, "errors": 0, "unknown": 0}
    assert (results["benchmark"], results["split"]) == ("pope", "random")
    assert results["scorer"]["name"] == "pope" and results["scorer"]["variant"] == "canonical"
    assert results["model"] == mllm.name and results["methods"] == [] and results["method_configs"] == {}
    assert results["generation"] == {"max_new_tokens": 4} and results["seed"] == 0
    import torch
    import transformers

    assert results["versions"]["torch"] == torch.__version__
    assert results["versions"]["transformers"] == transformers.__version__
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    if head.returncode == 0:
        assert results["git"]["commit"] == head.stdout.strip()
    assert results["seconds_per_sample"] == pytest.approx(sum(r["seconds"] for r in rows) / 12)
    assert json.loads((out / "results.json").read_text()) == results


def test_method_configs_are_recorded(mllm, pope, tmp_path):
    from innersight.methods import resolve_methods

    results = evaluate(mllm, "pope", pope, "random", ["deco"], {"deco": {"alpha": "0.4"}}, tmp_path, 2, 2, 0, GEN,
                       progress=False)
    expected = resolve_methods(["deco"], {"deco": {"alpha": "0.4"}}).configs()
    assert results["methods"] == ["deco"]
    assert results["method_configs"] == json.loads(json.dumps(expected))
    assert results["method_configs"]["deco"]["alpha"] == 0.4
    assert results["settings"] == {"deco": {"alpha": "0.4"}}


# ---------------------------------------------------------------------- resume


class Stop(Exception):
    pass


def test_resume_after_a_stop_equals_an_uninterrupted_run(mllm, pope, reference, tmp_path):
    seen: list[str] = []

    def stop_after_four(rows):
        seen.extend(r["id"] for r in rows)
        if len(seen) >= 4:
            raise Stop

    with pytest.raises(Stop):
        run(mllm, pope, tmp_path, after_batch=stop_after_four)
    assert len(read_rows(tmp_path / "samples.rank0.jsonl")[0]) == 4
    assert not (tmp_path / "results.json").exists()
    again: list[str] = []
    results = run(mllm, pope, tmp_path, after_batch=lambda rows: again.extend(r["id"] for r in rows))
    assert again == [str(i) for i in range(5, 13)]  # only the samples without a row
    lines = (tmp_path / "samples.rank0.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["id"] for x in lines) == sorted(str(i) for i in range(1, 13))  # none twice
    assert essence(rows_of(tmp_path)) == essence(rows_of(reference[0]))
    assert results["metrics"] == reference[1]["metrics"] and results["counts"] == reference[1]["counts"]
    assert results["resumed"] is True


def test_a_torn_last_line_is_dropped_and_redone(mllm, pope, reference, tmp_path):
    ref_dir = reference[0]
    shutil.copy(ref_dir / "config.json", tmp_path / "config.json")
    lines = (ref_dir / "samples.rank0.jsonl").read_bytes().splitlines(keepends=True)
    torn = lines[3][:25]  # killed in the middle of writing row 4
    (tmp_path / "samples.rank0.jsonl").write_bytes(b"".join(lines[:3]) + torn)
    rows, valid, was_torn = read_rows(tmp_path / "samples.rank0.jsonl")
    assert [r["id"] for r in rows] == ["1", "2", "3"] and was_torn and valid == len(b"".join(lines[:3]))
    results = run(mllm, pope, tmp_path)
    data = (tmp_path / "samples.rank0.jsonl").read_bytes()
    assert all(line.count(b'{"id": ') == 1 for line in data.splitlines())  # the fragment was cut away
    assert sorted(json.loads(x)["id"] for x in data.splitlines()) == sorted(str(i) for i in range(1, 13))
    assert essence(rows_of(tmp_path)) == essence(rows_of(ref_dir))
    assert results["metrics"] == reference[1]["metrics"]


def test_a_damaged_middle_line_is_reported(tmp_path):
    path = tmp_path / "samples.rank0.jsonl"
    path.write_text('{"id": "1"}\nnot json\n{"id": "3"}\n')
    with pytest.raises(UserInputError, match="line 2 of .* is damaged"):
        read_rows(path)


def test_resume_with_another_configuration_is_refused(mllm, pope, reference):
    with pytest.raises(UserInputError, match=r'different configuration \(generation: \{"max_new_tokens": 4\} -> \{"max_new_tokens": 5\}\)'):
        run(mllm, pope, reference[0], generation={"max_new_tokens": 5})
    with pytest.raises(UserInputError, match=r"different configuration \(seed: 0 -> 1\)"):
        run(mllm, pope, reference[0], seed=1)


def test_sigkill_mid_run_then_resume(mllm, pope, model_dir, tmp_path):
    limit = 30
    args = ["eval", "--benchmark", "pope", "--data", str(pope), "--model", str(model_dir), "-o", str(tmp_path),
            "--batch-size", "1", "--max-new-tokens", "4", "--limit", str(limit), "--json"]
    run_dir = tmp_path / run_name("pope", "random", str(model_dir), [])
    rank_file = run_dir / "samples.rank0.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "innersight", *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if rank_file.exists() and rank_file.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.003)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_rows = read_rows(rank_file)[0]
    assert 1 <= len(killed_rows) < limit and not (run_dir / "results.json").exists()

    resumed = json.loads(_cli(args))
    reference = run(mllm, pope, tmp_path / "uninterrupted", limit=limit, batch_size=1)
    lines = rank_file.read_text().splitlines()
    assert sorted(json.loads(x)["id"] for x in lines) == sorted(str(i) for i in range(1, limit + 1))
    assert essence(rows_of(run_dir)) == essence(rows_of(tmp_path / "uninterrupted"))
    assert resumed["metrics"] == reference["metrics"] and resumed["counts"] == reference["counts"]


# ---------------------------------------------------------------------- one writer per run folder


def test_run_lock_refuses_a_second_holder_of_the_same_rank(tmp_path):
    from innersight.eval.lock import RunBusyError, RunLock

    run_dir = tmp_path / "run"
    with RunLock(run_dir, 0):
        with pytest.raises(RunBusyError, match=rf"being written by another innersight eval \(pid {os.getpid()} on "):
            with RunLock(run_dir, 0):
                pass
        with RunLock(run_dir, 1):  # another rank of the same run: its own file, its own lock
            pass
    assert not (run_dir / ".rank0.owner.json").exists()
    with RunLock(run_dir, 0):  # released: free again
        pass
    RunLock(tmp_path / "not-yet", 0).check_free()
    assert not (tmp_path / "not-yet").exists()  # checking creates no folder


def test_evaluate_holds_the_lock_for_its_rank(mllm, pope, tmp_path):
    from innersight.eval.lock import RunBusyError, RunLock

    with RunLock(tmp_path / "run", 0):
        with pytest.raises(RunBusyError, match="being written by another innersight eval"):
            run(mllm, pope, tmp_path / "run", limit=2)
        assert not (tmp_path / "run" / "samples.rank0.jsonl").exists()
        with pytest.raises(RunBusyError):  # the same rank of a sharded run as well
            run(mllm, pope, tmp_path / "run", limit=2, process=ProcessInfo(rank=0, world_size=2))
    assert run(mllm, pope, tmp_path / "run", limit=2)["counts"]["samples"] == 2


SLOW_EVAL = """
import sys, time, innersight
from innersight.eval.runner import evaluate
mllm = innersight.load(sys.argv[1], device="cpu")
evaluate(mllm, "pope", sys.argv[2], "random", [], None, sys.argv[3], 40, 1, 0, {"max_new_tokens": 4},
         progress=False, after_batch=lambda rows: time.sleep(0.5))
"""


def test_a_second_eval_on_the_same_folder_is_refused_naming_the_first(mllm, pope, model_dir, tmp_path):
    """Two processes on one run folder: the second stops at once with one line naming the first's
    pid; the first finishes with every sample exactly once; afterwards the folder resumes."""
    run_dir = tmp_path / "run"
    rank_file = run_dir / "samples.rank0.jsonl"
    first = subprocess.Popen([sys.executable, "-c", SLOW_EVAL, str(model_dir), str(pope), str(run_dir)], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None and not (
                rank_file.exists() and rank_file.read_bytes().count(b"\n") >= 1):
            time.sleep(0.01)
        assert first.poll() is None, first.stderr.read().decode()[-2000:] if first.stderr else ""
        second = subprocess.run([sys.executable, "-m", "innersight", "eval", "--benchmark", "pope", "--data", str(pope),
                                 "--model", str(model_dir), "-o", str(run_dir), "--batch-size", "1",
                                 "--max-new-tokens", "4", "--limit", "40", "--json"],
                                env=ENV, capture_output=True, text=True, timeout=300)
        # refused before the model loads: a model path that does not exist is never reached
        early = subprocess.run([sys.executable, "-m", "innersight", "eval", "--benchmark", "pope", "--data", str(pope),
                                "--model", str(tmp_path / "no-model"), "-o", str(run_dir), "--limit", "40"],
                               env=ENV, capture_output=True, text=True, timeout=300)
        assert first.poll() is None  # the refusals came while the first was still running
    finally:
        first.wait(timeout=300)
    assert first.returncode == 0, first.stderr.read().decode()[-2000:] if first.stderr else ""
    assert second.returncode == 2 and second.stdout == ""
    assert len(second.stderr.strip().splitlines()) == 1 and "Traceback" not in second.stderr
    assert f"being written by another innersight eval (pid {first.pid} on " in second.stderr
    assert early.returncode == 2 and f"(pid {first.pid} on " in early.stderr
    ids = [r["id"] for r in read_rows(rank_file)[0]]
    assert sorted(ids, key=int) == [str(i) for i in range(1, 41)]  # each sample once: no second writer
    again = json.loads(_cli(["eval", "--benchmark", "pope", "--data", str(pope), "--model", str(model_dir),
                             "-o", str(run_dir), "--batch-size", "1", "--max-new-tokens", "4", "--limit", "40",
                             "--json"]))
    assert again["resumed"] is True and len(read_rows(rank_file)[0]) == 40


def _cli(args: list[str]) -> str:
    """Run the CLI in this process; return stdout (exit code must be 0)."""
    code, out, err = run_cli(args)
    assert code == 0, err
    return out


# ---------------------------------------------------------------------- errors


def test_a_corrupt_image_becomes_an_error_row(mllm, pope, reference, tmp_path):
    data = tmp_path / "pope"
    shutil.copytree(pope, data)
    (data / "val2014" / "COCO_val2014_000000000003.jpg").write_bytes(b"this is not a jpeg")
    results = run(mllm, data, tmp_path / "run")
    rows = rows_of(tmp_path / "run")
    bad = rows[3]
    assert bad["id"] == "4" and bad["prediction"] is None and bad["score"] is None
    assert bad["error"].startswith("image: ") and "COCO_val2014_000000000003.jpg" in bad["error"]
    good = [r for i, r in enumerate(essence(rows)) if i != 3]
    assert good == [r for i, r in enumerate(essence(rows_of(reference[0]))) if i != 3]
    assert results["counts"] == {"samples": 12, "scored": 11, "errors": 1, "unknown": 0}
    assert results["metrics"]["n"] == 11
    # repaired data: a plain re-run keeps the error row, --retry-errors redoes that sample only
    shutil.copy(pope / "val2014" / "COCO_val2014_000000000003.jpg", data / "val2014" / "COCO_val2014_000000000003.jpg")
    redone: list[str] = []
    assert run(mllm, data, tmp_path / "run", after_batch=lambda r: redone.extend(x["id"] for x in r))["counts"]["errors"] == 1
    fixed = run(mllm, data, tmp_path / "run", retry_errors=True, after_batch=lambda r: redone.extend(x["id"] for x in r))
    assert redone == ["4"] and fixed["counts"]["errors"] == 0
    assert essence(rows_of(tmp_path / "run")) == essence(rows_of(reference[0]))
    assert fixed["metrics"] == reference[1]["metrics"]


def test_a_failing_batch_is_retried_one_by_one(mllm, pope, reference, tmp_path, monkeypatch):
    from innersight.methods import Plan

    original = Plan.run

    def flaky(self, mllm_, images, questions, **kw):
        if any("car" in q for q in questions):
            raise RuntimeError("boom on the car question")
        return original(self, mllm_, images, questions, **kw)

    monkeypatch.setattr(Plan, "run", flaky)
    results = run(mllm, pope, tmp_path, batch_size=4)
    rows = rows_of(tmp_path)
    failed = [r["id"] for r in rows if r["error"]]
    assert failed == ["3", "11"]  # the two car questions; their batch mates were answered
    assert rows[2]["error"] == "RuntimeError: boom on the car question"
    ok = [e for e, r in zip(essence(rows), rows) if not r["error"]]
    assert ok == [e for e, r in zip(essence(rows_of(reference[0])), rows) if not r["error"]]
    assert results["counts"]["errors"] == 2


def test_a_systematic_failure_stops_the_run(mllm, pope, tmp_path, monkeypatch):
    from innersight.methods import Plan

    def broken(self, *a, **kw):
        raise RuntimeError("attention weights unavailable")

    monkeypatch.setattr(Plan, "run", broken)
    with pytest.raises(InnersightError, match="first 3 samples all failed.*attention weights unavailable"):
        run(mllm, pope, tmp_path, batch_size=2)
    assert read_rows(tmp_path / "samples.rank0.jsonl")[0] == []  # nothing written: a re-run redoes them


# ---------------------------------------------------------------------- several processes


def test_shard_strides():
    assert shard(10, 1, 3) == [1, 4, 7]
    assert shard(3, 0, 1) == [0, 1, 2]
    with pytest.raises(ValueError):
        shard(3, 2, 2)


def test_simulated_ranks_merge_to_the_one_process_result(mllm, pope, tmp_path):
    """Two ranks as two threads sharing a barrier: the shard/merge logic without a launcher."""
    import threading

    single = run(mllm, pope, tmp_path / "one", limit=7, batch_size=1)
    barrier = threading.Barrier(2, timeout=120)
    outcome: dict[int, object] = {}

    def rank(r: int) -> None:
        try:
            outcome[r] = run(mllm, pope, tmp_path / "two", limit=7, batch_size=1,
                             process=ProcessInfo(rank=r, world_size=2, barrier=barrier.wait))
        except BaseException as exc:  # surfaced below
            outcome[r] = exc
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert outcome[1] == {"rank": 1, "written": 3}, outcome[1]
    merged = outcome[0]
    assert isinstance(merged, dict), merged
    assert [r["index"] for r in read_rows(tmp_path / "two" / "samples.rank1.jsonl")[0]] == [1, 3, 5]
    assert [r["index"] for r in read_rows(tmp_path / "two" / "samples.rank0.jsonl")[0]] == [0, 2, 4, 6]
    assert essence(rows_of(tmp_path / "two")) == essence(rows_of(tmp_path / "one"))
    assert merged["metrics"] == single["metrics"] and merged["num_processes"] == 2


def test_torchrun_two_processes_equal_one(mllm, pope, model_dir, tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    out = tmp_path / "two"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "innersight", "eval", "--benchmark", "pope",
           "--data", str(pope), "--model", str(model_dir), "-o", str(out), "--batch-size", "1",
           "--max-new-tokens", "4", "--limit", "9", "--json"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    run_dir = Path(results["run"])
    assert results["num_processes"] == 2
    assert [r["index"] for r in read_rows(run_dir / "samples.rank0.jsonl")[0]] == [0, 2, 4, 6, 8]
    assert [r["index"] for r in read_rows(run_dir / "samples.rank1.jsonl")[0]] == [1, 3, 5, 7]
    assert {r["rank"] for r in rows_of(run_dir)} == {0, 1}
    single = run(mllm, pope, tmp_path / "one", limit=9, batch_size=1)
    assert essence(rows_of(run_dir)) == essence(rows_of(tmp_path / "one"))
    assert results["metrics"] == single["metrics"]


# ---------------------------------------------------------------------- V* likelihood protocol


def test_vstar_likelihood_losses_match_the_model_loss(mllm, tmp_path):
    import torch

    rng = np.random.default_rng(1)
    for category, name in (("direct_attributes", "sa_1"), ("relative_position", "sa_2")):
        (tmp_path / "vstar" / category).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "vstar" / category / f"{name}.jpg")
        options = ["red", "blue", "green", "gray"] if category == "direct_attributes" else ["left", "right"]
        (tmp_path / "vstar" / category / f"{name}.json").write_text(json.dumps({"question": "What colour is the star?",
                                                                               "options": options}))
    results = evaluate(mllm, "vstar", tmp_path / "vstar", "all", [], None, tmp_path / "run", None, 2, 0, None,
                       progress=False)
    rows = rows_of(tmp_path / "run")
    assert [len(r["prediction"]) for r in rows] == [4, 2]
    assert results["scorer"]["variant"] == "canonical" and results["preset"]["name"] == "likelihood"
    # the mean token loss of 'blue' as the answer, from the model's own loss with masked labels
    image = Image.open(tmp_path / "vstar" / "direct_attributes" / "sa_1.jpg").convert("RGB")
    prompt = rows[0]["prompt"]
    assert prompt == "USER: <image>\nWhat colour is the star? ASSISTANT:"
    n_prompt = mllm.processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"].shape[1]
    inputs = mllm.processor(text=[prompt + " blue"], images=[image], return_tensors="pt")
    labels = inputs["input_ids"].clone()
    labels[:, :n_prompt] = -100
    with torch.no_grad():
        loss = mllm.model(**inputs, labels=labels).loss
    assert rows[0]["prediction"][1] == pytest.approx(float(loss), rel=1e-4)
    best = int(np.argmin(rows[0]["prediction"]))
    assert rows[0]["parsed"] == "ABCD"[best] and rows[0]["score"]["correct"] == (best == 0)
    with pytest.raises(MethodError, match="use --scorer-variant letter"):
        evaluate(mllm, "vstar", tmp_path / "vstar", "all", ["deco"], None, tmp_path / "x", None, 2, 0, None,
                 progress=False)
    letter = evaluate(mllm, "vstar", tmp_path / "vstar", "all", [], None, tmp_path / "letter", None, 2, 0, None,
                      scorer_variant="letter", progress=False)
    assert letter["preset"]["name"] == "letter" and letter["counts"]["samples"] == 2
    assert "(A) " in rows_of(tmp_path / "letter")[0]["question"]


# ---------------------------------------------------------------------- CLI and report


def _cli_fail(args: list[str], capsys) -> str:
    code = 0
    try:
        main(args)
    except SystemExit as exc:
        code = exc.code
    _, err = capsys.readouterr()
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("extra, message", [
    (["--benchmark", "nope"], "unknown benchmark 'nope'"),
    (["--benchmark", "pope"], "needs --data"),
    (["--benchmark", "pope", "--data", "{pope}", "--split", "rare"], "has no split 'rare'"),
    (["--benchmark", "pope", "--data", "{pope}", "--scorer-variant", "fuzzy"], "has no variant 'fuzzy'"),
    (["--benchmark", "pope", "--data", "{pope}", "--preset", "poetic"], "has no preset 'poetic'"),
    (["--benchmark", "pope", "--data", "{pope}", "--set", "deco.alpha=1"], "--set given but no --method"),
    (["--benchmark", "pope", "--data", "{pope}", "--image-ids", "ids.txt"], "takes no option image_ids"),
    (["--benchmark", "vstar", "--data", "{pope}"], "V*Bench: folder(s) direct_attributes"),
    (["--benchmark", "pope", "--data", "{pope}", "--top-p", "0.9"], "--top-p applies only when sampling"),
    (["--benchmark", "pope", "--data", "{pope}", "--temperature", "-1"], "--temperature must be >= 0"),
])
def test_cli_eval_user_errors_are_one_line(capsys, pope, tmp_path, extra, message):
    args = ["eval", "--model", "unused", "-o", str(tmp_path)] + [a.format(pope=pope) for a in extra]
    assert message in _cli_fail(args, capsys)


def test_cli_eval_and_report(capsys, mllm, pope, model_dir, reference, tmp_path):
    base = ["eval", "--benchmark", "pope", "--data", str(pope), "--model", str(model_dir), "-o", str(tmp_path / "runs"),
            "--limit", "4", "--batch-size", "2", "--max-new-tokens", "4"]
    out = _cli(base)
    assert out.startswith("pope/random baseline: accuracy = ") and "(n=4, errors=0, unknown=0)" in out
    deco = json.loads(_cli(base + ["--method", "deco", "--json"]))
    assert deco["methods"] == ["deco"] and Path(deco["run"]).name.endswith("-deco")
    (tmp_path / "runs" / "unfinished").mkdir()
    (tmp_path / "runs" / "unfinished" / "config.json").write_text("{}")

    figure = tmp_path / "report" / "cmp.png"
    # the reference run scored 12 samples, the CLI runs 4: the report refuses to compare them
    refusal = _cli_fail(["report", str(tmp_path / "runs"), str(reference[0]), "-o", str(figure)], capsys)
    assert "refusing to compare runs made under different settings" in refusal
    assert "samples: " in refusal and '"limit": 12' in refusal and "--allow-mismatch" in refusal
    table = _cli(["report", str(tmp_path / "runs"), str(reference[0]), "-o", str(figure), "--allow-mismatch"])
    lines = table.splitlines()
    assert lines[0] == ("| benchmark | scorer | model | methods | decoding | main metric | 95% CI | yes % | vs plain "
                        "| p (test) | n | errors | s/sample |")
    ref = reference[1]
    body = [line for line in lines if line.startswith("| pope/random")]
    assert len(body) == 3
    assert any(f"| accuracy = {ref['metrics']['accuracy']:.2f} |" in line and "| 12 | 0 |" in line for line in body)
    assert any(f"| deco | greedy | accuracy = {deco['metrics']['accuracy']:.2f} |" in line and "(unmatched)" in line
               for line in body)
    assert "WARNING: pope (greedy) runs were made under different settings" in table
    assert figure.with_suffix(".md").read_text() == table[: table.index("\nfigure: ")]
    assert figure.with_suffix(".csv").read_text().startswith("run,benchmark,mode,label,")
    with Image.open(figure) as png:
        assert png.format == "PNG" and png.size[0] > 300 and png.size[1] > 200
    matched = json.loads(_cli(["report", str(tmp_path / "runs"), "-o", str(figure), "--json"]))
    assert {r["label"] for r in matched["runs"]} == {"plain", "deco"}
    (deco_row,) = [r for r in matched["runs"] if r["label"] == "deco"]
    assert deco_row["versus"] == "plain" and deco_row["matched"] and deco_row["paired"]["n"] == 4
    assert deco_row["paired"]["test"] == "mcnemar-exact"
    assert matched["unfinished"] == [str((tmp_path / "runs" / "unfinished").resolve())]
    assert "no run in" in _cli_fail(["report", str(tmp_path / "report")], capsys)


def test_list_names_the_benchmarks():
    data = json.loads(_cli(["list", "--json"]))
    by_name = {b["name"]: b for b in data["benchmarks"]}
    assert by_name["pope"]["splits"][:3] == ["random", "popular", "adversarial"]
    assert by_name["pope"]["scorer_variants"][0] == "canonical"
    assert by_name["chair"]["options"]["image_ids"]


# ---------------------------------------------------------------------- presets of the papers' protocols


def test_damro_preset_and_damro_vcd_scorer(mllm, pope, tmp_path):
    results = evaluate(mllm, "pope", pope, "random", [], None, tmp_path, 2, 2, 0, GEN, progress=False,
                       scorer_variant="damro-vcd")
    assert results["scorer"]["variant"] == "damro-vcd"
    assert results["preset"]["name"] == "damro"  # the default preset of that variant
    rows = rows_of(tmp_path)
    assert rows[0]["question"] == "Is there a dog in the image? Please answer this question with one word."
    for row in rows:  # VCD's rule, worked out independently: the label's own word anywhere
        label = "yes" if int(row["id"]) % 2 == 1 else "no"
        assert row["score"]["correct"] == (label in row["prediction"].lower().strip())


def test_a_presets_method_settings_reach_the_run_under_the_users_set(mllm, pope, tmp_path):
    from innersight.eval.benchmarks.base import Preset
    from innersight.eval.benchmarks.pope import POPE

    class Tuned(POPE):
        presets = {**POPE.presets, "tuned": Preset("tuned", "deco alpha 0.4", max_new_tokens=4,
                                                   method_settings={"deco": {"alpha": "0.4"}, "vcd": {"beta": "0.2"}})}

    bench = Tuned()
    first = evaluate(mllm, bench, pope, "random", ["deco"], None, tmp_path / "a", 2, 2, 0, GEN, progress=False,
                     preset="tuned")
    assert first["method_configs"]["deco"]["alpha"] == 0.4
    assert first["settings"] == {"deco": {"alpha": "0.4"}}  # vcd is not in the run: not applied
    second = evaluate(mllm, bench, pope, "random", ["deco"], {"deco": {"alpha": "0.7"}}, tmp_path / "b", 2, 2, 0,
                      GEN, progress=False, preset="tuned")
    assert second["method_configs"]["deco"]["alpha"] == 0.7  # the user's --set wins
    plain = evaluate(mllm, bench, pope, "random", ["deco"], None, tmp_path / "c", 2, 2, 0, GEN, progress=False)
    assert plain["method_configs"]["deco"]["alpha"] != 0.4  # the default preset sets nothing


def test_vcd_pope_preset_sets_beta_02():
    from innersight.eval.benchmarks import get_benchmark
    from innersight.methods import resolve_methods

    preset = get_benchmark("pope").preset("vcd")
    assert preset.suffix == " Please answer this question with one word."
    merged = preset.settings_for(["vcd"], None)
    assert merged == {"vcd": {"beta": "0.2"}}
    assert resolve_methods(["vcd"], merged).configs()["vcd"]["beta"] == 0.2
    assert resolve_methods(["vcd"], preset.settings_for(["vcd"], {"vcd": {"beta": "0.3"}})).configs()["vcd"]["beta"] == 0.3
    assert preset.settings_for(["deco"], {"deco": {"alpha": "1"}}) == {"deco": {"alpha": "1"}}


def test_a_missing_optional_scorer_package_is_one_line(capsys, pope, tmp_path, monkeypatch):
    from innersight.eval.scorers.base import Scorer

    monkeypatch.setattr(Scorer, "missing", lambda self: ["lemminflect"] if self.variant == "lemma" else [])
    err = _cli_fail(["eval", "--model", "unused", "-o", str(tmp_path), "--benchmark", "chair", "--data", str(pope),
                     "--scorer-variant", "lemma"], capsys)
    assert "pip install 'innersight[lemma]'" in err
