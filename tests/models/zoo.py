"""Tiny randomly initialised transformers, exported the way users export them, with ground truth.

Each entry is a two-layer ``transformers`` model (hidden size 64, vocabulary 96) built under a
fixed seed and exported by ``from_torch`` (``torch.onnx.export(dynamo=True, optimize=True)``)
with dynamic batch and sequence. ``Truth`` records the architecture facts a block finder must
recover from the graph alone; tests assert against it.

Weights are perturbed after initialisation: ``transformers`` initialises every norm gamma to 1
and every bias to 0, and the exporter's optimizer then merges identical initializers (all
gammas become one shared tensor) and drops zero biases, which would give a graph unlike any
trained model's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from tforge.frontends.torch import from_torch
from tforge.runtime.save import save_model

if TYPE_CHECKING:
    import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEED = 0
VOCAB = 96
HIDDEN = 64
LAYERS = 2
HEADS = 4
INTERMEDIATE = 128
TEXT_DIMS = {0: "batch", 1: "sequence"}
STATIC_SHAPE = (2, 6)  # batch and sequence of the fixed-shape exports


@dataclass(frozen=True)
class Truth:
    """What the block finder must report for every layer of the model."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    gated: bool  # FFN is act(gate(x)) * up(x) (SwiGLU) rather than act(up(x))
    norm: Literal["layer", "rms"]
    pre_norm: bool
    causal: bool
    fused_qkv: bool  # one projection produces Q, K and V (GPT-2 c_attn)
    activation: Literal["gelu", "gelu_tanh", "silu"]
    qkv_bias: bool
    attn_implementation: Literal["sdpa", "eager"]
    qk_norm: bool = False  # per-head RMSNorm of Q and K after their projections (Qwen3)
    qkv_split_op: Literal["Split", "Slice"] = "Split"  # how a fused QKV output is cut in three
    fused_gate_up: bool = False  # gate and up are one linear whose output is cut in halves (Phi-3)
    # each sub-block's output is normalised before its residual add, x + norm(f(norm(x))) (Gemma 2)
    output_norms: bool = False
    attn_softcap: bool = False  # scores squashed by cap * tanh(scores / cap) before the mask (Gemma 2)
    sliding_window: int | None = None  # a layer of two attends to the last n positions only (Gemma 2)

    @property
    def norm_placement(self) -> Literal["pre", "post", "sandwich"]:
        """What the block map reports as ``Block.norm_placement``."""
        if not self.pre_norm:
            return "post"
        return "sandwich" if self.output_norms else "pre"


@dataclass(frozen=True)
class ZooEntry:
    """A model of the zoo: how to build it, how to feed it, and its ground truth."""

    name: str
    truth: Truth
    build: Callable[[], torch.nn.Module]
    input_names: tuple[str, ...]
    output_name: str
    dynamic_axes: dict[str, dict[int, str]]
    inputs: Callable[[int, int, np.random.Generator], dict[str, np.ndarray]]
    notes: str = field(default="")

    def module(self) -> torch.nn.Module:
        """The model in eval mode, with deterministic (seeded) weights."""
        import torch

        torch.manual_seed(SEED)
        module = self.build().eval()
        _perturb_constant_parameters(module)
        return module

    def export(
        self,
        folder: str | os.PathLike[str],
        module: torch.nn.Module | None = None,
        *,
        static: tuple[int, int] | None = None,
        exporter: Literal["dynamo", "torchscript"] = "dynamo",
    ) -> Path:
        """Export to ``folder/<name>.onnx`` and return the path.

        ``static=(batch, seq)``: a fixed-shape export at that batch and sequence length (every
        shape constant), written to ``folder/<name>.static-<batch>x<seq>.onnx``.
        ``exporter="torchscript"``: the TorchScript tracer (``torch.onnx.export(dynamo=False)``,
        the route of Hugging Face's own exporters), written to ``folder/<name>.torchscript.onnx``.
        """
        import torch

        module = module if module is not None else self.module()
        batch, seq = static if static is not None else (2, 7)
        example = self.inputs(batch, seq, np.random.default_rng(SEED))
        args = tuple(torch.from_numpy(example[name]) for name in self.input_names)
        suffix = f".static-{batch}x{seq}" if static is not None else ""
        if exporter == "torchscript":
            return _export_torchscript(self, module, args, Path(folder) / f"{self.name}{suffix}.torchscript.onnx", static)
        model = from_torch(
            module,
            args,
            input_names=list(self.input_names),
            output_names=[self.output_name],
            dynamic_axes=None if static is not None else self.dynamic_axes,
        )
        return save_model(model, Path(folder) / f"{self.name}{suffix}.onnx")


def _export_torchscript(
    entry: ZooEntry, module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, static: tuple[int, int] | None
) -> Path:
    """``torch.onnx.export(dynamo=False)`` into a temporary file, then tforge's atomic save."""
    import tempfile
    import warnings

    import torch

    from tforge.frontends.onnx import load_onnx

    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer warns at every Python branch on a tensor
        raw = Path(tmp) / "model.onnx"
        torch.onnx.export(
            module, args, str(raw), input_names=list(entry.input_names), output_names=[entry.output_name],
            dynamic_axes=None if static is not None else {**entry.dynamic_axes, entry.output_name: {0: "batch", 1: "sequence"}},
            opset_version=18, dynamo=False,
        )  # fmt: skip
        model = load_onnx(raw)
        model.meta.pop("tforge.source_path", None)  # the temporary file is not the source
        return save_model(model, path)


def _perturb_constant_parameters(module: torch.nn.Module) -> None:
    """Give every constant-filled parameter (gammas of 1, biases of 0) distinct values."""
    import torch

    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for param in module.parameters():
            flat = param.reshape(-1)
            if flat.numel() > 1 and bool((flat == flat[0]).all()):
                noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
                param.add_(noise * (0.1 if float(flat[0]) != 0 else 0.02))


def _text_inputs(
    with_mask: bool,
) -> Callable[[int, int, np.random.Generator], dict[str, np.ndarray]]:
    """Token ids, plus an attention mask whose last row is right-padded (exercises masking)."""

    def make(batch: int, seq: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        feeds = {"input_ids": rng.integers(0, VOCAB, size=(batch, seq), dtype=np.int64)}
        if with_mask:
            mask = np.ones((batch, seq), dtype=np.int64)
            if batch > 1:
                mask[-1, seq - seq // 3 :] = 0
            feeds["attention_mask"] = mask
        return feeds

    return make


def _image_inputs(batch: int, seq: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    del seq  # the number of patches is fixed by the image size
    return {"pixel_values": rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)}


def _hidden_state_wrapper(model: torch.nn.Module, **call_kwargs: Any) -> torch.nn.Module:
    """Wrap a text model so that ``forward(input_ids, attention_mask)`` returns only
    ``last_hidden_state`` (one ONNX output, named forward arguments for dynamic axes)."""
    import torch

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **call_kwargs)
            return out.last_hidden_state

    return LastHiddenState()


def _image_wrapper(model: torch.nn.Module) -> torch.nn.Module:
    """Wrap an image model so that ``forward(pixel_values)`` returns ``last_hidden_state``."""
    import torch

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.model(pixel_values=pixel_values).last_hidden_state

    return LastHiddenState()


def _bert() -> torch.nn.Module:
    import transformers

    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE, max_position_embeddings=64, hidden_act="gelu",
    )  # fmt: skip
    return _hidden_state_wrapper(transformers.BertModel(config, add_pooling_layer=False))


def _gpt2() -> torch.nn.Module:
    import transformers

    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTERMEDIATE,
        n_positions=64, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return _hidden_state_wrapper(transformers.GPT2Model(config), use_cache=False)


def _llama() -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=2, intermediate_size=INTERMEDIATE, max_position_embeddings=64,
    )  # fmt: skip
    return _hidden_state_wrapper(transformers.LlamaModel(config), use_cache=False)


def _qwen2() -> torch.nn.Module:
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=2, intermediate_size=INTERMEDIATE, max_position_embeddings=64,
        attn_implementation="eager",
    )  # fmt: skip
    return _hidden_state_wrapper(transformers.Qwen2Model(config), use_cache=False)


def _qwen3() -> torch.nn.Module:
    import transformers

    config = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=2, head_dim=HIDDEN // HEADS, intermediate_size=INTERMEDIATE,
        max_position_embeddings=64,
    )  # fmt: skip
    return _hidden_state_wrapper(transformers.Qwen3Model(config), use_cache=False)


def _phi3() -> torch.nn.Module:
    import transformers

    config = transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=2, intermediate_size=INTERMEDIATE, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return _hidden_state_wrapper(transformers.Phi3Model(config), use_cache=False)


def _gemma2() -> torch.nn.Module:
    import transformers

    config = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=2, head_dim=HIDDEN // HEADS, intermediate_size=INTERMEDIATE,
        max_position_embeddings=64, sliding_window=4, attn_implementation="eager",
    )  # fmt: skip
    return _hidden_state_wrapper(transformers.Gemma2Model(config), use_cache=False)


def _falcon(new_decoder_architecture: bool) -> torch.nn.Module:
    import transformers

    config = transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        ffn_hidden_size=INTERMEDIATE, max_position_embeddings=64, bias=False, alibi=False,
        parallel_attn=True, multi_query=not new_decoder_architecture,
        new_decoder_architecture=new_decoder_architecture, num_kv_heads=2 if new_decoder_architecture else None,
    )  # fmt: skip
    return _hidden_state_wrapper(transformers.FalconModel(config), use_cache=False)


def _gpt_bigcode() -> torch.nn.Module:
    import transformers

    config = transformers.GPTBigCodeConfig(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTERMEDIATE,
        n_positions=64, multi_query=True, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return _hidden_state_wrapper(transformers.GPTBigCodeModel(config), use_cache=False)


def _vit() -> torch.nn.Module:
    import transformers

    config = transformers.ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=INTERMEDIATE, hidden_act="gelu",
    )  # fmt: skip
    return _image_wrapper(transformers.ViTModel(config, add_pooling_layer=False))


_COMMON = {
    "num_layers": LAYERS,
    "hidden_size": HIDDEN,
    "num_heads": HEADS,
    "head_dim": HIDDEN // HEADS,
}
_TEXT = {
    "input_names": ("input_ids", "attention_mask"),
    "output_name": "last_hidden_state",
    "dynamic_axes": {"input_ids": TEXT_DIMS, "attention_mask": TEXT_DIMS},
    "inputs": _text_inputs(with_mask=True),
}

ZOO: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in [
        ZooEntry(
            name="bert",
            truth=Truth(**_COMMON, num_kv_heads=HEADS, intermediate_size=INTERMEDIATE, gated=False,
                        norm="layer", pre_norm=False, causal=False, fused_qkv=False,
                        activation="gelu", qkv_bias=True, attn_implementation="sdpa"),
            build=_bert,
            notes="encoder, post-norm LayerNorm, exact GELU, separate Q/K/V with biases",
            **_TEXT,
        ),
        ZooEntry(
            name="gpt2",
            truth=Truth(**_COMMON, num_kv_heads=HEADS, intermediate_size=INTERMEDIATE, gated=False,
                        norm="layer", pre_norm=True, causal=True, fused_qkv=True,
                        activation="gelu_tanh", qkv_bias=True, attn_implementation="sdpa"),
            build=_gpt2,
            notes="decoder, fused c_attn (Conv1D, weight [in, 3*out]) lowered to Gemm + Split",
            **_TEXT,
        ),
        ZooEntry(
            name="llama",
            truth=Truth(**_COMMON, num_kv_heads=2, intermediate_size=INTERMEDIATE, gated=True,
                        norm="rms", pre_norm=True, causal=True, fused_qkv=False,
                        activation="silu", qkv_bias=False, attn_implementation="sdpa"),
            build=_llama,
            notes="decoder, RMSNorm, SwiGLU, rotary, grouped-query attention (2 query heads per KV head)",
            **_TEXT,
        ),
        ZooEntry(
            name="qwen2",
            truth=Truth(**_COMMON, num_kv_heads=2, intermediate_size=INTERMEDIATE, gated=True,
                        norm="rms", pre_norm=True, causal=True, fused_qkv=False,
                        activation="silu", qkv_bias=True, attn_implementation="eager"),
            build=_qwen2,
            notes="like llama but with Q/K/V biases and eager attention (explicit MatMul-Softmax-MatMul)",
            **_TEXT,
        ),
        ZooEntry(
            name="qwen3",
            truth=Truth(**_COMMON, num_kv_heads=2, intermediate_size=INTERMEDIATE, gated=True,
                        norm="rms", pre_norm=True, causal=True, fused_qkv=False,
                        activation="silu", qkv_bias=False, attn_implementation="sdpa", qk_norm=True),
            build=_qwen3,
            notes="like llama plus QK-norm: an RMSNorm over each head's head_dim on Q and K, before rotary",
            **_TEXT,
        ),
        ZooEntry(
            name="phi3",
            truth=Truth(**_COMMON, num_kv_heads=2, intermediate_size=INTERMEDIATE, gated=True,
                        norm="rms", pre_norm=True, causal=True, fused_qkv=True,
                        activation="silu", qkv_bias=False, attn_implementation="sdpa",
                        qkv_split_op="Slice", fused_gate_up=True),
            build=_phi3,
            notes="decoder, fused qkv_proj cut by three Slices (GQA widths 64/32/32), fused gate_up_proj cut in halves",
            **_TEXT,
        ),
        ZooEntry(
            name="gemma2",
            truth=Truth(**_COMMON, num_kv_heads=2, intermediate_size=INTERMEDIATE, gated=True,
                        norm="rms", pre_norm=True, causal=True, fused_qkv=False,
                        activation="gelu_tanh", qkv_bias=False, attn_implementation="eager",
                        output_norms=True, attn_softcap=True, sliding_window=4),
            build=_gemma2,
            notes="decoder, sandwich RMSNorms (pre and output norms, gamma written 1 + w), embedding "
                  "scaled by sqrt(hidden), GeGLU (tanh), attention logits soft-capped, layer 0 with a "
                  "4-token sliding window beside layer 1's full causal mask",
            **_TEXT,
        ),
        ZooEntry(
            name="vit",
            truth=Truth(**_COMMON, num_kv_heads=HEADS, intermediate_size=INTERMEDIATE, gated=False,
                        norm="layer", pre_norm=True, causal=False, fused_qkv=False,
                        activation="gelu", qkv_bias=True, attn_implementation="sdpa"),
            build=_vit,
            input_names=("pixel_values",),
            output_name="last_hidden_state",
            dynamic_axes={"pixel_values": {0: "batch"}},
            inputs=_image_inputs,
            notes="image encoder, 32x32 image in 8x8 patches (Conv) -> 17 tokens incl. CLS, pre-norm",
        ),
    ]
}  # fmt: skip

NAMES: tuple[str, ...] = tuple(ZOO)


#: Models outside the zoo every zoo test runs over: the layouts one recognition step reads, each
#: covered by its own tests (tests/compiler/test_structure_layouts.py).
EXTRA: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in [
        ZooEntry(
            name="falcon_mq",
            truth=Truth(**_COMMON, num_kv_heads=1, intermediate_size=INTERMEDIATE, gated=False,
                        norm="layer", pre_norm=True, causal=True, fused_qkv=True,
                        activation="gelu", qkv_bias=False, attn_implementation="sdpa"),
            build=lambda: _falcon(new_decoder_architecture=False),
            notes="multi-query Falcon: query_key_value reshaped to [heads + 2, head_dim] slots, K and V "
                  "the last two (one KV head, broadcast by the scores MatMul); parallel attention and MLP",
            **_TEXT,
        ),
        ZooEntry(
            name="falcon_gqa",
            truth=Truth(**_COMMON, num_kv_heads=2, intermediate_size=INTERMEDIATE, gated=False,
                        norm="layer", pre_norm=True, causal=True, fused_qkv=True,
                        activation="gelu", qkv_bias=False, attn_implementation="sdpa"),
            build=lambda: _falcon(new_decoder_architecture=True),
            notes="Falcon's new decoder architecture: query_key_value reshaped per KV group to "
                  "[kv_heads, heads / kv_heads + 2, head_dim], K and V expanded to the group's query heads",
            **_TEXT,
        ),
        ZooEntry(
            name="gpt_bigcode",
            truth=Truth(**_COMMON, num_kv_heads=1, intermediate_size=INTERMEDIATE, gated=False,
                        norm="layer", pre_norm=True, causal=True, fused_qkv=True,
                        activation="gelu_tanh", qkv_bias=True, attn_implementation="sdpa"),
            build=_gpt_bigcode,
            notes="multi-query GPT-BigCode: fused c_attn unsqueezed to [b, 1, s, W] and split [H*d, d, d]; "
                  "the one KV head repeated by a constant count (Expand [b, 1, H, s, d], Reshape [b, H, s, d])",
            **_TEXT,
        ),
    ]
}  # fmt: skip
