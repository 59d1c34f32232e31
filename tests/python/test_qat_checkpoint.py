"""save_quantized / load_quantized: a converted model comes back bit for bit in
a freshly built float model; files that are not ours are refused."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checks import assert_equal_values
from qat_models import CONFIGS, ConvNet, TinyTransformer, conv_bn_net, convnet_input, image_input, seeded, \
    single_threaded, train_steps, transformer_input  # noqa: F401  (single_threaded: autouse fixture)
from torchquant import load_quantized, save_quantized
from torchquant.nn.quantized import QuantizedModule
from torchquant.qat import W4A8, W8A8, convert, prepare_qat

CASES = {
    "transformer-W4A8": (TinyTransformer, transformer_input, lambda: W4A8(group_size=8)),
    "transformer-W2A8": (TinyTransformer, transformer_input, CONFIGS["W2A8"]),
    "transformer-W8-lm_head-excluded": (TinyTransformer, transformer_input,
                                        lambda: W8A8(learnable=False, exclude=["lm_head"])),
    "convnet-W8A8": (ConvNet, convnet_input, CONFIGS["W8A8"]),
    "conv-bn-folded": (conv_bn_net, image_input, lambda: W8A8(fold_bn=True)),
}


def converted_model(case):
    make, inputs, config = CASES[case]
    qat = prepare_qat(seeded(make), config())
    train_steps(qat, [inputs(seed=s) for s in range(3)])
    return convert(qat)


@pytest.mark.parametrize("case", CASES)
def test_a_fresh_float_model_loads_the_checkpoint_and_reproduces_the_outputs(case, tmp_path):
    make, inputs, _ = CASES[case]
    converted = converted_model(case)
    path = tmp_path / "model.safetensors"
    save_quantized(converted, path)
    fresh = seeded(make, seed=123)  # other float weights: everything must come from the file
    loaded = load_quantized(fresh, path)
    assert loaded is fresh and not loaded.training
    assert [n for n, m in loaded.named_modules() if isinstance(m, QuantizedModule)] == \
        [n for n, m in converted.named_modules() if isinstance(m, QuantizedModule)]
    with torch.no_grad():
        for seed in (30, 31):
            x = inputs(seed=seed)
            assert_equal_values(loaded(x), converted(x))


def test_a_qat_model_can_be_the_target_too(tmp_path):
    converted = converted_model("transformer-W4A8")
    save_quantized(converted, tmp_path / "m.safetensors")
    target = prepare_qat(seeded(TinyTransformer, seed=9), W4A8(group_size=8))
    loaded = load_quantized(target, tmp_path / "m.safetensors")
    x = transformer_input(seed=32)
    with torch.no_grad():
        assert_equal_values(loaded(x), converted(x))


def test_the_file_stores_packed_integer_codes(tmp_path):
    converted = converted_model("transformer-W4A8")
    path = tmp_path / "model.safetensors"
    save_quantized(converted, path)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        qweight = f.get_tensor("lm_head.qweight")
        layers = json.loads(f.metadata()["torchquant.layers"])
    assert "lm_head.weight" not in keys
    assert qweight.dtype == torch.uint8 and qweight.numel() == converted.lm_head.weight_codes().numel() // 2
    assert layers["lm_head"]["weight_spec"]["bits"] == 4 and layers["lm_head"]["kind"] == "QuantizedLinear"
    # LayerNorms stay float and are saved as such.
    assert "norm.weight" in keys


def test_a_plain_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(seeded(TinyTransformer).state_dict(), str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a torchquant quantized checkpoint"):
        load_quantized(seeded(TinyTransformer), path)


@pytest.mark.parametrize("model", ["float", "qat"])
def test_saving_a_model_that_was_not_converted_is_refused(model, tmp_path):
    net = seeded(TinyTransformer)
    if model == "qat":
        net = prepare_qat(net, W8A8())
    with pytest.raises(ValueError, match="convert"):
        save_quantized(net, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_a_checkpoint_for_another_architecture_names_the_missing_layers(tmp_path):
    save_quantized(converted_model("convnet-W8A8"), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="stages.image.0"):
        load_quantized(seeded(TinyTransformer), tmp_path / "m.safetensors")
