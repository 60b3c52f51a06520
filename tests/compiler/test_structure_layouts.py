"""The block map on layouts beyond the zoo's defaults (issue 18): Falcon's fused QKV cut into head
slots, and the TorchScript exports of the newer grouped-query families. Each model is a tiny
random ``transformers`` model exported once per session; exact passes keep the outputs and the
passes that cannot follow a layout say why."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import tforge
from tests.models import zoo
from tforge import testing
from tforge.compiler.calibration import FEEDS_KEY
from tforge.compiler.pipeline import PassManager
from tforge.compiler.structure import find_blocks
from tforge.runtime import ort as ort_runtime


@pytest.fixture(scope="session")
def extra_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Each ``zoo.EXTRA`` model exported (dynamo, dynamic shapes) at most once per session."""
    folder = tmp_path_factory.mktemp("zoo-extra")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = zoo.EXTRA[name].export(folder)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def torchscript_model(tmp_path_factory: pytest.TempPathFactory, zoo_module) -> Callable[[str], Path]:  # type: ignore[no-untyped-def]
    """Each zoo model exported by the TorchScript tracer (``dynamo=False``) at most once per session."""
    folder = tmp_path_factory.mktemp("zoo-torchscript")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = zoo.ZOO[name].export(folder, zoo_module(name), exporter="torchscript")
        return cache[name]

    return get


def _run(model: ir.Model, spec: str, entry: zoo.ZooEntry):  # type: ignore[no-untyped-def]
    model.meta[FEEDS_KEY] = [entry.inputs(2, 9, np.random.default_rng(i)) for i in range(4)]
    return PassManager.parse(spec, verify_each=True, progress=lambda _: None).run(model)


def _assert_same_function(reference: ir.Model, candidate: ir.Model, feeds: dict) -> None:
    """Max abs error at most 1e-4 of the reference output's max abs (ORT optimizations off)."""
    expected = ort_runtime.run(ort_runtime.create_session(reference, optimize=False), feeds)
    scale = max(float(np.abs(v).max()) for v in expected.values())
    testing.assert_ort_allclose(reference, candidate, feeds, atol=1e-4 * scale, rtol=0.0)


def _assert_truth(model: ir.Model, truth: zoo.Truth, windows: list[int | None]) -> None:
    found = find_blocks(model)
    assert found.unrecognized == []
    assert len(found.blocks) == truth.num_layers
    for block, window in zip(found.blocks, windows, strict=True):
        attn, ffn = block.attention, block.ffn
        assert attn is not None and ffn is not None
        assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (truth.num_heads, truth.num_kv_heads, truth.head_dim)
        assert (attn.fused_qkv, attn.causal, attn.sliding_window) == (truth.fused_qkv, truth.causal, window)
        assert attn.o.in_features == truth.num_heads * truth.head_dim
        assert (ffn.gated, ffn.intermediate_size, ffn.activation) == (truth.gated, truth.intermediate_size, truth.activation)
        assert block.pre_norm == truth.pre_norm and block.attention_norm is not None
        if truth.fused_qkv:
            assert attn.qkv_split == (truth.num_heads * truth.head_dim, *[truth.num_kv_heads * truth.head_dim] * 2)


# ----------------------------------------------------------------------------- Falcon

# (name, slots of the query heads, of the KV heads for K, for V)
FALCON = [
    ("falcon_mq", (0, 1, 2, 3), (4,), (5,)),  # [heads + 2, head_dim]: K and V the last two
    ("falcon_gqa", (0, 1, 4, 5), (2, 6), (3, 7)),  # per KV group [2 query, K, V] slots
]


@pytest.mark.parametrize(("name", "q_slots", "k_slots", "v_slots"), FALCON, ids=[f[0] for f in FALCON])
def test_falcon_head_slots_are_read(name, q_slots, k_slots, v_slots, extra_model) -> None:  # type: ignore[no-untyped-def]
    entry = zoo.EXTRA[name]
    model = tforge.load(extra_model(name))
    _run(model, "canonicalize", entry)
    _assert_truth(model, entry.truth, [None] * entry.truth.num_layers)
    for block in find_blocks(model).blocks:
        attn = block.attention
        assert attn is not None and attn.qkv_slots == (q_slots, k_slots, v_slots)
        described = attn.describe()  # what tforge inspect --json prints
        assert described["qkv_layout"] == "head_slots" and described["qkv_slots"] == [list(q_slots), list(k_slots), list(v_slots)]
        assert attn.rotary


@pytest.mark.parametrize("name", [f[0] for f in FALCON])
def test_falcon_exact_passes_keep_outputs_and_the_others_say_why(name: str, extra_model) -> None:  # type: ignore[no-untyped-def]
    entry = zoo.EXTRA[name]
    original = tforge.load(extra_model(name))
    model = tforge.load(extra_model(name))
    layers = entry.truth.num_layers

    report = _run(model, "canonicalize,ln-migrate,calibrate,smoothquant{alpha=0.5},prune-heads{ratio=0.25}", entry)

    stats = {p.name: p.stats for p in report.passes}
    assert stats["ln-migrate"]["migrated"] >= layers, stats
    assert stats["smoothquant"]["skipped: v->o: fused QKV reshaped into head slots (Falcon): V's columns are not proven private"] == layers
    reasons = [k for k in stats["prune-heads"] if k.startswith("skipped: fused QKV reshaped into head slots")]
    assert len(reasons) == 1 and stats["prune-heads"][reasons[0]] == layers, stats["prune-heads"]
    _assert_same_function(original, model, entry.inputs(2, 9, np.random.default_rng(1)))
    ort_runtime.create_session(model, optimize=True)  # loads in ONNX Runtime with its optimizations


def test_linear_attention_on_falcon_head_slots_skips(extra_model) -> None:  # type: ignore[no-untyped-def]
    """Multi-query Falcon's one KV head is broadcast by the attention MatMuls, which the linear
    form (K and Q concatenated per head) cannot take; unproven layouts skip too, never a bad graph."""
    for name in ("falcon_mq", "falcon_gqa"):
        entry = zoo.EXTRA[name]
        model = tforge.load(extra_model(name))
        stats = _run(model, "canonicalize,calibrate,linear-attention", entry).passes[-1].stats
        assert not stats.get("converted"), stats
        skipped = [k for k in stats if k.startswith(("skipped: K/V have", "skipped: fused QKV cut into head slots"))]
        assert skipped and sum(stats[k] for k in skipped) == entry.truth.num_layers, stats
        ort_runtime.create_session(model, optimize=False)  # the graph is valid


# ----------------------------------------------------------------------------- TorchScript exports

# (zoo name, what prune-heads{ratio=0.5} does to each layer: "pruned" whole KV groups, or the skip's words)
TORCHSCRIPT = [
    ("qwen3", "pruned"),  # repeat-KV count computed at run time: whole KV groups go
    ("phi3", "pruned"),
    ("gemma2", "whose extent on the heads axis is computed at run time"),  # the mask's heads axis
]


@pytest.mark.parametrize(("name", "pruning"), TORCHSCRIPT, ids=[t[0] for t in TORCHSCRIPT])
def test_torchscript_gqa_export_map_and_prune_heads(name: str, pruning: str, torchscript_model, zoo_entries) -> None:  # type: ignore[no-untyped-def]
    entry = zoo_entries[name]
    truth = entry.truth
    original = tforge.load(torchscript_model(name))
    model = tforge.load(torchscript_model(name))
    _run(model, "canonicalize", entry)
    windows = [truth.sliding_window if i % 2 == 0 else None for i in range(truth.num_layers)]
    _assert_truth(model, truth, windows)
    _assert_same_function(original, model, entry.inputs(2, 9, np.random.default_rng(1)))

    quarter = _run(model.clone(), "calibrate,prune-heads{ratio=0.25}", entry).passes[-1]
    # 3 of 4 heads on 2 KV heads is no grouped-query size, 4 is nearest: nothing goes, or it says why
    assert "pruned" not in quarter.stats, quarter.stats

    record = dataclasses.asdict(_run(model, "prune-heads{ratio=0.5 importance=magnitude}", entry).passes[0])
    stats = record["stats"]
    if pruning == "pruned":
        assert stats["pruned"] == truth.num_layers, stats
        assert [(r["heads_after"], r["kv_heads_after"]) for r in record["details"]["layers"]] == [(2, 1)] * truth.num_layers
        for block in find_blocks(model).blocks:
            assert block.attention is not None and (block.attention.num_heads, block.attention.num_kv_heads) == (2, 1)
        session = ort_runtime.create_session(model, optimize=True)
        (out,) = ort_runtime.run(session, entry.inputs(3, 11, np.random.default_rng(2))).values()
        assert out.shape == (3, 11, truth.hidden_size) and np.isfinite(out).all()
    else:
        assert "pruned" not in stats
        reasons = [k for k in stats if k.startswith("skipped: ")]
        assert reasons and all(pruning in r for r in reasons), stats
