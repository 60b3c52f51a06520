"""KV-cache exports of a random LLaMA with grouped-query attention, and greedy generation with
them: the cached loop equals recomputing the whole sequence, in ORT and in PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from tforge import evaluate
from tforge.errors import PassConfigError, UnsupportedModelError
from tforge.frontends.onnx import load_onnx
from tforge.runtime import generate
from tforge.runtime.save import save_model

PROMPT = [5, 17, 42, 8, 90, 33, 61, 12, 7]
LOGITS_ATOL = 2e-5  # float32 logits of magnitude ~10 after 2 layers
EXPORTERS = ("dynamo", "torchscript")


def _torch_recompute(model, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:  # type: ignore[no-untyped-def]
    """Greedy decoding in PyTorch without a cache: the whole sequence every step."""
    import torch

    sequence, tokens, logits = list(prompt), [], []
    with torch.no_grad():
        for _ in range(steps):
            last = model(input_ids=torch.tensor([sequence]), use_cache=False).logits[0, -1].numpy()
            tokens.append(int(last.argmax()))
            logits.append(last)
            sequence.append(tokens[-1])
    return tokens, logits


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_export_has_the_cache_layout_and_matches_torch(llama_cache, exporter: str) -> None:
    report = llama_cache.reports[exporter]
    model = load_onnx(report.path)
    inputs = {v.name: [str(d) for d in v.shape] for v in model.graph.inputs}
    outputs = {v.name: [str(d) for d in v.shape] for v in model.graph.outputs}

    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["input_ids"] == ["batch_size", "sequence_length"] == inputs["position_ids"]
    assert inputs["attention_mask"] == ["batch_size", "past_sequence_length + sequence_length"]
    assert list(inputs)[3:] == [f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]
    assert all(inputs[n] == ["batch_size", "2", "past_sequence_length", "8"] for n in list(inputs)[3:])
    assert list(outputs) == ["logits"] + [f"present.{i}.{k}" for i in range(2) for k in ("key", "value")]
    assert outputs["logits"] == ["batch_size", "sequence_length", "96"]
    assert all(
        outputs[n] == ["batch_size", "2", "past_sequence_length + sequence_length", "8"] for n in list(outputs)[1:]
    )
    assert (report.num_layers, report.kv_heads, report.head_dim) == (2, 2, 8)
    assert report.prefill_max_abs_diff < 1e-4 and report.decode_max_abs_diff < 1e-4


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_cached_generation_equals_recomputing_the_sequence(llama_cache, exporter: str) -> None:
    path = getattr(llama_cache, exporter)
    steps = 24  # past grows to 32 tokens

    cached = generate.greedy(path, PROMPT, steps, keep_logits=True)
    recomputed = generate.greedy_recompute(path, PROMPT, steps)
    torch_tokens, torch_logits = _torch_recompute(llama_cache.model, PROMPT, steps)

    assert cached.tokens == recomputed.tokens == torch_tokens
    assert len(set(cached.tokens)) > 3  # not a degenerate repetition
    assert cached.stopped == "length" and len(cached.decode_ms) == steps - 1
    for step, (a, b, c) in enumerate(zip(cached.logits, recomputed.logits, torch_logits, strict=True)):
        np.testing.assert_allclose(a, b, atol=LOGITS_ATOL, rtol=0, err_msg=f"step {step}: cache vs recompute")
        np.testing.assert_allclose(a, c, atol=LOGITS_ATOL, rtol=0, err_msg=f"step {step}: ORT vs torch")


def test_generation_stops_at_end_of_text(llama_cache) -> None:
    free = generate.greedy(llama_cache.dynamo, PROMPT, 10)
    stop = free.tokens[4]
    stopped = generate.greedy(llama_cache.dynamo, PROMPT, 10, eos_ids=[stop])

    assert stopped.stopped == "eos" and stopped.tokens == free.tokens[: free.tokens.index(stop) + 1]


def test_layout_comes_from_the_graph_not_from_names(llama_cache, tmp_path: Path) -> None:
    model = load_onnx(llama_cache.dynamo)
    for i, value in enumerate(model.graph.inputs[3:]):
        value.name = f"kv_in_{i}"
    for i, value in enumerate(model.graph.outputs[1:]):
        value.name = f"kv_out_{i}"
    renamed = save_model(model, tmp_path / "renamed.onnx")

    layout = generate.cache_layout(generate.open_session(renamed))

    assert [(c.past, c.present) for c in layout.cache] == [(f"kv_in_{i}", f"kv_out_{i}") for i in range(4)]
    assert {(c.heads, c.head_dim, c.past_axis) for c in layout.cache} == {(2, 8, 2)}
    assert layout.vocab == 96
    assert generate.greedy(renamed, PROMPT, 6).tokens == generate.greedy(llama_cache.dynamo, PROMPT, 6).tokens


def _no_cache_model() -> ir.Model:
    x = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["b", "s"]))
    node = ir.node("Cast", [x], attributes={"to": ir.DataType.FLOAT})
    node.outputs[0].name = "logits"
    graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 18})
    return ir.Model(graph, ir_version=10)


def test_a_graph_without_cache_is_refused_with_the_remedy(tmp_path: Path) -> None:
    path = save_model(_no_cache_model(), tmp_path / "plain.onnx")
    with pytest.raises(UnsupportedModelError, match="no KV-cache inputs.*export the decoder with its past"):
        generate.greedy(path, [1, 2], 3)


def test_bad_prompts_are_refused(llama_cache) -> None:
    with pytest.raises(PassConfigError, match="prompt is empty"):
        generate.greedy(llama_cache.dynamo, [], 3)
    with pytest.raises(PassConfigError, match="outside the model's vocabulary of 96"):
        generate.greedy(llama_cache.dynamo, [1, 500], 3)
    with pytest.raises(PassConfigError, match="max_new_tokens must be >= 1"):
        generate.greedy(llama_cache.dynamo, [1, 2], 0)


def test_cache_perplexity_equals_the_window_perplexity_of_torch(llama_cache, rng: np.random.Generator) -> None:
    import torch

    windows = evaluate.token_windows(rng.integers(3, 96, size=3 * 20), 20, 3)

    def torch_run(feeds):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            return llama_cache.model(input_ids=torch.from_numpy(feeds["input_ids"]), use_cache=False).logits.numpy()

    expected = evaluate.window_perplexity(torch_run, windows)
    for exporter in EXPORTERS:
        assert evaluate.cache_perplexity(getattr(llama_cache, exporter), windows) == pytest.approx(expected, rel=1e-5)


def test_side_by_side_timing_runs_every_model_and_keeps_their_tokens(llama_cache) -> None:
    results = generate.time_side_by_side(
        [llama_cache.dynamo, llama_cache.torchscript], PROMPT, 8, names=["d", "t"], runs=2, warmup=0
    )

    assert [r.name for r in results] == ["d", "t"]
    assert results[0].tokens == results[1].tokens == generate.greedy(llama_cache.dynamo, PROMPT, 8).tokens
    for r in results:
        assert r.prompt_tokens == len(PROMPT) and r.new_tokens == 8 and r.runs == 2
        assert 0 < r.decode_p10_ms <= r.decode_ms <= r.decode_p90_ms and r.prefill_ms > 0
        assert r.tokens_per_s == pytest.approx(1e3 / r.decode_ms)
        assert r.memory_mb == r.memory_mb  # measured (not nan) on Linux


def test_first_difference() -> None:
    assert generate.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert generate.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert generate.first_difference([1, 2], [1, 2, 3]) == 2


def test_side_by_side_rounds_take_turns_over_the_prompts(llama_cache) -> None:
    other = PROMPT[::-1]
    (result,) = generate.time_side_by_side([llama_cache.dynamo], None, 5, prompts=[PROMPT, other], runs=3, warmup=0)

    first, second = (generate.greedy(llama_cache.dynamo, p, 5).tokens for p in (PROMPT, other))
    assert result.run_tokens == [first, second, first] and result.tokens == first
    with pytest.raises(PassConfigError, match="of one length"):
        generate.time_side_by_side([llama_cache.dynamo], None, 5, prompts=[PROMPT, PROMPT[:3]])


def test_a_symbolic_head_size_comes_from_dims_or_the_genai_config(llama_cache, tmp_path: Path) -> None:
    from tforge.backends import genai

    model = load_onnx(llama_cache.dynamo)  # onnxruntime-genai's builder names the head size kv_cache_dim
    for value in [*model.graph.inputs[3:], *model.graph.outputs[1:]]:
        value.shape = ir.Shape([*value.shape[:3], ir.SymbolicDim("kv_cache_dim")])
    path = save_model(model, tmp_path / "symbolic" / "model.onnx")
    declared = generate.graph_io(path)  # the graph's own shapes (ORT's session may infer some)

    with pytest.raises(UnsupportedModelError, match="symbolic size 'kv_cache_dim' on axis 3"):
        generate.cache_layout(declared)
    layout = generate.cache_layout(declared, dims={"kv_cache_dim": 8})
    assert {(c.heads, c.head_dim, c.past_axis) for c in layout.cache} == {(2, 8, 2)}

    genai.write_genai_folder(path, path.parent, hf_config=llama_cache.model.config.to_dict())
    assert generate.cache_layout(declared) == layout
    assert generate.greedy(path, PROMPT, 6).tokens == generate.greedy(llama_cache.dynamo, PROMPT, 6).tokens
