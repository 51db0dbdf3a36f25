"""The mock backend imports and learns in a process where ``import torch`` raises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_SITECUSTOMIZE = '''
import importlib.abc
import sys


class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this process (test_no_torch)")
        return None


sys.meta_path.insert(0, _NoTorch())
'''

_SCRIPT = '''
import json, sys

try:
    import torch  # noqa: F401
    blocked = False
except ImportError:
    blocked = True

import twinkle.types
from twinkle.types import LoraConfig, OptimizerConfig, SamplingParams, datum_from_tokens
from twinkle.model.base import BatchItem, SampleItem
from twinkle.model.mock import MockBackend

b = MockBackend("mock://tiny", seed=0)
tok = b.tokenizer()
b.add_adapter("me", LoraConfig(rank=8))
b.set_optimizer("me", OptimizerConfig(lr=1e-2))
msgs = [{"role": "user", "content": "who are you?"}, {"role": "assistant", "content": "I am Twinkle."}]
data = [datum_from_tokens(tok.apply_chat_template(msgs))]
losses = []
for _ in range(30):
    losses.append(b.run_batch([BatchItem("me", data)])[0].metrics["loss:sum"])
    b.optim_step("me")
prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True)
seq = b.sample([SampleItem("me", prompt, 1, SamplingParams(max_tokens=24, temperature=0.0))])[0].sequences[0]
result = {"blocked": blocked, "losses": losses, "sample": tok.decode(seq.tokens)}

try:  # the local API's MockModel, when the engine helper's module is there
    from twinkle.model import MockModel
except ImportError:
    MockModel = None
if MockModel is not None:
    m = MockModel(seed=0, output_dir=sys.argv[1])
    m.add_adapter_to_model("default", LoraConfig(rank=8))
    m.set_optimizer("AdamW", lr=1e-2)
    local = []
    for _ in range(10):
        local.append(m.forward_backward(inputs=data).metrics["loss:sum"])
        m.clip_grad_and_step()
    result["mock_model_losses"] = local
result["torch_loaded"] = any(k == "torch" or k.startswith("torch.") for k in sys.modules)
print(json.dumps(result))
'''


def test_mock_trains_and_samples_without_torch(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(_SITECUSTOMIZE))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / "out")],
        env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["blocked"], "the import hook did not block torch"
    assert not result["torch_loaded"]
    losses = result["losses"]
    assert losses[-1] < 0.2 * losses[0], losses
    assert result["sample"].startswith("I am Twinkle"), result["sample"]
    if "mock_model_losses" in result:
        local = result["mock_model_losses"]
        assert local[-1] < local[0], local
