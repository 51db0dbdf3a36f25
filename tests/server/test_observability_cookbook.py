"""cookbook/observability/ is valid without docker: the compose file's structure (services, images, ports,
mounted files that exist), the Prometheus scrape config (``promtool`` when installed), Grafana provisioning,
and the dashboard JSON fields Grafana requires; the server config passes the schema; every metric the
dashboard names is one the server exports (docs/observability.md lists each one)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from twinkle.server.config import load_config

ROOT = Path(__file__).resolve().parents[2]
COOK = ROOT / "cookbook" / "observability"


def _compose() -> dict:
    return yaml.safe_load((COOK / "docker-compose.yaml").read_text())


def test_compose_structure():
    c = _compose()
    assert set(c) <= {"name", "services", "volumes", "networks", "configs", "secrets"}
    services = c["services"]
    assert {"prometheus", "grafana", "tempo"} <= set(services)
    named = set(c.get("volumes") or {})
    for name, svc in services.items():
        assert isinstance(svc.get("image"), str) and re.match(r"^[\w./-]+:[\w.-]+$", svc["image"]), name
        for p in svc.get("ports", []):
            assert re.match(r"^\d+:\d+$", str(p)), (name, p)
        for v in svc.get("volumes", []):
            src, dst, *mode = v.split(":")
            assert dst.startswith("/") and (not mode or mode[0] in ("ro", "rw")), (name, v)
            if src.startswith("."):
                if src.endswith("metrics_token"):  # the operator writes it (README step 1)
                    continue
                assert (COOK / src).exists(), (name, src)
            else:
                assert src in named, (name, src)
        for dep in svc.get("depends_on", []):
            assert dep in services
        env = svc.get("environment") or {}
        assert all(isinstance(v, str) for v in env.values()), name  # compose wants strings
    graf = services["grafana"]["environment"]
    dash_in_container = graf["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert dash_in_container == "/var/lib/grafana/dashboards/twinkle.json"


def test_prometheus_config_and_provisioning():
    prom = yaml.safe_load((COOK / "prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["authorization"]["type"] == "Bearer"
    promtool = shutil.which("promtool")
    if promtool:
        tmp_cfg = dict(prom)
        tmp_cfg["scrape_configs"] = [{**job, "authorization": {"type": "Bearer", "credentials": "x"}}]
        p = COOK.parent.parent / ".pytest-prom.yml"
        try:
            p.write_text(yaml.safe_dump(tmp_cfg))
            out = subprocess.run([promtool, "check", "config", "--syntax-only", str(p)], capture_output=True,
                                 text=True, timeout=60)
            assert out.returncode == 0, out.stdout + out.stderr
        finally:
            p.unlink(missing_ok=True)
    ds = yaml.safe_load((COOK / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert ds["apiVersion"] == 1
    src = ds["datasources"][0]
    assert src["type"] == "prometheus" and src["url"] == "http://prometheus:9090" and src["uid"]
    tempo = ds["datasources"][1]
    assert tempo["type"] == "tempo" and tempo["url"] == "http://tempo:3200"
    assert "4318:4318" in _compose()["services"]["tempo"]["ports"]
    prov = yaml.safe_load((COOK / "grafana/provisioning/dashboards/twinkle.yaml").read_text())
    assert prov["providers"][0]["type"] == "file"
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    cfg = load_config(COOK / "server_config.yaml")
    assert cfg.telemetry.enabled and cfg.telemetry.prometheus.access == "token"
    assert cfg.telemetry.otlp.endpoint == "http://localhost:4318" and cfg.telemetry.otlp.protocol == "http/protobuf"
    assert job["static_configs"][0]["targets"] == [f"host.docker.internal:{cfg.http.port}"]


def test_dashboard_json_is_what_grafana_needs():
    dash = json.loads((COOK / "grafana/dashboards/twinkle.json").read_text())
    ds_uid = yaml.safe_load((COOK / "grafana/provisioning/datasources/prometheus.yaml").read_text())[
        "datasources"][0]["uid"]
    for k in ("uid", "title", "schemaVersion", "panels", "time"):
        assert k in dash, k
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs = []
    for p in dash["panels"]:
        assert isinstance(p["title"], str) and p["title"]
        assert p["type"] in ("row", "timeseries", "stat", "bargauge", "gauge", "table"), p["type"]
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in ("h", "w", "x", "y")) and 0 < g["w"] <= 24 and g["x"] + g["w"] <= 24
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == ds_uid
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["datasource"]["uid"] == ds_uid and t["expr"].strip()
            exprs.append(t["expr"])
    # every metric the dashboard names is documented in docs/observability.md
    doc = (ROOT / "docs" / "observability.md").read_text()
    names = {m for e in exprs for m in re.findall(r"\b(twinkle_[a-z_]+?)(?:_bucket|_sum|_count)?\b", e)}
    assert names, exprs
    for name in names:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert f"`{base}" in doc, f"{base} is on the dashboard but not in docs/observability.md"


@pytest.mark.parametrize("path", ["README.md"])
def test_readme_steps_name_the_files(path):
    text = (COOK / path).read_text()
    for needle in ("docker compose", "server_config.yaml", "TWINKLE_METRICS_TOKEN", "metrics_token",
                   "localhost:3000", "twinkle-server usage"):
        assert needle in text, needle
