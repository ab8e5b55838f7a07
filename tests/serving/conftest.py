"""Fixtures for the SGLang tests.

`stub`: a tiny HTTP server on 127.0.0.1 (http.server in a thread) that answers scripted
responses and records requests; always available.

`sglang_server`: a REAL SGLang 0.5.23 server on this CPU, started once per session with
shared/sglang-cpu/serve.sh and stopped with stop.sh. It needs the venv that
shared/sglang-cpu/install.sh builds: $DRAFTDISTILL_SGLANG_VENV, else <repo>/.venv-sglang, and the
scripts: $DRAFTDISTILL_SGLANG_CPU, else <repo>/../shared/sglang-cpu. Without them (a fresh CI
clone) every test using it is skipped with the reason; DRAFTDISTILL_SGLANG_TESTS=0 skips them too.
The test process talks HTTP only; the server runs in its own venv. The server is started with the
draftdistill plugin discoverable (a temporary dist-info on PYTHONPATH whose entry point loads
serving/plugin.py by path), so its processes really load it through importlib.metadata.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sglang_test_support import run_in_venv, sglang_paths, write_plugin_dist

# ---------------------------------------------------------------- stub server
@dataclass
class Stub:
    """routes: (method, path) -> list of (status, body); the last entry repeats. A body that is a
    dict/list is sent as JSON, a str as text; a callable gets the request JSON and returns one."""

    routes: dict = field(default_factory=dict)
    requests: list = field(default_factory=list)  # (method, path, parsed body or None)
    url: str = ""

    def on(self, method: str, path: str, *responses):
        self.routes[(method, path)] = list(responses)

    def calls(self, path: str) -> list:
        return [body for _, p, body in self.requests if p == path]


def _handler(stub: Stub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _serve(self, method):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
            stub.requests.append((method, self.path, body))
            queue = stub.routes.get((method, self.path))
            if not queue:
                status, out = 404, {"detail": "Not Found"}
            else:
                status, out = queue[0] if len(queue) == 1 else queue.pop(0)
                if callable(out):
                    out = out(body)
            data = (json.dumps(out) if not isinstance(out, str) else out).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if not isinstance(out, str) else "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._serve("GET")

        def do_POST(self):
            self._serve("POST")

    return Handler


def _serve_stub():
    s = Stub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(s))
    s.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield s
    server.shutdown()
    server.server_close()


@pytest.fixture
def stub():
    yield from _serve_stub()


@pytest.fixture
def stub2():
    """A second stub server, for pools."""
    yield from _serve_stub()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- the real server
@dataclass
class Server:
    url: str
    model: Path  # the served tiny model (HF dir)
    model2: Path  # same architecture and tokenizer, other weights
    run_dir: Path
    log_dir: Path
    python: Path  # the server venv's python
    scripts: Path
    events: Path  # DRAFTDISTILL_SPEC_EVENTS of the server processes
    plugin_dist: Path
    startup_statuses: list  # (status or None, retryable) seen by SGLangClient while it started
    start_seconds: float


@pytest.fixture(scope="session")
def sglang_server(tmp_path_factory):
    python, scripts, reason = sglang_paths()
    if python is None:
        pytest.skip(reason)
    from draftdistill.serving.sglang_client import SGLangClient, SGLangError

    root = tmp_path_factory.mktemp("sglang")
    for name, seed in (("tiny0", 0), ("tiny1", 1)):
        subprocess.run([str(python), str(scripts / "make_tiny_model.py"), str(root / name), "--seed", str(seed)],
                       check=True, capture_output=True, timeout=300)
    port = free_port()
    run_dir = root / "run"
    plugin_dist = write_plugin_dist(root / "plugin")
    events = root / "spec_events.jsonl"
    env = {**os.environ, "SGLANG_VENV": str(python.parent.parent), "SGLANG_RUN_DIR": str(run_dir),
           "PYTHONPATH": str(plugin_dist), "DRAFTDISTILL_SPEC_EVENTS": str(events)}
    start = time.perf_counter()
    proc = subprocess.Popen(["bash", str(scripts / "serve.sh"), str(root / "tiny0"), str(port), "--enable-metrics",
                             "--enable-return-hidden-states"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    client = SGLangClient(f"http://127.0.0.1:{port}", timeout=5, retries=0)
    statuses = []
    while proc.poll() is None:  # watch /health while serve.sh waits for it: 503s are expected
        try:
            client.request("GET", "/health", parse_json=False)
            statuses.append((200, False))
        except SGLangError as e:
            statuses.append((e.status, e.retryable))
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode != 0:
        subprocess.run(["bash", str(scripts / "stop.sh"), str(run_dir / "server.pid")], capture_output=True)
        pytest.fail(f"serve.sh failed ({proc.returncode}): {err[-3000:]}")
    server = Server(f"http://127.0.0.1:{port}", root / "tiny0", root / "tiny1", run_dir, run_dir / "requests", python,
                    scripts, events, plugin_dist, statuses, time.perf_counter() - start)
    try:
        yield server
    finally:
        subprocess.run(["bash", str(scripts / "stop.sh"), str(run_dir / "server.pid")],
                       capture_output=True, timeout=120)
        if os.environ.get("DRAFTDISTILL_KEEP_SGLANG_RUN") != "1":
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def venv_python():
    python, _, reason = sglang_paths()
    if python is None:
        pytest.skip(reason)
    return python


@pytest.fixture(scope="session")
def in_venv():
    """run_in_venv, for tests that need SGLang's own python (sglang importable)."""
    return run_in_venv
