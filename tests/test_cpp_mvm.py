"""The fused C++ CPU analog MVM against the pure-PyTorch reference, noise included, and backend selection."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from romer_kernels import AnalogLinear
from romer_kernels.config import preset
from romer_kernels.kernels import backends, cpp, reference
from romer_kernels.nn.analog_matrix import AnalogMatrix
from romer_kernels.nn.chip import readout_probes

pytestmark = pytest.mark.skipif(not cpp.is_available(), reason="C++ extension not built")

IO_VARIANTS = {
    "aihwkit-default": {},
    "bound-management": dict(out_bound=2.0),
    "bm-positive-only": dict(out_bound=2.0, bm_test_negative_bound=False),
    "input-noise": dict(inp_noise=0.05, out_bound=3.0),
    "nm-none": dict(noise_management="none"),
    "nm-constant": dict(noise_management="constant", nm_thres=2.0),
    "nm-capped": dict(nm_thres=0.5),
    "additive-w-noise": dict(w_noise=0.03, w_noise_type="additive_constant"),
    "pcm-read-ir-drop-bm": dict(w_noise=0.03, w_noise_type="pcm_read", ir_drop=1.0, out_bound=3.0),
    "perfect": dict(is_perfect=True),
    "no-quantization": dict(inp_res=0, out_res=0),
}


def _matrix(config, out_features, in_features, tile_in, tile_out, seed=3):
    config = config.replace(tile=dataclasses.replace(config.tile, max_input_size=tile_in, max_output_size=tile_out))
    matrix = AnalogMatrix(config, out_features, in_features, "test.layer", seed=seed)
    matrix.program(torch.randn(out_features, in_features))
    return matrix


def _both(matrix, x, bias=None, row_ids=None, call_index=5, noise=True):
    streams = matrix.chip.mvm_stream(call_index) if noise else None
    args = (x, matrix.chip.state, matrix.chip.out_scale, bias, matrix.chip.grid, matrix.config.io, streams, row_ids)
    return reference.analog_linear(*args), cpp.analog_linear_cpp(*args), _summation_bound(matrix, x)


def _summation_bound(matrix, x):
    """How far two float32 summation orders of the tile products can differ, in output units: a sum of n
    terms computed in any order is within (n - 1) 2^-24 sum |terms| of the exact one, so two orders are
    within 2 n 2^-24 sum_k |x_k| |w_k| per tile, times the tile's digital scale (x stands in for the DAC'd
    input, which noise management scales back; the factor 2 covers the DAC's rounding of x)."""
    grid = matrix.chip.grid
    w, scale = matrix.chip.state.double().abs(), matrix.chip.out_scale.double().abs()
    xa = x.nan_to_num(0.0, 0.0, 0.0).double().abs()
    bound = torch.zeros(x.shape[0], grid.out_features, dtype=torch.float64)
    for i, cols in enumerate(grid.in_slices()):
        n = cols.stop - cols.start
        bound += 4 * n * 2.0**-24 * (xa[:, cols] @ w[:, cols].T) * scale[i]
    return bound.float()


def _assert_matches(expected, actual, bound):
    """Same NaN rows; elements equal within float rounding of the tile products: the C++ kernel reads the
    whole weight in place, and with ragged input tiles its per-tile GEMMs sum over the tile's own width
    where the reference sums over a zero-padded one (different summation order; equal tiles take the same
    batched GEMM and are bit-identical). Such a difference can also flip an ADC code next to a rounding
    boundary: at most 1 % of the elements (or one) may differ by more."""
    assert torch.equal(expected.isnan(), actual.isnan())
    e, a = expected.nan_to_num(), actual.nan_to_num()
    close = (a - e).abs() <= 1e-5 * e.abs() + 1e-6 + bound
    off = int((~close).sum())
    assert off <= max(1, close.numel() // 100), (off, float((a - e).abs().max()))


@pytest.mark.parametrize("variant", sorted(IO_VARIANTS))
def test_cpp_matches_reference_on_every_io_variant(variant):
    torch.manual_seed(hash(variant) % 1000)
    base = preset("aihwkit-default")
    config = base.replace(io=dataclasses.replace(base.io, **IO_VARIANTS[variant]))
    matrix = _matrix(config, 40, 70, 32, 16)
    x = torch.randn(9, 70) * 2
    x[3] = 0.0            # dead row under abs-max noise management
    x[5, 40:] = 0.0       # dead on the last input tile only
    x[6, 2] = float("nan")
    rows = torch.randperm(50)[:9]
    bias = torch.randn(40)
    expected, actual, bound = _both(matrix, x, bias, rows)
    _assert_matches(expected, actual, bound)
    assert actual[6].isnan().all() and not actual[[0, 1, 2, 3, 4, 5, 7, 8]].isnan().any()
    if not config.io.is_perfect:
        quiet = _both(matrix, x, bias, rows, noise=False)
        _assert_matches(*quiet)
        assert not torch.equal(quiet[1].nan_to_num(), actual.nan_to_num()), "the per-MVM noise is missing"


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 9),
    in_features=st.integers(1, 90),
    out_features=st.integers(1, 40),
    tile_in=st.sampled_from([0, 7, 16, 33]),
    tile_out=st.sampled_from([0, 5, 16]),
    preset_name=st.sampled_from(["aihwkit-default", "rasch2023", "lightning-8bit", "gaussian-chip"]),
    scale=st.sampled_from([0.1, 1.0, 10.0]),
    seed=st.integers(0, 2**31),
    call_index=st.integers(0, 1000),
)
def test_cpp_matches_reference_on_random_shapes(batch, in_features, out_features, tile_in, tile_out, preset_name,
                                                scale, seed, call_index):
    torch.manual_seed(seed)
    matrix = _matrix(preset(preset_name), out_features, in_features, tile_in, tile_out, seed=seed % 97)
    x = torch.randn(batch, in_features) * scale
    rows = torch.randint(0, 10_000, (batch,))
    _assert_matches(*_both(matrix, x, torch.randn(out_features), rows, call_index))


def test_noise_is_keyed_by_row_id_and_call_not_by_batch():
    matrix = _matrix(preset("rasch2023"), 24, 50, 16, 0)
    x = torch.randn(6, 50)
    rows = torch.tensor([11, 3, 7, 40, 2, 9])
    whole = cpp.analog_linear_cpp(x, matrix.chip.state, matrix.chip.out_scale, None, matrix.chip.grid, matrix.config.io,
                                  matrix.chip.mvm_stream(2), rows)
    part = cpp.analog_linear_cpp(x[2:4], matrix.chip.state, matrix.chip.out_scale, None, matrix.chip.grid, matrix.config.io,
                                 matrix.chip.mvm_stream(2), rows[2:4])
    other_call = cpp.analog_linear_cpp(x, matrix.chip.state, matrix.chip.out_scale, None, matrix.chip.grid, matrix.config.io,
                                       matrix.chip.mvm_stream(3), rows)
    assert torch.equal(whole[2:4], part)
    assert not torch.equal(whole, other_call)


@pytest.mark.parametrize("name", ["aihwkit-default", "rasch2023"])
def test_probe_readout_matches_reference_tiled_mvm(name):
    matrix = _matrix(preset(name), 40, 70, 32, 0)
    grid = matrix.chip.grid
    n_max = max(grid.in_sizes)
    probes = torch.zeros(n_max, 70)
    tiles = torch.zeros(len(grid.in_sizes), n_max, n_max)
    for t, cols in enumerate(grid.in_slices()):
        size = cols.stop - cols.start
        probes[torch.arange(size), cols.start + torch.arange(size)] = 1.0
        tiles[t, :size, :size] = torch.eye(size)
    streams = matrix.chip.mvm_stream(1, readout=True)
    split = reference.split_weight(matrix.chip.state, grid)
    expected = reference.tiled_mvm(tiles, split, grid.in_sizes, grid.out_sizes, matrix.config.io, streams)
    fast = cpp.tiled_mvm_cpp(probes, matrix.chip.state, grid, matrix.config.io, streams, probes=True)
    general = cpp.tiled_mvm_cpp(probes, matrix.chip.state, grid, matrix.config.io, streams, probes=False)
    on_split = cpp.tiled_mvm_cpp(probes, split, grid, matrix.config.io, streams, probes=True)  # the split layout
    torch.testing.assert_close(fast, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(general, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(on_split, expected, rtol=1e-6, atol=1e-7)
    valid = (torch.arange(n_max)[None, :] < torch.tensor(grid.in_sizes)[:, None]).float()
    expected_mean = (expected.abs() * valid[:, :, None]).sum(dim=1) / valid.sum(dim=1, keepdim=True)
    torch.testing.assert_close(cpp.probe_mean_cpp(probes, matrix.chip.state, grid, matrix.config.io, streams),
                               expected_mean, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="one-hot"):
        cpp.tiled_mvm_cpp(probes + 0.1, matrix.chip.state, grid, matrix.config.io, streams, probes=True)


def test_bad_arguments_are_named():
    matrix = _matrix(preset("aihwkit-default"), 8, 20, 0, 0)
    io, grid = matrix.config.io, matrix.chip.grid
    with pytest.raises(ValueError, match="inputs"):
        cpp.analog_linear_cpp(torch.randn(2, 19), matrix.chip.state, matrix.chip.out_scale, None, grid, io, None)
    with pytest.raises(ValueError, match="float32"):
        cpp.analog_linear_cpp(torch.randn(2, 20, dtype=torch.float64), matrix.chip.state, matrix.chip.out_scale, None, grid,
                              io, None)
    with pytest.raises(ValueError, match="row_ids"):
        cpp.analog_linear_cpp(torch.randn(2, 20), matrix.chip.state, matrix.chip.out_scale, None, grid, io, None,
                              row_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="MvmStreams"):
        cpp.analog_linear_cpp(torch.randn(2, 20), matrix.chip.state, matrix.chip.out_scale, None, grid, io,
                              lambda purpose, bm_round: 1)


def test_backend_selection(monkeypatch):
    assert backends.resolve_backend("auto", "cpu") == "cpp"
    assert backends.resolve_backend("reference", "cpu") == "reference"
    with pytest.raises(ValueError, match="unknown MVM backend"):
        backends.resolve_backend("cuda-magic")
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        backends.resolve_backend("cpp", "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if backends.triton_available():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            backends.resolve_backend("triton", "cpu")
    monkeypatch.setattr(cpp, "extension", lambda: None)
    assert backends.resolve_backend("auto", "cpu") == "reference"
    with pytest.raises(RuntimeError, match="make build"):
        backends.resolve_backend("cpp", "cpu")


def test_analog_linear_layer_gives_the_same_output_on_every_cpu_backend():
    torch.manual_seed(0)
    layer = AnalogLinear.from_linear(torch.nn.Linear(70, 30), "rasch2023", seed=4)
    x = torch.randn(5, 70)
    outputs = {}
    for name in ("reference", "cpp"):
        layer.analog.forward_calls = 0
        with backends.use_backend(name):
            outputs[name] = layer(x)
    assert backends.get_backend() == "auto"
    torch.testing.assert_close(outputs["cpp"], outputs["reference"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, parallel_below", [("aihwkit-default", 96), ("rasch2023", 96), ("rasch2023", 0)])
def test_analog_experts_give_the_same_output_on_every_backend(name, parallel_below, monkeypatch):
    """The Python expert loop on the reference and C++ kernels, and the grouped Triton kernels (interpreter)."""
    torch.manual_seed(1)
    num_experts, hidden, inter, tokens, top_k = 4, 40, 24, 10, 2
    gate_up = torch.nn.Parameter(torch.randn(num_experts, 2 * inter, hidden) * 0.2)
    down = torch.nn.Parameter(torch.randn(num_experts, hidden, inter) * 0.2)
    config = preset(name)
    config = config.replace(tile=dataclasses.replace(config.tile, max_input_size=16, max_output_size=0))
    from romer_kernels.nn import analog_experts  # noqa: PLC0415

    monkeypatch.setattr(analog_experts, "PARALLEL_EXPERTS_BELOW", parallel_below)  # experts side by side or not
    experts = analog_experts.AnalogExperts(gate_up, down, torch.nn.SiLU(), config, seed=2).program_()
    x = torch.randn(tokens, hidden)
    index = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)])
    index[:, 0] = torch.where(index[:, 0] == 3, 2, index[:, 0])  # keep expert 3 rare
    weights = torch.rand(tokens, top_k)
    names = ["reference", "cpp"] + (["triton"] if backends.triton_available() else [])
    outputs = {}
    for backend in names:
        experts.reset_noise_counter()
        with backends.use_backend(backend):
            outputs[backend] = experts(x, index, weights)
    for backend in names[1:]:
        torch.testing.assert_close(outputs[backend], outputs["reference"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expert ids"), backends.use_backend("cpp"):
        experts(x, torch.full_like(index, num_experts), weights)


@pytest.mark.parametrize("batch", [3, 64])
def test_cpp_result_does_not_depend_on_the_thread_count(batch):
    """The C++ prologue, epilogue and noise are per element; batch 3 takes the few-rows products (both large
    enough to run on two threads)."""
    matrix = _matrix(preset("rasch2023"), 600, 1400, 512, 0)
    x = torch.randn(batch, 1400)
    outputs = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outputs.append(cpp.analog_linear_cpp(x, matrix.chip.state, matrix.chip.out_scale, None, matrix.chip.grid,
                                                 matrix.config.io, matrix.chip.mvm_stream(0)))
    finally:
        torch.set_num_threads(previous)
    if batch <= 4:
        assert torch.equal(outputs[0], outputs[1])
    else:  # the GEMMs are MKL's, whose sums may depend on the thread count
        _assert_matches(outputs[0], outputs[1], _summation_bound(matrix, x))


@pytest.mark.parametrize("name, scale, inp_noise", [("aihwkit-default", 1.0, 0.0), ("aihwkit-default", 30.0, 0.0),
                                                    ("rasch2023", 1.0, 0.0), ("aihwkit-default", 1.0, 0.05)])
def test_readout_on_the_whole_weight_matches_the_reference(name, scale, inp_noise):
    """The fused readout reads the [out, in] weight in place; probes that clip under iterative bound
    management (scale 30 with raw weights and ADC bound 12) send it to the general path, and so does input
    noise (noisy probes are not one-hot)."""
    config = preset(name)
    config = config.replace(tile=dataclasses.replace(config.tile, max_input_size=32, max_output_size=0),
                            io=dataclasses.replace(config.io, inp_noise=inp_noise))
    matrix = AnalogMatrix(config, 40, 70, "test.readout", seed=5)
    matrix.program(torch.randn(40, 70) * scale)
    chip, grid = matrix.chip, matrix.chip.grid
    streams = chip.mvm_stream(2, readout=True)
    whole = backends.readout_column_mean(matrix.chip.state, grid, config.io, streams, readout_probes(tuple(grid.in_sizes)), backend="cpp")
    expected = backends.readout_column_mean(matrix.chip.state, grid, config.io, streams, readout_probes(tuple(grid.in_sizes)),
                                            backend="reference")
    torch.testing.assert_close(whole, expected, rtol=1e-6, atol=1e-7)
    if inp_noise == 0.0:
        split = cpp.probe_mean_cpp(readout_probes(tuple(grid.in_sizes)), reference.split_weight(matrix.chip.state, grid),
                                   grid, config.io, streams)
        torch.testing.assert_close(split, whole, rtol=0, atol=0)
