"""Experiment trackers, offline: TensorBoard's event files, W&B's offline run file, MLflow's file store; each read
back with the library's own reader. W&B and MLflow are optional extras: their tests skip without them."""
from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import struct
import time

import pytest

from finetune.errors import UserError
from finetune.trackers import Guarded, WandbTracker, check_trackers, flat_params, open_trackers, sectioned

CONFIG = {"training": {"lr": 0.001, "method": "lora"}, "lora": {"target_modules": ["q_proj", "v_proj"]},
          "eval": {"mmlu": None}, "output_dir": "runs/x"}


def _log_run(trackers, steps, offset=0.0):
    """What RunLog sends: training lines, an evaluation every 20 steps, one skipped step (NaN grad norm)."""
    for step in steps:
        for tracker in trackers:
            tracker.log(step, {"train_loss": 1.0 / step + offset, "lr": 1e-3, "grad_norm": float("nan") if step == 20
                               else 0.5, "tokens": step * 100, "tokens_per_s": 99.5, "flag": True})
            if step % 20 == 0:
                tracker.log(step, {"val_loss": 2.0 / step + offset, "val_ppl": math.exp(2.0 / step)})


# --- checks before any work ---------------------------------------------------------------------------------------

def test_check_trackers_names_the_missing_package_and_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    problems = check_trackers(["tensorboard", "wandb", "wandb", "comet"])
    assert problems == [
        "logging.report_to: wandb needs the wandb package: pip install 'llama-finetune[wandb]'",
        "logging.report_to: unknown tracker 'comet'; choose from tensorboard, wandb, mlflow"]


def test_open_trackers_fails_before_writing_anything(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(UserError, match=r"mlflow needs the mlflow package: pip install 'llama-finetune\[mlflow\]'"):
        open_trackers(["tensorboard", "mlflow"], str(tmp_path), "run", CONFIG)
    assert list(tmp_path.iterdir()) == []


def test_a_tracker_that_cannot_start_is_a_user_error_and_closes_the_others(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    closed = []
    from finetune import trackers

    real_close = trackers.TensorBoardTracker.close
    monkeypatch.setattr(trackers.TensorBoardTracker, "close",
                        lambda self, status="finished": (closed.append(status), real_close(self, status)))

    def no_login(*args):
        raise RuntimeError("api_key not configured (no-tty)\nmore lines")
    monkeypatch.setattr(trackers.WandbTracker, "start", no_login)
    with pytest.raises(UserError) as error:
        open_trackers(["tensorboard", "wandb"], str(tmp_path), "run", CONFIG)
    assert str(error.value) == ("logging.report_to: wandb could not start (RuntimeError: api_key not configured "
                                "(no-tty)); log in with `wandb login`, or set WANDB_MODE=offline")
    assert closed == ["failed"]


# --- failures during a run ----------------------------------------------------------------------------------------

class _Flaky:
    name = "flaky"

    def __init__(self):
        self.calls = []

    def log(self, step, values):
        self.calls.append(step)
        if step == 2:
            raise ConnectionError("tracking server went away")

    def close(self, status="finished"):
        self.calls.append(status)


def test_a_failing_tracker_warns_once_and_the_run_goes_on():
    flaky, warnings = _Flaky(), []
    guarded = Guarded(flaky, warnings.append)
    for step in (1, 2, 3):
        guarded.log(step, {"train_loss": 1.0})
    guarded.close("failed")
    guarded.close("failed")
    assert flaky.calls == [1, 2, "failed"]  # closed once all the same
    assert warnings == [("warning: flaky: logging step 2 failed (ConnectionError: tracking server went away); no "
                         "more metrics go to flaky in this run (metrics.jsonl has them all)")]


# --- TensorBoard --------------------------------------------------------------------------------------------------

def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_sections_and_resume_replaces_steps_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    trackers = open_trackers(["tensorboard"], str(tmp_path), "run", CONFIG)
    _log_run(trackers, range(10, 41, 10))
    trackers[0].close()
    # Interrupted after step 40; the checkpoint was at step 20: the resumed run logs 30 and 40 again.
    trackers = open_trackers(["tensorboard"], str(tmp_path), "run", CONFIG, start_step=20)
    _log_run(trackers, range(30, 51, 10), offset=1.0)
    trackers[0].close()

    scalars = _scalars(tmp_path / "tensorboard")
    assert sorted(scalars) == ["grad_norm", "lr", "tokens", "tokens_per_s", "train/loss", "val/loss", "val/ppl"]
    assert [s for s, _ in scalars["train/loss"]] == [10, 20, 30, 40, 50]  # each step once: the old 30, 40 hidden
    assert scalars["train/loss"][1][1] == pytest.approx(1 / 20)
    assert scalars["train/loss"][2][1] == pytest.approx(1 / 30 + 1.0)
    assert [s for s, _ in scalars["val/loss"]] == [20, 40]
    assert scalars["val/loss"][1][1] == pytest.approx(2 / 40 + 1.0)


def test_tensorboard_hides_an_old_run_in_a_reused_folder(tmp_path):
    pytest.importorskip("tensorboard")
    trackers = open_trackers(["tensorboard"], str(tmp_path), "run", CONFIG)
    _log_run(trackers, range(10, 41, 10))
    trackers[0].close()
    trackers = open_trackers(["tensorboard"], str(tmp_path), "run", CONFIG)  # a new run, start_step 0
    _log_run(trackers, [10], offset=5.0)
    trackers[0].close()
    assert _scalars(tmp_path / "tensorboard")["train/loss"] == [(10, pytest.approx(0.1 + 5.0))]


# --- Weights & Biases (offline) -----------------------------------------------------------------------------------

def _wandb_records(path):
    """The protobuf records of a W&B run file: a LevelDB-style log (":W&B" header, 32 KiB blocks, each record
    a 7-byte header (crc32, length, type: full/first/middle/last) and its bytes)."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # still being written
            return
        if kind == 0:
            pos += block - pos % block
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full or last
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_run(run_dir):
    """(run record, {step: {key: value}}, exit code) of an offline run folder. wandb's service process may still
    be writing the file when `finish()` returns: read until its exit record is there."""
    [path] = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    deadline = time.time() + 30
    while True:
        records = list(_wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline:
            break
        time.sleep(0.1)
    run, history, exit_code = None, {}, None
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}  # "train/loss" is stored as a nested key
            history.setdefault(record.history.step.num, {}).update(
                {k: v for k, v in items.items() if not k.startswith("_")})
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return run, history, exit_code


@pytest.fixture
def wandb_offline(monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_DIR", "WANDB_RUN_ID", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: only a local socket to wandb's own service
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")


def test_wandb_offline_run_holds_the_metrics_config_and_the_resumed_id(tmp_path, wandb_offline):
    trackers = open_trackers(["wandb"], str(tmp_path), "my-run", CONFIG)
    _log_run(trackers, range(10, 41, 10))
    trackers[0].close("interrupted")
    run_id = (tmp_path / "wandb_run_id.txt").read_text().strip()

    [first] = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    run, history, exit_code = _wandb_run(first)
    assert (run.run_id, run.display_name, run.project) == (run_id, "my-run", "llama-finetune")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["training"] == {"lr": 0.001, "method": "lora"}
    assert config["lora"] == {"target_modules": ["q_proj", "v_proj"]}
    assert sorted(history) == [10, 20, 30, 40]
    assert history[20]["train/loss"] == pytest.approx(1 / 20)
    assert history[20]["val/loss"] == pytest.approx(2 / 20)  # the evaluation joins its step's row
    assert history[40]["tokens"] == 4000 and "flag" not in history[40]
    assert exit_code == 1

    trackers = open_trackers(["wandb"], str(tmp_path), "my-run", CONFIG, start_step=20)
    _log_run(trackers, [30, 40, 50])
    trackers[0].close()
    assert (tmp_path / "wandb_run_id.txt").read_text().strip() == run_id
    [second] = set(glob.glob(str(tmp_path / "wandb" / "offline-run-*"))) - {first}
    run, history, exit_code = _wandb_run(second)
    assert run.run_id == run_id  # `wandb sync` appends it to the same run
    assert sorted(history) == [30, 40, 50] and exit_code == 0


def test_wandb_new_run_gets_a_new_id(tmp_path, wandb_offline):
    (tmp_path / "wandb_run_id.txt").write_text("oldrun42\n")
    trackers = open_trackers(["wandb"], str(tmp_path), "my-run", CONFIG)
    trackers[0].close()
    assert (tmp_path / "wandb_run_id.txt").read_text().strip() != "oldrun42"


def test_wandb_resumed_online_run_skips_steps_it_already_has():
    logged = []

    class Run:
        def log(self, values, step):
            logged.append((step, values))
    tracker = WandbTracker(Run(), first_step=41)  # the W&B run already has steps up to 40
    tracker.log(40, {"train_loss": 1.0})
    tracker.log(41, {"train_loss": 0.5, "val_ppl": 2.0, "note": "x"})
    assert logged == [(41, {"train/loss": 0.5, "val/ppl": 2.0})]


# --- MLflow (a file store) ----------------------------------------------------------------------------------------

@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses its file store without it
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return MlflowClient(uri)


def _history(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_mlflow_run_holds_params_and_metrics_and_a_resumed_run_continues_it(tmp_path, mlflow_store):
    out = tmp_path / "out"
    out.mkdir()
    trackers = open_trackers(["mlflow"], str(out), "my-run", CONFIG)
    _log_run(trackers, range(10, 41, 10))
    trackers[0].close("interrupted")
    run_id = (out / "mlflow_run_id.txt").read_text().strip()

    run = mlflow_store.get_run(run_id)
    assert run.info.run_name == "my-run" and run.info.status == "KILLED"
    assert mlflow_store.get_experiment(run.info.experiment_id).name == "llama-finetune"
    assert run.data.params == {"training.lr": "0.001", "training.method": "lora",
                               "lora.target_modules": '["q_proj", "v_proj"]', "eval.mmlu": "null",
                               "output_dir": "runs/x"}
    assert _history(mlflow_store, run_id, "train_loss") == [(s, pytest.approx(1 / s)) for s in (10, 20, 30, 40)]
    assert _history(mlflow_store, run_id, "val_loss") == [(20, pytest.approx(0.1)), (40, pytest.approx(0.05))]
    assert math.isnan(dict(_history(mlflow_store, run_id, "grad_norm"))[20])
    assert "flag" not in run.data.metrics

    # Resumed from the checkpoint at step 20 (CONFIG's lr changed: params stay as they were, MLflow forbids
    # changing them); steps 30 and 40 are in the run already and are not sent twice.
    trackers = open_trackers(["mlflow"], str(out), "my-run", {**CONFIG, "training": {"lr": 0.002}}, start_step=20)
    assert mlflow_store.get_run(run_id).info.status == "RUNNING"
    _log_run(trackers, [30, 40, 50], offset=1.0)
    trackers[0].close()
    assert (out / "mlflow_run_id.txt").read_text().strip() == run_id
    run = mlflow_store.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["training.lr"] == "0.001"
    assert [s for s, _ in _history(mlflow_store, run_id, "train_loss")] == [10, 20, 30, 40, 50]
    assert dict(_history(mlflow_store, run_id, "train_loss"))[50] == pytest.approx(1 / 50 + 1.0)


def test_mlflow_new_run_in_the_same_folder_is_a_new_mlflow_run(tmp_path, mlflow_store):
    first = open_trackers(["mlflow"], str(tmp_path), "a", CONFIG)
    first[0].close()
    first_id = (tmp_path / "mlflow_run_id.txt").read_text().strip()
    second = open_trackers(["mlflow"], str(tmp_path), "a", CONFIG)  # start_step 0: not a resumption
    second[0].close()
    assert (tmp_path / "mlflow_run_id.txt").read_text().strip() != first_id


def test_mlflow_database_store_without_sqlalchemy_is_reported(monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sqlalchemy" else real(name, *a))
    [problem] = check_trackers(["mlflow"])
    assert problem.startswith("logging.report_to: mlflow: $MLFLOW_TRACKING_URI sqlite:///mlflow.db is a database, "
                              "which needs sqlalchemy: pip install 'llama-finetune[mlflow]'")


def test_flat_params_and_sections():
    long = {"a": {"b": {"c": 1}}, "x": "y" * 7000, "empty": {}}
    params = dict(flat_params(long))
    assert params["a.b.c"] == "1" and params["empty"] == "{}"
    assert len(params["x"]) <= 6000 and params["x"].endswith("...")
    assert [sectioned(k) for k in ("train_loss", "val_exact_match", "lr", "mmlu_average")] == \
        ["train/loss", "val/exact_match", "lr", "mmlu_average"]
