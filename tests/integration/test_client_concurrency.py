"""Two users train concurrently on the REAL server: both learn, and the scheduler batches their steps
together (``GET /api/v1/twinkle/status`` reports batches holding both runs)."""

from __future__ import annotations

import threading

import pytest

import twinkle_client
from twinkle.data import ChatEncoder, DataLoader, self_cognition_dataset
from twinkle.types import LoraConfig

pytestmark = pytest.mark.integration

MODEL = "builtin://tiny"
STEPS = 8


def _worker(status) -> dict:
    return next(w for w in status.workers if w.base_model == MODEL).model_dump()


def test_two_clients_learn_and_are_batched_together(twinkle_server, tmp_path, monkeypatch):
    from twinkle_client.model import TransformersModel

    monkeypatch.setenv("TWINKLE_HOME", str(tmp_path / "home"))
    bob_key = twinkle_server.keys.get("bob") or twinkle_server.create_key("bob")
    sessions = {"alice": twinkle_client.connect(twinkle_server.url, twinkle_server.api_key, make_current=False),
                "bob": twinkle_client.connect(twinkle_server.url, bob_key, make_current=False)}
    models, batches = {}, {}
    for i, (user, sess) in enumerate(sessions.items()):
        m = TransformersModel(MODEL, seed=0, session=sess)
        m.add_adapter_to_model(f"{user}-adapter", LoraConfig(rank=8, alpha=16, seed=i))
        m.set_optimizer("AdamW", lr=5e-3, grad_clip_norm=1.0)
        models[user] = m
        data = self_cognition_dataset("Twinkle" if user == "alice" else "Robin", "a team").map(
            ChatEncoder(m.get_tokenizer(), max_length=96))
        batches[user] = DataLoader(data, batch_size=4, shuffle=True, seed=i).cycle()
    before = _worker(sessions["alice"].server_status())

    barrier = threading.Barrier(2)
    losses: dict[str, list[float]] = {u: [] for u in models}
    errors: list[BaseException] = []

    def train(user: str) -> None:
        try:
            m = models[user]
            for _ in range(STEPS):
                barrier.wait(timeout=120)  # both users' steps reach the server together
                # two requests in flight per user (a pipelined client): while one batch runs the others queue
                futs = [m.forward_backward_async(inputs=next(batches[user])) for _ in range(2)]
                [f.result() for f in futs]
                m.clip_grad_and_step()
                losses[user].append(m.calculate_metric()["loss"])
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=train, args=(u,)) for u in models]
    [t.start() for t in threads]
    [t.join(timeout=600) for t in threads]
    assert not errors, errors
    for user, ls in losses.items():
        assert len(ls) == STEPS
        assert sum(ls[-3:]) / 3 < 0.8 * sum(ls[:2]) / 2, f"{user} did not learn: {ls}"

    after = _worker(sessions["bob"].server_status())  # what GET /api/v1/twinkle/status reports
    assert after["batches_run"] > before["batches_run"]
    assert after["mixed_batches"] > before["mixed_batches"], after
    # The status page names only the caller's own runs; another user's adapters in a batch are a count.
    mine = models["bob"].run_id
    mixed = [b for b in after["recent_batches"]
             if b.get("mixed") and mine in b["adapters"] and b.get("other_adapters", 0) >= 1]
    assert mixed, f"no recent batch held bob's run and another: {after['recent_batches']}"
    assert all(models["alice"].run_id not in b["adapters"] for b in after["recent_batches"])  # not shown to bob
    assert after["max_adapters_in_batch"] >= 2
    for s in sessions.values():
        s.close()
