"""GPU training throughput and MFU: llama_core vs transformers side by side, and the DeepSpeed ZeRO-3 engine.

    python bench/bench_gpu.py                       # LLaMA-7B shapes cut to 4 layers, full, bf16, batch 4 x 2048
    python bench/bench_gpu.py --preset llama-7b --method lora
    deepspeed --num_gpus 1 bench/bench_gpu.py --zero3   # our DeepSpeed engine (ZeRO-3 runs on one GPU too)

Prints tokens/s, MFU (model FLOPs: 6 x parameters + 12 x layers x dim x sequence per token, over the GPU's dense
bf16 peak) and peak memory, and appends a row to bench/RESULTS.md. With liger-kernel installed, transformers with
Liger's kernels runs as a third implementation. Needs a CUDA GPU; ours uses the Triton kernels (triton is part of
torch's CUDA build).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s


def peak_flops() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))


def model_flops_per_token(config, seq: int, trained_fraction: float = 1.0) -> float:
    n = sum(p.numel() for p in _meta_model(config).parameters())
    return 6 * n * trained_fraction + 12 * config.n_layers * config.dim * seq


def _meta_model(config):
    from llama_core.model import Transformer
    with torch.device("meta"):
        return Transformer(config)


def bench_local(impl: str, config, method: str, batch: int, seq: int, steps: int) -> dict:
    from llama_core.model import Transformer

    torch.manual_seed(0)
    dtype = torch.bfloat16
    with torch.device("cuda"):
        model = Transformer(config)
    model.reset_parameters(seed=0)
    if impl.startswith("hf"):
        import transformers
        if impl == "hf+liger":  # patches transformers' Llama classes globally: run last
            from liger_kernel.transformers import apply_liger_kernel_to_llama
            apply_liger_kernel_to_llama()
        hf = config.to_hf("bfloat16")
        twin = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **{k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype")}, attn_implementation="sdpa"))
        twin.load_state_dict(model.state_dict())
        model = twin.cuda()
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        model = model.to(dtype)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.train()
    if impl == "ours":
        model.activation_checkpointing = False
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    x = torch.randint(0, config.vocab_size, (batch, seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype):
            loss = model(input_ids=x, labels=x)
            loss = loss.loss if hasattr(loss, "loss") else loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    tokens_per_s = batch * seq * len(times) / sum(times)
    return {"tokens_per_s": tokens_per_s, "peak_gb": torch.cuda.max_memory_allocated() / 1e9}


def main() -> None:
    from llama_core.config import get_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-7b")
    p.add_argument("--layers", type=int, default=None, help="override n_layers (default: 4 for full, all for lora)")
    p.add_argument("--method", default="full", choices=["full", "lora"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--zero3", action="store_true", help="also time our DeepSpeed ZeRO-3 engine (run under deepspeed)")
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU")
    layers = args.layers or (4 if args.method == "full" else None)
    config = get_config(args.preset, **({"n_layers": layers} if layers else {}))
    flops = model_flops_per_token(config, args.seq, 1.0 if args.method == "full" else 2 / 3)
    rows = []
    import importlib.util
    liger = importlib.util.find_spec("liger_kernel") is not None  # pip install liger-kernel to compare with it
    for impl in ("ours", "hf") + (("hf+liger",) if liger else ()):
        r = bench_local(impl, config, args.method, args.batch, args.seq, args.steps)
        r["mfu"] = r["tokens_per_s"] * flops / peak_flops()
        rows.append((impl, r))
        torch.cuda.empty_cache()
    if args.zero3:
        rows.append(("ours-zero3", bench_zero3(config, args)))
    device = torch.cuda.get_device_name()
    lines = [f"\n### {time.strftime('%Y-%m-%d')} {device}: {args.preset} ({config.n_layers} layers), {args.method}, "
             f"bf16, batch {args.batch} x {args.seq}\n", "| implementation | tokens/s | MFU | peak GB |",
             "| --- | --- | --- | --- |"]
    for impl, r in rows:
        lines.append(f"| {impl} | {r['tokens_per_s']:,.0f} | {r.get('mfu', float('nan')):.1%} | "
                     f"{r.get('peak_gb', float('nan')):.1f} |")
    ours = rows[0][1]
    for impl, r in rows[1:]:
        if "peak_gb" in r:
            lines.append(f"\nours / {impl}: {ours['tokens_per_s'] / r['tokens_per_s']:.2f}x speed, "
                         f"{ours['peak_gb'] / r['peak_gb']:.2f}x peak memory")
    print("\n".join(lines))
    with open(os.path.join(ROOT, "bench", "RESULTS.md"), "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def bench_zero3(config, args) -> dict:
    """One training step loop through finetune's DeepSpeedEngine (ZeRO-3, bf16) on this rank's GPU."""
    import dataclasses

    import deepspeed

    from finetune.build import resolve_precision
    from finetune.distributed import DeepSpeedEngine
    from finetune.recipe import Recipe

    deepspeed.init_distributed()
    recipe = Recipe()
    recipe = dataclasses.replace(
        recipe, model=dataclasses.replace(recipe.model, preset=args.preset, config={"n_layers": config.n_layers}),
        training=dataclasses.replace(recipe.training, method=args.method, micro_batch_size=args.batch,
                                     precision="bf16"),
        distributed=dataclasses.replace(recipe.distributed, backend="deepspeed", zero_stage=3))

    class _Vocab:
        vocab_size = config.vocab_size
    device = torch.device("cuda", torch.cuda.current_device())
    engine = DeepSpeedEngine(recipe, _Vocab(), resolve_precision("bf16", device), device)
    x = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    batch = {"input_ids": x, "labels": x}
    engine.set_lr(1e-5)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = engine.loss_sum(batch) / x.numel()
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    tokens_per_s = args.batch * args.seq * len(times) / sum(times)
    flops = model_flops_per_token(config, args.seq, 1.0 if args.method == "full" else 2 / 3)
    return {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops / peak_flops(),
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9}


if __name__ == "__main__":
    main()
