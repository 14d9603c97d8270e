"""MMLU (Hendrycks et al., ICLR 2021) k-shot evaluation, following their evaluate.py.

Prompt: "The following are multiple choice questions (with answers) about {subject}.\\n\\n", the subject's first k
dev questions each as "{question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {X}\\n\\n", then the test question
ending with "Answer:". (Their format_subject() leaves a double space after "about"; we write one, as later harnesses do.)
A prompt longer than the context drops shots from the end (k -= 1) until it fits, as their script does.
Prediction: the most likely of " A" .. " D" after the prompt. With LLaMA's tokenizer each is one piece ("▁A"), and
this is the argmax of the next-token logits of the four letter ids. Small tokenizers may split " A" into "▁" + "A":
the shared pieces are appended to the prompt and the letters scored by their exact log-likelihood (`AnswerScorer`).
Averages: "average" is over all questions (their weighted_acc, the number papers report), each category also over
its questions; "macro_average" (the mean of the subject accuracies) is reported alongside.
To check all this by eye: `format_prompt` shows a prompt exactly as the model reads it (decoded from its ids), and
`samples=FILE` writes one JSON line per question (`question_record`: the four letters' log-likelihoods, the
prediction, the shots and prompt tokens used), in the order of the data: subjects sorted, then their test files.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from llama_core.files import OutputError, atomic_write, check_writable_file, json_safe, write_json
from llama_core.generate import left_pad

from . import hub
from .errors import UserError, WriteError

LETTERS = "ABCD"
CATEGORIES = ("STEM", "humanities", "social sciences", "other")
_GROUPS = {  # the MMLU repository's categories.py: subject -> subcategory -> category, flattened
    "STEM": "abstract_algebra astronomy college_biology college_chemistry college_computer_science "
            "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
            "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                  "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                  "prehistory professional_law world_religions",
    "social sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics high_school_psychology "
                       "human_sexuality professional_psychology public_relations security_studies sociology "
                       "us_foreign_policy",
    "other": "anatomy business_ethics clinical_knowledge college_medicine global_facts human_aging management "
             "marketing medical_genetics miscellaneous nutrition professional_accounting professional_medicine "
             "virology",
}
SUBJECT_CATEGORY: dict[str, str] = {s: cat for cat, subjects in _GROUPS.items() for s in subjects.split()}


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # "A" .. "D"


def format_question(q: Question, include_answer: bool = True) -> str:
    text = q.question + "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, q.choices)) + "\nAnswer:"
    return text + f" {q.answer}\n\n" if include_answer else text


def build_prompt(subject: str, dev: list[Question], question: Question, k: int) -> str:
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return header + "".join(format_question(d) for d in dev[:k]) + format_question(question, include_answer=False)


# --- data ---------------------------------------------------------------------------------------------------------

def read_csv(path: Path) -> list[Question]:
    """One MMLU CSV file: no header; columns question, A, B, C, D, answer."""
    out = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is skipped
            reader = csv.reader(f)
            for row in reader:
                if not row:
                    continue
                if len(row) != 6:
                    raise UserError(f"{path}:{reader.line_num}: expected 6 columns (question, A, B, C, D, answer), "
                                    f"found {len(row)}")
                if row[5].strip() not in tuple(LETTERS):
                    raise UserError(f"{path}:{reader.line_num}: the answer must be one of A, B, C, D; got {row[5]!r}")
                out.append(Question(row[0], tuple(row[1:5]), row[5].strip()))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    except csv.Error as e:
        raise UserError(f"{path}: malformed CSV: {e}") from None
    return out


CSV_DATA = "pass the MMLU CSV folder instead (dev/ and test/ from https://people.eecs.berkeley.edu/~hendrycks/data.tar)"


def _load_hub(need_dev: bool) -> dict[str, dict[str, list[Question]]]:
    """cais/mmlu from the Hub or the datasets cache (huggingface_hub's settings apply: HF_HUB_OFFLINE, proxies)."""
    import datasets

    out: dict[str, dict[str, list[Question]]] = {}
    for split in (("dev", "test") if need_dev else ("test",)):
        try:
            ds = datasets.load_dataset("cais/mmlu", "all", split=split)
        except Exception as e:  # noqa: BLE001 - ConnectionError, missing cache, ...
            problem = hub.dataset_problem("cais/mmlu", e, instead=CSV_DATA)
            raise UserError(f"--data hub ({split} split): {problem}") from None
        for row in ds:
            q = Question(row["question"], tuple(row["choices"]), LETTERS[row["answer"]])
            out.setdefault(row["subject"], {"dev": [], "test": []})[split].append(q)
    return out


def load_mmlu(data: str | os.PathLike, subjects: list[str] | None = None,
              need_dev: bool = True) -> dict[str, dict[str, list[Question]]]:
    """{subject: {"dev": [...], "test": [...]}} from DIR/dev/SUBJECT_dev.csv + DIR/test/SUBJECT_test.csv, or "hub"."""
    if str(data) == "hub":
        found = _load_hub(need_dev)
    else:
        root = Path(data)
        if not (root / "test").is_dir():
            raise UserError(f"MMLU data {root}: no test/ folder (expected DIR/test/SUBJECT_test.csv, DIR/dev/...)")
        found = {p.name.removesuffix("_test.csv"): p for p in sorted((root / "test").glob("*_test.csv"))}
        if not found:
            raise UserError(f"MMLU data {root}/test: no *_test.csv files")
    names = subjects or sorted(found)
    if unknown := [s for s in names if s not in found]:
        raise UserError(f"unknown MMLU subject(s) {', '.join(unknown)}; available: {', '.join(sorted(found))}")
    if str(data) == "hub":
        return {s: found[s] for s in names}
    out = {}
    for s in names:
        dev_file = Path(data) / "dev" / f"{s}_dev.csv"
        if need_dev and not dev_file.is_file():
            raise UserError(f"MMLU subject {s}: missing dev file {dev_file} (the few-shot examples)")
        out[s] = {"dev": read_csv(dev_file) if need_dev else [], "test": read_csv(found[s])}
    return out


# --- scoring ------------------------------------------------------------------------------------------------------

class AnswerScorer:
    """How to read P(" A") .. P(" D") off the logits at the end of a prompt.

    `suffix`: token ids appended to every prompt (pieces all four answers share, e.g. "▁"); `paths[i]`: the
    (position from the end, token id) pairs whose log-probabilities sum to letter i's log-likelihood.
    """

    def __init__(self, tokenizer):
        seqs = [tokenizer.encode(" " + letter, continuation=True) for letter in LETTERS]
        n = 0
        while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
            n += 1
        self.suffix, rests = list(seqs[0][:n]), [s[n:] for s in seqs]
        branch = {r[0] for r in rests if len(r) == 2}
        if any(not r or len(r) > 2 for r in rests) or len(branch) > 1 or len({tuple(r) for r in rests}) < 4 or \
                any(len(r) == 1 and r[0] in branch for r in rests):
            pieces = [[tokenizer.id_to_piece(i) for i in s] for s in seqs]
            raise ValueError(f"cannot score MMLU answers with {tokenizer.path}: ' A'..' D' encode as {pieces}")
        self.suffix += list(branch)
        depth = 2 if branch else 1
        self.paths = [[(depth, r[0])] if len(r) == 1 else [(2, r[0]), (1, r[1])] for r in rests]
        self.positions = depth
        self.description = "; ".join(f"{letter}: " + "+".join(tokenizer.id_to_piece(i) for i in s)
                                     for letter, s in zip(LETTERS, seqs))

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, 4) log-likelihoods of the letters from logits (B, self.positions, vocab) at the prompts' ends."""
        logp = logits.float().log_softmax(dim=-1)
        return torch.stack([sum(logp[:, -pos, tok] for pos, tok in path) for path in self.paths], dim=1)


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.no_grad()
def last_logits(model, rows: list[list[int]], pad_id: int, n: int = 1) -> torch.Tensor:
    """Logits (B, n, vocab) at the last n positions of each row, rows left-padded into one batch."""
    ids, mask, positions = left_pad(rows, pad_id)
    head = getattr(model, "lm_head", None)
    # Only the last n positions go through the output layer (a (B, T, vocab) tensor can be gigabytes).
    hook = head.register_forward_pre_hook(lambda m, args: (args[0][:, -n:],) + args[1:]) if head is not None else None
    try:
        device = _device(model)
        logits = model(ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device))
    finally:
        if hook is not None:
            hook.remove()
    return logits[:, -n:].float().cpu()


def encode_question(tokenizer, scorer: AnswerScorer, subject: str, dev: list[Question], q: Question, shots: int,
                    limit: int) -> tuple[list[int], int, bool]:
    """(prompt ids, shots used, truncated): drop shots from the end until the prompt fits in `limit` tokens."""
    k = min(shots, len(dev))
    while True:
        ids = tokenizer.encode(build_prompt(subject, dev, q, k), bos=True) + scorer.suffix
        if len(ids) <= limit:
            return ids, k, False
        if k == 0:  # even the bare question is too long: keep BOS and its end
            return ids[:1] + ids[len(ids) - limit + 1:], 0, True
        k -= 1


def _accuracy(correct: int, total: int) -> dict:
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total}


@dataclass(frozen=True)
class EncodedQuestion:
    """One test question ready to score: `index` is its position among its subject's test questions (0-based)."""
    subject: str
    index: int
    question: Question
    ids: list[int]
    shots: int  # used, after dropping shots to fit
    truncated: bool


def encode_all(tokenizer, scorer: AnswerScorer, data: dict, shots: int, limit: int) -> list[EncodedQuestion]:
    """Every test question of `data` ({subject: {"dev", "test"}}), subjects sorted, then in their files' order."""
    return [EncodedQuestion(subject, i, q, *encode_question(tokenizer, scorer, subject, data[subject]["dev"], q,
                                                            shots, limit))
            for subject in sorted(data) for i, q in enumerate(data[subject]["test"])]


def evaluate_mmlu(model, tokenizer, data, *, shots: int = 5, batch_size: int = 8, output: str | None = None,
                  max_seq_len: int | None = None, subjects: list[str] | None = None, log=print,
                  samples: str | None = None, show_prompt: bool = False) -> dict:
    """Accuracy per subject, per category and overall. `data`: an MMLU folder, "hub", or the dict `load_mmlu`
    returns. Writes the report as JSON to `output` (atomically) and prints a table through `log` (None: silent).
    `samples`: a file to write one JSON line per question to (`question_record`; atomically, after the table).
    `show_prompt`: show the first question's complete prompt (`format_prompt`) through `log` before scoring."""
    if shots < 0 or batch_size < 1:
        raise ValueError(f"shots must be >= 0 and batch_size >= 1, got {shots} and {batch_size}")
    if output and os.path.isdir(output):  # found now, not after the whole evaluation
        raise UserError(f"--output {output}: is a folder; give a file name such as {output}/mmlu.json")
    if samples:
        try:
            check_writable_file(samples)
        except OutputError as e:
            raise UserError(f"MMLU samples file {e}") from None
    data = load_mmlu(data, subjects, need_dev=shots > 0) if not isinstance(data, dict) else data
    if not any(split["test"] for split in data.values()):
        raise UserError(f"MMLU data: no test questions found in {len(data)} subject(s)")
    if shots and (few := sorted(f"{name} ({len(split['dev'])})" for name, split in data.items()
                                if split["test"] and len(split["dev"]) < shots)):
        print(f"warning: fewer than {shots} dev examples, so fewer shots, for: {', '.join(few)} (counted as "
              f"'shortened' in the report)", file=sys.stderr)
    limit = max_seq_len or model.config.max_seq_len
    scorer = AnswerScorer(tokenizer)
    items = encode_all(tokenizer, scorer, data, shots, limit)
    if show_prompt and log is not None:
        log(format_prompt(tokenizer, scorer, items[0], shots))
    scores = _score(model, items, tokenizer.pad_id, scorer, batch_size)
    records = [question_record(item, s, p) for item, s, p in zip(items, scores.tolist(), scores.argmax(1).tolist())]
    report = _report(records, shots, limit, scorer)
    if log is not None:
        log(format_report(report))
    if samples:
        try:
            write_samples(samples, records)
        except OSError as e:
            raise WriteError(f"could not write the MMLU samples file {samples} ({e.strerror or e}); disk full?"
                             + (" The results are printed above" if log is not None else "")) from None
    if output:
        write_json(output, report)
    return report


def _score(model, items: list[EncodedQuestion], pad_id: int, scorer: AnswerScorer, batch_size: int) -> torch.Tensor:
    """(len(items), 4) log-likelihoods of A..D, in the order of `items`."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    scores = torch.zeros(len(items), len(LETTERS))
    order = sorted(range(len(items)), key=lambda i: -len(items[i].ids))  # similar lengths share a batch
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            logits = last_logits(model, [items[i].ids for i in chunk], pad_id, scorer.positions)
            scores[chunk] = scorer.scores(logits)
    finally:
        if was_training:
            model.train()
    return scores


def question_record(item: EncodedQuestion, logprobs: list[float], prediction: int) -> dict:
    """One line of the samples file: the question, the letters' log-likelihoods, and the prompt it was asked in."""
    q = item.question
    return {"subject": item.subject, "index": item.index, "question": q.question, "choices": list(q.choices),
            "logprobs": dict(zip(LETTERS, logprobs)), "prediction": LETTERS[prediction], "answer": q.answer,
            "correct": LETTERS[prediction] == q.answer, "shots": item.shots, "prompt_tokens": len(item.ids),
            "truncated": item.truncated}


def _sample_line(record: dict) -> str:
    return json.dumps(json_safe(record), ensure_ascii=False) + "\n"


def write_samples(path: str | os.PathLike, records: list[dict]) -> None:
    """`records` as JSON lines, atomically: the whole file or none (an existing one stays until the rename)."""
    with atomic_write(path) as f:
        for record in records:
            f.write(_sample_line(record))


def _visible_text(tokenizer, ids: list[int]) -> str:
    """`ids` decoded, with the ids `decode` leaves out (BOS, EOS, unknown, control tokens) shown as their pieces."""
    hidden = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id, *tokenizer.special_tokens.values()} - {-1}
    parts, run, text_before = [], [], False
    for i in ids + [None]:
        if i is not None and i not in hidden:
            run.append(i)
            continue
        if run:  # text after text keeps its leading space ("▁world" -> " world")
            parts.append(tokenizer.decode(run, continuation=text_before))
            run, text_before = [], True
        if i is not None:
            parts.append(tokenizer.id_to_piece(i))
    return "".join(parts)


def format_prompt(tokenizer, scorer: AnswerScorer, item: EncodedQuestion, shots: int) -> str:
    """The complete prompt of one question, decoded from the ids the model reads, between two marker lines; the
    last line names the tokens appended after the text (`scorer.suffix`) and those each answer is scored by.
    `shots`: the number asked for (the question's prompt may have fewer)."""
    text_ids = item.ids[:len(item.ids) - len(scorer.suffix)]
    how = f"{item.shots} shot{'s' * (item.shots != 1)}" if item.shots >= shots else \
        f"{item.shots} of {shots} shots: too few dev examples, or dropped to fit"
    how += f"; {len(item.ids)} tokens" + ("; cut to fit: BOS, then the end of the question" * item.truncated)
    appended = (f"then the token(s) {[tokenizer.id_to_piece(i) for i in scorer.suffix]} that all four answers "
                f"share; " if scorer.suffix else "")
    return (f"----- MMLU prompt: {item.subject}, test question {item.index} ({how}) -----\n"
            f"{_visible_text(tokenizer, text_ids)}\n"
            f"----- end of prompt; {appended}scored next: {scorer.description} -----")


def _report(records: list[dict], shots: int, limit: int, scorer: AnswerScorer) -> dict:
    subjects: dict[str, dict] = {}
    for r in records:
        s = subjects.setdefault(r["subject"], {"correct": 0, "total": 0, "shortened": 0, "truncated": 0})
        s["correct"] += r["correct"]
        s["total"] += 1
        s["shortened"] += r["shots"] < shots
        s["truncated"] += r["truncated"]
    if unknown := sorted(s for s in subjects if s not in SUBJECT_CATEGORY):
        print(f"warning: MMLU subject(s) not in the standard 57, counted as 'other': {', '.join(unknown)}",
              file=sys.stderr)
    categories = {}
    for cat in CATEGORIES:
        members = [s for name, s in subjects.items() if SUBJECT_CATEGORY.get(name, "other") == cat]
        if members:
            categories[cat] = _accuracy(sum(s["correct"] for s in members), sum(s["total"] for s in members))
    correct, total = sum(s["correct"] for s in subjects.values()), sum(s["total"] for s in subjects.values())
    per_subject = {name: {**_accuracy(s["correct"], s["total"]), "category": SUBJECT_CATEGORY.get(name, "other"),
                          "shortened": s["shortened"], "truncated": s["truncated"]}
                   for name, s in sorted(subjects.items())}
    return {"average": correct / total if total else 0.0,
            "macro_average": sum(s["accuracy"] for s in per_subject.values()) / max(1, len(per_subject)),
            "correct": correct, "questions": total, "shots": shots, "max_seq_len": limit,
            "shortened": sum(s["shortened"] for s in subjects.values()),
            "truncated": sum(s["truncated"] for s in subjects.values()),
            "answer_tokens": scorer.description, "categories": categories, "subjects": per_subject}


def format_report(r: dict) -> str:
    width = max([len(s) for s in r["subjects"]] + [len("social sciences"), 20])
    lines = [f"MMLU {r['shots']}-shot", f"{'subject':<{width}} {'n':>6} {'accuracy':>9}"]
    lines += [f"{name:<{width}} {s['total']:>6} {s['accuracy']:>9.1%}" for name, s in r["subjects"].items()]
    lines.append("-" * (width + 17))
    lines += [f"{name:<{width}} {c['total']:>6} {c['accuracy']:>9.1%}" for name, c in r["categories"].items()]
    lines.append(f"{'average (questions)':<{width}} {r['questions']:>6} {r['average']:>9.1%}")
    lines.append(f"{'average (subjects)':<{width}} {len(r['subjects']):>6} {r['macro_average']:>9.1%}")
    if r["shortened"] or r["truncated"]:
        lines.append(f"{r['shortened']} prompt(s) had fewer than {r['shots']} shots (too few dev examples, or "
                     f"dropped to fit {r['max_seq_len']} tokens)"
                     + (f"; {r['truncated']} were cut even with 0 shots" if r["truncated"] else ""))
    return "\n".join(lines)
