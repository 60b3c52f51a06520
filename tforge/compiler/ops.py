"""Classes of ONNX operators, defined once for every analysis that walks the graph.

Each analysis asks a question of the ops on a path: does this op only move data between
layouts, does it act on each channel separately, does it keep every axis where it was. The
answers are these sets; an analysis that needs a narrower class composes them here, with its
reason in a comment, instead of keeping a private copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_ir as ir

if TYPE_CHECKING:
    from onnx_ir._core import Usage  # (node, idx) pairs of Value.uses()

__all__ = [
    "ACTIVATIONS",
    "AXIS_PRESERVING",
    "COMPARISONS",
    "DATA_INPUT_ONLY",
    "LAYOUT",
    "LOGICAL",
    "MS_DOMAIN",
    "POINTWISE",
    "SHAPE_ONLY",
    "data_uses",
    "only_reader",
    "is_default_domain",
    "is_pointwise",
]

MS_DOMAIN = "com.microsoft"

#: Ops that only move data between layouts; a path through them keeps "which linear it came from".
LAYOUT = frozenset(
    {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Tile", "Flatten", "Identity", "Cast"}
)
#: Ops whose first input carries the data and whose other inputs are indices or shapes.
DATA_INPUT_ONLY = frozenset(
    {"Reshape", "Unsqueeze", "Squeeze", "Expand", "Tile", "Slice", "Split", "Gather", "Pad", "Flatten"}
)
#: Activation functions and the name the block map reports for each.
ACTIVATIONS: dict[str, str] = {
    "Gelu": "gelu", "Erf": "gelu", "Tanh": "gelu_tanh", "Sigmoid": "silu", "Relu": "relu",
    "Elu": "elu", "HardSwish": "hardswish", "Softplus": "softplus", "Silu": "silu",
    "Mish": "mish", "QuickGelu": "quick_gelu", "LeakyRelu": "leaky_relu",
    "FastGelu": "gelu_tanh", "BiasGelu": "gelu",
}  # fmt: skip
#: Elementwise ops: output element i depends on element i of each (broadcast) input only, so
#: they act on each channel separately.
POINTWISE = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Pow", "Min", "Max", "Sqrt", "Neg", "Exp", "Abs", "Reciprocal",
        "Erf", "Tanh", "Sigmoid", "Relu", "Gelu", "Elu", "LeakyRelu", "HardSigmoid", "HardSwish",
        "Softplus", "Silu", "Mish", "QuickGelu", "FastGelu", "BiasGelu", "Cast", "Identity", "Clip",
        "Where",
    }
)  # fmt: skip
#: ONNX Runtime's elementwise contrib ops (domain com.microsoft).
_MS_POINTWISE = frozenset({"Gelu", "FastGelu", "BiasGelu", "QuickGelu"})
#: Comparisons (masks are built from them).
COMPARISONS = frozenset({"Less", "LessOrEqual", "Greater", "GreaterOrEqual"})
#: Boolean and test ops, elementwise too.
LOGICAL = frozenset({"Not", "And", "Or", "Equal", "IsNaN", "IsInf", *COMPARISONS})
#: Ops that read only the shape of their input, never its values: a value they read is not
#: *used* as data (TorchScript exports compute reshape targets from ``Shape`` of the very value
#: being reshaped, so such a value has a second reader that does not see its contents).
SHAPE_ONLY = frozenset({"Shape", "Size"})
#: Ops that keep every axis of their data input where it was: elementwise ops, and the
#: normalisers that reduce along one axis but keep its extent (Softmax), and Dropout.
AXIS_PRESERVING = POINTWISE | LOGICAL | {"Softmax", "LogSoftmax", "Dropout"}


def is_default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def is_pointwise(node: ir.Node) -> bool:
    """An elementwise op of the default domain or one of ONNX Runtime's elementwise contrib ops."""
    if is_default_domain(node):
        return node.op_type in POINTWISE
    return node.domain == MS_DOMAIN and node.op_type in _MS_POINTWISE


def data_uses(value: ir.Value) -> list[Usage]:
    """The uses of ``value`` by nodes that read its contents (every use but ``Shape``/``Size``)."""
    return [u for u in value.uses() if not (u.node.op_type in SHAPE_ONLY and is_default_domain(u.node))]


def only_reader(value: ir.Value | None) -> ir.Node | None:
    """The one node that reads ``value``; None if it has no reader or several, or is a graph
    output (a rewrite of it would then be seen outside the graph)."""
    if value is None or value.is_graph_output():
        return None
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 else None

