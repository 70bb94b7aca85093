"""pack / unpack of sub-byte codes (precisim.formats.packing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from precisim.formats import decode, encode
from precisim.formats.packing import pack, packed_size, unpack


def _bitstream(codes: list[int], bits: int) -> list[int]:
    """Independent model of the layout: a little-endian bit stream, byte by byte."""
    stream = []
    for c in codes:
        stream += [(c >> k) & 1 for k in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return [sum(stream[8 * j + k] << k for k in range(8)) for j in range(len(stream) // 8)]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 9, 16, 33])
def test_layout_matches_bitstream_model(bits, n):
    rng = np.random.default_rng(bits * 100 + n)
    codes = rng.integers(0, 1 << bits, n).tolist()
    got = pack(torch.tensor(codes, dtype=torch.uint8), bits)
    assert got.dtype == torch.uint8
    assert got.tolist() == _bitstream(codes, bits)
    assert got.shape[-1] == packed_size(n, bits) == (n * bits + 7) // 8
    assert unpack(got, bits, n).tolist() == codes


def test_fp4_low_nibble_first():
    got = pack(torch.tensor([0x1, 0x2, 0x3, 0xF], dtype=torch.uint8), 4)
    assert got.tolist() == [0x21, 0xF3]


def test_fp6_four_in_three_bytes():
    c = [0b000001, 0b000010, 0b000011, 0b111111]
    w = c[0] | c[1] << 6 | c[2] << 12 | c[3] << 18
    got = pack(torch.tensor(c, dtype=torch.uint8), 6)
    assert got.tolist() == [w & 0xFF, (w >> 8) & 0xFF, w >> 16]


def test_8bit_is_identity():
    c = torch.arange(256, dtype=torch.int32).reshape(4, 64)
    p = pack(c, 8)
    assert p.dtype == torch.uint8 and torch.equal(p.to(torch.int32), c)
    assert torch.equal(unpack(p, 8, 64), p)


@pytest.mark.parametrize("bits", [4, 6, 8, 2])
def test_round_trip_nd(bits):
    g = torch.Generator().manual_seed(bits)
    for shape in [(3, 5, 7), (2, 32), (1,), (4, 0)]:
        c = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)
        p = pack(c, bits)
        assert p.shape == (*shape[:-1], packed_size(shape[-1], bits))
        assert torch.equal(unpack(p, bits, shape[-1]), c)


def test_padding_bits_are_zero():
    p = pack(torch.tensor([[0xF, 0xF, 0xF]], dtype=torch.uint8), 4)
    assert p.tolist() == [[0xFF, 0x0F]]
    p6 = pack(torch.tensor([63], dtype=torch.uint8), 6)
    assert p6.tolist() == [63]
    assert unpack(p, 4).tolist() == [[0xF, 0xF, 0xF, 0x0]]  # default count: all whole codes


def test_other_integer_dtypes_accepted():
    for dt in (torch.int8, torch.int16, torch.int32, torch.int64):
        c = torch.tensor([1, 7, 0, 5], dtype=dt)
        assert pack(c, 4).tolist() == [0x71, 0x50]


def test_fp4_codes_from_encode_round_trip():
    x = torch.tensor([[0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5, -6.0, 0.7]])
    codes = encode(x, "e2m1")
    p = pack(codes, 4)
    back = decode(unpack(p, 4, x.shape[-1]), "e2m1")
    assert back.tolist() == [[0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5, -6.0, 0.5]]


def test_fp6_codes_from_encode_round_trip():
    x = torch.linspace(-7.5, 7.5, 61)
    codes = encode(x, "e2m3")
    assert torch.equal(unpack(pack(codes, 6), 6, 61), codes)


def test_matches_torch_float4_e2m1fn_x2_nibble_order():
    """torch's own float4_e2m1fn_x2 reader (ONNX exporter) takes element 0 from the low nibble."""
    mod = pytest.importorskip("torch.onnx._internal.exporter._type_casting")
    codes = torch.tensor([[1, 2, 3, 15, 0, 9]], dtype=torch.uint8)
    p = pack(codes, 4).view(torch.float4_e2m1fn_x2)
    assert p.shape == (1, 3)
    assert mod.unpack_float4x2_as_uint8(p).tolist() == codes.tolist()
    assert mod.get_float4_shape(p) == (1, 6)
    # and unpack accepts the torch dtype directly
    assert torch.equal(unpack(p, 4, 6), codes)


def test_matches_torch_testing_pack_uint4():
    """torch.testing's pack_uint4 (used to build float4_e2m1fn_x2 tensors) agrees."""
    try:
        from torch.testing._internal.common_quantized import pack_uint4
    except ImportError as exc:  # needs the optional package expecttest
        pytest.skip(f"torch.testing._internal.common_quantized unavailable: {exc}")
    codes = torch.randint(0, 16, (4, 10), dtype=torch.uint8)
    assert torch.equal(pack_uint4(codes), pack(codes, 4))


# -- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [0, 9, 3.5, "4", True])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match=r"bits=.* is not supported: accepted 1\.\.8"):
        pack(torch.zeros(4, dtype=torch.uint8), bits)


def test_code_out_of_range():
    with pytest.raises(ValueError, match=r"code 16 at index \(1, 2\) is out of range for 4-bit"):
        pack(torch.tensor([[0, 1, 2], [3, 4, 16]], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match=r"code -1 at index \(0,\) is out of range for 6-bit"):
        pack(torch.tensor([-1, 0], dtype=torch.int8), 6)
    with pytest.raises(ValueError, match=r"code 256 .* for 8-bit packing: accepted 0\.\.255"):
        pack(torch.tensor([256], dtype=torch.int32), 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool])
def test_wrong_code_dtype(dtype):
    with pytest.raises(TypeError, match=r"codes must be an integer tensor.*got dtype"):
        pack(torch.zeros(4, dtype=dtype), 4)


def test_wrong_packed_dtype_and_short_rows():
    with pytest.raises(TypeError, match=r"packed must be a uint8 tensor.*torch.int32"):
        unpack(torch.zeros(4, dtype=torch.int32), 4, 8)
    with pytest.raises(ValueError, match=r"9 codes of 4 bits need 5 bytes per row; the last "
                                         r"dimension has 4"):
        unpack(torch.zeros(4, dtype=torch.uint8), 4, 9)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        pack([1, 2], 4)
    with pytest.raises(ValueError, match=r"count=-1"):
        unpack(torch.zeros(4, dtype=torch.uint8), 4, -1)
    with pytest.raises(ValueError, match="at least one dimension"):
        pack(torch.tensor(3), 4)
