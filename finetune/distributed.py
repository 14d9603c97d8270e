"""DeepSpeed ZeRO-2/3: the engine behind the training loop, the consolidated save, `finetune launch`, `finetune plan`.

Under ZeRO-3 the model is created inside `deepspeed.zero.Init`, so every parameter is partitioned across the
ranks the moment it exists; checkpoint tensors are then copied in one at a time (gathered, written by rank 0,
re-partitioned), so no rank ever holds the whole model. The final model is gathered parameter by parameter and
written by rank 0 as HF safetensors shards, then checked against the model config.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys

import torch

from llama_core import kernels
from llama_core.checkpoint import CheckpointError, iter_checkpoint_tensors, parse_size
from llama_core.model import Transformer, initial_value

from .build import Precision, add_lora, model_config
from .checkpoints import publish_final
from .errors import UserError
from .recipe import Recipe, RecipeError, load_recipe

# Recipe values that flow into the DeepSpeed config; a DeepSpeed JSON file may not contradict them.
_FLOWS = {
    ("train_micro_batch_size_per_gpu",): "training.micro_batch_size",
    ("gradient_accumulation_steps",): "training.gradient_accumulation_steps",
    ("gradient_clipping",): "training.grad_clip",
    ("zero_optimization", "stage"): "distributed.zero_stage",
    ("bf16", "enabled"): "training.precision",
    ("fp16", "enabled"): "training.precision",
    ("optimizer", "params", "lr"): "training.lr",
    ("optimizer", "params", "betas"): "training.betas",
    ("optimizer", "params", "weight_decay"): "training.weight_decay",
    ("optimizer", "params", "eps"): "training.eps",
}


def deepspeed_config(recipe: Recipe, precision_name: str, world_size: int | None = None) -> dict:
    """The DeepSpeed config a recipe implies, merged over the recipe's DeepSpeed JSON file (if any)."""
    t, d = recipe.training, recipe.distributed
    zero = {"stage": d.zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if d.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_param_persistence_threshold=0)
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ours = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": t.grad_clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": precision_name == "bf16"},
        "fp16": {"enabled": precision_name == "fp16"},
        "steps_per_print": 2 ** 31 - 1,  # the loop prints its own progress
        "wall_clock_breakdown": False,
    }
    if world_size:
        ours["train_batch_size"] = t.micro_batch_size * t.gradient_accumulation_steps * world_size
    if d.offload_optimizer:  # ZeRO-Offload steps on the CPU with DeepSpeed's own Adam
        ours["optimizer"] = {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.betas),
                                                         "weight_decay": t.weight_decay, "eps": t.eps}}
    user = _read_ds_file(d.config_file) if d.config_file else {}
    return _drop_auto(_merge(user, ours))


def _drop_auto(d: dict) -> dict:
    """Values the file left to us as "auto" (transformers' convention) that we do not set: DeepSpeed's default."""
    return {k: _drop_auto(v) if isinstance(v, dict) else v for k, v in d.items() if v != "auto"}


def check_deepspeed_file(recipe: Recipe) -> list[str]:
    """Contradictions between a recipe and its DeepSpeed JSON file (values set to "auto" are filled in)."""
    d = recipe.distributed
    if not d.config_file or not os.path.isfile(d.config_file):
        return []
    try:
        user = _read_ds_file(d.config_file)
    except UserError as e:
        return [str(e)]
    ours = deepspeed_config(_without_file(recipe), _precision_of(recipe))
    problems = []
    for path, key in _FLOWS.items():
        theirs, mine = _get(user, path), _get(ours, path)
        if theirs is None or theirs == "auto" or mine is None:
            continue
        if isinstance(mine, float) or isinstance(theirs, float):
            same = isinstance(theirs, (int, float)) and abs(float(theirs) - float(mine)) <= 1e-12 * abs(float(mine))
        elif isinstance(mine, list):
            same = isinstance(theirs, list) and [float(x) for x in theirs] == [float(x) for x in mine]
        else:
            same = theirs == mine
        if not same:
            problems.append(f"{d.config_file}: {'.'.join(path)} is {theirs!r} but the recipe's {key} gives "
                            f"{mine!r}; remove it from the file or make them agree")
    if "optimizer" in user and not d.offload_optimizer:
        problems.append(f"{d.config_file}: optimizer: the recipe's training section sets the optimizer (AdamW); "
                        f"remove the file's optimizer section")
    if "scheduler" in user:
        problems.append(f"{d.config_file}: scheduler: the learning-rate schedule comes from the recipe's training "
                        f"section; remove the file's scheduler section")
    return problems


def _precision_of(recipe: Recipe) -> str:
    p = recipe.training.precision
    if p == "auto":
        return "fp32" if not torch.cuda.is_available() else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    return p


def _without_file(recipe: Recipe) -> Recipe:
    import dataclasses
    return dataclasses.replace(recipe, distributed=dataclasses.replace(recipe.distributed, config_file=None))


def _read_ds_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"distributed.config_file: {path}: cannot read DeepSpeed JSON: {e}") from None
    if not isinstance(value, dict):
        raise UserError(f"distributed.config_file: {path}: expected a JSON object")
    return value


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def _get(d: dict, path: tuple):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


# --- the engine -------------------------------------------------------------------------------------------------

class DeepSpeedEngine:
    """The LocalEngine interface on top of `deepspeed.initialize` (ZeRO-2 or ZeRO-3)."""

    def __init__(self, recipe: Recipe, tokenizer, precision: Precision, device: torch.device):
        import deepspeed
        import torch.distributed as dist

        self.recipe, self.device, self.precision = recipe, device, precision
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.lora = recipe.training.method == "lora"
        self.config = deepspeed_config(recipe, precision.name, self.world_size)
        self.stage3 = self.config["zero_optimization"]["stage"] == 3
        config = model_config(recipe, tokenizer)
        # 16-bit runs keep 16-bit parameters (DeepSpeed holds the fp32 master copy in the optimizer). The
        # dtype comes from the config's bf16/fp16 sections: Init's own `dtype` argument is ignored on CPU
        # (DeepSpeed 0.19 `_set_dtype` precedence), where it would silently give bf16.
        dtype = precision.weights
        with deepspeed.zero.Init(config_dict_or_path=self.config, enabled=self.stage3,
                                 remote_device="cpu" if recipe.distributed.offload_params else None):
            core = Transformer(config)
        if not self.stage3:
            core.to(device=device, dtype=dtype)
        core.activation_checkpointing = recipe.training.activation_checkpointing
        kernels.set_backend(recipe.training.kernels)
        self._load_weights(core, recipe)
        self.num_parameters = sum(getattr(p, "ds_numel", p.numel()) for p in core.parameters())
        module = core
        if self.lora:
            from .train import _base_path
            module = add_lora(core, recipe, _base_path(recipe))
        trainable = [p for p in module.parameters() if p.requires_grad]
        optimizer = None
        if "optimizer" not in self.config:
            from .build import optimizer_groups
            t = recipe.training
            optimizer = torch.optim.AdamW(optimizer_groups(module, t.weight_decay), lr=t.lr, betas=tuple(t.betas),
                                          eps=t.eps)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, model_parameters=None if optimizer else trainable,
            config=self.config)
        self.ds.checkpoint_engine = _safe_checkpoint_engine(self.ds._config)
        self.module, self.core = module, core
        if self.stage3:  # say what ZeRO-3 did: each rank holds its share of every parameter
            local = sum(p.ds_tensor.numel() for p in core.parameters() if hasattr(p, "ds_tensor"))
            print(f"rank {self.rank}: holds {local:,} of {self.num_parameters:,} parameter values "
                  f"({100 * local / self.num_parameters:.1f}%, ZeRO-3 over {self.world_size} ranks)",
                  file=sys.stderr, flush=True)

    def _load_weights(self, core: Transformer, recipe: Recipe) -> None:
        """Random (seeded, same values as a single-process run) or from the checkpoint, one tensor at a time."""
        import deepspeed

        params = dict(core.named_parameters())
        if recipe.model.preset is not None:
            generator = torch.Generator().manual_seed(recipe.model.init_seed)
            source = ((n, initial_value(n, _full_shape(p), generator)) for n, p in params.items())
        else:
            try:
                source = iter_checkpoint_tensors(recipe.model.checkpoint, recipe.model.format)
            except CheckpointError as e:
                raise UserError(str(e)) from None
        seen = set()
        for name, tensor in source:
            if name not in params:
                raise UserError(f"{recipe.model.checkpoint}: unexpected tensor {name!r}")
            p = params[name]
            if tuple(tensor.shape) != tuple(_full_shape(p)):
                raise UserError(f"{recipe.model.checkpoint}: tensor {name!r} has shape {tuple(tensor.shape)}, the "
                                f"model expects {tuple(_full_shape(p))}")
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=self.stage3):
                if self.rank == 0 or not self.stage3:
                    with torch.no_grad():
                        p.copy_(tensor)
            seen.add(name)
        if missing := sorted(set(params) - seen):
            raise UserError(f"{recipe.model.checkpoint}: missing tensor(s): {', '.join(missing)}")

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.core.named_parameters() if p.requires_grad}

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return self.ds(**batch, reduction="sum")

    def backward(self, loss: torch.Tensor) -> None:
        # Our loss is already normalized over the accumulation window; DeepSpeed must not divide it again.
        # DeepSpeed counts micro-steps itself: step() after every backward, it updates at the window's end.
        self.ds.backward(loss, scale_wrt_gas=False)
        self.ds.step()

    def set_lr(self, lr: float) -> None:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> float:
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def skip(self) -> None:
        raise UserError("training.nan_policy: skip is not supported under DeepSpeed (it has already stepped); "
                        "use stop")

    def save(self, path: str) -> None:
        self.ds.save_checkpoint(path, tag="deepspeed", save_latest=False, exclude_frozen_parameters=self.lora,
                                client_state={"world_size": self.world_size})

    def load(self, path: str) -> None:
        state_file = os.path.join(path, "trainer_state.json")
        with open(state_file, encoding="utf-8") as f:
            saved = json.load(f).get("world_size")
        if saved is not None and saved != self.world_size:
            raise UserError(
                f"{path} was written by {saved} ranks, this run has {self.world_size}. ZeRO partitions are per "
                f"rank: restart from its consolidated weights instead (the optimizer state starts afresh): "
                f"`finetune export --input {path} --output DIR --format hf`, then model.checkpoint=DIR with a new "
                f"output_dir (README: Many GPUs)")
        self.ds.load_checkpoint(path, tag="deepspeed", load_module_strict=not self.lora)

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        moved = value.to(self.device) if self.device.type == "cuda" else value.clone()
        dist.all_reduce(moved)
        return moved.to(value.device)

    def barrier(self) -> None:
        import torch.distributed as dist
        dist.barrier()

    def save_final(self, final: str, recipe: Recipe, tokenizer_file: str, template) -> None:
        tmp = final + ".tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        self.barrier()
        if self.lora:
            self._save_adapter(tmp, recipe, tokenizer_file)
        else:
            save_consolidated(self.core, tmp, is_main=self.is_main, stage3=self.stage3)
        if self.is_main:
            publish_final(tmp, final, tokenizer_file, template)
        self.barrier()

    def _save_adapter(self, out: str, recipe: Recipe, tokenizer_file: str) -> None:
        import deepspeed

        trainable = [p for p in self.module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, enabled=self.stage3):
            if self.is_main:
                state = {n: p.detach().cpu().clone() for n, p in self.module.named_parameters() if p.requires_grad}
                self.module.save_pretrained(out, state_dict=state, save_embedding_layers=False)
        if recipe.model.preset is not None:
            base = os.path.join(recipe.output_dir, "base")
            if not os.path.isdir(base):
                save_consolidated(self.core, base + ".tmp", is_main=self.is_main, stage3=self.stage3,
                                  skip_lora=True)
                if self.is_main:
                    shutil.copyfile(tokenizer_file, os.path.join(base + ".tmp", "tokenizer.model"))
                    os.rename(base + ".tmp", base)


def _deepspeed_safe_globals() -> list:
    """The only non-tensor classes DeepSpeed's checkpoint files hold: an enum, and the loss scaler (its attributes
    are restored as data). Nothing else may be unpickled."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


def _safe_checkpoint_engine(config):
    """DeepSpeed's checkpoint engine, loading with `weights_only=True` (its own unpickles freely)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeTorchCheckpointEngine(config)


@contextlib.contextmanager
def weights_only_loads():
    """Within the block every `torch.load` is `weights_only=True` (for DeepSpeed utilities such as zero_to_fp32,
    which ask for weights_only=False): reading a checkpoint never runs code."""
    real = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return real(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def _full_shape(p: torch.nn.Parameter):
    return getattr(p, "ds_shape", p.shape)


def save_consolidated(core: Transformer, out: str, *, is_main: bool, stage3: bool, max_shard_size="5GB",
                      skip_lora: bool = False) -> None:
    """Gather the model one parameter at a time; rank 0 writes HF safetensors shards as they fill up.

    Other tools have shipped empty or tiny files from ZeRO-3 (saving the partitioned placeholders): the result is
    read back and every tensor's name and shape checked against the model config before anyone may use it.
    """
    import deepspeed
    from safetensors.torch import save_file

    from llama_core.checkpoint import GENERATION_CONFIG, HF_CONFIG, HF_GENERATION, HF_INDEX, HF_SINGLE

    named = [(n.replace(".base_layer.", "."), p) for n, p in core.named_parameters()
             if not (skip_lora and "lora_" in n)]
    sizes = [int(torch.Size(_full_shape(p)).numel()) * p.element_size() for _, p in named]
    limit, shards, total = parse_size(max_shard_size), [[]], 0
    for (name, _), size in zip(named, sizes):
        if shards[-1] and total + size > limit:
            shards.append([])
            total = 0
        shards[-1].append(name)
        total += size
    files = [HF_SINGLE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    by_name = dict(named)
    if is_main:
        os.makedirs(out, exist_ok=True)
    for file, names in zip(files, shards):
        tensors = {}
        for name in names:
            with deepspeed.zero.GatheredParameters([by_name[name]], enabled=stage3):
                if is_main:
                    tensors[name] = by_name[name].detach().cpu().clone()
        if is_main:
            save_file(tensors, os.path.join(out, file), metadata={"format": "pt"})
        del tensors
    if not is_main:
        return
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(sizes)},
                 "weight_map": {n: f for f, names in zip(files, shards) for n in names}}
        with open(os.path.join(out, HF_INDEX), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    dtype = str(named[0][1].dtype).removeprefix("torch.")
    with open(os.path.join(out, HF_CONFIG), "w", encoding="utf-8") as f:
        json.dump(core.config.to_hf(dtype), f, indent=2)
    with open(os.path.join(out, HF_GENERATION), "w", encoding="utf-8") as f:
        json.dump(GENERATION_CONFIG, f, indent=2)
    verify_saved(out, core.config)


def verify_saved(path: str, config) -> None:
    """Read a written checkpoint's headers back: every tensor the config implies, with its shape, none empty."""
    from safetensors import safe_open

    with torch.device("meta"):
        expected = {n: tuple(t.shape) for n, t in Transformer(config).state_dict().items()}
    found = {}
    for file in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
        with safe_open(os.path.join(path, file), "pt") as f:
            for name in f.keys():
                found[name] = tuple(f.get_slice(name).get_shape())
    problems = [f"missing {n}" for n in expected if n not in found]
    problems += [f"unexpected {n}" for n in found if n not in expected]
    problems += [f"{n} has shape {found[n]}, expected {s}" for n, s in expected.items() if n in found and found[n] != s]
    if problems:
        raise RuntimeError(f"the consolidated model in {path} is wrong, refusing to use it: "
                           + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else ""))


# --- entry points -----------------------------------------------------------------------------------------------

def train_deepspeed(recipe: Recipe) -> dict:
    import deepspeed

    from .train import train

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return train(recipe, engine_factory=DeepSpeedEngine)


def main(command: str, argv: list[str]) -> int:
    from .cli import parser

    if command == "launch":
        p = parser("finetune launch", "Start a DeepSpeed run on this machine or several (DeepSpeed's launcher).")
        p.add_argument("--nproc-per-node", type=int, required=True, help="ranks (GPUs) per machine")
        p.add_argument("--recipe", required=True)
        p.add_argument("--hostfile", help="DeepSpeed hostfile for several machines (lines: host slots=N)")
        p.add_argument("--num-nodes", type=int)
        p.add_argument("--master-addr")
        p.add_argument("--master-port", type=int)
        p.add_argument("overrides", nargs="*", metavar="key=value")
        args = p.parse_args(argv)
        problems = [f"{flag} must be >= 1, got {value}" for flag, value in
                    (("--nproc-per-node", args.nproc_per_node), ("--num-nodes", args.num_nodes))
                    if value is not None and value < 1]
        if args.hostfile is not None and not os.path.isfile(args.hostfile):
            problems.append(f"--hostfile {args.hostfile}: no such file")
        if (args.num_nodes or 1) > 1 and args.hostfile is None:
            problems.append("--num-nodes > 1 needs --hostfile (the machines and their slots)")
        if problems:
            raise UserError("finetune launch: " + "; ".join(problems))
        recipe = load_recipe(args.recipe, args.overrides)  # fail here, not in N processes
        if recipe.distributed.backend != "deepspeed":
            raise RecipeError(f"{args.recipe}: distributed.backend is {recipe.distributed.backend!r}; launch needs "
                              f"deepspeed (override with distributed.backend=deepspeed)")
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.nproc_per_node)]
        for flag, value in (("--hostfile", args.hostfile), ("--num_nodes", args.num_nodes),
                            ("--master_addr", args.master_addr), ("--master_port", args.master_port)):
            if value is not None:
                cmd += [flag, str(value)]
        cmd += ["--module", "finetune", "--recipe", args.recipe, *args.overrides]
        print("launching: " + " ".join(cmd), file=sys.stderr, flush=True)
        return subprocess.call(cmd)
    from .plan import main as plan_main
    return plan_main(argv)
