"""Pass registry: one kebab-case name per pass, shared by the CLI, the API and the IR dump banners."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from tforge.compiler.pass_infra import Pass
from tforge.errors import PassConfigError

_PASSES: dict[str, type[Pass]] = {}
_P = TypeVar("_P", bound=type[Pass])

_loaded = False


def register_pass(name: str) -> Callable[[_P], _P]:
    """Class decorator: register a Pass subclass (already a dataclass) under ``name``."""

    def decorate(cls: _P) -> _P:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__qualname__}: a pass must be a dataclass (its fields are options)")
        if name in _PASSES and _PASSES[name] is not cls:
            raise ValueError(f"pass name {name!r} registered twice")
        cls.name = name
        if not cls.summary and cls.__doc__:
            cls.summary = cls.__doc__.strip().splitlines()[0]
        _PASSES[name] = cls
        return cls

    return decorate


def _load_builtin_passes() -> None:
    """Import every module of ``tforge.passes`` (each registers its pass when imported).

    Done lazily on the first lookup so that ``import tforge`` stays cheap, and by listing the
    package so that a pass module is the only place a pass is declared.
    """
    global _loaded
    if _loaded:
        return
    import tforge.passes

    for info in pkgutil.iter_modules(tforge.passes.__path__):
        if not info.ispkg and not info.name.startswith("_"):
            importlib.import_module(f"tforge.passes.{info.name}")
    _loaded = True


def all_passes() -> dict[str, type[Pass]]:
    _load_builtin_passes()
    return dict(sorted(_PASSES.items()))


def get_pass_class(name: str) -> type[Pass]:
    passes = all_passes()
    if name in passes:
        return passes[name]
    near = difflib.get_close_matches(name, list(passes), n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
    raise PassConfigError(
        f"pipeline: unknown pass {name!r}; {hint + ' ' if hint else ''}"
        f"known passes: {', '.join(passes)} (see 'tforge passes')"
    )


def option_fields(cls: type[Pass]) -> list[tuple[str, Any, Any]]:
    """(kebab-name, type, default) of each option of a pass class."""
    hints = typing.get_type_hints(cls)
    out = []
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        default = field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        out.append((field.name.replace("_", "-"), hints[field.name], default))
    return out


def describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(describe_type(a) for a in typing.get_args(tp) if a is not type(None))
    if origin in (tuple, list):
        return f"list of {describe_type(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))
