"""Property-based tests: random transformer-shaped graphs through the block map and the passes.

A small budget runs here (``FUZZ_EXAMPLES``); ``tools/fuzz.py graphs`` runs hundreds of cases.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.fuzz import properties  # noqa: E402
from tests.fuzz.graphs import TransformerSpec, specs  # noqa: E402

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    """Only warnings from tforge while fuzzing; the level is restored for the tests after these."""
    tforge_logger = logging.getLogger("tforge")
    level = tforge_logger.level
    tforge_logger.setLevel(logging.WARNING)
    yield
    tforge_logger.setLevel(level)


@FUZZ
@given(spec=specs(), seed=st.integers(0, 2**16))
def test_block_map_finds_every_random_block(spec: TransformerSpec, seed: int) -> None:
    properties.check_block_map(spec, seed)


@FUZZ
@given(spec=specs(), seed=st.integers(0, 2**16), pipeline=st.sampled_from(properties.EQUIVALENT))
def test_equivalence_preserving_passes_keep_outputs(
    spec: TransformerSpec, seed: int, pipeline: str
) -> None:
    properties.check_equivalent(spec, seed, pipeline)


@FUZZ
@given(spec=specs(), seed=st.integers(0, 2**16), pipeline=st.sampled_from(properties.LOSSY))
def test_every_pass_leaves_a_valid_runnable_model(
    spec: TransformerSpec, seed: int, pipeline: str
) -> None:
    properties.check_valid(spec, seed, pipeline)


def test_gqa_swiglu_rms_example() -> None:
    """One fixed LLaMA-like case, so a failure here is reproducible without hypothesis."""
    spec = TransformerSpec(
        heads=4, kv_heads=2, norm="rms", activation="swiglu", linear_bias=False, layers=2
    )
    properties.check_block_map(spec, 0)
    properties.check_equivalent(spec, 0, properties.EQUIVALENT[-1])
    properties.check_valid(spec, 0, properties.LOSSY[2])
