"""rotate-residual: the residual stream turned by an orthogonal matrix folded into the weights.

The untied LLaMA cache graphs of both exporters are covered in test_passes_on_cache_graphs.py
(an exact case). Here: the tied LM head (SmolLM2's layout: the final gamma gets a linear of its
own and the table stays one copy through quantize-weights), Qwen2, Gemma and Mistral exports,
the Hadamard constructions, and the skips that name what stops the rotation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import tforge
from tests.conftest import teacher_forced
from tforge.compiler.embeddings import find_embeddings, tied_head
from tforge.compiler.structure import block_map
from tforge.passes.math import rotation

IDS = np.random.default_rng(5).integers(3, 96, 10)
PREFILL = 6
EXACT_RTOL = 1e-4  # of the reference logits' max abs; measured about 1e-6


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LLaMA (2 layers, GQA, hidden 48) with its LM head tied to the token table, exported with a
    KV cache by the dynamo route."""
    from tforge.frontends import hf_models

    model = hf_models.random_llama(hidden=48, tie_embeddings=True)  # 48: a Paley Hadamard (47 + 1)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    path = tmp_path_factory.mktemp("tied") / "llama-tied.onnx"
    return hf_models.export_causal_lm_with_cache(model, path, exporter="dynamo").path


def _canonical(path: Path) -> ir.Model:
    model = tforge.load(path)
    tforge.compile(model, "canonicalize", progress=lambda _: None)
    return model


def test_tied_head_keeps_its_table_and_the_logits(tied_llama: Path) -> None:
    reference = _canonical(tied_llama)
    model = _canonical(tied_llama)
    result = tforge.compile(model, "rotate-residual", progress=lambda _: None)
    record = result.report.passes[-1]
    assert record.stats["residual stream rotated"] == 1
    assert record.stats["norms folded"] == 5  # 2 per layer and the final one
    assert record.details["tied_head"] and record.details["final_gamma_linear"]
    assert record.details["rotation"] == "random-sign Hadamard of order 48 (48)"

    # the head still reads the table transposed, exactly: quantize-weights keeps one copy
    (embedding,) = find_embeddings(model.graph)
    assert tied_head(embedding, list(block_map(model).linears)) is not None

    expected, shapes = teacher_forced(reference, IDS, PREFILL, optimize=False)
    got, got_shapes = teacher_forced(model, IDS, PREFILL, optimize=False)
    assert got_shapes == shapes
    scale = max(float(np.abs(e).max()) for e in expected)
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g, e, rtol=0, atol=EXACT_RTOL * scale)

    quantized = tforge.compile(model, "quantize-weights{embedding-bits=4 embedding-block=16}", progress=lambda _: None)
    stats = quantized.report.passes[-1].stats
    assert stats["quantized: 4-bit rtn (tied to the embedding)"] == 1, dict(stats)
    # every linear (the new final-gamma one among them) and the table are quantized: no float left
    assert stats["quantized"] == 2 * 7 + 2  # 7 linears a layer, the final-gamma linear, the head


def test_a_second_rotation_skips_and_says_why(tied_llama: Path) -> None:
    """After one rotation the head reads the final-gamma linear, not the norm: the stream is no
    longer the closed pattern, and the second run says so instead of guessing."""
    model = _canonical(tied_llama)
    tforge.compile(model, "rotate-residual", progress=lambda _: None)
    again = tforge.compile(model, "rotate-residual{kind=random seed=3}", progress=lambda _: None)
    record = again.report.passes[-1]
    assert not record.changed
    assert [s["reason"] for s in record.skipped] == [
        "no one linear to the vocabulary (96) alone reads a norm of the residual stream (the LM head)"
    ]


@pytest.mark.parametrize(
    ("family", "options", "tied"),
    [
        ("qwen2", {"tie_word_embeddings": True}, True),  # biases on Q/K/V
        ("gemma", {"tie_word_embeddings": True, "head_dim": 16}, True),  # embedding * sqrt(hidden), 1 + gamma
        # the FFN as wide as the vocabulary: its norm's linears are not the head
        ("mistral", {"tie_word_embeddings": False, "intermediate_size": 96}, False),
    ],
)
def test_families_rotate_exactly(tmp_path: Path, family: str, options: dict, tied: bool) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tforge.frontends import hf_models

    settings = {"intermediate_size": 80, **options}
    config = AutoConfig.for_model(
        family, vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, **settings,
    )  # fmt: skip
    torch.manual_seed(0)
    module = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # gammas away from their initial ones, so that folding them matters
        for name, param in module.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    path = hf_models.export_causal_lm_with_cache(module, tmp_path / f"{family}.onnx", exporter="dynamo").path
    reference, model = _canonical(path), _canonical(path)
    record = tforge.compile(model, "rotate-residual", progress=lambda _: None).report.passes[-1]
    assert record.stats["residual stream rotated"] == 1, record.skipped
    assert record.details["tied_head"] is tied
    expected, _ = teacher_forced(reference, IDS, PREFILL, optimize=False)
    got, _ = teacher_forced(model, IDS, PREFILL, optimize=False)
    scale = max(float(np.abs(e).max()) for e in expected)
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g, e, rtol=0, atol=EXACT_RTOL * scale)


@pytest.mark.parametrize("order", [2, 4, 12, 28, 36, 64, 576, 768, 896, 960])
def test_hadamard_matrices(order: int) -> None:
    h = rotation.hadamard(order)
    assert h is not None and h.shape == (order, order)
    assert set(np.unique(h)) <= {-1, 1}
    np.testing.assert_array_equal(h @ h.T, order * np.eye(order, dtype=np.int64))
    q = rotation.random_hadamard(order, seed=1)
    np.testing.assert_allclose(q @ q.T, np.eye(order), atol=1e-12)


def test_rotation_falls_back_to_random_orthogonal_and_says_so() -> None:
    assert rotation.hadamard(22) is None  # no Hadamard matrix has order 2 (mod 4) above 2
    q, what = rotation.rotation(22)
    np.testing.assert_allclose(q @ q.T, np.eye(22), atol=1e-12)
    assert what == "random orthogonal (no Hadamard matrix of order 22 is built here)"
    with pytest.raises(ValueError, match="kind must be"):
        rotation.rotation(4, "givens")


def test_layernorm_model_is_skipped_with_the_node_and_left_alone(zoo_model) -> None:  # type: ignore[no-untyped-def]
    model = _canonical(zoo_model("gpt2"))
    before = ir.to_proto(model).SerializeToString()
    result = tforge.compile(model, "rotate-residual", progress=lambda _: None)
    record = result.report.passes[-1]
    assert not record.changed
    (skip,) = record.skipped
    assert skip["reason"] == "a residual Add whose other operand is not a linear's output"  # the positions
    assert skip["at"]
    assert ir.to_proto(model).SerializeToString() == before
