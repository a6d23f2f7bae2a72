"""The codecs of compressed exchanges (hpcopt.comm.codec) against independent references."""

import numpy as np
import pytest
import torch

from hpcopt.comm import codec

PIECE = 1 << 18  # (long vectors: more than one cache-sized piece of any implementation)
SIZES = [1, 2, 7, 255, 256, 257, 1000, 4099]


def roundtrip(fmt, x):
    payload = np.empty(codec.payload_size(fmt, x.size), dtype=np.uint8)
    codec.encode(fmt, x, payload)
    return codec.decode(fmt, payload, x.size)


@pytest.mark.parametrize("n", SIZES)
def test_bf16_rounds_as_torch_does(n):
    x = (np.random.default_rng(n).standard_normal(n) * 10.0 ** np.random.default_rng(1).integers(-30, 30, n)).astype(np.float32)
    want = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(roundtrip("bf16", x), want)


@pytest.mark.parametrize("fmt,levels", [("int8", 127), ("int4", 7), ("int2", 1)])
@pytest.mark.parametrize("n", SIZES)
def test_block_formats_match_a_plain_per_block_reference(fmt, levels, n):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    x[: n // 3] *= 1e-3  # blocks of very different magnitude
    want = np.empty(n, np.float32)
    for a in range(0, n, codec.BLOCK):
        block = x[a:a + codec.BLOCK]
        scale = np.float32(np.abs(block).max()) / np.float32(levels)
        want[a:a + codec.BLOCK] = np.clip(np.rint(block / scale), -levels, levels).astype(np.float32) * scale
    got = roundtrip(fmt, x)
    np.testing.assert_array_equal(got, want)
    assert np.abs(got - x).max() <= np.abs(x).max() / levels / 2 * 1.0001


@pytest.mark.parametrize("n", SIZES)
def test_top8_sends_each_blocks_largest_values_in_int8(n):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    x[: n // 3] *= 1e-3
    want = np.zeros(n, np.float32)
    for a in range(0, n, codec.BLOCK):
        block = x[a:a + codec.BLOCK]
        top = np.argsort(-np.abs(block), kind="stable")[:codec.TOPK]  # random data: no ties
        scale = np.float32(np.abs(block[top]).max()) / np.float32(127)
        want[a + top] = np.clip(np.rint(block[top] / scale), -127, 127).astype(np.float32) * scale
    np.testing.assert_array_equal(roundtrip("top8", x), want)
    out = np.full(n, 5.0, np.float32)  # decoding into a buffer overwrites every value
    payload = np.empty(codec.payload_size("top8", n), np.uint8)
    codec.decode("top8", codec.encode("top8", x, payload), n, out)
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4", "int2", "top8"])
def test_sizes_zeros_and_non_finite(fmt):
    assert codec.payload_size(fmt, 1000) < 4 * 1000
    np.testing.assert_array_equal(roundtrip(fmt, np.zeros(300, np.float32)), 0)
    for bad in (np.nan, np.inf, -np.inf):
        x = np.ones(300, np.float32)
        x[3] = bad
        y = roundtrip(fmt, x)
        assert not np.isfinite(y[3]), (fmt, bad)  # never a plausible finite value
        assert np.isfinite(y[290:]).all()  # another block is untouched


def test_ratios_and_unknown_format():
    n = 10 ** 6
    assert [round(4 * n / codec.payload_size(f, n), 2) for f in ("bf16", "int8", "int4", "int2", "top8")] == [
        2.0, 3.94, 7.76, 15.06, 51.19]
    with pytest.raises(ValueError, match="unknown format"):
        codec.payload_size("int3", 10)


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4", "int2", "top8"])
def test_the_decoded_values_encode_gives_are_decodes_bit_for_bit(fmt):
    """encode(..., decoded=) spares the decode pass both sides make after encoding (the
    references must stay bit-identical); across long vectors, with non-finite and
    huge values, and written over x itself."""
    n = 2 * PIECE + 301
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-6, 3, n)).astype(np.float32)
    x[rng.integers(0, n, 5)] = np.nan
    x[rng.integers(0, n, 3)] = np.inf
    x[rng.integers(0, n, 3)] = 3.4e38
    x[PIECE - 10:PIECE + 10] = 0
    payload, again = (np.empty(codec.payload_size(fmt, n), dtype=np.uint8) for _ in range(2))
    decoded = np.empty(n, np.float32)
    with np.errstate(all="ignore"):
        codec.encode(fmt, x, payload, decoded=decoded)
        want = codec.decode(fmt, payload, n)
        codec.encode(fmt, x.copy(), again)
        assert np.array_equal(payload, again)  # asking for decoded changes nothing of the payload
        np.testing.assert_array_equal(decoded.view(np.uint32), want.view(np.uint32))
        codec.encode(fmt, x, again, decoded=x)
        np.testing.assert_array_equal(x.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("fmt,levels", [("int8", 127), ("int4", 7), ("int2", 1)])
def test_block_formats_across_the_codecs_pieces(fmt, levels):
    n = 2 * PIECE + 300  # (more than one cache-sized piece of any implementation)
    x = np.random.default_rng(5).standard_normal(n).astype(np.float32)
    x[PIECE:PIECE + 1000] *= 1e-4
    blocks = np.zeros(-(-n // codec.BLOCK) * codec.BLOCK, np.float32)
    blocks[:n] = x
    blocks = blocks.reshape(-1, codec.BLOCK)
    scale = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(levels)
    want = (np.clip(np.rint(blocks / scale), -levels, levels) * scale).reshape(-1)[:n]
    np.testing.assert_array_equal(roundtrip(fmt, x), want)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2", "bf16", "top8"])
def test_the_fused_forms_give_the_steps_they_stand_for(fmt):
    """encode_change and apply (one pass for the block formats) against the NumPy steps they
    replace, on a sender's reference, a server's move with error feedback and a receiver."""
    n = 3 * codec.BLOCK + 77
    rng = np.random.default_rng(11)
    x, sub = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    err = (rng.standard_normal(n) * 1e-2).astype(np.float32)
    size = codec.payload_size(fmt, n)
    want_payload, payload = np.empty(size, np.uint8), np.empty(size, np.uint8)
    change = (x - sub) + err
    sent = np.empty(n, np.float32)
    codec.encode(fmt, change, want_payload, decoded=sent)
    got_x, got_err = x.copy(), err.copy()
    codec.encode_change(fmt, got_x, sub, payload, err=got_err, minus=got_x)  # the server's form
    np.testing.assert_array_equal(payload, want_payload)
    np.testing.assert_array_equal(got_err, change - sent)
    np.testing.assert_array_equal(got_x, x - sent)
    got_out, got_a, got_b = np.empty(n, np.float32), x.copy(), sub.copy()
    codec.apply(fmt, payload, n, out=got_out, minus=(got_a,), plus=(got_b,))
    np.testing.assert_array_equal(got_out, sent)
    np.testing.assert_array_equal(got_a, x - sent)
    np.testing.assert_array_equal(got_b, sub + sent)


def test_the_fused_forms_refuse_what_does_not_fit():
    n = 300
    payload = np.empty(codec.payload_size("int8", n), np.uint8)
    x = np.ones(n, np.float32)
    with pytest.raises(ValueError, match="one of plus and minus"):
        codec.encode_change("int8", x, x.copy(), payload, plus=x, minus=x)
    with pytest.raises(ValueError, match="float32"):  # the compiled loops would write past its end
        codec.apply("int8", payload, n, out=np.empty(n - 1, np.float32))
    with pytest.raises(ValueError, match="payload"):
        codec.encode("int4", x, payload)
    with pytest.raises(ValueError, match="float32"):
        codec.encode_change("int2", x.astype(np.float64), x, np.empty(codec.payload_size("int2", n), np.uint8))
