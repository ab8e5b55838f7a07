"""torchrun / FSDP2 on CPU (gloo): 2 ranks with batch_size B train exactly like 1 process with
batch_size 2B (loss per step and final weights), for the drafter, EAGLE-3 and OPD trainers; a 2-rank
checkpoint resumes in one process; the 2-rank export is a plain HF directory."""
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from draftdistill.opd import OPDConfig, train_opd
from draftdistill.train import DrafterConfig, Eagle3Config, train_drafter, train_eagle3
from draftdistill.train.checkpoint import is_sharded_checkpoint, load_weights
from tiny import kill_at_optimizer_step, save_model_dir

ROOT = Path(__file__).resolve().parents[1]
TRAINERS = {"drafter": train_drafter, "eagle3": train_eagle3, "opd": train_opd}


class Killed(Exception):
    pass


def _rank_main(rank: int, world: int, port: int, trainer: str, cfg, kill_at_step: int | None):
    """One torchrun-like rank: the env:// variables torchrun would set, then the trainer."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    if kill_at_step:  # every rank dies at the same optimizer step, as a killed job would
        original, calls = torch.optim.AdamW.step, {"n": 0}

        def step(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == kill_at_step:
                raise Killed
            return original(self, *args, **kwargs)

        torch.optim.AdamW.step = step
    try:
        TRAINERS[trainer](cfg, progress=False)
    except Killed:
        pass
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(trainer: str, cfg, world: int = 2, kill_at_step: int | None = None) -> None:
    mp.spawn(_rank_main, args=(world, free_port(), trainer, cfg, kill_at_step), nprocs=world, join=True)


def losses(out: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def assert_same_weights(got: dict, want: dict, atol=2e-5):
    assert want and set(want) <= set(got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=1e-4, msg=key)


def checkpoint_weights(checkpoint: Path, skeleton: Path) -> dict:
    """A checkpoint of either format, loaded into a plain model built like `skeleton`."""
    model = AutoModelForCausalLM.from_pretrained(skeleton)
    load_weights(checkpoint, model)
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    teacher = save_model_dir(root / "teacher", layers=2, seed=0)
    student = save_model_dir(root / "student", layers=1, seed=1)
    prompts = root / "p.jsonl"
    prompts.write_text("".join(  # 1 to 4 words: rows of a batch need left padding
        json.dumps({"prompt": " ".join(f"w{(i * k + 3) % 29}" for k in range(1 + i % 4)),
                    "answer": f"w{i % 5} w{i % 7} w{i % 3}"}) + "\n" for i in range(24)))
    return root, teacher, student, prompts


# --- the drafter trainer -------------------------------------------------------------------------


def drafter_config(data, out, **kw) -> DrafterConfig:
    root, teacher, _, prompts = data
    # On-policy and mixed (fresh drafter samples, dataset answers, target samples), OSD masks, and a
    # random drafter, so that the loss has something to do.
    base = dict(target=str(teacher), drafter="small:layers=1,hidden=16,heads=2,kv_heads=1,intermediate=32",
                prompts=str(prompts), eval_prompts=str(prompts),
                mix_dataset=1.0, mix_target=1.0, mix_drafter=2.0, rejected_only=True, divergence="fkl",
                response_tokens=5, batch_size=4, grad_accum=1, steps=4, eval_every=100, save_every=2,
                eval_num_prompts=2, eval_max_new_tokens=4, out_dir=str(root / out), device="cpu", lr=1e-2,
                warmup_steps=1)
    base.update(kw)
    return DrafterConfig(**base)


@pytest.fixture(scope="module")
def drafter_reference(data):
    cfg = drafter_config(data, "drafter-1proc")
    train_drafter(cfg, progress=False)
    return Path(cfg.out_dir)


@pytest.mark.parametrize("fsdp,teacher_parallel", [(True, "replicate"), (False, "shard")],
                         ids=["fsdp-replicated-target", "ddp-sharded-target"])
def test_drafter_two_ranks_train_like_one_process(data, drafter_reference, fsdp, teacher_parallel):
    cfg = drafter_config(data, f"drafter-2rank-{fsdp}", batch_size=2, fsdp=fsdp, teacher_parallel=teacher_parallel)
    run_ranks("drafter", cfg)
    out = Path(cfg.out_dir)
    want = losses(drafter_reference)
    assert len(want) == 4 and losses(out) == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert is_sharded_checkpoint(out / "checkpoint")  # DCP: one shard file per rank
    assert sorted(p.name for p in (out / "checkpoint").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    skeleton = drafter_reference / "best"
    assert_same_weights(checkpoint_weights(out / "checkpoint", skeleton),
                        checkpoint_weights(drafter_reference / "checkpoint", skeleton))
    # The exported best drafter (gathered to rank 0) is a plain HF directory of the original class.
    exported = json.loads((out / "best" / "config.json").read_text())
    assert exported["architectures"] == ["LlamaForCausalLM"]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_tau" in r] == [0, 4]  # rank 0 alone writes


def test_drafter_two_rank_checkpoint_resumes_in_one_process(data, drafter_reference):
    killed = drafter_config(data, "drafter-resume", batch_size=2)
    run_ranks("drafter", killed, kill_at_step=3)  # dies after the step-2 checkpoint
    out = Path(killed.out_dir)
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    assert is_sharded_checkpoint(out / "checkpoint")
    train_drafter(replace(killed, batch_size=4), progress=False)  # same global batch, one process
    assert not is_sharded_checkpoint(out / "checkpoint")  # one process writes safetensors again
    assert losses(out) == pytest.approx(losses(drafter_reference), rel=1e-4, abs=1e-6)
    assert_same_weights(load_file(out / "checkpoint" / "drafter.safetensors"),
                        load_file(drafter_reference / "checkpoint" / "drafter.safetensors"))


def test_drafter_one_process_checkpoint_resumes_on_two_ranks(data, drafter_reference, monkeypatch):
    killed = drafter_config(data, "drafter-grow")
    kill_at_optimizer_step(monkeypatch, lambda: train_drafter(killed, progress=False))
    out = Path(killed.out_dir)
    assert (out / "checkpoint" / "drafter.safetensors").is_file()  # step 2, written by one process
    run_ranks("drafter", replace(killed, batch_size=2))  # safetensors -> sharded model and optimizer
    assert is_sharded_checkpoint(out / "checkpoint")
    assert losses(out) == pytest.approx(losses(drafter_reference), rel=1e-4, abs=1e-6)
    skeleton = drafter_reference / "best"
    assert_same_weights(checkpoint_weights(out / "checkpoint", skeleton),
                        checkpoint_weights(drafter_reference / "checkpoint", skeleton))


# --- the EAGLE-3 head trainer --------------------------------------------------------------------


def eagle3_config(data, out, chain, **kw) -> Eagle3Config:
    root, _, _, prompts = data
    target = root / "target5"  # 5 layers: the head reads SGLang's default low/mid/high layers
    if not target.is_dir():
        save_model_dir(target, layers=5, seed=0)
    base = dict(target=str(target), drafter="eagle3", prompts=str(prompts), eval_prompts=str(prompts),
                mix_dataset=1.0, mix_target=1.0, divergence="fkl", ttt_steps=3, ttt_chain=chain,
                ttt_anchors=3, draft_vocab_size=20, response_tokens=5, batch_size=4, steps=4, eval_every=100,
                save_every=2, eval_num_prompts=2, eval_max_new_tokens=4, out_dir=str(root / out), device="cpu",
                lr=1e-2, warmup_steps=1)
    base.update(kw)
    return Eagle3Config(**base)


MIXED = {"mixed": dict(ttt_reach_weights=True, ttt_chain_tokens=1)}


@pytest.fixture(scope="module")
def eagle3_reference(data):
    """One process, batch 4, per chain kind (mixed: with reach weights and 1 scored draft per chain)."""
    runs = {}
    for chain in ("sampled", "data", "mixed"):
        cfg = eagle3_config(data, f"eagle3-1proc-{chain}", chain, **MIXED.get(chain, {}))
        train_eagle3(cfg, progress=False)
        runs[chain] = Path(cfg.out_dir)
    return runs


@pytest.mark.parametrize("chain,teacher_parallel", [("sampled", "replicate"), ("data", "shard"), ("mixed", "shard")],
                         ids=["sampled-replicated-target", "data-sharded-target", "mixed-sharded-target"])
def test_eagle3_two_ranks_train_like_one_process(data, eagle3_reference, chain, teacher_parallel):
    """The head is kept whole on every rank (gradients summed over ranks): the 2-rank run's losses,
    simulated acceptance and weights are the one-process run's, and its checkpoint is the
    one-process safetensors format, written by rank 0."""
    cfg = eagle3_config(data, f"eagle3-2rank-{chain}", chain, batch_size=2, teacher_parallel=teacher_parallel,
                        **MIXED.get(chain, {}))
    run_ranks("eagle3", cfg)
    out, reference = Path(cfg.out_dir), eagle3_reference[chain]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(l) for l in (reference / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 4 and [r["loss"] for r in steps] == pytest.approx(losses(reference), rel=1e-4, abs=1e-6)
    for got, ref in zip(steps, [r for r in want if "loss" in r]):
        assert got["scored_positions"] == ref["scored_positions"] and got["target_tokens"] == ref["target_tokens"]
        assert got["target_chain_tokens"] == ref["target_chain_tokens"]
        assert got["sim_alpha_per_position"] == pytest.approx(ref["sim_alpha_per_position"], abs=1e-5)
    assert [r["step"] for r in rows if "eval_tau" in r] == [0, 4]  # rank 0 alone writes
    assert not is_sharded_checkpoint(out / "checkpoint")
    assert_same_weights(load_file(out / "checkpoint" / "drafter.safetensors"),
                        load_file(reference / "checkpoint" / "drafter.safetensors"))
    assert json.loads((out / "best" / "config.json").read_text())["architectures"] == ["LlamaForCausalLMEagle3"]


def test_eagle3_two_rank_run_killed_resumes_in_one_process(data, eagle3_reference):
    killed = eagle3_config(data, "eagle3-resume", "sampled", batch_size=2)
    run_ranks("eagle3", killed, kill_at_step=3)  # dies after the step-2 checkpoint
    out = Path(killed.out_dir)
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    train_eagle3(replace(killed, batch_size=4), progress=False)  # same global batch, one process
    assert losses(out) == pytest.approx(losses(eagle3_reference["sampled"]), rel=1e-4, abs=1e-6)
    assert_same_weights(load_file(out / "checkpoint" / "drafter.safetensors"),
                        load_file(eagle3_reference["sampled"] / "checkpoint" / "drafter.safetensors"))


# --- the OPD trainer -----------------------------------------------------------------------------


def opd_overrides(data, out, batch_size):
    """Greedy student rollouts: the batched sampler draws all of a micro-batch's rows from one
    random stream, so only deterministic rollouts are row-for-row the same on another world size."""
    root, teacher, student, prompts = data
    return [f"student={student}", f"teacher={teacher}", f"prompts={prompts}", "objective=opd", "rollout_temperature=0",
            "teacher_scores=logits", "max_new_tokens=5", f"batch_size={batch_size}", "grad_accum=2", "steps=3",
            "save_every=3", f"out_dir={root / out}", "device=cpu", "lr=1e-2", "warmup_steps=1"]


def test_opd_two_ranks_by_torchrun_train_like_one_process(data):
    from draftdistill.train import load_config

    root = data[0]
    train_opd(load_config(OPDConfig, None, opd_overrides(data, "opd-1proc", 4)), progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "draftdistill.cli", "opd", *opd_overrides(data, "opd-2rank", 2), "teacher_parallel=shard",
               "--quiet"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 3 steps") == 1  # rank 0 alone prints
    want, got = losses(root / "opd-1proc"), losses(root / "opd-2rank")
    assert len(want) == 3 and got == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert_same_weights(load_file(root / "opd-2rank" / "final" / "model.safetensors"),
                        load_file(root / "opd-1proc" / "final" / "model.safetensors"))


def test_opd_ema_self_teacher_on_two_ranks_trains_like_one_process(data):
    """OPSD with an EMA self-teacher: the EMA copy is sharded like the student and updated
    parameter by parameter; its weights file is gathered to rank 0."""
    from draftdistill.train import load_config

    root = data[0]
    overrides = opd_overrides(data, "opsd-1proc", 4) + ["teacher=self", "self_teacher=ema", "ema_decay=0.5",
                                                         "privileged=reference", "objective=divergence",
                                                         "divergence=jsd:beta=0.5"]
    one = load_config(OPDConfig, None, overrides)
    train_opd(one, progress=False)
    two = replace(one, batch_size=2, out_dir=str(root / "opsd-2rank"))
    run_ranks("opd", two)
    assert losses(root / "opsd-2rank") == pytest.approx(losses(root / "opsd-1proc"), rel=1e-4, abs=1e-6)
    assert_same_weights(load_file(root / "opsd-2rank" / "ema-3.safetensors"),
                        load_file(root / "opsd-1proc" / "ema-3.safetensors"))
