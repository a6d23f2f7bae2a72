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

The block formats run as compiled single-pass loops (hpcopt.comm._blocks, numba), with fused
forms for the exchange's sender (encode_change: payload of x - ref, ref += its decoded value) and
receiver (apply: the decoded move subtracted from / added to one or two vectors); bf16 and top8
are NumPy (and torch's topk).
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


def _scale_of(amax: np.ndarray, levels: int) -> np.ndarray:
    # max() propagates NaN, so a NaN in a block makes its scale (and its decoded values) NaN
    scales = (amax / np.float32(levels)).astype(np.float32)
    with np.errstate(over="ignore"):  # near float32's max, levels x scale may round up to Inf:
        over = np.isinf(scales * np.float32(levels)) & np.isfinite(amax)  # a finite block decodes finite
    scales[over] = np.nextafter(scales[over], np.float32(0))
    return scales


_NONE = np.empty(0, np.float32)  # "no such array" for the compiled loops (one signature for all calls)


def _kernels():
    """The compiled loops (numba: imported, and compiled the first time, by compressed runs only)."""
    try:
        from hpcopt.comm import _blocks
    except RuntimeError as e:  # numba finds nowhere writable to keep its cache (a read-only install
        if "cannot cache" not in str(e):  # and home): a private one, compiled in this process
            raise
        import atexit
        import shutil
        import tempfile

        import numba

        numba.config.CACHE_DIR = tempfile.mkdtemp(prefix="hpcopt-numba-")  # (private: never another user's code)
        atexit.register(shutil.rmtree, numba.config.CACHE_DIR, ignore_errors=True)
        from hpcopt.comm import _blocks
    return _blocks


def _check(fmt: str, payload: np.ndarray, n: int, *arrays) -> None:
    """The compiled loops trust their arguments (no bounds checks): what they get must fit."""
    if payload.dtype != np.uint8 or payload.size != payload_size(fmt, n):
        raise ValueError(f"a {fmt} payload of {n} values is {payload_size(fmt, n)} bytes (uint8), not "
                         f"{payload.size} ({payload.dtype})")
    for a in arrays:
        if a is not None and (a.dtype != np.float32 or a.size != n or a.ndim != 1):
            raise ValueError(f"expected {n} float32 values in one dimension, got {a.shape} {a.dtype}")


def warm(fmt: str) -> None:
    """Have what `fmt` needs loaded (the block formats' compiled loops: the first time on a
    machine numba compiles them, ~5 s, else it loads them from its cache, ~1 s), before a run's
    clocks start: a rank stalled in its first exchange would look dead to the others."""
    if fmt in _BITS:
        x = np.linspace(-1, 1, BLOCK + 3, dtype=np.float32)
        ref, payload = np.zeros_like(x), np.empty(payload_size(fmt, x.size), np.uint8)
        encode_change(fmt, x, ref, payload, err=np.zeros_like(x), plus=ref)
        encode_change(fmt, x, ref, payload, minus=x)
        apply(fmt, payload, x.size, out=x, minus=(ref,), plus=(x,))
        encode(fmt, x, payload, decoded=x)


def _int_layout(fmt: str, payload: np.ndarray, n: int):
    nb = -(-n // BLOCK)
    return payload[:4 * nb].view(np.float32), payload[4 * nb:]


def encode(fmt: str, x: np.ndarray, out: np.ndarray, decoded: np.ndarray | None = None) -> np.ndarray:
    """x (float32) -> out (uint8, payload_size(fmt, x.size) bytes). Returns out. With `decoded`
    (float32, x.size; it may be x itself) it also gets what decode(fmt, out) gives, bit for bit,
    without a decode pass."""
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
    _check(fmt, out, x.size, x, decoded)
    scales, values = _int_layout(fmt, out, x.size)
    _kernels().encode(x, _NONE, _NONE, BLOCK, _LEVELS[fmt], _BITS[fmt], scales, values,
                      _NONE if decoded is None else decoded, _NONE, 1.0)
    return out


def encode_change(fmt: str, x: np.ndarray, sub: np.ndarray, out: np.ndarray, *, err: np.ndarray | None = None,
                  plus: np.ndarray | None = None, minus: np.ndarray | None = None) -> np.ndarray:
    """out <- the payload of d = x - sub (+ err, if given); what it decodes to, m, is added to
    `plus` or subtracted from `minus` (either may be sub or x), and err becomes d - m (error
    feedback). A sender's reference moves by what was sent (plus=ref), the server's move is
    sent with what rounding withheld before (err) and applied (minus=x) -- in one pass for the
    block formats, the same bits as the NumPy operations written out."""
    if plus is not None and minus is not None:
        raise ValueError("one of plus and minus")
    if fmt in _BITS:
        _check(fmt, out, x.size, x, sub, err, plus, minus)
        scales, values = _int_layout(fmt, out, x.size)
        acc, sign = (plus, 1.0) if plus is not None else (minus, -1.0)
        _kernels().encode(x, sub, _NONE if err is None else err, BLOCK, _LEVELS[fmt], _BITS[fmt], scales, values,
                          _NONE, _NONE if acc is None else acc, sign)
        return out
    change = x - sub
    if err is not None:
        change += err
    sent = np.empty_like(change)
    encode(fmt, change, out, decoded=sent)
    if err is not None:
        np.subtract(change, sent, out=err)
    if plus is not None:
        plus += sent
    if minus is not None:
        minus -= sent
    return out


def decode(fmt: str, payload: np.ndarray, n: int, out: np.ndarray | None = None) -> np.ndarray:
    """The float32 values a payload carries (into `out` if given)."""
    if out is None:
        out = np.empty(n, dtype=np.float32)
    if fmt == "bf16":
        out.view(np.uint32)[:] = payload.view(np.uint16).astype(np.uint32) << np.uint32(16)
        return out
    if fmt == "top8":
        return _decode_top(payload, n, out)
    apply(fmt, payload, n, out=out)
    return out


def apply(fmt: str, payload: np.ndarray, n: int, *, out: np.ndarray | None = None,
          minus: tuple = (), plus: tuple = ()) -> None:
    """What a payload carries, m: into `out` (if given), subtracted from each array in `minus`
    and added to each in `plus` (at most two in all), in one pass for the block formats; the
    same bits as decode() followed by those NumPy operations."""
    if len(minus) + len(plus) > 2:
        raise ValueError("at most two arrays to update")
    if fmt in _BITS:
        _check(fmt, payload, n, out, *minus, *plus)
        accs = [(a, -1.0) for a in minus] + [(a, 1.0) for a in plus] + [(_NONE, 1.0)] * 2
        scales, values = _int_layout(fmt, payload, n)
        _kernels().decode(scales, values, n, BLOCK, _LEVELS[fmt], _BITS[fmt], _NONE if out is None else out,
                          accs[0][0], accs[0][1], accs[1][0], accs[1][1])
        return
    m = decode(fmt, payload, n, out)
    for a in minus:
        a -= m
    for a in plus:
        a += m


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
