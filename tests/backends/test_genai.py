"""A tforge cache graph run by onnxruntime-genai: the folder and its genai_config.json, and the
generator's greedy tokens equal to tforge.runtime.generate's (skipped without onnxruntime-genai)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import tforge
from tforge.backends import genai
from tforge.errors import UnsupportedModelError
from tforge.frontends.onnx import load_onnx
from tforge.runtime import generate
from tforge.runtime.save import save_model

PROMPT = [5, 17, 42, 8, 90, 33, 61, 12, 7]


def test_config_names_the_graphs_tensors(llama_cache, tmp_path: Path) -> None:
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    path = genai.write_genai_folder(
        llama_cache.dynamo, tmp_path / "bundle", hf_config=llama_cache.model.config.to_dict(),
        tokenizer=tmp_path / "tok", max_length=64,
    )
    config = json.loads(path.read_text())
    decoder = config["model"]["decoder"]

    assert decoder["filename"] == llama_cache.dynamo.name
    assert (tmp_path / "bundle" / llama_cache.dynamo.name).samefile(llama_cache.dynamo)  # hard link
    assert decoder["inputs"] == {
        "input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
        "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value",
    }
    assert decoder["outputs"] == {
        "logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value",
    }
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (2, 2, 8)
    assert (decoder["num_attention_heads"], decoder["hidden_size"]) == (4, 32)
    assert config["model"]["vocab_size"] == 96 and config["model"]["eos_token_id"] == 2
    assert config["search"]["max_length"] == 64 and config["search"]["do_sample"] is False
    assert (tmp_path / "bundle" / "tokenizer.json").read_text() == "{}"


def test_a_config_of_another_model_is_refused(llama_cache, tmp_path: Path) -> None:
    config = {**llama_cache.model.config.to_dict(), "num_hidden_layers": 3}
    with pytest.raises(UnsupportedModelError, match="graph has num_hidden_layers = 2 but the config says 3"):
        genai.write_genai_folder(llama_cache.dynamo, tmp_path / "b", hf_config=config)


def test_cache_names_without_a_layer_index_are_refused(llama_cache, tmp_path: Path) -> None:
    model = load_onnx(llama_cache.dynamo)
    for i, value in enumerate(model.graph.inputs[3:]):
        value.name = f"kv_{i}"  # keys kv_0, kv_2: no %d pattern over layers
    renamed = save_model(model, tmp_path / "renamed.onnx")
    with pytest.raises(UnsupportedModelError, match="do not hold the layer index"):
        genai.write_genai_folder(renamed, tmp_path / "b", hf_config=llama_cache.model.config.to_dict())


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_genai_generator_gives_tforges_greedy_tokens(llama_cache, tmp_path: Path, exporter: str) -> None:
    og = pytest.importorskip("onnxruntime_genai")
    path = getattr(llama_cache, exporter)
    genai.write_genai_folder(path, tmp_path / "bundle", hf_config=llama_cache.model.config.to_dict())
    steps = 20

    tokens = _genai_greedy(og, tmp_path / "bundle", steps)

    expected = generate.greedy(path, PROMPT, steps, eos_ids=[2]).tokens  # genai stops at eos too
    assert tokens == expected and len(set(expected)) > 3


def test_genai_runs_a_pruned_model(llama_cache, tmp_path: Path) -> None:
    """prune-heads keeping every KV group (one query head of each removed): the cache keeps its
    shape, the folder is written from the model's own config and genai's tokens are tforge's."""
    og = pytest.importorskip("onnxruntime_genai")
    pruned = tforge.load(llama_cache.dynamo)
    result = tforge.compile(pruned, "canonicalize,prune-heads{keep=2 importance=magnitude}", output=tmp_path / "pruned.onnx")
    assert result.report.passes[1].stats["pruned"] == 2
    config = {**llama_cache.model.config.to_dict(), "num_attention_heads": 2}
    genai.write_genai_folder(tmp_path / "pruned.onnx", tmp_path / "bundle", hf_config=config)
    steps = 12

    tokens = _genai_greedy(og, tmp_path / "bundle", steps)

    expected = generate.greedy(tmp_path / "pruned.onnx", PROMPT, steps, eos_ids=[2]).tokens
    assert tokens == expected and len(expected) == steps


def _genai_greedy(og: Any, folder: Path, steps: int) -> list[int]:
    """The tokens onnxruntime-genai's generator adds greedily to PROMPT (it stops at eos)."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + steps, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(PROMPT)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(PROMPT):]
