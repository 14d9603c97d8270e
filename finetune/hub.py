"""The Hugging Face Hub: models and adapters by Hub id (`meta-llama/Llama-3.2-1B`, `owner/name@revision`) through
huggingface_hub's `snapshot_download` and its cache, and clear messages for the Hub errors of `datasets`.

Everything huggingface_hub reads from the environment applies (HF_TOKEN or `hf auth login`, HF_HUB_OFFLINE,
HF_ENDPOINT, HF_HOME / HF_HUB_CACHE, HTTPS_PROXY and the other proxy variables); it reads them when it is first
imported. Only safetensors weights, JSON and tokenizer files are downloaded, never a pickle (.bin, .pth): a Hub
snapshot is read only in the safetensors layout, even when the cache holds more (offline, huggingface_hub returns
the whole cached snapshot folder whatever was asked for).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import UserError

# What a model or an adapter needs, and nothing else: top-level files only (fnmatch's `*` also matches "/", hence
# the ignore pattern "*/*": Meta's original/ folder is never fetched), any safetensors weights but the reference
# layout's consolidated*.safetensors (a second copy), configs, tokenizer files, our template.yaml.
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
               "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja", "template.yaml", "adapter_config.json")
PICKLE_FILES = ("*.bin", "*.pth", "*.pt", "*.ckpt", "*.pkl", "*.pickle")  # never downloaded, whatever the name
IGNORED_FILES = ("*/*", "consolidated*.safetensors", *PICKLE_FILES)
CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
                "chat_template.jinja", "template.yaml", "adapter_config.json")  # for checks before any work

_NAME = r"\w(?:[\w.-]{0,94}\w)?"  # huggingface_hub's rule: ASCII, 96 at most, no leading or trailing - or .
_HUB_ID = re.compile(rf"({_NAME}/{_NAME})(?:@([\w.-]+))?", re.ASCII)
# Names a dataset path may end with that make it a local file (finetune.recipe.LOCAL_DATA_SUFFIXES: a test keeps
# the two equal), so that a Hub id is never something `looks_like_local_path` takes for a file.
_FILE_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet", ".txt", ".tsv", ".gz", ".arrow"}
_SNAPSHOT = re.compile(r"[0-9a-f]{40}")


def is_hub_id(text: str | os.PathLike) -> bool:
    """Whether `text` names a Hub repository, "owner/name" or "owner/name@revision" (a branch, tag or commit),
    rather than a local path: exactly one "/", the Hub's characters, no file suffix of a dataset (.jsonl, .json,
    .csv, ...), and nothing of that name on disk. A local folder always wins; "./x", "/x", "~/x" and "a/b/c" are
    local paths."""
    text = str(text)
    found = _HUB_ID.fullmatch(text)
    if not found or "--" in found[1] or ".." in found[1] or found[1].endswith(".git"):
        return False
    if os.path.splitext(found[1])[1].lower() in _FILE_SUFFIXES:
        return False
    return not os.path.exists(text)


def split_hub_id(text: str) -> tuple[str, str | None]:
    """("owner/name", revision or None) of a Hub id."""
    repo_id, _, revision = str(text).partition("@")
    return repo_id, revision or None


def hub_id_of(path: str | os.PathLike) -> str | None:
    """The Hub id ("owner/name") of a snapshot folder in the Hugging Face cache
    (.../models--owner--name/snapshots/<commit>), else None."""
    snapshot = Path(path).resolve()
    repo = snapshot.parent.parent.name
    if snapshot.parent.name != "snapshots" or not _SNAPSHOT.fullmatch(snapshot.name):
        return None
    parts = repo.split("--")  # repository names never contain "--"
    return f"{parts[1]}/{parts[2]}" if len(parts) == 3 and parts[0] == "models" else None


def hub_revision_of(path: str | os.PathLike) -> str | None:
    """The commit of a snapshot folder in the Hugging Face cache (for an adapter's `revision`), else None."""
    return Path(path).resolve().name if hub_id_of(path) else None


def resolve_model(id_or_path: str | os.PathLike, what: str, *, cache_dir: str | os.PathLike | None = None,
                  configs_only: bool = False) -> Path:
    """The folder of a model or adapter: a local path as it is (not checked here); a Hub id downloaded into (or
    found in) the Hugging Face cache, only its safetensors weights, config, tokenizer and adapter files, and
    checked to be a safetensors checkpoint or adapter. `what` names the setting in messages ("model.checkpoint",
    "--base"). `cache_dir`: instead of HF_HUB_CACHE. `configs_only`: only the small JSON files (config.json,
    tokenizer_config.json, adapter_config.json, ...: for checks before any work), weights not checked; a later
    full call completes the same folder. Every failure is a UserError saying what to do."""
    if not is_hub_id(id_or_path):
        return Path(os.path.expanduser(str(id_or_path)))
    import huggingface_hub

    repo_id, revision = split_hub_id(str(id_or_path))
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                                   allow_patterns=list(CONFIG_FILES if configs_only else MODEL_FILES),
                                                   ignore_patterns=list(IGNORED_FILES))
    except Exception as e:  # noqa: BLE001 - every failure becomes one message; see _download_problem
        raise UserError(f"{what} {id_or_path}: {_download_problem(e, str(id_or_path), cache_dir)}") from None
    folder = Path(folder)
    if not configs_only:
        _check_snapshot(folder, f"{what} {id_or_path}", str(id_or_path))
    return folder


def _check_snapshot(folder: Path, where: str, hub_id: str) -> None:
    """A Hub snapshot must be a safetensors checkpoint (config.json + model.safetensors or its index) or a
    safetensors adapter; whatever else the cached folder holds is never read."""
    names = {p.name for p in folder.iterdir()}
    if "adapter_config.json" in names:
        if "adapter_model.safetensors" in names:
            return
        problem = "an adapter without adapter_model.safetensors"
    elif "config.json" in names and names & {"model.safetensors", "model.safetensors.index.json"}:
        return
    else:
        problem = "no safetensors weights (config.json with model.safetensors or model.safetensors.index.json)"
    pickles = sorted(str(p.relative_to(folder)) for pattern in PICKLE_FILES for p in folder.rglob(pattern))
    if pickles:
        shown = ", ".join(pickles[:3]) + (", ..." if len(pickles) > 3 else "")
        problem += f"; the snapshot holds pickle files ({shown}), which are never read from the Hub"
    raise UserError(f"{where}: the Hub snapshot {folder} has {problem}. A Hub snapshot is read only in the "
                    f"safetensors layout (Meta's consolidated.*.pth and pytorch_model*.bin are never downloaded or "
                    f"unpickled): use a repository with safetensors weights, or convert the checkpoint on a machine "
                    f"you trust and pass its local folder. If the cached copy is incomplete, run `hf download "
                    f"{split_hub_id(hub_id)[0]}` where the Hub can be reached")


def _download_problem(e: Exception, hub_id: str, cache_dir) -> str:
    """What went wrong in snapshot_download, and what to do about it."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (DisabledRepoError, GatedRepoError, HfHubHTTPError, HFValidationError,
                                        IncompleteSnapshotError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo_id, revision = split_hub_id(hub_id)
    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    nothing_local = "" if revision else f" (and there is no local folder {hub_id} in {os.getcwd()})"
    download = f"`hf download {repo_id}{f' --revision {revision}' if revision else ''}`"
    if isinstance(e, GatedRepoError):  # a RepositoryNotFoundError too: first
        return (f"a gated model: accept its license on https://huggingface.co/{repo_id}, then log in "
                f"(`hf auth login`, or set HF_TOKEN to a token of the account that was granted access)")
    if isinstance(e, RepositoryNotFoundError):
        return (f"no such model repository on the Hub at {constants.ENDPOINT}{nothing_local}; if it is private, "
                f"log in (`hf auth login`, or set HF_TOKEN)")
    if isinstance(e, RevisionNotFoundError):
        return f"the repository has no revision {revision!r} (a branch, tag or commit)"
    if isinstance(e, DisabledRepoError):
        return "the repository is disabled on the Hub"
    if isinstance(e, IncompleteSnapshotError):
        return (f"the cached copy in {e.snapshot_path} is incomplete (an interrupted download?) and the Hub cannot "
                f"be reached: run {download} where it can, or unset HF_HUB_OFFLINE")
    if isinstance(e, LocalEntryNotFoundError):
        cause = e.__cause__
        if isinstance(cause, OfflineModeIsEnabled) or (cause is None and constants.HF_HUB_OFFLINE):
            return (f"not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set{nothing_local}: download "
                    f"it on a machine with access ({download}, then copy the cache), or unset HF_HUB_OFFLINE")
        if cause is None:  # local_files_only
            return f"not in the Hugging Face cache ({cache}){nothing_local}"
        e = cause  # a connection error or an HTTP error, with nothing cached
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else "?"
        if status == 401:
            return (f"the Hub at {constants.ENDPOINT} refused the credentials (HTTP 401): check HF_TOKEN or log in "
                    f"again (`hf auth login`)")
        return (f"the Hub at {constants.ENDPOINT} answered HTTP {status} and the model is not in the Hugging Face "
                f"cache ({cache}); try again later, or set HF_HUB_OFFLINE=1 to use a cached copy")
    if isinstance(e, HFValidationError):
        return f"not a valid Hub id: {e}"
    if _is_connection_error(e):
        return (f"cannot reach the Hub at {constants.ENDPOINT} (HF_ENDPOINT; {_first_line(e)}) and the model is not "
                f"in the Hugging Face cache ({cache}){nothing_local}: check the network and the proxy settings (HTTPS_PROXY), or "
                f"download it where the Hub can be reached ({download}) and set HF_HUB_OFFLINE=1")
    if isinstance(e, OSError):  # writing the cache: disk full, permissions
        return f"cannot store it in the Hugging Face cache ({cache}): {_first_line(e)} (set HF_HUB_CACHE elsewhere?)"
    return f"cannot download it from the Hub: {_first_line(e)}"


def _is_connection_error(e: BaseException) -> bool:
    """A network failure: builtin ConnectionError or TimeoutError, or any error of the HTTP clients
    (huggingface_hub's httpx2, datasets' httpx, requests) that is not an HTTP status."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    module = type(e).__module__.split(".")[0]
    return module in ("httpx", "httpx2", "httpcore", "requests", "urllib3")


def _first_line(e: BaseException) -> str:
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


LOCAL_DATA = "use a local file or folder (.jsonl, .json, .csv, .parquet; `hf download ID --repo-type dataset " \
             "--local-dir DIR` fetches a Hub dataset's files)"


def dataset_problem(dataset_id: str, e: Exception, cache_dir: str | os.PathLike | None = None, *,
                    instead: str = LOCAL_DATA) -> str:
    """Why `datasets.load_dataset(dataset_id)` failed, and what to do: offline and not cached, the Hub out of
    reach, a gated or missing dataset, or datasets' own message. `cache_dir`: the datasets cache it was given;
    `instead`: the local alternative to suggest."""
    from datasets import config
    from datasets.exceptions import DatasetNotFoundError

    text = str(e)
    cache = cache_dir or config.HF_DATASETS_CACHE
    instead = instead.replace("ID", dataset_id)
    if "OfflineModeIsEnabled" in text or (isinstance(e, ConnectionError) and config.HF_HUB_OFFLINE):
        return (f"Hub dataset {dataset_id!r} is not in the datasets cache ({cache}) and HF_HUB_OFFLINE is set: "
                f"load it once where the Hub can be reached (same cache), or unset HF_HUB_OFFLINE, or {instead}")
    if isinstance(e, DatasetNotFoundError) and "gated" in text:
        return (f"Hub dataset {dataset_id!r} is gated: accept its conditions on "
                f"https://huggingface.co/datasets/{dataset_id}, then log in (`hf auth login`, or set HF_TOKEN)")
    if isinstance(e, DatasetNotFoundError) or (isinstance(e, FileNotFoundError) and "Hugging Face Hub" in text):
        return (f"no dataset {dataset_id!r} on the Hub at {config.HF_ENDPOINT} (or it is private: log in with "
                f"`hf auth login`, or set HF_TOKEN), and no local file or folder of that name in {os.getcwd()}")
    if _is_connection_error(e):
        return (f"cannot reach the Hub at {config.HF_ENDPOINT} (HF_ENDPOINT) for dataset {dataset_id!r} "
                f"({_first_line(e)}): check the network and the proxy settings (HTTPS_PROXY), or set "
                f"HF_HUB_OFFLINE=1 to use a cached copy, or {instead}")
    return f"cannot load Hub dataset {dataset_id!r}: {_first_line(e)}"
