"""Random small transformer-shaped ONNX graphs, built directly with ``onnx.helper``.

``TransformerSpec`` fixes the shape of a model (width, heads, KV heads for grouped-query
attention, norm kind, activation, biases, pre/post-norm, layers); ``build(spec, seed)`` writes
the graph the way exporters lay it out (Reshape/Transpose head splits, HF's repeat-kv
Unsqueeze/Expand/Reshape, decomposed RMSNorm) with seeded random weights. Building costs
milliseconds, so hypothesis can try hundreds of shapes where exporting torch modules could
try a few. ``specs()`` is the hypothesis strategy.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh

OPSET = 20
F = onnx.TensorProto.FLOAT


@dataclasses.dataclass(frozen=True)
class TransformerSpec:
    """The shape of one random model; ``hidden = heads * head_dim``."""

    heads: int = 2
    kv_heads: int = 2
    head_dim: int = 4
    intermediate: int = 16
    layers: int = 1
    seq: int = 4
    norm: Literal["layer", "rms"] = "layer"
    activation: Literal["gelu", "relu", "swiglu", "tanh-gelu"] = "gelu"
    linear_bias: bool = True
    norm_bias: bool = True
    post_norm: bool = False
    final_norm: bool = False

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


class _Builder:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.name(hint)
        self.inits.append(onh.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str = "", **attrs: object) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(oh.make_node(op_type, inputs, [out], name=f"n_{out}", **attrs))
        return out

    def linear(self, x: str, fan_in: int, fan_out: int, bias: bool, hint: str) -> str:
        w = (self.rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        y = self.op("MatMul", [x, self.const(f"{hint}.w", w)], hint)
        if bias:
            b = (0.1 * self.rng.normal(size=fan_out)).astype(np.float32)
            y = self.op("Add", [y, self.const(f"{hint}.b", b)], f"{hint}.out")
        return y

    def norm(self, x: str, spec: TransformerSpec, hint: str) -> str:
        g = self.rng.uniform(0.5, 1.5, spec.hidden).astype(np.float32)
        if spec.norm == "layer":
            inputs = [x, self.const(f"{hint}.g", g)]
            if spec.norm_bias:
                inputs.append(
                    self.const(
                        f"{hint}.b", (0.1 * self.rng.normal(size=spec.hidden)).astype(np.float32)
                    )
                )
            return self.op("LayerNormalization", inputs, hint, axis=-1, epsilon=1e-5)
        # RMSNorm as exporters decompose it: x * 1/sqrt(mean(x^2) + eps) * g
        sq = self.op("Pow", [x, self.const("two", np.array(2.0, np.float32))])
        mean = self.op("ReduceMean", [sq, self.const("axes", np.array([-1], np.int64))], keepdims=1)
        var = self.op("Add", [mean, self.const("eps", np.array(1e-6, np.float32))])
        inv = self.op("Reciprocal", [self.op("Sqrt", [var])])
        normed = self.op("Mul", [x, inv])
        return self.op("Mul", [normed, self.const(f"{hint}.g", g)], hint)

    def heads_split(self, x: str, heads: int, spec: TransformerSpec) -> str:
        """[1, S, heads*hd] -> [1, heads, S, hd]"""
        shape = self.const("shape", np.array([1, spec.seq, heads, spec.head_dim], np.int64))
        return self.op("Transpose", [self.op("Reshape", [x, shape])], perm=[0, 2, 1, 3])

    def repeat_kv(self, x: str, spec: TransformerSpec) -> str:
        """HF's repeat_kv: [1, kvh, S, hd] -> [1, kvh, rep, S, hd] -> [1, heads, S, hd]"""
        rep = spec.heads // spec.kv_heads
        if rep == 1:
            return x
        x5 = self.op("Unsqueeze", [x, self.const("axis", np.array([2], np.int64))])
        big = self.const(
            "expand", np.array([1, spec.kv_heads, rep, spec.seq, spec.head_dim], np.int64)
        )
        x5 = self.op("Expand", [x5, big])
        shape = self.const("shape", np.array([1, spec.heads, spec.seq, spec.head_dim], np.int64))
        return self.op("Reshape", [x5, shape])

    def attention(self, h: str, spec: TransformerSpec, hint: str) -> str:
        kv_width = spec.kv_heads * spec.head_dim
        q = self.linear(h, spec.hidden, spec.hidden, spec.linear_bias, f"{hint}.q")
        k = self.linear(h, spec.hidden, kv_width, spec.linear_bias, f"{hint}.k")
        v = self.linear(h, spec.hidden, kv_width, spec.linear_bias, f"{hint}.v")
        qt = self.heads_split(q, spec.heads, spec)
        kt = self.repeat_kv(self.heads_split(k, spec.kv_heads, spec), spec)
        vt = self.repeat_kv(self.heads_split(v, spec.kv_heads, spec), spec)
        kT = self.op("Transpose", [kt], perm=[0, 1, 3, 2])
        scores = self.op("MatMul", [qt, kT])
        scale = self.const("scale", np.array(1 / np.sqrt(spec.head_dim), np.float32))
        p = self.op("Softmax", [self.op("Mul", [scores, scale])], axis=-1)
        ctx = self.op("Transpose", [self.op("MatMul", [p, vt])], perm=[0, 2, 1, 3])
        merged = self.op(
            "Reshape", [ctx, self.const("shape", np.array([1, spec.seq, spec.hidden], np.int64))]
        )
        return self.linear(merged, spec.hidden, spec.hidden, spec.linear_bias, f"{hint}.o")

    def ffn(self, h: str, spec: TransformerSpec, hint: str) -> str:
        up = self.linear(h, spec.hidden, spec.intermediate, spec.linear_bias, f"{hint}.up")
        if spec.activation == "gelu":
            a = self.op("Gelu", [up])
        elif spec.activation == "tanh-gelu":
            a = self.op("Gelu", [up], approximate="tanh")
        elif spec.activation == "relu":
            a = self.op("Relu", [up])
        else:  # SwiGLU: silu(gate) * up, silu written as x * sigmoid(x)
            gate = self.linear(h, spec.hidden, spec.intermediate, spec.linear_bias, f"{hint}.gate")
            a = self.op("Mul", [self.op("Mul", [gate, self.op("Sigmoid", [gate])]), up])
        return self.linear(a, spec.intermediate, spec.hidden, spec.linear_bias, f"{hint}.down")


def build(spec: TransformerSpec, seed: int = 0) -> onnx.ModelProto:
    """The model ``spec`` describes, with weights drawn from ``seed``; input x: [1, seq, hidden]."""
    b = _Builder(np.random.default_rng(seed))
    x = "x"
    if spec.post_norm:  # BERT normalises the embeddings, so the first residual is a norm output
        x = b.norm(x, spec, "embeddings.ln")
    for layer in range(spec.layers):
        hint = f"l{layer}"
        if spec.post_norm:  # BERT: norm after each residual add
            x = b.norm(b.op("Add", [x, b.attention(x, spec, f"{hint}.attn")]), spec, f"{hint}.ln1")
            x = b.norm(b.op("Add", [x, b.ffn(x, spec, f"{hint}.ffn")]), spec, f"{hint}.ln2")
        else:
            x = b.op("Add", [x, b.attention(b.norm(x, spec, f"{hint}.ln1"), spec, f"{hint}.attn")])
            x = b.op("Add", [x, b.ffn(b.norm(x, spec, f"{hint}.ln2"), spec, f"{hint}.ffn")])
    if spec.final_norm:
        x = b.norm(x, spec, "final")
    y = b.op("Identity", [x], "y")
    graph = oh.make_graph(
        b.nodes,
        "fuzz",
        [oh.make_tensor_value_info("x", F, [1, spec.seq, spec.hidden])],
        [oh.make_tensor_value_info(y, F, [1, spec.seq, spec.hidden])],
        b.inits,
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", OPSET)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def specs():  # -> hypothesis strategy of TransformerSpec
    """Hypothesis strategy: heads 2-4, kv heads a divisor of heads, head_dim 2-8, etc."""
    from hypothesis import strategies as st

    @st.composite
    def draw(d) -> TransformerSpec:
        # heads=1 is left out: the block map does not recognise single-head attention (see
        # tools/fuzz.py findings); tools/fuzz.py graphs --heads-from 1 still covers it
        heads = d(st.sampled_from([2, 3, 4]))
        kv_heads = d(st.sampled_from([k for k in range(1, heads + 1) if heads % k == 0]))
        post_norm = d(st.booleans())
        return TransformerSpec(
            heads=heads,
            kv_heads=kv_heads,
            head_dim=d(st.sampled_from([2, 4, 8])),
            intermediate=d(st.sampled_from([4, 8, 12, 16, 32])),
            layers=d(st.integers(1, 2)),
            seq=d(st.integers(1, 6)),
            # post-norm BERT-style blocks use LayerNorm; RMSNorm models are pre-norm
            norm="layer" if post_norm else d(st.sampled_from(["layer", "rms"])),
            activation=d(st.sampled_from(["gelu", "relu", "swiglu", "tanh-gelu"])),
            linear_bias=d(st.booleans()),
            norm_bias=d(st.booleans()),
            post_norm=post_norm,
            final_norm=d(st.booleans()),
        )

    return draw()
