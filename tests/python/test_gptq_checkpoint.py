"""GPTQLinear (inference from packed GPTQ tensors), the GPTQ checkpoint (save_gptq / load_gptq), and the
way from a GPTQ run to a checkpoint (to_gptq_modules, save_gptq(report=...)).

References are plain PyTorch written here: the weight is
``(codes - zero_points[:, g_idx]) * fp16(scales)[:, g_idx]``, column by column.
The layer runs the quantized-linear kernels, which sum in their own order:
outputs equal the reference up to float32 rounding (quantized_cases.py), while
weights, state dicts and checkpoints are bit for bit.
"""
import copy
import dataclasses
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from checks import assert_bitwise_equal
from quantized_cases import Codes, assert_linear_close
from ptq_models import TinyDecoder, call, correlated_features, padded_batches, plain_mlp, seeded, token_batches
from qat_models import single_threaded  # noqa: F401  (autouse fixture)
from torchquant import QuantSpec
from torchquant.nn import GPTQLinear
from torchquant.ptq import gptq
from torchquant.ptq.checkpoint import (GPTQFormatWarning, load_gptq, qzeros_from_v1, qzeros_to_v1, save_gptq,
                                       to_gptq_modules)
from torchquant.ptq.packing import pack_int32, unpack_int32

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make_quantized(out_f, in_f, bits, group_size, symmetric, act_order=False, bias=True, seed=0, min_zero=0):
    """Random GPTQ outputs in torchquant's code domain (what the GPTQ op returns)."""
    gen = torch.Generator().manual_seed(seed)
    qmin = -(1 << (bits - 1)) if symmetric else 0
    qmax = qmin + (1 << bits) - 1
    n_groups = 1 if group_size is None else in_f // group_size
    codes = torch.randint(qmin, qmax + 1, (out_f, in_f), generator=gen, dtype=torch.int32)
    scales = torch.empty(out_f, n_groups).uniform_(1e-3, 0.1, generator=gen)
    if symmetric:
        zero_points = torch.zeros(out_f, n_groups)
    else:
        zero_points = torch.randint(qmin + min_zero, qmax + 1, (out_f, n_groups), generator=gen).float()
    g_idx = torch.arange(in_f, dtype=torch.int32) // (group_size or in_f)
    if act_order:
        g_idx = g_idx[torch.randperm(in_f, generator=gen)]
    b = torch.randn(out_f, generator=gen) if bias else None
    return dict(codes=codes, scales=scales, zero_points=zero_points, g_idx=g_idx, bias=b, bits=bits,
                group_size=group_size, quant_min=qmin, symmetric=symmetric, desc_act=act_order)


def as_codes(q):
    """The layer's weight as the reference of quantized_cases sees it (float16 scales)."""
    return Codes(q["codes"], q["scales"].half().float(), q["zero_points"], q["g_idx"], q["bits"], q["quant_min"])


def reference_weight(q, dtype=torch.float32):
    g = q["g_idx"].long()
    s = q["scales"].half().float()
    return ((q["codes"].float() - q["zero_points"][:, g]) * s[:, g]).to(dtype)


LAYER_CASES = {
    "2bit-g32-asym": (64, 96, 2, 32, False),
    "3bit-g32-sym": (32, 64, 3, 32, True),
    "3bit-none-asym": (64, 32, 3, None, False),
    "4bit-g16-asym": (32, 64, 4, 16, False),
    "4bit-none-sym": (32, 64, 4, None, True),
    "8bit-g32-asym": (32, 64, 8, 32, False),
}


# ---- GPTQLinear --------------------------------------------------------------------------

@pytest.mark.parametrize("case", LAYER_CASES)
@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
def test_dequantized_weight_and_output_match_the_reference(case, act_order):
    out_f, in_f, bits, gs, sym = LAYER_CASES[case]
    q = make_quantized(out_f, in_f, bits, gs, sym, act_order=act_order, seed=bits)
    layer = GPTQLinear.from_codes(**q)
    x = torch.randn(3, 5, in_f, generator=torch.Generator().manual_seed(1))
    for dtype in DTYPES:
        w = reference_weight(q, dtype)
        assert_bitwise_equal(layer.dequantized_weight(dtype), w)
        xd = x.to(dtype)
        assert_linear_close(layer(xd), xd, as_codes(q), q["bias"].half())


@pytest.mark.parametrize("case", LAYER_CASES)
def test_buffers_have_the_gptq_layout(case):
    out_f, in_f, bits, gs, sym = LAYER_CASES[case]
    q = make_quantized(out_f, in_f, bits, gs, sym, act_order=True, seed=3)
    layer = GPTQLinear.from_codes(**q)
    n_groups = q["scales"].shape[1]
    assert layer.qweight.dtype == torch.int32 and layer.qweight.shape == (in_f * bits // 32, out_f)
    assert layer.qzeros.dtype == torch.int32 and layer.qzeros.shape == (n_groups, out_f * bits // 32)
    assert layer.scales.dtype == torch.float16 and layer.scales.shape == (n_groups, out_f)
    assert layer.g_idx.dtype == torch.int32 and torch.equal(layer.g_idx, q["g_idx"])
    assert layer.bias.dtype == torch.float16
    # Unsigned codes along the input dimension; true unsigned zero-points along the output dimension.
    assert torch.equal(unpack_int32(layer.qweight, bits, dim=0), (q["codes"] - q["quant_min"]).t())
    zero_u = (q["zero_points"] - q["quant_min"]).to(torch.int32)
    assert torch.equal(unpack_int32(layer.qzeros, bits, dim=1), zero_u.t())
    if sym:
        assert bool((zero_u == 1 << (bits - 1)).all())  # e.g. 8 for symmetric 4-bit
    assert torch.equal(layer.scales, q["scales"].t().half())
    assert list(layer.state_dict()) == ["qweight", "qzeros", "scales", "g_idx", "bias"]


def test_forward_on_each_device(device):
    q = make_quantized(64, 96, 3, 32, False, act_order=True)
    q = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in q.items()}
    layer = GPTQLinear.from_codes(**q)
    assert layer.qweight.device.type == device and layer.packed_weight.device.type == device
    x = torch.randn(5, 96, device=device)
    cpu_q = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in q.items()}
    for dtype in (torch.float32, torch.float16):
        assert_linear_close(layer(x.to(dtype)).cpu(), x.to(dtype).cpu(), as_codes(cpu_q), cpu_q["bias"].half())
    moved = layer.to("cpu")
    assert_linear_close(moved(x.cpu()), x.cpu(), as_codes(cpu_q), cpu_q["bias"].half())


def test_unpack_gives_back_the_codes():
    q = make_quantized(32, 64, 4, 16, False, act_order=True)
    r = GPTQLinear.from_codes(**q).unpack()
    assert torch.equal(r.codes, q["codes"]) and torch.equal(r.zero_points, q["zero_points"])
    assert torch.equal(r.g_idx, q["g_idx"]) and torch.equal(r.scales, q["scales"].half().float())


def test_no_bias_and_group_size_minus_one():
    q = make_quantized(32, 64, 4, None, True, bias=False)
    layer = GPTQLinear.from_codes(**{**q, "group_size": -1})
    assert layer.bias is None and layer.group_size == -1 and layer.n_groups == 1
    x = torch.randn(2, 64)
    assert_linear_close(layer(x), x, as_codes(q))


def test_loading_a_state_dict_replaces_the_packed_weight_and_no_float_copy_is_kept():
    q2 = make_quantized(32, 64, 4, 32, False, act_order=True, seed=2)
    other = GPTQLinear.from_codes(**q2)
    layer = GPTQLinear(64, 32, 4, 32, symmetric=False, desc_act=True)  # zero codes, in order
    x = torch.randn(4, 64)
    layer(x), layer(x.half())
    floats = [t for t in layer.buffers() if t.is_floating_point() and t.numel() >= 32 * 64]
    assert not floats and not hasattr(layer, "_cache")
    layer.load_state_dict(other.state_dict())
    assert layer.column_perm is not None  # the act-order columns were regrouped at load
    assert torch.equal(layer(x), other(x))
    assert_linear_close(layer(x), x, as_codes(q2), q2["bias"].half())


def test_works_under_inference_mode_then_with_autograd():
    layer = GPTQLinear.from_codes(**make_quantized(32, 64, 4, 32, False))
    x = torch.randn(2, 64, requires_grad=True)
    with torch.inference_mode():
        layer(x.detach())
    layer(x).sum().backward()
    assert x.grad is not None


def test_extra_repr():
    text = repr(GPTQLinear.from_codes(**make_quantized(32, 64, 3, 32, False, act_order=True)))
    for part in ("in_features=64", "out_features=32", "bits=3", "group_size=32", "symmetric=False",
                 "desc_act=True", "bias=True"):
        assert part in text


# ---- GPTQLinear: bad input ---------------------------------------------------------------

def _with(**changes):
    q = make_quantized(32, 64, 4, 32, False)
    q.update(changes)
    return q


@pytest.mark.parametrize("changes, error, message", [
    ({"bits": 5}, ValueError, "bits must be one of"),
    ({"codes": torch.full((32, 64), 16, dtype=torch.int32)}, ValueError, r"codes must lie in .*\[0, 15\]"),
    ({"codes": torch.full((32, 64), -1, dtype=torch.int32)}, ValueError, "codes must lie in"),
    ({"codes": torch.zeros(32, 64)}, TypeError, "codes must be an integer tensor"),
    ({"codes": torch.zeros(32, 48, dtype=torch.int32), "g_idx": torch.zeros(48, dtype=torch.int32),
      "group_size": 16, "scales": torch.ones(32, 3), "zero_points": torch.ones(32, 3)},
     ValueError, "in_features must be a positive multiple of 32"),
    ({"codes": torch.zeros(40, 64, dtype=torch.int32)}, ValueError, "out_features must be a positive multiple of 32"),
    ({"group_size": 24}, ValueError, "group_size = 24 must divide in_features = 64"),
    ({"scales": torch.ones(32, 3)}, ValueError, r"scales must have shape \[32, 2\]"),
    ({"scales": -torch.ones(32, 2)}, ValueError, "scales must be positive"),
    ({"scales": torch.full((32, 2), 1e6)}, ValueError, "scales must be representable in float16"),
    ({"zero_points": torch.ones(32, 1)}, ValueError, r"zero_points must have shape \[32, 2\]"),
    ({"zero_points": torch.full((32, 2), 0.5)}, ValueError, "zero_points must hold integers"),
    ({"zero_points": torch.full((32, 2), 16.0)}, ValueError, r"zero_points must lie in \[0, 15\]"),
    ({"symmetric": True, "quant_min": -8, "codes": torch.zeros(32, 64, dtype=torch.int32),
      "zero_points": torch.ones(32, 2)},
     ValueError, "symmetric 4-bit layer must have every zero-point at the middle"),
    ({"g_idx": torch.zeros(32, dtype=torch.int32)}, ValueError, r"g_idx must have shape \[64\]"),
    ({"g_idx": torch.full((64,), 2, dtype=torch.int32)}, ValueError, r"g_idx must hold group indices in \[0, 1\]"),
    ({"g_idx": (torch.arange(64, dtype=torch.int32) // 32).flip(0)}, ValueError, "desc_act is False"),
    ({"bias": torch.ones(16)}, ValueError, r"bias must have shape \[32\]"),
    ({"bias": torch.full((32,), 1e6)}, ValueError, "bias must be finite and within float16 range"),
])
def test_from_codes_refuses_bad_input_naming_the_argument(changes, error, message):
    with pytest.raises(error, match=message):
        GPTQLinear.from_codes(**_with(**changes))


def test_forward_refuses_wrong_input():
    layer = GPTQLinear.from_codes(**make_quantized(32, 64, 4, 32, False))
    with pytest.raises(ValueError, match=r"inputs \[\.\.\., 64\]"):
        layer(torch.randn(2, 32))
    with pytest.raises(TypeError, match="floating-point input"):
        layer(torch.ones(2, 64, dtype=torch.int32))


# ---- zero-point conventions --------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_v1_stores_zero_minus_one_and_reads_back(bits):
    zero_u = torch.randint(1, 1 << bits, (3, 64), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    v2 = pack_int32(zero_u, bits, dim=1)
    v1 = qzeros_to_v1(v2, bits)
    assert torch.equal(unpack_int32(v1, bits, dim=1), zero_u - 1)
    assert torch.equal(qzeros_from_v1(v1, bits), v2)


def test_v1_to_v2_matches_the_packed_word_constant_without_overflow():
    # Readers convert 4-bit v1 zeros by adding 0x11111111 to each word; with no
    # field at 15 no carry crosses a field, so the results must agree.
    zero_u_minus_1 = torch.randint(0, 15, (2, 32), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    v1 = pack_int32(zero_u_minus_1, 4, dim=1)
    expected = (v1.to(torch.int64) + 0x11111111)
    expected = torch.where(expected >= 2 ** 31, expected - 2 ** 32, expected).to(torch.int32)
    assert torch.equal(qzeros_from_v1(v1, 4), expected)


def test_v1_field_of_all_ones_wraps_to_zero():
    v1 = pack_int32(torch.full((1, 32), 7, dtype=torch.int32), 3, dim=1)
    assert torch.equal(unpack_int32(qzeros_from_v1(v1, 3), 3, dim=1), torch.zeros(1, 32, dtype=torch.int32))


def test_v1_cannot_store_a_zero_point_of_zero():
    v2 = pack_int32(torch.zeros(1, 32, dtype=torch.int32), 4, dim=1)
    with pytest.raises(ValueError, match="gptq_v2"):
        qzeros_to_v1(v2, 4, "blocks.0.fc")


# ---- checkpoints -------------------------------------------------------------------------

class TinyModel(nn.Module):
    """Linear layers of several widths, a float LayerNorm and a Linear head left in float."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 96)
        self.norm = nn.LayerNorm(96)
        self.fc2 = nn.Linear(96, 64, bias=False)
        self.fc3 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 32)

    def forward(self, x):
        return self.head(self.fc3(torch.relu(self.fc2(self.norm(self.fc1(x))))))


def quantized_model(mixed=False, min_zero=0):
    """A TinyModel whose fc1..fc3 are GPTQ layers (fc1 in act-order); ``head`` saw no data and stays float."""
    torch.manual_seed(0)
    model = TinyModel()
    specs = {"fc1": (4, 32, False, True), "fc2": (3 if mixed else 4, 32, False, False),
             "fc3": (8 if mixed else 4, 32, mixed, False)}
    for i, (name, (bits, gs, sym, act)) in enumerate(specs.items()):
        lin = getattr(model, name)
        q = make_quantized(lin.out_features, lin.in_features, bits, gs, sym, act_order=act,
                           bias=lin.bias is not None, seed=10 + i, min_zero=min_zero)
        setattr(model, name, GPTQLinear.from_codes(**q))
    return model.eval()


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("mixed", [False, True], ids=["uniform", "mixed"])
def test_round_trip_is_bit_exact(tmp_path, fmt, mixed):
    model = quantized_model(mixed=mixed, min_zero=1 if fmt == "gptq" else 0)
    config = save_gptq(model, tmp_path, {"checkpoint_format": fmt, "damp_percent": 0.01, "true_sequential": True})
    fresh = load_gptq(TinyModel(), tmp_path)
    x = torch.randn(4, 7, 64)
    with torch.no_grad():
        assert_bitwise_equal(fresh(x), model(x))
    for name in ("fc1", "fc2", "fc3"):
        a, b = getattr(model, name), getattr(fresh, name)
        assert isinstance(b, GPTQLinear)
        assert (a.bits, a.group_size, a.symmetric, a.desc_act) == (b.bits, b.group_size, b.symmetric, b.desc_act)
        for key, t in a.state_dict().items():
            assert torch.equal(b.state_dict()[key], t), f"{name}.{key}"
    assert type(fresh.head) is nn.Linear and torch.equal(fresh.head.weight, model.head.weight)
    assert torch.equal(fresh.norm.weight, model.norm.weight)
    on_disk = json.loads((tmp_path / "quantize_config.json").read_text())
    assert on_disk == config
    assert config["checkpoint_format"] == fmt and config["quant_method"] == "gptq"
    assert config["dynamic"]["-:^head$"] == {}
    if mixed:
        # The top level follows fc1 (4-bit, asymmetric, act-order).
        assert config["dynamic"]["+:^fc2$"] == {"bits": 3, "desc_act": False}
        assert config["dynamic"]["+:^fc3$"] == {"bits": 8, "sym": True, "desc_act": False}


def test_checkpoint_file_holds_the_ecosystem_tensors(tmp_path):
    model = quantized_model(min_zero=1)
    save_gptq(model, tmp_path, {"checkpoint_format": "gptq"})
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert {k for k in tensors if k.startswith("fc1.")} == {"fc1.qweight", "fc1.qzeros", "fc1.scales", "fc1.g_idx",
                                                          "fc1.bias"}
    assert {k for k in tensors if k.startswith("head.")} == {"head.weight", "head.bias"}
    assert tensors["fc1.scales"].dtype == torch.float16 and tensors["fc1.bias"].dtype == torch.float16
    # v1 on disk: every zero-point field is one less than the module's.
    on_disk = unpack_int32(tensors["fc1.qzeros"], 4, dim=1)
    assert torch.equal(on_disk, unpack_int32(model.fc1.qzeros, 4, dim=1) - 1)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        embedded = json.loads(f.metadata()["quantize_config"])
    assert embedded["bits"] == 4 and embedded["group_size"] == 32 and embedded["desc_act"] is True
    assert embedded["sym"] is False and embedded["static_groups"] is False


def test_config_in_the_safetensors_metadata_is_enough(tmp_path):
    model = quantized_model()
    save_gptq(model, tmp_path, {"checkpoint_format": "gptq_v2"})
    os.remove(tmp_path / "quantize_config.json")
    fresh = load_gptq(TinyModel(), tmp_path / "model.safetensors")
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert_bitwise_equal(fresh(x), model(x))


def test_tied_float_weights_are_saved_and_loaded(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(32, 64)
            self.fc = nn.Linear(64, 64)
            self.lm_head = nn.Linear(64, 32, bias=False)
            self.lm_head.weight = self.embed.weight

        def forward(self, idx):
            return self.lm_head(self.fc(self.embed(idx)))

    model = Tied()
    model.fc = GPTQLinear.from_codes(**make_quantized(64, 64, 4, 32, True))
    save_gptq(model, tmp_path, {"checkpoint_format": "gptq"})
    fresh = load_gptq(Tied(), tmp_path)
    idx = torch.tensor([[1, 5, 31]])
    with torch.no_grad():
        assert_bitwise_equal(fresh(idx), model(idx))


def test_save_refuses_v1_for_a_zero_point_of_zero(tmp_path):
    model = quantized_model()
    model.fc1 = GPTQLinear.from_codes(**{**make_quantized(96, 64, 4, 32, False),
                                         "zero_points": torch.zeros(96, 2)})
    with pytest.raises(ValueError, match="checkpoint_format='gptq_v2'"):
        save_gptq(model, tmp_path, {"checkpoint_format": "gptq"})


@pytest.mark.parametrize("config, message", [
    ({"group_sise": 32}, "unknown keys"),
    ({"checkpoint_format": "marlin"}, "checkpoint_format"),
    ({"bits": 5}, "bits"),
    ({"sym": "yes"}, "sym"),
    ({"damp_percent": 2.0}, "damp_percent"),
])
def test_save_refuses_bad_config(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        save_gptq(quantized_model(), tmp_path, config)


def test_save_refuses_a_model_without_gptq_layers(tmp_path):
    with pytest.raises(ValueError, match="no GPTQLinear layers"):
        save_gptq(TinyModel(), tmp_path)


def test_load_refuses_mismatched_models_and_configs(tmp_path):
    save_gptq(quantized_model(), tmp_path, {"checkpoint_format": "gptq_v2"})

    class Narrower(TinyModel):
        def __init__(self):
            super().__init__()
            self.fc3 = nn.Linear(64, 64)

    with pytest.raises(ValueError, match="fc3 .* 64 -> 32 features .* 64 -> 64"):
        load_gptq(Narrower(), tmp_path)

    class Missing(TinyModel):
        def __init__(self):
            super().__init__()
            del self.fc2

    with pytest.raises(ValueError, match="'fc2', which the model does not have"):
        load_gptq(Missing(), tmp_path)

    config = json.loads((tmp_path / "quantize_config.json").read_text())
    for changes, message in (({"quant_method": "awq"}, "quant_method"), ({"checkpoint_format": "marlin"},
                                                                          "checkpoint_format"),
                             ({"dynamic": {"-:^fc1$": {}}}, "excludes 'fc1'")):
        (tmp_path / "quantize_config.json").write_text(json.dumps({**config, **changes}))
        with pytest.raises(ValueError, match=message):
            load_gptq(TinyModel(), tmp_path)


def test_load_reads_a_checkpoint_written_by_hand_in_v1(tmp_path):
    # A checkpoint assembled directly from the documented layout, as another tool would write it.
    q = make_quantized(32, 64, 4, 32, False, act_order=True, min_zero=1)
    model = nn.Sequential(nn.Linear(64, 32))
    zero_u = (q["zero_points"] - q["quant_min"]).to(torch.int32)
    tensors = {
        "0.qweight": pack_int32((q["codes"] - q["quant_min"]).t(), 4, dim=0),
        "0.qzeros": pack_int32((zero_u - 1).t(), 4, dim=1),
        "0.scales": q["scales"].t().half().contiguous(),
        "0.g_idx": q["g_idx"],
        "0.bias": q["bias"].half(),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "quantize_config.json").write_text(json.dumps(
        {"bits": 4, "group_size": 32, "desc_act": True, "sym": False, "checkpoint_format": "gptq"}))
    load_gptq(model, tmp_path)
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert_linear_close(model(x), x, as_codes(q), q["bias"].half())


# ---- from a GPTQ run: to_gptq_modules, save_gptq(report=...) -------------------------------

GPTQ_RUNS = {
    # v1 stores zero - 1: symmetric grids (zero-point 8) always fit
    "v1-sym-act-order": ("gptq", QuantSpec(bits=4, granularity="group", group_size=16), {"act_order": True}),
    "v2-asym-static-groups": ("gptq_v2", QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16),
                              {"act_order": True, "static_groups": True}),
}


def gptq_decoder(spec, **kwargs):
    """The tiny decoder quantized by the GPTQ driver on padded batches, and its report."""
    model = seeded(TinyDecoder)
    return model, gptq(model, padded_batches(), spec, progress=False, **kwargs)


@pytest.mark.parametrize("case", GPTQ_RUNS)
def test_a_gptq_model_and_its_report_save_and_reload_bit_exactly(tmp_path, case):
    fmt, spec, kwargs = GPTQ_RUNS[case]
    model, report = gptq_decoder(spec, **kwargs)
    config = save_gptq(model, tmp_path, {"checkpoint_format": fmt}, report=report)
    assert len(report.results) == 14
    for name in report.results:
        assert isinstance(model.get_submodule(name), GPTQLinear), name
    assert type(model.lm_head) is nn.Linear  # excluded by the driver: saved in float
    # a skeleton with other float weights: every tensor comes from the checkpoint
    fresh = load_gptq(seeded(TinyDecoder, seed=1), tmp_path)
    with torch.no_grad():
        for batch in padded_batches(2, seed=5) + token_batches(2, seed=6):
            assert_bitwise_equal(call(fresh, batch), call(model, batch))
    expected = {"bits": 4, "group_size": 16, "sym": spec.symmetric, "desc_act": True,
                "static_groups": kwargs.get("static_groups", False), "damp_percent": 0.01, "true_sequential": True,
                "checkpoint_format": fmt, "quant_method": "gptq"}
    assert {k: config[k] for k in expected} == expected
    assert config["dynamic"] == {"-:^lm_head$": {}}
    assert json.loads((tmp_path / "quantize_config.json").read_text()) == config


def test_converted_weights_differ_from_the_drivers_by_the_float16_rounding_of_scales_and_bias_only():
    fmt, spec, kwargs = GPTQ_RUNS["v2-asym-static-groups"]
    model, report = gptq_decoder(spec, **kwargs)
    floats = {name: (model.get_submodule(name).weight.detach().clone(), model.get_submodule(name).bias)
              for name in report.results}
    assert to_gptq_modules(model, report) is model
    moved = 0
    for name, (weight, bias) in floats.items():
        layer, q = model.get_submodule(name), report.results[name]
        g = q.g_idx.long()
        steps = (q.codes.double() - q.zero_points.double()[:, g]).abs()
        s = q.scales.double()[:, g]
        rounding = (s - q.scales.half().double()[:, g]).abs()
        # float16 rounds to nearest: half an ulp, 2^-11 relative in the normal range, 2^-25 below
        assert bool((rounding <= torch.clamp(2.0 ** -11 * s, min=2.0 ** -25)).all()), name
        diff = (layer.dequantized_weight().double() - weight.double()).abs()
        slack = 2.0 ** -23 * weight.double().abs()  # float32 rounding of either weight
        assert bool((diff <= steps * rounding + slack).all()), name
        assert bool((diff <= steps * torch.clamp(2.0 ** -11 * s, min=2.0 ** -25) + slack).all()), name
        moved += int((diff > 0).sum())
        if bias is None:
            assert layer.bias is None
        else:
            assert torch.equal(layer.bias, bias.detach().half()), name
    assert moved > 0  # the bound is not vacuous: float16 scales do move weights


def test_layers_the_format_cannot_hold_stay_float_with_one_warning_and_still_round_trip(tmp_path):
    model = seeded(plain_mlp)  # 16 -> 32 -> 32 -> 8
    report = gptq(model, correlated_features(), QuantSpec(bits=4, granularity="channel"), progress=False)
    before = copy.deepcopy(model)
    with pytest.warns(GPTQFormatWarning) as caught:
        config = save_gptq(model, tmp_path, {"checkpoint_format": "gptq_v2"}, report=report)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "2 quantized layer(s) stay float" in message
    assert "0 (in_features=16 not a multiple of 32)" in message and "4 (out_features=8 not a multiple of 32)" in message
    assert isinstance(model[2], GPTQLinear)
    for i in (0, 4):
        assert type(model[i]) is nn.Linear and torch.equal(model[i].weight, before[i].weight)
    assert config["dynamic"] == {"-:^0$": {}, "-:^4$": {}}
    fresh = load_gptq(plain_mlp(), tmp_path)
    x = correlated_features(1, seed=3)[0]
    with torch.no_grad():
        assert_bitwise_equal(fresh(x), model(x))

    five = seeded(plain_mlp)
    report = gptq(five, correlated_features(), QuantSpec(bits=5, granularity="channel"), progress=False)
    with pytest.warns(GPTQFormatWarning, match=r"3 quantized layer\(s\).*2 \(5-bit codes; the format packs 2, 3, 4, 8"):
        to_gptq_modules(five, report)
    assert not any(isinstance(m, GPTQLinear) for m in five.modules())
    with pytest.warns(GPTQFormatWarning), pytest.raises(ValueError, match="no GPTQLinear layers"):
        save_gptq(five, tmp_path / "five", report=report)
    assert not (tmp_path / "five").exists()


def test_converting_twice_is_harmless_and_other_codes_are_refused():
    model, report = gptq_decoder(GPTQ_RUNS["v1-sym-act-order"][1], act_order=True)
    to_gptq_modules(model, report)
    layers = {name: model.get_submodule(name) for name in report.results}
    to_gptq_modules(model, report)
    assert all(model.get_submodule(name) is layer for name, layer in layers.items())
    _, other = gptq_decoder(QuantSpec(bits=4, granularity="channel"))
    with pytest.raises(ValueError, match="'layers.0.self_attn.q_proj' is already a GPTQLinear, holding other codes"):
        to_gptq_modules(model, other)


def test_to_gptq_modules_refuses_a_model_the_report_does_not_describe_and_changes_nothing():
    original = seeded(TinyDecoder)
    model = copy.deepcopy(original)
    report = gptq(model, token_batches(), QuantSpec(bits=4, granularity="channel"), progress=False)
    # the float model before the pass: its weights are not the report's
    with pytest.raises(ValueError, match="the weight of 'layers.0.self_attn.q_proj' is not the one the report's codes"):
        to_gptq_modules(original, report)
    assert not any(isinstance(m, GPTQLinear) for m in original.modules())
    with pytest.raises(ValueError, match="report quantized layer 'layers.0.self_attn.q_proj', which the model does"):
        to_gptq_modules(plain_mlp(), report)
    wider = copy.deepcopy(model)
    wider.layers[1].mlp.down_proj = nn.Linear(64, 64, bias=False)
    with pytest.raises(ValueError, match=r"'layers.1.mlp.down_proj' has weight shape \[64, 64\] but the report's"):
        to_gptq_modules(wider, report)
    assert not any(isinstance(m, GPTQLinear) for m in wider.modules())  # checked before any change
    wider.layers[1].mlp.down_proj = nn.Identity()
    with pytest.raises(ValueError, match="'layers.1.mlp.down_proj', a Identity in the model"):
        to_gptq_modules(wider, report)
    with pytest.raises(TypeError, match="report must be the PTQReport of a post-training pass"):
        to_gptq_modules(model, report.results)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        to_gptq_modules(report.results, report)
    with pytest.raises(ValueError, match="the GPTQ report holds no quantized weights"):
        to_gptq_modules(model, dataclasses.replace(report, results={}))
