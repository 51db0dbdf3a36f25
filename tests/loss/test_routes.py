"""Both APIs validate losses through the registry (in-process app, mock worker): a bad loss config is a 400
naming the field before anything is queued, and the capabilities route lists the registry."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from twinkle.loss import list_losses
from twinkle.server.app import create_app, worker_config
from twinkle.server.config import parse_config
from twinkle.server.store import Store
from twinkle.server.worker import ModelWorker

API = "/api/v1/twinkle"
TOKENS = [5, 9, 17, 33]
NATIVE_DATUM = {
    "model_input": {"chunks": [{"type": "encoded_text", "tokens": TOKENS}]},
    "loss_fn_inputs": {"target_tokens": {"data": [9, 17, 33, 2], "dtype": "int64", "shape": [4]},
                       "logprobs": {"data": [-1.0] * 4, "dtype": "float32", "shape": [4]},
                       "advantages": {"data": [1.0] * 4, "dtype": "float32", "shape": [4]}},
}
BAD_BETAS = ['"nan"', '"Infinity"', "Infinity", "NaN", "-Infinity", "1e999", '"abc"', "-1", "true", "[1]"]


def _app(tmp_path: Path):
    cfg = parse_config({
        "persistence": {"sqlite_path": str(tmp_path / "db.sqlite"), "checkpoint_root": str(tmp_path / "ck")},
        "models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny"}],
    })
    store = Store(cfg.persistence.sqlite_file())
    key = store.create_key("alice")[1]
    return create_app(cfg, {"mock": [ModelWorker(worker_config(cfg.models[0]))]}, store=store), key


def test_both_apis_refuse_a_bad_dro_beta_and_list_losses(tmp_path: Path) -> None:
    app, key = _app(tmp_path)

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                     headers={"X-API-Key": key}) as c:
            caps = (await c.get(f"{API}/capabilities")).json()
            assert [x["name"] for x in caps["losses"]] == list_losses()
            dro = next(x for x in caps["losses"] if x["name"] == "dro")
            assert dro["config"][0]["name"] == "beta" and dro["config"][0]["default"] == 0.05
            cispo = next(x for x in caps["losses"] if x["name"] == "cispo")
            assert [k["default"] for k in cispo["config"]] == [0.0, 4.0]

            sid = (await c.post(f"{API}/sessions", json={})).json()["session_id"]
            r = await c.post(f"{API}/runs", json={"session_id": sid, "base_model": "mock", "lora": {"rank": 4}})
            fut = r.json()["future_id"]
            run = (await c.get(f"{API}/futures/{fut}", params={"timeout": 30})).json()["result"]["run_id"]
            headers = {"content-type": "application/json"}
            for i, beta in enumerate(BAD_BETAS):
                cfg = '{"beta": ' + beta + "}"  # raw JSON: Infinity and NaN literals included
                datum = json.dumps(NATIVE_DATUM)
                native = f'{{"data": [{datum}], "loss_fn": "dro", "loss_fn_config": {cfg}}}'
                r = await c.post(f"{API}/runs/{run}/forward_backward", content=native, headers=headers)
                assert r.status_code == 400, (beta, r.text)
                assert r.json()["detail"]["field"].endswith("beta"), (beta, r.text)
                tinker = (f'{{"model_id": "{run}", "seq_id": {i + 1}, "forward_backward_input": {{"data": [{datum}], '
                          f'"loss_fn": "dro", "loss_fn_config": {cfg}}}}}')
                r = await c.post("/api/v1/forward_backward", content=tinker, headers=headers)
                assert r.status_code == 400, (beta, r.text)
                assert r.json()["detail"]["field"].endswith("beta"), (beta, r.text)
            for cfg in ('"abc"', "[1, 2]", "5"):  # not an object at all
                body = (f'{{"model_id": "{run}", "forward_backward_input": {{"data": [{datum}], '
                        f'"loss_fn": "dro", "loss_fn_config": {cfg}}}}}')
                r = await c.post("/api/v1/forward_backward", content=body, headers=headers)
                assert r.status_code == 400 and r.json()["detail"]["field"].endswith("loss_fn_config"), r.text
                body = f'{{"data": [{datum}], "loss_fn": "dro", "loss_fn_config": {cfg}}}'
                r = await c.post(f"{API}/runs/{run}/forward_backward", content=body, headers=headers)
                assert r.status_code == 400 and r.json()["detail"]["field"] == "loss_fn_config", r.text
            # An unknown loss names loss_fn; a good config still trains.
            r = await c.post(f"{API}/runs/{run}/forward_backward", json={"data": [NATIVE_DATUM], "loss_fn": "nope"})
            assert r.status_code == 400 and r.json()["detail"]["field"] == "loss_fn"
            r = await c.post(f"{API}/runs/{run}/forward_backward",
                             json={"data": [NATIVE_DATUM], "loss_fn": "dro", "loss_fn_config": {"beta": "0.5"}})
            assert r.status_code == 200, r.text
            done = (await c.get(f"{API}/futures/{r.json()['future_id']}", params={"timeout": 30})).json()
            assert done["status"] == "complete", done

    asyncio.run(go())


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_op_refuses_before_queueing(value: str) -> None:
    from twinkle.server.ops import ForwardBackwardOp
    from twinkle.types import InvalidInputError

    with pytest.raises(InvalidInputError) as e:
        ForwardBackwardOp(data=[], loss_fn="ppo", loss_fn_config={"clip_low_threshold": value})
    assert e.value.field == "loss_fn_config.clip_low_threshold"


def test_both_apis_refuse_non_finite_params(tmp_path: Path) -> None:
    """Issue 12 item 3: the numbers that used to write NaN into adapters are a 400 naming the field."""
    app, key = _app(tmp_path)
    headers = {"content-type": "application/json"}

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                     headers={"X-API-Key": key}) as c:
            sid = (await c.post(f"{API}/sessions", json={})).json()["session_id"]
            for lora, field in (('{"rank": 4, "alpha": NaN}', "lora.alpha"), ('{"rank": true}', "lora.rank")):
                body = f'{{"session_id": "{sid}", "base_model": "mock", "lora": {lora}}}'
                r = await c.post(f"{API}/runs", content=body, headers=headers)
                assert r.status_code == 400 and r.json()["detail"]["field"] == field, r.text
            r = await c.post(f"{API}/runs", json={"session_id": sid, "base_model": "mock", "lora": {"rank": 4}})
            run = (await c.get(f"{API}/futures/{r.json()['future_id']}", params={"timeout": 30})).json()["result"]["run_id"]
            for adam, field in (('{"learning_rate": Infinity}', "adam_params.learning_rate"),
                                ('{"weight_decay": "Infinity"}', "adam_params.weight_decay"),
                                ('{"beta1": 2.0}', "adam_params.beta1")):
                r = await c.post(f"{API}/runs/{run}/optim_step", content=f'{{"adam_params": {adam}}}', headers=headers)
                assert r.status_code == 400 and r.json()["detail"]["field"] == field, r.text
                tinker = f'{{"model_id": "{run}", "adam_params": {adam}}}'  # the Tinker route: same model, same rule
                r = await c.post("/api/v1/optim_step", content=tinker, headers=headers)
                assert r.status_code == 400 and r.json()["detail"]["field"] == field, r.text

    asyncio.run(go())


def test_nonfinite_loss_is_a_user_error_and_the_run_goes_on(tmp_path: Path) -> None:
    app, key = _app(tmp_path)
    extreme = json.loads(json.dumps(NATIVE_DATUM))
    extreme["loss_fn_inputs"]["logprobs"]["data"] = [-3e38] * 4  # finite, but exp(lp − q) overflows

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                     headers={"X-API-Key": key}) as c:
            sid = (await c.post(f"{API}/sessions", json={})).json()["session_id"]
            r = await c.post(f"{API}/runs", json={"session_id": sid, "base_model": "mock", "lora": {"rank": 4}})
            run = (await c.get(f"{API}/futures/{r.json()['future_id']}", params={"timeout": 30})).json()["result"]["run_id"]

            async def call(path: str, body: dict) -> dict:
                r = await c.post(f"{API}/runs/{run}/{path}", json=body)
                assert r.status_code == 200, r.text
                return (await c.get(f"{API}/futures/{r.json()['future_id']}", params={"timeout": 30})).json()

            bad = await call("forward_backward", {"data": [extreme], "loss_fn": "importance_sampling"})
            assert bad["status"] == "failed", bad
            assert bad["error"]["code"] == "non_finite" and bad["error"]["category"] == "user", bad
            good = await call("forward_backward", {"data": [NATIVE_DATUM], "loss_fn": "importance_sampling"})
            assert good["status"] == "complete", good
            step = await call("optim_step", {"adam_params": {"learning_rate": 0.01}})
            assert step["status"] == "complete", step
            assert (await c.get(f"{API}/runs/{run}")).json()["step"] == 1

    asyncio.run(go())


def test_cispo_without_config_uses_tinkers_default(tmp_path: Path) -> None:
    """Issue 12 item 16: no loss_fn_config means clip 0.0/4.0 (Tinker's documented default), not 0.8/1.2."""
    app, key = _app(tmp_path)

    async def go() -> dict[str, float]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                     headers={"X-API-Key": key}) as c:
            sid = (await c.post(f"{API}/sessions", json={})).json()["session_id"]
            r = await c.post(f"{API}/runs", json={"session_id": sid, "base_model": "mock", "lora": {"rank": 4}})
            run = (await c.get(f"{API}/futures/{r.json()['future_id']}", params={"timeout": 30})).json()["result"]["run_id"]
            out = {}
            for label, cfg in (("none", None), ("tinker", {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}),
                               ("ppo-like", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2})):
                r = await c.post(f"{API}/runs/{run}/forward", json={"data": [NATIVE_DATUM], "loss_fn": "cispo",
                                                                     "loss_fn_config": cfg})
                done = (await c.get(f"{API}/futures/{r.json()['future_id']}", params={"timeout": 30})).json()
                out[label] = done["result"]["metrics"]["loss:sum"]
            return out

    got = asyncio.run(go())
    assert got["none"] == pytest.approx(got["tinker"], rel=1e-6)
    assert abs(got["none"] - got["ppo-like"]) > 0.1 * abs(got["ppo-like"])  # the old default gave another loss


@pytest.mark.parametrize("k", [10**9, 21, -1, True, 1.5])
def test_sample_op_bounds_topk(k) -> None:
    """Issue 12 item 1 at the root: whichever route builds the op, k is bounded before anything is allocated."""
    from twinkle.server.ops import SampleOp
    from twinkle.types import InvalidInputError

    with pytest.raises(InvalidInputError) as e:
        SampleOp(prompt=[1, 2, 3], topk_prompt_logprobs=k)
    assert e.value.field == "topk_prompt_logprobs"
    assert SampleOp(prompt=[1, 2], topk_prompt_logprobs=20).topk_prompt_logprobs == 20
