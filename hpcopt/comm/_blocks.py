"""The block formats' (int8, int4, int2: hpcopt.comm.codec) encoder and decoder as single-pass
compiled loops (numba), imported by codec on first use.

Why compiled: in NumPy a value takes a dozen passes over memory (change, abs, max, divide, round,
clip, cast, pack, decode, scale, reference update), each a whole-vector loop; an overlapped worker
spent ~0.1 s of its core per exchange of 9.2M values on them, the share of utilisation it lost at
1 Gb/s. Here each block of BLOCK values is read twice in cache (its absmax, then its values) and
written once, and the loops release the GIL, so the training's thread runs meanwhile.

The arithmetic is NumPy's, operation for operation in float32 (no fast-math: no reassociation,
no reciprocal in place of the division), so a payload decodes to the same bits on every rank and
the tests compare with plain per-block NumPy references. Compiled once per machine: numba's
cache (cache=True) keeps the machine code beside this file, or in the user's cache directory
where this one is not writable (NUMBA_CACHE_DIR overrides both).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: (v + M) - M is rint(v), half to even, for |v| < 2**22


@njit(cache=True, nogil=True)
def _float_of(bits):
    box = np.empty(1, np.uint32)
    box[0] = bits
    return box.view(np.float32)[0]


@njit(cache=True, nogil=True)
def _pack(q, m, bits, values, at):
    """q[:m] (integers in -levels..levels) into values[at:], 8 // bits per byte, lowest first,
    each as q + levels + 1; a short tail is padded with levels + 1 (q = 0)."""
    if bits == 8:
        for j in range(m):
            values[at + j] = np.uint8(q[j] & 255)
    elif bits == 4:
        for j in range(m // 2):
            values[at + j] = np.uint8((q[2 * j] + 8) | ((q[2 * j + 1] + 8) << 4))
        if m % 2:
            values[at + m // 2] = np.uint8((q[m - 1] + 8) | (8 << 4))
    else:
        for j in range(m // 4):
            values[at + j] = np.uint8((q[4 * j] + 2) | ((q[4 * j + 1] + 2) << 2)
                                      | ((q[4 * j + 2] + 2) << 4) | ((q[4 * j + 3] + 2) << 6))
        if m % 4:
            b = 0
            for k in range(4):
                b |= ((q[m // 4 * 4 + k] if k < m % 4 else 0) + 2) << (2 * k)
            values[at + m // 4] = np.uint8(b)


@njit(cache=True, nogil=True)
def encode(x, sub, err, block, levels, bits, scales, values, decoded, acc, sign):
    """Per block of d = (x - sub) + err (without sub or err where those are empty): scale =
    absmax / levels (NaN if a value is NaN; a finite absmax never gives a scale whose levels-fold
    overflows), q = clip(rint(d / scale), -levels, levels) (an all-zero block: 0; a block with a
    non-finite scale: 0), packed (_pack). What decoding gives, m = q * scale (NaN throughout a
    block with a non-finite scale), goes into `decoded`, sign * m is added to `acc`, and err
    becomes d - m (error feedback), each when not empty; `acc` may be `sub` or x, `decoded` x."""
    n = x.size
    lv = np.float32(levels)
    per_byte = 8 // bits
    buf = np.empty(block, np.float32)
    mag = buf.view(np.uint32)
    q = np.empty(block, np.int32)
    has_sub, has_err, has_dec, has_acc = sub.size > 0, err.size > 0, decoded.size > 0, acc.size > 0
    s = np.float32(sign)
    for blk in range((n + block - 1) // block):
        lo = blk * block
        m = min(n, lo + block) - lo
        if has_sub:
            for j in range(m):
                buf[j] = x[lo + j] - sub[lo + j]
        else:
            for j in range(m):
                buf[j] = x[lo + j]
        if has_err:
            for j in range(m):
                buf[j] += err[lo + j]
        top = np.uint32(0)  # |v|'s bits: ordered as the magnitudes, NaN above Inf
        for j in range(m):
            top = max(top, mag[j] & np.uint32(0x7FFFFFFF))
        amax = _float_of(top)  # (NaN if a value is: max() propagates it in NumPy too)
        scale = np.float32(amax / lv)
        if np.isfinite(amax) and np.isinf(np.float32(scale * lv)):
            scale = np.float32(np.nextafter(scale, np.float32(0)))
        scales[blk] = scale
        if np.isfinite(scale):
            safe = scale if scale > np.float32(0) else np.float32(1)
            for j in range(m):
                v = np.float32(buf[j] / safe)
                r = np.float32(np.float32(v + _MAGIC) - _MAGIC)
                q[j] = np.int32(min(max(r, -lv), lv))
        else:
            q[:m] = 0
        _pack(q, m, bits, values, lo // per_byte)
        if has_dec:
            for j in range(m):
                decoded[lo + j] = np.float32(q[j]) * scale
        if has_acc:
            for j in range(m):
                acc[lo + j] += s * (np.float32(q[j]) * scale)
        if has_err:
            for j in range(m):
                err[lo + j] = buf[j] - np.float32(q[j]) * scale


@njit(cache=True, nogil=True)
def decode(scales, values, n, block, levels, bits, out, acc, sign, acc2, sign2):
    """The values a payload carries, m = q * scale, into `out`, and sign * m added to `acc` and
    sign2 * m to `acc2`, each when not empty (signs are +-1: x + (-1 * m) is x - m, bit for bit)."""
    per_byte = 8 // bits
    q = np.empty(block, np.float32)
    has_out, has_acc, has_acc2 = out.size > 0, acc.size > 0, acc2.size > 0
    s1, s2 = np.float32(sign), np.float32(sign2)
    for blk in range((n + block - 1) // block):
        lo = blk * block
        m = min(n, lo + block) - lo
        at = lo // per_byte
        if bits == 8:
            for j in range(m):
                q[j] = np.float32(np.int8(values[at + j]))
        elif bits == 4:
            for j in range((m + 1) // 2):
                v = np.int32(values[at + j])
                q[2 * j] = np.float32((v & 15) - 8)
                q[2 * j + 1] = np.float32((v >> 4) - 8)  # (block is even: room for a tail's padding)
        else:
            for j in range((m + 3) // 4):
                v = np.int32(values[at + j])
                q[4 * j] = np.float32((v & 3) - 2)
                q[4 * j + 1] = np.float32(((v >> 2) & 3) - 2)
                q[4 * j + 2] = np.float32(((v >> 4) & 3) - 2)
                q[4 * j + 3] = np.float32((v >> 6) - 2)
        scale = scales[blk]
        for j in range(m):
            q[j] = q[j] * scale
        if has_out:
            for j in range(m):
                out[lo + j] = q[j]
        if has_acc:
            for j in range(m):
                acc[lo + j] += s1 * q[j]
        if has_acc2:
            for j in range(m):
                acc2[lo + j] += s2 * q[j]
