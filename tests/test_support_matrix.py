"""The method x family support matrix (``innersight list``) is computed from facts, and it is true.

- the fold: a cell is the weakest level among its method's needs, with the notes of that level
  (throw-away methods and adapter classes, no model);
- ``innersight list`` shows the matrix (table with legend and notes; ``--json`` with the reasons);
- truth, on the tiny models: every family fact a family states (or not) at class level agrees with
  its adapter on a loaded model, and every method runs on every family where the matrix says
  ``yes`` / ``substitute`` and raises ``MethodError`` with the matrix's reason where it says
  ``refuses``. Parametrised from the registries: a new family or method is covered by registering it.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import numpy as np
import pytest
from PIL import Image

from innersight import support
from innersight.adapters import FAMILIES
from innersight.adapters.base import FAMILY_FACTS, NO_VISION_CLS, OPTIONAL_MEMBERS, SUPPORT_LEVELS, Adapter
from innersight.errors import MethodError
from innersight.methods import METHODS, MethodSpec, register
from innersight.testing.cli import run_cli

#: settings that fit a method's paper defaults to the 2-layer tiny models (not to a family): PAI's
#: first layer is 2, DAMRO keeps k = 10 outliers (a tiny image has 4..16 tokens), ViCrop reads
#: InstructBLIP's Q-Former block 2 (the tiny Q-Former has 2; every other family ignores the field)
TINY_SETTINGS: dict[str, dict[str, str]] = {
    "pai": {"start_layer": "0"},
    "damro": {"k": "2"},
    "vicrop": {"qformer_block": "-1"},
}


def _tiny_settings(spec: MethodSpec) -> dict[str, dict[str, str]]:
    """The :data:`TINY_SETTINGS` that apply to ``spec`` (under its name or its shared key)."""
    return {key: TINY_SETTINGS[key] for key in dict.fromkeys((spec.name, spec.key)) if key in TINY_SETTINGS}


# ---------------------------------------------------------------------- the fold, no model
class _Bare(Adapter):
    """An adapter class that provides no optional member and states no substitute."""

    family = "bare"
    architectures = ("Nothing",)
    language_model = vision_tower = None  # type: ignore[assignment]

    def num_image_tokens(self, batch: Any, image_index: int, size: tuple[int, int]) -> int:
        return 0

    def views(self, batch: Any, image_index: int, size: tuple[int, int]) -> tuple:
        return ()


class _NoCls(_Bare):
    """Provides every optional member; its vision encoder has no [CLS]."""

    family = "no-cls"
    substitutes: ClassVar[dict[str, str]] = {"vision_has_cls": NO_VISION_CLS}

    def pixel_view(self, batch: Any, tensor: Any, sample: int) -> Any:
        return tensor, None

    @property
    def vision_subset_source(self) -> Any:
        return None


@pytest.fixture
def fake_registries(monkeypatch):
    """Two throw-away methods and the two fake families above, in place of the real registries."""
    methods = METHODS.copy(entries=False)
    monkeypatch.setattr("innersight.methods.METHODS", methods)
    monkeypatch.setattr(support, "METHODS", methods)
    register(MethodSpec("plain-m", "decoding", "needs nothing", "x:y"))
    register(MethodSpec("both-m", "decoding", "needs a subset and a [CLS]", "x:y",
                        needs=("vision_subset_source", "vision_has_cls")))
    families = {"bare": _Bare, "no-cls": _NoCls}
    monkeypatch.setattr(support, "FAMILIES", tuple(families))
    monkeypatch.setattr(support, "adapter_class", families.__getitem__)


def test_a_cell_is_the_weakest_of_its_needs(fake_registries):
    matrix = support.support_matrix()
    assert set(matrix) == {"plain-m", "both-m"} and set(matrix["both-m"]) == {"bare", "no-cls"}
    assert matrix["plain-m"]["bare"] == support.Cell("yes") == matrix["plain-m"]["no-cls"]
    # bare lacks the optional member (refuses) and states no substitute (its [CLS] is a yes):
    # only the refusal is noted
    assert matrix["both-m"]["bare"] == support.Cell(
        "refuses", (("vision_subset_source", OPTIONAL_MEMBERS["vision_subset_source"]),))
    assert matrix["both-m"]["no-cls"] == support.Cell("substitute", (("vision_has_cls", NO_VISION_CLS),))
    assert matrix["both-m"]["no-cls"].mark == support.MARKS["substitute"]
    notes = support.grouped_notes(matrix)
    assert ("both-m", "substitute", f"vision_has_cls: {NO_VISION_CLS}", ["no-cls"]) in notes
    assert len(notes) == 2


def test_facet_support_is_read_from_the_class():
    assert _Bare.support("pixel_view") == ("refuses", OPTIONAL_MEMBERS["pixel_view"])
    assert _NoCls.support("pixel_view") == ("yes", "")
    assert _Bare.support("vision_has_cls") == ("yes", "")
    assert _NoCls.support("vision_has_cls") == ("substitute", NO_VISION_CLS)
    with pytest.raises(ValueError, match="unknown facet 'colour'"):
        _Bare.support("colour")
    with pytest.raises(ValueError, match="no optional adapter member"):
        _Bare.implements("vision_has_cls")


def test_a_bare_family_refuses_with_the_reason_the_matrix_shows():
    bare = _Bare(model=None, processor=None)
    with pytest.raises(MethodError, match="pure-grad") as pixel:
        bare.pixel_view(None, None, 0)
    assert str(pixel.value) == f"bare: {OPTIONAL_MEMBERS['pixel_view']}"
    with pytest.raises(MethodError) as subset:
        bare.vision_subset_source  # noqa: B018
    assert str(subset.value) == f"bare: {OPTIONAL_MEMBERS['vision_subset_source']}"


def test_register_rejects_an_unknown_need(monkeypatch):
    monkeypatch.setattr("innersight.methods.METHODS", METHODS.copy(entries=False))
    with pytest.raises(ValueError, match="unknown facet"):
        register(MethodSpec("m", "decoding", "s", "x:y", needs=("a_cls_token",)))


def test_the_real_matrix_covers_every_method_and_family():
    matrix = support.support_matrix()
    assert list(matrix) == list(METHODS)
    for row in matrix.values():
        assert list(row) == list(FAMILIES)
        for cell in row.values():
            assert cell.support in SUPPORT_LEVELS
            assert bool(cell.notes) == (cell.support != "yes")
    for spec in METHODS.values():
        assert all(n in OPTIONAL_MEMBERS or n in FAMILY_FACTS for n in spec.needs)
    assert METHODS["damro"].needs and METHODS["vicrop-pure-grad"].needs == ("pixel_view",)


# ---------------------------------------------------------------------- innersight list
def test_list_json_has_the_matrix_with_reasons(capsys):
    code, out, err = run_cli("list", "--json")
    assert code == 0, err
    data = json.loads(out)
    matrix = data["support_matrix"]
    assert set(matrix["levels"]) == set(SUPPORT_LEVELS)
    assert set(matrix["facets"]) == {*OPTIONAL_MEMBERS, *FAMILY_FACTS}
    assert matrix["families"] == list(FAMILIES)
    assert set(matrix["cells"]) == set(METHODS)
    expected = support.support_matrix()
    for method, row in matrix["cells"].items():
        for family, cell in row.items():
            assert cell == expected[method][family].to_json()
    needs = {m["name"]: m["needs"] for m in data["methods"]}
    assert needs["damro"] == list(METHODS["damro"].needs)


def test_list_table_shows_marks_legend_and_notes(capsys):
    code, out, err = run_cli("list")
    assert code == 0, err
    assert "Method x family support" in out
    flat = " ".join(out.split())  # the terminal wraps long lines
    for level, text in support.LEGEND.items():
        assert f"{support.MARKS[level]} {level}: {text}" in flat
    for method, level, reason, where in support.grouped_notes(support.support_matrix()):
        assert f"{support.MARKS[level]} {method} on {', '.join(where)}: {' '.join(reason.split())}" in flat
    matrix_part = out[out.index("Method x family support"):].splitlines()
    damro = next(line for line in matrix_part if line.lstrip("│ ").startswith("damro "))
    marks = [c for c in damro.split("│")[2:] if c.strip()]
    assert [m.strip() for m in marks] == [c.mark for c in support.support_matrix()["damro"].values()]


# ---------------------------------------------------------------------- truth, on the tiny models
@pytest.mark.parametrize("family", FAMILIES)
def test_family_facts_stated_at_class_level_hold_on_the_model(tiny_mllm, family):
    """A family states a substitute for a fact exactly where its adapter, on a loaded model, says the
    model lacks it (``innersight list`` reads the class; the methods read the loaded adapter)."""
    adapter = tiny_mllm(family).adapter
    for fact in FAMILY_FACTS:
        stated_missing = fact in type(adapter).substitutes
        assert bool(getattr(adapter, fact)) is not stated_missing, (
            f"{family}: {fact} is {getattr(adapter, fact)} on the model but the class "
            f"{'states' if stated_missing else 'does not state'} a substitute for it")


def _image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8))


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_cell_of_the_matrix_holds(tiny_mllm, family, method):
    """yes / substitute: the method answers; refuses: MethodError carrying every noted reason."""
    cell = support.cell(method, family)
    mllm = tiny_mllm(family)
    settings = _tiny_settings(METHODS[method])
    if cell.support == "refuses":
        with pytest.raises(MethodError) as refused:
            mllm.answer(_image(), "What is in the picture?", methods=[method], settings=settings, max_new_tokens=2)
        for _, reason in cell.notes:
            assert reason in str(refused.value)
        return
    result = mllm.answer(_image(), "What is in the picture?", methods=[method], settings=settings, max_new_tokens=2)
    assert result.methods == (method,) and 1 <= len(result.token_ids) <= 2
