"""Reading the datasets of a recipe: local .jsonl/.json (our reader: errors name the file and line), .csv (every
cell text; rows located by file and line) and .parquet files, folders of them, or Hugging Face Hub ids.

`source` tells a local path from a Hub id and lists the files; `load` returns the selected rows as a `datasets`
Dataset with a `_where` column ("file:line") for error messages (JSON rows stay unparsed, in `_json`, until
`finetune.data` normalizes them).
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import datasets
from datasets import Dataset, Features, Value

from . import hub
from .errors import DataError, UserError
from .inputs import check_regular_file, decode_text, parse_json
from .recipe import DatasetSection, looks_like_local_path

DATA_EXTS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _data_files(path: Path) -> list[Path]:
    if not path.is_dir():
        try:
            check_regular_file(str(path), "dataset")  # not a device or a pipe: those never end
        except UserError as e:
            raise DataError(str(e)) from None
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_EXTS) if path.is_dir() \
        else [path]
    kinds = {DATA_EXTS.get(p.suffix.lower()) for p in files}
    if not files:
        raise DataError(f"dataset folder {path} has no .jsonl, .json, .csv or .parquet files")
    if None in kinds:
        raise DataError(f"dataset file {path}: unsupported type {path.suffix!r} (use {', '.join(DATA_EXTS)})")
    if len(kinds) > 1:
        raise DataError(f"dataset folder {path} mixes file types ({', '.join(sorted(kinds))}); use one")
    return files


def source(spec: DatasetSection, base_dir: str) -> tuple[str, object]:
    """("local", [files]) or ("hub", id), with the identity that goes into the cache key."""
    path = Path(base_dir, os.path.expanduser(spec.path))
    if path.exists():
        return "local", _data_files(path)
    if looks_like_local_path(spec.path):
        raise DataError(f"dataset file not found: {spec.path} (paths are relative to the current directory, "
                        f"{Path(base_dir).resolve()})")
    return "hub", spec.path


def identity(kind: str, source) -> object:
    if kind == "hub":
        return source
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in source]


def _read_json(path: Path) -> tuple[list[str], list[str], list[str]]:
    """Rows of a JSON-lines file (or a .json array of objects) as JSON strings, their locations ("file:line") and
    what is wrong with each ("" for none): a line that is not UTF-8 is a bad row, which data.on_bad_row may skip."""
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a leading byte-order mark is skipped
    if path.suffix.lower() == ".json":
        try:
            items = parse_json(decode_text(data, str(path)))
            if not isinstance(items, list):
                raise DataError(f"{path}: expected a JSON array of objects or JSON lines, got {type(items).__name__}")
            rows = [json.dumps(x) for x in items]
            return rows, [f"{path}, item {i + 1}" for i in range(len(items))], [""] * len(rows)
        except UserError as e:  # not UTF-8: the whole document is unreadable
            raise DataError(str(e)) from None
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # else: JSON lines in a .json file
                raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        except ValueError as e:  # nested too deeply
            raise DataError(f"{path}: malformed JSON: {e}") from None
    # split on "\n" only: str.splitlines would also cut at U+2028 and others, which JSON strings may hold raw
    rows, where, bad = [], [], []
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            line, problem = raw.decode("utf-8"), ""
        except UnicodeDecodeError as e:
            line, problem = raw.decode("utf-8", "replace"), f"not UTF-8 text ({e.reason} at byte {e.start + 1} of " \
                                                            f"the line)"
        if line.strip():  # parsed in finetune.data
            rows.append("" if problem else line)
            where.append(f"{path}:{n}")
            bad.append(problem)
    return rows, where, bad


def _csv_layout(files: list[Path]) -> tuple[list[str], list[str]]:
    """The header of CSV files (they must agree) and each data row's location "file:line"; a file that is not
    UTF-8 or a row with the wrong number of fields is an error naming its file and line."""
    header, where = None, []
    for f in files:
        line = 1
        try:
            with open(f, newline="", encoding="utf-8-sig") as fh:  # -sig: a byte-order mark (Excel) is skipped
                reader = csv.reader(fh)
                columns = next(reader, None)
                if not columns:
                    raise DataError(f"{f}:1: a CSV file needs a header line with the column names")
                if header is None:
                    header = columns
                elif columns != header:
                    raise DataError(f"{f}:1: columns {columns} differ from {files[0]}'s {header}")
                line = reader.line_num + 1
                for row in reader:
                    if row and len(row) != len(header):  # blank lines are skipped
                        raise DataError(f"{f}:{line}: {len(row)} fields, but the header has {len(header)}")
                    if row:
                        where.append(f"{f}:{line}")
                    line = reader.line_num + 1
        except UnicodeDecodeError:
            raw = f.read_bytes()
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                line = raw[:e.start].count(b"\n") + 1
                raise DataError(f"{f}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            raise DataError(f"{f}: not UTF-8 text") from None
        except csv.Error as e:
            raise DataError(f"{f}:{line}: malformed CSV: {e}") from None
    return header, where


def load(spec: DatasetSection, kind: str, source, hf_cache: str) -> Dataset:
    """The selected rows of a dataset: its columns (or `_json` for our reader) plus `_where`."""
    if kind == "hub":  # huggingface_hub's settings apply: HF_HUB_OFFLINE, HF_TOKEN, HF_ENDPOINT, proxies
        try:
            ds = datasets.load_dataset(spec.path, spec.name, split=spec.split, cache_dir=hf_cache)
        except Exception as e:  # noqa: BLE001 - ConnectionError, DatasetNotFoundError, bad split names, ...
            raise DataError(f"dataset {spec.path} (split {spec.split!r}): "
                            f"{hub.dataset_problem(spec.path, e, hf_cache)}") from None
        return ds.add_column("_where", [f"{spec.path}, row {i + 1}" for i in range(len(ds))])
    files = source
    loader = DATA_EXTS[files[0].suffix.lower()]
    if loader == "json":
        rows, where, bad = [], [], []
        for f in files:
            r, w, b = _read_json(f)
            rows += r
            where += w
            bad += b
        ds = Dataset.from_dict({"_json": rows, "_where": where, "_bad": bad})
    else:
        extra, where = {}, []
        if loader == "csv":  # every cell is text ("007" stays "007"); an empty cell is a missing field
            header, where = _csv_layout(files)
            if not where:  # datasets' own message would be 'Instruction "train" corresponds to no data!'
                raise DataError(f"dataset {spec.path}: no rows (only the header line {','.join(header)})")
            extra = {"features": Features({c: Value("string") for c in header}), "encoding": "utf-8-sig"}
        else:
            import pyarrow.parquet as pq
            for f in files:
                try:
                    where += [f"{f}, row {i + 1}" for i in range(pq.read_metadata(f).num_rows)]
                except Exception as e:
                    raise DataError(f"{f}: not a readable parquet file: {e}") from None
            if not where:
                raise DataError(f"dataset {spec.path}: no rows")
        try:
            ds = datasets.load_dataset(loader, data_files=[str(f) for f in files], split="train",
                                       cache_dir=hf_cache, **extra)
        except Exception as e:  # datasets wraps the parser's error: show the cause
            raise DataError(f"cannot read {spec.path}: {e.__cause__ or e}") from None
        if len(where) != len(ds):  # the CSV parsers disagree on some odd file: number the rows
            where = [f"{spec.path}, row {i + 1}" for i in range(len(ds))]
        ds = ds.add_column("_where", where)
    if len(ds) == 0:  # reported as an empty dataset (a split of nothing is no split error)
        return ds
    try:
        parts = datasets.ReadInstruction.from_spec(spec.split).to_absolute({"train": len(ds)})
    except Exception as e:
        raise DataError(f"dataset {spec.path}: bad split {spec.split!r} (local files have one split, 'train', "
                        f"sliced like train[:95%]): {e}") from None
    return ds.select([i for p in parts for i in range(p.from_, p.to)])
