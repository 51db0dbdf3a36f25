"""``bench/gpu.py --smoke``: the GPU check's code path on a tiny CPU model, so the script cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_bench_smoke():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert out["device"] == "cpu" and out["params"] > 0
    for key in ("train_tokens_per_s", "mfu_6NT", "sample_tokens_per_s", "hf_generate_tokens_per_s"):
        assert out[key] > 0
