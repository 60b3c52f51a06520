"""``tforge generate`` and ``tforge bench --generate`` and their API on a random LLaMA-GQA
cache export, with a word-level tokenizer over its 96-token vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tforge
from tests.conftest import WORDS  # the vocabulary of the `tokenizer_dir` fixture
from tforge.cli import main
from tforge.runtime import generate

PROMPT_TEXT = "w5 w17 w42 w8 w90 w33 w61 w12 w7"
PROMPT_IDS = [5, 17, 42, 8, 90, 33, 61, 12, 7]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_text_tokenizer_from_a_folder(tokenizer_dir: Path) -> None:
    tok = generate.load_text_tokenizer(tokenizer_dir)
    assert tok.encode(PROMPT_TEXT) == PROMPT_IDS
    assert tok.decode([5, 2, 17]) == "w5 w17"  # the special token is dropped
    assert tok.eos_ids == (2,)


def test_generate_prints_the_continuation(llama_cache, tokenizer_dir: Path, capsys) -> None:
    expected = generate.greedy(llama_cache.dynamo, PROMPT_IDS, 12, eos_ids=[2]).tokens

    code, out, err = _run(
        capsys, "generate", str(llama_cache.dynamo), "--tokenizer", str(tokenizer_dir),
        "--prompt", PROMPT_TEXT, "--max-new-tokens", "12",
    )

    assert code == 0, err
    assert out.split() == [WORDS[t] for t in expected if t != 2]
    assert f"{len(PROMPT_IDS)} prompt tokens, {len(expected)} new tokens" in err


def test_generate_api_equals_the_loop(llama_cache, tokenizer_dir: Path) -> None:
    result = tforge.generate_text(llama_cache.torchscript, PROMPT_TEXT, tokenizer=tokenizer_dir,
                                  max_new_tokens=8, stop_at_eos=False)

    assert result.prompt_tokens == PROMPT_IDS
    assert result.tokens == generate.greedy(llama_cache.dynamo, PROMPT_IDS, 8).tokens
    assert result.text.split() == [WORDS[t] for t in result.tokens if t > 2]


def test_generate_errors_are_one_line(llama_cache, tokenizer_dir: Path, tmp_path: Path, capsys) -> None:
    code, _, err = _run(capsys, "generate", str(llama_cache.dynamo), "--tokenizer", str(tmp_path),
                        "--prompt", "w5")
    assert code == 1 and "no tokenizer.json at" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "generate", str(tmp_path / "missing.onnx"), "--tokenizer", str(tokenizer_dir),
                        "--prompt", "w5")
    assert code == 1 and "no such model file" in err
    assert main(["generate", str(llama_cache.dynamo), "--prompt", "w5"]) == 2  # --tokenizer is required


def test_bench_generate_side_by_side(llama_cache, capsys) -> None:
    code, out, err = _run(
        capsys, "bench", "--generate", str(llama_cache.dynamo), str(llama_cache.torchscript),
        "--prompt-length", "16", "--new-tokens", "6", "--runs", "2", "--warmup", "0", "--json",
    )

    assert code == 0, err
    rows = json.loads(out)
    assert [r["model"] for r in rows] == [str(llama_cache.dynamo), str(llama_cache.torchscript)]
    for row in rows:
        assert row["prompt_tokens"] == 16 and row["new_tokens"] == 6 and row["runs"] == 2
        assert row["same_tokens"] and row["first_difference"] is None
        assert row["prefill_ms"] > 0 and row["decode_ms"] > 0 and row["peak_rss_mb"] > 0
    assert rows[0]["ratio"] == 1.0


def test_bench_generate_table_and_a_differing_model(llama_cache, tmp_path: Path, capsys) -> None:
    from tforge.frontends import hf_models

    other = hf_models.export_causal_lm_with_cache(
        hf_models.random_llama(seed=1), tmp_path / "other.onnx", exporter="torchscript"
    ).path
    code, out, err = _run(capsys, "bench", "--generate", str(llama_cache.dynamo), str(other),
                          "--prompt-length", "8", "--new-tokens", "5", "--runs", "1")

    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["model", "prefill"]
    assert lines[1].endswith("same") and "differ from position" in lines[2]
    assert "peak RSS" in lines[-1]
    api = tforge.bench_generate([llama_cache.dynamo, other], prompt=PROMPT_IDS, new_tokens=5, runs=1, warmup=0)
    assert not api[1].same_tokens
    assert api[1].first_difference == generate.first_difference(api[0].tokens, api[1].tokens) is not None


def test_bench_generate_refuses_forward_options(llama_cache, capsys) -> None:
    code, _, err = _run(capsys, "bench", "--generate", str(llama_cache.dynamo), "--input-shape", "input_ids=1x8")
    assert code == 1 and "drop --input-shape" in err
    code, _, err = _run(capsys, "bench", str(llama_cache.dynamo), "--tokenizer", "x")
    assert code == 1 and "add --generate" in err
