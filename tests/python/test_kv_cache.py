"""torchquant.ops.quantize_rows and torchquant.QuantizedKVCache (KIVI-style 2/4/8-bit KV cache)."""
import pytest
import torch

import torchquant
from torchquant import ops

transformers = pytest.importorskip("transformers")
from torchquant.kv_cache import _CACHE_ARG as CACHE  # noqa: E402


def reference_rows(x, bits):
    """Each row on its asymmetric min/max grid (range widened to hold 0), dequantized."""
    xf = x.float()
    qmax = 2 ** bits - 1
    lo = xf.amin(dim=1, keepdim=True).clamp(max=0)
    hi = xf.amax(dim=1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zero = (0 - torch.round(lo / scale)).clamp(0, qmax)
    q = (torch.round(xf * (1.0 / scale)) + zero).clamp(0, qmax)
    return (q - zero) * scale, scale, zero


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [16, 64, 100])
def test_quantize_rows_matches_reference(bits, dtype, k):
    x = (torch.randn(37, k, generator=torch.Generator().manual_seed(k)) * 2).to(dtype)
    packed, scales, zeros = ops.quantize_rows(x, bits)
    want, want_scale, want_zero = reference_rows(x, bits)
    assert torch.equal(scales, want_scale) and torch.equal(zeros, want_zero)
    got = ops.dequantize_weight(packed, scales, zeros, bits, k)
    assert torch.equal(got, want)


def test_quantize_rows_opcheck_and_errors():
    x = torch.randn(5, 32)
    torch.library.opcheck(torch.ops.torchquant.quantize_rows, (x, 4))
    with pytest.raises(ValueError, match="bits must be 2, 4 or 8"):
        ops.quantize_rows(x, 3)
    with pytest.raises(ValueError, match="finite"):
        ops.quantize_rows(torch.tensor([[1.0, float("nan")]]), 4)
    with pytest.raises(ValueError, match="shape"):
        ops.quantize_rows(torch.randn(4), 4)
    with pytest.raises(TypeError, match="float32"):
        ops.quantize_rows(torch.ones(2, 2, dtype=torch.int32), 4)


def tiny_llama(layers=2):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config).eval()


def test_cache_keeps_the_newest_tokens_exact_and_packs_the_rest():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 70), generator=torch.Generator().manual_seed(1))
    cache = torchquant.QuantizedKVCache(model.config, bits=4, residual_length=16, group_size=32)
    with torch.no_grad():
        model(ids, **{CACHE: cache}, use_cache=True)
    layer = cache.layers[0]
    assert cache.get_seq_length() == 70
    assert layer.quantized_length == 32 and layer.keys.shape[-2] == 38  # 70 - 32 waiting: 38 < 16 + 32
    # Bytes: 4-bit codes + grids + the window, against a float32 cache.
    assert cache.nbytes() < cache.float_nbytes()


@pytest.mark.parametrize("bits,tolerance", [(8, 0.02), (4, 0.2)])
def test_generate_and_logits_follow_the_float_cache(bits, tolerance):
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=24, do_sample=False)
        cache = torchquant.QuantizedKVCache(model.config, bits=bits, residual_length=8, group_size=16)
        out = model.generate(ids, max_new_tokens=24, do_sample=False, **{CACHE: cache})
    assert out.shape == ref.shape
    assert cache.layers[0].quantized_length > 0
    # Teacher-forced: chunks attending to a quantized past stay close to the float model.
    text = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(3))
    kv = torchquant.kv_cache
    float_ppl = kv.chunked_perplexity(model, text, lambda: None, chunk=16)
    quant_ppl = kv.chunked_perplexity(
        model, text, lambda: torchquant.QuantizedKVCache(model.config, bits=bits, residual_length=16, group_size=16),
        chunk=16)
    assert abs(quant_ppl / float_ppl - 1) < tolerance


def test_2bit_cache_runs():
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(4))
    cache = torchquant.QuantizedKVCache(model.config, bits=2, residual_length=0, group_size=8)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False, **{CACHE: cache})
    assert out.shape == (2, 30) and cache.get_seq_length() == 29


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 3}, "bits must be one of"),
    ({"bits": 16}, "bits must be one of"),
    ({"residual_length": -1}, "residual_length"),
    ({"group_size": 0}, "group_size"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        torchquant.QuantizedKVCache(tiny_llama(1).config, **kwargs)


def test_prompt_longer_than_the_position_limit():
    model = tiny_llama(1)
    ids = torch.zeros(1, 300, dtype=torch.long)
    with pytest.raises(ValueError, match="position limit"):
        torchquant.kv_cache.chunked_perplexity(model, ids, lambda: None)
