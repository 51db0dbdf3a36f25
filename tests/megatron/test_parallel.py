"""Megatron TP=2 and DP=2 (two processes over gloo, no Ray) against TP=1 on the same weights (fp32, CPU).

The scenario (``_parallel_job.run``: prompt logprobs, LoRA steps with grad clipping, full-state save, reload,
greedy sampling) runs once at TP=1 in this process and once per parallel layout in a subprocess whose backend
spawns its second rank itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from twinkle.types import InvalidInputError  # noqa: E402

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import _parallel_job  # noqa: E402

pytestmark = pytest.mark.slow  # two gloo processes per test (~30 s of start-up)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    from twinkle.model.transformers._random import build_random_model

    # 4 heads / 2 kv heads / ffn 128 split in 2; vocab 301 is odd, so TP=2 pads it to 302
    return str(build_random_model(tmp_path_factory.mktemp("mgp") / "m", vocab_size=301))


@pytest.fixture(scope="module")
def runs(model, tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    out: dict[str, tuple[dict, Path]] = {}
    procs = {}
    for name, tp, dp in (("tp2", 2, 1), ("dp2", 1, 2)):
        d = tmp_path_factory.mktemp(name)
        procs[name] = (d, subprocess.Popen([sys.executable, str(HERE / "_parallel_job.py"), model, str(d), str(tp), str(dp)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        _, err = procs[name][1].communicate(timeout=300)  # one layout at a time: 2 ranks already fill 2 cores
        assert procs[name][1].returncode == 0, err[-3000:]
        out[name] = (json.loads((d / "result.json").read_text()), d)
    ref = tmp_path_factory.mktemp("tp1")
    out["tp1"] = (_parallel_job.run(model, ref, 1, 1), ref)
    return out


@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_prompt_logprobs_and_size_match_tp1(runs, layout):
    ref, got = runs["tp1"][0], runs[layout][0]
    np.testing.assert_allclose(got["prompt_logprobs"], ref["prompt_logprobs"], atol=1e-4)
    assert got["num_parameters"] == ref["num_parameters"]
    assert got["greedy"] == ref["greedy"]


@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_kv_cache_sampling_matches_tp1_without_cache(runs, layout):
    ref, got = runs["tp1"][0], runs[layout][0]
    assert got["kv_cache"] and ref["kv_cache"]
    for cached in (ref["cached_batch"], got["cached_batch"]):
        for (ta, la), (tb, lb) in zip(cached, ref["uncached_batch"], strict=True):
            assert ta == tb
            np.testing.assert_allclose(la, lb, atol=1e-4)


@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_lora_steps_same_loss_curve_and_grad_norms(runs, layout):
    ref, got = runs["tp1"][0], runs[layout][0]
    assert ref["losses"][-1] != ref["losses"][0]
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-4)
    np.testing.assert_allclose(got["grad_norms"], ref["grad_norms"], rtol=1e-4)  # > clip: the clip used it
    assert min(ref["grad_norms"]) > 1.0
    for a, b in zip(got["held_logprobs"], ref["held_logprobs"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    np.testing.assert_allclose(got["mixed"], ref["mixed"], rtol=1e-4)  # two adapters' rows in one pass
    assert got["mixed"][0] != pytest.approx(got["mixed"][1], rel=1e-3)
    assert got["after_one_row"] == pytest.approx(ref["after_one_row"], rel=1e-4)  # a batch smaller than DP


@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_export_equals_tp1_export(runs, layout):
    from safetensors.torch import load_file

    a = load_file(str(runs["tp1"][1] / "ck" / "adapter_model.safetensors"))
    b = load_file(str(runs[layout][1] / "ck" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    # Adam turns ~1e-7 gradient noise on near-zero gradients into a few visibly different entries; everything
    # else agrees to float precision
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert float(diffs.max()) < 5e-3
    assert float((diffs > 1e-5).float().mean()) < 1e-2
    sa = torch.load(runs["tp1"][1] / "ck" / "training_state.pt", weights_only=False)["optimizer"]["state"]
    sb = torch.load(runs[layout][1] / "ck" / "training_state.pt", weights_only=False)["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k, v in sa[i].items():
            assert v.shape == sb[i][k].shape
            torch.testing.assert_close(sb[i][k], v, atol=1e-5, rtol=1e-3)


def test_tp2_export_loads_in_transformers_backend(runs, model):
    from twinkle.model.base import BatchItem
    from twinkle.model.transformers import TransformersBackend

    got, d = runs["tp2"]
    hf = TransformersBackend(model)
    hf.load("x", d / "ck", optimizer=False)
    out = hf.run_batch([BatchItem("x", _parallel_job.batch(99), forward_only=True)])[0]
    for x, y in zip(out.loss_fn_outputs, got["held_logprobs"], strict=True):
        np.testing.assert_allclose(x["logprobs"].to_numpy(), y, atol=1e-4)


@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_reload_restores_adapter_and_optimizer(runs, layout):
    got = runs[layout][0]
    for a, b in zip(got["reloaded_logprobs"], got["held_logprobs"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert got["after_step"][0] == pytest.approx(got["after_step"][1], abs=1e-5)


@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_bad_input_is_a_typed_error_and_the_ranks_stay_in_step(runs, layout):
    got = runs[layout][0]
    assert got["bad_input"] == [["NotFoundError", "adapter"], ["NotFoundError", "path"],
                                ["InvalidInputError", "adapter"]]
    assert got["bad_input"] == runs["tp1"][0]["bad_input"]  # and everything compared above came after


@pytest.mark.parametrize(("options", "field"), [
    ({"tensor_parallel_size": 3}, "megatron.tensor_parallel_size"),  # 4 heads
    ({"tensor_parallel_size": 0}, "megatron.tensor_parallel_size"),
    ({"data_parallel_size": 4096}, "megatron.data_parallel_size"),  # more ranks than cores
    ({"tensor_parallel_size": 2, "data_parallel_size": 2048}, "megatron.tensor_parallel_size"),
    ({"pipeline_parallel_size": 2}, "megatron.pipeline_parallel_size"),
    ({"launcher": "slurm"}, "megatron.launcher"),
])
def test_bad_sizes_name_the_field(model, options, field):
    from twinkle.model.megatron import MegatronBackend

    with pytest.raises(InvalidInputError) as e:
        MegatronBackend(model, **options)
    assert e.value.field == field
