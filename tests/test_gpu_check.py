"""bench/gpu_check.sh cannot rot: its dry run (on CPU, in CI) checks that every step is wired: the wheel list, the
gpu tests collected and skipped, the DeepSpeed smoke recipe valid, the benchmark's arguments parsed."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run():
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
                                              "PYTHON": sys.executable, "HOME": str(Path.home())})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    for step in ("wheels", "pytest-gpu", "deepspeed", "attention", "bench-full", "bench-lora"):
        assert f"| {step} | ok |" in result.stdout, step
