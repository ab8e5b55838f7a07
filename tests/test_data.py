import json

import pytest

from draftdistill.data import PromptFileError, encode_prompt, load_prompts, read_prompt_file, split_of
from tiny import make_tokenizer


def test_bundled_gsm8k_has_disjoint_stable_split():
    train = load_prompts("gsm8k", split="train")
    heldout = load_prompts("gsm8k:heldout")
    assert len(train) + len(heldout) == 7473
    assert 0.08 < len(heldout) / 7473 < 0.12
    train_q = {p.messages[-1]["content"] for p in train}
    assert not train_q & {p.messages[-1]["content"] for p in heldout}
    assert heldout[0].reference and "####" in heldout[0].reference
    assert [p.messages for p in load_prompts("gsm8k:heldout", limit=5)] == [p.messages for p in heldout[:5]]


def test_split_is_a_pure_function_of_text():
    assert split_of("same text") == split_of("same text")
    assert {split_of(f"q{i}") for i in range(200)} == {"train", "heldout"}


def test_jsonl_fields(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "a"}, {"question": "b", "answer": "c"},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "d"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    prompts = read_prompt_file(path)
    assert [p.messages[-1]["content"] for p in prompts] == ["a", "b", "d"]
    assert prompts[1].reference == "c" and len(prompts[2].messages) == 2


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "invalid JSON"),
    ('{"answer": "x"}', "no 'messages', 'prompt', 'question' or 'text' field"),
    ('{"prompt": 3}', "'prompt' must be a non-empty string"),
    ('{"messages": [{"role": "user"}]}', "'messages' must be a non-empty list"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_row_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n\n' + bad_line + "\n")
    with pytest.raises(PromptFileError, match=rf"bad\.jsonl:3: .*{message}"):
        read_prompt_file(path)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "p.csv").write_text("a,b\n")
    with pytest.raises(PromptFileError, match="p.csv: unsupported"):
        load_prompts(str(tmp_path / "p.csv"))


def test_txt_and_json_lists(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert [p.messages[0]["content"] for p in load_prompts(str(tmp_path / "p.txt"))] == ["one", "two"]
    (tmp_path / "p.json").write_text(json.dumps([{"text": "x"}, {"oops": 1}]))
    with pytest.raises(PromptFileError, match=r"p.json: item 1"):
        load_prompts(str(tmp_path / "p.json"))


def test_encode_without_chat_template_uses_plain_text():
    tok = make_tokenizer()
    prompt = load_prompts.__globals__["Prompt"]([{"role": "user", "content": "w1 w2"}])
    assert encode_prompt(tok, prompt).tolist() == [[4, 5]]
