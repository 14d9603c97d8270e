"""Tokenizers behind one interface: LLaMA's SentencePiece `tokenizer.model`, a Hugging Face `tokenizer.json`
(Llama 3's byte-level BPE) and Meta's original Llama 3 `tokenizer.model` (tiktoken's text format).

`load_tokenizer(path)` takes a file or a model folder and decides by content, never by name: a tokenizer.json is
JSON, a tiktoken file is lines of "base64-token rank", anything else must be a SentencePiece protobuf. In a folder:
  - a SentencePiece tokenizer.model wins, even beside a tokenizer.json (a Llama 1/2 or TinyLlama folder from the
    Hub has both, giving the same ids; SentencePiece keeps this project's ids bit-for-bit);
  - else tokenizer.json (a Llama 3 folder from the Hub), read with tokenizer_config.json and special_tokens_map.json
    beside it (plain JSON) for its bos/eos/pad/unk tokens;
  - else a tiktoken tokenizer.model (Meta's Llama 3 layout), turned into the same byte-level BPE as Llama 3's
    tokenizer.json: its ranks, Llama 3's split regex and its 256 special tokens after the ranks (Llama 3.1's names:
    3.0 used reserved names at 128004, 128005, 128008 and 128010; the ids of bos, eos, headers and eot agree).

Control tokens (bos, eos, <|eot_id|>, ...) come only from ids: `encode` reads "<|eot_id|>" in a text as the seven
characters it is, never as the control token; templates insert control tokens by `token_to_id`. Ids that mean "none"
are -1 (bos, eos, unk).

LLaMA's SentencePiece model has byte fallback (any text encodes, no <unk> in practice), split digits, unk 0 / bos 1 /
eos 2, no pad piece, and a "dummy prefix": a space is prepended to the text before encoding ("Hello" encodes as
"▁Hello", and decoding drops that space again). The prefix is right at the start of a text but wrong in its middle: a
template that encodes a prompt and its response as separate segments must encode the response as a continuation
(`continuation=True`: no dummy prefix), so that the concatenated ids are those the model sees for the whole text.
Put the separating space at the start of the continuation ("Hello" + " world" -> "▁Hello", "▁world"), as the whole
text's encoding does; "Hello " + "world" gives "▁Hello", "▁", "world" instead. Byte-level BPE has no dummy prefix:
`continuation` changes nothing there.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from .files import write_bytes

N_META_PIECES = 3 + 256  # <unk>, <s>, </s> and the 256 byte-fallback pieces
TIKTOKEN_LINE = re.compile(rb"([A-Za-z0-9+/]+={0,2}) (\d+)")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")  # the pre-tokenizer regex of Llama 3 (tiktoken's and tokenizer.json's)
LLAMA3_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIAL = LLAMA3_NAMED + [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(LLAMA3_NAMED))]
# Token names that say what a special token is, where no tokenizer_config.json does
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>")
EOS_NAMES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<|im_end|>", "<eos>")
PAD_NAMES = ("<|finetune_right_pad_id|>", "<pad>", "[PAD]", "<|pad|>")
STOP_NAMES = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>", "<end_of_turn>", "</s>")
CONFIG_FILES = ("special_tokens_map.json", "tokenizer_config.json")  # read in this order: the last one wins


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer in `path`, a tokenizer file or a model folder (see the module docstring for which file wins)."""
    path = Path(path)
    if not path.is_dir():
        data = _read(path)
        return _from_bytes(path, data, _kind(data))
    model, hf = path / "tokenizer.model", path / "tokenizer.json"
    if model.is_file():
        data = _read(model)
        if (kind := _kind(data)) != "tiktoken" or not hf.is_file():
            return _from_bytes(model, data, kind)
    if hf.is_file():
        return HFTokenizer.from_file(hf)
    raise ValueError(f"{path}: no tokenizer.model or tokenizer.json in this folder")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read tokenizer file {path}: {e.strerror or e}") from None


def _kind(data: bytes) -> str:
    if data[:1000].lstrip()[:1] == b"{":
        return "json"
    if TIKTOKEN_LINE.fullmatch(data[:1000].split(b"\n", 1)[0].rstrip(b"\r")):
        return "tiktoken"
    return "sentencepiece"


def _from_bytes(path: Path, data: bytes, kind: str) -> Tokenizer:
    if kind == "json":
        return HFTokenizer.from_file(path)
    if kind == "tiktoken":
        return HFTokenizer.from_tiktoken(path, data)
    return SentencePieceTokenizer(path)


class Tokenizer:
    """What every tokenizer offers; `load_tokenizer` makes one.

    encode(text, bos=False, eos=False, continuation=False) -> ids; decode(ids, continuation=False) -> text, without
    bos, eos and control tokens (an incomplete UTF-8 character at the end decodes to "\\ufffd").
    bos_id, eos_id, unk_id: -1 when the tokenizer has none. eos_id is the one the tokenizer's config names (a base
    Llama 3's <|end_of_text|>, an instruct one's <|eot_id|>); stop_ids adds the end-of-turn tokens it has.
    pad_id: always a valid id (padded positions are masked out of attention and loss; see each class).
    vocab_size: the largest id + 1 (what the embedding must cover). special_tokens: {text: id} of control tokens.
    sha256: of the bytes of the file(s) that define the tokenizer (a cache key for tokenized data).
    files: {name in a model folder: the file to copy there, or its bytes}: the model folder then carries its tokenizer.
    """

    path: str
    sha256: str
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int
    vocab_size: int
    special_tokens: dict[str, int]

    def __new__(cls, *args, **kwargs):
        # Tokenizer(path) was the SentencePiece class: it stays so until every caller uses load_tokenizer.
        return super().__new__(SentencePieceTokenizer if cls is Tokenizer else cls)

    def encode(self, text: str, bos: bool = False, eos: bool = False, continuation: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int], continuation: bool = False) -> str:
        raise NotImplementedError

    def id_to_piece(self, id: int) -> str:
        raise NotImplementedError

    def token_to_id(self, text: str) -> int | None:
        """The id of the token whose text is exactly `text` (as id_to_piece shows it: "<|eot_id|>", "<s>")."""
        raise NotImplementedError

    @property
    def files(self) -> dict[str, Path | bytes]:
        raise NotImplementedError

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generation: eos, then the end-of-turn tokens the tokenizer has (<|eot_id|>, ...)."""
        ids = [self.eos_id] + [self.special_tokens[name] for name in STOP_NAMES if name in self.special_tokens]
        return list(dict.fromkeys(i for i in ids if i >= 0))

    def _check_bos_eos(self, bos: bool, eos: bool) -> None:
        if (bos and self.bos_id < 0) or (eos and self.eos_id < 0):
            raise ValueError(f"{self.path}: this tokenizer has no {'BOS' if bos and self.bos_id < 0 else 'EOS'} token")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file (`tokenizer.model`) with LLaMA's conventions."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        data = _read(Path(path))
        try:
            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(data)
            self.sp = spm.SentencePieceProcessor(model_proto=data)
            proto.normalizer_spec.add_dummy_prefix = False
            self.sp_continuation = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        except Exception as e:  # protobuf's DecodeError or sentencepiece's RuntimeError
            raise ValueError(f"{self.path} is not a SentencePiece model file (nor a tokenizer.json or a tiktoken "
                             f"file): {e}") from None
        if self.sp.get_piece_size() == 0:
            raise ValueError(f"{self.path} is not a SentencePiece model file: it has no pieces")
        self.sha256 = hashlib.sha256(data).hexdigest()
        sp = self.sp
        self.vocab_size, self.bos_id, self.eos_id, self.unk_id = sp.get_piece_size(), sp.bos_id(), sp.eos_id(), \
            sp.unk_id()
        # LLaMA has no pad piece: 0 (= <unk>) then, as padded positions are masked out of attention and loss anyway.
        self.pad_id = max(sp.pad_id(), 0)
        self.special_tokens = {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i)}

    @property
    def files(self) -> dict[str, Path | bytes]:
        return {"tokenizer.model": Path(self.path)}

    def encode(self, text: str, bos: bool = False, eos: bool = False, continuation: bool = False) -> list[int]:
        """Token ids of `text`; `continuation=True` encodes text that follows other text (no dummy-prefix space).
        SentencePiece never reads control pieces ("<s>", "</s>") from text."""
        self._check_bos_eos(bos, eos)
        ids = (self.sp_continuation if continuation else self.sp).encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int], continuation: bool = False) -> str:
        """Text of `ids`, skipping bos, eos and pad. The leading space of the first piece ("▁world") is dropped,
        as it is the dummy prefix, unless `continuation=True` (then " world")."""
        skip = {self.bos_id, self.eos_id, self.pad_id}
        ids = [int(i) for i in ids if int(i) not in skip]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id(s) {bad[:5]} out of range for a vocabulary of {self.vocab_size} pieces")
        return (self.sp_continuation if continuation else self.sp).decode(ids)

    def id_to_piece(self, id: int) -> str:
        if not 0 <= id < self.vocab_size:
            raise ValueError(f"token id {id} out of range for a vocabulary of {self.vocab_size} pieces")
        return self.sp.id_to_piece(id)

    def token_to_id(self, text: str) -> int | None:
        i = self.sp.piece_to_id(text)  # an unknown piece gives unk's id
        return i if self.sp.id_to_piece(i) == text else None


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer (the `tokenizers` library): Llama 3's byte-level BPE.

    bos/eos/pad/unk: the tokens tokenizer_config.json (or special_tokens_map.json) names; else BOS is the special
    token the post-processor prepends (Llama 3's TemplateProcessing "<|begin_of_text|> $A"), EOS the first of
    EOS_NAMES the tokenizer has. pad: the config's pad_token, else the first of PAD_NAMES (Llama 3.1's
    <|finetune_right_pad_id|>), else the lowest reserved special token (Llama 3.0's <|reserved_special_token_0|>),
    else eos, else 0: a token real text never holds, so that `ids != pad_id` counts real tokens.
    Encoding never runs the post-processor (`bos=True` adds BOS) and reads special-token strings as plain text.
    """

    def __init__(self, tk, path: str | os.PathLike, names: dict[str, str], *, bos_id: int = -1,
                 sha256: str, files: dict[str, Path | bytes]):
        self.tk, self.path, self.sha256, self._files = tk, str(path), sha256, files
        tk.encode_special_tokens = True  # special-token strings in text are text; tokenizer-wide, not pickled
        vocab = tk.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self._dense = len(vocab) == self.vocab_size  # no unused ids below vocab_size
        added = tk.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in sorted(added.items()) if t.special}
        self._added = {t.content: i for i, t in added.items()}

        def first(*candidates):
            return next((self._added[c] for c in candidates if c in self._added), -1)
        ids = {key: vocab[name] for key, name in names.items()}
        self.bos_id = ids.get("bos_token", bos_id if bos_id >= 0 else first(*BOS_NAMES))
        self.eos_id = ids.get("eos_token", first(*EOS_NAMES))
        self.unk_id = ids.get("unk_token", -1)
        reserved = [i for name, i in self.special_tokens.items() if "reserved" in name]
        pad = ids.get("pad_token", first(*PAD_NAMES))
        self.pad_id = pad if pad >= 0 else reserved[0] if reserved else max(self.eos_id, 0)
        self._skip = {i for i in (self.bos_id, self.eos_id) if i >= 0}

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> HFTokenizer:
        """A tokenizer.json, with the tokenizer_config.json and special_tokens_map.json beside it if present."""
        from tokenizers import Tokenizer as Tokenizers

        path = Path(path)
        data = _read(path)
        try:
            spec = json.loads(data)
            tk = Tokenizers.from_str(data.decode())
        except Exception as e:  # JSON, UTF-8 or tokenizers' own error
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json: {e}") from None
        _refuse_dummy_prefix(path, spec)
        digest, names, files = hashlib.sha256(data), {}, {"tokenizer.json": path}
        for name in CONFIG_FILES:
            if (file := path.parent / name).is_file():
                config = _read(file)
                digest.update(b"\0%s\0%d\0" % (name.encode(), len(config)) + config)
                for key, token in _config_tokens(file, config).items():
                    if tk.token_to_id(token) is None:
                        raise ValueError(f"{file}: {key} {token!r} is not a token of {path}")
                    names[key] = token
                files[name] = file
        return cls(tk, path, names, bos_id=_template_bos(spec.get("post_processor")),
                   sha256=digest.hexdigest(), files=files)

    @classmethod
    def from_tiktoken(cls, path: str | os.PathLike, data: bytes | None = None) -> HFTokenizer:
        """Meta's Llama 3 tokenizer.model: its ranks as a byte-level BPE (merges rebuilt from the ranks, as
        transformers' TikTokenConverter does; whole pieces found in the vocabulary first, as tiktoken does), Llama 3's
        split regex and special tokens, and a post-processor adding <|begin_of_text|>, as Llama 3's tokenizer.json."""
        from tokenizers import (
            AddedToken,
            Regex,
            decoders,
            models,
            pre_tokenizers,
            processors,
        )
        from tokenizers import Tokenizer as Tokenizers

        path = Path(path)
        data = _read(path) if data is None else data
        ranks = read_tiktoken(path, data)
        char = _byte_chars()
        text = {token: "".join(char[b] for b in token) for token in ranks}
        merges = sorted((rank, ranks[token[:i]], ranks[token[i:]], token[:i], token[i:])
                        for token, rank in ranks.items() for i in range(1, len(token))
                        if token[:i] in ranks and token[i:] in ranks)
        tk = Tokenizers(models.BPE({text[t]: r for t, r in ranks.items()}, [(text[a], text[b]) for *_, a, b in merges],
                                   fuse_unk=False, byte_fallback=False, ignore_merges=True))
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tk.decoder = decoders.ByteLevel()
        tk.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in LLAMA3_SPECIAL])
        bos = LLAMA3_SPECIAL[0]
        tk.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                          special_tokens=[(bos, len(ranks))])])
        return cls(tk, path, {"bos_token": bos, "eos_token": "<|end_of_text|>"},
                   sha256=hashlib.sha256(data).hexdigest(), files={})

    @property
    def files(self) -> dict[str, Path | bytes]:
        """tokenizer.json (serialized here if built from a tiktoken file) and the config files beside it; a
        tokenizer_config.json naming bos and eos where there is none (transformers needs one to know them)."""
        files = dict(self._files)
        if "tokenizer.json" not in files:
            files["tokenizer.json"] = self.tk.to_str().encode()
        if "tokenizer_config.json" not in files:
            config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
            config.update({f"{k}_token": self.id_to_piece(i) for k, i in [("bos", self.bos_id), ("eos", self.eos_id)]
                           if i >= 0})
            files["tokenizer_config.json"] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
        return files

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.tk.encode_special_tokens = True  # tokenizers does not pickle this flag

    def encode(self, text: str, bos: bool = False, eos: bool = False, continuation: bool = False) -> list[int]:
        """Token ids of `text`, special-token strings in it as plain text. `continuation` changes nothing."""
        self._check_bos_eos(bos, eos)
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int], continuation: bool = False) -> str:
        """Text of `ids`, skipping bos, eos and every special token. `continuation` changes nothing."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size or (not self._dense and self.tk.id_to_token(i) is None)]
        if bad:
            raise ValueError(f"token id(s) {bad[:5]} are not in the vocabulary of {self.path} (ids below "
                             f"{self.vocab_size})")
        return self.tk.decode([i for i in ids if i not in self._skip], skip_special_tokens=True)

    def id_to_piece(self, id: int) -> str:
        if (piece := self.tk.id_to_token(id) if id >= 0 else None) is None:
            raise ValueError(f"token id {id} is not in the vocabulary of {self.path} (ids below {self.vocab_size})")
        return piece

    def token_to_id(self, text: str) -> int | None:
        return self.tk.token_to_id(text)


def _config_tokens(file: Path, data: bytes) -> dict[str, str]:
    """{"bos_token": text, ...} of a tokenizer_config.json or special_tokens_map.json (a string or {"content": ...})."""
    try:
        config = json.loads(data)
    except ValueError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object")
    out = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{file}: {key} must be a token's text or {{\"content\": text}}, not {value!r}")
        if value is not None:
            out[key] = value
    return out


def _template_bos(post: dict | None) -> int:
    """The id of the special token a TemplateProcessing post-processor puts first (Llama 3's BOS), or -1."""
    steps = post.get("processors", []) if isinstance(post, dict) and post.get("type") == "Sequence" else [post]
    for step in steps:
        if isinstance(step, dict) and step.get("type") == "TemplateProcessing" and step.get("single"):
            name = (step["single"][0].get("SpecialToken") or {}).get("id")
            ids = (step.get("special_tokens", {}).get(name) or {}).get("ids") if name else None
            if ids:
                return int(ids[0])
    return -1


def _refuse_dummy_prefix(path: Path, spec: dict) -> None:
    """A SentencePiece-style tokenizer.json prepends "▁" to every text: encoding a continuation needs the
    SentencePiece model itself (which a folder from the Hub carries beside it)."""
    def steps(part):  # the steps of a normalizer or pre-tokenizer, a Sequence or not
        if not isinstance(part, dict):
            return []
        return part.get("normalizers") or part.get("pretokenizers") or [part]
    for step in steps(spec.get("normalizer")) + steps(spec.get("pre_tokenizer")):
        if step.get("type") == "Prepend" or step.get("type") == "Metaspace" and (
                step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)):
            raise ValueError(f"{path}: a SentencePiece-style tokenizer.json (it prepends '▁' to the text), which "
                             f"cannot encode continuations; use the model's SentencePiece tokenizer.model instead")


def read_tiktoken(path: str | os.PathLike, data: bytes) -> dict[bytes, int]:
    """{token bytes: rank} of a tiktoken BPE file: one "base64-token rank" per line, ranks 0..n-1, all 256 bytes."""
    ranks = {}
    for n, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        if (m := TIKTOKEN_LINE.fullmatch(line.rstrip(b"\r"))) is None:
            raise ValueError(f"{path}:{n}: not a tiktoken line (a base64 token, a space, its rank): {line[:60]!r}")
        try:
            ranks[base64.b64decode(m[1], validate=True)] = int(m[2])
        except binascii.Error as e:
            raise ValueError(f"{path}:{n}: bad base64 token {m[1][:60]!r} ({e})") from None
    if missing := [b for b in range(256) if bytes([b]) not in ranks]:
        raise ValueError(f"{path}: byte(s) {missing[:8]} have no rank; a byte-level BPE needs all 256")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: the ranks of its {len(ranks)} tokens are not 0..{len(ranks) - 1}, each once")
    return ranks


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character (the text of byte-level BPE tokens)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def train_tokenizer(texts: Iterable[str], output_path: str | os.PathLike, vocab_size: int, *,
                    model_type: str = "bpe", character_coverage: float = 1.0) -> SentencePieceTokenizer:
    """Train a SentencePiece model with LLaMA's settings on `texts`, write it to `output_path`, and load it.

    Texts are split into lines, as SentencePiece does with a training file (so "\\n" is never a piece and encodes
    through byte fallback, as in LLaMA). The result is deterministic: the same texts give the same file bytes.
    `vocab_size` is exact: it must cover the 259 special and byte pieces plus every character kept by
    `character_coverage`, and the corpus must have enough distinct merges to fill it (a ValueError says which).
    """
    if vocab_size <= N_META_PIECES:
        raise ValueError(f"vocab_size must exceed {N_META_PIECES} (3 special + 256 byte-fallback pieces) plus the "
                         f"number of distinct characters of the corpus; got {vocab_size}")
    lines = [line for text in texts for line in text.split("\n") if line]
    if not lines:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    model = _BytesWriter()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            character_coverage=character_coverage, byte_fallback=True, split_digits=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False,
            normalization_rule_name="identity", allow_whitespace_only_pieces=True,
            # Longer lines would be skipped silently; the default is 4192 bytes.
            max_sentence_length=max(4192, max(len(line.encode()) for line in lines)),
            minloglevel=2)
    except RuntimeError as e:
        message = str(e)
        if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message):
            raise ValueError(f"vocab_size {vocab_size} is too small for this corpus: it needs at least "
                             f"{m[2]} ({N_META_PIECES} special and byte pieces, {int(m[2]) - N_META_PIECES} "
                             f"distinct characters); raise vocab_size or lower character_coverage") from None
        if m := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message):
            raise ValueError(f"vocab_size {vocab_size} is too large for this corpus: it yields at most {m[1]} "
                             f"pieces; add text or lower vocab_size") from None
        raise ValueError(f"SentencePiece training failed: {message}") from None
    write_bytes(output_path, model.data)
    return SentencePieceTokenizer(output_path)


class _BytesWriter:
    """The `model_writer` of SentencePieceTrainer: receives the serialized model."""

    data = b""

    def write(self, data: bytes) -> None:
        self.data += data
