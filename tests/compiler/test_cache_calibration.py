"""Calibration of KV-cache graphs from text, and int8 quantization of them.

On the random tiny LLaMA exported with a cache by both routes (``llama_cache``) and the
word-level tokenizer over its vocabulary (``tokenizer_dir``): text feeds recognise the cache,
each window is a prefill from an empty cache and then teacher-forced decode steps with the
present key/values fed back; the statistics count both phases' tokens and equal those of one
forward pass over the whole window (what teacher forcing must reproduce); ``--calib-npz`` and the
Ray worker's function still work; the w8a8 pipeline quantizes every linear and still decodes.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import tforge
from tests.conftest import WORDS, cosine, teacher_forced
from tforge.compiler.calibration import (
    CacheWindow,
    CalibrationData,
    attached_stats,
    calibrate_model,
    default_values,
    feed_tokens,
    text_feeds,
)
from tforge.compiler.distributed import calibrate_shard, calibration_job
from tforge.errors import PassConfigError
from tforge.runtime import generate

EXPORTERS = ["dynamo", "torchscript"]
KV_HEADS, HEAD_DIM = 2, 8  # llama_cache's geometry (hf_models.random_llama defaults)



@pytest.mark.parametrize("exporter", EXPORTERS)
def test_text_feeds_of_a_cache_graph_are_prefill_windows_with_decode_tokens(
    llama_canonical, exporter: str, llama_text: Path, tokenizer_dir: Path
) -> None:
    model = llama_canonical[exporter]
    feeds = list(
        text_feeds(model, llama_text, tokenizer_dir, samples=3, seq_len=20, decode_steps=5)
    )

    assert len(feeds) == 3 and all(isinstance(f, CacheWindow) for f in feeds)
    for feed in feeds:
        assert feed["input_ids"].shape == (1, 15) and feed.decode_ids.shape == (1, 5)
        np.testing.assert_array_equal(feed["attention_mask"], np.ones((1, 15)))
        np.testing.assert_array_equal(feed["position_ids"][0], np.arange(15))
        pasts = [name for name in feed if name.startswith("past_key_values.")]
        assert len(pasts) == 4  # 2 layers x key, value, read from the graph's inputs
        assert all(feed[name].shape == (1, KV_HEADS, 0, HEAD_DIM) for name in pasts)
        assert feed_tokens(feed) == 20
    # The windows are the text's token stream, the decode tokens right after their prefill.
    stream = [WORDS.index(w) for w in llama_text.read_text().split()]
    joined = np.concatenate([np.concatenate([f["input_ids"][0], f.decode_ids[0]]) for f in feeds])
    np.testing.assert_array_equal(joined, stream[:60])
    # More decode steps than a window holds leave one token to prefill.
    (short,) = text_feeds(model, llama_text, tokenizer_dir, samples=1, seq_len=4, decode_steps=8)
    assert short["input_ids"].shape == (1, 1) and short.decode_ids.shape == (1, 3)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_statistics_cover_prefill_and_decode_steps(
    llama_canonical, exporter: str, llama_text: Path, tokenizer_dir: Path
) -> None:
    model = llama_canonical[exporter].clone()
    samples, seq_len, steps = 3, 16, 6
    result = tforge.compile(
        model,
        f"calibrate{{samples={samples} seq-len={seq_len} decode-steps={steps}}}",
        calibration=CalibrationData(text=str(llama_text), tokenizer=str(tokenizer_dir)),
    )
    stats = attached_stats(model)

    assert stats is not None and result.report.passes[0].stats["samples"] == samples
    assert set(stats.stats) == set(default_values(model))  # every linear's input
    prefill = seq_len - steps
    for st in stats.stats.values():
        # prefill rows + one row per decode step: without the steps it would be samples * prefill
        assert st.count == samples * (prefill + steps)
    # Teacher-forced decoding with the cache reproduces the activations of one forward pass over
    # the whole window: a wrong past (or none) would change every decode-step row.
    whole = calibrate_model(
        model,
        text_feeds(
            model, llama_text, tokenizer_dir, samples=samples, seq_len=seq_len, decode_steps=0
        ),
    )
    for name, st in stats.stats.items():
        ref = whole[name]
        assert st.count == ref.count
        for field in ("min", "max", "sum", "sum_sq"):
            np.testing.assert_allclose(
                getattr(st, field), getattr(ref, field), rtol=1e-4, atol=1e-4
            )


def test_cache_windows_reach_a_worker_intact(
    llama_canonical, llama_text: Path, tokenizer_dir: Path
) -> None:
    # What a Ray worker runs (compiler/distributed.py): the model rebuilt from bytes, the shard
    # pickled; the decode steps must survive the trip.
    model = llama_canonical["torchscript"]
    feeds = list(
        text_feeds(model, llama_text, tokenizer_dir, samples=2, seq_len=12, decode_steps=4)
    )
    shard = pickle.loads(pickle.dumps(feeds))
    assert all(isinstance(f, CacheWindow) and f.decode_ids.shape == (1, 4) for f in shard)

    remote = calibrate_shard(calibration_job(model), shard, 0)
    local = calibrate_model(model, feeds)
    for name, st in local.stats.items():
        assert remote[name].count == st.count == 24
        np.testing.assert_allclose(remote[name].sum_sq, st.sum_sq, rtol=1e-5)


def test_npz_calibration_of_a_cache_graph_still_works(
    llama_cache, llama_canonical, tmp_path: Path
) -> None:
    model = llama_canonical["dynamo"].clone()
    layout = generate.cache_layout(generate.graph_io(llama_cache.dynamo))
    ids = np.random.default_rng(1).integers(3, 96, (4, 1, 7))
    arrays = {
        k: np.stack([layout.prefill_feeds(row)[k] for row in ids])
        for k in layout.prefill_feeds(ids[0])
    }
    np.savez(tmp_path / "calib.npz", **arrays)

    tforge.compile(model, "calibrate", calibration=CalibrationData(npz=str(tmp_path / "calib.npz")))

    stats = attached_stats(model)
    assert stats is not None and {st.count for st in stats.stats.values()} == {4 * 7}


def test_text_calibration_refuses_a_cache_graph_with_a_fixed_length(
    llama_canonical, llama_text: Path, tokenizer_dir: Path
) -> None:
    model = llama_canonical["dynamo"].clone()
    ids = next(v for v in model.graph.inputs if v.name == "input_ids")
    ids.shape = ir.Shape([1, 16])
    with pytest.raises(PassConfigError, match="cannot decode one token a step"):
        text_feeds(model, llama_text, tokenizer_dir, samples=1, seq_len=16)


# ----------------------------------------------------------------------------- int8


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize(
    "pipeline",
    ["canonicalize,calibrate,smoothquant,quantize{activations=auto}", "canonicalize,quantize"],
    ids=["w8a8-auto", "per-token"],
)
def test_int8_cache_graph_quantizes_every_linear_and_still_decodes(
    llama_cache, exporter: str, pipeline: str, llama_text: Path, tokenizer_dir: Path, tmp_path: Path
) -> None:
    source = getattr(llama_cache, exporter)
    out = tmp_path / "int8.onnx"
    data = CalibrationData(
        text=str(llama_text), tokenizer=str(tokenizer_dir), samples=8, seq_len=32
    )
    result = tforge.compile(
        source, pipeline, output=out, calibration=data if "calibrate" in pipeline else None
    )
    quantize = result.report.passes[-1].stats

    # 2 layers x 7 linears + the LM head, none left in float (the TorchScript export's o_proj
    # inputs have no static width in the graph; per-token quantization reads it from the weight)
    assert quantize["quantized"] == 15, quantize
    assert not any(key.startswith("skipped") for key in quantize), quantize
    ids = np.random.default_rng(2).integers(3, 96, 14)
    ref, ref_shapes = teacher_forced(source, ids, prefill=8)
    got, shapes = teacher_forced(out, ids, prefill=8)
    assert shapes == ref_shapes == [(1, KV_HEADS, 14, HEAD_DIM)] * 4
    assert min(cosine(a, b) for a, b in zip(ref, got, strict=True)) > 0.99
    # and greedy generation runs on it: a random model's int8 tokens may differ from float's, but
    # the prefill's logits (the same context for both) agree
    float_gen = generate.greedy(source, ids[:8].tolist(), 6, keep_logits=True)
    int8_gen = generate.greedy(out, ids[:8].tolist(), 6, keep_logits=True)
    assert (
        len(int8_gen.tokens) == 6 and int8_gen.logits is not None and float_gen.logits is not None
    )
    assert cosine(float_gen.logits[0], int8_gen.logits[0]) > 0.99
