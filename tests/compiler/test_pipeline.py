"""Pipeline specs, option parsing, property checks and the pass manager's instrumentation."""

from __future__ import annotations

import dataclasses
import io
import json
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir
import pytest

from tforge import testing
from tforge.compiler.pass_infra import Pass, PassResult, Property, model_properties
from tforge.compiler.pipeline import NumericsCheck, PassManager, parse_pipeline, split_pipeline
from tforge.compiler.registry import get_pass_class, register_pass
from tforge.errors import NumericsCheckError, PassConfigError, PassError, PreconditionError

MODEL = """
<ir_version: 10, opset_import: ["" : 18]>
block (float[2, 8] x) => (float[2, 4] y)
<float[8] gamma, float[8] beta, float[8, 4] w>
{
    h = LayerNormalization <axis = -1> (x, gamma, beta)
    y = MatMul (h, w)
}
"""


@register_pass("test-scale-weights")
@dataclasses.dataclass(frozen=True)
class ScaleWeights(Pass):
    """Multiply every 2-D initializer by a factor (a test pass)."""

    factor: float = 1.0
    names: tuple[str, ...] = ()
    mode: Literal["all", "none"] = "all"
    limit: int | None = None

    invalidates: ClassVar = frozenset({Property.CALIBRATED})

    def __post_init__(self) -> None:
        if self.factor <= 0:
            raise ValueError(f"factor must be positive, got {self.factor}")

    def run(self, model: ir.Model) -> PassResult:
        changed = 0
        if self.mode == "all" and self.factor != 1.0:
            for value in model.graph.initializers.values():
                if value.shape is not None and len(value.shape) == 2:
                    value.const_value = ir.tensor(value.const_value.numpy() * np.float32(self.factor))
                    changed += 1
        return PassResult(model, changed=changed > 0, stats={"scaled": changed})


@register_pass("test-needs-calibration")
@dataclasses.dataclass(frozen=True)
class NeedsCalibration(Pass):
    """Requires calibration (a test pass)."""

    requires: ClassVar = frozenset({Property.CALIBRATED})

    def run(self, model: ir.Model) -> PassResult:
        return PassResult(model, changed=False)


@register_pass("test-crash")
@dataclasses.dataclass(frozen=True)
class Crash(Pass):
    """Raises an unexpected exception (a test pass)."""

    def run(self, model: ir.Model) -> PassResult:
        raise ZeroDivisionError("boom")


@pytest.fixture
def model(rng: np.random.Generator) -> ir.Model:
    return testing.model_from_onnx_text(
        MODEL, gamma=rng.uniform(0.5, 2, 8), beta=rng.normal(size=8), w=rng.normal(size=(8, 4))
    )


def test_split_respects_braces() -> None:
    assert split_pipeline("a,b{x=1,2 y=3},c") == ["a", "b{x=1,2 y=3}", "c"]
    with pytest.raises(PassConfigError, match="unmatched"):
        split_pipeline("a{x=1")
    with pytest.raises(PassConfigError, match="empty pass name"):
        split_pipeline("a,,b")


def test_options_are_typed() -> None:
    (p,) = parse_pipeline("test-scale-weights{factor=2.5 names=a,b mode=none limit=3}")
    assert p == ScaleWeights(factor=2.5, names=("a", "b"), mode="none", limit=3)
    assert p.spec() == "test-scale-weights{factor=2.5 names=a,b mode=none limit=3}"
    (q,) = parse_pipeline("test-scale-weights{limit=none}")
    assert q.limit is None and q.spec() == "test-scale-weights"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("test-scale-weight", "did you mean 'test-scale-weights'"),
        ("test-scale-weights{factor=abc}", "factor='abc': expected float"),
        ("test-scale-weights{factor=-1}", "factor must be positive"),
        ("test-scale-weights{mode=some}", "expected one of all, none"),
        ("test-scale-weights{colour=red}", "unknown option 'colour'"),
        ("test-scale-weights{factor}", "has no value"),
        ("Bad Name", "cannot parse"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(PassConfigError, match=message):
        parse_pipeline(spec)


def test_unknown_pass_lists_known_ones() -> None:
    with pytest.raises(PassConfigError, match="known passes: .*canonicalize"):
        get_pass_class("zzzzzz")


def test_requirements_checked_before_anything_runs(model: ir.Model) -> None:
    original = model.graph.initializers["w"].const_value.numpy().copy()
    pm = PassManager.parse("test-scale-weights{factor=2},test-needs-calibration")
    with pytest.raises(PreconditionError, match="'test-needs-calibration' .* requires 'calibrated'"):
        pm.run(model)
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), original)


def test_report_records_stats_and_changes(model: ir.Model) -> None:
    report = PassManager.parse("test-scale-weights{factor=2},test-scale-weights").run(model)
    first, second = report.passes
    assert (first.changed, first.stats) == (True, {"scaled": 1})
    assert (second.changed, second.stats) == (False, {"scaled": 0})
    data = json.loads(report.to_json())
    assert data["passes"][0]["spec"] == "test-scale-weights{factor=2.0}"
    assert "test-scale-weights{factor=2.0}" in report.summary()


def test_canonical_property_is_persisted(model: ir.Model, tmp_path) -> None:
    PassManager.parse("canonicalize").run(model)
    assert Property.CANONICAL in model_properties(model)
    ir.save(model, tmp_path / "m.onnx")
    assert Property.CANONICAL in model_properties(ir.load(tmp_path / "m.onnx"))


def test_dump_dir_and_print_ir(model: ir.Model, tmp_path) -> None:
    stream = io.StringIO()
    PassManager.parse(
        "canonicalize,test-scale-weights{factor=3}",
        dump_dir=tmp_path,
        print_ir_after=["test-scale-weights"],
        ir_stream=stream,
    ).run(model)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["000-input.ir", "001-canonicalize.ir", "002-test-scale-weights.ir"]
    text = stream.getvalue()
    assert "IR after test-scale-weights{factor=3.0} [2/2] scaled=1" in text
    assert "MatMul" in text


def test_print_ir_after_unknown_pass_is_rejected() -> None:
    with pytest.raises(PassConfigError, match="not in the pipeline"):
        PassManager.parse("canonicalize", print_ir_after=["smoothquant"])


def test_internal_error_names_pass_and_history(model: ir.Model) -> None:
    with pytest.raises(PassError, match=r"test-crash: internal error ZeroDivisionError: boom \(passes run before it: canonicalize\)"):
        PassManager.parse("canonicalize,test-crash").run(model)


def test_check_numerics_measures_and_enforces(model: ir.Model) -> None:
    report = PassManager.parse("test-scale-weights{factor=1.5}", check_numerics=NumericsCheck()).run(model)
    (row,) = report.numerics
    assert row["name"] == "y" and row["max_abs"] > 0.1 and row["cosine"] > 0.999
    with pytest.raises(NumericsCheckError, match="check-numerics: output 'y' differs"):
        PassManager.parse(
            "test-scale-weights{factor=1.5}", check_numerics=NumericsCheck(atol=1e-3)
        ).run(model)
