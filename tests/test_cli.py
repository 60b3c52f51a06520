"""The command line: every subcommand, and every error path with its exit code and one-line message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from tests.compiler.test_structure_tiny import _model as tiny_block
from tforge.cli import main


@pytest.fixture
def block_path(tmp_path: Path, rng: np.random.Generator) -> Path:
    path = tmp_path / "block.onnx"
    ir.save(tiny_block(rng), path)
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_compile_writes_output_and_report(block_path: Path, tmp_path: Path, capsys) -> None:
    out, report = tmp_path / "out" / "b.onnx", tmp_path / "r.json"
    before = block_path.read_bytes()
    code, stdout, stderr = _run(
        capsys, "compile", str(block_path), "--passes", "canonicalize", "-o", str(out),
        "--report", str(report), "--verify-each", "--check-numerics", "atol=1e-4",
        "--dump-dir", str(tmp_path / "ir"), "--pass-statistics",
    )
    assert code == 0, stderr
    assert block_path.read_bytes() == before  # the input is never modified
    onnx.checker.check_model(onnx.load(out))
    data = json.loads(report.read_text())
    assert data["passes"][0]["name"] == "canonicalize" and data["numerics"][0]["max_abs"] < 1e-4
    # written atomically, yet with the permissions of a plain write (not the temp file's 0600)
    assert report.stat().st_mode & 0o777 == out.stat().st_mode & 0o777
    assert sorted(p.name for p in (tmp_path / "ir").iterdir()) == ["000-input.ir", "001-canonicalize.ir"]
    assert "canonicalize:" in stdout
    assert "[1/1] canonicalize" in stderr


def test_print_ir_goes_to_stdout(block_path: Path, capsys) -> None:
    code, stdout, _ = _run(capsys, "compile", str(block_path), "--passes", "canonicalize", "--print-ir-after-all")
    assert code == 0
    assert stdout.startswith("// ----- IR after canonicalize [1/1]")


def test_inspect_json(block_path: Path, capsys) -> None:
    code, stdout, _ = _run(capsys, "inspect", str(block_path), "--json")
    assert code == 0
    info = json.loads(stdout)
    (block,) = info["blocks"]
    assert block["attention"]["num_heads"] == 2 and block["attention"]["num_kv_heads"] == 2
    assert block["attention"]["head_dim"] == 4
    assert block["ffn"] == {**block["ffn"], "gated": False, "intermediate_size": 16}
    assert info["unrecognized"] == []


def test_inspect_text_and_ir(block_path: Path, capsys) -> None:
    code, stdout, _ = _run(capsys, "inspect", str(block_path))
    assert code == 0 and "1 transformer blocks" in stdout and "heads=2 kv_heads=2 head_dim=4" in stdout
    code, stdout, _ = _run(capsys, "inspect", str(block_path), "--ir", "--tensors", "shape")
    assert code == 0 and stdout.startswith("graph @block(")


def test_passes_lists_options(capsys) -> None:
    code, stdout, _ = _run(capsys, "passes")
    assert code == 0
    assert "canonicalize: Fold constants" in stdout and "input-shapes=" in stdout


def test_bench_side_by_side(block_path: Path, tmp_path: Path, capsys) -> None:
    code, stdout, stderr = _run(capsys, "bench", str(block_path), str(block_path), "--runs", "3", "--warmup", "1", "--json")
    assert code == 0, stderr
    rows = json.loads(stdout)
    assert len(rows) == 2 and rows[0]["ratio"] == 1.0 and rows[1]["median_ms"] > 0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.onnx", "no such file"),
        (lambda d: _write(d / "random.onnx", bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8))), "not an ONNX"),
        (lambda d: _write(d / "empty.onnx", b""), "empty"),
    ],
)
def test_bad_input_files(tmp_path: Path, capsys, make, message: str) -> None:
    path = make(tmp_path)
    code, stdout, stderr = _run(capsys, "compile", str(path), "--passes", "canonicalize", "-o", str(tmp_path / "o.onnx"))
    assert code == 1
    assert message in stderr and str(path.name) in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_truncated_file(block_path: Path, tmp_path: Path, capsys) -> None:
    data = block_path.read_bytes()
    truncated = _write(tmp_path / "truncated.onnx", data[: len(data) // 2])
    code, _, stderr = _run(capsys, "inspect", str(truncated))
    assert code == 1 and "truncated" in stderr and len(stderr.strip().splitlines()) == 1


def test_external_data_escaping_the_folder(tmp_path: Path, rng: np.random.Generator, capsys) -> None:
    outside = tmp_path / "outside"
    inside = tmp_path / "model"
    outside.mkdir()
    inside.mkdir()
    onnx.save(ir.to_proto(tiny_block(rng)), inside / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    (inside / "w.bin").rename(outside / "w.bin")
    proto = onnx.load(inside / "m.onnx", load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside/w.bin"
    (inside / "m.onnx").write_bytes(proto.SerializeToString())
    code, _, stderr = _run(capsys, "inspect", str(inside / "m.onnx"))
    assert code == 1 and "external data" in stderr and "move the file next to the model" in stderr


@pytest.mark.parametrize(
    ("passes", "message"),
    [
        ("canonicalise", "did you mean 'canonicalize'"),
        ("canonicalize{fold-size-limit=many}", "expected int"),
        ("canonicalize{colour=red}", "unknown option 'colour'"),
    ],
)
def test_bad_pipelines(block_path: Path, capsys, passes: str, message: str) -> None:
    code, _, stderr = _run(capsys, "compile", str(block_path), "--passes", passes)
    assert code == 1 and message in stderr and len(stderr.strip().splitlines()) == 1


def test_usage_errors_exit_2(capsys) -> None:
    assert main(["compile"]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["bench", "x.onnx", "--input-shape", "nonsense"]) == 2
    capsys.readouterr()


def test_output_over_input_is_refused(block_path: Path, capsys) -> None:
    before = block_path.read_bytes()
    code, _, stderr = _run(capsys, "compile", str(block_path), "--passes", "canonicalize", "-o", str(block_path))
    assert code == 1 and block_path.read_bytes() == before
    assert len(stderr.strip().splitlines()) == 1


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_internal_error_exits_70_with_crash_report(block_path: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import tests.compiler.test_pipeline  # noqa: F401  (registers the 'test-crash' pass)

    monkeypatch.chdir(tmp_path)
    code, _, stderr = _run(capsys, "compile", str(block_path), "--passes", "canonicalize,test-crash", "-o", "out.onnx")
    assert code == 70
    assert "test-crash: internal error ZeroDivisionError: boom" in stderr
    crash = json.loads((tmp_path / "tforge-crash.json").read_text())
    assert crash["pipeline"] == "canonicalize,test-crash" and "ZeroDivisionError" in crash["error"]
    assert not (tmp_path / "out.onnx").exists()
