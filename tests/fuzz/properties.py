"""The properties checked on random transformer graphs, shared by the tests and tools/fuzz.py.

- ``check_block_map``: the block map finds every layer with the built head and KV-head counts.
- ``check_equivalent``: equivalence-preserving pipelines keep the outputs (ORT, optimizations off).
- ``check_valid``: any pass leaves a model that passes the full ONNX checker and runs in ORT.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

import tforge
from tforge import testing
from tforge.compiler.structure import find_blocks
from tforge.runtime import ort as ort_runtime

from .graphs import TransformerSpec, build

#: Pipelines that must not change the outputs beyond float rounding.
EQUIVALENT = [
    "canonicalize",
    "canonicalize,ln-migrate",
    "canonicalize,calibrate,smoothquant",
    "canonicalize,calibrate,ln-migrate,smoothquant{alpha=0.8}",
]
#: Lossy pipelines: only validity is required.
LOSSY = [
    "canonicalize,quantize",
    "canonicalize,calibrate,quantize{activations=static}",
    "canonicalize,calibrate,ln-migrate,smoothquant,quantize{activations=auto}",
    "canonicalize,quantize{format=qdq}",
    "canonicalize,calibrate,prune-heads{ratio=0.5}",
    "canonicalize,calibrate,prune-ffn{ratio=0.5 multiple=1}",
    "canonicalize,svd{ratio=0.5 multiple=1}",
    "canonicalize,calibrate{gram=true},svd{ratio=0.5 multiple=1 method=activation}",
    "canonicalize,kronecker{ratio=0.5}",
]


def model_of(spec: TransformerSpec, seed: int) -> ir.Model:
    return ir.serde.deserialize_model(build(spec, seed))


def feeds(spec: TransformerSpec, seed: int, count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed + 1)
    return [
        {"x": rng.normal(size=(1, spec.seq, spec.hidden)).astype(np.float32)} for _ in range(count)
    ]


def check_block_map(spec: TransformerSpec, seed: int) -> None:
    model = model_of(spec, seed)
    tforge.compile(model, "canonicalize")
    block_map = find_blocks(model)
    found = [
        (b.attention.num_heads, b.attention.num_kv_heads) for b in block_map.blocks if b.attention
    ]
    assert found == [(spec.heads, spec.kv_heads)] * spec.layers, (found, block_map.unrecognized)
    assert [b.pre_norm for b in block_map.blocks] == [not spec.post_norm] * spec.layers
    assert all(b.ffn is not None for b in block_map.blocks)


def check_equivalent(spec: TransformerSpec, seed: int, pipeline: str) -> None:
    model = model_of(spec, seed)
    original = model.clone()
    tforge.compile(model, pipeline, calibration=feeds(spec, seed, 4), verify_each=True)
    feed = feeds(spec, seed + 100, 1)[0]
    # float32 rescalings: relative error of a few ulps through up to two layers
    testing.assert_ort_allclose(original, model, feed, atol=2e-4, rtol=2e-3)


def check_valid(spec: TransformerSpec, seed: int, pipeline: str) -> None:
    model = model_of(spec, seed)
    tforge.compile(model, pipeline, calibration=feeds(spec, seed, 4), verify_each=True)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    feed = feeds(spec, seed + 100, 1)[0]
    for optimize in (False, True):
        session = ort_runtime.create_session(model, optimize=optimize)
        (y,) = session.run(None, feed)
        assert y.shape == (1, spec.seq, spec.hidden) and np.isfinite(y).all()
