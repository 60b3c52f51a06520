"""Helpers for tests: tiny models from ONNX text, golden IR files, numeric checks in ORT.

Tests of a pass read like STYLE.md's "Testing a pass": build a graph from a few lines of ONNX
text, run the pass, compare the printed IR with a golden file and the numerics with ORT. The
helpers cast float64 arrays to float32 so tests can pass ``rng.normal(...)`` straight in.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import onnx.shape_inference
import onnx_ir as ir

from tforge.compiler.printer import TensorMode, print_ir
from tforge.compiler.verify import OutputComparison, assert_close, compare_outputs
from tforge.errors import UnsupportedModelError, VerificationError

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "tests" / "golden"
UPDATE_ENV = "TFORGE_UPDATE_GOLDENS"


def random_float_initializers(text: str, rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    """``scale`` times standard normal values for every float initializer declared in the
    ``<float[8] g, ...>`` section of ONNX ``text``, drawn in declaration order."""
    declared = text.split("{")[0].rsplit("<", 1)[1]
    return {
        name: rng.normal(size=tuple(int(d) for d in dims.split(","))) * scale
        for dims, name in re.findall(r"float\[([\d, ]+)\] (\w+)", declared)
    }


def model_from_onnx_text(text: str, **initializers: np.ndarray) -> ir.Model:
    """Parse ONNX text, give initializers their values, infer shapes, return an onnx_ir Model.

    Each keyword names an initializer declared in the ``<float[8] gamma, ...>`` section (the
    parser drops declarations without a value, so they are re-created here), an initializer
    with a value to replace, or a graph input to turn into an initializer.
    """
    proto = onnx.parser.parse_model(text)
    graph = proto.graph
    for name, array in initializers.items():
        array = np.asarray(array)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        tensor = onnx.numpy_helper.from_array(array, name)
        existing = [i for i, t in enumerate(graph.initializer) if t.name == name]
        inputs = [i for i, v in enumerate(graph.input) if v.name == name]
        if existing:
            graph.initializer[existing[0]].CopyFrom(tensor)
            continue
        if inputs:
            del graph.input[inputs[0]]
        elif name not in _used_names(graph):
            raise UnsupportedModelError(f"model_from_onnx_text: no node reads '{name}'")
        graph.initializer.append(tensor)
    undefined = _undefined_names(graph)
    if undefined:
        raise UnsupportedModelError(
            f"model_from_onnx_text: {undefined} are used but have no value; "
            f"pass them as arrays, e.g. model_from_onnx_text(TEXT, {undefined[0]}=...)"
        )
    proto = onnx.shape_inference.infer_shapes(
        proto, check_type=True, strict_mode=True, data_prop=True
    )
    return ir.from_proto(proto)


def _used_names(graph: onnx.GraphProto) -> set[str]:
    used = {name for node in graph.node for name in node.input if name}
    for node in graph.node:
        for attr in node.attribute:
            for subgraph in [attr.g] if attr.HasField("g") else list(attr.graphs):
                used |= _used_names(subgraph)
    return used


def _undefined_names(graph: onnx.GraphProto) -> list[str]:
    """Names top-level nodes read before anything defines them, in order of first use."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    undefined: list[str] = []
    for node in graph.node:
        undefined += [n for n in node.input if n and n not in defined and n not in undefined]
        defined.update(node.output)
    return undefined


def assert_ir_golden(model: ir.Model, relpath: str, *, tensors: TensorMode = "shape") -> None:
    """Compare ``print_ir(model)`` with ``tests/golden/<relpath>``; TFORGE_UPDATE_GOLDENS=1 rewrites it.

    Regenerated goldens must be read before they are committed: they are a record of intent,
    not an oracle.
    """
    actual = print_ir(model, tensors=tensors)
    path = GOLDEN_DIR / relpath
    if os.environ.get(UPDATE_ENV) == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual, encoding="utf-8")
        return
    if not path.exists():
        raise AssertionError(
            f"golden file {path} does not exist; create it with {UPDATE_ENV}=1 and this test, "
            "then read it to check it shows what the test means"
        )
    expected = path.read_text(encoding="utf-8")
    if actual != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                actual.splitlines(keepends=True),
                fromfile=f"golden/{relpath}",
                tofile="actual",
            )
        )
        raise AssertionError(
            f"IR differs from golden {path} (rerun with {UPDATE_ENV}=1 if the change is "
            f"intended):\n{diff}"
        )


def assert_ort_allclose(
    reference: ir.Model,
    candidate: ir.Model,
    feeds: Mapping[str, np.ndarray],
    *,
    atol: float | None = None,
    rtol: float | None = None,
) -> list[OutputComparison]:
    """Run both models in ORT (optimisations off) and fail naming the worst element.

    ``None`` tolerances come from ``verify.TOLERANCES`` by output dtype.
    """
    comparisons = compare_outputs(reference, candidate, feeds)
    try:
        assert_close(comparisons, atol=atol, rtol=rtol)
    except VerificationError as error:
        raise AssertionError(str(error)) from None
    return comparisons
