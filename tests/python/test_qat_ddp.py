"""QAT under DistributedDataParallel: two CPU processes (gloo), each training on
its own data, must end with identical gradients, parameters, observers and
grids."""
import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from torchquant import QuantSpec
from torchquant.observers import make_observer
from torchquant.qat import W8A8, LayerQuant, prepare_qat

WORLD = 2
STEPS = 3
TIMEOUT_S = 90


def percentile_config():
    """Fixed grids observed on every batch, with a percentile observer on the last layer's input."""
    config = W8A8(learnable=False)
    weight = config.default.weight
    config.by_name["2"] = LayerQuant(weight, QuantSpec(bits=8, symmetric=False, observer="percentile",
                                                       percentile=99.0))
    return config


CONFIGS = {"learnable": lambda: W8A8(), "observed": percentile_config}


def batch(rank, step):
    """Each rank's data differs, in spread too, so local ranges would differ."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 6, generator=g) * (1 + 2 * rank), torch.randint(0, 4, (8,), generator=g)


OBSERVER_SPECS = {
    "minmax": QuantSpec(granularity="channel", axis=0),
    "percentile": QuantSpec(granularity="channel", axis=0, observer="percentile", percentile=90.0),
}


def observer_batch(rank):
    g = torch.Generator().manual_seed(rank)
    return torch.randn(3, 40, generator=g) * (1 + rank) + rank


def observe_on_rank(rank):
    """Standalone observers, each fed this rank's own batch once."""
    out = {}
    for name, spec in OBSERVER_SPECS.items():
        observer = make_observer(spec)
        observer(observer_batch(rank))
        out[name] = (observer.min_val, observer.max_val)
    return out


def train_on_rank(rank, config_name):
    torch.manual_seed(0)  # the same initial model on every rank
    model = prepare_qat(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)), CONFIGS[config_name]())
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for step in range(STEPS):
        opt.zero_grad()
        x, y = batch(rank, step)
        F.cross_entropy(ddp(x), y).backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
        opt.step()
    return {"grads": grads, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def worker(rank, port, out_dir):
    """Runs in a spawned process; writes its results (or its traceback) to ``out_dir``."""
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S // 2))
        try:
            results = {name: train_on_rank(rank, name) for name in CONFIGS}
            results["observers"] = observe_on_rank(rank)
        finally:
            dist.destroy_process_group()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        raise


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out_dir = str(tmp_path_factory.mktemp("ddp"))
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(rank, port, out_dir)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    errors = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir)) if f.endswith(".error")]
    assert not hung, f"{len(hung)} rank(s) still running after {TIMEOUT_S} s"
    assert not errors, "\n".join(errors)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


def assert_identical(a, b, what):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what} {key!r} differs between ranks:\n{a[key]}\n{b[key]}"


@pytest.mark.parametrize("config_name", CONFIGS)
def test_gradients_are_identical_across_ranks(rank_results, config_name):
    grads = [r[config_name]["grads"] for r in rank_results]
    if config_name == "learnable":
        assert any(k.endswith("input_fake_quant.scale") for k in grads[0])
        assert any(k.endswith("input_fake_quant.zero_point") for k in grads[0])
        assert any(k.endswith("weight_fake_quant.scale") for k in grads[0])
    assert_identical(grads[0], grads[1], "gradient")


@pytest.mark.parametrize("config_name", CONFIGS)
def test_parameters_observers_and_grids_are_identical_across_ranks(rank_results, config_name):
    states = [r[config_name]["state"] for r in rank_results]
    assert any(k.endswith("input_fake_quant.observer.min_val") for k in states[0])
    assert_identical(states[0], states[1], "state")


def test_learnable_grids_start_from_the_range_of_the_whole_distributed_batch(rank_results):
    # A learnable activation grid is initialised by the first batch: the
    # union of both ranks' first batches, not one rank's own.
    first = torch.cat([batch(rank, 0)[0] for rank in range(WORLD)])
    state = rank_results[0]["learnable"]["state"]
    assert torch.equal(state["0.input_fake_quant.observer.min_val"], first.min().reshape(1))
    assert torch.equal(state["0.input_fake_quant.observer.max_val"], first.max().reshape(1))
    local = batch(0, 0)[0]
    assert not torch.equal(state["0.input_fake_quant.observer.max_val"], local.max().reshape(1))


def test_min_max_observers_track_the_range_of_every_rank(rank_results):
    seen = torch.cat([batch(rank, step)[0] for rank in range(WORLD) for step in range(STEPS)])
    state = rank_results[1]["observed"]["state"]
    # Moving averages of the global batch ranges stay inside the overall range and beyond rank 0's.
    lo, hi = state["0.input_fake_quant.observer.min_val"], state["0.input_fake_quant.observer.max_val"]
    rank0 = torch.cat([batch(0, step)[0] for step in range(STEPS)])
    assert seen.min() <= lo < rank0.min() and rank0.max() < hi <= seen.max()


def local_range(name, rank):
    observer = make_observer(OBSERVER_SPECS[name])
    observer(observer_batch(rank))  # no process group here: this rank's batch only
    return observer.min_val, observer.max_val


def test_min_max_observers_all_reduce_the_extremes(rank_results):
    (lo0, hi0), (lo1, hi1) = (local_range("minmax", r) for r in range(WORLD))
    assert not torch.equal(lo0, lo1) and not torch.equal(hi0, hi1)
    for result in rank_results:
        lo, hi = result["observers"]["minmax"]
        assert torch.equal(lo, torch.minimum(lo0, lo1)) and torch.equal(hi, torch.maximum(hi0, hi1))


def test_percentile_observers_average_the_ranks_percentiles(rank_results):
    (lo0, hi0), (lo1, hi1) = (local_range("percentile", r) for r in range(WORLD))
    for result in rank_results:
        lo, hi = result["observers"]["percentile"]
        torch.testing.assert_close(lo, (lo0 + lo1) / 2, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(hi, (hi0 + hi1) / 2, rtol=1e-6, atol=1e-6)
