"""What hardware-aware (HWA) training injects into the forward of the analog layers (Rasch et al. 2023).

In HWA training mode every analog matrix computes through its chip's periphery (DAC/ADC quantization and
clipping, output noise, weight read noise, IR drop: the preset's ``IOConfig``) on weights that carry a
fresh noise draw per mini-batch, and passes gradients straight through the quantizers (see
``romer_kernels.kernels.hwa``). This config says which weight noise that is and what happens between
optimizer steps; the periphery is the preset's own.
"""
from __future__ import annotations

from dataclasses import dataclass

from romer_kernels.config._fields import check_bool, check_choice, check_int, check_number

WEIGHT_NOISE = ("device", "gaussian", "none")

# Training chips are drawn from seeds at and above this offset, so a training step never sees the chip of an
# evaluation seed (evaluations use small seeds: 0, 1, 2, ...).
TRAIN_SEED_OFFSET = 1 << 62


@dataclass(frozen=True)
class HWAConfig:
    """Noise injection of HWA training.

    ``weight_noise``: "device" -- each mini-batch sees a freshly programmed chip of the preset's device
    model (its programming noise, e.g. PCM's, scaled by ``weight_noise_scale``), "gaussian" -- additive
    Gaussian noise of ``gaussian_sigma`` x the crossbar column's max |w| (aihwkit ``ADD_NORMAL``), "none".
    ``mvm_noise``: the preset's per-MVM noise (output, input, weight read noise) in the training forward.
    ``clip_sigma`` > 0: after every optimizer step each analog weight matrix is clipped to +-clip_sigma x
    its standard deviation (aihwkit ``LAYER_GAUSSIAN`` clipping); 0 = no clipping.
    ``seed``: the training chips' seeds are ``TRAIN_SEED_OFFSET + seed * 2**32 + step``.
    ``learn_input_range``: learn a static input range per crossbar (input tile) of every analog matrix, as
    aihwkit's ``StandardHWATrainingPreset`` does (``InputRangeParameter``): during training each tile sees
    ``clamp(x, +-r) / r`` instead of the preset's noise management, ``r`` starts as the running mean of
    ``input_range_init_alpha`` x std(x) over the first ``input_range_init_batches`` forwards, then learns
    (``kernels.hwa.InputRangeClamp``: only gradients that widen it, plus ``input_range_decay`` x r while more
    than ``input_range_min_inside`` of the inputs are inside); the trained model computes with these ranges.
    """

    weight_noise: str = "device"
    weight_noise_scale: float = 1.0
    gaussian_sigma: float = 0.02
    mvm_noise: bool = True
    clip_sigma: float = 0.0
    seed: int = 0
    learn_input_range: bool = False
    input_range_init_batches: int = 100
    input_range_init_alpha: float = 3.0
    input_range_decay: float = 0.01
    input_range_min_inside: float = 0.95

    def __post_init__(self) -> None:
        owner = "HWAConfig"
        check_choice(owner, "weight_noise", self.weight_noise, WEIGHT_NOISE)
        check_number(owner, "weight_noise_scale", self.weight_noise_scale, low=0)
        check_number(owner, "gaussian_sigma", self.gaussian_sigma, low=0)
        check_bool(owner, "mvm_noise", self.mvm_noise)
        check_number(owner, "clip_sigma", self.clip_sigma, low=0)
        check_int(owner, "seed", self.seed, low=0)
        check_bool(owner, "learn_input_range", self.learn_input_range)
        check_int(owner, "input_range_init_batches", self.input_range_init_batches, low=0)
        check_number(owner, "input_range_init_alpha", self.input_range_init_alpha, low=0, low_open=True)
        check_number(owner, "input_range_decay", self.input_range_decay, low=0)
        check_number(owner, "input_range_min_inside", self.input_range_min_inside, low=0, high=1)
        if self.seed >= 1 << 29:
            raise ValueError(f"HWAConfig.seed must be < 2**29, got {self.seed}")

    def step_seed(self, step: int) -> int:
        """The chip seed of training step ``step`` (disjoint from every evaluation seed below 2**62)."""
        if step < 0 or step >= 1 << 32:
            raise ValueError(f"training step must be in [0, 2**32), got {step}")
        return TRAIN_SEED_OFFSET + (self.seed << 32) + step
