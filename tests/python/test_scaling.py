"""Input-channel scaling groups: the rules per architecture, folding that leaves the float model
unchanged (pre-LN LLaMA / OPT blocks, post-LN BERT blocks, the explicit fallback),
InputScaledLinear against F.linear(x / s), and check_invariance catching a wrong rule."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ptq_models import padded_batches, plain_mlp, seeded, correlated_features
from smoothquant_models import (HEADS, HIDDEN, LlamaLikeBlock, OPTLikeBlock, hf_bert, hf_llama, hf_opt, llama_like,
                                opt_like, output, unknown_arch, with_outliers)
from smoothquant_reference import fold
from torchquant.nn import InputScaledLinear, InputScaledW8A8Linear, W8A8Linear
from torchquant.ptq.calibration import BlockInput, capture_block_inputs, find_blocks, prepare_batches
from torchquant.ptq.scaling import (ScalingGroup, ScalingInvarianceError, apply_scales, block_outputs,
                                    check_invariance, scaling_groups)

try:
    import transformers  # noqa: F401
    HAVE_TRANSFORMERS = True
except ImportError:
    HAVE_TRANSFORMERS = False
needs_transformers = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed")


def _scales(n: int, seed: int) -> torch.Tensor:
    """Factors spanning 0.14 .. 7.4, far from 1, so a wrong fold shows."""
    return torch.exp(torch.empty(n).uniform_(-2.0, 2.0, generator=torch.Generator().manual_seed(seed)))


def _blocks(model):
    found = find_blocks(model)
    if found is None:
        return [("", model)]
    path, blocks = found
    return [(f"{path}.{i}", b) for i, b in enumerate(blocks)]


def _summary(groups):
    return [(g.name, g.kind, g.prev_name, g.names) for g in groups]


def _real(out, batch):
    return out[batch["attention_mask"].bool()] if isinstance(batch, dict) else out


# ---------------------------------------------------------------------------- rules

def test_llama_groups():
    block = LlamaLikeBlock()
    groups = scaling_groups(nn.Module(), "model.layers.0", block)
    p = "model.layers.0."
    assert _summary(groups) == [
        (p + "self_attn.qkv", "norm", p + "input_layernorm", [p + "self_attn.q_proj", p + "self_attn.k_proj",
                                                             p + "self_attn.v_proj"]),
        (p + "self_attn.o_proj", "linear", p + "self_attn.v_proj", [p + "self_attn.o_proj"]),
        (p + "mlp.gate_up", "norm", p + "post_attention_layernorm", [p + "mlp.gate_proj", p + "mlp.up_proj"]),
        (p + "mlp.down_proj", "linear", p + "mlp.up_proj", [p + "mlp.down_proj"]),
    ]
    assert groups[0].prev is block.input_layernorm and groups[1].prev is block.self_attn.v_proj


def test_grouped_query_attention_leaves_o_proj_unscaled():
    groups = scaling_groups(nn.Module(), "b", LlamaLikeBlock(kv_heads=HEADS // 2))
    assert [g.name for g in groups] == ["b.self_attn.qkv", "b.mlp.gate_up", "b.mlp.down_proj"]
    assert all("b.self_attn.o_proj" not in g.names for g in groups)


def test_opt_groups_depend_on_activation_and_norm_placement():
    relu = scaling_groups(nn.Module(), "", OPTLikeBlock())
    assert _summary(relu) == [
        ("self_attn.qkv", "norm", "self_attn_layer_norm", ["self_attn.q_proj", "self_attn.k_proj",
                                                           "self_attn.v_proj"]),
        ("self_attn.out_proj", "linear", "self_attn.v_proj", ["self_attn.out_proj"]),
        ("fc1", "norm", "final_layer_norm", ["fc1"]),
        ("fc2", "linear", "fc1", ["fc2"]),
    ]
    gelu = scaling_groups(nn.Module(), "", OPTLikeBlock(activation=nn.GELU()))
    assert [g.name for g in gelu] == ["self_attn.qkv", "self_attn.out_proj", "fc1"]  # fc2 unscaled: GELU
    post_ln = opt_like(do_layer_norm_before=False)
    groups = scaling_groups(post_ln, "layers.0", post_ln.layers[0])
    assert [(g.name, g.kind) for g in groups] == [
        ("layers.0.self_attn.out_proj", "linear"), ("layers.0.fc2", "linear"),
        ("layers.0.self_attn.q_proj", "explicit"), ("layers.0.self_attn.k_proj", "explicit"),
        ("layers.0.self_attn.v_proj", "explicit"), ("layers.0.fc1", "explicit")]


def test_norm_without_affine_weight_is_not_folded_into():
    block = LlamaLikeBlock(norm="layer")
    block.input_layernorm = nn.LayerNorm(HIDDEN, elementwise_affine=False)
    kinds = {g.name: g.kind for g in scaling_groups(nn.Module(), "", block)}
    assert kinds["self_attn.q_proj"] == kinds["self_attn.k_proj"] == kinds["self_attn.v_proj"] == "explicit"
    assert kinds["mlp.gate_up"] == "norm"


@needs_transformers
def test_bert_groups():
    model = hf_bert()
    p = "encoder.layer.1."
    assert _summary(scaling_groups(model, p[:-1], model.encoder.layer[1])) == [
        (p + "attention.self.qkv", "explicit", None, [p + "attention.self.query", p + "attention.self.key",
                                                      p + "attention.self.value"]),
        (p + "attention.output.dense", "linear", p + "attention.self.value", [p + "attention.output.dense"]),
        (p + "intermediate.dense", "explicit", None, [p + "intermediate.dense"]),
        (p + "output.dense", "explicit", None, [p + "output.dense"]),
    ]


def test_unrecognised_layers_grouped_by_shared_input_in_forward_order():
    torch.manual_seed(0)
    model = unknown_arch().eval()
    inputs = capture_block_inputs(model, model.layers[0], prepare_batches(padded_batches(1)), torch.device("cpu"))
    traced = scaling_groups(model, "layers.0", model.layers[0], inputs)
    assert _summary(traced) == [
        ("layers.0.attn.wq+wk+wv", "explicit", None, ["layers.0.attn.wq", "layers.0.attn.wk", "layers.0.attn.wv"]),
        ("layers.0.attn.wo", "explicit", None, ["layers.0.attn.wo"]),
        ("layers.0.w_in", "explicit", None, ["layers.0.w_in"]),
        ("layers.0.w_out", "explicit", None, ["layers.0.w_out"]),
    ]
    alone = scaling_groups(model, "layers.0", model.layers[0])
    assert [g.names for g in alone] == [[n] for g in traced for n in g.names]


# ---------------------------------------------------------------------------- folding keeps the float model

MODELS = {
    "llama-rmsnorm": lambda: with_outliers(llama_like()),
    "llama-layernorm": lambda: llama_like(norm="layer"),
    "llama-gqa": lambda: llama_like(kv_heads=HEADS // 2),
    "opt-relu": lambda: with_outliers(opt_like()),
    "opt-gelu": lambda: opt_like(activation=nn.GELU()),
    "unknown": unknown_arch,
    "hf-llama": hf_llama,
    "hf-llama-gqa": lambda: hf_llama(kv_heads=2),
    "hf-opt": hf_opt,
    "hf-bert": hf_bert,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_scaling_every_group_keeps_outputs(name):
    if name.startswith("hf-") and not HAVE_TRANSFORMERS:
        pytest.skip("transformers is not installed")
    model = seeded(MODELS[name])
    batches = padded_batches(2)
    with torch.no_grad():
        expected = [output(model, b) for b in batches]
        kinds = set()
        for k, (block_name, block) in enumerate(_blocks(model)):
            for j, group in enumerate(scaling_groups(model, block_name, block)):
                weights = [w.detach().clone() for w in group.weights]
                apply_scales(group, _scales(group.in_features, seed=100 * k + j))
                assert all(not torch.equal(w, new) for w, new in zip(weights, group.weights))
                kinds.add(group.kind)
        got = [output(model, b) for b in batches]
    for g, e, b in zip(got, expected, batches):
        torch.testing.assert_close(_real(g, b), _real(e, b), rtol=1e-4, atol=1e-4 * float(e.abs().max()))
    assert kinds == ({"explicit", "linear"} if "bert" in name else
                     {"explicit"} if name == "unknown" else {"norm", "linear"})


def test_whole_model_as_one_block():
    """A model without a block list: its Linear layers read the model input or GELU outputs, so all go online."""
    model = seeded(plain_mlp)
    x = correlated_features(1)[0]
    expected = model(x)
    groups = scaling_groups(model, "", model, [BlockInput((x,), {})])
    assert [(g.name, g.kind) for g in groups] == [("0", "explicit"), ("2", "explicit"), ("4", "explicit")]
    for j, group in enumerate(groups):
        apply_scales(group, _scales(group.in_features, j))
    assert all(isinstance(model[i], InputScaledLinear) for i in (0, 2, 4))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_fold_matches_reference():
    block = seeded(lambda: LlamaLikeBlock(norm="layer"))
    with torch.no_grad():
        block.input_layernorm.bias.normal_()
    norm_group, linear_group = scaling_groups(nn.Module(), "", block)[:2]
    for group, seed in ((norm_group, 1), (linear_group, 2)):
        s = _scales(HIDDEN, seed)
        prev_w, prev_b = group.prev.weight.detach().clone(), group.prev.bias.detach().clone()
        expected = fold(prev_w, prev_b, [w.detach().clone() for w in group.weights], s)
        apply_scales(group, s)
        assert torch.equal(group.prev.weight, expected[0]) and torch.equal(group.prev.bias, expected[1])
        assert all(torch.equal(w, e) for w, e in zip(group.weights, expected[2]))


# ---------------------------------------------------------------------------- check_invariance

def _bert_inputs(model):
    return capture_block_inputs(model, model.encoder.layer[0], prepare_batches(padded_batches(2)), torch.device("cpu"))


@needs_transformers
def test_check_invariance_catches_folding_into_a_post_ln_norm():
    model = seeded(hf_bert)
    block = model.encoder.layer[0]
    inputs = _bert_inputs(model)
    before = [inp.call(block) for inp in inputs]
    # Wrong: attention.output.LayerNorm also feeds the residual connection around the feed-forward part.
    wrong = ScalingGroup("encoder.layer.0.wrong_ffn_fold", [("encoder.layer.0.intermediate.dense",
                                                              block.intermediate.dense)],
                         block.attention.output.LayerNorm, "encoder.layer.0.attention.output.LayerNorm", "norm")
    apply_scales(wrong, _scales(HIDDEN, 3))
    with pytest.raises(ScalingInvarianceError, match=r"wrong_ffn_fold.*residual connection"):
        check_invariance(block, inputs, before, group=wrong)


@needs_transformers
def test_check_invariance_passes_the_bert_rules():
    model = seeded(hf_bert)
    block = model.encoder.layer[0]
    inputs = _bert_inputs(model)
    before = block_outputs(block, inputs)
    for j, group in enumerate(scaling_groups(model, "encoder.layer.0", block, inputs)):
        apply_scales(group, _scales(group.in_features, j))
        assert check_invariance(block, inputs, before, group=group) < 1e-5


def test_check_invariance_catches_a_fold_through_gelu():
    model = seeded(lambda: opt_like(activation=nn.GELU()))
    block = model.layers[0]
    inputs = capture_block_inputs(model, block, prepare_batches(padded_batches(2)), torch.device("cpu"))
    before = [inp.call(block) for inp in inputs]
    wrong = ScalingGroup("fc2-through-gelu", [("fc2", block.fc2)], block.fc1, "fc1", "linear")
    apply_scales(wrong, _scales(2 * HIDDEN, 4))
    with pytest.raises(ScalingInvarianceError, match=r"fc2-through-gelu.*linear channel by channel"):
        check_invariance(block, inputs, before, group=wrong)


def test_check_invariance_catches_a_norm_that_feeds_the_residual():
    model = seeded(lambda: llama_like(residual_from_norm=True))
    block = model.layers[0]
    inputs = capture_block_inputs(model, block, prepare_batches(padded_batches(2)), torch.device("cpu"))
    before = block_outputs(block, inputs)
    group = scaling_groups(model, "layers.0", block)[0]
    assert group.kind == "norm"  # the names say LLaMA; the forward does not
    apply_scales(group, _scales(HIDDEN, 5))
    with pytest.raises(ScalingInvarianceError, match="layers.0.self_attn.qkv"):
        check_invariance(block, inputs, before, group=group)


# ---------------------------------------------------------------------------- InputScaledLinear

def test_input_scaled_linear_computes_linear_of_scaled_input():
    torch.manual_seed(0)
    linear = nn.Linear(12, 5)
    w, b = linear.weight.detach().clone(), linear.bias.detach().clone()
    seen = []
    linear.register_forward_hook(lambda m, args, out: seen.append(out))
    s = _scales(12, 1)
    same = InputScaledLinear.convert_(linear, s)
    assert same is linear and isinstance(linear, InputScaledLinear) and isinstance(linear, nn.Linear)
    assert torch.equal(linear.input_scale, s)
    torch.testing.assert_close(linear.weight, w * s, rtol=0, atol=0)
    x = torch.randn(3, 4, 12)
    y = linear(x)
    assert len(seen) == 1  # the hook registered before the conversion still fires
    torch.testing.assert_close(y, F.linear(x / s, w * s, b))  # the formula
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-6)  # the same function
    # A second scaling compounds.
    InputScaledLinear.convert_(linear, s)
    torch.testing.assert_close(linear.input_scale, s * s)
    torch.testing.assert_close(linear(x), F.linear(x, w, b), rtol=1e-5, atol=1e-6)
    assert set(linear.state_dict()) == {"weight", "bias", "input_scale"}
    fresh = InputScaledLinear(12, 5)
    fresh.load_state_dict(linear.state_dict())
    assert torch.equal(fresh(x), linear(x))


def test_input_scaled_linear_half_precision_keeps_dtype():
    linear = nn.Linear(8, 3).to(torch.bfloat16)
    InputScaledLinear.convert_(linear, _scales(8, 2))
    assert linear.input_scale.dtype == torch.float32 and linear.weight.dtype == torch.bfloat16
    assert linear(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_input_scaled_w8a8_quantizes_the_scaled_input():
    torch.manual_seed(1)
    linear = nn.Linear(16, 6)
    s = _scales(16, 3)
    x = torch.randn(5, 16) * _scales(16, 4)
    reference = W8A8Linear.from_float(copy.deepcopy(linear), "tensor", act_scale=0.05)
    InputScaledLinear.convert_(linear, s)
    # The W8A8 layer of the scaled weight, fed x / s.
    plain = nn.Linear(16, 6)
    plain.load_state_dict({"weight": linear.weight, "bias": linear.bias})
    expected = W8A8Linear.from_float(plain, "tensor", act_scale=0.05)(x / s)
    layer = InputScaledW8A8Linear.from_float(linear, "tensor", act_scale=0.05)
    assert torch.equal(layer.input_scale, s)
    assert torch.equal(layer(x), expected)
    assert not torch.equal(layer(x), reference(x))  # smoothing changed what is quantized
    with pytest.raises(TypeError, match="expects an InputScaledLinear"):
        InputScaledW8A8Linear.from_float(nn.Linear(4, 2))


@pytest.mark.parametrize("scales, error, match", [
    (torch.ones(5), ValueError, r"shape \[6\]"),
    (torch.ones(2, 3), ValueError, r"shape \[6\]"),
    (torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0]), ValueError, "positive and finite"),
    (torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0, 1.0]), ValueError, "positive and finite"),
    (torch.ones(6, dtype=torch.int64), TypeError, "floating point"),
    ([1.0] * 6, TypeError, "must be a Tensor"),
])
def test_bad_scales(scales, error, match):
    linear = nn.Linear(6, 2)
    with pytest.raises(error, match=match):
        InputScaledLinear.convert_(linear, scales)
    group = ScalingGroup("g", [("l", linear)])
    with pytest.raises(error, match=match):
        apply_scales(group, scales)
    assert type(linear) is nn.Linear


def test_convert_refuses_linear_subclasses():
    class Odd(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(TypeError, match="Odd"):
        InputScaledLinear.convert_(Odd(4, 2), torch.ones(4))


def test_scaling_group_validation():
    a, b = nn.Linear(4, 2), nn.Linear(5, 2)
    with pytest.raises(ValueError, match="kind must be one of"):
        ScalingGroup("g", [("a", a)], kind="fold")
    with pytest.raises(ValueError, match="different widths"):
        ScalingGroup("g", [("a", a), ("b", b)])
    with pytest.raises(ValueError, match="needs prev"):
        ScalingGroup("g", [("a", a)], kind="norm")
    with pytest.raises(ValueError, match="takes no prev"):
        ScalingGroup("g", [("a", a)], nn.LayerNorm(4), "n", "explicit")
    with pytest.raises(ValueError, match="at least one"):
        ScalingGroup("g", [])
    with pytest.raises(TypeError, match="not an nn.Linear"):
        ScalingGroup("g", [("a", nn.ReLU())])
