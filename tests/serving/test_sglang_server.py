"""Against a REAL SGLang 0.5.23 server on this CPU (the session fixture `sglang_server` in
conftest.py starts it with shared/sglang-cpu/serve.sh; skipped without the SGLang venv).

The test process is the project's python: it talks HTTP and compares with HF transformers
in-process. Tensor pushes are tested both ways: from this process (serialize_named_tensors'
fallback, no SGLang installed here) and from the server venv's python with SGLang's own
MultiprocessingSerializer (a subprocess running the same client module).
Speculative decoding cannot run on this CPU, so acceptance, spec_* meta_info and per-step plugin
events are not produced here (see test_sglang_plugin.py / test_sglang_request_log.py)."""
import json
import time

import pytest
import torch

from draftdistill.losses import TeacherTopK
from draftdistill.serving.request_log import RequestLogTailer
from draftdistill.serving.sglang_backend import SGLangBackend
from draftdistill.serving.sglang_client import SGLangClient, SGLangError, spec_metrics

TOL = 1e-3


@pytest.fixture(scope="module")
def hf(sglang_server):
    from transformers import AutoModelForCausalLM

    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # noqa: E731
    return load(sglang_server.model), load(sglang_server.model2)


@pytest.fixture
def client(sglang_server):
    return SGLangClient(sglang_server.url, timeout=120, retries=2, backoff=0.2)


def hf_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def ids_for(seed, n, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(4, vocab - 12, (n - 1,), generator=g).tolist()


def max_score_diff(client, model, prompt, response, k=5):
    s = client.score(prompt, response, top_k=k)
    rows = hf_logprobs(model, prompt + response)[len(prompt) - 1: -1]
    return (s.token.logprobs - rows.gather(1, torch.tensor(response)[:, None])[:, 0]).abs().max().item(), s


def test_startup_health_503_then_200(sglang_server):
    statuses = [s for s, _ in sglang_server.startup_statuses]
    assert statuses and statuses[-1] == 200, sglang_server.startup_statuses[-5:]
    if 503 not in statuses:
        pytest.skip("the server was never seen answering 503 (its starting window was too short to catch)")
    assert all(retryable for status, retryable in sglang_server.startup_statuses if status == 503)


def test_scoring_matches_hf(client, hf):
    model = hf[0]
    prompt, response = ids_for(0, 9), ids_for(1, 12)[1:]
    s = client.score(prompt, response, top_k=5, token_ids=[5, 6], hidden_states=True)
    with torch.no_grad():
        out = model(torch.tensor([prompt + response]), output_hidden_states=True)
    rows = torch.log_softmax(out.logits[0], -1)[len(prompt) - 1: -1]  # row j predicts response[j]
    assert s.token.token_ids.tolist() == response
    assert (s.token.logprobs - rows.gather(1, torch.tensor(response)[:, None])[:, 0]).abs().max() < TOL
    assert isinstance(s.top_k, TeacherTopK) and s.top_k.ids.tolist() == rows.topk(5).indices.tolist()
    assert (s.top_k.logprobs - rows.topk(5).values).abs().max() < TOL
    assert (s.token_ids_logprobs - rows[:, [5, 6]]).abs().max() < TOL
    # final-norm hidden states (HF hidden_states[-1]) at the positions that predict each response token
    assert s.hidden_states.shape == (len(response), model.config.hidden_size)
    assert (s.hidden_states - out.hidden_states[-1][0, len(prompt) - 1: -1]).abs().max() < TOL
    # a one-token prompt (logprob_start_len 0) and a repeated prompt (prefix-cache hit) score the same
    d, _ = max_score_diff(client, model, [1], response)
    assert d < TOL
    d, _ = max_score_diff(client, model, prompt, response)
    assert d < TOL


def test_greedy_rollout_equals_hf_argmax(client, hf):
    model = hf[0]
    prompts = [ids_for(2, 7), ids_for(3, 10)]
    outs = client.rollout(prompts, max_new_tokens=8, temperature=0.0, ignore_eos=True)
    for prompt, out in zip(prompts, outs):
        seq = list(prompt)
        for _ in range(8):
            seq.append(int(hf_logprobs(model, seq)[-1].argmax()))
        assert out.output_ids == seq[len(prompt):]
        lp = hf_logprobs(model, seq)[len(prompt) - 1: -1].gather(1, torch.tensor(out.output_ids)[:, None])[:, 0]
        assert (torch.tensor(out.logprobs) - lp).abs().max() < TOL
    sampled = client.rollout(prompts[0], max_new_tokens=6, temperature=1.0, seed=3, ignore_eos=True)
    assert len(sampled.output_ids) == 6


def test_tensor_update_target_selector_from_this_process(client, hf, sglang_server):
    """/begin -> /update_weights_from_tensor (selector target) -> /end, serialized without SGLang."""
    model1, model2 = hf
    prompt, response = ids_for(4, 8), ids_for(5, 9)[1:]
    names = ("lm_head.weight", "model.layers.0.self_attn.q_proj.weight")  # q_proj is stacked into qkv_proj
    new = {n: model2.get_parameter(n).detach() * 0.5 for n in names}
    try:
        t = time.perf_counter()
        client.push_weights(new, "t1", selector="target")
        push_seconds = time.perf_counter() - t
        expected = type(model1)(model1.config).eval()
        expected.load_state_dict(model1.state_dict())
        with torch.no_grad():
            for n, w in new.items():
                expected.get_parameter(n).copy_(w)
        d, s = max_score_diff(client, expected, prompt, response)
        assert d < TOL and s.weight_version == "t1" and client.weight_version() == "t1"
        assert max_score_diff(client, model1, prompt, response)[0] > 10 * TOL
        assert push_seconds < 30
    finally:
        client.update_weights_from_disk(str(sglang_server.model), "default")
    assert max_score_diff(client, model1, prompt, response)[0] < TOL


def test_tensor_update_with_sglang_serializer_in_server_venv(client, hf, sglang_server, in_venv):
    """The same push from the server venv's python, where MultiprocessingSerializer is SGLang's own."""
    model1, model2 = hf
    prompt, response = ids_for(6, 8), ids_for(7, 9)[1:]
    code = f'''
    import importlib.util, sys, types, torch
    # the client module without installing draftdistill into the server venv
    for name, path in (("draftdistill", "draftdistill"), ("draftdistill.losses", "draftdistill/losses")):
        m = types.ModuleType(name); m.__path__ = [path]; sys.modules[name] = m
    spec = importlib.util.spec_from_file_location("sglang_client", "serving/sglang_client.py")
    mod = importlib.util.module_from_spec(spec); sys.modules["sglang_client"] = mod; spec.loader.exec_module(mod)
    import sglang.srt.utils  # noqa: the real serializer is importable here
    from safetensors.torch import load_file
    w = load_file("{sglang_server.model2}/model.safetensors")
    c = mod.SGLangClient("{sglang_server.url}", timeout=120)
    print(c.push_weights({{"lm_head.weight": w["lm_head.weight"]}}, "t2", selector="target"))
    '''
    try:
        proc = in_venv(sglang_server.python, code, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Weight version updated to t2" in proc.stdout
        expected = type(model1)(model1.config).eval()
        expected.load_state_dict(model1.state_dict())
        with torch.no_grad():
            expected.lm_head.weight.copy_(model2.lm_head.weight)
        d, s = max_score_diff(client, expected, prompt, response)
        assert d < TOL and s.weight_version == "t2"
    finally:
        client.update_weights_from_disk(str(sglang_server.model), "default")


def test_disk_update_and_weight_version(client, hf, sglang_server):
    model1, model2 = hf
    prompt, response = ids_for(8, 6), ids_for(9, 7)[1:]
    try:
        client.update_weights_from_disk(str(sglang_server.model2), "v2")
        assert client.weight_version() == "v2" and client.model_info()["model_path"] == str(sglang_server.model2)
        assert max_score_diff(client, model2, prompt, response)[0] < TOL
    finally:
        client.update_weights_from_disk(str(sglang_server.model), "default")
    assert max_score_diff(client, model1, prompt, response)[0] < TOL


def test_backend_traffic_teacher_and_draft_push(client, hf, sglang_server):
    """SGLangBackend on the real server: request-log capture, TeacherTopK scores, and a push with
    selector "draft" (this server has no draft model: it answers success, leaves the target's
    outputs alone and reports the new weight version)."""
    model = hf[0]
    backend = SGLangBackend(client, top_k=4)  # log dir from /server_info
    assert backend.log_dir == str(sglang_server.log_dir)
    since = time.time() - 1
    prompt = ids_for(10, 6)
    out = client.rollout(prompt, max_new_tokens=5, temperature=0.0, ignore_eos=True, rid="traffic-1")
    client.score(prompt, out.output_ids, top_k=2)  # our own scoring: not traffic
    found = []
    for _ in range(50):  # the logger may flush a little later
        found = [r for r in backend.finished_requests(since) if r.rid == "traffic-1"]
        if found:
            break
        time.sleep(0.1)
    assert found, "request.finished for traffic-1 not in the request log"
    r = found[0]
    assert r.prompt_ids == prompt and r.output_ids == out.output_ids and r.weight_version == "default"
    assert r.verify_steps is None  # no speculative decoding on this CPU
    everything = backend.finished_requests(0.0)
    assert not any(x.rid.startswith(("HEALTH_CHECK", "draftdistill-score-")) for x in everything)
    t = backend.teacher_logits(prompt, out.output_ids)
    rows = hf_logprobs(model, prompt + out.output_ids)[len(prompt) - 1: -1]
    assert t.ids.tolist() == rows.topk(4).indices.tolist() and (t.logprobs - rows.topk(4).values).abs().max() < TOL
    try:
        backend.push_draft_weights({"lm_head.weight": torch.zeros_like(model.lm_head.weight)}, "d1")
        assert backend.draft_weight_version() == "d1"
        assert max_score_diff(client, model, prompt, out.output_ids)[0] < TOL  # the target is untouched
    finally:
        client.update_weights_from_disk(str(sglang_server.model), "default")
    tailer = RequestLogTailer(sglang_server.log_dir)
    assert any(x.rid == "traffic-1" for x in tailer.poll()) and tailer.counters["skipped"] >= 1  # health/warmup


def test_errors_are_sglang_errors_and_4xx_not_retried(sglang_server):
    delays = []
    c = SGLangClient(sglang_server.url, timeout=60, retries=3, sleep=delays.append)
    with pytest.raises(SGLangError) as info:  # outside begin/end: HTTP 400
        c.update_weights_from_tensor({"lm_head.weight": torch.zeros(2, 2)}, selector="target")
    assert info.value.status == 400 and "begin_weight_update" in info.value.message and delays == []
    with pytest.raises(SGLangError) as info:
        c.generate([1, 2], sampling_params={"max_new_tokens": -3})
    assert info.value.status == 400 and "max_new_tokens" in info.value.message and delays == []
    with pytest.raises(SGLangError) as info:
        c.update_weights_from_disk("/does/not/exist", "bad")
    assert not info.value.retryable
    assert c.weight_version() == "default" and c.health()


def test_metrics_and_plugin_loaded(client, sglang_server):
    samples = client.metrics()
    names = {s.name for s in samples}
    assert "sglang:num_requests_total" in names and "sglang:prompt_tokens_total" in names
    # the spec gauges are exported even without a speculative algorithm, as 0 (real SGLang 0.5.23)
    assert spec_metrics(samples) == {"accept_length": 0.0, "accept_rate": 0.0, "num_steps": 0.0,
                                     "num_draft_tokens": 0.0}
    # the server processes found the entry point through importlib.metadata and ran register()
    events = [json.loads(x) for x in sglang_server.events.read_text().splitlines()]
    loaded = [e for e in events if e["type"] == "plugin_loaded"]
    assert len({e["pid"] for e in loaded}) >= 2  # HTTP/tokenizer, scheduler, detokenizer processes
    assert all(e["hook"].endswith("EAGLEWorkerV2.verify") for e in loaded)
    assert not [e for e in events if e["type"] == "verify"]  # no speculative decoding here
    assert client.rollout([1, 2, 3], max_new_tokens=2, temperature=0.0).output_ids  # and serving works
