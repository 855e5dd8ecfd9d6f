"""The one registry idiom (innersight.registry.Registry) and the registries built on it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from innersight.errors import MethodError, UnsupportedModelError, UserInputError
from innersight.registry import Registry, import_target


def test_entries_keep_registration_order_and_names_taken_are_refused():
    reg: Registry[int] = Registry("number")
    reg.register("two", 2)
    reg.register("one", 1)
    reg["three"] = 3

    @reg.register("four")
    def four() -> int:
        return 4

    assert list(reg) == ["two", "one", "three", "four"] and len(reg) == 4
    assert reg["four"] is four and reg.lookup("one") == 1 and "two" in reg and "five" not in reg
    with pytest.raises(ValueError, match="number 'one' registered twice"):
        reg.register("one", 11)
    with pytest.raises(ValueError, match="registered twice"):
        reg["two"] = 22
    assert reg["one"] == 1 and reg["two"] == 2  # the refused ones replaced nothing
    assert reg.get("five") is None  # the Mapping's get; lookup is the one that explains


def test_unknown_names_raise_the_registry_error_listing_the_choices():
    reg: Registry[int] = Registry("colour", missing="unknown colour {name!r}; colours: {choices}", error=UserInputError)
    with pytest.raises(UserInputError, match=r"^unknown colour 'red'; colours: none$"):
        reg.lookup("red")
    reg.register("green", 1)
    reg.register("blue", 2)
    with pytest.raises(UserInputError, match=r"^unknown colour 'red'; colours: blue, green$"):
        reg.lookup("red")
    named = Registry("thing", choices=lambda: ["The Blue One"])
    named.register("blue", 2)
    with pytest.raises(KeyError, match="choose one of: The Blue One"):
        named.lookup("red")


def test_lazy_targets_are_imported_on_first_lookup_only():
    code = (
        "import sys\n"
        "from innersight.registry import Registry\n"
        "reg = Registry('codec')\n"
        "reg.register('json', target='json.decoder:JSONDecoder')\n"
        "assert 'json.decoder' not in sys.modules and not reg.is_loaded('json')\n"
        "assert list(reg) == ['json'] and reg.target('json') == 'json.decoder:JSONDecoder'\n"
        "cls = reg.lookup('json')\n"
        "assert 'json.decoder' in sys.modules and reg.is_loaded('json') and cls.__name__ == 'JSONDecoder'\n"
        "assert reg.target('json') is None and reg['json'] is cls\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with pytest.raises(ValueError, match="module:attribute"):
        import_target("json.decoder.JSONDecoder")


def test_copy_is_independent():
    reg: Registry[int] = Registry("number", error=UserInputError)
    reg.register("one", 1)
    copy, empty = reg.copy(), reg.copy(entries=False)
    copy.register("two", 2)
    assert list(reg) == ["one"] and list(copy) == ["one", "two"] and list(empty) == []
    with pytest.raises(UserInputError):
        empty.lookup("one")


def test_every_registry_of_the_package_is_one():
    """Methods, benchmarks, scorers, instruments and families share the idiom and its messages."""
    from innersight import adapters
    from innersight.eval.benchmarks import BENCHMARKS, get_benchmark
    from innersight.eval.scorers import SCORERS
    from innersight.instruments import INSTRUMENTS, get_instrument
    from innersight.methods import METHODS, resolve_methods

    for reg in (METHODS, BENCHMARKS, SCORERS, INSTRUMENTS, adapters.REGISTRY):
        assert isinstance(reg, Registry)
    assert adapters.FAMILIES == tuple(adapters.ADAPTERS) == tuple(adapters.REGISTRY)
    assert set(adapters.FAMILY_NAMES) == set(adapters.FAMILIES)
    with pytest.raises(MethodError, match="unknown method 'nope'; available methods: .*deco"):
        resolve_methods(["nope"])
    with pytest.raises(UserInputError, match="unknown benchmark 'nope'; benchmarks: .*pope"):
        get_benchmark("nope")
    with pytest.raises(UserInputError, match="unknown instrument 'nope'; choose one of: .*sinks"):
        get_instrument("nope")
    with pytest.raises(UnsupportedModelError, match=r"model type 'nope' is not supported; innersight supports LLaVA-1\.5"):
        adapters.adapter_class("nope")
    assert adapters.adapter_class("llava").__name__ == "LlavaAdapter"
