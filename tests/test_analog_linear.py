"""AnalogLinear as a drop-in nn.Linear: equivalence, chip life cycle, determinism, persistence."""
import io

import pytest
import torch
from torch import nn

from romer_kernels import AnalogLinear, drift_analog_, preset, program_analog_, set_mvm_noise
from romer_kernels.config import AnalogConfig, IOConfig, MappingConfig
from romer_kernels.evaluation import relative_error


def _linear(in_features=1000, out_features=700, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


@pytest.mark.parametrize("shape", [(1000, 700), (1537, 513), (3, 1025)])
def test_ideal_preset_equals_nn_linear(shape):
    linear = _linear(*shape, seed=sum(shape))
    layer = AnalogLinear.from_linear(linear, "ideal")
    x = torch.randn(5, 7, shape[0])
    assert relative_error(layer(x), linear(x)) <= 1e-6
    assert layer(x).shape == (5, 7, shape[1])


def test_from_linear_and_to_linear_copy_weights():
    linear = _linear(64, 32)
    layer = AnalogLinear.from_linear(linear, "rasch2023")
    back = layer.to_linear()
    assert torch.equal(back.weight, linear.weight) and torch.equal(back.bias, linear.bias)
    no_bias = AnalogLinear.from_linear(nn.Linear(8, 4, bias=False), "ideal")
    assert no_bias.bias is None
    with pytest.raises(TypeError, match="nn.Linear"):
        AnalogLinear.from_linear(nn.Conv1d(2, 2, 1))


@pytest.mark.parametrize("name", ["aihwkit-default", "rasch2023", "lightning-8bit", "gaussian-chip"])
def test_same_seed_same_chip_other_seed_other_chip(name):
    linear = _linear(600, 300)
    x = torch.randn(4, 600)
    a = AnalogLinear.from_linear(linear, name, seed=7).program_()
    b = AnalogLinear.from_linear(linear, name, seed=7).program_()
    c = AnalogLinear.from_linear(linear, name, seed=8).program_()
    assert torch.equal(a(x), b(x))
    assert not torch.equal(a.effective_weight(), c.effective_weight())


def test_per_mvm_noise_is_fresh_each_call_and_reproducible_after_reset():
    layer = AnalogLinear.from_linear(_linear(256, 64), "aihwkit-default", seed=1)
    x = torch.randn(3, 256)
    first, second = layer(x), layer(x)
    assert not torch.equal(first, second)
    layer.reset_noise_counter()
    assert torch.equal(layer(x), first)
    layer.mvm_noise = False
    assert torch.equal(layer(x), layer(x))


def test_eval_and_train_mode_compute_the_same():
    layer = AnalogLinear.from_linear(_linear(128, 32), "aihwkit-default", seed=3)
    x = torch.randn(2, 128)
    y_train = layer.train()(x)
    layer.reset_noise_counter()
    assert torch.equal(layer.eval()(x), y_train)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_computed_in_float32_and_returned_in_their_dtype(dtype):
    layer = AnalogLinear.from_linear(_linear(96, 40), "rasch2023", seed=2)
    x = torch.randn(6, 96).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    layer.reset_noise_counter()
    expected = layer(x.float()).to(dtype)
    assert torch.equal(y, expected)


def test_state_dict_round_trip_restores_the_same_chip():
    linear = _linear(700, 300)
    layer = AnalogLinear.from_linear(linear, "aihwkit-default", seed=11, layer_id="blk.0")
    layer.program_().drift_(60.0).drift_(3600.0)
    x = torch.randn(5, 700)
    layer.reset_noise_counter()
    y = layer(x)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = AnalogLinear(700, 300, config="ideal")
    fresh.load_state_dict(torch.load(buffer, weights_only=False))
    assert fresh.config == layer.config and fresh.seed == 11 and fresh.t_inference == 3600.0
    assert torch.equal(fresh.effective_weight(), layer.effective_weight())
    fresh.reset_noise_counter()
    assert torch.equal(fresh(x), y)


def test_changed_weights_reprogram_the_chip():
    layer = AnalogLinear.from_linear(_linear(64, 16), "gaussian-chip", seed=0)
    x = torch.randn(2, 64)
    layer(x)
    before = layer.effective_weight()
    with torch.no_grad():
        layer.weight.mul_(2.0)
    assert not layer.is_programmed
    layer(x)
    assert layer.is_programmed and not torch.equal(layer.effective_weight(), before)
    # same seed, doubled weights: the Gaussian chip noise (relative to the column max) doubles too
    torch.testing.assert_close(layer.effective_weight(), 2 * before, rtol=1e-5, atol=1e-6)


def test_non_finite_inputs_give_nan_rows_and_leave_other_rows_and_state_intact():
    linear = _linear(300, 50)
    layer = AnalogLinear.from_linear(linear, "aihwkit-default", seed=5)
    twin = AnalogLinear.from_linear(linear, "aihwkit-default", seed=5)
    x = torch.randn(4, 300)
    bad = x.clone()
    bad[1, 3] = float("nan")
    bad[2, 0] = float("inf")
    y_bad, y_good = layer(bad), twin(x)
    assert torch.isnan(y_bad[1]).all() and torch.isnan(y_bad[2]).all()
    torch.testing.assert_close(y_bad[[0, 3]], y_good[[0, 3]], rtol=0, atol=0)
    torch.testing.assert_close(layer(x), twin(x), rtol=0, atol=0)


def test_drift_changes_weights_and_global_compensation_restores_scale():
    linear = _linear(512, 256)
    x = torch.randn(64, 512)
    y_ref = linear(x)
    config = preset("aihwkit-default").replace(mapping=MappingConfig(weight_scaling_omega=1.0))
    comp = AnalogLinear.from_linear(linear, config, seed=4)
    raw = AnalogLinear.from_linear(linear, config.replace(drift_compensation=preset("ideal").drift_compensation),
                                   seed=4)
    comp.drift_(86400.0)
    raw.drift_(86400.0)
    # one day of PCM drift shrinks weights by about 1/3; compensation brings the output scale back
    assert relative_error(raw(x), y_ref) > 0.25
    assert relative_error(comp(x), y_ref) < 0.2
    first = comp.effective_weight()
    comp.drift_(86400.0)  # a second read at the same time draws new read noise
    assert not torch.equal(first, comp.effective_weight())


def test_model_helpers_program_and_switch_noise():
    model = nn.Sequential(AnalogLinear(32, 16, config="aihwkit-default"), nn.ReLU(),
                          AnalogLinear(16, 4, config="aihwkit-default", layer_id=1))
    program_analog_(model, 9)
    assert all(m.seed == 9 and m.is_programmed for m in model if isinstance(m, AnalogLinear))
    drift_analog_(model, 100.0)
    set_mvm_noise(model, False)
    x = torch.randn(3, 32)
    assert torch.equal(model(x), model(x))
    with pytest.raises(ValueError, match="no analog layers"):
        program_analog_(nn.Linear(2, 2), 0)


def test_bad_inputs_raise_clear_errors():
    layer = AnalogLinear(8, 4, config="ideal")
    with pytest.raises(ValueError, match="last dimension 8"):
        layer(torch.randn(2, 9))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="seed"):
        AnalogLinear(8, 4, seed=-1)
    with pytest.raises(ValueError, match="t_inference"):
        layer.drift_(-1.0)
    with pytest.raises(ValueError, match="unknown preset"):
        AnalogLinear(8, 4, config="nope")


def test_repr_names_the_chip():
    text = repr(AnalogLinear(1000, 700, config="rasch2023", seed=3, layer_id="mlp.up"))
    for part in ("in_features=1000", "tiles=2x1", "noise=pcm", "seed=3", "layer_id='mlp.up'", "not programmed"):
        assert part in text


def test_io_error_matches_aihwkit_reference_statistics():
    """aihwkit-anchor.md section 5B: 512x512 nn.Linear, X = randn(256, 512), IO only, C++ tile."""
    torch.manual_seed(0)
    linear = nn.Linear(512, 512)
    x = torch.randn(256, 512)
    y_ref = linear(x)
    cases = {
        "default": (AnalogConfig(io=IOConfig()), 0.3495),
        "omega1": (AnalogConfig(io=IOConfig(), mapping=MappingConfig(weight_scaling_omega=1.0)), 0.0376),
    }
    for name, (config, expected) in cases.items():
        errors = [relative_error(AnalogLinear.from_linear(linear, config, seed=s)(x), y_ref) for s in range(4)]
        assert sum(errors) / len(errors) == pytest.approx(expected, rel=0.03), name
