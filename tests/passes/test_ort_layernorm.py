"""ort-layernorm: residual Adds before a LayerNormalization become Sum; ORT then runs no SkipLayerNormalization."""

from __future__ import annotations

import numpy as np
import pytest

import tforge
from tforge.backends import ort
from tforge.compiler import verify
from tforge.compiler.pipeline import PassManager
from tforge.errors import PreconditionError
from tforge.runtime import ort as ort_runtime


def _kernels(model, feeds) -> set[str]:
    return {op for op, _ in ort.kernels_run(model, feeds)}


def test_bert_residual_norms_stay_unfused_and_exact(zoo_model) -> None:
    model = tforge.load(zoo_model("bert"))
    PassManager.parse("canonicalize", progress=lambda _: None).run(model)
    reference = model.clone()
    feeds = verify.make_inputs(model, dims={"batch": 2, "sequence": 7}, rng=np.random.default_rng(0))
    assert "SkipLayerNormalization" in _kernels(reference, feeds)  # what ORT does to the Add

    report = PassManager.parse("ort-layernorm", progress=lambda _: None).run(model)

    stats = report.passes[0].stats
    assert stats["residual add written as Sum"] == 5  # embeddings, 2 layers x (attention, FFN)
    ran = _kernels(model, feeds)
    assert "SkipLayerNormalization" not in ran and "LayerNormalization" in ran
    for optimize in (False, True):  # bit for bit, with ORT's rewrites off and on
        want = ort_runtime.create_session(reference, optimize=False).run(None, feeds)
        got = ort_runtime.create_session(model, optimize=optimize).run(None, feeds)
        for a, b in zip(want, got, strict=True):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 if optimize else 0)


def test_pre_norm_model_is_left_alone(zoo_model) -> None:
    model = tforge.load(zoo_model("llama"))  # RMSNorm: no LayerNormalization to protect
    report = PassManager.parse("canonicalize,ort-layernorm", progress=lambda _: None).run(model)
    assert not report.passes[1].changed


def test_block_map_passes_after_it_need_canonicalize_again(zoo_model) -> None:
    model = tforge.load(zoo_model("bert"))
    with pytest.raises(PreconditionError, match=r"'smoothquant' \(pass 3\) requires .*'canonical'"):
        PassManager.parse("canonicalize,ort-layernorm,smoothquant{alpha=0.5}").run(model)
    PassManager.parse("canonicalize,ort-layernorm,canonicalize", progress=lambda _: None).run(model)
    ops = [n.op_type for n in model.graph]
    assert "Sum" not in ops  # canonicalize turned the sums back into adds
    assert len(tforge.inspect(model).blocks) == 2
