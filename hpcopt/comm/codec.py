"""Lossy codecs for the changes that compressed exchanges send (comm.compress).

What travels is a change of float32 parameters (hpcopt.comm.client / server): the worker's
parameters minus the reference both sides keep, and the server's move back. Each codec turns a
float32 vector into one fixed-size byte payload and back:

  bf16  16 bits per value (float32 rounded to nearest even, NaN kept NaN): 2x smaller
  int8  8 bits per value, one float32 scale per block of BLOCK values (absmax / 127): ~3.9x
  int4  4 bits per value (two per byte), one float32 scale per block (absmax / 7): ~7.8x
  int2  2 bits per value (four per byte), one float32 scale per block (absmax / 1: -s, 0 or s,
        ternary): ~15x; most values round to 0 and travel later, through the error feedback
  top8  sparse: in each block of BLOCK values only the TOPK largest in magnitude travel, as their
        positions in the block (one byte each) and int8 values with one float32 scale: ~51x;
        the rest waits in the error feedback (SparseLoCo's top-k, arXiv 2508.15706)

Both sides decode with this same code on the same bytes, so their references stay bit-identical
(what the tests check). The rounding error is not lost: it stays in the difference between the
worker's parameters and the reference, and the next exchange sends it (error feedback).
Non-finite input gives non-finite output (a NaN scale), never a plausible finite value.
"""

from __future__ import annotations

import numpy as np

from hpcopt.config import COMPRESS_FORMATS as FORMATS  # (config checks the name without numpy)
BLOCK = 256  # values per scale: a small share of the payload (4 bytes per 128 or 256)
_LEVELS = {"int8": 127, "int4": 7, "int2": 1}
_BITS = {"int8": 8, "int4": 4, "int2": 2}
TOPK = 8  # top8: values sent per block (3% of 256)


def payload_size(fmt: str, n: int) -> int:
    """Bytes of the payload that carries n values."""
    if fmt == "bf16":
        return 2 * n
    blocks = -(-n // BLOCK)
    if fmt in _BITS:
        per_byte = 8 // _BITS[fmt]
        return 4 * blocks + -(-n // per_byte)
    if fmt == "top8":  # per block: scale, positions, values
        return blocks * (4 + 2 * TOPK)
    raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS[1:])})")


def _scales(x: np.ndarray, levels: int) -> np.ndarray:
    """absmax / levels per block (the last block may be short)."""
    n = x.size
    full = n // BLOCK * BLOCK
    amax = np.abs(x[:full]).reshape(-1, BLOCK).max(axis=1) if full else np.empty(0, np.float32)
    if full < n:
        amax = np.append(amax, np.abs(x[full:]).max())
    return _scale_of(amax, levels)


def _scale_of(amax: np.ndarray, levels: int) -> np.ndarray:
    # max() propagates NaN, so a NaN in a block makes its scale (and its decoded values) NaN
    scales = (amax / np.float32(levels)).astype(np.float32)
    with np.errstate(over="ignore"):  # near float32's max, levels x scale may round up to Inf:
        over = np.isinf(scales * np.float32(levels)) & np.isfinite(amax)  # a finite block decodes finite
    scales[over] = np.nextafter(scales[over], np.float32(0))
    return scales


# the integer formats work through a vector SUB values at a time, so the half-dozen passes each
# value takes (scale, divide, round, clip, cast, pack) run in cache rather than in memory
SUB = 1024 * BLOCK  # 1 MiB of float32: a core's L2 here (measured: 20.7 ms to encode 9.2M int4 values vs 36.9 in one piece)


def encode(fmt: str, x: np.ndarray, out: np.ndarray, decoded: np.ndarray | None = None) -> np.ndarray:
    """x (float32) -> out (uint8, payload_size(fmt, x.size) bytes). Returns out. With `decoded`
    (float32, x.size; it may be x itself) it also gets what decode(fmt, out) gives, bit for bit,
    without a decode pass."""
    n = x.size
    if fmt == "bf16":
        u = x.view(np.uint32)
        rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
        rounded[np.isnan(x)] = 0x7FC0  # rounding could carry a NaN's mantissa into the sign
        out.view(np.uint16)[:] = rounded
        if decoded is not None:
            decoded.view(np.uint32)[:] = rounded.astype(np.uint32) << np.uint32(16)
        return out
    if fmt == "top8":
        return _encode_top(x, out, decoded)
    nb = -(-n // BLOCK)
    per_byte = 8 // _BITS[fmt]
    scales, values = out[:4 * nb].view(np.float32), out[4 * nb:]
    for lo in range(0, n, SUB):  # (SUB is a multiple of BLOCK and of per_byte: pieces align)
        hi = min(n, lo + SUB)
        _encode_int(fmt, x[lo:hi], scales[lo // BLOCK:-(-hi // BLOCK)], values[lo // per_byte:-(-hi // per_byte)],
                    None if decoded is None else decoded[lo:hi])
    return out


def _encode_int(fmt: str, x: np.ndarray, scales_out: np.ndarray, values: np.ndarray,
                decoded: np.ndarray | None) -> None:
    n, levels = x.size, _LEVELS[fmt]
    scales = _scales(x, levels)
    scales_out[:] = scales
    safe = np.where(scales > 0, scales, np.float32(1))  # an all-zero block: zeros
    v = np.empty(n, dtype=np.float32)
    full = n // BLOCK * BLOCK
    with np.errstate(invalid="ignore"):  # Inf / Inf in a block whose scale is Inf: zeroed below
        if full:  # per block, the scale broadcast (never a per-value copy of the scales)
            np.divide(x[:full].reshape(-1, BLOCK), safe[:full // BLOCK, None], out=v[:full].reshape(-1, BLOCK))
        if full < n:
            np.divide(x[full:], safe[-1], out=v[full:])
    np.rint(v, out=v)
    np.clip(v, -levels, levels, out=v)
    with np.errstate(invalid="ignore"):  # NaN only in a block whose scale is NaN/Inf: it decodes
        q = v.astype(np.int8)  # non-finite whatever its values (and pairs of values never span blocks)
    if fmt == "int8":
        values.view(np.int8)[:] = q
    else:  # 8 / bits values per byte, lowest bits first, each as q + levels + 1 (int4: 1..15)
        bits = _BITS[fmt]
        per_byte = 8 // bits
        field = q.view(np.uint8) + np.uint8(levels + 1)  # (two's complement wraps -levels.. to 1..)
        if n % per_byte:
            field = np.append(field, np.full(per_byte - n % per_byte, levels + 1, np.uint8))
        group = field.reshape(-1, per_byte)
        np.copyto(values, group[:, 0])
        for i in range(1, per_byte):
            values |= group[:, i] << np.uint8(bits * i)
    if decoded is not None:  # decode's arithmetic on the same integers and scales
        decoded[:] = q
        _scale_blocks(decoded, scales)


def _scale_blocks(out: np.ndarray, scales: np.ndarray) -> None:
    """out (integers as float32) *= the scale of its block, in place."""
    n = out.size
    full = n // BLOCK * BLOCK
    with np.errstate(invalid="ignore"):  # 0 x Inf scale: NaN, as it should be
        if full:
            blocks = out[:full].reshape(-1, BLOCK)
            np.multiply(blocks, scales[:full // BLOCK, None], out=blocks)
        if full < n:
            np.multiply(out[full:], scales[-1], out=out[full:])


def decode(fmt: str, payload: np.ndarray, n: int, out: np.ndarray | None = None) -> np.ndarray:
    """The float32 values a payload carries (into `out` if given)."""
    if out is None:
        out = np.empty(n, dtype=np.float32)
    if fmt == "bf16":
        out.view(np.uint32)[:] = payload.view(np.uint16).astype(np.uint32) << np.uint32(16)
        return out
    if fmt == "top8":
        return _decode_top(payload, n, out)
    nb = -(-n // BLOCK)
    scales, values = payload[:4 * nb].view(np.float32), payload[4 * nb:]
    per_byte = 8 // _BITS[fmt]
    for lo in range(0, n, SUB):
        hi = min(n, lo + SUB)
        _decode_int(fmt, scales[lo // BLOCK:-(-hi // BLOCK)], values[lo // per_byte:-(-hi // per_byte)], out[lo:hi])
    return out


def _decode_int(fmt: str, scales: np.ndarray, values: np.ndarray, out: np.ndarray) -> None:
    n = out.size
    if fmt == "int8":
        out[:] = values.view(np.int8)[:n]
    else:
        bits, levels = _BITS[fmt], _LEVELS[fmt]
        per_byte, mask = 8 // bits, np.uint8((1 << bits) - 1)
        group = np.empty((values.size, per_byte), dtype=np.int8)
        for i in range(per_byte):
            np.bitwise_and(values >> np.uint8(bits * i), mask, out=group[:, i].view(np.uint8))
        group -= np.int8(levels + 1)
        out[:] = group.reshape(-1)[:n]
    _scale_blocks(out, scales)


def _blocks(x: np.ndarray) -> np.ndarray:
    """x as (blocks, BLOCK) rows; a short last block is padded with zeros (a copy only then)."""
    nb = -(-x.size // BLOCK)
    if x.size == nb * BLOCK:
        return x.reshape(nb, BLOCK)
    padded = np.zeros(nb * BLOCK, dtype=np.float32)
    padded[:x.size] = x
    return padded.reshape(nb, BLOCK)


def _top_layout(out: np.ndarray, nb: int):
    """top8's payload as three views: scales (nb), positions (nb, TOPK), int8 values (nb, TOPK)."""
    k = TOPK
    return (out[:4 * nb].view(np.float32), out[4 * nb:(4 + k) * nb].reshape(nb, k),
            out[(4 + k) * nb:(4 + 2 * k) * nb].view(np.int8).reshape(nb, k))


def _encode_top(x: np.ndarray, out: np.ndarray, decoded: np.ndarray | None = None) -> np.ndarray:
    import torch  # topk over rows: torch's is several times faster than numpy's argpartition

    rows = _blocks(x)
    nb = rows.shape[0]
    scales, where, values = _top_layout(out, nb)
    # NaN ranks above every number in torch.topk, so a block with one travels (and decodes NaN)
    idx = torch.from_numpy(rows).abs().topk(min(TOPK, BLOCK), dim=1, sorted=False).indices.numpy()
    picked = np.take_along_axis(rows, idx, axis=1)
    scales[:] = _scale_of(np.abs(picked).max(axis=1), 127)
    safe = np.where(scales > 0, scales, np.float32(1))
    with np.errstate(invalid="ignore"):
        q = np.clip(np.rint(picked / safe[:, None]), -127, 127)
        values[:] = q.astype(np.int8)
    where[:] = idx.astype(np.uint8)
    if decoded is not None:
        _decode_top(out, x.size, decoded)
    return out


def _decode_top(payload: np.ndarray, n: int, out: np.ndarray | None) -> np.ndarray:
    nb = -(-n // BLOCK)
    scales, where, values = _top_layout(payload, nb)
    full = nb * BLOCK == n and out is not None
    rows = out.reshape(nb, BLOCK) if full else np.empty((nb, BLOCK), dtype=np.float32)
    rows[:] = 0
    with np.errstate(invalid="ignore"):  # 0 x Inf scale: NaN, as it should be
        np.put_along_axis(rows, where.astype(np.intp), values.astype(np.float32) * scales[:, None], axis=1)
    if full:
        return out
    if out is None:
        return rows.reshape(-1)[:n].copy()
    out[:] = rows.reshape(-1)[:n]
    return out
