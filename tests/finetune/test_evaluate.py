"""`finetune eval loss` (masked as training masks, checked against a direct computation), `finetune eval mmlu`
from the command line, the trainer's helpers (prompt_ids) and command-line errors."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from finetune import mmlu
from finetune.cli import main
from finetune.commands import eval as eval_command
from finetune.evaluate import prompt_ids
from finetune.inference import load_for_inference
from finetune.templates import encode_segments, load_template, tokenize

from .test_hub import hub_offline
from .test_merge import make_adapter, make_base

REPO = Path(__file__).resolve().parents[2]
ROWS = [{"instruction": "Count the words.", "input": "one two three", "output": "3"},
        {"instruction": "Write the first word.", "input": "", "output": "The house is old."},
        {"instruction": "Say it again.", "input": "water and light", "output": "water and light"},
        {"instruction": "What day is it?", "input": "", "output": "It is the first day of the year."},
        {"instruction": "Add.", "input": "12 and 30", "output": "42"}]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model, tokenizer):
    root = tmp_path_factory.mktemp("evaluate")
    base = make_base(root, tiny_model(seed=5), tokenizer)
    adapter, _ = make_adapter(root, base, tokenizer, template="vicuna", seed=2)
    data = root / "valid.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return dict(root=root, base=base, adapter=adapter, data=data)


def _direct_loss(model, tokenizer, template, train_on_inputs=False) -> tuple[float, int]:
    """Sum of next-token losses over the trained tokens, computed example by example."""
    total, count = 0.0, 0
    for row in ROWS:
        messages = [{"role": "user", "content": row["instruction"], "input": row["input"]},
                    {"role": "assistant", "content": row["output"]}]
        segments = template.render(messages)
        ids, labels = [], []
        for seg, piece in zip(segments, encode_segments(segments, tokenizer)):
            ids += piece
            trained = seg.trained or train_on_inputs
            labels += ([-100] + piece[1:] if seg.bos else piece) if trained else [-100] * len(piece)
        with torch.no_grad():
            total += model(torch.tensor([ids]), labels=torch.tensor([labels]), reduction="sum").item()
        count += sum(1 for t in labels[1:] if t != -100)
    return total, count


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_eval_loss_equals_direct_computation(run, tokenizer, tmp_path, capsys, train_on_inputs):
    out = tmp_path / "loss.json"
    argv = ["eval", "loss", "--model", str(run["adapter"]), "--data", str(run["data"]), "--template", "alpaca",
            "--cache-dir", str(tmp_path / "cache"), "--batch-size", "2", "--output", str(out)]
    assert main(argv + ["--train-on-inputs"] * train_on_inputs) == 0
    assert "perplexity" in capsys.readouterr().out
    result = json.loads(out.read_text())
    model, _, _ = load_for_inference(run["adapter"])
    total, count = _direct_loss(model, tokenizer, load_template("alpaca"), train_on_inputs)
    assert result["tokens"] == count and result["examples"] == len(ROWS) and result["template"] == "alpaca"
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_eval_loss_uses_the_model_template(run, tmp_path, capsys):
    out = tmp_path / "loss.json"
    assert main(["eval", "loss", "--model", str(run["adapter"]), "--data", str(run["data"]),
                 "--cache-dir", str(tmp_path / "cache"), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["template"] == "vicuna"  # the adapter's template.yaml


def test_eval_mmlu_command(run, tokenizer, tmp_path, capsys):
    out = tmp_path / "mmlu.json"
    assert main(["eval", "mmlu", "--model", str(run["base"]), "--data", str(REPO / "data" / "mmlu_sample"),
                 "--shots", "1", "--subjects", "astronomy,nutrition", "--batch-size", "4", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "astronomy" in printed and "average (questions)" in printed and f"wrote {out}" in printed
    report = json.loads(out.read_text())
    assert sorted(report["subjects"]) == ["astronomy", "nutrition"] and report["shots"] == 1
    model, _, _ = load_for_inference(run["base"])
    direct = mmlu.evaluate_mmlu(model, tokenizer, REPO / "data" / "mmlu_sample", shots=1, log=None,
                                subjects=["astronomy", "nutrition"])
    assert direct == report


def _small_mmlu(root: Path) -> Path:
    """Two subjects of short questions."""
    for split, n in (("dev", 5), ("test", 3)):
        (root / split).mkdir(parents=True)
        for subject in ("astronomy", "anatomy"):
            rows = [[f"Is {subject[:3]} {i} old?", "one", "two", "the day", "new", "ABCD"[i % 4]] for i in range(n)]
            with open(root / split / f"{subject}_{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows(rows)
    return root


def test_eval_mmlu_log_samples_and_show_prompt(tiny_model, tokenizer, tmp_path, capsys):
    base = make_base(tmp_path, tiny_model(seed=5, max_seq_len=1024), tokenizer)  # 5-shot prompts fit
    data, samples, out = _small_mmlu(tmp_path / "mmlu"), tmp_path / "samples.jsonl", tmp_path / "mmlu.json"
    assert main(["eval", "mmlu", "--model", str(base), "--data", str(data), "--batch-size", "4",
                 "--log-samples", str(samples), "--show-prompt", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    # The first question of the first subject (sorted), 5-shot, as built: before the table.
    loaded = mmlu.load_mmlu(data)
    expected = mmlu.build_prompt("anatomy", loaded["anatomy"]["dev"], loaded["anatomy"]["test"][0], 5)
    head, rest = printed.split("\n", 1)
    assert head.startswith("----- MMLU prompt: anatomy, test question 0 (5 shots; ")
    assert rest.startswith(f"<s>{expected}\n----- end of prompt; ") and rest.index("MMLU 5-shot") > len(expected)
    assert f"wrote {samples} (6 questions)" in printed and f"wrote {out}" in printed
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    report = json.loads(out.read_text())
    assert [(r["subject"], r["index"]) for r in records] == [("anatomy", i) for i in range(3)] + \
        [("astronomy", i) for i in range(3)]
    assert all(r["shots"] == 5 and not r["truncated"] for r in records)
    assert all(r["prediction"] == max("ABCD", key=r["logprobs"].get) for r in records)
    assert sum(r["correct"] for r in records) / len(records) == report["average"]
    # The same file as the library writes for the same model.
    model, _, _ = load_for_inference(base)
    direct = tmp_path / "direct.jsonl"
    mmlu.evaluate_mmlu(model, tokenizer, data, batch_size=4, samples=str(direct), log=None)
    assert direct.read_bytes() == samples.read_bytes()


def test_eval_mmlu_bad_log_samples_fail_before_any_work(run, tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("loaded or evaluated before checking --log-samples")

    monkeypatch.setattr(eval_command, "load_model", never)
    monkeypatch.setattr(mmlu, "last_logits", never)
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    cases = [(tmp_path, [], "is a folder"), (tmp_path / "file" / "s.jsonl", [], "is a file"),
             (tmp_path / "link", [], "is a symbolic link"), (tmp_path / "dangling", [], "is a symbolic link"),
             (tmp_path / "s.jsonl", ["--output", str(tmp_path / "s.jsonl")], "are the same file")]
    for path, more, message in cases:
        argv = ["eval", "mmlu", "--model", str(run["base"]), "--data", str(REPO / "data" / "mmlu_sample"),
                "--log-samples", str(path)] + more
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "error: --log-samples" in err and message in err and "Traceback" not in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "file", "link"]
    assert (tmp_path / "file").read_text() == "x"


def test_prompt_ids_is_the_prefix_of_the_training_ids(tokenizer):
    template = load_template("vicuna")
    messages = [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "The day?"}, {"role": "assistant", "content": "One."}]
    ids = prompt_ids(template, tokenizer, messages)
    full = tokenize(template.render(messages), tokenizer)
    assert ids == tokenize(template.prompt(messages[:-1]), tokenizer) and full[:len(ids)] == ids
    assert prompt_ids(template, tokenizer, messages[:-1]) == ids


def test_eval_errors_exit_2(run, tmp_path, capsys, monkeypatch):
    hub_offline(monkeypatch, tmp_path / "datasets")
    cases = [(["eval"], "usage: finetune eval mmlu"),
             (["eval", "mmlu", "--model", str(tmp_path / "none"), "--data", "x"], "no such folder"),
             (["eval", "mmlu", "--model", str(run["base"]), "--data", "hub"],
              "Hub dataset 'cais/mmlu' is not in the datasets cache"),
             (["eval", "mmlu", "--model", str(run["base"]), "--data", str(tmp_path)], "no test/ folder"),
             (["eval", "mmlu", "--model", str(run["base"]), "--data", "x", "--shots", "-1"], "--shots"),
             (["eval", "loss", "--model", str(run["base"]), "--data", str(tmp_path / "missing.jsonl")], "not found"),
             (["eval", "loss", "--model", str(run["base"])], "--data")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
