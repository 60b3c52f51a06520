#!/usr/bin/env python
"""End-to-end sensitivity of each linear of SmolLM2-135M to 4-bit weights (issue 17, item 3).

    python tools/bench_sensitivity.py [--model .cache/models/smollm2-kv.onnx] [--windows 2]
                                      [--seq-len 256] [--bits 4] [--block 32] [--out sens.json]

For every linear (the tied LM head excepted: it is the token table's) the tool replaces that
linear's float weight alone by its GPTQ-quantized values (symmetric blocks, as ``--preset w4a8``
does, dequantized back to float), runs the float cache graph on ``--windows`` windows of the first
half of WikiText-2 (prefill from an empty cache) and records the mean KL divergence of the
next-token distributions from the float model's: the loss change that linear alone causes at
the end of the model, where ``quantize-weights{budget-mb=...}`` measures each linear's own
relative output error. The Gram matrices GPTQ needs come from ``calibrate{gram=true}`` on the
same text (192 windows of 128, the preset's), cached beside the model.

Every linear's weight becomes a graph input, so one ONNX Runtime session serves every trial:
a trial costs one forward per window, not a session. The table groups the KL by projection
role and shows how much of the summed KL a given number of extra megabytes of 8-bit weights
would remove when spent on the linears with the most KL per weight (8-bit weights taken as
loss-free: `--preset w8a8` on this model is +0.2%).
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import tforge
from tforge.compiler.calibration import STATS_KEY, CalibrationData, text_feeds
from tforge.compiler.structure import block_map, const_array
from tforge.frontends import hf_models
from tforge.passes.math import block_quant as bq
from tforge.passes.math import gptq
from tforge.runtime.save import save_model

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "tforge" / "data" / "wikitext-2-raw-test.txt"
ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / ".cache" / "models" / "smollm2-kv.onnx")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench_sensitivity")
    parser.add_argument("--out", type=Path, default=None, help="JSON of every linear's KL")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    tokenizer = str(hf_models.smollm2_gguf_path())

    model = tforge.load(args.model)
    tforge.compile(model, "canonicalize")
    stats_path = args.work / "stats.pkl"
    if stats_path.exists():
        stats = pickle.loads(stats_path.read_bytes())
    else:
        calibrated = model.clone()
        tforge.compile(calibrated, "calibrate{gram=true}", calibration=CalibrationData(text=str(TEXT), tokenizer=tokenizer))
        stats = calibrated.meta[STATS_KEY]
        stats_path.write_bytes(pickle.dumps(stats))
    feeds = list(text_feeds(model, TEXT, tokenizer, samples=args.windows, seq_len=args.seq_len, half="first", decode_steps=0))
    vocab = max(lin.out_features for lin in block_map(model).linears)
    linears = [lin for lin in block_map(model).linears
               if lin.weight.name and const_array(lin.weight) is not None and vocab not in (lin.in_features, lin.out_features)]  # fmt: skip
    weights: dict[str, np.ndarray] = {}
    for lin in linears:  # each weight a graph input: one session for every trial
        weights[lin.weight.name] = np.array(const_array(lin.weight), np.float32)
        del model.graph.initializers[lin.weight.name]
        lin.weight.const_value = None
        model.graph.inputs.append(lin.weight)
    path = save_model(model, args.work / "weights-as-inputs.onnx")
    del model
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    logits = session.get_outputs()[0].name

    def log_probs(trial: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [_log_softmax(session.run([logits], {**feed, **trial})[0]) for feed in feeds]

    reference = log_probs(weights)
    probs = [np.exp(r) for r in reference]
    rows = []
    started = time.perf_counter()
    for i, lin in enumerate(linears):
        name = lin.weight.name
        st = stats.stats.get(lin.input.name or "")
        if st is None or st.gram is None:
            print(f"{name}: no Gram matrix of its input; skipped", file=sys.stderr)
            continue
        result = gptq.gptq_quantize(weights[name], st.second_moment, args.bits, args.block, True)
        trial = log_probs({**weights, name: bq.dequantize(result.q).astype(np.float32)})
        kl = float(np.mean([(p * (r - q)).sum(-1).mean() for p, r, q in zip(probs, reference, trial, strict=True)]))
        role = next((r for r in ROLES if r in name), "other")
        rows.append({"linear": name, "role": role, "params": int(weights[name].size), "kl": kl})
        logging.info("%d/%d %s: KL %.5f (%.0fs)", i + 1, len(linears), name, kl, time.perf_counter() - started)

    total_kl = sum(r["kl"] for r in rows)
    total_params = sum(r["params"] for r in rows)
    print(f"\n{len(rows)} linears, {args.bits}-bit GPTQ symmetric blocks of {args.block}, summed KL {total_kl:.4f}\n")
    print("| role | share of the summed KL | share of the weights | KL per weight, relative to the mean |")
    print("|---|---|---|---|")
    for role in ROLES:
        mine = [r for r in rows if r["role"] == role]
        if mine:
            k, p = sum(r["kl"] for r in mine) / total_kl, sum(r["params"] for r in mine) / total_params
            print(f"| {role} | {k:.2f} | {p:.3f} | {k / p:.2f} |")
    print("\n| extra MB of 8-bit weights | share of the summed KL removed | share of the weights at 8 bits |")
    print("|---|---|---|")
    ranked = sorted(rows, key=lambda r: -r["kl"] / r["params"])
    for mb in (1, 2, 4, 8, 16):
        room, spent, removed = mb * 1e6 * 8 / (8 - args.bits), 0, 0.0  # bits added per weight moved to 8
        for r in ranked:
            if spent + r["params"] <= room:
                spent += r["params"]
                removed += r["kl"]
        print(f"| {mb} | {removed / total_kl:.2f} | {spent / total_params:.3f} |")
    if args.out:
        args.out.write_text(json.dumps({"bits": args.bits, "block": args.block, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
