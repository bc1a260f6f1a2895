"""Fused C++ device-noise kernels (romer_kernels._C.noise_*) against the torch reference path.

Both paths get the same streams (a ``StreamDraw``); the torch path draws its normals with the default
RNG backend, the C++ Philox, so the normals are bit-identical and the only differences left are log /
pow (the kernels use float32 polynomials within about 2 ulp, torch's float32 vector maths is within 1 ulp).
Programmed weights have no log or pow and must match bit for bit; drift exponents and read weights must
agree to a few ulp (relative 1e-5, plus an absolute 1e-6 of the layer's abs-max for values that land
near a clamp at 0).
"""
from __future__ import annotations

import math

import pytest
import torch

from romer_kernels.config import TileGrid
from romer_kernels.config.device_noise import GaussianNoiseConfig, HermesNoiseConfig, PCMNoiseConfig
from romer_kernels.noise import build_noise_model
from romer_kernels.noise.base import ProgrammedWeights, StreamDraw
from romer_kernels.noise.fused import fused, using_noise_backend
from romer_kernels.rng import Purpose, normal_like, rng_backend, stream_seed

try:
    from romer_kernels import _C
except ImportError:  # pragma: no cover
    _C = None

pytestmark = pytest.mark.skipif(_C is None or not hasattr(_C, "noise_pcm_program") or rng_backend() != "cpp",
                                reason="needs the compiled extension with the noise kernels")

HOUR, DAY = 3600.0, 86400.0
TIMES = (0.0, 1.0, HOUR, DAY)
READ_SLOTS = 16

SHAPES = [
    ((70, 45), (32, 32)),      # ragged tiles: 3 x 2 splits of unequal size
    ((300, 260), (128, 100)),  # 3 x 3 tiles
    ((33, 517), (0, 0)),       # one tile, odd row length
]


def make_weight(shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.05
    rows, cols = shape
    w[0, : cols // 4] = 0.0
    w[1, : cols // 4] = -0.0
    w[rows // 2:, cols // 2:] *= 1e-3              # tiles with a much smaller abs-max
    w[-5:, -7:] = 0.0
    return w


def chip_draw(shape, seed: int = 5, read_index: int | None = None) -> StreamDraw:
    def seed_of(purpose: Purpose, slot: int) -> int:
        counter = slot if read_index is None else slot + READ_SLOTS * read_index
        return stream_seed(seed, "kernel-test", purpose, counter)
    return StreamDraw(seed_of, shape)


def both_paths(fn):
    with using_noise_backend("torch"):
        want = fn()
    with using_noise_backend("cpp"):
        got = fn()
    return got, want


def assert_matches(got: torch.Tensor | None, want: torch.Tensor | None, what: str, rtol: float = 1e-5,
                   exact: bool = False) -> float:
    """Max relative difference; asserts |got - want| <= rtol |want| + 1e-6 max|want| everywhere."""
    if want is None:
        assert got is None, what
        return 0.0
    assert got.shape == want.shape and got.dtype == want.dtype == torch.float32, what
    assert torch.isfinite(got).all(), what
    if exact:
        assert torch.equal(got, want), f"{what}: max diff {(got - want).abs().max().item()}"
        return 0.0
    diff = (got - want).abs()
    scale = want.abs().max().item()
    bound = rtol * want.abs() + 1e-6 * scale
    worst = (diff - bound).max().item()
    assert worst <= 0.0, f"{what}: max diff {diff.max().item():.3g} (scale {scale:.3g}), {(diff > bound).sum()} over"
    return (diff / want.abs().clamp_min(1e-30)).max().item()


PCM_CONFIGS = {
    "pcm": PCMNoiseConfig(),
    "pcm-no-prog": PCMNoiseConfig(prog_noise_scale=0.0),
    "pcm-no-read": PCMNoiseConfig(read_noise_scale=0.0),
    "pcm-no-drift": PCMNoiseConfig(drift_scale=0.0),
    "pcm-all-zero": PCMNoiseConfig(prog_noise_scale=0.0, read_noise_scale=0.0, drift_scale=0.0),
    "pcm-custom": PCMNoiseConfig(g_max=30.0, prog_coeff=(0.2, 1.5, -1.0, 0.3), prog_coeff_g_max_reference=20.0,
                                 t_0=5.0, t_read=1e-6, prog_noise_scale=1.5, read_noise_scale=0.5, drift_scale=2.0),
    "pcm-const-sigma": PCMNoiseConfig(prog_coeff=(0.5,)),
    "hermes2": HermesNoiseConfig(),
    "hermes1": HermesNoiseConfig(num_devices=1),
    "hermes2-custom": HermesNoiseConfig(g_max=15.0, t_0=100.0, drift_scale=0.5, read_noise_scale=2.0),
}


@pytest.mark.parametrize("shape, tiles", SHAPES, ids=["70x45", "300x260", "33x517"])
@pytest.mark.parametrize("name", list(PCM_CONFIGS))
def test_pcm_family_cpp_matches_torch(name, shape, tiles):
    config = PCM_CONFIGS[name]
    model = build_noise_model(config)
    grid = TileGrid(*shape, *tiles)
    w = make_weight(shape, seed=hash((name, shape)) % 1000)
    draw = chip_draw(shape)
    assert fused(w, draw) is not None
    with using_noise_backend("cpp"):
        assert model.fused_params() is not None

    got, want = both_paths(lambda: model.program(w, grid, draw))
    assert_matches(got.weights, want.weights, "W_P", exact=True)
    assert_matches(got.drift_nu, want.drift_nu, "drift_nu", rtol=1e-5)
    if config.prog_noise_scale > 0:
        assert (want.weights != w).float().mean() > 0.9          # the noise is there
    if config.drift_scale > 0:
        assert got.drift_nu.shape == (2, *shape) and (got.drift_nu > 0).float().mean() > 0.99

    for index, t in enumerate(TIMES):
        read_draw = chip_draw(shape, read_index=index)
        got_r, want_r = both_paths(lambda: model.read(want, t, grid, read_draw))
        assert_matches(got_r, want_r, f"read t={t}")
        if config.read_noise_scale > 0 or (config.drift_scale > 0 and t > 0):
            assert (want_r != want.weights).float().mean() > 0.5
        if t >= HOUR and config.drift_scale > 0:   # drift shrinks the weights
            assert want_r.abs().sum() < 0.99 * want.weights.abs().sum()


GAUSSIAN_CONFIGS = {
    "default": GaussianNoiseConfig(),
    "all": GaussianNoiseConfig(sigma=0.03, multiplicative_sigma=0.05, read_sigma=0.01),
    "multiplicative-only": GaussianNoiseConfig(sigma=0.0, multiplicative_sigma=0.1, read_sigma=0.02),
    "none": GaussianNoiseConfig(sigma=0.0),
}


@pytest.mark.parametrize("shape, tiles", SHAPES, ids=["70x45", "300x260", "33x517"])
@pytest.mark.parametrize("name", list(GAUSSIAN_CONFIGS))
def test_gaussian_cpp_matches_torch(name, shape, tiles):
    config = GAUSSIAN_CONFIGS[name]
    model = build_noise_model(config)
    grid = TileGrid(*shape, *tiles)
    w = make_weight(shape, seed=3)
    draw = chip_draw(shape)
    got, want = both_paths(lambda: model.program(w, grid, draw))
    assert_matches(got.weights, want.weights, "W_P", exact=True)
    assert got.drift_nu is None and want.drift_nu is None
    if config.sigma > 0 or config.multiplicative_sigma > 0:
        assert (want.weights != w).float().mean() > 0.7
    else:
        assert torch.equal(got.weights, w)
    for index, t in enumerate((0.0, HOUR)):
        read_draw = chip_draw(shape, read_index=index)
        got_r, want_r = both_paths(lambda: model.read(want, t, grid, read_draw))
        assert_matches(got_r, want_r, f"read t={t}", exact=True)
        if config.read_sigma > 0:
            assert (want_r != want.weights).float().mean() > 0.7


def test_results_do_not_depend_on_threads():
    model = build_noise_model(PCMNoiseConfig())
    shape = (300, 260)
    grid = TileGrid(*shape, 128, 100)
    w = make_weight(shape, seed=1)
    draw = chip_draw(shape)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with using_noise_backend("cpp"):
                programmed = model.program(w, grid, draw)
                # the chip's way: drift exponents drawn again from the target inside the read kernel
                read = model.read(ProgrammedWeights(programmed.weights), HOUR, grid, draw, w_target=w)
                results.append((programmed.weights, programmed.drift_nu, read))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_plain_callable_draw_takes_torch_path():
    """A draw without ``seed`` (as the older tests pass) still works, on the torch path."""
    model = build_noise_model(PCMNoiseConfig())
    shape = (70, 45)
    grid = TileGrid(*shape, 32, 32)
    w = make_weight(shape, seed=2)
    stream_draw = chip_draw(shape)

    def plain(purpose: Purpose, slot: int) -> torch.Tensor:
        return stream_draw(purpose, slot)

    assert fused(w, plain) is None
    with using_noise_backend("cpp"):
        got = model.program(w, grid, plain)
    with using_noise_backend("torch"):
        want = model.program(w, grid, stream_draw)
    assert torch.equal(got.weights, want.weights) and torch.equal(got.drift_nu, want.drift_nu)


def test_stream_draw_seed_names_its_normals():
    draw = chip_draw((7, 9), read_index=2)
    for purpose in (Purpose.PROGRAM, Purpose.READ):
        assert torch.equal(draw(purpose, 1), normal_like(draw.seed(purpose, 1), (7, 9)))
    # a draw for another shape is not used by the fused path
    assert fused(torch.zeros(9, 7), draw) is None


def test_subclass_with_other_fit_uses_torch_path():
    from romer_kernels.noise.pcm import PCMNoiseModel

    class Other(PCMNoiseModel):
        def read_noise_q(self, g_prog):
            return torch.full_like(g_prog, 0.05)

    assert Other(PCMNoiseConfig()).fused_params() is None


def test_log_and_pow_are_rounded_double():
    """The kernels' ln and x^e: double evaluation (about 1e-11 relative) rounded once to float32, so
    correctly rounded except for a few values next to a rounding boundary (then 1 ulp off)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(200_000, generator=gen), torch.rand(1000, generator=gen) * 1e-38,
                   torch.tensor([0.0, 1e-45, 1e-7, 1.0, 0.5, 2.0, 1e30])])
    x64 = x.double()
    want_log = torch.log(x64).float()
    want_pow = torch.pow(x64, float(torch.tensor(0.65).item())).float()
    for got, want in ((_C.noise_log(x), want_log), (_C.noise_pow(x, 0.65), want_pow)):
        assert torch.equal(got.isinf(), want.isinf())
        finite = want.isfinite()
        ulp = torch.nextafter(want[finite].abs(), torch.tensor(math.inf)) - want[finite].abs()
        assert ((got[finite] - want[finite]).abs() <= ulp).all()
        assert (got != want).float().mean() < 1e-4


def test_tile_absmax():
    w = make_weight((70, 45), seed=4)
    grid = TileGrid(70, 45, 32, 32)
    got = _C.noise_tile_absmax(w, grid.out_sizes, grid.in_sizes)
    want = torch.tensor([[w[rows, cols].abs().max().item() for cols in grid.in_slices()] for rows in grid.out_slices()])
    assert torch.equal(got, want)


def test_layer_chip_uses_fused_path():
    """AnalogMatrix programming goes through StreamDraw, so the fused path; it agrees with the torch path."""
    from romer_kernels import preset
    from romer_kernels.nn.chip import LayerChip

    config = preset("aihwkit-default")
    chip = LayerChip(config, 70, 45, "chip-test")
    weight = make_weight((70, 45), seed=6)
    chip.seed = 3
    draw = chip._draw(weight.shape)
    assert isinstance(draw, StreamDraw) and fused(weight, draw) is not None
    got, want = both_paths(lambda: chip.noise_model.program(weight, chip.grid, draw))
    assert torch.equal(got.weights, want.weights)
    assert math.isfinite(got.drift_nu.sum().item())


def test_float32_log_exp_pow_of_the_kernels():
    """The kernels' float32 ln / exp / x^e (noise_*_f32) against double maths: ln and exp within 1 ulp
    (tested: 2), x^e = exp(e ln x) within 2 ulp plus 2 ulp per unit of |e ln x| (the rounding of ln x)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.rand(200_000, generator=gen), torch.exp(-16 * torch.rand(100_000, generator=gen)),
                   torch.rand(1000, generator=gen) * 1e-38, torch.tensor([0.0, 1e-45, 1e-7, 1.0, 0.5, 2.0, 1e30])])
    y = torch.cat([(torch.rand(200_000, generator=gen) - 0.5) * 40, (torch.rand(1000, generator=gen) - 0.5) * 200,
                   torch.tensor([0.0, -87.0, -103.0, -104.0, -110.0, 88.0, 88.7, 89.0, -1e-8])])
    e = float(torch.tensor(0.65).item())

    def ulps(got, want):
        assert torch.equal(got.isinf(), want.isinf()) and torch.equal(got.isnan(), want.isnan())
        finite = want.isfinite()
        ulp = torch.nextafter(want[finite].abs(), torch.tensor(math.inf)) - want[finite].abs()
        return (got[finite] - want[finite]).abs() / ulp, finite

    err, _ = ulps(_C.noise_log_f32(x), torch.log(x.double()).float())
    assert err.max() <= 2
    err, _ = ulps(_C.noise_exp_f32(y), torch.exp(y.double()).float())
    assert err.max() <= 2
    err, finite = ulps(_C.noise_pow_f32(x, 0.65), torch.pow(x.double(), e).float())
    assert (err <= 2 + 2 * (e * torch.log(x.double())[finite]).abs()).all()
    assert _C.noise_log_f32(torch.tensor([math.nan])).isnan().all() and _C.noise_exp_f32(torch.tensor([math.nan])).isnan().all()


def test_drift_exponents_drawn_again_equal_the_stored_ones():
    """A chip keeps no drift exponents: the read kernel draws them again from the target and the DRIFT_NU
    streams. They equal the ones programming draws, so the read equals the read of the stored ones."""
    for config in (PCMNoiseConfig(), HermesNoiseConfig()):
        model = build_noise_model(config)
        shape = (90, 70)
        grid = TileGrid(*shape, 32, 40)
        w = make_weight(shape, seed=3)
        draw = chip_draw(shape)
        programmed = model.program(w, grid, draw)
        assert torch.equal(model.draw_drift_exponents(w, grid, draw), programmed.drift_nu)
        with using_noise_backend("torch"):
            assert_matches(model.draw_drift_exponents(w, grid, draw), programmed.drift_nu, "drift_nu", rtol=1e-5)
        lean = model.program(w, grid, draw, with_drift_exponents=False)
        assert lean.drift_nu is None and torch.equal(lean.weights, programmed.weights)
        stored = model.read(programmed, HOUR, grid, draw)            # torch path: the stored exponents
        again = model.read(lean, HOUR, grid, draw, w_target=w)      # fused: drawn again
        assert_matches(again, stored, "read", rtol=1e-5)
        in_place = lean.weights.clone()
        result = model.read(ProgrammedWeights(in_place), HOUR, grid, draw, out=in_place, w_target=w)
        assert result.data_ptr() == in_place.data_ptr() and torch.equal(result, again)
        with pytest.raises(ValueError, match="w_target"):
            model.read(lean, HOUR, grid, draw)
