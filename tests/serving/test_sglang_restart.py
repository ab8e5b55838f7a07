"""The online distiller outlives its server: kill the SGLang endpoint mid-run, restart it on the same
port, and the distiller counts the failure, pushes nothing half-done, and resumes on its own."""
from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from conftest import Stub, _handler, free_port
from test_sglang_client import scoring_answer
from test_sglang_request_log import event, line

from draftdistill.serving.online import OnlineConfig, OnlineDistiller
from draftdistill.serving.sglang_backend import SGLangBackend
from draftdistill.serving.sglang_client import SGLangClient

PROMPT, RESPONSE = [1, 2, 3], [4, 5, 6, 7]


def tiny_drafter() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


def start_server(port: int) -> tuple[Stub, ThreadingHTTPServer]:
    """A fresh SGLang stand-in on a fixed port: health, version, scoring, the draft-update session."""
    stub = Stub(url=f"http://127.0.0.1:{port}")
    torch.manual_seed(0)
    lp = torch.log_softmax(torch.randn(len(PROMPT + RESPONSE), 32), -1)
    stub.on("GET", "/model_info", (200, {"weight_version": "v0"}))
    stub.on("POST", "/generate", (200, scoring_answer(PROMPT, RESPONSE, lp, k=3)))
    for path in ("/begin_weight_update", "/update_weights_from_tensor", "/end_weight_update"):
        stub.on("POST", path, (200, {"success": True, "message": "Success"}))
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(stub))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return stub, server


def finish_requests(log, first: int, count: int) -> None:
    with log.open("a") as f:
        for i in range(first, first + count):
            f.write(line(event("request.finished", f"r{i}", PROMPT, RESPONSE, finished_ts=100.0 + i,
                               versions=[{"version": "v0", "start": 0, "end": len(RESPONSE)}])))


def test_distiller_survives_a_server_kill_and_restart(tmp_path):
    log = tmp_path / "requests" / "vm_0.log"
    log.parent.mkdir()
    port = free_port()
    stub, server = start_server(port)
    client = SGLangClient(stub.url, timeout=2, retries=2, backoff=0.01, max_backoff=0.02)
    backend = SGLangBackend(client, log_dir=log.parent, teacher="topk", top_k=3)
    distiller = OnlineDistiller(backend, tiny_drafter(),
                                OnlineConfig(divergence="topk_tail:k=3,base=fkl", update_every=4,
                                             steps_per_update=1, batch_size=4, window=4))
    before = {k: v.clone() for k, v in distiller.drafter.state_dict().items()}

    server.shutdown()  # the server dies with traffic already logged
    server.server_close()
    finish_requests(log, 0, 4)
    failed = distiller.step()
    assert "error" in failed and distiller.counters["errors"] == 1
    assert stub.calls("/begin_weight_update") == []  # nothing pushed, nothing half-open
    assert all(torch.equal(before[k], v) for k, v in distiller.drafter.state_dict().items())
    assert distiller.kept.name == "v0" and distiller.candidate is None

    restarted, server = start_server(port)  # back on the same address
    try:
        finish_requests(log, 4, 4)
        metrics = distiller.step()
        assert metrics.get("pushed") == "v1", metrics
        assert distiller.counters["errors"] == 1 and distiller.counters["updates"] == 1
        assert restarted.calls("/begin_weight_update") == [{"selector": "draft"}]
        assert restarted.calls("/update_weights_from_tensor")[0]["weight_version"] == "v1"
        assert len(restarted.calls("/end_weight_update")) == 1
    finally:
        server.shutdown()
        server.server_close()
