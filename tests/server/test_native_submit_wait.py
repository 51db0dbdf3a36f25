"""``?wait=S`` on the native future-returning routes: the reply carries the finished state (one round trip for
a blocking client); without it, or when the work outlasts the wait, the reply is the plain FutureRef."""

from __future__ import annotations

import asyncio

from test_routes_native import API, DATUM, Env, _setup_run


def test_wait_puts_the_finished_state_in_the_reply(tmp_path):
    env = Env(tmp_path)

    async def go():
        async with env.client(env.key_a) as a:
            _, run = await _setup_run(a)
            r = await a.post(f"{API}/runs/{run}/forward_backward", params={"wait": 10},
                             json={"data": [DATUM], "seq_id": 1})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["state"]["status"] == "complete"
            assert body["state"]["future_id"] == body["future_id"]
            assert body["state"]["result"]["loss_fn_outputs"]
            # the same future is still readable by id afterwards
            again = (await a.get(f"{API}/futures/{body['future_id']}")).json()
            assert again["status"] == "complete" and again["result"] == body["state"]["result"]

            plain = (await a.post(f"{API}/runs/{run}/optim_step", json={"seq_id": 2})).json()
            assert plain.get("state") is None
            r = await a.post(f"{API}/runs/{run}/optim_step", params={"wait": 10}, json={"seq_id": 3})
            assert r.json()["state"]["status"] == "complete"

    asyncio.run(go())


def test_wait_shorter_than_the_work_answers_a_plain_ref(tmp_path):
    env = Env(tmp_path)

    async def go():
        async with env.client(env.key_a) as a:
            _, run = await _setup_run(a)
            # seq_id 5 first: the worker holds it for the missing 1..4 (grace 2 s), so a 0.2 s wait is pending
            r = await a.post(f"{API}/runs/{run}/forward_backward", params={"wait": 0.2},
                             json={"data": [DATUM], "seq_id": 5})
            assert r.status_code == 200, r.text
            assert r.json().get("state") is None
            r = await a.post(f"{API}/runs/{run}/forward_backward", params={"wait": -1},
                             json={"data": [DATUM], "seq_id": 6})
            assert r.status_code == 400 and "wait" in r.text

    asyncio.run(go())
