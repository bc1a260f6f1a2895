"""PCM noise of the IBM HERMES chip as aihwkit 1.1.0's ``HermesNoiseModel`` (Le Gallo et al., Nat.
Electron. 2023; Khaddam-Aljameh et al., JSSC 2022).

Same structure as :mod:`romer_kernels.noise.pcm` (single pair of devices per weight, programming noise
and drift exponents from the target conductances, re-conversion of the programmed weights at read time,
drift for t > t_0, 1/f read noise), with three different fitted functions, chosen by ``num_devices``
(1 or 2 devices per weight sign; with 2, aihwkit treats both devices as holding the same conductance
for drift): a cubic sigma_prog polynomial, piecewise mean/std of the drift exponent and a piecewise Q_s.
Both branches are evaluated on every element and one is picked per element (aihwkit assigns through
boolean masks; the selected values are the same).

The fits are data (``HERMES_NU_MU``, ``HERMES_NU_SIGMA``, ``HERMES_READ_Q``), used by the torch code
below and given to the same fused C++ kernels as PCM (see :mod:`romer_kernels.noise.pcm`).
"""
from __future__ import annotations

import torch

from romer_kernels.config.device_noise import HermesNoiseConfig
from romer_kernels.noise.pcm import PCMNoiseModel, PieceFit

# (thr, a, b, lo, hi, p2, p1, p0): x < thr ? clip(ln(x) a + b, lo, hi) : (x^2 p2 + x p1) + p0
HERMES_NU_MU: PieceFit = (0.0945, -0.0387, -0.0182, 0.0720, 0.13, -0.0436, -0.0126, 0.0736)
HERMES_NU_SIGMA: dict[int, PieceFit] = {
    1: (0.3039, -0.0120, -0.0023, 0.0124, 0.04, -0.0165, 0.0116, 0.0104),
    2: (0.3055, -0.0117, -0.0057, 0.0091, 0.04, -0.0118, 0.0093, 0.0073),
}
# Q_s (thr, a, b, lo, hi, p3, p2, p1, p0): x < thr ? clip(ln(x) a + b, lo, hi) : ((x^3 p3 + x^2 p2) + x p1) + p0
HERMES_READ_Q: dict[int, tuple[float, ...]] = {
    1: (0.1591, -0.0078, 0.0038, 0.0179, 0.04, 0.0664, -0.1352, 0.0768, 0.0088),
    2: (0.16, -0.0117, -0.0069, 0.015, 0.04, 0.0069, -0.0280, 0.0211, 0.0123),
}


class HermesNoiseModel(PCMNoiseModel):
    """aihwkit ``HermesNoiseModel`` with the single-pair converter."""

    def __init__(self, config: HermesNoiseConfig):  # noqa: D107  (does not call PCMNoiseModel.__init__)
        if not isinstance(config, HermesNoiseConfig):
            raise ValueError(f"HermesNoiseModel needs a HermesNoiseConfig, got {type(config).__name__}")
        self.config = config
        self.num_devices = config.num_devices
        self.g_max = config.resolved_g_max
        self.t_0 = config.resolved_t_0
        self.t_read = float(config.t_read)
        self.prog_coeff = config.prog_coeff
        self.prog_coeff_g_max_reference = config.prog_coeff_g_max_reference
        self.prog_noise_scale = float(config.prog_noise_scale)
        self.read_noise_scale = float(config.read_noise_scale)
        self.drift_scale = float(config.drift_scale)
        self.NU_MU = HERMES_NU_MU
        self.NU_SIGMA = HERMES_NU_SIGMA[self.num_devices]
        self.READ_Q = ("piecewise", HERMES_READ_Q[self.num_devices])

    def fused_params(self) -> dict | None:
        if (type(self).drift_statistics is not HermesNoiseModel.drift_statistics
                or type(self).read_noise_q is not HermesNoiseModel.read_noise_q):
            return None
        return self._kernel_params()

    def drift_statistics(self, g_relative: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Piecewise mean (same for 1 and 2 devices) and std (per ``num_devices``) of nu."""
        log_g = torch.log(g_relative)
        g2 = g_relative * g_relative
        threshold, a, b, lo, hi, p2, p1, p0 = self.NU_MU
        mu_low = (log_g * a).add_(b).clamp_(lo, hi)                   # -0.0387 ln g - 0.0182, clipped
        mu_high = (g2 * p2).add_(g_relative * p1).add_(p0)             # -0.0436 g^2 - 0.0126 g + 0.0736
        mu = _piecewise(g_relative, threshold, mu_low, mu_high)
        threshold, a, b, lo, hi, p2, p1, p0 = self.NU_SIGMA
        sigma_low = log_g.mul_(a).add_(b).clamp_(lo, hi)
        sigma_high = g2.mul_(p2).add_(g_relative * p1).add_(p0)
        sigma = _piecewise(g_relative, threshold, sigma_low, sigma_high)
        return mu, sigma

    def read_noise_q(self, g: torch.Tensor) -> torch.Tensor:
        """Piecewise Q_s at ``g_rel = |g| / g_max`` (no lower clip: log 0 = -inf lands on the upper clamp)."""
        g_rel = g.abs() / self.g_max
        threshold, a, b, lo, hi, p3, p2, p1, p0 = self.READ_Q[1]
        q_low = torch.log(g_rel).mul_(a).add_(b).clamp_(lo, hi)
        g2 = g_rel * g_rel
        q_high = (g2 * g_rel).mul_(p3).add_(g2.mul_(p2)).add_(g_rel * p1).add_(p0)
        return _piecewise(g_rel, threshold, q_low, q_high)


def _piecewise(x: torch.Tensor, threshold: float, below: torch.Tensor, above: torch.Tensor) -> torch.Tensor:
    """``below`` where ``x < threshold``, else ``above`` (both finite).

    Same values as ``torch.where(x < threshold, below, above)``: ``lerp(above, below, m)`` with a 0/1
    weight ``m`` returns one endpoint exactly. On the CPU a float mask plus lerp is over ten times
    faster than a boolean mask plus ``where``.
    """
    mask = torch.lt(x, threshold, out=torch.empty_like(x))
    return torch.lerp(above, below, mask)
