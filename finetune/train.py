"""The training loop: full fine-tuning or LoRA, one device or DeepSpeed, exact resume.

Read it top to bottom: `train()` prepares a `Run` (everything a run's steps need, in one typed object), `_loop()`
does the steps, `_finish()` evaluates and writes the final model; small helpers below do one thing each.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import importlib.util
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from llama_core.files import OutputError, write_bytes, write_json, write_text
from llama_core.model import count_targets
from llama_core.tokenizer import Tokenizer
from llama_core.weights import CheckpointError

from .build import (load_run_template, load_tokenizer, local_engine, model_config, pick_device, train_token_ids,
                    untrained_rows_warning)
from .data import PreparedData, build_datasets, collate
from .engine import Engine
from .errors import UserError, WriteError, load_error_text
from .evaluate import exact_match, validation_loss, write_samples
from .inputs import parse_json
from .model_files import companion_files
from .outputs import RUN_MARKER, check_outputs
from .plan import check_recipe_memory
from .precision import resolve_precision, step_shape
from .progress import RunLog, format_duration
from .recipe import Recipe, dump_recipe, recipe_to_dict, report_to
from .run_state import (checkpoint_dirs, latest_checkpoint, load_trainer_state, restore_rng, save_checkpoint)
from .schedule import Schedule, learning_rate, make_schedule, micro_batch_indices
from .templates import Template


class TrainingStopped(Exception):
    """Training cannot go on (a non-finite loss, say); the message says why. Exit code 1, no traceback."""

    exit_code = 1


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: exit code 128 + the signal's number (130, 143), as a shell reports it."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__()
        self.exit_code = 128 + int(signum)


@dataclass
class State:
    step: int = 0
    tokens: int = 0  # input tokens seen (all ranks)
    trained_tokens: int = 0  # tokens with a loss (all ranks)
    skipped_steps: int = 0
    train_loss: float | None = None


@dataclass
class Run:
    """Everything the steps of a run need."""
    recipe: Recipe
    engine: Engine
    data: PreparedData
    tokenizer: Tokenizer
    template: Template
    schedule: Schedule
    state: State
    log: RunLog

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.recipe.output_dir, "checkpoints")


# How launchers tell a process how many were started: torchrun, accelerate and DeepSpeed's launcher; Open MPI's
# mpirun; MPICH's and Intel MPI's.
LAUNCHER_SIZES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def check_launcher(recipe: Recipe) -> None:
    """Refuse (UserError) a launch the recipe cannot run as asked: one of several processes with
    distributed.backend: none (each would train the same model into the same output_dir), a process count that is
    not one, or DeepSpeed under a launcher whose ranks it cannot find."""
    sizes = {}
    for name in LAUNCHER_SIZES:
        value = os.environ.get(name, "").strip()
        if not value:
            continue
        try:
            sizes[name] = int(value)
        except ValueError:
            raise UserError(f"{name}={value!r} is not a number of processes (a launcher sets it; unset it to run "
                            f"one process)") from None
        if sizes[name] < 1:
            raise UserError(f"{name}={value}: a launcher starts at least 1 process (unset it to run one process)")
    name, world = max(sizes.items(), key=lambda kv: kv[1], default=("WORLD_SIZE", 1))
    if world > 1 and recipe.distributed.backend == "none":
        raise UserError(f"distributed.backend: none, but this process is one of {world} started by a launcher "
                        f"({name}={world}): {world} independent copies would train the same model into the same "
                        f"output_dir. Set distributed.backend: deepspeed (it runs under torchrun too), or start one "
                        f"process (`finetune launch --nproc-per-node N` starts DeepSpeed's launcher)")
    if world > 1 and "WORLD_SIZE" in sizes:
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v, "").strip()]
        if missing:
            raise UserError(f"WORLD_SIZE={world}, but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                            f"set: start the processes with torchrun, deepspeed or `finetune launch`, which set them")
    elif world > 1:  # mpirun: DeepSpeed finds the ranks through mpi4py
        if importlib.util.find_spec("mpi4py") is None:
            raise UserError(f"started by an MPI launcher ({name}={world}): DeepSpeed finds its ranks there through "
                            f"mpi4py, which is not installed (pip install mpi4py), or start the processes with "
                            f"torchrun or `finetune launch`")


def train(recipe: Recipe) -> dict:
    """Run a recipe end to end, on one device or under DeepSpeed (distributed.backend); returns the summary (also
    written to OUT/summary.json)."""
    t = recipe.training
    out = recipe.output_dir
    check_launcher(recipe)
    check_outputs(recipe)  # in the first second: not after preparing the data and building the model
    if recipe.distributed.backend == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine, init_distributed
        init_distributed()
        make_engine = DeepSpeedEngine
    else:
        make_engine = local_engine
    torch.manual_seed(t.seed)
    device = pick_device(int(os.environ.get("LOCAL_RANK", 0)))

    tokenizer = load_tokenizer(recipe)
    template = load_run_template(recipe, tokenizer)
    ckpt_root = os.path.join(out, "checkpoints")
    resume_from = latest_checkpoint(ckpt_root) if recipe.checkpoint.resume == "auto" else None
    precision = _precision(recipe, tokenizer, device, resume_from)
    if warning := check_recipe_memory(recipe, tokenizer, device):  # before the data and the model
        print(warning, file=sys.stderr)
    with _main_process_first():  # under DeepSpeed, rank 0 tokenizes and caches; the others read the cache
        data = build_datasets(recipe.data, recipe.datasets, template, tokenizer)
    if len(data.train) == 0:
        raise UserError("datasets: no training rows are left after filtering (see the counts above)")

    if recipe.checkpoint.resume == "never" and checkpoint_dirs(ckpt_root):
        raise UserError(f"checkpoint.resume: never, but {ckpt_root} holds checkpoints of an earlier run; "
                        f"choose a new output_dir or delete them")

    token_ids = train_token_ids(recipe, tokenizer, template)  # rows trained beside a LoRA adapter
    engine = make_engine(recipe, tokenizer, precision, device, token_ids)
    schedule = make_schedule(t, len(data.train), engine.world_size)

    state, data_note = State(), None
    if resume_from:
        data_note = _check_data_unchanged(recipe, data.fingerprint, resume_from)
        state = _resume(recipe, engine, schedule, resume_from)
    elif engine.is_main:
        _start_output(recipe, out, tokenizer)
    summary = _finished_summary(out) if resume_from and state.step == schedule.total_steps else None
    if summary is not None:
        if engine.is_main:
            print(f"{out} holds a finished run of {schedule.total_steps} steps: nothing to do (use a new output_dir "
                  f"to train again)", file=sys.stderr)
        return summary
    log = RunLog(out, schedule.total_steps, every=recipe.logging.every_steps, report_to=report_to(recipe),
                 config=recipe_to_dict(recipe), progress=recipe.logging.progress, enabled=engine.is_main,
                 start_step=state.step)
    log.message(data.stats.describe())
    log.message(f"precision: {precision.reason or precision.name}")
    trained = sum(getattr(p, "ds_numel", p.numel()) for p in engine.trainable().values())
    log.message(f"model: {engine.num_parameters:,} parameters, {trained:,} trained "
                f"({t.method}, {precision.name}, {device.type}); {schedule.total_steps} steps of "
                f"{schedule.rows_per_step} rows x {recipe.data.max_seq_len} tokens at most")
    if token_ids:
        names = ", ".join(tokenizer.id_to_piece(i) for i in token_ids)
        log.message(f"lora.train_tokens: the embedding{'' if engine.core.config.tie_word_embeddings else ' and head'} "
                    f"rows of {names} train with the adapter")
    if t.method == "lora" and (note := untrained_rows_warning(engine.core, train_token_ids(
            dataclasses.replace(recipe, lora=dataclasses.replace(recipe.lora, train_tokens="auto"),
                                distributed=dataclasses.replace(recipe.distributed, backend="none")),
            tokenizer, template), token_ids)):
        log.message(note)
    if resume_from:
        log.message(f"resuming from {resume_from} (step {state.step} of {schedule.total_steps})")
        if data_note:
            log.message(data_note)
    if schedule.warmup_steps >= schedule.total_steps:
        log.message(f"note: warmup ({schedule.warmup_steps} steps) is not shorter than the run "
                    f"({schedule.total_steps} steps): the learning rate never reaches training.lr")
    run = Run(recipe, engine, data, tokenizer, template, schedule, state, log)
    try:
        with StopRequest() as stop:
            _loop(run, stop)
        return _finish(run)
    except TrainingInterrupted:
        log.close("interrupted")  # the trackers record how the run ended
        raise
    except BaseException:
        log.close("failed")
        raise


def _loop(run: Run, stop: StopRequest) -> None:
    recipe, engine, state, log = run.recipe, run.engine, run.state, run.log
    t, ev = recipe.training, recipe.eval
    if state.step == 0 and ev.exact_match and run.data.validation_examples:
        examples = run.data.validation_examples[:ev.exact_match]
        score = exact_match(engine.core, run.tokenizer, run.template, examples, max_new_tokens=ev.max_new_tokens)
        log.log(0, val_exact_match=score)
        log.message(f"exact match before training: {score:.1%} on {len(examples)} held-out examples")
    engine.module.train()
    window_start, window_tokens = time.time(), 0
    while state.step < run.schedule.total_steps:
        step = state.step + 1
        lr = learning_rate(step, run.schedule)
        engine.set_lr(lr)

        # Gradient accumulation: the loss of each micro-batch is a SUM over its tokens, divided by the number of
        # trained tokens in the whole window (all micro-batches, all ranks). The accumulated gradient is then
        # exactly that of one large batch, however the tokens fall into micro-batches. (Dividing each
        # micro-batch's mean by the number of micro-batches would weight short micro-batches too much.)
        batches = [collate(_rows(run.data.train, indices), run.tokenizer.pad_id)
                   for indices in micro_batch_indices(run.schedule, step - 1, engine.rank, engine.world_size)]
        local = torch.tensor([[float(count_targets(b["labels"])),
                               float((b["input_ids"] != run.tokenizer.pad_id).sum())] for b in batches]).sum(0)
        n_targets, tokens = (int(x) for x in engine.all_reduce_sum(local).tolist())  # over all ranks
        loss_sum = 0.0
        for batch in batches:
            loss = engine.loss_sum(batch)
            # Engines average gradients over ranks, hence the world_size factor.
            engine.backward(loss * (engine.world_size / max(n_targets, 1)))
            loss_sum = loss_sum + loss.detach().float()  # stays on the device: one transfer per step
        train_loss = engine.all_reduce_sum(loss_sum.cpu()).item() / max(n_targets, 1)

        if not math.isfinite(train_loss):
            if t.nan_policy == "stop":
                raise TrainingStopped(
                    f"the training loss is {train_loss} at step {step}; stopping (the last checkpoint is intact). "
                    f"Lower training.lr, use fp32 or bf16 instead of fp16, or set training.nan_policy: skip")
            engine.skip()
            state.skipped_steps += 1
            log.message(f"step {step}: loss is {train_loss}, update skipped (training.nan_policy: skip)")
            grad_norm = float("nan")
        else:
            grad_norm = engine.step()
        state.step = step
        state.train_loss = train_loss
        state.tokens += tokens
        state.trained_tokens += n_targets
        window_tokens += tokens
        tokens_per_s = window_tokens / max(time.time() - window_start, 1e-9)
        if step % recipe.logging.every_steps == 0 or step == run.schedule.total_steps:
            log.log(step, train_loss=train_loss, lr=lr, grad_norm=grad_norm, tokens=state.tokens,
                    tokens_per_s=round(tokens_per_s, 1))
            window_start, window_tokens = time.time(), 0
        log.show(step, train_loss, lr, tokens_per_s)

        # Every rank must take the same branch below (the save has barriers): a signal may reach them at
        # different moments, so they agree on it (one tiny all-reduce; a no-op on one device).
        stopping = engine.all_reduce_sum(torch.tensor([float(stop.requested)])).item() > 0
        paused = False
        if ev.every_steps and step % ev.every_steps == 0 and step < run.schedule.total_steps:
            _evaluate(run, step)
            engine.module.train()
            paused = True
        every = recipe.checkpoint.every_steps
        if (every and step % every == 0 and step < run.schedule.total_steps) or stopping:
            path = _save(run)
            paused = True
            if stopping:
                log.message(f"interrupted: saved {path}; run the same command again to resume")
                raise TrainingInterrupted(stop.signal)
        if paused:  # tokens/s counts training time only
            window_start, window_tokens = time.time(), 0


def _finish(run: Run) -> dict:
    recipe, engine, state, log = run.recipe, run.engine, run.state, run.log
    out = recipe.output_dir
    last = latest_checkpoint(run.checkpoints)
    if last is None or load_trainer_state(last)["state"]["step"] != state.step:
        _save(run)
    metrics = _evaluate(run, state.step)
    final = os.path.join(out, "final")
    companions = companion_files(run.tokenizer, run.template, max_len=run.engine.core.config.max_seq_len)
    preset_base = os.path.join(out, "base") if recipe.model.preset is not None else None
    with _writing(f"the final model to {final}", run.checkpoints):
        engine.save_final(final, companions, preset_base)
    if recipe.eval.mmlu:
        from .mmlu import evaluate_mmlu
        report = evaluate_mmlu(engine.core, run.tokenizer, recipe.eval.mmlu, shots=recipe.eval.mmlu_shots,
                               output=os.path.join(out, "mmlu.json") if engine.is_main else None)
        metrics["mmlu_average"] = report["average"]
        log.log(state.step, mmlu_average=report["average"])
    summary = {
        "steps": state.step, "tokens": state.tokens, "trained_tokens": state.trained_tokens,
        "skipped_steps": state.skipped_steps, "train_loss": state.train_loss, **metrics,
        "wall_time_s": round(time.time() - log.start_time, 1), "final": final, "output_dir": out,
    }
    if engine.is_main:
        with _writing(os.path.join(out, "summary.json"), run.checkpoints):
            write_json(os.path.join(out, "summary.json"), summary)
        lines = [f"done: {state.step} steps, {state.tokens:,} tokens ({state.trained_tokens:,} trained) in "
                 f"{format_duration(summary['wall_time_s'])}",
                 f"  train loss {state.train_loss:.4f}" if state.train_loss is not None else "  no training steps"]
        if "val_loss" in metrics:
            lines.append(f"  validation loss {metrics['val_loss']:.4f} (perplexity {metrics['val_ppl']:.2f})")
        if "val_exact_match" in metrics:
            lines.append(f"  exact match {metrics['val_exact_match']:.1%} on held-out examples")
        if "mmlu_average" in metrics:
            lines.append(f"  MMLU {recipe.eval.mmlu_shots}-shot average {metrics['mmlu_average']:.1%}")
        log.close()  # metrics.jsonl complete before it is drawn
        plot = _plot(out)
        lines.append(f"  outputs in {out}/ (final model: {final}/, metrics: {out}/metrics.jsonl{plot})")
        log.message("\n".join(lines))
    log.close()
    return summary


def _plot(out: str) -> str:
    """OUT/loss.png (train and validation loss against tokens, the learning rate beside); a note if it cannot be
    drawn (no matplotlib, no logged loss): the run itself is fine either way."""
    from .plots import plot_run
    try:
        return f", loss curves: {plot_run(out)}"
    except UserError as e:
        return f"; no loss.png: {e}"


# --- helpers ----------------------------------------------------------------------------------------------------

def _finished_summary(out: str) -> dict | None:
    """The summary of a finished run in `out`, or None (no final model, or its summary.json is missing or damaged:
    then the final model and summary are written again from the last checkpoint)."""
    if not os.path.isdir(os.path.join(out, "final")):
        return None
    try:
        with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
            summary = parse_json(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


@contextlib.contextmanager
def _writing(what: str, checkpoints: str):
    """A write at the end of a run that fails (a full disk: OSError, or SafetensorError, which is not one) is a
    WriteError naming the last complete checkpoint, from which the same command finishes the run."""
    try:
        yield
    except (OSError, SafetensorError, CheckpointError, OutputError) as e:
        last = latest_checkpoint(checkpoints)
        kind = "" if isinstance(e, (CheckpointError, OutputError)) else f"{type(e).__name__}: "
        raise WriteError(f"could not write {what} ({kind}{str(e)[:300]}). The last complete checkpoint is "
                         f"{last or 'none'}: free some space (or fix the cause) and run the same command again to "
                         f"finish the run") from None


def _precision(recipe: Recipe, tokenizer, device, resume_from: str | None):
    """training.precision on this device. `auto` on a CPU with bf16 instructions measures a product of the run's
    shape (finetune.precision); a resumed run keeps what its checkpoint trained with, so a measurement cannot
    switch a run's precision half-way."""
    t, deepspeed = recipe.training, recipe.distributed.backend == "deepspeed"
    if resume_from and t.precision == "auto":
        try:
            saved = load_trainer_state(resume_from).get("precision")
        except UserError:  # a damaged checkpoint: reported by _resume with what to do
            saved = None
        if saved in ("fp32", "bf16", "fp16"):
            chosen = resolve_precision(saved, device.type, deepspeed=deepspeed)
            return dataclasses.replace(chosen, reason=f"{saved}, as the run being resumed")
    shape = step_shape(recipe, model_config(recipe, tokenizer))
    return resolve_precision(t.precision, device.type, deepspeed=deepspeed, shape=shape)


def _check_data_unchanged(recipe: Recipe, fingerprint: str, path: str) -> str | None:
    """A resumed run trains on the data its checkpoint was made with: the tokens and labels' fingerprint must be the
    checkpoint's (a data file edited since would silently change what the remaining steps read), unless
    checkpoint.allow_data_change. Returns the loud note to print in that case."""
    try:
        saved = load_trainer_state(path).get("data_fingerprint")
    except UserError:  # a damaged checkpoint: reported by _resume with what to do
        return None
    if not saved or saved == fingerprint:  # checkpoints of older versions have none
        return None
    if not recipe.checkpoint.allow_data_change:
        raise UserError(f"the training data changed since {path} was written (its tokens and labels differ: a data "
                        f"file was edited, or the template or tokenizer changed); resuming would train the remaining "
                        f"steps on other data. Use a new output_dir, or set checkpoint.allow_data_change: true to "
                        f"resume anyway")
    return (f"WARNING: the training data changed since {path} (checkpoint.allow_data_change: true): the remaining "
            f"steps read the new data in a different order")


def _resume(recipe: Recipe, engine: Engine, schedule: Schedule, path: str) -> State:
    """The state saved in checkpoint `path`, loaded into the engine, after checking it belongs to this run. A
    damaged file (trainer state, weights, optimizer state, random generators) is a UserError that names it and
    says how to go on: delete the checkpoint to resume from the one before."""
    previous = checkpoint_dirs(os.path.dirname(path))[:-1]
    fallback = f"delete it to resume from {previous[-1]}" if previous else "delete it to start over"
    try:
        saved = load_trainer_state(path)
        state = _saved_state(saved, path)
    except UserError as e:
        raise UserError(f"{e}; {fallback}") from None
    _check_resumable(recipe, saved.get("recipe") or {}, path)
    if state.step > schedule.total_steps:
        raise UserError(f"training.max_steps: {path} is at step {state.step}, past this recipe's "
                        f"{schedule.total_steps} steps; use a new output_dir to train a shorter run")
    try:
        engine.load(path)
    except UserError as e:  # a file named by the engine
        raise UserError(f"{e}; {fallback}") from None
    except Exception as e:  # noqa: BLE001 - a damaged file: say which, and what to do
        raise UserError(f"{path} cannot be read ({load_error_text(e)}); {fallback}") from None
    try:
        restore_rng(path)
    except UserError as e:
        raise UserError(f"{e}; {fallback}") from None
    if engine.is_main:
        _truncate_metrics(os.path.join(recipe.output_dir, "metrics.jsonl"), state.step)
    return state


def _saved_state(saved: dict, path: str) -> State:
    """The State a trainer_state.json holds, checked field by field (a file of another program, or damaged, is
    a UserError naming it)."""
    file = os.path.join(path, "trainer_state.json")
    fields = {f.name: f for f in dataclasses.fields(State)}
    values = saved["state"]
    problems = [f"unknown entry {k!r}" for k in values if k not in fields]
    for name in ("step", "tokens", "trained_tokens", "skipped_steps"):
        v = values.get(name, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            problems.append(f"{name} must be a non-negative integer, got {v!r}")
    loss = values.get("train_loss")
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float))):
        problems.append(f"train_loss must be a number, got {loss!r}")
    if "step" not in values:
        problems.append("no step")
    if not isinstance(saved.get("recipe", {}), dict):
        problems.append("its recipe is not a mapping")
    if problems:
        raise UserError(f"{file}: not a trainer state of this program ({'; '.join(problems[:3])})")
    return State(**values)


def _start_output(recipe: Recipe, out: str, tokenizer: Tokenizer) -> None:
    """A fresh run's first files: the run folder's marker first (so the folder is known as a run's from now on),
    the resolved recipe, the tokenizer; an earlier attempt's metrics (a run's own file) are dropped."""
    os.makedirs(out, exist_ok=True)
    write_text(os.path.join(out, RUN_MARKER), "a llama-finetune training run folder (written by `finetune`)\n")
    write_text(os.path.join(out, "recipe.yaml"), f"# resolved from {recipe.source}\n" + dump_recipe(recipe))
    for name, source in tokenizer.files.items():  # the tokenizer the run used (tokenizer.model, or .json + config)
        write_bytes(os.path.join(out, name), source if isinstance(source, bytes) else Path(source).read_bytes())
    if os.path.isfile(os.path.join(out, "metrics.jsonl")):
        os.remove(os.path.join(out, "metrics.jsonl"))


# What must not change between a run and its resumption (the schedule, the step count and evaluation may).
# The optimizer's hyperparameters other than lr are restored with its state, so they may not change either.
_SAME_ON_RESUME = ("model", "tokenizer", "datasets", "template", "data", "lora", "training.method",
                   "training.micro_batch_size", "training.gradient_accumulation_steps", "training.seed",
                   "training.weight_decay", "training.betas", "training.eps")
_FREE_ON_RESUME = ("data.cache_dir", "data.num_proc")  # where and how fast the data is prepared, not what it is


def _check_resumable(recipe: Recipe, saved: dict, path: str) -> None:
    current, saved = recipe_to_dict(recipe), json.loads(json.dumps(saved))
    for key in _FREE_ON_RESUME:
        section, _, field = key.partition(".")
        for d in (current, saved):
            (d.get(section) or {}).pop(field, None)
    changed = []
    for key in _SAME_ON_RESUME:
        section, _, field = key.partition(".")
        mine, theirs = current.get(section), saved.get(section)
        if field:
            mine, theirs = (mine or {}).get(field), (theirs or {}).get(field)
        if saved and mine != theirs:
            changed.append(key)
    if changed:
        raise UserError(f"{path} belongs to a run with a different {', '.join(changed)}; resuming it would mix two "
                        f"runs. Use a new output_dir (or delete {os.path.dirname(path)})")


class _main_process_first:
    """Rank 0 runs the block first, then the others (a no-op without torch.distributed)."""

    def __enter__(self):
        import torch.distributed as dist
        self.dist = dist if dist.is_available() and dist.is_initialized() else None
        if self.dist and self.dist.get_rank() != 0:
            self.dist.barrier()

    def __exit__(self, *exc):
        if self.dist and self.dist.get_rank() == 0:
            self.dist.barrier()


def _truncate_metrics(path: str, step: int) -> None:
    """Drop what the interrupted run logged after its last checkpoint: the resumed run logs those steps again."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                if parse_json(line).get("step", 0) <= step:
                    kept.append(line)
            except (ValueError, AttributeError, TypeError):  # blank, or torn by a crash while it was written
                pass
    write_text(path, "".join(kept))


def _rows(dataset, indices: list[int]) -> list[dict]:
    columns = dataset[indices]  # {column: [row values]}
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def _evaluate(run: Run, step: int) -> dict:
    recipe, engine, data, ev, metrics = run.recipe, run.engine, run.data, run.recipe.eval, {}
    if data.validation is not None and len(data.validation):
        loss = validation_loss(engine, data.validation, recipe.training.micro_batch_size, run.tokenizer.pad_id,
                               max_batches=ev.max_batches)
        metrics.update(val_loss=loss, val_ppl=math.exp(min(loss, 50)))
    examples = list(data.validation_examples or [])  # held-out conversations, {"messages": [...]}
    if ev.exact_match and examples:
        metrics["val_exact_match"] = exact_match(engine.core, run.tokenizer, run.template, examples[:ev.exact_match],
                                                 max_new_tokens=ev.max_new_tokens)
    if ev.generate_prompts and examples and engine.is_main:
        write_samples(engine.core, run.tokenizer, run.template, examples[:ev.generate_prompts],
                      os.path.join(recipe.output_dir, "samples", f"step-{step:08d}.jsonl"),
                      max_new_tokens=ev.max_new_tokens)
    if metrics:
        run.log.log(step, **metrics)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        run.log.message(f"step {step}: {shown}")
    return metrics


def _save(run: Run) -> str:
    engine = run.engine
    payload = {"state": run.state.__dict__, "world_size": engine.world_size, "recipe": recipe_to_dict(run.recipe),
               "data_fingerprint": run.data.fingerprint, "precision": run.engine.precision.name}
    return save_checkpoint(run.checkpoints, run.state.step, engine.save, payload, run.recipe.checkpoint.keep_last,
                           is_main=engine.is_main, barrier=engine.barrier)


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to save a checkpoint after the current step and exit.

    A second Ctrl-C interrupts at once; the last checkpoint on disk is complete either way (atomic rename).
    """

    def __init__(self):
        self.requested = False
        self.signal = signal.SIGINT

    def _handler(self, signum, frame):
        if self.requested:
            print("\nstopped at once: no checkpoint written for this step (the last one on disk is intact)",
                  file=sys.stderr, flush=True)
            raise TrainingInterrupted(signum)
        self.requested, self.signal = True, signum
        print("\nstopping after this step (Ctrl-C again to stop now)", file=sys.stderr, flush=True)

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)
