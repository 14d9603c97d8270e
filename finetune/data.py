"""Instruction data: read, normalize, template, tokenize, mask, mix, split, pack and cache.

`build_datasets` runs, for each dataset of the recipe:
  read        local .jsonl/.json (our reader: errors name the file and line), .csv/.parquet (datasets' loaders), a
              folder of such files, or a Hugging Face Hub id (`finetune.sources`). Paths are relative to the current
              directory.
  select      the split expression (`train[:95%]`; local files have one split, "train"), then `max_samples`
              (a seeded random sample, in file order)
  normalize   `columns` renames fields; every row becomes messages (`alpaca`, `conversations` in ShareGPT or
              OpenAI style, or `text`); bad rows raise a DataError naming the row, or are counted and skipped
  tokenize    the template renders segments; prompt tokens get label -100 unless `train_on_inputs`, assistant
              responses and their EOS are trained, BOS never is. `text` rows are BOS + text + EOS, all trained.
  overlong    longer than max_seq_len: `drop`, or `truncate_prompt` (cut tokens after BOS from the left so the final
              response fits whole; dropped if even that response does not fit)
  dedup       exact duplicates (same normalized messages) across all datasets: the first occurrence stays; training
              examples equal to an explicit validation example are removed too
  hold out    `val_fraction` of each dataset (seeded), before mixing, so oversampling never leaks into validation
  mix         weight w = a sampling multiplier on the dataset's size: int(w) copies of every example plus a seeded
              sample without replacement of round(frac(w) * n) more. weight 0.5 uses half the rows, 3 uses each
              three times. The mixture is shuffled with the seed.
  pack        trl's `pack_dataset` (best-fit decreasing, within chunks of 10,000 examples) into rows of at most
              max_seq_len; examples are never split. position_ids restart at 0 for each example, which makes the
              model's attention block-diagonal. Unpacked: one example per row.
Validation = the explicit `data.validation` datasets plus the held-out fractions, unweighted, packed like training.
The result is cached under `cache_dir/<key>` (default ~/.cache/llama-finetune/data), the key hashing every input
that changes it (see `_cache_key`), and is returned memory-mapped from there.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

import datasets
from datasets import Dataset, Features, Sequence, Value

from llama_core.files import AtomicFolder, everything_stale
from llama_core.model import IGNORE_INDEX

from .errors import DataError
from .inputs import parse_json
from .outputs import DEFAULT_CACHE_DIR
from .recipe import DataSection, DatasetSection
from .sources import identity, load, source
from .templates import Template, encode_segments, Segment

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}


class RowStatus(enum.IntEnum):
    """What became of a dataset row."""
    KEPT = 0
    TRUNCATED = 1  # kept, its prompt cut from the left (data.overlong: truncate_prompt)
    DROPPED = 2  # too long for max_seq_len
    BAD = 3  # unreadable or invalid: an error, or skipped (data.on_bad_row)

N_VALIDATION_EXAMPLES = 128
_TOKENIZED = Features({  # the messages are kept as JSON (for validation_examples), the key is their hash
    "messages": Value("string"), "input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
    "_key": Value("string"), "_error": Value("string"), "_status": Value("int8"), "_trained": Value("int32")})


@dataclass
class DatasetStats:
    rows_read: int = 0
    bad_rows_skipped: int = 0
    overlong_dropped: int = 0
    overlong_truncated: int = 0
    duplicates_removed: int = 0
    examples: int = 0            # kept, unique
    held_out: int = 0            # moved to validation (val_fraction)
    train_examples: int = 0      # after weighting
    train_tokens: int = 0
    train_trained_tokens: int = 0


@dataclass
class DataStats:
    datasets: dict[str, DatasetStats] = field(default_factory=dict)
    validation: dict[str, DatasetStats] = field(default_factory=dict)
    train_examples: int = 0
    train_rows: int = 0
    train_tokens: int = 0
    train_trained_tokens: int = 0
    packing_efficiency: float = 0.0  # real tokens / (rows * max_seq_len)
    max_seq_len: int = 0
    validation_examples: int = 0
    validation_rows: int = 0
    cache_hit: bool = False
    cache_path: str = ""

    def describe(self) -> str:
        """A few lines for logs and `finetune preprocess`."""
        lines = []
        for title, group in (("train", self.datasets), ("validation", self.validation)):
            for name, s in group.items():
                lines.append(f"{title} {name}: {s.rows_read} rows read, {s.bad_rows_skipped} bad skipped, "
                             f"{s.duplicates_removed} duplicates, overlong {s.overlong_dropped} dropped / "
                             f"{s.overlong_truncated} truncated, {s.examples} kept"
                             + (f", {s.held_out} held out, {s.train_examples} in the mix" if title == "train" else ""))
        lines.append(f"train: {self.train_examples} examples, {self.train_tokens} tokens ({self.train_trained_tokens} "
                     f"trained) in {self.train_rows} rows of up to {self.max_seq_len}, packing efficiency "
                     f"{self.packing_efficiency:.1%}")
        if self.validation_examples:
            lines.append(f"validation: {self.validation_examples} examples in {self.validation_rows} rows")
        lines.append(f"tokenized data cache: {'hit' if self.cache_hit else 'stored'} {self.cache_path}")
        return "\n".join(lines)


@dataclass
class PreparedData:
    train: Dataset                      # columns input_ids, labels, position_ids (list[int], <= max_seq_len)
    validation: Dataset | None
    stats: DataStats
    validation_examples: list[dict]  # up to 128 held-out {"messages": [...]}, ending with the reference answer
    fingerprint: str = ""  # of the tokens and labels themselves: a resumed run checks its data did not change


def data_fingerprint(train: Dataset, validation: Dataset | None) -> str:
    """sha256 of the training and validation rows as the model sees them (ids, labels, positions, in order)."""
    digest = hashlib.sha256()
    for ds in (train, validation):
        if ds is None:
            digest.update(b"none")
            continue
        for name in ("input_ids", "labels", "position_ids"):
            column = ds.data.column(name).combine_chunks()
            digest.update(name.encode())
            digest.update(column.offsets.to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
            digest.update(column.values.to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
    return digest.hexdigest()


class _Bad(Exception):
    pass


# ------------------------------------------------------------------------------------------------- normalizing

def _text(row: dict, cols: dict, name: str, optional: bool = False) -> str:
    key = cols.get(name, name)
    value = row.get(key)
    if value is None:
        if optional:
            return ""
        raise _Bad(f"missing field {key!r}" + (f" (our {name!r})" if key != name else ""))
    if not isinstance(value, str):
        raise _Bad(f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip() and not optional:
        raise _Bad(f"field {key!r} is empty")
    return _unicode(value, f"field {key!r}")


def _unicode(text: str, what: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800" escapes decode to lone surrogates, which no tokenizer takes
        raise _Bad(f"{what} is not valid Unicode (a lone surrogate at character {e.start})") from None
    return text


def normalize(row: dict, fmt: str, cols: dict) -> list[dict]:
    """One raw row as messages [{role, content, input}]; raises _Bad with the reason."""
    if fmt == "alpaca":
        return [{"role": "user", "content": _text(row, cols, "instruction"),
                 "input": _text(row, cols, "input", optional=True)},
                {"role": "assistant", "content": _text(row, cols, "output"), "input": ""}]
    if fmt == "text":
        return [{"role": "text", "content": _text(row, cols, "text"), "input": ""}]
    names = [cols.get(n, n) for n in ("conversations", "messages")]
    turns = next((row[n] for n in names if row.get(n) is not None), None)
    if turns is None:
        raise _Bad(f"missing field {names[0]!r} (ShareGPT) or {names[1]!r} (OpenAI)")
    if not isinstance(turns, list) or not turns:
        raise _Bad(f"the conversation must be a non-empty list of turns, got {type(turns).__name__}")
    messages = []
    for i, t in enumerate(turns, 1):
        if not isinstance(t, dict):
            raise _Bad(f"turn {i} must be an object, got {type(t).__name__}")
        role, content = (t.get("from"), t.get("value")) if "from" in t else (t.get("role"), t.get("content"))
        if role not in ROLES:
            raise _Bad(f"turn {i}: unknown role {role!r} (known: {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise _Bad(f"turn {i}: content must be a string, got {type(content).__name__}")
        messages.append({"role": ROLES[role], "content": _unicode(content, f"turn {i}"), "input": ""})
    for i, m in enumerate(messages[1:] if messages[0]["role"] == "system" else messages):
        if m["role"] != ("user", "assistant")[i % 2]:
            raise _Bad(f"turns must be an optional system message, then user and assistant alternating; got "
                       f"{' '.join(m['role'] for m in messages)}")
    if messages[-1]["role"] != "assistant":
        raise _Bad("the conversation must end with an assistant turn")
    return messages


# ------------------------------------------------------------------------------------------------- tokenizing

def encode_example(messages: list[dict], template: Template, tokenizer, cfg: DataSection):
    """(input_ids, labels, status) of one normalized example under the recipe's masking and overlong policy."""
    if messages[0]["role"] == "text":
        segments = [Segment(messages[0]["content"], True, bos=True, eos=True)]
    else:
        segments = template.render(messages)
    pieces = encode_segments(segments, tokenizer)
    ids, labels = [], []
    for seg, piece in zip(segments, pieces):
        ids += piece
        if seg.trained or cfg.train_on_inputs:
            labels += [IGNORE_INDEX] + piece[1:] if seg.bos else piece  # BOS is never a target
        else:
            labels += [IGNORE_INDEX] * len(piece)
    if labels.count(IGNORE_INDEX) == len(labels):
        raise ValueError("the example has no trained tokens")
    status, L = RowStatus.KEPT, cfg.max_seq_len
    if len(ids) > L:
        if cfg.overlong == "drop" or len(pieces[-1]) > L - 1:  # the final response must fit whole after BOS
            return ids[:0], labels[:0], RowStatus.DROPPED
        cut = len(ids) - L + 1
        ids, labels, status = ids[:1] + ids[cut:], labels[:1] + labels[cut:], RowStatus.TRUNCATED
    return ids, labels, status


def _process(batch: dict, fmt: str, cols: dict, template: Template, tokenizer, cfg: DataSection) -> dict:
    out = {k: [] for k in _TOKENIZED}
    names = [k for k in batch if k != "_where"]
    for i, where in enumerate(batch["_where"]):
        row = {k: batch[k][i] for k in names}
        ids, labels, messages, error, status = [], [], [], "", RowStatus.BAD
        try:
            if problem := row.pop("_bad", None):  # found while reading the file (not UTF-8)
                raise _Bad(problem)
            if "_json" in row:
                try:
                    row = parse_json(row["_json"])
                except json.JSONDecodeError as e:
                    raise _Bad(f"malformed JSON line: {e.msg} (column {e.colno})") from None
                except ValueError as e:  # nested too deeply
                    raise _Bad(f"malformed JSON line: {e}") from None
                if not isinstance(row, dict):
                    raise _Bad(f"a row must be a JSON object, got {type(row).__name__}")
            messages = normalize(row, fmt, cols)
            ids, labels, status = encode_example(messages, template, tokenizer, cfg)
        except (_Bad, ValueError) as e:  # ValueError: the template refuses the conversation
            error = f"{where}: {e}"
        out["messages"].append(text := json.dumps(messages, ensure_ascii=False))
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["_key"].append(hashlib.sha1(text.encode()).hexdigest())
        out["_error"].append(error)
        out["_status"].append(int(status))
        out["_trained"].append(len(labels) - labels.count(IGNORE_INDEX))
    return out


def _tokenize(spec: DatasetSection, raw: Dataset, template, tokenizer, cfg: DataSection, stats: DatasetStats,
              seen: set, fingerprint: str) -> tuple[Dataset, np.ndarray]:
    """Tokenized rows of one dataset and the indices of its kept, unique examples (updating `seen`)."""
    stats.rows_read = len(raw)
    if len(raw) == 0:
        raise DataError(f"dataset {spec.path} (split {spec.split!r}) is empty")
    if spec.max_samples is not None and spec.max_samples < len(raw):
        rng = np.random.default_rng(cfg.seed)
        raw = raw.select(np.sort(rng.choice(len(raw), spec.max_samples, replace=False)))
    big = len(raw) >= 20_000  # only long tokenizations get a progress bar; the rest is quiet
    if big:
        datasets.enable_progress_bars()
    tok = raw.map(_process, batched=True, batch_size=256, remove_columns=raw.column_names, features=_TOKENIZED,
                  fn_kwargs=dict(fmt=spec.format, cols=spec.columns, template=template, tokenizer=tokenizer,
                                 cfg=cfg), num_proc=cfg.num_proc if cfg.num_proc > 1 and len(raw) >= 1000 else None,
                  keep_in_memory=True, new_fingerprint=fingerprint, desc=f"tokenizing {spec.path}")
    if big:
        datasets.disable_progress_bars()
    status = np.asarray(tok.with_format("arrow")["_status"])
    bad = np.flatnonzero(status == RowStatus.BAD)
    if len(bad) and cfg.on_bad_row == "error":
        errors = tok.select(bad[:3])["_error"]
        more = f"\n(and {len(bad) - 3} more bad rows)" if len(bad) > 3 else ""
        raise DataError("\n".join(errors) + more + "\n(data.on_bad_row: skip skips and counts bad rows)")
    stats.bad_rows_skipped = len(bad)
    stats.overlong_dropped = int((status == RowStatus.DROPPED).sum())
    stats.overlong_truncated = int((status == RowStatus.TRUNCATED).sum())
    kept = np.flatnonzero(np.isin(status, [RowStatus.KEPT, RowStatus.TRUNCATED]))
    if cfg.dedup:
        keys = tok.with_format("arrow")["_key"].to_pylist()
        unique = []
        for i in kept:
            if keys[i] not in seen:
                seen.add(keys[i])
                unique.append(i)
        stats.duplicates_removed = len(kept) - len(unique)
        kept = np.asarray(unique, dtype=np.int64)
    stats.examples = len(kept)
    if not len(kept):
        raise DataError(f"dataset {spec.path}: no usable examples out of {len(raw)} rows ({stats.bad_rows_skipped} "
                        f"bad, {stats.overlong_dropped} too long for max_seq_len {cfg.max_seq_len}, "
                        f"{stats.duplicates_removed} duplicates)")
    return tok, kept


# --------------------------------------------------------------------------------------------- mixing and packing

def _add_positions(batch: pa.Table) -> pa.Table:
    """position_ids restarting at 0 for each example of a row (packed rows list them in trl's `seq_lengths`)."""
    row_len = pc.list_value_length(batch["input_ids"].combine_chunks()).to_numpy(zero_copy_only=False)
    if "seq_lengths" in batch.column_names:
        lengths = batch["seq_lengths"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        batch = batch.drop_columns(["seq_lengths"])
    else:
        lengths = row_len
    lengths = lengths.astype(np.int64)
    pos = np.arange(lengths.sum(), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    offsets = np.concatenate([[0], np.cumsum(row_len)]).astype(np.int32)
    return batch.append_column("position_ids", pa.ListArray.from_arrays(offsets, pa.array(pos, pa.int32())))


def _rows(parts: list[tuple[Dataset, np.ndarray]], order: np.ndarray | None = None) -> Dataset:
    """input_ids and labels of rows `idx` of each tokenized dataset, concatenated, then reordered by `order`."""
    tables = [ds.data.table.select(["input_ids", "labels"]) for ds, _ in parts]
    offsets = np.cumsum([0] + [len(t) for t in tables])
    idx = np.concatenate([i + o for (_, i), o in zip(parts, offsets)]).astype(np.int64)
    return Dataset(pa.concat_tables(tables).take(idx if order is None else idx[order]))


def _finish(ds: Dataset, cfg: DataSection) -> tuple[Dataset, float]:
    """Training rows (packed, or one example each) with position_ids, and the packing efficiency."""
    if cfg.packing:
        from trl import pack_dataset  # imports transformers (seconds): only when packing, never on a cache hit

        ds = pack_dataset(ds, cfg.max_seq_len, strategy="bfd", map_kwargs={"batch_size": 10_000,
                                                                            "keep_in_memory": True})
    ds = ds.with_format("arrow").map(_add_positions, batched=True, batch_size=10_000, keep_in_memory=True)
    ds = ds.with_format(None)
    tokens = int(pc.sum(pc.list_value_length(ds.data.column("input_ids"))).as_py() or 0)
    return ds, tokens / max(1, len(ds) * cfg.max_seq_len)


def _name(spec: DatasetSection, names: dict) -> str:
    name = spec.path if spec.split == "train" else f"{spec.path}[{spec.split}]"
    return name if name not in names else f"{name} #{len(names) + 1}"


def _build(cfg: DataSection, specs, sources, val_sources, template, tokenizer, hf_cache: str, key: str) -> PreparedData:
    stats, seen = DataStats(max_seq_len=cfg.max_seq_len), set()
    train_parts, val_parts = [], []  # (tokenized dataset, row indices)
    for i, (spec, src) in enumerate(zip(cfg.validation, val_sources)):
        st = stats.validation.setdefault(_name(spec, stats.validation), DatasetStats())
        val_parts.append(_tokenize(spec, load(spec, *src, hf_cache), template, tokenizer, cfg, st, seen,
                                   f"{key}v{i}"))
    for i, (spec, src) in enumerate(zip(specs, sources)):
        st = stats.datasets.setdefault(_name(spec, stats.datasets), DatasetStats())
        tok, kept = _tokenize(spec, load(spec, *src, hf_cache), template, tokenizer, cfg, st, seen, f"{key}t{i}")
        rng = np.random.default_rng([cfg.seed, i])
        if cfg.val_fraction > 0 and len(kept) < 2:
            raise DataError(f"dataset {spec.path}: data.val_fraction needs at least 2 examples to hold some out, "
                            f"it has {len(kept)}")
        if cfg.val_fraction > 0:
            perm = rng.permutation(kept)
            st.held_out = max(1, round(cfg.val_fraction * len(kept)))
            val_parts.append((tok, np.sort(perm[:st.held_out])))
            kept = np.sort(perm[st.held_out:])
        whole, frac = divmod(spec.weight, 1)
        extra = np.sort(rng.choice(kept, round(frac * len(kept)), replace=False))
        idx = np.concatenate([np.tile(kept, int(whole)), extra]).astype(np.int64)
        lengths = pc.list_value_length(tok.data.column("input_ids")).to_numpy(zero_copy_only=False)
        st.train_examples = len(idx)
        st.train_tokens = int(lengths[idx].sum())
        st.train_trained_tokens = int(np.asarray(tok.data.column("_trained"))[idx].sum())
        train_parts.append((tok, idx))
    stats.train_examples = sum(len(idx) for _, idx in train_parts)
    if stats.train_examples == 0:
        raise DataError("no training examples are left (check the weights, val_fraction and the stats)")
    stats.train_tokens = sum(s.train_tokens for s in stats.datasets.values())
    stats.train_trained_tokens = sum(s.train_trained_tokens for s in stats.datasets.values())
    order = np.random.default_rng(cfg.seed).permutation(stats.train_examples)
    train, stats.packing_efficiency = _finish(_rows(train_parts, order), cfg)
    stats.train_rows = len(train)
    validation, examples = None, []
    if val_parts:
        for tok, idx in val_parts:
            for messages in map(json.loads, tok.select(idx[:N_VALIDATION_EXAMPLES])["messages"]):
                if messages[0]["role"] != "text" and len(examples) < N_VALIDATION_EXAMPLES:
                    examples.append({"messages": [{k: v for k, v in m.items() if k != "input" or v}
                                                  for m in messages]})
        stats.validation_examples = sum(len(idx) for _, idx in val_parts)
        validation, _ = _finish(_rows(val_parts), cfg)
        stats.validation_rows = len(validation)
    return PreparedData(train, validation, stats, examples, data_fingerprint(train, validation))


# ------------------------------------------------------------------------------------------------------ caching

def _cache_key(cfg: DataSection, specs, sources, val_sources, template, tokenizer) -> str:
    """Everything the result depends on: the data options, each dataset's options and its files' identity (path,
    size, mtime), the template's and the tokenizer's fingerprints, and this pipeline's code."""
    code = [hashlib.sha256(Path(__file__).with_name(f).read_bytes()).hexdigest()
            for f in ("data.py", "sources.py", "templates.py", "inputs.py")]
    material = {
        "code": code, "template": template.sha256, "tokenizer": tokenizer.sha256,
        "data": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("cache_dir", "num_proc", "validation")},
        "train": [{**dataclasses.asdict(s), "source": identity(*src)} for s, src in zip(specs, sources)],
        "validation": [{**dataclasses.asdict(s), "source": identity(*src)} for s, src in zip(cfg.validation,
                                                                                                val_sources)]}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _save(prepared: PreparedData, entry: Path) -> None:
    """Store a prepared dataset under its cache key (an entry of the same key, from another process, is replaced:
    it holds the same data)."""
    with AtomicFolder(entry, replaceable=lambda path: True, what="a data cache entry", stale=everything_stale) as tmp:
        prepared.train.save_to_disk(str(tmp / "train"))
        if prepared.validation is not None:
            prepared.validation.save_to_disk(str(tmp / "validation"))
        meta = {"stats": dataclasses.asdict(prepared.stats), "validation_examples": prepared.validation_examples,
                "fingerprint": prepared.fingerprint}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def _load_cached(entry: Path) -> PreparedData:
    meta = json.loads((entry / "meta.json").read_text())
    s = meta["stats"]
    stats = DataStats(**{**s, "datasets": {k: DatasetStats(**v) for k, v in s["datasets"].items()},
                         "validation": {k: DatasetStats(**v) for k, v in s["validation"].items()}})
    stats.cache_hit, stats.cache_path = True, str(entry)
    validation = datasets.load_from_disk(str(entry / "validation")) if (entry / "validation").exists() else None
    train = datasets.load_from_disk(str(entry / "train"))
    return PreparedData(train, validation, stats, meta["validation_examples"],
                        meta.get("fingerprint") or data_fingerprint(train, validation))


def build_datasets(recipe_data: DataSection, specs: list[DatasetSection], template: Template, tokenizer, *,
                   base_dir: str = ".") -> PreparedData:
    """Training and validation data of a recipe (see the module docstring), from the cache when it is fresh.
    Dataset paths and cache_dir are relative to `base_dir`: the current directory, not the recipe's folder."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # datasets' own bars (map, save) are noise here
    try:
        return _build_datasets(recipe_data, specs, template, tokenizer, base_dir)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _build_datasets(recipe_data, specs, template, tokenizer, base_dir) -> PreparedData:
    cfg = recipe_data
    if not specs:
        raise DataError("the recipe lists no datasets")
    sources = [source(s, base_dir) for s in specs]
    val_sources = [source(s, base_dir) for s in cfg.validation]
    root = Path(base_dir, os.path.expanduser(cfg.cache_dir or DEFAULT_CACHE_DIR))
    key = _cache_key(cfg, specs, sources, val_sources, template, tokenizer)
    hit = (root / key / "meta.json").exists()
    if not hit:
        root.mkdir(parents=True, exist_ok=True)
        _save(_build(cfg, specs, sources, val_sources, template, tokenizer, str(root / "hf"), key), root / key)
    prepared = _load_cached(root / key)  # memory-mapped from the cache either way
    prepared.stats.cache_hit = hit
    return prepared


# ---------------------------------------------------------------------------------------------- batches, display

def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch padded on the right to its longest row: input_ids with pad_id, labels with -100, position_ids 0.

    Pads come after every real token and attention is causal, so no real token sees them; with position 0 each pad
    also starts its own one-token "document" (0 never continues the previous position), so pads never form a
    sequence with the real tokens and no attention row is empty. Their labels are -100: no loss.
    """
    T = max(len(r["input_ids"]) for r in rows)
    out = {k: torch.full((len(rows), T), fill, dtype=torch.long)
           for k, fill in (("input_ids", pad_id), ("labels", IGNORE_INDEX), ("position_ids", 0))}
    for i, r in enumerate(rows):
        for k, t in out.items():
            t[i, :len(r[k])] = torch.as_tensor(r[k], dtype=torch.long)
    return out


def render_example_for_display(row: dict, tokenizer, *, color: bool = False) -> str:
    """A training row as text, one block per packed example, with its token counts. Untrained (masked) text is
    wrapped in ⟦...⟧, or dimmed with `color`; BOS and EOS show as <s> and </s>."""
    special = {tokenizer.bos_id: "<s>", tokenizer.eos_id: "</s>"}
    blocks: list[list[tuple[bool, list[int]]]] = []  # per example: runs of (trained, ids)
    for t, label, p in zip(row["input_ids"], row["labels"], row["position_ids"]):
        if p == 0:
            blocks.append([])
        if blocks[-1] and blocks[-1][-1][0] == (label != IGNORE_INDEX):
            blocks[-1][-1][1].append(t)
        else:
            blocks[-1].append((label != IGNORE_INDEX, [t]))
    out = []
    for runs in blocks:
        text, fresh = [], True  # fresh: at a sequence start, where decoding drops the dummy-prefix space
        for trained, run in runs:
            pieces, start = [], 0
            for i, t in enumerate(run + [None]):
                if t is None or t in special:
                    if i > start:
                        pieces.append(tokenizer.decode(run[start:i], continuation=not fresh))
                        fresh = False
                    if t is not None:
                        pieces.append(special[t])
                        fresh = t == tokenizer.bos_id
                    start = i + 1
            piece = "".join(pieces)
            text.append(piece if trained else f"\033[2m{piece}\033[0m" if color else f"⟦{piece}⟧")
        n, n_trained = sum(len(r) for _, r in runs), sum(len(r) for trained, r in runs if trained)
        out.append(f"--- example: {n} tokens, {n_trained} trained\n{''.join(text)}")
    return "\n".join(out)


def show_examples(prepared: PreparedData, tokenizer, n: int, *, color: bool = False) -> str:
    """The stats, then the first n training rows with their masks (what `finetune preprocess --show n` prints)."""
    rows = [render_example_for_display(prepared.train[i], tokenizer, color=color)
            for i in range(min(n, len(prepared.train)))]
    return "\n\n".join([prepared.stats.describe()] + [f"=== row {i}\n{r}" for i, r in enumerate(rows)])
