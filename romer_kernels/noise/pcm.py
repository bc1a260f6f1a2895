"""PCM device noise as aihwkit 1.1.0's ``PCMLikeNoiseModel`` (Nandakumar et al., ICECS 2019).

Each weight is held by a pair of devices (G+, G-) as aihwkit's ``SinglePairConductanceConverter`` maps
it: per crossbar tile, ``s = g_max / max(tile abs-max, 1e-7)``, ``G+ = clamp(s w, 0, g_max)``,
``G- = clamp(-s w, 0, g_max)``, and back ``w = (G+ - G-) / s``.

``program`` adds programming noise to both devices and draws each device's drift exponent from its
*target* conductance. ``read`` does what aihwkit's ``apply_drift_noise`` does: it converts the
*programmed* weights into a fresh conductance pair (new scale from the abs-max of the programmed tile,
so one device of the pair is back at exactly 0), drifts that pair with the exponents stored at
programming, adds 1/f read noise whose size follows the re-converted conductance, and converts back
with the new scale. For ``t_inference = 0`` there is no drift, but the read noise is still applied
(at t = t_0).

How it is computed (the same values as a literal two-device transcription, about half the work):

* In a pair, one device holds the weight's magnitude ``a = min(s |w|, g_max)`` -- G+ where w >= 0,
  G- elsewhere (the "on" device) -- and the other has target 0 (the "off" device). The fitted
  functions are evaluated once per weight, on ``a``; for the off device they are constants (their
  value at 0, computed with the same float32 operations). Each device still gets the normals of its
  own stream slot (0 = G+, 1 = G-): they are routed to the on/off roles by the sign of the weight,
  and the results are routed back to G+/G-.
* At read time the off device of the re-converted pair is exactly 0 and stays exactly 0 (0 drifts to
  0 and gets ``|0| * ... = 0`` read noise), so only the on device is computed.
* Routing uses ``torch.lerp`` with a 0/1 float mask, which returns one of two finite values exactly;
  on the CPU it is more than ten times faster than a boolean mask with ``torch.where``.
* The per-tile scale is computed on the whole weight; all the rest runs over flat chunks of
  ``CPU_CHUNK`` elements on the CPU (the temporaries stay in cache) and in one piece on a GPU. The
  Python loop is over chunks, never over elements.

The operations and their order follow aihwkit's code (including torch's ``c / tensor`` =
``tensor.reciprocal() * c``), so with the same normals the results agree to float32 rounding.
Formulas: docs/device-noise.md.

Fused C++ path: when ``draw`` can name its streams (``draw.seed``) and the extension is built, ``program``
and ``read`` run as one C++ kernel each (romer_kernels/noise/fused.py, csrc/kernels/device_noise.cpp)
with the same operations in the same order, generating the normals inline; the code below is the torch
reference it is tested against (tests/test_noise_kernels.py). The fitted functions are given to the
kernel as data: ``NU_MU`` / ``NU_SIGMA`` (:data:`PieceFit` tuples) and ``READ_Q``.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch

from romer_kernels.config.device_noise import PCMNoiseConfig
from romer_kernels.config.tiling import TileGrid
from romer_kernels.noise.base import DeviceNoiseModel, Draw, ProgrammedWeights
from romer_kernels.noise.fused import fused, pair_seeds
from romer_kernels.rng import Purpose

ZERO_CLIP = 1e-7        # aihwkit's _ZERO_CLIP: smallest tile abs-max and smallest relative conductance
CPU_CHUNK = 1 << 17     # elements per chunk of the element-wise CPU passes (512 KiB per float32 temporary)

# A fitted function of x >= 0 as the fused kernel takes it, (thr, a, b, lo, hi, p2, p1, p0):
#   x < thr ? clip(ln(x) * a + b, lo, hi) : (x^2 p2 + x p1) + p0        (thr = inf: the log branch only)
PieceFit = tuple[float, float, float, float, float, float, float, float]
PCM_NU_MU: PieceFit = (math.inf, -0.0155, 0.0244, 0.049, 0.1, 0.0, 0.0, 0.0)
PCM_NU_SIGMA: PieceFit = (math.inf, -0.0125, -0.0059, 0.008, 0.045, 0.0, 0.0, 0.0)
# Q_s = min((1 / max(x^exponent, floor)) * numerator, cap), x = |g| / g_max
PCM_READ_Q = ("pow", (0.65, 1e-3, 0.0088, 0.2))


# -- single-pair conductance conversion (aihwkit SinglePairConductanceConverter, g_min = 0) --------------
def conductance_scale(w: torch.Tensor, grid: TileGrid, g_max: float) -> torch.Tensor:
    """``s = g_max / max(|w| over the tile, 1e-7)``, broadcast to ``w``'s shape (uS per weight unit).

    Written as ``reciprocal() * g_max``, which is what torch evaluates for aihwkit's ``g_max / tensor``.
    """
    return grid.tile_absmax(w).clamp_min_(ZERO_CLIP).reciprocal_().mul_(g_max)


def on_device(w: torch.Tensor, scale: torch.Tensor, g_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, plus)``: the target of the device that holds ``w``, ``a = min(s |w|, g_max)``, and the float
    mask ``plus`` = 1 where that device is G+ (``w >= 0``), 0 where it is G-. The other device's
    target is 0."""
    plus = torch.ge(w, 0.0, out=torch.empty_like(w))
    return (w * scale).abs_().clamp_max_(g_max), plus


def route(plus: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
          out: Sequence[torch.Tensor | None] = (None, None)) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x if plus else y, y if plus else x)`` element-wise, for finite ``x``, ``y`` and a 0/1 ``plus``.

    With ``(x, y) = (G+ value, G- value)`` it gives (on, off); with (on, off) it gives (G+, G-).
    ``lerp(y, x, 1) = x - (x - y) * 0`` and ``lerp(y, x, 0) = y + 0 * (x - y)`` are exact.
    """
    return torch.lerp(y, x, plus, out=out[0]), torch.lerp(x, y, plus, out=out[1])


def signed(plus: torch.Tensor, g: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``(G+ - G-) / s`` when the on device has conductance ``g`` and the off device 0."""
    quotient = g / scale
    return torch.lerp(quotient.neg(), quotient, plus, out=out)


def polynomial(x: torch.Tensor, coeffs: Sequence[float]) -> torch.Tensor:
    """``c0 + c1 x + c2 x^2 + ...`` accumulated as aihwkit does (running power, left to right)."""
    if len(coeffs) == 1:
        return torch.full_like(x, coeffs[0])
    result = (x * coeffs[1]).add_(coeffs[0])
    power = x
    for coeff in coeffs[2:]:
        power = power * x
        result.add_(power * coeff)
    return result


def at_zero(function: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """``function`` evaluated in float32 on a one-element zero tensor, as a Python float."""
    return function(torch.zeros(1)).item()


# -- helpers shared by the models -------------------------------------------------------------------
def _buffer(t: torch.Tensor | None, shape: Sequence[int]) -> torch.Tensor | None:
    """``t`` if a fused kernel can write a result of ``shape`` into it, else None (a new tensor is made)."""
    if (t is None or t.device.type != "cpu" or t.dtype != torch.float32 or t.requires_grad
            or not t.is_contiguous() or tuple(t.shape) != tuple(shape)):
        return None
    return t


def _inplace_buffer(t: torch.Tensor | None, source: torch.Tensor) -> torch.Tensor | None:
    """``t`` if a result of ``source``'s shape can be written into it: ``source`` itself (in place) or a
    tensor that shares no memory with it; else None."""
    buffer = _buffer(t, source.shape)
    if buffer is None or buffer.data_ptr() == source.data_ptr():
        return buffer
    lo, hi = buffer.data_ptr(), buffer.data_ptr() + buffer.nbytes
    src_lo, src_hi = source.data_ptr(), source.data_ptr() + source.nbytes
    return buffer if hi <= src_lo or src_hi <= lo else None


def _separate_buffer(t: torch.Tensor | None, source: torch.Tensor) -> torch.Tensor | None:
    """``t`` if a result of ``source``'s shape can be written into it while ``source`` is still read
    (no shared memory at all), else None."""
    buffer = _inplace_buffer(t, source)
    return None if buffer is not None and buffer.data_ptr() == source.data_ptr() else buffer


def check_time(t_inference: float) -> float:
    t = float(t_inference)
    if not (t >= 0.0 and math.isfinite(t)):
        raise ValueError(f"t_inference must be a finite time in seconds >= 0, got {t_inference!r}")
    return t


def standard_normal(draw: Draw, purpose: Purpose, slot: int, like: torch.Tensor) -> torch.Tensor:
    """``draw(purpose, slot)`` as float32 on ``like``'s device, checked against ``like``'s shape."""
    xi = draw(purpose, slot)
    if tuple(xi.shape) != tuple(like.shape):
        raise ValueError(f"draw({purpose.name}, {slot}) returned shape {tuple(xi.shape)}, expected {tuple(like.shape)}")
    return xi.to(device=like.device, dtype=torch.float32).contiguous()


def pair_normals(draw: Draw, purpose: Purpose, like: torch.Tensor, needed: bool = True) -> list[torch.Tensor | None]:
    """The normals of both devices, ``[draw(purpose, 0), draw(purpose, 1)]`` (``None`` if not needed)."""
    return [standard_normal(draw, purpose, slot, like) if needed else None for slot in (0, 1)]


def chunks(n: int, device: torch.device) -> Iterator[slice]:
    """Flat index ranges of the element-wise passes: ``CPU_CHUNK`` elements on a CPU, one range on a GPU."""
    step = CPU_CHUNK if device.type == "cpu" else max(n, 1)
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def elementwise(fn: Callable[..., None], tensors: Sequence[torch.Tensor | None]) -> None:
    """Call ``fn`` on matching flat chunks of ``tensors`` (contiguous, same numel; ``None`` passes through).

    ``fn`` writes its results into the chunks of the output tensors among ``tensors``.
    """
    flat = [None if t is None else t.view(-1) for t in tensors]
    first = next(t for t in flat if t is not None)
    for part in chunks(first.numel(), first.device):
        fn(*(None if t is None else t[part] for t in flat))


def sample_pair(a: torch.Tensor, plus: torch.Tensor, xi_plus: torch.Tensor | None, xi_minus: torch.Tensor | None,
                sigma_on: Callable[[torch.Tensor], torch.Tensor],
                sigma_off: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(G+, G-) with ``g = max(0, g_T + sigma(g_T) * xi)`` per device: the on device has target ``a`` and
    ``sigma_on(a)``, the off device target 0 and ``sigma_off``; xi of G+ / G- are ``xi_plus`` / ``xi_minus``
    (``None``: no noise)."""
    if xi_plus is None:
        return route(plus, a, torch.zeros_like(a))
    xi_on, xi_off = route(plus, xi_plus, xi_minus)
    g_on = sigma_on(a).mul_(xi_on).add_(a).clamp_min_(0.0)
    g_off = xi_off.mul_(sigma_off).clamp_min_(0.0)
    return route(plus, g_on, g_off)


class PCMNoiseModel(DeviceNoiseModel):
    """aihwkit ``PCMLikeNoiseModel`` with the single-pair converter. ``HermesNoiseModel`` reuses it and
    replaces the fitted functions (sigma_prog coefficients, nu statistics, Q_s)."""

    NU_MU: PieceFit = PCM_NU_MU
    NU_SIGMA: PieceFit = PCM_NU_SIGMA
    READ_Q: tuple = PCM_READ_Q

    def __init__(self, config: PCMNoiseConfig):
        if not isinstance(config, PCMNoiseConfig):
            raise ValueError(f"PCMNoiseModel needs a PCMNoiseConfig, got {type(config).__name__}")
        self.config = config
        self.g_max = float(config.g_max)
        self.t_0 = float(config.t_0)
        self.t_read = float(config.t_read)
        self.prog_coeff = tuple(float(c) for c in config.prog_coeff)
        self.prog_coeff_g_max_reference = float(config.prog_coeff_g_max_reference)
        self.prog_noise_scale = float(config.prog_noise_scale)
        self.read_noise_scale = float(config.read_noise_scale)
        self.drift_scale = float(config.drift_scale)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    # -- the fitted device functions (HERMES overrides the last two and the coefficients) -------
    def programming_sigma(self, g_target: torch.Tensor) -> torch.Tensor:
        """``prog_noise_scale * sigma_prog(g_T)`` in uS, with
        ``sigma_prog = poly(g_T / g_max) * g_max / prog_coeff_g_max_reference``."""
        return self.programming_sigma_at(g_target / self.g_max)

    def programming_sigma_at(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`programming_sigma` from ``x = g_T / g_max`` (multiplications by exactly 1 skipped)."""
        sigma = polynomial(x, self.prog_coeff)
        reference_ratio = self.g_max / self.prog_coeff_g_max_reference
        if reference_ratio != 1.0:
            sigma.mul_(reference_ratio)
        return sigma.mul_(self.prog_noise_scale) if self.prog_noise_scale != 1.0 else sigma

    def drift_statistics(self, g_relative: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the drift exponent at ``g_relative = max(|g_T| / g_max, 1e-7)``."""
        log_g = torch.log(g_relative)
        _, a, b, lo, hi = self.NU_MU[:5]
        mu = (log_g * a).add_(b).clamp_(lo, hi)                 # (ln g * -0.0155 + 0.0244) clipped
        _, a, b, lo, hi = self.NU_SIGMA[:5]
        sigma = log_g.mul_(a).add_(b).clamp_(lo, hi)            # (ln g * -0.0125 - 0.0059) clipped
        return mu, sigma

    def read_noise_q(self, g_prog: torch.Tensor) -> torch.Tensor:
        """Q_s of the 1/f read noise: ``min(0.0088 / max((|g| / g_max)^0.65, 1e-3), 0.2)``."""
        exponent, floor, numerator, cap = self.READ_Q[1]
        return (g_prog.abs() / self.g_max).pow_(exponent).clamp_min_(floor).reciprocal_().mul_(numerator).clamp_max_(cap)

    # -- fused C++ kernels ----------------------------------------------------------------------
    def fused_params(self) -> dict | None:
        """The model as data for the fused kernels (``None``: a subclass changed a fitted function the
        kernels do not know, so the torch path is used)."""
        if (type(self).drift_statistics is not PCMNoiseModel.drift_statistics
                or type(self).read_noise_q is not PCMNoiseModel.read_noise_q):
            return None
        return self._kernel_params()

    def _kernel_params(self) -> dict | None:
        if (type(self).programming_sigma_at is not PCMNoiseModel.programming_sigma_at
                or type(self).programming_sigma is not PCMNoiseModel.programming_sigma
                or type(self).relative is not PCMNoiseModel.relative):
            return None
        cached = self.__dict__.get("_fused_params")
        if cached is None:
            mu_off, sigma_nu_off = self.zero_target_drift_statistics()
            cached = {
                "g_max": self.g_max, "prog_coeff": list(self.prog_coeff),
                "reference_ratio": self.g_max / self.prog_coeff_g_max_reference,
                "prog_noise_scale": self.prog_noise_scale, "sigma_off": at_zero(self.programming_sigma),
                "drift_scale": self.drift_scale, "mu_off": mu_off, "sigma_nu_off": sigma_nu_off,
                "nu_mu": list(self.NU_MU), "nu_sigma": list(self.NU_SIGMA),
                "q_family": self.READ_Q[0], "q": list(self.READ_Q[1]),
            }
            self._fused_params = cached
        return cached

    def relative(self, g_target: torch.Tensor) -> torch.Tensor:
        """``max(|g_T / g_max|, 1e-7)``, the argument of the drift statistics."""
        return (g_target / self.g_max).abs_().clamp_min_(ZERO_CLIP)

    def zero_target_drift_statistics(self) -> tuple[float, float]:
        """(mu_nu, sigma_nu) of a device with target 0 (g_relative = 1e-7), in float32 arithmetic."""
        mu, sigma = self.drift_statistics(self.relative(torch.zeros(1)))
        return mu.item(), sigma.item()

    # -- programming ----------------------------------------------------------------------------
    def program(self, w_target: torch.Tensor, grid: TileGrid, draw: Draw, out: torch.Tensor | None = None,
                with_drift_exponents: bool = True) -> ProgrammedWeights:
        """Per device ``g_P = max(0, g_T + prog_noise_scale * sigma_prog(g_T) * xi)``, xi from
        (PROGRAM, slot), and ``nu = |mu_nu(g_T) + sigma_nu(g_T) * xi'| * drift_scale``, xi' from
        (DRIFT_NU, slot); ``W_P = (G+_P - G-_P) / s``.

        ``out``: a float32 tensor of the target's shape to write W_P into (a chip's own state); values
        never depend on it. ``with_drift_exponents=False`` skips the [2, *shape] drift exponents (a chip
        draws them again at read time from the same streams, see :meth:`read`)."""
        w = w_target.detach().to(torch.float32).contiguous()
        drifts = self.drift_scale != 0.0 and with_drift_exponents
        path = fused(w, draw)
        params = None if path is None else self.fused_params()
        if params is not None:
            ops, seed = path
            weights, drift_nu = ops.noise_pcm_program(
                w, grid.out_sizes, grid.in_sizes, params,
                pair_seeds(seed, Purpose.PROGRAM, self.prog_noise_scale != 0.0),
                pair_seeds(seed, Purpose.DRIFT_NU, drifts), _separate_buffer(out, w), None)
            return ProgrammedWeights(weights, drift_nu)
        scale = conductance_scale(w, grid, self.g_max)
        xi_prog = pair_normals(draw, Purpose.PROGRAM, w, self.prog_noise_scale != 0.0)
        xi_nu = pair_normals(draw, Purpose.DRIFT_NU, w, drifts)
        weights = _separate_buffer(out, w)
        weights = torch.empty_like(w) if weights is None else weights
        drift_nu = torch.empty((2, *w.shape), dtype=torch.float32, device=w.device) if drifts else None
        sigma_off = at_zero(self.programming_sigma)

        def chunk(w, s, xi_prog_plus, xi_prog_minus, xi_nu_plus, xi_nu_minus, out_w, out_nu_plus, out_nu_minus):
            a, plus = on_device(w, s, self.g_max)
            x = a / self.g_max          # >= 0: shared by sigma_prog and (clipped at 1e-7) the nu statistics
            g_plus, g_minus = sample_pair(a, plus, xi_prog_plus, xi_prog_minus,
                                          lambda _: self.programming_sigma_at(x), sigma_off)
            torch.sub(g_plus, g_minus, out=out_w).div_(s)
            if out_nu_plus is not None:
                self._drift_pair(x, plus, xi_nu_plus, xi_nu_minus, out_nu_plus, out_nu_minus)

        nu_out = [None, None] if drift_nu is None else [drift_nu[0], drift_nu[1]]
        elementwise(chunk, [w, scale, *xi_prog, *xi_nu, weights, *nu_out])
        return ProgrammedWeights(weights, drift_nu)

    def _drift_pair(self, x: torch.Tensor, plus: torch.Tensor, xi_plus: torch.Tensor, xi_minus: torch.Tensor,
                    out_plus: torch.Tensor, out_minus: torch.Tensor) -> None:
        """Drift exponents of (G+, G-) into ``out_plus`` / ``out_minus``: ``|mu + sigma xi|`` at the target
        ``x = a / g_max`` for the device that holds the weight, the zero-target constants for the other."""
        mu_off, sigma_nu_off = self.zero_target_drift_statistics()
        xi_on, xi_off = route(plus, xi_plus, xi_minus)
        mu, sigma = self.drift_statistics(x.clamp_min(ZERO_CLIP))
        nu_on = sigma.mul_(xi_on).add_(mu).abs_()
        nu_off = xi_off.mul_(sigma_nu_off).add_(mu_off).abs_()
        if self.drift_scale != 1.0:
            nu_on.mul_(self.drift_scale)
            nu_off.mul_(self.drift_scale)
        route(plus, nu_on, nu_off, out=(out_plus, out_minus))

    def draw_drift_exponents(self, w_target: torch.Tensor, grid: TileGrid, draw: Draw) -> torch.Tensor:
        """The [2, *shape] drift exponents (G+, G-) that :meth:`program` draws for ``w_target`` (the same
        values: same streams, same operations)."""
        w = w_target.detach().to(torch.float32).contiguous()
        path = fused(w, draw)
        params = None if path is None else self.fused_params()
        if params is not None:
            ops, seed = path
            _, drift_nu = ops.noise_pcm_program(w, grid.out_sizes, grid.in_sizes, params, None,
                                                pair_seeds(seed, Purpose.DRIFT_NU), None, None)
            return drift_nu
        scale = conductance_scale(w, grid, self.g_max)
        xi_nu = pair_normals(draw, Purpose.DRIFT_NU, w)
        drift_nu = torch.empty((2, *w.shape), dtype=torch.float32, device=w.device)

        def chunk(w, s, xi_plus, xi_minus, out_plus, out_minus):
            a, plus = on_device(w, s, self.g_max)
            self._drift_pair(a / self.g_max, plus, xi_plus, xi_minus, out_plus, out_minus)

        elementwise(chunk, [w, scale, *xi_nu, drift_nu[0], drift_nu[1]])
        return drift_nu

    # -- drift and read noise -------------------------------------------------------------------
    def read(self, programmed: ProgrammedWeights, t_inference: float, grid: TileGrid, draw: Draw,
             out: torch.Tensor | None = None, w_target: torch.Tensor | None = None) -> torch.Tensor:
        """Re-convert W_P to a pair with the scale s' of the programmed tile; per device
        ``g_D = g (t / t_0)^-nu`` if ``t = t_inference + t_0 > t_0`` (else ``g_D = g``), then
        ``max(0, g_D + |g_D| read_noise_scale Q_s(g) sqrt(ln((t + t_read) / (2 t_read))) xi)``, xi from
        (READ, slot); ``W = (G+ - G-) / s'``.

        The drift exponents are ``programmed.drift_nu`` if programming kept them, else they are drawn again
        from ``w_target`` (the weights programmed) and ``draw``'s DRIFT_NU streams -- the chip's way: it
        keeps no exponents. ``out``: a float32 tensor to write the result into; it may be
        ``programmed.weights`` itself (a read in place)."""
        t = check_time(t_inference) + self.t_0
        w_prog = programmed.weights.detach().to(torch.float32).contiguous()
        time_factor = math.sqrt(math.log((t + self.t_read) / (2.0 * self.t_read)))
        drifts = t > self.t_0 and self.drift_scale != 0.0
        stored = programmed.drift_nu if drifts else None
        target = None
        if drifts and stored is None:
            if w_target is None:
                raise ValueError("PCM read with drift needs the drift exponents: program with "
                                 "with_drift_exponents=True, or pass w_target to draw them again")
            target = w_target.detach().to(device=w_prog.device, dtype=torch.float32).contiguous()
        path = fused(w_prog, draw)
        params = None if path is None else self.fused_params()
        if params is not None and (not drifts or target is not None):
            ops, seed = path
            return ops.noise_pcm_read(w_prog, target, grid.out_sizes, grid.in_sizes, params, t / self.t_0,
                                      time_factor, self.read_noise_scale,
                                      pair_seeds(seed, Purpose.READ, self.read_noise_scale != 0.0),
                                      pair_seeds(seed, Purpose.DRIFT_NU, drifts), _inplace_buffer(out, w_prog))
        nu_pair = None
        if drifts:
            nu_pair = stored if stored is not None else self.draw_drift_exponents(target, grid, draw)
            nu_pair = nu_pair.detach().to(device=w_prog.device, dtype=torch.float32).contiguous()
        scale = conductance_scale(w_prog, grid, self.g_max)
        nu = [None, None] if nu_pair is None else [nu_pair[0], nu_pair[1]]
        xi = pair_normals(draw, Purpose.READ, w_prog, self.read_noise_scale != 0.0)
        result = _inplace_buffer(out, w_prog)
        result = torch.empty_like(w_prog) if result is None else result

        def chunk(w, s, nu_plus, nu_minus, xi_plus, xi_minus, result):
            g_prog, plus = on_device(w, s, self.g_max)      # the off device is 0 and stays 0
            if nu_plus is None:
                g_drift = g_prog
            else:
                nu_on = torch.lerp(nu_minus, nu_plus, plus)
                g_drift = torch.pow(t / self.t_0, nu_on.neg_()).mul_(g_prog)
            if xi_plus is not None:
                xi_on = torch.lerp(xi_minus, xi_plus, plus)
                sigma = self.read_noise_q(g_prog).mul_(time_factor)
                g_drift = g_drift.abs().mul_(self.read_noise_scale).mul_(sigma).mul_(xi_on).add_(g_drift)
            signed(plus, g_drift.clamp_min(0.0), s, out=result)  # w's chunk is fully read by now (in place)

        elementwise(chunk, [w_prog, scale, *nu, *xi, result])
        return result
