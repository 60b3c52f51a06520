"""from_torch: nn.Module, ExportedProgram and .pt2 sources export with the requested dynamic
dims, run in ONNX Runtime and match PyTorch; bad sources fail with UnsupportedModelError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from tforge.errors import UnsupportedModelError
from tforge.frontends.torch import from_torch
from tforge.runtime.save import SOURCE_PATH_KEY

torch = pytest.importorskip("torch")

DIMS = {"x": {0: "batch", 1: "sequence"}, "mask": {0: "batch", 1: "sequence"}}


class TinyAttention(torch.nn.Module):
    """Mixes positions (softmax over the sequence), so a wrong sequence dim shows in the output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(8, 24)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / 8**0.5 + (1.0 - mask[:, None, :]) * -1e4
        return self.dropout(torch.softmax(scores, dim=-1) @ v)


def example(batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch * 100 + seq)
    mask = torch.ones(batch, seq)
    mask[-1, seq // 2 :] = 0
    return torch.randn(batch, seq, 8, generator=generator), mask


def run_ort(model: ir.Model, *inputs: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = ir.serde.serialize_model(model).SerializeToString()
    session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})[0]


def assert_matches_torch(
    model: ir.Model, module: torch.nn.Module, shapes: list[tuple[int, int]]
) -> None:
    for batch, seq in shapes:
        inputs = example(batch, seq)
        with torch.no_grad():
            expected = module(*inputs).numpy()
        actual = run_ort(model, *inputs)
        assert actual.shape == expected.shape
        np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)


def test_module_with_dynamic_batch_and_sequence_runs_at_other_shapes() -> None:
    module = TinyAttention().eval()
    model = from_torch(
        module, example(2, 5), input_names=["x", "mask"], output_names=["y"], dynamic_axes=DIMS
    )

    assert [str(v.shape) for v in model.graph.inputs] == ["[batch,sequence,8]", "[batch,sequence]"]
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert_matches_torch(model, module, [(2, 5), (3, 11), (1, 2)])
    # the exporter's debug records (stack traces with this machine's paths) are not kept
    values = [*model.graph.inputs, *model.graph.initializers.values(), *(o for n in model.graph for o in n.outputs)]
    kept = {key for node in model.graph for key in node.metadata_props} | {k for v in values for k in v.metadata_props}
    assert not {k for k in kept if k.startswith("pkg.torch.") or k == "namespace"}, kept


def test_input_names_default_to_forward_arguments_and_opset_is_honoured() -> None:
    model = from_torch(TinyAttention().eval(), example(2, 5), dynamic_axes=DIMS, opset=21)
    assert [v.name for v in model.graph.inputs] == ["x", "mask"]
    assert model.opset_imports[""] == 21


def test_training_module_exports_in_eval_mode_and_stays_in_training() -> None:
    module = TinyAttention().train()
    model = from_torch(module, example(2, 5), dynamic_axes=DIMS)
    assert module.training
    assert "Dropout" not in {node.op_type for node in model.graph}
    assert_matches_torch(model, module.eval(), [(2, 5)])


def test_exported_program_and_saved_pt2(tmp_path: Path) -> None:
    module = TinyAttention().eval()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    program = torch.export.export(
        module, example(2, 5), dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq})
    )
    torch.export.save(program, tmp_path / "tiny.pt2")

    from_program = from_torch(program)
    from_file = from_torch(tmp_path / "tiny.pt2", output_names=["y"])

    assert from_file.meta[SOURCE_PATH_KEY] == str((tmp_path / "tiny.pt2").resolve())
    assert [v.name for v in from_file.graph.outputs] == ["y"]
    for model in (from_program, from_file):
        assert_matches_torch(model, module, [(2, 5), (3, 9)])


def test_module_without_example_inputs_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="needs example_inputs"):
        from_torch(TinyAttention())


def test_dynamic_axes_must_name_an_input() -> None:
    with pytest.raises(UnsupportedModelError, match="'input_ids', which is not one of the inputs"):
        from_torch(TinyAttention(), example(2, 5), dynamic_axes={"input_ids": {0: "batch"}})


def test_dynamic_axes_cannot_change_an_exported_program() -> None:
    program = torch.export.export(TinyAttention().eval(), example(2, 5))
    with pytest.raises(
        UnsupportedModelError, match="dynamic_axes cannot change an ExportedProgram"
    ):
        from_torch(program, dynamic_axes=DIMS)


def test_bad_pt2_paths(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="no such file"):
        from_torch(tmp_path / "missing.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"not a zip archive")
    with pytest.raises(UnsupportedModelError, match=r"junk\.pt2: not a loadable ExportedProgram"):
        from_torch(tmp_path / "junk.pt2")


class DataDependent(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x


def test_exporter_failure_names_the_cause() -> None:
    with pytest.raises(UnsupportedModelError) as info:
        from_torch(DataDependent(), (torch.randn(2, 3),))
    message = str(info.value)
    assert message.startswith("DataDependent: torch.onnx.export failed: ")
    assert "data-dependent" in message and "\n" not in message
