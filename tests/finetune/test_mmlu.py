"""MMLU: exact prompts (0 and 5 shots), the shot-dropping rule, answer-letter scoring, batching with left padding,
per-subject / per-category arithmetic on a model whose answers are known by construction, and CSV errors."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from finetune import mmlu
from finetune.errors import UserError, WriteError
from finetune.mmlu import AnswerScorer, Question, build_prompt, encode_question, evaluate_mmlu, load_mmlu
from finetune.templates import format_choices, load_template, segments_text

from .test_hub import hub_offline

REPO = Path(__file__).resolve().parents[2]
DEV = [Question(f"Dev question {i}?", (f"w{i}", f"x{i}", f"y{i}", f"z{i}"), "ABCDA"[i]) for i in range(5)]
TEST_Q = Question("Which one moves?", ("a rock", "light", "a tree", "a house"), "B")

ZERO_SHOT = ("The following are multiple choice questions (with answers) about high school physics.\n\n"
             "Which one moves?\nA. a rock\nB. light\nC. a tree\nD. a house\nAnswer:")
FIVE_SHOT = """The following are multiple choice questions (with answers) about high school physics.

Dev question 0?
A. w0
B. x0
C. y0
D. z0
Answer: A

Dev question 1?
A. w1
B. x1
C. y1
D. z1
Answer: B

Dev question 2?
A. w2
B. x2
C. y2
D. z2
Answer: C

Dev question 3?
A. w3
B. x3
C. y3
D. z3
Answer: D

Dev question 4?
A. w4
B. x4
C. y4
D. z4
Answer: A

Which one moves?
A. a rock
B. light
C. a tree
D. a house
Answer:"""


def test_prompt_snapshots():
    assert build_prompt("high_school_physics", DEV, TEST_Q, 0) == ZERO_SHOT
    assert build_prompt("high_school_physics", DEV, TEST_Q, 5) == FIVE_SHOT
    # k shots are the first k dev questions
    assert build_prompt("high_school_physics", DEV, TEST_Q, 2) == FIVE_SHOT[:FIVE_SHOT.index("Dev question 2?")] + \
        FIVE_SHOT[FIVE_SHOT.index("Which one moves?"):]


def test_prompt_equals_the_mmlu_template():
    header = "The following are multiple choice questions (with answers) about high school physics."
    messages = [{"role": "system", "content": header}]
    for q in DEV:
        messages += [{"role": "user", "content": q.question, "input": format_choices(list(q.choices))},
                     {"role": "assistant", "content": q.answer}]
    messages.append({"role": "user", "content": TEST_Q.question, "input": format_choices(list(TEST_Q.choices))})
    assert segments_text(load_template("mmlu").prompt(messages)) == "<s>" + FIVE_SHOT


def test_shots_are_dropped_from_the_end_until_the_prompt_fits(tokenizer):
    scorer = AnswerScorer(tokenizer)
    lengths = [len(tokenizer.encode(build_prompt("physics", DEV, TEST_Q, k), bos=True) + scorer.suffix)
               for k in range(6)]
    assert lengths == sorted(lengths) and len(set(lengths)) == 6
    ids, k, cut = encode_question(tokenizer, scorer, "physics", DEV, TEST_Q, 5, lengths[3])
    assert (k, cut) == (3, False)
    assert ids == tokenizer.encode(build_prompt("physics", DEV, TEST_Q, 3), bos=True) + scorer.suffix
    assert encode_question(tokenizer, scorer, "physics", DEV, TEST_Q, 5, lengths[5])[1:] == (5, False)
    # Not even the bare question fits: BOS and the end of the prompt are kept.
    ids, k, cut = encode_question(tokenizer, scorer, "physics", DEV, TEST_Q, 5, lengths[0] - 4)
    full = tokenizer.encode(ZERO_SHOT.replace("high school physics", "physics"), bos=True) + scorer.suffix
    assert (k, cut, len(ids)) == (0, True, lengths[0] - 4) and ids == full[:1] + full[5:]


class _Pieces:
    """A stand-in tokenizer with given encodings of " A" .. " D"."""

    def __init__(self, encodings: dict[str, list[int]]):
        self.encodings, self.path = encodings, "<pieces>"

    def encode(self, text, continuation=False):
        return self.encodings[text]

    def id_to_piece(self, i):
        return f"<{i}>"


def test_answer_scorer_single_pieces_shared_prefix_and_mixed(tokenizer):
    llama_like = AnswerScorer(_Pieces({" A": [319], " B": [350], " C": [315], " D": [360]}))  # LLaMA's ids
    assert llama_like.suffix == [] and llama_like.paths == [[(1, 319)], [(1, 350)], [(1, 315)], [(1, 360)]]
    logits = torch.randn(2, 1, 400)
    expected = logits[:, -1].log_softmax(-1)[:, [319, 350, 315, 360]]
    torch.testing.assert_close(llama_like.scores(logits), expected)
    assert torch.equal(llama_like.scores(logits).argmax(1), logits[:, -1, [319, 350, 315, 360]].argmax(1))

    ours = AnswerScorer(tokenizer)  # " A" -> "▁" + "A": the shared "▁" goes into the prompt
    assert [tokenizer.id_to_piece(i) for i in ours.suffix] == ["▁"]
    assert [len(p) for p in ours.paths] == [1, 1, 1, 1] and len({p[0][1] for p in ours.paths}) == 4

    # A tokenizer with "▁B" as one piece but "▁" + "A" (as small BPE vocabularies have): B is scored one position
    # earlier, the others over two.
    space, a, b, c, d = 7, 30, 31, 32, 33
    scorer = AnswerScorer(_Pieces({" A": [space, a], " B": [b], " C": [space, c], " D": [space, d]}))
    assert scorer.suffix == [space] and scorer.paths[1] == [(2, b)]
    logits = torch.randn(3, 2, 40)
    logp = logits.log_softmax(-1)
    torch.testing.assert_close(scorer.scores(logits)[:, 0], logp[:, 0, space] + logp[:, 1, a])
    torch.testing.assert_close(scorer.scores(logits)[:, 1], logp[:, 0, b])

    with pytest.raises(ValueError, match="cannot score MMLU answers"):
        AnswerScorer(_Pieces({" A": [1, 2, 3], " B": [1, 2, 4], " C": [5], " D": [6]}))


def test_left_padded_batch_equals_single_rows(tiny_model):
    model = tiny_model()
    rows = [[1, 5, 9, 20, 33, 40, 41], [1, 7, 8], [1, 100, 200, 300, 12]]
    batched = mmlu.last_logits(model, rows, pad_id=0, n=2)
    for i, r in enumerate(rows):
        with torch.no_grad():
            single = model(torch.tensor([r]))[:, -2:]
        torch.testing.assert_close(batched[i:i + 1], single, atol=1e-5, rtol=0)


class _Oracle(torch.nn.Module):
    """A model that answers each test question with a chosen letter: it reads the question back from the prompt."""

    def __init__(self, tokenizer, choice: dict[str, str], max_seq_len: int = 512):
        super().__init__()
        self.tokenizer, self.choice, self.scorer = tokenizer, choice, AnswerScorer(tokenizer)
        self.config = type("Config", (), {"max_seq_len": max_seq_len})()

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        logits = torch.zeros(*input_ids.shape, self.tokenizer.vocab_size)
        n = len(self.scorer.suffix)
        for row, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            text = self.tokenizer.decode(ids[mask.bool()][:len(ids[mask.bool()]) - n].tolist())
            question = text.rsplit("\n\n", 1)[-1].split("\n")[0]
            for pos, tok in self.scorer.paths["ABCD".index(self.choice[question])]:
                logits[row, -pos, tok] = 10.0
        return logits


def _questions(subject: str, n: int, right: int) -> tuple[list[Question], dict[str, str]]:
    qs = [Question(f"{subject} question {i}?", ("one", "two", "three", "four"), "ABCD"[i % 4]) for i in range(n)]
    # The oracle is right on the first `right` questions and picks the next letter on the others.
    choice = {q.question: q.answer if i < right else "ABCD"[("ABCD".index(q.answer) + 1) % 4]
              for i, q in enumerate(qs)}
    return qs, choice


def test_scores_and_category_averages_on_known_answers(tokenizer, tmp_path, capsys):
    data, choice = {}, {}
    for subject, n, right in (("abstract_algebra", 4, 3), ("philosophy", 2, 1), ("astronomy", 2, 2),
                              ("made_up_subject", 3, 0)):
        qs, c = _questions(subject, n, right)
        data[subject] = {"dev": DEV, "test": qs}
        choice |= c
    out = tmp_path / "results" / "mmlu.json"
    report = evaluate_mmlu(_Oracle(tokenizer, choice), tokenizer, data, shots=2, batch_size=3, output=str(out))
    s = report["subjects"]
    assert [s[k]["correct"] for k in ("abstract_algebra", "philosophy", "astronomy", "made_up_subject")] == \
        [3, 1, 2, 0]
    assert s["abstract_algebra"]["accuracy"] == 0.75 and s["made_up_subject"]["category"] == "other"
    assert report["categories"] == {
        "STEM": {"accuracy": 5 / 6, "correct": 5, "total": 6},  # abstract_algebra and astronomy, over questions
        "humanities": {"accuracy": 0.5, "correct": 1, "total": 2},
        "other": {"accuracy": 0.0, "correct": 0, "total": 3}}
    assert report["average"] == 6 / 11 and report["macro_average"] == (0.75 + 0.5 + 1.0 + 0.0) / 4
    assert report["shortened"] == 0 and report["questions"] == 11
    captured = capsys.readouterr()
    assert "made_up_subject" in captured.err and "counted as 'other'" in captured.err
    assert "average (questions)" in captured.out and "STEM" in captured.out
    assert json.loads(out.read_text()) == report and not Path(str(out) + ".tmp").exists()
    # A short context drops shots and says so.
    short = evaluate_mmlu(_Oracle(tokenizer, choice, max_seq_len=10_000), tokenizer, data, shots=5, log=None,
                          max_seq_len=len(tokenizer.encode(build_prompt("made_up_subject", DEV, data[
                              "made_up_subject"]["test"][0], 1), bos=True)) + 1)
    assert short["shortened"] > 0 and short["average"] == report["average"]


def test_too_few_dev_examples_no_questions_and_a_folder_output(tokenizer, tmp_path, capsys):
    qs, choice = _questions("astronomy", 2, 2)
    data = {"astronomy": {"dev": DEV[:2], "test": qs}}
    report = evaluate_mmlu(_Oracle(tokenizer, choice), tokenizer, data, shots=5, log=None)
    assert report["shortened"] == 2 and report["subjects"]["astronomy"]["shortened"] == 2
    assert "fewer than 5 dev examples, so fewer shots, for: astronomy (2)" in capsys.readouterr().err
    with pytest.raises(UserError, match="no test questions found"):
        evaluate_mmlu(_Oracle(tokenizer, choice), tokenizer, {"astronomy": {"dev": DEV, "test": []}}, log=None)

    def never(*args, **kwargs):
        raise AssertionError("evaluated before checking --output")

    with pytest.raises(UserError, match="is a folder"):
        evaluate_mmlu(never, tokenizer, data, output=str(tmp_path), log=None)


def _write(root: Path, subject: str, dev: str | None, test: str) -> None:
    (root / "dev").mkdir(parents=True, exist_ok=True)
    (root / "test").mkdir(parents=True, exist_ok=True)
    if dev is not None:
        (root / "dev" / f"{subject}_dev.csv").write_text(dev)
    (root / "test" / f"{subject}_test.csv").write_text(test)


def test_csv_reading_and_errors(tmp_path):
    good = '"What is ""x"", really?",a,b,"c, d",e,C\nSecond?,1,2,3,4,A\n'
    _write(tmp_path / "ok", "anatomy", good, good)
    data = load_mmlu(tmp_path / "ok")
    assert data["anatomy"]["test"][0] == Question('What is "x", really?', ("a", "b", "c, d", "e"), "C")
    _write(tmp_path / "cols", "anatomy", good, "Q1?,a,b,c,d,A\nQ2?,a,b,c,A\n")
    with pytest.raises(UserError, match=r"anatomy_test\.csv:2: expected 6 columns .* found 5"):
        load_mmlu(tmp_path / "cols")
    _write(tmp_path / "ans", "anatomy", "Q?,a,b,c,d,E\n", good)
    with pytest.raises(UserError, match=r"anatomy_dev\.csv:1: the answer must be one of A, B, C, D; got 'E'"):
        load_mmlu(tmp_path / "ans")
    _write(tmp_path / "nodev", "anatomy", None, good)
    with pytest.raises(UserError, match=r"missing dev file .*anatomy_dev\.csv"):
        load_mmlu(tmp_path / "nodev")
    assert load_mmlu(tmp_path / "nodev", need_dev=False)["anatomy"]["dev"] == []
    with pytest.raises(UserError, match="unknown MMLU subject.*virology"):
        load_mmlu(tmp_path / "ok", ["virology"])
    with pytest.raises(UserError, match="no test/ folder"):
        load_mmlu(tmp_path)


def test_bundled_sample_and_hub_offline(monkeypatch, tmp_path, tiny_model, tokenizer):
    data = load_mmlu(REPO / "data" / "mmlu_sample")
    assert len(data) == 5 and all(len(s["dev"]) == 5 and s["test"] for s in data.values())
    assert {mmlu.SUBJECT_CATEGORY[s] for s in data} == set(mmlu.CATEGORIES)
    report = evaluate_mmlu(tiny_model(), tokenizer, data, shots=5, log=None)
    assert report["questions"] == sum(len(s["test"]) for s in data.values()) and 0 <= report["average"] <= 1
    hub_offline(monkeypatch, tmp_path)
    with pytest.raises(UserError, match=re.escape(
            f"--data hub (dev split): Hub dataset 'cais/mmlu' is not in the datasets cache ({tmp_path}) and "
            f"HF_HUB_OFFLINE is set: load it once where the Hub can be reached (same cache), or unset HF_HUB_OFFLINE, "
            f"or pass the MMLU CSV folder instead (dev/ and test/ from https://")):
        load_mmlu("hub")


def test_standard_subject_map():
    assert len(mmlu.SUBJECT_CATEGORY) == 57
    assert mmlu.SUBJECT_CATEGORY["anatomy"] == "other" and mmlu.SUBJECT_CATEGORY["formal_logic"] == "humanities"
    assert sum(c == "STEM" for c in mmlu.SUBJECT_CATEGORY.values()) == 18


# --- per-question records (samples=FILE) and the prompt shown ---------------------------------------------------

RECORD_KEYS = {"subject", "index", "question", "choices", "logprobs", "prediction", "answer", "correct", "shots",
               "prompt_tokens", "truncated"}


def _read_records(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _argmax(logprobs: dict) -> str:
    return max("ABCD", key=lambda letter: logprobs[letter])


def test_samples_one_line_per_question_in_data_order(tokenizer, tmp_path):
    data, choice = {}, {}
    # Given out of order, with a subject that has too few dev examples (its prompts are shortened).
    for subject, n, right, dev in (("philosophy", 3, 1, DEV), ("astronomy", 5, 4, DEV), ("anatomy", 2, 0, DEV[:2])):
        qs, c = _questions(subject, n, right)
        data[subject] = {"dev": dev, "test": qs}
        choice |= c
    model = _Oracle(tokenizer, choice)
    out = tmp_path / "samples.jsonl"
    report = evaluate_mmlu(model, tokenizer, data, shots=3, batch_size=4, samples=str(out), log=None)
    records = _read_records(out)
    assert all(set(r) == RECORD_KEYS for r in records)
    assert [(r["subject"], r["index"]) for r in records] == \
        [(s, i) for s in ("anatomy", "astronomy", "philosophy") for i in range(len(data[s]["test"]))]
    scorer = AnswerScorer(tokenizer)
    for r in records:
        q = data[r["subject"]]["test"][r["index"]]
        assert (r["question"], tuple(r["choices"]), r["answer"]) == (q.question, q.choices, q.answer)
        assert r["prediction"] == _argmax(r["logprobs"]) == choice[q.question]  # the oracle's pick, by construction
        assert r["correct"] == (r["prediction"] == r["answer"]) and all(v <= 0 for v in r["logprobs"].values())
        ids, k, cut = encode_question(tokenizer, scorer, r["subject"], data[r["subject"]]["dev"], q, 3, 512)
        assert (r["shots"], r["prompt_tokens"], r["truncated"]) == (k, len(ids), cut)
    assert [r["shots"] for r in records if r["subject"] == "anatomy"] == [2, 2]
    # The report is the records counted.
    assert sum(r["correct"] for r in records) / len(records) == report["average"] == 5 / 10
    for subject, s in report["subjects"].items():
        mine = [r for r in records if r["subject"] == subject]
        assert sum(r["correct"] for r in mine) == s["correct"] and len(mine) == s["total"]
        assert sum(r["shots"] < 3 for r in mine) == s["shortened"]
    # Another batch size (another batching order) writes the same file.
    again = tmp_path / "again.jsonl"
    evaluate_mmlu(model, tokenizer, data, shots=3, batch_size=1, samples=str(again), log=None)
    assert again.read_bytes() == out.read_bytes()


def test_samples_of_a_real_model_hold_its_log_likelihoods(tiny_model, tokenizer, tmp_path):
    model = tiny_model()
    data = load_mmlu(REPO / "data" / "mmlu_sample")
    out = tmp_path / "samples.jsonl"
    report = evaluate_mmlu(model, tokenizer, data, shots=5, batch_size=4, samples=str(out), log=None)
    records = _read_records(out)
    assert len(records) == report["questions"] == sum(len(s["test"]) for s in data.values())
    assert all(r["prediction"] == _argmax(r["logprobs"]) for r in records)
    assert sum(r["correct"] for r in records) == report["correct"]
    assert sum(r["truncated"] for r in records) == report["truncated"] and \
        sum(r["shots"] < 5 for r in records) == report["shortened"] > 0  # the tiny model's 256-token context
    assert all(r["prompt_tokens"] <= model.config.max_seq_len for r in records)
    # The log-likelihoods are the scorer's, for this question's prompt alone (no padding).
    scorer, r = AnswerScorer(tokenizer), records[7]
    ids, _, _ = encode_question(tokenizer, scorer, r["subject"], data[r["subject"]]["dev"],
                                data[r["subject"]]["test"][r["index"]], 5, model.config.max_seq_len)
    direct = scorer.scores(mmlu.last_logits(model, [ids], tokenizer.pad_id, scorer.positions))[0]
    torch.testing.assert_close(torch.tensor([r["logprobs"][x] for x in "ABCD"]), direct, atol=1e-4, rtol=0)


def test_samples_file_is_whole_or_untouched(tokenizer, tmp_path, monkeypatch):
    qs, choice = _questions("astronomy", 4, 2)
    data = {"astronomy": {"dev": DEV, "test": qs}}
    out = tmp_path / "samples.jsonl"
    out.write_text("an earlier file\n")
    real, written = mmlu._sample_line, []

    def fail_on_the_third(record):
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        written.append(record)
        return real(record)

    monkeypatch.setattr(mmlu, "_sample_line", fail_on_the_third)
    with pytest.raises(WriteError, match="could not write the MMLU samples file .*No space left on device") as e:
        evaluate_mmlu(_Oracle(tokenizer, choice), tokenizer, data, shots=1, samples=str(out), log=None)
    assert e.value.exit_code == 1 and len(written) == 2
    assert out.read_text() == "an earlier file\n" and sorted(p.name for p in tmp_path.iterdir()) == ["samples.jsonl"]


@pytest.mark.parametrize("kind", ["folder", "under a file", "link"])
def test_bad_samples_path_fails_before_scoring(tokenizer, tmp_path, kind):
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    path, message = {"folder": (tmp_path, f"{tmp_path}: is a folder"),
                     "under a file": (tmp_path / "file" / "s.jsonl", f"{tmp_path}/file: cannot be created, .*file"),
                     "link": (tmp_path / "link", f"{tmp_path}/link: is a symbolic link")}[kind]

    def never(*args, **kwargs):
        raise AssertionError("evaluated before checking the samples file")

    qs, _ = _questions("astronomy", 2, 2)
    with pytest.raises(UserError, match=f"MMLU samples file {message}"):
        evaluate_mmlu(never, tokenizer, {"astronomy": {"dev": DEV, "test": qs}}, samples=str(path), log=None)
    assert (tmp_path / "file").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["file", "link"]


class _Blank(_Oracle):
    """Equal logits everywhere: for prompts the oracle cannot read (cut to fit)."""

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return torch.zeros(*input_ids.shape, self.tokenizer.vocab_size)


def _shown(tokenizer, data, **kwargs) -> str:
    logged = []
    evaluate_mmlu(_Blank(tokenizer, {}), tokenizer, data, log=logged.append, show_prompt=True, **kwargs)
    assert len(logged) == 2 and logged[1].startswith("MMLU")  # the prompt, then the table
    return logged[0]


def test_show_prompt_is_the_prompt_the_model_reads(tokenizer):
    # The first question of the first subject in sorted order.
    data = {"world_religions": {"dev": DEV, "test": [TEST_Q]}, "high_school_physics": {"dev": DEV, "test": [TEST_Q]}}
    scorer = AnswerScorer(tokenizer)
    n = len(tokenizer.encode(FIVE_SHOT, bos=True) + scorer.suffix)
    assert _shown(tokenizer, data, shots=5) == (
        f"----- MMLU prompt: high_school_physics, test question 0 (5 shots; {n} tokens) -----\n"
        f"<s>{FIVE_SHOT}\n"
        f"----- end of prompt; then the token(s) ['▁'] that all four answers share; scored next: "
        f"{scorer.description} -----")
    assert _shown(tokenizer, data, shots=0).split("\n", 1)[1].startswith(f"<s>{ZERO_SHOT}\n----- end of prompt")
    # Fewer dev examples than shots, and a context that fits two shots: said in the first line.
    short = {"high_school_physics": {"dev": DEV[:3], "test": [TEST_Q]}}
    assert "(3 of 5 shots: too few dev examples, or dropped to fit; " in _shown(tokenizer, short, shots=5)
    fits_two = len(tokenizer.encode(build_prompt("high_school_physics", DEV, TEST_Q, 2), bos=True) + scorer.suffix)
    shown = _shown(tokenizer, data, shots=5, max_seq_len=fits_two)
    assert f"(2 of 5 shots: too few dev examples, or dropped to fit; {fits_two} tokens)" in shown
    assert f"<s>{build_prompt('high_school_physics', DEV, TEST_Q, 2)}\n-----" in shown
    # Cut even with no shots: BOS, then the end of the question, as the model reads it.
    shown = _shown(tokenizer, data, shots=5, max_seq_len=12).split("\n")
    assert "cut to fit: BOS, then the end of the question" in shown[0]
    assert shown[1].startswith("<s>") and shown[-2].endswith("Answer:") and len(shown[1]) < len(ZERO_SHOT)


def test_shown_text_keeps_what_decode_leaves_out(tokenizer):
    ids = tokenizer.encode("The house", bos=True) + [tokenizer.unk_id] + tokenizer.encode(" is old", continuation=True)
    assert tokenizer.decode(ids) == "The house is old"  # BOS and the unknown piece vanish
    assert mmlu._visible_text(tokenizer, ids) == "<s>The house<unk> is old"
