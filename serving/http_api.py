"""A small OpenAI-style HTTP API over the embedded server, bound to loopback.

    POST /v1/completions   {"prompt": "text" | [ids], "max_tokens", "temperature", "top_p", "seed"}
                           -> OpenAI completion + "draftdistill": accept length, weight version, alpha
    GET  /health           200 {"status": "ok", "weight_version"}
    GET  /metrics          Prometheus text: requests, tokens, target forwards, accept length, swaps
    POST /control/weights  {"path": "drafter.safetensors" | "hf-dir", "version": "v7"}: a hot swap;
                           safetensors only (never a pickle), from loopback clients only
"""
from __future__ import annotations

import ipaddress
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from safetensors.torch import load_file

from .embedded import EmbeddedSpecServer


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
        weights.update(load_file(file))
    return weights


class Handler(BaseHTTPRequestHandler):
    engine: EmbeddedSpecServer  # set on the subclass made by make_http_server
    model_name = "draftdistill-embedded"

    def log_message(self, *args):  # quiet; the request log is the record
        pass

    def _send(self, status: int, body, content_type: str = "application/json"):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _json_body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        return body

    def do_GET(self):
        if self.path == "/health":
            self._send(200, {"status": "ok", "weight_version": self.engine.draft_weight_version()})
        elif self.path == "/metrics":
            self._send(200, prometheus_text(self.engine), "text/plain; version=0.0.4")
        else:
            self._send(404, {"error": f"no route {self.path}"})

    def do_POST(self):
        try:
            body = self._json_body()
            if self.path == "/v1/completions":
                self._send(200, self.complete(body))
            elif self.path == "/control/weights":
                if not ipaddress.ip_address(self.client_address[0]).is_loopback:
                    self._send(403, {"error": "weight control is only accepted from loopback"})
                    return
                weights = read_safetensors_weights(str(body["path"]))
                self.engine.push_draft_weights(weights, str(body.get("version") or f"file-{int(time.time())}"))
                self._send(200, {"success": True, "weight_version": self.engine.draft_weight_version()})
            else:
                self._send(404, {"error": f"no route {self.path}"})
        except (ValueError, KeyError, TypeError) as error:
            self._send(400, {"error": str(error)})

    def complete(self, body: dict) -> dict:
        prompt = body.get("prompt")
        tokenizer = self.engine.tokenizer
        if isinstance(prompt, str):
            prompt_ids = tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompt_ids = prompt
        else:
            raise ValueError("'prompt' must be a string or a list of token ids")
        max_tokens = int(body.get("max_tokens", 64))
        request = self.engine.complete(prompt_ids, max_new_tokens=max_tokens,
                                       temperature=float(body.get("temperature", 1.0)),
                                       top_p=float(body.get("top_p", 1.0)), seed=body.get("seed"))
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


def prometheus_text(engine: EmbeddedSpecServer) -> str:
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
        f'draftdistill_weight_version_info{{version="{engine.draft_weight_version()}"}} 1',
    ]
    return "\n".join(lines) + "\n"


def make_http_server(engine: EmbeddedSpecServer, port: int = 0, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """A server bound to loopback by default (port 0: any free port; read it from server_address)."""
    handler = type("EmbeddedHandler", (Handler,), {"engine": engine})
    return ThreadingHTTPServer((host, port), handler)


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="embedded-http", daemon=True)
    thread.start()
    return thread
