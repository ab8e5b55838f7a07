"""SGLangClient against a stub HTTP server (no SGLang needed): request/response shapes as SGLang
0.5.23 sends them (shared/sglang-cpu/README.md, observed on the real server), retries and backoff,
errors, metrics parsing, and the draft-selector weight push."""
import base64
import io
import math
import pickle
import random

import pytest
import torch

from draftdistill.losses import TeacherTokenLogProbs, TeacherTopK
from draftdistill.serving.sglang_client import (SCORING_RID_PREFIX, SGLangClient, SGLangError, drop_shared_tensors,
                                                parse_prometheus, spec_metrics)


def client(url, **kw):
    delays = []
    kw.setdefault("retries", 3)
    c = SGLangClient(url, timeout=5, backoff=0.1, max_backoff=0.4, sleep=delays.append, rng=random.Random(0), **kw)
    return c, delays


def scoring_answer(prompt, response, lp, k=3, token_ids=(5, 6)):
    """The meta_info SGLang returns for logprob_start_len = len(prompt) - 1, from log-probs lp
    [len(prompt+response), V] (lp[i] = distribution after ids[:i+1])."""
    ids = prompt + response
    start = len(prompt) - 1
    tok, top, req = [[None, ids[start], None]], [None], [None]
    for i in range(start + 1, len(ids)):
        row = lp[i - 1]
        tok.append([row[ids[i]].item(), ids[i], None])
        v, ix = row.topk(k)
        top.append([[a.item(), b.item(), None] for a, b in zip(v, ix)])
        req.append([[row[t].item(), t, None] for t in token_ids])
    return {"text": "", "output_ids": [], "meta_info": {
        "id": "x", "finish_reason": {"type": "length", "length": 0}, "prompt_tokens": len(ids),
        "completion_tokens": 0, "cached_tokens": 0, "weight_version": "v3",
        "weight_versions": [{"version": "v3", "start": 0, "end": 0}],
        "input_token_logprobs": tok, "input_top_logprobs": top, "input_token_ids_logprobs": req,
        "output_token_logprobs": [], "output_top_logprobs": [[]], "e2e_latency": 0.01}}


def test_score_offsets_and_teacher_objects(stub):
    torch.manual_seed(0)
    prompt, response = [1, 7, 9, 4], [11, 3, 8]
    lp = torch.log_softmax(torch.randn(len(prompt + response), 16), -1)
    stub.on("POST", "/generate", (200, scoring_answer(prompt, response, lp)))
    c, _ = client(stub.url)
    s = c.score(prompt, response, top_k=3, token_ids=[5, 6])
    body = stub.calls("/generate")[0]
    assert body["input_ids"] == prompt + response
    assert body["logprob_start_len"] == len(prompt) - 1  # the off-by-one
    assert body["sampling_params"]["max_new_tokens"] == 0 and body["return_logprob"] is True
    assert body["top_logprobs_num"] == 3 and body["token_ids_logprob"] == [5, 6]
    assert body["rid"].startswith(SCORING_RID_PREFIX)  # request_log.py skips our own scoring
    rows = lp[len(prompt) - 1: -1]  # row j predicts response[j]
    assert isinstance(s.token, TeacherTokenLogProbs) and isinstance(s.top_k, TeacherTopK)
    assert s.token.token_ids.tolist() == response
    torch.testing.assert_close(s.token.logprobs, rows.gather(1, torch.tensor(response)[:, None])[:, 0])
    assert s.top_k.ids.tolist() == rows.topk(3).indices.tolist()
    torch.testing.assert_close(s.top_k.logprobs, rows.topk(3).values)
    torch.testing.assert_close(s.token_ids_logprobs, rows[:, [5, 6]])
    assert s.weight_version == "v3" and s.top_k.ids.dtype == torch.long


def test_score_misalignment_is_an_error(stub):
    lp = torch.log_softmax(torch.randn(6, 16), -1)
    answer = scoring_answer([1, 2, 3], [4, 5, 6], lp)
    answer["meta_info"]["input_token_logprobs"][2][1] = 9  # the server scored another token
    stub.on("POST", "/generate", (200, answer))
    c, _ = client(stub.url)
    with pytest.raises(SGLangError, match="do not match"):
        c.score([1, 2, 3], [4, 5, 6], top_k=3)
    short = scoring_answer([1, 2, 3], [4, 5, 6], lp)
    short["meta_info"]["input_token_logprobs"] = short["meta_info"]["input_token_logprobs"][1:]  # no null entry
    stub.on("POST", "/generate", (200, short))
    with pytest.raises(SGLangError, match="expected 4"):
        c.score([1, 2, 3], [4, 5, 6], top_k=3)
    with pytest.raises(ValueError):
        c.score([], [4], top_k=3)
    assert c.score([1], [], top_k=3).token.logprobs.numel() == 0  # nothing to score, no request
    assert len(stub.calls("/generate")) == 2


def test_hidden_states_alignment(stub):
    # SGLang returns one hidden state per computed prompt position (here 2 came from the cache)
    prompt, response, H = [1, 2, 3, 4], [5, 6], 3
    n = len(prompt + response)
    states = [[float(p)] * H for p in range(2, n)]  # position p -> [p, p, p]
    lp = torch.log_softmax(torch.randn(n, 8), -1)
    answer = scoring_answer(prompt, response, lp, k=2)
    answer["meta_info"]["hidden_states"] = [states, [0.0] * H]  # prefill block, then the 1 generated token
    stub.on("POST", "/generate", (200, answer))
    c, _ = client(stub.url)
    s = c.score(prompt, response, top_k=2, hidden_states=True)
    body = stub.calls("/generate")[0]
    assert body["return_hidden_states"] is True and body["sampling_params"]["max_new_tokens"] == 1
    assert s.hidden_states[:, 0].tolist() == [3.0, 4.0]  # positions P-1, P: predict response[0], [1]


def test_rollout_single_and_batch(stub):
    one = {"text": "ab", "output_ids": [4, 5], "meta_info": {"weight_version": "default",
           "output_token_logprobs": [[-0.5, 4, None], [-1.5, 5, None]]}}
    stub.on("POST", "/generate", (200, one), (200, [one, one]))
    c, _ = client(stub.url)
    r = c.rollout([1, 2, 3], max_new_tokens=2, temperature=0.0, seed=7, stop_token_ids=[2])
    assert r.output_ids == [4, 5] and r.logprobs == [-0.5, -1.5] and r.weight_version == "default"
    sp = stub.calls("/generate")[0]["sampling_params"]
    assert sp["max_new_tokens"] == 2 and sp["temperature"] == 0.0 and sp["sampling_seed"] == 7
    assert sp["stop_token_ids"] == [2]
    batch = c.rollout([[1, 2], [3, 4]], max_new_tokens=2)
    assert [b.output_ids for b in batch] == [[4, 5], [4, 5]]
    with pytest.raises(ValueError):
        c.generate()


def test_5xx_retried_with_backoff_then_succeeds(stub):
    stub.on("GET", "/model_info", (503, {"detail": "starting"}), (500, "boom"), (200, {"weight_version": "v1"}))
    c, delays = client(stub.url, retries=3)
    assert c.weight_version() == "v1"
    assert len(stub.requests) == 3 and len(delays) == 2
    assert 0.05 <= delays[0] <= 0.1 and 0.1 <= delays[1] <= 0.2  # d/2 + U(0, d/2), d = 0.1 * 2**i


def test_5xx_gives_up_after_retries(stub):
    stub.on("POST", "/generate", (502, {"error": {"message": "bad gateway"}}))
    c, delays = client(stub.url, retries=2)
    with pytest.raises(SGLangError) as info:
        c.generate([1, 2], sampling_params={"max_new_tokens": 1})
    e = info.value
    assert e.status == 502 and e.retryable and e.attempts == 3 and e.endpoint == "POST /generate"
    assert "bad gateway" in str(e) and len(stub.requests) == 3
    assert delays == sorted(delays) and max(delays) <= 0.4  # capped at max_backoff


@pytest.mark.parametrize("body, message", [
    ({"error": {"message": "max_new_tokens must be at least 0, got -3."}}, "max_new_tokens must be at least 0"),
    ({"success": False, "message": "update_weights_from_tensor must run between begin_weight_update() and "
      "end_weight_update()"}, "must run between"),
    ({"object": "error", "message": "2 validation errors"}, "2 validation errors"),
])
def test_4xx_never_retried(stub, body, message):
    stub.on("POST", "/generate", (400, body))
    c, delays = client(stub.url, retries=5)
    with pytest.raises(SGLangError, match=message) as info:
        c.generate([1], sampling_params={"max_new_tokens": -3})
    assert info.value.status == 400 and not info.value.retryable and info.value.attempts == 1
    assert len(stub.requests) == 1 and delays == []


def test_dead_port_is_retried_and_raises():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    c, delays = client(f"http://127.0.0.1:{port}", retries=2)
    with pytest.raises(SGLangError) as info:
        c.model_info()
    assert info.value.status is None and info.value.retryable and info.value.attempts == 3
    assert "Refused" in info.value.message or "refused" in info.value.message
    assert len(delays) == 2
    assert c.health() is False  # health never raises


def test_health_503_then_200(stub):
    stub.on("GET", "/health", (503, ""), (200, ""))
    c, delays = client(stub.url)
    assert c.health() is False and c.health() is True
    assert delays == []  # health() does not retry


def test_success_false_is_an_error(stub):
    stub.on("POST", "/update_weights_from_disk", (200, {"success": False, "message": "file not found"}))
    c, _ = client(stub.url)
    with pytest.raises(SGLangError, match="file not found"):
        c.update_weights_from_disk("/nope", "v2")
    assert stub.calls("/update_weights_from_disk") == [{"model_path": "/nope", "flush_cache": True,
                                                        "abort_all_requests": False, "weight_version": "v2"}]


def _unpickle_payload(b64: str):
    # the receiving side: what SGLang's MultiprocessingSerializer.deserialize does (pickle load;
    # torch rebuilds the shared-memory tensors)
    import torch.multiprocessing  # noqa: F401 - registers the tensor reductions
    return pickle.load(io.BytesIO(base64.b64decode(b64)))


def test_push_weights_draft_selector_shapes(stub):
    ok = {"success": True, "message": "Success"}
    stub.on("POST", "/begin_weight_update", (200, ok))
    received = []

    def update(body):  # unpickled while the client waits for the answer, as the server does
        received.extend((n, t.clone()) for n, t in _unpickle_payload(body["serialized_named_tensors"][0]))
        return {"success": True, "message": "Success Weight version updated to d2."}

    stub.on("POST", "/update_weights_from_tensor", (200, update))
    stub.on("POST", "/end_weight_update", (200, ok))
    c, _ = client(stub.url)
    w = {"model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4), "model.norm.weight": torch.ones(4)}
    before = {k: v.clone() for k, v in w.items()}
    c.push_weights(w, "d2", selector="draft")
    assert [p for _, p, _ in stub.requests] == ["/begin_weight_update", "/update_weights_from_tensor",
                                                "/end_weight_update"]
    assert stub.calls("/begin_weight_update") == [{"selector": "draft"}]
    assert stub.calls("/end_weight_update") == [{}]
    body = stub.calls("/update_weights_from_tensor")[0]
    assert body["selector"] == "draft" and body["weight_version"] == "d2" and body["flush_cache"] is True
    assert isinstance(body["serialized_named_tensors"], list) and len(body["serialized_named_tensors"]) == 1
    assert [n for n, _ in received] == list(w)
    for n, t in received:
        torch.testing.assert_close(t, before[n])
    assert all(not v.is_shared() for v in w.values())  # the caller's tensors were not moved to shm
    with pytest.raises(ValueError):
        c.push_weights(w, "x", selector="drafts")


def test_push_weights_closes_session_when_update_fails(stub):
    ok = {"success": True, "message": "Success"}
    stub.on("POST", "/begin_weight_update", (200, ok))
    stub.on("POST", "/update_weights_from_tensor", (500, {"success": False, "message": "load failed"}))
    stub.on("POST", "/end_weight_update", (200, ok))
    c, delays = client(stub.url)
    with pytest.raises(SGLangError, match="load failed") as info:
        c.push_weights({"w": torch.zeros(2)}, "d3")
    assert info.value.endpoint == "POST /update_weights_from_tensor"
    assert len(stub.calls("/update_weights_from_tensor")) == 1  # a weight update is never retried
    assert len(stub.calls("/end_weight_update")) == 1 and delays == []


def test_drop_shared_tensors():
    target = {"model.embed_tokens.weight": torch.randn(8, 4), "lm_head.weight": torch.randn(8, 4),
              "model.layers.0.mlp.up_proj.weight": torch.randn(4, 4)}
    draft = {"model.embed_tokens.weight": target["model.embed_tokens.weight"],  # the same object
             "lm_head.weight": target["lm_head.weight"][:],  # a view of the same storage
             "model.layers.0.mlp.up_proj.weight": target["model.layers.0.mlp.up_proj.weight"] + 1,
             "model.norm.weight": torch.ones(4)}
    keep, dropped = drop_shared_tensors(draft, target)
    assert sorted(dropped) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert sorted(keep) == ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"]
    equal = {"model.layers.0.mlp.up_proj.weight": target["model.layers.0.mlp.up_proj.weight"].clone()}
    assert drop_shared_tensors(equal, target)[0] == {}  # equal values: the same tensor as served
    keep, dropped = drop_shared_tensors(draft, None, drop_tied=True)  # no target at hand
    assert sorted(dropped) == ["lm_head.weight", "model.embed_tokens.weight"]


METRICS = '''# HELP sglang:spec_accept_length Mean acceptance length of speculative decoding.
# TYPE sglang:spec_accept_length gauge
sglang:spec_accept_length{engine_type="unified",model_name="m",moe_ep_rank="0",pp_rank="0",tp_rank="0"} 2.5
sglang:spec_accept_length{engine_type="unified",model_name="m",moe_ep_rank="0",pp_rank="0",tp_rank="1"} 3.5
# TYPE sglang:spec_accept_rate gauge
sglang:spec_accept_rate{model_name="m"} 0.625
sglang:spec_num_draft_tokens{model_name="m"} 4.0
sglang:time_to_first_token_seconds_bucket{le="0.001",model_name="m"} 0.0
sglang:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 7.0
sglang:http_requests_total{endpoint="/generate",method="POST"} 5.0 1700000000000
sglang:odd{path="a \\"quoted\\" \\\\ value",other="x,y"} NaN
weird line without value
sglang:no_labels 1e+06
'''


def test_parse_prometheus_and_spec_metrics(stub):
    samples = parse_prometheus(METRICS)
    names = [s.name for s in samples]
    assert names.count("sglang:spec_accept_length") == 2 and "sglang:no_labels" in names
    bucket = [s for s in samples if s.name.endswith("_bucket") and s.labels["le"] == "+Inf"][0]
    assert bucket.value == 7.0
    odd = [s for s in samples if s.name == "sglang:odd"][0]
    assert odd.labels == {"path": 'a "quoted" \\ value', "other": "x,y"} and math.isnan(odd.value)
    assert [s for s in samples if s.name == "sglang:http_requests_total"][0].value == 5.0  # timestamp ignored
    assert spec_metrics(samples) == {"accept_length": 3.0, "accept_rate": 0.625, "num_draft_tokens": 4.0}
    stub.on("GET", "/metrics", (200, METRICS))
    c, _ = client(stub.url)
    assert c.spec_metrics()["accept_length"] == 3.0
