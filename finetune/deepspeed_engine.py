"""DeepSpeed ZeRO-2/3: the engine behind the training loop (the `finetune.engine.Engine` contract).

Under ZeRO-3 the model is created inside `deepspeed.zero.Init`, so every parameter is partitioned across the
ranks the moment it exists; checkpoint tensors are then copied in one at a time (gathered, written by rank 0,
re-partitioned), so no rank ever holds the whole model. The final model is gathered parameter by parameter and
written by rank 0 through `llama_core.weights.save_hf` (atomic, read back and checked against the config).
"""
from __future__ import annotations

import os
import sys

import torch

from llama_core.model import Transformer, initial_value
from llama_core.weights import CheckpointError, TensorSource, iter_checkpoint_tensors, load_into, save_hf

from .build import add_lora, base_path, checkpoint_folder, model_config, optimizer_groups
from .deepspeed_io import safe_checkpoint_engine
from .ds_config import deepspeed_config
from .engine import base_parameter_count, base_weight_name, write_adapter
from .errors import UserError
from .precision import Precision
from .recipe import Recipe
from .run_state import load_trainer_state


class DeepSpeedEngine:
    """The `Engine` contract on top of `deepspeed.initialize` (ZeRO-2 or ZeRO-3)."""

    def __init__(self, recipe: Recipe, tokenizer, precision: Precision, device: torch.device,
                 token_ids: list[int] = ()):
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
        core.kernels = recipe.training.kernels
        self._load_weights(core, recipe)
        self.num_parameters = base_parameter_count(core)
        module = core
        if self.lora:
            module = add_lora(core, recipe, base_path(recipe), token_ids)
        trainable = [p for p in module.parameters() if p.requires_grad]
        optimizer = None
        if "optimizer" not in self.config:
            t = recipe.training
            optimizer = torch.optim.AdamW(optimizer_groups(module, t.weight_decay), lr=t.lr, betas=tuple(t.betas),
                                          eps=t.eps)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, model_parameters=None if optimizer else trainable,
            config=self.config)
        self.ds.checkpoint_engine = safe_checkpoint_engine(self.ds._config)
        self.module, self.core = module, core
        if self.stage3:  # say what ZeRO-3 did: each rank holds its share of every parameter
            local = sum(p.ds_tensor.numel() for p in core.parameters() if hasattr(p, "ds_tensor"))
            print(f"rank {self.rank}: holds {local:,} of {self.num_parameters:,} parameter values "
                  f"({100 * local / self.num_parameters:.1f}%, ZeRO-3 over {self.world_size} ranks)",
                  file=sys.stderr, flush=True)

    def _load_weights(self, core: Transformer, recipe: Recipe) -> None:
        """Random (seeded, same values as a single-process run) or from the checkpoint, one tensor at a time:
        each is gathered, written by rank 0 and re-partitioned (`weights.load_into` checks names and shapes)."""
        import deepspeed

        params = dict(core.named_parameters())
        if recipe.model.preset is not None:
            generator = torch.Generator().manual_seed(recipe.model.init_seed)
            source = ((n, initial_value(n, _full_shape(p), generator), "initialization") for n, p in params.items())
            where = "model.preset"
        else:
            where = checkpoint_folder(recipe)
            try:
                source = ((n, t, where) for n, t in iter_checkpoint_tensors(where, recipe.model.format))
            except CheckpointError as e:
                raise UserError(str(e)) from None

        def assign(name: str, tensor: torch.Tensor) -> None:
            p = params[name]
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=self.stage3):
                if self.rank == 0 or not self.stage3:
                    p.copy_(tensor)

        try:
            load_into(params, source, where, assign=assign, shape_of=_full_shape)
        except CheckpointError as e:
            raise UserError(str(e)) from None

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
        saved = load_trainer_state(path).get("world_size")
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

    def save_final(self, final: str, companions: dict, base_dir: str | None) -> None:
        """Gathered one parameter at a time; rank 0 writes (HF safetensors shards, read back and checked)."""
        import deepspeed

        config = self.core.config
        if not self.lora:
            save_hf(GatheredSource(self.core, self.stage3, self.is_main), config, final, extra_files=companions,
                    write=self.is_main)
            self.barrier()
            return
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, enabled=self.stage3):
            state = {n: p.detach().cpu().clone() for n, p in self.module.named_parameters() if p.requires_grad}
        if self.is_main:
            write_adapter(final, lambda tmp: self.module.save_pretrained(tmp, state_dict=state,
                                                                         save_embedding_layers=False), companions)
        # Every rank takes part in gathering the base, so they decide together (rank 0 looks at the disk).
        missing = base_dir is not None and self.is_main and not os.path.isfile(os.path.join(base_dir, "config.json"))
        if base_dir is not None and self.all_reduce_sum(torch.tensor([float(missing)])).item() > 0:
            tokenizer = {k: v for k, v in companions.items() if k.startswith("tokenizer")}
            save_hf(GatheredSource(self.core, self.stage3, self.is_main, skip_lora=True), config, base_dir,
                    extra_files=tokenizer, write=self.is_main)
        self.barrier()


class GatheredSource(TensorSource):
    """The model's tensors for `save_hf`, each gathered from the ZeRO-3 partitions when it is written (every rank
    gathers, in the same order; rank 0 keeps the values). LoRA layers' base weights under their plain names."""

    def __init__(self, core: Transformer, stage3: bool, is_main: bool, skip_lora: bool = False):
        self.params = {plain: p for n, p in core.named_parameters()
                       if (plain := base_weight_name(n) if skip_lora else n.replace(".base_layer.", ".")) is not None}
        self.stage3, self.is_main = stage3, is_main

    def specs(self) -> dict:
        return {n: (tuple(_full_shape(p)), p.dtype) for n, p in self.params.items()}

    def get(self, name: str) -> torch.Tensor | None:
        import deepspeed

        p = self.params[name]
        with deepspeed.zero.GatheredParameters([p], enabled=self.stage3):
            return p.detach().cpu().clone() if self.is_main else None


def _full_shape(p: torch.nn.Parameter):
    return getattr(p, "ds_shape", p.shape)


def init_distributed() -> None:
    """torch.distributed through DeepSpeed: NCCL on GPUs, gloo on CPU ranks."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
