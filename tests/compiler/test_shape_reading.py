"""shape_reading: run-time shape vectors read back as products of dims; a Reshape's ``-1`` solved."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from tforge import testing
from tforge.compiler.shape_reading import reshape_extents, reshape_output_is, shape_elements
from tforge.passes.canonicalize import Canonicalize

# TorchScript's x.view(b, s, 4, -1), and a view of x whose batch is read off another tensor.
HEAD_SPLIT = """
<ir_version: 10, opset_import: ["" : 18]>
split (float[B, S, 192] x, float[B, S, 192] other) => (float[B, S, 4, 48] y, float[B, S, 4, 48] z)
<int64[1] heads, int64[1] rest, int64[1] zero, int64[1] twelve>
{
    b = Shape <start = 0, end = 1> (x)
    s = Shape <start = 1, end = 2> (x)
    target = Concat <axis = 0> (b, s, heads, rest)
    y = Reshape (x, target)
    other_shape = Shape (other)
    other_b = Gather <axis = 0> (other_shape, zero)
    other_target = Concat <axis = 0> (other_b, s, heads, rest)
    z = Reshape (x, other_target)
    bh = Mul (b, twelve)
    last = Shape <start = -1> (x)
    vector = Concat <axis = 0> (bh, last)
}
"""


def head_split(named: bool) -> ir.Model:
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    model = testing.model_from_onnx_text(HEAD_SPLIT, heads=i64(4), rest=i64(-1), zero=i64(0), twelve=i64(12))
    if not named:  # what the exports give after shape inference lost the names
        for value in model.graph.inputs:
            value.shape = ir.Shape([None, None, 192])
        for node in model.graph:
            if node.op_type == "Reshape":
                node.outputs[0].shape = None
    return model


def reshape(model: ir.Model, output: str) -> ir.Node:
    return next(n for n in model.graph if n.op_type == "Reshape" and n.outputs[0].name == output)


def test_minus_one_is_solved_when_the_copied_dims_cancel() -> None:
    """[b, s, 192] -> [b, s, 4, -1] is [b, s, 4, 48] whatever b and s are, named or not."""
    assert reshape_extents(reshape(head_split(named=True), "y")) == [(1, ("B",)), (1, ("S",)), (4, ()), (48, ())]
    assert reshape_extents(reshape(head_split(named=False), "y")) == [None, None, (4, ()), (48, ())]


def test_a_dim_read_off_another_value_does_not_cancel() -> None:
    """The batch of ``other`` is the batch of ``x`` only when their annotations say so (a name)."""
    assert reshape_extents(reshape(head_split(named=True), "z")) == [(1, ("B",)), (1, ("S",)), (4, ()), (48, ())]
    assert reshape_extents(reshape(head_split(named=False), "z")) == [None, None, (4, ()), None]


def test_shape_elements_products_and_slices() -> None:
    named, unnamed = head_split(named=True), head_split(named=False)
    vector = lambda m: next(n for n in m.graph if n.outputs[0].name == "vector").outputs[0]  # noqa: E731
    assert shape_elements(vector(named)) == [(12, ("B",)), (192, ())]
    assert shape_elements(vector(unnamed)) == [None, (192, ())]  # an unnamed dim has no name to give
    target = reshape(named, "y").inputs[1]
    assert shape_elements(target) == [(1, ("B",)), (1, ("S",)), (4, ()), -1]
    # a tracer that knows more about x than its annotation
    x = named.graph.inputs[0]
    known = {id(x): [(2, ()), (7, ()), (192, ())]}
    assert shape_elements(target, lambda v: known.get(id(v))) == [(2, ()), (7, ()), (4, ()), -1]


def test_canonicalize_reads_back_the_solved_dim() -> None:
    """canonicalize gives the head split's output the dims its target proves: the 48, not the
    unnamed batch and sequence."""
    model = head_split(named=False)

    Canonicalize()(model)

    assert list(reshape(model, "y").outputs[0].shape)[2:] == [4, 48]


MERGE = """
<ir_version: 10, opset_import: ["" : 18]>
merge (float[B, S, 4, 8] x) => (float[M, 4, 8] y)
<int64[1] minus_one>
{
    tail = Shape <start = 2> (x)
    target = Concat <axis = 0> (minus_one, tail)
    y = Reshape (x, target)
}
"""


@pytest.mark.parametrize("named", [True, False])
def test_reshape_output_is_a_grouping_of_the_source_dims(named: bool) -> None:
    """[b, s, 4, 8] -> [-1, 4, 8] merges the first two axes, whatever b and s are."""
    model = testing.model_from_onnx_text(MERGE, minus_one=np.array([-1], np.int64))
    if not named:
        model.graph.inputs[0].shape = ir.Shape([None, None, 4, 8])
    (node,) = [n for n in model.graph if n.op_type == "Reshape"]
    x = model.graph.inputs[0]
    assert reshape_output_is(node, x, [[0, 1], [2], [3]])
    assert not reshape_output_is(node, x, [[0], [1, 2], [3]])
    assert not reshape_output_is(node, x, [[0, 1], [3], [2]]) and not reshape_output_is(node, x, [[0, 1, 2], [3]])
