"""LLaMA's SentencePiece tokenizer: loading, encoding in segments, and training a small one.

LLaMA's tokenizer is a SentencePiece BPE model with byte fallback (any text encodes, no <unk> in practice), split
digits, unk 0 / bos 1 / eos 2, no pad piece, and a "dummy prefix": a space is prepended to the text before encoding
("Hello" encodes as "▁Hello", and decoding drops that space again). The prefix is right at the start of a text but
wrong in its middle: a template that encodes a prompt and its response as separate segments must encode the response
as a continuation (`continuation=True`: no dummy prefix), so that the concatenated ids are those the model sees for the
whole text. Put the separating space at the start of the continuation ("Hello" + " world" -> "▁Hello", "▁world"),
as the whole text's encoding does; "Hello " + "world" gives "▁Hello", "▁", "world" instead.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

N_META_PIECES = 3 + 256  # <unk>, <s>, </s> and the 256 byte-fallback pieces


class Tokenizer:
    """A SentencePiece model file (`tokenizer.model`) with LLaMA's conventions."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read tokenizer file {self.path}: {e.strerror or e}") from None
        try:
            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(data)
            self.sp = spm.SentencePieceProcessor(model_proto=data)
            proto.normalizer_spec.add_dummy_prefix = False
            self.sp_continuation = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        except Exception as e:  # protobuf's DecodeError or sentencepiece's RuntimeError
            raise ValueError(f"{self.path} is not a SentencePiece model file: {e}") from None
        if self.sp.get_piece_size() == 0:
            raise ValueError(f"{self.path} is not a SentencePiece model file: it has no pieces")
        self.sha256 = hashlib.sha256(data).hexdigest()  # of the file's bytes: a cache key for tokenized data

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def pad_id(self) -> int:
        """The model's pad piece if it has one, else 0 (= <unk>): LLaMA has no pad piece, and padded positions are
        masked out of attention and loss anyway, so any valid id does. `decode` skips it."""
        return self.sp.pad_id() if self.sp.pad_id() >= 0 else 0

    def encode(self, text: str, bos: bool = False, eos: bool = False, continuation: bool = False) -> list[int]:
        """Token ids of `text`; `continuation=True` encodes text that follows other text (no dummy-prefix space)."""
        if (bos and self.bos_id < 0) or (eos and self.eos_id < 0):
            raise ValueError(f"{self.path}: this tokenizer has no {'BOS' if bos and self.bos_id < 0 else 'EOS'} piece")
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

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


def train_tokenizer(texts: Iterable[str], output_path: str | os.PathLike, vocab_size: int, *,
                    model_type: str = "bpe", character_coverage: float = 1.0) -> Tokenizer:
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
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(f"{output_path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(model.data)
        os.replace(tmp, output_path)
    finally:
        tmp.unlink(missing_ok=True)
    return Tokenizer(output_path)


class _BytesWriter:
    """The `model_writer` of SentencePieceTrainer: receives the serialized model."""

    data = b""

    def write(self, data: bytes) -> None:
        self.data += data
