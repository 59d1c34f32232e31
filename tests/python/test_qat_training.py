"""QAT where training scripts run: Conv+BN folding while training,
torch.compile of a whole training step, bfloat16 autocast, eval() freezing
the observers."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from qat_models import conv_bn_net, fake_quantizers, image_input, seeded, \
    single_threaded, train_steps  # noqa: F401  (single_threaded: autouse fixture)
from torchquant.nn.qat import QATConvBn2d
from torchquant.qat import W4A8, W8A8, prepare_qat


def mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def classification_batch(seed, batch=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, generator=g), torch.randint(0, 8, (batch,), generator=g)


def observer_state(model):
    return [(fq.min_val.clone(), fq.max_val.clone(), fq.scale.detach().clone()) for fq in fake_quantizers(model)]


def assert_same_state(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for s, t in zip(x, y):
            assert torch.equal(s, t)


# ---- Conv + BatchNorm folding ----------------------------------------------------------

def test_folded_conv_bn_trains_and_updates_the_batchnorm_statistics():
    qat = prepare_qat(seeded(conv_bn_net), W8A8(fold_bn=True))
    assert isinstance(qat[0], QATConvBn2d)
    bn = qat[0].bn
    mean_before, var_before = bn.running_mean.clone(), bn.running_var.clone()
    x = image_input(batch=16, seed=1)
    target = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(qat.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.cross_entropy(qat(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert not torch.allclose(bn.running_mean, mean_before) and not torch.allclose(bn.running_var, var_before)
    assert int(bn.num_batches_tracked) == 8
    assert qat[0].weight_fake_quant.scale.grad is not None and bn.weight.grad is not None


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_folded_conv_bn_without_fake_quantization_is_conv_then_batchnorm(training):
    # PyTorch's ConvBn2d semantics: batch statistics while training, running
    # ones in eval, and BN statistics updated exactly as the float pair does.
    float_net = seeded(conv_bn_net)
    float_net[1].running_mean.uniform_(-0.2, 0.2)
    float_net[1].running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        float_net[1].weight.uniform_(0.5, 1.5)
    qat = prepare_qat(float_net, W8A8(fold_bn=True))
    for fq in fake_quantizers(qat):
        fq.disable_fake_quant()
    float_net.train(training)
    qat.train(training)
    x = image_input(batch=8, seed=3)
    torch.testing.assert_close(qat(x), float_net(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qat[0].bn.running_mean, float_net[1].running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(qat[0].bn.running_var, float_net[1].running_var, rtol=1e-5, atol=1e-6)


def test_folded_conv_bn_quantizes_the_folded_weight():
    qat = prepare_qat(seeded(conv_bn_net), W4A8(group_size=8, fold_bn=True))
    with torch.no_grad():
        qat[0].bn.running_var.fill_(4.0)
        qat[0].bn.weight.fill_(0.5)
    conv = qat[0]
    folded, _ = conv.folded_weight_and_bias()
    with torch.no_grad():
        expected = conv.weight_fake_quant(folded.reshape(folded.shape[0], -1)).reshape(folded.shape)
        assert torch.equal(conv.quantized_weight(), expected)


# ---- torch.compile -----------------------------------------------------------------------

def training_step(model, x, y):
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach()


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_compiled_training_step_matches_eager_without_graph_breaks():
    eager = prepare_qat(seeded(mlp), W8A8())
    opt = torch.optim.SGD(eager.parameters(), lr=0.05)
    training_step(eager, *classification_batch(0))  # eager calibration step: grids get their values
    opt.step()
    opt.zero_grad()
    compiled_model = copy.deepcopy(eager)
    compiled_opt = torch.optim.SGD(compiled_model.parameters(), lr=0.05)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    # Tracing .backward() into the graph makes forward, loss and backward one graph.
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled_step = torch.compile(training_step, backend=counter, fullgraph=True)
        for seed in (1, 2):
            x, y = classification_batch(seed)
            loss_compiled = compiled_step(compiled_model, x, y)
            loss_eager = training_step(eager, x, y)
            torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-6, atol=1e-6)
            g_compiled, g_eager = grads(compiled_model), grads(eager)
            names = set(g_eager)
            assert {n for n in names if n.endswith("scale")} and {n for n in names if n.endswith("zero_point")}
            assert set(g_compiled) == names
            for name in names:
                torch.testing.assert_close(g_compiled[name], g_eager[name], rtol=1e-5, atol=1e-7, msg=name)
            compiled_opt.step()
            opt.step()
            compiled_opt.zero_grad()
            opt.zero_grad()
    torch._dynamo.reset()
    assert counter.frame_count == 1  # one graph, not recompiled after the optimizer step
    for (name, p), q in zip(compiled_model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


def test_observers_compile_without_graph_breaks():
    # Fixed grids observe every training batch: the observer runs inside the graph.
    qat = prepare_qat(seeded(mlp), W8A8(learnable=False))
    x, _ = classification_batch(0)
    qat(x)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(qat, backend=counter, fullgraph=True)
    x, _ = classification_batch(1)
    out = compiled(x * 3)
    torch._dynamo.reset()
    assert counter.frame_count == 1
    reference = prepare_qat(seeded(mlp), W8A8(learnable=False))
    reference(classification_batch(0)[0])
    torch.testing.assert_close(out, reference(x * 3), rtol=0, atol=0)
    assert_same_state(observer_state(qat), observer_state(reference))


# ---- autocast -----------------------------------------------------------------------------

def test_training_under_bfloat16_autocast_stays_close_to_float32():
    qat = prepare_qat(seeded(mlp), W8A8())
    x, y = classification_batch(0)
    training_step(qat, x, y)  # calibrate in float32
    qat.zero_grad()
    reference = copy.deepcopy(qat)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = qat(x)
        loss = F.cross_entropy(out, y)
    loss.backward()
    assert out.dtype == torch.bfloat16
    out_ref = reference(x)
    # bfloat16 keeps 8 bits of mantissa; a rounding may move a code by one step.
    assert (out.float() - out_ref).abs().max() <= 0.05 * out_ref.abs().max()
    for name, p in qat.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    torch.optim.SGD(qat.parameters(), lr=0.05).step()
    for p in qat.parameters():
        assert torch.isfinite(p).all()


# ---- eval() freezes the observers ------------------------------------------------------------

@pytest.mark.parametrize("learnable", [True, False], ids=["learnable", "fixed"])
def test_eval_freezes_the_observers(learnable):
    qat = prepare_qat(seeded(mlp), W8A8(learnable=learnable))
    x, _ = classification_batch(0)
    qat(x)
    frozen = observer_state(qat)
    qat.eval()
    for scale, shift in [(100.0, 0.0), (1e-3, 50.0), (10.0, -1e3)]:
        qat(x * scale + shift)
    assert_same_state(observer_state(qat), frozen)
    if not learnable:
        # The same batches in training mode do move them (the check above can fail).
        qat.train()
        qat(x * 100.0)
        assert not torch.equal(observer_state(qat)[1][1], frozen[1][1])


def test_training_moves_learnable_grids():
    qat = prepare_qat(seeded(mlp), W8A8())
    qat(classification_batch(0)[0])  # initialises the activation grids
    before = [fq.scale.detach().clone() for fq in fake_quantizers(qat)]
    train_steps(qat, [classification_batch(s)[0] for s in range(1, 5)], lr=0.1)
    after = [fq.scale.detach() for fq in fake_quantizers(qat)]
    assert len(after) == 4 and all(not torch.equal(a, b) for a, b in zip(after, before))
