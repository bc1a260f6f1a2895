"""HWA training mode: the hand-written backward (kernels.hwa.AnalogMVMFunction) against autograd through the
reference forward (reference.tiled_mvm(differentiable=True)), on fresh random inputs, for every preset and
for AnalogLinear, the analog experts and the routers of the bundled models; inference left bit-identical."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import romer_kernels.nn.hwa as hwa_module
from romer_kernels.config import PRESETS, IOConfig, TileGrid, preset
from romer_kernels.config.hwa import TRAIN_SEED_OFFSET, HWAConfig
from romer_kernels.kernels.backends import use_backend
from romer_kernels.kernels.hwa import hwa_linear, hwa_linear_reference, training_weights
from romer_kernels.kernels.reference import split_input, split_weight, tiled_mvm
from romer_kernels.models.loading import load_model
from romer_kernels.moe.convert import analogize_
from romer_kernels.nn import AnalogLinear, chip_state_bytes
from romer_kernels.nn.base import AnalogModule
from romer_kernels.nn.hwa import clip_analog_weights_, end_hwa_training_, hwa_training, hwa_training_
from romer_kernels.rng import MvmStreams, chip_key

SMALL_TILES = {"max_input_size": 16, "max_output_size": 8}


def small(name: str):
    return preset(name).replace(tile=SMALL_TILES)


def layer_case(config, hwa: HWAConfig, seed: int, out: int = 12, inp: int = 40, batch: int = 7, x_scale: float = 3.0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=generator).requires_grad_()
    bias = torch.randn(out, generator=generator).requires_grad_()
    x = (torch.randn(batch, inp, generator=generator) * x_scale).requires_grad_()
    grid = TileGrid(out, inp, config.tile.max_input_size, config.tile.max_output_size)
    chip_seed = hwa.step_seed(seed)
    weights = lambda: training_weights(weight, grid, config, "layer", chip_seed, hwa)  # noqa: E731
    streams = MvmStreams(chip_key(chip_seed, "layer"), 0)
    return x, weight, bias, grid, weights, streams


def grads(fn, x, weight, bias, grid, io, weights, streams):
    y = fn(x, weight, bias, grid, io, weights, streams)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(99))
    return (y, *torch.autograd.grad(y, (x, weight, bias), upstream))


def assert_same_gradients(config, hwa=HWAConfig(), seed=0, **shape):
    x, weight, bias, grid, weights, streams = layer_case(config, hwa, seed, **shape)
    mine = grads(hwa_linear, x, weight, bias, grid, config.io, weights, streams)
    reference = grads(hwa_linear_reference, x, weight, bias, grid, config.io, weights, streams)
    assert torch.equal(mine[0], reference[0])  # the same forward values, exactly
    for got, want, name in zip(mine[1:], reference[1:], ("x", "weight", "bias")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=name)
    return x, weight, bias, grid, weights, streams


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("seed", [0, 1])
def test_gradients_match_the_reference_for_every_preset(name, seed):
    assert_same_gradients(small(name), seed=seed)


def _trace(config, x, grid, weights, streams):
    trace = {}
    tiled_mvm(split_input(x.detach(), grid), split_weight(weights()[0], grid), grid.in_sizes, grid.out_sizes,
              config.io, streams, trace=trace)
    return trace


@pytest.mark.parametrize("io_change, what", [
    ({"noise_management": "constant", "nm_thres": 0.5, "bound_management": "none"}, "dac_clip"),
    ({"out_bound": 1.5, "bound_management": "none"}, "adc_clip"),
    ({"out_bound": 1.0, "bound_management": "iterative"}, "rounds"),
    ({"inp_noise": 0.05, "w_noise": 0.02, "w_noise_type": "additive_constant", "ir_drop": 2.0}, "noise"),
])
def test_every_gradient_path_is_exercised_and_matches(io_change, what):
    """Clipped DAC inputs, clipped ADC outputs, several bound-management rounds, input / read noise and IR
    drop: each case is checked to occur, then the gradients are compared."""
    config = small("aihwkit-default").replace(io=io_change)
    x, weight, bias, grid, weights, streams = assert_same_gradients(config, seed=3)
    trace = _trace(config, x, grid, weights, streams)
    if what == "adc_clip":
        assert trace["clipped"].any() and not trace["clipped"].all()
    if what == "rounds":
        assert int(trace["round"].max()) >= 2
    if what == "dac_clip":
        assert bool((x.detach().abs() > 0.5).any())
        # a clipped input gets no gradient through this layer
        _, gx, _, _ = grads(hwa_linear, x, weight, bias, grid, config.io, weights, streams)
        assert float(gx[x.detach().abs() > 0.51].abs().max()) == 0.0


@pytest.mark.parametrize("weight_noise", ["gaussian", "none"])
def test_other_weight_noises_match_the_reference(weight_noise):
    assert_same_gradients(small("rasch2023"), HWAConfig(weight_noise=weight_noise), seed=5)


def test_ideal_preset_gives_the_digital_gradients():
    config = preset("ideal")
    x, weight, bias, grid, weights, streams = layer_case(config, HWAConfig(), 2)
    y, gx, gw, gb = grads(hwa_linear, x, weight, bias, grid, config.io, weights, streams)
    digital = grads(lambda x, w, b, *_: nn.functional.linear(x, w, b), x, weight, bias, grid, config.io, weights,
                    streams)
    for got, want in zip((y, gx, gw, gb), digital):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_straight_through_weight_gradient_is_the_identity_through_the_noise():
    """Without quantization, clipping and noise the gradients are those of a digital layer with the noisy
    weights W_P * s (input side) and the clean input (weight side): what straight-through means."""
    io = IOConfig(inp_bound=1e3, inp_res=0, out_res=0, out_bound=0, out_noise=0, noise_management="none",
                  bound_management="none")
    config = small("rasch2023").replace(io=io)
    x, weight, bias, grid, weights, streams = layer_case(config, HWAConfig(), 4)
    y, gx, gw, gb = grads(hwa_linear, x, weight, bias, grid, io, weights, streams)
    programmed, scales = weights()
    scale = torch.cat([scales[i][:, None].expand(-1, c.stop - c.start) for i, c in enumerate(grid.in_slices())], 1)
    noisy = (programmed * scale).detach()
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(99))
    torch.testing.assert_close(gx, upstream @ noisy, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gw, upstream.T @ x.detach(), rtol=1e-5, atol=1e-4)
    assert not torch.equal(noisy, weight.detach())  # the forward did see noisy weights


@pytest.mark.parametrize("name", ["rasch2023", "aihwkit-default", "gaussian-chip"])
def test_a_training_chip_is_a_chip(name):
    """The training forward of step k is the inference forward of the layer programmed with chip seed
    ``HWAConfig.step_seed(k)`` (reference backend, first forward call): bit-identical."""
    config = preset(name).replace(tile=SMALL_TILES, drift_compensation={"kind": "none"})
    layer = AnalogLinear(40, 12, config=config, layer_id="layer")
    x = torch.randn(5, 40) * 2
    hwa = HWAConfig(seed=1)
    with hwa_training(layer, hwa) as training:
        training.step = 7
        trained = layer(x)
        assert trained.grad_fn is not None
    with use_backend("reference"):
        layer.program_(hwa.step_seed(7))
        with torch.no_grad():
            chip = layer(x)
    assert torch.equal(trained.detach(), chip)
    assert hwa.step_seed(0) >= TRAIN_SEED_OFFSET


def test_inference_is_unchanged_by_training_mode():
    """A converted model computes bit-identically before HWA training mode, inside it under no_grad, and
    after it (same chips: the freed chips are programmed again from the same seeds)."""
    model, _ = load_model("tiny-olmoe")
    analogize_(model, "rasch2023", seed=3)
    ids = torch.randint(0, 4000, (2, 24), generator=torch.Generator().manual_seed(0))

    def logits():
        from romer_kernels.nn import reset_noise_counters

        reset_noise_counters(model)
        with torch.no_grad():
            return model(ids).logits

    before = logits()
    training = hwa_training_(model, HWAConfig())
    assert chip_state_bytes(model) == 0  # training holds no chip
    inside = logits()
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    model.eval()
    training.active = False
    with torch.enable_grad():
        assert logits().grad_fn is None  # switched off: the chips' forward, no graph
    end_hwa_training_(model)
    after = logits()
    assert torch.equal(before, inside) and torch.equal(before, after)


def test_no_weight_sized_tensor_is_kept_for_the_backward():
    layer = AnalogLinear(96, 64, config=preset("rasch2023").replace(tile={"max_input_size": 32}))
    x = torch.randn(4, 96)
    saved = []
    with hwa_training(layer):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            y = layer(x)
        y.sum().backward()
    assert saved and max(saved) < layer.weight.numel() // 4
    assert layer.weight.grad is not None and layer.bias.grad is not None


def test_a_weight_changed_before_the_backward_is_refused():
    layer = AnalogLinear(24, 8, config=small("rasch2023"))
    with hwa_training(layer):
        y = layer(torch.randn(3, 24))
        with torch.no_grad():
            layer.weight.add_(0.01)
        with pytest.raises(RuntimeError, match="changed between the HWA forward and its backward"):
            y.sum().backward()


@pytest.mark.parametrize("model_name", ["tiny-olmoe", "tiny-deepseek"])
@pytest.mark.parametrize("name", ["rasch2023", "aihwkit-default", "rasch2023-hermes", "lightning-8bit"])
def test_model_gradients_match_the_reference(model_name, name, monkeypatch):
    """Every parameter's gradient of a whole converted model -- attention and dense AnalogLinears, every
    expert's gate_up / down, the analog routers (through the routing weights) -- with the hand-written
    backward and with autograd through the reference."""
    model, _ = load_model(model_name)
    analogize_(model, name)
    ids = torch.randint(0, 4000, (2, 16), generator=torch.Generator().manual_seed(1))
    training = hwa_training_(model, HWAConfig())
    model.train()

    def gradients():
        training.step = 11
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    mine = gradients()
    with monkeypatch.context() as patch:
        patch.setattr(hwa_module, "hwa_linear", hwa_linear_reference)
        reference = gradients()
    assert set(mine) == set(reference) == {n for n, p in model.named_parameters() if p.requires_grad}
    routers = [n for n in mine if "gate.weight" in n or "router" in n]
    assert routers and all(float(mine[n].abs().max()) > 0 for n in routers)
    for name_, grad in mine.items():
        torch.testing.assert_close(grad, reference[name_], rtol=1e-4, atol=1e-6 + 1e-4 * float(reference[name_].abs().max()),
                                   msg=name_)


def _analog_weights(model):
    for module in model.modules():
        if isinstance(module, AnalogModule):
            try:
                yield from (weight for _, weight in module._matrices())
            except NotImplementedError:
                continue


def test_clipping_bounds_every_analog_matrix():
    """Each analog matrix is clipped to +-2 x its own standard deviation (before the clip)."""
    model, _ = load_model("tiny-olmoe")
    analogize_(model, "rasch2023")
    bounds = [2.0 * float(weight.detach().std()) for weight in _analog_weights(model)]
    assert clip_analog_weights_(model, 2.0) > 0
    after = [float(weight.detach().abs().max()) for weight in _analog_weights(model)]
    assert len(after) == len(bounds) > 50
    assert all(high <= bound * (1 + 1e-6) for high, bound in zip(after, bounds))
    with pytest.raises(ValueError, match="clip sigma"):
        clip_analog_weights_(model, 0.0)


def test_hwa_config_is_checked():
    with pytest.raises(ValueError, match="HWAConfig.weight_noise"):
        HWAConfig(weight_noise="pcm")
    with pytest.raises(ValueError, match="HWAConfig.weight_noise_scale"):
        HWAConfig(weight_noise_scale=-1)
    with pytest.raises(ValueError, match="training step"):
        HWAConfig().step_seed(-1)
    assert dataclasses.replace(HWAConfig(), seed=2).step_seed(0) != HWAConfig().step_seed(0)
    with pytest.raises(ValueError, match="converted model"):
        hwa_training_(nn.Linear(3, 3))
