"""The three intervention points' protocols: every registered method satisfies its point's."""

from __future__ import annotations

from contextlib import nullcontext

import pytest

from innersight.errors import MethodError
from innersight.flow import Plan
from innersight.methods import METHODS, MethodSpec
from innersight.points import (
    PROTOCOLS,
    AttentionMethod,
    BenchmarkGeneration,
    Configured,
    DecodingMethod,
    InputMethod,
    OverridesGeneration,
)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_registered_method_satisfies_its_points_protocol(name):
    spec = METHODS[name]
    method = spec.build()
    assert isinstance(method, PROTOCOLS[spec.point]), f"{name} lacks its {spec.point} hook"
    others = [p for point, p in PROTOCOLS.items() if point != spec.point]
    assert not any(isinstance(method, p) for p in others), f"{name} also looks like another point's method"
    assert isinstance(method, Configured)


def test_optional_hooks_are_where_the_methods_say():
    assert isinstance(METHODS["damro"].build(), OverridesGeneration)
    assert not isinstance(METHODS["deco"].build(), OverridesGeneration)
    assert isinstance(METHODS["vicrop-rel-att"].build(), BenchmarkGeneration)


class _Attend:
    def activate(self, mllm, batch):
        return nullcontext()


def test_plan_typed_lists_check_each_object_against_its_point():
    specs = (MethodSpec("a", "attention", "s", "x:y"), MethodSpec("d", "decoding", "s", "x:y"))
    plan = Plan(specs, (_Attend(), object()))
    assert plan.input_methods == [] and len(plan.attention_methods) == 1
    assert isinstance(plan.attention_methods[0], AttentionMethod)
    with pytest.raises(MethodError, match=r"'d' is registered at the decoding point but object has no processors\(\)"):
        _ = plan.decoding_methods
    assert not isinstance(object(), InputMethod) and not isinstance(_Attend(), DecodingMethod)
