"""The Tinker routes on the real gateway (mock-backend worker): raw HTTP (wire shapes, errors, dedup) via TestClient."""

from __future__ import annotations

import numpy as np
from tinker import types as tt
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from twinkle.server.state.checkpoints import parse_checkpoint_path

H = {"X-API-Key": "tml-test"}


def _session(client) -> str:
    r = client.post("/api/v1/create_session", json={"tags": [], "user_metadata": None, "sdk_version": "0.38.0",
                                                     "type": "create_session"}, headers=H)
    assert r.status_code == 200, r.text
    return r.json()["session_id"]


def _model(client, sid: str, n: int = 0) -> str:
    r = client.post("/api/v1/create_model", headers=H, json={
        "session_id": sid, "model_seq_id": n, "base_model": "fake/base",
        "lora_config": {"rank": 8, "seed": 3, "train_attn": True, "train_mlp": False, "train_unembed": False},
        "optimizer_config": {"type": "adamw"}, "type": "create_model"})
    assert r.status_code == 200, r.text
    fut = client.post("/api/v1/retrieve_future", headers=H, json={"request_id": r.json()["request_id"]})
    assert fut.json()["model_id"] == f"{sid}:train:{n}"
    return fut.json()["model_id"]


def _fb_body(model_id: str, seq_id: int, loss_fn="cross_entropy", tokens=(1, 2, 3)) -> bytes:
    d = tt.Datum(model_input=tt.ModelInput.from_ints(list(tokens[:-1])),
                 loss_fn_inputs={"target_tokens": tt.TensorData(data=list(tokens[1:]), dtype="int64", shape=[len(tokens) - 1]),
                                 "weights": tt.TensorData(data=[1.0] * (len(tokens) - 1), dtype="float32", shape=[len(tokens) - 1])})
    req = tt.ForwardBackwardRequest(forward_backward_input=tt.ForwardBackwardInput(data=[d], loss_fn=loss_fn),
                                    model_id=model_id, seq_id=seq_id)
    return forward_backward_request_to_proto(req).SerializeToString()


def _post_fb(client, body: bytes):
    return client.post("/api/v1/forward_backward", content=body,
                       headers={**H, "Content-Type": "application/x-protobuf"})


def test_config_handshake_and_session(client, service):
    assert client.post("/api/v1/client/config", json={"sdk_version": "0.38.0"}).status_code == 401  # keyed
    assert client.get("/api/v1/healthz").json() == {"status": "ok"}  # the one public route
    r = client.post("/api/v1/client/config", json={"sdk_version": "0.38.0"}, headers=H)
    assert r.json()["pjwt_auth_enabled"] is False and r.json()["parallel_fwdbwd_chunks"] is False
    # the SDK splits forward_backward by these: 12 estimated bytes a token at least, so a chunk fits the
    # model's tokens-per-request cap
    cap = service.capabilities().base_models[0].max_tokens_per_request
    assert r.json()["fwdbwd_max_chunk_bytes_count"] == cap * 12 and r.json()["fwdbwd_max_chunk_len"] == 1024
    assert client.post("/api/v1/client/dynamic_config", json={}, headers=H).json()["refresh_interval_sec"] == 300
    assert client.post("/api/v1/telemetry", json={"events": []}, headers=H).json() == {"status": "accepted"}
    sid = _session(client)
    assert client.post("/api/v1/session_heartbeat", headers=H, json={"session_id": sid}).json() == {"type": "session_heartbeat"}
    assert client.post(f"/api/v1/sessions/{sid}/finish", headers=H, json={"reason": {"type": "success"}}).status_code == 200
    gone = client.post("/api/v1/session_heartbeat", headers=H, json={"session_id": sid})
    assert gone.status_code == 410  # the SDK stops heartbeating on 410
    caps = client.get("/api/v1/get_server_capabilities", headers=H).json()
    assert caps["supported_models"][0]["model_name"] == "fake/base"


def test_auth_errors_are_401_with_body(client):
    r = client.post("/api/v1/create_session", json={"tags": [], "sdk_version": "x"}, headers={"X-API-Key": "tml-nope"})
    assert r.status_code == 401 and r.json()["category"] == "user" and r.json()["error"]


def test_create_model_passes_lora_fields_and_get_info(client, service):
    sid = _session(client)
    mid = _model(client, sid)
    lora = service.runs.by_id[mid].lora
    assert (lora.rank, lora.seed, lora.train_attn, lora.train_mlp, lora.train_unembed) == (8, 3, True, False, False)
    info = client.post("/api/v1/get_info", headers=H, json={"model_id": mid}).json()
    parsed = tt.GetInfoResponse.model_validate(info)
    assert parsed.model_id == mid and parsed.model_data.model_name == "fake/base" and parsed.lora_rank == 8


def test_unsupported_optimizer_and_route_are_clear_400(client):
    sid = _session(client)
    r = client.post("/api/v1/create_model", headers=H, json={"session_id": sid, "model_seq_id": 0, "base_model": "fake/base",
                                                             "optimizer_config": {"type": "dimuon", "version": 1}})
    assert r.status_code == 400 and "dimuon" in r.json()["error"]
    r = client.post("/api/v1/create_custom_loss", headers=H, json={})
    assert r.status_code == 400 and "create_custom_loss" in r.json()["error"]


def test_forward_backward_proto_result_and_replay_dedup(client, service):
    sid = _session(client)
    mid = _model(client, sid)
    body = _fb_body(mid, 1)
    r1 = _post_fb(client, body)
    r2 = _post_fb(client, body)  # an SDK retry with the same seq_id
    assert r1.status_code == 200 and r1.json()["request_id"] == r2.json()["request_id"]
    res = client.post("/api/v1/retrieve_future", headers={**H, "Accept": "application/x-protobuf"},
                      json={"request_id": r1.json()["request_id"]})
    assert res.headers["content-type"].startswith("application/x-protobuf")
    out = deserialize_forward_backward_output(res.content)
    kinds = [p.kind for p in service.runs.extra[mid].metrics]
    assert kinds.count("forward_backward") == 1  # applied and counted once
    datum = {"model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
             "loss_fn_inputs": {"target_tokens": {"data": [2, 3], "dtype": "int64", "shape": [2]},
                                "weights": {"data": [1.0, 1.0], "dtype": "float32", "shape": [2]}}}
    fwd = client.post("/api/v1/forward", headers=H, json={  # no optim_step since: the same weights
        "forward_input": {"data": [datum], "loss_fn": "cross_entropy"}, "model_id": mid, "seq_id": 2})
    assert fwd.status_code == 200, fwd.text
    again = deserialize_forward_backward_output(client.post(
        "/api/v1/retrieve_future", headers={**H, "Accept": "application/x-protobuf"},
        json={"request_id": fwd.json()["request_id"]}).content)
    lps = out.loss_fn_outputs[0]["logprobs"].tolist()
    assert len(lps) == 2 and all(x < 0 for x in lps)
    assert np.allclose(lps, again.loss_fn_outputs[0]["logprobs"].tolist())
    assert "loss:sum" in out.metrics


def test_bad_input_is_400_naming_field(client):
    sid = _session(client)
    mid = _model(client, sid)
    r = _post_fb(client, _fb_body(mid, 1, loss_fn="no_such_loss"))
    assert r.status_code == 400 and r.json()["detail"]["field"] == "loss_fn"
    r = _post_fb(client, _fb_body(mid, 2, tokens=(1, 2, 10**6)))
    if r.status_code == 200:  # the worker checks token ids: the future fails with the user error
        r = client.post("/api/v1/retrieve_future", headers=H, json={"request_id": r.json()["request_id"]})
        assert r.json()["category"] == "user"
    else:
        assert r.status_code == 400
    assert "vocabulary" in r.json()["error"]
    r = _post_fb(client, b"\x01\x02garbage")
    assert r.status_code == 400
    r = client.post("/api/v1/optim_step", headers=H, json={"model_id": mid, "seq_id": 3,
                                                          "adam_params": {"learning_rate": -1}})
    assert r.status_code == 400 and "learning_rate" in r.json()["error"]
    # still serving
    assert _post_fb(client, _fb_body(mid, 4)).status_code == 200


def test_optim_step_accepts_every_param_spelling(client):
    sid = _session(client)
    mid = _model(client, sid)
    for i, key in enumerate(("adam_params", "optim_params", "optimizer_params")):  # seq_ids 1..3: no gap to wait on
        r = client.post("/api/v1/optim_step", headers=H, json={"model_id": mid, "seq_id": 1 + i,
                                                              key: {"learning_rate": 0.01}})
        assert r.status_code == 200, r.text
        res = client.post("/api/v1/retrieve_future", headers=H, json={"request_id": r.json()["request_id"]}).json()
        assert tt.OptimStepResponse.model_validate(res).metrics["lr:mean"] == 0.01
    r = client.post("/api/v1/optim_step", headers=H, json={"model_id": mid, "seq_id": 4,
                                                          "optimizer_params": {"type": "dimuon", "learning_rate": 0.1}})
    assert r.status_code == 400 and "AdamW" in r.json()["error"]


def test_save_load_and_rest_checkpoints(client, service):
    sid = _session(client)
    mid = _model(client, sid)

    def done(r):
        assert r.status_code == 200, r.text
        return client.post("/api/v1/retrieve_future", headers=H, json={"request_id": r.json()["request_id"]}).json()

    saved = done(client.post("/api/v1/save_weights", headers=H, json={"model_id": mid, "path": "s1", "seq_id": 1}))
    assert saved["path"] == f"tinker://{mid}/weights/s1"
    named = done(client.post("/api/v1/save_weights_for_sampler", headers=H,
                             json={"model_id": mid, "path": "p1", "seq_id": 2, "kind": "snapshot"}))
    assert named["path"] == f"tinker://{mid}/sampler_weights/p1"
    eph = done(client.post("/api/v1/save_weights_for_sampler", headers=H,
                           json={"model_id": mid, "sampling_session_seq_id": 0, "seq_id": 3, "kind": "snapshot"}))
    assert eph == {"type": "save_weights_for_sampler", "path": None, "sampling_session_id": f"{sid}:sample:0"}
    sampler = client.get(f"/api/v1/samplers/{sid}:sample:0", headers=H).json()
    assert sampler["base_model"] == "fake/base"

    # create-via-load and legacy load
    new = done(client.post("/api/v1/load_weights", headers=H, json={
        "session_id": sid, "model_seq_id": 1, "path": saved["path"], "optimizer": True}))
    assert new["model_id"] == f"{sid}:train:1"
    legacy = done(client.post("/api/v1/load_weights", headers=H, json={
        "model_id": mid, "seq_id": 4, "path": saved["path"], "optimizer": False}))
    assert legacy["model_id"] == mid

    run = tt.TrainingRun.model_validate(client.get(f"/api/v1/training_runs/{mid}", headers=H).json())
    assert run.last_checkpoint.tinker_path == saved["path"] and run.lora_rank == 8
    runs = tt.TrainingRunsResponse.model_validate(client.get("/api/v1/training_runs?limit=10&offset=0", headers=H).json())
    assert {r.training_run_id for r in runs.training_runs} == {mid, f"{sid}:train:1"} and runs.cursor.total_count == 2
    cks = tt.CheckpointsListResponse.model_validate(client.get(f"/api/v1/training_runs/{mid}/checkpoints", headers=H).json())
    assert {c.checkpoint_id for c in cks.checkpoints} >= {"weights/s1", "sampler_weights/p1"}
    assert client.put(f"/api/v1/training_runs/{mid}/checkpoints/weights/s1/ttl", headers=H,
                      json={"ttl_seconds": 7200}).status_code == 200
    assert service.checkpoints.by_key[parse_checkpoint_path(saved["path"])].info.expires_at is not None
    assert client.post(f"/api/v1/training_runs/{mid}/checkpoints/weights/s1/publish", headers=H).status_code == 200
    assert service.checkpoints.by_key[parse_checkpoint_path(saved["path"])].info.public
    info = tt.WeightsInfoResponse.model_validate(
        client.post("/api/v1/weights_info", headers=H, json={"tinker_path": saved["path"]}).json())
    assert info.base_model == "fake/base" and info.lora_rank == 8 and info.train_mlp is False
    assert client.delete(f"/api/v1/training_runs/{mid}/checkpoints/sampler_weights/p1", headers=H).status_code == 200
    assert (mid, "sampler", "p1") not in service.checkpoints.by_key
    user_cks = tt.CheckpointsListResponse.model_validate(client.get("/api/v1/checkpoints", headers=H).json())
    assert "sampler_weights/p1" not in {c.checkpoint_id for c in user_cks.checkpoints}
    # another user sees nothing of it
    assert client.get(f"/api/v1/training_runs/{mid}", headers={"X-API-Key": "tml-bob"}).status_code == 404


def test_asample_sequence_ids_and_proto(client):
    sid = _session(client)
    s = client.post("/api/v1/create_sampling_session", headers=H, json={
        "session_id": sid, "sampling_session_seq_id": 0, "base_model": "fake/base"}).json()["sampling_session_id"]
    r = client.post("/api/v1/asample", headers=H, json={
        "num_samples": 3, "prompt": {"chunks": [{"type": "encoded_text", "tokens": [3, 4, 5, 6]}]},
        "sampling_params": {"max_tokens": 2, "temperature": 0.0}, "sampling_session_id": s, "seq_id": 0,
        "prompt_logprobs": True, "topk_prompt_logprobs": 2, "prompt_logprobs_last_n": 2, "type": "sample"}).json()
    assert len(r["sample_sequence_ids"]) == 3 and len(set(r["sample_sequence_ids"])) == 3
    res = client.post("/api/v1/retrieve_future", headers=H, json={"request_id": r["request_id"]})
    out = deserialize_sample_response(res.content)
    assert len(out.sequences) == 3 and all(len(q.tokens) == 2 for q in out.sequences)
    assert out.prompt_logprobs[:2] == [None, None] and out.prompt_logprobs[2] is not None
    assert out.topk_prompt_logprobs[1] is None and len(out.topk_prompt_logprobs[3]) == 2
    bad = client.post("/api/v1/asample", headers=H, json={
        "num_samples": 1, "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1]}]},
        "sampling_params": {"max_tokens": 2}, "sampling_session_id": s, "prompt_alt_tokens_k": 2})
    assert bad.status_code == 400 and "prompt_alt_tokens_k" in bad.json()["error"]


def test_failed_future_has_lower_case_category(client, service, monkeypatch):
    import twinkle.server.tinker.futures as futures_routes
    from twinkle.server.state.futures import Future

    # the retrieve route's long-poll hold lives in the futures router: the pending one below is never finished
    monkeypatch.setattr(futures_routes, "RETRIEVE_HOLD_S", 0.2)
    from twinkle.types.api import FutureState

    service.futures.by_id["fx"] = Future("fx", "alice", "forward_backward", None, state=FutureState(
        future_id="fx", status="failed", type="forward_backward", error={"error": "boom", "category": "User"}))
    r = client.post("/api/v1/retrieve_future", headers=H, json={"request_id": "fx|fb"}).json()
    assert r == {"error": "boom", "category": "user"}
    service.futures.by_id["fp"] = Future("fp", "alice", "forward_backward", None)
    assert client.post("/api/v1/retrieve_future", headers=H, json={"request_id": "fp|fb"}).json()["type"] == "try_again"
