"""Every zoo model exports with dynamic dims, matches PyTorch in ORT at several shapes, and its
ground truth is consistent with what the exported graph visibly contains."""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from tests.models.zoo import ZOO
from tforge.frontends.onnx import load_onnx

torch = pytest.importorskip("torch")


def test_exports_with_dynamic_dims_and_matches_torch(
    zoo_name: str,
    zoo_model: Callable[[str], Path],
    zoo_module: Callable[[str], torch.nn.Module],
) -> None:
    entry, path = ZOO[zoo_name], zoo_model(zoo_name)
    model = load_onnx(path)
    assert [v.name for v in model.graph.inputs] == list(entry.input_names)
    assert [v.name for v in model.graph.outputs] == [entry.output_name]
    for value in model.graph.inputs:
        for axis, dim_name in entry.dynamic_axes[value.name].items():
            assert str(value.shape[axis]) == dim_name, (value.name, value.shape)

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for batch, seq in [(2, 7), (3, 12), (1, 3)]:  # the export shape, then two others
        feeds = entry.inputs(batch, seq, rng)
        with torch.no_grad():
            expected = zoo_module(zoo_name)(
                *(torch.from_numpy(feeds[n]) for n in entry.input_names)
            )
        (actual,) = session.run(None, feeds)
        assert actual.shape == tuple(expected.shape)
        np.testing.assert_allclose(actual, expected.numpy(), atol=1e-4, rtol=0)


def test_ground_truth_is_visible_in_the_graph(
    zoo_name: str, zoo_model: Callable[[str], Path]
) -> None:
    truth = ZOO[zoo_name].truth
    graph = load_onnx(zoo_model(zoo_name)).graph
    ops = collections.Counter(node.op_type for node in graph)
    layers = truth.num_layers

    assert ops["Softmax"] == layers
    # two per block (four with output norms), plus the embedding (BERT) or final (others) norm
    norms = (4 if truth.output_norms else 2) * layers + 1
    norms += 2 * layers if truth.qk_norm else 0  # and one on Q, one on K per block
    if truth.norm == "layer":
        assert ops["LayerNormalization"] == norms
    else:  # RMSNorm is decomposed: x * 1/sqrt(mean(x^2) + eps) * gamma
        assert ops["LayerNormalization"] == 0
        assert ops["ReduceMean"] == ops["Reciprocal"] == norms
    assert ops["Sigmoid"] == (layers if truth.gated and truth.activation == "silu" else 0)  # SiLU: x * Sigmoid(x)
    if truth.attn_softcap:  # cap * tanh(scores / cap), once per layer
        assert ops["Tanh"] == layers
    if truth.sliding_window is not None:  # the window compares positions once more
        assert ops["Greater"] + ops["Less"] > 0
    qkv_splits = truth.fused_qkv and truth.qkv_split_op == "Split"
    assert ops["Split"] == layers * (int(qkv_splits) + int(truth.fused_gate_up))  # gate_up: chunk(2)
    assert (ops["LessOrEqual"] > 0) == truth.causal  # the causal mask compares positions

    head_splits = collections.Counter(
        (v.shape[-2], v.shape[-1])
        for node in graph
        if node.op_type == "Reshape"
        for v in node.outputs
        if v.shape is not None
        and len(v.shape) == 4
        and all(isinstance(d, int) for d in v.shape[-2:])
    )
    # Q, K and V are each reshaped to [batch, seq, heads, head_dim]; K and V have fewer heads in GQA.
    if truth.num_kv_heads == truth.num_heads:
        assert head_splits[(truth.num_heads, truth.head_dim)] == 3 * layers
    else:
        assert head_splits[(truth.num_heads, truth.head_dim)] == layers
        assert head_splits[(truth.num_kv_heads, truth.head_dim)] == 2 * layers

    matmul_weights = [
        tuple(init.shape)
        for node in graph
        if node.op_type in ("MatMul", "Gemm")
        for init in node.inputs[1:2]
        if init is not None and init.is_initializer()
    ]
    if truth.fused_gate_up:
        assert matmul_weights.count((truth.hidden_size, 2 * truth.intermediate_size)) == layers
    else:
        assert matmul_weights.count((truth.hidden_size, truth.intermediate_size)) == layers * (
            2 if truth.gated else 1
        )
    assert matmul_weights.count((truth.intermediate_size, truth.hidden_size)) == layers


def test_zoo_initializers_are_not_merged(zoo_name: str, zoo_model: Callable[[str], Path]) -> None:
    """Perturbed weights keep one gamma per norm: the exporter merges equal initializers."""
    graph = load_onnx(zoo_model(zoo_name)).graph
    users = collections.Counter(
        init.name
        for node in graph
        for init in node.inputs
        if init is not None
        and init.is_initializer()
        and init.const_value is not None
        and init.const_value.size > 1
        and init.const_value.dtype == ir.DataType.FLOAT
    )
    shared = {name: n for name, n in users.items() if n > 1}
    assert not shared, f"float initializers used by several nodes: {shared}"
