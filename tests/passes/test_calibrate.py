"""calibrate: statistics for every linear input, data sources in priority order, errors, CLI flags."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import tforge
from tests.models import tiny, zoo
from tforge import data as tforge_data
from tforge import testing
from tforge.cli import main
from tforge.compiler import printer
from tforge.compiler.calibration import FEEDS_KEY, STATS_KEY, CalibrationStats, attached_stats
from tforge.compiler.pipeline import PassManager, parse_pass
from tforge.compiler.structure import find_blocks
from tforge.errors import PassConfigError, PreconditionError
from tforge.frontends import hf_models
from tforge.passes.calibrate import Calibrate
from tforge.runtime.save import save_model

WIKITEXT = tforge_data.WIKITEXT
VOCAB = tiny.MINILM_VOCAB

ENCODER = tiny.text_encoder(8, 8, 4)


def _feeds(name: str, count: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    return [zoo.ZOO[name].inputs(2, 10, rng) for _ in range(count)]


def _linear_inputs(model: ir.Model) -> set[str]:
    return {lin.input.name for lin in find_blocks(model).linears}


@pytest.fixture
def encoder(rng: np.random.Generator) -> ir.Model:
    model = testing.model_from_onnx_text(
        ENCODER,
        emb=rng.normal(size=(VOCAB, 8)),
        w1=rng.normal(size=(8, 8)),
        w2=rng.normal(size=(8, 4)),
        last=np.array([-1], dtype=np.int64),
    )
    PassManager.parse("canonicalize", progress=lambda _: None).run(model)
    return model


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_stats_for_every_linear_input(
    name: str, zoo_model: Callable[[str], Path], rng: np.random.Generator
) -> None:
    result = tforge.compile(
        zoo_model(name), "canonicalize,calibrate", calibration=_feeds(name, 3, rng)
    )

    model = result.model
    stats = attached_stats(model)
    assert isinstance(stats, CalibrationStats) and model.meta[STATS_KEY] is stats
    assert set(stats.stats) == _linear_inputs(model) and len(stats.stats) == 8
    record = result.report.passes[1]
    assert record.name == "calibrate" and not record.changed
    assert record.stats == {"activations": 8, "samples": 3}
    assert "calibrated" in result.report.properties
    tokens = sum(int(f["attention_mask"].sum()) for f in _feeds(name, 3, np.random.default_rng(0)))
    assert all(s.count == tokens for s in stats.stats.values())
    # Q, K and V read the same activation, so they share one entry.
    attention = find_blocks(model).blocks[0].attention
    assert stats[attention.q.input.name] is stats[attention.k.input.name]


def test_graph_is_unchanged_and_second_run_replaces_stats(
    zoo_model: Callable[[str], Path], rng: np.random.Generator
) -> None:
    model = tforge.load(zoo_model("llama"))
    PassManager.parse("canonicalize", progress=lambda _: None).run(model)
    model.meta[FEEDS_KEY] = _feeds("llama", 2, rng)
    before = printer.print_ir(model)

    first = Calibrate()(model)
    again = Calibrate(samples=1)(model)

    assert printer.print_ir(model) == before
    assert not first.changed and not again.changed
    assert first.stats["samples"] == 2 and again.stats["samples"] == 1
    assert attached_stats(model).samples == 1


def test_npz_has_priority_over_api_feeds(
    encoder: ir.Model, tmp_path: Path, rng: np.random.Generator
) -> None:
    ids = rng.integers(0, VOCAB, size=(5, 6))
    npz = tmp_path / "calib.npz"
    np.savez(npz, input_ids=ids, attention_mask=np.ones_like(ids))
    encoder.meta[FEEDS_KEY] = [{"input_ids": ids[:1], "attention_mask": np.ones_like(ids[:1])}]

    result = Calibrate(npz=str(npz), samples=4)(encoder)

    assert result.stats == {"activations": 2, "samples": 4}
    assert attached_stats(encoder)["h"].count == 4 * 6


def test_text_and_tokenizer(encoder: ir.Model) -> None:
    if not WIKITEXT.is_file():
        pytest.fail(
            f"{WIKITEXT} is missing; it ships with tforge (tforge/data/README.md)"
        )
    result = Calibrate(
        text=str(WIKITEXT), tokenizer=str(hf_models.minilm_dir()), samples=5, seq_len=32
    )(encoder)
    assert result.stats == {"activations": 2, "samples": 5}
    stats = attached_stats(encoder)
    assert stats["r"].min.min() >= 0.0  # a ReLU output: the value names are the right ones


def test_no_data_says_which_flags_to_add(encoder: ir.Model) -> None:
    with pytest.raises(
        PreconditionError, match=r"--calib-text FILE --tokenizer PATH .* --calib-npz FILE"
    ):
        Calibrate()(encoder)


def test_options_are_validated() -> None:
    with pytest.raises(PassConfigError, match="calibrate: samples must be at least 1, got 0"):
        parse_pass("calibrate{samples=0}")
    with pytest.raises(PassConfigError, match="seq-len must be at least 2"):
        parse_pass("calibrate{seq-len=1}")
    with pytest.raises(ValueError, match="text= is given without tokenizer="):
        Calibrate(text="a.txt")
    with pytest.raises(ValueError, match="tokenizer= is given without text="):
        Calibrate(tokenizer="tok")
    assert parse_pass("calibrate{npz=a.npz samples=8}").spec() == "calibrate{npz=a.npz samples=8}"


def test_requires_canonical() -> None:
    with pytest.raises(
        PreconditionError, match="'calibrate' .* requires 'canonical'.*add 'canonicalize'"
    ):
        PassManager.parse("calibrate").run(ir.Model(ir.Graph([], [], nodes=[]), ir_version=10))


# ----------------------------------------------------------------------------- CLI


@pytest.fixture
def encoder_file(encoder: ir.Model, tmp_path: Path) -> Path:
    return save_model(encoder, tmp_path / "encoder.onnx")


def test_cli_fills_calibrate_from_npz(
    encoder_file: Path, tmp_path: Path, rng: np.random.Generator
) -> None:
    npz = tmp_path / "calib.npz"
    ids = rng.integers(0, VOCAB, size=(6, 5))
    np.savez(npz, input_ids=ids, attention_mask=np.ones_like(ids))
    report = tmp_path / "report.json"
    code = main([
        "-q", "compile", str(encoder_file), "--passes", "canonicalize,calibrate",
        "--calib-npz", str(npz), "--calib-samples", "3", "--report", str(report),
    ])  # fmt: skip
    assert code == 0
    record = json.loads(report.read_text())["passes"][1]
    assert record["spec"] == f"calibrate{{npz={npz} samples=3}}"
    assert record["stats"] == {"activations": 2, "samples": 3}


def test_cli_text_calibration(encoder_file: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    code = main([
        "-q", "compile", str(encoder_file), "--passes", "canonicalize,calibrate",
        "--calib-text", str(WIKITEXT), "--tokenizer", str(hf_models.minilm_dir()),
        "--calib-samples", "4", "--report", str(report),
    ])  # fmt: skip
    assert code == 0
    assert json.loads(report.read_text())["passes"][1]["stats"] == {"activations": 2, "samples": 4}


@pytest.mark.parametrize(
    ("extra", "passes", "message"),
    [
        (
            [],
            "canonicalize,calibrate",
            "no calibration data; add --calib-text FILE --tokenizer PATH",
        ),
        (
            ["--calib-npz", "x.npz"],
            "canonicalize",
            "read by 'calibrate', which is not in the pipeline",
        ),
        (["--calib-text", "a.txt"], "canonicalize,calibrate", "text= is given without tokenizer="),
        (["--calib-samples", "0"], "canonicalize,calibrate", "samples must be at least 1"),
        (["--calib-npz", "nothere.npz"], "canonicalize,calibrate", "'nothere.npz' does not exist"),
    ],
)
def test_cli_errors(
    encoder_file: Path,
    extra: list[str],
    passes: str,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["-q", "compile", str(encoder_file), "--passes", passes, *extra])
    err = capsys.readouterr().err
    assert code == 1, err
    assert message in err and err.count("\n") == 1, err


# embedding -> one 16-wide linear -> a head to the 96-token vocabulary: the logits are wider than
# any linear's input
WIDE_LOGITS = """
<ir_version: 10, opset_import: ["" : 21]>
lm (int64[B, S] input_ids) => (float[B, S, 96] logits)
<float[96, 16] emb, float[16, 16] w, float[16, 96] head>
{
    e = Gather (emb, input_ids)
    h = MatMul (e, w)
    logits = MatMul (h, head)
}
"""


def test_gram_for_all_reads_tokens_for_the_widest_linear_input_not_the_logits(rng: np.random.Generator) -> None:
    model = testing.model_from_onnx_text(
        WIDE_LOGITS, emb=rng.normal(size=(96, 16)), w=rng.normal(size=(16, 16)), head=rng.normal(size=(16, 96))
    )
    PassManager.parse("canonicalize", progress=lambda _: None).run(model)
    model.meta[FEEDS_KEY] = [{"input_ids": rng.integers(0, 96, size=(1, 2))} for _ in range(1024)]

    result = Calibrate(gram=True)(model)

    # 16 tokens per channel of the 16-wide inputs: 256 tokens, 128 feeds of 2 (the default 64 is
    # too few); sized by the 96-wide logits it read 768
    assert result.stats["samples"] == 128
    assert all(s.gram is not None for s in attached_stats(model).stats.values())
