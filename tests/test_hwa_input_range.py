"""Learned static input ranges (aihwkit's input range learning in HWA training, Rasch et al. 2023): the
hand-written gradients against autograd through the reference, aihwkit's range gradient rule checked by
hand, inference with ranges on every CPU backend against an independent formulation, the expert kernels
stepping aside, and the ranges' way through training, save point, checkpoint and evaluation."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from romer_kernels.config import PRESETS, TileGrid, preset
from romer_kernels.config.hwa import HWAConfig
from romer_kernels.kernels.backends import use_backend
from romer_kernels.kernels.hwa import InputRangeClamp, hwa_linear, hwa_linear_reference
from romer_kernels.models.loading import INPUT_RANGES_FILE, load_model_and_tokenizer
from romer_kernels.moe.convert import analogize_, restore_digital_
from romer_kernels.nn import AnalogLinear
from romer_kernels.nn.analog_experts import AnalogExperts
from romer_kernels.nn.hwa import end_hwa_training_, hwa_training_
from romer_kernels.nn.model_helpers import analog_matrices

sys.path.insert(0, str(Path(__file__).parent))
from test_hwa_gradients import layer_case, small  # noqa: E402
from test_hwa_training import SETTINGS, _train, crashed_run  # noqa: E402


def _range_grads(fn, config, seed, ranges):
    x, weight, bias, grid, weights, streams = layer_case(config, HWAConfig(), seed)
    ranges = ranges.clone().requires_grad_()
    clipped = InputRangeClamp.apply(x, ranges, grid, 0.01, 0.95)
    y = fn(clipped, weight, bias, grid, config.io, weights, streams, None, ranges)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    return (y, *torch.autograd.grad(y, (x, weight, bias, ranges), upstream))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_gradients_with_learned_ranges_match_the_reference(name):
    """x, weight, bias and the ranges: the hand-written backward against autograd through the reference
    forward (the output scale r_k and the input x_k / r_k both differentiated)."""
    config = small(name)
    ranges = torch.tensor([1.5, 4.0, 2.5])  # three input tiles; inputs of std 3: some clip, most do not
    mine, reference = _range_grads(hwa_linear, config, 2, ranges), _range_grads(hwa_linear_reference, config, 2, ranges)
    assert torch.equal(mine[0], reference[0])
    for got, want, what in zip(mine[1:], reference[1:], ("x", "weight", "bias", "ranges")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=what)
    assert bool((mine[4] != 0).all())


def test_the_range_gradient_is_aihwkits_rule():
    """Only gradients that ask for a wider range count, scaled by r; the decay term while more than
    min_inside of the tile's inputs are inside; x gets no gradient strictly beyond its range."""
    grid = TileGrid(1, 4, 2, 0)  # two input tiles of two columns
    x = torch.tensor([[3.0, -0.5], [0.2, 0.1]]).repeat(1, 2).requires_grad_()  # [2, 4]; tile 0 = cols 0, 1
    x.data[:, 2:] = torch.tensor([[0.1, -0.2], [0.3, -5.0]])
    ranges = torch.tensor([2.0, 1.0], requires_grad=True)
    y = InputRangeClamp.apply(x, ranges, grid, 0.1, 0.5)
    assert torch.equal(y.detach(), torch.tensor([[2.0, -0.5, 0.1, -0.2], [0.2, 0.1, 0.3, -1.0]]))
    grad = torch.tensor([[-1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    gx, gr = torch.autograd.grad(y, (x, ranges), grad)
    assert torch.equal(gx, torch.tensor([[0.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 0.0]]))
    # tile 0: x=3 >= 2 with gradient -1 (wants wider): -1 * r = -2; 3 of 4 inside (> 0.5): + 0.1 * 2
    # tile 1: x=-5 <= -1 with gradient +8 (wants wider): -8 * r = -8; 3 of 4 inside: + 0.1 * 1
    torch.testing.assert_close(gr, torch.tensor([-2.0 + 0.2, -8.0 + 0.1]))
    # a gradient that asks for a narrower range is ignored
    _, gr = torch.autograd.grad(InputRangeClamp.apply(x, ranges, grid, 0.0, 0.5), (x, ranges), -grad)
    assert torch.equal(gr, torch.zeros(2))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_inference_with_ranges_is_constant_noise_management(backend):
    """A range of 2 on every tile computes what the preset with constant noise management at 2 computes
    (x * 1/2 and x / 2 are the same float, so bit for bit), on each backend; the ranges change the output
    of the abs-max preset and survive the matrix's state."""
    torch.manual_seed(0)
    config = preset("rasch2023").replace(tile={"max_input_size": 24})
    constant = config.replace(io={"noise_management": "constant", "nm_thres": 2.0})
    weight = nn.Parameter(torch.randn(10, 60) * 0.2)
    x = torch.randn(9, 60) * 1.5
    outputs = {}
    with use_backend(backend):
        for label, cfg, ranges in (("ranges", config, torch.full((3,), 2.0)), ("constant", constant, None),
                                   ("abs_max", config, None)):
            layer = AnalogLinear(60, 10, bias=False, config=cfg, seed=4, layer_id="l", _weight=weight)
            layer.analog.set_input_range(ranges)
            with torch.no_grad():
                outputs[label] = layer(x)
            state = layer.analog.state(weight)
    assert torch.equal(outputs["ranges"], outputs["constant"])
    assert not torch.equal(outputs["ranges"], outputs["abs_max"])
    assert state["input_range"] is None  # the last layer had none
    layer.analog.load_state({**state, "input_range": [2.0, 2.0, 2.0]})
    assert torch.equal(layer.analog.input_range, torch.full((3,), 2.0))
    with pytest.raises(ValueError, match="2 input ranges for 3 input tiles"):
        layer.analog.set_input_range(torch.ones(2))
    with pytest.raises(ValueError, match="finite and positive"):
        layer.analog.set_input_range(torch.tensor([1.0, 0.0, 1.0]))


def test_experts_with_ranges_take_the_loop_on_every_backend():
    """The fused C++ expert loop has no input ranges: with ranges the experts compute per matrix, and the
    C++ and reference MVMs give the same result."""
    torch.manual_seed(1)
    E, H, I = 4, 24, 16
    gate_up, down = nn.Parameter(torch.randn(E, 2 * I, H) * 0.2), nn.Parameter(torch.randn(E, H, I) * 0.2)
    x = torch.randn(10, H) * 2
    index = torch.stack([torch.randperm(E)[:2] for _ in range(10)])
    weights = torch.rand(10, 2)
    results = []
    for backend in ("cpp", "reference"):
        experts = AnalogExperts(gate_up, down, nn.SiLU(), "rasch2023", name="e", seed=2)
        experts.backend = backend
        with torch.no_grad():
            plain = experts(x, index, weights)
            for e, matrix in enumerate(experts.gate_up + experts.down):
                matrix.set_input_range(torch.tensor([0.5 + 0.25 * (e % 3)]))
            results.append(experts(x, index, weights))
        assert not torch.equal(plain, results[-1])
    assert torch.equal(results[0], results[1])


def test_ranges_start_from_the_data():
    """aihwkit's init_from_data: the first training forward sets each tile's range to alpha x std of its
    inputs, later ones average; a model with ranges of its own keeps them (already initialised)."""
    from romer_kernels.models.loading import load_model  # noqa: PLC0415

    model, _ = load_model("tiny-olmoe")
    analogize_(model, "rasch2023")
    training = hwa_training_(model, HWAConfig(learn_input_range=True, input_range_init_alpha=2.0))
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(training.input_ranges[name].detach(), torch.tensor([3.0]))
    inputs = {}
    layer = model.get_submodule(name)
    handle = layer.register_forward_pre_hook(lambda _m, args: inputs.setdefault("x", args[0].detach().clone()))
    model.train()
    ids = torch.randint(0, 4000, (2, 12), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    handle.remove()
    expected = 2.0 * inputs["x"].reshape(-1, layer.in_features).float().std()
    torch.testing.assert_close(training.input_ranges[name].detach(), expected.reshape(1))
    assert int(training.range_updates[name][0]) == 1
    assert training.input_ranges[name].grad is not None  # and it learns
    end_hwa_training_(model)
    assert torch.equal(layer.analog.input_range, training.input_ranges[name].detach())  # inference uses it
    again = hwa_training_(model, HWAConfig(learn_input_range=True))
    assert torch.equal(again.input_ranges[name].detach(), layer.analog.input_range)
    assert int(again.range_updates[name][0]) == again.config.input_range_init_batches


def test_learned_ranges_resume_and_reach_the_evaluation(tmp_path, monkeypatch):
    """A run interrupted after its save point resumes to the uninterrupted ranges and weights; the checkpoint
    holds the ranges, loading it attaches them and every conversion applies them."""
    hwa = HWAConfig(learn_input_range=True, input_range_init_batches=2)
    straight, _ = _train(tmp_path / "straight", hwa=hwa)
    crashed_run(tmp_path / "resumed", monkeypatch, hwa)
    resumed, run = _train(tmp_path / "resumed", hwa=hwa)
    assert run.resumed_from == 2 and run.steps == SETTINGS.steps
    assert sorted(straight.romer_input_ranges) == sorted(resumed.romer_input_ranges)
    for name, ranges in straight.romer_input_ranges.items():
        assert torch.equal(ranges, resumed.romer_input_ranges[name]), name
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert (tmp_path / "resumed" / "model" / INPUT_RANGES_FILE).is_file()
    loaded, _ = load_model_and_tokenizer(str(tmp_path / "resumed" / "model"))
    analogize_(loaded, "rasch2023")
    matrices = list(analog_matrices(loaded))
    assert loaded.romer_conversion["input_ranges"] == len(matrices)
    assert all(torch.equal(m.input_range, straight.romer_input_ranges[str(m.layer_id)]) for m in matrices)
    # ranges that fit no matrix are refused, not ignored
    restore_digital_(loaded)
    loaded.romer_input_ranges = {"elsewhere.q_proj": torch.ones(1)}
    with pytest.raises(ValueError, match="fit none of its analog matrices"):
        analogize_(loaded, "rasch2023")


def test_compare_runs_the_hwa_variants_with_the_checkpoints_ranges(tmp_path):
    """In one runner the hwa variants compute with the checkpoint's learned ranges, the base variants with
    the preset's noise management; the ranges enter the runner's identity (a resumed run never mixes)."""
    from romer_kernels.evaluation.montecarlo import Trial  # noqa: PLC0415
    from romer_kernels.evaluation.runner import SweepSettings, TrialRunner  # noqa: PLC0415
    from romer_kernels.models.loading import load_model  # noqa: PLC0415

    _train(tmp_path / "hwa", settings=SETTINGS.__class__(steps=1, batch_size=1, seq_len=16, warmup=1, save_every=1),
           hwa=HWAConfig(learn_input_range=True))
    model, _ = load_model("tiny-olmoe")
    settings = SweepSettings(preset("rasch2023"), seeds=(0,), noise_scales=(1.0,), max_windows=1,
                             hwa_checkpoint=str(tmp_path / "hwa" / "model"))
    ids = torch.randint(0, 4000, (600,), generator=torch.Generator().manual_seed(0))
    runner = TrialRunner(model, ids, settings)
    assert "hwa_input_ranges" in runner.identity and "input_ranges" not in runner.identity
    for variant, with_ranges in (("hwa", True), ("noisy", False), ("hwa", True)):
        prepared = runner.prepare(Trial(0, 1.0, 3600.0, variant))
        matrices = list(analog_matrices(prepared))
        assert all((m.input_range is not None) == with_ranges for m in matrices), variant
    runner.close()
    assert not hasattr(model, "romer_input_ranges")


def test_a_replica_takes_its_donors_ranges():
    """Replicate-and-Quantize's replica of an expert sees the donor's tokens: it gets the donor's ranges."""
    from romer_kernels.methods.replicate_quantize import ReplicaBank  # noqa: PLC0415

    E, H, I = 3, 16, 8
    experts = AnalogExperts(nn.Parameter(torch.randn(E, 2 * I, H)), nn.Parameter(torch.randn(E, H, I)), nn.SiLU(),
                            "rasch2023", name="e")
    experts.gate_up[2].set_input_range(torch.tensor([1.25]))
    bank = ReplicaBank(experts, [2, 0], bits=8)
    assert torch.equal(bank.gate_up[0].input_range, torch.tensor([1.25]))
    assert bank.down[0].input_range is None and bank.gate_up[1].input_range is None
    assert bank.gate_up[0].input_range is not experts.gate_up[2].input_range  # its own copy


def test_the_cli_learns_ranges_on_request_only(tmp_path, capsys):
    import json  # noqa: PLC0415

    from romer_kernels.cli.main import main  # noqa: PLC0415

    assert main(["hwa-train", "--steps", "1", "--input-range-init-alpha", "6", "--run-dir", str(tmp_path / "x")]) == 2
    assert "applies only to learned input ranges: add --learn-input-range" in capsys.readouterr().out
    run_dir = tmp_path / "hwa"
    assert main(["hwa-train", "--steps", "1", "--train-batch-size", "1", "--train-seq-len", "16", "--warmup", "1",
                 "--learn-input-range", "--input-range-init-alpha", "5", "--seeds", "1", "--windows", "1",
                 "--run-dir", str(run_dir)]) == 0
    record = json.loads((run_dir / "model" / "hwa.json").read_text())
    assert record["fingerprint"]["hwa"]["learn_input_range"] and record["fingerprint"]["hwa"]["input_range_init_alpha"] == 5
    assert (run_dir / "model" / INPUT_RANGES_FILE).is_file()
