"""The command line's bad-input corpus: every row is one line on stderr, exit code 2, no traceback.

``FLAG_CASES`` is a table ``flag -> [(bad value, expected message fragment, only these commands)]``.
Each row runs for *every* command that takes the flag (read off the typer app itself), with that
command's otherwise valid ``BASE`` arguments. A new command joins the corpus by adding its
``BASE`` entry (a test fails until it has one); a new flag or bad value by adding a row.
Every case is rejected before a model is loaded or any sample is answered, so the table runs fast.
"""

from __future__ import annotations

import os

import pytest
import typer
from PIL import Image

from innersight.cli import app
from innersight.testing.cli import run_cli

# ---------------------------------------------------------------------- the table

#: command -> its valid arguments ({img}: an image file, {tmp}: a fresh folder). Never run as
#: they are: every case changes one flag to a bad value.
BASE: dict[str, list[str]] = {
    "answer": ["--model", "micro", "--image", "{img}", "--question", "what is it?"],
    "explain": ["--model", "micro", "--image", "{img}", "--question", "what is it?", "-o", "{tmp}/e.png"],
    "eval": ["--benchmark", "micro-details", "--model", "micro", "-o", "{tmp}/runs", "--limit", "1"],
    "measure": ["sinks", "--model", "micro", "-o", "{tmp}/m", "--limit", "1"],
    "sinks": ["--model", "micro", "-o", "{tmp}/s.png", "--limit", "1"],
    "demo": ["--n", "1", "--method", "deco", "-o", "{tmp}/demo"],
    "report": ["{tmp}", "-o", "{tmp}/r.png"],
}
#: commands with no flag to misuse through this table (their own tests cover them)
NOT_IN_TABLE = {"list", "train-micro"}

#: (bad value, expected fragment of the one-line message, commands it applies to or None = all
#: commands that take the flag). {file}: an existing text file, {dir}: an existing folder,
#: {pngdir}: an existing folder named like a .png, {fifo}: a named pipe, {empty}: an empty file.
FLAG_CASES: dict[str, list[tuple[str, str, set[str] | None]]] = {
    "--device": [
        ("tpu", "unknown device 'tpu'; use one of cpu, cuda, cuda:N", None),
        ("cuda:99", "device 'cuda:99' requested", None),
        ("cpu:x", "unknown device", None),
    ],
    "--output": [
        ("{file}/sub/out.png", "which is a file", None),
        ("/proc/innersight-no-such-dir/out.png", "cannot write in /proc", None),
        ("{pngdir}", "is a folder", {"explain", "sinks", "report"}),
        ("{file}", "is a file, not a folder", {"eval", "measure", "demo"}),
        ("{tmp}/out.jpg", "must be a .png file", {"explain", "sinks", "report"}),
    ],
    "--image": [
        ("{tmp}/MISSING.png", "MISSING.png: no such file", None),
        ("{file}", "not an image file", None),
        ("{dir}", "is a directory", None),
        ("{empty}", "file is empty", None),
        ("{fifo}", "not a regular file", None),
        ("https://example.com/street.jpg", "https://example.com/street.jpg: URLs are not fetched", None),
    ],
    "--question": [("   ", "the question is empty", None)],
    "--method": [
        ("no-such-method", "unknown method", {"answer", "eval", "demo"}),
        ("deco", "rel-att, grad-att or pure-grad", {"explain"}),
    ],
    "--set": [
        ("deco.alpha", "--set expects method.field=value", None),
        ("deco.alpha=0.5", "no --method", {"answer", "eval"}),
    ],
    "--dtype": [("int3", "unknown dtype 'int3'", None)],
    "--max-new-tokens": [("0", "--max-new-tokens must be at least 1", None)],
    "--limit": [("0", "--limit must be at least 1", None)],
    "--batch-size": [("0", "--batch-size must be at least 1", None)],
    "--model": [("{tmp}/no-model-here", "no such directory", None), ("{dir}", "no config.json", None)],
    "--benchmark": [("no-such-bench", "no-such-bench", None)],
    "--split": [("no-such-split", "no-such-split", None)],
    "--scorer-variant": [("bogus", "benchmark 'micro-details' has no variant 'bogus'", None)],
    "--option": [("no-equals-sign", "--option expects name=value", None)],
    "--n": [("0", "--n must be at least 1", None)],
}


def _takes() -> dict[str, set[str]]:
    """command name -> the long option names it takes (from the typer app itself)."""
    group = typer.main.get_command(app)
    out: dict[str, set[str]] = {}
    for name, command in group.commands.items():
        out[name] = {opt for param in command.params for opt in getattr(param, "opts", []) if opt.startswith("--")}
    return out


TAKES = _takes()
CASES = [
    pytest.param(command, flag, value, fragment, id=f"{command} {flag} {value}")
    for flag, rows in FLAG_CASES.items()
    for value, fragment, only in rows
    for command in sorted(BASE)
    if flag in TAKES[command] and (only is None or command in only)
]


# ---------------------------------------------------------------------- running it


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    img = root / "red.png"
    Image.new("RGB", (64, 48), "red").save(img)
    text = root / "notes.txt"
    text.write_text("hello, not an image")
    empty = root / "empty.png"
    empty.write_bytes(b"")
    folder = root / "folder"
    folder.mkdir()
    pngdir = root / "folder.png"
    pngdir.mkdir()
    fifo = root / "pipe.png"
    os.mkfifo(fifo)
    return {"img": img, "file": text, "empty": empty, "dir": folder, "pngdir": pngdir, "fifo": fifo}


def with_flag(args: list[str], flag: str, value: str) -> list[str]:
    """``args`` with ``flag`` set to ``value`` (replacing its value if ``args`` has it; ``-o`` is
    ``--output``)."""
    out = list(args)
    names = {flag, "-o"} if flag == "--output" else {flag}
    for i, arg in enumerate(out[:-1]):
        if arg in names:
            out[i + 1] = value
            return out
    return [*out, flag, value]




def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert fragment in lines[0], err


def test_every_command_is_in_the_table():
    assert set(TAKES) == set(BASE) | NOT_IN_TABLE, "a new command needs a BASE entry in this corpus"
    for flag in FLAG_CASES:
        assert any(flag in TAKES[c] for c in BASE), f"no command takes {flag}"


def test_every_device_taking_command_is_covered():
    covered = {c for c in BASE if "--device" in TAKES[c]}
    assert covered == {"answer", "explain", "eval", "measure", "sinks", "demo"}
    assert {c for c in BASE if "--output" in TAKES[c]} == {"explain", "eval", "measure", "sinks", "demo", "report"}


@pytest.mark.parametrize("command, flag, value, fragment", CASES)
def test_bad_input_is_one_line(capsys, tmp_path, paths, command, flag, value, fragment):
    fill = {**{k: str(v) for k, v in paths.items()}, "tmp": str(tmp_path)}
    args = [a.format(**fill) for a in BASE[command]]
    args = with_flag(args, flag, value.format(**fill))
    code, _, err = run_cli([command, *args])
    assert_one_line_error(code, err, fragment.format(**fill))
    if flag == "--output":
        assert not any(tmp_path.rglob("*.json")), "a rejected command must not start writing"


@pytest.mark.parametrize("args, fragment", [
    (["--steps", "0"], "--steps must be at least 1, not 0"),
    (["--steps", "2", "--device", "tpu"], "unknown device 'tpu'"),
    (["--steps", "2", "--minutes", "-1"], "--minutes must be positive"),
    (["--steps", "2", "--vision-steps", "-1"], "--vision-steps must be at least 0"),
    (["--steps", "2", "--out", "{file}"], "is a file, not a folder"),
    (["--out", "{tmp}/m"], "give --minutes or --steps"),
])
def test_train_micro_bad_input_is_one_line(capsys, tmp_path, paths, args, fragment):
    fill = {"file": str(paths["file"]), "tmp": str(tmp_path)}
    args = [a.format(**fill) for a in args]
    if "--out" not in args:
        args = ["--out", str(tmp_path / "m"), *args]
    code, _, err = run_cli(["train-micro", *args])
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "m").exists()


def test_train_micro_steps_bound_stage_one(monkeypatch, tmp_path):
    """``--steps N`` alone is a short run: stage 1 takes at most N steps too; an explicit
    ``--vision-steps`` wins."""
    from innersight.demo import train

    seen = {}
    monkeypatch.setattr(train, "run", lambda out, **kw: seen.update(kw))
    assert train.main(["--out", str(tmp_path / "a"), "--steps", "7"]) == 0
    assert seen["steps"] == 7 and seen["cfg"].vision_steps == 7
    assert train.main(["--out", str(tmp_path / "b"), "--steps", "7", "--vision-steps", "0"]) == 0
    assert seen["cfg"].vision_steps == 0
    assert train.main(["--out", str(tmp_path / "c"), "--steps", "4000", "--vision-steps", "2000"]) == 0
    assert seen["cfg"].vision_steps == 2000
    assert train.main(["--out", str(tmp_path / "d"), "--minutes", "5"]) == 0
    assert seen["cfg"].vision_steps == train.TrainConfig.vision_steps
