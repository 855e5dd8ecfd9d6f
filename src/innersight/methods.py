"""The method registry: each method's name, intervention point, config and implementation.

A method is registered once with a :class:`MethodSpec`: its name, its intervention point
(``input``: what the model sees; ``attention``: how it looks; ``decoding``: what it says; the
contracts are in :mod:`innersight.points`), a one-line summary, and the dotted path of its
implementation (imported lazily so that listing methods needs no torch). ``resolve_methods``
turns the names a user gave into a :class:`~innersight.flow.Plan`, which :mod:`innersight.flow`
runs.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .adapters.base import FAMILY_FACTS, OPTIONAL_MEMBERS
from .errors import MethodError
from .flow import Plan, merge_processors
from .points import POINTS
from .registry import Registry, import_target

__all__ = ["COMPATIBLE", "METHODS", "POINTS", "MethodSpec", "Plan", "merge_processors", "parse_overrides",
           "register", "resolve_methods", "settings_by_name"]

#: combinations of methods at the same point that are defined and tested (sorted name tuples)
COMPATIBLE: frozenset[tuple[str, ...]] = frozenset()


@dataclass(frozen=True)
class MethodSpec:
    name: str
    point: str
    summary: str
    #: ``module:attribute`` of the implementation, imported only when the method runs
    target: str
    source: str = ""
    #: ``module:attribute`` of the frozen config dataclass (defaults = the paper's values)
    config: str = ""
    #: a second name accepted in ``--set KEY.field=value`` beside the method's own (shared by the
    #: variants of one method, e.g. ``vicrop``)
    key: str = ""
    #: config fields this method name fixes (e.g. ``{"variant": "rel-att"}``)
    preset: tuple[tuple[str, Any], ...] = ()
    #: config defaults this method name changes but a user may override (e.g. the gate's threshold)
    defaults: tuple[tuple[str, Any], ...] = ()
    #: the adapter facets this method needs beyond the core contract (names in
    #: :data:`innersight.adapters.base.OPTIONAL_MEMBERS` / ``FAMILY_FACTS``): how each family
    #: serves them makes the method x family matrix of ``innersight list`` (:mod:`innersight.support`)
    needs: tuple[str, ...] = ()

    def load(self) -> Any:
        return import_target(self.target)

    def build(self, overrides: dict[str, str] | None = None) -> Any:
        """The method object with its config: paper defaults, this name's defaults and preset, then
        user overrides (which may not change a preset field)."""
        impl = self.load()
        if not self.config:
            if overrides:
                raise MethodError(f"method {self.name!r} has no configurable fields")
            return impl()
        cls = import_target(self.config)
        values: dict[str, Any] = {**dict(self.defaults), **dict(self.preset)}
        values.update(parse_overrides(cls, overrides or {}, self.name))
        config = cls(**values)
        for field_name, fixed in self.preset:  # the method's name fixes these: one name, one behaviour
            if getattr(config, field_name) != fixed:
                others = [s.name for s in METHODS.values() if s.key == self.key and s is not self]
                hint = f"; choose another method ({', '.join(others)})" if others else ""
                raise MethodError(f"{self.name} fixes {field_name}={fixed!r}, it cannot be set to "
                                  f"{getattr(config, field_name)!r}{hint}")
        method = impl(config)
        if hasattr(method, "registered_name"):  # one implementation under several names (vicrop-*)
            method.registered_name = self.name
        return method


def parse_overrides(cls: Any, overrides: dict[str, str], key: str) -> dict[str, Any]:
    """Parse ``field -> text`` overrides by the config dataclass's annotated field types."""
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for name, text in overrides.items():
        if name not in fields:
            raise MethodError(f"{key} has no field {name!r}; fields: {', '.join(sorted(fields))}")
        try:
            out[name] = _parse_value(text, hints[name])
        except (ValueError, TypeError) as exc:
            raise MethodError(f"{key}.{name}: cannot use {text!r} ({exc})") from exc
    return out


def _parse_value(text: Any, hint: Any) -> Any:
    """Text -> value of type ``hint`` (bool, int, float, str, tuples of those, optional)."""
    if not isinstance(text, str):
        return text
    args = typing.get_args(hint)
    if type(None) in args:  # X | None
        if text.strip().lower() in ("none", "null", ""):
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is tuple:
        kind = args[0] if args else str
        return tuple(_parse_value(x.strip(), kind) for x in text.replace(";", ",").split(",") if x.strip())
    if hint is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if hint in (int, float):
        return hint(text)
    return text


#: name -> spec; the single source of truth for the CLI, `innersight list` and the API
METHODS: Registry[MethodSpec] = Registry("method", missing="unknown method {name!r}; available methods: {choices}",
                                         error=MethodError)


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to :data:`METHODS` (``ValueError`` for an unknown point, an unknown facet in
    ``needs`` or a name taken)."""
    if spec.point not in POINTS:
        raise ValueError(f"{spec.name}: unknown intervention point {spec.point!r}")
    unknown = [n for n in spec.needs if n not in OPTIONAL_MEMBERS and n not in FAMILY_FACTS]
    if unknown:
        raise ValueError(f"{spec.name}: needs unknown facet(s) {', '.join(unknown)}; facets: "
                         f"{', '.join([*OPTIONAL_MEMBERS, *FAMILY_FACTS])}")
    return METHODS.register(spec.name, spec)


def resolve_methods(names: Iterable[str] | str | None, overrides: dict[str, dict[str, str]] | None = None) -> Plan:
    """Validate method names and place them; a clear error for unknown names or clashes.

    ``overrides`` maps a method's name (``vicrop-rel-att``, ``deco``...) or the key its variants
    share (``vicrop``) to ``field -> value`` texts; the plan keeps them under the method's name.
    """
    if names is None:
        return Plan()
    if isinstance(names, str):
        names = [names]
    specs: list[MethodSpec] = []
    for name in names:
        spec = METHODS.lookup(name)
        if spec in specs:
            raise MethodError(f"method {name!r} given twice")
        specs.append(spec)
    for point in POINTS:
        same = tuple(sorted(s.name for s in specs if s.point == point))
        if len(same) > 1 and same not in COMPATIBLE:
            raise MethodError(
                f"methods {', '.join(same)} all act at the {point} point and no combination of them is "
                f"defined; choose one (methods at different points compose: input x attention x decoding)"
            )
    settings = settings_by_name(specs, overrides or {})
    objects = tuple(spec.build(settings.get(spec.name)) for spec in specs)
    return Plan(tuple(specs), objects, settings)


def settings_by_name(specs: Sequence[MethodSpec], overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Overrides keyed by a method's name or its shared key -> keyed by the chosen method's name.

    A field given under both names with different values is an error; a key that names no chosen
    method is an error that lists what may be set.
    """
    out: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    for spec in specs:
        fields: dict[str, Any] = {}
        for key in dict.fromkeys((spec.key or spec.name, spec.name)):
            for field_name, value in dict(overrides.get(key) or {}).items():
                if field_name in fields and fields[field_name] != value:
                    raise MethodError(f"{spec.name}.{field_name} is set twice ({fields[field_name]!r} and {value!r}) "
                                      f"under the names {spec.key!r} and {spec.name!r}")
                fields[field_name] = value
            if key in overrides:
                used.add(key)
        if fields:
            out[spec.name] = fields
    unused = sorted(set(overrides) - used)
    if unused:
        def names(spec: MethodSpec) -> str:
            return spec.name if spec.key in ("", spec.name) else f"{spec.name} (or {spec.key})"

        chosen = ", ".join(names(s) for s in specs) or "none"
        bad = ", ".join(unused)
        if all(u not in METHODS and all(u != s.key for s in METHODS.values()) for u in unused):
            raise MethodError(f"--set names {bad}, which is no method; methods chosen: {chosen}")
        raise MethodError(f"--set names {bad} but no such method was chosen; methods chosen: {chosen}")
    return out


# ---------------------------------------------------------------------- the registry
def _method(name: str, point: str, impl: str, summary: str, source: str, *, key: str = "",
            preset: tuple[tuple[str, Any], ...] = (), defaults: tuple[tuple[str, Any], ...] = (),
            needs: tuple[str, ...] = ()) -> MethodSpec:
    """Register ``module:Class`` whose config dataclass is ``module:ClassConfig``."""
    return register(MethodSpec(name=name, point=point, summary=summary, target=impl, config=f"{impl}Config",
                               key=key or name, preset=preset, defaults=defaults, source=source, needs=needs))


#: what a ViCrop map variant needs from the adapter beyond the core contract: rel-att and grad-att
#: project decoder attention through ``token_grid`` (every family has one: patch cells, or
#: InstructBLIP's Q-Former weights); pure-grad reads the pixels' gradient through ``pixel_view``
_VICROP_NEEDS: dict[str, tuple[str, ...]] = {"rel-att": (), "grad-att": (), "pure-grad": ("pixel_view",)}

for _variant in ("rel-att", "grad-att", "pure-grad"):
    _method(f"vicrop-{_variant}", "input", "innersight.look.vicrop:ViCrop",
            f"ViCrop: crop where the {_variant} map points, show the crop beside the image",
            "arXiv 2502.17422 (ICLR 2025)", key="vicrop", preset=(("variant", _variant),),
            needs=_VICROP_NEEDS[_variant])
_method("vicrop-gated", "input", "innersight.look.vicrop:ViCrop",
        "ViCrop rel-att behind an early crop gate: answer plainly, crop only where the question map is peaked and "
        "the answer unsure (micro-calibrated)",
        "arXiv 2502.17422 (ICLR 2025) + innersight gate", key="vicrop", preset=(("variant", "rel-att"),),
        defaults=(("gate", 20.0), ("gate_confidence", 0.4)))
_method("var", "attention", "innersight.attend.var:VAR",
        "VAR: move attention from sink tokens to the other image tokens in image-centric heads",
        "arXiv 2503.03321 (ICLR 2025)")
_method("deco", "decoding", "innersight.decode.deco:DeCo",
        "DeCo: correct the final logits with the most confident preceding layer", "arXiv 2410.11779 (ICLR 2025)")
_method("dola", "decoding", "innersight.decode.dola:DoLa",
        "DoLa (baseline): contrast the final layer with the most divergent premature layer",
        "arXiv 2309.03883 (ICLR 2024)")
_method("damro", "decoding", "innersight.decode.damro:DAMRO",
        "DAMRO: contrast with a branch that sees only the vision encoder's outlier tokens",
        "arXiv 2410.04514 (EMNLP 2024)", needs=("vision_subset_source", "vision_has_cls"))
_method("vcd", "decoding", "innersight.decode.vcd:VCD",
        "VCD (baseline): contrast with a branch that sees the image distorted by diffusion noise",
        "arXiv 2311.16922 (CVPR 2024)")
_method("m3id", "decoding", "innersight.decode.m3id:M3ID",
        "M3ID (baseline): mutual-information decoding against the image-free prompt, growing with the answer",
        "arXiv 2403.14003 (CVPR 2024)")
_method("icd", "decoding", "innersight.decode.icd:ICD",
        "ICD (baseline): contrast with a branch whose instruction carries a disturbing role prefix",
        "arXiv 2403.18715 (Findings of ACL 2024)")
_method("pai", "decoding", "innersight.decode.pai:PAI",
        "PAI (baseline): amplify image attention in chosen layers and contrast with the image-free prompt",
        "arXiv 2407.21771 (ECCV 2024)")
_method("pai-attention", "attention", "innersight.decode.pai:PAIAttention",
        "PAI's attention part alone: amplify the image attention of the predicting row in chosen layers",
        "arXiv 2407.21771 (ECCV 2024)", key="pai")
_method("only", "decoding", "innersight.decode.only:ONLY",
        "ONLY (baseline): contrast with one layer's text-enhanced heads (entropy ratio), no second forward",
        "arXiv 2507.00898 (ICCV 2025)")
_method("vista", "decoding", "innersight.decode.vista:VISTA",
        "VISTA (baseline): steer the residual stream towards the image, mix in late layers' logits",
        "arXiv 2502.03628 (ICML 2025)")
