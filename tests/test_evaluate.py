"""evaluate: text halves and sentences, pooled sentence embeddings, perplexity."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from tforge import evaluate
from tforge.errors import UnsupportedModelError

TEXT = """ = Heading =
 The first line has a sentence of seven words . And a second one with more words here .
 Short .

 = = Sub heading = =
 The third line is also long enough to count , with a @-@ hyphen .
 Another line that is in the second half of the text for sure .
"""


def test_halves_split_at_a_line_break_and_cover_the_text() -> None:
    first, second = evaluate.text_half(TEXT, "first"), evaluate.text_half(TEXT, "second")

    assert first + second == TEXT
    assert first.endswith("\n") and len(first) <= len(TEXT) // 2 < len(first) + len(second.split("\n")[0]) + 1
    with pytest.raises(ValueError, match="half must be"):
        evaluate.text_half(TEXT, "middle")  # type: ignore[arg-type]


def test_read_text_normalises_line_endings(tmp_path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes(b"a b\r\nc d\r\n")
    assert evaluate.read_text(path) == "a b\nc d\n"
    with pytest.raises(UnsupportedModelError, match="does not exist"):
        evaluate.read_text(tmp_path / "missing.txt")


def test_sentences_skip_headings_and_short_ones_and_undo_markup() -> None:
    found = evaluate.sentences(TEXT, 3, min_words=6)

    assert found == [
        "The first line has a sentence of seven words .",
        "And a second one with more words here .",
        "The third line is also long enough to count , with a-hyphen .",
    ]
    with pytest.raises(ValueError, match="only 4 sentences"):
        evaluate.sentences(TEXT, 5, min_words=6)
    assert evaluate.sentences(TEXT, None, min_words=6) == [*found, "Another line that is in the second half of the text for sure ."]


def test_encode_pads_to_the_longest_row_and_masks_padding() -> None:
    tokenizer = SimpleNamespace(encode=lambda s: SimpleNamespace(ids=[len(w) for w in s.split()]))

    feeds = evaluate.encode_sentences(tokenizer, ["a bb ccc", "dddd"], max_length=2)

    np.testing.assert_array_equal(feeds["input_ids"], [[1, 2], [4, 0]])
    np.testing.assert_array_equal(feeds["attention_mask"], [[1, 1], [1, 0]])
    assert feeds["input_ids"].dtype == np.int64


def test_mean_pool_ignores_masked_positions_and_normalises() -> None:
    hidden = np.array([[[3.0, 4.0], [100.0, 100.0]], [[1.0, 0.0], [0.0, 1.0]]], np.float32)
    mask = np.array([[1, 0], [1, 1]])

    pooled = evaluate.mean_pool(hidden, mask)

    np.testing.assert_allclose(pooled, [[0.6, 0.8], [math.sqrt(0.5), math.sqrt(0.5)]], atol=1e-12)
    with pytest.raises(ValueError, match="expected hidden"):
        evaluate.mean_pool(hidden, mask[:, :1])


def test_sentence_embeddings_batch_and_agree_with_themselves() -> None:
    tokenizer = SimpleNamespace(encode=lambda s: SimpleNamespace(ids=[len(w) for w in s.split()]))

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:  # hidden state: one-hot-ish of token ids
        ids = feeds["input_ids"]
        return np.stack([ids, ids**2, np.ones_like(ids)], axis=-1).astype(np.float32)

    texts = ["a bb", "ccc dddd eeeee", "ff", "g hh iii"]
    one_batch = evaluate.sentence_embeddings(run, tokenizer, texts, batch_size=4)
    small_batches = evaluate.sentence_embeddings(run, tokenizer, texts, batch_size=3)

    np.testing.assert_allclose(one_batch, small_batches, atol=1e-12)  # padding does not leak in
    agreement = evaluate.agreement(one_batch, small_batches)
    assert agreement.mean == pytest.approx(1.0) and agreement.sentences == 4


def test_row_cosines() -> None:
    a = np.array([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    b = np.array([[0.0, 1.0], [2.0, 2.0], [-1.0, 0.0]])
    np.testing.assert_allclose(evaluate.row_cosines(a, b), [0.0, 1.0, -1.0], atol=1e-12)
    with pytest.raises(ValueError, match="one shape"):
        evaluate.row_cosines(a, b[:2])


def test_nll_of_uniform_logits_is_log_vocab() -> None:
    logits = np.zeros((5, 7), np.float32)
    targets = np.array([0, 1, 2, 3, 6])
    assert evaluate.nll_sum(logits, targets) == pytest.approx(5 * math.log(7))
    assert evaluate.perplexity(5 * math.log(7), 5) == pytest.approx(7.0)


def test_nll_matches_softmax_and_is_stable_for_large_logits(rng: np.random.Generator) -> None:
    logits = rng.normal(size=(4, 9)) * 3 + 1000.0  # a naive exp overflows here
    targets = rng.integers(0, 9, size=4)
    shifted = logits - 1000.0
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    expected = -np.log(probs[np.arange(4), targets]).sum()
    assert evaluate.nll_sum(logits, targets) == pytest.approx(expected, rel=1e-9)


def test_window_perplexity_of_a_perfect_and_a_uniform_model() -> None:
    vocab = 11
    windows = evaluate.token_windows(np.arange(40) % vocab, 8, 5)

    def perfect(feeds: dict[str, np.ndarray]) -> np.ndarray:
        ids = feeds["input_ids"]
        return np.eye(vocab)[(ids + 1) % vocab][None, 0] * 50.0  # predicts the next id

    def uniform(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.zeros((1, feeds["input_ids"].shape[1], vocab))

    assert evaluate.window_perplexity(perfect, windows) == pytest.approx(1.0, abs=1e-6)
    assert evaluate.window_perplexity(uniform, windows) == pytest.approx(vocab)


def test_token_windows_take_a_prefix_and_refuse_too_few_tokens() -> None:
    windows = evaluate.token_windows(list(range(25)), 4, 6)
    assert windows.shape == (6, 4) and windows[-1, -1] == 23 and windows.dtype == np.int64
    with pytest.raises(ValueError, match="make only 6 windows"):
        evaluate.token_windows(list(range(25)), 4, 7)


def test_tokenize_lines_stops_once_enough_tokens() -> None:
    seen: list[str] = []

    def encode(line: str) -> list[int]:
        seen.append(line)
        return [len(w) for w in line.split()]

    ids = evaluate.tokenize_lines(encode, "a b c\n\nd e\nf g h\ni j\n", 4)

    assert ids == [1, 1, 1, 1, 1] and seen == ["a b c\n", "d e\n"]
