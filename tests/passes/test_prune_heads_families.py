"""prune-heads on ``transformers`` families that tools/family_sweep.py found skipped: per-head
tensors computed at run time added to the scores (MPT's ALiBi, MPNet's relative-position bias)
and interleaved rotary (GPT-J's ``rotate_every_two``, partial; Cohere's, on every channel).

Each case zeroes the output-projection rows of some heads, removes them, and checks the result
against the original in ONNX Runtime (graph optimizations off) and by strict shape inference.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from tests.compiler.test_structure_layouts import SWEEP_FAMILIES, _family, _sweep_entry
from tests.models import zoo
from tests.passes.test_prune_heads import _canonical, _prune, assert_zeroed_heads_go_exactly
from tforge import testing

_H, _L, _N, _FFN = zoo.HIDDEN, zoo.LAYERS, zoo.HEADS, zoo.INTERMEDIATE


def _entry(name: str, build, *, kv_heads: int = _N, **truth) -> zoo.ZooEntry:  # type: ignore[no-untyped-def]
    entry = _sweep_entry(name, build, causal=True, fused_qkv=False, intermediate=_FFN, activation="gelu")
    return dataclasses.replace(entry, truth=dataclasses.replace(entry.truth, num_kv_heads=kv_heads, **truth))


#: Built as tools/family_sweep.py builds them (2 layers, hidden 64, 4 heads of 16)
FAMILIES: dict[str, zoo.ZooEntry] = {
    e.name: e
    for e in [
        # ALiBi: a [4, 1, 64] buffer sliced to the key length and added to the scores
        _entry("mpt", _family(
            "MptConfig", "MptModel", vocab_size=zoo.VOCAB, d_model=_H, n_layers=_L, n_heads=_N,
            expansion_ratio=2, max_seq_len=64,
        )),  # fmt: skip
        # a relative-position bias [b, 4, s, s] computed once and added to every layer's scores
        _entry("mpnet", _family(
            "MPNetConfig", "MPNetModel", decoder=False, vocab_size=zoo.VOCAB, hidden_size=_H,
            num_hidden_layers=_L, num_attention_heads=_N, intermediate_size=_FFN, max_position_embeddings=66,
        ), causal=False),  # fmt: skip
        # rotate_every_two on the first 8 of each head's 16 channels, the rest passed through
        _entry("gptj", _family(
            "GPTJConfig", "GPTJModel", vocab_size=zoo.VOCAB, n_embd=_H, n_layer=_L, n_head=_N, n_inner=_FFN,
            n_positions=64, rotary_dim=8,
        )),  # fmt: skip
        # interleaved rotary on every channel; grouped-query attention (2 KV heads)
        _entry("cohere", _family(
            "CohereConfig", "CohereModel", vocab_size=zoo.VOCAB, hidden_size=_H, num_hidden_layers=_L,
            num_attention_heads=_N, num_key_value_heads=2, intermediate_size=_FFN, max_position_embeddings=64,
        ), kv_heads=2),  # fmt: skip
        # fused QKV reshaped into mp_num = 4 groups of [query, value, key], one head each
        SWEEP_FAMILIES["codegen"],
        # 8 heads in the 4 groups: two heads a group
        SWEEP_FAMILIES["codegen-groups"],
        # ALiBi and the heads merged with the batch: [b, 4, s, d] -> [b * 4, s, d]
        SWEEP_FAMILIES["bloom"],
    ]
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """``(name, exporter) -> Path`` of a family of ``FAMILIES``, exported once per module."""
    folder = tmp_path_factory.mktemp("prune-heads-families")
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, exporter: str) -> Path:
        if (name, exporter) not in cache:
            cache[name, exporter] = FAMILIES[name].export(folder, exporter=exporter)  # type: ignore[arg-type]
        return cache[name, exporter]

    return get


def _kept_heads_gathers(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "Gather" and ".kept_heads" in n.name]


@pytest.mark.parametrize(
    ("name", "exporter", "zero", "keep", "kv_after", "gathers"),
    [
        # the ALiBi slice both layers share, read through a Gather of the kept heads by each Add
        ("mpt", "dynamo", [1, 2], 2, 2, (2, 1)),
        # the same, and the key transposed again only for its length (read by Shape alone)
        ("mpt", "torchscript", [0, 2], 2, 2, (2, 2)),
        # one bias for both layers: each layer's Add gets a Gather of its own, the bias stays whole
        ("mpnet", "dynamo", [1, 2], 2, 2, (2, 1)),
        ("mpnet", "torchscript", [3], 3, 3, (2, 1)),
        # [.., 4, 4, 2] -> [.., 4, 8]: the stacked pair flattened back keeps the heads axis
        ("gptj", "dynamo", [1, 3], 2, 2, (0, 0)),
        ("gptj", "torchscript", [0, 2], 2, 2, (0, 0)),  # the target Concat(Shape(x)[:3], [-1])
        ("cohere", "dynamo", [1, 3], 2, 2, (0, 0)),  # one query head from each KV group
        # [.., 192] -> [.., 4, 48]: the groups axis is the heads axis, each group one head
        ("codegen", "dynamo", [1, 2], 2, 2, (0, 0)),
        # the head merge [b, s, 4, 1, 16] -> [b, s, -1, 16] of the second layer has no annotations:
        # its batch and sequence come from Shape() of the value before the first of its Reshapes
        ("codegen", "torchscript", [0, 3], 2, 2, (0, 0)),
    ],
)
def test_family_heads_with_zero_output_rows_go_exactly(
    name: str, exporter: str, zero: list[int], keep: int, kv_after: int, gathers: tuple[int, int], exported
) -> None:
    """``gathers``: how many Gathers of the kept heads were inserted, and how many tensors they read."""
    model = _canonical(exported(name, exporter))

    assert_zeroed_heads_go_exactly(model, FAMILIES[name], zero, keep, kv_after, exporter)

    inserted = _kept_heads_gathers(model)
    assert (len(inserted), len({id(g.inputs[0]) for g in inserted})) == gathers


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        (
            "codegen-groups",
            "skipped: Reshape '/model/h.0/attn/Reshape' cuts the fused QKV output into 4 groups of head slots "
            "holding query heads [[0, 1], [2, 3], [4, 5], [6, 7]]: only groups of one head each are understood",
        ),
        (
            # the b * 4 is computed at run time from a 4 that every layer and the ALiBi share (one
            # Mul for all in the dynamo export); the ALiBi [b * 4, 1, s] would need its heads cut too
            "bloom",
            "skipped: Reshape '/model/h.0/self_attention/Reshape_1' merges the heads with the batch into a "
            "size computed at run time (Mul '/model/h.0/self_attention/Mul': a size times 4): rewriting "
            "that product is not built",
        ),
    ],
)
def test_family_layouts_not_understood_are_skipped_untouched(name: str, reason: str, exported) -> None:
    entry = FAMILIES[name]
    model = _canonical(exported(name, "torchscript"))
    original = model.clone()

    stats = _prune(model, entry, "calibrate,prune-heads{ratio=0.5}")["stats"]

    assert "pruned" not in stats and stats.get(reason) == 1, stats
    feeds = entry.inputs(2, 9, np.random.default_rng(3))
    testing.assert_ort_allclose(original, model, feeds, atol=0.0, rtol=0.0)
