"""The TVM backend: a tforge model -> static-shape Relax -> one VM executable per shape bucket.

>>> from tforge.backends import tvm as tvm_backend
>>> art = tvm_backend.build(model, dims={"batch": 8}, buckets=[64, 128])   # or shapes={"input_ids": (8, 128), ...}
>>> art.save("minilm.tvm"); art = tvm_backend.load("minilm.tvm")
>>> outputs = art.run({"input_ids": ids, "attention_mask": mask})        # any length <= 128

TVM is imported lazily, only here, so the rest of tforge works without it.

Buckets: Relax imports only static shapes (see ``legalize.py``), so a model with a symbolic
sequence length is built once per bucket length. ``run`` picks the smallest bucket that holds the
feeds, pads the bucket axis with zeros (a zero attention mask, or causal attention, keeps padding
from reaching real positions) and cuts the outputs back. A model whose real positions would see
the padding (bidirectional attention with no mask input) must use exact shapes instead.

Artifact format (a folder): ``manifest.json`` (inputs, outputs, bucket axis, per bucket its
shapes and library, target, TVM/ffi versions, tforge pipeline version, the numerics checked at
build time) and one ``bucket-<len>.so`` per bucket, weights inside (Relax constants).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from tforge.errors import PassConfigError, UnsupportedModelError

from .compile import PIPELINE_VERSION

logger = logging.getLogger(__name__)

__all__ = ["PIPELINE_VERSION", "Bucket", "TvmArtifact", "build", "compare_with_ort", "load"]

FORMAT = "tforge-tvm/1"
FP32_RTOL = 1e-4  # max |tvm - ort| / max |ort|
# Int8: a rounding tie resolved differently flips a code by one step, which later layers amplify.
# On MiniLM with real text, TVM's int8 output vs ORT's has a per-token cosine of min 0.99957,
# while ORT against itself with its optimizer on has min 0.989; on random ids (the build check,
# activations outside the calibrated range) single tokens went down to 0.978 and the mean to
# 0.9983. So quantized models are checked by the mean per-row cosine against ORT's int8 output
# with a bound that catches a wrong kernel (cosines near 0), not int8 noise; the minimum is
# recorded, and the accuracy against float is what tools/bench_tvm.py reports.
INT8_MIN_COSINE = 0.99
_INTEGER_OPS = {
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "MatMulInteger",
    "QuantizeLinear",
    "DynamicQuantizeLinear",
}


@dataclasses.dataclass
class Bucket:
    """One executable: its symbol values (e.g. ``{"batch": 8, "sequence": 128}``) and library."""

    dims: dict[str, int]
    library: str
    vm: Any = dataclasses.field(default=None, repr=False)
    build_seconds: float = 0.0
    stats: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TvmArtifact:
    """Executables for a model, one per bucket; ``run`` takes and returns numpy arrays by name."""

    inputs: list[dict[str, Any]]  # name, dtype, shape (ints and symbol names)
    outputs: list[dict[str, Any]]
    bucket_dim: str | None
    buckets: list[Bucket]
    target: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    folder: Path | None = None

    # ------------------------------------------------------------------ running

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        tvm = _tvm()
        names = [spec["name"] for spec in self.inputs]
        missing = [n for n in names if n not in feeds]
        unknown = [n for n in feeds if n not in names]
        if missing or unknown:
            raise UnsupportedModelError(
                f"tvm run: feeds do not match the inputs: missing {missing}, unknown {unknown}"
            )
        arrays = {s["name"]: np.asarray(feeds[s["name"]], dtype=s["dtype"]) for s in self.inputs}
        symbols = self._symbols(arrays)
        bucket = self._pick(symbols)
        padded = [
            tvm.runtime.tensor(np.ascontiguousarray(self._pad(arrays[s["name"]], s, bucket)))
            for s in self.inputs
        ]
        result = self._vm(bucket)["main"](*padded)
        values = _flatten(result)
        if len(values) != len(self.outputs):
            raise UnsupportedModelError(
                f"tvm run: the executable returned {len(values)} outputs, expected {len(self.outputs)}"
            )
        out = {}
        for spec, value in zip(self.outputs, values, strict=True):
            array = value.numpy()
            out[spec["name"]] = self._cut(array, spec, symbols)
        return out

    def _symbols(self, arrays: Mapping[str, np.ndarray]) -> dict[str, int]:
        symbols: dict[str, int] = {}
        for spec in self.inputs:
            shape = arrays[spec["name"]].shape
            if len(shape) != len(spec["shape"]):
                raise UnsupportedModelError(
                    f"tvm run: input {spec['name']} has rank {len(shape)}, expected {len(spec['shape'])}"
                )
            for want, got in zip(spec["shape"], shape, strict=True):
                if isinstance(want, int):
                    if want != got:
                        raise UnsupportedModelError(
                            f"tvm run: input {spec['name']} has shape {shape}, expected {spec['shape']}"
                        )
                elif symbols.setdefault(want, got) != got:
                    raise UnsupportedModelError(f"tvm run: inputs disagree on the size of '{want}'")
        return symbols

    def _pick(self, symbols: Mapping[str, int]) -> Bucket:
        fits = []
        for bucket in self.buckets:
            ok = all(
                (
                    symbols.get(name, size) <= size
                    if name == self.bucket_dim
                    else symbols.get(name, size) == size
                )
                for name, size in bucket.dims.items()
            )
            if ok:
                fits.append(bucket)
        if not fits:
            have = ", ".join(str(b.dims) for b in self.buckets)
            raise UnsupportedModelError(
                f"tvm run: no bucket holds inputs with {dict(symbols)}; built for {have}"
            )
        return min(fits, key=lambda b: b.dims.get(self.bucket_dim or "", 0))

    def _pad(self, array: np.ndarray, spec: Mapping[str, Any], bucket: Bucket) -> np.ndarray:
        widths = []
        for axis, dim in enumerate(spec["shape"]):
            target = bucket.dims[dim] if isinstance(dim, str) else dim
            widths.append((0, target - array.shape[axis]))
        return np.pad(array, widths) if any(w for _, w in widths) else array

    def _cut(
        self, array: np.ndarray, spec: Mapping[str, Any], symbols: Mapping[str, int]
    ) -> np.ndarray:
        index = tuple(
            slice(0, symbols[d]) if isinstance(d, str) and d in symbols else slice(None)
            for d in spec["shape"]
        )
        return np.ascontiguousarray(array[index]) if index else array

    def _vm(self, bucket: Bucket) -> Any:
        if bucket.vm is None:
            if self.folder is None:
                raise UnsupportedModelError(
                    "tvm run: this artifact has no executable loaded and no folder"
                )
            tvm = _tvm()
            from tvm import relax

            module = tvm.runtime.load_module(str(self.folder / bucket.library))
            bucket.vm = relax.VirtualMachine(module, tvm.cpu())
        return bucket.vm

    def time(self, feeds: Mapping[str, Any], *, runs: int = 20, warmup: int = 3) -> float:
        """Median latency (ms) of ``run`` on ``feeds`` (padding and copies included)."""
        for _ in range(warmup):
            self.run(feeds)
        samples = []
        for _ in range(runs):
            start = time.perf_counter()
            self.run(feeds)
            samples.append((time.perf_counter() - start) * 1e3)
        return float(np.median(samples))

    def assembly(self, index: int = 0) -> str:
        """The x86 assembly of bucket ``index``'s kernels (only for buckets built in this process);
        e.g. ``assembly().count("vpdpbusd")`` shows the int8 kernels run on VNNI."""
        executable = getattr(self.buckets[index], "_executable", None)
        if executable is None:
            raise UnsupportedModelError(
                "tvm: assembly is only available for buckets built in this process"
            )
        return "\n".join(lib.inspect_source("asm") for lib in executable.mod.imports)

    # ------------------------------------------------------------------ saving

    def manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "bucket_dim": self.bucket_dim,
            "buckets": [
                {
                    "dims": b.dims,
                    "library": b.library,
                    "build_seconds": b.build_seconds,
                    "stats": b.stats,
                }
                for b in self.buckets
            ],
            "target": self.target,
            **self.meta,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the artifact folder atomically (staged beside it, renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
        try:
            for bucket in self.buckets:
                if bucket.vm is not None and getattr(bucket, "_executable", None) is not None:
                    bucket._executable.export_library(str(staging / bucket.library))  # type: ignore[attr-defined]
                elif self.folder is not None:
                    shutil.copy2(self.folder / bucket.library, staging / bucket.library)
                else:
                    raise UnsupportedModelError(f"tvm save: bucket {bucket.dims} has no executable")
            (staging / "manifest.json").write_text(json.dumps(self.manifest(), indent=2) + "\n")
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(staging, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staging, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("tvm: saved %s (%d bucket(s))", path, len(self.buckets))
        return path


def load(path: str | os.PathLike) -> TvmArtifact:
    """Open an artifact folder written by ``TvmArtifact.save`` (libraries load on first run)."""
    folder = Path(path)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise UnsupportedModelError(
            f"tvm load: {folder} has no manifest.json; not a tforge TVM artifact"
        )
    data = json.loads(manifest_path.read_text())
    if data.get("format") != FORMAT:
        raise UnsupportedModelError(
            f"tvm load: {folder} has format {data.get('format')!r}, this tforge reads {FORMAT}"
        )
    buckets = [
        Bucket(
            dims=b["dims"],
            library=b["library"],
            build_seconds=b.get("build_seconds", 0.0),
            stats=b.get("stats", {}),
        )
        for b in data["buckets"]
    ]
    known = {"format", "inputs", "outputs", "bucket_dim", "buckets", "target"}
    return TvmArtifact(
        inputs=data["inputs"],
        outputs=data["outputs"],
        bucket_dim=data["bucket_dim"],
        buckets=buckets,
        target=data["target"],
        meta={k: v for k, v in data.items() if k not in known},
        folder=folder,
    )


# ----------------------------------------------------------------------------- building


def build(
    model: ir.Model,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    dims: Mapping[str, int] | None = None,
    buckets: Sequence[int] | None = None,
    bucket_dim: str | None = None,
    tune_trials: int = 0,
    cache_dir: str | os.PathLike | None = None,
    check_numerics: bool = True,
    rtol: float = FP32_RTOL,
    min_cosine: float = INT8_MIN_COSINE,
    progress: Callable[[str], None] | None = None,
) -> TvmArtifact:
    """Build ``model`` for this CPU: for fixed ``shapes``, or per sequence-length ``buckets``.

    ``shapes`` fixes every input (``{"input_ids": (8, 128), ...}``), one executable. ``buckets``
    builds one executable per length of ``bucket_dim`` (default: the symbolic dim at axis 1 of the
    first input); the other symbolic dims come from ``dims`` (a missing one defaults to 1).
    ``tune_trials > 0`` tunes with MetaSchedule into a database under ``cache_dir`` (reused by
    later builds; see ``tuning.py``). ``check_numerics`` compares each bucket with ONNX Runtime
    (optimizations off) at the bucket length and at an odd shorter length, and raises beyond ``rtol``
    (float models) or below a mean per-row cosine of ``min_cosine`` (models with integer operators).
    """
    from . import compile as tc
    from .legalize import legalize

    say = progress or (lambda message: logger.info("%s", message))
    tvm = tc.import_tvm()
    inputs = _input_specs(model)
    outputs = _output_specs(model)
    plans = _plan(inputs, shapes, dims, buckets, bucket_dim)
    chosen_dim = bucket_dim if buckets else None
    if buckets and chosen_dim is None:
        chosen_dim = _default_bucket_dim(inputs)
    target = tc.host_target()
    built: list[Bucket] = []
    for symbols in plans:
        start = time.perf_counter()
        input_shapes = {
            s["name"]: tuple(symbols[d] if isinstance(d, str) else d for d in s["shape"])
            for s in inputs
        }
        described = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in input_shapes.items())
        say(f"tvm: building {described}")
        proto, stats = legalize(model, input_shapes)
        mod = tc.import_onnx(proto)
        db_dir = None
        if tune_trials > 0 or cache_dir is not None:
            from . import tuning

            db_dir = tuning.database_dir(cache_dir, target, proto)
            if tune_trials > 0:
                tuning.tune(mod, target, db_dir, tune_trials, progress=say)
            elif not tuning.has_database(db_dir):
                db_dir = None
        lowered = tc.lower(mod, target, db_dir)
        left = tc.unscheduled(lowered)
        if left:
            logger.warning(
                "tvm: %d kernels left unscheduled (naive loops): %s", len(left), ", ".join(left)
            )
        stats["kernels"] = sum(
            1 for _, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
        )
        stats["kernels unscheduled"] = len(left)
        executable = tc.build_executable(lowered, target)
        from tvm import relax

        vm = relax.VirtualMachine(executable, tvm.cpu())
        label = "x".join(str(symbols[k]) for k in sorted(symbols)) or "static"
        bucket = Bucket(
            dims=dict(symbols),
            library=f"bucket-{label}.so",
            vm=vm,
            build_seconds=round(time.perf_counter() - start, 2),
            stats=stats,
        )
        bucket._executable = executable  # type: ignore[attr-defined]
        built.append(bucket)
        say(f"tvm: built {bucket.library} in {bucket.build_seconds:.1f} s")
    artifact = TvmArtifact(
        inputs=inputs,
        outputs=outputs,
        bucket_dim=chosen_dim,
        buckets=built,
        target=str(target),
        meta={
            "tvm_version": tvm.__version__,
            "tvm_ffi_version": _ffi_version(),
            "pipeline_version": PIPELINE_VERSION,
            "tuned_trials": tune_trials,
        },
    )
    if check_numerics:
        from tforge.runtime import ort as ort_runtime

        quantized = any(node.op_type in _INTEGER_OPS for node in model.graph)
        reference = ort_runtime.create_session(model, optimize=False)  # one session for every check
        artifact.meta["numerics"] = [
            compare_with_ort(
                artifact,
                model,
                feeds,
                rtol=None if quantized else rtol,
                min_cosine=min_cosine if quantized else None,
                session=reference,
            )
            for feeds in _check_feeds(model, artifact)
        ]
    return artifact


def compare_with_ort(
    artifact: TvmArtifact,
    model: ir.Model,
    feeds: Mapping[str, np.ndarray],
    *,
    rtol: float | None = FP32_RTOL,
    min_cosine: float | None = None,
    session: Any = None,
) -> dict[str, Any]:
    """Run ``feeds`` through the artifact and ORT (optimizations off); raise beyond ``rtol`` or
    below ``min_cosine`` (the mean cosine between rows along the last axis). ``session``: an ORT
    session of ``model`` with optimizations off, to reuse over several calls (else one is opened)."""
    from tforge.runtime import ort as ort_runtime

    if session is None:
        session = ort_runtime.create_session(model, optimize=False)
    expected = ort_runtime.run(session, feeds)
    got = artifact.run(feeds)
    shape = {k: list(v.shape) for k, v in feeds.items()}
    record: dict[str, Any] = {"shapes": shape, "outputs": {}}
    for name, want in expected.items():
        have = got[name]
        if have.shape != want.shape:
            raise UnsupportedModelError(
                f"tvm numerics: output {name} has shape {have.shape}, ORT {want.shape}"
            )
        err = float(np.max(np.abs(have.astype(np.float64) - want))) if want.size else 0.0
        scale = float(np.max(np.abs(want))) if want.size else 0.0
        rel = err / scale if scale else err
        lowest, mean = _row_cosines(have, want)
        record["outputs"][name] = {
            "max_abs": err,
            "rel": rel,
            "min_cosine": lowest,
            "mean_cosine": mean,
        }
        if min_cosine is not None and not mean >= min_cosine:
            raise UnsupportedModelError(
                f"tvm numerics: output {name} at input shapes {shape}: the mean per-row cosine with ONNX "
                f"Runtime's is {mean:.6f} (< {min_cosine:g}; min {lowest:.6f}, max abs difference {err:.3g})"
            )
        if rtol is not None and not rel <= rtol:
            raise UnsupportedModelError(
                f"tvm numerics: output {name} at input shapes {shape} differs from ONNX Runtime by "
                f"{err:.3g} (relative {rel:.3g} > {rtol:g})"
            )
    logger.info(
        "tvm: numerics vs ORT at %s: %s",
        shape,
        ", ".join(
            f"{k} rel {v['rel']:.2g} cosine min {v['min_cosine']:.6f} mean {v['mean_cosine']:.6f}"
            for k, v in record["outputs"].items()
        ),
    )
    return record


def _row_cosines(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Smallest and mean cosine between the rows (along the last axis) of two arrays."""
    if a.size == 0 or not np.issubdtype(b.dtype, np.floating):
        return 1.0, 1.0
    a64 = a.astype(np.float64).reshape(-1, a.shape[-1] if a.ndim else 1)
    b64 = b.astype(np.float64).reshape(a64.shape)
    num = (a64 * b64).sum(axis=1)
    den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)
    return float(cos.min()), float(cos.mean())


def _check_feeds(model: ir.Model, artifact: TvmArtifact) -> list[dict[str, np.ndarray]]:
    """Per bucket: feeds at its full size and, with a bucket axis, at an odd shorter length."""
    from tforge.compiler import verify

    out = []
    for bucket in artifact.buckets:
        sizes = [dict(bucket.dims)]
        if artifact.bucket_dim is not None:
            full = bucket.dims[artifact.bucket_dim]
            odd = full - 3 if full > 4 else full - 1 if full > 1 else full
            odd -= 1 - odd % 2  # make it odd
            if 0 < odd < full:
                sizes.append({**bucket.dims, artifact.bucket_dim: odd})
        for dims in sizes:
            feeds = verify.make_inputs(model, dims=dims, rng=np.random.default_rng(0))
            for name, array in feeds.items():
                if "mask" in name.lower() and array.ndim == 2 and array.shape[1] > 2:
                    array[0, -2:] = 0  # a padded row, like real batches have
            out.append(feeds)
    return out


def _input_specs(model: ir.Model) -> list[dict[str, Any]]:
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        if value.shape is None or value.dtype is None:
            raise UnsupportedModelError(f"tvm: input '{value.name}' has no known dtype and shape")
        dims = []
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, int):
                dims.append(dim)
            elif dim.value:
                dims.append(dim.value)
            else:
                raise UnsupportedModelError(
                    f"tvm: input '{value.name}' axis {axis} has an unnamed dynamic size; give shapes"
                )
        specs.append(
            {"name": value.name, "dtype": np.dtype(value.dtype.numpy()).name, "shape": dims}
        )
    return specs


def _output_specs(model: ir.Model) -> list[dict[str, Any]]:
    specs = []
    for value in model.graph.outputs:
        dims = [d if isinstance(d, int) else (d.value or None) for d in (value.shape or [])]
        specs.append(
            {
                "name": value.name,
                "dtype": np.dtype(value.dtype.numpy()).name if value.dtype else None,
                "shape": dims,
            }
        )
    return specs


def _default_bucket_dim(inputs: Sequence[Mapping[str, Any]]) -> str:
    for spec in inputs:
        if len(spec["shape"]) > 1 and isinstance(spec["shape"][1], str):
            return spec["shape"][1]
    raise PassConfigError(
        "tvm: buckets given, but no input has a symbolic axis 1; give bucket_dim or shapes"
    )


def _plan(
    inputs: Sequence[Mapping[str, Any]],
    shapes: Mapping[str, Sequence[int]] | None,
    dims: Mapping[str, int] | None,
    buckets: Sequence[int] | None,
    bucket_dim: str | None,
) -> list[dict[str, int]]:
    """The symbol values of each executable to build."""
    symbols = [d for s in inputs for d in s["shape"] if isinstance(d, str)]
    if shapes and buckets:
        raise PassConfigError("tvm: give either shapes or buckets, not both")
    if shapes:
        values: dict[str, int] = {}
        for spec in inputs:
            if spec["name"] not in shapes:
                continue
            given = list(shapes[spec["name"]])
            if len(given) != len(spec["shape"]):
                raise PassConfigError(
                    f"tvm: input {spec['name']} has rank {len(spec['shape'])}, shape given {given}"
                )
            for want, size in zip(spec["shape"], given, strict=True):
                if isinstance(want, int) and want != size:
                    raise PassConfigError(
                        f"tvm: input {spec['name']} has a fixed dimension {want}, not {size}"
                    )
                if isinstance(want, str) and values.setdefault(want, size) != size:
                    raise PassConfigError(f"tvm: inputs disagree on the size of '{want}'")
        missing = [s for s in dict.fromkeys(symbols) if s not in values]
        if missing:
            raise PassConfigError(
                f"tvm: no size for the dynamic dims {missing}; give the shape of every input"
            )
        return [values]
    if not buckets:
        if symbols:
            raise PassConfigError(
                f"tvm: the model has dynamic dims {list(dict.fromkeys(symbols))}; give shapes or buckets"
            )
        return [{}]
    dim = bucket_dim or _default_bucket_dim(inputs)
    if any(b <= 0 for b in buckets):
        raise PassConfigError(f"tvm: bucket lengths must be positive, got {list(buckets)}")
    base = {s: (dims or {}).get(s, 1) for s in dict.fromkeys(symbols)}
    return [{**base, dim: int(b)} for b in sorted(set(buckets))]


def _flatten(result: Any) -> list[Any]:
    tvm = _tvm()
    if isinstance(result, tvm.runtime.Tensor):
        return [result]
    out: list[Any] = []
    for item in result:
        out.extend(_flatten(item))
    return out


def _ffi_version() -> str:
    try:
        from importlib.metadata import version

        return version("apache-tvm-ffi")
    except Exception:  # not installed as a distribution
        return "unknown"


def _tvm() -> Any:
    from .compile import import_tvm

    return import_tvm()
