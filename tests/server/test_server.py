"""The HTTP server, started for real (uvicorn on 127.0.0.1, a free port) and checked against the
in-process pipelines: many concurrent requests over two endpoints must all succeed and give exactly
what `Pipeline.create(...)` gives for the same input; bad bodies get a 422 with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
import uvicorn  # noqa: E402

from sparseinfer.server import build_app, load_config  # noqa: E402
from sparseinfer.tasks import Pipeline, TruncationWarning  # noqa: E402
from tests.conftest import FIXTURES  # noqa: E402

CLF_MODEL = FIXTURES / "bert-sequence-classification"
QA_MODEL = FIXTURES / "bert-question-answering"
HOST = "127.0.0.1"
SCORE_ATOL = 1e-6

CONFIG = f"""\
# DeepSparse's server layout
num_cores: 1
endpoints:
  - task: sentiment_analysis
    model: {CLF_MODEL}
    name: sentiment
    route: /sentiment/predict
    batch_size: 1
    bucketing:
      sequence_lengths: [32, 128]
  - task: question_answering
    model: {QA_MODEL}
    name: qa
    batch_size: 1
    bucketing:
      sequence_lengths: [64, 128]
    kwargs:
      doc_stride: 48
      max_answer_length: 20
"""

pytestmark = pytest.mark.filterwarnings("ignore::sparseinfer.tasks.TruncationWarning")


# --------------------------------------------------------------------------- running a server
class RunningServer:
    def __init__(self, app, server: uvicorn.Server, thread: threading.Thread, port: int) -> None:
        self.app, self.server, self.thread, self.port = app, server, thread, port
        self.url = f"http://{HOST}:{port}"


@contextlib.contextmanager
def running_server(config_text: str, tmp_path: Path) -> Iterator[RunningServer]:
    """Load the YAML config, build the app and serve it with uvicorn on a free loopback port in a
    background thread; stop it (and check that it stopped) on exit."""
    path = tmp_path / "server.yaml"
    path.write_text(config_text, encoding="utf-8")
    app = build_app(load_config(path))
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn-under-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    running = RunningServer(app, server, thread, port)
    try:
        wait_ready(running.url)
        yield running
    finally:
        server.should_exit = True
        thread.join(timeout=15)
    assert not thread.is_alive(), "the server did not stop"
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{running.url}/v2/health/live", timeout=2)
    for endpoint in app.state.endpoints:
        assert endpoint._executor._shutdown, f"endpoint {endpoint.name!r} still has its worker thread"


def wait_ready(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = httpx.get(f"{url}/v2/health/ready", timeout=2)
            if r.status_code == 200 and r.json() == {"ready": True}:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not become ready in {timeout} s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[RunningServer]:
    with running_server(CONFIG, tmp_path_factory.mktemp("server")) as running:
        yield running


@pytest.fixture(scope="module")
def oracles() -> dict[str, Pipeline]:
    """The same pipelines, called in-process."""
    return {
        "sentiment": Pipeline.create("text-classification", CLF_MODEL, sequence_length=[32, 128], batch_size=1, num_threads=1),
        "qa": Pipeline.create(
            "question-answering", QA_MODEL, sequence_length=[64, 128], batch_size=1, num_threads=1, doc_stride=48, max_answer_length=20
        ),
    }


# --------------------------------------------------------------------------- inputs and comparison
WORDS = (
    "the a cafe is in zurich berlin river house old new city was built by people who live near water "
    "and it has many small shops open late at night where we eat bread cheese with friends after work "
    "i loved this film not again terrible great fine good bad movie story"
).split()


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def request_pool(seed: int = 7) -> list[tuple[str, dict[str, Any]]]:
    """(endpoint name, request body): single texts, batches, sentence pairs, one text longer than the
    largest bucket; questions on short and multi-window contexts, batched questions, top_k > 1."""
    rng = random.Random(seed)
    pool: list[tuple[str, dict[str, Any]]] = []
    for _ in range(12):
        pool.append(("sentiment", {"sequences": sentence(rng, 2, 25)}))
    for _ in range(4):
        pool.append(("sentiment", {"sequences": [sentence(rng, 2, 20) for _ in range(rng.randint(2, 4))]}))
    for _ in range(3):
        pool.append(("sentiment", {"sequences": [[sentence(rng, 2, 10), sentence(rng, 2, 10)], [sentence(rng, 2, 10)]]}))
    pool.append(("sentiment", {"sequences": sentence(rng, 200, 220)}))  # truncated to 128 tokens
    for _ in range(10):
        pool.append(("qa", {"question": sentence(rng, 2, 6).rstrip(".") + "?", "context": sentence(rng, 10, 40)}))
    for _ in range(3):
        pool.append(("qa", {"question": sentence(rng, 2, 6) + "?", "context": " ".join(sentence(rng, 20, 30) for _ in range(8))}))
    for _ in range(3):
        pool.append(("qa", {"question": [sentence(rng, 2, 6) + "?" for _ in range(3)], "context": sentence(rng, 20, 60)}))
    pool.append(("qa", {"question": "Where is it?", "context": sentence(rng, 30, 60), "top_k": 3}))
    pool.append(("qa", {"question": "Who lives there?", "context": sentence(rng, 30, 60), "handle_impossible_answer": True}))
    return pool


def jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value


def differences(actual: Any, expected: Any, where: str = "$") -> list[str]:
    """Where `actual` differs from `expected`: exact for everything but floats (SCORE_ATOL)."""
    if isinstance(expected, float) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        return [] if abs(actual - expected) <= SCORE_ATOL else [f"{where}: {actual!r} != {expected!r}"]
    if isinstance(expected, dict) and isinstance(actual, dict):
        if set(actual) != set(expected):
            return [f"{where}: keys {sorted(actual)} != {sorted(expected)}"]
        return [d for k in expected for d in differences(actual[k], expected[k], f"{where}.{k}")]
    if isinstance(expected, list) and isinstance(actual, list):
        if len(actual) != len(expected):
            return [f"{where}: {len(actual)} items != {len(expected)}"]
        return [d for i, (a, e) in enumerate(zip(actual, expected)) for d in differences(a, e, f"{where}[{i}]")]
    return [] if type(actual) is type(expected) and actual == expected else [f"{where}: {actual!r} != {expected!r}"]


# --------------------------------------------------------------------------- the load test
class Tracking:
    """Wraps a pipeline and records how many of its calls ran at once."""

    def __init__(self, pipeline: Pipeline, everyone: dict) -> None:
        self._pipeline = pipeline
        self._everyone = everyone
        self.active = 0
        self.max_active = 0
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._everyone["lock"]:
            self.active += 1
            self.calls += 1
            self.max_active = max(self.max_active, self.active)
            self._everyone["active"] += 1
            self._everyone["max"] = max(self._everyone["max"], self._everyone["active"])
        try:
            time.sleep(0.0005)  # widen the window in which overlapping calls would be seen
            return self._pipeline(*args, **kwargs)
        finally:
            with self._everyone["lock"]:
                self.active -= 1
                self._everyone["active"] -= 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline, name)


@contextlib.contextmanager
def tracked(app) -> Iterator[tuple[dict[str, Tracking], dict]]:
    everyone = {"lock": threading.Lock(), "active": 0, "max": 0}
    wrappers = {}
    for e in app.state.endpoints:
        wrappers[e.name] = e.pipeline = Tracking(e.pipeline, everyone)
    try:
        yield wrappers, everyone
    finally:
        for e in app.state.endpoints:
            e.pipeline = e.pipeline._pipeline


def send_load(url: str, jobs: list[tuple[str, dict, Any]], clients: int, total: int, time_limit: float, seed: int = 0):
    """`total` requests from `clients` threads (each its own httpx.Client), picked from `jobs`;
    stops early at `time_limit` seconds. Returns (requests sent, errors)."""
    routes = {"sentiment": ["/v2/models/sentiment/infer", "/sentiment/predict"], "qa": ["/v2/models/qa/infer"]}
    counter = iter(range(total))
    lock = threading.Lock()
    errors: list[str] = []
    sent = [0]
    deadline = time.monotonic() + time_limit

    def client(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        with httpx.Client(base_url=url, timeout=30) as http:
            while time.monotonic() < deadline:
                with lock:
                    if next(counter, None) is None:
                        return
                name, body, expected = rng.choice(jobs)
                route = rng.choice(routes[name])
                try:
                    r = http.post(route, json=body)
                    problems = [f"HTTP {r.status_code}: {r.text[:300]}"] if r.status_code != 200 else differences(r.json(), expected)
                except Exception as exc:  # a transport error is an error too
                    problems = [f"{type(exc).__name__}: {exc}"]
                with lock:
                    sent[0] += 1
                    errors.extend(f"{route} {json.dumps(body)[:120]}: {p}" for p in problems[:3])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=time_limit + 60)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    return sent[0], errors


def test_concurrent_requests_match_the_pipelines(server, oracles, record_property):
    with pytest.warns(TruncationWarning):
        jobs = [(name, body, jsonable(oracles[name](**body))) for name, body in request_pool()]
    assert any(isinstance(e, list) for n, _, e in jobs if n == "qa"), "the pool has list-valued QA answers"
    total, clients = 600, 8
    with tracked(server.app) as (calls, everyone):
        start = time.perf_counter()
        sent, errors = send_load(server.url, jobs, clients=clients, total=total, time_limit=60)
        elapsed = time.perf_counter() - start
    record_property("requests", sent)
    record_property("seconds", round(elapsed, 2))
    print(f"\n{sent} requests from {clients} clients in {elapsed:.1f} s ({sent / elapsed:.0f}/s), {len(errors)} errors")
    assert errors == [], f"{len(errors)} errors, e.g.:\n" + "\n".join(errors[:10])
    assert sent == total, f"only {sent} of {total} requests were sent within the time limit"
    assert sum(c.calls for c in calls.values()) == sent
    # Each endpoint ran one call at a time, while the two endpoints (1 core each, so 2 workers) overlapped.
    assert {name: c.max_active for name, c in calls.items()} == {"sentiment": 1, "qa": 1}
    assert everyone["max"] == 2


def test_one_worker_runs_one_call_at_a_time(tmp_path, oracles):
    """num_workers: 1 keeps the two endpoints from running at the same time."""
    config = CONFIG.replace("num_cores: 1\n", "num_cores: 1\nnum_workers: 1\n")
    jobs = [(name, body, jsonable(oracles[name](**body))) for name, body in request_pool(seed=3)[:6] + request_pool(seed=3)[-6:]]
    with running_server(config, tmp_path) as running, tracked(running.app) as (calls, everyone):
        sent, errors = send_load(running.url, jobs, clients=4, total=60, time_limit=30, seed=1)
    assert errors == []
    assert sent == 60
    assert everyone["max"] == 1


# --------------------------------------------------------------------------- bad requests
@pytest.mark.parametrize(
    ("route", "body", "loc", "reason"),
    [
        ("/v2/models/sentiment/infer", {}, ["body", "sequences"], "Field required"),
        ("/v2/models/sentiment/infer", {"sequences": ""}, ["body", "sequences"], "must not be empty"),
        ("/sentiment/predict", {"sequences": "   "}, ["body", "sequences"], "must not be empty"),
        ("/v2/models/sentiment/infer", {"sequences": 5}, ["body", "sequences"], "valid string"),
        ("/v2/models/sentiment/infer", {"sequences": []}, ["body", "sequences"], "at least 1 item"),
        ("/v2/models/sentiment/infer", {"sequences": "fine", "top_k": 2}, ["body", "top_k"], "Extra inputs are not permitted"),
        ("/v2/models/qa/infer", {"question": "Where?"}, ["body", "context"], "Field required"),
        ("/v2/models/qa/infer", {"question": "", "context": "In Zurich."}, ["body", "question"], "must not be empty"),
        ("/v2/models/qa/infer", {"question": "Where?", "context": ["a", "b"]}, ["body"], "give one context, or one per question"),
        ("/v2/models/qa/infer", {"question": "Where?", "context": "In Zurich.", "top_k": "many"}, ["body", "top_k"], "valid integer"),
        (
            "/v2/models/qa/infer",
            {"question": "Where?", "context": "In Zurich.", "top_k": 0},
            ["body", "top_k"],
            "greater than or equal to 1",
        ),
    ],
)
def test_bad_body_is_422_with_the_reason(server, route, body, loc, reason):
    r = httpx.post(server.url + route, json=body, timeout=10)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(d["loc"][: len(loc)] == loc and reason in d["msg"] for d in detail), detail


def test_body_that_is_not_json_is_422(server):
    r = httpx.post(
        server.url + "/v2/models/sentiment/infer", content=b"{not json", headers={"content-type": "application/json"}, timeout=10
    )
    assert r.status_code == 422
    assert r.json()["detail"][0]["type"] == "json_invalid"


def test_input_the_pipeline_rejects_is_422_with_its_message(server):
    body = {"question": "Where?", "context": "The cafe is in Zurich.", "doc_stride": 500}
    r = httpx.post(server.url + "/v2/models/qa/infer", json=body, timeout=10)
    assert r.status_code == 422
    assert "doc_stride=500 must be less than" in r.json()["detail"][0]["msg"]
    # The endpoint still answers afterwards.
    assert httpx.post(server.url + "/v2/models/qa/infer", json={**body, "doc_stride": 16}, timeout=10).status_code == 200


# --------------------------------------------------------------------------- the other routes
def test_models_lists_both_endpoints(server):
    r = httpx.get(server.url + "/v2/models", timeout=10)
    assert r.status_code == 200
    models = {m["name"]: m for m in r.json()["models"]}
    assert set(models) == {"sentiment", "qa"}
    assert models["sentiment"]["task"] == "text-classification"
    assert models["sentiment"]["sequence_lengths"] == [32, 128]
    assert models["sentiment"]["routes"] == ["/v2/models/sentiment/infer", "/sentiment/predict"]
    assert models["qa"]["task"] == "question-answering"
    assert models["qa"]["routes"] == ["/v2/models/qa/infer"]
    assert all(m["ready"] and m["num_threads"] == 1 for m in models.values())


def test_model_metadata_and_readiness(server):
    r = httpx.get(server.url + "/v2/models/qa", timeout=10)
    assert r.status_code == 200
    assert r.json()["inputs"]["title"] == "QuestionAnsweringInput"
    assert httpx.get(server.url + "/v2/models/qa/ready", timeout=10).json() == {"name": "qa", "ready": True}
    assert httpx.get(server.url + "/v2/health/live", timeout=10).json() == {"live": True}


def test_unknown_model_is_404_naming_the_models(server):
    for r in (
        httpx.post(server.url + "/v2/models/nope/infer", json={"sequences": "hi"}, timeout=10),
        httpx.get(server.url + "/v2/models/nope", timeout=10),
    ):
        assert r.status_code == 404
        assert "sentiment" in r.json()["detail"] and "qa" in r.json()["detail"]


def test_predict_is_only_for_a_single_endpoint(server):
    assert httpx.post(server.url + "/predict", json={"sequences": "hi"}, timeout=10).status_code == 404


def test_docs_and_openapi(server):
    r = httpx.get(server.url + "/docs", timeout=10)
    assert r.status_code == 200 and "swagger" in r.text.lower()
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    for path in ("/v2/models/sentiment/infer", "/sentiment/predict", "/v2/models/qa/infer", "/v2/models", "/v2/health/ready"):
        assert path in spec["paths"]
    schemas = spec["components"]["schemas"]
    assert {"TextClassificationInput", "TextClassificationOutput", "QuestionAnsweringInput", "QuestionAnsweringOutput"} <= set(schemas)
    body = spec["paths"]["/v2/models/qa/infer"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/QuestionAnsweringInput"}
    assert httpx.get(server.url + "/", timeout=10, follow_redirects=False).headers["location"] == "/docs"


# --------------------------------------------------------------------------- the command line
def test_command_line_serves_one_endpoint_at_predict_and_stops_cleanly(oracles):
    """`python -m sparseinfer.server --task ... --model-path ... --port 0`: serves /predict; SIGINT stops it."""
    cmd = [sys.executable, "-m", "sparseinfer.server", "--task", "sentiment-analysis", "--model-path", str(CLF_MODEL)]
    cmd += ["--sequence-length", "32", "128", "--num-cores", "1", "--host", HOST, "--port", "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            log.append(line)
            m = re.search(rf"running on http://{re.escape(HOST)}:(\d+)", line)
            port = int(m.group(1)) if m else None
            if time.monotonic() > deadline:
                break
        assert port, "the server did not report its port:\n" + "".join(log)
        url = f"http://{HOST}:{port}"
        wait_ready(url)
        body = {"sequences": ["I loved this film.", "Not again, terrible."]}
        r = httpx.post(url + "/predict", json=body, timeout=10)
        assert r.status_code == 200, r.text
        assert differences(r.json(), jsonable(oracles["sentiment"](**body))) == []
        assert [m["name"] for m in httpx.get(url + "/v2/models", timeout=10).json()["models"]] == ["text-classification-0"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        reader.join(timeout=5)
    while not lines.empty():
        log.append(lines.get())
    assert code == 0, "".join(log)
    assert "Application shutdown complete" in "".join(log)
