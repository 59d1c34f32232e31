"""torchquant.ops.lut_quantize / lut_dequantize: block-wise lookup-table codes (NF4, FP4, the dynamic map).

Against the plain-PyTorch reference (tests/python/lut_reference.py) bit for
bit, and against bitsandbytes where it installs; opcheck, compile, and the
argument errors.
"""
import pytest
import torch

import torchquant  # noqa: F401
from torchquant import ops
from torchquant.lookup_tables import dynamic_map, fp4_levels, nf4_levels

import lut_reference as ref

TABLES = {"nf4": nf4_levels, "fp4": fp4_levels, "dynamic": dynamic_map}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("table", sorted(TABLES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,block", [((8, 128), 64), ((3, 100), 64), ((1000,), 256), ((5, 7), 3), ((1,), 1)])
def test_matches_reference(table, dtype, shape, block):
    gen = torch.Generator().manual_seed(sum(shape) + block)
    lut = TABLES[table]()
    x = (torch.randn(shape, generator=gen) * 0.3).to(dtype)
    codes, absmax = ops.lut_quantize(x, lut, block)
    want_codes, want_absmax = ref.lut_quantize(x, lut, block)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert torch.equal(absmax, want_absmax)
    assert torch.equal(codes, want_codes)
    deq = ops.lut_dequantize(codes, absmax, lut, block)
    assert torch.equal(deq, ref.lut_dequantize(codes, absmax, lut, block))


def test_midpoints_go_to_the_lower_level_and_zero_blocks_code_zero():
    lut = nf4_levels()
    mids = (lut[:-1] + lut[1:]) / 2
    # One block whose absmax is 1: the values are the midpoints themselves.
    x = torch.cat([mids, torch.tensor([1.0])])
    codes, _ = ops.lut_quantize(x, lut, x.numel())
    assert codes[:-1].tolist() == list(range(15))  # on a midpoint: the lower level
    zero_codes, zero_absmax = ops.lut_quantize(torch.zeros(2, 64), lut, 64)
    assert torch.equal(zero_absmax, torch.zeros(2))
    assert bool((zero_codes == 7).all())  # NF4's exact zero
    assert torch.equal(ops.lut_dequantize(zero_codes, zero_absmax, lut, 64), torch.zeros(2, 64))


def test_empty_input():
    codes, absmax = ops.lut_quantize(torch.zeros(0, 64), nf4_levels(), 64)
    assert codes.shape == (0, 64) and absmax.shape == (0,)


def test_opcheck_and_compile():
    x = torch.randn(4, 128)
    lut = nf4_levels()
    torch.library.opcheck(torch.ops.torchquant.lut_quantize, (x, lut, 64))
    codes, absmax = ops.lut_quantize(x, lut, 64)
    torch.library.opcheck(torch.ops.torchquant.lut_dequantize, (codes, absmax, lut, 64))

    def roundtrip(t):
        c, a = ops.lut_quantize(t, lut, 64)
        return ops.lut_dequantize(c, a, lut, 64)

    compiled = torch.compile(roundtrip, fullgraph=True, dynamic=True)
    for rows in (2, 3, 5):
        t = torch.randn(rows, 128)
        assert torch.equal(compiled(t), roundtrip(t))


@pytest.mark.parametrize("call,error,match", [
    (lambda: ops.lut_quantize(torch.tensor([1.0, float("nan")]), nf4_levels(), 2), ValueError, "finite"),
    (lambda: ops.lut_quantize(torch.tensor([1.0, float("inf")]), nf4_levels(), 2), ValueError, "finite"),
    (lambda: ops.lut_quantize(torch.ones(4), nf4_levels(), 0), ValueError, "block_size"),
    (lambda: ops.lut_quantize(torch.ones(4, dtype=torch.int32), nf4_levels(), 2), TypeError, "x must be"),
    (lambda: ops.lut_quantize(torch.ones(4), nf4_levels().double(), 2), TypeError, "lut must be float32"),
    (lambda: ops.lut_quantize(torch.ones(4), torch.ones(1), 2), ValueError, "lut must have shape"),
    (lambda: ops.lut_quantize(torch.ones(4), torch.ones(300), 2), ValueError, "lut must have shape"),
    (lambda: ops.lut_quantize(torch.ones(4), torch.tensor([0.0, float("nan")]), 2), ValueError, "finite levels"),
    (lambda: ops.lut_quantize(torch.ones(4), nf4_levels().to("meta"), 2), ValueError, "lut must be on"),
    (lambda: ops.lut_dequantize(torch.zeros(4, dtype=torch.uint8), torch.ones(3), nf4_levels(), 2), ValueError,
     "absmax must have shape"),
    (lambda: ops.lut_dequantize(torch.full((4,), 16, dtype=torch.uint8), torch.ones(2), nf4_levels(), 2),
     ValueError, "index the 16 levels"),
    (lambda: ops.lut_dequantize(torch.zeros(4, dtype=torch.int8), torch.ones(2), nf4_levels(), 2), TypeError,
     "codes must be uint8"),
    (lambda: ops.lut_dequantize(torch.zeros(4, dtype=torch.uint8), torch.ones(2, device="meta"), nf4_levels(), 2),
     ValueError, "absmax must be on"),
])
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---- against bitsandbytes ------------------------------------------------------------------

def _bnb():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes does not install on this machine")
    return bnb.functional


def test_tables_equal_bitsandbytes():
    F = _bnb()
    assert torch.equal(nf4_levels(), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(fp4_levels(), F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_map(), F.create_dynamic_map())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_4bit_codes_equal_bitsandbytes(quant_type, dtype):
    F = _bnb()
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(96, 256, generator=gen) * 0.05).to(dtype)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    flat = packed.reshape(-1)
    bnb_codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(w.shape)  # high nibble first
    lut = nf4_levels() if quant_type == "nf4" else fp4_levels()
    codes, absmax = ops.lut_quantize(w, lut, 64)
    assert torch.equal(codes, bnb_codes)
    assert torch.equal(absmax, state.absmax)
    deq = ops.lut_dequantize(codes, absmax, lut, 64)
    # bitsandbytes forms lut[code] * absmax in float32 and rounds once to the weight's dtype.
    assert torch.equal(deq.to(dtype), F.dequantize_4bit(packed, state))


def test_double_quantization_matches_bitsandbytes():
    """Offset, second-level absmax and almost every code equal bitsandbytes'.

    bitsandbytes' CPU library finds the 8-bit code with an approximate binary
    search that, for about 1 value in 1000, returns the level next to the
    nearest one; torchquant (like bitsandbytes' portable torch kernel) takes
    the nearest. Where the two differ, ours must be the nearest level and
    theirs its neighbour.
    """
    F = _bnb()
    from torchquant.quantized_weight import QuantizedScales
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(512, 512, generator=gen) * 0.05
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    _, absmax = ops.lut_quantize(w, nf4_levels(), 64)
    dq = QuantizedScales.quantize(absmax.view(512, 8), 256)
    assert torch.equal(dq.offset, state.offset.reshape(1))
    assert torch.equal(dq.absmax, state.state2.absmax)
    ours, theirs = dq.codes.reshape(-1).long(), state.absmax.long()
    differ = (ours != theirs).nonzero().flatten()
    assert differ.numel() <= 0.005 * ours.numel()
    code = dynamic_map()
    scaled = (absmax - dq.offset) * (1.0 / dq.absmax).repeat_interleave(256)[: absmax.numel()]
    for i in differ.tolist():
        assert abs(int(ours[i]) - int(theirs[i])) == 1
        assert abs(scaled[i] - code[ours[i]]) <= abs(scaled[i] - code[theirs[i]])
    torch.testing.assert_close(dq.dequantize().reshape(-1),
                               F.dequantize_blockwise(state.absmax, state.state2) + state.offset,
                               rtol=0, atol=float(dq.absmax.max()) * 0.02)  # one level of the map
