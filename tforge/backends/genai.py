"""Run a tforge KV-cache graph with onnxruntime-genai: the folder its ``og.Model`` loads.

onnxruntime-genai runs a decoder from a folder holding the ONNX file, a ``genai_config.json``
that names the graph's token inputs and its past/present tensors (as ``printf`` patterns over the
layer index) with the cache geometry, and the tokenizer files. :func:`write_genai_folder`
writes that folder for any cache graph :func:`tforge.runtime.generate.cache_layout` accepts: the names
and head sizes come from the graph, the rest (query heads, hidden size, context length, special
token ids) from the model's Hugging Face config. The model file is hard-linked into the folder
(copied across file systems), with its external data.

onnxruntime-genai is imported only by the code that runs it (the tests); writing the folder
needs only onnx_ir.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tforge.errors import PassConfigError, UnsupportedModelError

__all__ = ["GENAI_CONFIG", "TOKENIZER_FILES", "genai_config", "write_genai_folder"]

logger = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
#: Files of a Hugging Face tokenizer folder that onnxruntime-genai's tokenizer may read.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)


def genai_config(
    model: Any,
    *,
    filename: str,
    hf_config: Mapping[str, Any],
    max_length: int | None = None,
) -> dict[str, Any]:
    """The ``genai_config.json`` content for the cache graph ``model`` (an ``onnx_ir.Model``,
    an ORT session or a path) stored in the folder as ``filename``.

    ``hf_config`` is the model's Hugging Face ``config.json`` (a dict): ``num_attention_heads``,
    ``hidden_size``, ``max_position_embeddings``, ``eos_token_id`` and optionally
    ``bos_token_id`` / ``pad_token_id`` / ``model_type`` are read from it; the graph's own
    numbers (layers, KV heads, head size, vocabulary) must agree with it.
    """
    from tforge.runtime import generate

    # sizes the graph leaves symbolic (as the builder's kv_cache_dim) come from the config
    fallback = {}
    if hf_config.get("num_attention_heads") and hf_config.get("hidden_size"):
        fallback["head_size"] = int(hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"])
        fallback["num_key_value_heads"] = int(hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"])
    layout = generate.cache_layout(generate.graph_io(model), dims=fallback)
    keys, values = layout.cache[0::2], layout.cache[1::2]
    if len(keys) != len(values) or not keys:
        raise UnsupportedModelError(
            f"genai: {len(layout.cache)} cache inputs; onnxruntime-genai needs a key and a value per layer"
        )
    for c in layout.cache:
        if c.past_axis != 2:
            raise UnsupportedModelError(
                f"genai: cache input {c.past} grows along axis {c.past_axis}; onnxruntime-genai needs "
                "[batch, kv_heads, past, head_dim]"
            )
    geometry = {(c.heads, c.head_dim) for c in layout.cache}
    if len(geometry) != 1:
        raise UnsupportedModelError(f"genai: cache tensors differ in shape {sorted(geometry)}; one size for all layers is needed")
    ((kv_heads, head_dim),) = geometry
    patterns = {
        "past_key_names": _layer_pattern([c.past for c in keys]),
        "past_value_names": _layer_pattern([c.past for c in values]),
        "present_key_names": _layer_pattern([c.present for c in keys]),
        "present_value_names": _layer_pattern([c.present for c in values]),
    }
    need = ("num_attention_heads", "hidden_size", "max_position_embeddings", "eos_token_id")
    missing = [k for k in need if hf_config.get(k) is None]
    if missing:
        raise PassConfigError(f"genai: the Hugging Face config lacks {', '.join(missing)}; pass the model's config.json")
    checks = {"num_hidden_layers": len(keys), "num_key_value_heads": kv_heads, "vocab_size": layout.vocab}
    for key, graph_value in checks.items():
        value = hf_config.get(key)
        if key == "num_key_value_heads" and value is None:
            value = hf_config["num_attention_heads"]  # no GQA: as many KV heads as query heads
        if value is not None and graph_value is not None and int(value) != int(graph_value):
            raise UnsupportedModelError(
                f"genai: the graph has {key} = {graph_value} but the config says {value}; "
                "pass the config of this model (a pruned model keeps its own numbers)"
            )
    inputs: dict[str, str] = {"input_ids": layout.input_ids}
    if layout.attention_mask is not None:
        inputs["attention_mask"] = layout.attention_mask
    if layout.position_ids is not None:
        inputs["position_ids"] = layout.position_ids
    inputs.update(past_key_names=patterns["past_key_names"], past_value_names=patterns["past_value_names"])
    eos = hf_config["eos_token_id"]
    pad = hf_config.get("pad_token_id")
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    context = int(hf_config["max_position_embeddings"])
    return {
        "model": {
            "bos_token_id": hf_config.get("bos_token_id"),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": head_dim,
                "hidden_size": int(hf_config["hidden_size"]),
                "inputs": inputs,
                "outputs": {
                    "logits": layout.logits,
                    "present_key_names": patterns["present_key_names"],
                    "present_value_names": patterns["present_value_names"],
                },
                "num_attention_heads": int(hf_config["num_attention_heads"]),
                "num_hidden_layers": len(keys),
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": str(hf_config.get("model_type") or "llama"),
            "vocab_size": layout.vocab,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,  # greedy, as tforge.runtime.generate
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": int(max_length or context),
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # the graph's present tensors grow by the new tokens: past and present are separate buffers
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_folder(
    model: str | os.PathLike[str],
    folder: str | os.PathLike[str],
    *,
    hf_config: Mapping[str, Any] | str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | None = None,
    max_length: int | None = None,
) -> Path:
    """Make ``folder`` loadable by ``onnxruntime_genai.Model(folder)``: the model file (and its
    external data) hard-linked or copied in, ``genai_config.json``, and the tokenizer files.

    ``hf_config`` is the model's ``config.json`` (a path or a dict). ``tokenizer`` is a folder
    with a Hugging Face tokenizer (its files in :data:`TOKENIZER_FILES` are copied) or a
    ``.gguf`` file (transformers rebuilds the tokenizer and saves it into the folder). Returns
    the path of the written config.
    """
    source = Path(model)
    if not source.is_file():
        raise UnsupportedModelError(f"genai: {source}: no such model file; pass the .onnx of a cache graph")
    config = _read_config(hf_config)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    target = out / source.name
    for name in [source.name, *_external_files(source)]:
        _link_or_copy(source.parent / name, out / name)
    text = json.dumps(genai_config(target, filename=source.name, hf_config=config, max_length=max_length), indent=4)
    path = out / GENAI_CONFIG
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
    if tokenizer is not None:
        _write_tokenizer(Path(tokenizer), out)
    logger.info("genai: wrote %s for %s", path, target)
    return path


def _layer_pattern(names: Sequence[str]) -> str:
    """The ``printf`` pattern with ``%d`` for the layer index that yields ``names`` in order."""
    for match in re.finditer(r"\d+", names[0]):
        if match.group() != "0":
            continue
        pattern = names[0][: match.start()] + "%d" + names[0][match.end():]
        if all(pattern.replace("%d", str(i), 1) == n for i, n in enumerate(names)) and pattern.count("%") == 1:
            return pattern
    raise UnsupportedModelError(
        f"genai: cache names {names[0]!r}, {names[1] if len(names) > 1 else ''!r}... do not hold the "
        "layer index 0, 1, ... in one place; onnxruntime-genai needs names like past_key_values.%d.key"
    )


def _read_config(hf_config: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    path = Path(hf_config)
    if path.is_dir():
        path = path / "config.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise PassConfigError(f"genai: cannot read the Hugging Face config '{path}': {e}") from None


def _external_files(model: Path) -> list[str]:
    """The external data files an ONNX file names (relative to its folder)."""
    import onnx

    proto = onnx.load(os.fspath(model), load_external_data=False)
    found: dict[str, None] = {}
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                found[entry.value] = None
    return list(found)


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists() and dst.samefile(src):
        return
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_tokenizer(tokenizer: Path, out: Path) -> None:
    if tokenizer.suffix == ".gguf":
        if not tokenizer.is_file():
            raise PassConfigError(f"genai: tokenizer file '{tokenizer}' does not exist")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer.parent, gguf_file=tokenizer.name).save_pretrained(out)
        return
    folder = tokenizer if tokenizer.is_dir() else tokenizer.parent
    copied = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        raise PassConfigError(
            f"genai: no tokenizer.json or tokenizer.model in '{folder}'; pass a Hugging Face tokenizer "
            "folder or a .gguf file"
        )
    for name in copied:
        if (folder / name).resolve() != (out / name).resolve():
            shutil.copy2(folder / name, out / name)
