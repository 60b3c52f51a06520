"""quantize-weights{tune-steps=N}: the block scales tuned end to end against the float model.

On a random LLaMA with a KV cache, calibrated on random text: the tuned model is closer to the
float model than the untuned one in ONNX Runtime on windows the tuning never read, and only the
scale initializers changed (the same codes, the same graph).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tforge
from tests.conftest import WORDS
from tforge import testing
from tforge.compiler.calibration import CalibrationData
from tforge.compiler.scale_tuning import quantized_scales
from tforge.errors import PassConfigError, PreconditionError
from tforge.runtime import generate

pytest.importorskip("torch")

QUANTIZE = "quantize-weights{method=gptq block=16 embedding-block=16}"


def _kl(reference: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL(reference || logits) of the next-token distributions."""

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = log_softmax(reference), log_softmax(logits)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def _logits(model, ids: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    session = generate.open_session(model, optimize=False)
    layout = generate.cache_layout(session)
    return session.run([layout.logits], layout.prefill_feeds(ids))[0]


@pytest.fixture(scope="module")
def long_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 lines of random words of ``llama_cache``'s vocabulary: about 450 windows of 16 tokens,
    enough for 150 steps of 4 windows without the tuning fitting a few windows' noise."""
    rng = np.random.default_rng(1)
    lines = [" ".join(WORDS[i] for i in rng.integers(3, len(WORDS), 12)) for _ in range(600)]
    path = tmp_path_factory.mktemp("tune") / "text.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_tuned_scales_bring_the_model_closer_to_float(llama_canonical, long_text: Path, tokenizer_dir: Path) -> None:  # type: ignore[no-untyped-def]
    data = CalibrationData(text=str(long_text), tokenizer=str(tokenizer_dir), seq_len=16)
    untuned = llama_canonical["dynamo"].clone()
    tforge.compile(untuned, f"calibrate,{QUANTIZE}", calibration=data, progress=lambda _: None)
    tuned = llama_canonical["dynamo"].clone()
    result = tforge.compile(
        tuned, f"calibrate,{QUANTIZE[:-1]} tune-steps=150 tune-lr=0.003}}", calibration=data, progress=lambda _: None
    )
    record = result.report.passes[-1]
    tuning = record.details["tuning"]
    scales = quantized_scales(tuned.graph)
    assert record.stats["scales tuned"] == len(scales) == 2 * 7 + 2  # 7 linears a layer, the (untied) LM head, the table
    assert tuning["kept"] and tuning["loss"] == "kl" and tuning["held_out"] == 16
    assert tuning["window_tokens"] == 16 and tuning["batch"] == 4  # the data's windows, 4 a step (512 // 128)
    assert tuning["held_out_after"] < 0.95 * tuning["held_out_before"], tuning

    # only the scales moved: the same nodes, the same codes
    assert [(n.op_type, n.name) for n in tuned.graph] == [(n.op_type, n.name) for n in untuned.graph]
    names = {v.name for v in scales}
    moved = 0
    for name, value in tuned.graph.initializers.items():
        before, after = untuned.graph.initializers[name].const_value.numpy(), value.const_value.numpy()
        if name in names:
            moved += int(not np.array_equal(before, after))
            assert np.all(np.sign(after) == np.sign(before))  # s0 * exp(theta)
        else:
            np.testing.assert_array_equal(after, before, err_msg=name)
    assert moved == len(names)

    # in ONNX Runtime, on token windows neither calibration nor tuning read
    ids = np.random.default_rng(11).integers(3, 96, (4, 16))
    reference = _logits(llama_canonical["dynamo"], ids)
    assert _kl(reference, _logits(tuned, ids)) < 0.95 * _kl(reference, _logits(untuned, ids))


@pytest.mark.parametrize(("stage", "key", "batch"), [("tune", "tuning", 16), ("reconstruct", "reconstruction", 8)])
def test_seq_len_sets_the_windows_and_keeps_the_tokens_a_step(llama_canonical, long_text: Path, tokenizer_dir: Path, stage, key, batch) -> None:  # type: ignore[no-untyped-def]
    """tune-seq-len / reconstruct-seq-len: the windows' length; a step still reads 512 / 256 tokens."""
    data = CalibrationData(text=str(long_text), tokenizer=str(tokenizer_dir))  # no window length of its own
    model = llama_canonical["dynamo"].clone()
    result = tforge.compile(model, f"calibrate{{seq-len=32}},{QUANTIZE[:-1]} {stage}-steps=2 {stage}-seq-len=32}}",
                            calibration=data, progress=lambda _: None)  # fmt: skip
    details = result.report.passes[-1].details[key]
    assert (details["window_tokens"], details["batch"]) == (32, batch), details
    if stage == "tune":
        assert details["windows"] == 32, details  # 16 held out + 2 steps of 16
    else:
        assert len(details["blocks"]) == 2 and details["windows"] > 16, details
    with pytest.raises(PassConfigError, match=f"{stage}-seq-len must be in"):
        tforge.compile(model, f"quantize-weights{{{stage}-seq-len=1024}}", progress=lambda _: None)
    with pytest.raises(PassConfigError, match="held-out windows would be the other's training text"):
        tforge.compile(model, f"quantize-weights{{reconstruct-steps=1 tune-steps=1 {stage}-seq-len=512}}", progress=lambda _: None)


def test_tune_steps_without_calibration_text_says_what_to_add(llama_canonical) -> None:  # type: ignore[no-untyped-def]
    model = llama_canonical["dynamo"].clone()
    with pytest.raises(PreconditionError, match="tune-steps tunes the scales on the pipeline's calibration text"):
        tforge.compile(model, "quantize-weights{tune-steps=5}", progress=lambda _: None)


MLP = """
<ir_version: 10, opset_import: ["" : 21]>
mlp (float[B, 64] x) => (float[B, 64] y)
<float[64, 128] w1, float[128, 64] w2>
{
    h = MatMul(x, w1)
    a = Relu(h)
    y = MatMul(a, w2)
}
"""


def test_a_model_without_logits_is_tuned_on_its_output_error() -> None:
    """No vocabulary-wide output: the loss is the output's relative squared error, on the feeds
    given to tforge.compile; windows of different batch sizes run one by one."""
    rng = np.random.default_rng(2)
    model = testing.model_from_onnx_text(MLP, w1=rng.standard_normal((64, 128)), w2=rng.standard_normal((128, 64)))
    mix = rng.standard_normal((64, 64))  # correlated inputs, as activations are
    feeds = [{"x": (rng.standard_normal((1 + i % 3, 64)) @ mix).astype(np.float32)} for i in range(200)]
    result = tforge.compile(model, "canonicalize,quantize-weights{bits=2 tune-steps=60 tune-lr=0.005}", calibration=feeds,
                            progress=lambda _: None)  # fmt: skip
    tuning = result.report.passes[-1].details["tuning"]
    assert tuning["loss"] == "mse" and tuning["kept"], tuning
    assert tuning["held_out_after"] < 0.9 * tuning["held_out_before"], tuning


def test_reconstructed_blocks_bring_the_model_closer_to_float(llama_canonical, long_text: Path, tokenizer_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """reconstruct-steps: each block's codes and scales trained to its float output; the graph and
    the packing stay, the codes of the blocks that kept the training move, and ONNX Runtime's
    logits on windows nobody trained on come closer to float's."""
    data = CalibrationData(text=str(long_text), tokenizer=str(tokenizer_dir), seq_len=16)
    plain = llama_canonical["dynamo"].clone()
    tforge.compile(plain, f"calibrate,{QUANTIZE}", calibration=data, progress=lambda _: None)
    rebuilt = llama_canonical["dynamo"].clone()
    result = tforge.compile(
        rebuilt, f"calibrate,{QUANTIZE[:-1]} reconstruct-steps=60 reconstruct-lr=0.02}}", calibration=data,
        progress=lambda _: None,
    )  # fmt: skip
    record = result.report.passes[-1]
    blocks = record.details["reconstruction"]["blocks"]
    assert [b["label"] for b in blocks] == ["block 0", "block 1"]
    assert record.stats["blocks reconstructed"] == sum(b["kept"] for b in blocks) >= 1
    for b in blocks:
        assert b["weights"] == 7 and (b["held_out_after"] < b["held_out_before"]) == b["kept"], b
    assert any(b["codes_moved"] > 0 for b in blocks if b["kept"])

    # the same graph; only MatMulNBits codes and scales of the blocks' linears changed
    assert [(n.op_type, n.name) for n in rebuilt.graph] == [(n.op_type, n.name) for n in plain.graph]
    trained = {v.name for n in rebuilt.graph if n.op_type == "MatMulNBits" and "lm_head" not in n.name for v in n.inputs[1:3]}
    changed = {
        name for name, value in rebuilt.graph.initializers.items()
        if not np.array_equal(value.const_value.numpy(), plain.graph.initializers[name].const_value.numpy())
    }  # fmt: skip
    assert changed and changed <= trained

    ids = np.random.default_rng(11).integers(3, 96, (4, 16))
    reference = _logits(llama_canonical["dynamo"], ids)
    assert _kl(reference, _logits(rebuilt, ids)) < 0.95 * _kl(reference, _logits(plain, ids))


def test_reconstruct_steps_without_calibration_text_says_what_to_add(llama_canonical) -> None:  # type: ignore[no-untyped-def]
    model = llama_canonical["dynamo"].clone()
    with pytest.raises(PreconditionError, match="reconstruct-steps trains each block's codes and scales on the pipeline"):
        tforge.compile(model, "quantize-weights{reconstruct-steps=5}", progress=lambda _: None)
