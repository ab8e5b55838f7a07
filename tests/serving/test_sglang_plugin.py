"""The SGLang plugin (serving/plugin.py): the emitter never blocks, the event format from tensors
shaped like SGLang's verify step (speculative/eagle_worker_common.py run_eagle_verify,
eagle_info.py EagleVerifyInput), the hook never breaks the worker, and the entry point.
The last test (skipped without the SGLang venv) loads the plugin through SGLang's real
load_plugins() and drives the real hooked EAGLEWorkerV2.verify with CPU tensors."""
import json
import socket
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from draftdistill.serving import plugin
from sglang_test_support import write_plugin_dist

REPO = Path(__file__).resolve().parents[2]


def verify_step(bs=2, steps=3, topk=1):
    """A verify step like run_eagle_verify's, chain drafting (topk 1): draft_token_num = steps + 1;
    row i of draft_token = [root, d1, d2, d3]; next_token_ids row = the target's tokens with the
    accepted path at the front; accept_lens = accepted drafts + 1 bonus."""
    n = steps + 1
    draft = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]], dtype=torch.int64)[:bs]
    predict = torch.tensor([[11, 12, 99, 0], [77, 0, 0, 0]], dtype=torch.int64)[:bs]  # req0: 2 drafts + bonus 99
    accept = torch.tensor([3, 1], dtype=torch.int32)[:bs]
    spec_info = SimpleNamespace(draft_token=draft.flatten(), draft_token_num=n, topk=topk,
                                seq_lens_cpu=torch.tensor([57, 9])[:bs])
    batch = SimpleNamespace(reqs=[SimpleNamespace(rid="req-a"), SimpleNamespace(rid="req-b")][:bs],
                            spec_info=spec_info, forward_mode=SimpleNamespace(is_idle=lambda: False))
    result = SimpleNamespace(next_token_ids=predict.flatten(), accept_lens=accept)
    worker = SimpleNamespace(topk=topk, speculative_num_draft_tokens=n, _target_worker=SimpleNamespace(tp_rank=0))
    return worker, batch, result


def read_events(path, want, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Path(path).exists():
            lines = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
            if len(lines) >= want:
                return lines
        time.sleep(0.02)
    raise AssertionError(f"fewer than {want} events in {path}")


def test_event_format_chain(tmp_path):
    worker, batch, result = verify_step()
    emitter = plugin.EventEmitter(str(tmp_path / "ev.jsonl"))
    assert plugin.capture_verify(worker, batch, result, emitter)
    emitter.close()
    a, b = read_events(tmp_path / "ev.jsonl", 2)
    assert a["type"] == "verify" and a["rid"] == "req-a" and a["seq_len"] == 57 and a["topk"] == 1
    assert a["draft_tokens"] == [11, 12, 13] and a["accepted_tokens"] == [11, 12, 99]
    assert a["accept_length"] == 3 and a["num_accepted_drafts"] == 2 and a["rejected_draft"] == 13
    assert b["draft_tokens"] == [21, 22, 23] and b["accepted_tokens"] == [77]
    assert b["num_accepted_drafts"] == 0 and b["rejected_draft"] == 21
    assert emitter.counters["written"] == 2


def test_all_accepted_tree_idle_and_other_tp_ranks(tmp_path):
    worker, batch, result = verify_step(bs=1)
    result.accept_lens = torch.tensor([4], dtype=torch.int32)
    result.next_token_ids = torch.tensor([11, 12, 13, 42])
    emitter = plugin.EventEmitter(str(tmp_path / "ev.jsonl"))
    plugin.capture_verify(worker, batch, result, emitter)
    tree_worker, tree_batch, tree_result = verify_step(bs=1, topk=2)
    plugin.capture_verify(tree_worker, tree_batch, tree_result, emitter)
    idle = verify_step(bs=1)
    idle[1].forward_mode = SimpleNamespace(is_idle=lambda: True)
    assert not plugin.capture_verify(*idle, emitter)
    rank1 = verify_step(bs=1)
    rank1[0]._target_worker.tp_rank = 1
    assert not plugin.capture_verify(*rank1, emitter)
    emitter.close()
    full, tree = read_events(tmp_path / "ev.jsonl", 2)
    assert full["accepted_tokens"] == [11, 12, 13, 42] and full["rejected_draft"] is None
    assert tree["topk"] == 2 and tree["rejected_draft"] is None  # a tree has no single rejected draft


def test_emit_never_blocks_and_drops_when_full(tmp_path):
    release = threading.Event()

    class Slow:  # holds the writer thread, so the queue fills
        def events(self):
            release.wait(10)
            return [{"type": "slow"}]

    emitter = plugin.EventEmitter(str(tmp_path / "ev.jsonl"), maxsize=4)
    assert emitter.emit(Slow())
    time.sleep(0.05)  # the writer took it and is stuck
    start = time.perf_counter()
    results = [emitter.emit({"type": "x", "i": i}) for i in range(50)]
    elapsed = time.perf_counter() - start
    assert elapsed < 0.1  # 50 emits against a full queue: no waiting
    assert results[:4] == [True] * 4 and not any(results[4:])
    assert emitter.counters["dropped"] == 46
    release.set()
    emitter.close()
    assert len(read_events(tmp_path / "ev.jsonl", 5)) == 5


def test_bad_items_do_not_stop_the_writer(tmp_path):
    emitter = plugin.EventEmitter(str(tmp_path / "ev.jsonl"))
    emitter.emit(SimpleNamespace(events=lambda: 1 / 0))
    emitter.emit({"type": "ok"})
    emitter.close()
    assert read_events(tmp_path / "ev.jsonl", 1) == [{"type": "ok"}] and emitter.counters["errors"] == 1


def test_udp_sink():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(5)
        emitter = plugin.EventEmitter(f"udp://127.0.0.1:{rx.getsockname()[1]}")
        worker, batch, result = verify_step(bs=1)
        plugin.capture_verify(worker, batch, result, emitter)
        assert json.loads(rx.recv(65536))["accepted_tokens"] == [11, 12, 99]
        emitter.close()


def test_hook_returns_the_result_even_when_capture_fails(tmp_path, monkeypatch):
    monkeypatch.setenv(plugin.ENV_SINK, str(tmp_path / "ev.jsonl"))
    monkeypatch.setattr(plugin, "_emitter", None)
    worker, batch, result = verify_step()
    calls = []

    def original(self, b, *args, **kwargs):
        calls.append((args, kwargs))
        return result

    assert plugin.verify_hook(original, worker, batch, grammar_barrier=None) is result
    assert calls == [((), {"grammar_barrier": None})]
    broken = SimpleNamespace(reqs=[SimpleNamespace(rid="x")], spec_info=None,
                             forward_mode=SimpleNamespace(is_idle=lambda: False))
    assert plugin.verify_hook(original, worker, broken) is result  # capture raised inside; swallowed
    emitter = plugin.get_emitter()
    emitter.close()
    assert [e["rid"] for e in read_events(tmp_path / "ev.jsonl", 2)] == ["req-a", "req-b"]
    monkeypatch.setattr(plugin, "_emitter", None)


def test_register_is_inert_without_the_env(monkeypatch):
    monkeypatch.delenv(plugin.ENV_SINK, raising=False)
    monkeypatch.setitem(sys.modules, "sglang", None)  # would fail if register() imported SGLang
    monkeypatch.setattr(plugin, "_emitter", None)
    plugin.register()  # returns before importing sglang
    assert plugin.get_emitter() is None


def test_entry_point_declared():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ep = project["entry-points"]["sglang.srt.plugins"]["draftdistill"]
    module, func = ep.split(":")
    assert module == "draftdistill.serving.plugin" and callable(getattr(plugin, func))


def test_real_load_plugins_and_hooked_verify(venv_python, in_venv, tmp_path):
    """SGLang's own load_plugins() finds the entry point (a dist-info on PYTHONPATH, pointing at a
    shim that loads serving/plugin.py), applies the AROUND hook to EAGLEWorkerV2.verify, and the
    real wrapped method emits events from a real EagleVerifyInput and GenerationBatchResult."""
    dist = write_plugin_dist(tmp_path / "plugin")
    events = tmp_path / "events.jsonl"
    code = '''
    import json, time, types, torch
    from sglang.srt.plugins import load_plugins
    load_plugins()
    from sglang.srt.speculative import eagle_worker_v2 as ew
    from sglang.srt.speculative.eagle_info import EagleVerifyInput
    from sglang.srt.managers.utils import GenerationBatchResult
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardMode
    assert hasattr(ew.EAGLEWorkerV2.verify, "__wrapped__"), "hook not applied"
    n = 4
    vi = EagleVerifyInput(draft_token=torch.tensor([10, 11, 12, 13, 20, 21, 22, 23]), custom_mask=torch.ones(1),
        positions=torch.zeros(8, dtype=torch.long), retrieve_index=torch.zeros(2, n, dtype=torch.long),
        retrieve_next_token=torch.zeros(2, n, dtype=torch.long), retrieve_next_sibling=torch.zeros(2, n, dtype=torch.long),
        retrieve_cum_len=None, spec_steps=3, topk=1, draft_token_num=n, capture_hidden_mode=CaptureHiddenMode.NULL,
        seq_lens_sum=66, seq_lens_cpu=torch.tensor([57, 9]))
    def fake_run_eagle_verify(batch, **kw):  # what the GPU path returns, on CPU
        return GenerationBatchResult(next_token_ids=torch.tensor([11, 12, 99, 0, 77, 0, 0, 0]),
                                     accept_lens=torch.tensor([3, 1], dtype=torch.int32), speculative_num_draft_tokens=n)
    ew.run_eagle_verify = fake_run_eagle_verify
    worker = ew.EAGLEWorkerV2.__new__(ew.EAGLEWorkerV2)
    worker.topk, worker.speculative_num_draft_tokens, worker._target_worker = 1, n, types.SimpleNamespace(tp_rank=0)
    for k in ("req_to_token_pool", "token_to_kv_pool_allocator", "plan_stream", "plan_stream_ctx", "device"):
        setattr(worker, k, None)
    batch = types.SimpleNamespace(reqs=[types.SimpleNamespace(rid="a"), types.SimpleNamespace(rid="b")],
                                  spec_info=vi, forward_mode=ForwardMode.DECODE)
    out = worker.verify(batch)
    assert out.accept_lens.tolist() == [3, 1]
    import sys
    sys.modules["draftdistill_test_plugin"].get_emitter().close()
    print("OK")
    '''  # noqa: E501  (the script's text is kept as it is)
    proc = in_venv(venv_python, code, env={"PYTHONPATH": str(dist), "DRAFTDISTILL_SPEC_EVENTS": str(events)})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
    loaded, a, b = read_events(events, 3)
    assert loaded["type"] == "plugin_loaded"
    assert a["rid"] == "a" and a["draft_tokens"] == [11, 12, 13] and a["accepted_tokens"] == [11, 12, 99]
    assert b["accepted_tokens"] == [77] and b["rejected_draft"] == 21
