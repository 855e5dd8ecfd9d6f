"""One name per method: ``--set`` takes the method's own name (``vicrop-rel-att.layer=2``) and the
key its variants share (``vicrop.layer=2``); results key everything by the method's name."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from innersight.errors import MethodError
from innersight.methods import resolve_methods
from innersight.testing.cli import run_cli


@pytest.mark.parametrize("key", ["vicrop-rel-att", "vicrop"])
def test_set_accepts_the_method_name_and_the_shared_key(key):
    plan = resolve_methods(["vicrop-rel-att"], {key: {"layer": "2"}})
    (method,) = plan.objects
    assert method.config.layer == 2 and method.config.variant == "rel-att"
    assert plan.settings == {"vicrop-rel-att": {"layer": "2"}}  # one name, whichever was typed
    assert plan.configs()["vicrop-rel-att"]["layer"] == 2


def test_both_names_merge_and_a_clash_is_refused():
    plan = resolve_methods(["vicrop-grad-att"], {"vicrop": {"layer": "2"}, "vicrop-grad-att": {"official": "true"}})
    assert plan.settings == {"vicrop-grad-att": {"layer": "2", "official": "true"}}
    assert plan.objects[0].config.layer == 2 and plan.objects[0].config.official is True
    with pytest.raises(MethodError, match="set twice"):
        resolve_methods(["vicrop-rel-att"], {"vicrop": {"layer": "2"}, "vicrop-rel-att": {"layer": "3"}})


def test_a_variant_not_chosen_and_an_unknown_name_are_named():
    with pytest.raises(MethodError, match=r"vicrop-grad-att but no such method was chosen; methods chosen: "
                                          r"vicrop-rel-att \(or vicrop\)"):
        resolve_methods(["vicrop-rel-att"], {"vicrop-grad-att": {"layer": "2"}})
    with pytest.raises(MethodError, match="which is no method"):
        resolve_methods(["deco"], {"decoo": {"alpha": "1"}})


def test_the_name_fixes_the_variant():
    with pytest.raises(MethodError, match="vicrop-rel-att fixes variant='rel-att'.*vicrop-grad-att"):
        resolve_methods(["vicrop-rel-att"], {"vicrop-rel-att": {"variant": "grad-att"}})
    assert resolve_methods(["vicrop-rel-att"], {"vicrop": {"variant": "rel-att"}}).objects[0].config.variant == "rel-att"


def test_cli_set_by_method_name_and_results_use_it(capsys, tiny_dir, tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (80, 50), "red").save(image)
    code, out, err = run_cli("answer", "--model", str(tiny_dir("llava")), "--image", str(image),
                             "--question", "what is the color?", "--max-new-tokens", "2", "--json",
                             "--method", "vicrop-rel-att", "--set", "vicrop-rel-att.layer=1")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["details"]["configs"]["vicrop-rel-att"]["layer"] == 1
    assert payload["details"]["vicrop-rel-att"]["variant"] == "rel-att"
    assert "vicrop" not in payload["details"]  # one name in results


def test_list_shows_both_names(capsys):
    code, out, _ = run_cli("list", "--json")
    assert code == 0
    methods = {m["name"]: m for m in json.loads(out)["methods"]}
    assert methods["vicrop-rel-att"]["set_names"] == ["vicrop-rel-att", "vicrop"]
    assert methods["deco"]["set_names"] == ["deco"]
    code, out, _ = run_cli("list")
    lines = out.splitlines()
    row = next(i for i, line in enumerate(lines) if "vicrop-pure-grad " in line)  # not cut at 80 columns
    assert code == 0 and "--set" in out and "or vicrop " in lines[row + 1]
