"""analogize_ in place: shared parameters (no copy), chips programmed during conversion (t_inference), and
digital weights dropped (keep_digital=False) with the same chips and clear errors afterwards."""
import pytest
import torch
from moe_models import build

from romer_kernels import AnalogLinear, drift_analog_, program_analog_, reset_noise_counters
from romer_kernels.methods import replicate_quantize_
from romer_kernels.moe import analogize_, save_analog
from romer_kernels.nn import chip_state_bytes
from romer_kernels.nn.analog_experts import AnalogExperts

ARCH = "olmoe"
HOUR = 3600.0


def _ids(seed=0):
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


def test_conversion_shares_the_models_parameters():
    model = build(ARCH)
    q_proj = model.model.layers[0].self_attn.q_proj
    weight = q_proj.weight
    experts_weight = model.model.layers[0].mlp.experts.gate_up_proj
    analogize_(model, "aihwkit-default")
    converted = model.model.layers[0].self_attn.q_proj
    assert isinstance(converted, AnalogLinear) and converted.weight is weight
    assert model.model.layers[0].mlp.experts.gate_up_proj is experts_weight


@torch.no_grad()
@pytest.mark.parametrize("keep_digital", [True, False])
def test_programmed_during_conversion_equals_programmed_later(keep_digital):
    ids = _ids(1)
    lazy = analogize_(build(ARCH), "rasch2023", seed=3)
    program_analog_(lazy, seed=3)
    drift_analog_(lazy, HOUR)
    eager = analogize_(build(ARCH), "rasch2023", seed=3, t_inference=HOUR, keep_digital=keep_digital)
    for model in (lazy, eager):
        reset_noise_counters(model)
    assert torch.equal(lazy(ids).logits, eager(ids).logits)
    assert chip_state_bytes(eager) == chip_state_bytes(lazy)


@torch.no_grad()
def test_dropped_digital_weights_free_memory_and_fix_the_chips():
    model = analogize_(build(ARCH), "aihwkit-default", seed=1, t_inference=HOUR, keep_digital=False)
    analog_params = [m for m in model.modules() if isinstance(m, (AnalogLinear, AnalogExperts))]
    assert analog_params
    for module in analog_params:
        weights = [module.weight] if isinstance(module, AnalogLinear) else [module.gate_up_proj, module.down_proj]
        assert all(w.is_meta for w in weights)
    logits = model(_ids(2)).logits
    assert torch.isfinite(logits).all()
    with pytest.raises(RuntimeError, match="keep_digital=False"):
        program_analog_(model, seed=2)
    with pytest.raises(RuntimeError, match="keep_digital=False"):
        drift_analog_(model, 2 * HOUR)
    with pytest.raises(ValueError, match="keep_digital"):
        save_analog(model, "/tmp/never-written")
    with pytest.raises(ValueError, match="keep_digital"):
        replicate_quantize_(model, _ids(3))


def test_bad_conversion_time_is_refused():
    with pytest.raises(ValueError, match="t_inference"):
        analogize_(build(ARCH), "aihwkit-default", t_inference=-1.0)
