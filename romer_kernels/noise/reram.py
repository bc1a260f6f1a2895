"""ReRAM noise as aihwkit 1.1.0's ``ReRamWan2022NoiseModel`` (Wan et al., Nature 2022).

The spread of the conductance around its target is a 4th-order polynomial of ``g_T / g_max`` (uS)
fitted at three times only (1 s, 1 day, 2 days). There is no drift in the usual sense:

* ``program``: ``g_P = max(0, g_T + noise_scale * sigma_1s(g_T) * xi)`` on both devices of the pair
  (the 1 s fit, aihwkit's smallest key); the *targets* ``(G+_T, G-_T)`` are kept where the other models
  keep drift exponents (``ProgrammedWeights.drift_nu``), as aihwkit returns them as its "drift
  coefficients".
* ``read(t)``: a fresh sample around the *targets*, ``g = max(0, g_T + noise_scale * sigma_t(g_T) * xi)``;
  the programmed values are not used, except that, as in aihwkit's ``apply_drift_noise``, the weights
  are converted back with the scale of the *programmed* tile, ``s' = g_max / max|W_P|``, not the
  programming scale ``s``. So a read weight is ``(G+ - G-) / s'``, i.e. scaled by ``s / s'`` =
  ``max|W_P| / max|W_T|`` relative to the target: a bias (>= 1 in practice) that grows with the
  programming noise of the tile's largest weights and with the number of weights near the abs-max.
  ``t_inference`` must equal one of the fitted times exactly, else ``ValueError``.

aihwkit bug reproduced: the polynomial is multiplied by ``g_max / coeff_g_max_reference`` where aihwkit's
reference is ``g_max`` itself (it means 40 uS, but stores that in an attribute it never reads), so the
factor is 1. ``ReRamWan2022NoiseConfig.coeff_g_max_reference`` can set 40 to get the intended scaling.
"""
from __future__ import annotations

import torch

from romer_kernels.config.device_noise import RERAM_WAN2022_COEFF, ReRamWan2022NoiseConfig
from romer_kernels.config.tiling import TileGrid
from romer_kernels.noise.base import DeviceNoiseModel, Draw, ProgrammedWeights
from romer_kernels.noise.pcm import (
    _inplace_buffer,
    _separate_buffer,
    check_time,
    conductance_scale,
    elementwise,
    on_device,
    pair_normals,
    polynomial,
    route,
    sample_pair,
)
from romer_kernels.rng import Purpose


class ReRamWan2022NoiseModel(DeviceNoiseModel):
    """aihwkit ``ReRamWan2022NoiseModel`` with the single-pair converter.

    Computed as :mod:`romer_kernels.noise.pcm` does: the polynomial is evaluated once per weight on the
    target ``a`` of the device that holds it; the device with target 0 uses the constant sigma_t(0);
    each device's normals come from its own slot (0 = G+, 1 = G-).
    """

    fitted_times = tuple(RERAM_WAN2022_COEFF)

    def __init__(self, config: ReRamWan2022NoiseConfig):
        if not isinstance(config, ReRamWan2022NoiseConfig):
            raise ValueError(f"ReRamWan2022NoiseModel needs a ReRamWan2022NoiseConfig, got {type(config).__name__}")
        self.config = config
        self.g_max = float(config.g_max)
        self.noise_scale = float(config.noise_scale)
        self.coeff_g_max_reference = config.resolved_coeff_g_max_reference

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    def sigma(self, g_target: torch.Tensor, t: float) -> torch.Tensor:
        """``noise_scale * sigma_t(g_T)`` in uS, ``sigma_t = poly_t(g_T / g_max) * g_max / coeff_g_max_reference``."""
        sigma = polynomial(g_target / self.g_max, RERAM_WAN2022_COEFF[t])
        return sigma.mul_(self.g_max / self.coeff_g_max_reference).mul_(self.noise_scale)

    def program(self, w_target: torch.Tensor, grid: TileGrid, draw: Draw, out: torch.Tensor | None = None,
                with_drift_exponents: bool = True) -> ProgrammedWeights:
        """``g_P = max(0, g_T + noise_scale * sigma_1s(g_T) * xi)`` per device (aihwkit uses its smallest
        key, 1 s), xi from (PROGRAM, slot); the target pair (G+_T, G-_T) is stored in ``drift_nu``
        (aihwkit's "drift coefficients" of this model) unless ``with_drift_exponents=False`` (a chip keeps
        no targets: :meth:`read` derives them from ``w_target`` again). ``out``: a float32 tensor to write
        W_P into."""
        w = w_target.detach().to(torch.float32).contiguous()
        scale = conductance_scale(w, grid, self.g_max)
        xi = pair_normals(draw, Purpose.PROGRAM, w, self.noise_scale != 0.0)
        t = min(self.fitted_times)
        sigma_off = self.sigma(torch.zeros(1), t).item()
        weights = _separate_buffer(out, w)
        weights = torch.empty_like(w) if weights is None else weights
        targets = torch.empty((2, *w.shape), dtype=torch.float32, device=w.device) if with_drift_exponents else None

        def chunk(w, s, xi_plus, xi_minus, out_w, out_target_plus, out_target_minus):
            a, plus = on_device(w, s, self.g_max)
            if out_target_plus is not None:
                route(plus, a, torch.zeros_like(a), out=(out_target_plus, out_target_minus))
            g_plus, g_minus = sample_pair(a, plus, xi_plus, xi_minus, lambda g: self.sigma(g, t), sigma_off)
            torch.sub(g_plus, g_minus, out=out_w).div_(s)

        target_out = [None, None] if targets is None else [targets[0], targets[1]]
        elementwise(chunk, [w, scale, *xi, weights, *target_out])
        return ProgrammedWeights(weights, targets)

    def target_pair(self, w_target: torch.Tensor, grid: TileGrid) -> torch.Tensor:
        """[2, *shape] target conductances (G+_T, G-_T) of ``w_target``, as :meth:`program` stores them."""
        w = w_target.detach().to(torch.float32).contiguous()
        scale = conductance_scale(w, grid, self.g_max)
        targets = torch.empty((2, *w.shape), dtype=torch.float32, device=w.device)

        def chunk(w, s, out_plus, out_minus):
            a, plus = on_device(w, s, self.g_max)
            route(plus, a, torch.zeros_like(a), out=(out_plus, out_minus))

        elementwise(chunk, [w, scale, targets[0], targets[1]])
        return targets

    def read(self, programmed: ProgrammedWeights, t_inference: float, grid: TileGrid, draw: Draw,
             out: torch.Tensor | None = None, w_target: torch.Tensor | None = None) -> torch.Tensor:
        """``g = max(0, g_T + noise_scale * sigma_t(g_T) * xi)`` per device around the targets (stored, or
        derived from ``w_target``), xi from (READ, slot), converted back with the scale s' of the
        programmed tile (as aihwkit's ``apply_drift_noise``): ``W = (G+ - G-) / s'``. ``out`` may be
        ``programmed.weights`` (in place)."""
        t = check_time(t_inference)
        if t not in RERAM_WAN2022_COEFF:
            times = ", ".join(f"{time:g} s" for time in self.fitted_times)
            raise ValueError(f"ReRamWan2022 noise is fitted only at t_inference in ({times}), i.e. "
                             f"1 s, 1 day, 2 days; got {t_inference!r}")
        targets = programmed.drift_nu
        if targets is None and w_target is not None:
            targets = self.target_pair(w_target, grid)
        if targets is None or tuple(targets.shape) != (2, *programmed.weights.shape):
            raise ValueError("ReRamWan2022NoiseModel.read needs the target conductances: stored by its program() "
                             "or derived from w_target")
        w_prog = programmed.weights.detach().to(torch.float32).contiguous()
        targets = targets.detach().to(device=w_prog.device, dtype=torch.float32).contiguous()
        scale = conductance_scale(w_prog, grid, self.g_max)   # aihwkit converts back with the W_P scale
        xi = pair_normals(draw, Purpose.READ, w_prog, self.noise_scale != 0.0)
        sigma_off = self.sigma(torch.zeros(1), t).item()
        result = _inplace_buffer(out, w_prog)
        result = torch.empty_like(w_prog) if result is None else result

        def chunk(s, target_plus, target_minus, xi_plus, xi_minus, result):
            plus = torch.gt(target_plus, 0.0, out=torch.empty_like(target_plus))  # G+ holds the weight
            a = target_plus + target_minus                     # exact: one of the two is 0
            g_plus, g_minus = sample_pair(a, plus, xi_plus, xi_minus, lambda g: self.sigma(g, t), sigma_off)
            torch.sub(g_plus, g_minus, out=result).div_(s)

        elementwise(chunk, [scale, targets[0], targets[1], *xi, result])
        return result
