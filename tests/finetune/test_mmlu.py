"""MMLU: exact prompts (0 and 5 shots), the shot-dropping rule, answer-letter scoring, batching with left padding,
per-subject / per-category arithmetic on a model whose answers are known by construction, and CSV errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune import mmlu
from finetune.errors import UserError
from finetune.mmlu import AnswerScorer, Question, build_prompt, encode_question, evaluate_mmlu, load_mmlu
from finetune.templates import format_choices, load_template, segments_text

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


def test_bundled_sample_and_hub_offline(monkeypatch, tiny_model, tokenizer):
    data = load_mmlu(REPO / "data" / "mmlu_sample")
    assert len(data) == 5 and all(len(s["dev"]) == 5 and s["test"] for s in data.values())
    assert {mmlu.SUBJECT_CATEGORY[s] for s in data} == set(mmlu.CATEGORIES)
    report = evaluate_mmlu(tiny_model(), tokenizer, data, shots=5, log=None)
    assert report["questions"] == sum(len(s["test"]) for s in data.values()) and 0 <= report["average"] <= 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(mmlu, "_hub_reachable", lambda host="": False)
    with pytest.raises(UserError, match="Hub is unreachable"):
        load_mmlu("hub")


def test_standard_subject_map():
    assert len(mmlu.SUBJECT_CATEGORY) == 57
    assert mmlu.SUBJECT_CATEGORY["anatomy"] == "other" and mmlu.SUBJECT_CATEGORY["formal_logic"] == "humanities"
    assert sum(c == "STEM" for c in mmlu.SUBJECT_CATEGORY.values()) == 18
