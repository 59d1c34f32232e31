"""QuantizedWeight: the one representation of a quantized weight.

From torchquant's code domain into the run-time layout and back bit for bit
(codes, scales, zero-points, g_idx), act-order regrouping, the lookup-table
kind, sizes, and the errors that name the bad argument. References are the
formula written in plain PyTorch (quantized_cases.py).
"""
import pytest
import torch

from quantized_cases import random_codes, reference_weight
from torchquant import ops
from torchquant.quantized_weight import LAYOUT_BITS, QuantizedWeight, group_order, layout_bits, packed_row_bytes

# (out, in, bits, groups, signed): every width, per channel and grouped, rows that end in a partial chunk.
CASES = {
    "2bit-g32-unsigned": (8, 96, 2, 3, False),
    "3bit-channel-signed": (5, 200, 3, 1, True),
    "3bit-g40": (6, 160, 3, 4, False),
    "4bit-g16-signed": (7, 64, 4, 4, True),
    "5bit-in-8bit-layout": (4, 48, 5, 2, True),
    "6bit-channel": (4, 40, 6, 1, False),
    "7bit-g8": (3, 32, 7, 4, True),
    "8bit-g32-signed": (9, 64, 8, 2, True),
}


def build(c, **kwargs):
    return QuantizedWeight.from_codes(c.codes, c.scales, c.zero_points, c.bits, quant_min=c.quant_min,
                                      g_idx=c.g_idx, lut=c.lut, **kwargs)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
def test_round_trip_is_exact_and_dequantizes_to_the_formula(case, act_order):
    out_f, in_f, bits, groups, signed = CASES[case]
    c = random_codes(out_f, in_f, bits, groups, signed=signed, act_order=act_order and groups > 1, seed=bits)
    w = build(c)
    assert w.packed.dtype == torch.uint8
    assert tuple(w.packed.shape) == (out_f, packed_row_bytes(in_f, bits))
    assert w.layout_bits == layout_bits(bits) and w.layout_bits in LAYOUT_BITS
    assert (w.out_features, w.in_features, w.bits, w.num_groups, w.group_size) == (out_f, in_f, bits, groups,
                                                                                  in_f // groups)
    assert w.code_kind == "int"
    assert torch.equal(w.codes(c.quant_min), c.codes)
    assert torch.equal(w.zero_points(c.quant_min), c.zero_points)
    assert torch.equal(w.scales, c.scales)
    assert torch.equal(w.g_idx(), c.g_idx)
    assert torch.equal(w.unsigned_codes(), (c.codes - c.quant_min).to(torch.uint8))
    assert (w.perm is not None) == (act_order and groups > 1)
    # (u - z) * s of integers and a float32 scale rounds once, however it is formed: bit for bit.
    assert torch.equal(w.dequantize(), reference_weight(c))
    assert torch.equal(w.dequantize(torch.bfloat16), reference_weight(c).to(torch.bfloat16))


def test_act_order_columns_are_stored_in_group_order():
    c = random_codes(4, 64, 4, 4, act_order=True, seed=1)
    w = build(c)
    perm = torch.sort(c.g_idx.long(), stable=True).indices
    assert torch.equal(w.perm, perm) and w.perm.dtype == torch.int64
    # The packed layout holds the permuted columns: each group contiguous, in column order within a group.
    packed_codes = ops.unpack_weight(w.packed, 4, 64)
    assert torch.equal(packed_codes, (c.codes - c.quant_min)[:, perm].to(torch.uint8))
    assert torch.equal(c.g_idx.long()[w.perm], torch.arange(64) // 16)


def test_an_in_order_g_idx_needs_no_permutation():
    c = random_codes(4, 64, 4, 4, seed=2)
    assert build(c).perm is None
    assert group_order(torch.zeros(64, dtype=torch.int64), 64, 1) is None


def test_lookup_table_codes_dequantize_through_the_table():
    c = random_codes(6, 96, 4, 3, lut=True, act_order=True, seed=3)
    w = build(c)
    assert w.code_kind == "lut" and torch.equal(w.lut, c.lut)
    assert torch.equal(w.dequantize(), reference_weight(c))
    assert torch.equal(w.codes(), c.codes)


def test_nbytes_counts_the_packed_codes_and_the_grids():
    c = random_codes(16, 256, 4, 2, act_order=True, seed=4)
    w = build(c)
    assert w.nbytes == 16 * 128 + 2 * 16 * 2 * 4 + 256 * 8  # codes, scales + zeros, perm
    plain = build(random_codes(16, 256, 3, 1, seed=5))
    assert plain.nbytes == 16 * 96 + 2 * 16 * 4  # 3 bits a code: 48 bytes per 128 codes


def test_empty_has_zero_codes_and_moves():
    w = QuantizedWeight.empty(3, 100, 3, 1)
    assert torch.equal(w.codes(), torch.zeros(3, 100, dtype=torch.int32))
    assert torch.equal(w.to("cpu").dequantize(), torch.zeros(3, 100))


# ---- bad input ----------------------------------------------------------------------------------

def _good():
    w = build(random_codes(4, 64, 4, 2, seed=6))
    return dict(packed=w.packed, scales=w.scales, zeros=w.zeros, bits=4, in_features=64)


@pytest.mark.parametrize("changes, error, message", [
    ({"packed": torch.zeros(4, 32, dtype=torch.int8)}, TypeError, "packed must be torch.uint8"),
    ({"packed": torch.zeros(4, 16, dtype=torch.uint8)}, ValueError, r"packed must have shape \[4, 32\]"),
    ({"packed": torch.zeros(128, dtype=torch.uint8)}, ValueError, "packed must be a 2-D uint8"),
    ({"scales": torch.ones(4, 3)}, ValueError, "3 groups per row, which must divide in_features = 64"),
    ({"scales": torch.ones(4, 2, dtype=torch.float16)}, TypeError, "scales must be torch.float32"),
    ({"zeros": torch.zeros(4, 1)}, ValueError, r"zeros must have shape \[4, 2\]"),
    ({"bits": 9}, ValueError, r"bits must be an integer in \[2, 8\]"),
    ({"bits": 1}, ValueError, r"bits must be an integer in \[2, 8\]"),
    ({"bits": True}, ValueError, r"bits must be an integer in \[2, 8\]"),
    ({"in_features": 0}, ValueError, "in_features must be a positive integer"),
    ({"lut": torch.zeros(16), "bits": 8, "packed": torch.zeros(4, 64, dtype=torch.uint8)}, ValueError,
     "lut.*4-bit codes"),
    ({"lut": torch.zeros(8)}, ValueError, r"lut must have shape \[16\]"),
    ({"perm": torch.arange(64, dtype=torch.int32)}, TypeError, "perm must be torch.int64"),
    ({"scales": torch.ones(4, 2, device="meta")}, ValueError, "scales is on meta but packed is on cpu"),
    ({"perm": torch.arange(64, device="meta")}, ValueError, "perm is on meta but packed is on cpu"),
])
def test_constructor_refuses_bad_tensors_naming_them(changes, error, message):
    args = {**_good(), **changes}
    with pytest.raises(error, match=message):
        QuantizedWeight(args.pop("packed"), args.pop("scales"), args.pop("zeros"), args.pop("bits"),
                        args.pop("in_features"), **args)


def _codes_args(**changes):
    c = random_codes(4, 64, 4, 4, seed=7)
    args = dict(codes=c.codes, scales=c.scales, zero_points=c.zero_points, bits=4, quant_min=0, g_idx=c.g_idx)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, error, message", [
    ({"codes": torch.zeros(4, 64)}, TypeError, "codes must be a 2-D integer tensor"),
    ({"codes": torch.full((4, 64), 16, dtype=torch.int32)}, ValueError, r"codes must lie in .* = \[0, 15\]"),
    ({"bits": 16}, ValueError, r"bits must be an integer in \[2, 8\]"),
    ({"scales": torch.ones(4, 3), "zero_points": torch.zeros(4, 3)}, ValueError, "3 groups per row"),
    ({"zero_points": torch.zeros(4, 2)}, ValueError, "zero_points must have the shape of scales"),
    ({"zero_points": torch.full((4, 4), 0.5)}, ValueError, "zero_points must hold integers"),
    ({"zero_points": torch.full((4, 4), 16.0)}, ValueError, r"zero_points must lie in \[0, 15\]"),
    ({"g_idx": torch.full((64,), 4, dtype=torch.int32)}, ValueError, r"g_idx must hold group indices in \[0, 3\]"),
    ({"g_idx": torch.full((64,), -1, dtype=torch.int32)}, ValueError, r"g_idx must hold group indices in \[0, 3\]"),
    ({"g_idx": torch.arange(64) % 3}, ValueError, "exactly in_features / groups = 16 columns in every group"),
    ({"g_idx": torch.zeros(32, dtype=torch.int32)}, ValueError, r"g_idx must have shape \[64\]"),
    ({"g_idx": torch.zeros(64)}, TypeError, "g_idx must be an integer tensor"),
    ({"scales": torch.ones(4, 4, device="meta")}, ValueError, "scales is on meta but codes are on cpu"),
    ({"quant_min": 1.5}, TypeError, "quant_min must be an integer"),
])
def test_from_codes_refuses_bad_input_naming_the_argument(changes, error, message):
    args = _codes_args(**changes)
    with pytest.raises(error, match=message):
        QuantizedWeight.from_codes(args.pop("codes"), args.pop("scales"), args.pop("zero_points"), args.pop("bits"),
                                   **args)


def test_lookup_table_codes_are_unsigned_indices():
    c = random_codes(4, 64, 4, 1, lut=True)
    with pytest.raises(ValueError, match="quant_min 0"):
        QuantizedWeight.from_codes(c.codes - 8, c.scales, c.zero_points, 4, quant_min=-8, lut=c.lut)
