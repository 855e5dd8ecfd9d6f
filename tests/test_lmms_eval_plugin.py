"""innersight as an lmms-eval model (registration, generate_until, loglikelihood, model_args) and
the lmms-eval-shaped sample records of innersight's own runs.

The plugin tests need lmms-eval (installed without its dependencies, as .ci/run does) and are
skipped without it; the import-error and sample-record tests run either way.
"""

from __future__ import annotations

import copy
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from innersight.errors import InnersightError, MethodError, UserInputError
from innersight.integrations.lmms_samples import flatten, to_lmms_samples, write_lmms_samples

DECO = {"deco": {"alpha": 50.0, "layers": (1, 2)}}  # strong enough to change the tiny model's answer
DECO_ARGS = "methods=deco,deco.alpha=50,deco.layers=1;2"


def image(seed: int, w: int = 90, h: int = 60) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def plugin() -> Any:
    pytest.importorskip("lmms_eval")
    return importlib.import_module("innersight.integrations.lmms_eval")


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return [{"image": image(0), "question": "what is it?"},
            {"image": image(1, 50, 80), "question": "is there a dog?"},
            {"image": image(2, 64, 64), "question": "what colour is the car?"}]


def visual(doc: dict[str, Any]) -> list[Image.Image]:
    return [doc["image"]]


def request(plugin: Any, doc_id: int, context: str, gen: dict[str, Any], kind: str = "generate_until") -> Any:
    from lmms_eval.api.instance import Instance

    return Instance(request_type=kind, arguments=(context, gen, visual, doc_id, "pope", "test"), idx=0,
                    metadata={"task": "pope", "doc_id": doc_id, "repeats": 1})


def with_docs(model: Any, docs: list[dict[str, Any]]) -> Any:
    model.task_dict = {"pope": {"test": docs}}
    return model


# ---------------------------------------------------------------------- import and registration


def test_import_without_lmms_eval_says_how_to_install(monkeypatch):
    monkeypatch.delitem(sys.modules, "innersight.integrations.lmms_eval", raising=False)
    for name in ("lmms_eval", "lmms_eval.api", "lmms_eval.api.instance", "lmms_eval.api.model"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of any of them now fails
    with pytest.raises(ImportError, match=r"needs lmms-eval.*pip install --no-deps lmms-eval==0\.7\.3 && "
                                          r"pip install pytz loguru sqlitedict evaluate"):
        importlib.import_module("innersight.integrations.lmms_eval")
    monkeypatch.delitem(sys.modules, "innersight.integrations.lmms_eval", raising=False)


def test_lmms_eval_finds_the_model_by_its_entry_point(plugin):
    from importlib.metadata import entry_points

    from lmms_eval.models import get_model, get_model_manifest, list_available_models

    points = {ep.name: ep.value for ep in entry_points(group="lmms_eval.models")}
    assert points.get("innersight") == "innersight.integrations:lmms_eval_manifest"
    assert "innersight" in list_available_models()
    assert get_model_manifest("innersight").simple_class_path == "innersight.integrations.lmms_eval.InnersightLMMS"
    assert get_model_manifest("innersight").chat_class_path == "innersight.integrations.lmms_eval.InnersightLMMSChat"
    # lmms-eval prefers the chat type; --force_simple gives the simple one
    assert get_model("innersight") is plugin.InnersightLMMSChat
    assert get_model("innersight", force_simple=True) is plugin.InnersightLMMS
    assert plugin.InnersightLMMS.is_simple and not plugin.InnersightLMMSChat.is_simple


def messages(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """A document as lmms-eval's chat tasks give it: a system turn and one user turn."""
    return [{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
            {"role": "user", "content": [{"type": "image", "url": doc["image"]},
                                         {"type": "text", "text": doc["question"]}]}]


def test_chat_model_type_answers_like_answer_batch(plugin, docs, tiny_mllm):
    from lmms_eval.api.instance import Instance

    mllm = tiny_mllm("llava")
    model = with_docs(plugin.InnersightLMMSChat(pretrained=mllm, batch_size=2), docs)
    gen = {"max_new_tokens": 4, "temperature": 0, "until": []}
    requests = [Instance(request_type="generate_until", arguments=("ctx", messages, dict(gen), i, "pope", "test"),
                         idx=0, metadata={"task": "pope", "doc_id": i, "repeats": 1}) for i in range(len(docs))]
    got = model.generate_until(requests)
    expected = mllm.answer_batch([d["image"] for d in docs], [f"Answer briefly.\n{d['question']}" for d in docs],
                                 max_new_tokens=4, batch_size=2)
    assert got == [a.text for a in expected]

    def two_turns(doc):
        return messages(doc) + [{"role": "assistant", "content": [{"type": "text", "text": "x"}]},
                                {"role": "user", "content": [{"type": "text", "text": "and?"}]}]

    bad = Instance(request_type="generate_until", arguments=("ctx", two_turns, dict(gen), 0, "pope", "test"), idx=0,
                   metadata={"task": "pope", "doc_id": 0, "repeats": 1})
    with pytest.raises(UserInputError, match="one user turn"):
        model.generate_until([bad])


# ---------------------------------------------------------------------- generate_until


def test_generate_until_gives_answer_batch_answers(plugin, docs, tiny_mllm):
    mllm = tiny_mllm("llava")
    model = with_docs(plugin.InnersightLMMS(pretrained=mllm, batch_size=2), docs)
    gen = {"max_new_tokens": 5, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False, "until": []}
    contexts = ["<image>\nwhat is it?", "is there a dog?", "what colour is the car?"]
    got = model.generate_until([request(plugin, i, c, copy.deepcopy(gen)) for i, c in enumerate(contexts)])
    expected = mllm.answer_batch([d["image"] for d in docs], [d["question"] for d in docs], max_new_tokens=5)
    assert got == [a.text for a in expected]
    assert model.methods == ()
    # settings differ per request: grouped, answered with their own settings, returned in order
    short = {**gen, "max_new_tokens": 2}
    mixed = model.generate_until([request(plugin, 0, contexts[0], dict(short)), request(plugin, 1, contexts[1], dict(gen)),
                                  request(plugin, 2, contexts[2], dict(short))])
    two = mllm.answer_batch([docs[0]["image"], docs[2]["image"]], [docs[0]["question"], docs[2]["question"]],
                            max_new_tokens=2)
    assert mixed == [two[0].text, got[1], two[1].text]
    # 'until' cuts the answer at the first stop string
    text = got[0]
    assert len(text) > 4, text
    stop = text[2:4]
    cut = model.generate_until([request(plugin, 0, contexts[0], {**gen, "until": [stop, "never-there"]})])
    assert cut == [text[: text.find(stop)]]


def test_methods_model_arg_applies_the_method(plugin, docs, tiny_mllm, tiny_dir):
    mllm = tiny_mllm("llava")
    args = f"pretrained={tiny_dir('llava')},{DECO_ARGS},max_new_tokens=5"
    model = with_docs(plugin.InnersightLMMS.create_from_arg_string(args, {"batch_size": 2, "device": "cpu"}), docs)
    assert model.methods == ("deco",) and model.batch_size == 2
    assert model.plan.configs()["deco"]["alpha"] == 50.0 and model.plan.configs()["deco"]["layers"] == (1, 2)
    got = model.generate_until([request(plugin, i, d["question"], {"temperature": 0}) for i, d in enumerate(docs)])
    images, questions = [d["image"] for d in docs], [d["question"] for d in docs]
    deco = mllm.answer_batch(images, questions, methods=["deco"], settings=DECO, max_new_tokens=5)
    plain = mllm.answer_batch(images, questions, max_new_tokens=5)
    assert got == [a.text for a in deco]  # max_new_tokens from model_args: the task gave none
    assert got[0] != plain[0].text  # the method changed the answer


# ---------------------------------------------------------------------- loglikelihood


def test_loglikelihood_matches_the_likelihood_protocol_and_greedy_answer(plugin, docs, tiny_mllm):
    from innersight.eval.runner import option_losses
    from innersight.methods import resolve_methods

    mllm = tiny_mllm("llava")
    model = with_docs(plugin.InnersightLMMS(pretrained=mllm), docs)
    greedy = mllm.answer(docs[1]["image"], docs[1]["question"], max_new_tokens=3)
    assert len(greedy.token_ids) == 3
    greedy_text = mllm.adapter.tokenizer.decode(greedy.token_ids)
    other = "cat dog cat" if greedy_text != "cat dog cat" else "dog cat dog"
    reqs = [request(plugin, 1, docs[1]["question"], " " + greedy_text, "loglikelihood"),
            request(plugin, 1, docs[1]["question"], " " + other, "loglikelihood")]
    (lp_greedy, is_greedy), (lp_other, other_greedy) = model.loglikelihood(reqs)
    assert is_greedy and not other_greedy
    losses, _ = option_losses(mllm, resolve_methods([]), docs[1]["image"], docs[1]["question"], [greedy_text, other])
    n_other = len(mllm.adapter.tokenizer(other, add_special_tokens=False)["input_ids"])
    assert lp_greedy == pytest.approx(-3 * losses[0], rel=1e-4, abs=1e-4)  # sum = -(mean loss) x tokens
    assert lp_other == pytest.approx(-n_other * losses[1], rel=1e-4, abs=1e-4)
    assert lp_greedy > lp_other
    deco = with_docs(plugin.InnersightLMMS(pretrained=mllm, methods="deco"), docs)
    with pytest.raises(MethodError, match="decoding methods \\(deco\\) act on generation"):
        deco.loglikelihood(reqs)
    with pytest.raises(NotImplementedError, match="multi-round"):
        model.generate_until_multi_round([])


# ---------------------------------------------------------------------- model_args


def test_model_args_syntax(plugin):
    from lmms_eval.utils import simple_parse_args_string

    text = ("pretrained=llava-hf/llava-1.5-7b-hf,methods=vicrop-rel-att+deco,deco.alpha=0.5,"
            "set=[vicrop.layer=14,deco.top_k=10],deco.layers=20;28,template=reference,batch_size=4,"
            "max_new_tokens=16,trust_remote_code=true")
    args = plugin.parse_model_args(simple_parse_args_string(text))
    assert args.pretrained == "llava-hf/llava-1.5-7b-hf"
    assert args.methods == ("vicrop-rel-att", "deco")
    assert args.settings == {"deco": {"alpha": "0.5", "top_k": "10", "layers": "20;28"}, "vicrop": {"layer": "14"}}
    assert (args.template, args.batch_size, args.max_new_tokens, args.trust_remote_code) == ("reference", 4, 16, True)
    single = plugin.parse_model_args(simple_parse_args_string("pretrained=m,set=deco.alpha=0.5"))
    assert single.settings == {"deco": {"alpha": "0.5"}} and single.methods == ()
    assert plugin.parse_model_args({"pretrained": "m", "deco.use_thing": True}).settings == {"deco": {"use_thing": "true"}}


@pytest.mark.parametrize(("args", "error", "message"), [
    ("methods=deco", UserInputError, "needs pretrained="),
    ("pretrained=m,foo=1", UserInputError, "unknown model_args key 'foo'.*METHOD.FIELD=VALUE"),
    ("pretrained=m,set=deco.alpha", UserInputError, "expected METHOD.FIELD=VALUE"),
    ("pretrained=m,set=alpha=0.5", UserInputError, "expected METHOD.FIELD=VALUE"),
    ("pretrained=m,methods=+", UserInputError, "names no method"),
    ("pretrained=m,batch_size=auto", UserInputError, "does not size batches automatically"),
    ("pretrained=m,batch_size=0", UserInputError, "whole number >= 1"),
    ("pretrained=m,template=fancy", UserInputError, "chat or reference"),
    ("pretrained=does/not/exist,methods=nosuch", MethodError, "unknown method 'nosuch'; available methods: .*deco"),
    ("pretrained=does/not/exist,methods=deco,deco.nosuch=1", MethodError, "deco has no field 'nosuch'"),
    ("pretrained=does/not/exist,deco.alpha=1", MethodError, "names deco but no such method was chosen"),
])
def test_model_args_errors_are_clear_and_come_before_loading(plugin, args, error, message):
    with pytest.raises(error, match=message):
        plugin.InnersightLMMS.create_from_arg_string(args)
    assert issubclass(error, InnersightError)


def test_generation_settings_follow_lmms_eval_conventions(plugin):
    greedy, stops = plugin.generation_settings({"temperature": 0, "do_sample": True, "top_p": 0, "until": "\n\n"}, 9)
    assert greedy == {"max_new_tokens": 9} and stops == ["\n\n"]
    sampled, stops = plugin.generation_settings({"temperature": 0.7, "top_p": 0.9, "num_beams": 3,
                                                 "max_new_tokens": 4, "image_aspect_ratio": "pad"}, 9)
    assert sampled == {"max_new_tokens": 4, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "num_beams": 3}
    assert stops == []
    assert plugin.cut_at_stops("yes. no", ["", ".", " n"]) == "yes"
    assert plugin.clean_context("<image>\n<image> What is it?") == "What is it?"


# ---------------------------------------------------------------------- lmms-eval-shaped records of our runs


def _pope(root: Path) -> Path:
    rng = np.random.default_rng(3)
    lines = []
    for i, (word, label) in enumerate([("dog", "yes"), ("cat", "no"), ("car", "yes")]):
        name = f"COCO_val2014_{i:012d}.jpg"
        (root / "val2014").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / "val2014" / name)
        lines.append(json.dumps({"question_id": i + 1, "image": name, "text": f"Is there a {word} in the image?",
                                 "label": label}))
    (root / "coco_pope_random.json").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def pope_run(tmp_path_factory, tiny_mllm) -> Path:
    from innersight.eval.runner import evaluate

    root = tmp_path_factory.mktemp("lmms_samples")
    evaluate(tiny_mllm("llava"), "pope", _pope(root / "pope"), "random", [], None, root / "run", None, 2, 0,
             {"max_new_tokens": 3}, progress=False)
    return root / "run"


def test_run_rows_become_lmms_eval_sample_records(pope_run):
    rows = [json.loads(line) for line in (pope_run / "samples.jsonl").read_text().splitlines()]
    records = to_lmms_samples(pope_run)
    assert [r["doc_id"] for r in records] == [0, 1, 2]
    first = records[0]
    assert first["doc"]["question"] == "Is there a dog in the image?" and "image" not in first["doc"]
    assert first["doc"]["label"] == "yes" and [r["target"] for r in records] == ["yes", "no", "yes"]
    assert first["arguments"] == [rows[0]["question"], {"max_new_tokens": 3}, 0, "pope_random", "random"]
    assert first["arguments"][0].endswith("Answer the question using a single word or phrase.")
    assert [r["filtered_resps"] for r in records] == [[row["prediction"]] for row in rows]
    assert first["resps"] == [[rows[0]["prediction"]]] and first["token_counts"] == [None]
    assert [r["correct"] for r in records] == [row["score"]["correct"] for row in rows]
    assert first["innersight"]["id"] == "1" and first["innersight"]["error"] is None
    assert len(first["doc_hash"]) == 64
    # without reloading the data: the doc is the id and the question, the target the scorer's label
    bare = to_lmms_samples(pope_run, reload=False)
    assert bare[1]["doc"] == {"id": "2", "question": rows[1]["question"]} and bare[1]["target"] == "no"

    path = write_lmms_samples(pope_run)
    assert path.name == "lmms_samples_pope_random.jsonl"
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert written[0]["input"] == rows[0]["question"] and written[0]["filtered_resps"] == rows[0]["prediction"]
    assert "doc" not in written[0] and "arguments" not in written[0] and "resps" not in written[0]
    assert written[2]["target"] == "yes" and written[2]["doc_id"] == 2


def test_written_records_equal_what_lmms_eval_writes(pope_run, tmp_path):
    pytest.importorskip("lmms_eval")
    from lmms_eval.loggers.evaluation_tracker import EvaluationTracker

    records = to_lmms_samples(pope_run)
    tracker = EvaluationTracker(output_path=str(tmp_path))
    tracker.general_config_tracker.model_name_sanitized = "innersight"
    tracker.date_id = "today"
    tracker.save_results_samples("pope_random", copy.deepcopy(records))
    theirs = [json.loads(line) for line in
              (tmp_path / "innersight" / "today_samples_pope_random.jsonl").read_text().splitlines()]
    ours = [json.loads(line) for line in write_lmms_samples(pope_run, tmp_path / "ours.jsonl").read_text().splitlines()]
    assert ours == theirs
    assert ours == [json.loads(json.dumps(flatten(r))) for r in records]


def test_converter_command_line(pope_run, tmp_path, capsys):
    from innersight.integrations.lmms_samples import main

    main([str(pope_run), "-o", str(tmp_path / "x.jsonl")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "x.jsonl")
    assert len((tmp_path / "x.jsonl").read_text().splitlines()) == 3
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "nothing")])
    assert info.value.code == 2
    assert "config.json" in capsys.readouterr().err
