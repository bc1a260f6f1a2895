"""The comparison plot of a 2-seed run: every drawn interval inside its metric's valid range (PPL > 0 on a
log axis, LIS >= 1, flip rate in [0, 1]), series offset, the axes saying what the bars are, a warning for n < 3."""
from __future__ import annotations

from romer_kernels.config.presets import preset
from romer_kernels.evaluation import compare as compare_module
from romer_kernels.evaluation.compare import compare_methods, plot_compare
from romer_kernels.evaluation.runner import SweepSettings, Workload


def test_a_two_seed_compare_plot_draws_only_possible_values(tmp_path, monkeypatch):
    settings = SweepSettings(preset("rasch2023"), seeds=(0, 1), noise_scales=(1.0, 8.0), max_windows=1)
    workload = Workload("tiny-olmoe", calib_split="valid")
    result = compare_methods(workload, None, None, settings, ("noisy", "dense-digital", "random-12.5"), tmp_path,
                             calib_windows=2, progress=False)
    seen = {}
    original = compare_module.save_figure

    def inspect(fig, path, title=""):
        seen["title"] = title
        for ax, (low, high) in zip(fig.axes, ((0.0, float("inf")), (1.0, float("inf")), (0.0, 1.0))):
            seen.setdefault("scales", []).append(ax.get_yscale())
            seen.setdefault("labels", []).append(ax.get_ylabel())
            xs = []
            for container in ax.containers:
                _, _, bars = container.lines
                for segment in bars[0].get_segments():
                    (x0, y0), (x1, y1) = segment
                    assert low <= min(y0, y1) and max(y0, y1) <= high, (ax.get_ylabel(), y0, y1)
                    xs.append(x0)
            assert len(xs) == len(set(xs)) == 3 * 2          # 3 variants x 2 scales, none on top of another
        return original(fig, path, title)

    monkeypatch.setattr(compare_module, "save_figure", inspect)
    assert plot_compare(result, tmp_path / "compare.png", "t").is_file()
    assert seen["scales"] == ["log", "linear", "linear"]
    assert all("95 % t-interval over n = 2 chips" in label for label in seen["labels"])
    assert "n = 2 chips: intervals are wide" in seen["title"]
