import json
import urllib.error
import urllib.request

import pytest
import torch
from safetensors.torch import save_file

from draftdistill.models import build_small_drafter
from draftdistill.spec import SamplingConfig, TreeConfig, target_generate
from serving_helpers import make_engine
from draftdistill.serving.backend import FinishedRequest
from draftdistill.serving.http_api import make_http_server, serve_in_thread
from draftdistill.serving.online import OnlineConfig, OnlineDistiller

PROMPTS = [[1, 5 + i % 7, 9 + i % 5, 3 + i % 11] for i in range(40)]


def greedy(engine, prompt, n=8):
    out, _ = target_generate(engine.target, torch.tensor([prompt]), n, SamplingConfig(temperature=0.0), None, None)
    return out.tolist()


def test_completions_are_the_targets_greedy_output_before_and_after_a_swap():
    engine = make_engine()
    expected = [greedy(engine, p) for p in PROMPTS[:4]]
    before = [engine.complete(p, 8, temperature=0.0).output_ids for p in PROMPTS[:4]]
    random_weights = build_small_drafter(engine.target, seed=7, layers=1, hidden=16, heads=2, kv_heads=1,
                                         intermediate=32).state_dict()
    with pytest.raises(ValueError, match="shape"):
        engine.push_draft_weights(random_weights, "wrong-architecture")
    with pytest.raises(ValueError, match="not parameters of the serving drafter"):
        engine.push_draft_weights({"model.layers.5.mlp.up_proj.weight": torch.zeros(1)}, "wrong-names")
    assert engine.draft_weight_version() == "v0"
    noisy = {k: v + 0.5 * torch.randn_like(v) for k, v in engine.drafter.state_dict().items()}
    engine.push_draft_weights(noisy, "v1")
    after = [engine.complete(p, 8, temperature=0.0) for p in PROMPTS[:4]]
    assert before == expected == [r.output_ids for r in after]
    assert {r.weight_version for r in after} == {"v1"} and engine.swaps[-1]["version"] == "v1"
    assert all(r.accept_length is not None and 1 <= r.accept_length <= engine.gamma + 1 for r in after)


def test_a_tree_drafting_server_serves_the_same_greedy_outputs():
    engine = make_engine()
    engine.tree = TreeConfig(depth=3, top_k=2, max_nodes=6)
    served = [engine.complete(p, 8, temperature=0.0) for p in PROMPTS[:4]]
    assert [r.output_ids for r in served] == [greedy(engine, p) for p in PROMPTS[:4]]
    assert all(1 <= r.accept_length <= 4 for r in served) and served[0].meta["spec"]["drafts_scored"] > 0


def post(url, body):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_http_api_completions_health_metrics_and_safetensors_only_weight_control(tmp_path):
    engine = make_engine()
    server = make_http_server(engine)
    serve_in_thread(server)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        reply = post(url + "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0})
        assert reply["choices"][0]["token_ids"] == greedy(engine, PROMPTS[0], 6)
        assert reply["usage"]["completion_tokens"] == 6 and reply["draftdistill"]["weight_version"] == "v0"
        text = post(url + "/v1/completions", {"prompt": "w1 w2 w3", "max_tokens": 3, "temperature": 1.0, "seed": 1})
        assert text["usage"]["completion_tokens"] <= 3
        assert json.loads(urllib.request.urlopen(url + "/health").read())["status"] == "ok"
        metrics = urllib.request.urlopen(url + "/metrics").read().decode()
        assert "draftdistill_requests_total 2" in metrics and 'version="v0"' in metrics

        weights = {k: v.clone() for k, v in engine.drafter.state_dict().items() if k != "lm_head.weight"}
        save_file(weights, tmp_path / "drafter.safetensors")
        assert post(url + "/control/weights", {"path": str(tmp_path / "drafter.safetensors"), "version": "v9"}) \
            == {"success": True, "weight_version": "v9"}
        (tmp_path / "evil.pt").write_bytes(b"not a safetensors file")
        with pytest.raises(urllib.error.HTTPError) as refused:
            post(url + "/control/weights", {"path": str(tmp_path / "evil.pt")})
        assert refused.value.code == 400 and engine.draft_weight_version() == "v9"
        with pytest.raises(urllib.error.HTTPError) as bad:
            post(url + "/v1/completions", {"prompt": {"not": "a prompt"}})
        assert bad.value.code == 400
    finally:
        server.shutdown()


def serve(engine, prompts, n=6):
    return [engine.complete(p, n, temperature=0.0) for p in prompts]


def test_online_distiller_raises_accept_length_and_keeps_the_version():
    torch.manual_seed(0)
    engine = make_engine(random_drafter=True)
    cfg = OnlineConfig(lr=1e-2, batch_size=8, update_every=8, steps_per_update=25, window=8, divergence="fkl")
    distiller = OnlineDistiller(engine, engine.drafter, cfg)
    serve(engine, PROMPTS[:8], n=12)
    frozen = distiller.reference_window()
    assert distiller.step()["pushed"] == "v1" and engine.draft_weight_version() == "v1"
    served = serve(engine, PROMPTS[:8], n=12)  # the same traffic again, now with v1
    assert distiller.step() == {} and distiller.history[-1]["decision"] == "keep"
    before = sum(len(r.output_ids) for r in frozen) / sum(r.verify_steps for r in frozen)
    after = sum(len(r.output_ids) for r in served) / sum(r.verify_steps for r in served)
    assert after > before + 1.0, (before, after)
    assert [r.output_ids for r in served] == [r.output_ids for r in frozen]  # lossless across the swap


def test_a_worse_version_is_rolled_back_and_outputs_never_change():
    engine = make_engine(drafter_layers=1)  # the pruned drafter already agrees: scrambling it hurts
    distiller = OnlineDistiller(engine, engine.drafter, OnlineConfig(window=6, update_every=6, steps_per_update=1))
    reference = serve(engine, PROMPTS[:6])
    original = {k: v.clone() for k, v in engine.drafter.state_dict().items()}
    with torch.no_grad():  # a deliberately bad update: scramble the trainable copy, then push it
        for p in distiller.drafter.parameters():
            p.copy_(torch.randn_like(p) * 3)
    distiller.push()
    bad = serve(engine, PROMPTS[:6])
    assert distiller.judge(distiller.reference_window()) == "rollback"
    assert engine.draft_weight_version() == "v0-restored-1" and distiller.counters["rollbacks"] == 1
    assert all(torch.equal(engine.drafter.state_dict()[k], original[k]) for k in original)
    assert all(torch.equal(distiller.drafter.state_dict()[k], original[k]) for k in original)
    again = serve(engine, PROMPTS[:6])
    assert [r.output_ids for r in reference] == [r.output_ids for r in bad] == [r.output_ids for r in again]


class FlakyBackend:
    """Wraps an engine; teacher scoring fails the first `failures` times (a server going away)."""

    def __init__(self, engine, failures):
        self.engine, self.failures = engine, failures

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def teacher_logits(self, prompt_ids, response_ids):
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("teacher server unreachable")
        return self.engine.teacher_logits(prompt_ids, response_ids)


def test_a_failing_teacher_never_crashes_the_distiller():
    engine = make_engine(drafter_layers=1)
    distiller = OnlineDistiller(FlakyBackend(engine, failures=1), engine.drafter,
                                OnlineConfig(update_every=4, steps_per_update=1, window=4))
    serve(engine, PROMPTS[:4])
    assert "teacher server unreachable" in distiller.step()["error"] and distiller.counters["errors"] == 1
    assert engine.draft_weight_version() == "v0"  # nothing half-pushed
    serve(engine, PROMPTS[4:8])
    assert distiller.step()["pushed"] == "v1"


def test_buffer_is_bounded_and_stale_examples_are_dropped():
    engine = make_engine(drafter_layers=1)
    distiller = OnlineDistiller(engine, engine.drafter, OnlineConfig(buffer_size=5, max_staleness=1))
    serve(engine, PROMPTS[:7])
    assert distiller.poll() == 5 and distiller.counters["refused_full"] == 2
    distiller.indices.update({"v1": 1, "v2": 2})  # two updates later, v0's examples are 2 versions old
    distiller.buffer[0] = FinishedRequest("new", PROMPTS[0], [4, 5], weight_version="v2", verify_steps=1)
    assert [r.rid for r in distiller._fresh_examples()] == ["new"] and distiller.counters["dropped_stale"] == 4


def test_osd_rejected_only_update_trains_and_pushes():
    engine = make_engine(random_drafter=True)
    distiller = OnlineDistiller(engine, engine.drafter, OnlineConfig(rejected_only=True, update_every=4,
                                                                     steps_per_update=2, lr=1e-2))
    serve(engine, PROMPTS[:4])
    metrics = distiller.step()
    assert metrics["pushed"] == "v1" and metrics["loss"] > 0
