"""A teacher behind a pool of SGLang servers (teacher_servers): two stub servers that answer
`/generate` scoring requests the way SGLang does, from the same tiny teacher as a local run."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from draftdistill.opd import LocalScorer, OPDConfig, train_opd
from draftdistill.opd import SGLangScorer
from draftdistill.train import load_config
from tiny import make_llama, save_model_dir


class StubSGLang:
    """POST /generate with max_new_tokens 0 -> meta_info.input_token_logprobs (and top-k) from
    position logprob_start_len on, its first entry null, as SGLang 0.5 answers."""

    def __init__(self, model):
        self.scorer, self.bodies = LocalScorer(model, pad_id=2), []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.bodies.append(body)
                reply = json.dumps({"meta_info": stub.meta_info(body)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def meta_info(self, body: dict) -> dict:
        ids, start, k = body["input_ids"], body["logprob_start_len"], body.get("top_logprobs_num", 0)
        prompt, response = ids[: start + 1], ids[start + 1:]
        # SGLang's scoring log-probs are the raw logits' whatever the sampling temperature
        # (checked on the real server in tests/serving/test_sglang_opd.py).
        scores = self.scorer.score([prompt], [response], {"topk"} if k else set(), k or 1, 1.0)
        token = [[None, ids[start], None]] + [[float(lp), t, None] for lp, t in
                                              zip(scores.token.logprobs[0].tolist(), response)]
        meta = {"input_token_logprobs": token}
        if k:
            meta["input_top_logprobs"] = [None] + [
                [[float(v), int(i), None] for v, i in zip(values, ids_)]
                for values, ids_ in zip(scores.topk.logprobs[0].tolist(), scores.topk.ids[0].tolist())]
        return meta

    def close(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    teacher = save_model_dir(root / "teacher", layers=2, seed=0)
    student = save_model_dir(root / "student", layers=1, seed=1)
    prompts = root / "p.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"w{i} w{(i * 7) % 29}", "answer": f"w{i % 5}"}) + "\n"
                               for i in range(12)))
    return root, teacher, student, prompts


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_pool_deals_rows_round_robin_and_merges_them_in_order():
    model = make_llama(layers=1, seed=4)
    stubs = [StubSGLang(model) for _ in range(2)]
    try:
        pool = SGLangScorer([s.url for s in stubs])
        prompts, responses = [[1, 5], [1, 6, 7], [1, 8], [1, 9, 9]], [[8, 9, 2], [10], [11, 12], [13, 14, 15, 16]]
        got = pool.score(prompts, responses, {"topk"}, 3, 1.0)
        want = LocalScorer(model, 2).score(prompts, responses, {"topk"}, 3, 1.0)
        assert [len(s.bodies) for s in stubs] == [2, 2]
        # Rows 0 and 2; the pool sends a server's rows concurrently, so they may arrive in either order.
        assert sorted(b["input_ids"] for b in stubs[0].bodies) == [[1, 5, 8, 9, 2], [1, 8, 11, 12]]
        mask = torch.zeros_like(want.token.logprobs, dtype=torch.bool)
        for row, r in enumerate(responses):
            mask[row, : len(r)] = True
        torch.testing.assert_close(got.token.logprobs[mask], want.token.logprobs[mask], atol=1e-5, rtol=0)
        torch.testing.assert_close(got.topk.logprobs[mask], want.topk.logprobs[mask], atol=1e-5, rtol=0)
        pool.score(prompts[:1], responses[:1], set(), 1, 1.0)  # the next call starts where this one stopped
        assert [len(s.bodies) for s in stubs] == [3, 2]
        SGLangScorer([s.url for s in stubs], start=1).score(prompts[:1], responses[:1], set(), 1, 1.0)  # rank 1
        assert [len(s.bodies) for s in stubs] == [3, 3]
    finally:
        for s in stubs:
            s.close()


def test_opd_with_teacher_servers_trains_like_the_local_teacher(setup):
    root, teacher, student, prompts = setup
    common = [f"student={student}", f"teacher={teacher}", f"prompts={prompts}", "objective=opd",
              "teacher_scores=token", "max_new_tokens=4", "batch_size=3", "steps=2", "save_every=2",
              "device=cpu", "lr=1e-2", "warmup_steps=1"]
    train_opd(load_config(OPDConfig, None, [*common, f"out_dir={root / 'local'}"]), progress=False)
    stubs = [StubSGLang(make_llama(layers=2, seed=0)) for _ in range(2)]  # the teacher's weights
    try:
        urls = ",".join(s.url for s in stubs)  # the command-line form; a YAML list works too
        train_opd(load_config(OPDConfig, None, [*common, f"out_dir={root / 'served'}", f"teacher_servers={urls}"]),
                  progress=False)
        assert [len(s.bodies) for s in stubs] == [3, 3]  # 2 steps x 3 rows, dealt round-robin
    finally:
        for s in stubs:
            s.close()
    assert losses(root / "served") == pytest.approx(losses(root / "local"), rel=1e-4, abs=1e-6)


def test_teacher_servers_refuse_full_logits(setup):
    root, teacher, student, prompts = setup
    cfg = OPDConfig(student=str(student), teacher=str(teacher), prompts=str(prompts), teacher_servers=["http://x:1"],
                    teacher_scores="logits", out_dir=str(root / "refused"))
    with pytest.raises(ValueError, match="teacher_scores=topk or token"):
        train_opd(cfg, progress=False)
