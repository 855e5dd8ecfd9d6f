"""lmms-eval end to end, offline: the real ``lmms-eval`` command with ``--model innersight`` on a
local task over a local dataset, and innersight's sample logs read back by lmms-eval's own reader.

Needs lmms-eval and the packages its command line imports (installed as ``.ci/run`` does); the
task's data are files written here and read by ``datasets``' local ``json`` builder, with
``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1`` so nothing is fetched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TASK = "innersight_micro_pope"
N = 6
MAX_NEW_TOKENS = 6

UTILS = '''from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    answer = results[0].strip().lower()
    return {"accuracy": float(answer.startswith(doc["answer"]))}
'''

YAML = '''task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
'''


def _write_task(root: Path) -> list[dict]:
    from innersight.eval.benchmarks import get_benchmark

    root.mkdir(parents=True, exist_ok=True)
    docs = []
    for sample in get_benchmark("micro-pope").load(None, "adversarial", n=N):
        path = root / f"{sample['id']}.png"
        sample["image"].save(path)
        docs.append({"id": sample["id"], "image": str(path), "question": sample["question"],
                     "answer": sample["answer"]})
    (root / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "utils.py").write_text(UTILS)
    (root / "task.yaml").write_text(YAML.format(task=TASK, data=root / "data.jsonl", max_new_tokens=MAX_NEW_TOKENS))
    return docs


@pytest.mark.heavy
def test_the_lmms_eval_command_runs_innersight_offline(tmp_path):
    pytest.importorskip("lmms_eval")
    command = shutil.which("lmms-eval")
    assert command is not None, "the lmms-eval command is not installed (see .ci/run)"
    docs = _write_task(tmp_path / "task")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"), "OMP_NUM_THREADS": "2"}
    out = tmp_path / "out"
    proc = subprocess.run(
        [command, "--model", "innersight", "--model_args", "pretrained=micro,methods=deco", "--tasks", TASK,
         "--include_path", str(tmp_path / "task"), "--batch_size", "2", "--output_path", str(out), "--log_samples"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_path,) = out.glob("*/*_results.json")
    results = json.loads(results_path.read_text())
    assert results["config"]["model_backend"] == "innersight.integrations.lmms_eval.InnersightLMMSChat (chat)"
    assert results["n-samples"][TASK]["effective"] == N
    (samples_path,) = out.glob(f"*/*_samples_{TASK}.jsonl")
    logged = sorted((json.loads(line) for line in samples_path.read_text().splitlines()), key=lambda r: r["doc_id"])

    # the same questions answered by innersight directly, with the same method and batches
    from PIL import Image

    import innersight

    mllm = innersight.load("micro")
    images = [Image.open(d["image"]).convert("RGB") for d in docs]
    answers = mllm.answer_batch(images, [d["question"] for d in docs], methods=["deco"],
                                max_new_tokens=MAX_NEW_TOKENS, batch_size=2)
    assert [r["filtered_resps"] for r in logged] == [a.text for a in answers]
    expected = sum(a.text.strip().lower().startswith(d["answer"]) for a, d in zip(answers, docs)) / N
    assert results["results"][TASK]["accuracy,none"] == pytest.approx(expected)
    assert [r["accuracy"] for r in logged] == [float(a.text.strip().lower().startswith(d["answer"]))
                                              for a, d in zip(answers, docs)]


def test_lmms_eval_reads_back_the_sample_logs_innersight_writes(tmp_path):
    pytest.importorskip("lmms_eval")
    from lmms_eval.baselines.loader import load_baseline

    import innersight
    from innersight.eval.runner import evaluate

    run = tmp_path / "run"
    results = evaluate(innersight.load("micro"), "micro-pope", None, "random", [], None, run, None, 4, 0,
                       {"max_new_tokens": 4}, options={"n": 8}, progress=False)
    out = tmp_path / "logs" / "20260101_000000_samples_micro_pope_random.jsonl"
    proc = subprocess.run([sys.executable, "-m", "innersight.integrations.lmms_samples", str(run), "-o", str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    scores, aggregated = load_baseline(str(out), "micro_pope_random")
    assert scores == {r["index"]: float(r["score"]["correct"]) for r in rows}
    assert aggregated is None  # no lmms-eval results file beside it
    assert 100 * sum(scores.values()) / len(scores) == pytest.approx(results["metrics"]["accuracy"])
