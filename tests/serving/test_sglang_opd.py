"""The OPD trainer against a REAL SGLang 0.5.23 server on this CPU (fixture `sglang_server`,
skipped without the SGLang venv): the server as a teacher pool (SGLangScorer) and as the student's
rollout engine (SGLangSampler with weight sync), checked against the in-process teacher/student."""
import json

import pytest
import torch

from draftdistill.opd import LocalScorer, OPDConfig, SGLangSampler, SGLangScorer, train_opd
from draftdistill.serving.sglang_client import SGLangClient
from draftdistill.train.checkpoint import load_weights

TOL = 1e-3


@pytest.fixture(scope="module")
def models(sglang_server):
    from transformers import AutoModelForCausalLM

    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # noqa: E731
    return load(sglang_server.model), load(sglang_server.model2)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("opd_prompts") / "p.jsonl"
    rows = [{"question": f"what is {i} + {i + 3}?", "answer": f"{i} + {i + 3} = {2 * i + 3}. #### {2 * i + 3}"}
            for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def restore(sglang_server):
    SGLangClient(sglang_server.url, timeout=120).update_weights_from_disk(str(sglang_server.model), "default")


def test_scorer_pool_matches_the_in_process_teacher(sglang_server, models):
    teacher = models[0]
    prompts = [[1, 50, 60, 70], [1, 80], [1, 90, 91, 92, 93, 94]]
    responses = [[100, 101, 102, 2], [103], [104, 105]]
    local = LocalScorer(teacher, pad_id=3).score(prompts, responses, {"topk"}, 5, 1.0)
    # The same server twice: a pool of two, rows spread round-robin and sent concurrently.
    pool = SGLangScorer(f"{sglang_server.url},{sglang_server.url}/")
    served = pool.score(prompts, responses, {"topk"}, 5, 1.0)
    for row, response in enumerate(responses):
        n = len(response)  # padding ids differ (pad vs 0); only response positions count
        assert served.token.token_ids[row, :n].tolist() == response
        assert (served.token.logprobs[row, :n] - local.token.logprobs[row, :n]).abs().max() < TOL
        assert served.topk.ids[row, :n].tolist() == local.topk.ids[row, :n].tolist()
        assert (served.topk.logprobs[row, :n] - local.topk.logprobs[row, :n]).abs().max() < TOL
    with pytest.raises(ValueError, match="full logits"):
        pool.score(prompts, responses, {"logits"}, 5, 1.0)
    with pytest.raises(ValueError, match="loss_temperature=1"):
        pool.score(prompts, responses, {"topk"}, 5, 0.5)


def test_sampler_logprobs_stops_and_weight_sync(sglang_server, models):
    model0, model1 = models
    prompt = [1, 50, 60, 70, 80]
    try:
        # The rollout log-probs are log_softmax(logits / T) at the request's T (0.7 here).
        def at_07(c):
            ids = torch.tensor([prompt + c.tokens])
            with torch.no_grad():
                logp = torch.log_softmax(model0(ids).logits[0, len(prompt) - 1: -1] / 0.7, -1)
            return logp.gather(1, torch.tensor(c.tokens)[:, None])[:, 0]

        sampler = SGLangSampler(sglang_server.url, eos_ids=[2], temperature=0.7)
        completions = sampler.sample([prompt, prompt], 24, torch.Generator().manual_seed(0))
        for c in completions:
            want = at_07(c)
            assert len(c.logprobs) == len(c.tokens) and (torch.tensor(c.logprobs) - want).abs().max() < TOL
            assert c.loss_logprobs is None  # T 0.7 log-probs are not the loss distribution's at loss_temperature 1
        # With top-p they are still log_softmax(logits / T), taken before the nucleus cut: the loss
        # distribution's when T = loss_temperature (what opd.objectives.check_importance_sampling assumes).
        nucleus = SGLangSampler(sglang_server.url, eos_ids=[2], temperature=0.7, top_p=0.5, loss_temperature=0.7)
        for c in nucleus.sample([prompt, prompt], 24, torch.Generator().manual_seed(0)):
            assert (torch.tensor(c.loss_logprobs) - at_07(c)).abs().max() < TOL
        # A stop token ends the completion and is kept in it, as LocalSampler does.
        stopping = SGLangSampler(sglang_server.url, eos_ids=list(range(3, 512)))
        (c,) = stopping.sample([prompt], 10, torch.Generator().manual_seed(0))
        assert len(c.tokens) == 1 and c.finished and len(c.logprobs) == 1
        # sync pushes the whole model (selector target): greedy rollouts now follow model1.
        greedy = SGLangSampler(sglang_server.url, eos_ids=[2], temperature=0.0)
        greedy.sync(model1, 7)
        (c,) = greedy.sample([prompt], 8, torch.Generator().manual_seed(0))
        seq = list(prompt)
        for _ in range(len(c.tokens)):
            with torch.no_grad():
                seq.append(int(model1(torch.tensor([seq])).logits[0, -1].argmax()))
        assert c.tokens == seq[len(prompt):] and greedy.version == "7"
        with torch.no_grad():  # greedy rollouts' log-probs are the raw logits' (T = 1)
            logp = torch.log_softmax(model1(torch.tensor([seq])).logits[0, len(prompt) - 1: -1], -1)
        want = logp.gather(1, torch.tensor(c.tokens)[:, None])[:, 0]
        assert (torch.tensor(c.loss_logprobs) - want).abs().max() < TOL
    finally:
        restore(sglang_server)


def config(sglang_server, prompts, out, **kw):
    base = dict(student=str(sglang_server.model2), teacher=str(sglang_server.model), prompts=str(prompts),
                objective="divergence", divergence="topk_tail:k=5,base=jsd", teacher_scores="topk",
                max_new_tokens=6, batch_size=2, steps=3, save_every=3, lr=1e-2, warmup_steps=1,
                out_dir=str(out), device="cpu")
    return OPDConfig(**{**base, **kw})


def test_opd_with_a_served_teacher_equals_the_in_process_teacher(sglang_server, prompts, tmp_path):
    # Student rollouts in-process (seeded, so both runs sample the same tokens while the weights
    # agree); only where the teacher scores come from differs.
    train_opd(config(sglang_server, prompts, tmp_path / "local"), progress=False)
    train_opd(config(sglang_server, prompts, tmp_path / "served", teacher_servers=sglang_server.url), progress=False)
    rows = {name: [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("local", "served")}
    assert len(rows["served"]) == 3
    for a, b in zip(rows["local"], rows["served"]):
        assert a["response_tokens"] == b["response_tokens"] and a["teacher_tokens"] == b["teacher_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-4)
    with pytest.raises(ValueError, match="teacher_scores=topk or token"):
        train_opd(config(sglang_server, prompts, tmp_path / "bad", teacher_servers=sglang_server.url,
                         teacher_scores="logits", divergence="jsd"), progress=False)


def test_opd_with_server_rollouts_keeps_the_server_on_policy(sglang_server, prompts, tmp_path, models):
    try:
        summary = train_opd(config(sglang_server, prompts, tmp_path / "rollouts", rollout_server=sglang_server.url,
                                   objective="opd", teacher_scores="token"), progress=False)
        rows = [json.loads(l) for l in (tmp_path / "rollouts" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3] and all(r["rollout_tokens"] > 0 for r in rows)
        client = SGLangClient(sglang_server.url, timeout=120)
        assert client.weight_version() == "3"
        # After the last step the server holds exactly the trained student: its scores equal the
        # checkpoint's in-process scores.
        student = type(models[1])(models[1].config).eval()
        load_weights(tmp_path / "rollouts" / "checkpoint", student)
        prompt, response = [1, 50, 60, 70], [100, 101, 102]
        local = LocalScorer(student, pad_id=3).score([prompt], [response], set(), 1, 1.0)
        served = client.score(prompt, response, top_k=0)
        assert (served.token.logprobs - local.token.logprobs[0]).abs().max() < TOL
        assert summary["steps"] == 3
    finally:
        restore(sglang_server)


def test_server_rollouts_under_torchrun_keep_the_server_on_policy(sglang_server, prompts, tmp_path, models):
    """Two ranks sample from the server; after every step rank 0 pushes the gathered (FSDP-sharded)
    student and both ranks wait for it, so the server ends holding exactly the trained student."""
    import os
    import subprocess
    import sys
    from dataclasses import asdict
    from pathlib import Path

    import yaml

    out = tmp_path / "torchrun"
    cfg = config(sglang_server, prompts, out, rollout_server=sglang_server.url, objective="opd",
                 teacher_scores="token", batch_size=1)
    path = tmp_path / "torchrun.yaml"
    path.write_text(yaml.safe_dump(asdict(cfg)))
    root = Path(__file__).parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "draftdistill.cli", "opd", str(path), "--quiet"],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3] and all(r["rollout_tokens"] > 0 for r in rows)
        client = SGLangClient(sglang_server.url, timeout=120)
        assert client.weight_version() == "3"
        student = type(models[1])(models[1].config).eval()
        load_weights(out / "checkpoint", student)  # the 2-rank (DCP) checkpoint, read in one process
        prompt, response = [1, 50, 60, 70], [100, 101, 102]
        local = LocalScorer(student, pad_id=3).score([prompt], [response], set(), 1, 1.0)
        served = client.score(prompt, response, top_k=0)
        assert (served.token.logprobs - local.token.logprobs[0]).abs().max() < TOL
    finally:
        restore(sglang_server)


# ---- failing servers (stub HTTP server, no SGLang needed) ----

def dead_url() -> str:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there


def quick_pool(scorer, urls, waits):
    """No client-level retries and recorded (not slept) waits, so the pool's own policy shows."""
    scorer.pool.clients = [SGLangClient(u, timeout=5, retries=0) for u in urls]
    scorer.pool.sleep = waits.append
    return scorer


def test_pool_fails_over_and_waits_for_a_restarting_server(stub):
    answer = {"text": "", "output_ids": [], "meta_info": {
        "input_token_logprobs": [[None, 7, None], [-0.5, 8, None], [-1.5, 9, None]]}}
    stub.on("POST", "/generate", (200, answer))
    waits = []
    scorer = quick_pool(SGLangScorer("http://unused"), [dead_url(), stub.url], waits)
    scores = scorer.score([[1, 7]] * 3, [[8, 9]] * 3, {"token"}, 0, 1.0)  # rows 0 and 2 start on the dead one
    assert scores.token.logprobs.tolist() == [[-0.5, -1.5]] * 3 and waits == [] and len(stub.calls("/generate")) == 3
    # One server, answering 503 twice (restarting), then fine: the step waits instead of failing.
    stub.on("POST", "/generate", (503, {"detail": "starting"}), (503, {"detail": "starting"}), (200, answer))
    waits = []
    scorer = quick_pool(SGLangScorer("http://unused"), [stub.url], waits)
    assert scorer.score([[1, 7]], [[8, 9]], {"token"}, 0, 1.0).token.logprobs.tolist() == [[-0.5, -1.5]]
    assert waits == [1.0, 2.0]
    # A refused request (4xx) is not waited for; a server down past `patience` stops the step.
    from draftdistill.serving.sglang_client import SGLangError

    stub.on("POST", "/generate", (400, {"detail": "bad input_ids"}))
    with pytest.raises(SGLangError, match="bad input_ids"):
        quick_pool(SGLangScorer("http://unused"), [stub.url], []).score([[1, 7]], [[8, 9]], {"token"}, 0, 1.0)
    scorer = quick_pool(SGLangScorer("http://unused", patience=5), [dead_url()], waits := [])
    with pytest.raises(SGLangError, match="patience"):
        scorer.score([[1, 7]], [[8, 9]], {"token"}, 0, 1.0)
    assert waits == [1.0, 2.0]  # 1 + 2 s waited; the next (4 s) would pass the 5 s of patience


def test_sampler_pushes_to_every_server_of_its_pool_and_never_fails_over(stub, stub2):
    from transformers import LlamaConfig, LlamaForCausalLM

    from draftdistill.serving.sglang_client import SGLangError

    ok = {"success": True, "message": "Success"}
    for server in (stub, stub2):
        for path in ("/begin_weight_update", "/update_weights_from_tensor", "/end_weight_update"):
            server.on("POST", path, (200, ok))
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, tie_word_embeddings=True))
    SGLangSampler([stub.url, stub2.url], eos_ids=[2], start=1).sync(model, 5)
    for server in (stub, stub2):
        assert [b["weight_version"] for b in server.calls("/update_weights_from_tensor")] == ["5"]
    # A dead server of the pool gets waited for (up to patience); another server never takes its push.
    waits = []
    sampler = quick_pool(SGLangSampler("http://unused", eos_ids=[2], patience=2), [dead_url(), stub.url], waits)
    with pytest.raises(SGLangError, match="patience"):
        sampler.sync(model, 6)
    assert waits == [1.0] and len(stub.calls("/update_weights_from_tensor")) == 1
