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


def _assert_same_steps(
    reference, fused, *, steps: int = 4, atol: float = 5e-5, optimize: bool = False,
    left_padding: int = 0, padded_rows: bool = True,
) -> None:  # fmt: skip
    """Prefill ``PROMPT`` from an empty cache, then decode ``steps`` tokens feeding each graph's own
    present back; every output of the fused graph equals the unfused one at every step.

    ``left_padding``: a second row, ``PROMPT`` shifted right by that many padding tokens (mask 0,
    positions numbered as Hugging Face does: the cumulative mask minus one, 1 where padded).
    ``padded_rows=False`` leaves out the padded positions: their logits and their cache entries."""
    want_s = ort_runtime.create_session(reference, optimize=False)
    got_s = ort_runtime.create_session(fused, optimize=optimize)
    layout = generate.cache_layout(want_s)
    names = [o.name for o in want_s.get_outputs()]
    assert names == [o.name for o in got_s.get_outputs()]  # the interface is unchanged
    rows = [PROMPT] + ([[0] * left_padding + PROMPT[:-left_padding]] if left_padding else [])
    mask = np.ones((len(rows), len(PROMPT)), np.int64)
    mask[1:, :left_padding] = 0
    feeds_w = feeds_g = _padded(layout, layout.prefill_feeds(np.array(rows)), mask)
    past = len(PROMPT)
    for step in range(steps + 1):
        want = dict(zip(names, want_s.run(None, feeds_w), strict=True))
        got = dict(zip(names, got_s.run(None, feeds_g), strict=True))
        axes = {layout.logits: 1, **{c.present: c.past_axis for c in layout.cache}}
        for name in names:
            g, w = got[name], want[name]
            if not padded_rows:  # the positions' axis next to the batch, then only the valid ones
                valid = mask[:, -g.shape[axes[name]] :].astype(bool)
                g, w = np.moveaxis(g, axes[name], 1)[valid], np.moveaxis(w, axes[name], 1)[valid]
            np.testing.assert_allclose(g, w, rtol=0, atol=atol, err_msg=f"step {step}: {name}")
        tokens = np.argmax(want[layout.logits][:, -1], axis=-1)[:, None]
        mask = np.concatenate([mask, np.ones((len(rows), 1), np.int64)], axis=1)
        step_feeds = _padded(layout, layout.step_feeds(tokens, past), mask)
        feeds_w = {**step_feeds, **{c.past: want[c.present] for c in layout.cache}}
        feeds_g = {**step_feeds, **{c.past: got[c.present] for c in layout.cache}}
        past += 1


def _padded(layout, feeds: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    """``feeds`` with the attention mask ``mask`` (past + new tokens) and the new tokens' positions from it."""
    n = feeds[layout.input_ids].shape[1]
    out = {**feeds, layout.attention_mask: mask.astype(feeds[layout.attention_mask].dtype)}
    if layout.position_ids is not None:
        positions = np.where(mask == 0, 1, np.cumsum(mask, axis=1) - 1)[:, -n:]
        out[layout.position_ids] = positions.astype(feeds[layout.position_ids].dtype)
    return out


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


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("mask", ["bias", "seqlens"])
def test_right_padded_batch(llama_cache, mask: str, exporter: str) -> None:
    """Batch 2, the second row right-padded: the valid positions' logits are unchanged."""
    reference = _prepared(getattr(llama_cache, exporter))
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


def test_torchscript_export_fuses_every_attention_and_stays_exact(llama_cache) -> None:
    """Hugging Face's TorchScript export: the head splits and rotate_half bounds are computed from
    Shape at run time (canonicalize reads them back), the mask is Where(mask, 0, -inf) with a NaN
    guard after each Softmax, the context goes through a no-op Reshape before its merge."""
    reference = _prepared(llama_cache.torchscript)
    assert _ops(reference)["IsNaN"] == 2  # -inf mask: canonicalize keeps the guards
    model = reference.clone()
    result = _run(model, "ort-fuse")

    assert result.stats.get("attention -> GroupQueryAttention", 0) == 2
    assert result.stats.get("RMSNorm -> SimplifiedLayerNormalization", 0) == 1
    assert result.stats.get("residual add + RMSNorm -> SkipSimplifiedLayerNormalization", 0) == 4
    assert not result.skipped
    ops = _ops(model)
    assert ops["GroupQueryAttention"] == 2 and ops["Softmax"] == 0 and ops["IsNaN"] == 0
    assert ops["Max"] == 1  # the shared -inf mask clamped once, to the float32 minimum

    _assert_same_steps(reference, model)
    _assert_same_steps(reference, model, steps=2, optimize=True)
    want = generate.greedy(reference, PROMPT, 16)
    assert generate.greedy(model, PROMPT, 16).tokens == want.tokens
    assert want.tokens == generate.greedy(llama_cache.dynamo, PROMPT, 16).tokens


@pytest.mark.parametrize(("exporter", "padded_rows"), [("torchscript", True), ("dynamo", False)])
def test_left_padded_batch(llama_cache, exporter: str, padded_rows: bool) -> None:
    """Batch 2, the second row left-padded by 3: prefill and decode equal the unfused graph (exact
    positions: head_dim 8 rotates with RotaryEmbedding, which reads every position). A padded query
    row has all its keys masked. The TorchScript graph's NaN guard gives it zeros, as ORT's CPU
    kernel does: every row is equal. The dynamo graph's finfo.min mask makes it a uniform average
    of all the values instead: those rows differ, and the cache entries later layers compute from
    them, which no valid row reads (their keys are masked), so they are left out."""
    reference = _prepared(getattr(llama_cache, exporter))
    model = reference.clone()
    assert _run(model, "ort-fuse").stats.get("attention -> GroupQueryAttention", 0) == 2
    _assert_same_steps(reference, model, steps=3, left_padding=3, padded_rows=padded_rows)


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
