"""pytest-benchmark entry points: ``pytest benchmarks --benchmark-only`` (not part of the test run).

Each group times the clean layer next to its analog versions on every CPU backend, so the group table
shows the ratios of one run. The full tables (with floors and the MoE block) come from
``python -m benchmarks``.
"""
import pytest
import torch
from torch import nn

from romer_kernels import AnalogLinear
from romer_kernels.kernels.backends import available_backends, use_backend

SHAPE = (2048, 1408)
PRESETS = ["aihwkit-default", "rasch2023", "gaussian-chip"]


@pytest.fixture(scope="module")
def linear():
    torch.manual_seed(0)
    return nn.Linear(*SHAPE)


@pytest.fixture(scope="module")
def analog_layers(linear):
    return {name: AnalogLinear.from_linear(linear, name).program_() for name in PRESETS}


@pytest.mark.parametrize("batch", [1, 256])
def test_clean_linear(benchmark, linear, batch):
    benchmark.group = f"linear {SHAPE[0]}x{SHAPE[1]} batch {batch}"
    x = torch.randn(batch, SHAPE[0])
    with torch.no_grad():
        benchmark(linear, x)


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("batch", [1, 256])
def test_analog_linear(benchmark, analog_layers, name, backend, batch):
    if backend == "triton":
        pytest.skip("the Triton interpreter is a correctness tool, not a CPU backend to time")
    benchmark.group = f"linear {SHAPE[0]}x{SHAPE[1]} batch {batch}"
    x = torch.randn(batch, SHAPE[0])
    layer = analog_layers[name]

    def forward():
        with use_backend(backend), torch.no_grad():
            return layer(x)
    benchmark(forward)


def test_program_and_drift(benchmark):
    torch.manual_seed(0)
    layer = AnalogLinear.from_linear(nn.Linear(2048, 2048), "aihwkit-default")
    benchmark.group = "chip 2048x2048"
    benchmark(lambda: layer.program_(0).drift_(3600.0))
