"""Pipeline specs and the pass manager.

A spec is ``"canonicalize,smoothquant{alpha=0.5 layers=q,k},quantize"``: passes separated by
top-level commas, options in MLIR-style braces separated by spaces, option names in kebab-case.
The whole pipeline is parsed and its property requirements checked before any pass runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
import time
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import onnx_ir as ir

from tforge.compiler import registry
from tforge.compiler.calibration import DATA_KEY, GRAM_REQUEST_KEY, CalibrationData
from tforge.compiler.pass_infra import (
    Pass,
    PassResult,
    Property,
    model_properties,
    set_model_properties,
)
from tforge.errors import (
    NumericsCheckError,
    PassConfigError,
    PassError,
    PreconditionError,
    TforgeError,
)

logger = logging.getLogger(__name__)

_PASS_ITEM = re.compile(r"^\s*([a-z][a-z0-9-]*)\s*(?:\{(.*)\})?\s*$", re.DOTALL)


# ----------------------------------------------------------------------------- parsing


def split_pipeline(spec: str) -> list[str]:
    """Split at commas that are not inside braces."""
    items, depth, current = [], 0, []
    for ch in spec:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise PassConfigError(f"pipeline {spec!r}: unmatched '}}'")
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise PassConfigError(f"pipeline {spec!r}: unmatched '{{'")
    items.append("".join(current))
    if any(not item.strip() for item in items):
        raise PassConfigError(f"pipeline {spec!r}: empty pass name (stray comma?)")
    return [item.strip() for item in items]


def parse_pass(item: str) -> Pass:
    """Build one pass from ``name{key=value ...}``."""
    match = _PASS_ITEM.match(item)
    if not match:
        raise PassConfigError(
            f"pipeline: cannot parse {item!r}; write passes as name or name{{option=value ...}}"
        )
    name, body = match.group(1), match.group(2)
    cls = registry.get_pass_class(name)
    fields = {kebab: (tp, default) for kebab, tp, default in registry.option_fields(cls)}
    kwargs: dict[str, Any] = {}
    for token in (body or "").split():
        key, sep, raw = token.partition("=")
        if not sep:
            raise PassConfigError(f"{name}: option {token!r} has no value; write {token}=VALUE")
        key = key.replace("_", "-")
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise PassConfigError(f"{name}: unknown option {key!r}; options are: {known}")
        kwargs[key.replace("-", "_")] = convert_option(name, key, raw, fields[key][0])
    try:
        return cls(**kwargs)
    except PassConfigError:
        raise  # passes name themselves in their option errors
    except (ValueError, TypeError) as e:
        raise PassConfigError(f"{name}: {e}") from None


def convert_option(pass_name: str, key: str, raw: str, tp: Any) -> Any:
    """Convert the text of an option to the dataclass field's type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    where = f"{pass_name}: option {key}={raw!r}"
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert_option(pass_name, key, raw, arg)
            except PassConfigError as e:
                errors.append(e)
        raise PassConfigError(f"{where}: expected {registry.describe_type(tp)}")
    if origin is typing.Literal:
        for arg in args:
            if str(arg) == raw:
                return arg
        raise PassConfigError(f"{where}: expected one of {', '.join(str(a) for a in args)}")
    if origin in (tuple, list):
        inner = args[0] if args else str
        values = tuple(convert_option(pass_name, key, part, inner) for part in raw.split(",") if part)
        return values if origin is tuple else list(values)
    if origin is dict or tp is dict:
        key_tp, value_tp = args if args else (str, str)
        out = {}
        for part in raw.split(","):
            k, sep, v = part.partition(":")
            if not sep:
                raise PassConfigError(f"{where}: expected key:value pairs separated by commas")
            out[convert_option(pass_name, key, k, key_tp)] = convert_option(pass_name, key, v, value_tp)
        return out
    if tp is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise PassConfigError(f"{where}: expected true or false")
    if tp in (int, float):
        try:
            return tp(raw)
        except ValueError:
            raise PassConfigError(f"{where}: expected {tp.__name__}") from None
    if tp is str:
        return raw
    raise PassConfigError(f"{where}: options of type {tp!r} cannot be given on the command line")


def parse_pipeline(spec: str | Sequence[str | Pass]) -> list[Pass]:
    if isinstance(spec, str):
        if not spec.strip():
            return []
        return [parse_pass(item) for item in split_pipeline(spec)]
    return [p if isinstance(p, Pass) else parse_pass(p) for p in spec]


def check_properties(passes: Sequence[Pass], available: Iterable[Property]) -> None:
    """Reject a pipeline in which some pass requires a property nothing establishes before it."""
    have = set(available)
    for i, p in enumerate(passes):
        missing = sorted(str(prop) for prop in p.requires - have)
        if missing:
            providers = [
                name
                for name, cls in registry.all_passes().items()
                if any(Property(m) in cls.establishes for m in missing)
            ]
            fix = f"add {' or '.join(repr(n) for n in providers)} before it" if providers else ""
            raise PreconditionError(
                f"pipeline: {p.name!r} (pass {i + 1}) requires {', '.join(repr(m) for m in missing)}, "
                f"which no earlier pass establishes{'; ' + fix if fix else ''}"
            )
        have -= p.invalidates
        have |= p.establishes


# ----------------------------------------------------------------------------- report


@dataclasses.dataclass
class PassRecord:
    """What one pass did in one pipeline run."""

    index: int
    name: str
    spec: str
    changed: bool
    seconds: float
    stats: dict[str, int]
    details: dict[str, Any]
    nodes_before: int
    nodes_after: int
    dump_path: str | None = None
    #: every site the pass skipped: {"at": node or value, "reason": why}, in the order met
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Report:
    """The result of a pipeline run: per-pass records, numerics against the input, timing."""

    pipeline: str
    passes: list[PassRecord] = dataclasses.field(default_factory=list)
    numerics: list[dict[str, Any]] | None = None
    total_seconds: float = 0.0
    properties: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=_json_default)

    def summary(self) -> str:
        lines = [f"pipeline: {self.pipeline or '(empty)'}"]
        for r in self.passes:
            stats = " ".join(f"{k}={v}" for k, v in sorted(r.stats.items()))
            flag = "changed" if r.changed else "unchanged"
            lines.append(
                f"  [{r.index}/{len(self.passes)}] {r.spec:<32} {r.seconds:7.2f}s  {flag:<9} "
                f"nodes {r.nodes_before}->{r.nodes_after}  {stats}".rstrip()
            )
        if self.numerics is not None:
            for c in self.numerics:
                lines.append(
                    f"  numerics {c['name']}: max_abs={c['max_abs']:.3g} max_rel={c['max_rel']:.3g} "
                    f"cosine={c['cosine']:.6f}"
                )
        lines.append(f"  total {self.total_seconds:.2f}s")
        return "\n".join(lines)

    def explain(self) -> str:
        """Every site each pass skipped, one line each: the node (or value) and the reason."""
        lines = []
        for r in self.passes:
            if not r.skipped:
                lines.append(f"[{r.index}/{len(self.passes)}] {r.spec}: no site skipped")
                continue
            lines.append(f"[{r.index}/{len(self.passes)}] {r.spec}: {len(r.skipped)} site(s) skipped")
            lines.extend(f"  {s['at'] or '(model)'}: {s['reason']}" for s in r.skipped)
        return "\n".join(lines)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ----------------------------------------------------------------------------- manager


@dataclasses.dataclass
class NumericsCheck:
    """Compare the pipeline's output model with its input on given or generated feeds."""

    feeds: Mapping[str, np.ndarray] | None = None
    dims: Mapping[str, int] | None = None
    atol: float | None = None  # fail when the max abs error of any output exceeds it
    min_cosine: float | None = None


class PassManager:
    """Runs a parsed pipeline with optional verification, IR dumps and a numeric check.

    >>> pm = PassManager.parse("canonicalize", verify_each=True)
    >>> report = pm.run(model)
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        verify_each: bool = False,
        dump_dir: str | Path | None = None,
        print_ir_after: Iterable[str] = (),
        print_ir_after_change: bool = False,
        print_ir_after_all: bool = False,
        ir_stream: TextIO | None = None,
        check_numerics: NumericsCheck | None = None,
        progress: Callable[[str], None] | None = None,
        strict: bool = False,
        calibration: CalibrationData | None = None,
    ) -> None:
        self.passes = list(passes)
        # the pipeline's calibration data, read by calibrate and every pass that runs on data
        self.calibration = calibration
        # strict: a model whose transformer structure is not (fully) recognised is an error
        # instead of a pipeline whose block passes silently skip every site.
        self.strict = strict
        self.verify_each = verify_each
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.print_ir_after = set(print_ir_after)
        unknown = self.print_ir_after - {p.name for p in self.passes}
        if unknown:
            raise PassConfigError(
                f"--print-ir-after: {', '.join(sorted(unknown))} is not in the pipeline "
                f"({', '.join(p.name for p in self.passes) or 'empty'})"
            )
        self.print_ir_after_change = print_ir_after_change
        self.print_ir_after_all = print_ir_after_all
        self.ir_stream = ir_stream
        self.check_numerics = check_numerics
        self.progress = progress or (lambda message: logger.info("%s", message))

    @classmethod
    def parse(cls, spec: str | Sequence[str | Pass], **kwargs: Any) -> PassManager:
        return cls(parse_pipeline(spec), **kwargs)

    @property
    def spec(self) -> str:
        return ",".join(p.spec() for p in self.passes)

    def run(self, model: ir.Model) -> Report:
        # Imported here: printing and verification are optional and pull in ONNX Runtime.
        from tforge.compiler import printer

        properties = model_properties(model)
        check_properties(self.passes, properties)
        from tforge.runtime import spill
        from tforge.runtime.spill import initializer_bytes

        # large models: rewritten weights go to a scratch file instead of memory (spill.py)
        spill.enable_if_large(model, initializer_bytes(model))
        report = Report(pipeline=self.spec)
        original = model.clone() if self.check_numerics is not None else None
        started = time.perf_counter()
        total = len(self.passes)
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            printer.write_dump(model, self.dump_dir, 0, "input", banner="IR before the pipeline")
        structure_checked = False
        if self.calibration is not None:
            model.meta[DATA_KEY] = self.calibration
        for index, p in enumerate(self.passes, start=1):
            if self.strict and not structure_checked and Property.CANONICAL in p.requires:
                _check_structure(model, before=p.name)
                structure_checked = True
            self.progress(f"[{index}/{total}] {p.spec()} ...")
            nodes_before = _count_nodes(model)
            t0 = time.perf_counter()
            if p.collects_statistics:
                model.meta[GRAM_REQUEST_KEY] = self._gram_wanted(model, index)
            try:
                result = p(model)
            except TforgeError:
                raise
            except Exception as e:  # a bug in a pass: name it and what ran before it
                ran = ", ".join(q.name for q in self.passes[: index - 1]) or "none"
                raise PassError(
                    f"{p.name}: internal error {type(e).__name__}: {e} (passes run before it: {ran})"
                ) from e
            seconds = time.perf_counter() - t0
            model.meta.pop(GRAM_REQUEST_KEY, None)
            properties -= p.invalidates
            properties |= p.establishes
            record = PassRecord(
                index=index,
                name=p.name,
                spec=p.spec(),
                changed=result.changed,
                seconds=seconds,
                stats=dict(sorted(result.stats.items())),
                details=result.details,
                nodes_before=nodes_before,
                nodes_after=_count_nodes(model),
                skipped=[skip.to_dict() for skip in result.skips],
            )
            report.passes.append(record)
            if self.strict:
                _check_not_all_skipped(p, result)
            stats = " ".join(f"{k}={v}" for k, v in sorted(result.stats.items()))
            banner = f"IR after {p.spec()} [{index}/{total}] {stats}".rstrip()
            if self.dump_dir is not None:
                record.dump_path = str(printer.write_dump(model, self.dump_dir, index, p.name, banner=banner))
            if self.verify_each:
                from tforge.compiler import verify

                try:
                    verify.verify_structure(model)
                except TforgeError as e:
                    where = f"; IR dumped to {record.dump_path}" if record.dump_path else ""
                    raise type(e)(f"after {p.name} [{index}/{total}]: {e}{where}") from e
            if self._should_print(p, result):
                stream = self.ir_stream or sys.stdout
                stream.write(printer.print_ir(model, banner=banner) + "\n")
            self.progress(f"[{index}/{total}] {p.name} done in {seconds:.2f}s {stats}".rstrip())
        if self.strict and not structure_checked and Property.CANONICAL in properties:
            _check_structure(model, before=None)
        set_model_properties(model, properties)
        report.properties = sorted(str(prop) for prop in properties)
        if original is not None and self.check_numerics is not None:
            report.numerics = self._compare(original, model, self.check_numerics)
        report.total_seconds = time.perf_counter() - started
        return report

    def _gram_wanted(self, model: ir.Model, index: int) -> set[str]:
        """What the passes after pass ``index`` (1-based), up to the next collector, can use."""
        wanted: set[str] = set()
        for later in self.passes[index:]:
            if later.collects_statistics:
                break
            wanted |= later.gram_wanted(model)
        return wanted

    def _should_print(self, p: Pass, result: PassResult) -> bool:
        return (
            self.print_ir_after_all
            or p.name in self.print_ir_after
            or (self.print_ir_after_change and result.changed)
        )

    def _compare(self, original: ir.Model, model: ir.Model, check: NumericsCheck) -> list[dict[str, Any]]:
        from tforge.compiler import verify

        feeds = dict(check.feeds) if check.feeds is not None else verify.make_inputs(original, dims=dict(check.dims or {}))
        comparisons = verify.compare_outputs(original, model, feeds)
        rows = [dataclasses.asdict(c) for c in comparisons]
        for c in comparisons:
            if check.atol is not None and c.max_abs > check.atol:
                raise NumericsCheckError(
                    f"check-numerics: output {c.name!r} differs from the input model by "
                    f"max abs {c.max_abs:.3g} > atol {check.atol:g} (cosine {c.cosine:.6f})"
                )
            if check.min_cosine is not None and c.cosine < check.min_cosine:
                raise NumericsCheckError(
                    f"check-numerics: output {c.name!r} cosine {c.cosine:.6f} < {check.min_cosine:g}"
                )
        return rows


def _check_structure(model: ir.Model, *, before: str | None) -> None:
    """Under ``strict``, refuse a model without transformer blocks or with unrecognised parts."""
    from tforge.compiler.structure import block_map as cached_block_map

    block_map = cached_block_map(model)
    when = f"before {before}" if before else "after the pipeline"
    # a transformer block has attention; an FFN-shaped pair of linears alone (an MLP) is not one
    if not any(block.attention is not None for block in block_map.blocks):
        first = f"; first unrecognised: {block_map.unrecognized[0]}" if block_map.unrecognized else ""
        raise PreconditionError(
            f"strict: no transformer blocks recognised in the model ({when}; no attention found, "
            f"{len(block_map.linears)} linears, {len(block_map.norms)} norms{first}); "
            "block passes would skip every site, drop --strict to compile it anyway"
        )
    if block_map.unrecognized:
        raise PreconditionError(
            f"strict: {len(block_map.unrecognized)} part(s) of the model not recognised ({when}), "
            f"first: {block_map.unrecognized[0]}; drop --strict to compile the recognised blocks only"
        )


def _check_not_all_skipped(p: Pass, result: PassResult) -> None:
    """Under ``strict``, a pass that changed nothing because it skipped every site is an error."""
    blocked = [skip for skip in result.skips if skip.blocked]
    if result.changed or not blocked or len(blocked) < len(result.skips):
        return  # nothing skipped, or some sites had nothing to do (already done, excluded)
    first = blocked[0]
    raise PreconditionError(
        f"strict: {p.name} changed nothing: it could not rewrite any of its {len(blocked)} site(s), "
        f"first {first.at or '(model)'}: {first.reason}; run 'tforge compile ... --explain' "
        "without --strict to list them"
    )


def _count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in model.graph.all_nodes()) if hasattr(model.graph, "all_nodes") else len(model.graph)
