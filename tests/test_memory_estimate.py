"""The memory estimate (romer_kernels.evaluation.memory) and `romer info --memory`, on the meta device."""
import dataclasses
import json
import math
import socket

import pytest
import torch

from romer_kernels.cli.main import main
from romer_kernels.config.analog import AnalogConfig
from romer_kernels.config.presets import preset
from romer_kernels.evaluation.memory import (
    CONFIG_ASSETS,
    per_column_vectors,
    bundled_configs,
    estimate_memory,
    load_model_config,
    meta_model,
    parse_size,
)
from romer_kernels.moe.convert import Placement

OLMOE = "olmoe-1b-7b"


@pytest.fixture(scope="module")
def olmoe_fp32():
    return estimate_memory(OLMOE, "aihwkit-default", weight_dtype=torch.float32, state_dtype="float32")


@pytest.fixture(scope="module")
def olmoe_bf16():
    return estimate_memory(OLMOE, "aihwkit-default", weight_dtype="bfloat16", state_dtype="bfloat16")


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the memory estimate tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def olmoe_per_column_vector_bytes(max_input_size=512):
    """The per-column vectors of OLMoE-1B-7B's analog matrices (all but lm_head), from its published shape."""
    config = json.loads((CONFIG_ASSETS / f"{OLMOE}.json").read_text())
    hidden, inter, experts = config["hidden_size"], config["intermediate_size"], config["num_experts"]
    layers = config["num_hidden_layers"]

    def vectors(out_features, in_features):
        return per_column_vectors(preset("aihwkit-default")) * math.ceil(in_features / max_input_size) * out_features * 4

    per_layer = (4 * vectors(hidden, hidden)                       # q, k, v, o (16 heads x 128 = hidden)
                 + vectors(experts, hidden)                          # router
                 + experts * (vectors(2 * inter, hidden) + vectors(hidden, inter)))  # gate_up, down
    return layers * per_layer


def test_bundled_configs_are_the_reference_models():
    assert set(bundled_configs()) >= {"olmoe-1b-7b", "qwen1.5-moe-a2.7b", "deepseek-v2-lite", "mixtral-8x7b"}


def test_parameter_counts_match_the_meta_model(olmoe_fp32):
    model = meta_model(load_model_config(OLMOE))
    assert olmoe_fp32.parameters == sum(p.numel() for p in model.parameters())
    assert abs(olmoe_fp32.parameters / 1e9 - 6.92) < 0.01  # the published total
    # everything analog except lm_head and the embedding/norm vectors
    digital = olmoe_fp32.row("lm_head").parameters + olmoe_fp32.row("embeddings").parameters
    assert olmoe_fp32.row("lm_head").analog_parameters == 0
    assert olmoe_fp32.row("routed experts").analog_parameters == olmoe_fp32.row("routed experts").parameters
    assert olmoe_fp32.analog_parameters < olmoe_fp32.parameters - digital


def test_digital_bytes_scale_with_the_weight_dtype(olmoe_fp32, olmoe_bf16):
    assert olmoe_fp32.digital_bytes == 4 * olmoe_fp32.parameters
    assert olmoe_bf16.digital_bytes * 2 == olmoe_fp32.digital_bytes
    for fp32_row, bf16_row in zip(olmoe_fp32.rows, olmoe_bf16.rows):
        assert bf16_row.digital_bytes * 2 == fp32_row.digital_bytes, fp32_row.name


def test_chip_state_is_one_weight_copy_plus_per_column_vectors(olmoe_fp32, olmoe_bf16):
    vectors = olmoe_per_column_vector_bytes()
    assert olmoe_fp32.chip_bytes == olmoe_fp32.analog_parameters * 4 + vectors
    assert olmoe_bf16.chip_bytes == olmoe_bf16.analog_parameters * 2 + vectors
    on_gpu = estimate_memory(OLMOE, "aihwkit-default", weight_dtype="bfloat16", state_dtype="bfloat16", device="cuda")
    gpu_vectors = vectors // per_column_vectors(preset("aihwkit-default")) * per_column_vectors(preset("aihwkit-default"), "cuda")
    assert on_gpu.chip_bytes == gpu_vectors  # on-the-fly chips: no weight-sized state
    assert on_gpu.digital_bytes == olmoe_bf16.digital_bytes


def test_temporaries_follow_the_preset_and_state_dtype(olmoe_fp32, olmoe_bf16):
    largest = 2048 * 2048 * 4  # gate_up [2I, H] = attention [H, H] = 2048 x 2048
    assert [size for _, size in olmoe_fp32.temporaries] == []   # float32 weights and state, no weight scaling
    # bfloat16 state: its float32 copy per call; scratch: the float32 weight and the float32 working copy
    assert [size for _, size in olmoe_bf16.temporaries] == [largest, 2 * largest]
    rasch = estimate_memory(OLMOE, "rasch2023", weight_dtype="bfloat16", state_dtype="float32")
    # |W| of one tile; scratch: the float32 weight and the weight-scaled target
    assert [size for _, size in rasch.temporaries] == [2048 * 512 * 4, 2 * largest]
    on_gpu = estimate_memory(OLMOE, "rasch2023", weight_dtype="bfloat16", state_dtype="float32", device="cuda")
    assert on_gpu.temporaries == []  # on-the-fly chips read the bfloat16 weights in place
    assert rasch.row("per-call temporaries").activation_bytes == sum(size for _, size in rasch.temporaries)


def test_placement_and_keep_digital(olmoe_bf16):
    digital = estimate_memory(OLMOE, "aihwkit-default", Placement.all_digital_except(), weight_dtype="bfloat16")
    assert digital.analog_parameters == 0 and digital.chip_bytes == 0 and not digital.temporaries
    assert digital.digital_bytes == olmoe_bf16.digital_bytes
    experts_only = estimate_memory(OLMOE, "aihwkit-default", Placement.all_digital_except("experts"),
                                   weight_dtype="bfloat16", state_dtype="bfloat16")
    assert experts_only.analog_parameters == olmoe_bf16.row("routed experts").parameters
    dropped = estimate_memory(OLMOE, "aihwkit-default", weight_dtype="bfloat16", state_dtype="bfloat16",
                              keep_digital=False)
    assert dropped.digital_bytes == (olmoe_bf16.parameters - olmoe_bf16.analog_parameters) * 2
    assert dropped.chip_bytes == olmoe_bf16.chip_bytes
    with pytest.raises(ValueError, match="compute from the digital weights"):
        estimate_memory(OLMOE, keep_digital=False, device="cuda")


def test_estimate_counts_what_the_conversion_makes_analog():
    from romer_kernels.models.loading import load_model_and_tokenizer  # noqa: PLC0415
    from romer_kernels.moe.convert import analogize_, placement_report  # noqa: PLC0415

    model, _ = load_model_and_tokenizer("tiny-deepseek")
    analogize_(model, "rasch2023")
    analog = sum(row.parameters for row in placement_report(model) if row.kind.startswith("analog"))
    estimate = estimate_memory("tiny-deepseek", "rasch2023")
    assert estimate.analog_parameters == analog
    assert estimate.parameters == sum(p.numel() for p in model.parameters())


def test_config_inputs_file_folder_and_object(tmp_path, olmoe_fp32):
    folder = tmp_path / "olmoe"
    folder.mkdir()
    (folder / "config.json").write_text((CONFIG_ASSETS / f"{OLMOE}.json").read_text())
    for source in (folder / "config.json", str(folder), load_model_config(OLMOE)):
        assert estimate_memory(source, "aihwkit-default", weight_dtype="float32").total_bytes == olmoe_fp32.total_bytes


def test_sizes_and_fits(olmoe_bf16):
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("141GiB") == 141 * 2**30
    assert parse_size("512MB") == 512 * 10**6
    assert parse_size("1.5 tb") == 1_500_000_000_000
    for bad in ("80", "eighty GB", "80XB", "0GB", "-5GB", ""):
        with pytest.raises(ValueError, match="bad memory size"):
            parse_size(bad)
    assert olmoe_bf16.fits("80GB") and not olmoe_bf16.fits("1GB")
    assert olmoe_bf16.fits(olmoe_bf16.total_bytes) and not olmoe_bf16.fits(olmoe_bf16.total_bytes - 1)
    assert "does not fit in 1GB" in olmoe_bf16.fit_line("1GB")


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="unknown weight dtype 'int8'"):
        estimate_memory(OLMOE, weight_dtype="int8")
    with pytest.raises(ValueError, match="unknown state dtype torch.float64"):
        estimate_memory(OLMOE, state_dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        estimate_memory(OLMOE, device="tpu")
    with pytest.raises(ValueError, match="tokens must be a positive int, got 0"):
        estimate_memory(OLMOE, tokens=0)


def test_cli_memory_fits_on_a_gpu(capsys, no_network):
    argv = ["info", "--memory", "--model", OLMOE, "--dtype", "bfloat16", "--state-dtype", "bfloat16",
            "--device", "cuda", "--fit", "80GB"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "routed experts" in out and "device cuda" in out
    assert "fits in 80GB" in out and "does not fit" not in out


def test_cli_memory_errors(capsys, no_network, tmp_path):
    assert main(["info", "--memory", "--model", OLMOE, "--fit", "80 potatoes"]) == 2
    assert "bad memory size '80 potatoes'" in capsys.readouterr().out
    assert main(["info", "--memory", "--model", str(tmp_path / "missing" / "config.json")]) == 2
    assert "no such file or folder" in capsys.readouterr().out
    assert main(["info", "--memory", "--model", "romer-tests/no-such-model-7f3a"]) == 2
    assert "not in the local Hugging Face cache" in capsys.readouterr().out
    assert main(["info", "--fit", "80GB"]) == 2
    assert "add --memory" in capsys.readouterr().out


@pytest.mark.skipif("state_dtype" not in {f.name for f in dataclasses.fields(AnalogConfig)},
                    reason="AnalogConfig has no state_dtype field in this checkout")
def test_state_dtype_comes_from_the_config(olmoe_bf16):
    config = preset("aihwkit-default").replace(state_dtype="bfloat16")
    estimate = estimate_memory(OLMOE, config, weight_dtype="bfloat16")
    assert estimate.state_dtype == "bfloat16" and estimate.chip_bytes == olmoe_bf16.chip_bytes
    assert estimate_memory(OLMOE, config, weight_dtype="bfloat16", state_dtype="float32").state_dtype == "float32"
