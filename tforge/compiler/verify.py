"""Verify a model: cheap structural checks, and numeric comparison of two models in ORT.

``verify_structure`` runs after every pass under ``verify_each``, so it must stay cheap: it reads
no tensor data (unlike ``onnx.checker``, which walks the weights). The numeric side runs both
models in ONNX Runtime with ORT's graph optimisations off, so a comparison measures tforge's
rewrite and not whatever ORT fused differently in each graph.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from functools import cache
from typing import TYPE_CHECKING

import numpy as np
import onnx.defs
import onnx_ir as ir

from tforge.errors import UnsupportedModelError, VerificationError

if TYPE_CHECKING:
    import os

logger = logging.getLogger(__name__)

# (atol, rtol) per output dtype, for models that should compute the same function. The one
# place tolerances live: tests and --check-numerics take their defaults from here.
TOLERANCES: dict[type, tuple[float, float]] = {
    np.float64: (1e-10, 1e-8),
    np.float32: (1e-5, 1e-4),
    np.float16: (2e-3, 1e-2),
    np.int64: (0.0, 0.0),
    np.int32: (0.0, 0.0),
    np.int8: (0.0, 0.0),
    np.uint8: (0.0, 0.0),
    np.bool_: (0.0, 0.0),
}

DEFAULT_BATCH = 2
DEFAULT_DIM = 16


# ----------------------------------------------------------------------------- structure


def verify_structure(model: ir.Model) -> None:
    """Raise VerificationError naming the first structural defect found, else return None.

    Checks: topological order (every input defined before use, outer scopes visible in
    subgraphs), unique value names, every graph output produced, no node output that is also an
    initializer, and default-domain ops that exist in the declared opset.
    """
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    seen_names: dict[str, ir.Value] = {}
    _verify_graph(model.graph, set(), seen_names, opset)


def _verify_graph(
    graph: ir.Graph, outer: set[ir.Value], seen_names: dict[str, ir.Value], opset: int | None
) -> None:
    where = f"graph '{graph.name or 'main'}'"
    defined = set(outer)

    def define(value: ir.Value, what: str) -> None:
        if value.name:
            other = seen_names.setdefault(value.name, value)
            if other is not value:
                raise VerificationError(
                    f"verify: {where}: {what} '{value.name}' reuses a value name"
                )
        defined.add(value)

    for value in graph.inputs:
        define(value, "input")
    for value in graph.initializers.values():  # onnx_ir keeps keys and names in sync
        if value not in defined:
            define(value, "initializer")
    for index, node in enumerate(graph):
        label = f"node {index} '{node.name or ''}' ({_op_label(node)})"
        for i, value in enumerate(node.inputs):
            if value is not None and value not in defined:
                raise VerificationError(
                    f"verify: {where}: {label} input {i} '{value.name}' is used before it is "
                    "defined (not a graph input, initializer or output of an earlier node)"
                )
        if node.domain in ("", "ai.onnx") and opset is not None:
            _check_schema(node, opset, where, label)
        for attr in node.attributes.values():
            if attr.is_ref():
                continue
            # A subgraph sees (and must not shadow) the names defined so far; sibling
            # subgraphs (then/else) may reuse each other's names.
            if attr.type == ir.AttributeType.GRAPH:
                _verify_graph(attr.value, defined, dict(seen_names), opset)
            elif attr.type == ir.AttributeType.GRAPHS:
                for subgraph in attr.value:
                    _verify_graph(subgraph, defined, dict(seen_names), opset)
        for value in node.outputs:
            if value.name and value.name in graph.initializers:
                raise VerificationError(
                    f"verify: {where}: {label} output '{value.name}' is also an initializer"
                )
            define(value, f"{label} output")
    for i, value in enumerate(graph.outputs):
        if value not in defined:
            raise VerificationError(
                f"verify: {where}: output {i} '{value.name}' is not produced by any node, "
                "input or initializer of the graph"
            )


def _check_schema(node: ir.Node, opset: int, where: str, label: str) -> None:
    if not _has_schema(node.op_type, opset):
        raise VerificationError(
            f"verify: {where}: {label} is not an operator of opset {opset} of the default domain"
        )


@cache
def _has_schema(op_type: str, opset: int) -> bool:
    try:
        onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return False
    return True


def _op_label(node: ir.Node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


# ----------------------------------------------------------------------------- inputs


def make_inputs(
    model: ir.Model,
    *,
    dims: Mapping[str, int] | None = None,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Random but meaningful feeds for the graph inputs that are not initializers.

    Token ids stay below the embedding's row count (else Gather fails), masks are ones (random
    masks make attention outputs meaningless), floats are standard normal. A symbolic dim takes
    ``dims[name]``, else 2 when it first appears as a leading (batch) dim, else 16; the same
    name gets the same value everywhere.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    sizes: dict[str, int] = dict(dims or {})
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        if value.shape is None or value.dtype is None:
            raise UnsupportedModelError(
                f"make_inputs: input '{value.name}' has no known dtype and shape; "
                "run shape inference or give the feeds explicitly"
            )
        shape = tuple(_dim_size(dim, axis, sizes) for axis, dim in enumerate(value.shape.dims))
        feeds[value.name] = _random_feed(value, shape, rng)
    return feeds


def _dim_size(dim: int | ir.SymbolicDim, axis: int, sizes: dict[str, int]) -> int:
    if isinstance(dim, int):
        return dim
    default = DEFAULT_BATCH if axis == 0 else DEFAULT_DIM
    if dim.value is None:
        return default
    return sizes.setdefault(dim.value, default)


def _random_feed(value: ir.Value, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    dtype = value.dtype.numpy()
    if "mask" in (value.name or "").lower():
        return np.ones(shape, dtype=dtype)
    if value.dtype.is_floating_point():
        return rng.standard_normal(shape).astype(dtype)
    if value.dtype == ir.DataType.BOOL:
        return rng.integers(0, 2, shape).astype(bool)
    rows = _embedding_rows(value)
    return rng.integers(0, rows if rows else 2, shape).astype(dtype)


def _embedding_rows(value: ir.Value) -> int | None:
    """Row count of a Gather that takes ``value`` as indices (an embedding lookup), if known."""
    for node, index in value.uses():
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or index != 1:
            continue
        data = node.inputs[0]
        axis_attr = node.attributes.get("axis")
        axis = axis_attr.value if axis_attr is not None else 0
        if (
            data is not None
            and data.shape is not None
            and -data.shape.rank() <= axis < data.shape.rank()
        ):
            rows = data.shape[axis]
            if isinstance(rows, int) and rows > 0:
                return rows
    return None


# ----------------------------------------------------------------------------- numerics


@dataclasses.dataclass(frozen=True)
class OutputComparison:
    """How far one output of a candidate model is from the reference's.

    ``max_rel`` is ``|c - r| / |r|`` (elements where r == 0 count as abs error); ``worst_index``
    is where ``|c - r|`` is largest. The compared arrays ride along as a private attribute, not
    a field, so that ``dataclasses.asdict`` (reports, JSON) stays small while ``assert_close``
    can still apply any atol/rtol element by element.
    """

    name: str
    max_abs: float
    max_rel: float
    cosine: float
    worst_index: tuple[int, ...]
    shape: tuple[int, ...]


def compare_outputs(
    reference: ir.Model | str | os.PathLike,
    candidate: ir.Model | str | os.PathLike,
    feeds: Mapping[str, np.ndarray],
    *,
    optimize: bool = False,
) -> list[OutputComparison]:
    """Run both models on ``feeds`` in ORT and compare each reference output by name."""
    from tforge.runtime import ort as ort_runtime  # imports onnxruntime

    expected = ort_runtime.run(ort_runtime.create_session(reference, optimize=optimize), feeds)
    actual = ort_runtime.run(ort_runtime.create_session(candidate, optimize=optimize), feeds)
    comparisons = []
    for name, ref in expected.items():
        if name not in actual:
            raise VerificationError(
                f"compare: candidate has no output '{name}' (it has {sorted(actual)})"
            )
        comparisons.append(compare_arrays(name, ref, actual[name]))
    return comparisons


def compare_arrays(name: str, reference: np.ndarray, candidate: np.ndarray) -> OutputComparison:
    """Error statistics of ``candidate`` against ``reference`` (same shape required)."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if reference.shape != candidate.shape:
        raise VerificationError(
            f"compare: output '{name}' has shape {list(candidate.shape)}, "
            f"reference has {list(reference.shape)}"
        )
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    diff = _abs_diff(ref, cand)
    if diff.size == 0:
        comparison = OutputComparison(name, 0.0, 0.0, 1.0, (), reference.shape)
    else:
        with np.errstate(invalid="ignore"):  # inf / inf where an inf was missed
            rel = np.nan_to_num(diff / np.where(ref == 0, 1.0, np.abs(ref)), nan=np.inf)
        worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
        comparison = OutputComparison(
            name=name,
            max_abs=float(diff.max()),
            max_rel=float(rel.max()),
            cosine=_cosine(ref, cand),
            worst_index=worst,
            shape=reference.shape,
        )
    object.__setattr__(comparison, _ARRAYS, (reference, candidate))  # frozen: bypass on purpose
    return comparison


_ARRAYS = "_arrays"


def _abs_diff(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """|c - r|, 0 where both are the same inf or both NaN, inf where only one is NaN/inf."""
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(cand - ref)
    same = (ref == cand) | (np.isnan(ref) & np.isnan(cand))
    return np.where(same, 0.0, np.where(np.isnan(diff), np.inf, diff))


def _cosine(ref: np.ndarray, cand: np.ndarray) -> float:
    a, b = ref.reshape(-1), cand.reshape(-1)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norms == 0.0:
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(np.dot(a, b) / norms)


def tolerance_for(dtype: np.dtype) -> tuple[float, float]:
    """(atol, rtol) from TOLERANCES; unknown dtypes get float32's."""
    return TOLERANCES.get(np.dtype(dtype).type, TOLERANCES[np.float32])


def assert_close(
    comparisons: Sequence[OutputComparison],
    atol: float | None = None,
    rtol: float | None = None,
) -> None:
    """Raise VerificationError unless every element has ``|c - r| <= atol + rtol * |r|``.

    ``None`` takes the output dtype's entry in TOLERANCES. The message names the element that
    exceeds its bound the most, with both values and its abs/rel error. A comparison that lost
    its arrays (rebuilt from a report) is judged on ``max_abs <= atol or max_rel <= rtol``,
    which is sufficient but stricter.
    """
    failures = []
    for comp in comparisons:
        arrays = getattr(comp, _ARRAYS, None)
        dtype = arrays[0].dtype if arrays is not None else np.dtype(np.float32)
        a, r = tolerance_for(dtype)
        a, r = (a if atol is None else atol), (r if rtol is None else rtol)
        if arrays is None:
            if comp.max_abs > a and comp.max_rel > r:
                failures.append((comp.max_abs - a, comp, comp.worst_index, a, r))
            continue
        ref = arrays[0].astype(np.float64)
        diff = _abs_diff(ref, arrays[1].astype(np.float64))
        # inf where one side is NaN/inf: never hidden by an infinite bound
        with np.errstate(invalid="ignore"):
            excess = np.where(np.isinf(diff), np.inf, diff - (a + r * np.abs(ref)))
        if excess.size and (excess > 0).any():
            flat = int(np.argmax(excess))
            index = tuple(int(i) for i in np.unravel_index(flat, excess.shape))
            failures.append((float(excess.reshape(-1)[flat]), comp, index, a, r))
    if not failures:
        return
    _, comp, index, a, r = max(failures, key=lambda f: f[0])
    others = f"; {len(failures) - 1} other output(s) also differ" if len(failures) > 1 else ""
    arrays = getattr(comp, _ARRAYS, None)
    if arrays is None:
        detail = f"max abs err {comp.max_abs:.3g}, max rel err {comp.max_rel:.3g}"
    else:
        expected, got = arrays[0][index].item(), arrays[1][index].item()
        abs_err = abs(float(got) - float(expected))
        rel_err = abs_err / abs(float(expected)) if expected else float("inf")
        detail = (
            f"got {got:.6g}, expected {expected:.6g} (abs err {abs_err:.3g}, rel err {rel_err:.3g}"
        )
        detail += f"; max_abs={comp.max_abs:.3g}, cosine={comp.cosine:.6f})"
    raise VerificationError(
        f"compare: output '{comp.name}' differs at {list(index)}: {detail}; "
        f"atol={a:g}, rtol={r:g}{others}"
    )
