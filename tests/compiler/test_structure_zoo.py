"""The block map on real exports: six-plus model families (random weights) and the two real models."""

from __future__ import annotations

import numpy as np
import pytest

import tforge
from tforge import testing
from tforge.compiler import verify
from tforge.compiler.pipeline import PassManager
from tforge.compiler.structure import find_blocks


def _canonical(path):
    model = tforge.load(path)
    PassManager.parse("canonicalize", progress=lambda _: None).run(model)
    return model


def test_block_map_matches_ground_truth(zoo_name, zoo_model, zoo_entries) -> None:
    truth = zoo_entries[zoo_name].truth
    block_map = find_blocks(_canonical(zoo_model(zoo_name)))
    assert block_map.unrecognized == []
    assert len(block_map.blocks) == truth.num_layers
    # Gemma 2 alternates local and global layers, local first: k > q - window beside k <= q
    windows = [truth.sliding_window if i % 2 == 0 else None for i in range(truth.num_layers)]
    assert [b.attention.sliding_window for b in block_map.blocks if b.attention] == windows
    for block in block_map.blocks:
        attn, ffn = block.attention, block.ffn
        assert attn is not None and ffn is not None
        assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (
            truth.num_heads, truth.num_kv_heads, truth.head_dim
        )
        assert attn.fused_qkv == truth.fused_qkv
        assert attn.causal == truth.causal
        assert attn.qk_norm == truth.qk_norm
        if truth.qk_norm:  # one RMSNorm per head on Q and on K, gamma [head_dim] shared by the heads
            assert attn.qk_norm_axis == "head_dim"
            for norm, role in ((attn.q_norm, "query"), (attn.k_norm, "key")):
                assert norm is not None and norm.kind == "rms" and norm.normalizes == role
                assert norm.channels == truth.head_dim and not norm.linears
        assert (attn.q.bias is not None) == truth.qkv_bias
        assert attn.o.in_features == truth.num_heads * truth.head_dim
        assert (ffn.gated, ffn.intermediate_size) == (truth.gated, truth.intermediate_size)
        assert ffn.fused_gate_up == truth.fused_gate_up
        if truth.fused_qkv:
            q, k, v = attn.qkv_split  # type: ignore[misc]
            assert (q, k, v) == (truth.num_heads * truth.head_dim, *[truth.num_kv_heads * truth.head_dim] * 2)
        assert ffn.activation == truth.activation
        assert block.pre_norm == truth.pre_norm
        assert block.norm_placement == truth.norm_placement
        if truth.output_norms:  # x + norm(o(...)), h + norm(down(...)): read by the residual adds only
            post_attn, post_ffn = block.attention_post_norm, block.ffn_post_norm
            assert post_attn is not None and post_attn.follows == "attention" and not post_attn.linears
            assert post_ffn is not None and post_ffn.follows == "ffn" and not post_ffn.linears
            assert post_attn.input is attn.o.output and post_ffn.input is ffn.down.output
            assert post_attn.kind == post_ffn.kind == truth.norm
            assert len(block.residual_adds) == 2
        else:
            assert block.attention_post_norm is None and block.ffn_post_norm is None
        norm = block.attention_norm
        assert norm is not None and block.ffn_norm is not None and norm.kind == truth.norm
        if truth.pre_norm:
            # the pre-norm feeds exactly the attention's projections
            assert {id(lin) for lin in norm.linears} == {id(attn.q), id(attn.k), id(attn.v)}
            assert {id(lin) for lin in block.ffn_norm.linears} == {id(x) for x in (ffn.up, ffn.gate) if x}


def test_canonicalize_keeps_outputs(zoo_name, zoo_model) -> None:
    path = zoo_model(zoo_name)
    original = tforge.load(path)
    model = _canonical(path)
    assert len(model.graph) <= len(original.graph)
    feeds = verify.make_inputs(original, dims={"batch": 2, "sequence": 9}, rng=np.random.default_rng(0))
    testing.assert_ort_allclose(original, model, feeds, atol=1e-4, rtol=1e-4)


def test_static_shapes_keep_outputs_and_map(zoo_name, zoo_model, zoo_entries) -> None:
    path = zoo_model(zoo_name)
    original = tforge.load(path)
    sizes = {"batch": 2, "sequence": 9}
    shapes = {
        v.name: "x".join(str(d if isinstance(d, int) else sizes[d.value]) for d in v.shape)
        for v in original.graph.inputs
    }
    result = tforge.compile(tforge.load(path), "canonicalize", input_shapes=shapes)
    assert all(all(isinstance(d, int) for d in v.shape) for v in result.model.graph.inputs)
    assert len(find_blocks(result.model).blocks) == zoo_entries[zoo_name].truth.num_layers
    feeds = verify.make_inputs(original, dims={"batch": 2, "sequence": 9}, rng=np.random.default_rng(1))
    testing.assert_ort_allclose(original, result.model, feeds, atol=1e-4, rtol=1e-4)


# (fixture, blocks, (heads, kv heads, head_dim, causal, rotary, pre-norm, gated, intermediate, norm), dims)
REAL_MODELS = [
    ("smollm2_onnx", 30, (9, 3, 64, True, True, True, True, 1536, "rms"), {"batch": 1, "sequence": 24}),
    ("minilm_onnx", 6, (12, 12, 32, False, False, False, False, 1536, "layer"), {"batch": 2, "sequence": 20}),
]


@pytest.mark.slow
@pytest.mark.parametrize(("fixture", "num_blocks", "expected", "dims"), REAL_MODELS, ids=["smollm2", "minilm"])
def test_real_model_map_and_canonicalize(request, fixture, num_blocks, expected, dims) -> None:
    path = request.getfixturevalue(fixture)
    original = tforge.load(path)
    model = _canonical(path)
    block_map = find_blocks(model)
    assert block_map.unrecognized == []
    assert len(block_map.blocks) == num_blocks
    for block in block_map.blocks:
        a, f = block.attention, block.ffn
        found = (a.num_heads, a.num_kv_heads, a.head_dim, a.causal, a.rotary, block.pre_norm,
                 f.gated, f.intermediate_size, block.attention_norm.kind)
        assert found == expected
    assert len(model.graph) <= len(original.graph)
    feeds = verify.make_inputs(original, dims=dims, rng=np.random.default_rng(0))
    (output,) = verify.compare_outputs(original, model, feeds)
    assert output.max_abs < 1e-4, output


def test_static_export_mask_constants_give_causality_and_window(zoo_name, zoo_static_model, zoo_entries) -> None:
    """A fixed-shape export folds its mask into a constant: causality (every later key blocked)
    and Gemma 2's window (keys ``window`` or more back blocked) are read from its values. The
    static sequence (6) is longer than the window (4), so the window shows in the constant."""
    truth = zoo_entries[zoo_name].truth
    blocks = find_blocks(_canonical(zoo_static_model(zoo_name))).blocks
    windows = [truth.sliding_window if i % 2 == 0 else None for i in range(truth.num_layers)]
    assert [(b.attention.causal, b.attention.sliding_window) for b in blocks] == [
        (truth.causal, w) for w in windows
    ]
