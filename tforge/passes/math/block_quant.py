"""Block-wise integer weights as ONNX Runtime's ``MatMulNBits`` stores them, and their packings.

A linear is ``y = x @ W`` with ``W`` of shape ``[K, N]`` (``K`` inputs, ``N`` outputs). Each output
column ``n`` is cut along ``K`` into blocks of ``block`` rows; block ``b`` of column ``n`` has one
float32 scale ``s[n, b]`` and one integer zero point ``z[n, b]``, and its weights are stored as
unsigned codes ``q`` in ``[0, 2^bits)``:

    W_hat[k, n] = float32(q[n, k] - z[n, k // block]) * s[n, k // block]

(one float32 product: exactly what ORT's CPU kernels compute, so :func:`dequantize` is bit-exact
with them). ``K`` is padded with zero rows to a multiple of ``block``; padded codes are stored but
never read.

Scales and zero points are computed as ORT's own quantizer does (``MlasQuantizeBlockwise``, in
float32 arithmetic), so the same float32 weight gives the same scales bit for bit:

- *asymmetric*: ``lo = min(min(block), 0)``, ``hi = max(max(block), 0)``,
  ``s = (hi - lo) / (2^bits - 1)``, ``z = round(-lo / s)`` (half away from zero) clamped to the
  code range (``z = 0`` when ``s = 0``);
- *symmetric*: ``m`` is the block's value of largest magnitude (the minimum on a tie), and
  ``s = -m / 2^(bits-1)``, with the implicit zero point ``z = 2^(bits-1)`` (what ``MatMulNBits``
  assumes when it gets no ``zero_points``). The sign makes ``m`` land on code 0, i.e. on
  ``-2^(bits-1)``, the side of the signed range that has one more level, so the largest weight is
  exact and the other side keeps ``2^(bits-1) - 1`` steps of the same size.

An optional ``clip`` factor in ``(0, 1]`` (one number, or one per column and block) shrinks
``[lo, hi]`` (or ``m``) before the scale is computed; codes are clamped, so the few weights beyond
the clipped range saturate. :func:`tforge.passes.math.gptq.search_clip` chooses it.

Codes: ORT rounds ``v * float32(1 / s) + z`` half away from zero in float32 (``rounding="ort"``
reproduces that bit for bit). The default, ``rounding="nearest"``, instead takes the integer
nearest to ``v / s + z`` computed in float64: with the stored scale fixed, that is the grid point
nearest to ``v``, while the float32 reciprocal can pick the second nearest when ``v / s`` is close
to a half. The scales are the same in both; only such near-ties differ.

Packings (all bit-exact with what ORT's kernels read; tests run every one in ORT):

- ``com.microsoft.MatMulNBits``: ``B`` uint8 ``[N, n_blocks, block * bits / 8]``, codes packed
  along ``K`` low bits first (4-bit: element ``2i`` in the low nibble of byte ``i``); ``scales``
  float32 ``[N, n_blocks]``; ``zero_points`` uint8 ``[N, ceil(n_blocks * bits / 8)]`` packed the
  same way within each column (padding bits 0), absent when symmetric. This is the layout ORT's
  quantizer writes (2-D scales, as in the operator's schema; older ORT wrote them flat).
- ``com.microsoft.GatherBlockQuantized`` (embedding tables ``[vocab, hidden]`` quantized along
  ``hidden``; quantize the transposed table, ``quantize_rtn(table.T, ...)``, so that ``N = vocab``):
  either uint8 storage (bits 2, 4 or 8, codes packed along the last axis, zero points packed per
  row, implicit zero point ``2^(bits-1)``), or the ONNX 4-bit types: int4 data ``q - 8`` with no
  zero point (the default is 0) when symmetric, uint4 data and uint4 zero points otherwise.
- standard ONNX ``DequantizeLinear`` (opset 21) with ``axis=0`` and ``block_size``: data ``[K, N]``
  int4/uint4 (4 bits) or int8/uint8 (8 bits), signed without zero point when symmetric; scales
  ``[n_blocks, N]``. The 4-bit arrays use ``ml_dtypes`` (a dependency of ``onnx``); ONNX stores them
  two per byte, low nibble first, over the flattened tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import ml_dtypes
import numpy as np

__all__ = [
    "MATMUL_NBITS_BITS",
    "BlockQuantized",
    "DequantizeLinearTensors",
    "GatherBlockQuantizedTensors",
    "MatMulNBitsTensors",
    "Rounding",
    "block_scales",
    "check_config",
    "dequantize",
    "dequantize_linear_bytes",
    "grid_codes",
    "grid_values",
    "matmul_nbits_bytes",
    "output_error",
    "pack_bits",
    "pack_dequantize_linear",
    "pack_gather_block_quantized",
    "pack_matmul_nbits",
    "quantize_rtn",
    "quantize_with_scales",
    "unpack_bits",
    "unpack_matmul_nbits",
]

#: Bit widths ORT 1.31.1's CPU ``MatMulNBits`` kernel runs (each tested against it).
MATMUL_NBITS_BITS = (2, 4, 8)

Rounding = Literal["nearest", "ort"]


def check_config(where: str, bits: int, block: int) -> None:
    """Reject widths and block sizes ``MatMulNBits`` cannot hold (one line naming ``where``)."""
    if bits not in MATMUL_NBITS_BITS:
        raise ValueError(f"{where}: bits must be one of {MATMUL_NBITS_BITS}, got {bits}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"{where}: block must be a power of two >= 16, got {block}")


def _as_weight(where: str, w: np.ndarray) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(f"{where}: expected a weight [K, N], got shape {list(w.shape)}")
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"{where}: expected a float weight, got {w.dtype}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{where}: the weight has non-finite values")
    return w


@dataclasses.dataclass(frozen=True)
class BlockQuantized:
    """A weight ``[K, N]`` quantized per output column in blocks of ``block`` rows along ``K``."""

    codes: np.ndarray  # [N, k_padded] uint8 in [0, 2^bits); rows >= k are padding
    scales: np.ndarray  # [N, n_blocks] float32
    zero_points: np.ndarray | None  # [N, n_blocks] uint8; None: symmetric, implicit 2^(bits-1)
    bits: int
    block: int
    k: int

    def __post_init__(self) -> None:
        check_config("BlockQuantized", self.bits, self.block)
        n_blocks = -(-self.k // self.block)
        if self.codes.dtype != np.uint8 or self.codes.shape[1:] != (n_blocks * self.block,):
            raise ValueError(
                f"BlockQuantized: codes must be uint8 [N, {n_blocks * self.block}], got "
                f"{self.codes.dtype} {list(self.codes.shape)}"
            )
        if self.scales.dtype != np.float32 or self.scales.shape != (self.codes.shape[0], n_blocks):
            raise ValueError(
                f"BlockQuantized: scales must be float32 [{self.codes.shape[0]}, {n_blocks}], got "
                f"{self.scales.dtype} {list(self.scales.shape)}"
            )
        if self.zero_points is not None and (
            self.zero_points.dtype != np.uint8 or self.zero_points.shape != self.scales.shape
        ):
            raise ValueError("BlockQuantized: zero_points must be uint8 of the scales' shape")

    @property
    def n(self) -> int:
        return int(self.codes.shape[0])

    @property
    def n_blocks(self) -> int:
        return int(self.scales.shape[1])

    @property
    def k_padded(self) -> int:
        return self.n_blocks * self.block

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    def zero_point_values(self) -> np.ndarray:
        """Zero points ``[N, n_blocks]`` (uint8), the implicit ``2^(bits-1)`` when symmetric."""
        if self.zero_points is not None:
            return self.zero_points
        return np.full(self.scales.shape, 1 << (self.bits - 1), np.uint8)

    def nbytes(self, scale_bytes: int = 4) -> int:
        """Bytes of the ``MatMulNBits`` inputs (codes, scales, packed zero points)."""
        return matmul_nbits_bytes(self.k, self.n, self.bits, self.block, self.symmetric, scale_bytes)


def matmul_nbits_bytes(
    k: int, n: int, bits: int, block: int, symmetric: bool, scale_bytes: int = 4
) -> int:
    """Bytes a ``[K, N]`` weight takes as ``MatMulNBits`` inputs (``scale_bytes`` 4: float32)."""
    n_blocks = -(-k // block)
    codes = n * n_blocks * (block * bits // 8)
    zero_points = 0 if symmetric else n * -(-(n_blocks * bits) // 8)
    return codes + n * n_blocks * scale_bytes + zero_points


def dequantize_linear_bytes(
    k: int, n: int, bits: int, block: int, symmetric: bool, scale_bytes: int = 4
) -> int:
    """Bytes a ``[K, N]`` weight takes as blocked ``DequantizeLinear`` inputs, as ONNX stores them
    (:func:`pack_dequantize_linear`: 4-bit types two per byte over the flattened tensor)."""
    n_blocks = -(-k // block)
    data = -(-(k * n * bits) // 8)
    zero_points = 0 if symmetric else -(-(n_blocks * n * bits) // 8)
    return data + n_blocks * n * scale_bytes + zero_points


# ----------------------------------------------------------------------------- scales and codes


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's ``roundf``: to nearest, halves away from zero (``np.rint`` rounds halves to even)."""
    t = np.trunc(x)
    return t + np.where(np.abs(x - t) >= 0.5, np.sign(x), 0).astype(x.dtype)


def _padded_blocks(w: np.ndarray, block: int) -> np.ndarray:
    """``w`` [K, N] as ``[N, n_blocks, block]`` (zero rows appended), same dtype."""
    k, n = w.shape
    pad = (-k) % block
    if pad:
        w = np.concatenate([w, np.zeros((pad, n), w.dtype)])
    return np.ascontiguousarray(w.T).reshape(n, -1, block)


def _clip_factors(where: str, clip: np.ndarray | float | None, shape: tuple[int, int]) -> np.ndarray:
    if clip is None:
        return np.ones(shape, np.float32)
    c = np.asarray(clip, np.float64)
    try:
        c = np.broadcast_to(c, shape)
    except ValueError:
        raise ValueError(
            f"{where}: clip must be a number or broadcast to [N, n_blocks] = {list(shape)}, got "
            f"shape {list(c.shape)}"
        ) from None
    if not np.all((c > 0) & (c <= 1)):
        raise ValueError(f"{where}: clip factors must be in (0, 1], got min {c.min()}, max {c.max()}")
    return c.astype(np.float32)


def block_scales(
    w: np.ndarray,
    bits: int = 4,
    block: int = 32,
    symmetric: bool = False,
    clip: np.ndarray | float | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales ``[N, n_blocks]`` float32 and zero points (uint8, or None when symmetric) of ``w``.

    Computed from ``w`` rounded to float32 in float32 arithmetic, as ``MlasQuantizeBlockwise``
    does (see the module docstring); ``clip`` shrinks each block's range first.
    """
    check_config("block_scales", bits, block)
    w32 = _as_weight("block_scales", w).astype(np.float32)
    blocks = _padded_blocks(w32, block)
    c = _clip_factors("block_scales", clip, blocks.shape[:2])
    lo, hi = blocks.min(axis=2), blocks.max(axis=2)
    if symmetric:
        m = np.where(np.abs(hi) > np.abs(lo), hi, lo) * c
        return (-m / np.float32(1 << (bits - 1))).astype(np.float32), None
    lo = np.minimum(lo, np.float32(0)) * c
    hi = np.maximum(hi, np.float32(0)) * c
    top = np.float32((1 << bits) - 1)
    scales = ((hi - lo) / top).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zp_fp = np.where(scales != 0, np.float32(0) - lo / scales, lo).astype(np.float32)
    zero_points = np.clip(_round_half_away(zp_fp), 0, top).astype(np.uint8)
    return scales, zero_points


def grid_codes(
    values: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int
) -> np.ndarray:
    """The codes (uint8) nearest to ``values`` on the grids ``(q - zero_points) * scales``.

    Arguments broadcast. Computed in float64 from the float32 scales, so each code is the grid
    point nearest to its value (a zero scale gives the zero point).
    """
    s = np.asarray(scales, np.float32).astype(np.float64)
    z = np.asarray(zero_points).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s != 0, np.asarray(values, np.float64) / s, 0.0) + z
    return np.clip(np.rint(q), 0, (1 << bits) - 1).astype(np.uint8)


def grid_values(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray) -> np.ndarray:
    """``float32(codes - zero_points) * scales`` in float32: what ORT's kernels dequantize to."""
    diff = np.asarray(codes).astype(np.int32) - np.asarray(zero_points).astype(np.int32)
    return (diff.astype(np.float32) * np.asarray(scales, np.float32)).astype(np.float32)


def _codes_ort(blocks: np.ndarray, scales: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    """MLAS's codes: ``roundf(v * float32(1 / s) + z)`` in float32, clamped."""
    with np.errstate(divide="ignore"):
        recip = np.where(scales != 0, np.float32(1) / scales, np.float32(0)).astype(np.float32)
    v = blocks.astype(np.float32) * recip[..., None] + zp.astype(np.float32)[..., None]
    return np.clip(_round_half_away(v.astype(np.float32)), 0, (1 << bits) - 1).astype(np.uint8)


def quantize_with_scales(
    w: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    bits: int,
    block: int,
    rounding: Rounding = "nearest",
) -> BlockQuantized:
    """Quantize ``w`` [K, N] on given per-block grids (``scales``, ``zero_points`` [N, n_blocks])."""
    check_config("quantize_with_scales", bits, block)
    w = _as_weight("quantize_with_scales", w)
    blocks = _padded_blocks(w, block)
    scales = np.asarray(scales, np.float32)
    if scales.shape != blocks.shape[:2]:
        raise ValueError(
            f"quantize_with_scales: scales must be [N, n_blocks] = {list(blocks.shape[:2])}, got "
            f"{list(scales.shape)}"
        )
    zp = (
        np.full(scales.shape, 1 << (bits - 1), np.uint8)
        if zero_points is None
        else np.asarray(zero_points, np.uint8)
    )
    if rounding == "ort":
        codes = _codes_ort(blocks, scales, zp, bits)
    elif rounding == "nearest":
        codes = grid_codes(blocks, scales[..., None], zp[..., None], bits)
    else:
        raise ValueError(f"quantize_with_scales: rounding must be 'nearest' or 'ort', got {rounding!r}")
    return BlockQuantized(
        codes=codes.reshape(w.shape[1], -1),
        scales=scales,
        zero_points=None if zero_points is None else zp,
        bits=bits,
        block=block,
        k=w.shape[0],
    )


def quantize_rtn(
    w: np.ndarray,
    bits: int = 4,
    block: int = 32,
    symmetric: bool = False,
    clip: np.ndarray | float | None = None,
    rounding: Rounding = "nearest",
) -> BlockQuantized:
    """Round-to-nearest block quantization of ``w`` [K, N] with ORT's scales (module docstring)."""
    scales, zero_points = block_scales(w, bits, block, symmetric, clip)
    return quantize_with_scales(w, scales, zero_points, bits, block, rounding)


def dequantize(q: BlockQuantized) -> np.ndarray:
    """The weight ``[K, N]`` (float32) that ORT's kernels compute from ``q``, bit for bit."""
    n_blocks = q.n_blocks
    codes = q.codes.reshape(q.n, n_blocks, q.block)
    values = grid_values(codes, q.scales[..., None], q.zero_point_values()[..., None])
    return np.ascontiguousarray(values.reshape(q.n, -1)[:, : q.k].T)


def output_error(w: np.ndarray, w_hat: np.ndarray, gram: np.ndarray) -> float:
    """``tr((W - W_hat)^T G (W - W_hat))`` in float64: ``E||x W - x W_hat||^2`` for ``G = E[x x^T]``."""
    d = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    return float(np.einsum("kn,kn->", d, np.asarray(gram, np.float64) @ d))


# ----------------------------------------------------------------------------- bit packing


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``codes`` (values < 2^bits) along the last axis, ``8 // bits`` a byte, low bits first.

    The last axis must be a multiple of ``8 // bits``; the result is uint8 with that axis divided.
    """
    per = 8 // bits
    codes = np.asarray(codes).astype(np.uint8)
    if bits not in (1, 2, 4, 8) or codes.shape[-1] % per:
        raise ValueError(
            f"pack_bits: {bits}-bit codes need a last axis that is a multiple of {per}, got "
            f"shape {list(codes.shape)}"
        )
    if per == 1:
        return codes.copy()
    grouped = codes.reshape(*codes.shape[:-1], -1, per) & np.uint8((1 << bits) - 1)
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(np.uint8)


def unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of :func:`pack_bits`: uint8 codes, last axis ``8 // bits`` times longer."""
    per = 8 // bits
    packed = np.asarray(packed, np.uint8)
    if per == 1:
        return packed.copy()
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    out = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return out.reshape(*packed.shape[:-1], -1).astype(np.uint8)


def _pack_padded(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack along the last axis after padding it with zeros to a multiple of ``8 // bits``."""
    per = 8 // bits
    pad = (-values.shape[-1]) % per
    if pad:
        values = np.concatenate(
            [values, np.zeros((*values.shape[:-1], pad), values.dtype)], axis=-1
        )
    return pack_bits(values, bits)


# ----------------------------------------------------------------------------- MatMulNBits


@dataclasses.dataclass(frozen=True)
class MatMulNBitsTensors:
    """Inputs and attributes of ``com.microsoft.MatMulNBits(A, B, scales[, zero_points])``."""

    B: np.ndarray  # noqa: N815 -- the operator's input name  # [N, n_blocks, block*bits/8] uint8
    scales: np.ndarray  # [N, n_blocks] float32
    zero_points: np.ndarray | None  # [N, ceil(n_blocks*bits/8)] uint8, or None (symmetric)
    K: int  # noqa: N815
    N: int  # noqa: N815
    bits: int
    block_size: int

    def attributes(self, accuracy_level: int = 0) -> dict[str, int]:
        """The node's attributes (``accuracy_level`` 0: A stays float, 4: A quantized to int8)."""
        return {
            "K": self.K,
            "N": self.N,
            "bits": self.bits,
            "block_size": self.block_size,
            "accuracy_level": accuracy_level,
        }


def pack_matmul_nbits(q: BlockQuantized) -> MatMulNBitsTensors:
    """``q`` in ``MatMulNBits``' layout (module docstring); ORT dequantizes it to :func:`dequantize`."""
    b = pack_bits(q.codes.reshape(q.n, q.n_blocks, q.block), q.bits)
    zp = None if q.zero_points is None else _pack_padded(q.zero_points, q.bits)
    return MatMulNBitsTensors(
        B=b, scales=q.scales.copy(), zero_points=zp, K=q.k, N=q.n, bits=q.bits, block_size=q.block
    )


def unpack_matmul_nbits(
    b: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    *,
    k: int,
    n: int,
    bits: int,
    block_size: int,
) -> BlockQuantized:
    """Read ``MatMulNBits`` inputs back (scales may be ``[N, n_blocks]`` or flat)."""
    check_config("unpack_matmul_nbits", bits, block_size)
    n_blocks = -(-k // block_size)
    b = np.asarray(b, np.uint8)
    if b.shape != (n, n_blocks, block_size * bits // 8):
        raise ValueError(
            f"unpack_matmul_nbits: B must be [{n}, {n_blocks}, {block_size * bits // 8}], got "
            f"{list(b.shape)}"
        )
    zp = None
    if zero_points is not None:
        zp = unpack_bits(np.asarray(zero_points, np.uint8).reshape(n, -1), bits)[:, :n_blocks]
    return BlockQuantized(
        codes=unpack_bits(b, bits).reshape(n, -1),
        scales=np.asarray(scales, np.float32).reshape(n, n_blocks),
        zero_points=None if zp is None else np.ascontiguousarray(zp),
        bits=bits,
        block=block_size,
        k=k,
    )


# ----------------------------------------------------------------------------- GatherBlockQuantized


@dataclasses.dataclass(frozen=True)
class GatherBlockQuantizedTensors:
    """Inputs and attributes of ``com.microsoft.GatherBlockQuantized(data, indices, scales[, zp])``.

    ``data`` and ``zero_points`` are uint8 arrays, or ``ml_dtypes`` int4/uint4 arrays of the
    logical shape (``onnx.numpy_helper.from_array`` and ``onnx_ir.Tensor`` pack those).
    """

    data: np.ndarray  # [vocab, hidden * bits / 8] uint8, or [vocab, hidden] int4/uint4
    scales: np.ndarray  # [vocab, n_blocks] float32
    zero_points: np.ndarray | None  # uint8 [vocab, ceil(n_blocks*bits/8)] or uint4 [vocab, n_blocks]
    bits: int
    block_size: int

    def attributes(self) -> dict[str, int]:
        return {"bits": self.bits, "block_size": self.block_size, "gather_axis": 0, "quantize_axis": 1}


def pack_gather_block_quantized(
    q: BlockQuantized, storage: Literal["uint8", "int4"] = "uint8"
) -> GatherBlockQuantizedTensors:
    """An embedding table ``[vocab, hidden]`` quantized as ``q = quantize_rtn(table.T, ...)``.

    ``storage="uint8"``: codes packed along ``hidden`` (which must then be a multiple of
    ``8 // bits``), zero points packed per row, implicit zero point ``2^(bits-1)``.
    ``storage="int4"`` (4 bits only): ONNX int4 data ``q - 8`` without zero points when
    symmetric (ORT's default zero point for int4 is 0), uint4 data and zero points otherwise.
    Gathered rows dequantize, bit for bit, to the rows of ``dequantize(q).T``.
    """
    codes = q.codes[:, : q.k]
    if storage == "uint8":
        per = 8 // q.bits
        if q.k % per:
            raise ValueError(
                f"pack_gather_block_quantized: uint8 storage of {q.bits}-bit codes needs hidden "
                f"a multiple of {per}, got {q.k}; use storage='int4' or 8 bits"
            )
        data = pack_bits(codes, q.bits)
        zp = None if q.zero_points is None else _pack_padded(q.zero_points, q.bits)
    elif storage == "int4":
        if q.bits != 4:
            raise ValueError(f"pack_gather_block_quantized: int4 storage needs bits=4, got {q.bits}")
        if q.zero_points is None:
            data = (codes.astype(np.int8) - 8).astype(ml_dtypes.int4)
            zp = None
        else:
            data = codes.astype(ml_dtypes.uint4)
            zp = q.zero_points.astype(ml_dtypes.uint4)
    else:
        raise ValueError(f"pack_gather_block_quantized: storage must be 'uint8' or 'int4', got {storage!r}")
    return GatherBlockQuantizedTensors(
        data=data, scales=q.scales.copy(), zero_points=zp, bits=q.bits, block_size=q.block
    )


# ----------------------------------------------------------------------------- DequantizeLinear


@dataclasses.dataclass(frozen=True)
class DequantizeLinearTensors:
    """Inputs and attributes of ONNX ``DequantizeLinear`` (opset 21) giving the weight ``[K, N]``."""

    x: np.ndarray  # [K, N] int4/uint4 (ml_dtypes) or int8/uint8
    x_scale: np.ndarray  # [n_blocks, N] float32
    x_zero_point: np.ndarray | None  # [n_blocks, N], x's type; None when symmetric
    block_size: int

    def attributes(self) -> dict[str, Any]:
        return {"axis": 0, "block_size": self.block_size}


def pack_dequantize_linear(q: BlockQuantized) -> DequantizeLinearTensors:
    """``q`` as blocked ``DequantizeLinear`` inputs (4 or 8 bits); its output is ``dequantize(q)``."""
    if q.bits not in (4, 8):
        raise ValueError(f"pack_dequantize_linear: opset 21 has 4- and 8-bit types, got bits={q.bits}")
    codes = np.ascontiguousarray(q.codes[:, : q.k].T)
    signed_type: Any = ml_dtypes.int4 if q.bits == 4 else np.int8
    unsigned_type: Any = ml_dtypes.uint4 if q.bits == 4 else np.uint8
    if q.zero_points is None:
        x = (codes.astype(np.int16) - (1 << (q.bits - 1))).astype(signed_type)
        zp = None
    else:
        x = codes.astype(unsigned_type)
        zp = np.ascontiguousarray(q.zero_points.T).astype(unsigned_type)
    return DequantizeLinearTensors(
        x=x, x_scale=np.ascontiguousarray(q.scales.T), x_zero_point=zp, block_size=q.block
    )
