"""The block map on layouts beyond the zoo's defaults (issue 18): Falcon's fused QKV cut into head
slots, CodeGen's cut per group of heads (read as slots too), and the TorchScript exports of the
newer grouped-query families. Each model is a tiny random ``transformers`` model exported once
per session; exact passes keep the outputs and the passes that cannot follow a layout say why."""

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
from tforge.compiler.head_layout import qkv_columns
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


def _run(model: ir.Model, spec: str, entry: zoo.ZooEntry, shape: tuple[int, int] = (2, 9)):  # type: ignore[no-untyped-def]
    model.meta[FEEDS_KEY] = [entry.inputs(*shape, np.random.default_rng(i)) for i in range(4)]
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


@pytest.mark.parametrize("exporter", ["dynamo", "dynamo-static", "torchscript-static"])
@pytest.mark.parametrize(("name", "q_slots", "k_slots", "v_slots"), FALCON, ids=[f[0] for f in FALCON])
def test_falcon_head_slots_are_read(name, q_slots, k_slots, v_slots, exporter, extra_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Dynamic and fixed-shape exports: a fixed shape's slot Reshape targets hold the batch and
    sequence, so the columns are replayed at those dims and the copies collapsed."""
    entry = zoo.EXTRA[name]
    if exporter == "dynamo":
        path = extra_model(name)
    else:
        path = entry.export(tmp_path, static=zoo.STATIC_SHAPE, exporter=exporter.split("-")[0])  # type: ignore[arg-type]
    model = tforge.load(path)
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

    # prune-heads rewrites the head slots (tests/passes/test_prune_heads.py): not an exact pass
    report = _run(model, "canonicalize,ln-migrate,calibrate,smoothquant{alpha=0.5}", entry)

    stats = {p.name: p.stats for p in report.passes}
    assert stats["ln-migrate"]["migrated"] >= layers, stats
    assert stats["smoothquant"]["skipped: v->o: fused QKV cut into head slots (Falcon, CodeGen): V's columns are not proven private"] == layers
    _assert_same_function(original, model, entry.inputs(2, 9, np.random.default_rng(1)))
    ort_runtime.create_session(model, optimize=True)  # loads in ONNX Runtime with its optimizations


def test_linear_attention_on_falcon_head_slots(extra_model) -> None:  # type: ignore[no-untyped-def]
    """Multi-query Falcon's one KV head is broadcast by the attention MatMuls, which the linear
    form (K and Q concatenated per head) cannot take: a skip, never a bad graph. The grouped
    layout expands K and V to every query head first, its heads axes proven: converted."""
    entry = zoo.EXTRA["falcon_mq"]
    model = tforge.load(extra_model("falcon_mq"))
    stats = _run(model, "canonicalize,calibrate,linear-attention", entry).passes[-1].stats
    assert not stats.get("converted"), stats
    skipped = [k for k in stats if k.startswith("skipped: K/V have")]
    assert skipped and sum(stats[k] for k in skipped) == entry.truth.num_layers, stats
    ort_runtime.create_session(model, optimize=False)  # the graph is valid

    entry = zoo.EXTRA["falcon_gqa"]
    original = tforge.load(extra_model("falcon_gqa"))
    model = original.clone()
    stats = _run(model, "canonicalize,calibrate,linear-attention", entry).passes[-1].stats
    assert stats.get("converted") == entry.truth.num_layers, stats
    feeds = entry.inputs(2, 9, np.random.default_rng(1))
    (want,) = ort_runtime.run(ort_runtime.create_session(original, optimize=False), feeds).values()
    (got,) = ort_runtime.run(ort_runtime.create_session(model, optimize=False), feeds).values()
    cosine = (want * got).sum(-1) / np.linalg.norm(want, axis=-1) / np.linalg.norm(got, axis=-1)
    assert cosine.min() >= 0.999, cosine.min()  # measured 0.99978 (a token's hidden state)


# ----------------------------------------------------------------------------- TorchScript exports

# (zoo name, what prune-heads{ratio=0.5} does to each layer: "pruned" or the skip's words, and the
# (heads, KV heads) after it: a KV group thinned to one query head, or a whole KV group gone)
TORCHSCRIPT = [
    # canonicalize reads the run-time repeat-KV count back into a constant: every group thinned
    ("qwen3", "pruned", (2, 2)),
    # thinning is allowed here too; the magnitudes pick both heads of one KV group
    ("phi3", "pruned", (2, 1)),
    # the mask, expanded by shape arithmetic all layers share, has one head
    ("gemma2", "pruned", (2, 2)),
]


@pytest.mark.parametrize(("name", "pruning", "after"), TORCHSCRIPT, ids=[t[0] for t in TORCHSCRIPT])
def test_torchscript_gqa_export_map_and_prune_heads(  # type: ignore[no-untyped-def]
    name: str, pruning: str, after: tuple[int, int], torchscript_model, zoo_entries
) -> None:
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
        assert [(r["heads_after"], r["kv_heads_after"]) for r in record["details"]["layers"]] == [after] * truth.num_layers
        for block in find_blocks(model).blocks:
            assert block.attention is not None and (block.attention.num_heads, block.attention.num_kv_heads) == after
        session = ort_runtime.create_session(model, optimize=True)
        (out,) = ort_runtime.run(session, entry.inputs(3, 11, np.random.default_rng(2))).values()
        assert out.shape == (3, 11, truth.hidden_size) and np.isfinite(out).all()
    else:
        assert "pruned" not in stats
        reasons = [k for k in stats if k.startswith("skipped: ")]
        assert reasons and all(pruning in r for r in reasons), stats


# ----------------------------------------------------------------------------- exports tools/family_sweep.py found misread

_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # the defaults point beyond the vocabulary


def _family(config: str, model: str, decoder: bool = True, **kwargs):  # type: ignore[no-untyped-def]
    """A ``build`` for a ZooEntry: the tiny ``transformers`` backbone of that config."""

    def build():  # type: ignore[no-untyped-def]
        import transformers

        backbone = getattr(transformers, model)(getattr(transformers, config)(**kwargs, **_TOKENS))
        return zoo._hidden_state_wrapper(backbone, **({"use_cache": False} if decoder else {}))

    return build


def _sweep_entry(name: str, build, *, causal: bool, fused_qkv: bool, intermediate: int, activation: str) -> zoo.ZooEntry:  # type: ignore[no-untyped-def]
    truth = zoo.Truth(
        **zoo._COMMON, num_kv_heads=zoo.HEADS, intermediate_size=intermediate, gated=False, norm="layer",
        pre_norm=True, causal=causal, fused_qkv=fused_qkv, activation=activation, qkv_bias=True,  # type: ignore[arg-type]
        attn_implementation="eager",
    )  # fmt: skip
    return zoo.ZooEntry(name=name, truth=truth, build=build, **zoo._TEXT)  # type: ignore[arg-type]


_H, _L, _N = zoo.HIDDEN, zoo.LAYERS, zoo.HEADS
SWEEP_FAMILIES = {
    e.name: e
    for e in [
        # fused QKV reshaped to [b, s, mp=4, -1] and split [16, 16, 16] inside each group
        _sweep_entry("codegen", _family(
            "CodeGenConfig", "CodeGenModel", vocab_size=zoo.VOCAB, n_embd=_H, n_layer=_L, n_head=_N,
            n_inner=zoo.INTERMEDIATE, n_positions=64, n_ctx=64, rotary_dim=8,
        ), causal=True, fused_qkv=True, intermediate=zoo.INTERMEDIATE, activation="gelu_tanh"),
        # 8 heads in CodeGen's 4 groups: each group's parts hold two heads, reshaped again into heads
        _sweep_entry("codegen-groups", _family(
            "CodeGenConfig", "CodeGenModel", vocab_size=zoo.VOCAB, n_embd=_H, n_layer=_L, n_head=2 * _N,
            n_inner=zoo.INTERMEDIATE, n_positions=64, n_ctx=64, rotary_dim=4,
        ), causal=True, fused_qkv=True, intermediate=zoo.INTERMEDIATE, activation="gelu_tanh"),
        # each projection viewed as [b, s, heads, -1]
        _sweep_entry("deberta-v2", _family(
            "DebertaV2Config", "DebertaV2Model", decoder=False, vocab_size=zoo.VOCAB, hidden_size=_H,
            num_hidden_layers=_L, num_attention_heads=_N, intermediate_size=zoo.INTERMEDIATE,
            max_position_embeddings=64, relative_attention=True, position_buckets=32,
            pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True,
            max_relative_positions=-1, position_biased_input=False,
        ), causal=False, fused_qkv=False, intermediate=zoo.INTERMEDIATE, activation="gelu"),
        # [b, s, -1, 3 * head_dim], transposed, chunk(3) as three Slices of the last axis
        _sweep_entry("gpt_neox", _family(
            "GPTNeoXConfig", "GPTNeoXModel", vocab_size=zoo.VOCAB, hidden_size=_H, num_hidden_layers=_L,
            num_attention_heads=_N, intermediate_size=zoo.INTERMEDIATE, max_position_embeddings=64,
        ), causal=True, fused_qkv=True, intermediate=zoo.INTERMEDIATE, activation="gelu"),
        # [b, s, heads, 3, head_dim], heads then merged into the batch: reshape(b * heads, s, head_dim)
        _sweep_entry("bloom", _family(
            "BloomConfig", "BloomModel", vocab_size=zoo.VOCAB, hidden_size=_H, n_layer=_L, n_head=_N,
        ), causal=True, fused_qkv=True, intermediate=4 * _H, activation="gelu_tanh"),
    ]
}  # fmt: skip

# (family, exporter, what the map reports of every block: heads, KV heads, head_dim, qkv_layout)
SWEEP = [
    ("codegen", "torchscript", (4, 4, 16, "head_slots")),  # (query, value, key) in each group: slots
    ("deberta-v2", "torchscript", (4, 4, 16, None)),
    ("gpt_neox", "torchscript", (4, 4, 16, "per_head")),
    ("bloom", "dynamo", (4, 4, 16, "head_slots")),
    ("falcon_gqa", "torchscript", (4, 2, 16, "head_slots")),  # repeat-KV Expand to a run-time shape
]


@pytest.fixture(scope="session")
def sweep_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """``(family, exporter) -> Path``: each SWEEP family (or zoo.EXTRA model) exported at most once."""
    folder = tmp_path_factory.mktemp("zoo-sweep")
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, exporter: str) -> Path:
        if (name, exporter) not in cache:
            entry = SWEEP_FAMILIES.get(name) or zoo.EXTRA[name]
            cache[name, exporter] = entry.export(folder, exporter=exporter)  # type: ignore[arg-type]
        return cache[name, exporter]

    return get


@pytest.mark.parametrize(("name", "exporter", "reads"), SWEEP, ids=[f"{s[0]}-{s[1]}" for s in SWEEP])
def test_sweep_exports_map_every_block_and_keep_outputs(name: str, exporter: str, reads, sweep_model) -> None:  # type: ignore[no-untyped-def]
    """Every block of these exports is read with its real heads, KV heads and head_dim (the
    blocks after the first lose their shape annotations in TorchScript exports), and the exact
    passes keep the outputs."""
    entry = SWEEP_FAMILIES.get(name) or zoo.EXTRA[name]
    original = tforge.load(sweep_model(name, exporter))
    model = tforge.load(sweep_model(name, exporter))
    _run(model, "canonicalize", entry)
    found = find_blocks(model)
    assert found.unrecognized == [] and len(found.blocks) == zoo.LAYERS
    for block in found.blocks:
        attn = block.attention
        assert attn is not None
        assert (attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.qkv_layout) == reads
        if attn.qkv_split is not None:
            assert sum(attn.qkv_split) == attn.q.out_features

    report = _run(model, "ln-migrate", entry)
    assert report.passes[-1].stats, report
    _assert_same_function(original, model, entry.inputs(2, 9, np.random.default_rng(1)))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_bloom_at_a_fixed_shape_heads_merged_with_the_batch_are_read(exporter: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Bloom merges the batch with the heads, ``[batch * heads, s, d]``; at a fixed batch of 2 the
    query and key slots come twice, once per batch entry. The copies are cut and the map is the
    dynamic export's; ln-migrate stays exact, and prune-heads removes a head whose rows of the
    output projection are zero exactly (its constant ``batch * heads`` rewritten)."""
    entry = SWEEP_FAMILIES["bloom"]
    path = entry.export(tmp_path, static=zoo.STATIC_SHAPE, exporter=exporter)  # type: ignore[arg-type]
    model = tforge.load(path)
    _run(model, "canonicalize", entry)
    found = find_blocks(model)
    assert found.unrecognized == [] and len(found.blocks) == zoo.LAYERS
    for block in found.blocks:
        attn = block.attention
        assert attn is not None and (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (4, 4, 16)
        assert attn.qkv_slots == ((0, 3, 6, 9), (1, 4, 7, 10), (2, 5, 8, 11))
        rows = attn.o.weight.const_value.numpy().copy()  # type: ignore[union-attr]
        rows[16:32] = 0.0  # head 1
        attn.o.weight.const_value = ir.tensor(rows, name=attn.o.weight.name)
    zeroed = model.clone()
    feeds = entry.inputs(*zoo.STATIC_SHAPE, np.random.default_rng(1))
    _run(model, "ln-migrate", entry)
    _assert_same_function(zeroed, model, feeds)
    pruned = _run(model, "calibrate,prune-heads{keep=3 compensate=false}", entry, zoo.STATIC_SHAPE).passes[-1]
    assert [row["kept"] for row in pruned.details["layers"]] == [[0, 2, 3]] * zoo.LAYERS, pruned.stats
    testing.assert_ort_allclose(zeroed, model, feeds, atol=1e-5, rtol=0.0)


def test_a_split_that_does_not_cover_the_fused_linear_is_refused(sweep_model) -> None:  # type: ignore[no-untyped-def]
    """CodeGen cuts [b, s, 4, -1] in [16, 16, 16]: when the -1 cannot be resolved (here the
    reshaped input's dims are dropped and the target is a graph input, so neither the Reshape's
    dims nor the columns on the paths are known), the parts cover 48 of the 192 columns, and the
    block is refused rather than read as one head of 16."""
    entry = SWEEP_FAMILIES["codegen"]
    model = tforge.load(sweep_model("codegen", "torchscript"))
    _run(model, "canonicalize", entry)
    split = next(n for n in model.graph if n.op_type == "Split" and "h.1" in n.name)
    reshape = split.inputs[0].producer()
    assert reshape is not None and reshape.op_type == "Reshape"
    reshape.inputs[0].shape = None
    reshape.outputs[0].shape = None
    target = ir.Value(name="target", shape=ir.Shape([4]), type=ir.TensorType(ir.DataType.INT64))
    model.graph.inputs.append(target)
    reshape.replace_input_with(1, target)
    found = find_blocks(model)
    assert [b.attention is not None for b in found.blocks] == [True, False]  # block 1 keeps its FFN only
    (why,) = found.unrecognized
    assert "192 wide) is cut into parts [16, 16, 16] that do not cover its output" in why, why


def _codegen_columns(heads: int, head_dim: int, part: int) -> np.ndarray:
    """transformers' CodeGenAttention: the fused output viewed as [..., 4, -1], each group cut in
    (query, value, key) parts of ``heads / 4`` heads; head ``h`` is head ``h % (heads / 4)`` of
    group ``h // (heads / 4)``. The columns of ``part`` (0 query, 1 value, 2 key), head by head."""
    per_group = heads // 4
    local = per_group * head_dim
    return np.concatenate(
        [(h // per_group) * 3 * local + part * local + (h % per_group) * head_dim + np.arange(head_dim) for h in range(heads)]
    )


# (family, exporter, heads of head_dim)
CODEGEN = [("codegen-groups", "dynamo", 8, 8), ("codegen-groups", "torchscript", 8, 8), ("codegen", "torchscript", 4, 16)]


@pytest.mark.parametrize(("name", "exporter", "heads", "head_dim"), CODEGEN, ids=[f"{c[0]}-{c[1]}" for c in CODEGEN])
def test_codegen_groups_are_read_as_head_slots(name: str, exporter: str, heads: int, head_dim: int, sweep_model) -> None:  # type: ignore[no-untyped-def]
    """CodeGen's fused output is cut per group (4 of them, not per head) in (query, value, key)
    order, and with more heads than groups each part is reshaped again into heads. It is read as
    head slots, so head_layout.qkv_columns gives every reader transformers' columns of each head;
    the exact passes keep the outputs; the V -> O rescalings skip it by name; prune-heads prunes
    exactly (the removed heads' rows of the output projection zeroed) or says why not."""
    entry = SWEEP_FAMILIES[name]
    original = tforge.load(sweep_model(name, exporter))
    model = tforge.load(sweep_model(name, exporter))
    _run(model, "canonicalize", entry)
    canonical = model.clone()
    found = find_blocks(model)
    assert found.unrecognized == [] and len(found.blocks) == zoo.LAYERS
    for block in found.blocks:
        attn = block.attention
        assert attn is not None and attn.qkv_layout == "head_slots"
        assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (heads, heads, head_dim)
        assert attn.qkv_split == (heads * head_dim,) * 3 and attn.o.in_features == heads * head_dim
        q, k, v = qkv_columns(attn)
        for got, part in ((q, 0), (v, 1), (k, 2)):
            np.testing.assert_array_equal(got, _codegen_columns(heads, head_dim, part))

    report = _run(model, "ln-migrate,calibrate,smoothquant{alpha=0.5}", entry)
    stats = {p.name: p.stats for p in report.passes}
    assert stats["ln-migrate"]["migrated"] == zoo.LAYERS, stats
    reason = "skipped: v->o: fused QKV cut into head slots (Falcon, CodeGen): V's columns are not proven private"
    assert stats["smoothquant"][reason] == zoo.LAYERS, stats
    feeds = entry.inputs(2, 9, np.random.default_rng(1))
    _assert_same_function(original, model, feeds)

    pruned = canonical.clone()
    run = _run(pruned, "calibrate,prune-heads{ratio=0.5 compensate=false}", entry).passes[-1]
    if not run.stats.get("pruned"):  # every layer says why
        blocked = [k for k in run.stats if k.startswith("skipped: ")]
        assert sum(run.stats[k] for k in blocked) == zoo.LAYERS, run.stats
        return
    assert run.stats["pruned"] == zoo.LAYERS, run.stats
    masked = canonical.clone()  # the same function: the removed heads' rows of o zeroed
    for row, block in zip(run.details["layers"], find_blocks(masked).blocks, strict=True):
        assert block.attention is not None
        weight = block.attention.o.weight
        rows = weight.const_value.numpy().copy()
        for h in set(range(heads)) - set(row["kept"]):
            rows[h * head_dim : (h + 1) * head_dim] = 0
        weight.const_value = ir.tensor(rows)
    _assert_same_function(masked, pruned, feeds)
