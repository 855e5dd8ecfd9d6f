"""Benchmark loaders on small fixtures of every official layout, built in tmp_path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from innersight.errors import UserInputError
from innersight.eval.benchmarks import BENCHMARKS, get_benchmark
from innersight.eval.benchmarks.chair import parse_image_ids
from innersight.eval.benchmarks.vstar import option_order
from innersight.eval.scorers import SCORERS, get_scorer
from innersight.eval.scorers.mme import SUBTASKS

SHORT = "\nAnswer the question using a single word or phrase."


def save_image(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (12, 9)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_json(path: Path, payload: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload), encoding="utf-8")
    return path


# ---------------------------------------------------------------------- registry


def test_registry_names_scorers_and_presets():
    assert set(BENCHMARKS) == {"textvqa", "vstar", "docvqa", "pope", "chair", "gqa", "aokvqa", "vqav2", "mme",
                               "micro-details", "micro-pope", "micro-chair", "amber-g", "amber-d", "hrbench"}
    for bench in BENCHMARKS.values():
        assert f"{bench.scorer}/canonical" in SCORERS, bench.name
        assert bench.default_preset() in bench.presets, bench.name
        assert bench.layout, bench.name
    with pytest.raises(UserInputError, match="unknown benchmark 'nope'"):
        get_benchmark("nope")


def test_importing_benchmarks_does_not_import_torch():
    code = ("import sys, innersight.eval.benchmarks as b; b.BENCHMARKS['pope']; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_load_validates_path_split_and_options(tmp_path):
    pope = get_benchmark("pope")
    with pytest.raises(UserInputError, match="needs --data"):
        pope.load(None, "random")
    with pytest.raises(UserInputError, match="does not exist"):
        pope.load(tmp_path / "missing", "random")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserInputError, match="must be a folder"):
        pope.load(tmp_path / "file.txt", "random")
    with pytest.raises(UserInputError, match="has no split 'sometimes'"):
        pope.load(tmp_path, "sometimes")
    with pytest.raises(UserInputError, match="takes no option image_ids"):
        pope.load(tmp_path, "random", image_ids="ids.txt")
    with pytest.raises(UserInputError, match="coco_pope_random.json not found"):
        pope.load(tmp_path, "random")


# ---------------------------------------------------------------------- TextVQA


def _textvqa(root: Path, nested: bool = False) -> Path:
    folder = root / ("train_val_images/train_images" if nested else "train_images")
    records = []
    for i, image_id in enumerate(["003a8ae2ef43b901", "00a5bc7e0d07dd4e", "0b2d2a4d2b0a6c22"]):
        save_image(folder / f"{image_id}.jpg")
        records.append({"question_id": 34602 + i, "question": f"what is written {i}?", "image_id": image_id,
                        "answers": [f"word{i}"] * 10, "set_name": "val"})
    write_json(root / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": records})
    return root


@pytest.mark.parametrize("nested", [False, True])
def test_textvqa_official_layout(tmp_path, nested):
    bench = get_benchmark("textvqa")
    samples = bench.load(_textvqa(tmp_path, nested), "val")
    assert [s["id"] for s in samples] == ["34602", "34603", "34604"]
    sub = "train_val_images/train_images" if nested else "train_images"
    assert samples[1]["image"] == str(tmp_path / sub / "00a5bc7e0d07dd4e.jpg")
    assert samples[1]["answers"] == ["word1"] * 10
    text, scored = bench.render(samples[0], bench.preset())
    assert text == "what is written 0?" + SHORT
    assert scored is samples[0]
    with pytest.raises(UserInputError, match="TextVQA_Rosetta_OCR_v0.2_val.json"):
        bench.render(samples[0], bench.preset("ocr"))


def test_textvqa_ocr_preset_reads_rosetta_tokens(tmp_path):
    root = _textvqa(tmp_path)
    write_json(root / "TextVQA_Rosetta_OCR_v0.2_val.json",
               {"data": [{"image_id": "003a8ae2ef43b901", "ocr_tokens": ["DAKOTA", "digital"]},
                         {"image_id": "00a5bc7e0d07dd4e", "ocr_tokens": []},
                         {"image_id": "0b2d2a4d2b0a6c22", "ocr_tokens": ["x"]}]})
    bench = get_benchmark("textvqa")
    samples = bench.load(root, "val")
    text, _ = bench.render(samples[0], bench.preset("ocr"))
    assert text == "what is written 0?\nReference OCR token: DAKOTA, digital" + SHORT


def test_textvqa_wrong_layout(tmp_path):
    write_json(tmp_path / "TextVQA_0.5.1_val.json", [{"question": "q"}])
    with pytest.raises(UserInputError, match=r"must hold \{'data'"):
        get_benchmark("textvqa").load(tmp_path)
    write_json(tmp_path / "TextVQA_0.5.1_val.json", {"data": [{"question": "q", "image_id": "a"}]})
    with pytest.raises(UserInputError, match="missing field"):
        get_benchmark("textvqa").load(tmp_path)
    write_json(tmp_path / "TextVQA_0.5.1_val.json",
               {"data": [{"question_id": 1, "question": "q", "image_id": "a", "answers": ["x"]}]})
    with pytest.raises(UserInputError, match="image 'a.jpg' not found"):
        get_benchmark("textvqa").load(tmp_path)


# ---------------------------------------------------------------------- V*Bench


def _vstar(root: Path) -> Path:
    for category, names, options in (
        ("direct_attributes", ["sa_4690", "sa_7"], ["rubber", "cotton", "leather", "wool"]),
        ("relative_position", ["sa_1"], ["left", "right"]),
    ):
        for name in names:
            save_image(root / category / f"{name}.jpg")
            write_json(root / category / f"{name}.json",
                       {"question": f"What about {name}?", "options": options, "target_object": ["glove"],
                        "bbox": [[1, 2, 3, 4]]})
    return root


def test_vstar_official_layout_and_splits(tmp_path):
    bench = get_benchmark("vstar")
    root = _vstar(tmp_path)
    samples = bench.load(root)  # default split: all
    assert [s["id"] for s in samples] == ["direct_attributes/sa_4690", "direct_attributes/sa_7",
                                          "relative_position/sa_1"]
    assert samples[0]["options"] == ["rubber", "cotton", "leather", "wool"]
    assert samples[0]["answer_index"] == 0 and samples[0]["category"] == "direct_attributes"
    assert len(bench.load(root, "relative_position")) == 1
    # likelihood preset (canonical): the question alone, official option order
    assert bench.preset().name == "likelihood"
    text, scored = bench.render(samples[0], bench.preset())
    assert text == "What about sa_4690?" and scored["options"][0] == "rubber"


def test_vstar_letter_preset_shuffles_and_scores_consistently(tmp_path):
    bench = get_benchmark("vstar")
    sample = bench.load(_vstar(tmp_path))[0]
    preset = bench.preset(None, "letter")
    assert preset.name == "letter"
    text, shown = bench.render(sample, preset)
    order = option_order(sample["id"], 4)
    assert sorted(order) == [0, 1, 2, 3]
    assert shown["options"] == [sample["options"][i] for i in order]
    assert shown["options"][shown["answer_index"]] == "rubber"  # the correct option, wherever it went
    letter = "ABCD"[shown["answer_index"]]
    assert f"({letter}) rubber" in text.splitlines()
    assert text.endswith("\nAnswer with the option's letter from the given choices directly.")
    assert get_scorer("vstar", "letter").score_one(f"({letter})", shown)["correct"] is True
    assert sample["options"][0] == "rubber"  # the loaded sample is not modified
    assert option_order(sample["id"], 4) == order  # deterministic


def test_vstar_layout_errors(tmp_path):
    bench = get_benchmark("vstar")
    with pytest.raises(UserInputError, match="direct_attributes, relative_position not found"):
        bench.load(tmp_path)
    _vstar(tmp_path)
    (tmp_path / "relative_position" / "sa_1.json").unlink()
    with pytest.raises(UserInputError, match="sa_1.jpg has no annotation sa_1.json"):
        bench.load(tmp_path)


# ---------------------------------------------------------------------- DocVQA


@pytest.mark.parametrize("inside_val", [False, True])
def test_docvqa_official_layout(tmp_path, inside_val):
    folder = tmp_path / "val" if inside_val else tmp_path
    save_image(folder / "documents" / "pybv0228_81.png")
    save_image(folder / "documents" / "xnbl0037_1.png")
    write_json(folder / "val_v1.0.json", {"dataset_split": "val", "data": [
        {"questionId": 49153, "question": "What is the ratio?", "image": "documents/pybv0228_81.png",
         "docId": 14465, "answers": ["0.28", "0.28 %"]},
        {"questionId": 24580, "question": "Who signed?", "image": "documents/xnbl0037_1.png",
         "docId": 1, "answers": ["J. Doe"]},
    ]})
    samples = get_benchmark("docvqa").load(tmp_path)
    assert [s["id"] for s in samples] == ["49153", "24580"]
    assert samples[0]["image"] == str(folder / "documents" / "pybv0228_81.png")
    assert samples[0]["answers"] == ["0.28", "0.28 %"]


def test_docvqa_test_split_and_missing_files(tmp_path):
    with pytest.raises(UserInputError, match="val_v1.0.json or val_v1.0_withQT.json not found"):
        get_benchmark("docvqa").load(tmp_path)
    write_json(tmp_path / "val_v1.0.json", {"data": [{"questionId": 1, "question": "q", "image": "documents/a.png"}]})
    with pytest.raises(UserInputError, match="has no answers"):
        get_benchmark("docvqa").load(tmp_path)


# ---------------------------------------------------------------------- POPE


def write_pope(root: Path, split_file: str = "coco_pope_random.json", n: int = 4, image_dir: str = "val2014") -> Path:
    lines = []
    for i in range(n):
        name = f"COCO_val2014_{i:012d}.jpg"
        save_image(root / image_dir / name, (i * 40 % 255, 90, 160))
        lines.append(json.dumps({"question_id": i + 1, "image": name,
                                 "text": f"Is there a {['dog', 'cat'][i % 2]} in the image?",
                                 "label": ["yes", "no"][i % 2]}))
    (root / split_file).parent.mkdir(parents=True, exist_ok=True)
    (root / split_file).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_pope_official_layout(tmp_path):
    bench = get_benchmark("pope")
    samples = bench.load(write_pope(tmp_path), "random")
    assert [s["id"] for s in samples] == ["1", "2", "3", "4"]
    assert samples[1] == {"id": "2", "image": str(tmp_path / "val2014" / "COCO_val2014_000000000001.jpg"),
                          "question": "Is there a cat in the image?", "label": "no", "question_id": 2,
                          "image_name": "COCO_val2014_000000000001.jpg"}
    text, _ = bench.render(samples[0], bench.preset())
    assert text == "Is there a dog in the image?" + SHORT
    assert bench.render(samples[0], bench.preset("plain"))[0] == "Is there a dog in the image?"


def test_pope_repository_places_and_other_sources(tmp_path):
    write_pope(tmp_path, "output/coco/coco_pope_adversarial.json")
    assert len(get_benchmark("pope").load(tmp_path, "adversarial")) == 4
    other = write_pope(tmp_path / "other", "aokvqa_pope_popular.json", n=2, image_dir="images")
    samples = get_benchmark("pope").load(other, "aokvqa-popular")
    assert samples[0]["image"] == str(other / "images" / "COCO_val2014_000000000000.jpg")
    with pytest.raises(UserInputError, match="gqa_pope_random.json not found"):
        get_benchmark("pope").load(other, "gqa-random")


def test_pope_missing_images_are_reported_before_the_run(tmp_path):
    write_pope(tmp_path, n=2, image_dir="elsewhere")
    with pytest.raises(UserInputError, match="image 'COCO_val2014_000000000000.jpg' not found"):
        get_benchmark("pope").load(tmp_path, "random")
    assert len(get_benchmark("pope").load(tmp_path, "random", images=tmp_path / "elsewhere")) == 2


def test_pope_bad_rows(tmp_path):
    (tmp_path / "coco_pope_random.json").write_text('{"question_id": 1, "image": "a.jpg", "text": "q"}\n')
    with pytest.raises(UserInputError, match="row 1: missing field"):
        get_benchmark("pope").load(tmp_path, "random")
    (tmp_path / "coco_pope_random.json").write_text('{"question_id": 1,\n')
    with pytest.raises(UserInputError, match="line 1 .* is not JSON"):
        get_benchmark("pope").load(tmp_path, "random")


# ---------------------------------------------------------------------- CHAIR


def _chair(root: Path) -> Path:
    images = [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"},
              {"id": 73, "file_name": "COCO_val2014_000000000073.jpg"},
              {"id": 99, "file_name": "COCO_val2014_000000000099.jpg"}]
    for img in images:
        save_image(root / "val2014" / img["file_name"])
    write_json(root / "annotations" / "instances_val2014.json", {
        "images": images,
        "categories": [{"id": 18, "name": "dog"}, {"id": 62, "name": "chair"}, {"id": 1, "name": "person"}],
        "annotations": [{"image_id": 42, "category_id": 18}, {"image_id": 42, "category_id": 18},
                        {"image_id": 73, "category_id": 62}],
    })
    write_json(root / "annotations" / "captions_val2014.json", {"annotations": [
        {"image_id": 42, "caption": "A man rides a bicycle next to his dog."},
        {"image_id": 42, "caption": "Two dogs on a street."},
        {"image_id": 73, "caption": "An empty room."},
        {"image_id": 99, "caption": "A plate of hot dogs."},
    ]})
    return root


def test_chair_ground_truth_from_instances_and_captions(tmp_path):
    root = _chair(tmp_path)
    ids = tmp_path / "ids.txt"
    ids.write_text("# CHAIR ids\n73\nCOCO_val2014_000000000042.jpg\n\n99\n")
    bench = get_benchmark("chair")
    samples = bench.load(root, "val2014", image_ids=ids)
    assert [s["id"] for s in samples] == ["73", "42", "99"]  # the order of the list
    assert samples[1]["gt_objects"] == ["bicycle", "dog", "person"]  # instances + 'man', 'bicycle'
    assert samples[0]["gt_objects"] == ["chair"]
    assert samples[2]["gt_objects"] == ["hot dog"]  # a phrase, not a dog
    assert samples[1]["image"] == str(root / "val2014" / "COCO_val2014_000000000042.jpg")
    assert bench.render(samples[0], bench.preset())[0] == "Please describe this image in detail."
    assert bench.preset().max_new_tokens == 512
    assert bench.render(samples[0], bench.preset("damro"))[0] == "Generate a short caption of this image."


def test_chair_needs_an_id_list_and_known_ids(tmp_path):
    root = _chair(tmp_path)
    with pytest.raises(UserInputError, match="pass --image-ids"):
        get_benchmark("chair").load(root)
    ids = tmp_path / "ids.json"
    ids.write_text("[42, 5]")
    with pytest.raises(UserInputError, match=r"1 image id\(s\) are not in the COCO annotations \(first: 5\)"):
        get_benchmark("chair").load(root, image_ids=ids)
    ids.write_text("42\n42\n")
    with pytest.raises(UserInputError, match="occurs twice"):
        parse_image_ids(ids)
    (root / "annotations" / "captions_val2014.json").unlink()
    ids.write_text("42\n")
    with pytest.raises(UserInputError, match="captions_val2014.json are needed"):
        get_benchmark("chair").load(root, image_ids=ids)


# ---------------------------------------------------------------------- GQA, A-OKVQA, VQAv2


def test_gqa_official_layout(tmp_path):
    save_image(tmp_path / "images" / "n161313.jpg")
    save_image(tmp_path / "images" / "n99.jpg")
    write_json(tmp_path / "testdev_balanced_questions.json", {
        "20968379": {"imageId": "n161313", "question": "Is the sky blue?", "answer": "yes",
                     "fullAnswer": "Yes, the sky is blue.", "types": {"structural": "verify"}},
        "201307251": {"imageId": "n99", "question": "What color is the car?", "answer": "red"},
    })
    samples = get_benchmark("gqa").load(tmp_path)
    assert [s["id"] for s in samples] == ["20968379", "201307251"]
    assert samples[0]["answer"] == "yes" and samples[0]["image"] == str(tmp_path / "images" / "n161313.jpg")
    assert get_scorer("gqa").score_one("Yes", samples[0])["correct"] is True
    with pytest.raises(UserInputError, match="val_balanced_questions.json not found"):
        get_benchmark("gqa").load(tmp_path, "val")


def test_aokvqa_official_layout(tmp_path):
    save_image(tmp_path / "val2017" / "000000461751.jpg")
    write_json(tmp_path / "aokvqa_v1p0_val.json", [
        {"split": "val", "image_id": 461751, "question_id": "22jbM6gDxdaMaunuzgrsBB", "question": "What is he holding?",
         "choices": ["bat", "ball", "cup", "hat"], "correct_choice_idx": 0, "direct_answers": ["bat"] * 9 + ["stick"],
         "difficult_direct_answer": False, "rationales": ["..."]},
    ])
    [sample] = get_benchmark("aokvqa").load(tmp_path)
    assert sample["id"] == "22jbM6gDxdaMaunuzgrsBB"
    assert sample["image"] == str(tmp_path / "val2017" / "000000461751.jpg")
    assert sample["answers"] == ["bat"] * 9 + ["stick"]
    assert get_scorer("aokvqa").score_one("stick", sample)["accuracy"] == pytest.approx(0.3)


def test_vqav2_official_layout(tmp_path):
    save_image(tmp_path / "val2014" / "COCO_val2014_000000262148.jpg")
    write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": [
        {"image_id": 262148, "question": "Where is he looking?", "question_id": 262148000},
        {"image_id": 262148, "question": "What is he on?", "question_id": 262148001},
    ]})
    answers = [{"answer": "down", "answer_confidence": "yes", "answer_id": k} for k in range(1, 11)]
    write_json(tmp_path / "annotations" / "v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": 262148000, "image_id": 262148, "answers": answers, "answer_type": "other"},
        {"question_id": 262148001, "image_id": 262148, "answers": answers[:3], "answer_type": "other"},
    ]})
    samples = get_benchmark("vqav2").load(tmp_path)
    assert [s["id"] for s in samples] == ["262148000", "262148001"]
    assert samples[0]["answers"] == ["down"] * 10
    assert samples[1]["image"] == str(tmp_path / "val2014" / "COCO_val2014_000000262148.jpg")
    write_json(tmp_path / "annotations" / "v2_mscoco_val2014_annotations.json", {"annotations": []})
    with pytest.raises(UserInputError, match=r"2 question\(s\) have no annotation"):
        get_benchmark("vqav2").load(tmp_path)


# ---------------------------------------------------------------------- MME


SPLIT_SHAPE = {"artwork", "celebrity", "landmark", "posters", "scene"}


def _mme(root: Path) -> Path:
    for subtask in SUBTASKS:
        folder = root / subtask
        if subtask in SPLIT_SHAPE:
            save_image(folder / "images" / "10002.jpg")
            text = folder / "questions_answers_YN" / "10002.txt"
        else:
            save_image(folder / "000000006040.jpg" if subtask != "OCR" else folder / "0001.png")
            text = folder / ("0001.txt" if subtask == "OCR" else "000000006040.txt")
        text.parent.mkdir(parents=True, exist_ok=True)
        text.write_text(f"Is this {subtask}? Please answer yes or no.\tYes\r\n"
                        f"Is this not {subtask}? Please answer yes or no.\tNo\n\n", encoding="utf-8")
    return root


def test_mme_both_official_shapes(tmp_path):
    root = _mme(tmp_path / "MME_Benchmark_release_version" / "MME_Benchmark")
    bench = get_benchmark("mme")
    samples = bench.load(tmp_path)  # finds MME_Benchmark_release_version/MME_Benchmark
    assert len(samples) == 28
    artwork = [s for s in samples if s["category"] == "artwork"]
    assert [s["id"] for s in artwork] == ["artwork/10002.jpg/0", "artwork/10002.jpg/1"]
    assert artwork[0]["image"] == str(root / "artwork" / "images" / "10002.jpg")
    assert [s["answer"] for s in artwork] == ["yes", "no"]
    ocr = [s for s in samples if s["category"] == "OCR"]
    assert ocr[0]["image"] == str(root / "OCR" / "0001.png") and ocr[0]["image_id"] == "OCR/0001.png"
    assert bench.render(ocr[1], bench.preset())[0] == "Is this not OCR? Please answer yes or no."
    assert [s["category"] for s in bench.load(tmp_path, "hallucination")][::2] == [
        "existence", "count", "position", "color"]
    assert len(bench.load(tmp_path, "code_reasoning")) == 2
    # scoring through the loaded samples: both right for existence -> 200
    rows = [get_scorer("mme").score_one(p, s) for p, s in zip(["Yes", "No"], bench.load(tmp_path, "existence"))]
    assert get_scorer("mme").aggregate(rows)["existence/score"] == 200.0


def test_mme_listing_format_and_errors(tmp_path):
    folder = tmp_path / "existence"
    save_image(folder / "a.jpg")
    save_image(folder / "b.jpg")
    (folder / "existence.txt").write_text("a.jpg\tIs there a dog?\tYes\tNo\nb.jpg\tIs there a cat?\tNo\n")
    samples = get_benchmark("mme").load(tmp_path, "existence")
    assert [(s["id"], s["answer"]) for s in samples] == [("existence/a.jpg/0", "yes"), ("existence/b.jpg/0", "no")]
    with pytest.raises(UserInputError, match="subtask folder\\(s\\) count, position, color missing"):
        get_benchmark("mme").load(tmp_path, "hallucination")
    (folder / "existence.txt").write_text("a.jpg\tIs there a dog?\tMaybe\n")
    with pytest.raises(UserInputError, match="answer must be Yes or No"):
        get_benchmark("mme").load(tmp_path, "existence")
    with pytest.raises(UserInputError, match="no subtask folder"):
        get_benchmark("mme").load(tmp_path / "existence", "existence")
