"""The student/teacher guard: refuse template, EOS and vocabulary mismatches before any compute;
keep special tokens (but not stop tokens) out of the loss."""
import json

import pytest
import torch

from draftdistill.models import TokenizerMismatchError
from draftdistill.opd import OPDConfig, TemplateMismatchError, check_pair, loss_token_mask, train_opd
from draftdistill.opd import trainer as opd_trainer
from tiny import WORDS, make_tokenizer, save_model_dir


def tok(template=None, eos="</s>", words=WORDS):
    t = make_tokenizer(words, eos=eos)
    if template:
        t.chat_template = template
    return t


PLAIN = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
ROLES = "{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}{% if add_generation_prompt %}w3{% endif %}"


def test_matching_pair_passes():
    assert check_pair(tok(PLAIN), tok(PLAIN), [2], [2]) == []


def test_template_mismatch_is_refused_or_warned():
    with pytest.raises(TemplateMismatchError, match="chat template renders the probe differently"):
        check_pair(tok(PLAIN), tok(ROLES), [2], [2])
    with pytest.raises(TemplateMismatchError, match="has none"):
        check_pair(tok(None), tok(ROLES), [2], [2])
    with pytest.warns(UserWarning, match="OPD GUARD"):
        problems = check_pair(tok(PLAIN), tok(ROLES), [2], [2], mode="warn")
    assert len(problems) == 1


def test_eos_and_vocabulary_mismatches():
    with pytest.raises(TemplateMismatchError, match="stop tokens differ"):
        check_pair(tok(PLAIN), tok(PLAIN), [2], [2, 5])
    other = WORDS[:10] + ["zz"] + WORDS[11:]
    with pytest.raises(TokenizerMismatchError, match="tokenizers differ at id 10"):
        check_pair(tok(), tok(words=other), [2], [2], mode="warn")  # never downgraded to a warning
    with pytest.raises(TokenizerMismatchError, match="special token eos differs"):
        check_pair(tok(), tok(eos="<s>"), [2], [2], mode="warn")
    with pytest.raises(TokenizerMismatchError, match="logit sizes differ"):
        check_pair(tok(), tok(), [2], [2], 32, 64)


def test_special_tokens_leave_the_loss_but_stop_tokens_stay():
    targets = torch.tensor([[5, 1, 6, 2], [0, 7, 2, 2]])  # 0 <unk>, 1 <s>, 2 </s> (eos)
    scored = torch.tensor([[True, True, True, True], [True, True, True, False]])
    mask = loss_token_mask(targets, scored, special_ids=[0, 1, 2], keep_ids=[2])
    assert mask.tolist() == [[True, False, True, True], [False, True, True, False]]


def test_training_refuses_a_mismatched_pair_before_loading_any_weights(tmp_path, monkeypatch):
    student = save_model_dir(tmp_path / "student", layers=1, seed=1)
    teacher = save_model_dir(tmp_path / "teacher", layers=1, seed=0)
    t = tok(ROLES)
    t.save_pretrained(teacher)
    s = tok(PLAIN)
    s.save_pretrained(student)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "w4 w5", "answer": "w6"}) + "\n")

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before the guard ran")

    monkeypatch.setattr(opd_trainer, "load_target", no_weights)
    monkeypatch.setattr(opd_trainer, "load_model", no_weights)
    cfg = OPDConfig(student=str(student), teacher=str(teacher), prompts=str(prompts), out_dir=str(tmp_path / "run"),
                    device="cpu", steps=1)
    with pytest.raises(TemplateMismatchError):
        train_opd(cfg, progress=False)
    # A mismatched stop token in the teacher's generation config is refused the same way.
    t = tok(PLAIN)
    t.save_pretrained(teacher)
    gen = json.loads((teacher / "generation_config.json").read_text())
    (teacher / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [2, 9]}))
    with pytest.raises(TemplateMismatchError, match="stop tokens differ"):
        train_opd(cfg, progress=False)


def test_warn_mode_trains_and_renders_each_prompt_with_its_own_template(tmp_path):
    from draftdistill.opd import LocalScorer
    from tiny import make_llama

    student = save_model_dir(tmp_path / "student", layers=1, seed=1)
    teacher = save_model_dir(tmp_path / "teacher", layers=1, seed=0)
    tok(ROLES).save_pretrained(teacher)
    tok(PLAIN).save_pretrained(student)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "w4 w5", "answer": "w6"}) + "\n")
    seen = []

    class Recording(LocalScorer):
        def score(self, prompts, *a, **k):
            seen.extend(prompts)
            return super().score(prompts, *a, **k)

    cfg = OPDConfig(student=str(student), teacher=str(teacher), prompts=str(prompts), out_dir=str(tmp_path / "run"),
                    device="cpu", steps=1, batch_size=1, max_new_tokens=2, guard="warn")
    with pytest.warns(UserWarning, match="OPD GUARD"):
        train_opd(cfg, progress=False, scorers={"teacher": Recording(make_llama(layers=1), 2)})
    teacher_tok = tok(ROLES)
    assert seen == [teacher_tok.apply_chat_template([{"role": "user", "content": "w4 w5"}],
                                                    add_generation_prompt=True, return_dict=True)["input_ids"]]
