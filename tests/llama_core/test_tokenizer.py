import pickle
from pathlib import Path

import pytest

from llama_core.tokenizer import Tokenizer, train_tokenizer

LLAMA_TOKENIZER = Path("/work/shared/data/llama_tokenizer.model")  # a developer's copy; never required

SAMPLES = ["the model was trained on 12345 tokens", "Привет, 世界", "emoji 🙂 and tab\tand\x01control\x7f",
           "  leading and  double spaces ", "line one\nline two\n", "Hello World!"]


def test_specials(tokenizer):
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2, 0)
    assert tokenizer.vocab_size == 320
    assert [tokenizer.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    ids = tokenizer.encode("the day", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and ids[1:-1] == tokenizer.encode("the day")
    assert tokenizer.decode(ids) == "the day"
    assert tokenizer.encode("") == [] and tokenizer.decode([]) == ""


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids) and tokenizer.unk_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer.encode(text, continuation=True), continuation=True) == text


def test_digits_and_bytes(tokenizer):
    assert [tokenizer.id_to_piece(i) for i in tokenizer.encode("12345")] == ["▁", "1", "2", "3", "4", "5"]
    assert [tokenizer.id_to_piece(i) for i in tokenizer.encode("🙂", continuation=True)] == [
        "<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    assert [tokenizer.id_to_piece(i) for i in tokenizer.encode("\t\n", continuation=True)] == ["<0x09>", "<0x0A>"]


def test_continuation(tokenizer):
    for a, b in [("the model", " was good"), ("Привет,", " мир"), ("x", "y"), ("one", "\ntwo"), ("A", " 42")]:
        ids = tokenizer.encode(a) + tokenizer.encode(b, continuation=True)
        assert tokenizer.decode(ids) == a + b
        if b.startswith(" "):  # split before a space: the segments tokenize like the whole text
            assert ids == tokenizer.encode(a + b)
    assert tokenizer.decode(tokenizer.encode(" day", continuation=True)) == "day"
    assert tokenizer.decode(tokenizer.encode(" day", continuation=True), continuation=True) == " day"
    assert tokenizer.encode("day", continuation=True) != tokenizer.encode("day")


def test_decode_errors_and_pickle(tokenizer):
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.decode([5, 320])
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.encode("the day x", continuation=True) == tokenizer.encode("the day x", continuation=True)


def test_train_exact_and_deterministic(corpus, tmp_path):
    for vocab_size in (320, 400):
        a = train_tokenizer(corpus, tmp_path / "a.model", vocab_size)
        b = train_tokenizer(iter(corpus), tmp_path / "b.model", vocab_size)
        assert a.vocab_size == vocab_size
        assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
        assert a.sha256 == b.sha256 and len(a.sha256) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.model", "b.model"]  # no temporary file left


def test_train_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="at least 308"):  # 259 + 49 distinct characters
        train_tokenizer(corpus, tmp_path / "t.model", 300)
    with pytest.raises(ValueError, match="too large for this corpus"):
        train_tokenizer(["a tiny corpus"] * 10, tmp_path / "t.model", 1024)
    with pytest.raises(ValueError, match="must exceed 259"):
        train_tokenizer(corpus, tmp_path / "t.model", 100)
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer(["", "\n"], tmp_path / "t.model", 320)
    assert not (tmp_path / "t.model").exists()


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "corrupt.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="corrupt.model"):
        Tokenizer(tmp_path / "corrupt.model")


@pytest.mark.skipif(not LLAMA_TOKENIZER.exists(), reason="the LLaMA tokenizer file is not available")
def test_llama_tokenizer():
    tok = Tokenizer(LLAMA_TOKENIZER)
    assert tok.vocab_size == 32000 and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    assert tok.encode("Hello world", bos=True) == [1, 15043, 3186]
    assert tok.encode("Hello") + tok.encode(" world", continuation=True) == [15043, 3186]
    assert tok.encode(" Hello") == [29871, 15043] and tok.encode("12", continuation=True) == [29896, 29906]
    assert tok.decode(tok.encode("Привет, 世界 🙂\n")) == "Привет, 世界 🙂\n"
