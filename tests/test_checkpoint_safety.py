"""Checkpoints under hostile files and killed writers.

- A crafted pickle `.metadata` in a checkpoint is never unpickled into code: a stray one beside a
  safetensors checkpoint is ignored (trainer_state.json decides the kind), and one whose state claims
  DCP goes through an allow-list unpickler and is refused with CheckpointError.
- No torch.load without weights_only=True, no pickle.load, in the package.
- A save killed at every filesystem operation (a forked writer SIGKILLs itself before, or half-way
  through, the k-th one) leaves, after recover_checkpoint_dir, the previous or the new checkpoint,
  bit-identical, never step 0 and never an error; a stale checkpoint.old never blocks a save.
- A broken checkpoint is seen (has_checkpoint) and refused with CheckpointError naming the file and
  how to start from scratch.
- run_lock: a second process on the same OUT_DIR gets RunDirBusy with the holder's pid; the lock
  goes with the holder, even on kill -9.
- MetricsLog drops rows after the resumed step and empties a previous run's file on a fresh start.
"""
import ast
import json
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from draftdistill.train import checkpoint as ckpt
from draftdistill.train.checkpoint import (CheckpointError, has_checkpoint, load_checkpoint, load_weights,
                                           recover_checkpoint_dir, save_checkpoint, save_sharded)
from draftdistill.train.metrics import MetricsLog
from draftdistill.train.run_lock import RunDirBusy, run_lock
from tiny import make_llama

REPO = Path(__file__).resolve().parents[1]


def trained(seed=0, steps=1, hidden=32):
    """A tiny tied Llama with AdamW state after `steps` steps, and its LambdaLR scheduler."""
    model = make_llama(seed=seed, hidden=hidden)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    for i in range(steps):
        step(model, optimizer, scheduler, i)
    return model, optimizer, scheduler


def step(model, optimizer, scheduler, i):
    ids = torch.tensor([[1 + i % 5, 4, 9, 16, 25 - i % 5]])
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def snapshot(model, optimizer):
    """Every tensor a checkpoint restores: the weights and the optimizer state."""
    tensors = {f"w.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for index, slots in optimizer.state_dict()["state"].items():
        tensors.update({f"o.{index}.{k}": v.clone() for k, v in slots.items() if torch.is_tensor(v)})
    return tensors


def restore(directory):
    """load_checkpoint into a fresh, differently initialised model: (state, tensors)."""
    model, optimizer, scheduler = trained(seed=7, steps=0)
    state = load_checkpoint(directory, model, optimizer, scheduler)
    return state, snapshot(model, optimizer)


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def evil_pickle(path: Path, marker: Path) -> None:
    """A pickle whose unpickling runs a shell command that creates `marker`."""
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {shlex.quote(str(marker))}",)

    path.write_bytes(pickle.dumps(Evil()))


# --- 1. pickle ---------------------------------------------------------------------------------------

def test_a_stray_dcp_metadata_beside_a_safetensors_checkpoint_is_never_read(tmp_path):
    model, optimizer, scheduler = trained()
    save_checkpoint(tmp_path / "checkpoint", model, optimizer, scheduler, {"step": 1})
    marker = tmp_path / "pwned"
    evil_pickle(tmp_path / "checkpoint" / ".metadata", marker)
    state, tensors = restore(tmp_path / "checkpoint")
    assert state["step"] == 1 and not marker.exists()
    assert_identical(tensors, snapshot(model, optimizer))
    load_weights(tmp_path / "checkpoint", make_llama(seed=3))
    assert not marker.exists()
    assert not ckpt.is_sharded_checkpoint(tmp_path / "checkpoint")


@pytest.mark.parametrize("claim", ["format dcp", "legacy state without drafter.safetensors"])
def test_a_crafted_dcp_metadata_is_refused_without_running_it(tmp_path, claim):
    model, optimizer, scheduler = trained()
    directory = tmp_path / "checkpoint"
    save_checkpoint(directory, model, optimizer, scheduler, {"step": 1})
    state = json.loads((directory / "trainer_state.json").read_text())
    if claim == "format dcp":
        state["format"] = "dcp"
    else:  # a checkpoint written before "format" was recorded, and no safetensors weights
        del state["format"]
        (directory / "drafter.safetensors").unlink()
    (directory / "trainer_state.json").write_text(json.dumps(state))
    marker = tmp_path / "pwned"
    evil_pickle(directory / ".metadata", marker)
    for load in (lambda: restore(directory), lambda: load_weights(directory, make_llama(seed=3))):
        with pytest.raises(CheckpointError, match="refusing to load posix.system"):
            load()
        assert not marker.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_dcp_checkpoint_round_trips_through_the_allow_list_unpickler(tmp_path):
    model, optimizer, scheduler = trained(steps=2)
    save_sharded(tmp_path / "checkpoint", model, optimizer, scheduler, {"step": 2})
    assert ckpt.is_sharded_checkpoint(tmp_path / "checkpoint")
    state, tensors = restore(tmp_path / "checkpoint")
    assert state == {"step": 2}
    assert_identical(tensors, snapshot(model, optimizer))


def test_no_torch_load_without_weights_only_and_no_pickle_load_in_the_package():
    offenders = []
    for root in ("draftdistill", "serving", "kernels", "benchmarks", "scripts"):
        for path in sorted((REPO / root).rglob("*.py")):
            text = path.read_text()
            if "weights_only=False" in text:
                offenders.append(f"{path}: mentions weights_only=False")
            for node in ast.walk(ast.parse(text)):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                    continue
                owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
                if owner == "torch" and node.func.attr == "load":
                    safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                               for k in node.keywords)
                    if not safe:
                        offenders.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
                if owner in ("pickle", "dill", "cloudpickle") and node.func.attr in ("load", "loads"):
                    offenders.append(f"{path}:{node.lineno}: {owner}.{node.func.attr}")
    assert not offenders, offenders


# --- 2. crash safety ---------------------------------------------------------------------------------

def test_a_stale_old_directory_does_not_block_saving(tmp_path):
    model, optimizer, scheduler = trained()
    directory = tmp_path / "checkpoint"
    save_checkpoint(directory, model, optimizer, scheduler, {"step": 1})
    (tmp_path / "checkpoint.old").mkdir()
    (tmp_path / "checkpoint.old" / "drafter.safetensors").write_bytes(b"stale")
    step(model, optimizer, scheduler, 1)
    save_checkpoint(directory, model, optimizer, scheduler, {"step": 2})
    assert restore(directory)[0]["step"] == 2 and not (tmp_path / "checkpoint.old").exists()


def test_recover_puts_back_the_checkpoint_a_kill_between_the_renames_left_as_old(tmp_path):
    model, optimizer, scheduler = trained()
    directory = tmp_path / "checkpoint"
    save_checkpoint(directory, model, optimizer, scheduler, {"step": 1})
    os.replace(directory, tmp_path / "checkpoint.old")  # swap_into_place's first rename, then killed
    (tmp_path / ".checkpoint-k1ll3d").mkdir()  # the new checkpoint's temporary directory
    (tmp_path / ".checkpoint-k1ll3d" / "drafter.safetensors").write_bytes(b"half")
    (tmp_path / ".checkpoint-tmp").mkdir()  # a torchrun save's
    assert has_checkpoint(directory)  # before recovery too: never mistaken for a fresh directory
    note = recover_checkpoint_dir(directory)
    assert "restored checkpoint from checkpoint.old" in note and "removed .checkpoint-k1ll3d" in note
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    state, tensors = restore(directory)
    assert state["step"] == 1
    assert_identical(tensors, snapshot(model, optimizer))
    assert recover_checkpoint_dir(directory) is None  # nothing left to do
    assert recover_checkpoint_dir(tmp_path / "missing" / "checkpoint") is None


def test_an_incomplete_old_directory_alone_is_kept_and_refused_by_name(tmp_path):
    (tmp_path / "checkpoint.old").mkdir()
    (tmp_path / "checkpoint.old" / "trainer_state.json").write_text('{"step": 3, "scheduler": {}}')
    note = recover_checkpoint_dir(tmp_path / "checkpoint")
    assert "left" in note and (tmp_path / "checkpoint.old").is_dir()
    assert has_checkpoint(tmp_path / "checkpoint")
    with pytest.raises(CheckpointError, match=r"checkpoint\.old is not a complete checkpoint.*resume=false"):
        restore(tmp_path / "checkpoint")
    model, optimizer, scheduler = trained()  # resume=false: the first save replaces both
    save_checkpoint(tmp_path / "checkpoint", model, optimizer, scheduler, {"step": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def _corrupt(directory: Path, case: str) -> str:
    """Break a checkpoint one way; returns the file the error must name."""
    if case == "no trainer_state.json":
        (directory / "trainer_state.json").unlink()
        return "trainer_state.json"
    if case == "garbage trainer_state.json":
        (directory / "trainer_state.json").write_text('{"step": 1, "scheduler": {')
        return "trainer_state.json:1:"
    if case == "not a trainer state":
        (directory / "trainer_state.json").write_text('[1, 2]')
        return "trainer_state.json"
    if case == "unknown format":
        state = json.loads((directory / "trainer_state.json").read_text())
        (directory / "trainer_state.json").write_text(json.dumps({**state, "format": "pickle"}))
        return "trainer_state.json"
    if case.startswith("truncated "):
        name = case.removeprefix("truncated ")
        data = (directory / name).read_bytes()
        (directory / name).write_bytes(data[: len(data) // 2])
        return name
    if case.startswith("no "):
        (directory / case.removeprefix("no ")).unlink()
        return case.removeprefix("no ")
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["no trainer_state.json", "garbage trainer_state.json", "not a trainer state",
                                  "unknown format", "truncated drafter.safetensors", "truncated optimizer.safetensors",
                                  "no drafter.safetensors", "no optimizer.safetensors"])
def test_a_broken_checkpoint_is_seen_and_refused_with_a_named_error(tmp_path, case):
    model, optimizer, scheduler = trained()
    directory = tmp_path / "checkpoint"
    save_checkpoint(directory, model, optimizer, scheduler, {"step": 1})
    names = _corrupt(directory, case)
    assert recover_checkpoint_dir(directory) is None and has_checkpoint(directory)
    with pytest.raises(CheckpointError) as error:
        restore(directory)
    assert names in str(error.value) and "resume=false" in str(error.value)


def test_a_checkpoint_of_another_shape_is_refused_with_a_named_error(tmp_path):
    model, optimizer, scheduler = trained(hidden=32)
    save_checkpoint(tmp_path / "checkpoint", model, optimizer, scheduler, {"step": 1})
    other, other_optimizer, other_scheduler = trained(hidden=64, steps=0)
    with pytest.raises(CheckpointError, match=r"drafter\.safetensors.*size mismatch.*resume=false"):
        load_checkpoint(tmp_path / "checkpoint", other, other_optimizer, other_scheduler)
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        load_checkpoint(tmp_path / "nothing", other, other_optimizer, other_scheduler)
    assert not has_checkpoint(tmp_path / "nothing")


def test_an_optimizer_state_of_another_shape_is_refused(tmp_path):
    model, optimizer, scheduler = trained()
    directory = tmp_path / "checkpoint"
    save_checkpoint(directory, model, optimizer, scheduler, {"step": 1})
    tensors = load_file(directory / "optimizer.safetensors")
    key = next(k for k, v in tensors.items() if v.dim() == 2)
    tensors[key] = tensors[key][:, :-1].contiguous()
    from safetensors.torch import save_file
    save_file(tensors, directory / "optimizer.safetensors")
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors.*has shape"):
        restore(directory)


def _instrument(plan):
    """Wrap the filesystem operations of a save; `plan(index, name, args)` runs before each and
    returns None (go on), "before" (die before it) or "mid" (die half-way through it). Returns the
    list of operations seen."""
    seen = []
    real = {"replace": os.replace, "rmtree": shutil.rmtree, "save_file": ckpt.save_file,
            "write_text": Path.write_text}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def wrap(name, half):
        def op(*args, **kw):
            seen.append(name)
            what = plan(len(seen), name, args)
            if what == "before":
                die()
            if what == "mid":
                half(*args, **kw)
                die()
            return real[name](*args, **kw)
        return op

    def half_save(tensors, path, *a, **k):
        real["save_file"](tensors, path, *a, **k)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])

    def half_text(self, text, *a, **k):
        real["write_text"](self, text[: len(text) // 2], *a, **k)

    def half_rmtree(path, *a, **k):  # one file gone, then killed
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        if files:
            files[0].unlink()

    os.replace = wrap("replace", lambda *a, **k: None)
    shutil.rmtree = wrap("rmtree", half_rmtree)
    ckpt.save_file = wrap("save_file", half_save)
    Path.write_text = wrap("write_text", half_text)
    return seen, real


def _save_in_child(directory, model, optimizer, scheduler, state, plan) -> int:
    """Fork; the child saves with its operations instrumented by `plan` and exits 0 if not killed.
    Returns the child's wait status."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 1
        try:
            _instrument(plan)
            save_checkpoint(directory, model, optimizer, scheduler, state)
            code = 0
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("stale_old", [False, True], ids=["plain", "stale-old"])
def test_a_save_killed_at_every_step_leaves_the_previous_or_the_new_checkpoint(tmp_path, stale_old):
    model, optimizer, scheduler = trained(steps=1)
    pristine = tmp_path / "pristine"
    save_checkpoint(pristine / "checkpoint", model, optimizer, scheduler, {"step": 1})
    before = snapshot(model, optimizer)
    step(model, optimizer, scheduler, 1)
    after = snapshot(model, optimizer)

    def fresh(name):  # a run directory holding the step-1 checkpoint (and a stale .old)
        run = tmp_path / name
        shutil.copytree(pristine, run)
        if stale_old:
            shutil.copytree(run / "checkpoint", run / "checkpoint.old")
        return run / "checkpoint"

    # The operations of one save, as the instrumented writer sees them.
    log = tmp_path / "ops.txt"
    status = _save_in_child(fresh("probe"), model, optimizer, scheduler, {"step": 2},
                            plan=lambda i, name, args: log.open("a").write(name + "\n") and None)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    ops = log.read_text().split()
    # save_file x2, write_text (trainer_state.json), [rmtree(stale .old)], replace(checkpoint -> .old),
    # replace(tmp -> checkpoint), rmtree(.old)
    assert ops == ["save_file", "save_file", "write_text"] + ["rmtree"] * stale_old + ["replace", "replace", "rmtree"]
    state, tensors = restore(tmp_path / "probe" / "checkpoint")
    assert state["step"] == 2
    assert_identical(tensors, after)

    second_rename = [i for i, name in enumerate(ops, 1) if name == "replace"][1]
    cases = [(k, how) for k, name in enumerate(ops, 1)
             for how in ("before", "mid") if how == "before" or name != "replace"]  # a rename has no middle
    for k, how in cases:
        directory = fresh(f"kill-{k}-{how}")
        status = _save_in_child(directory, model, optimizer, scheduler, {"step": 2},
                                plan=lambda i, name, args, k=k, how=how: how if i == k else None)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (k, how, status)
        recover_checkpoint_dir(directory)
        assert has_checkpoint(directory)
        state, tensors = restore(directory)  # never an exception
        # Killed up to the second rename: the previous checkpoint; after it: the new one. Never step 0.
        assert state["step"] == (1 if k <= second_rename else 2), (k, ops[k - 1], how, state)
        assert_identical(tensors, before if state["step"] == 1 else after)
        assert sorted(p.name for p in directory.parent.iterdir()) == ["checkpoint"], (k, how)
        save_checkpoint(directory, model, optimizer, scheduler, {"step": 3})  # and the next save goes through
        assert restore(directory)[0]["step"] == 3


# --- 3. the run lock ---------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("run_lock", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with module.run_lock(sys.argv[2]):
        print("locked", flush=True)
        sys.stdin.readline()
    print("released", flush=True)
""")


def _holder(out):
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(REPO / "draftdistill/train/run_lock.py"), str(out)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_a_second_process_on_the_same_out_dir_is_refused(tmp_path):
    out = tmp_path / "run"
    child = _holder(out)
    try:
        with pytest.raises(RunDirBusy) as error:
            with run_lock(out):
                pass
        assert str(out) in str(error.value) and f"pid {child.pid}" in str(error.value)
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "released"
        assert child.wait(timeout=30) == 0
        with run_lock(out) as path:  # released on exit
            assert path.read_text().strip() == str(os.getpid())
            with pytest.raises(RunDirBusy):  # also within one process: each open is its own holder
                with run_lock(out):
                    pass
        with run_lock(out, enabled=False) as path:  # other torchrun ranks
            assert path is None
    finally:
        child.kill()
        child.wait()


def test_the_lock_goes_with_a_killed_holder(tmp_path):
    out = tmp_path / "run"
    child = _holder(out)
    child.send_signal(signal.SIGKILL)
    child.wait()
    with run_lock(out):  # the pid of the dead holder is still in the file; the lock is not
        pass


# --- 4. metrics after a resume -----------------------------------------------------------------------

def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path):
    rows = "".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(9))
    (tmp_path / "metrics.jsonl").write_text(rows + '{"step": 9, "lo')  # killed mid-line
    log = MetricsLog(tmp_path, resume_step=5)
    log.write(6, loss=0.0)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5, 6]


def test_a_fresh_run_does_not_append_to_a_previous_runs_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    MetricsLog(tmp_path, enabled=False)  # another rank: leaves the file alone
    assert (tmp_path / "metrics.jsonl").read_text()
    log = MetricsLog(tmp_path)
    log.write(1, loss=2.0)
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == \
        [{"step": 1, "loss": 2.0}]
