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


def test_sharegpt_items_are_parsed_one_by_one_and_a_cut_last_item_is_dropped(tmp_path, monkeypatch):
    from draftdistill.data import sharegpt

    def conv(i, first="human"):
        return {"id": f"c{i}", "conversations": [{"from": first, "value": f"question number {i} about things"},
                                                  {"from": "gpt", "value": f"answer {i}"}]}
    text = json.dumps([conv(i) for i in range(30)] + [conv(99, first="gpt")], indent=2)
    cut = text + ',\n  {"id": "cut", "conversations": [{"from": "human", "val'
    path = tmp_path / "sharegpt.json"
    path.write_text(cut)
    items = list(sharegpt.iter_items(path, chunk_chars=100))  # tiny chunks: items span reads
    assert [item["id"] for item in items] == [f"c{i}" for i in range(30)] + ["c99"]
    monkeypatch.setattr(sharegpt, "sharegpt_file", lambda: path)
    every = load_prompts("sharegpt")
    assert len(every) == 30 and every[4].reference == "answer 4"  # c99 starts with the assistant: skipped
    heldout, train = load_prompts("sharegpt:heldout"), load_prompts("sharegpt:train")
    assert len(heldout) + len(train) == 30 and not {p.meta["id"] for p in heldout} & {p.meta["id"] for p in train}
    assert len(load_prompts("sharegpt:train", limit=3)) == 3


def test_sharegpt_without_the_package_says_how_to_install(monkeypatch):
    import importlib.util

    from draftdistill.data import sharegpt

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"draftdistill\[chat\]"):
        sharegpt.sharegpt_file()
