"""The AWQ GEMM layout (torchquant.ptq.awq_format), AWQLinear, and save_awq / load_awq.

References written here from AutoAWQ's code, independently of the module:
* the packer of ``WQLinear_GEMM.from_linear``: an element loop putting output
  column ``8j + order_map[k]`` in bits ``[4k, 4k + 4)`` of word ``j``, with
  ``order_map = [0, 2, 4, 6, 1, 3, 5, 7]``, and its codes
  ``round((w + zeros * scales) / scales)``;
* ``dequantize_gemm`` of ``awq/utils/packing_utils.py`` (``unpack_awq`` then
  ``reverse_awq_order`` with ``[0, 4, 1, 5, 2, 6, 3, 7]``), in float16.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from quantized_cases import Codes, assert_linear_close
from torchquant.formats import quantize
from torchquant.nn.awq_linear import AWQLinear
from torchquant.ptq.awq_format import load_awq, pack_awq, save_awq, unpack_awq

ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]
REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def to_int32(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


def autoawq_pack(values: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's loop: word j of a row ORs in column 8j + order_map[k] shifted by 4k."""
    rows, cols = values.shape
    out = [[0] * (cols // 8) for _ in range(rows)]
    for r in range(rows):
        for j in range(cols // 8):
            word = 0
            for k in range(8):
                word |= int(values[r, 8 * j + ORDER_MAP[k]]) << (4 * k)
            out[r][j] = to_int32(word)
    return torch.tensor(out, dtype=torch.int32).reshape(rows, cols // 8)


def autoawq_dequantize(qweight, qzeros, scales, group_size):
    """AutoAWQ's dequantize_gemm: [in, out] float16."""
    shifts = torch.arange(0, 32, 4)
    iweights = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).to(torch.int8)
    iweights = iweights.view(iweights.shape[0], -1)
    izeros = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).to(torch.int8)
    izeros = izeros.view(izeros.shape[0], -1)
    order = torch.arange(izeros.shape[-1], dtype=torch.int32).view(-1, 8)[:, REVERSE_ORDER].view(-1)
    iweights = torch.bitwise_and(iweights[:, order], 15)
    izeros = torch.bitwise_and(izeros[:, order], 15)
    scales = scales.repeat_interleave(group_size, dim=0)
    izeros = izeros.repeat_interleave(group_size, dim=0)
    return (iweights - izeros) * scales


def random_codes(rows, cols, seed=0):
    return torch.randint(0, 16, (rows, cols), generator=torch.Generator().manual_seed(seed))


# ---- packing ------------------------------------------------------------------------------

@pytest.mark.parametrize("rows,cols,seed", [(1, 8, 0), (3, 16, 1), (5, 24, 2), (2, 64, 3)])
def test_pack_matches_autoawq_loop(rows, cols, seed):
    values = random_codes(rows, cols, seed)
    packed = pack_awq(values)
    assert packed.dtype == torch.int32 and packed.shape == (rows, cols // 8)
    assert torch.equal(packed, autoawq_pack(values))
    assert torch.equal(unpack_awq(packed), values.to(torch.int32))


def test_pack_known_words():
    # Columns 0..7 holding their own index: nibbles read 0, 2, 4, 6, 1, 3, 5, 7 from the low end.
    assert pack_awq(torch.arange(8).view(1, 8)).item() == 0x75316420
    # Column 7 sits in the top nibble: the word is negative as an int32.
    top = torch.zeros(1, 8, dtype=torch.int64)
    top[0, 7] = 15
    assert pack_awq(top).item() == to_int32(0xF0000000)
    one = torch.zeros(1, 8, dtype=torch.int64)
    one[0, 1] = 1  # column 1 -> nibble 4
    assert pack_awq(one).item() == 1 << 16


def test_unpack_then_pack_any_word():
    words = torch.randint(-(1 << 31), (1 << 31) - 1, (4, 6), dtype=torch.int64,
                          generator=torch.Generator().manual_seed(5)).to(torch.int32)
    codes = unpack_awq(words)
    assert codes.shape == (4, 48) and int(codes.min()) >= 0 and int(codes.max()) <= 15
    assert torch.equal(pack_awq(codes), words)


def test_pack_errors():
    with pytest.raises(ValueError, match="4-bit codes only.*GPTQ layout"):
        pack_awq(random_codes(2, 8), bits=3)
    with pytest.raises(ValueError, match="multiple of 8 columns"):
        pack_awq(random_codes(2, 12))
    with pytest.raises(ValueError, match=r"values must lie in \[0, 15\]"):
        pack_awq(torch.full((1, 8), 16))
    with pytest.raises(ValueError, match=r"values must lie in \[0, 15\]"):
        pack_awq(torch.full((1, 8), -1))
    with pytest.raises(TypeError, match="integer tensor"):
        pack_awq(torch.zeros(1, 8))
    with pytest.raises(ValueError, match="2-D int32"):
        unpack_awq(torch.zeros(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="4-bit codes only"):
        unpack_awq(torch.zeros(1, 1, dtype=torch.int32), bits=8)


# ---- AWQLinear ----------------------------------------------------------------------------

def rtn_grids(weight: torch.Tensor, group_size: int, symmetric: bool):
    """Codes, scales and zero-points of a min/max grid per group (torchquant's conventions)."""
    out, cols = weight.shape
    g = cols if group_size == -1 else group_size
    qmin, qmax = (-8, 7) if symmetric else (0, 15)
    wg = weight.float().reshape(out, cols // g, g)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    if symmetric:
        scale = torch.maximum(-lo, hi) / 7.5
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / 15
        zero = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    scale = scale.half().float()  # the format's precision, so that codes and stored scales agree
    codes = quantize(weight, scale, zero, qmin, qmax, group_size=g)
    return codes, scale, zero, qmin


def awq_layer(linear: nn.Linear, group_size: int, symmetric: bool) -> AWQLinear:
    codes, scale, zero, qmin = rtn_grids(linear.weight.detach(), group_size, symmetric)
    bias = None if linear.bias is None else linear.bias.detach()
    return AWQLinear.from_codes(codes, scale, zero, bias, group_size, qmin, symmetric)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", [16, -1])
def test_awq_linear_round_trip_and_weight(symmetric, group_size):
    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    codes, scale, zero, qmin = rtn_grids(linear.weight.detach(), group_size, symmetric)
    layer = AWQLinear.from_codes(codes, scale, zero, linear.bias.detach(), group_size, qmin, symmetric)
    g = 64 if group_size == -1 else group_size
    assert layer.qweight.shape == (64, 3) and layer.qzeros.shape == (64 // g, 3)
    assert layer.scales.shape == (64 // g, 24) and layer.scales.dtype == torch.float16
    back = layer.unpack()
    assert torch.equal(back.codes, codes) and torch.equal(back.zero_points, zero) and torch.equal(back.scales, scale)
    if symmetric:
        assert bool((unpack_awq(layer.qzeros) == 8).all())

    # float32: exact (code - zero) * scale; float16: AutoAWQ's own dequantization, bit for bit.
    want = ((codes - zero.repeat_interleave(g, 1)) * scale.repeat_interleave(g, 1))
    assert torch.equal(layer.dequantized_weight(), want)
    autoawq = autoawq_dequantize(layer.qweight, layer.qzeros, layer.scales, g)
    assert autoawq.dtype == torch.float16
    assert torch.equal(layer.dequantized_weight(torch.float16), autoawq.t())

    # The kernels sum in their own order: the output is the float64 product up to float32 rounding.
    x = torch.randn(5, 64)
    g_idx = torch.arange(64, dtype=torch.int32) // g
    assert_linear_close(layer(x), x, Codes(codes, scale, zero, g_idx, 4, qmin), linear.bias.detach().half())


def test_awq_linear_state_dict_loads_into_an_empty_layer_and_no_float_weight_is_kept():
    torch.manual_seed(1)
    layer = awq_layer(nn.Linear(32, 16), 16, False)
    x = torch.randn(3, 32)
    fresh = AWQLinear(32, 16, 16)
    assert not torch.equal(fresh(x), layer(x))
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))
    assert not any(t.is_floating_point() and t.numel() >= 32 * 16 for t in fresh.buffers())
    assert fresh(x.half()).dtype == torch.float16


def test_awq_linear_errors():
    codes = torch.zeros(16, 32, dtype=torch.int32)
    scale, zero = torch.ones(16, 2), torch.zeros(16, 2)
    with pytest.raises(ValueError, match="4-bit codes only.*3 bits"):
        AWQLinear(32, 16, 16, bits=3)
    with pytest.raises(ValueError, match="out_features must be a multiple of 8"):
        AWQLinear(32, 12, 16)
    with pytest.raises(ValueError, match="group_size must be a positive divisor of in_features = 32"):
        AWQLinear(32, 16, 24)
    with pytest.raises(ValueError, match=r"codes must lie in .* = \[0, 15\]"):
        AWQLinear.from_codes(codes + 16, scale, zero, None, 16, 0, False)
    with pytest.raises(ValueError, match="scales must have shape"):
        AWQLinear.from_codes(codes, torch.ones(16, 3), zero, None, 16, 0, False)
    with pytest.raises(ValueError, match="scales must be positive"):
        AWQLinear.from_codes(codes, scale * 0, zero, None, 16, 0, False)
    with pytest.raises(ValueError, match="within float16 range"):
        AWQLinear.from_codes(codes, scale * 1e6, zero, None, 16, 0, False)
    with pytest.raises(ValueError, match="zero_points must hold integers"):
        AWQLinear.from_codes(codes, scale, zero + 0.5, None, 16, 0, False)
    with pytest.raises(ValueError, match="zero_points of a symmetric layer must all be 0"):
        AWQLinear.from_codes(codes - 8, scale, zero + 1, None, 16, -8, True)
    with pytest.raises(ValueError, match=r"bias must have shape \[16\]"):
        AWQLinear.from_codes(codes, scale, zero, torch.zeros(8), 16, 0, False)
    with pytest.raises(TypeError, match="codes must be an integer tensor"):
        AWQLinear.from_codes(codes.float(), scale, zero, None, 16, 0, False)
    with pytest.raises(ValueError, match="layer.qweight must be a 2-D torch.int32"):
        AWQLinear.from_packed(torch.zeros(32, 2), torch.zeros(2, 2, dtype=torch.int32),
                              torch.ones(2, 16, dtype=torch.float16), None, 16, name="layer")
    with pytest.raises(ValueError, match="layer.qzeros: a symmetric"):
        AWQLinear.from_packed(torch.zeros(32, 2, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int32),
                              torch.ones(2, 16, dtype=torch.float16), None, 16, symmetric=True, name="layer")
    layer = AWQLinear(32, 16, 16)
    with pytest.raises(ValueError, match=r"inputs \[..., 32\]"):
        layer(torch.randn(2, 16))


# ---- save / load --------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(64, 32), "o_proj": nn.Linear(32, 64, bias=False)})
        self.lm_head = nn.Linear(64, 16)

    def forward(self, x):
        h = self.attn["q_proj"](self.norm(x)).relu()
        return self.lm_head(x + self.attn["o_proj"](h))


QUANTIZED = ("attn.q_proj", "attn.o_proj")


def quantized_block(group_size=16, symmetric=False, seed=0) -> Block:
    torch.manual_seed(seed)
    model = Block()
    for name in QUANTIZED:
        key = name.split(".")[1]
        model.attn[key] = awq_layer(model.attn[key], group_size, symmetric)
    return model


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", [16, -1])
def test_save_load_round_trip(tmp_path, group_size, symmetric):
    model = quantized_block(group_size, symmetric)
    written = save_awq(model, tmp_path)
    assert written == {"quant_method": "awq", "zero_point": not symmetric, "q_group_size": group_size, "w_bit": 4,
                       "version": "gemm", "modules_to_not_convert": ["lm_head"]}
    with open(tmp_path / "quant_config.json") as f:
        assert json.load(f) == written
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["quantization_config"])
        keys = set(f.keys())
    assert meta == {"quant_method": "awq", "zero_point": not symmetric, "group_size": group_size, "bits": 4,
                    "version": "gemm", "modules_to_not_convert": ["lm_head"]}
    assert {"attn.q_proj.qweight", "attn.q_proj.qzeros", "attn.q_proj.scales", "attn.q_proj.bias",
            "attn.o_proj.qweight", "lm_head.weight", "norm.weight"} <= keys
    assert "attn.o_proj.bias" not in keys

    torch.manual_seed(123)  # a fresh float model with other weights
    fresh = Block()
    loaded = load_awq(fresh, tmp_path)
    assert loaded is fresh and not fresh.training
    assert isinstance(fresh.lm_head, nn.Linear) and not isinstance(fresh.lm_head, AWQLinear)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
        assert fresh.state_dict()[key].dtype == value.dtype, key
    for name in QUANTIZED:
        layer = fresh.get_submodule(name)
        assert isinstance(layer, AWQLinear)
        assert (layer.group_size, layer.symmetric) == (group_size, symmetric)
    x = torch.randn(4, 64)
    assert torch.equal(fresh(x), model(x))


def test_load_checkpoint_written_as_autoawq_does(tmp_path):
    """Tensors packed with AutoAWQ's from_linear recipe and its quant_config.json (no quant_method, "GEMM")."""
    torch.manual_seed(2)
    float_model = Block()
    tensors = {k: v.detach().clone() for k, v in float_model.state_dict().items()}
    group = 16
    for name in QUANTIZED:
        linear = float_model.get_submodule(name)
        w = linear.weight.detach().half()
        wg = w.float().reshape(w.shape[0], -1, group)
        lo, hi = wg.amin(-1), wg.amax(-1)
        scales = ((hi - lo).clamp(min=1e-5) / 15).half()  # AutoAWQ's zero-point grid
        zeros = (-torch.round(lo / scales.float())).clamp(0, 15)
        scale_zeros = (zeros * scales.float()).t()  # [n_groups, out]
        scales_t = scales.t().contiguous()
        intweight = torch.stack([torch.round((w[:, i].float() + scale_zeros[i // group]) / scales_t[i // group].float())
                                 for i in range(w.shape[1])], dim=1).to(torch.int32).clamp(0, 15)
        tensors.pop(f"{name}.weight")
        tensors[f"{name}.qweight"] = autoawq_pack(intweight.t())
        tensors[f"{name}.qzeros"] = autoawq_pack(zeros.t().to(torch.int32))
        tensors[f"{name}.scales"] = scales_t
        if linear.bias is not None:
            tensors[f"{name}.bias"] = linear.bias.detach().half()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with open(tmp_path / "quant_config.json", "w") as f:
        json.dump({"zero_point": True, "q_group_size": group, "w_bit": 4, "version": "GEMM",
                   "modules_to_not_convert": None}, f)

    model = load_awq(Block(), tmp_path)
    for name in QUANTIZED:
        layer = model.get_submodule(name)
        assert isinstance(layer, AWQLinear)
        want = autoawq_dequantize(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"],
                                  group)
        assert torch.equal(layer.dequantized_weight(torch.float16), want.t())
    assert torch.equal(model.lm_head.weight, tensors["lm_head.weight"])


def test_config_fallbacks(tmp_path):
    """Without quant_config.json: config.json's quantization_config, then the file's metadata."""
    model = quantized_block()
    save_awq(model, tmp_path)
    os.remove(tmp_path / "quant_config.json")
    x = torch.randn(2, 64)
    assert torch.equal(load_awq(Block(), tmp_path)(x), model(x))  # from the metadata
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                           "version": "gemm"}}, f)
    with pytest.raises(ValueError, match=r"attn.o_proj.qzeros must have shape \[1, 8\], got \[2, 8\]"):
        load_awq(Block(), tmp_path)  # config.json wins over the metadata
    os.remove(tmp_path / "config.json")
    assert torch.equal(load_awq(Block(), tmp_path / "model.safetensors")(x), model(x))


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="no AWQLinear layers"):
        save_awq(Block(), tmp_path)
    model = quantized_block()
    with pytest.raises(ValueError, match="unknown keys"):
        save_awq(model, tmp_path, {"desc_act": True})
    with pytest.raises(ValueError, match=r"config\['q_group_size'\] = 32 but"):
        save_awq(model, tmp_path, {"q_group_size": 32})
    with pytest.raises(ValueError, match=r"config\['zero_point'\] = False but"):
        save_awq(model, tmp_path, {"zero_point": False})
    with pytest.raises(ValueError, match="only the 'gemm' layout"):
        save_awq(model, tmp_path, {"version": "gemv"})
    with pytest.raises(ValueError, match="match the quantized layer 'attn.q_proj'"):
        save_awq(model, tmp_path, {"modules_to_not_convert": ["lm_head", "attn"]})
    with pytest.raises(ValueError, match=r"float Linear layers \['lm_head'\] are not in"):
        save_awq(model, tmp_path, {"modules_to_not_convert": None})
    model.attn["o_proj"] = awq_layer(nn.Linear(32, 64, bias=False), -1, False)
    with pytest.raises(ValueError, match="one setting for all layers"):
        save_awq(model, tmp_path)


def _saved(tmp_path, **config_changes):
    save_awq(quantized_block(), tmp_path)
    with open(tmp_path / "quant_config.json") as f:
        config = json.load(f)
    config.update(config_changes)
    with open(tmp_path / "quant_config.json", "w") as f:
        json.dump(config, f)
    return tmp_path


@pytest.mark.parametrize("changes,match", [
    (dict(version="gemv"), "only the 'gemm' layout"),
    (dict(w_bit=3), "4-bit codes only"),
    (dict(quant_method="gptq"), "only 'awq'"),
    (dict(q_group_size=0), "group size 0"),
    (dict(zero_point="yes"), "zero_point = 'yes'"),
    (dict(modules_to_not_convert=["q_proj"]), "leaves 'attn.q_proj' in float"),
    (dict(zero_point=False), "attn.o_proj.qzeros: a symmetric"),
], ids=["gemv", "3-bit", "gptq", "group-0", "zero-point-str", "skipped", "sym-zeros"])
def test_load_config_errors(tmp_path, changes, match):
    path = _saved(tmp_path, **changes)
    with pytest.raises(ValueError, match=match):
        load_awq(Block(), path)


def test_load_model_mismatch_errors(tmp_path):
    path = _saved(tmp_path)
    other = Block()
    other.attn["q_proj"] = nn.Linear(64, 40)
    with pytest.raises(ValueError, match="attn.q_proj in .* is 64 -> 32 features but the model's layer is 64 -> 40"):
        load_awq(other, path)
    other = Block()
    del other.attn["o_proj"]
    with pytest.raises(ValueError, match="quantizes layer 'attn.o_proj', which the model does not have"):
        load_awq(other, path)
    other = Block()
    other.attn["o_proj"] = nn.Linear(32, 64, bias=True)
    with pytest.raises(ValueError, match="has no attn.o_proj.bias but the model's layer has one"):
        load_awq(other, path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_awq(Block(), path / "missing")
