"""The block map and head pruning on decoders exported with a KV cache, by both exporters.

``llama_cache`` is a random LLaMA (2 layers, hidden 32, 4 heads of 8, 2 KV heads, rotary,
causal) exported by torch.onnx's dynamo exporter and by the TorchScript one (Hugging Face's
route). The TorchScript export computes every head split, repeat-KV and merge target at run
time from ``Shape`` of the values being reshaped, so the attention context is read by a
``Shape`` node besides the merge ``Reshape``; the block map must see through that.

Head pruning on a cache graph rewrites the declared heads of the past inputs and present
outputs (the caller feeds back what the graph returns). To check the pruned graph exactly, the
heads to remove are first made inert (zero Q columns and output-projection rows, plus zero K/V
columns of a KV head removed whole): removing them must then change no logit, at prefill and
at every decode step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import tforge
from tforge.compiler import head_layout
from tforge.compiler.ops import data_uses
from tforge.compiler.pipeline import PassManager
from tforge.compiler.structure import block_map, const_array, find_blocks
from tforge.runtime import generate
from tforge.runtime.save import save_model

EXPORTERS = ["dynamo", "torchscript"]
HEADS, KV_HEADS, HEAD_DIM, LAYERS = 4, 2, 8, 2  # hf_models.random_llama's defaults
PROMPT = [1, 5, 9, 20, 33, 7, 60, 11]



def test_llama_cache_config_is_what_the_tests_assume(llama_cache) -> None:
    config = llama_cache.model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers) == (
        HEADS, KV_HEADS, LAYERS,
    )  # fmt: skip
    assert config.hidden_size // config.num_attention_heads == HEAD_DIM


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_block_map_recognises_cached_attention(llama_canonical, exporter: str) -> None:
    model = llama_canonical[exporter]
    found = find_blocks(model)

    assert found.unrecognized == []
    assert len(found.blocks) == LAYERS
    for block in found.blocks:
        attn = block.attention
        assert attn is not None and block.ffn is not None
        assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
        assert attn.rotary and attn.causal and not attn.fused_qkv
        assert (attn.q.out_features, attn.k.out_features, attn.v.out_features) == (32, 16, 16)
        assert attn.o.in_features == HEADS * HEAD_DIM
        assert block.pre_norm and block.attention_norm is not None
        assert {id(lin) for lin in block.attention_norm.linears} == {id(attn.q), id(attn.k), id(attn.v)}
    # every linear but the LM head is in a block
    assert len(found.describe()["other_linears"]) == 1


def test_torchscript_context_is_read_by_a_shape_node(llama_canonical) -> None:
    """The case this file is about: the context has two readers, one of which reads its shape only."""
    for block in find_blocks(llama_canonical["torchscript"]).blocks:
        context = block.attention.context_matmul.outputs[0]
        readers = {u.node.op_type for u in context.uses()}
        assert readers == {"Shape", "Reshape"}
        assert [u.node.op_type for u in data_uses(context)] == ["Reshape"]


def _make_heads_inert(model: ir.Model, heads: list[int], kv_heads: list[int]) -> None:
    """Zero the Q columns and O rows of ``heads`` and the K/V columns of ``kv_heads`` in every layer."""
    for block in block_map(model).blocks:
        attn = block.attention
        d = attn.head_dim
        for lin, units, axis in (
            (attn.q, heads, 1), (attn.o, heads, 0), (attn.k, kv_heads, 1), (attn.v, kv_heads, 1),
        ):  # fmt: skip
            w = np.array(const_array(lin.weight), copy=True)
            for h in units:
                index = [slice(None)] * 2
                index[axis] = slice(h * d, (h + 1) * d)
                w[tuple(index)] = 0.0
            lin.weight.const_value = ir.tensor(w, name=lin.weight.name)


def _logits(path: Path) -> tuple[list[int], list[np.ndarray]]:
    gen = generate.greedy(path, PROMPT, 5, keep_logits=True)
    return gen.tokens, gen.logits


def _prune(model: ir.Model, spec: str):  # type: ignore[no-untyped-def]
    return PassManager.parse(spec, progress=lambda _: None).run(model)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_prune_a_whole_kv_group_rewrites_the_cache(llama_canonical, exporter: str, tmp_path: Path) -> None:
    """Heads 2 and 3 (KV head 1) go: the past/present caches lose a head, outputs stay exact."""
    model = llama_canonical[exporter].clone()
    _make_heads_inert(model, heads=[2, 3], kv_heads=[1])
    save_model(model, tmp_path / "reference.onnx")

    report = _prune(model, "prune-heads{keep=2 importance=magnitude compensate=false}")
    stats = report.passes[0].stats
    assert stats["pruned"] == LAYERS, stats
    rows = report.passes[0].details["layers"]
    assert [r["kept"] for r in rows] == [[0, 1]] * LAYERS
    save_model(model, tmp_path / "pruned.onnx")

    found = find_blocks(model)
    assert found.unrecognized == []
    for block in found.blocks:
        attn = block.attention
        assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (2, 1, HEAD_DIM)
    names = [v.name for v in model.graph.inputs if v.name.startswith("past_key_values.")]
    names += [v.name for v in model.graph.outputs if v.name.startswith("present.")]
    assert len(names) == 4 * LAYERS
    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.name in names:
            assert value.shape[1] == 1 and value.shape[3] == HEAD_DIM, (value.name, value.shape)

    want_tokens, want = _logits(tmp_path / "reference.onnx")
    got_tokens, got = _logits(tmp_path / "pruned.onnx")
    assert got_tokens == want_tokens
    assert len(got) == 5  # the prefill and four decode steps
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_prune_one_head_per_group_works(llama_canonical, exporter: str, tmp_path: Path) -> None:
    """Heads 1 and 3, one in each KV group: every group thinned, exact. The TorchScript export
    computes its repeat-KV count at run time (``Shape(kv)[1] * 2``) and canonicalize reads it
    back into a constant; where a count stays a run-time value only whole KV groups can go
    (tests/compiler/test_head_layout.py proves that refusal)."""
    model = llama_canonical[exporter].clone()
    _make_heads_inert(model, heads=[1, 3], kv_heads=[])
    save_model(model, tmp_path / "reference.onnx")

    report = _prune(model, "prune-heads{keep=2 importance=magnitude compensate=false}")
    assert report.passes[0].stats["pruned"] == LAYERS
    assert [r["kept"] for r in report.passes[0].details["layers"]] == [[0, 2]] * LAYERS
    save_model(model, tmp_path / "pruned.onnx")
    for block in find_blocks(model).blocks:
        assert (block.attention.num_heads, block.attention.num_kv_heads) == (2, 2)

    want_tokens, want = _logits(tmp_path / "reference.onnx")
    got_tokens, got = _logits(tmp_path / "pruned.onnx")
    assert got_tokens == want_tokens
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_calibrated_prune_heads_runs_at_prefill_and_decode(llama_canonical, exporter: str, tmp_path: Path) -> None:
    """The brief's pipeline with calibration-driven importance: the model still generates; each
    layer is pruned or skipped with its reason, never left half-rewritten."""
    model = llama_canonical[exporter].clone()
    feeds = [dict(generate.cache_layout(generate.open_session(_saved(model, tmp_path))).prefill_feeds(
        np.asarray([PROMPT], np.int64)))]
    report = tforge.compile(model, "calibrate,prune-heads{ratio=0.5}", calibration=feeds)
    stats = report.report.passes[-1].stats
    assert stats["pruned"] + sum(v for k, v in stats.items() if k.startswith("skipped: ")) == LAYERS
    save_model(model, tmp_path / "pruned.onnx")
    tokens, logits = _logits(tmp_path / "pruned.onnx")
    assert len(tokens) == 5 and all(np.isfinite(x).all() for x in logits)
    if stats["pruned"]:
        assert any(
            v.shape[1] == 1 for v in model.graph.inputs if v.name.startswith("past_key_values.")
        )


def _saved(model: ir.Model, folder: Path) -> Path:
    path = folder / "canonical.onnx"
    save_model(model, path)
    return path


def test_run_time_slice_bounds_on_head_dim_are_traced(llama_canonical) -> None:
    """TorchScript's rotate_half slices head_dim at Shape(x)[-1] // 2: no heads axis is cut, so
    the head-layout analysis accepts it (the dry run of a whole-group removal succeeds)."""
    model = llama_canonical["torchscript"]
    order = {id(node): i for i, node in enumerate(model.graph)}
    for block in find_blocks(model).blocks:
        attn = block.attention
        region = head_layout.attention_region(attn, order)
        assert any(n.op_type == "Slice" for n in region)
        edits = head_layout.plan_head_removal(attn, region, [0, 1], [0], 2)
        assert [v.name for v in edits.cache_inputs] == [
            f"past_key_values.{block.index}.key", f"past_key_values.{block.index}.value",
        ]  # fmt: skip
