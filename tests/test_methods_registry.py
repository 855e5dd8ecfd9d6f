"""The method registry and plan validation."""

from __future__ import annotations

import pytest

from innersight.errors import MethodError
from innersight.methods import METHODS, MethodSpec, register, resolve_methods


def test_unknown_method_lists_available():
    with pytest.raises(MethodError, match="unknown method 'nope'"):
        resolve_methods(["nope"])


def test_no_methods_is_plain_plan():
    assert resolve_methods(None).names == ()
    assert resolve_methods([]).names == ()


def test_two_input_methods_refused(monkeypatch):
    monkeypatch.setattr("innersight.methods.METHODS", METHODS.copy())
    register(MethodSpec("in-a", "input", "a", "builtins:object"))
    register(MethodSpec("in-b", "input", "b", "builtins:object"))
    with pytest.raises(MethodError, match="input point"):
        resolve_methods(["in-a", "in-b"])
    with pytest.raises(MethodError, match="given twice"):
        resolve_methods(["in-a", "in-a"])
    assert resolve_methods("in-a").names == ("in-a",)


def test_register_rejects_bad_point_and_duplicates(monkeypatch):
    monkeypatch.setattr("innersight.methods.METHODS", METHODS.copy(entries=False))
    register(MethodSpec("m", "decoding", "s", "x:y"))
    with pytest.raises(ValueError, match="twice"):
        register(MethodSpec("m", "decoding", "s", "x:y"))
    with pytest.raises(ValueError, match="intervention point"):
        register(MethodSpec("z", "output", "s", "x:y"))


def test_set_overrides_are_parsed_by_field_type():
    plan = resolve_methods(["vicrop-rel-att"], {"vicrop": {"layer": "3", "ratios": "1,1.5", "official": "true"}})
    (method,) = plan.objects
    assert method.config.variant == "rel-att"
    assert method.config.layer == 3
    assert method.config.ratios == (1.0, 1.5)
    assert method.config.official is True


def test_set_errors():
    with pytest.raises(MethodError, match="no field 'nope'"):
        resolve_methods(["vicrop-rel-att"], {"vicrop": {"nope": "1"}})
    with pytest.raises(MethodError, match="cannot use 'abc'"):
        resolve_methods(["vicrop-rel-att"], {"vicrop": {"layer": "abc"}})
    with pytest.raises(MethodError, match="no such method was chosen"):
        resolve_methods(["vicrop-rel-att"], {"deco": {"alpha": "1"}})
    with pytest.raises(MethodError, match="variant must be one of"):
        resolve_methods(["vicrop-rel-att"], {"vicrop": {"variant": "magic"}})


def test_methods_at_different_points_compose_and_same_point_is_refused():
    plan = resolve_methods(["deco", "vicrop-rel-att", "var"])
    assert {s.point for s in plan.specs} == {"input", "attention", "decoding"}
    with pytest.raises(MethodError, match="decoding point"):
        resolve_methods(["deco", "dola"])
