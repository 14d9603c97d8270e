"""Generate the quickstart data: deterministic word and number tasks a tiny LLaMA learns in minutes on a CPU.

    python data/make_quickstart.py        # rewrites data/quickstart/*.jsonl and data/quickstart/tokenizer.model

Step 1 (full fine-tuning from scratch) trains on five tasks; its validation file holds instances none of which
appears in training. Step 2 (LoRA) teaches a seventh task the first model never saw. Every answer is a function of
the input, so exact match is a fair score. Written for this project; no third-party data.
"""
from __future__ import annotations

import json
import os
import random
import sys

WORDS = ("red blue green black white pink gray gold cat dog fox owl bee cow pig hen ant bat "
         "apple pear plum lime fig kiwi melon grape lemon sun moon star rain snow wind tree rock lake hill").split()
HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart")


def words(rng, lo=3, hi=6):
    return rng.sample(WORDS, rng.randint(lo, hi))


# name -> (instruction, make input list, answer from input list)
TASKS = {
    "repeat": ("Repeat the words.", words, lambda xs: " ".join(xs)),
    "first": ("Write the first word.", words, lambda xs: xs[0]),
    "last": ("Write the last word.", words, lambda xs: xs[-1]),
    "count": ("How many words are there?", words, lambda xs: str(len(xs))),
    "reverse": ("Reverse the order of the words.", words, lambda xs: " ".join(reversed(xs))),
}
# Step 2: a task the first model was never trained on.
NEW_TASK = {"drop_first": ("Write all the words except the first.", words, lambda xs: " ".join(xs[1:]))}


def examples(tasks: dict, n_per_task: int, rng: random.Random, exclude: set) -> list[dict]:
    out = []
    for name, (instruction, make, answer) in tasks.items():
        seen = 0
        while seen < n_per_task:
            xs = make(rng)
            key = (instruction, " ".join(xs))
            if key in exclude:
                continue
            exclude.add(key)
            out.append({"instruction": instruction, "input": " ".join(xs), "output": answer(xs), "task": name})
            seen += 1
    rng.shuffle(out)
    return out


def write_jsonl(name: str, rows: list[dict]) -> None:
    with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    os.makedirs(HERE, exist_ok=True)
    rng, used = random.Random(2026), set()
    valid = examples(TASKS, 60, rng, used)  # drawn first, so training never contains them
    train = examples(TASKS, 1800, rng, used)
    new_valid = examples(NEW_TASK, 100, rng, used)
    new_train = examples(NEW_TASK, 1200, rng, used)
    write_jsonl("train.jsonl", train)
    write_jsonl("valid.jsonl", valid)
    write_jsonl("new_task_train.jsonl", new_train)
    write_jsonl("new_task_valid.jsonl", new_valid)

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from finetune.templates import load_template, segments_text
    from llama_core.tokenizer import train_tokenizer

    template = load_template(os.path.join(os.path.dirname(HERE), "..", "recipes", "templates", "quickstart.yaml"))
    texts = []
    for row in train + new_train:
        user = {"role": "user", "content": row["instruction"], "input": row["input"]}
        segments = template.render([user, {"role": "assistant", "content": row["output"]}])
        texts.append(segments_text(segments, bos="", eos=""))
    train_tokenizer(texts, os.path.join(HERE, "tokenizer.model"), vocab_size=512)
    print(f"wrote {len(train)} + {len(valid)} step-1 rows, {len(new_train)} + {len(new_valid)} step-2 rows, "
          f"and a 512-piece tokenizer to {HERE}")


if __name__ == "__main__":
    main()
