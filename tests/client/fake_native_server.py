"""An in-memory stand-in for the native API (``docs/native-api.md``) behind ``httpx.MockTransport``.

Each run is a one-parameter "model": the loss per weighted token is ``w**2`` and AdamW-free SGD moves ``w``
toward 0, so training visibly learns. It keeps the semantics the client relies on: auth, 404 for unknown
resources, 410 for dead sessions, futures, per-run seq_id dedup, checkpoints, sampling.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import threading
import time
from typing import Any

import httpx

KEY = "test-key"
PREFIX = "/api/v1/twinkle/"


def _err(status: int, code: str, msg: str, field: str | None = None) -> httpx.Response:
    detail = {"field": field} if field else {}
    cat = "server" if status >= 500 or status == 429 else "user"
    return httpx.Response(status, json={"error": msg, "category": cat, "code": code, "detail": detail})


class FakeServer:
    def __init__(self, base_models: list[dict[str, Any]] | None = None, lease_seconds: float = 60.0):
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        self.lease_seconds = lease_seconds
        self.base_models = base_models or [
            {"name": "builtin://tiny", "backend": "transformers", "max_lora_rank": 64, "max_adapters": 4,
             "max_tokens_per_request": 4096, "tokenizer_id": None, "vocab_size": 64}
        ]
        self.sessions: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.futures: dict[str, dict[str, Any]] = {}
        self.checkpoints: dict[str, list[dict[str, Any]]] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self.executions: list[tuple[str, str, int | None]] = []  # (run, op, seq_id) actually applied
        self.down = False  # simulate a network blip: every request fails to connect
        self.drop_next_response = 0  # process the request, then lose the reply (ReadError) this many times
        self.heartbeats = 0

    # ---- transport --------------------------------------------------------------------------------------------
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        resp = self._route(request)
        if self.drop_next_response > 0 and "/futures/" not in request.url.path:
            self.drop_next_response -= 1
            raise httpx.ReadError("connection reset", request=request)
        return resp

    def _route(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/api/v1/healthz":
            return httpx.Response(200, json={"status": "ok"})
        if request.headers.get("x-api-key") != KEY:
            return _err(401, "unauthenticated", "missing or unknown API key")
        if not path.startswith(PREFIX):
            return _err(404, "not_found", f"no route {path}")
        route = path[len(PREFIX):]
        body = json.loads(request.content) if request.content else None
        with self.lock:
            self.requests.append((request.method, route, body))
            return self._dispatch(request.method, route, body, dict(request.url.params))

    # ---- routes -------------------------------------------------------------------------------------------------
    def _dispatch(self, method: str, route: str, body: Any, params: dict[str, str]) -> httpx.Response:
        m = re.fullmatch
        if method == "GET" and route == "capabilities":
            return httpx.Response(200, json={"version": "0.1.0", "base_models": self.base_models})
        if method == "GET" and route == "status":
            return httpx.Response(200, json={
                "version": "0.1.0", "uptime_s": 1.0,
                "sessions_active": sum(s["state"] == "active" for s in self.sessions.values()),
                "runs_active": sum(r["state"] == "active" for r in self.runs.values()),
                "workers": [{"base_model": b["name"], "replica": 0, "queue_depth": 0,
                             "adapters": sum(r["state"] == "active" for r in self.runs.values())}
                            for b in self.base_models]})
        if method == "POST" and route == "sessions":
            sid = f"s{next(self.ids)}"
            now = time.time()
            self.sessions[sid] = {"session_id": sid, "user": "alice", "state": "active", "created_at": now,
                                  "last_heartbeat": now, "lease_seconds": body.get("lease_seconds") or self.lease_seconds,
                                  "metadata": body.get("metadata", {}), "run_ids": []}
            return httpx.Response(200, json=self.sessions[sid])
        if method == "GET" and route == "sessions":
            return httpx.Response(200, json={"sessions": list(self.sessions.values())})
        if g := m(r"sessions/([^/]+)(/heartbeat|/close)?", route):
            s = self.sessions.get(g.group(1))
            if s is None:
                return _err(404, "not_found", f"no session {g.group(1)}", "session_id")
            if g.group(2) == "/heartbeat":
                if s["state"] != "active":
                    return _err(410, "gone", f"session {s['session_id']} is {s['state']}")
                s["last_heartbeat"] = time.time()
                self.heartbeats += 1
            elif g.group(2) == "/close":
                s["state"] = "closed"
                for rid in s["run_ids"]:
                    self.runs[rid]["state"] = "unloaded"
            return httpx.Response(200, json=s)
        if method == "POST" and route == "runs":
            s = self.sessions.get(body["session_id"])
            if s is None or s["state"] != "active":
                return _err(404, "not_found", "no such session", "session_id")
            if body["base_model"] not in [b["name"] for b in self.base_models]:
                return _err(404, "not_found", f"base model {body['base_model']} not hosted", "base_model")
            if body.get("lora", {}).get("rank", 32) > 64:
                return _err(413, "limit_exceeded", "rank 128 exceeds max LoRA rank 64", "lora.rank")
            rid = f"{s['session_id']}:train:{len(s['run_ids'])}"
            s["run_ids"].append(rid)
            self.runs[rid] = {"run_id": rid, "session_id": s["session_id"], "user": "alice",
                              "base_model": body["base_model"], "lora": body.get("lora", {}), "name": body.get("name"),
                              "state": "active", "step": 0, "created_at": time.time(), "metadata": body.get("metadata", {}),
                              "last_metrics": {}, "_w": 2.0, "_grad": 0.0, "_wsum": 0.0, "_seen": {}, "_lr": 0.1,
                              "_metrics": []}
            return self._future("create_run", self._run_json(rid), rid)
        if method == "GET" and route == "runs":
            runs = [self._run_json(r) for r in self.runs]
            return httpx.Response(200, json={"runs": runs, "total": len(runs)})
        if method == "GET" and route == "checkpoints":
            return httpx.Response(200, json={"checkpoints": [c for cs in self.checkpoints.values() for c in cs]})
        if method == "POST" and route == "sample":
            n = body["num_samples"]
            prompt = [t for c in body["prompt"]["chunks"] for t in c["tokens"]]
            k = body["sampling_params"].get("max_tokens") or 4
            seqs = [{"stop_reason": "length", "tokens": [(prompt[-1] + i + j) % 64 for i in range(k)],
                     "logprobs": [-0.5] * k} for j in range(n)]
            res: dict[str, Any] = {"sequences": seqs}
            if body.get("prompt_logprobs"):
                res["prompt_logprobs"] = [None] + [-1.0] * (len(prompt) - 1)
            return self._future("sample", res, body.get("run_id"))
        if g := m(r"futures/([^/]+)", route):
            f = self.futures.get(g.group(1))
            if f is None:
                return _err(404, "not_found", "no such future", "future_id")
            return httpx.Response(200, json=f)
        if g := m(r"runs/([^/]+)(?:/(.+))?", route):
            rid, op = g.group(1), g.group(2)
            run = self.runs.get(rid)
            if run is None:
                return _err(404, "not_found", f"no run {rid}", "run_id")
            return self._run_op(method, run, op, body or {})
        return _err(404, "not_found", f"no route {route}")

    def _run_op(self, method: str, run: dict[str, Any], op: str | None, body: dict[str, Any]) -> httpx.Response:
        rid = run["run_id"]
        if op is None:
            if method == "DELETE":
                run["state"] = "deleted"
            return httpx.Response(200, json=self._run_json(rid))
        if op == "metrics":
            return httpx.Response(200, json={"run_id": rid, "points": run["_metrics"]})
        if op == "checkpoints" and method == "GET":
            return httpx.Response(200, json={"checkpoints": self.checkpoints.get(rid, [])})
        if run["state"] != "active":
            return _err(400, "state_lost", f"run {rid} is {run['state']}")
        seq = body.get("seq_id")
        if seq is not None and seq in run["_seen"]:
            return httpx.Response(200, json={"future_id": run["_seen"][seq], "run_id": rid})
        if op == "optimizer":
            run["_lr"] = body["optimizer"]["lr"]
            self.executions.append((rid, op, None))
            return self._future("set_optimizer", {}, rid)
        if op == "lr_scheduler":
            self.executions.append((rid, op, None))
            return self._future("set_lr_scheduler", {}, rid)
        if op in ("forward", "forward_backward"):
            if not body.get("data"):
                return _err(400, "invalid_input", "data is empty", "data")
            w = run["_w"]
            outs, total, wsum = [], 0.0, 0.0
            for d in body["data"]:
                ws = d["loss_fn_inputs"]["weights"]["data"]
                outs.append({"logprobs": {"data": [-(w * w)] * len(ws), "dtype": "float32"}})
                total += w * w * sum(ws)
                wsum += sum(ws)
            if op == "forward_backward":
                run["_grad"] += 2 * w * wsum
                run["_wsum"] += wsum
            res = {"loss_fn_output_type": "TensorData", "loss_fn_outputs": outs, "metrics": {"loss:sum": total}}
            run["_metrics"].append({"step": run["step"], "time": time.time(), "kind": op,
                                    "metrics": {"loss": total / max(wsum, 1e-9)}})
        elif op == "optim_step":
            g = run["_grad"] / max(run["_wsum"], 1e-9)
            run["_w"] -= run["_lr"] * g
            run["_grad"] = run["_wsum"] = 0.0
            run["step"] += 1
            res = {"metrics": {"grad_norm:mean": abs(g), "lr:mean": run["_lr"], "step:max": run["step"]}}
        elif op == "checkpoints":
            name = body["name"]
            kind = body.get("kind", "training")
            folder = "weights" if kind == "training" else "sampler_weights"
            info = {"checkpoint_id": f"{folder}/{name}", "run_id": rid, "name": name, "kind": kind,
                    "path": f"tinker://{rid}/{folder}/{name}", "created_at": time.time(), "step": run["step"],
                    "_w": run["_w"]}
            cs = [c for c in self.checkpoints.get(rid, []) if c["name"] != name or c["kind"] != kind]
            self.checkpoints[rid] = [*cs, info]
            res = {k: v for k, v in info.items() if not k.startswith("_")}
        elif op == "load":
            target = body["checkpoint"]
            found = [c for cs in self.checkpoints.values() for c in cs if target in (c["path"], c["name"])]
            if not found:
                return _err(404, "not_found", f"no checkpoint {target}", "checkpoint")
            run["_w"] = found[-1]["_w"]
            run["step"] = found[-1]["step"]
            res = {"path": found[-1]["path"]}
        else:
            return _err(404, "not_found", f"no route runs/{rid}/{op}")
        self.executions.append((rid, op, seq))
        ref = self._future(op, res, rid)
        if seq is not None:
            run["_seen"][seq] = json.loads(ref.content)["future_id"]
        return ref

    # ---- helpers ------------------------------------------------------------------------------------------------
    def _future(self, kind: str, result: Any, run_id: str | None) -> httpx.Response:
        fid = f"f{next(self.ids)}"
        self.futures[fid] = {"future_id": fid, "status": "complete", "type": kind, "result": result, "error": None}
        return httpx.Response(200, json={"future_id": fid, "run_id": run_id})

    def _run_json(self, rid: str) -> dict[str, Any]:
        return {k: v for k, v in self.runs[rid].items() if not k.startswith("_")}

    def weight(self, rid: str) -> float:
        return self.runs[rid]["_w"]

    @staticmethod
    def expected_loss(w: float) -> float:
        return w * w if math.isfinite(w) else float("nan")
