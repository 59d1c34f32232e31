"""torchquant.formats: integer codes on a grid (the fake-quantize op's
arithmetic exactly) and their packed storage."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cases import FLOAT_DTYPES, QUANT_RANGES, make_case
from checks import assert_equal_values
from reference import PER_TENSOR, per_channel, per_group
from torchquant import formats, quant_range
from torchquant.ops import fake_quantize

SETTINGS = settings(max_examples=150, deadline=None)

GRANULARITIES = {
    "tensor": ((5, 12), PER_TENSOR),
    "channel0": ((5, 12), per_channel(0)),
    "channel-1": ((3, 4, 6), per_channel(-1)),
    "group4": ((3, 2, 12), per_group(4)),
    "group12": ((7, 12), per_group(12)),
}


# ---- quantize / dequantize -------------------------------------------------------------

@pytest.mark.parametrize("layout", GRANULARITIES)
@pytest.mark.parametrize("range_name", QUANT_RANGES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_dequantized_codes_are_the_fake_quantized_tensor_bit_for_bit(layout, range_name, dtype):
    shape, granularity = GRANULARITIES[layout]
    qmin, qmax = QUANT_RANGES[range_name]
    # Inputs include exact rounding ties and values clipped at both ends.
    x, scale, zero_point = make_case(shape, granularity, (qmin, qmax), dtype, seed=len(layout) + qmin)
    codes = formats.quantize(x, scale, zero_point, qmin, qmax, **granularity.op_kwargs())
    assert codes.dtype == torch.int32 and codes.shape == x.shape
    assert qmin <= int(codes.min()) and int(codes.max()) <= qmax
    restored = formats.dequantize(codes, scale, zero_point, dtype=dtype, **granularity.op_kwargs())
    assert_equal_values(restored, fake_quantize(x, scale, zero_point, qmin, qmax, **granularity.op_kwargs()))


def test_integer_zero_points_give_the_same_codes_as_float_ones():
    x, scale, zero_point = make_case((4, 8), per_channel(0), (0, 255), torch.float32)
    as_float = formats.quantize(x, scale, zero_point, 0, 255, axis=0)
    as_int = formats.quantize(x, scale, zero_point.to(torch.int32), 0, 255, axis=0)
    assert torch.equal(as_float, as_int)
    assert_equal_values(formats.dequantize(as_int, scale, zero_point.to(torch.int64), axis=0),
                        formats.dequantize(as_float, scale, zero_point, axis=0))


def test_codes_step_by_one_per_scale():
    # Independent of the op: x = (k - zero_point) * scale must give the code k back.
    scale, zero_point = torch.tensor([0.25]), torch.tensor([3.0])
    codes = torch.arange(-8, 8, dtype=torch.int32)
    x = (codes.float() - 3.0) * 0.25
    assert torch.equal(formats.quantize(x, scale, zero_point, -8, 7), codes)


# ---- packing -----------------------------------------------------------------------------

def storage(bits: int, numel: int):
    """(dtype, number of elements) the format promises for ``numel`` codes of ``bits`` bits."""
    if bits <= 2:
        return torch.uint8, -(-numel // 4)
    if bits <= 4:
        return torch.uint8, -(-numel // 2)
    if bits <= 8:
        return torch.uint8, numel
    return (torch.int16 if bits <= 15 else torch.int32), numel


@st.composite
def code_tensors(draw):
    bits = draw(st.integers(2, 16))
    signed = draw(st.booleans())
    qmin, qmax = quant_range(bits, signed=signed)
    shape = draw(st.lists(st.integers(0, 7), min_size=1, max_size=3))
    numel = int(torch.Size(shape).numel())
    values = draw(st.lists(st.integers(qmin, qmax), min_size=numel, max_size=numel))
    return bits, qmin, torch.tensor(values, dtype=torch.int32).reshape(shape)


@SETTINGS
@given(code_tensors())
def test_pack_unpack_round_trip(case):
    bits, qmin, codes = case
    packed = formats.pack_codes(codes, bits, qmin)
    dtype, numel = storage(bits, codes.numel())
    assert packed.dtype == dtype and packed.numel() == numel
    unpacked = formats.unpack_codes(packed, bits, qmin, codes.numel())
    assert unpacked.dtype == torch.int32
    assert torch.equal(unpacked, codes.reshape(-1))


@pytest.mark.parametrize("bits", range(2, 17))
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("numel", [1, 3, 5, 7])
def test_extreme_codes_round_trip_at_odd_lengths(bits, signed, numel):
    qmin, qmax = quant_range(bits, signed=signed)
    codes = torch.tensor([qmin, qmax] * numel, dtype=torch.int32)[:numel]
    assert torch.equal(formats.unpack_codes(formats.pack_codes(codes, bits, qmin), bits, qmin, numel), codes)


def test_sub_byte_codes_are_packed_lowest_bits_first():
    # 2-bit: unsigned codes 0, 1, 2, 3 | 3 -> 0b11_10_01_00, then 0b11 (padded).
    packed = formats.pack_codes(torch.tensor([-2, -1, 0, 1, 1]), 2, -2)
    assert packed.tolist() == [0b11100100, 0b00000011]
    # 4-bit: unsigned codes 1, 15 | 7 -> 0xF1, then 0x07.
    packed = formats.pack_codes(torch.tensor([1, 15, 7]), 4, 0)
    assert packed.tolist() == [0xF1, 0x07]
    # 3-bit codes take a 4-bit slot.
    packed = formats.pack_codes(torch.tensor([-4, 3]), 3, -4)
    assert packed.tolist() == [0x70]
