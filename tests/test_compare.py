"""Method comparison (smoke) on tiny random architectures: every variant runs, is stored and resumes."""
import math

import pytest
import torch
from moe_models import build

from romer_kernels.config import preset
from romer_kernels.evaluation.compare import VARIANTS, compare_methods, plot_compare
from romer_kernels.evaluation.sweep import SweepSettings


@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v3", "qwen2_moe"])
def test_every_variant_runs_on_tiny_architectures(arch, tmp_path):
    model = build(arch)
    ids = torch.randint(3, 128, (1200,), generator=torch.Generator().manual_seed(0))
    settings = SweepSettings(config=preset("gaussian-chip"), seeds=(0,), noise_scales=(3.0,), times=(0.0,),
                             seq_len=32, batch_size=4, max_windows=2)
    result = compare_methods(build(arch), ids[600:], ids[:600], settings, tuple(VARIANTS), tmp_path, arch, "random",
                             calib_windows=2, progress=False)
    assert result.trials_run == len(VARIANTS)
    ppl = {s.variant: s.mean for s in result.summaries if s.metric == "ppl"}
    assert set(ppl) == set(VARIANTS) and all(math.isfinite(v) for v in ppl.values())
    assert plot_compare(result, tmp_path / "compare.png").stat().st_size > 10_000
    again = compare_methods(model, ids[600:], ids[:600], settings, tuple(VARIANTS), tmp_path, arch, "random",
                            calib_windows=2, progress=False)
    assert again.trials_run == 0


def test_unknown_variant_is_a_clear_error(tmp_path):
    settings = SweepSettings(config=preset("ideal"), seeds=(0,), noise_scales=(1.0,), seq_len=16, max_windows=1)
    with pytest.raises(ValueError, match="unknown variant"):
        compare_methods(build("olmoe"), torch.arange(3, 100), torch.arange(3, 100), settings, ("magic",), tmp_path,
                        "m", "d", progress=False)
