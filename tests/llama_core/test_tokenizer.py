import base64
import itertools
import json
import pickle
import random
import shutil
from pathlib import Path

import pytest

from llama_core.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)

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


# --- Hugging Face tokenizer.json (byte-level BPE, Llama 3 style) ---------------------------------------------------

from ..conftest import write_llama3_json  # noqa: E402

EOT, BEGIN, END = 128009, 128000, 128001
UNICODE = ["Hello world", "Привет, 世界 🙂 é😀", "  two  spaces\t\ttabs\n\nlines\r\n", "12345678 3.14",
           "I'm SHOUTING'LL", "\x00\x01\x7f", ""]


@pytest.fixture(scope="module")
def llama3_json(corpus, tmp_path_factory) -> Path:
    return write_llama3_json(tmp_path_factory.mktemp("llama3"), corpus)


@pytest.fixture(scope="module")
def bpe(llama3_json) -> HFTokenizer:
    return load_tokenizer(llama3_json)


@pytest.mark.parametrize("text", SAMPLES + UNICODE)
def test_bpe_round_trip(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < 300 for i in ids)  # plain text never gives a special id, and the post-processor does not run
    assert bpe.decode(ids) == bpe.decode(ids, continuation=True) == text
    assert bpe.encode(text, continuation=True) == ids


def test_bpe_specials(bpe):
    assert type(bpe) is HFTokenizer and bpe.vocab_size == 128256  # the largest id + 1, not the 556 tokens
    assert (bpe.bos_id, bpe.eos_id, bpe.unk_id, bpe.pad_id) == (BEGIN, END, -1, 128004)
    assert bpe.stop_ids == [END, EOT, 128008]
    assert len(bpe.special_tokens) == 256 and bpe.special_tokens["<|eot_id|>"] == EOT
    assert bpe.token_to_id("<|eot_id|>") == EOT and bpe.id_to_piece(EOT) == "<|eot_id|>"
    assert bpe.token_to_id("<|no_such_token|>") is None
    assert all(bpe.token_to_id(bpe.id_to_piece(i)) == i for i in [*range(300), BEGIN, 128255])
    ids = bpe.encode("the day", bos=True, eos=True)
    assert ids == [BEGIN] + bpe.encode("the day") + [END]
    assert bpe.decode([BEGIN, *ids, EOT, 128004, 128255]) == "the day"  # bos, eos and every control token skipped
    for bad in ([300], [1000], [128256], [-1]):  # unused ids between the BPE tokens and the specials, out of range
        with pytest.raises(ValueError, match="not in the vocabulary"):
            bpe.decode([5, *bad])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        bpe.id_to_piece(1000)


def test_control_tokens_in_user_text_stay_text(bpe, tokenizer):
    text = "a<|eot_id|>b <|begin_of_text|><|start_header_id|>user<|end_header_id|>"
    for tok in (bpe, pickle.loads(pickle.dumps(bpe))):  # tokenizers does not pickle encode_special_tokens
        ids = tok.encode(text, bos=True)
        assert EOT not in ids and ids.count(BEGIN) == 1 and max(ids[1:]) < 300
        assert tok.decode(ids) == text
    assert bpe.encode("<|eot_id|>") == bpe.encode("<|", continuation=True) + bpe.encode("eot_id|>", continuation=True)
    ids = tokenizer.encode("<s> and </s>")  # SentencePiece never reads control pieces from text
    assert 1 not in ids and 2 not in ids and tokenizer.decode(ids) == "<s> and </s>"
    assert tokenizer.special_tokens == {"<s>": 1, "</s>": 2} and tokenizer.token_to_id("</s>") == 2
    assert tokenizer.token_to_id("<|eot_id|>") is None and tokenizer.stop_ids == [2]


def test_bpe_partial_characters(bpe):
    ids = bpe.encode("é😀!", continuation=True)
    texts = [bpe.decode(ids[:n]) for n in range(len(ids) + 1)]
    assert texts[-1] == "é😀!" and any(t.endswith("\ufffd") for t in texts)  # a split character: U+FFFD, no error
    assert all(t.rstrip("\ufffd") in ("", "é", "é😀", "é😀!") for t in texts)


def test_bpe_config_names_the_specials(tmp_path, corpus):
    folder = tmp_path / "instruct"
    write_llama3_json(folder, corpus, {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>"},
                                       "pad_token": None})
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (BEGIN, EOT, 128004) and tok.stop_ids == [EOT, END, 128008]
    assert tok.encode("x", eos=True)[-1] == EOT
    assert sorted(tok.files) == ["tokenizer.json", "tokenizer_config.json"]
    assert tok.files["tokenizer_config.json"] == folder / "tokenizer_config.json"
    # special_tokens_map.json is read too; tokenizer_config.json wins where both name a token
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|end_of_text|>",
                                                                "pad_token": "<|reserved_special_token_9|>"}))
    tok2 = load_tokenizer(folder)
    assert (tok2.eos_id, tok2.pad_id) == (EOT, 128017) and tok2.sha256 != tok.sha256
    assert "special_tokens_map.json" in tok2.files
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|missing|>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: eos_token '<\|missing\|>' is not a token"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": 5}))
    with pytest.raises(ValueError, match="bos_token must be"):
        load_tokenizer(folder)


def test_bpe_without_bos_or_specials(tmp_path, llama3_json):
    spec = json.loads(llama3_json.read_text())
    post = spec["post_processor"]  # with no config, BOS is what the post-processor puts first, whatever its name
    post["single"][0]["SpecialToken"]["id"] = "<|reserved_special_token_3|>"
    post["special_tokens"] = {"<|reserved_special_token_3|>": {"id": "<|reserved_special_token_3|>", "ids": [128011],
                                                               "tokens": ["<|reserved_special_token_3|>"]}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert load_tokenizer(tmp_path).bos_id == 128011
    keep = {t["content"]: t["id"] for t in spec["added_tokens"]} | {"<|begin_of_text|>": None}
    spec["model"]["vocab"] = {k: v for k, v in spec["model"]["vocab"].items() if k not in keep}
    spec["added_tokens"], spec["post_processor"] = [], None
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size, tok.stop_ids) == (-1, -1, 0, 300, [])
    assert tok.decode(tok.encode("the day")) == "the day"
    with pytest.raises(ValueError, match="has no BOS token"):
        tok.encode("x", bos=True)
    with pytest.raises(ValueError, match="has no EOS token"):
        tok.encode("x", eos=True)
    assert json.loads(tok.files["tokenizer_config.json"]) == {  # written for transformers, naming what there is
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}


def test_bpe_sha256_follows_the_bytes(tmp_path, llama3_json, bpe):
    (tmp_path / "same").mkdir()
    (tmp_path / "same" / "tokenizer.json").write_bytes(llama3_json.read_bytes())
    assert load_tokenizer(tmp_path / "same").sha256 == bpe.sha256 and len(bpe.sha256) == 64
    spec = json.loads(llama3_json.read_text())
    spec["model"]["merges"] = spec["model"]["merges"][:-1]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert load_tokenizer(tmp_path).sha256 != bpe.sha256


def test_bpe_refuses_a_dummy_prefix(tmp_path, llama3_json):
    spec = json.loads(llama3_json.read_text())
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="SentencePiece-style tokenizer.json .* tokenizer.model instead"):
        load_tokenizer(tmp_path)
    spec["pre_tokenizer"]["prepend_scheme"] = "never"
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert load_tokenizer(tmp_path).encode("a b")


# --- Meta's tiktoken tokenizer.model ---------------------------------------------------------------------------------

MERGED = [b"he", b"ll", b"lo", b"el", b"hel", b"llo", b"hell", b"hello", b" w", b"or", b"ld", b" wor", b" world",
          b"ow", b"wo", b"rl", b"dew"]  # "dew": no merge leads to it (no "de", no "ew"); tiktoken finds it whole


def write_tiktoken(path: Path, seed: int = 0) -> dict[bytes, int]:
    """A tiny tiktoken file: the 256 bytes and a few merged tokens, ranks shuffled, lines in another order."""
    rng = random.Random(seed)
    tokens = [bytes([b]) for b in range(256)]
    rng.shuffle(tokens)
    ranks = {t: r for r, t in enumerate(tokens + MERGED)}
    lines = [base64.b64encode(t) + b" %d" % r for t, r in ranks.items()]
    rng.shuffle(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return ranks


def tiktoken_bpe(ranks: dict[bytes, int], piece: bytes) -> list[int]:
    """tiktoken's algorithm: the whole piece if it is a token, else merge the lowest-ranked adjacent pair."""
    if piece in ranks:
        return [ranks[piece]]
    parts = [bytes([b]) for b in piece]
    while True:
        pairs = [(ranks[a + b], i) for i, (a, b) in enumerate(itertools.pairwise(parts)) if a + b in ranks]
        if not pairs:
            return [ranks[p] for p in parts]
        _, i = min(pairs)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def test_tiktoken(tmp_path):
    ranks = write_tiktoken(tmp_path / "meta" / "tokenizer.model")
    tok = load_tokenizer(tmp_path / "meta")
    n = len(ranks)
    assert type(tok) is HFTokenizer and tok.vocab_size == n + 256
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (n, n + 1, n + 4, -1)
    assert tok.stop_ids == [n + 1, n + 9, n + 8] and tok.token_to_id("<|eot_id|>") == n + 9
    assert tok.encode("hello world", bos=True) == [n, ranks[b"hello"], ranks[b" world"]]
    assert tok.encode("dew") == [ranks[b"dew"]] and len(tok.encode("dewd")) == 4  # whole pieces only
    rng = random.Random(1)
    for _ in range(300):  # one pre-token each: a run of letters, after an optional space
        word = rng.choice(["", " "]) + "".join(rng.choice("helowrd") for _ in range(rng.randint(1, 12)))
        assert tok.encode(word) == tiktoken_bpe(ranks, word.encode()), word
    for text in SAMPLES + UNICODE + ["a<|eot_id|>b"]:
        assert tok.decode(tok.encode(text)) == text and max(tok.encode(text), default=0) < n
    # its files make a tokenizer.json folder that loads with the same ids (and with transformers, bos and eos)
    out = tmp_path / "hf"
    out.mkdir()
    for name, data in tok.files.items():
        (out / name).write_bytes(data)
    again = load_tokenizer(out)
    assert again.path == str(out / "tokenizer.json") and again.sha256 != tok.sha256
    text = "hello world, hellow <|eot_id|> é😀"
    assert again.encode(text, bos=True) == tok.encode(text, bos=True) and again.stop_ids == tok.stop_ids
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf.bos_token_id, hf.eos_token_id) == (n, n + 1)
    assert hf.encode("hello world") == tok.encode("hello world", bos=True)


def test_tiktoken_errors(tmp_path):
    file = tmp_path / "tokenizer.model"
    ranks = write_tiktoken(file)
    good = file.read_bytes()
    cases = [(good + b"not a line\n", r"tokenizer.model:274: not a tiktoken line"),
             (good + b"QQ 999\n", r"tokenizer.model:274: bad base64"),
             (good + base64.b64encode(b"xyz") + b" 999\n", r"ranks of its 274 tokens are not 0..273"),
             (b"\n".join(line for line in good.split(b"\n") if not line.startswith(base64.b64encode(b"h") + b" ")),
              r"byte\(s\) \[104\] have no rank")]
    for data, message in cases:
        file.write_bytes(data)
        with pytest.raises(ValueError, match=message):
            load_tokenizer(file)
    assert len(ranks) == 273


# --- which file a folder's tokenizer comes from -----------------------------------------------------------------

def test_folder_selection(tmp_path, tokenizer, llama3_json):
    both = tmp_path / "llama2"  # a Llama 2 folder from the Hub: SentencePiece wins over the converted tokenizer.json
    both.mkdir()
    shutil.copy(tokenizer.path, both / "tokenizer.model")
    shutil.copy(llama3_json, both / "tokenizer.json")
    tok = load_tokenizer(both)
    assert type(tok) is SentencePieceTokenizer and tok.path == str(both / "tokenizer.model")
    assert tok.files == {"tokenizer.model": both / "tokenizer.model"} and tok.sha256 == tokenizer.sha256
    assert tok.encode("the day x", continuation=True) == tokenizer.encode("the day x", continuation=True)

    meta = tmp_path / "meta"  # tiktoken beside a tokenizer.json: the tokenizer.json (same ids, faster to load)
    write_tiktoken(meta / "tokenizer.model")
    shutil.copy(llama3_json, meta / "tokenizer.json")
    assert load_tokenizer(meta).path == str(meta / "tokenizer.json")

    hf = tmp_path / "hf"  # by content, not by name: JSON in a file called tokenizer.model
    hf.mkdir()
    shutil.copy(llama3_json, hf / "tokenizer.model")
    assert type(load_tokenizer(hf)) is HFTokenizer and type(load_tokenizer(hf / "tokenizer.model")) is HFTokenizer

    (tmp_path / "notes.txt").write_text("hello 12 is not a tokenizer\n")
    (tmp_path / "garbage.bin").write_bytes(bytes(range(256)))
    (tmp_path / "broken.json").write_text('{"model": ')
    for name, message in [("notes.txt", "notes.txt is not a SentencePiece model file"),
                          ("garbage.bin", "garbage.bin is not a SentencePiece model file"),
                          ("broken.json", "broken.json is not a Hugging Face tokenizer.json"),
                          ("missing.json", "cannot read tokenizer file .*missing.json")]:
        with pytest.raises(ValueError, match=message):
            load_tokenizer(tmp_path / name)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no tokenizer.model or tokenizer.json in this folder"):
        load_tokenizer(tmp_path / "empty")
    corrupt = tmp_path / "corrupt"  # a broken tokenizer.model is an error, not a reason to try tokenizer.json
    corrupt.mkdir()
    (corrupt / "tokenizer.model").write_bytes(b"\x0a\xff\xff")
    shutil.copy(llama3_json, corrupt / "tokenizer.json")
    with pytest.raises(ValueError, match="corrupt/tokenizer.model is not a SentencePiece model file"):
        load_tokenizer(corrupt)


def test_load_tokenizer_is_the_old_tokenizer_for_sentencepiece(tokenizer):
    tok = load_tokenizer(tokenizer.path)
    assert type(tok) is type(Tokenizer(tokenizer.path)) is SentencePieceTokenizer and isinstance(tok, Tokenizer)
    assert tok.sha256 == tokenizer.sha256 and tok.vocab_size == 320 and tok.stop_ids == [2]
