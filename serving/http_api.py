"""A small OpenAI-style HTTP API over the embedded server, bound to loopback.

    POST /v1/completions   {"prompt": "text" | [ids], "max_tokens", "temperature", "top_p", "seed"}
                           -> OpenAI completion + "draftdistill": accept length, weight version, alpha
    GET  /health           200 {"status": "ok", "weight_version"}
    GET  /metrics          Prometheus text: requests, tokens, target forwards, accept length, swaps,
                           refusals and stopped generations by reason
    POST /control/weights  {"path": "drafter.safetensors" | "hf-dir", "version": "v7"}: a hot swap;
                           safetensors only (never a pickle), a full set of finite weights with the
                           served drafter's names and shapes, from loopback clients only

Hostile clients cannot wedge or steer it (Limits holds every bound):
  - a request is received within `read_timeout` seconds in all (headers and body; a slow or short
    body gets 408 or a closed connection), its body is at most `max_body_bytes` (413);
  - every field is checked (400 naming the field): max_tokens <= `max_tokens` and prompt +
    max_tokens <= the models' context, prompt ids in [0, vocab), finite sampling parameters, seed;
  - at most `max_pending` generations run or wait for the engine (more: 503 + Retry-After), at most
    `max_connections` connections are served at once (more: 503), `backlog` connections queue in
    the kernel;
  - a generation stops between decode rounds when its client disconnects or after
    `request_timeout` seconds (503), which frees the engine for the next request or swap;
  - /control/weights needs Content-Type application/json, a loopback Host (with this port) and,
    when sent, a loopback Origin (403 otherwise: no CSRF or DNS rebinding from a web page), and
    `Authorization: Bearer <control_token>` when a token is set (401);
  - every refusal is one log line (logger draftdistill.serving.http), never a traceback.
"""
from __future__ import annotations

import collections
import hmac
import io
import ipaddress
import json
import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from safetensors import SafetensorError
from safetensors.torch import load_file

from .embedded import EmbeddedSpecServer, GenerationStopped, RequestError, check_version

log = logging.getLogger("draftdistill.serving.http")


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 4096  # ceiling on max_tokens (the models' context also caps prompt + max_tokens)
    max_body_bytes: int = 1 << 20  # request bodies above this: 413
    read_timeout: float = 10.0  # seconds to receive a whole request (and to send a reply): 408 / closed
    request_timeout: float = 300.0  # wall-clock seconds for one generation, waiting included: 503
    max_pending: int = 16  # generations running or waiting for the engine; more: 503 + Retry-After
    max_connections: int = 256  # connections served at once; more: 503 without reading the request
    backlog: int = 128  # listen backlog: connections the kernel queues before accept
    control_token: str | None = None  # when set, /control/weights needs "Authorization: Bearer <token>"


COMPLETION_FIELDS = {"prompt", "max_tokens", "temperature", "top_p", "seed", "model", "stream", "n"}
CONTROL_FIELDS = {"path", "version"}


class Refused(Exception):
    """A request refused with `status`; `field` names the request field at fault, when one is."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers or {}
        self.reason = reason or (f"bad_{field}" if field else str(status))


def read_safetensors_weights(path: str) -> dict:
    source = Path(path)
    if source.is_dir():
        files = sorted(source.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{source}: no .safetensors files (only safetensors weights are accepted)")
    elif source.suffix == ".safetensors" and source.is_file():
        files = [source]
    else:
        raise ValueError(f"{source}: expected a .safetensors file or a directory of them")
    weights = {}
    for file in files:
        try:
            weights.update(load_file(file))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{file}: not a readable safetensors file ({error})") from None
    return weights


def _number(body: dict, field: str, default: float) -> float:
    value = body.get(field, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Refused(400, f"{field}: must be a number, got {type(value).__name__}", field)
    return value


def _is_loopback_name(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_host(value: str) -> tuple[str, int | None] | None:
    """'127.0.0.1:8000' / '[::1]:8000' / 'localhost' -> (host, port or None); None if malformed."""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1:]
        if rest and not rest.startswith(":"):
            return None
        port = rest[1:] if rest else None
    elif value.count(":") == 1:
        host, port = value.split(":")
    elif ":" in value:
        return None
    else:
        host, port = value, None
    if port is not None and not (port.isascii() and port.isdigit() and len(port) <= 5):
        return None
    return host, int(port) if port is not None else None


class _DeadlineReader(io.RawIOBase):
    """The socket's read side, failing with TimeoutError once `deadline` (time.monotonic) passes:
    a request trickled in one byte at a time still gets only read_timeout seconds in all."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request was not received within the read timeout")
        self.sock.settimeout(remaining)
        return self.sock.recv_into(buffer)


class Handler(BaseHTTPRequestHandler):
    engine: EmbeddedSpecServer  # set on the subclass made by make_http_server
    server: EmbeddedHTTPServer
    model_name = "draftdistill-embedded"

    # ---- plumbing ----
    def setup(self):
        super().setup()
        self.rfile.close()
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection,
                                                       time.monotonic() + self.server.limits.read_timeout))

    def log_message(self, *args):  # quiet; the request log is the record
        pass

    def log_error(self, format, *args):  # malformed request lines, timeouts: one line each
        self.server.count("timeout" if "timed out" in format else "protocol")
        log.warning("refused %s from %s: %s", getattr(self, "command", "") or "-", self.client_address[0],
                    (format % args)[:300])

    def _send(self, status: int, body, content_type: str = "application/json", headers: dict | None = None):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if status >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _refuse(self, refused: Refused) -> None:
        self.server.count(refused.reason)
        log.warning("refused %d %s %s from %s: %s", refused.status, self.command, self.path[:200],
                    self.client_address[0], refused.message[:300])
        body = {"error": refused.message}
        if refused.field:
            body["field"] = refused.field
        self._send(refused.status, body, headers=refused.headers)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise Refused(411, "Transfer-Encoding is not supported; send the body with a Content-Length",
                          "Content-Length")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            return b""
        raw = lengths[0].strip()
        if len(lengths) > 1 or not (raw.isascii() and raw.isdigit()):
            raise Refused(400, "Content-Length must be one non-negative integer", "Content-Length")
        cap = self.server.limits.max_body_bytes
        if len(raw) > 18 or int(raw) > cap:
            raise Refused(413, f"a body of {raw[:20]} bytes exceeds this server's limit of {cap} bytes "
                               "(--max-body-bytes)", "Content-Length", reason="body_too_large")
        length = int(raw)
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            raise Refused(408, f"the request body was not received within {self.server.limits.read_timeout} s "
                               "(--read-timeout)", reason="timeout") from None
        if len(data) < length:
            raise Refused(400, f"the body ended after {len(data)} of the {length} bytes of its Content-Length",
                          "Content-Length")
        return data

    def _json_body(self) -> dict:
        data = self._read_body()
        # The whole request is in: from here on the timeout only bounds writing the reply.
        self.connection.settimeout(self.server.limits.read_timeout)
        try:
            body = json.loads(data.decode("utf-8")) if data else {}
        except UnicodeDecodeError:
            raise Refused(400, "the request body is not UTF-8", "body") from None
        except (ValueError, RecursionError) as error:
            raise Refused(400, f"the request body is not valid JSON ({str(error)[:100]})", "body") from None
        if not isinstance(body, dict):
            raise Refused(400, f"the request body must be a JSON object, got {type(body).__name__}", "body")
        return body

    def _client_gone(self) -> bool:
        """True once the client closed (or reset) its connection; what it sent is left unread."""
        sock = self.connection
        timeout = sock.gettimeout()
        try:
            sock.settimeout(0.0)
            return sock.recv(1, socket.MSG_PEEK) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        finally:
            try:
                sock.settimeout(timeout)
            except OSError:
                pass

    # ---- routes ----
    def do_GET(self):
        self.connection.settimeout(self.server.limits.read_timeout)  # bounds writing the reply
        try:
            if self.path == "/health":
                self._send(200, {"status": "ok", "weight_version": self.engine.draft_weight_version()})
            elif self.path == "/metrics":
                self._send(200, prometheus_text(self.engine, self.server), "text/plain; version=0.0.4")
            else:
                raise Refused(404, f"no route {self.path[:200]}", reason="no_route")
        except Refused as refused:
            self._refuse(refused)
        except (ConnectionError, TimeoutError):
            raise  # the client went away or stalled: one line from handle_error
        except Exception:  # noqa: BLE001
            self._fail()

    def do_POST(self):
        try:
            route = urlsplit(self.path).path
            if route == "/v1/completions":
                self._send(200, self.complete(self._json_body()))
            elif route == "/control/weights":
                self._check_control()
                self._send(200, self.swap(self._json_body()))
            else:
                raise Refused(404, f"no route {self.path[:200]}", reason="no_route")
        except Refused as refused:
            self._refuse(refused)
        except RequestError as error:
            self._refuse(Refused(400, str(error), error.field))
        except GenerationStopped as stopped:
            if stopped.reason == "client disconnected":  # nobody to answer
                self.close_connection = True
                self.server.count("client_disconnected")
                log.warning("stopped %s %s from %s: the client disconnected", self.command, self.path[:200],
                            self.client_address[0])
            else:
                self._refuse(Refused(503, f"generation stopped: it ran past the request timeout of "
                                          f"{self.server.limits.request_timeout} s (--request-timeout)",
                                     reason="request_timeout"))
        except (ConnectionError, TimeoutError):
            raise  # the client went away or stalled: one line from handle_error
        except Exception:  # noqa: BLE001 - a bug or a model failure, not the client's: 500, with the traceback
            self._fail()

    def _fail(self) -> None:
        self.server.count("server_error")
        log.exception("error serving %s %s from %s", self.command, self.path[:200], self.client_address[0])
        try:
            self._send(500, {"error": "internal server error (see the server log)"})
        except OSError:
            pass

    # ---- /control/weights ----
    def _check_control(self) -> None:
        port = self.server.server_address[1]
        if not ipaddress.ip_address(self.client_address[0]).is_loopback:
            raise Refused(403, "weight control is only accepted from loopback", reason="forbidden")
        host = _split_host(self.headers.get("Host") or "")
        if host is None or not _is_loopback_name(host[0]) or (host[1] or 80) != port:
            raise Refused(403, f"weight control needs a loopback Host header for port {port} "
                               f"(127.0.0.1, localhost or [::1]), got {(self.headers.get('Host') or '')[:80]!r}",
                          "Host", reason="forbidden")
        origin = self.headers.get("Origin")
        if origin is not None:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not _is_loopback_name(parts.hostname or ""):
                raise Refused(403, f"weight control refuses requests from the web origin {origin[:80]!r}",
                              "Origin", reason="forbidden")
        token = self.server.limits.control_token
        if token:
            sent = self.headers.get("Authorization") or ""
            if not (sent.startswith("Bearer ") and hmac.compare_digest(sent[7:].strip().encode(), token.encode())):
                raise Refused(401, "weight control needs 'Authorization: Bearer <control token>'", "Authorization",
                              headers={"WWW-Authenticate": "Bearer"}, reason="unauthorized")
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise Refused(415, f"weight control needs Content-Type: application/json, got {content_type[:60]!r}",
                          "Content-Type", reason="bad_content_type")

    def swap(self, body: dict) -> dict:
        unknown = sorted(set(body) - CONTROL_FIELDS)
        if unknown:
            raise Refused(400, f"unknown fields {[u[:40] for u in unknown[:5]]}; known: {sorted(CONTROL_FIELDS)}",
                          unknown[0][:40], reason="unknown_field")
        path = body.get("path")
        if not isinstance(path, str) or not path:
            raise Refused(400, "path: must be the path of a .safetensors file or a directory of them", "path")
        version = body["version"] if "version" in body else f"file-{int(time.time())}"
        check_version(version)
        try:
            weights = read_safetensors_weights(path)
        except ValueError as error:
            raise Refused(400, str(error), "path") from None
        try:
            self.engine.push_draft_weights(weights, version, complete=True)
        except RequestError:
            raise
        except ValueError as error:
            raise Refused(400, f"{error}; still serving {self.engine.draft_weight_version()}", "path") from None
        log.info("swapped draft weights to %s from %s", version, path[:200])
        return {"success": True, "weight_version": self.engine.draft_weight_version()}

    # ---- /v1/completions ----
    def complete(self, body: dict) -> dict:
        unknown = sorted(set(body) - COMPLETION_FIELDS)
        if unknown:
            raise Refused(400, f"unknown fields {[u[:40] for u in unknown[:5]]}; known: {sorted(COMPLETION_FIELDS)}",
                          unknown[0][:40], reason="unknown_field")
        if body.get("stream", False) is not False:
            raise Refused(400, "stream: streaming is not supported", "stream")
        if body.get("n", 1) != 1 or isinstance(body.get("n", 1), bool):
            raise Refused(400, "n: only n = 1 is supported", "n")
        if not isinstance(body.get("model", ""), str):
            raise Refused(400, "model: must be a string", "model")
        prompt = body.get("prompt")
        tokenizer = self.engine.tokenizer
        if isinstance(prompt, str):
            prompt_ids = tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, list) and prompt:
            prompt_ids = prompt  # each id is checked by the engine
        else:
            raise Refused(400, "prompt: must be a string or a non-empty list of token ids", "prompt")
        if not prompt_ids:
            raise Refused(400, "prompt: the text has no tokens", "prompt")
        max_tokens = body.get("max_tokens", 64)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise Refused(400, f"max_tokens: must be an int >= 1, got {str(max_tokens)[:40]}", "max_tokens")
        limit = self.server.limits.max_tokens
        if max_tokens > limit:
            raise Refused(400, f"max_tokens: {max_tokens} exceeds this server's limit of {limit} (--max-tokens-limit)",
                          "max_tokens")
        temperature, top_p = _number(body, "temperature", 1.0), _number(body, "top_p", 1.0)
        seed = body.get("seed")
        self.engine.check_request(prompt_ids, max_tokens, temperature, top_p, seed)  # 400s before queueing
        request = self._generate(prompt_ids, max_tokens, temperature, top_p, seed)
        spec = request.meta["spec"]
        finish = "stop" if len(request.output_ids) < max_tokens else "length"
        return {
            "id": f"cmpl-{request.rid}", "object": "text_completion", "created": int(request.finished_at),
            "model": self.model_name,
            "choices": [{"index": 0, "text": tokenizer.decode(request.output_ids), "finish_reason": finish,
                         "token_ids": request.output_ids}],
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(request.output_ids),
                      "total_tokens": len(prompt_ids) + len(request.output_ids)},
            "draftdistill": {"accept_length": request.accept_length, "weight_version": request.weight_version,
                             "verify_steps": request.verify_steps, "alpha_per_position": spec["alpha_per_position"]},
        }

    def _generate(self, prompt_ids, max_tokens, temperature, top_p, seed):
        limits = self.server.limits
        if not self.server.pending.acquire(blocking=False):
            raise Refused(503, f"busy: {limits.max_pending} generations are running or waiting (--max-pending); "
                               "retry later", headers={"Retry-After": "1"}, reason="busy")
        deadline = time.monotonic() + limits.request_timeout

        def should_stop() -> str | None:
            if self._client_gone():
                return "client disconnected"
            if time.monotonic() > deadline:
                return "request timeout"
            return None

        try:
            return self.engine.complete(prompt_ids, max_new_tokens=max_tokens, temperature=temperature,
                                        top_p=top_p, seed=seed, should_stop=should_stop)
        finally:
            self.server.pending.release()


def _label(value) -> str:
    """A Prometheus label value, escaped (backslash, double quote, newline)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(engine: EmbeddedSpecServer, server: EmbeddedHTTPServer | None = None) -> str:
    requests = list(engine.log)
    tokens = sum(len(r.output_ids) for r in requests)
    forwards = sum(r.verify_steps or 0 for r in requests)
    lines = [
        "# TYPE draftdistill_requests_total counter", f"draftdistill_requests_total {len(requests)}",
        "# TYPE draftdistill_generated_tokens_total counter", f"draftdistill_generated_tokens_total {tokens}",
        "# TYPE draftdistill_target_forwards_total counter", f"draftdistill_target_forwards_total {forwards}",
        "# TYPE draftdistill_accept_length gauge",
        f"draftdistill_accept_length {tokens / forwards if forwards else 0.0}",
        "# TYPE draftdistill_weight_swaps_total counter", f"draftdistill_weight_swaps_total {len(engine.swaps)}",
        f'draftdistill_weight_version_info{{version="{_label(engine.draft_weight_version())}"}} 1',
        "# TYPE draftdistill_stopped_generations_total counter",
    ]
    lines += [f'draftdistill_stopped_generations_total{{reason="{_label(k)}"}} {v}'
              for k, v in sorted(dict(engine.stopped).items())]
    if server is not None:
        lines.append("# TYPE draftdistill_refused_requests_total counter")
        lines += [f'draftdistill_refused_requests_total{{reason="{_label(k)}"}} {v}'
                  for k, v in sorted(server.refusals().items())]
    return "\n".join(lines) + "\n"


BUSY_REPLY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
              b"Connection: close\r\nContent-Length: 66\r\n\r\n"
              b'{"error": "busy: too many connections (--max-connections); retry"}')


class EmbeddedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a real listen backlog, a cap on concurrent connections, shared
    limits and refusal counters, and one log line (not a traceback) for a client that went away."""

    daemon_threads = True

    def __init__(self, address, handler, limits: Limits):
        self.limits = limits
        self.request_queue_size = limits.backlog  # read by server_activate() in super().__init__
        self.pending = threading.BoundedSemaphore(limits.max_pending)
        self.connections = threading.BoundedSemaphore(limits.max_connections)
        self._refused: collections.Counter[str] = collections.Counter()
        self._count_lock = threading.Lock()
        super().__init__(address, handler)

    def count(self, reason: str) -> None:
        with self._count_lock:
            self._refused[reason] += 1

    def refusals(self) -> dict[str, int]:
        with self._count_lock:
            return dict(self._refused)

    def process_request(self, request, client_address):
        if self.connections.acquire(blocking=False):
            try:
                super().process_request(request, client_address)
            except BaseException:
                self.connections.release()
                raise
            return
        self.count("too_many_connections")  # answered here, without a thread and without reading
        log.warning("refused 503 from %s: %d connections are open (--max-connections)", client_address[0],
                    self.limits.max_connections)
        try:
            request.settimeout(0.0)
            request.send(BUSY_REPLY)
            request.recv(65536)  # drain what already arrived, so closing does not reset the reply away
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            self.count("connection_lost")
            log.warning("connection from %s lost: %s", client_address[0], (str(error) or type(error).__name__)[:200])
        else:  # a bug, not a client error: keep the traceback
            log.error("unexpected error serving %s", client_address[0], exc_info=error)


def make_http_server(engine: EmbeddedSpecServer, port: int = 0, host: str = "127.0.0.1",
                     limits: Limits | None = None) -> EmbeddedHTTPServer:
    """A server bound to loopback by default (port 0: any free port; read it from server_address)."""
    handler = type("EmbeddedHandler", (Handler,), {"engine": engine})
    return EmbeddedHTTPServer((host, port), handler, limits or Limits())


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="embedded-http", daemon=True)
    thread.start()
    return thread
