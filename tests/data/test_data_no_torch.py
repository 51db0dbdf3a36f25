"""``twinkle.data`` works where importing torch fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
sys.modules['torch'] = None  # any 'import torch' now raises ImportError
import twinkle.data as d
from twinkle.model.hub import load_tokenizer
tok = load_tokenizer('builtin://tiny', backend='tokenizers')
ds = d.self_cognition_dataset('Nova').map(d.ChatEncoder(tok)).shuffle(1)
batch = next(iter(d.DataLoader(ds, batch_size=4, shuffle=True)))
datums = d.to_datums(batch)
assert len(datums) == 4
assert d.arithmetic_reward('2 + 2 = 4', 4) == 1.0
assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]
print('ok', len(ds))
"""


def test_data_pipeline_without_torch(tmp_path):
    env = {**os.environ, "TWINKLE_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok", "80"]
