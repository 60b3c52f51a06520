"""Shared pytest fixtures.

- ``rng``: a seeded NumPy generator.
- ``zoo_model(name) -> Path``: the zoo model ``name`` exported to ONNX (once per session).
- ``zoo_module(name) -> torch.nn.Module``: the very module that was exported, for references.
- ``zoo_entries``: ``{name: ZooEntry}``; ``entry.truth`` is the ground truth to assert.
- a test with a ``zoo_name`` argument runs once per zoo model, unless it parametrizes it itself.
- ``minilm_onnx`` / ``smollm2_onnx``: real pretrained exports in ``.cache/models`` (reused when
  current); tests using them must be marked ``@pytest.mark.slow``.
- ``llama_cache``: a random tiny LLaMA exported with a KV cache (``llama_canonical``: its exports
  canonicalized, shared by the session); ``tokenizer_dir``: a word-level
  tokenizer over its 96-token vocabulary (``WORDS``: token ``i`` is ``WORDS[i]``); ``llama_text``:
  calibration text in that vocabulary.
- ``teacher_forced(model, ids, prefill)``: a cache graph's logits at prefill and at each decode
  step, the present outputs fed back; ``cosine(a, b)``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from tests.models import zoo

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parent.parent
MODEL_CACHE = REPO / ".cache" / "models"
#: the vocabulary of ``tokenizer_dir``, the 96 ids of ``llama_cache``'s random LLaMA
WORDS = ["<pad>", "<s>", "</s>", *(f"w{i}" for i in range(3, 96))]


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator, so a test's random weights are the same on every run."""
    return np.random.default_rng(0)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize every test that takes ``zoo_name`` over the whole zoo."""
    if "zoo_name" in metafunc.fixturenames and not _parametrizes(metafunc, "zoo_name"):
        metafunc.parametrize("zoo_name", zoo.NAMES)


def _parametrizes(metafunc: pytest.Metafunc, name: str) -> bool:
    """Whether the test chose its own values for ``name`` with @pytest.mark.parametrize."""
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0]
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        if name in names:
            return True
    return False


@pytest.fixture(scope="session")
def zoo_entries() -> dict[str, zoo.ZooEntry]:
    return zoo.ZOO


@pytest.fixture(scope="session")
def zoo_module() -> Callable[[str], torch.nn.Module]:
    """Build each zoo module once; exports and numeric references share the same weights."""
    cache: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in cache:
            cache[name] = zoo.ZOO[name].module()
        return cache[name]

    return get


@pytest.fixture(scope="session")
def zoo_model(
    tmp_path_factory: pytest.TempPathFactory, zoo_module: Callable[[str], torch.nn.Module]
) -> Callable[[str], Path]:
    """Export each zoo model at most once per session, on first request."""
    folder = tmp_path_factory.mktemp("zoo")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = zoo.ZOO[name].export(folder, zoo_module(name))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def zoo_static_model(
    tmp_path_factory: pytest.TempPathFactory, zoo_module: Callable[[str], torch.nn.Module]
) -> Callable[[str], Path]:
    """Each zoo model exported at the fixed shape ``zoo.STATIC_SHAPE`` (once per session)."""
    folder = tmp_path_factory.mktemp("zoo-static")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = zoo.ZOO[name].export(folder, zoo_module(name), static=zoo.STATIC_SHAPE)
        return cache[name]

    return get


def _real_export(name: str) -> Path:
    from tforge.frontends import hf_models

    path = MODEL_CACHE / f"{name}.onnx"
    script = REPO / "tools" / "export_models.py"
    if not hf_models.is_current(path, *([script] if script.exists() else [])):
        exporter = {
            "minilm": hf_models.export_minilm,
            "smollm2": hf_models.export_smollm2,
            "smollm2-kv-torchscript": hf_models.export_smollm2_kv_torchscript,
        }[name]
        exporter(path)
    return path


@pytest.fixture(scope="session")
def minilm_onnx() -> Path:
    """MiniLM exported by tools/export_models.py's code (inputs input_ids, attention_mask)."""
    return _real_export("minilm")


@pytest.fixture(scope="session")
def smollm2_onnx() -> Path:
    """SmolLM2-135M exported by tools/export_models.py's code (input input_ids -> logits)."""
    return _real_export("smollm2")


@pytest.fixture(scope="session")
def smollm2_kv_torchscript_onnx() -> Path:
    """SmolLM2-135M with a KV cache through the TorchScript exporter (Hugging Face's route), as
    tools/export_models.py --models smollm2-kv-torchscript. The dynamo route of the same export
    takes ten times as long (about 150 s here); ``llama_cache`` covers both routes."""
    return _real_export("smollm2-kv-torchscript")


@pytest.fixture(scope="session")
def llama_cache(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A random-initialised LLaMA with grouped-query attention (2 layers, 4 heads, 2 KV heads,
    vocab 96), exported with a KV cache by both routes: ``.dynamo`` / ``.torchscript`` (paths),
    ``.reports`` (the export checks) and ``.model`` (the transformers module)."""
    from types import SimpleNamespace

    from tforge.frontends import hf_models

    folder = tmp_path_factory.mktemp("llama-cache")
    model = hf_models.random_llama()
    reports = {
        exporter: hf_models.export_causal_lm_with_cache(
            model, folder / f"llama-{exporter}.onnx", exporter=exporter
        )
        for exporter in ("dynamo", "torchscript")
    }
    return SimpleNamespace(
        model=model,
        reports=reports,
        dynamo=reports["dynamo"].path,
        torchscript=reports["torchscript"].path,
        folder=folder,
    )


@pytest.fixture(scope="session")
def llama_canonical(llama_cache):  # type: ignore[no-untyped-def]
    """``llama_cache``'s exports canonicalized once: {"dynamo": model, "torchscript": model}.
    Shared by every test of the session: a test that changes a model clones it first."""
    import tforge

    models = {}
    for exporter in ("dynamo", "torchscript"):
        model = tforge.load(getattr(llama_cache, exporter))
        tforge.compile(model, "canonicalize", progress=lambda _: None)
        models[exporter] = model
    return models


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a word-level ``tokenizer.json`` over ``WORDS`` (whitespace-split, unknown
    words to ``<pad>``; ``<pad>``, ``<s>``, ``</s>`` special): text for ``llama_cache``'s models."""
    import tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tok = tokenizers.Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    folder = tmp_path_factory.mktemp("tok")
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="session")
def llama_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Lines of random words of the 96-token vocabulary (ids 3.., no special tokens): text for
    calibrating ``llama_cache``'s models through ``tokenizer_dir``."""
    rng = np.random.default_rng(0)
    lines = [" ".join(WORDS[i] for i in rng.integers(3, len(WORDS), 12)) for _ in range(60)]
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def teacher_forced(
    model: Any, ids: np.ndarray, prefill: int, *, optimize: bool = True
) -> tuple[list[np.ndarray], list[tuple[int, ...]]]:
    """Last-position logits of the prefill of ``ids[:prefill]`` (empty cache) and of each later
    token decoded with the cache, each step's present outputs fed back as its past, and the shape
    of every present output after the last step. ``model``: a path, an ``onnx_ir`` model or a
    session; ``optimize=False`` opens the session with ORT's graph optimizations off."""
    from tforge.runtime import generate

    session = generate.open_session(model, optimize=optimize)
    layout = generate.cache_layout(session)
    names = [layout.logits, *(c.present for c in layout.cache)]
    out = session.run(names, layout.prefill_feeds(ids[None, :prefill]))
    logits = [out[0][0, -1]]
    for past in range(prefill, len(ids)):
        feeds = layout.step_feeds(ids[None, past : past + 1], past)
        feeds.update({c.past: out[1 + i] for i, c in enumerate(layout.cache)})
        out = session.run(names, feeds)
        logits.append(out[0][0, -1])
    return logits, [o.shape for o in out[1:]]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
