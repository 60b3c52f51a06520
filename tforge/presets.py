"""Named pipelines: the passes tforge recommends for a goal, so that a user needs one flag.

``tforge compile model.onnx --preset w8a8 --calib-text FILE --tokenizer PATH -o model.int8.onnx``
runs ``PRESETS["w8a8"]``. Each preset is the best pipeline measured by ``tools/bench.py
--section int8`` on MiniLM and SmolLM2 (see BENCHMARKS.md); change one only with a new
measurement.

- ``w8a8``: int8 weights (per output channel) and int8 activations. ``smoothquant`` (alpha 0.5)
  first moves activation outliers into the weights; ``quantize{activations=auto}`` then quantizes
  each activation per tensor with a calibrated scale where the statistics predict at least
  33 dB of signal-to-quantization noise (the cheapest kernel path), and per token at run time
  elsewhere (the FFN down projections, whose inputs keep outliers smoothing cannot fold through
  GELU/SiLU). Per-tensor activations everywhere (ORT's ``quantize_dynamic``/``quantize_static``) cost
  SmolLM2 18-300% perplexity; per token everywhere costs MiniLM several % of speed.
  ``ort-layernorm`` last keeps ORT on LayerNormalization rather than its slower fused
  SkipLayerNormalization (post-norm models such as BERT; it changes nothing in pre-norm ones).
  A dynamic per-tensor middle tier (``min-sqnr-dynamic=28``) measured 2-5% faster, at +2.7%
  SmolLM2 perplexity against +2.1%: too little margin under the 3% limit to make it the default.
"""

from __future__ import annotations

import difflib

from tforge.errors import PassConfigError

__all__ = ["PRESETS", "preset_pipeline"]

PRESETS: dict[str, str] = {
    "w8a8": "canonicalize,calibrate,smoothquant,quantize{activations=auto},ort-layernorm",
}


def preset_pipeline(name: str) -> str:
    """The pipeline spec of preset ``name``; PassConfigError naming the known presets otherwise."""
    if name in PRESETS:
        return PRESETS[name]
    near = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.5)
    hint = f"did you mean {near[0]!r}? " if near else ""
    raise PassConfigError(f"preset: unknown preset {name!r}; {hint}known presets: {', '.join(sorted(PRESETS))}")
