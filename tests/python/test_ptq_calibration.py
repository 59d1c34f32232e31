"""The block-by-block calibration walk shared by the post-training passes:
finding the blocks, capturing the first block's inputs, the statistics each
layer sees (against the same model run normally), padding kept out of them
(against the sentences run unpadded one by one), the order and grouping of
the layers, one block's statistics alive at a time, layers without tokens,
devices, and bad input."""
import copy
import gc
import logging
import weakref

import pytest
import torch
from torch import nn

from ptq_models import (DEAD_EXPERT, DECODER_BLOCK_LINEARS, DECODER_GROUPS, SEQ, TinyDecoder, TinyMoE, call,
                        correlated_features, layer_inputs, padded_batches, plain_mlp, real_token_count, real_tokens,
                        reference_hessian, seeded, token_batches, unpadded_sentences)
from qat_models import single_threaded  # noqa: F401  (autouse fixture)
from torchquant import ops
from torchquant.ptq import (BlockInput, BlockwisePass, CalibrationWarning, calibrate_blocks, capture_block_inputs,
                            find_blocks, prepare_batches, select_tokens)


class Inputs:
    """Statistics that keep every input tensor (and count themselves while alive)."""

    alive = weakref.WeakSet()

    def __init__(self, name):
        self.name = name
        self.seen = []
        Inputs.alive.add(self)

    def update(self, x):
        self.seen.append(x.clone())


class Recorder(BlockwisePass):
    """Keeps what each layer saw, the groups handed over, the skipped layers; can transform layers."""

    def __init__(self, transform=None, select=lambda name: True, count_alive=False):
        self.transform = transform
        self.count_alive = count_alive
        self._select = select
        self.inputs = {}
        self.rows = {}
        self.groups = []
        self.skipped = []
        self.alive_at_process = []
        self.devices = set()

    def select(self, name, module):
        return self._select(name)

    def new_statistics(self, name, module):
        return Inputs(name)

    def process(self, block, layers):
        if self.count_alive:
            gc.collect()  # slow (tens of ms): only where the test counts
            self.alive_at_process.append(sorted(s.name for s in Inputs.alive))
        self.groups.append([layer.name for layer in layers])
        for layer in layers:
            self.inputs[layer.name] = layer.statistics.seen
            self.rows[layer.name] = layer.rows
            self.devices.update(x.device.type for x in layer.statistics.seen)
            self.devices.add(layer.module.weight.device.type)
            if self.transform is not None:
                with torch.no_grad():
                    layer.module.weight.copy_(self.transform(layer.module.weight))

    def skip(self, block, layer, reason):
        self.skipped.append((layer.name, reason, layer.rows))


def coarse_round(w):
    """A visible weight change: 2-bit-like rounding per row (plain PyTorch)."""
    scale = w.abs().amax(dim=1, keepdim=True) / 1.5
    return torch.round(w / scale) * scale


def decoder_names(blocks=2):
    return [f"layers.{i}.{n}" for i in range(blocks) for n in DECODER_BLOCK_LINEARS]


def assert_same_tensors(actual, expected, name):
    assert len(actual) == len(expected), f"{name}: {len(actual)} calls recorded, {len(expected)} expected"
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


# ---- finding the blocks ----------------------------------------------------------------

def test_find_blocks_takes_the_outer_block_list_not_the_experts_and_none_for_a_plain_mlp():
    decoder, moe = seeded(TinyDecoder), seeded(TinyMoE)
    assert find_blocks(decoder) == ("layers", decoder.layers)
    # experts (4) are longer than layers (2) but nested inside a block
    assert find_blocks(moe) == ("layers", moe.layers)
    assert find_blocks(plain_mlp()) is None


def test_find_blocks_follows_a_given_path_and_rejects_bad_ones():
    moe = seeded(TinyMoE)
    assert find_blocks(moe, "layers.0.experts") == ("layers.0.experts", moe.layers[0].experts)
    with pytest.raises(ValueError, match="blocks='encoder.layer'.*no submodule"):
        find_blocks(moe, "encoder.layer")
    with pytest.raises(ValueError, match="blocks='layers.0.router' must name a non-empty nn.ModuleList.*Linear"):
        find_blocks(moe, "layers.0.router")
    moe.empty = nn.ModuleList()
    with pytest.raises(ValueError, match="an empty ModuleList"):
        find_blocks(moe, "empty")
    with pytest.raises(TypeError, match="blocks must be an attribute path string"):
        find_blocks(moe, 0)
    moe.repeated = nn.ModuleList([moe.layers[0], moe.layers[0]])
    with pytest.raises(ValueError, match="blocks='repeated' holds the same module more than once"):
        find_blocks(moe, "repeated")
    assert find_blocks(moe) == ("layers", moe.layers)


# ---- capturing the first block's inputs --------------------------------------------------

def manual_first_block_calls(model, batches):
    """The (args, kwargs) of every call of layers[0] in a normal run of the whole model."""
    calls = []
    handle = model.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    with torch.no_grad():
        for batch in batches:
            call(model, batch)
    handle.remove()
    return calls


@pytest.mark.parametrize("hidden_as_kwarg", [False, True])
def test_capture_records_exactly_what_the_first_block_receives_and_runs_nothing_after_it(hidden_as_kwarg):
    model = seeded(lambda: TinyDecoder(hidden_as_kwarg=hidden_as_kwarg))
    batches = padded_batches()
    expected = manual_first_block_calls(model, batches)
    later_calls = []
    for m in (model.layers[1], model.norm, model.lm_head):
        m.register_forward_pre_hook(lambda m, args: later_calls.append(m))
    with torch.no_grad():
        captured = capture_block_inputs(model, model.layers[0], prepare_batches(batches), torch.device("cpu"))
    assert later_calls == []
    assert len(captured) == len(expected) == len(batches)
    for got, (args, kwargs) in zip(captured, expected):
        assert len(got.args) == len(args) and set(got.kwargs) == set(kwargs)
        for a, e in zip(got.args, args):
            assert torch.equal(a, e)
        assert torch.equal(got.kwargs["attention_mask"], kwargs["attention_mask"])
        for a, e in zip(got.kwargs["position_embeddings"], kwargs["position_embeddings"]):
            assert torch.equal(a, e)
        assert torch.equal(got.hidden, args[0] if args else kwargs["hidden_states"])
    for got, batch in zip(captured, batches):
        assert torch.equal(got.token_mask, batch["attention_mask"] == 1)
    # the padding of each batch's second sequence reached the blocks
    assert bool((captured[0].kwargs["attention_mask"][1, 0, -1, -1] < -1e3).item())


def test_capture_fails_clearly_when_the_forward_never_calls_the_block():
    model = seeded(TinyDecoder)
    with pytest.raises(RuntimeError, match="calibration batch 0: the model's forward returned without calling"):
        with torch.no_grad():
            capture_block_inputs(model, nn.Linear(2, 2), prepare_batches(token_batches()), torch.device("cpu"))
    assert not model.layers[0]._forward_pre_hooks


# ---- what each layer sees ------------------------------------------------------------------

@pytest.mark.parametrize("sequential", [True, False])
def test_each_layer_sees_its_inputs_in_the_model_transformed_so_far(sequential):
    """sequential: every layer's statistics equal its inputs in the final transformed model
    (its inputs depend only on layers before it, all transformed by then); otherwise block i's
    layers see the model with blocks < i transformed and block i as it was."""
    original = seeded(TinyDecoder)
    model = copy.deepcopy(original)
    batches = padded_batches()
    recorder = Recorder(transform=coarse_round)
    run = calibrate_blocks(model, batches, recorder, sequential=sequential, progress=False)
    assert run.blocks == "layers" and run.num_blocks == 2 and run.outside == ["lm_head"]
    for i in range(2):
        if sequential:
            reference = model
        else:
            reference = copy.deepcopy(original)
            for j in range(i):
                reference.layers[j].load_state_dict(model.layers[j].state_dict())
        names = [f"layers.{i}.{n}" for n in DECODER_BLOCK_LINEARS]
        expected = {name: real_tokens(x, batches) for name, x in layer_inputs(reference, names, batches).items()}
        for name in names:
            assert_same_tensors(recorder.inputs[name], expected[name], name)
            assert recorder.rows[name] == sum(x.numel() // x.shape[-1] for x in expected[name])
    # every Linear of the blocks was transformed, nothing else
    for name in decoder_names():
        assert torch.equal(model.get_submodule(name).weight, coarse_round(original.get_submodule(name).weight))
    assert torch.equal(model.lm_head.weight, original.lm_head.weight)


def test_the_walk_feeds_each_block_the_output_of_the_transformed_previous_block():
    original = seeded(TinyDecoder)
    model = copy.deepcopy(original)
    batches = token_batches()
    recorder = Recorder(transform=coarse_round)
    calibrate_blocks(model, batches, recorder, progress=False)
    # independently: block 0 transformed by hand, run on the captured inputs
    block0 = copy.deepcopy(original.layers[0])
    for n in DECODER_BLOCK_LINEARS:
        w = block0.get_submodule(n).weight
        w.data = coarse_round(w.data)
    calls = manual_first_block_calls(original, batches)
    with torch.no_grad():
        expected = [original.layers[1].input_layernorm(block0(*args, **kwargs)[0]) for args, kwargs in calls]
    assert_same_tensors(recorder.inputs["layers.1.self_attn.q_proj"], expected, "layers.1.self_attn.q_proj")


def test_groups_follow_the_forward_and_share_an_input_and_one_groups_statistics_live_at_a_time():
    recorder = Recorder(count_alive=True)
    calibrate_blocks(seeded(TinyDecoder), token_batches(), recorder, progress=False)
    expected = [[f"layers.{i}.{n}" for n in group] for i in range(2) for group in DECODER_GROUPS]
    assert recorder.groups == expected
    assert recorder.alive_at_process == [sorted(g) for g in expected]


def test_without_sequential_one_group_per_block_and_one_blocks_statistics_live_at_a_time():
    recorder = Recorder(count_alive=True)
    calibrate_blocks(seeded(TinyDecoder), token_batches(), recorder, sequential=False, progress=False)
    per_block = [[f"layers.{i}.{n}" for n in DECODER_BLOCK_LINEARS] for i in range(2)]
    assert recorder.groups == per_block
    assert recorder.alive_at_process == [sorted(b) for b in per_block]
    del recorder
    gc.collect()
    assert len(Inputs.alive) == 0


def test_selection_leaves_other_layers_without_hooks_or_statistics():
    recorder = Recorder(transform=coarse_round, select=lambda name: "mlp" not in name)
    original = seeded(TinyDecoder)
    model = copy.deepcopy(original)
    calibrate_blocks(model, token_batches(), recorder, progress=False)
    assert all("mlp" not in name for group in recorder.groups for name in group)
    assert torch.equal(model.layers[0].mlp.up_proj.weight, original.layers[0].mlp.up_proj.weight)


def test_a_model_without_blocks_is_one_block_over_all_its_linear_layers():
    original = plain_mlp()
    model = copy.deepcopy(original)
    batches = correlated_features()
    recorder = Recorder(transform=coarse_round)
    run = calibrate_blocks(model, batches, recorder, progress=False)
    assert run.blocks is None and run.num_blocks == 1 and run.outside == []
    assert recorder.groups == [["0"], ["2"], ["4"]]
    expected = layer_inputs(model, ["0", "2", "4"], batches)
    for name in ("0", "2", "4"):
        assert_same_tensors(recorder.inputs[name], expected[name], name)


@pytest.mark.parametrize("call_empty_experts", [False, True])
@pytest.mark.parametrize("sequential", [True, False])
def test_an_expert_without_tokens_is_skipped_with_a_warning_never_processed(call_empty_experts, sequential):
    recorder = Recorder(transform=coarse_round)
    original = seeded(lambda: TinyMoE(call_empty_experts=call_empty_experts))
    model = copy.deepcopy(original)
    expected_warning = rf"experts\.{DEAD_EXPERT}\.(up|down): no calibration tokens"
    with pytest.warns(CalibrationWarning, match=expected_warning) as caught:
        calibrate_blocks(model, token_batches(), recorder, sequential=sequential, progress=False)
    dead = [f"layers.{i}.experts.{DEAD_EXPERT}.{n}" for i in range(2) for n in ("up", "down")]
    assert sorted(str(w.message).split(":")[0] for w in caught) == sorted(dead)
    assert sorted(name for name, _, _ in recorder.skipped) == sorted(dead)
    assert all(reason == "no calibration tokens" and rows == 0 for _, reason, rows in recorder.skipped)
    processed = {name for group in recorder.groups for name in group}
    assert not processed & set(dead)
    assert f"layers.1.experts.{(DEAD_EXPERT + 1) % 4}.down" in processed
    for name in dead:
        assert torch.equal(model.get_submodule(name).weight, original.get_submodule(name).weight)


# ---- padding ---------------------------------------------------------------------------------

class Hessians(BlockwisePass):
    """GPTQ's statistics: H = 2/n X^T X accumulated in float32 by the op, per layer, with the rows seen."""

    def __init__(self):
        self.hessians, self.rows = {}, {}

    def new_statistics(self, name, module):
        return HessianStatistics(module.in_features)

    def process(self, block, layers):
        for layer in layers:
            self.hessians[layer.name] = layer.statistics.hessian
            self.rows[layer.name] = layer.rows
            assert layer.statistics.count == layer.rows


class HessianStatistics:
    def __init__(self, features):
        self.hessian, self.count = torch.zeros(features, features), 0

    def update(self, x):
        self.count = ops.gptq_accumulate_hessian(self.hessian, x, self.count)


def unpadded_hessians(model, names, batches):
    """Independently: each sentence run alone without padding, the float64 Hessian of every layer's inputs."""
    inputs = layer_inputs(model, names, unpadded_sentences(batches))
    return {name: reference_hessian(x) for name, x in inputs.items()}, {
        name: sum(t.numel() // t.shape[-1] for t in x) for name, x in inputs.items()}


@pytest.mark.parametrize("sequential", [True, False])
def test_padding_stays_out_of_the_statistics_and_the_sample_counts(sequential):
    model = seeded(TinyDecoder)
    batches = padded_batches()
    names = decoder_names()
    expected, expected_rows = unpadded_hessians(model, names, batches)
    tokens = real_token_count(batches)
    assert tokens == 3 * (2 * SEQ - SEQ // 2)
    padded = Hessians()
    calibrate_blocks(model, batches, padded, sequential=sequential, progress=False)
    unmasked = Hessians()
    calibrate_blocks(model, batches, unmasked, sequential=sequential, token_mask=None, progress=False)
    for name in names:
        h = expected[name]
        tolerance = dict(rtol=1e-5, atol=1e-6 * float(h.abs().max()))
        assert padded.rows[name] == expected_rows[name] == tokens, name
        torch.testing.assert_close(padded.hessians[name].double(), h, **tolerance, msg=lambda m: f"{name}: {m}")
        # the same comparison fails when the padding counts
        assert unmasked.rows[name] == 3 * 2 * SEQ
        assert not torch.allclose(unmasked.hessians[name].double(), h, **tolerance), name


def test_a_callable_token_mask_serves_other_conventions():
    model = seeded(TinyDecoder)
    batches = padded_batches()
    by_dict = Recorder()
    calibrate_blocks(model, batches, by_dict, progress=False)
    # positional batches model(ids, mask): "auto" reads dict batches only, a callable reads these
    positional = [(b["input_ids"], b["attention_mask"]) for b in batches]
    by_callable = Recorder()
    calibrate_blocks(model, positional, by_callable, token_mask=lambda batch: batch[1] == 1, progress=False)
    for name in decoder_names():
        assert_same_tensors(by_callable.inputs[name], by_dict.inputs[name], name)
        assert by_callable.rows[name] == real_token_count(batches)
    for token_mask in ("auto", lambda batch: None):
        everything = Recorder()
        calibrate_blocks(model, positional, everything, token_mask=token_mask, progress=False)
        assert everything.rows["layers.0.self_attn.q_proj"] == 3 * 2 * SEQ


def test_inputs_not_led_by_batch_and_tokens_pass_whole_with_one_debug_note_per_layer(caplog):
    # The MoE block flattens the tokens to [B * T, hidden] before its router and experts.
    batches = token_batches()
    masks = [torch.ones_like(ids, dtype=torch.bool) for ids in batches]
    for m in masks:
        m[0, -3:] = False
    masked = iter(masks)
    recorder = Recorder()
    with caplog.at_level(logging.DEBUG, logger="torchquant.ptq.calibration"):
        with pytest.warns(CalibrationWarning):
            calibrate_blocks(seeded(TinyMoE), batches, recorder, token_mask=lambda ids: next(masked), progress=False)
    notes = [r.getMessage() for r in caplog.records if "does not lead with the token mask" in r.getMessage()]
    named = [note.split(":")[0] for note in notes]
    assert len(named) == len(set(named)), "a layer was noted more than once"
    assert "layers.0.router" in named and "layers.1.experts.0.down" in named
    assert "input of shape [16, 32]" in notes[named.index("layers.0.router")]
    assert recorder.rows["layers.0.router"] == 3 * 2 * SEQ  # passed whole


def test_prepare_batches_reads_the_attention_mask_and_drops_masks_without_padding(caplog):
    ids = token_batches(1)[0]
    padded, full = padded_batches(1)[0], {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    four_d = {"input_ids": ids, "attention_mask": torch.zeros(2, 1, SEQ, SEQ)}
    with caplog.at_level(logging.DEBUG, logger="torchquant.ptq.calibration"):
        calls = prepare_batches([padded, full, ids, (ids,), four_d])
    assert torch.equal(calls[0].token_mask, padded["attention_mask"] == 1) and calls[0].token_mask.dtype == torch.bool
    assert [c.token_mask for c in calls[1:]] == [None] * 4
    assert "calibration batch 4: its attention_mask has shape [2, 1, 8, 8]" in caplog.text
    assert all(c.token_mask is None for c in prepare_batches([padded], token_mask=None))
    bool_mask = prepare_batches([padded], token_mask=lambda b: b["attention_mask"].bool())[0].token_mask
    assert torch.equal(bool_mask, calls[0].token_mask)
    assert calls[0].with_hidden(torch.zeros(1)).token_mask is calls[0].token_mask


def test_select_tokens_takes_the_real_rows_of_batch_major_inputs_only():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    x = torch.randn(2, 3, 4, 5)
    assert torch.equal(select_tokens(x, mask), torch.stack([x[0, 0], x[0, 1], x[1, 0]]))
    flat = torch.randn(6, 5)
    assert select_tokens(flat, mask) is flat
    assert select_tokens(torch.randn(3, 2, 5), mask).shape == (3, 2, 5)  # time-major: not [B, T]
    assert select_tokens(x, None) is x


@pytest.mark.parametrize("token_mask, batch, error, message", [
    ("yes", None, TypeError, "token_mask must be 'auto' .* None .* or a callable"),
    (lambda b: torch.ones(2, 8, 1), None, ValueError,
     r"calibration batch 0: token_mask\(batch\) must be a \[batch, tokens\] tensor .* got shape \[2, 8, 1\]"),
    (lambda b: [[1] * 8] * 2, None, TypeError, r"calibration batch 0: token_mask\(batch\) must be a .* got list"),
    ("auto", {"attention_mask": torch.full((2, SEQ), 2)}, ValueError,
     "calibration batch 0: its attention_mask must hold only 0 and 1"),
    ("auto", {"attention_mask": torch.ones(2, SEQ - 1, dtype=torch.long)}, ValueError,
     r"calibration batch 0: attention_mask has shape \[2, 7\] but input_ids has shape \[2, 8\]"),
])
def test_bad_token_masks_are_refused_clearly_before_anything_runs(token_mask, batch, error, message):
    model = seeded(TinyDecoder)
    batch = {"input_ids": token_batches(1)[0], **(batch or {})}
    recorder = Recorder(transform=coarse_round)
    snapshot = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        calibrate_blocks(model, [batch], recorder, token_mask=token_mask, progress=False)
    assert recorder.groups == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k])


# ---- state, devices, inputs ----------------------------------------------------------------

def test_the_walk_leaves_no_hooks_restores_training_flags_and_accepts_dict_and_tuple_batches():
    model = seeded(TinyDecoder).train()
    model.layers[1].eval()
    batches = [token_batches(1)[0], padded_batches(1)[0], (token_batches(1, seed=3)[0],)]
    recorder = Recorder()
    calibrate_blocks(model, batches, recorder, progress=False)
    assert recorder.rows["layers.0.self_attn.q_proj"] == 3 * 2 * 8 - SEQ // 2  # the padding is not counted
    assert model.training and model.layers[0].training and not model.layers[1].training
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_a_failing_pass_leaves_no_hooks_behind():
    class Failing(Recorder):
        def process(self, block, layers):
            raise RuntimeError("boom")

    model = seeded(TinyDecoder)
    with pytest.raises(RuntimeError, match="boom"):
        calibrate_blocks(model, token_batches(), Failing(), progress=False)
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_blocks_run_on_the_given_device_and_return_to_where_they_were(device):
    original = seeded(TinyDecoder)
    model = copy.deepcopy(original)
    recorder = Recorder(transform=coarse_round)
    calibrate_blocks(model, token_batches(), recorder, device=device, progress=False)
    assert recorder.devices == {torch.device(device).type}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    # same transformation wherever it ran (inputs may differ by float rounding on another device)
    for name in decoder_names():
        w = model.get_submodule(name).weight
        torch.testing.assert_close(w, coarse_round(original.get_submodule(name).weight))


def test_progress_bar_shows_the_blocks(capsys):
    class Postfix(Recorder):
        def process(self, block, layers):
            block.set_postfix(layer=layers[0].name)
            super().process(block, layers)

    calibrate_blocks(seeded(TinyDecoder), token_batches(), Postfix(), progress=True, desc="testing")
    err = capsys.readouterr().err
    assert "testing" in err and "2/2" in err and "layer=layers.1" in err


def test_bad_calibration_data_is_refused_clearly_before_anything_runs():
    model = seeded(TinyDecoder)
    with pytest.raises(ValueError, match="no calibration data"):
        calibrate_blocks(model, [], Recorder(), progress=False)
    with pytest.raises(ValueError, match="no calibration data"):
        calibrate_blocks(model, iter(()), Recorder(), progress=False)
    with pytest.raises(TypeError, match="calibration_batches must be an iterable of batches.*got a Tensor"):
        calibrate_blocks(model, token_batches()[0], Recorder(), progress=False)
    with pytest.raises(TypeError, match="calibration_batches must be an iterable.*got a dict"):
        calibrate_blocks(model, padded_batches()[0], Recorder(), progress=False)
    with pytest.raises(TypeError, match="calibration batch 1 must be a Tensor, a dict.*got int"):
        calibrate_blocks(model, [token_batches()[0], 3], Recorder(), progress=False)
    with pytest.raises(TypeError, match="calibration batch 0: a dict batch must have string keys"):
        calibrate_blocks(model, [{0: token_batches()[0]}], Recorder(), progress=False)
    with pytest.raises(TypeError, match="pass_ must be a BlockwisePass"):
        calibrate_blocks(model, token_batches(), object(), progress=False)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        calibrate_blocks(lambda x: x, token_batches(), Recorder(), progress=False)


def test_block_input_replaces_the_hidden_states_positionally_or_by_keyword():
    h, h2, mask = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    positional = BlockInput((h, mask), {"x": 1}).with_hidden(h2)
    assert positional.args[0] is h2 and positional.args[1] is mask and positional.kwargs == {"x": 1}
    keyword = BlockInput((), {"hidden_states": h, "attention_mask": mask}).with_hidden(h2)
    assert keyword.hidden is h2 and keyword.kwargs["attention_mask"] is mask
