"""``pipelines.submit`` against a stand-in of the Kubeflow Pipelines REST API (v2beta1) on 127.0.0.1:
what reaches the server is the committed pipeline, the parameters, the service account and the caching."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from pipelines import submit


@pytest.fixture
def kfp_api(monkeypatch):
    received: list[tuple[str, str, dict]] = []

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, obj):
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            received.append(("GET", self.path, {}))
            self._reply({"experiments": []} if "/experiments" in self.path else {})

        def do_POST(self):
            data = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            received.append(("POST", self.path, data))
            if self.path.endswith("/experiments"):
                return self._reply({"experiment_id": "e-1", "display_name": data.get("display_name")})
            return self._reply({"run_id": "r-1", "display_name": data.get("display_name")})

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("KFP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    yield received
    server.shutdown()


def _run(received) -> dict:
    (run,) = [d for method, path, d in received if method == "POST" and path.endswith("/runs")]
    return run


def _caching(run) -> dict[str, bool]:
    """Every task's caching, by its path through conditions and sub-pipelines."""
    spec = run["pipeline_spec"]
    spec = spec.get("pipeline_spec", spec)  # with a platform spec, both are sent
    found: dict[str, bool] = {}

    def walk(dag, prefix):
        for name, t in dag.get("tasks", {}).items():
            inner = spec["components"][t["componentRef"]["name"]]
            if "dag" in inner:
                walk(inner["dag"], f"{prefix}{name}/")
            else:
                found[prefix + name] = t.get("cachingOptions", {}).get("enableCache", False)

    walk(spec["root"]["dag"], "")
    return found


def test_submit_sends_the_pipeline_parameters_and_service_account(kfp_api, capsys):
    rc = submit.main(
        ["--service-account", "streetvision-pipeline-runner", "dataset_uri=s3://b/roadwork", "epochs=3"]
    )
    assert rc == 0 and "started run r-1" in capsys.readouterr().out
    run = _run(kfp_api)
    assert run["runtime_config"]["parameters"] == {"dataset_uri": "s3://b/roadwork", "epochs": 3}
    assert run["service_account"] == "streetvision-pipeline-runner"
    caching = _caching(run)
    assert not caching.pop("dataset-fingerprint") and all(caching.values())
    assert set(caching) == {
        "make-splits",
        "pack-shards",
        "train-baseline",
        "sweep-thresholds",
        "export-bundle",
    }


def test_no_cache_turns_caching_off_for_every_step(kfp_api):
    assert submit.main(["--no-cache", "dataset_uri=s3://b/roadwork"]) == 0
    caching = _caching(_run(kfp_api))
    assert len(caching) == 6 and not any(caching.values())  # the fingerprint and five phases


def test_submit_refuses_a_missing_dataset_or_endpoint(kfp_api, monkeypatch, capsys):
    assert submit.main(["epochs=3"]) == 2 and "dataset_uri" in capsys.readouterr().err
    assert (
        submit.main(["dataset_uri=s3://b/d", "policy=scrc"]) == 2
        and "policy is not a parameter of streetvision.yaml" in capsys.readouterr().err
    )
    monkeypatch.delenv("KFP_ENDPOINT")
    assert submit.main(["dataset_uri=s3://b/d"]) == 2 and "KFP_ENDPOINT" in capsys.readouterr().err
    assert not [r for r in kfp_api if r[0] == "POST"]
