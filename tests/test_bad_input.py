"""Bad input gets a clear error that names the problem, never a silently wrong result."""
import json

import pytest
import torch
from moe_models import build

from romer_kernels import AnalogLinear
from romer_kernels.cli import main as cli
from romer_kernels.config.analog import IOConfig
from romer_kernels.evaluation.lm_metrics import NonFiniteOutput, evaluate_lm
from romer_kernels.moe.convert import Placement, analogize_


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_programming_naming_the_layer(bad):
    layer = AnalogLinear(8, 4, config="aihwkit-default", layer_id="block.proj")
    with torch.no_grad():
        layer.weight[1, 2] = bad
        layer.weight[3, 0] = bad
    with pytest.raises(ValueError, match=r"'block.proj': 2 of 32 weights are NaN or inf"):
        layer.program_(0)
    with pytest.raises(ValueError, match="NaN or inf"):
        layer(torch.randn(2, 8))  # the first forward programs


def test_a_model_with_nan_weights_fails_the_evaluation_instead_of_reporting_metrics():
    model = build("olmoe")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    ids = torch.randint(3, 128, (200,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(NonFiniteOutput, match="scored tokens .* NaN or inf log-likelihood"):
        evaluate_lm(model, ids, seq_len=32, max_windows=2)
    with pytest.raises(ValueError, match="q_proj.*NaN or inf"):
        analogize_(model, "gaussian-chip", t_inference=0.0)


@pytest.mark.parametrize("data,message", [
    ({"digital": "model.layers.0.mlp.gate"}, "Placement.digital must be a list"),
    ({"digital": [3]}, "Placement.digital must be a list"),
    ({"digital_experts": {"model.layers.0.mlp.experts": 3}}, "Placement.digital_experts must map"),
    ({"digital_experts": {"model.layers.0.mlp.experts": ["1"]}}, "Placement.digital_experts must map"),
    ({"router": "yes"}, "Placement.router must be true or false"),
    ({"routers": False}, "has no field"),
    ([1, 2], "JSON object"),
])
def test_placement_fields_are_checked_by_type(data, message):
    with pytest.raises(ValueError, match=message):
        Placement.from_dict(data)


def test_a_pattern_that_matches_nothing_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"'model.layer.0.\*' match no module"):
        analogize_(build("olmoe"), "ideal", Placement(digital=("model.layer.0.*", "model.layers.1.*")))


def test_the_cli_names_the_placement_file(tmp_path, capsys):
    path = tmp_path / "placement.json"
    path.write_text(json.dumps({"digital": "model.layers.0.mlp.gate"}))
    assert cli.main(["demo", "--placement", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    out = capsys.readouterr().out
    assert f"placement file {path}" in out and "Placement.digital must be a list" in out
    assert not (tmp_path / "run").exists()  # refused before the run folder is made
    path.write_text("{not json")
    assert cli.main(["demo", "--placement", str(path)]) == 2
    assert f"placement file {path}" in capsys.readouterr().out


@pytest.mark.parametrize("field", ["inp_res", "out_res"])
@pytest.mark.parametrize("value", [0.51, 1.0, 1.5, 1.99])
def test_a_converter_with_one_level_is_refused(field, value):
    with pytest.raises(ValueError, match=f"IOConfig.{field} = {value!r} leaves one quantization level"):
        IOConfig(**{field: value})
    for fine in (0.5, 2, 1 / 126, 254, 0):
        IOConfig(**{field: fine})


def test_a_0d_input_gets_the_shape_message():
    layer = AnalogLinear(4, 3, config="ideal")
    for x in (torch.tensor(1.0), torch.randn(2, 5)):
        with pytest.raises(ValueError, match="expects inputs with last dimension 4"):
            layer(x)


def test_cli_errors_are_one_line_and_v_shows_the_traceback(monkeypatch, capsys):
    def broken(args):
        raise KeyError("something unexpected")

    monkeypatch.setattr(cli, "_presets", broken)
    assert cli.main(["presets"]) == 2
    out = capsys.readouterr().out
    assert "error: KeyError: 'something unexpected'" in out and "Traceback" not in out and "-v" in out
    assert cli.main(["-v", "presets"]) == 2
    assert "Traceback" in capsys.readouterr().out
