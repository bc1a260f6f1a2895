"""romer sensitivity: one part of the model analog at a time (category, layer, expert), the rest digital;
the part's chips are the ones it has in a whole-model conversion; table, heatmap, resumable store."""
from __future__ import annotations

import pytest
import torch

from romer_kernels.cli.main import main
from romer_kernels.config.presets import preset
from romer_kernels.evaluation.results import read_run
from romer_kernels.methods.placement import Part, decoder_layers, model_parts, part_placement
from romer_kernels.models.loading import load_model_and_tokenizer
from romer_kernels.moe.convert import Placement, analogize_, placement_report, restore_digital_
from romer_kernels.nn.analog_linear import AnalogLinear


def test_part_names_round_trip_and_bad_parts_are_refused():
    for part in (Part("attention"), Part("router", 2), Part("experts", 1, 7), Part("experts+router", 3)):
        assert Part.parse(part.name) == part
    assert Part.parse("only:experts+router").categories == ("experts", "router")
    with pytest.raises(ValueError, match="named twice"):
        Part("experts+experts")
    assert Part("experts", 1, 7).name == "only:experts@1#7"
    with pytest.raises(ValueError, match="unknown module category 'attn'"):
        Part.parse("only:attn@1")
    with pytest.raises(ValueError, match="one layer"):
        Part("attention", 1, 2)
    with pytest.raises(ValueError, match="not a part name"):
        Part.parse("attention@1")


@pytest.fixture(scope="module")
def olmoe():
    model, _ = load_model_and_tokenizer("tiny-olmoe")
    return model


def test_a_part_placement_makes_exactly_that_part_analog(olmoe):
    assert decoder_layers(olmoe) == ("model.layers", 4)
    analogize_(olmoe, preset("rasch2023"), part_placement(olmoe, Part("attention", 1)))
    try:
        analog = [row.module for row in placement_report(olmoe) if row.kind.startswith("analog")]
        assert analog and all(name.startswith("model.layers.1.self_attn.") for name in analog)
    finally:
        restore_digital_(olmoe)
    analogize_(olmoe, preset("rasch2023"), part_placement(olmoe, Part("experts", 2, 5)))
    try:
        experts = olmoe.get_submodule("model.layers.2.mlp.experts")
        assert experts.digital_experts == frozenset(range(16)) - {5}
        assert [row.module for row in placement_report(olmoe) if row.kind.startswith("analog")] == [
            "model.layers.2.mlp.experts"]
    finally:
        restore_digital_(olmoe)
    with pytest.raises(ValueError, match="4 decoder layers"):
        part_placement(olmoe, Part("router", 4))
    with pytest.raises(ValueError, match="16 experts"):
        part_placement(olmoe, Part("experts", 0, 16))


def test_the_parts_of_both_bundled_models():
    olmoe, _ = load_model_and_tokenizer("tiny-olmoe")
    names = [p.name for p in model_parts(olmoe)]
    assert names[:6] == ["only:experts", "only:experts@0", "only:experts@1", "only:experts@2", "only:experts@3",
                         "only:router"]
    assert "only:lm_head" in names and "only:lm_head@0" not in names and "only:shared_experts" not in names
    assert len(model_parts(olmoe, per_layer=False, per_expert=True)) == 4 + 4 * 16
    deepseek, _ = load_model_and_tokenizer("tiny-deepseek")
    names = [p.name for p in model_parts(deepseek)]
    # layer 0 is a dense MLP, layers 1-3 are MoE with a shared expert
    assert "only:dense_mlp@0" in names and "only:dense_mlp@1" not in names
    assert "only:shared_experts@1" in names and "only:experts@0" not in names


def test_a_part_gets_the_same_chip_as_in_the_whole_model(olmoe):
    name = "model.layers.1.self_attn.q_proj"
    analogize_(olmoe, preset("rasch2023"), Placement(), seed=11)
    try:
        whole = olmoe.get_submodule(name)
        assert isinstance(whole, AnalogLinear)
        expected = whole.program_(11).effective_weight().clone()
    finally:
        restore_digital_(olmoe)
    analogize_(olmoe, preset("rasch2023"), part_placement(olmoe, Part("attention", 1)), seed=11)
    try:
        assert torch.equal(olmoe.get_submodule(name).program_(11).effective_weight(), expected)
    finally:
        restore_digital_(olmoe)


def test_the_cli_prints_the_table_writes_the_heatmap_and_resumes(tmp_path, capsys):
    run_dir = tmp_path / "sens"
    args = ["sensitivity", "--categories", "attention,router", "--seeds", "2", "--windows", "2",
            "--run-dir", str(run_dir)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "PPL increase" in out and "attention" in out and "router" in out
    assert "20 trials run now" in out                     # 2 categories x (whole + 4 layers) x 2 seeds
    assert (run_dir / "sensitivity.png").stat().st_size > 10_000
    record = read_run(run_dir)
    assert sorted({row.trial.variant for row in record.trials}) == sorted(
        ["only:attention", "only:router"] + [f"only:{c}@{i}" for c in ("attention", "router") for i in range(4)])
    # a part's PPL differs from the clean PPL (noise reaches the output), and stays finite
    assert all(row.metrics["ppl"] != record.clean["ppl"] for row in record.trials)
    assert main(args) == 0
    assert "0 trials run now" in capsys.readouterr().out
    assert main(["sensitivity", "--categories", "bogus", "--run-dir", str(tmp_path / "x")]) == 2
    assert "unknown module category 'bogus'" in capsys.readouterr().out


def test_per_expert_parts_print_the_score_correlations_and_their_scatter(tmp_path, capsys):
    run_dir = tmp_path / "experts"
    assert main(["sensitivity", "--categories", "experts", "--no-per-layer", "--per-expert", "--seeds", "1",
                 "--windows", "1", "--tasks", "none", "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "Spearman rank correlation" in out and "MaxNNScore" in out
    assert "65 trials run now" in out                      # experts whole + 4 layers x 16 experts, 1 seed
    assert (run_dir / "expert-scores.png").stat().st_size > 10_000 and (run_dir / "sensitivity.png").is_file()
