"""Calibration: ChannelStats against NumPy, bounded memory, masking, and the real-text data sources."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import tforge
from tests.models import zoo
from tforge import data as tforge_data
from tforge import testing
from tforge.compiler.calibration import (
    ChannelStats,
    calibrate_model,
    default_values,
    load_tokenizer,
    npz_feeds,
    read_text_half,
    text_feeds,
)
from tforge.compiler.pipeline import PassManager
from tforge.compiler.structure import find_blocks
from tforge.errors import PassConfigError, PreconditionError
from tforge.frontends import hf_models

REPO = Path(__file__).resolve().parents[2]
WIKITEXT = tforge_data.WIKITEXT
MINILM_VOCAB = 30522


@pytest.fixture(scope="module")
def wikitext() -> Path:
    if not WIKITEXT.is_file():
        pytest.fail(
            f"{WIKITEXT} is missing; it ships with tforge (tforge/data/README.md)"
        )
    return WIKITEXT


def _canonical(path: Path) -> ir.Model:
    model = tforge.load(path)
    PassManager.parse("canonicalize", progress=lambda _: None).run(model)
    return model


def _quiet(_: str) -> None:
    pass


# ----------------------------------------------------------------------------- ChannelStats


def _heavy_tailed(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Activations like a transformer's: most channels small, a few with large outliers."""
    x = rng.standard_normal(shape) * rng.uniform(0.1, 2.0, shape[-1])
    x[..., 3] *= 40.0
    return x.astype(np.float32)


def test_channel_stats_match_numpy(rng: np.random.Generator) -> None:
    x = _heavy_tailed(rng, (4, 50, 16))
    stats = ChannelStats.empty(16)
    for part in np.split(x, 4):
        stats.update(part)

    rows = x.reshape(-1, 16).astype(np.float64)
    assert stats.count == 200
    np.testing.assert_array_equal(stats.absmax, np.abs(rows).max(axis=0))
    np.testing.assert_array_equal(stats.min, rows.min(axis=0))
    np.testing.assert_array_equal(stats.max, rows.max(axis=0))
    np.testing.assert_allclose(stats.mean_sq, (rows**2).mean(axis=0), rtol=1e-12)
    assert stats.tensor_hist.sum() == rows.size and stats.tensor_hist.shape == (2048,)
    for q in (50.0, 90.0, 99.0, 99.9, 99.99):
        expected = np.percentile(np.abs(rows), q, method="inverted_cdf")
        assert abs(stats.percentile(q) - expected) <= stats.bin_width, q
    assert stats.percentile(100.0) == np.abs(rows).max()


def test_update_order_does_not_matter(rng: np.random.Generator) -> None:
    # Chunks of very different ranges, so the histogram re-bins in one order and not the other.
    chunks = [_heavy_tailed(rng, (30, 8)) * scale for scale in (0.01, 1.0, 300.0, 0.5)]
    forward, backward = ChannelStats.empty(8), ChannelStats.empty(8)
    for chunk in chunks:
        forward.update(chunk)
    for chunk in reversed(chunks):
        backward.update(chunk)

    for field in ("absmax", "min", "max"):
        np.testing.assert_array_equal(getattr(forward, field), getattr(backward, field))
    np.testing.assert_allclose(forward.sum_sq, backward.sum_sq, rtol=1e-12)
    assert forward.count == backward.count == 120
    assert forward.hist_range == backward.hist_range
    np.testing.assert_array_equal(forward.tensor_hist, backward.tensor_hist)


def test_histogram_rebins_to_a_wider_range_with_constant_memory(rng: np.random.Generator) -> None:
    small = rng.uniform(-1.0, 1.0, (500, 4))
    large = rng.uniform(-100.0, 100.0, (500, 4))
    stats = ChannelStats.empty(4, bins=64)
    stats.update(small)
    first_range = stats.hist_range
    stats.update(large)

    assert first_range == 1.0 and stats.hist_range == 128.0  # powers of two above max |x|
    assert stats.tensor_hist.shape == (64,)
    # Re-binning put every early count where a single pass over all data would have.
    fresh = ChannelStats.empty(4, bins=64)
    fresh.update(np.concatenate([small, large]))
    np.testing.assert_array_equal(stats.tensor_hist, fresh.tensor_hist)
    all_abs = np.abs(np.concatenate([small, large]))
    assert (
        abs(stats.percentile(75.0) - np.percentile(all_abs, 75.0, method="inverted_cdf"))
        <= stats.bin_width
    )


def test_histogram_counts_all_zero_updates(rng: np.random.Generator) -> None:
    stats = ChannelStats.empty(3, bins=8)
    stats.update(np.zeros((5, 3)))
    assert stats.percentile(99.0) == 0.0
    stats.update(rng.uniform(0.5, 3.0, (5, 3)))
    assert stats.hist_range == 4.0 and stats.tensor_hist.sum() == 30
    assert stats.tensor_hist[0] == 15  # the early zeros, none of the later values (all >= 0.5)
    assert stats.percentile(40.0) <= stats.bin_width


def test_scaled_stats_equal_stats_of_the_scaled_activation(rng: np.random.Generator) -> None:
    x = _heavy_tailed(rng, (64, 6)).astype(np.float64)
    scale = np.array([0.5, -2.0, 1.0, 0.1, -0.25, 3.0])
    stats = ChannelStats.empty(6)
    stats.update(x)
    direct = ChannelStats.empty(6)
    direct.update(x * scale)

    scaled = stats.scaled(scale)
    for field in ("absmax", "min", "max", "sum_sq"):
        np.testing.assert_allclose(getattr(scaled, field), getattr(direct, field), rtol=1e-12)
    assert scaled.count == 64
    # The histogram is rescaled by max|scale|: its percentiles bound the true ones from above.
    for q in (50.0, 99.0):
        assert scaled.percentile(q) >= direct.percentile(q) - direct.bin_width
    assert stats.absmax[1] == np.abs(x[:, 1]).max()  # the original is untouched


def test_merge_equals_one_reduction(rng: np.random.Generator) -> None:
    a, b = _heavy_tailed(rng, (40, 5)), 50.0 * _heavy_tailed(rng, (40, 5))
    left, right, whole = ChannelStats.empty(5), ChannelStats.empty(5), ChannelStats.empty(5)
    left.update(a)
    right.update(b)
    whole.update(np.concatenate([a, b]))
    left.merge(right)
    np.testing.assert_array_equal(left.absmax, whole.absmax)
    np.testing.assert_allclose(left.sum_sq, whole.sum_sq, rtol=1e-12)
    np.testing.assert_array_equal(left.tensor_hist, whole.tensor_hist)


def test_channel_stats_reject_bad_input() -> None:
    stats = ChannelStats.empty(4)
    with pytest.raises(ValueError, match="last axis 4"):
        stats.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="NaN"):
        stats.update(np.array([[0.0, np.nan, 1.0, 2.0]]))
    with pytest.raises(ValueError, match="no data"):
        stats.percentile(50.0)
    with pytest.raises(ValueError, match="shape"):
        stats.scaled(np.ones(3))


# ----------------------------------------------------------------------------- running a model

MASKED = """
<ir_version: 10, opset_import: ["" : 18]>
masked (float[B, S, 8] x, int64[B, S] attention_mask) => (float[B, S, 4] y, float[N, 4] z)
<float[8] g, float[8, 4] w, int64[2] flat>
{
    h = Mul (x, g)
    y = MatMul (h, w)
    hf = Reshape (h, flat)
    z = MatMul (hf, w)
    m = Cast <to = 1> (attention_mask)
}
"""


def test_padding_rows_are_left_out(rng: np.random.Generator) -> None:
    g = rng.uniform(0.5, 2.0, 8).astype(np.float32)
    model = testing.model_from_onnx_text(
        MASKED, g=g, w=rng.normal(size=(8, 4)), flat=np.array([-1, 8], dtype=np.int64)
    )
    x = rng.normal(size=(3, 5, 8)).astype(np.float32)
    mask = np.ones((3, 5), dtype=np.int64)
    mask[1, 3:] = 0
    mask[2, 1:] = 0
    x[mask == 0] = 1000.0  # padding that would dominate every statistic if it got in

    assert default_values(model) == ["h", "hf"]
    stats = calibrate_model(model, [{"x": x, "attention_mask": mask}], progress=_quiet)

    kept = (x * g)[mask != 0].astype(np.float64)
    for name in ("h", "hf"):  # [batch, seq, C] and the flattened [batch*seq, C] layouts
        s = stats[name]
        assert s.count == int(mask.sum()) == 9
        np.testing.assert_allclose(s.absmax, np.abs(kept).max(axis=0), rtol=1e-6)
        np.testing.assert_allclose(s.mean_sq, (kept**2).mean(axis=0), rtol=1e-5)
    assert stats.samples == 1


def test_padding_does_not_change_stats_of_a_real_encoder(zoo_model: Callable[[str], Path]) -> None:
    """A padded batch of two and the same two rows fed unpadded give the same statistics."""
    model = _canonical(zoo_model("bert"))
    rng = np.random.default_rng(1)
    ids = rng.integers(0, zoo.VOCAB, size=(2, 12), dtype=np.int64)
    mask = np.ones((2, 12), dtype=np.int64)
    mask[1, 7:] = 0
    padded = [{"input_ids": ids, "attention_mask": mask}]
    unpadded = [
        {"input_ids": ids[:1], "attention_mask": mask[:1]},
        {"input_ids": ids[1:, :7], "attention_mask": mask[1:, :7]},
    ]
    a = calibrate_model(model, padded, progress=_quiet)
    b = calibrate_model(model, unpadded, progress=_quiet)
    assert list(a.stats) == list(b.stats)
    for name, sa in a.stats.items():
        sb = b[name]
        assert sa.count == sb.count == 19
        np.testing.assert_allclose(sa.absmax, sb.absmax, rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(sa.sum_sq, sb.sum_sq, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_ort_optimizations_do_not_change_exposed_values(
    name: str, zoo_model: Callable[[str], Path], rng: np.random.Generator
) -> None:
    model = _canonical(zoo_model(name))
    feeds = [zoo.ZOO[name].inputs(2, 9, rng) for _ in range(3)]
    optimized = calibrate_model(model, feeds, progress=_quiet, optimize=True)
    plain = calibrate_model(model, feeds, progress=_quiet, optimize=False)
    assert list(optimized.stats) == default_values(model)
    for value, s in optimized.stats.items():
        np.testing.assert_allclose(
            s.absmax, plain[value].absmax, rtol=1e-4, atol=1e-5, err_msg=value
        )
        np.testing.assert_allclose(
            s.sum_sq, plain[value].sum_sq, rtol=1e-4, atol=1e-5, err_msg=value
        )


def test_calibration_leaves_the_model_alone(
    zoo_model: Callable[[str], Path], rng: np.random.Generator
) -> None:
    model = _canonical(zoo_model("llama"))
    before = tforge.compiler.printer.print_ir(model)
    outputs = [v.name for v in model.graph.outputs]
    calibrate_model(model, [zoo.ZOO["llama"].inputs(1, 8, rng)], progress=_quiet)
    assert tforge.compiler.printer.print_ir(model) == before
    assert [v.name for v in model.graph.outputs] == outputs


def test_memory_does_not_grow_with_the_number_of_samples(zoo_model: Callable[[str], Path]) -> None:
    model = _canonical(zoo_model("llama"))
    batch, seq = 2, 64

    def feeds(n: int) -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng(0)
        for _ in range(n):
            yield zoo.ZOO["llama"].inputs(batch, seq, rng)

    def peak(n: int) -> tuple[int, int]:
        gc.collect()
        tracemalloc.start()
        try:
            stats = calibrate_model(model, feeds(n), progress=_quiet)
            return tracemalloc.get_traced_memory()[1], sum(
                s.count * s.channels * 4 for s in stats.stats.values()
            )
        finally:
            tracemalloc.stop()

    peak8, _ = peak(8)
    peak64, activation_bytes_64 = peak(64)
    # Keeping the activations of the extra 56 samples would cost this much; bounded memory
    # must stay far below it (ORT's own arena is not traced; its outputs, NumPy arrays, are).
    retained = activation_bytes_64 * 56 // 64
    assert retained > 2_000_000
    assert peak64 - peak8 < retained // 20, (peak8, peak64, retained)


def test_unknown_and_constant_values_are_rejected(rng: np.random.Generator) -> None:
    model = testing.model_from_onnx_text(
        MASKED,
        g=rng.uniform(size=8),
        w=rng.normal(size=(8, 4)),
        flat=np.array([-1, 8], dtype=np.int64),
    )
    feed = {"x": np.ones((1, 2, 8), np.float32), "attention_mask": np.ones((1, 2), np.int64)}
    with pytest.raises(PassConfigError, match="no value named 'nope'"):
        calibrate_model(model, [feed], ["h", "nope"])
    with pytest.raises(PassConfigError, match="'w' are constants"):
        calibrate_model(model, [feed], ["w"])
    with pytest.raises(PassConfigError, match="gave no samples"):
        calibrate_model(model, [], ["h"])
    with pytest.raises(PassConfigError, match="sample 1: .*missing \\['attention_mask'\\]"):
        calibrate_model(model, [{"x": feed["x"]}], ["h"])
    no_linears = testing.model_from_onnx_text(
        """
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2, 8] x) => (float[2, 8] y) { y = Relu (x) }
        """
    )
    with pytest.raises(PreconditionError, match="no linears"):
        calibrate_model(no_linears, [{"x": np.ones((2, 8), np.float32)}])


def test_the_session_runs_only_the_nodes_the_values_need(rng: np.random.Generator) -> None:
    """ORT runs every node whatever outputs are asked for; calibration drops the nodes past the
    requested values, so a block's inputs cost that block's depth (sequential GPTQ's rounds). The
    node after ``h`` cannot run (a Reshape to a size that does not fit): asking for ``h`` works."""
    model = testing.model_from_onnx_text(
        """
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2, 8] x) => (float[5, 7] y)
        <float[8, 8] w, int64[2] bad>
        {
            h = Relu (x)
            z = MatMul (h, w)
            y = Reshape (z, bad)
        }
        """,
        w=rng.normal(size=(8, 8)).astype(np.float32), bad=np.array([5, 7], np.int64),
    )  # fmt: skip
    x = rng.normal(size=(2, 8)).astype(np.float32)
    stats = calibrate_model(model, [{"x": x}], ["h"], progress=lambda _: None)
    np.testing.assert_array_equal(stats["h"].absmax, np.maximum(x, 0).max(axis=0))
    assert [n.op_type for n in model.graph] == ["Relu", "MatMul", "Reshape"]  # the model is left alone


def test_graph_inputs_can_be_calibrated_directly(rng: np.random.Generator) -> None:
    model = testing.model_from_onnx_text(
        MASKED,
        g=rng.uniform(size=8),
        w=rng.normal(size=(8, 4)),
        flat=np.array([-1, 8], dtype=np.int64),
    )
    x = rng.normal(size=(2, 3, 8)).astype(np.float32)
    stats = calibrate_model(model, [{"x": x, "attention_mask": np.ones((2, 3), np.int64)}], ["x"])
    np.testing.assert_array_equal(stats["x"].absmax, np.abs(x).reshape(-1, 8).max(axis=0))


# ----------------------------------------------------------------------------- data sources

ENCODER = f"""
<ir_version: 10, opset_import: ["" : 18]>
encoder (int64[B, S] input_ids, int64[B, S] attention_mask, int64[B, S] token_type_ids) => (float[B, S, 4] y)
<float[{MINILM_VOCAB}, 8] emb, float[2, 8] types, float[8, 4] w, int64[1] last>
{{
    e = Gather <axis = 0> (emb, input_ids)
    t = Gather <axis = 0> (types, token_type_ids)
    h = Add (e, t)
    m = Cast <to = 1> (attention_mask)
    mu = Unsqueeze (m, last)
    hm = Mul (h, mu)
    y = MatMul (hm, w)
}}
"""

DECODER = f"""
<ir_version: 10, opset_import: ["" : 18]>
decoder (int64[B, S] input_ids, int64[B, S] position_ids) => (float[B, S, 4] y)
<float[{MINILM_VOCAB}, 8] emb, float[4096, 8] pos, float[8, 4] w>
{{
    e = Gather <axis = 0> (emb, input_ids)
    p = Gather <axis = 0> (pos, position_ids)
    h = Add (e, p)
    y = MatMul (h, w)
}}
"""


@pytest.fixture(scope="module")
def encoder() -> ir.Model:
    rng = np.random.default_rng(0)
    return testing.model_from_onnx_text(
        ENCODER,
        emb=rng.normal(size=(MINILM_VOCAB, 8)),
        types=rng.normal(size=(2, 8)),
        w=rng.normal(size=(8, 4)),
        last=np.array([-1], dtype=np.int64),
    )


@pytest.fixture(scope="module")
def decoder() -> ir.Model:
    rng = np.random.default_rng(0)
    return testing.model_from_onnx_text(
        DECODER,
        emb=rng.normal(size=(MINILM_VOCAB, 8)),
        pos=rng.normal(size=(4096, 8)),
        w=rng.normal(size=(8, 4)),
    )


def test_text_halves_split_at_a_line_and_cover_the_file(wikitext: Path) -> None:
    text = wikitext.read_text(encoding="utf-8").replace("\r\n", "\n")
    first, second = read_text_half(wikitext, "first"), read_text_half(wikitext, "second")
    assert first + second == text
    assert first.endswith("\n") and abs(len(first) - len(text) / 2) < 5000
    assert read_text_half(wikitext, "all") == text


def test_sentence_feeds_from_wikitext_with_the_minilm_tokenizer(
    wikitext: Path, encoder: ir.Model
) -> None:
    feeds = list(text_feeds(encoder, wikitext, hf_models.minilm_dir(), samples=6, seq_len=16))

    assert len(feeds) == 6
    tokenizer = hf_models.minilm_tokenizer()
    for feed in feeds:
        assert set(feed) == {"input_ids", "attention_mask", "token_type_ids"}
        ids, mask = feed["input_ids"], feed["attention_mask"]
        assert ids.shape == mask.shape and ids.shape[0] == 1 and ids.shape[1] <= 16
        assert ids.dtype == np.int64 and not feed["token_type_ids"].any()
        real = ids[0, mask[0] == 1]
        assert real[0] == tokenizer.token_to_id("[CLS]") and real[-1] == tokenizer.token_to_id(
            "[SEP]"
        )
    # The first sentence of the file (after the article title) comes first.
    first = tokenizer.decode(feeds[0]["input_ids"][0].tolist())
    assert first.startswith("robert boulter is an english film")
    stats = calibrate_model(
        encoder, text_feeds(encoder, wikitext, hf_models.minilm_dir(), samples=6, seq_len=16)
    )
    assert stats["hm"].count == sum(int(f["attention_mask"].sum()) for f in feeds)


def test_calibration_text_never_comes_from_the_second_half(
    wikitext: Path, encoder: ir.Model
) -> None:
    tokenizer = hf_models.minilm_tokenizer()
    first_half = read_text_half(wikitext, "first").lower()
    feeds = text_feeds(
        encoder, wikitext, hf_models.minilm_dir(), samples=3, seq_len=64, half="second"
    )
    for feed in feeds:
        sentence = tokenizer.decode(feed["input_ids"][0].tolist())
        assert sentence[:40] not in first_half.replace(" @-@ ", "-")


def test_window_feeds_for_a_model_without_attention_mask(wikitext: Path, decoder: ir.Model) -> None:
    feeds = list(text_feeds(decoder, wikitext, hf_models.minilm_dir(), samples=3, seq_len=32))

    assert [sorted(f) for f in feeds] == [["input_ids", "position_ids"]] * 3
    for feed in feeds:
        assert feed["input_ids"].shape == (1, 32)
        np.testing.assert_array_equal(feed["position_ids"][0], np.arange(32))
    # Windows are contiguous: together they are the start of the tokenized text.
    tokenizer = load_tokenizer(hf_models.minilm_dir())
    lines = [line for line in read_text_half(wikitext).split("\n") if line.strip()]
    stream: list[int] = []
    for line in lines[:20]:
        stream.extend(tokenizer.encode(line + "\n", False, None))
    np.testing.assert_array_equal(np.concatenate([f["input_ids"][0] for f in feeds]), stream[:96])


def test_static_input_shape_sets_batch_and_padding(wikitext: Path, encoder: ir.Model) -> None:
    model = encoder.clone()
    for value in model.graph.inputs:
        value.shape = ir.Shape([2, 24])
    feeds = list(text_feeds(model, wikitext, hf_models.minilm_dir(), samples=2, seq_len=128))
    assert [f["input_ids"].shape for f in feeds] == [(2, 24), (2, 24)]
    assert all((f["attention_mask"] == 0).any() for f in feeds)  # short sentences are padded


def test_text_feed_errors(wikitext: Path, encoder: ir.Model, tmp_path: Path, zoo_model) -> None:
    with pytest.raises(PassConfigError, match="text file '.*missing.txt' does not exist"):
        text_feeds(encoder, tmp_path / "missing.txt", hf_models.minilm_dir(), samples=1, seq_len=8)
    with pytest.raises(PassConfigError, match="no tokenizer.json at"):
        text_feeds(encoder, wikitext, tmp_path, samples=1, seq_len=8)
    with pytest.raises(PassConfigError, match="tokenizer file .* does not exist"):
        text_feeds(encoder, wikitext, tmp_path / "model.gguf", samples=1, seq_len=8)
    # MiniLM's ids are far beyond the 96-row embedding of the zoo BERT: wrong tokenizer.
    bert = _canonical(zoo_model("bert"))
    with pytest.raises(PassConfigError, match="embedding has 96 rows"):
        next(text_feeds(bert, wikitext, hf_models.minilm_dir(), samples=1, seq_len=16))
    image = testing.model_from_onnx_text(
        """
        <ir_version: 10, opset_import: ["" : 18]>
        vision (float[1, 3, 8, 8] pixel_values) => (float[1, 3, 8, 8] y) { y = Relu (pixel_values) }
        """
    )
    with pytest.raises(
        PassConfigError, match="needs an 'input_ids' input.*pixel_values.*--calib-npz"
    ):
        text_feeds(image, wikitext, hf_models.minilm_dir(), samples=1, seq_len=8)


def test_npz_feeds(tmp_path: Path, encoder: ir.Model, rng: np.random.Generator) -> None:
    ids = rng.integers(0, 100, size=(5, 7))
    path = tmp_path / "calib.npz"
    np.savez(
        path, input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=np.zeros_like(ids)
    )

    feeds = list(npz_feeds(path, encoder))
    assert len(feeds) == 5 and feeds[2]["input_ids"].shape == (1, 7)
    np.testing.assert_array_equal(feeds[2]["input_ids"][0], ids[2])
    assert len(list(npz_feeds(path, encoder, samples=2))) == 2
    stats = calibrate_model(encoder, npz_feeds(path, encoder), progress=_quiet)
    assert stats.samples == 5 and stats["hm"].count == 35


def test_npz_feed_errors(tmp_path: Path, encoder: ir.Model) -> None:
    with pytest.raises(PassConfigError, match="'.*nothere.npz' does not exist"):
        npz_feeds(tmp_path / "nothere.npz", encoder)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, input_ids=np.zeros((2, 3)), mask=np.zeros((2, 3)))
    with pytest.raises(
        PassConfigError, match=r"missing \['attention_mask', 'token_type_ids'\], unknown \['mask'\]"
    ):
        npz_feeds(wrong, encoder)
    ragged = tmp_path / "ragged.npz"
    np.savez(
        ragged,
        input_ids=np.zeros((2, 3)),
        attention_mask=np.zeros((3, 3)),
        token_type_ids=np.zeros((2, 3)),
    )
    with pytest.raises(PassConfigError, match="share their first axis"):
        npz_feeds(ragged, encoder)
    not_npz = tmp_path / "text.npz"
    not_npz.write_text("hello")
    with pytest.raises(PassConfigError, match="cannot read .* as an .npz"):
        npz_feeds(not_npz, encoder)


@pytest.mark.slow
def test_minilm_on_wikitext(minilm_onnx: Path, wikitext: Path) -> None:
    model = _canonical(minilm_onnx)
    stats = calibrate_model(
        model, text_feeds(model, wikitext, hf_models.minilm_dir(), samples=64, seq_len=128)
    )
    assert stats.samples == 64 and len(stats.stats) == len(default_values(model)) == 24
    tokens = stats[default_values(model)[0]].count
    assert all(s.count == tokens for s in stats.stats.values())  # padding never counted
    blocks = find_blocks(model).blocks
    assert len(blocks) == 6
    for block in blocks:
        gelu_out = stats[block.ffn.down.input.name]  # exact GELU: never below -0.17
        assert gelu_out.min.min() >= -0.1701 and gelu_out.max.max() > 1.0
        assert stats[block.attention.q.input.name] is stats[block.attention.v.input.name]


@pytest.mark.slow
def test_smollm2_on_wikitext_windows(smollm2_onnx: Path, wikitext: Path) -> None:
    model = _canonical(smollm2_onnx)
    feeds = text_feeds(model, wikitext, hf_models.smollm2_gguf_path(), samples=4, seq_len=128)
    stats = calibrate_model(model, feeds)
    assert stats.samples == 4
    assert all(s.count == 4 * 128 for s in stats.stats.values())


def test_sums_and_gram_match_numpy(rng: np.random.Generator) -> None:
    x = rng.normal(size=(3, 7, 5))
    stats = ChannelStats.empty(5, gram=True)
    for part in np.split(x, [1, 2], axis=0):
        stats.update(part)
    rows = x.reshape(-1, 5)
    np.testing.assert_allclose(stats.mean, rows.mean(axis=0))
    np.testing.assert_allclose(stats.second_moment, rows.T @ rows / rows.shape[0])
    scale = rng.uniform(-2, 2, 5)
    scaled = stats.scaled(scale)
    np.testing.assert_allclose(scaled.second_moment, (rows * scale).T @ (rows * scale) / rows.shape[0])
    np.testing.assert_allclose(scaled.mean, (rows * scale).mean(axis=0))
    with pytest.raises(ValueError, match="calibrate with gram=true"):
        ChannelStats.empty(5).second_moment  # noqa: B018


def test_calibrate_pass_accumulates_gram_on_request(zoo_model) -> None:
    model = tforge.load(zoo_model("llama"))
    feeds = [zoo.ZOO["llama"].inputs(1, 6, np.random.default_rng(i)) for i in range(3)]
    tforge.compile(model, "canonicalize,calibrate{gram=true}", calibration=feeds)
    stats = model.meta["tforge.calibration"]
    first = next(iter(stats.stats.values()))
    assert first.gram is not None and first.gram.shape == (first.channels, first.channels)
    np.testing.assert_allclose(np.diag(first.gram), first.sum_sq)
