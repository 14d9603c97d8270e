"""Data pipeline benchmark: 52,000 generated Alpaca-sized rows read, templated, tokenized, masked and packed.

    python bench/bench_data.py [--rows 52000] [--num-proc 2] [--max-seq-len 512] [--vocab-size 8000]
                               [--tokenizer /work/shared/data/llama_tokenizer.model]

The rows are generated here (pseudo-words with a Zipf-like distribution, not copied text): instruction ~15 words,
input ~10 words in half the rows, output ~60 words. Without --tokenizer, a SentencePiece tokenizer with LLaMA's
settings (32,000 pieces) is trained on the fly on 20,000 templated rows (a few seconds, not timed). The timed part is
`build_datasets` with a cold cache: read, normalize, template, tokenize, mask, pack, save to the cache.

On the 2-core development machine (num_proc 2): 10-12 s when nothing else runs (about 5,000 rows/s, 600,000
tokens/s, 93% packing efficiency); 17-32 s while other jobs share its cores. SentencePiece's encoding is about 80% of
the CPU time (about 160 of 200 us per row), so the Python around it matters little.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.data import build_datasets  # noqa: E402
from finetune.recipe import DataSection, DatasetSection  # noqa: E402
from finetune.templates import load_template, segments_text  # noqa: E402
from llama_core.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

COMMON = ("the a of to and in is that for it as with was on be by this are or from at an which have not can "
          "will more one all their they about into when also been what its would than some other".split())
SYLLABLES = "ba be bi bo bu ka ke ki ko ku la le li lo lu ma me mi mo mu na ne ni no nu ra re ri ro ru sa se si " \
            "so su ta te ti to tu va ve vi vo zu tion ing er est al".split()


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    vocab = COMMON + ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(20_000)]
    cum = list(itertools.accumulate(1.0 / (rank + 10) for rank in range(len(vocab))))  # Zipf-like

    def sentence(mean: int) -> str:
        words = rng.choices(vocab, cum_weights=cum, k=max(1, int(rng.gauss(mean, mean / 4))))
        text = " ".join(words)
        return text[0].upper() + text[1:] + rng.choice(".?!")

    return [{"instruction": sentence(15), "input": sentence(10) if rng.random() < 0.5 else "",
             "output": " ".join(sentence(12) for _ in range(5))} for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=52_000)
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--tokenizer", help="a tokenizer.model to use instead of training one")
    ap.add_argument("--template", default="alpaca")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        rows = make_rows(args.rows)
        path = Path(tmp, "bench.jsonl")
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        template = load_template(args.template)
        if args.tokenizer:
            tokenizer = Tokenizer(args.tokenizer)
        else:  # trained on templated rows, so that it knows the template's words as a real tokenizer knows English
            t = time.perf_counter()
            texts = [segments_text(template.render([{"role": "user", "content": r["instruction"], "input": r["input"]},
                                                    {"role": "assistant", "content": r["output"]}]), "", "")
                     for r in rows[:20_000]]
            tokenizer = train_tokenizer(texts, Path(tmp, "tokenizer.model"), args.vocab_size)
            print(f"tokenizer: {args.vocab_size} pieces trained in {time.perf_counter() - t:.1f} s (not timed)")
        t = time.perf_counter()
        import trl.data_utils  # noqa: F401  (pack_dataset's module imports transformers: process start-up, not data)
        print(f"importing trl.data_utils (and transformers): {time.perf_counter() - t:.1f} s (not timed)")
        cfg = DataSection(max_seq_len=args.max_seq_len, packing=True, num_proc=args.num_proc,
                          cache_dir=str(Path(tmp, "cache")))
        t, cpu = time.perf_counter(), _cpu_seconds()
        prepared = build_datasets(cfg, [DatasetSection(path=str(path))], template, tokenizer)
        elapsed, cpu = time.perf_counter() - t, _cpu_seconds() - cpu
        s = prepared.stats
        print(s.describe())
        print(f"{args.rows} rows in {elapsed:.1f} s: {args.rows / elapsed:,.0f} rows/s, "
              f"{s.train_tokens / elapsed:,.0f} tokens/s, packing efficiency {s.packing_efficiency:.1%} "
              f"(num_proc {args.num_proc}, max_seq_len {args.max_seq_len}; {cpu:.1f} CPU-seconds: a wall time far "
              f"above CPU-seconds / num_proc means other jobs shared the cores)")


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (datasets' worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    main()
