"""Triton kernels against the reference: on a GPU when there is one, else in the interpreter
(TRITON_INTERPRET=1 from conftest.py). Inputs are built on the CPU and moved to DEVICE for the kernel.

Every kernel is compared with ``reference.analog_linear`` on fresh random inputs with several ragged input
tiles and output tiles. The ADC may flip a code where the float sums of kernel and reference differ by an
ulp next to a rounding boundary, so comparisons allow a tiny fraction of elements off by about one ADC
step (times the digital scale); everything else must agree to float rounding.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from romer_kernels.config import presets  # noqa: E402
from romer_kernels.config.analog import (  # noqa: E402
    AnalogConfig,
    DriftCompensationConfig,
    IOConfig,
    MappingConfig,
    TileConfig,
)
from romer_kernels.config.device_noise import GaussianNoiseConfig, HermesNoiseConfig  # noqa: E402
from romer_kernels.kernels.reference import analog_linear  # noqa: E402
from romer_kernels.kernels.triton import (  # noqa: E402
    Blocks,
    align_block_size,
    analog_experts_arguments,
    analog_linear_programmed_triton,
    analog_linear_triton,
    bm_rounds,
    moe_experts_triton,
)
from romer_kernels.nn.analog_matrix import AnalogMatrix  # noqa: E402

BLOCKS = Blocks(m=16, n=32, k=32, prepass_m=16, prepass_k=32)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _on_device(fn, *args, **kwargs):
    """``fn`` with every tensor argument moved to DEVICE (int tables included); the result back on the CPU."""
    move = lambda v: v.to(DEVICE) if isinstance(v, torch.Tensor) else v  # noqa: E731
    out = fn(*(move(a) for a in args), **{k: move(v) for k, v in kwargs.items()})
    return out.cpu()
OUT, IN, BATCH = 40, 70, 12
HOUR_S, DAY_S = 3600.0, 86400.0


def small_config(name: str, max_out: int = 16, **io_changes) -> AnalogConfig:
    """A preset on 32-input tiles (70 inputs -> 3 ragged tiles) and ``max_out``-output tiles, no drift
    compensation, with ``io_changes`` applied to its IOConfig."""
    config = presets.preset(name)
    return dataclasses.replace(config, tile=TileConfig(32, max_out), io=dataclasses.replace(config.io, **io_changes),
                               drift_compensation=DriftCompensationConfig("none"))


def programmed_matrix(config: AnalogConfig, seed: int = 3, out: int = OUT, inp: int = IN, layer: str = "layer"):
    matrix = AnalogMatrix(config, out, inp, layer, seed)
    weight = torch.randn(out, inp) * 0.2
    matrix.program(weight)
    return matrix, weight


def adc_tolerance(x: torch.Tensor, io: IOConfig, out_scale: torch.Tensor, n_tiles: int) -> float:
    """About one ADC step in output units, for the largest input row and digital scale."""
    if io.is_perfect or io.out_step <= 0:
        return 0.0
    nm = float(x[torch.isfinite(x).all(dim=1)].abs().max()) if io.noise_management == "abs_max" else 1.0
    if io.noise_management == "constant":
        nm = io.nm_thres if io.nm_thres > 0 else 1.0
    reduction = 2 ** (bm_rounds(io) - 1)
    return 1.01 * io.out_step * nm * reduction * float(out_scale.abs().max()) * n_tiles


def assert_matches(out: torch.Tensor, ref: torch.Tensor, step_tol: float, max_fraction: float = 0.01,
                   rtol: float = 2e-5, atol: float = 2e-5) -> None:
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), "NaN rows differ"
    finite = ~torch.isnan(ref)
    diff = (out - ref).abs()[finite]
    tol = atol + rtol * ref.abs()[finite]
    off = diff > tol
    assert float(off.float().mean()) <= max_fraction, f"{int(off.sum())}/{off.numel()} elements differ, max {diff.max()}"
    if bool(off.any()):
        assert float(diff.max()) <= step_tol + float(tol.max()), f"max difference {diff.max()} > ADC step {step_tol}"


def run_both(matrix: AnalogMatrix, x: torch.Tensor, io: IOConfig | None = None, bias=None, row_ids=None,
             call_index: int = 0, noise: bool = True, blocks: Blocks = BLOCKS):
    io = matrix.config.io if io is None else io
    seeds = matrix.chip.mvm_stream(call_index) if noise else None
    args = (x, matrix.chip.state, matrix.chip.out_scale, bias, matrix.chip.grid, io, seeds, row_ids)
    return _on_device(analog_linear_triton, *args, blocks=blocks), analog_linear(*args)


def check_linear(matrix, x, io=None, **kwargs):
    io = matrix.config.io if io is None else io
    out, ref = run_both(matrix, x, io, **kwargs)
    assert_matches(out, ref, adc_tolerance(x, io, matrix.chip.out_scale, len(matrix.chip.grid.in_sizes)))
    return out, ref


def inputs(batch: int = BATCH, inp: int = IN, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, inp, generator=gen)
    x[1] *= 40.0             # a large row
    x[2, 32:64] = 0.0        # an all-zero input tile of one row (dead under abs-max noise management)
    return x


# ------------------------------------------------------------------------------------------------------
# dense MVM
# ------------------------------------------------------------------------------------------------------
IO_CASES = {
    "perfect": ("ideal", {}),
    "aihwkit-iterative-clipping": ("aihwkit-default", dict(out_bound=0.5)),
    "aihwkit-default": ("aihwkit-default", {}),
    "rasch2023": ("rasch2023", {}),
    "inp-noise-additive-w-noise-nm-none": (
        "aihwkit-default", dict(inp_noise=0.05, w_noise=0.03, w_noise_type="additive_constant",
                                noise_management="none", out_bound=6.0)),
    "nm-constant-no-negative-test": (
        "aihwkit-default", dict(noise_management="constant", nm_thres=3.0, out_bound=0.8, bm_test_negative_bound=False)),
    "nm-thres-no-quantization": ("aihwkit-default", dict(nm_thres=0.7, inp_res=0.0, out_res=0.0, out_bound=1.0,
                                                          max_bm_factor=4)),
}


@pytest.mark.parametrize("case", list(IO_CASES))
def test_analog_linear_matches_reference(case):
    torch.manual_seed(list(IO_CASES).index(case))
    name, changes = IO_CASES[case]
    max_out = 0 if name == "rasch2023" else 16
    config = small_config(name, max_out, **changes)
    matrix, _ = programmed_matrix(config)
    x = inputs(seed=list(IO_CASES).index(case))
    bias = torch.randn(OUT)
    row_ids = torch.randperm(50)[:BATCH]
    out, ref = check_linear(matrix, x, bias=bias, row_ids=row_ids, call_index=2)
    if not config.io.is_perfect:  # the noise is there and keyed by the row id
        quiet, _ = run_both(matrix, x, bias=bias, row_ids=row_ids, call_index=2, noise=False)
        assert not torch.allclose(quiet, out)
    if case == "aihwkit-default":
        other, _ = run_both(matrix, x, bias=bias, row_ids=row_ids + 1, call_index=2)
        assert not torch.allclose(other, out)
        again, _ = run_both(matrix, x, bias=bias, row_ids=row_ids, call_index=2)
        assert torch.equal(again, out)


def test_noise_off_and_nan_rows():
    config = small_config("aihwkit-default", out_bound=0.5)
    matrix, _ = programmed_matrix(config)
    x = inputs()
    x[4, 5] = float("nan")
    x[7, 60] = float("inf")
    out, ref = check_linear(matrix, x, noise=False)
    assert torch.isnan(out[4]).all() and torch.isnan(out[7]).all() and not torch.isnan(out[[0, 1, 2, 3]]).any()


def test_iterative_bound_management_is_exercised():
    config = small_config("aihwkit-default", out_bound=0.5)
    matrix, _ = programmed_matrix(config)
    x = inputs()
    iterative, _ = check_linear(matrix, x)
    single, _ = check_linear(matrix, x, dataclasses.replace(config.io, bound_management="none"))
    assert not torch.allclose(iterative, single)


def test_noise_does_not_depend_on_block_sizes():
    config = small_config("rasch2023", 16, inp_noise=0.02)
    matrix, _ = programmed_matrix(config)
    x = inputs()
    a, _ = run_both(matrix, x, blocks=Blocks(m=16, n=16, k=16))
    b, ref = run_both(matrix, x, blocks=Blocks(m=32, n=64, k=32))
    step = adc_tolerance(x, config.io, matrix.chip.out_scale, 3)
    assert_matches(a, b, step)
    assert_matches(a, ref, step)


# ------------------------------------------------------------------------------------------------------
# grouped top-k MoE dispatch
# ------------------------------------------------------------------------------------------------------
def test_align_block_size_pads_each_expert_to_block_m():
    idx = torch.tensor([[2, 3], [1, 2], [1, -1], [1, 2]])
    sorted_ids, expert_ids = align_block_size(idx, 5, 4)
    sentinel = idx.numel()
    assert sorted_ids.tolist() == [2, 4, 6, sentinel, 0, 3, 7, sentinel, 1, sentinel, sentinel, sentinel]
    assert expert_ids.tolist() == [1, 2, 3]


def analog_experts(config: AnalogConfig, n_experts=4, hidden=40, inter=12, seed=5):
    from torch import nn

    from romer_kernels.nn.analog_experts import AnalogExperts
    gen = torch.Generator().manual_seed(seed)
    gate_up = nn.Parameter(torch.randn(n_experts, 2 * inter, hidden, generator=gen) * 0.2)
    down = nn.Parameter(torch.randn(n_experts, hidden, inter, generator=gen) * 0.3)
    module = AnalogExperts(gate_up, down, nn.SiLU(), config, name="moe", seed=seed)
    module.dispatch = lambda index, weights: (index, weights)   # lets -1 (dropped) through the reference
    return module.program_()


@pytest.mark.parametrize("case", ["aihwkit-iterative-clipping", "rasch2023", "perfect"])
def test_moe_experts_match_analog_experts(case):
    name, changes = IO_CASES[case]
    config = dataclasses.replace(small_config(name, **changes), tile=TileConfig(16, 16))  # H 40 -> 3, I 12 -> 1 tile
    module = analog_experts(config)
    tokens, top_k = 10, 2
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(tokens, 40, generator=gen)
    hidden[3] *= 20.0
    hidden[6, 0] = float("nan")
    index = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0], [2, 1], [0, -1], [1, 2], [0, 1], [2, 0]])  # 3: no tokens
    weights = torch.rand(tokens, top_k, generator=gen)
    module.forward_calls = 4
    ref = module(hidden, index, weights)
    out = _on_device(moe_experts_triton, hidden, index, weights, **analog_experts_arguments(module, call_index=4),
                     blocks=BLOCKS)
    n_tiles = 3 + 1
    step = adc_tolerance(hidden, config.io, torch.ones(1), n_tiles) * 4  # two layers: a flip in GEMM1 propagates
    assert_matches(out, ref, step, rtol=1e-4, atol=1e-4)
    assert torch.isnan(out[6]).all() and not torch.isnan(out[[0, 1, 2, 3, 4, 5, 7, 8, 9]]).any()
    if not config.io.is_perfect:
        quiet = _on_device(moe_experts_triton, hidden, index, weights, **{**analog_experts_arguments(module, 4),
                                                              "seeds_gate_up": None, "seeds_down": None}, blocks=BLOCKS)
        assert not torch.allclose(quiet[~torch.isnan(quiet[:, 0])], out[~torch.isnan(out[:, 0])])


# ------------------------------------------------------------------------------------------------------
# on-the-fly programming
# ------------------------------------------------------------------------------------------------------
PROGRAM_CASES = {
    "gaussian-perfect": (presets.gaussian_chip(0.05, 0.03), {}),
    "gaussian-iterative-omega": (
        dataclasses.replace(presets.aihwkit_default(), noise=GaussianNoiseConfig(0.04, 0.02),
                            mapping=MappingConfig(weight_scaling_omega=1.0)), dict(out_bound=0.5)),
    "pcm-rasch2023": (presets.rasch2023(), {}),
    "pcm-aihwkit-default": (presets.aihwkit_default(), {}),
    "no-noise-lightning": (dataclasses.replace(presets.lightning_8bit(), noise=None), {}),
}


@pytest.mark.parametrize("case", list(PROGRAM_CASES))
def test_on_the_fly_programming_matches_programmed_chip(case):
    base, changes = PROGRAM_CASES[case]
    max_out = 0 if case == "pcm-rasch2023" else 16
    config = dataclasses.replace(base, tile=TileConfig(32, max_out), io=dataclasses.replace(base.io, **changes),
                                 drift_compensation=DriftCompensationConfig("none"))
    torch.manual_seed(20 + list(PROGRAM_CASES).index(case))
    matrix, weight = programmed_matrix(config, seed=11, layer="otf")
    x = inputs(seed=7)
    bias = torch.randn(OUT)
    row_ids = torch.arange(BATCH) * 3 + 1
    seeds = matrix.chip.mvm_stream(1)
    ref = analog_linear(x, matrix.chip.state, matrix.chip.out_scale, bias, matrix.chip.grid, config.io, seeds,
                        row_ids)
    out = _on_device(analog_linear_programmed_triton, x, weight, bias, config, 11, "otf", seeds, row_ids, blocks=BLOCKS)
    # programming normals come from another backend (C++) than the kernel's (Triton): a few ulp apart
    assert_matches(out, ref, adc_tolerance(x, config.io, matrix.chip.out_scale, 3), rtol=1e-4, atol=1e-4)
    if config.noise is not None:   # the programming noise is really there
        digital = analog_linear(x, _split_digital(weight, matrix), matrix.chip.out_scale, bias,
                                matrix.chip.grid, config.io, seeds, row_ids)
        assert not torch.allclose(digital, out, rtol=1e-3, atol=1e-3)


def _split_digital(weight, matrix):
    from romer_kernels.kernels.reference import split_weight
    scales = matrix.chip.out_scale / matrix.config.io.out_scale
    tile_units = torch.cat([weight[:, cols] / scales[i][:, None] for i, cols in enumerate(matrix.chip.grid.in_slices())],
                           dim=1)
    return split_weight(tile_units, matrix.chip.grid)


def test_on_the_fly_programming_rejects_other_device_models():
    config = dataclasses.replace(small_config("aihwkit-default"), noise=HermesNoiseConfig())
    with pytest.raises(NotImplementedError, match="hermes"):
        analog_linear_programmed_triton(torch.randn(2, IN), torch.randn(OUT, IN), None, config, 0, "x", None)


# ------------------------------------------------------------------------------------------------------
# on-the-fly chips: no weight-sized state, the whole life cycle (program, drift, readouts) in the kernel
# ------------------------------------------------------------------------------------------------------
ON_THE_FLY_CASES = {
    "pcm-aihwkit-default": presets.aihwkit_default(),
    "pcm-rasch2023": presets.rasch2023(),
    "pcm-per-column": dataclasses.replace(presets.aihwkit_default(),
                                          drift_compensation=DriftCompensationConfig("per_column")),
    "gaussian-read-noise": dataclasses.replace(presets.gaussian_chip(0.04, 0.02),
                                               noise=GaussianNoiseConfig(0.04, 0.02, read_sigma=0.01)),
    "no-noise-lightning": dataclasses.replace(presets.lightning_8bit(), noise=None),
}


@pytest.mark.parametrize("case,weight_dtype", [(case, torch.float32) for case in ON_THE_FLY_CASES]
                         + [("pcm-rasch2023", torch.bfloat16)])
def test_on_the_fly_chip_matches_the_stored_chip(case, weight_dtype):
    """An OnTheFlyChip (seed + per-column vectors) gives the stored chip's outputs after programming,
    after a drift and after a second drift of the same programming, within float rounding; a bfloat16
    digital weight is read by the kernel as it is (no float32 copy)."""
    config = dataclasses.replace(ON_THE_FLY_CASES[case], tile=TileConfig(32, 16))
    torch.manual_seed(40 + list(ON_THE_FLY_CASES).index(case))
    weight = (torch.randn(OUT, IN) * 0.2).to(weight_dtype)
    x, bias = inputs(seed=3), torch.randn(OUT)
    row_ids = torch.arange(BATCH) * 2 + 5
    stored = AnalogMatrix(config, OUT, IN, "otf", seed=11)
    stored.on_the_fly = False
    fly = AnalogMatrix(config, OUT, IN, "otf", seed=11)
    fly.on_the_fly, fly.backend = True, "triton"
    on_device = weight.to(DEVICE)
    stored.program(weight)
    fly.program(on_device)
    assert fly.chip.state is None and not any(t.numel() >= OUT * IN for t in fly.held_tensors().values())
    for step, t in enumerate((None, HOUR_S, DAY_S)):
        if t is not None:
            stored.drift(weight, t)
            fly.drift(on_device, t)
        ref = stored.matmul(x, weight, bias, row_ids, call_index=step, backend="reference")
        out = fly.matmul(x.to(DEVICE), on_device, bias.to(DEVICE), row_ids.to(DEVICE), call_index=step).cpu()
        torch.testing.assert_close(fly.chip.out_scale.cpu(), stored.chip.out_scale, rtol=2e-4, atol=1e-6)
        assert_matches(out, ref, adc_tolerance(x, config.io, stored.chip.out_scale, 3), max_fraction=0.03,
                       rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_on_the_fly_experts_match_the_stored_experts(weight_dtype):
    from romer_kernels.nn.analog_experts import AnalogExperts

    config = dataclasses.replace(presets.aihwkit_default(), tile=TileConfig(32, 16))
    experts, hidden, inter = 3, 40, 24
    torch.manual_seed(5)
    gate_up = torch.nn.Parameter((torch.randn(experts, 2 * inter, hidden) * 0.2).to(weight_dtype))
    down = torch.nn.Parameter((torch.randn(experts, hidden, inter) * 0.2).to(weight_dtype))
    tokens, index, weights = torch.randn(10, hidden), torch.randint(0, experts, (10, 2)), torch.rand(10, 2)
    outputs = []
    for on_the_fly in (False, True):
        module = AnalogExperts(gate_up, down, torch.nn.SiLU(), config, seed=2)
        module.backend = "triton" if on_the_fly else "reference"
        for matrix in module.gate_up + module.down:
            matrix.on_the_fly = on_the_fly
        module.program_(seed=2).drift_(HOUR_S)
        outputs.append(module(tokens, index, weights))
        if on_the_fly:  # the grouped kernel, generating every expert's tiles from the fused digital weights
            assert all(matrix.chip.state is None for matrix in module.gate_up + module.down)
            plan = module._stacked[2]["program_gate_up"]
            assert module._stacked[2]["gate_up"] is None and plan.weight.dim() == 3
            assert plan.weight.data_ptr() == gate_up.data_ptr()  # the fused digital weights, read in place
    assert_matches(outputs[1], outputs[0], 0.05, max_fraction=0.05, rtol=2e-4, atol=2e-4)
