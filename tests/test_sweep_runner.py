"""One model per sweep, re-programmed in place per trial: the same results as a fresh copy per trial, the
same state tensors reused, the caller's model handed back digital and unchanged."""
import copy

import pytest
import torch
from moe_models import build

from romer_kernels.config import preset
from romer_kernels.config.scaling import scale_noise
from romer_kernels.evaluation.lm_metrics import evaluate_lm
from romer_kernels.evaluation.montecarlo import grid
from romer_kernels.evaluation.runner import SweepSettings, TrialRunner, group_trials, trial_metrics
from romer_kernels.evaluation.variants import VARIANTS, calibration_windows
from romer_kernels.methods import RomerConfig, romer_, undo_methods_
from romer_kernels.moe.convert import analogize_, restore_digital_
from romer_kernels.nn import analog_matrices
from romer_kernels.nn.base import AnalogModule
from romer_kernels.nn.model_helpers import drift_analog_, program_analog_

SETTINGS = dict(seq_len=32, batch_size=4, max_windows=2)


def _ids(seed: int, n: int = 700) -> torch.Tensor:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed))


def fresh_trial(model, ids, calib, settings, trial, clean_trace):
    """What the sweep did before it re-programmed in place: a deep copy, converted for this trial alone."""
    analog = copy.deepcopy(model)
    variant = VARIANTS.get(trial.variant)
    placement = variant.placement(model, calib) if variant else settings.placement
    config = scale_noise(settings.config, trial.noise_scale)
    analogize_(analog, config, placement, seed=trial.seed)
    program_analog_(analog, trial.seed)
    if config.noise is not None:
        drift_analog_(analog, trial.t_inference)
    if variant is not None and variant.method is not None:
        with torch.no_grad():
            variant.method(analog, calib)
    return trial_metrics(evaluate_lm(analog, ids, clean=clean_trace, seq_len=settings.seq_len,
                                     batch_size=settings.batch_size, max_windows=settings.max_windows))


@pytest.mark.parametrize("arch,preset_name", [("olmoe", "aihwkit-default"), ("qwen2_moe", "rasch2023")])
def test_in_place_trials_equal_a_fresh_copy_per_trial(arch, preset_name):
    model = build(arch)
    ids, calib_ids = _ids(0), _ids(1)
    settings = SweepSettings(config=preset(preset_name), seeds=(0, 3), noise_scales=(1.0, 2.5), times=(0.0, 3600.0),
                             **SETTINGS)
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    runner = TrialRunner(model, ids, settings, calib_ids, calib_windows=2)
    variants = ("noisy", "maxnn-12.5", "romer", "rq")
    trials = grid(settings.seeds, settings.noise_scales, settings.times, variants)
    results = {trial.key: metrics for group in group_trials(trials) for trial, metrics, _, _ in runner.run_group(group)}
    runner.close()
    # handed back digital, every weight as it was
    assert not any(isinstance(m, AnalogModule) for m in model.modules())
    assert not hasattr(model, "romer_conversion")
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    calib = calibration_windows(calib_ids, settings.seq_len, 2)
    for trial in trials[::3] + [t for t in trials if t.variant in ("romer", "rq")][:6]:
        runner_only = ("digital_share", "replaced_experts", "replicas")    # what the runner adds to the evaluation
        stored = {k: v for k, v in results[trial.key].items() if k not in runner_only}
        assert fresh_trial(model, ids, calib, settings, trial, runner.clean.trace) == stored, trial.key


def test_trials_reuse_the_chip_state_tensors():
    model = build("olmoe")
    settings = SweepSettings(config=preset("aihwkit-default"), seeds=(0, 1), noise_scales=(1.0, 2.0),
                             times=(60.0, 3600.0), **SETTINGS)
    runner = TrialRunner(model, _ids(0), settings)
    trials = grid(settings.seeds, settings.noise_scales, settings.times)
    runner.run(trials[0])
    states = {m.layer_id: m.chip.state.data_ptr() for m in analog_matrices(model)}
    assert states and all(states.values())
    for trial in trials[1:]:
        runner.run(trial)
        assert {m.layer_id: m.chip.state.data_ptr() for m in analog_matrices(model)} == states
    runner.close()


def test_grouping_shares_one_programming_per_seed_and_scale():
    trials = grid([0, 1], [1.0, 2.0], [0.0, 60.0, 3600.0], ["a", "b"])
    groups = group_trials(trials)
    assert len(groups) == 8 and sorted(t.key for g in groups for t in g) == sorted(t.key for t in trials)
    assert all(len({(t.variant, t.noise_scale, t.seed) for t in g}) == 1 and len(g) == 3 for g in groups)
    assert [g[0].variant for g in groups] == ["a"] * 4 + ["b"] * 4  # one conversion per placement


def test_restore_digital_gives_back_the_original_modules():
    model = build("deepseek_v3")
    ids = _ids(2)[:64].reshape(2, 32)
    with torch.no_grad():
        reference = model(ids).logits
    classes = {name: type(m) for name, m in model.named_modules()}
    params = {name: p.data_ptr() for name, p in model.named_parameters()}
    analogize_(model, "gaussian-chip")
    assert any(isinstance(m, AnalogModule) for m in model.modules())
    restore_digital_(model)
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == params
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)
    with pytest.raises(ValueError, match="not converted"):
        restore_digital_(model)
    analogize_(model, "gaussian-chip", t_inference=0.0, keep_digital=False)
    with pytest.raises(ValueError, match="dropped"):
        restore_digital_(model)


def test_undo_methods_leaves_the_plain_noisy_chip():
    model = build("olmoe")
    ids, calib = _ids(3), _ids(4)[:128].reshape(4, 32)
    analogize_(model, "gaussian-chip", seed=1)
    program_analog_(model, 1)
    noisy = trial_metrics(evaluate_lm(model, ids, **SETTINGS))
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        romer_(model, calib, RomerConfig(tau_under=2.0, max_replaced_fraction=0.25))  # cold: below 2 / E
    experts = model.model.layers[0].mlp.experts
    assert experts.dispatch is not None and experts.slot_weights
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())  # ROMER wrote no weight
    undo_methods_(model)
    assert experts.dispatch is None and not experts.slot_weights and not model.model.layers[0].mlp.gate.analog.affine
    from romer_kernels.nn.model_helpers import reset_noise_counters  # noqa: PLC0415

    reset_noise_counters(model)
    assert trial_metrics(evaluate_lm(model, ids, **SETTINGS)) == noisy


def test_reprogramming_with_another_tiling_is_refused():
    model = build("olmoe")
    analogize_(model, "aihwkit-default")
    config = preset("aihwkit-default")
    other = config.replace(tile=config.tile.__class__(max_input_size=16, max_output_size=16))
    with pytest.raises(ValueError, match="tiles the matrix differently"):
        program_analog_(model, 0, config=other)
