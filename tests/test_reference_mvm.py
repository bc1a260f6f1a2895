"""The reference tiled MVM against the aihwkit IO maths, on hand-made and fresh random inputs."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from romer_kernels.config import IOConfig, TileGrid, get_split_sizes
from romer_kernels.config.analog import resolution_step
from romer_kernels.kernels.reference import analog_linear, split_weight, tiled_mvm
from romer_kernels.rng import Purpose, stream_seed


def _seeds(chip_seed=0):
    return lambda purpose, bm_round: stream_seed(chip_seed, "test", purpose, bm_round)


def _run(x, w, io, seeds=None, max_in=0, max_out=0):
    grid = TileGrid(w.shape[0], w.shape[1], max_in, max_out)
    return analog_linear(x, split_weight(w, grid), torch.ones(len(grid.in_sizes), w.shape[0]), None, grid, io, seeds)


def test_split_sizes_match_aihwkit():
    assert get_split_sizes(1408, 512) == [470, 469, 469]
    assert get_split_sizes(2048, 512) == [512] * 4
    assert get_split_sizes(700, 0) == [700]
    assert get_split_sizes(1000, 512) == [500, 500]
    with pytest.raises(ValueError):
        get_split_sizes(0, 512)


@pytest.mark.parametrize("inp_res, levels", [(1 / 126, 127), (254, 255), (1 / 14, 15)])
def test_dac_produces_the_stated_number_of_levels(inp_res, levels):
    io = IOConfig(inp_res=inp_res, out_res=0, out_bound=0, out_noise=0, bound_management="none")
    x = torch.linspace(-1, 1, 4001)[None, :]
    y = _run(x, torch.eye(4001), io)
    assert torch.unique(y).numel() == levels
    assert resolution_step(inp_res, 1.0) == pytest.approx(2 / (levels - 1))


@pytest.mark.parametrize("out_res, levels", [(1 / 510, 511), (254, 255)])
def test_adc_produces_the_stated_number_of_levels_and_clips(out_res, levels):
    io = IOConfig(inp_res=0, out_res=out_res, out_bound=12.0, out_noise=0, noise_management="none",
                  bound_management="none")
    x = torch.linspace(-1, 1, 3001)[None, :]
    y = _run(x, 13.0 * torch.eye(3001), io)
    assert torch.unique(y).numel() == levels
    assert float(y.abs().max()) == pytest.approx(12.0)


def test_bound_management_halves_only_the_clipping_vectors():
    w = torch.zeros(2, 4)
    w[0, 0] = 20.0  # first output of a vector with x = e0 reaches 20 > 12: clips at r = 1, fits at r = 2
    w[1, 1] = 0.5
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.3, 0.2, 0.0]])
    quiet = dict(out_noise=0.0)
    y_iter = _run(x, w, IOConfig(**quiet))
    y_none = _run(x, w, IOConfig(bound_management="none", **quiet))
    # r = 2: x' = 0.5 -> one 7-bit DAC step (2/126) and one ADC step of 20 at most
    assert abs(float(y_iter[0, 0]) - 20.0) < 20.0 / 63 + 2 * 24 / 510
    assert float(y_none[0, 0]) == pytest.approx(12.0)
    # the other vectors never clipped: identical results with and without bound management
    torch.testing.assert_close(y_iter[1:], y_none[1:], rtol=0, atol=0)
    # and per vector, not per batch: with noise on, a non-clipping vector keeps its round-0 draw
    noisy_iter = _run(x, w, IOConfig(), _seeds())
    noisy_none = _run(x, w, IOConfig(bound_management="none"), _seeds())
    torch.testing.assert_close(noisy_iter[1:], noisy_none[1:], rtol=0, atol=0)
    assert not torch.equal(noisy_iter[0], noisy_none[0])


def test_bound_management_stops_at_the_aihwkit_limit():
    # 7-bit DAC: the last allowed reduction is 16 (16 > 0.25 / (2/126)); the output stays clipped there.
    w = torch.full((1, 1), 1000.0)
    y = _run(torch.ones(1, 1), w, IOConfig(out_noise=0.0))
    assert float(y) == pytest.approx(12.0 * 16)


def test_zero_input_vector_gives_exact_zero_despite_output_noise():
    w = torch.randn(8, 16)
    x = torch.zeros(3, 16)
    x[1] = torch.randn(16)
    y = _run(x, w, IOConfig(), _seeds())
    assert torch.count_nonzero(y[0]) == 0 and torch.count_nonzero(y[2]) == 0
    assert torch.count_nonzero(y[1]) > 0


def test_output_noise_std_matches_out_noise_times_input_scale():
    io = IOConfig(out_noise=0.06, out_res=0, out_bound=0, inp_res=0, bound_management="none")
    x = torch.full((4000, 64), 0.5)  # abs-max 0.5 -> outputs are z * 0.5
    y = _run(x, torch.zeros(32, 64), io, _seeds(3))
    assert float(y.mean()) == pytest.approx(0.0, abs=4 * 0.03 / math.sqrt(y.numel()))
    assert float(y.std()) == pytest.approx(0.06 * 0.5, rel=0.01)


def test_additive_constant_weight_noise_scales_with_input_norm():
    io = IOConfig(out_noise=0.0, out_res=0, out_bound=0, inp_res=0, bound_management="none",
                  w_noise=0.02, w_noise_type="additive_constant")
    x = torch.zeros(4000, 64)
    x[:, :16] = 1.0  # ||x'|| = 4 after abs-max scaling
    y = _run(x, torch.zeros(32, 64), io, _seeds(4))
    assert float(y.std()) == pytest.approx(0.02 * 4.0, rel=0.01)


def test_pcm_read_weight_noise_std_formula():
    io = IOConfig(out_noise=0.0, out_res=0, out_bound=0, inp_res=0, bound_management="none",
                  w_noise=0.03, w_noise_type="pcm_read")
    w = torch.zeros(2, 16)
    w[0] = 0.25
    w[1, :4] = 1.0
    x = torch.ones(20000, 16)
    y = _run(x, w, io, _seeds(5))
    # std_i = w_noise * sqrt(sum_j |W_ij| x_j^2): sqrt(16 * 0.25) = 2 and sqrt(4) = 2, around means 4 and 4
    assert float(y[:, 0].std()) == pytest.approx(0.03 * 2.0, rel=0.02)
    assert float(y[:, 1].std()) == pytest.approx(0.03 * 2.0, rel=0.02)
    assert float(y.mean(0)[0]) == pytest.approx(4.0, abs=0.01)


def test_ir_drop_matches_a_direct_per_vector_implementation():
    torch.manual_seed(1)
    n_in, n_out = 24, 5
    w = torch.randn(n_out, n_in) * 0.5
    x = torch.randn(6, n_in)
    io = IOConfig(out_noise=0.0, out_res=0, out_bound=0, inp_res=0, bound_management="none",
                  ir_drop=1.0, ir_drop_g_ratio=50.0)
    got = _run(x, w, io)
    w64, expected = w.double(), torch.empty(6, n_out, dtype=torch.float64)
    for b in range(6):
        scale = x[b].abs().max().double()
        xs = x[b].double() / scale
        z = w64 @ xs
        for i in range(n_out):
            a = n_in / 50.0 * sum(abs(w64[i, j]) * abs(xs[j]) for j in range(n_in))
            c = a * (a * (0.05 * a - 0.2) + 0.5)
            weighted = sum(w64[i, j] * xs[j] * (1 - (1 - j / n_in) ** 2) for j in range(n_in))
            expected[b, i] = (z[i] - 1.0 * c * weighted) * scale
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_perfect_io_sums_tiles_digitally():
    torch.manual_seed(2)
    w = torch.randn(700, 1000)
    x = torch.randn(9, 1000)
    y = _run(x, w, IOConfig(is_perfect=True), max_in=512, max_out=512)
    torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-4)


def test_same_seed_same_noise_other_seed_other_noise():
    w, x = torch.randn(40, 600), torch.randn(7, 600)
    a = _run(x, w, IOConfig(), _seeds(11), max_in=256)
    b = _run(x, w, IOConfig(), _seeds(11), max_in=256)
    c = _run(x, w, IOConfig(), _seeds(12), max_in=256)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_noise_streams_are_per_purpose():
    assert stream_seed(0, "l", Purpose.OUT_NOISE, 0) != stream_seed(0, "l", Purpose.W_NOISE, 0)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 6),
    n_in=st.integers(1, 70),
    n_out=st.integers(1, 40),
    max_in=st.sampled_from([0, 8, 33]),
    max_out=st.sampled_from([0, 7, 16]),
    nm=st.sampled_from(["abs_max", "constant", "none"]),
    bm=st.sampled_from(["iterative", "none"]),
    inp_res=st.sampled_from([0.0, 1 / 126, 254.0]),
    seed=st.integers(0, 2**40),
)
def test_random_shapes_and_configs_keep_rows_independent(batch, n_in, n_out, max_in, max_out, nm, bm, inp_res, seed):
    gen = torch.Generator().manual_seed(seed % 2**31)
    w = torch.randn(n_out, n_in, generator=gen) * 0.3
    x = torch.randn(batch, n_in, generator=gen)
    io = IOConfig(noise_management=nm, bound_management=bm, inp_res=inp_res)
    full = _run(x, w, io, _seeds(seed), max_in, max_out)
    assert full.shape == (batch, n_out) and torch.isfinite(full).all()
    # a token's result (noise included) does not depend on the rest of the batch; the GEMM may round
    # differently for another batch size, which can move an output by one ADC step at most
    adc_step = io.out_step * float(x[0].abs().max()) * 16
    torch.testing.assert_close(_run(x[:1], w, io, _seeds(seed), max_in, max_out), full[:1], rtol=1e-5,
                               atol=adc_step + 1e-5)


def test_tiled_mvm_readout_shape():
    wt = torch.randn(2, 5, 4)
    xt = torch.eye(4).expand(2, 4, 4).clone()
    z = tiled_mvm(xt, wt, [4, 3], [5], IOConfig(out_noise=0.0), None)
    assert z.shape == (2, 4, 5)


def test_row_ids_select_the_noise_of_those_tokens():
    w, x = torch.randn(12, 40), torch.randn(6, 40)
    io = IOConfig(inp_noise=0.01)
    grid = TileGrid(12, 40, 16, 0)
    args = (split_weight(w, grid), torch.ones(len(grid.in_sizes), 12), None, grid, io, _seeds(9))
    full = analog_linear(x, *args)
    picked = analog_linear(x[[4, 1]], *args, row_ids=torch.tensor([4, 1]))
    torch.testing.assert_close(picked, full[[4, 1]], rtol=1e-5, atol=io.out_step * 16 * float(x.abs().max()))
    with pytest.raises(ValueError, match="row_ids"):
        analog_linear(x[:2], *args, row_ids=torch.tensor([0, 1, 2]))
