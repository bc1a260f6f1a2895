"""A chip costs at most one weight copy: every tensor a programmed, drifted and used chip holds, counted.

Deterministic (no timing, no RSS): ``AnalogMatrix.held_tensors`` lists every tensor attribute of the
matrix and its chip, and the sum of their bytes must stay within one ``[out, in]`` tensor in the state
dtype plus the per-column vectors (weight scaling, drift-compensation baseline, out_scale: [n_in_tiles,
out] float32 each). Also checked: re-drifting and re-programming in place give the chip a fresh chip of
the same seed gives (the state is a pure function of weights, seed, layer and time).
"""
from __future__ import annotations

import pytest
import torch

from romer_kernels import AnalogLinear, preset
from romer_kernels.config.device_noise import HermesNoiseConfig, ReRamWan2022NoiseConfig
from romer_kernels.nn import chip_state_bytes
from romer_kernels.nn.analog_experts import AnalogExperts

PRESETS = ["ideal", "aihwkit-default", "rasch2023", "lightning-8bit", "gaussian-chip"]
EXTRA = {"hermes": HermesNoiseConfig(), "reram": ReRamWan2022NoiseConfig()}
STATE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DAY = 86400.0


def config_of(name: str, state_dtype: str):
    if name in EXTRA:
        return preset("aihwkit-default").replace(noise=EXTRA[name], state_dtype=state_dtype)
    return preset(name).replace(state_dtype=state_dtype)


def one_copy_bound(out_features: int, in_features: int, tile_in: int, state_dtype: str) -> int:
    n_in_tiles = -(-in_features // tile_in) if tile_in > 0 else 1
    return out_features * in_features * STATE_BYTES[state_dtype] + 3 * n_in_tiles * out_features * 4


def used_layer(config, out_features=96, in_features=700, seed=3) -> AnalogLinear:
    torch.manual_seed(0)
    layer = AnalogLinear(in_features, out_features, config=config, seed=seed, layer_id="mem")
    x = torch.randn(5, in_features)
    layer.program_(seed=seed)
    layer(x)
    layer.drift_(DAY)   # 1 day: a fitted ReRAM time too
    layer(x)
    layer(torch.randn(300, in_features))   # the GEMM path (more than a few rows)
    layer.drift_(DAY)   # a second drift of the same programming
    layer(x)
    return layer


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", PRESETS + list(EXTRA))
def test_a_used_chip_holds_at_most_one_weight_copy(name, state_dtype):
    config = config_of(name, state_dtype)
    layer = used_layer(config)
    held = layer.analog.held_tensors()
    total = sum(t.untyped_storage().nbytes() for t in held.values())
    bound = one_copy_bound(96, 700, config.tile.max_input_size, state_dtype)
    assert total <= bound, {k: (tuple(t.shape), t.dtype) for k, t in held.items()}
    weight_sized = [k for k, t in held.items() if t.numel() >= 96 * 700]
    assert weight_sized == ["chip.state"], weight_sized
    assert held["chip.state"].dtype == getattr(torch, state_dtype)
    assert chip_state_bytes(layer) == total


def test_experts_chip_bytes_are_one_copy_per_expert_matrix():
    config = preset("rasch2023")
    experts, hidden, inter = 4, 48, 40
    gate_up = torch.nn.Parameter(torch.randn(experts, 2 * inter, hidden) * 0.1)
    down = torch.nn.Parameter(torch.randn(experts, hidden, inter) * 0.1)
    module = AnalogExperts(gate_up, down, torch.nn.SiLU(), config, seed=1)
    module.program_(seed=1).drift_(3600.0)
    tokens = torch.randn(20, hidden)
    index = torch.randint(0, experts, (20, 2))
    module(tokens, index, torch.rand(20, 2))
    module.drift_(DAY)
    module(tokens, index, torch.rand(20, 2))
    bound = experts * (one_copy_bound(2 * inter, hidden, config.tile.max_input_size, "float32")
                       + one_copy_bound(hidden, inter, config.tile.max_input_size, "float32"))
    assert chip_state_bytes(module) <= bound


@pytest.mark.parametrize("name", ["aihwkit-default", "rasch2023", "gaussian-chip", "reram", "hermes"])
def test_redrift_and_reprogram_in_place_equal_a_fresh_chip(name):
    """The state is rewritten in place: drifting again (drift call 1 after call 0), replaying a drift call
    and re-programming with another seed give exactly what a fresh chip gives."""
    config = config_of(name, "float32")
    torch.manual_seed(1)
    weight = torch.randn(64, 300) * 0.1
    x = torch.randn(7, 300)

    def fresh(seed, *times):
        layer = AnalogLinear(300, 64, bias=False, config=config, seed=seed, layer_id="same")
        with torch.no_grad():
            layer.weight.copy_(weight)
        layer.program_(seed=seed)
        for t in times:
            layer.drift_(t)
        return layer

    used = fresh(5, DAY)
    state_memory = used.analog.chip.state.data_ptr()
    used.drift_(2 * DAY)                     # drift call 1, from a drifted state: W_P is made again
    expected = fresh(5, DAY, 2 * DAY)
    assert torch.equal(used.analog.chip.state, expected.analog.chip.state)
    assert torch.equal(used.analog.chip.out_scale, expected.analog.chip.out_scale)
    used.analog.drift(used.weight, DAY, drift_index=0)   # replay drift call 0
    assert torch.equal(used.analog.chip.state, fresh(5, DAY).analog.chip.state)
    used.program_(seed=9)
    used.drift_(DAY)
    other = fresh(9, DAY)
    assert torch.equal(used.analog.chip.state, other.analog.chip.state)
    assert used.analog.chip.state.data_ptr() == state_memory   # the chip's one tensor, written in place
    used.reset_noise_counter()
    other.reset_noise_counter()
    assert torch.equal(used(x), other(x))


def test_snapshot_is_a_copy_and_state_dtype_is_validated():
    layer = used_layer(preset("aihwkit-default"))
    snap = layer.analog.chip.snapshot()
    layer.drift_(2 * DAY)
    assert not torch.equal(snap, layer.analog.chip.state)
    with pytest.raises(ValueError, match="state_dtype"):
        preset("aihwkit-default").replace(state_dtype="int8")


@pytest.mark.parametrize("name", ["aihwkit-default", "rasch2023"])
def test_bfloat16_state_is_the_rounded_float32_state(name):
    """A bfloat16 chip holds the float32 chip's read weights rounded once (the readout then sees the
    rounded weights, so out_scale differs by the rounding only)."""
    exact = used_layer(config_of(name, "float32"))
    half = used_layer(config_of(name, "bfloat16"))
    rounded = exact.analog.chip.state.to(torch.bfloat16)
    assert torch.equal(half.analog.chip.state, rounded)
    torch.testing.assert_close(half.analog.chip.out_scale, exact.analog.chip.out_scale, rtol=2e-2, atol=0)
