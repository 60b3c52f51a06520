"""Mutation fuzzing of the loader: damaged models are loaded or refused, never crash it.

``tools/fuzz.py mutate 10000`` runs the large budget; here a few hundred mutations.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from pathlib import Path

import pytest

from tests.fuzz.mutate import mutate, seeds
from tforge.errors import TforgeError
from tforge.frontends.onnx import load_onnx

CASES = int(os.environ.get("FUZZ_MUTATIONS", "400"))


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL)  # onnx_ir logs about every odd initializer it skips


def test_loader_raises_only_tforge_errors(tmp_path: Path) -> None:
    models = seeds(tmp_path)
    rng = random.Random(20261122)
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(CASES):
        name = rng.choice(sorted(models))
        seed_path = models[name]
        data = mutate(seed_path.read_bytes(), rng)
        path = seed_path.parent / "fuzz.onnx"
        path.write_bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                load_onnx(path)
            outcomes["loaded"] += 1
        except TforgeError as e:
            message = str(e)
            assert "\n" not in message, f"case {i} ({name}): multi-line message {message!r}"
            outcomes["refused"] += 1
        except Exception as e:  # noqa: BLE001 - the property under test
            kept = tmp_path / f"crash-{i}.onnx"
            kept.write_bytes(data)
            pytest.fail(
                f"case {i} ({name}): loader raised {type(e).__name__}: {e} (input kept in {kept})"
            )
    # the mutations must reach both outcomes, or the fuzzer tests nothing
    assert outcomes["loaded"] > CASES // 50 and outcomes["refused"] > CASES // 2, outcomes
