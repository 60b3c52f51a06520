#!/usr/bin/env python
"""Check tforge's block map and core passes on standard Hugging Face ``transformers`` families.

    nice -n 10 python tools/family_sweep.py [--families llama,bert,...] [--out sweep.json] [--force]

For every family: a tiny randomly initialised model built from its ``transformers`` config
(2 layers, hidden 64, 4 heads of 16, 2 KV heads where the family has grouped-query attention,
FFN 128, vocabulary 96, 64 positions, seed 0, constant-filled parameters perturbed like
tests/models/zoo.py), wrapped to ``forward(input_ids, attention_mask) -> last_hidden_state``,
exported with the dynamo exporter (``tforge.frontends.torch.from_torch``) and with the TorchScript
one (``torch.onnx.export(dynamo=False)``, opset 18), both with dynamic batch and sequence, plus a
fixed-shape export of each kind for the families in ``STATIC``. On each export, through the CLI
(``tforge.cli.main`` in the family's worker process):

1. ``tforge inspect --json``: block count, heads, KV heads and head_dim of every block against
   the config;
2. ``tforge compile --passes canonicalize,ln-migrate`` (exact): outputs within 1e-4 of the
   output's max abs against the export, in ONNX Runtime with graph optimizations off;
3. ``tforge compile --passes canonicalize,calibrate,prune-heads{ratio=0.25}`` (random-token
   .npz): the result loads and runs in ORT; pruned, or skipped with the pass's reason;
4. ``tforge compile --preset w8a8`` (same .npz): the result loads and runs in ORT.

Each family runs in its own worker process (``--worker``), so memory stays that of one model;
every step catches its own exceptions so one failure does not stop the sweep. Exports are
cached under .cache/family_sweep/<family>/ (``--force`` re-exports). Prints a table and the first
line of every failure; ``--out`` writes every record as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "family_sweep"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(REPO))  # the zoo's sizes, so a sweep model is a zoo model of another family
from tests.models.zoo import HEADS, HIDDEN, INTERMEDIATE, LAYERS, SEED, VOCAB  # noqa: E402

KV = 2
HEAD_DIM = HIDDEN // HEADS
POSITIONS = 64
EXPORT_SHAPE = (2, 7)  # example inputs of the dynamic exports
CHECK_SHAPE = (2, 9)  # feeds of the dynamic exports' checks (another sequence length)
STATIC_SHAPE = (2, 6)
CALIB_SAMPLES = 8
REL_TOL = 1e-4  # exact passes: max |diff| <= REL_TOL * max |reference|
TEXT_DIMS = {0: "batch", 1: "sequence"}
STATIC = (
    "mistral",
    "gemma3_text",
    "phi",
    "gpt_neox",
    "opt",
    "roberta",
)  # also exported at a fixed shape

# ----------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    """How to build one family's tiny model and what its block map must report."""

    name: str
    config: str  # transformers config class
    model: str  # transformers model class (the bare backbone: last_hidden_state)
    kwargs: dict[str, Any]
    kv_heads: int = HEADS
    decoder: bool = True
    heads: int = HEADS  # query heads (of HIDDEN // heads channels each)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments
    note: str = ""


_TOKENS = {
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}  # defaults point beyond vocab 96
_DEC = {
    "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
    "intermediate_size": INTERMEDIATE, "max_position_embeddings": POSITIONS, **_TOKENS,
}  # fmt: skip
_GQA = {**_DEC, "num_key_value_heads": KV}
_GQA_HD = {**_GQA, "head_dim": HEAD_DIM}
_ENC = {
    "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
    "intermediate_size": INTERMEDIATE, "max_position_embeddings": POSITIONS,
}  # fmt: skip
_ROBERTA = {
    **_ENC,
    "max_position_embeddings": POSITIONS + 2,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}
_NO_POOL = {"add_pooling_layer": False}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("llama", "LlamaConfig", "LlamaModel", _GQA, KV),
        Family("mistral", "MistralConfig", "MistralModel", _GQA, KV),
        Family("qwen2", "Qwen2Config", "Qwen2Model", _GQA, KV),
        Family("qwen3", "Qwen3Config", "Qwen3Model", _GQA_HD, KV),
        Family("phi3", "Phi3Config", "Phi3Model", _GQA, KV),
        Family("phi", "PhiConfig", "PhiModel", _GQA, KV, note="phi-2 layout (parallel attn/MLP, partial rotary)"),
        Family("gemma", "GemmaConfig", "GemmaModel", _GQA_HD, KV),
        Family("gemma2", "Gemma2Config", "Gemma2Model", _GQA_HD, KV),
        Family("gemma3_text", "Gemma3TextConfig", "Gemma3TextModel", _GQA_HD, KV),
        Family("olmo", "OlmoConfig", "OlmoModel", _GQA, KV),
        Family("olmo2", "Olmo2Config", "Olmo2Model", _GQA, KV),
        Family("stablelm", "StableLmConfig", "StableLmModel", _GQA, KV),
        Family("gpt_neox", "GPTNeoXConfig", "GPTNeoXModel", _DEC),
        Family("gptj", "GPTJConfig", "GPTJModel", {
            "vocab_size": VOCAB, "n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_inner": INTERMEDIATE,
            "n_positions": POSITIONS, "rotary_dim": 8, **_TOKENS}),
        Family("falcon_mq", "FalconConfig", "FalconModel", {
            **_DEC, "ffn_hidden_size": INTERMEDIATE, "bias": False, "alibi": False, "parallel_attn": True,
            "multi_query": True, "new_decoder_architecture": False}, 1, note="falcon-7b layout"),
        Family("falcon_gqa", "FalconConfig", "FalconModel", {
            **_DEC, "ffn_hidden_size": INTERMEDIATE, "bias": False, "alibi": False, "parallel_attn": True,
            "new_decoder_architecture": True, "num_kv_heads": KV}, KV, note="falcon-40b new decoder architecture"),
        Family("bloom", "BloomConfig", "BloomModel", {
            "vocab_size": VOCAB, "hidden_size": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, **_TOKENS},
            note="ALiBi, FFN 4*hidden"),
        Family("opt", "OPTConfig", "OPTModel", {
            "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "ffn_dim": INTERMEDIATE, "max_position_embeddings": POSITIONS, "word_embed_proj_dim": HIDDEN, **_TOKENS}),
        Family("codegen", "CodeGenConfig", "CodeGenModel", {
            "vocab_size": VOCAB, "n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_inner": INTERMEDIATE,
            "n_positions": POSITIONS, "n_ctx": POSITIONS, "rotary_dim": 8, **_TOKENS}),
        Family("codegen-groups", "CodeGenConfig", "CodeGenModel", {
            "vocab_size": VOCAB, "n_embd": HIDDEN, "n_layer": LAYERS, "n_head": 2 * HEADS, "n_inner": INTERMEDIATE,
            "n_positions": POSITIONS, "n_ctx": POSITIONS, "rotary_dim": 4, **_TOKENS}, 2 * HEADS, heads=2 * HEADS,
            note="two heads in each of CodeGen's 4 groups, as in real CodeGen models"),
        Family("starcoder2", "Starcoder2Config", "Starcoder2Model", _GQA, KV),
        Family("granite", "GraniteConfig", "GraniteModel", _GQA, KV),
        Family("cohere", "CohereConfig", "CohereModel", _GQA, KV),
        Family("gpt_bigcode", "GPTBigCodeConfig", "GPTBigCodeModel", {
            "vocab_size": VOCAB, "n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_inner": INTERMEDIATE,
            "n_positions": POSITIONS, "multi_query": True, **_TOKENS}, 1, note="multi-query"),
        Family("smollm3", "SmolLM3Config", "SmolLM3Model", _GQA, KV),
        Family("helium", "HeliumConfig", "HeliumModel", _GQA_HD, KV),
        Family("glm", "GlmConfig", "GlmModel", _GQA_HD, KV),
        Family("nemotron", "NemotronConfig", "NemotronModel", _GQA_HD, KV),
        Family("mpt", "MptConfig", "MptModel", {
            "vocab_size": VOCAB, "d_model": HIDDEN, "n_layers": LAYERS, "n_heads": HEADS, "expansion_ratio": 2,
            "max_seq_len": POSITIONS, **_TOKENS}, note="ALiBi"),
        Family("bert", "BertConfig", "BertModel", _ENC, decoder=False, model_kwargs=_NO_POOL),
        Family("roberta", "RobertaConfig", "RobertaModel", _ROBERTA, decoder=False, model_kwargs=_NO_POOL),
        Family("distilbert", "DistilBertConfig", "DistilBertModel", {
            "vocab_size": VOCAB, "dim": HIDDEN, "n_layers": LAYERS, "n_heads": HEADS, "hidden_dim": INTERMEDIATE,
            "max_position_embeddings": POSITIONS}, decoder=False),
        Family("electra", "ElectraConfig", "ElectraModel", {**_ENC, "embedding_size": 32}, decoder=False,
               note="embedding 32 projected to hidden 64"),
        Family("albert", "AlbertConfig", "AlbertModel", {**_ENC, "embedding_size": 32}, decoder=False,
               model_kwargs=_NO_POOL, note="one layer's weights shared by both layers"),
        Family("mpnet", "MPNetConfig", "MPNetModel", {**_ROBERTA}, decoder=False, model_kwargs=_NO_POOL),
        Family("xlm-roberta", "XLMRobertaConfig", "XLMRobertaModel", _ROBERTA, decoder=False, model_kwargs=_NO_POOL),
        Family("deberta-v2", "DebertaV2Config", "DebertaV2Model", {
            **_ENC, "relative_attention": True, "position_buckets": 32, "pos_att_type": ["p2c", "c2p"],
            "norm_rel_ebd": "layer_norm", "share_att_key": True, "max_relative_positions": -1,
            "position_biased_input": False}, decoder=False, note="DeBERTa-v3 layout (disentangled attention)"),
    ]
}  # fmt: skip

# ----------------------------------------------------------------------------- building and exporting


def build_module(family: Family) -> Any:
    """The family's backbone in eval mode, seeded and perturbed, behind ``forward(input_ids, attention_mask)``."""
    import torch
    import transformers

    torch.manual_seed(SEED)
    config = getattr(transformers, family.config)(**family.kwargs)
    backbone = getattr(transformers, family.model)(config, **family.model_kwargs).eval()
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():  # as tests/models/zoo.py: no all-ones gammas or all-zero biases
        for param in backbone.parameters():
            flat = param.reshape(-1)
            if flat.numel() > 1 and bool((flat == flat[0]).all()):
                noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
                param.add_(noise * (0.1 if float(flat[0]) != 0 else 0.02))
    call = {"use_cache": False} if family.decoder else {}

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = backbone

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, **call
            ).last_hidden_state

    return LastHiddenState().eval(), config


def text_feeds(batch: int, seq: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Token ids, and a mask whose last row is right-padded (as tests/models/zoo.py)."""
    ids = rng.integers(3, VOCAB, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    if batch > 1:
        mask[-1, seq - seq // 3 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def export(module: Any, exporter: str, path: Path, static: tuple[int, int] | None) -> Path:
    import torch

    from tforge.frontends.onnx import load_onnx
    from tforge.frontends.torch import from_torch
    from tforge.runtime.save import save_model

    batch, seq = static or EXPORT_SHAPE
    example = text_feeds(batch, seq, np.random.default_rng(SEED))
    args = (torch.from_numpy(example["input_ids"]), torch.from_numpy(example["attention_mask"]))
    names = ["input_ids", "attention_mask"]
    axes = None if static else {"input_ids": TEXT_DIMS, "attention_mask": TEXT_DIMS}
    if exporter == "dynamo":
        model = from_torch(
            module, args, input_names=names, output_names=["last_hidden_state"], dynamic_axes=axes
        )
        return save_model(model, path)
    raw = path.with_suffix(".raw.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(raw), input_names=names, output_names=["last_hidden_state"],
            dynamic_axes=None if static else {**axes, "last_hidden_state": TEXT_DIMS},
            opset_version=18, dynamo=False,
        )  # fmt: skip
    try:
        model = load_onnx(raw)
        model.meta.pop("tforge.source_path", None)
        return save_model(model, path)
    finally:
        for leftover in raw.parent.glob(raw.name + "*"):
            leftover.unlink()


# ----------------------------------------------------------------------------- checks


def first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith(("tforge: error", "tforge: internal error")):
            return ln
    return lines[-1] if lines else "(no message)"


def exception_line(e: BaseException) -> str:
    return first_line(f"{type(e).__name__}: {e}".splitlines()[0])


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``tforge ARGV`` in this process: exit code, stdout, stderr."""
    from tforge import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except BaseException as e:  # noqa: BLE001  (SystemExit or a bug outside main's handlers)
            traceback.print_exc()
            code = 99 if not isinstance(e, SystemExit) else int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def ort_run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    return dict(
        zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted}), strict=True)
    )


def relative_error(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> float:
    """max over outputs of max |diff| / max |reference| (inf when shapes differ or NaN appears)."""
    worst = 0.0
    for name, ref in reference.items():
        got = candidate.get(name)
        if got is None or got.shape != ref.shape:
            return float("inf")
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        if not (np.isfinite(ref64).all() and np.isfinite(got64).all()):
            return float("nan")
        worst = max(worst, float(np.abs(ref64 - got64).max() / max(np.abs(ref64).max(), 1e-30)))
    return worst


def check_inspect(path: Path, truth: dict[str, int]) -> dict[str, Any]:
    code, out, err = run_cli(["inspect", "--json", str(path)])
    if code != 0:
        return {"ok": False, "blocks_ok": False, "heads_ok": False, "error": first_line(err)}
    info = json.loads(out)
    found = []
    for b in info["blocks"]:
        a = b.get("attention")
        found.append((a["num_heads"], a["num_kv_heads"], a["head_dim"]) if a else None)
    want = (truth["heads"], truth["kv_heads"], truth["head_dim"])
    blocks_ok = info["num_blocks"] == truth["layers"]
    heads_ok = blocks_ok and all(f == want for f in found)
    record: dict[str, Any] = {
        "ok": blocks_ok and heads_ok and not info["unrecognized"],
        "blocks_ok": blocks_ok,
        "heads_ok": heads_ok,
        "num_blocks": info["num_blocks"],
        "found": [list(f) if f else None for f in found],
        "unrecognized": info["unrecognized"],
        "other_linears": info["other_linears"],
        "norm_placement": [b.get("norm_placement") for b in info["blocks"]],
        "ffn": [(b["ffn"] or {}).get("intermediate_size") for b in info["blocks"]],
        "nodes": info["nodes"],
    }
    if not blocks_ok:
        record["error"] = f"{info['num_blocks']} blocks found, {truth['layers']} expected" + (
            f"; unrecognized: {info['unrecognized'][0]}" if info["unrecognized"] else ""
        )
    elif not heads_ok:
        record["error"] = f"(heads, kv, head_dim) per block {found}, expected {want}"
    return record


def compile_step(src: Path, dst: Path, pipeline: list[str], feeds: dict[str, np.ndarray],
                 reference: dict[str, np.ndarray]) -> dict[str, Any]:  # fmt: skip
    """``tforge compile`` then the result in ORT against the export's outputs."""
    report_path = dst.with_suffix(".report.json")
    report_path.unlink(missing_ok=True)
    code, _, err = run_cli(
        ["-q", "compile", str(src), *pipeline, "-o", str(dst), "--report", str(report_path)]
    )
    record: dict[str, Any] = {"exit": code}
    if code != 0:
        record.update(ok=False, stage="compile", error=first_line(err))
        return record
    report = json.loads(report_path.read_text())
    record["passes"] = [
        {"spec": p["spec"], "changed": p["changed"], "stats": p["stats"],
         "skipped": [f"{s['at']}: {s['reason']}" for s in p["skipped"]][:4]}
        for p in report["passes"]
    ]  # fmt: skip
    try:
        got = ort_run(dst, feeds)
    except Exception as e:  # noqa: BLE001
        record.update(ok=False, stage="ort", error=exception_line(e))
        return record
    record.update(ok=True, rel_err=relative_error(reference, got))
    return record


def check_variant(family: Family, path: Path, shape: tuple[int, int], npz: Path) -> dict[str, Any]:
    truth = {"layers": LAYERS, "heads": family.heads, "kv_heads": family.kv_heads, "head_dim": HIDDEN // family.heads}
    feeds = text_feeds(*shape, np.random.default_rng(SEED + 2))
    rec: dict[str, Any] = {"path": str(path)}
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("inspect", lambda: check_inspect(path, truth))
    ]
    reference: dict[str, np.ndarray] = {}

    def exact() -> dict[str, Any]:
        r = compile_step(
            path,
            path.with_suffix(".exact.onnx"),
            ["--passes", "canonicalize,ln-migrate"],
            feeds,
            reference,
        )
        if r["ok"] and not (r["rel_err"] <= REL_TOL):
            r.update(
                ok=False,
                stage="numerics",
                error=f"max |diff| = {r['rel_err']:.3g} x max |ref| > {REL_TOL}",
            )
        return r

    def prune(ratio: float = 0.25) -> dict[str, Any]:
        r = compile_step(path, path.with_suffix(f".prune{int(ratio * 100)}.onnx"),
                         ["--passes", f"canonicalize,calibrate,prune-heads{{ratio={ratio}}}", "--calib-npz", str(npz)],
                         feeds, reference)  # fmt: skip
        if "passes" in r:
            p = r["passes"][-1]
            r["pruned"] = int(p["stats"].get("pruned", 0)) + int(
                p["stats"].get("attention removed", 0)
            )
            r["outcome"] = "pruned" if r["pruned"] else "skipped"
            r["skip_reasons"] = p["skipped"]
        if not r["ok"]:
            r["outcome"] = "failed"
        elif (
            ratio == 0.25
            and r["outcome"] == "skipped"
            and all(s.endswith("nothing to remove") for s in r["skip_reasons"])
        ):  # 3 of 4 heads is no valid grouped-query size: the rewrite itself is tried at 0.5
            r["at_0.5"] = prune(0.5)
            r["outcome"] = f"skip/0.5:{r['at_0.5']['outcome']}"
        return r

    def w8a8() -> dict[str, Any]:
        return compile_step(path, path.with_suffix(".w8a8.onnx"),
                            ["--preset", "w8a8", "--calib-npz", str(npz)], feeds, reference)  # fmt: skip

    steps += [("exact", exact), ("prune", prune), ("w8a8", w8a8)]
    try:
        reference.update(ort_run(path, feeds))
    except Exception as e:  # noqa: BLE001
        rec["export_ort_error"] = exception_line(e)
        return rec
    for name, step in steps:
        start = time.perf_counter()
        try:
            rec[name] = step()
        except Exception as e:  # noqa: BLE001
            rec[name] = {
                "ok": False,
                "stage": "tool",
                "error": exception_line(e),
                "outcome": "failed",
            }
        rec[name]["seconds"] = round(time.perf_counter() - start, 1)
    return rec


# ----------------------------------------------------------------------------- worker and driver


def tforge_digest() -> str:
    """A hash of tforge's sources: the records say which state of the code they describe."""
    import hashlib

    digest = hashlib.sha256()
    for source in sorted((REPO / "tforge").rglob("*.py")):
        digest.update(source.relative_to(REPO).as_posix().encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


def worker(name: str, force: bool, result_path: Path, static_all: bool = False) -> None:
    """Export one family every way (fixed shapes too with ``static_all`` or when in ``STATIC``) and
    check every export; write the records to ``result_path``."""
    family = FAMILIES[name]
    folder = CACHE / name
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)  # a crash report (tforge-crash.json) lands beside the exports
    out: dict[str, Any] = {
        "family": name,
        "note": family.note,
        "tforge": tforge_digest(),
        "variants": {},
    }
    try:
        import torch

        torch.set_num_threads(2)
        module, config = build_module(family)
        out["config"] = {"class": family.config, "model_type": getattr(config, "model_type", None)}
    except Exception as e:  # noqa: BLE001
        out["build_error"] = exception_line(e)
        result_path.write_text(json.dumps(out, indent=1))
        return
    variants = [("dynamo", None), ("torchscript", None)]
    if static_all or name in STATIC:
        variants += [("dynamo", STATIC_SHAPE), ("torchscript", STATIC_SHAPE)]
    for exporter, static in variants:
        key = exporter + (f"-static{static[0]}x{static[1]}" if static else "")
        path = folder / f"{key}.onnx"
        rec: dict[str, Any] = {"exporter": exporter, "static": static}
        out["variants"][key] = rec
        shape = static or CHECK_SHAPE
        feeds = text_feeds(*shape, np.random.default_rng(SEED + 2))
        try:
            if force or not path.exists():
                path.unlink(missing_ok=True)
                start = time.perf_counter()
                export(module, exporter, path, static)
                rec["export_seconds"] = round(time.perf_counter() - start, 1)
        except Exception as e:  # noqa: BLE001
            rec["export_error"] = exception_line(e)
            rec["export_traceback"] = traceback.format_exc()[-3000:]
            continue
        try:  # the export against PyTorch on the check feeds (an exporter fault is not tforge's)
            with torch.no_grad():
                expected = module(
                    *(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask"))
                ).numpy()
            rec["export_vs_torch"] = relative_error(
                {"o": expected}, {"o": ort_run(path, feeds)["last_hidden_state"]}
            )
        except Exception as e:  # noqa: BLE001
            rec["export_vs_torch_error"] = exception_line(e)
        calib = [
            text_feeds(*shape, np.random.default_rng(SEED + 10 + i)) for i in range(CALIB_SAMPLES)
        ]
        npz = folder / f"{key}.calib.npz"
        np.savez(
            npz, **{k: np.stack([c[k] for c in calib]) for k in ("input_ids", "attention_mask")}
        )
        rec.update(check_variant(family, path, shape, npz))
        result_path.write_text(json.dumps(out, indent=1, default=str))
    if tforge_digest() != out["tforge"]:
        out["tforge_changed"] = (
            f"tforge's sources changed during this family's checks (from {out['tforge']})"
        )
    result_path.write_text(json.dumps(out, indent=1, default=str))


def _mark(step: dict[str, Any] | None, key: str = "ok") -> str:
    if step is None:
        return "-"
    return "ok" if step.get(key) else "FAIL"


def _err(step: dict[str, Any] | None) -> str:
    value = (step or {}).get("rel_err")
    return "-" if value is None else f"{value:.3f}"


def table(results: list[dict[str, Any]]) -> tuple[str, list[str]]:
    header = f"{'family':<13} {'exporter':<24} {'blocks':<6} {'heads':<6} {'unrec':<5} {'exact':<6} {'prune-heads':<18} {'w8a8':<5} {'w8a8 err':<8}"
    lines, failures = [header, "-" * len(header)], []
    for res in results:
        fam = res["family"]
        if res.get("tforge_changed"):
            failures.append(f"{fam}: {res['tforge_changed']}; rerun it")
        if res.get("worker_error"):
            failures.append(f"{fam} worker: {res['worker_error']}")
        if "build_error" in res or not res["variants"]:
            lines.append(f"{fam:<13} {'(build)':<24} FAIL")
            failures.append(f"{fam} build: {res.get('build_error') or res.get('worker_error')}")
            continue
        for key, rec in res["variants"].items():
            if "export_error" in rec or "export_ort_error" in rec:
                lines.append(f"{fam:<13} {key:<24} export FAIL")
                failures.append(
                    f"{fam}/{key} export: {rec.get('export_error') or rec.get('export_ort_error')}"
                )
                continue
            ins = rec.get("inspect") or {}
            unrec = len(ins.get("unrecognized") or [])
            prune = (rec.get("prune") or {}).get("outcome", "-")
            lines.append(
                f"{fam:<13} {key:<24} {_mark(ins, 'blocks_ok'):<6} {_mark(ins, 'heads_ok'):<6} {unrec:<5} "
                f"{_mark(rec.get('exact')):<6} {prune:<18} {_mark(rec.get('w8a8')):<5} {_err(rec.get('w8a8')):<8}"
            )
            for step in ("inspect", "exact", "prune", "w8a8"):
                s = rec.get(step) or {}
                if s.get("error"):
                    failures.append(f"{fam}/{key} {step}: {s['error']}")
                elif step == "inspect" and s.get("unrecognized"):
                    failures.append(f"{fam}/{key} inspect unrecognized: {s['unrecognized'][0]}")
            p = rec.get("prune") or {}
            if p.get("outcome", "").startswith("skip") and p.get("skip_reasons"):
                failures.append(f"{fam}/{key} prune-heads skipped: {p['skip_reasons'][0]}")
            p50 = p.get("at_0.5") or {}
            if p50.get("error"):
                failures.append(f"{fam}/{key} prune-heads{{ratio=0.5}}: {p50['error']}")
            elif p50.get("outcome") == "skipped" and p50.get("skip_reasons"):
                failures.append(
                    f"{fam}/{key} prune-heads{{ratio=0.5}} skipped: {p50['skip_reasons'][0]}"
                )
            if isinstance(rec.get("export_vs_torch"), float) and not rec["export_vs_torch"] <= 1e-3:
                failures.append(
                    f"{fam}/{key} export differs from torch: rel {rec['export_vs_torch']:.3g}"
                )
    return "\n".join(lines), failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", help=f"comma-separated subset of: {','.join(FAMILIES)}")
    parser.add_argument("--out", type=Path, help="write all records as JSON here")
    parser.add_argument(
        "--force", action="store_true", help="re-export even when a cached export exists"
    )
    parser.add_argument(
        "--static-all", action="store_true", help=f"fixed-shape exports of every family (default: {', '.join(STATIC)})"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.force, args.result, args.static_all)
        return 0
    names = args.families.split(",") if args.families else list(FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {','.join(FAMILIES)}")
    CACHE.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        start = time.perf_counter()
        result_path = CACHE / name / "result.json"
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            name,
            "--result",
            str(result_path),
        ]
        cmd += ["--force"] if args.force else []
        cmd += ["--static-all"] if args.static_all else []
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        (CACHE / name / "worker.log").write_text(proc.stdout + proc.stderr)
        if result_path.exists():
            res = json.loads(result_path.read_text())
            if proc.returncode != 0:
                res["worker_error"] = f"worker exited {proc.returncode}: {first_line(proc.stderr)}"
        else:
            res = {
                "family": name,
                "variants": {},
                "worker_error": f"exit {proc.returncode}: {first_line(proc.stderr)}",
            }
        res["seconds"] = round(time.perf_counter() - start, 1)
        results.append(res)
        print(
            f"[{len(results)}/{len(names)}] {name}: {res['seconds']}s", file=sys.stderr, flush=True
        )
        if args.out:
            args.out.write_text(json.dumps(results, indent=1, default=str))
    text, failures = table(results)
    states = sorted({r.get("tforge", "?") for r in results})
    print(
        f"tforge sources: {', '.join(states)}"
        + (" (changed during the sweep)" if len(states) > 1 else "")
    )
    print(text)
    if failures:
        print("\nfailures, skips and notes (first line each):")
        for f in failures:
            print(f"  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
