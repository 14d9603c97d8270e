"""`finetune eval mmlu ...` (the paper's k-shot protocol) and `finetune eval loss ...` (loss over a dataset)."""
from __future__ import annotations

import os
import sys

from ..errors import UserError, WriteError
from .common import add_model_args, load_model, parser

USAGE = ("usage: finetune eval mmlu --model DIR --data DIR|hub [...] | "
         "finetune eval loss --model DIR --data FILE [--template NAME] [...] (--help after either for more)")


def main(argv: list[str]) -> int:
    what = argv[0] if argv and not argv[0].startswith("-") else None
    if what is None and argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if what not in ("mmlu", "loss"):
        raise UserError(USAGE)
    p = parser(f"finetune eval {what}", "MMLU k-shot accuracy (Hendrycks et al.)" if what == "mmlu" else
               "Loss and perplexity over a dataset, masked as training masks it")
    add_model_args(p, template=what == "loss")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, help="default: the model's context length")
    p.add_argument("--output", help="write the results as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace existing --output (and --log-samples) files")
    if what == "mmlu":
        p.add_argument("--data", required=True, help="MMLU folder (dev/, test/ CSVs) or 'hub' (cais/mmlu)")
        p.add_argument("--shots", type=int, default=5)
        p.add_argument("--subjects", help="comma-separated subjects (default: all found)")
        p.add_argument("--log-samples", metavar="FILE",
                       help="also write one JSON line per question: subject, index (its position in the subject's "
                            "test file), question, choices, logprobs of A-D, prediction, answer, correct, shots "
                            "used, prompt_tokens, truncated; subjects sorted, then in their files' order")
        p.add_argument("--show-prompt", action="store_true",
                       help="print the first question's complete prompt, decoded from the ids the model reads, "
                            "before evaluating (the evaluation then runs as usual)")
    else:
        p.add_argument("--data", required=True, help="a dataset file or folder (json/jsonl/csv/parquet)")
        p.add_argument("--format", default="alpaca", choices=["alpaca", "conversations", "text"])
        p.add_argument("--train-on-inputs", action="store_true", help="score prompt tokens too")
        p.add_argument("--cache-dir", help="tokenized-data cache (default ~/.cache/llama-finetune/data)")
    a = p.parse_args(argv[1:])
    if a.batch_size < 1 or (a.max_seq_len is not None and a.max_seq_len < 8):
        raise UserError("--batch-size must be >= 1 and --max-seq-len >= 8")
    _check_outputs(a)  # now, not after the whole evaluation
    model, tokenizer, template = load_model(a)
    max_len = min(a.max_seq_len or model.config.max_seq_len, model.config.max_seq_len)
    if a.max_seq_len and a.max_seq_len > max_len:
        print(f"note: --max-seq-len {a.max_seq_len} is longer than the model's context; using {max_len}",
              file=sys.stderr)
    if what == "mmlu":
        return _mmlu(a, model, tokenizer, max_len)
    return _loss(a, model, tokenizer, template, max_len)


def _check_outputs(a) -> None:
    from llama_core.files import OutputError, check_writable_folder

    from ..outputs import DEFAULT_CACHE_DIR, check_output_file

    for flag, path in (("--output", a.output), ("--log-samples", getattr(a, "log_samples", None))):
        if path:
            check_output_file(path, flag, a.overwrite, reads=(a.model, getattr(a, "adapter", None)))
    if getattr(a, "log_samples", None) and a.output and os.path.realpath(a.log_samples) == os.path.realpath(a.output):
        raise UserError(f"--log-samples and --output are the same file ({a.output}); give two names")
    if getattr(a, "format", None) is not None:  # eval loss: the tokenized-data cache
        try:
            check_writable_folder(os.path.expanduser(a.cache_dir or DEFAULT_CACHE_DIR))
        except OutputError as e:
            raise UserError(f"--cache-dir {e}") from None


def _write_json(output: str, result: dict) -> None:
    """--output, atomically; a full disk is a WriteError (the results were printed above)."""
    from llama_core.files import write_json

    try:
        write_json(output, result)
    except OSError as e:
        raise WriteError(f"could not write --output {output} ({e.strerror or e}); disk full? The results are "
                         f"printed above") from None
    print(f"wrote {output}")


def _mmlu(a, model, tokenizer, max_len: int) -> int:
    from ..mmlu import evaluate_mmlu

    if a.shots < 0:
        raise UserError("--shots must be >= 0")
    subjects = [s.strip() for s in a.subjects.split(",") if s.strip()] if a.subjects else None
    try:
        report = evaluate_mmlu(model, tokenizer, a.data, shots=a.shots, batch_size=a.batch_size,
                               max_seq_len=max_len, subjects=subjects, samples=a.log_samples,
                               show_prompt=a.show_prompt)
    except ValueError as e:
        raise UserError(str(e)) from None
    if a.log_samples:
        print(f"wrote {a.log_samples} ({report['questions']} questions)")
    if a.output:
        _write_json(a.output, report)
    return 0


def _loss(a, model, tokenizer, template, max_len: int) -> int:
    from ..data import build_datasets
    from ..evaluate import dataset_loss
    from ..recipe import DataSection, DatasetSection

    section = DataSection(max_seq_len=max_len, packing=False, train_on_inputs=a.train_on_inputs, dedup=False,
                          cache_dir=a.cache_dir)
    prepared = build_datasets(section, [DatasetSection(path=a.data, format=a.format)], template, tokenizer)
    stats = next(iter(prepared.stats.datasets.values()))
    result = {"data": a.data, "template": template.name, **dataset_loss(model, prepared.train, tokenizer.pad_id,
                                                                       a.batch_size),
              "examples": stats.examples, "overlong_dropped": stats.overlong_dropped, "max_seq_len": max_len}
    print(f"{a.data}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} over {result['tokens']:,} "
          f"trained tokens of {result['examples']} examples (template {template.name}, max_seq_len {max_len})")
    if stats.overlong_dropped:
        print(f"note: {stats.overlong_dropped} example(s) longer than {max_len} tokens were left out")
    if a.output:
        _write_json(a.output, result)
    return 0
