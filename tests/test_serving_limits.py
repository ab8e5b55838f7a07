"""Hostile input against the embedded HTTP server: nothing wedges it, nothing steers it.

Each test drives a real server on 127.0.0.1 (ephemeral port) over a tiny target and drafter, checks
the status code a hostile request gets, and then that a normal greedy request still gets the
target's exact output. Every wait is bounded.
"""
import concurrent.futures
import json
import logging
import math
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from safetensors.torch import save_file

from draftdistill.models import build_pruned_drafter
from draftdistill.serving.embedded import EmbeddedSpecServer
from draftdistill.serving.http_api import Limits, make_http_server, prometheus_text, serve_in_thread
from draftdistill.spec import SamplingConfig, target_generate
from serving_helpers import make_engine
from tiny import make_llama, make_tokenizer

PROMPT = [1, 5, 9, 3]
LOGGER = "draftdistill.serving.http"


def greedy(engine, prompt, n=6):
    out, _ = target_generate(engine.target, torch.tensor([prompt]), n, SamplingConfig(temperature=0.0), None, None)
    return out.tolist()


class Served:
    def __init__(self, engine, **limits):
        self.engine = engine
        self.server = make_http_server(engine, limits=Limits(**limits))
        serve_in_thread(self.server)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def post(url, body, headers=None, timeout=60):
    """(status, json reply, headers); never raises for an HTTP error status."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}"), error.headers


def raw(port, data: bytes, timeout=10.0) -> bytes:
    """Send raw bytes, read until the server closes (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_all(sock)


def read_all(sock) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def status_of(reply: bytes) -> int | None:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else None


def request_bytes(body: bytes, path="/v1/completions", length=None, extra=b"") -> bytes:
    length = len(body) if length is None else length
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n").encode() + extra + b"\r\n" + body


def assert_healthy(served, n=6):
    """A normal greedy request still gets exactly the target's greedy output."""
    status, reply, _ = post(served.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": n, "temperature": 0})
    assert status == 200, reply
    assert reply["choices"][0]["token_ids"] == greedy(served.engine, PROMPT, n)


def wait_for(predicate, seconds=10.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def small():
    """Context 256 (the tiny models'), max_tokens limit 128, short read timeout, small queue."""
    served = Served(make_engine(), max_tokens=128, read_timeout=1.0, request_timeout=120.0, max_pending=4,
                    max_body_bytes=64 * 1024)
    yield served
    served.close()


def long_context_engine():
    """The tiny models with a context of a million positions: a request can ask for a (practically)
    endless generation, which only a disconnect or the time limit stops."""
    target = make_llama(layers=3)
    target.config.max_position_embeddings = 10**6
    engine = EmbeddedSpecServer(target, build_pruned_drafter(target, 1), make_tokenizer(), gamma=3)
    assert engine.context_length == 10**6
    return engine


@pytest.fixture(scope="module")
def long_engine():
    return long_context_engine()


# ---- tokens and context ----
def test_max_tokens_and_prompt_are_capped_by_the_limit_and_the_context(small):
    cases = [
        ({"prompt": PROMPT, "max_tokens": 10**9}, "limit of 128"),
        ({"prompt": PROMPT, "max_tokens": 129}, "limit of 128"),
        ({"prompt": [4] * 200, "max_tokens": 100}, "context of 256"),
        ({"prompt": [4] * 300, "max_tokens": 1}, "context of 256"),
        ({"prompt": "w1 " * 300, "max_tokens": 1}, "context of 256"),
    ]
    for body, reason in cases:
        status, reply, _ = post(small.url + "/v1/completions", body)
        assert status == 400 and reply["field"] == "max_tokens" and reason in reply["error"], (body, reply)
    status, reply, _ = post(small.url + "/v1/completions", {"prompt": [4] * 250, "max_tokens": 6, "temperature": 0})
    assert status == 200 and reply["usage"]["total_tokens"] == 256  # exactly the context fits
    assert_healthy(small)


# ---- body size, slow and short bodies ----
def test_an_oversized_body_is_refused_unread_with_413(small):
    started = time.monotonic()
    reply = raw(small.port, request_bytes(b"", length=200_000_000) + b'{"prompt": [1')
    assert status_of(reply) == 413 and b"--max-body-bytes" in reply
    assert time.monotonic() - started < 5  # refused from the headers, not after reading 200 MB
    assert_healthy(small)


def test_slow_and_short_bodies_time_out_and_free_their_threads(small):
    open_before = small.server.connections._value
    # A body shorter than its Content-Length, the client waiting: 408 after the read timeout.
    with socket.create_connection(("127.0.0.1", small.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(request_bytes(b'{"prompt": [1', length=100))
        reply = read_all(sock)
    assert status_of(reply) == 408 and 0.5 < time.monotonic() - started < 15
    # The same, the client closing its side: 400 at once.
    with socket.create_connection(("127.0.0.1", small.port), timeout=10) as sock:
        sock.sendall(request_bytes(b'{"prompt": [1', length=100))
        sock.shutdown(socket.SHUT_WR)
        reply = read_all(sock)
    assert status_of(reply) == 400 and b"Content-Length" in reply
    # Headers trickled a byte at a time (slowloris): cut off after the read timeout in all.
    with socket.create_connection(("127.0.0.1", small.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\n")
        closed = False
        for _ in range(150):  # 15 s at most; the server gives 1 s
            try:
                sock.sendall(b"X")
                time.sleep(0.1)
            except OSError:
                closed = True
                break
            sock.settimeout(0.0)
            try:
                closed = sock.recv(1024) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed = True
            sock.settimeout(10)
            if closed:
                break
    assert closed and time.monotonic() - started < 15
    assert wait_for(lambda: small.server.connections._value == open_before)  # every thread let go
    assert_healthy(small)


# ---- bad fields ----
BAD_REQUESTS = [
    (b'{"prompt": [1, 5], "temperature": NaN}', "temperature"),
    (b'{"prompt": [1, 5], "temperature": Infinity}', "temperature"),
    (b'{"prompt": [1, 5], "temperature": -1}', "temperature"),
    (b'{"prompt": [1, 5], "temperature": 1e-300}', "temperature"),
    (b'{"prompt": [1, 5], "temperature": "hot"}', "temperature"),
    (b'{"prompt": [1, 5], "top_p": 0}', "top_p"),
    (b'{"prompt": [1, 5], "top_p": 1.5}', "top_p"),
    (b'{"prompt": [1, 5], "top_p": NaN}', "top_p"),
    (b'{"prompt": [1, 5], "seed": "x"}', "seed"),
    (b'{"prompt": [1, 5], "seed": 1.5}', "seed"),
    (b'{"prompt": [1, 5], "seed": -1}', "seed"),
    (b'{"prompt": [1, 5], "seed": 18446744073709551616}', "seed"),
    (b'{"prompt": [1, 99999]}', "prompt"),
    (b'{"prompt": [1, 32]}', "prompt"),  # vocab is 32
    (b'{"prompt": [-1]}', "prompt"),
    (b'{"prompt": [1.5]}', "prompt"),
    (b'{"prompt": [true]}', "prompt"),
    (b'{"prompt": []}', "prompt"),
    (b'{"prompt": ""}', "prompt"),
    (b'{"prompt": {"not": "a prompt"}}', "prompt"),
    (b'{"max_tokens": 4}', "prompt"),
    (b'{"prompt": [1, 5], "max_tokens": 0}', "max_tokens"),
    (b'{"prompt": [1, 5], "max_tokens": "5"}', "max_tokens"),
    (b'{"prompt": [1, 5], "max_tokens": 1.5}', "max_tokens"),
    (b'{"prompt": [1, 5], "max_tokens": true}', "max_tokens"),
    (b'{"prompt": [1, 5], "stop": ["x"]}', "stop"),
    (b'{"prompt": [1, 5], "stream": true}', "stream"),
    (b'{"prompt": [1, 5], "n": 2}', "n"),
    (b'[1, 2, 3]', "body"),
    (b'"a string"', "body"),
    (b'{"prompt": [1,', "body"),
    (b'[' * 60_000, "body"),  # nested past the recursion limit
    (b'\xff\xfe{}', "body"),
]


def test_every_bad_field_is_a_400_naming_it_with_one_log_line(small, caplog, capfd):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    for body, field in BAD_REQUESTS:
        status, reply, _ = post(small.url + "/v1/completions", body)
        assert status == 400 and reply["field"] == field, (body[:60], reply)
    refused = [r for r in caplog.records if r.name == LOGGER and r.getMessage().startswith("refused 400")]
    assert len(refused) == len(BAD_REQUESTS)
    assert not any(r.exc_info for r in caplog.records) and "Traceback" not in capfd.readouterr().err
    assert_healthy(small)
    status, reply, _ = post(small.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "temperature": 0.7,
                                                            "top_p": 0.9, "seed": 2**63 - 1, "model": "x"})
    assert status == 200 and reply["usage"]["completion_tokens"] <= 4


# ---- bounded queue, backlog ----
def test_fifty_simultaneous_requests_get_answers_never_resets(small):
    expected = greedy(small.engine, PROMPT, 4)
    start = threading.Barrier(50)

    def one(_):
        start.wait(timeout=30)
        try:
            status, reply, headers = post(small.url + "/v1/completions",
                                          {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}, timeout=30)
        except OSError as error:  # a reset or a refused connection
            return ("error", repr(error))
        if status == 200:
            return ("ok", reply["choices"][0]["token_ids"] == expected)
        return (status, headers.get("Retry-After"))

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    errors = [r for r in results if r[0] == "error"]
    assert not errors, errors
    busy = [r for r in results if r[0] == 503]
    assert all(r == ("ok", True) for r in results if r[0] not in (503,)), results
    assert all(retry == "1" for _, retry in busy)
    print(f"50 simultaneous requests: {50 - len(busy)} served, {len(busy)} answered 503 (busy), 0 resets")
    assert_healthy(small)


def test_a_full_queue_answers_503_with_retry_after(long_engine):
    served = Served(long_engine, max_tokens=10**6, max_pending=2, request_timeout=300.0)
    hogs = []
    try:
        for _ in range(2):  # one decoding, one waiting for the engine: the queue is full
            sock = socket.create_connection(("127.0.0.1", served.port), timeout=10)
            sock.sendall(request_bytes(
                json.dumps({"prompt": PROMPT, "max_tokens": 900_000, "temperature": 0}).encode()))
            hogs.append(sock)
        assert wait_for(lambda: served.server.pending._value == 0)
        status, reply, headers = post(served.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
        assert status == 503 and headers["Retry-After"] == "1" and "--max-pending" in reply["error"]
    finally:
        for sock in hogs:
            sock.close()
    assert wait_for(lambda: served.server.pending._value == 2, 60)  # both hogs stopped when their clients left
    assert_healthy(served)
    served.close()


# ---- cancellation and the time bound ----
def test_a_disconnected_client_stops_its_generation_and_a_waiting_swap_proceeds(long_engine, tmp_path):
    served = Served(long_engine, max_tokens=10**6, request_timeout=300.0)
    engine = served.engine
    weights = {k: v.clone() for k, v in engine.drafter.state_dict().items() if k != "lm_head.weight"}
    save_file(weights, tmp_path / "same.safetensors")
    stopped_before = engine.stopped["client disconnected"]
    try:
        hog = socket.create_connection(("127.0.0.1", served.port), timeout=10)
        hog.sendall(request_bytes(json.dumps({"prompt": PROMPT, "max_tokens": 999_000, "temperature": 0}).encode()))
        assert wait_for(engine.lock.locked)
        time.sleep(0.3)  # it is decoding
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            swap = pool.submit(post, served.url + "/control/weights",
                               {"path": str(tmp_path / "same.safetensors"), "version": "after-hog"})
            time.sleep(0.3)
            assert not swap.done()  # waiting for the engine
            hog.close()
            released = time.monotonic()
            status, reply, _ = swap.result(timeout=60)
        assert status == 200 and reply["weight_version"] == "after-hog"
        assert_healthy(served)
        assert time.monotonic() - released < 60  # far under the 300 s request timeout
        assert engine.stopped["client disconnected"] == stopped_before + 1
        metrics = urllib.request.urlopen(served.url + "/metrics", timeout=10).read().decode()
        assert 'draftdistill_stopped_generations_total{reason="client disconnected"}' in metrics
    finally:
        served.close()


def test_a_generation_past_the_request_timeout_stops_with_503(long_engine):
    served = Served(long_engine, max_tokens=10**6, request_timeout=1.0)
    try:
        started = time.monotonic()
        status, reply, _ = post(served.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 999_000,
                                                                  "temperature": 0})
        assert status == 503 and "--request-timeout" in reply["error"] and time.monotonic() - started < 30
        assert not served.engine.lock.locked()
        assert_healthy(served)
    finally:
        served.close()


# ---- /control/weights ----
def save(tmp_path, name, weights):
    save_file(weights, tmp_path / name)
    return str(tmp_path / name)


def full_weights(engine, transform=lambda v: v.clone()):
    return {k: transform(v) for k, v in engine.drafter.state_dict().items() if k != "lm_head.weight"}


def test_weight_control_takes_only_finite_full_weights_of_the_served_shapes(small, tmp_path):
    engine = small.engine
    before = {k: v.clone() for k, v in engine.drafter.state_dict().items()}
    version = engine.draft_weight_version()
    nan = full_weights(engine, lambda v: torch.full_like(v, math.nan))
    inf = full_weights(engine)
    inf[next(iter(inf))].view(-1)[0] = math.inf
    partial = dict(list(full_weights(engine).items())[:2])
    wrong_shape = full_weights(engine)
    name = next(iter(wrong_shape))
    wrong_shape[name] = torch.zeros(3, 3)
    integer = full_weights(engine, lambda v: v.to(torch.int32))
    unknown = {**full_weights(engine), "model.layers.9.mlp.up_proj.weight": torch.zeros(2)}
    for label, weights in [("nan", nan), ("inf", inf), ("partial", partial), ("shape", wrong_shape),
                           ("int", integer), ("unknown", unknown)]:
        status, reply, _ = post(small.url + "/control/weights",
                                {"path": save(tmp_path, f"{label}.safetensors", weights), "version": label})
        assert status == 400 and engine.draft_weight_version() == version, (label, reply)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header....")
    status, reply, _ = post(small.url + "/control/weights", {"path": str(tmp_path / "garbage.safetensors")})
    assert status == 400 and reply["field"] == "path"
    assert all(torch.equal(engine.drafter.state_dict()[k], before[k]) for k in before)  # nothing half-written
    status, reply, _ = post(small.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "temperature": 1.0,
                                                            "seed": 3})
    assert status == 200  # sampled requests still work
    assert_healthy(small)


def test_weight_control_refuses_other_origins_hosts_content_types_and_versions(small, tmp_path):
    path = save(tmp_path, "same.safetensors", full_weights(small.engine))
    port = small.port
    refused = [
        ({"Content-Type": "text/plain"}, 415),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ({"Origin": "http://evil.example"}, 403),
        ({"Origin": "null"}, 403),
        ({"Host": f"evil.example:{port}"}, 403),  # DNS rebinding: a foreign name pointing at 127.0.0.1
        ({"Host": f"127.0.0.1:{port + 1 if port < 65535 else port - 1}"}, 403),
        ({"Host": "localhost"}, 403),
    ]
    version = small.engine.draft_weight_version()
    for headers, code in refused:
        status, reply, _ = post(small.url + "/control/weights", {"path": path, "version": "hijack"}, headers)
        assert status == code and small.engine.draft_weight_version() == version, (headers, reply)
    for bad in ['v1"} 1\nevil_metric 1', "", "x" * 65, "v 1", "v1\n"]:
        status, reply, _ = post(small.url + "/control/weights", {"path": path, "version": bad})
        assert status == 400 and reply["field"] == "version", (bad, reply)
    metrics = urllib.request.urlopen(small.url + "/metrics", timeout=10).read().decode()
    assert "evil_metric" not in metrics
    status, reply, _ = post(small.url + "/control/weights", {"path": path, "version": "local-1"},
                            {"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}",
                             "Content-Type": "application/json; charset=utf-8"})
    assert status == 200 and reply["weight_version"] == "local-1"
    assert_healthy(small)


def test_weight_control_token(small, tmp_path):
    served = Served(small.engine, control_token="s3cret")
    path = save(tmp_path, "same.safetensors", full_weights(small.engine))
    try:
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}]:
            status, _, reply_headers = post(served.url + "/control/weights", {"path": path, "version": "t1"}, headers)
            assert status == 401 and reply_headers["WWW-Authenticate"] == "Bearer"
        status, reply, _ = post(served.url + "/control/weights", {"path": path, "version": "t1"},
                                {"Authorization": "Bearer s3cret"})
        assert status == 200 and reply["weight_version"] == "t1"
    finally:
        served.close()


def test_metrics_escape_label_values(small):
    engine = small.engine
    saved, engine.version = engine.version, 'a"b\\c\nd'  # however a version got there
    try:
        text = prometheus_text(engine)
    finally:
        engine.version = saved
    assert 'draftdistill_weight_version_info{version="a\\"b\\\\c\\nd"} 1' in text
    assert all(line.startswith(("#", "draftdistill_")) for line in text.splitlines())
