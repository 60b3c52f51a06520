"""Write a LLaMA-shaped ONNX model of a chosen size with random weights in external data.

    .venv/bin/python tools/make_large_model.py /tmp/big --gib 8          # 8 GiB of fp32 weights
    .venv/bin/python tools/make_large_model.py /tmp/small --gib 1 --hidden 1024

The graph is what exporters emit for LLaMA (tests/fuzz/graphs.py's builder: token embedding
Gather, decomposed RMSNorm, grouped-query attention with HF's repeat-kv, SwiGLU FFN, final norm,
untied LM head). Weights are generated and appended to ``model.onnx.data`` one tensor at a
time (offsets aligned to 64 KiB, so they can be memory-mapped), never all in memory; layers
are added until the weights reach ``--gib``. Also writes ``calib.npz`` (token ids, samples on
axis 0) for ``tforge compile --calib-npz``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fuzz.graphs import TransformerSpec, _Builder  # noqa: E402

ALIGN = 65536


class _ExternalBuilder(_Builder):
    """Constants above 1 KiB go to the data file as they are made."""

    def __init__(self, rng: np.random.Generator, data_path: Path) -> None:
        super().__init__(rng)
        self.data = open(data_path, "wb")  # noqa: SIM115 - closed in build()
        self.location = data_path.name
        self.offset = 0

    def const(self, hint: str, array: np.ndarray) -> str:
        if array.nbytes <= 1024:
            return super().const(hint, array)
        name = self.name(hint)
        pad = -self.offset % ALIGN
        self.data.write(b"\0" * pad)
        self.offset += pad
        raw = np.ascontiguousarray(array).tobytes()
        self.data.write(raw)
        tensor = onnx.TensorProto(
            name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        )
        tensor.dims.extend(array.shape)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (
            ("location", self.location),
            ("offset", str(self.offset)),
            ("length", str(len(raw))),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.offset += len(raw)
        self.inits.append(tensor)
        return name

    def linear(self, x: str, fan_in: int, fan_out: int, bias: bool, hint: str) -> str:
        # float32 straight from the generator: no float64 copy of a 180 MB weight
        w = self.rng.standard_normal((fan_in, fan_out), dtype=np.float32)
        w *= np.float32(1 / np.sqrt(fan_in))
        return self.op("MatMul", [x, self.const(f"{hint}.w", w)], hint)


def layer_bytes(spec: TransformerSpec) -> int:
    h, kv, i = spec.hidden, spec.kv_heads * spec.head_dim, spec.intermediate
    return 4 * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h)


def build(folder: Path, spec: TransformerSpec, vocab: int, seed: int = 0) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    b = _ExternalBuilder(np.random.default_rng(seed), folder / "model.onnx.data")
    try:
        table = b.rng.standard_normal((vocab, spec.hidden), dtype=np.float32)
        x = b.op("Gather", [b.const("embed_tokens.weight", table), "input_ids"], "embeds")
        del table
        for layer in range(spec.layers):
            hint = f"layers.{layer}"
            x = b.op(
                "Add",
                [
                    x,
                    b.attention(
                        b.norm(x, spec, f"{hint}.input_layernorm"), spec, f"{hint}.self_attn"
                    ),
                ],
            )
            x = b.op(
                "Add",
                [
                    x,
                    b.ffn(b.norm(x, spec, f"{hint}.post_attention_layernorm"), spec, f"{hint}.mlp"),
                ],
            )
            print(
                f"layer {layer + 1}/{spec.layers}: {b.offset / 2**30:.2f} GiB written",
                file=sys.stderr,
            )
        x = b.norm(x, spec, "norm")
        logits = b.linear(x, spec.hidden, vocab, False, "lm_head")
    finally:
        b.data.close()
    graph = oh.make_graph(
        b.nodes,
        "llama",
        [oh.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, spec.seq])],
        [oh.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, [1, spec.seq, vocab])],
        b.inits,
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 20)], ir_version=10)
    onnx.save(model, folder / "model.onnx")  # the proto holds no weights: they are all external
    ids = np.random.default_rng(seed + 1).integers(0, vocab, size=(4, 1, spec.seq), dtype=np.int64)
    np.savez(folder / "calib.npz", input_ids=ids)
    return {"weights_bytes": b.offset, "layers": spec.layers, "hidden": spec.hidden, "vocab": vocab}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--gib", type=float, default=8.0, help="fp32 weight size to reach")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument(
        "--intermediate", type=int, default=None, help="default: about 2.7 x hidden"
    )
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=16)
    args = parser.parse_args()
    inter = args.intermediate or (int(args.hidden * 8 / 3) + 255) // 256 * 256
    spec = TransformerSpec(
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        intermediate=inter,
        layers=1,
        seq=args.seq,
        norm="rms",
        activation="swiglu",
        linear_bias=False,
    )
    fixed = 2 * args.vocab * args.hidden * 4
    layers = max(1, int(np.ceil((args.gib * 2**30 - fixed) / layer_bytes(spec))))
    spec = TransformerSpec(**{**spec.__dict__, "layers": layers})
    started = time.perf_counter()
    info = build(args.folder, spec, args.vocab)
    info["seconds"] = round(time.perf_counter() - started, 1)
    info["gib"] = round(info["weights_bytes"] / 2**30, 2)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
