"""Experiment trackers (`logging.report_to`): a run's metrics also go to TensorBoard, Weights & Biases or MLflow.

metrics.jsonl stays the record of a run; a tracker is a copy of it in a tool's own store. Only the main rank
opens trackers. `check_trackers` finds a missing package before any work; `open_trackers` starts them; then
`log(step, values)` after each metrics.jsonl line and `close(status)` at the end.

Where each one writes, and what a resumed run (`start_step` > 0: continuing from the checkpoint at that step) does:
  tensorboard  out_dir/tensorboard; events the interrupted run wrote after the checkpoint are hidden (purge_step),
               and a new run in a reused folder hides the old run's events
  wandb        project $WANDB_PROJECT or "llama-finetune", files under out_dir/wandb (or $WANDB_DIR); the run id
               is kept in out_dir/wandb_run_id.txt and a resumed run continues that W&B run. $WANDB_MODE=offline
               writes locally (upload later with `wandb sync out_dir/wandb/offline-run-*`)
  mlflow       $MLFLOW_TRACKING_URI, else MLflow's own default (./mlflow.db, as `mlflow ui` reads it), experiment
               $MLFLOW_EXPERIMENT_NAME or "llama-finetune"; the recipe as flattened params (training.lr, ...); the
               run id is kept in out_dir/mlflow_run_id.txt and a resumed run continues that MLflow run
W&B and MLflow cannot take back what the interrupted run sent after its last checkpoint, so a resumed run does not
send those steps again (the tracker keeps the first values; metrics.jsonl has the resumed run's).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Literal, Protocol

from llama_core.files import write_text

from .errors import UserError

TRACKERS = ("tensorboard", "wandb", "mlflow")
Status = Literal["finished", "failed", "interrupted"]  # interrupted: stopped by a signal, to be resumed
_INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install 'llama-finetune[wandb]'",
            "mlflow": "pip install 'llama-finetune[mlflow]'"}
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow stores that need sqlalchemy and alembic


class Tracker(Protocol):
    name: str

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self, status: Status = "finished") -> None: ...


def check_trackers(names: list[str]) -> list[str]:
    """The problems that would stop `open_trackers(names, ...)`, found without starting anything (for the recipe
    validator: a missing package is reported before any work)."""
    problems = []
    for name in dict.fromkeys(names):
        if name not in TRACKERS:
            problems.append(f"logging.report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
        elif importlib.util.find_spec(name) is None:
            problems.append(f"logging.report_to: {name} needs the {name} package: {_INSTALL[name]}")
        elif name == "mlflow":
            problems += _check_mlflow_store()
    return problems


def _check_mlflow_store() -> list[str]:
    try:
        import mlflow  # only here: importing it takes a second or two
    except Exception as e:  # noqa: BLE001 - a broken install (a dependency's version): say so before any work
        return [f"logging.report_to: mlflow cannot be imported ({type(e).__name__}: {e}): {_INSTALL['mlflow']}"]
    uri = mlflow.get_tracking_uri()
    if uri.split(":", 1)[0].split("+", 1)[0] not in _DATABASE_SCHEMES:
        return []
    missing = [m for m in ("sqlalchemy", "alembic") if importlib.util.find_spec(m) is None]
    if not missing:
        return []
    where = "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "MLflow's default tracking store"
    problem = (f"logging.report_to: mlflow: {where} {uri} is a database, which needs {' and '.join(missing)}: "
               f"{_INSTALL['mlflow']} (or set MLFLOW_TRACKING_URI to a tracking server, http://...)")
    return [problem]


def open_trackers(names: list[str], out_dir: str, run_name: str, config: dict, *, start_step: int = 0,
                  warn: Callable[[str], None] | None = None) -> list[Tracker]:
    """Start the trackers named in `logging.report_to` (each once, in order). `config` is the resolved recipe as a
    dict; `start_step` > 0 when resuming from the checkpoint at that step; `warn` prints a line (stderr by
    default). A tracker that fails to start is a UserError (those already started are closed); one that fails
    later warns once and stops, and the run goes on (see Guarded)."""
    problems = check_trackers(names)
    if problems:
        raise UserError("; ".join(problems))
    warn = warn or _print_warning
    opened: list[Tracker] = []
    try:
        for name in dict.fromkeys(names):
            opened.append(Guarded(_start(name, out_dir, run_name, config, start_step), warn))
    except BaseException:
        for tracker in opened:
            tracker.close("failed")
        raise
    return opened


def _start(name: str, out_dir: str, run_name: str, config: dict, start_step: int) -> Tracker:
    start = {"tensorboard": TensorBoardTracker.start, "wandb": WandbTracker.start,
             "mlflow": MlflowTracker.start}[name]
    try:
        return start(out_dir, run_name, config, start_step)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any library's failure to start: say which, and what to try
        detail = (str(e).strip().splitlines() or [""])[0][:800]
        raise UserError(f"logging.report_to: {name} could not start ({type(e).__name__}: {detail}){_hint(name)}") \
            from None


def _hint(name: str) -> str:
    if name == "wandb":
        return "; log in with `wandb login`, or set WANDB_MODE=offline"
    if name == "mlflow":
        import mlflow

        return f"; the tracking URI is {mlflow.get_tracking_uri()} (set MLFLOW_TRACKING_URI to choose another)"
    return ""


def _print_warning(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Guarded:
    """A tracker whose failures during the run (a tracking server gone, a full disk) do not stop training: the
    first one is reported with `warn` and nothing more is logged to it; metrics.jsonl still has everything.
    `close` is still tried once (W&B restores the console streams it wrapped)."""

    def __init__(self, tracker: Tracker, warn: Callable[[str], None]):
        self.tracker, self.warn, self.name = tracker, warn, tracker.name
        self.failed = self.closed = False

    def log(self, step: int, values: dict[str, float]) -> None:
        if not (self.failed or self.closed):
            self._call(f"logging step {step}", self.tracker.log, step, values)

    def close(self, status: Status = "finished") -> None:
        if not self.closed:
            self.closed = True
            self._call("closing", self.tracker.close, status)

    def _call(self, what: str, method, *args) -> None:
        try:
            method(*args)
        except Exception as e:  # noqa: BLE001 - see the class docstring
            if not self.failed:
                detail = (str(e).strip().splitlines() or [""])[0][:200]
                self.warn(f"warning: {self.name}: {what} failed ({type(e).__name__}: {detail}); no more metrics go "
                          f"to {self.name} in this run (metrics.jsonl has them all)")
            self.failed = True


def numeric(values: dict) -> dict[str, float]:
    """The entries of `values` that are numbers (not bools, not None)."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def sectioned(key: str) -> str:
    """TensorBoard and W&B group charts by the part before "/": train_loss -> train/loss, val_ppl -> val/ppl."""
    return key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else key


def _read_id(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def start(cls, out_dir: str, run_name: str, config: dict, start_step: int) -> TensorBoardTracker:
        from torch.utils.tensorboard import SummaryWriter

        # TensorBoard hides the events of earlier files at steps >= purge_step: after a resume, what the
        # interrupted run wrote past its checkpoint; in a new run, anything an old run left in the folder.
        return cls(SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=start_step + 1 if start_step else 0))

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in numeric(values).items():
            self.writer.add_scalar(sectioned(key), value, step)

    def close(self, status: Status = "finished") -> None:
        self.writer.close()


class WandbTracker:
    name = "wandb"

    def __init__(self, run, first_step: int = 0):
        self.run, self.first_step = run, first_step

    @classmethod
    def start(cls, out_dir: str, run_name: str, config: dict, start_step: int) -> WandbTracker:
        import wandb

        id_file = os.path.join(out_dir, "wandb_run_id.txt")
        run_id = os.environ.get("WANDB_RUN_ID") or (_read_id(id_file) if start_step else None)
        run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "llama-finetune", name=run_name, config=config,
                         dir=os.environ.get("WANDB_DIR") or out_dir, id=run_id,
                         resume="allow" if run_id else None)
        write_text(id_file, run.id + "\n")
        # A resumed online run already holds the steps the interrupted run sent; W&B would drop them again with a
        # warning each. (Offline, `run.resumed` is false: `wandb sync` merges the files in order.)
        return cls(run, first_step=run.step if start_step and run.resumed else 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        if step >= self.first_step:
            self.run.log({sectioned(k): v for k, v in numeric(values).items()}, step=step)

    def close(self, status: Status = "finished") -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


class MlflowTracker:
    name = "mlflow"

    def __init__(self, client, run_id: str, first_step: int = 0):
        self.client, self.run_id, self.first_step = client, run_id, first_step

    @classmethod
    def start(cls, out_dir: str, run_name: str, config: dict, start_step: int) -> MlflowTracker:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient()  # $MLFLOW_TRACKING_URI, else MLflow's default
        id_file = os.path.join(out_dir, "mlflow_run_id.txt")
        run = _existing_run(client, _read_id(id_file)) if start_step else None
        if run is not None:  # resuming: the params are there already (MLflow forbids changing them)
            client.update_run(run.info.run_id, status="RUNNING")
            tracker = cls(client, run.info.run_id, first_step=_last_step(client, run) + 1)
        else:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "llama-finetune"
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(experiment)
            run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
            params = [Param(key, value) for key, value in flat_params(config)]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(run_id, params=params[i:i + 100])
            tracker = cls(client, run_id)
        write_text(id_file, tracker.run_id + "\n")
        return tracker

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if step < self.first_step:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in numeric(values).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: Status = "finished") -> None:
        self.client.set_terminated(self.run_id, {"finished": "FINISHED", "failed": "FAILED",
                                                 "interrupted": "KILLED"}[status])


def _existing_run(client, run_id: str | None):
    """The MLflow run `run_id` if this tracking store has it (not deleted); None for a new run."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:  # another tracking store than the interrupted run's
        return None
    return run if run.info.lifecycle_stage == "active" else None


def _last_step(client, run) -> int:
    steps = [m.step for key in run.data.metrics for m in client.get_metric_history(run.info.run_id, key)]
    return max(steps, default=-1)


def flat_params(config: dict, prefix: str = "") -> Iterator[tuple[str, str]]:
    """A nested recipe dict as MLflow params: ("training.lr", "0.0003"); lists and non-strings as JSON, cut to
    MLflow's length limit."""
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as limit
    except ImportError:
        limit = 500  # MLflow 1.x
    for key, value in config.items():
        if isinstance(value, dict) and value:
            yield from flat_params(value, f"{prefix}{key}.")
            continue
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        yield f"{prefix}{key}", text if len(text) <= limit else text[:limit - 3] + "..."
