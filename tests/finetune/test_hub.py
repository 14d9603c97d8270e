"""Models by Hub id through huggingface_hub's snapshot_download and its cache, offline: a cache laid out as
huggingface_hub lays it out (blobs, snapshots/<commit> links, refs/main), built here from a tiny model; the online
paths with huggingface_hub's HTTP calls replaced (no network is ever touched)."""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx2
import pytest
from datasets.exceptions import DatasetNotFoundError
from huggingface_hub import _snapshot_download, constants, hf_api
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                    RevisionNotFoundError)

from finetune import hub
from finetune.errors import UserError
from finetune.recipe import LOCAL_DATA_SUFFIXES, looks_like_local_path
from llama_core.weights import detect_format, load_model, save_hf, save_meta

ROOT = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PICKLES = (".bin", ".pth", ".pt", ".ckpt", ".pkl", ".pickle")


def cache_repo(cache: Path, repo_id: str, files: Path, commit: str = COMMIT) -> Path:
    """`files` as the repository `repo_id` in a Hugging Face cache, laid out as huggingface_hub does: each file a
    blob, linked from snapshots/<commit>/, and refs/main naming the commit. Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for f in sorted(p for p in files.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / f.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)  # as huggingface_hub writes it: no newline
    return snapshot


@pytest.fixture
def model_files(tmp_path, tiny_model, tokenizer):
    """A tiny model as published on the Hub: config.json, model.safetensors, tokenizer.model, and Meta's original
    pickle files beside them (as in meta-llama's repositories)."""
    model = tiny_model()
    folder = save_hf(model, model.config, tmp_path / "published", extra_files={"tokenizer.model": tokenizer.path})
    save_meta(model, model.config, tmp_path / "meta")
    shutil.copytree(tmp_path / "meta", folder / "original")
    (folder / "pytorch_model.bin").write_bytes(b"a pickle")
    (folder / "README.md").write_text("a model card")
    return folder


def refuse_network(monkeypatch) -> None:
    """Any connection or name lookup fails the test (a socket probe too)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network use: {args}")
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def hub_offline(monkeypatch, datasets_cache: Path) -> None:
    """HF_HUB_OFFLINE=1 as huggingface_hub and datasets read it at their import, an empty default datasets cache
    (`datasets_cache`), and no network at all."""
    import datasets

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", datasets_cache)
    refuse_network(monkeypatch)


@pytest.fixture
def no_network(monkeypatch):
    refuse_network(monkeypatch)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    hub_offline(monkeypatch, tmp_path / "datasets")


@pytest.fixture
def online(monkeypatch, no_network):
    """Online mode; each test replaces the HTTP calls it reaches."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_hub_ids_and_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for text in ("meta-llama/Llama-3.2-1B", "owner/name@main", f"owner/name@{COMMIT}", "tatsu-lab/alpaca",
                 "a_b/c.d-e", "meta-llama/Llama-2-7b-hf@v1.0"):
        assert hub.is_hub_id(text), text
    for text in ("./owner/name", "/owner/name", "~/owner/name", "runs/x/final", "owner", "owner/", "/name",
                 "owner/name@", "owner/name@refs/pr/1", "owner/-name", "owner/name.", "owner/na--me", "owner/a..b",
                 "owner/name.git", "own er/name", "owner\\name", "C:\\models\\x", "owner/näme", "", "a/b/",
                 "owner/" + "x" * 97):
        assert not hub.is_hub_id(text), text
    # the dataset rule agrees: a Hub id is never what finetune.recipe takes for a local file
    for suffix in LOCAL_DATA_SUFFIXES:
        assert not hub.is_hub_id(f"owner/data{suffix}") and looks_like_local_path(f"owner/data{suffix}")
    for text in ("tatsu-lab/alpaca", "meta-llama/Llama-3.2-1B", "owner/name@main", "./a/b", "a/b/c", "~/a/b"):
        assert hub.is_hub_id(text) == (not looks_like_local_path(text)), text
    (tmp_path / "owner" / "name").mkdir(parents=True)  # a local folder of that name wins
    assert not hub.is_hub_id("owner/name") and hub.is_hub_id("owner/other")


def test_local_paths_are_returned_as_they_are(monkeypatch):
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: pytest.fail("no Hub look-up"))
    for text in ("./runs/x/final", "/models/llama-7b", "runs/x/final", "llama7b"):
        assert hub.resolve_model(text, "--model") == Path(text)
    assert hub.resolve_model("~/m", "--model") == Path.home() / "m"


def test_offline_from_the_cache(tmp_path, model_files, offline):
    cache = tmp_path / "cache"
    snapshot = cache_repo(cache, "owner/tiny", model_files)
    for ref in ("owner/tiny", "owner/tiny@main", f"owner/tiny@{COMMIT}"):
        folder = hub.resolve_model(ref, "model.checkpoint", cache_dir=cache)
        assert folder == snapshot.resolve() and folder.is_dir()
    # offline, huggingface_hub returns the whole cached folder (the pickles too): it is read as safetensors only
    assert (folder / "original" / "consolidated.00.pth").is_file() and detect_format(folder) == "hf"
    assert load_model(folder).config == load_model(model_files).config
    assert hub.hub_id_of(folder) == "owner/tiny" and hub.hub_revision_of(folder) == COMMIT
    assert hub.hub_id_of(model_files) is None and hub.hub_revision_of(model_files) is None
    assert hub.hub_id_of(folder / "original") is None and hub.hub_id_of(tmp_path / "snapshots" / COMMIT) is None


def test_offline_not_cached_or_no_such_revision(tmp_path, model_files, offline):
    cache = tmp_path / "cache"
    cache_repo(cache, "owner/tiny", model_files)
    for ref in ("owner/missing", "owner/tiny@v2", "owner/tiny@" + "f" * 40):
        with pytest.raises(UserError) as e:
            hub.resolve_model(ref, "--base", cache_dir=cache)
        assert str(e.value).startswith(f"--base {ref}: not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE "
                                       f"is set"), str(e.value)
        repo, _, revision = ref.partition("@")
        download = f"`hf download {repo}{f' --revision {revision}' if revision else ''}`"
        assert f"({download}, then copy the cache), or unset HF_HUB_OFFLINE" in str(e.value), str(e.value)


def test_meta_layout_and_pickles_are_refused(tmp_path, tiny_model, tokenizer, offline):
    cache, model = tmp_path / "cache", tiny_model()
    save_meta(model, model.config, tmp_path / "meta")
    shutil.copyfile(tokenizer.path, tmp_path / "meta" / "tokenizer.model")
    cache_repo(cache, "meta/llama-tiny", tmp_path / "meta")
    with pytest.raises(UserError, match=r"model.checkpoint meta/llama-tiny: the Hub snapshot .* has no safetensors "
                                        r"weights .*pickle files \(consolidated.00.pth\).*read only in the "
                                        r"safetensors layout"):
        hub.resolve_model("meta/llama-tiny", "model.checkpoint", cache_dir=cache)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.bin").write_bytes(b"a pickle")
    cache_repo(cache, "owner/old-adapter", adapter)
    with pytest.raises(UserError, match=r"an adapter without adapter_model.safetensors.*adapter_model.bin"):
        hub.resolve_model("owner/old-adapter", "--adapter", cache_dir=cache)
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    cache_repo(cache, "owner/adapter", adapter)
    assert hub.resolve_model("owner/adapter", "--adapter", cache_dir=cache).name == COMMIT


def test_environment_is_honoured(tmp_path, model_files):
    """HF_HUB_OFFLINE and HF_HUB_CACHE as a user sets them (read at import: a fresh interpreter)."""
    cache = tmp_path / "hf" / "hub"
    snapshot = cache_repo(cache, "owner/tiny", model_files)
    script = ("from finetune import hub\nfrom finetune.errors import UserError\n"
              "print(hub.resolve_model('owner/tiny', '--model'))\n"
              "try:\n    hub.resolve_model('owner/missing', '--model')\nexcept UserError as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9",
               PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    found, message = out.stdout.splitlines()
    assert found == str(snapshot.resolve())
    assert message.startswith(f"--model owner/missing: not in the Hugging Face cache ({cache.resolve()}) and "
                              f"HF_HUB_OFFLINE is set"), message


def _fake_hub(monkeypatch, remote: Path, fetched: list[str]):
    """The Hub's answers for one repository whose files are `remote`: repo_info, the file listing, and the
    download of one file into the cache (recorded in `fetched`)."""
    def download(repo_id, filename, *, cache_dir, revision, **kwargs):
        fetched.append(filename)
        out = Path(cache_dir, "models--" + repo_id.replace("/", "--"), "snapshots", revision, filename)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(remote / filename, out)
        return str(out)

    files = [hf_api.RepoFile(path=str(p.relative_to(remote)), size=p.stat().st_size, oid="0" * 40)
             for p in sorted(remote.rglob("*")) if p.is_file()]
    def repo_info(self, repo_id, **kwargs):
        if constants.is_offline_mode():  # as huggingface_hub's HTTP client does
            raise OfflineModeIsEnabled("offline")
        return SimpleNamespace(sha=COMMIT)

    monkeypatch.setattr(hf_api.HfApi, "repo_info", repo_info)
    monkeypatch.setattr(hf_api.HfApi, "list_repo_tree", lambda self, repo_id, **kw: iter(files))
    monkeypatch.setattr(_snapshot_download, "hf_hub_download", download)


def test_online_download_takes_only_safetensors_and_configs(tmp_path, model_files, monkeypatch, online):
    cache, fetched = tmp_path / "cache", []
    (model_files / "tokenizer_config.json").write_text("{}")
    (model_files / "consolidated.safetensors").write_bytes(b"a second copy of the weights")
    _fake_hub(monkeypatch, model_files, fetched)
    configs = hub.resolve_model("owner/tiny", "model.checkpoint", cache_dir=cache, configs_only=True)
    assert sorted(fetched) == ["config.json", "generation_config.json", "tokenizer_config.json"]
    fetched.clear()
    folder = hub.resolve_model("owner/tiny", "model.checkpoint", cache_dir=cache)  # asked for again: the real
    assert folder == configs and sorted(fetched) == [  # download skips what is cached
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"]
    assert load_model(folder).config == load_model(model_files).config and hub.hub_id_of(folder) == "owner/tiny"
    # later, offline: the cached listing names the pickles, which were never wanted: the snapshot is complete
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.resolve_model("owner/tiny", "model.checkpoint", cache_dir=cache) == folder
    (folder / "tokenizer.model").unlink()  # but a wanted file missing is an incomplete copy
    with pytest.raises(UserError, match=r"the cached copy in .* is incomplete .*`hf download owner/tiny`"):
        hub.resolve_model("owner/tiny", "model.checkpoint", cache_dir=cache)


def test_no_pickle_is_ever_asked_for(tmp_path, monkeypatch, model_files):
    seen = {}

    def snapshot_download(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(model_files)
    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    assert hub.resolve_model("meta-llama/Llama-3.2-1B@main", "--model") == model_files
    assert seen["repo_id"] == "meta-llama/Llama-3.2-1B" and seen["revision"] == "main"
    assert not [p for p in seen["allow_patterns"] if p.endswith(PICKLES) or p in ("*", "*.*")]
    assert "*.safetensors" in seen["allow_patterns"] and "config.json" in seen["allow_patterns"]
    assert all(f"*{s}" in seen["ignore_patterns"] for s in PICKLES) and "*/*" in seen["ignore_patterns"]
    (model_files / "model.safetensors").unlink()  # a repository with only pickles: nothing usable came
    with pytest.raises(UserError, match=r"has no safetensors weights.*pytorch_model.bin"):
        hub.resolve_model("owner/pickles", "--model")


def _http_error(cls, status: int):
    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/o/n"))
    return cls(f"{status} error", response=response)


@pytest.mark.parametrize("error, message", [
    (_http_error(GatedRepoError, 403), ("a gated model: accept its license on https://huggingface.co/owner/tiny, "
                                        "then log in (`hf auth login`, or set HF_TOKEN")),
    (_http_error(RepositoryNotFoundError, 404), "no such model repository on the Hub at https://"),
    (_http_error(RevisionNotFoundError, 404), "the repository has no revision 'v9'"),
    (_http_error(HfHubHTTPError, 401), "refused the credentials (HTTP 401): check HF_TOKEN"),
    (_http_error(HfHubHTTPError, 503), "answered HTTP 503 and the model is not in the Hugging Face cache"),
    (httpx2.ConnectError("[Errno -2] Name or service not known"), "cannot reach the Hub at https://"),
    (httpx2.ProxyError("407 Proxy Authentication Required"), "ProxyError: 407 Proxy Authentication Required"),
    (httpx2.ConnectTimeout("timed out"), "check the network and the proxy settings (HTTPS_PROXY)"),
])
def test_online_errors(tmp_path, monkeypatch, online, error, message):
    """The Hub's answer to the first call (repo_info), through the real snapshot_download, nothing cached."""
    def repo_info(self, repo_id, **kwargs):
        raise error
    monkeypatch.setattr(hf_api.HfApi, "repo_info", repo_info)
    with pytest.raises(UserError) as e:
        hub.resolve_model("owner/tiny@v9", "--base", cache_dir=tmp_path / "cache")
    assert str(e.value).startswith("--base owner/tiny@v9: ") and message in str(e.value), str(e.value)


def test_online_error_with_a_cached_copy_uses_it(tmp_path, monkeypatch, model_files, online):
    snapshot = cache_repo(tmp_path / "cache", "owner/tiny", model_files)

    def repo_info(self, repo_id, **kwargs):
        raise httpx2.ConnectError("no route to host")
    monkeypatch.setattr(hf_api.HfApi, "repo_info", repo_info)
    assert hub.resolve_model("owner/tiny", "--model", cache_dir=tmp_path / "cache") == snapshot.resolve()


def test_dataset_problems(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    cases = [(ConnectionError("Couldn't reach 'o/d' on the Hub (OfflineModeIsEnabled)"),
              f"Hub dataset 'o/d' is not in the datasets cache ({tmp_path}) and HF_HUB_OFFLINE is set"),
             (ConnectionError("Couldn't reach 'o/d' on the Hub (LocalEntryNotFoundError)"),
              "cannot reach the Hub at https://huggingface.co (HF_ENDPOINT) for dataset 'o/d'"),
             (DatasetNotFoundError("Dataset 'o/d' is a gated dataset on the Hub."),
              "is gated: accept its conditions on https://huggingface.co/datasets/o/d, then log in"),
             (DatasetNotFoundError("Dataset 'o/d' doesn't exist on the Hub or cannot be accessed."),
              "no dataset 'o/d' on the Hub at https://huggingface.co (or it is private"),
             (ValueError('Unknown split "tran". Should be one of [\'train\'].'),
              "cannot load Hub dataset 'o/d': ValueError: Unknown split \"tran\"")]
    for error, message in cases:
        assert message in hub.dataset_problem("o/d", error, tmp_path), (error, hub.dataset_problem("o/d", error))
    assert "`hf download o/d --repo-type dataset" in hub.dataset_problem("o/d", cases[0][0])
    assert hub.dataset_problem("o/d", cases[0][0], instead="pass X").endswith("or pass X")
