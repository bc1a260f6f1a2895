"""The README's Python examples run as written, from a folder outside the repository."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)


def test_the_first_examples_run_from_another_folder(tmp_path):
    blocks = _blocks()
    # the layer + whole-model example, the methods that continue it, and the real-size one
    # (the Ray sweep after them starts a cluster: covered by tests/test_ray_executor.py)
    script = "\n".join(blocks[:3])
    assert "load_model(\"tiny-olmoe\")" in script and "romer_(" in script
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "flip_rate" in run.stdout and not list(tmp_path.iterdir())   # printed, and wrote nothing here


def test_the_hwa_example_runs(tmp_path):
    """The HWA block (after the first example, whose imports it uses), with 2 steps instead of 300."""
    blocks = _blocks()
    (hwa,) = [block for block in blocks if "hwa_train(" in block]
    assert "HWATrainSettings(steps=300)" in hwa
    fast = hwa.replace("HWATrainSettings(steps=300)", "HWATrainSettings(steps=2, batch_size=2, seq_len=32)")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-c", blocks[0] + "\n" + fast], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "'change'" in run.stdout and (tmp_path / "runs" / "hwa-example" / "model" / "hwa.json").is_file()
