"""TorchGraph: an onnx_ir graph run in PyTorch gives ONNX Runtime's outputs, and gradients.

ONNX Runtime (graph optimizations off) is the reference: the cache graphs of both exporters,
float and after quantize-weights (MatMulNBits, GatherBlockQuantized at 2, 4 and 8 bits,
with and without zero points), and a graph of the shape-handling ops with their edge cases
(negative indices, clamped slices, a zero-length past).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import tforge
from tforge import testing
from tforge.errors import UnsupportedModelError
from tforge.runtime import generate
from tforge.runtime.torch_exec import TorchGraph, supported_ops

torch = pytest.importorskip("torch")

IDS = np.random.default_rng(3).integers(3, 96, (2, 7))
RTOL = 1e-5  # of each output's max abs; measured about 5e-7


def _compare(model: ir.Model, variable: tuple[str, ...] = ()) -> None:
    """Prefill (empty past) and one decode step after it: every output of ORT and of TorchGraph
    (``variable``: values it must not fold, so that their kernels run in full each time)."""
    session = generate.open_session(model, optimize=False)
    layout = generate.cache_layout(session)
    names = [o.name for o in session.get_outputs()]
    graph = TorchGraph(model.graph, names, variable=variable)
    prefill = layout.prefill_feeds(IDS)
    want = session.run(names, prefill)
    step = layout.step_feeds(IDS[:, :1], IDS.shape[1])
    step.update({c.past: want[1 + i] for i, c in enumerate(layout.cache)})
    for feeds, expected in ((prefill, want), (step, session.run(names, step))):
        got = graph.run(feeds)
        for name, e, g in zip(names, expected, got, strict=True):
            assert tuple(g.shape) == e.shape, name
            np.testing.assert_allclose(g.detach().numpy(), e, rtol=0, atol=RTOL * float(np.abs(e).max()), err_msg=name)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_float_cache_graph_matches_ort(llama_canonical, exporter: str) -> None:  # type: ignore[no-untyped-def]
    _compare(llama_canonical[exporter])


@pytest.mark.parametrize(
    "spec",
    [
        "quantize-weights{accuracy-level=0}",  # 4-bit symmetric, the table too
        "quantize-weights{accuracy-level=0 symmetric=false block=16}",  # packed 4-bit zero points
        "quantize-weights{accuracy-level=0 bits=8 embedding-bits=8}",
        "quantize-weights{accuracy-level=0 bits=2 embedding-bits=2 symmetric=false}",
    ],
)
def test_quantized_cache_graph_matches_ort(llama_canonical, spec: str) -> None:  # type: ignore[no-untyped-def]
    model = llama_canonical["dynamo"].clone()
    tforge.compile(model, spec, progress=lambda _: None)
    kinds = {n.op_type for n in model.graph}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= kinds
    _compare(model)  # the codes unpacked once, at construction
    # and unpacked at each run, as when the codes themselves are what a caller replaces
    packed = {n.inputs[0 if n.op_type == "GatherBlockQuantized" else 1].name for n in model.graph if n.domain == "com.microsoft"}
    _compare(model, variable=tuple(packed))


SHAPES = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[2, 5, 6] x, int64[3] idx) => (float[2, 5, 2] a, float[2, 3, 6] b, float[5, 6] c, float[2, 5, 3] d, float[3] r, float[2, 5, 6] e, float[5, 5] t, float[2, 5, 2] ge)
<int64[1, 1, 2] gi = {-1, 2}, int64[3] gshape = {2, 5, 2}, int64[1] zero = {0}, int64[1] one = {1}, int64[1] neg = {-2}, int64[1] big = {9223372036854775807}, int64[1] two = {2}, int64[2] halves = {3, 3}>
{
    a = Slice(x, neg, big, two, one)
    b = Gather<axis = 1>(x, idx)
    x0 = Slice(x, zero, one, zero)
    sq = Squeeze(x0, zero)
    c = Identity(sq)
    d0, d1 = Split<axis = 2>(x, halves)
    d = Max(d0, d1)
    s = Shape<start = 1, end = 2>(x)
    sf = Cast<to = 1>(s)
    zf = Cast<to = 1>(zero)
    onef = Cast<to = 1>(one)
    r0 = Range(zf, sf, onef)
    r = Slice(r0, zero, two)
    m = ReduceMean<keepdims = 1>(x, two)
    pos = Greater(x, m)
    e = Where(pos, x, m)
    sqT = Transpose<perm = [1, 0]>(sq)
    t0 = MatMul(sq, sqT)
    t = Trilu<upper = 0>(t0)
    gidx = Expand(gi, gshape)
    ge = GatherElements<axis = 2>(x, gidx)
}
"""


def test_shape_ops_match_ort() -> None:
    model = testing.model_from_onnx_text(SHAPES)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 5, 6)).astype(np.float32), "idx": np.array([4, -1, 0], np.int64)}
    session = generate.open_session(model, optimize=False)
    names = [o.name for o in session.get_outputs()]
    want = session.run(names, feeds)
    got = TorchGraph(model.graph, names).run(feeds)
    for name, e, g in zip(names, want, got, strict=True):
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-6, atol=1e-6, err_msg=name)


def test_an_op_without_translation_names_its_node() -> None:
    model = testing.model_from_onnx_text(
        """
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[4, 4] x) => (float y) {
            y = Det(x)
        }
        """
    )
    model.graph.node(0).name = "the_det"
    with pytest.raises(UnsupportedModelError, match="'the_det' is Det"):
        TorchGraph(model.graph, ["y"])
    assert ("", "Det") not in supported_ops()


def test_gradients_reach_a_replaced_scale(llama_canonical) -> None:  # type: ignore[no-untyped-def]
    """The scales of a MatMulNBits replaced by a tensor of a parameter: the output's gradient
    reaches the parameter, and replacing them with the same values changes nothing."""
    model = llama_canonical["dynamo"].clone()
    tforge.compile(model, "quantize-weights{accuracy-level=0}", progress=lambda _: None)
    node = next(n for n in model.graph if n.op_type == "MatMulNBits")
    scales = node.inputs[2]
    session = generate.open_session(model, optimize=False)
    layout = generate.cache_layout(session)
    feeds = layout.prefill_feeds(IDS)
    graph = TorchGraph(model.graph, [layout.logits], variable=[scales.name])
    base = graph.run(feeds)[0]
    theta = torch.zeros(tuple(scales.shape), requires_grad=True)
    s0 = torch.from_numpy(scales.const_value.numpy().copy())
    out = graph.run(feeds, {scales.name: s0 * torch.exp(theta)})[0]
    np.testing.assert_array_equal(out.detach().numpy(), base.numpy())
    out.square().sum().backward()
    assert theta.grad is not None and float(theta.grad.abs().sum()) > 0


def test_a_block_runs_from_its_given_input(llama_canonical) -> None:  # type: ignore[no-untyped-def]
    """``given``: the second decoder block computed from its input fed in, as the whole graph
    computes it; a different input fed gives a different output (the feed is read, not recomputed)."""
    from tforge.compiler.structure import block_map

    model = llama_canonical["dynamo"]
    block = block_map(model).blocks[1]
    start, end = block.residual_adds[0].inputs[0].name, block.residual_adds[1].outputs[0].name
    session = generate.open_session(model, optimize=False)
    feeds = generate.cache_layout(session).prefill_feeds(IDS)
    entering, leaving = TorchGraph(model.graph, [start, end]).run(feeds)
    alone = TorchGraph(model.graph, [end], given=[start])
    np.testing.assert_allclose(alone.run({**feeds, start: entering})[0].numpy(), leaving.numpy(), rtol=0, atol=1e-6)
    assert not np.allclose(alone.run({**feeds, start: entering * 2})[0].numpy(), leaving.numpy())
    with pytest.raises(UnsupportedModelError, match="no node computes the given value 'input_ids'"):
        TorchGraph(model.graph, [end], given=["input_ids"])
