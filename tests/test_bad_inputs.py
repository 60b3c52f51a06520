"""The bad-input corpus through ``tforge compile``: exit 1, one line, nothing written, input intact.

Also: outputs are never written over the input, and an interrupted compile (SIGINT, SIGTERM,
or an interrupt in the middle of saving) leaves no partial output.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.bad_inputs import cases
from tforge.cli import main

REPO = Path(__file__).resolve().parent.parent


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file and link under ``folder`` with a hash of its bytes (links by their target)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def _compile(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["-q", "compile", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", sorted(cases.CASES))
def test_bad_input_is_refused_with_one_line(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, expected = cases.CASES[name]
    case_dir, out_dir, cwd = tmp_path / "case", tmp_path / "out", tmp_path / "cwd"
    for folder in (case_dir, out_dir, cwd):
        folder.mkdir()
    monkeypatch.chdir(cwd)  # a crash report would land here
    model = writer(case_dir)
    before = _snapshot(tmp_path)

    code, stdout, stderr = _compile(
        capsys,
        str(model),
        "--passes",
        "canonicalize",
        "-o",
        str(out_dir / "model.onnx"),
        "--report",
        str(out_dir / "report.json"),
    )

    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 1, stderr
    assert len(lines) == 1 and lines[0].startswith("tforge: error: "), stderr
    assert expected in lines[0]
    assert stdout == ""
    assert _snapshot(tmp_path) == before  # nothing written anywhere, the input untouched


def test_bad_input_in_a_subprocess(tmp_path: Path) -> None:
    """The same through the real entry point: exit status 1 and one line on stderr."""
    model = cases.graph_cycle(tmp_path)
    out = tmp_path / "out.onnx"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tforge.cli",
            "compile",
            str(model),
            "--passes",
            "canonicalize",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "has a cycle" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_the_corpus_base_model_is_accepted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each case breaks one thing in a model that compiles, even under --strict."""
    model = cases._save(cases._model(), tmp_path)
    code, _, stderr = _compile(
        capsys, str(model), "--passes", "canonicalize", "--strict", "-o", str(tmp_path / "o.onnx")
    )
    assert code == 0, stderr
    onnx.checker.check_model(onnx.load(tmp_path / "o.onnx"), full_check=True)


@pytest.mark.parametrize("name", sorted(cases.STRICT_CASES))
def test_strict_refuses_what_is_otherwise_skipped(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    writer, expected = cases.STRICT_CASES[name]
    model = writer(tmp_path)
    npz = tmp_path / "calib.npz"
    np.savez(npz, x=np.random.default_rng(0).normal(size=(3, 2, 8)).astype(np.float32))
    def compile_to(output: str, *options: str) -> tuple[int, str, str]:
        return _compile(
            capsys, str(model), "--passes", "canonicalize,calibrate,ln-migrate,smoothquant,quantize",
            "--calib-npz", str(npz), "-o", str(tmp_path / output), *options,
        )  # fmt: skip

    code, stdout, stderr = compile_to("lax.onnx", "--pass-statistics")
    assert code == 0, stderr  # without --strict: compiled, nothing found to migrate
    assert (tmp_path / "lax.onnx").exists()
    assert "ln-migrate:\nsmoothquant:" in stdout  # no norm, so no statistic at all for ln-migrate

    code, _, stderr = compile_to("strict.onnx", "--strict")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and expected in lines[0], stderr
    assert "before calibrate" in lines[0]  # refused before any ORT run
    assert not (tmp_path / "strict.onnx").exists()


def test_strict_in_the_api(tmp_path: Path) -> None:
    import tforge
    from tforge.errors import PreconditionError

    model = tforge.load(cases.no_transformer_blocks(tmp_path))
    with pytest.raises(PreconditionError, match="no transformer blocks"):
        tforge.compile(model, "canonicalize", strict=True)


def test_output_through_a_symlink_to_the_input_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = cases._save(cases._model(), tmp_path)
    (tmp_path / "alias.onnx").symlink_to(model)
    before = _snapshot(tmp_path)
    code, _, stderr = _compile(
        capsys, str(model), "--passes", "canonicalize", "-o", str(tmp_path / "alias.onnx")
    )
    assert code == 1 and "overwrite the input" in stderr
    assert _snapshot(tmp_path) == before


def test_output_over_the_inputs_external_data_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proto = cases._model()
    cases._externalize(proto, "wu", "model.onnx.data", data_path=tmp_path / "model.onnx.data")
    model = cases._save(proto, tmp_path)
    out = tmp_path / "copy" / "model.onnx"
    out.parent.mkdir()
    # out.data would be the input's data file only through a link: the link is followed
    (out.parent / "model.onnx.data").symlink_to(tmp_path / "model.onnx.data")
    before = _snapshot(tmp_path)
    code, _, stderr = _compile(
        capsys, str(model), "--passes", "canonicalize", "-o", str(out), "--external-data", "yes"
    )
    assert code == 1 and "refusing to write" in stderr and "external data the model reads" in stderr
    assert _snapshot(tmp_path) == before


def test_interrupt_while_saving_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after the weights were half written: no output, no staging folder, exit 130."""
    import onnx_ir as ir

    real_save = ir.save

    def save_then_interrupt(model, path, **kwargs):
        real_save(model, path, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:100])  # as if cut off mid-write
        raise KeyboardInterrupt

    monkeypatch.setattr(ir, "save", save_then_interrupt)
    model = cases._save(cases._model(), tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for external in ("yes", "no"):
        code, _, stderr = _compile(
            capsys,
            str(model),
            "--passes",
            "canonicalize",
            "-o",
            str(out_dir / "m.onnx"),
            "--external-data",
            external,
        )
        assert code == 130 and "interrupted" in stderr
        assert list(out_dir.iterdir()) == []


def _slow_compile(tmp_path: Path) -> tuple[list[str], Path]:
    """A compile that spends seconds in calibration: a tiny model, many calibration samples."""
    model = cases._save(cases._model(), tmp_path)
    npz = tmp_path / "calib.npz"
    np.savez(npz, x=np.random.default_rng(0).normal(size=(100_000, 1, 4, 8)).astype(np.float32))
    out = tmp_path / "out" / "model.onnx"
    argv = [
        sys.executable,
        "-m",
        "tforge.cli",
        "compile",
        str(model),
        "--calib-npz",
        str(npz),
        "--calib-samples",
        "100000",
        "--passes",
        "canonicalize,calibrate,ln-migrate,smoothquant,quantize",
        "-o",
        str(out),
    ]
    return argv, out


@pytest.mark.parametrize(
    ("sig", "code", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
)
def test_signal_during_calibration_leaves_no_output(
    tmp_path: Path, sig: int, code: int, word: str
) -> None:
    argv, out = _slow_compile(tmp_path)
    proc = subprocess.Popen(
        argv,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        # a job started in the background (nohup, `&`) inherits SIGINT ignored, and Python then
        # installs no KeyboardInterrupt handler: give the child the default disposition
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stderr is not None
    seen = []
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # progress lines; signal once calibration has started
        seen.append(line)
        if "calibrate: reading npz" in line or time.monotonic() > deadline:
            break
    time.sleep(0.5)
    assert proc.poll() is None, "".join(seen)  # still calibrating: the signal lands mid-compile
    proc.send_signal(sig)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == code, "".join(seen) + rest
    assert (
        rest.strip().splitlines()[-1].startswith(f"tforge: {word}")
    )  # progress lines, then one line
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "model.onnx"]
