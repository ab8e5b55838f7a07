"""request_log.py on log lines shaped like SGLang 0.5.23's JSON request log (utils/request_logger.py,
observed on the real CPU server), including the speculative meta_info fields of
managers/tokenizer_manager.py (_calculate_spec_decoding_metrics) that need a GPU to produce."""
import json
import os
from datetime import datetime

import pytest
import torch

from draftdistill.serving.request_log import (RequestLogTailer, finished_request, parse_line, read_request_log,
                                              served_version)
from draftdistill.serving.sglang_backend import SGLangBackend
from draftdistill.serving.sglang_client import SGLangClient
from draftdistill.losses import TeacherTokenLogProbs, TeacherTopK
from test_sglang_client import scoring_answer


def event(kind, rid, input_ids=(1, 2, 3), output_ids=(4, 5, 6, 7), text=None, spec=True, versions=None,
          finished_ts=1795411849.5, prompt_tokens=None):
    obj = {"rid": rid, "text": text, "input_ids": list(input_ids) if input_ids is not None else None,
           "sampling_params": {"max_new_tokens": 4, "temperature": 0.7}, "return_logprob": False,
           "logprob_start_len": -1, "stream": False}
    e = {"timestamp": "2026-11-23T05:30:49.608224", "event": kind, "rid": rid, "obj": obj}
    if kind == "request.finished":
        mi = {"id": rid, "finish_reason": {"type": "length", "length": len(output_ids)},
              "prompt_tokens": prompt_tokens or len(input_ids or []), "weight_version": "v2",
              "completion_tokens": len(output_ids), "cached_tokens": 0,
              "weight_versions": versions or [{"version": "v2", "start": 0, "end": len(output_ids)}],
              "e2e_latency": 0.2, "request_finished_ts": finished_ts}
        if spec:  # tau = completion_tokens / spec_verify_ct = 4 / 2
            mi.update(spec_accept_rate=2 / 6, spec_accept_length=2.0, spec_num_correct_drafts=2,
                      spec_num_proposed_drafts=6, spec_verify_ct=2, spec_correct_drafts_histogram=[0, 2, 0, 0])
        e["out"] = {"text": "abcd", "output_ids": list(output_ids), "meta_info": mi}
    return e


def line(e):
    return "[2026-11-23 05:30:49] " + json.dumps(e) + "\n"


def test_finished_request_fields():
    r = finished_request(event("request.finished", "r1"))
    assert r.rid == "r1" and r.prompt_ids == [1, 2, 3] and r.output_ids == [4, 5, 6, 7]
    assert r.weight_version == "v2" and r.verify_steps == 2 and r.accept_length == 2.0
    assert r.finished_at == 1795411849.5
    assert r.meta["spec"]["spec_accept_length"] == 2.0 and r.meta["sampling_params"]["temperature"] == 0.7
    no_spec = finished_request(event("request.finished", "r2", spec=False))
    assert no_spec.verify_steps is None and no_spec.accept_length is None
    e = event("request.finished", "r3")
    del e["out"]["meta_info"]["request_finished_ts"]
    assert finished_request(e).finished_at == datetime.fromisoformat("2026-11-23T05:30:49.608224").timestamp()
    assert finished_request(event("request.received", "r1")) is None


def test_skips_health_warmup_scoring_and_text_without_tokenizer():
    assert finished_request(event("request.finished", "HEALTH_CHECK_23c4a380", input_ids=[0], output_ids=[5])) is None
    warm = event("request.finished", "a48db971", input_ids=None, text="The capital city of France is")
    assert finished_request(warm) is None
    assert finished_request(event("request.finished", "draftdistill-score-abc")) is None
    text_only = event("request.finished", "t1", input_ids=None, text="hello world", prompt_tokens=3)
    assert finished_request(text_only) is None
    r = finished_request(text_only, tokenize=lambda s: [1] + [len(w) for w in s.split()])
    assert r.prompt_ids == [1, 5, 5] and r.meta["prompt_ids_from_text"] and "prompt_ids_mismatch" not in r.meta
    assert finished_request(text_only, tokenize=lambda s: [5, 5]).meta["prompt_ids_mismatch"]  # server counted 3


def test_served_version_spans():
    spans = [{"version": "v1", "start": 0, "end": 2}, {"version": "v2", "start": 2, "end": 9}]
    assert served_version({"weight_versions": spans, "weight_version": "v2"}) == "v2"
    assert served_version({"weight_versions": [["v1", 0, 7], ["v2", 7, 8]]}) == "v1"  # msgspec array form
    assert served_version({"weight_version": "v5"}) == "v5" and served_version({}) == "default"


def test_parse_line():
    assert parse_line(line(event("request.received", "x")))["rid"] == "x"
    assert parse_line("[2026-11-23 05:30:49] {not json") is None and parse_line("no json here") is None


def test_tail_partial_last_line_and_rotation(tmp_path):
    log = tmp_path / "vm_0.log"
    first, second = line(event("request.finished", "a")), line(event("request.finished", "b"))
    log.write_text(line(event("request.received", "a")) + first + second[:40])  # b is half written
    tailer = RequestLogTailer(tmp_path)
    assert [r.rid for r in tailer.poll()] == ["a"]
    assert tailer.poll() == []  # still half a line
    with open(log, "a") as f:
        f.write(second[40:])
    assert [r.rid for r in tailer.poll()] == ["b"]
    # hourly rotation: the file is renamed and a new one started; nothing lost or read twice
    with open(log, "a") as f:
        f.write(line(event("request.finished", "c")))
    os.rename(log, tmp_path / "vm_0.log.2026-11-23_05")
    log.write_text(line(event("request.finished", "d")) + line(event("request.finished", "HEALTH_CHECK_1")))
    assert sorted(r.rid for r in tailer.poll()) == ["c", "d"]
    assert tailer.poll() == []
    assert tailer.counters["finished"] == 4 and tailer.counters["skipped"] == 1
    # truncated in place: read again from the start
    log.write_text(line(event("request.finished", "e")))
    assert [r.rid for r in tailer.poll()] == ["e"]
    # a garbage line is counted, not raised
    with open(log, "a") as f:
        f.write("[2026-11-23 05:31:00] {broken\n")
    assert tailer.poll() == [] and tailer.counters["malformed"] == 1


def test_from_end_and_single_file(tmp_path):
    log = tmp_path / "host_0.log"
    log.write_text(line(event("request.finished", "old")))
    tailer = RequestLogTailer(tmp_path, from_end=True)
    assert tailer.poll() == []
    with open(log, "a") as f:
        f.write(line(event("request.finished", "new")))
    assert [r.rid for r in tailer.poll()] == ["new"]
    assert [r.rid for r in read_request_log(log)] == ["old", "new"]


def test_backend_over_stub(stub, tmp_path):
    """SGLangBackend end to end against the stub: traffic from the log, teacher scores, draft push."""
    log = tmp_path / "requests" / "vm_0.log"
    log.parent.mkdir()
    log.write_text(line(event("request.finished", "r1", finished_ts=100.0))
                   + line(event("request.finished", "r2", finished_ts=200.0)))
    stub.on("GET", "/server_info", (200, {"log_requests_target": [str(log.parent)]}))
    stub.on("GET", "/model_info", (200, {"weight_version": "d7"}))
    lp = torch.log_softmax(torch.randn(7, 16), -1)
    stub.on("POST", "/generate", (200, scoring_answer([1, 2, 3], [4, 5, 6, 7], lp, k=3)))
    ok = {"success": True, "message": "Success"}
    for path in ("/begin_weight_update", "/update_weights_from_tensor", "/end_weight_update"):
        stub.on("POST", path, (200, ok))
    target = {"model.embed_tokens.weight": torch.randn(16, 4)}
    backend = SGLangBackend(SGLangClient(stub.url, timeout=5), teacher="topk", top_k=3, shared_with_target=target)
    assert backend.log_dir == str(log.parent)
    assert [r.rid for r in backend.finished_requests(0.0)] == ["r1", "r2"]
    assert [r.rid for r in backend.finished_requests(150.0)] == ["r2"]  # kept in memory, filtered by time
    t = backend.teacher_logits([1, 2, 3], [4, 5, 6, 7])
    assert isinstance(t, TeacherTopK) and t.ids.shape == (4, 3)
    backend.teacher = "token"
    assert isinstance(backend.teacher_logits([1, 2, 3], [4, 5, 6, 7]), TeacherTokenLogProbs)
    backend.push_draft_weights({"model.embed_tokens.weight": target["model.embed_tokens.weight"],
                                "model.layers.0.mlp.up_proj.weight": torch.randn(4, 4)}, "d8")
    assert stub.calls("/begin_weight_update") == [{"selector": "draft"}]
    body = stub.calls("/update_weights_from_tensor")[0]
    assert body["selector"] == "draft" and body["weight_version"] == "d8"
    assert backend.swaps[-1]["dropped"] == ["model.embed_tokens.weight"] and backend.swaps[-1]["sent"] == 1
    assert backend.draft_weight_version() == "d7"
    with pytest.raises(ValueError):
        backend.push_draft_weights({"model.embed_tokens.weight": target["model.embed_tokens.weight"]}, "d9")
