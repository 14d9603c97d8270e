"""The training loop: full fine-tuning or LoRA, one device or DeepSpeed, exact resume.

Read it top to bottom: `train()` prepares the run, `_loop()` does the steps, small helpers below do one thing each.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import torch

from llama_core.model import count_targets

from .build import (add_lora, build_model, load_tokenizer, make_optimizer, pick_device, quantize_base_4bit,
                    resolve_precision, tokenizer_path)
from .checkpoints import (checkpoint_dirs, latest_checkpoint, load_trainer_state, publish_final, restore_rng,
                          save_checkpoint, write_json_atomic)
from .data import build_datasets, collate
from .engine import LocalEngine
from .errors import UserError
from .evaluate import exact_match, validation_loss, write_samples
from .progress import RunLog, format_duration
from .recipe import Recipe, dump_recipe, recipe_to_dict
from .templates import load_template


class TrainingStopped(Exception):
    """Training cannot go on (a non-finite loss, say); the message says why. Exit code 1, no traceback."""

    exit_code = 1


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: exit code 128 + the signal's number (130, 143), as a shell reports it."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__()
        self.exit_code = 128 + int(signum)


@dataclass
class Plan:
    rows: int  # training rows (packed sequences)
    rows_per_step: int  # micro_batch x accumulation x ranks
    micro_batch: int
    accumulation: int
    seed: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


@dataclass
class State:
    step: int = 0
    tokens: int = 0  # input tokens seen (all ranks)
    trained_tokens: int = 0  # tokens with a loss (all ranks)
    skipped_steps: int = 0
    train_loss: float | None = None


def train(recipe: Recipe, *, engine_factory=None) -> dict:
    """Run a recipe end to end; returns the summary (also written to OUT/summary.json)."""
    t = recipe.training
    out = recipe.output_dir
    engine_factory = engine_factory or _local_engine
    torch.manual_seed(t.seed)
    device = pick_device(int(os.environ.get("LOCAL_RANK", 0)))
    precision = resolve_precision(t.precision, device)

    tokenizer = load_tokenizer(recipe)
    template = load_template(recipe.template)
    with _main_process_first():  # under DeepSpeed, rank 0 tokenizes and caches; the others read the cache
        data = build_datasets(recipe.data, recipe.datasets, template, tokenizer)
    if len(data.train) == 0:
        raise UserError("datasets: no training rows are left after filtering (see the counts above)")

    ckpt_root = os.path.join(out, "checkpoints")
    resume_from = latest_checkpoint(ckpt_root) if recipe.checkpoint.resume == "auto" else None
    if recipe.checkpoint.resume == "never" and checkpoint_dirs(ckpt_root):
        raise UserError(f"checkpoint.resume: never, but {ckpt_root} holds checkpoints of an earlier run; "
                        f"choose a new output_dir or delete them")

    engine = engine_factory(recipe, tokenizer, precision, device)
    plan = _plan(recipe, len(data.train), engine.world_size)

    state = State()
    if resume_from:
        saved = load_trainer_state(resume_from)
        _check_resumable(recipe, saved.get("recipe", {}), resume_from)
        state = State(**saved["state"])
        if state.step > plan.total_steps:
            raise UserError(f"training.max_steps: {resume_from} is at step {state.step}, past this recipe's "
                            f"{plan.total_steps} steps; use a new output_dir to train a shorter run")
        try:
            engine.load(resume_from)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged file: say which, and what to do
            previous = checkpoint_dirs(ckpt_root)[:-1]
            fallback = f"delete it to resume from {previous[-1]}" if previous else "delete it to start over"
            raise UserError(f"{resume_from} cannot be read ({type(e).__name__}: {str(e)[:200]}); {fallback}") \
                from None
        restore_rng(resume_from)
        if engine.is_main:
            _truncate_metrics(os.path.join(out, "metrics.jsonl"), state.step)
    elif engine.is_main:
        _start_output(recipe, out)
    log = RunLog(out, plan.total_steps, every=recipe.logging.every_steps, tensorboard=recipe.logging.tensorboard,
                 progress=recipe.logging.progress, enabled=engine.is_main, start_step=state.step)
    log.message(data.stats.describe())
    log.message(f"model: {engine.num_parameters:,} parameters, {_count_trainable(engine):,} trained "
                f"({t.method}, {precision.name}, {device.type}); {plan.total_steps} steps of "
                f"{plan.rows_per_step} rows x {recipe.data.max_seq_len} tokens at most")
    if resume_from:
        log.message(f"resuming from {resume_from} (step {state.step} of {plan.total_steps})")
    if plan.warmup_steps >= plan.total_steps:
        log.message(f"note: warmup ({plan.warmup_steps} steps) is not shorter than the run ({plan.total_steps} "
                    f"steps): the learning rate never reaches training.lr")
    summary_file = os.path.join(out, "summary.json")
    if resume_from and state.step == plan.total_steps and os.path.isfile(summary_file) and \
            os.path.isdir(os.path.join(out, "final")):
        log.message(f"{out} holds a finished run of {plan.total_steps} steps: nothing to do (use a new output_dir "
                    f"to train again)")
        log.close()
        with open(summary_file, encoding="utf-8") as f:
            return json.load(f)

    stop = _StopRequest()
    with stop:
        _loop(recipe, engine, data, tokenizer, template, plan, state, log, stop)
    return _finish(recipe, engine, data, tokenizer, template, plan, state, log)


def _loop(recipe, engine, data, tokenizer, template, plan, state, log, stop) -> None:
    t, ev = recipe.training, recipe.eval
    ckpt_root = os.path.join(recipe.output_dir, "checkpoints")
    if state.step == 0 and ev.exact_match and data.validation_examples:
        score = exact_match(engine.core, tokenizer, template, _held_out(data)[:ev.exact_match],
                            max_new_tokens=ev.max_new_tokens)
        log.log(0, val_exact_match=score)
        log.message(f"exact match before training: {score:.1%} on {min(ev.exact_match, len(data.validation_examples))}"
                    f" held-out examples")
    engine.module.train()
    window_start, window_tokens = time.time(), 0
    while state.step < plan.total_steps:
        step = state.step + 1
        lr = learning_rate(step, plan, t)
        engine.set_lr(lr)

        # Gradient accumulation: the loss of each micro-batch is a SUM over its tokens, divided by the number of
        # trained tokens in the whole window (all micro-batches, all ranks). The accumulated gradient is then
        # exactly that of one large batch, however the tokens fall into micro-batches. (Dividing each
        # micro-batch's mean by the number of micro-batches would weight short micro-batches too much.)
        batches = [collate(rows, tokenizer.pad_id) for rows in _micro_batches(data.train, plan, step - 1, engine)]
        local = torch.tensor([[float(count_targets(b["labels"])), float((b["input_ids"] != tokenizer.pad_id).sum())]
                              for b in batches]).sum(0)
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
        if step % recipe.logging.every_steps == 0 or step == plan.total_steps:
            log.log(step, train_loss=train_loss, lr=lr, grad_norm=grad_norm, tokens=state.tokens,
                    tokens_per_s=round(tokens_per_s, 1))
            window_start, window_tokens = time.time(), 0
        log.show(step, train_loss, lr, tokens_per_s)

        # Every rank must take the same branch below (the save has barriers): a signal may reach them at
        # different moments, so they agree on it (one tiny all-reduce; a no-op on one device).
        stopping = engine.all_reduce_sum(torch.tensor([float(stop.requested)])).item() > 0
        paused = False
        if ev.every_steps and step % ev.every_steps == 0 and step < plan.total_steps:
            _evaluate(recipe, engine, data, tokenizer, template, step, log)
            engine.module.train()
            paused = True
        every = recipe.checkpoint.every_steps
        if (every and step % every == 0 and step < plan.total_steps) or stopping:
            path = _save(recipe, engine, state, ckpt_root)
            paused = True
            if stopping:
                log.message(f"interrupted: saved {path}; run the same command again to resume")
                raise TrainingInterrupted(stop.signal)
        if paused:  # tokens/s counts training time only
            window_start, window_tokens = time.time(), 0


def _finish(recipe, engine, data, tokenizer, template, plan, state, log) -> dict:
    out = recipe.output_dir
    ckpt_root = os.path.join(out, "checkpoints")
    last = latest_checkpoint(ckpt_root)
    if last is None or load_trainer_state(last)["state"]["step"] != state.step:
        _save(recipe, engine, state, ckpt_root)
    metrics = _evaluate(recipe, engine, data, tokenizer, template, state.step, log)
    final = os.path.join(out, "final")
    engine.save_final(final, recipe, tokenizer_path(recipe), template)
    if recipe.eval.mmlu:
        from .mmlu import evaluate_mmlu
        report = evaluate_mmlu(engine.core, tokenizer, recipe.eval.mmlu, shots=recipe.eval.mmlu_shots,
                               output=os.path.join(out, "mmlu.json") if engine.is_main else None)
        metrics["mmlu_average"] = report["average"]
        log.log(state.step, mmlu_average=report["average"])
    summary = {
        "steps": state.step, "tokens": state.tokens, "trained_tokens": state.trained_tokens,
        "skipped_steps": state.skipped_steps, "train_loss": state.train_loss, **metrics,
        "wall_time_s": round(time.time() - log.start_time, 1), "final": final, "output_dir": out,
    }
    if engine.is_main:
        write_json_atomic(os.path.join(out, "summary.json"), summary)
        lines = [f"done: {state.step} steps, {state.tokens:,} tokens ({state.trained_tokens:,} trained) in "
                 f"{format_duration(summary['wall_time_s'])}",
                 f"  train loss {state.train_loss:.4f}" if state.train_loss is not None else "  no training steps"]
        if "val_loss" in metrics:
            lines.append(f"  validation loss {metrics['val_loss']:.4f} (perplexity {metrics['val_ppl']:.2f})")
        if "val_exact_match" in metrics:
            lines.append(f"  exact match {metrics['val_exact_match']:.1%} on held-out examples")
        if "mmlu_average" in metrics:
            lines.append(f"  MMLU {recipe.eval.mmlu_shots}-shot average {metrics['mmlu_average']:.1%}")
        lines.append(f"  outputs in {out}/ (final model: {final}/, metrics: {out}/metrics.jsonl)")
        log.message("\n".join(lines))
    log.close()
    return summary


# --- helpers ----------------------------------------------------------------------------------------------------

def _local_engine(recipe: Recipe, tokenizer, precision, device):
    base = build_model(recipe, tokenizer, device,
                       precision.weights if recipe.training.method == "lora" else torch.float32)
    if recipe.training.quantize:
        quantize_base_4bit(base, device)
    num_parameters = base.num_parameters()
    module = base
    if recipe.training.method == "lora":
        module = add_lora(base, recipe, _base_path(recipe))
    else:
        for p in base.parameters():
            p.requires_grad_(True)
    optimizer = make_optimizer(module, recipe, device)
    engine = SingleDeviceRun(module, base, optimizer, precision, device, recipe.training.grad_clip,
                             release_memory=recipe.training.release_memory)
    engine.num_parameters = num_parameters
    return engine


class SingleDeviceRun(LocalEngine):
    """LocalEngine plus writing the final model: the full weights in HF layout, or the PEFT adapter."""

    def save_final(self, final: str, recipe: Recipe, tokenizer_file: str, template) -> None:
        from llama_core.checkpoint import save_hf

        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if recipe.training.method == "lora":
            base = os.path.join(recipe.output_dir, "base")
            if recipe.model.preset is not None and not os.path.isfile(os.path.join(base, "config.json")):
                _save_base_weights(self.core, base, tokenizer_file)
            # adapter_config.json + adapter_model.safetensors (the embeddings are never adapted)
            self.module.save_pretrained(tmp, save_embedding_layers=False)
            os.makedirs(tmp, exist_ok=True)
        else:
            save_hf(self.core, self.core.config, tmp)
        publish_final(tmp, final, tokenizer_file, template)


def _save_base_weights(core, path: str, tokenizer_file: str) -> None:
    """A preset model trained with LoRA has no checkpoint on disk: write its (untrained) base next to the adapter."""
    from llama_core.checkpoint import save_hf

    base_state = {n: p for n, p in core.state_dict().items() if "lora_" not in n}
    base_state = {n.replace(".base_layer.", "."): p for n, p in base_state.items()}
    save_hf(base_state, core.config, path, extra_files={"tokenizer.model": tokenizer_file})  # atomic


def _base_path(recipe: Recipe) -> str:
    if recipe.model.checkpoint is not None:
        return os.path.abspath(recipe.model.checkpoint)
    return os.path.abspath(os.path.join(recipe.output_dir, "base"))


def _count_trainable(engine) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in engine.trainable().values())


def _start_output(recipe: Recipe, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "recipe.yaml"), "w", encoding="utf-8") as f:
        f.write(f"# resolved from {recipe.source}\n" + dump_recipe(recipe))
    shutil.copyfile(tokenizer_path(recipe), os.path.join(out, "tokenizer.model"))
    if os.path.exists(os.path.join(out, "metrics.jsonl")):
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
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # blank, or torn by a crash while it was written
                pass
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def _plan(recipe: Recipe, rows: int, world_size: int) -> Plan:
    t = recipe.training
    per_step = t.micro_batch_size * t.gradient_accumulation_steps * world_size
    steps_per_epoch = rows // per_step
    if steps_per_epoch == 0:
        raise UserError(f"training: one optimizer step needs {per_step} rows (micro_batch_size x "
                        f"gradient_accumulation_steps x {world_size} rank(s)) but the data has only {rows}; lower "
                        f"training.micro_batch_size or training.gradient_accumulation_steps")
    total = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    warmup = t.warmup_steps or int(t.warmup_ratio * total)
    return Plan(rows, per_step, t.micro_batch_size, t.gradient_accumulation_steps, t.seed, steps_per_epoch, total,
                warmup)


def learning_rate(step: int, plan: Plan, t) -> float:
    """Linear warmup to `lr`, then cosine (or linear) decay to `min_lr_ratio * lr` at the last step."""
    if step <= plan.warmup_steps:
        return t.lr * step / plan.warmup_steps
    if t.schedule == "constant":
        return t.lr
    progress = (step - plan.warmup_steps) / max(1, plan.total_steps - plan.warmup_steps)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * shape)


def _micro_batches(dataset, plan: Plan, step_index: int, engine):
    """The rows of each micro-batch of this rank for an optimizer step: a pure function of the step.

    Each epoch visits the rows in a seeded random order; a step takes `rows_per_step` consecutive rows of that
    order (the remainder of an epoch that does not fill a step is left out). No iterator state, so resuming
    at step N reads exactly what an uninterrupted run reads.
    """
    epoch, index = divmod(step_index, plan.steps_per_epoch)
    order = torch.randperm(plan.rows, generator=torch.Generator().manual_seed(plan.seed * 1000 + epoch))
    start = index * plan.rows_per_step
    for j in range(plan.accumulation):
        first = start + (j * engine.world_size + engine.rank) * plan.micro_batch
        columns = dataset[order[first:first + plan.micro_batch].tolist()]  # {column: [row values]}
        yield [dict(zip(columns, values)) for values in zip(*columns.values())]


def _evaluate(recipe, engine, data, tokenizer, template, step: int, log: RunLog) -> dict:
    ev, metrics = recipe.eval, {}
    if data.validation is not None and len(data.validation):
        loss = validation_loss(engine, data.validation, recipe.training.micro_batch_size, tokenizer.pad_id,
                               max_batches=ev.max_batches)
        metrics.update(val_loss=loss, val_ppl=math.exp(min(loss, 50)))
    examples = _held_out(data)
    if ev.exact_match and examples:
        metrics["val_exact_match"] = exact_match(engine.core, tokenizer, template, examples[:ev.exact_match],
                                                 max_new_tokens=ev.max_new_tokens)
    if ev.generate_prompts and examples and engine.is_main:
        write_samples(engine.core, tokenizer, template, examples[:ev.generate_prompts],
                      os.path.join(recipe.output_dir, "samples", f"step-{step:08d}.jsonl"),
                      max_new_tokens=ev.max_new_tokens)
    if metrics:
        log.log(step, **metrics)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        log.message(f"step {step}: {shown}")
    return metrics


def _held_out(data) -> list[dict]:
    """Held-out conversations, {"messages": [...]}, for generation and exact match."""
    return list(data.validation_examples or [])


def _save(recipe, engine, state: State, root: str) -> str:
    payload = {"state": state.__dict__, "world_size": engine.world_size, "recipe": recipe_to_dict(recipe)}
    return save_checkpoint(root, state.step, engine.save, payload, recipe.checkpoint.keep_last,
                           is_main=engine.is_main, barrier=engine.barrier)


class _StopRequest:
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
