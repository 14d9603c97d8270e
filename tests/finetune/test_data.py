"""The data pipeline: reading, masks, truncation, packing, mixing, splits, dedup, caching and bad input."""
from __future__ import annotations

import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from finetune.data import build_datasets, collate, render_example_for_display, show_examples
from finetune.errors import DataError
from finetune.recipe import DataSection, DatasetSection
from finetune.templates import Template, load_template, tokenize
from llama_core.model import IGNORE_INDEX

from .test_hub import hub_offline


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def rows(n, start=0, long_input=0):
    return [{"instruction": f"Say {i}.", "input": "the day " * long_input if i % 2 else "",
             "output": f"It was {i}."} for i in range(start, start + n)]


def cfg(tmp_path, **kw):
    kw = {"max_seq_len": 512, "packing": False, "cache_dir": str(tmp_path / "cache"), **kw}
    return DataSection(**kw)


def build(tmp_path, specs, tokenizer, template="plain", **kw):
    specs = [s if isinstance(s, DatasetSection) else DatasetSection(path=s) for s in specs]
    return build_datasets(cfg(tmp_path, **kw), specs, load_template(template), tokenizer)


def documents(ds):
    """Every example of every row: (input_ids, labels), split where position_ids restart."""
    out = []
    for row in ds:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        out += [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in zip(starts, starts[1:])]
    return out


def test_alpaca_masks_match_the_template(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", rows(6))
    prepared = build(tmp_path, [path], tokenizer, template="alpaca")
    template = load_template("alpaca")
    by_ids = {tuple(r["input_ids"]): r for r in prepared.train}
    assert len(by_ids) == 6
    for r in rows(6):
        conv = [{"role": "user", "content": r["instruction"], "input": r["input"]},
                {"role": "assistant", "content": r["output"]}]
        ids = tokenize(template.render(conv), tokenizer)
        prompt = tokenize(template.prompt(conv[:1]), tokenizer)
        row = by_ids[tuple(ids)]
        n = len(prompt)
        assert row["labels"][:n] == [IGNORE_INDEX] * n  # BOS and prompt: no target
        assert row["labels"][n:] == ids[n:] and ids[-1] == tokenizer.eos_id  # response and its EOS
        assert row["position_ids"] == list(range(len(ids)))


def test_train_on_inputs_trains_everything_but_bos(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", rows(3))
    prepared = build(tmp_path, [path], tokenizer, template="alpaca", train_on_inputs=True)
    for row in prepared.train:
        assert row["labels"][0] == IGNORE_INDEX and row["labels"][1:] == row["input_ids"][1:]


def test_conversations_train_only_assistant_turns(tmp_path, tokenizer):
    turns = [("system", "Be short."), ("user", "Hi there."), ("assistant", "Hello."), ("user", "Count to 3."),
             ("assistant", "1 2 3")]
    sharegpt = {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(r, r), "value": c}
                                  for r, c in turns]}
    openai = {"messages": [{"role": r, "content": c} for r, c in turns]}
    results = []
    for name, row in (("s", sharegpt), ("o", openai)):
        path = write_jsonl(tmp_path / f"{name}.jsonl", [row])
        results.append(build(tmp_path, [DatasetSection(path=path, format="conversations")], tokenizer,
                             template="vicuna").train[0])
    assert results[0] == results[1]
    ids, labels = results[0]["input_ids"], results[0]["labels"]
    trained = [i for i, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.bos_id) == 1 and labels[0] == IGNORE_INDEX
    assert ids.count(tokenizer.eos_id) == 2 and trained.count(tokenizer.eos_id) == 2
    assert tokenizer.decode(trained) == "Hello. 1 2 3"  # " Hello.</s>" and " 1 2 3</s>", nothing else


def test_text_format_is_all_trained(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "The model was new."}])
    row = build(tmp_path, [DatasetSection(path=path, format="text", columns={"text": "body"})], tokenizer,
                template="alpaca").train[0]
    assert row["input_ids"] == [tokenizer.bos_id] + tokenizer.encode("The model was new.") + [tokenizer.eos_id]
    assert row["labels"] == [IGNORE_INDEX] + row["input_ids"][1:]


def test_overlong_drop_and_truncate_prompt(tmp_path, tokenizer):
    data = rows(10, long_input=60) + [{"instruction": "Long answer.", "input": "", "output": "the day " * 80}]
    path = write_jsonl(tmp_path / "a.jsonl", data)
    L = 96
    dropped = build(tmp_path, [path], tokenizer, max_seq_len=L, overlong="drop")
    s = dropped.stats.datasets[path]
    assert (s.overlong_dropped, s.overlong_truncated, s.examples) == (6, 0, 5)  # 5 long inputs + the long answer
    cut = build(tmp_path, [path], tokenizer, max_seq_len=L, overlong="truncate_prompt")
    s = cut.stats.datasets[path]
    assert (s.overlong_dropped, s.overlong_truncated, s.examples) == (1, 5, 10)
    plain = load_template("plain")
    for row in cut.train:
        assert len(row["input_ids"]) <= L and row["input_ids"][0] == tokenizer.bos_id
        if len(row["input_ids"]) == L:  # truncated: BOS kept, then the end of the prompt, then the whole answer
            answer = tokenizer.decode([i for i, l in zip(row["input_ids"], row["labels"]) if l != IGNORE_INDEX])
            i = int(answer.split()[2].rstrip("."))
            full = tokenize(plain.render([{"role": "user", "content": data[i]["instruction"],
                                           "input": data[i]["input"]},
                                          {"role": "assistant", "content": data[i]["output"]}]), tokenizer)
            assert row["input_ids"][1:] == full[-(L - 1):]


def test_packing_keeps_examples_whole(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", rows(40, long_input=3))
    unpacked = build(tmp_path, [path], tokenizer, max_seq_len=128)
    packed = build(tmp_path, [path], tokenizer, max_seq_len=128, packing=True)
    assert len(packed.train) < len(unpacked.train) == 40
    assert sorted(documents(packed.train)) == sorted(documents(unpacked.train))  # no example cut or lost
    tokens = 0
    for row in packed.train:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= 128
        for ids, labels in documents([row]):
            assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
        tokens += len(row["input_ids"])
    s = packed.stats
    assert s.train_rows == len(packed.train) and s.train_tokens == tokens
    assert s.packing_efficiency == pytest.approx(tokens / (len(packed.train) * 128))
    assert s.packing_efficiency > unpacked.stats.packing_efficiency


def test_collate_pads_after_the_tokens(tiny_model, tokenizer):
    rows_ = [{"input_ids": [1, 5, 6, 7], "labels": [-100, 5, 6, 7], "position_ids": [0, 1, 0, 1]},
             {"input_ids": [1, 9], "labels": [-100, 9], "position_ids": [0, 1]}]
    batch = collate(rows_, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7], [1, 9, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6, 7], [-100, 9, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    model = tiny_model()
    with torch.no_grad():
        padded = model(batch["input_ids"], position_ids=batch["position_ids"])
        alone = model(torch.tensor([[1, 9]]), position_ids=torch.tensor([[0, 1]]))
    assert torch.allclose(padded[1, :2], alone[0], atol=1e-5)  # the pads change nothing for real tokens
    assert not padded.isnan().any()


def test_cache_hit_and_invalidation(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", rows(5))
    first = build(tmp_path, [path], tokenizer, template="alpaca")
    again = build(tmp_path, [path], tokenizer, template="alpaca")
    assert not first.stats.cache_hit and again.stats.cache_hit
    assert again.stats.cache_path == first.stats.cache_path
    assert list(again.train) == list(first.train) and again.stats.datasets == first.stats.datasets
    changed = Template({**load_template("alpaca").definition, "assistant": " {content}"})
    other = build_datasets(cfg(tmp_path), [DatasetSection(path=path)], changed, tokenizer)
    assert not other.stats.cache_hit and list(other.train) != list(first.train)
    assert not build(tmp_path, [path], tokenizer, template="alpaca", max_seq_len=256).stats.cache_hit
    assert not build(tmp_path, [path], tokenizer, template="alpaca", packing=True).stats.cache_hit
    write_jsonl(tmp_path / "a.jsonl", rows(6))
    assert not build(tmp_path, [path], tokenizer, template="alpaca").stats.cache_hit
    assert build(tmp_path, [path], tokenizer, template="alpaca").stats.cache_hit


def test_mixing_weights(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", rows(20))
    b = write_jsonl(tmp_path / "b.jsonl", rows(20, start=100))
    specs = [DatasetSection(path=a, weight=2.0), DatasetSection(path=b, weight=0.5)]
    prepared = build(tmp_path, specs, tokenizer)
    s = prepared.stats
    assert (s.datasets[a].train_examples, s.datasets[b].train_examples, s.train_examples) == (40, 10, 50)
    texts = [tokenizer.decode(r["input_ids"]) for r in prepared.train]
    assert all(texts.count(f"Say {i}.It was {i}.") == 2 for i in range(20))
    from_b = [n for n in (int(re.match(r"Say (\d+)\.", t)[1]) for t in texts) if n >= 100]
    assert len(from_b) == len(set(from_b)) == 10  # half of b, sampled without replacement
    assert texts != sorted(texts)  # shuffled
    same = build(tmp_path, specs, tokenizer, cache_dir=str(tmp_path / "other"))
    assert [r["input_ids"] for r in same.train] == [r["input_ids"] for r in prepared.train]  # deterministic
    reseeded = build(tmp_path, specs, tokenizer, seed=1)
    assert [r["input_ids"] for r in reseeded.train] != [r["input_ids"] for r in prepared.train]


def test_split_expression_and_max_samples(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", rows(20))
    half = build(tmp_path, [DatasetSection(path=path, split="train[:50%]")], tokenizer)
    assert half.stats.datasets[f"{path}[train[:50%]]"].rows_read == 10
    assert {tokenizer.decode(r["input_ids"]) for r in half.train} == {f"Say {i}.It was {i}." for i in range(10)}
    tail = build(tmp_path, [DatasetSection(path=path, split="train[-3:]")], tokenizer)
    assert len(tail.train) == 3
    sampled = build(tmp_path, [DatasetSection(path=path, max_samples=7)], tokenizer)
    assert len(sampled.train) == 7 and sampled.stats.datasets[path].examples == 7
    with pytest.raises(DataError, match="bad split"):
        build(tmp_path, [DatasetSection(path=path, split="test")], tokenizer)


def test_val_fraction_holds_out_before_mixing(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", rows(20))
    prepared = build(tmp_path, [DatasetSection(path=path, weight=3)], tokenizer, val_fraction=0.2)
    s = prepared.stats
    assert s.datasets[path].held_out == 4 and s.validation_examples == 4 and s.train_examples == 48
    train, val = set(map(tuple, prepared.train["input_ids"])), set(map(tuple, prepared.validation["input_ids"]))
    assert len(train) == 16 and len(val) == 4 and not train & val
    assert len(prepared.validation_examples) == 4
    example = prepared.validation_examples[0]["messages"]
    assert [m["role"] for m in example] == ["user", "assistant"] and example[1]["content"].startswith("It was")


def test_explicit_validation_and_dedup(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", rows(10) + rows(3))  # 3 duplicates inside a
    b = write_jsonl(tmp_path / "b.jsonl", rows(4, start=8))  # 2 duplicates of a
    v = write_jsonl(tmp_path / "v.jsonl", rows(2, start=50) + rows(1))  # row 0 of a is a validation example
    prepared = build(tmp_path, [a, b], tokenizer, validation=[DatasetSection(path=v)])
    s = prepared.stats
    assert s.datasets[a].duplicates_removed == 4 and s.datasets[a].examples == 9
    assert s.datasets[b].duplicates_removed == 2 and s.datasets[b].examples == 2
    assert s.validation[v].examples == 3 and len(prepared.validation) == 3
    kept = build(tmp_path, [a, b], tokenizer, dedup=False)
    assert kept.stats.train_examples == 17


def test_csv_parquet_json_and_folders(tmp_path, tokenizer):
    data = [{"prompt": f"Say {i}.", "completion": f"It was {i}."} for i in range(4)]
    columns = {"instruction": "prompt", "output": "completion"}
    (tmp_path / "d.csv").write_text("prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n"
                                                                     for r in data))
    pq.write_table(pa.Table.from_pylist(data), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(data))
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "1.jsonl", data[:2])
    write_jsonl(tmp_path / "folder" / "2.jsonl", data[2:])
    expected = None
    for name in ("d.csv", "d.parquet", "d.json", "folder"):
        spec = DatasetSection(path=str(tmp_path / name), columns=columns)
        got = sorted(map(tuple, build(tmp_path, [spec], tokenizer).train["input_ids"]))
        assert got == (expected := expected or got) and len(got) == 4, name
    (tmp_path / "n.csv").write_text("instruction,output\nWhat is 2 + 2?,4\n")  # a numeric cell stays text
    assert len(build(tmp_path, [str(tmp_path / "n.csv")], tokenizer).train) == 1
    raw = '{"instruction": "a\u2028b", "output": "c"}\r\n\n'  # a raw U+2028 inside a string, CRLF line ends
    (tmp_path / "u.jsonl").write_text(raw, encoding="utf-8")
    assert len(build(tmp_path, [str(tmp_path / "u.jsonl")], tokenizer).train) == 1


def test_csv_problems_name_the_file_and_line(tmp_path, tokenizer):
    bom = tmp_path / "bom.csv"  # Excel writes a byte-order mark: the first column is still "instruction"
    bom.write_bytes("\ufeffinstruction,output\nSay 1.,It was 1.\n\nSay 2.,It was 2.\n".encode())
    assert len(build(tmp_path, [str(bom)], tokenizer).train) == 2
    cases = {"fields.csv": (b"instruction,output\na,b\n\nc,d,e\n", r"fields\.csv:4: 3 fields, but the header has 2"),
             "latin1.csv": (b"instruction,output\na,b\ncaf\xe9,d\n", r"latin1\.csv:3: not UTF-8 text"),
             "missing.csv": (b"instruction,output\na,b\n\"multi\nline\",\n", r"missing\.csv:3: missing field 'output'")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=message):
            build(tmp_path, [str(tmp_path / name)], tokenizer)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "1.csv").write_text("instruction,output\na,b\n")
    (tmp_path / "dir" / "2.csv").write_text("instruction,input,output\na,,b\n")
    with pytest.raises(DataError, match=r"2\.csv:1: columns .* differ from .*1\.csv"):
        build(tmp_path, [str(tmp_path / "dir")], tokenizer)


def test_unicode_edge_cases(tmp_path, tokenizer):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows(1)[0]).encode() + b"\n")
    assert len(build(tmp_path, [str(bom)], tokenizer).train) == 1
    lone = write_jsonl(tmp_path / "lone.jsonl", ['{"instruction": "x\\ud800y", "output": "z"}'])  # valid JSON
    with pytest.raises(DataError, match=r"lone\.jsonl:1: field 'instruction' is not valid Unicode"):
        build(tmp_path, [lone], tokenizer)


def test_val_fraction_of_a_single_example_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "one.jsonl", rows(1))
    with pytest.raises(DataError, match="val_fraction needs at least 2 examples"):
        build(tmp_path, [path], tokenizer, val_fraction=0.1)


@pytest.mark.parametrize("lines, message", [
    ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], r"a\.jsonl:2: missing field 'output'"),
    ([{"instruction": "a", "output": 5}], r"a\.jsonl:1: field 'output' must be a string, got int"),
    ([{"instruction": "a", "output": "b"}, '{"instruction": "c", "output": "d"', {"instruction": "e"}],
     r"a\.jsonl:2: malformed JSON line"),
    ([{"instruction": "a", "output": " "}], "field 'output' is empty"),
    (["[1, 2]"], "a row must be a JSON object"),
    ([], "is empty"),
])
def test_bad_alpaca_input(tmp_path, tokenizer, lines, message):
    path = write_jsonl(tmp_path / "a.jsonl", lines)
    with pytest.raises(DataError, match=message):
        build(tmp_path, [path], tokenizer)


@pytest.mark.parametrize("turns, message", [
    ([{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}], "turn 2: unknown role 'robot'"),
    ([{"from": "human", "value": "hi"}], "must end with an assistant turn"),
    ([{"from": "gpt", "value": "hi"}], "alternating"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": None}], "turn 2: content must be a string"),
    ([{"from": "system", "value": "s"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}],
     "template 'alpaca' has no system prompt"),
])
def test_bad_conversations(tmp_path, tokenizer, turns, message):
    path = write_jsonl(tmp_path / "c.jsonl", [{"conversations": turns}])
    with pytest.raises(DataError, match=r"c\.jsonl:1: .*" + message):
        build(tmp_path, [DatasetSection(path=path, format="conversations")], tokenizer, template="alpaca")


def test_skip_mode_counts_bad_rows(tmp_path, tokenizer):
    lines = rows(5) + [{"instruction": "x"}, {"instruction": 3, "output": "y"}, {"output": "z"}, "{oops"]
    path = write_jsonl(tmp_path / "a.jsonl", lines)
    with pytest.raises(DataError, match=r"a\.jsonl:6: .*\n.*a\.jsonl:7: .*\n.*a\.jsonl:8: .*\n\(and 1 more"):
        build(tmp_path, [path], tokenizer)
    prepared = build(tmp_path, [path], tokenizer, on_bad_row="skip")
    s = prepared.stats.datasets[path]
    assert (s.rows_read, s.bad_rows_skipped, s.examples) == (9, 4, 5)
    with pytest.raises(DataError, match="no usable examples"):
        build(tmp_path, [write_jsonl(tmp_path / "b.jsonl", lines[5:])], tokenizer, on_bad_row="skip")


def test_missing_files_and_hub_ids(tmp_path, tokenizer, monkeypatch):
    for missing in ("./nope.jsonl", "nope.jsonl", "data/x/y/z", str(tmp_path / "nope")):
        with pytest.raises(DataError, match="dataset file not found: " + missing):
            build(tmp_path, [missing], tokenizer)
    hub_offline(monkeypatch, tmp_path / "datasets")  # no socket probe either: any connection fails the test
    with pytest.raises(DataError, match=re.escape(
            f"dataset someone/some-data (split 'train'): Hub dataset 'someone/some-data' is not in the datasets cache "
            f"({tmp_path / 'cache' / 'hf'}) and HF_HUB_OFFLINE is set: load it once where the Hub can be reached "
            f"(same cache), or unset HF_HUB_OFFLINE, or use a local file")):
        build(tmp_path, ["someone/some-data"], tokenizer)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported type '.txt'"):
        build(tmp_path, [str(tmp_path / "notes.txt")], tokenizer)


def test_paths_are_relative_to_base_dir(tmp_path, tokenizer, monkeypatch):
    write_jsonl(tmp_path / "a.jsonl", rows(2))
    monkeypatch.chdir(tmp_path)
    prepared = build_datasets(DataSection(cache_dir="cache"), [DatasetSection(path="a.jsonl")],
                              load_template("plain"), tokenizer)
    assert len(prepared.train) == 1 and os.path.isdir(tmp_path / "cache")  # 2 rows, packed into one


def test_display_marks_the_masked_text(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", rows(3))
    prepared = build(tmp_path, [path], tokenizer, template="alpaca", packing=True)
    text = render_example_for_display(prepared.train[0], tokenizer)
    assert text.count("--- example:") == 3 and "trained" in text
    assert "⟦<s>Below is an instruction" in text and "### Response:⟧It was" in text and ".</s>" in text
    assert "\033[2m" in render_example_for_display(prepared.train[0], tokenizer, color=True)
    report = show_examples(prepared, tokenizer, 1)
    assert "packing efficiency" in report and "=== row 0" in report and "3 examples" in report


def test_preprocess_command(tmp_path, tokenizer, capsys):
    from finetune.cli import main

    path = write_jsonl(tmp_path / "a.jsonl", rows(4))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{preset: tiny}}\ntokenizer: {{path: {tokenizer.path}}}\ndatasets: [{{path: {path}}}]\n"
                      f"data: {{max_seq_len: 256, packing: true, cache_dir: {tmp_path / 'cache'}}}\n")
    assert main(["preprocess", "--recipe", str(recipe), "--show", "1"]) == 0
    report = capsys.readouterr().out
    assert "4 examples" in report and "⟦<s>Below is an instruction" in report and "=== row 1" not in report
