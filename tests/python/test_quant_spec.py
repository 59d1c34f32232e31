"""QuantSpec: defaults, integer ranges and validation of every field."""
import dataclasses

import pytest
import torch  # noqa: F401  (loaded before the extension that links against it)

from torchquant import QuantSpec, quant_range


def test_defaults_describe_int8_symmetric_per_tensor_minmax():
    spec = QuantSpec()
    assert (spec.bits, spec.symmetric, spec.granularity, spec.group_size) == (8, True, "tensor", None)
    assert (spec.observer, spec.learnable) == ("minmax", False)
    assert spec.quant_range == (-128, 127)


@pytest.mark.parametrize("bits", range(2, 17))
@pytest.mark.parametrize("symmetric", [True, False])
def test_quant_range_matches_the_integer_code(bits, symmetric):
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    expected = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
    assert (spec.quant_min, spec.quant_max) == expected
    assert spec.quant_range == expected
    assert quant_range(bits, signed=symmetric) == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(granularity="channel", axis=1),
        dict(granularity="channel", axis=-1),
        dict(granularity="group", group_size=32),
        dict(observer="percentile", percentile=99.9, freeze_observer_after=10),
        dict(bits=2, symmetric=False, observer="moving_average_minmax", averaging_constant=1.0, learnable=True),
    ],
)
def test_valid_specs_are_accepted(kwargs):
    spec = QuantSpec(**kwargs)
    for name, value in kwargs.items():
        assert getattr(spec, name) == value


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(bits=1), "bits"),
        (dict(bits=17), "bits"),
        (dict(bits=0), "bits"),
        (dict(bits=8.0), "bits"),
        (dict(bits=True), "bits"),
        (dict(granularity="group"), "group_size"),
        (dict(granularity="group", group_size=0), "group_size"),
        (dict(granularity="group", group_size=-4), "group_size"),
        (dict(granularity="group", group_size=2.5), "group_size"),
        (dict(granularity="group", group_size=True), "group_size"),
        (dict(granularity="tensor", group_size=32), "group_size"),
        (dict(granularity="channel", group_size=32), "group_size"),
        (dict(granularity="row"), "granularity"),
        (dict(granularity="Tensor"), "granularity"),
        (dict(granularity="channel", axis=1.0), "axis"),
        (dict(granularity="channel", axis=None), "axis"),
        (dict(observer="max"), "observer"),
        (dict(observer=None), "observer"),
        (dict(averaging_constant=0.0), "averaging_constant"),
        (dict(averaging_constant=1.5), "averaging_constant"),
        (dict(percentile=50.0), "percentile"),
        (dict(percentile=100.5), "percentile"),
        (dict(freeze_observer_after=0), "freeze_observer_after"),
        (dict(freeze_observer_after=2.0), "freeze_observer_after"),
    ],
)
def test_invalid_field_raises_value_error_naming_it(kwargs, field):
    with pytest.raises(ValueError, match=rf"QuantSpec\.{field}\b"):
        QuantSpec(**kwargs)


def test_spec_is_frozen_and_hashable():
    spec = QuantSpec(bits=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 8
    assert {spec: 1}[QuantSpec(bits=4)] == 1
    assert QuantSpec(bits=4) != QuantSpec(bits=5)


def test_with_returns_a_validated_copy():
    spec = QuantSpec(bits=4, granularity="channel", axis=0)
    changed = spec.with_(bits=2, symmetric=False)
    assert (changed.bits, changed.symmetric, changed.granularity) == (2, False, "channel")
    assert spec.bits == 4 and spec.symmetric
    with pytest.raises(ValueError, match=r"QuantSpec\.bits"):
        spec.with_(bits=20)
    with pytest.raises(ValueError, match=r"QuantSpec\.group_size"):
        spec.with_(granularity="group")
