"""The tokenizer of a GGUF file: what its tokenizer.ggml.* keys hold, read from the model's SentencePiece
`tokenizer.model`, Llama 3 `tokenizer.json` or Meta's tiktoken `tokenizer.model`, as llama.cpp's
`convert_hf_to_gguf.py` writes them; and the chat template of a Hugging Face model folder.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from llama_core.tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer

from .errors import UserError

try:
    import gguf
except ImportError:  # an optional extra: only the GGUF export needs it
    gguf = None

SPECIAL_KINDS = ("bos", "eos", "unk", "pad", "eot", "eom")
# Where a tokenizer has them, llama.cpp's end-of-turn and end-of-message ids (it stops at eos, eot and eom).
TURN_TOKENS = {"eot": "<|eot_id|>", "eom": "<|eom_id|>"}
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")  # the Split regex of Llama 3's tokenizer.json pre-tokenizer


@dataclass
class Vocab:
    """What the GGUF's tokenizer.ggml.* keys hold."""
    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str
    tokens: list[str]
    types: list[int]  # gguf.TokenType values
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = True
    add_eos: bool = False
    add_space_prefix: bool | None = None


def as_tokenizer(tokenizer: str | os.PathLike | Tokenizer) -> Tokenizer:
    """A loaded tokenizer, or one loaded from a file or model folder as everywhere in the project
    (llama_core.tokenizer.load_tokenizer: SentencePiece, tokenizer.json or Meta's tiktoken tokenizer.model)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    try:
        return load_tokenizer(tokenizer)
    except (ValueError, OSError) as e:
        raise UserError(f"tokenizer: {e}") from None


def load_vocab(tokenizer: str | os.PathLike | Tokenizer, vocab_size: int) -> Vocab:
    """The vocabulary of a SentencePiece model or a byte-level BPE tokenizer (a tokenizer.json, or Meta's tiktoken
    file as llama_core reads it), padded with [PAD{id}] tokens to the model's `vocab_size` as the converter does.
    bos, eos, unk and the end-of-turn ids are the tokenizer's own, as training and generation use them."""
    tok = as_tokenizer(tokenizer)
    if isinstance(tok, SentencePieceTokenizer):
        vocab = _sentencepiece_vocab(Path(tok.path), Path(tok.path).read_bytes(), vocab_size)
    else:
        files = tok.files
        config = files.get("tokenizer_config.json")
        vocab = _bpe_vocab(Path(tok.path), _bytes(files["tokenizer.json"]), vocab_size,
                           _bytes(config) if config is not None else None)
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "unk": tok.unk_id}
    ids.update((kind, tok.special_tokens[text]) for kind, text in TURN_TOKENS.items() if text in tok.special_tokens)
    vocab.special_ids.update((kind, i) for kind, i in ids.items() if i is not None and i >= 0)
    return vocab


def _bytes(source: bytes | str | os.PathLike) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def _sentencepiece_vocab(file: Path, data: bytes, vocab_size: int) -> Vocab:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    try:
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(data)
        sp = spm.SentencePieceProcessor(model_proto=data)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError or sentencepiece's RuntimeError
        raise UserError(f"{file}: not a SentencePiece model ({e})") from None
    if not proto.pieces:
        raise UserError(f"{file}: not a SentencePiece model (it has no pieces)")
    check_fits(file, len(proto.pieces), vocab_size)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for i, piece in enumerate(proto.pieces):
        # SentencePiece's piece types are numbered as gguf.TokenType: NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4,
        # UNUSED 5, BYTE 6 (the <0xNN> byte-fallback pieces).
        text = piece.piece
        if piece.type == gguf.TokenType.USER_DEFINED:
            text = text.replace("\u2581", " ")  # llama.cpp matches these on the raw text: pre-normalize the spaces
        tokens[i], scores[i], types[i] = text, piece.score, int(piece.type)
    special = {"pad": sp.pad_id()}  # bos, eos and unk: the tokenizer's (load_vocab)
    return Vocab("llama", "default", tokens, types, scores, special_ids={k: v for k, v in special.items() if v >= 0},
                 add_space_prefix=proto.normalizer_spec.add_dummy_prefix)


def _bpe_vocab(file: Path, data: bytes, vocab_size: int, config: bytes | None) -> Vocab:
    try:
        tok = json.loads(data)
        model = tok["model"]
        kind = model.get("type")
        if kind == "BPE":
            added = {int(t["id"]): t for t in tok.get("added_tokens") or []}
            by_id = {int(i): str(text) for text, i in model["vocab"].items()}
            by_id.update((i, str(t["content"])) for i, t in added.items())
            merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{file}: not a Hugging Face tokenizer.json ({type(e).__name__}: {e})") from None
    if kind != "BPE":
        raise UserError(f"{file}: model type {kind!r} is not supported; GGUF export takes a SentencePiece "
                        f"tokenizer.model or a byte-level BPE tokenizer.json (Llama 3)")
    if not by_id:
        raise UserError(f"{file}: the tokenizer has no tokens")
    pre = _bpe_pre_tokenizer(file, tok.get("pre_tokenizer"))
    check_fits(file, max(by_id) + 1, vocab_size)
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            text = by_id[i]
            if added[i].get("special") or _looks_special(text):
                types.append(gguf.TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
            tokens.append(text)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    vocab = Vocab("gpt2", pre, tokens, [int(t) for t in types], merges=merges, add_bos=False)
    _bpe_flags(file, tok, {text: i for i, text in by_id.items()}, config, vocab)
    return vocab


def _bpe_pre_tokenizer(file: Path, pre) -> str:
    """llama.cpp's name for the pre-tokenizer: Llama 3's ("llama-bpe") or GPT-2's byte-level one ("gpt-2")."""
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") if isinstance(s, dict) else None for s in steps]
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT \
            and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space"):
        return "llama-bpe"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    if "Metaspace" in kinds:
        raise UserError(f"{file}: a SentencePiece-style tokenizer.json (Metaspace pre-tokenizer); export with the "
                        f"model's tokenizer.model instead")
    raise UserError(f"{file}: pre-tokenizer {json.dumps(pre)[:200]} is not supported; GGUF export takes Llama 3's "
                    f"byte-level BPE (Split with Llama 3's regex, then ByteLevel) or GPT-2's (ByteLevel)")


def _bpe_flags(file: Path, tok: dict, ids: dict[str, int], config: bytes | None, vocab: Vocab) -> None:
    """add_bos/add_eos and the pad id of a tokenizer.json: tokenizer_config.json's add_bos_token, add_eos_token and
    pad_token where it says, else whether the post-processor adds a first / last special token (Llama 3's
    TemplateProcessing puts <|begin_of_text|> first)."""
    settings = {}
    if config is not None:
        try:
            settings = json.loads(config)
        except ValueError as e:
            raise UserError(f"{file.parent / 'tokenizer_config.json'}: not valid JSON ({e})") from None
        settings = settings if isinstance(settings, dict) else {}
    first = last = None
    processors = tok.get("post_processor") or {}
    try:
        for p in processors.get("processors", [processors]):
            if p.get("type") == "TemplateProcessing" and (single := p.get("single")):
                first = single[0].get("SpecialToken", {}).get("id")
                last = single[-1].get("SpecialToken", {}).get("id") if len(single) > 1 else None
    except (AttributeError, TypeError) as e:
        raise UserError(f"{file}: post_processor is not a tokenizers post-processor ({e})") from None
    pad = settings.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if isinstance(pad, str) and pad in ids:
        vocab.special_ids["pad"] = ids[pad]
    vocab.add_bos = settings.get("add_bos_token", first is not None) is True
    vocab.add_eos = settings.get("add_eos_token", last is not None) is True


def _looks_special(text: str) -> bool:
    """The converter's does_token_look_special: added tokens that are control tokens though not marked special."""
    return (text in ("<pad>", "<mask>") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<unused") and text.endswith(">")))


def check_fits(file: Path, n_tokens: int, vocab_size: int) -> None:
    if n_tokens > vocab_size:
        raise UserError(f"{file}: the tokenizer has {n_tokens} tokens, more than the model's vocab_size "
                        f"{vocab_size}; is it the model's tokenizer?")
