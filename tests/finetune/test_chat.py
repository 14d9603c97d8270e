"""`finetune generate` and `finetune chat`: greedy output equal to transformers' on the same weights (adapter
included), prompt formats, streamed multi-turn chat kept in the template, and command-line errors."""
from __future__ import annotations

import io
import json
import sys

import pytest
import torch

from finetune import chat
from finetune.inference import load_for_inference
from finetune.cli import main
from finetune.templates import load_template, tokenize
from llama_core.generate import generate
from llama_core.weights import load_model

from .test_merge import make_adapter, make_base

ROWS = [{"prompt": "the model of water"},
        {"instruction": "Count the words.", "input": "one two three"},
        {"messages": [{"role": "user", "content": "It was a day."}, {"role": "assistant", "content": "Yes."},
                      {"role": "user", "content": "And the year?"}]}]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model, tokenizer):
    root = tmp_path_factory.mktemp("chat")
    base = make_base(root, tiny_model(seed=3), tokenizer)
    adapter, _ = make_adapter(root, base, tokenizer, template="vicuna", seed=1)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return dict(root=root, base=base, adapter=adapter, prompts=prompts)


def test_generate_equals_transformers_greedy(run, tokenizer, capsys):
    import transformers
    from peft import PeftModel

    assert main(["generate", "--model", str(run["adapter"]), "--file", str(run["prompts"]),
                 "--max-new-tokens", "16", "--batch-size", "2"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [{k: r[k] for k in ROWS[i]} for i, r in enumerate(records)] == ROWS
    hf = PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(run["base"]), run["adapter"]).eval()
    template = load_template("vicuna")
    for row, record in zip(ROWS, records):
        ids = chat.prompt_tokens(row, template, tokenizer, "test")
        out = hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=16, do_sample=False, eos_token_id=2, pad_token_id=0)[0, len(ids):].tolist()
        expected = out[:out.index(2)] if 2 in out else out
        assert record["tokens"] == expected
        assert record["finish_reason"] == ("eos" if 2 in out else "length")
        assert record["completion"] == tokenizer.decode(expected, continuation=True).strip()
    # One --prompt streams the same completion to stdout.
    assert main(["generate", "--model", str(run["adapter"]), "--prompt", ROWS[0]["prompt"],
                 "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out.strip() == records[0]["completion"]


def test_prompt_formats_and_raw(run, tokenizer, capsys):
    template = load_template("alpaca")
    ids = chat.prompt_tokens(ROWS[1], template, tokenizer, "x")
    assert ids == tokenize(template.prompt([{"role": "user", "content": "Count the words.",
                                             "input": "one two three"}]), tokenizer)
    with_answer = {"messages": ROWS[2]["messages"] + [{"role": "assistant", "content": "Now."}]}
    assert chat.prompt_tokens(with_answer, template, tokenizer, "x") == chat.prompt_tokens(ROWS[2], template,
                                                                                          tokenizer, "x")
    assert main(["generate", "--model", str(run["base"]), "--raw", "--file", str(run["prompts"]),
                 "--max-new-tokens", "8"]) == 2
    assert "--raw needs" in capsys.readouterr().err
    out = run["root"] / "raw.jsonl"
    assert main(["generate", "--model", str(run["base"]), "--raw", "--prompt", "It was the day",
                 "--max-new-tokens", "8", "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    model = load_model(run["base"])
    assert record["tokens"] == generate(model, [tokenizer.encode("It was the day", bos=True)], max_new_tokens=8)[0]


class _Stdout(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


def test_chat_streams_and_keeps_turns_in_the_template(run, tokenizer, monkeypatch):
    prompts, steps = [], []
    real = chat.stream_generate

    def recording(model, rows, **kw):
        prompts.append(rows[0])
        for step in real(model, rows, **kw):
            steps.append(step)
            yield step

    monkeypatch.setattr(chat, "stream_generate", recording)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nAnd the day?\n/reset\n\nA new start\n/exit\nignored\n"))
    stdout = _Stdout()
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["chat", "--model", str(run["adapter"]), "--max-new-tokens", "10",
                 "--system", "Be brief."]) == 0
    text = stdout.getvalue()
    replies = [line.removeprefix("assistant> ").strip() for line in text.splitlines() if line.startswith("assistant> ")]
    assert len(replies) == 3 and "(conversation cleared)" in text
    template, system = load_template("vicuna"), [{"role": "system", "content": "Be brief."}]
    turn1 = system + [{"role": "user", "content": "Hello there"}]
    turn2 = turn1 + [{"role": "assistant", "content": replies[0]}, {"role": "user", "content": "And the day?"}]
    assert prompts == [tokenize(template.prompt(turn1), tokenizer), tokenize(template.prompt(turn2), tokenizer),
                       tokenize(template.prompt(system + [{"role": "user", "content": "A new start"}]), tokenizer)]
    assert len(stdout.writes) >= len(steps) > 3  # one write (and flush) per decoding step: streamed


def test_chat_drops_old_turns_when_the_context_is_full(run, tokenizer, monkeypatch):
    model, tok, _ = load_for_inference(run["adapter"])
    template = load_template("vicuna")
    long = " ".join(["the water of the house"] * 5)
    lines = iter([long + "\n", long + "\n", long + "\n", "/exit\n"])
    out = io.StringIO()
    settings = dict(max_new_tokens=4, temperature=0.0, top_p=1.0, top_k=0, generator=None)
    messages = chat.chat_turns(lines, model, tok, template, settings, out=out)
    assert "context full" in out.getvalue()
    assert len(tokenize(template.prompt(messages[:-1]), tok)) <= model.config.max_seq_len
    assert messages[-2]["content"] == long and len(messages) < 6


def test_cli_errors_exit_2_without_traceback(run, tmp_path, capsys):
    cases = [(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"], "no such folder"),
             (["generate", "--model", "huggyllama/llama-7b", "--prompt", "x"], "not in the Hugging Face cache"),
             (["generate", "--model", str(run["base"])], "exactly one of --prompt"),
             (["generate", "--model", str(run["base"]), "--prompt", "x", "--top-p", "0"], "--top-p"),
             (["chat", "--model", str(run["base"]), "--template", "alpaca", "--system", "x"], "no system prompt"),
             (["chat", "--model", str(run["base"]), "--bogus"], "unrecognized arguments")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    cases.append((["generate", "--model", str(run["base"]), "--file", str(bad)], f"{bad}:2: malformed JSON"))
    bad2 = tmp_path / "bad2.jsonl"
    bad2.write_text('{"text": "no prompt"}\n')
    cases.append((["generate", "--model", str(run["base"]), "--file", str(bad2)], f"{bad2}:1: a prompt line needs"))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "caf\xe9"}\n')
    cases.append((["generate", "--model", str(run["base"]), "--file", str(latin1)], "not UTF-8 text"))
    lone = tmp_path / "lone.jsonl"
    lone.write_text('{"prompt": "x\\ud800"}\n')
    cases.append((["generate", "--model", str(run["base"]), "--file", str(lone)], f"{lone}:1: not valid Unicode"))
    cases.append((["generate", "--model", str(run["base"]), "--prompt", "x", "--temperature", "nan"], "--temperature"))
    cases.append((["generate", "--model", str(run["base"]), "--prompt", "x", "--temperature", "inf"], "--temperature"))
    cases.append((["generate", "--model", str(run["base"]), "--file", str(run["prompts"]), "--output",
                   str(tmp_path / "no" / "out.jsonl")], "its folder does not exist"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


def test_sampling_is_repeatable_with_a_seed(run, capsys):
    def sample(seed: str) -> list[list[int]]:
        assert main(["generate", "--model", str(run["adapter"]), "--file", str(run["prompts"]), "--max-new-tokens",
                     "12", "--temperature", "1.5", "--top-k", "50", "--top-p", "0.95", "--seed", seed]) == 0
        return [json.loads(line)["tokens"] for line in capsys.readouterr().out.splitlines()]

    assert sample("1") == sample("1") != sample("2")


def test_stop_strings_and_output_file(run, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", str(run["adapter"]), "--file", str(run["prompts"]), "--max-new-tokens", "16",
            "--output", str(out)]
    assert main(argv) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and not (tmp_path / "out.jsonl.tmp").exists()
    row = next(r for r in records if len(r["completion"]) > 4)  # stop at a piece of its own completion
    stop = row["completion"][2:4]
    assert main(argv + ["--stop", stop, "--overwrite"]) == 0
    again = [json.loads(line) for line in out.read_text().splitlines()]
    hit = again[records.index(row)]
    assert hit["finish_reason"] == "stop" and stop not in hit["completion"]
    assert row["completion"].startswith(hit["completion"])
