"""ort-fuse: RMSNorms and KV-cache attention become ORT's fused kernels; the numbers stay the same."""

from __future__ import annotations

import collections

import numpy as np
import pytest

import tforge
from tforge.backends import ort
from tforge.compiler.pipeline import PassManager
from tforge.passes.math.rotary import half_caches, rotate_half_reference
from tforge.runtime import generate
from tforge.runtime import ort as ort_runtime

PROMPT = [1, 5, 9, 13, 20, 7, 3, 44, 61]


def _run(model, spec: str):
    report = PassManager.parse(spec, progress=lambda _: None).run(model)
    return report.passes[-1]


def _prepared(path, spec: str = "canonicalize"):
    model = tforge.load(path)
    _run(model, spec)
    return model


def _ops(model) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in model.graph)


def _kernels(model, feeds) -> set[str]:
    return {op for op, _ in ort.kernels_run(model, feeds)}


def _assert_same_steps(reference, fused, *, steps: int = 4, atol: float = 5e-5, optimize: bool = False) -> None:
    """Prefill ``PROMPT`` from an empty cache, then decode ``steps`` tokens feeding each graph's own
    present back; every output of the fused graph equals the unfused one at every step."""
    want_s = ort_runtime.create_session(reference, optimize=False)
    got_s = ort_runtime.create_session(fused, optimize=optimize)
    layout = generate.cache_layout(want_s)
    names = [o.name for o in want_s.get_outputs()]
    assert names == [o.name for o in got_s.get_outputs()]  # the interface is unchanged
    feeds_w = feeds_g = layout.prefill_feeds(np.array([PROMPT]))
    past = len(PROMPT)
    for step in range(steps + 1):
        want = dict(zip(names, want_s.run(None, feeds_w), strict=True))
        got = dict(zip(names, got_s.run(None, feeds_g), strict=True))
        for name in names:
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=atol, err_msg=f"step {step}: {name}")
        token = np.array([[int(np.argmax(want[layout.logits][0, -1]))]])
        feeds_w = {**layout.step_feeds(token, past), **{c.past: want[c.present] for c in layout.cache}}
        feeds_g = {**layout.step_feeds(token, past), **{c.past: got[c.present] for c in layout.cache}}
        past += 1


@pytest.fixture(scope="module")
def head16(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A random LLaMA with head_dim 16 (GQA's fused rotary needs a multiple of 16), dynamo export."""
    from tforge.frontends import hf_models

    path = tmp_path_factory.mktemp("llama-head16") / "llama.onnx"
    model = hf_models.random_llama(hidden=64, heads=4, kv_heads=2, intermediate=96)
    return hf_models.export_causal_lm_with_cache(model, path, exporter="dynamo").path


def test_dynamo_cache_graph_fuses_and_stays_exact(llama_cache) -> None:
    reference = _prepared(llama_cache.dynamo)
    model = reference.clone()
    result = _run(model, "ort-fuse")

    assert result.stats.get("attention -> GroupQueryAttention", 0) == 2
    assert result.stats.get("rotary -> RotaryEmbedding", 0) == 4  # head_dim 8: ORT's GQA rotates only multiples of 16
    assert result.stats.get("RMSNorm -> SimplifiedLayerNormalization", 0) == 1  # the first norm has no residual add
    assert result.stats.get("residual add + RMSNorm -> SkipSimplifiedLayerNormalization", 0) == 4
    assert not result.skipped
    ops = _ops(model)
    assert ops["GroupQueryAttention"] == 2 and ops["Softmax"] == 0 and ops["ReduceMean"] == 0
    assert sum(ops.values()) < sum(_ops(reference).values()) / 2

    _assert_same_steps(reference, model)
    _assert_same_steps(reference, model, optimize=True)
    feeds = generate.cache_layout(ort_runtime.create_session(model)).prefill_feeds(np.array([PROMPT]))
    ran = _kernels(model, feeds)
    assert {"GroupQueryAttention", "RotaryEmbedding", "SimplifiedLayerNormalization",
            "SkipSimplifiedLayerNormalization"} <= ran  # fmt: skip
    assert "Softmax" not in ran


def test_greedy_generation_is_identical(llama_cache) -> None:
    reference = _prepared(llama_cache.dynamo)
    model = reference.clone()
    _run(model, "ort-fuse")
    want = generate.greedy(reference, PROMPT, 16)
    got = generate.greedy(model, PROMPT, 16)
    assert got.tokens == want.tokens
    assert got.tokens == generate.greedy_recompute(llama_cache.dynamo, PROMPT, 16).tokens


@pytest.mark.parametrize("mask", ["bias", "seqlens"])
def test_after_dynamic_quantization(llama_cache, mask: str) -> None:
    reference = _prepared(llama_cache.dynamo, "canonicalize,quantize{activations=dynamic}")
    model = reference.clone()
    result = _run(model, f"ort-fuse{{mask={mask}}}")
    # the block map finds no attention once the projections are integer ops: read from the graph
    assert result.stats.get("attention -> GroupQueryAttention", 0) == 2
    assert not result.skipped
    _assert_same_steps(reference, model)
    feeds = generate.cache_layout(ort_runtime.create_session(model)).prefill_feeds(np.array([PROMPT]))
    ran = _kernels(model, feeds)
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ran
    assert ran & {"MatMulIntegerToFloat", "DynamicQuantizeMatMul"}  # int8 linears still run
    assert "MatMul" not in ran or _ops(model)["MatMul"] == 0
    if mask == "seqlens":  # the mask subgraph is gone with the bias
        assert not _ops(model).keys() & {"GatherND", "LessOrEqual", "Where"}
    assert generate.greedy(model, PROMPT, 12).tokens == generate.greedy(reference, PROMPT, 12).tokens


def test_fused_rotary_with_head_dim_16(head16) -> None:
    reference = _prepared(head16)
    model = reference.clone()
    result = _run(model, "ort-fuse")
    assert result.stats.get("attention -> GroupQueryAttention", 0) == 2
    assert result.stats.get("rotary -> RotaryEmbedding", 0) == 0
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert all(n.attributes["do_rotary"].value == 1 for n in gqa)
    assert _ops(model)["RotaryEmbedding"] == 0
    _assert_same_steps(reference, model)
    assert generate.greedy(model, PROMPT, 12).tokens == generate.greedy(reference, PROMPT, 12).tokens
    separate = reference.clone()
    assert _run(separate, "ort-fuse{rotary=separate}").stats.get("rotary -> RotaryEmbedding") == 4
    _assert_same_steps(reference, separate, steps=2)


@pytest.mark.parametrize("mask", ["bias", "seqlens"])
def test_right_padded_batch(llama_cache, mask: str) -> None:
    """Batch 2, the second row right-padded: the valid positions' logits are unchanged."""
    reference = _prepared(llama_cache.dynamo)
    model = reference.clone()
    _run(model, f"ort-fuse{{mask={mask}}}")
    layout = generate.cache_layout(ort_runtime.create_session(reference, optimize=False))
    feeds = layout.prefill_feeds(np.array([PROMPT, PROMPT[:5] + [0] * 4]))
    feeds[layout.attention_mask][1, 5:] = 0
    want = ort_runtime.create_session(reference, optimize=False).run([layout.logits], feeds)[0]
    got = ort_runtime.create_session(model, optimize=False).run([layout.logits], feeds)[0]
    np.testing.assert_allclose(got[0], want[0], atol=5e-5)
    np.testing.assert_allclose(got[1, :5], want[1, :5], atol=5e-5)


def test_options_choose_the_fusions(llama_cache) -> None:
    reference = _prepared(llama_cache.dynamo)

    only_norms = reference.clone()
    result = _run(only_norms, "ort-fuse{attention=false skip-norms=false}")
    assert result.stats.get("RMSNorm -> SimplifiedLayerNormalization", 0) == 5
    assert _ops(only_norms)["Softmax"] == 2 and _ops(only_norms)["SkipSimplifiedLayerNormalization"] == 0
    _assert_same_steps(reference, only_norms, steps=2)

    only_skip = reference.clone()
    result = _run(only_skip, "ort-fuse{attention=false norms=false}")
    assert result.stats.get("residual add + RMSNorm -> SkipSimplifiedLayerNormalization", 0) == 4
    assert any(s["reason"].startswith("no residual add") and not s["blocked"] for s in result.skipped)
    assert _ops(only_skip)["ReduceMean"] == 1  # the first norm stays decomposed
    _assert_same_steps(reference, only_skip, steps=2)

    only_attention = reference.clone()
    result = _run(only_attention, "ort-fuse{norms=false skip-norms=false}")
    assert result.stats.get("attention -> GroupQueryAttention", 0) == 2 and _ops(only_attention)["ReduceMean"] == 5
    _assert_same_steps(reference, only_attention, steps=2)

    fused_rotary = reference.clone()
    result = _run(fused_rotary, "ort-fuse{rotary=fused}")
    assert result.stats.get("attention -> GroupQueryAttention", 0) == 0
    assert sum(v for k, v in result.stats.items() if "multiples of 16" in k) == 2
    _assert_same_steps(reference, fused_rotary, steps=1)

    with pytest.raises(ValueError, match="ort-fuse: option mask"):
        PassManager.parse("ort-fuse{mask=none}")


def test_torchscript_export_every_attention_is_fused_or_explained(llama_cache) -> None:
    reference = _prepared(llama_cache.torchscript)
    model = reference.clone()
    result = _run(model, "ort-fuse")
    fused = result.stats.get("attention -> GroupQueryAttention", 0)
    explained = [s for s in result.skipped if s["at"].startswith("Softmax")]
    assert fused + len(explained) == 2
    assert result.stats.get("RMSNorm -> SimplifiedLayerNormalization", 0) + result.stats.get("residual add + RMSNorm -> SkipSimplifiedLayerNormalization", 0) == 5
    _assert_same_steps(reference, model, steps=2)


def test_half_caches_and_rotate_half() -> None:
    inv_freq = 10000.0 ** (-np.arange(0, 8, 2) / 8)
    angles = np.arange(32)[:, None] * inv_freq[None, :]
    full = np.concatenate([angles, angles], axis=1)
    cos, sin = half_caches(np.cos(full), np.sin(full))
    assert cos.shape == (32, 4) and np.allclose(cos, np.cos(angles))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 3, 8))
    positions = np.array([[4, 5, 6]])
    h = x[..., 4:]
    rotated = np.concatenate([-h, x[..., :4]], axis=-1)
    expected = x * np.cos(full[positions])[:, None] + rotated * np.sin(full[positions])[:, None]
    np.testing.assert_allclose(rotate_half_reference(x, positions, cos, sin), expected, atol=1e-6)
    interleaved = np.repeat(angles, 2, axis=1)
    with pytest.raises(ValueError, match="first half"):
        half_caches(np.cos(interleaved), np.sin(interleaved))
