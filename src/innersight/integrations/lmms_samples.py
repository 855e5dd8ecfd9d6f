"""Per-sample records of an ``innersight eval`` run, shaped like lmms-eval's ``--log_samples``.

lmms-eval (0.7.3) keeps one record per document while it scores,
``{doc_id, doc, target, arguments, resps, filtered_resps, token_counts, doc_hash, <metric>...}``,
and writes them to ``<output>/<model>/<date>_samples_<task>.jsonl`` after flattening: ``input``
(the first argument, the task's prompt text) is added, a single response is unwrapped,
``resps`` is dropped when it equals ``filtered_resps``, ``target`` becomes a string, ``doc``
and ``arguments`` are dropped. :func:`to_lmms_samples` builds the in-memory records from a run
folder, :func:`write_lmms_samples` writes the flattened file, so tools that read lmms-eval
sample logs read innersight runs too::

    python -m innersight.integrations.lmms_samples runs/pope-random-llava-deco

The mapping: ``doc_id`` = the sample's position in the benchmark (``index``); ``doc`` = the
loaded sample without its image (the benchmark is loaded again from the run's ``config.json``;
when that fails, or ``samples`` are not given, only the id and question); ``target`` = the
sample's reference (``label``, ``answer``, ``answers``, ``gt_objects`` or the correct option);
``arguments`` = ``[question, generation settings, doc_id, task, split]`` with task
``<benchmark>_<split>``; ``resps`` = ``[[prediction]]``, ``filtered_resps`` = ``[prediction]``
(``""`` for an error row); ``innersight_score`` = the sample's one-number score (see
:func:`sample_score`; lmms-eval's baseline loader reads it); the scorer's row fields become the
metric fields; ``innersight``
keeps the row's id, parsed answer, error, seconds and prompt. Nothing here imports lmms-eval.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import InnersightError, UserInputError

#: keys of an lmms-eval sample record that metric fields must not overwrite
RESERVED = ("doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "token_counts", "doc_hash", "input",
            "innersight", "innersight_score")
#: sample fields tried in order for the target
TARGET_FIELDS = ("label", "answer", "answers", "gt_objects")


def _json_safe(value: Any) -> Any:
    """``value`` with everything JSON cannot hold turned into text (images into their name)."""
    return json.loads(json.dumps(value, ensure_ascii=False, default=str))


def _doc(sample: Mapping[str, Any] | None, row: Mapping[str, Any]) -> dict[str, Any]:
    if sample is None:
        return {"id": row["id"], "question": row.get("question")}
    return _json_safe({k: v for k, v in sample.items() if k != "image"})


def _target(sample: Mapping[str, Any] | None, row: Mapping[str, Any]) -> Any:
    if sample is not None:
        for name in TARGET_FIELDS:
            if sample.get(name) is not None:
                return _json_safe(sample[name])
        options = sample.get("options")
        if isinstance(options, list) and options:
            return _json_safe(options[0])  # V*: the correct option comes first in the official data
    score = row.get("score") or {}
    return score.get("label")


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    from ..eval.runner import MERGED, collect_rows, read_rows

    merged = run_dir / MERGED
    if merged.is_file():
        rows, _, _ = read_rows(merged)
    else:
        rows = sorted(collect_rows(run_dir).values(), key=lambda r: r["index"])
    if not rows:
        raise UserInputError(f"{str(run_dir)!r} holds no sample rows of an innersight eval run")
    return rows


def _identity(run_dir: Path) -> dict[str, Any]:
    from ..eval.runner import CONFIG

    path = run_dir / CONFIG
    try:
        return json.loads(path.read_text(encoding="utf-8"))["identity"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise UserInputError(f"{str(path)!r} is missing or unreadable; is {str(run_dir)!r} an innersight eval run "
                             f"folder?") from None


def _reload(identity: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The run's samples loaded again from its recorded data, or ``None`` when that fails."""
    from ..eval.benchmarks import get_benchmark

    try:
        bench = get_benchmark(identity["benchmark"])
        return bench.load(identity.get("data"), identity.get("split"), **dict(identity.get("options") or {}))
    except (InnersightError, OSError, KeyError, ValueError):
        return None


def sample_score(score: Mapping[str, Any] | None) -> float | None:
    """One number per sample, for readers that take one (lmms-eval's baseline loader reads the
    first field whose name holds ``score``): ``correct`` as 1/0, else the row's graded
    ``accuracy`` (VQA) or ``anls``; ``None`` for rows without one (CHAIR)."""
    if not score:
        return None
    if isinstance(score.get("correct"), bool):
        return float(score["correct"])
    for key in ("accuracy", "anls"):
        if isinstance(score.get(key), (int, float)) and not isinstance(score.get(key), bool):
            return float(score[key])
    return None


def task_name(identity: Mapping[str, Any]) -> str:
    """The lmms-eval-style task name of a run: ``<benchmark>_<split>`` (``-`` -> ``_``)."""
    return f"{identity['benchmark']}_{identity['split']}".replace("-", "_")


def to_lmms_samples(run_dir: str | Path, samples: Sequence[Mapping[str, Any]] | None = None, *,
                    reload: bool = True) -> list[dict[str, Any]]:
    """The records lmms-eval keeps for ``--log_samples``, one per row of the run in ``run_dir``.

    Args:
        run_dir: a run folder written by :func:`innersight.eval.runner.evaluate`.
        samples: the benchmark's samples (as loaded for the run); ``None`` loads them again from
            the run's ``config.json`` when ``reload`` (and falls back to id + question when that
            fails).
        reload: whether to load the samples again when ``samples`` is ``None``.
    """
    run_dir = Path(run_dir)
    identity = _identity(run_dir)
    rows = _rows(run_dir)
    if samples is None and reload:
        samples = _reload(identity)
    by_id = {str(s["id"]): s for s in samples or []}
    task = task_name(identity)
    generation = dict(identity.get("generation") or {})
    records = []
    for row in rows:
        sample = by_id.get(row["id"])
        doc = _doc(sample, row)
        prediction = row.get("prediction")
        text = "" if prediction is None else prediction if isinstance(prediction, str) else json.dumps(prediction)
        record: dict[str, Any] = {
            "doc_id": row["index"],
            "doc": doc,
            "target": _target(sample, row),
            "arguments": [row.get("question"), copy.deepcopy(generation), row["index"], task, identity["split"]],
            "resps": [[text]],
            "filtered_resps": [text],
            "token_counts": [None],
            "doc_hash": hashlib.sha256(json.dumps(doc, indent=2, ensure_ascii=False, default=str).encode("utf-8"))
            .hexdigest(),
        }
        per_sample = sample_score(row.get("score"))
        if per_sample is not None:  # first key with "score" in its name: what lmms-eval's readers take
            record["innersight_score"] = per_sample
        for key, value in (row.get("score") or {}).items():
            record[f"score_{key}" if key in RESERVED else key] = value
        record["innersight"] = {"id": row["id"], "parsed": row.get("parsed"), "error": row.get("error"),
                                "seconds": row.get("seconds"), "prompt": row.get("prompt")}
        records.append(record)
    return records


def flatten(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record as lmms-eval 0.7.3 writes it to ``*_samples_<task>.jsonl`` (see the module doc)."""
    out = copy.deepcopy(dict(record))
    out["input"] = out["arguments"][0]
    out["resps"] = _strings(out["resps"])
    out["filtered_resps"] = _strings(out["filtered_resps"])
    if isinstance(out["resps"], list) and len(out["resps"]) == 1:
        out["resps"] = out["resps"][0]
    if isinstance(out["filtered_resps"], list) and len(out["filtered_resps"]) == 1:
        out["filtered_resps"] = out["filtered_resps"][0]
    if out["resps"] == out["filtered_resps"] or (
            isinstance(out["resps"], list) and len(out["resps"]) == 1 and out["resps"][0] == out["filtered_resps"]):
        out.pop("resps")
    out["target"] = str(out["target"])
    out.pop("arguments")
    out.pop("doc")
    return out


def _strings(value: Any) -> Any:
    if isinstance(value, list):
        return [_strings(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_strings(v) for v in value)
    return str(value)


def write_lmms_samples(run_dir: str | Path, path: str | Path | None = None,
                       samples: Sequence[Mapping[str, Any]] | None = None) -> Path:
    """Write the run's records as lmms-eval writes ``--log_samples`` (one flattened JSON object
    per line) to ``path`` (default ``<run_dir>/lmms_samples_<task>.jsonl``); returns the path."""
    run_dir = Path(run_dir)
    records = to_lmms_samples(run_dir, samples)
    target = Path(path) if path is not None else run_dir / f"lmms_samples_{task_name(_identity(run_dir))}.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(flatten(record), ensure_ascii=False, default=str) + "\n")
    return target


def main(argv: list[str] | None = None) -> None:
    """``python -m innersight.integrations.lmms_samples RUN_DIR [-o FILE]``."""
    parser = argparse.ArgumentParser(description="Write an innersight eval run's samples as lmms-eval --log_samples.")
    parser.add_argument("run_dir", type=Path, help="run folder written by innersight eval")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="file to write (default: RUN_DIR/lmms_samples_<task>.jsonl)")
    args = parser.parse_args(argv)
    try:
        print(write_lmms_samples(args.run_dir, args.output))
    except InnersightError as exc:
        parser.exit(2, f"error: {exc}\n")


if __name__ == "__main__":  # pragma: no cover
    main()
