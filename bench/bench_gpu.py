"""GPU training throughput, MFU and peak memory: llama_core vs transformers (+ PEFT) vs transformers + Liger.

    python bench/bench_gpu.py --preset llama3.2-1b --batch 4 --seq 2048 --packed --steps 8 --method full
    python bench/bench_gpu.py --preset llama3.2-1b --method lora ...       # LoRA r 16 on all linear layers
    python bench/bench_gpu.py --check-args ...                             # parse and check only (no GPU needed)
    deepspeed --num_gpus 1 bench/bench_gpu.py --zero3 ...                  # also our DeepSpeed ZeRO-3 engine

Every implementation trains the same random weights (drawn once, on the GPU) on the same batch, bf16 autocast with
fp32 master weights for full fine-tuning, a bf16 base with fp32 adapters for LoRA (as `finetune` does), AdamW; the
first two steps are warm-up. MFU: model FLOPs (6 x trained-path parameters + 12 x layers x dim x sequence per
token) over the GPU's dense bf16 peak. `--packed`: rows of several documents (position ids restarting): ours
attends within each document (varlen/flex, llama_core.packed_attention); transformers' sdpa attention is given the
same position ids but attends over the whole row (it has no document mask without flash-attention-2), so it does
a little more attention work. Rows go to --results (markdown, default bench/RESULTS.md) and --json.
An implementation that fails is recorded as a row with its error; the exit status is 1 then.
"""
from __future__ import annotations

import argparse
import importlib.util
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


def _meta_model(config):
    from llama_core.model import Transformer
    with torch.device("meta"):
        return Transformer(config)


def model_flops_per_token(config, seq: int, method: str) -> float:
    """Training FLOPs per token: 6 x parameters for full fine-tuning; LoRA skips the weight gradients of the frozen
    matrices (4 x instead of 6 x), plus attention's 12 x layers x dim x seq."""
    n = _meta_model(config).num_parameters()
    return (6 if method == "full" else 4) * n + 12 * config.n_layers * config.dim * seq


def random_state(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """One set of random weights on the GPU (normal(0, 0.02), unit norms), shared by every implementation."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = {}
    for name, p in _meta_model(config).state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        out[name] = (torch.ones(p.shape, device="cuda") if name.endswith("norm.weight") else
                     torch.randn(p.shape, device="cuda", generator=g) * 0.02)
    return out


def batch_of(config, batch: int, seq: int, packed: bool):
    x = torch.randint(0, config.vocab_size, (batch, seq), device="cuda", generator=torch.Generator(
        device="cuda").manual_seed(1))
    if not packed:
        return {"input_ids": x, "labels": x}
    from llama_core.packed_attention import random_packed_positions
    positions = random_packed_positions(batch, seq, 512, torch.Generator().manual_seed(2)).cuda()
    return {"input_ids": x, "labels": x, "position_ids": positions}


def build(impl: str, config, method: str, state: dict):
    if impl == "ours":
        from llama_core.model import Transformer
        with torch.device("meta"):
            model = Transformer(config)
        model.to_empty(device="cuda")
        model.tie_weights()
        model.load_state_dict(state, strict=False)
    else:
        import transformers
        if impl == "hf+liger":  # patches transformers' Llama classes globally: run last
            from liger_kernel.transformers import apply_liger_kernel_to_llama
            apply_liger_kernel_to_llama()
        hf = config.to_hf("float32")
        with torch.device("cuda"):
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                **{k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype")},
                attn_implementation="sdpa"))
        model.load_state_dict(state, strict=False)
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        model = model.to(torch.bfloat16)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        if impl == "ours":
            from finetune.lora import lora_config
            lora = lora_config(r=16, lora_alpha=32, target_modules=targets)
        else:
            lora = LoraConfig(r=16, lora_alpha=32, target_modules=targets)
        model = get_peft_model(model, lora)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return model.train()


def bench_one(impl: str, config, method: str, data: dict, steps: int, state: dict) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build(impl, config, method, state)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    times, losses = [], []
    for step in range(steps + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**data)
            loss = out.loss if hasattr(out, "loss") else out
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        losses.append(loss.item())
        if step >= 2:
            times.append(time.perf_counter() - start)
    tokens = data["input_ids"].numel()
    del model, optimizer
    return {"tokens_per_s": tokens * len(times) / sum(times), "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
            "first_loss": losses[0], "last_loss": losses[-1]}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3.2-1b")
    p.add_argument("--layers", type=int, default=None, help="override n_layers")
    p.add_argument("--method", default="full", choices=["full", "lora"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--packed", action="store_true", help="rows of several documents (position ids restart)")
    p.add_argument("--impls", default="ours,hf,hf+liger", help="which implementations (hf+liger when installed)")
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "RESULTS.md"), help="markdown rows appended")
    p.add_argument("--json", help="the rows as JSON")
    p.add_argument("--check-args", action="store_true", help="parse and check the arguments, then exit")
    p.add_argument("--zero3", action="store_true", help="also time our DeepSpeed ZeRO-3 engine (run under deepspeed)")
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args(argv)
    from llama_core.config import get_config
    try:
        args.config = get_config(args.preset, **({"n_layers": args.layers} if args.layers else {}))
    except ValueError as e:
        p.error(str(e))
    if min(args.batch, args.seq, args.steps) < 1:
        p.error("--batch, --seq and --steps must be >= 1")
    unknown = set(args.impls.split(",")) - {"ours", "hf", "hf+liger"}
    if unknown:
        p.error(f"unknown --impls {sorted(unknown)}; valid: ours, hf, hf+liger")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    config = args.config
    if args.check_args:
        print(f"would run: {args.preset} ({config.n_layers} layers, {_meta_model(config).num_parameters():,} "
              f"parameters), {args.method}, batch {args.batch} x {args.seq}{' packed' if args.packed else ''}, "
              f"{args.steps} steps, {args.impls}")
        return 0
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU")
    flops = model_flops_per_token(config, args.seq, args.method)
    state, data = random_state(config), batch_of(config, args.batch, args.seq, args.packed)
    impls = [i for i in args.impls.split(",") if i != "hf+liger" or importlib.util.find_spec("liger_kernel")]
    rows, failed = [], False
    for impl in impls:
        try:
            r = bench_one(impl, config, args.method, data, args.steps, state)
            r["mfu"] = r["tokens_per_s"] * flops / peak_flops()
        except Exception as e:  # noqa: BLE001 - one implementation's failure must not lose the other rows
            r, failed = {"error": f"{type(e).__name__}: {str(e)[:300]}"}, True
        rows.append((impl, r))
    if args.zero3:
        try:
            rows.append(("ours-zero3", bench_zero3(config, args)))
        except Exception as e:  # noqa: BLE001
            rows.append(("ours-zero3", {"error": f"{type(e).__name__}: {str(e)[:300]}"}))
            failed = True
    report(args, config, rows)
    return 1 if failed else 0


def plan_estimate(args, config) -> float:
    """`finetune plan`'s per-GPU estimate (GB) for this run, to set beside the measured peak."""
    import dataclasses

    from finetune.plan import memory_plan
    from finetune.recipe import Recipe

    recipe = Recipe()
    recipe = dataclasses.replace(
        recipe, training=dataclasses.replace(recipe.training, method=args.method, micro_batch_size=args.batch,
                                             precision="bf16"),
        data=dataclasses.replace(recipe.data, max_seq_len=args.seq))
    return memory_plan(recipe, config, 1)["per_gpu"] / 1e9


def report(args, config, rows) -> None:
    device = torch.cuda.get_device_name()
    lines = [f"\n### {time.strftime('%Y-%m-%d')} {device}: {args.preset} ({config.n_layers} layers), {args.method}, "
             f"bf16, batch {args.batch} x {args.seq}{', packed documents' if args.packed else ''}, torch "
             f"{torch.__version__}\n", "| implementation | tokens/s | MFU | peak GB | loss first -> last |",
             "| --- | --- | --- | --- | --- |"]
    for impl, r in rows:
        if "error" in r:
            lines.append(f"| {impl} | error: {r['error']} | | | |")
        else:
            lines.append(f"| {impl} | {r['tokens_per_s']:,.0f} | {r.get('mfu', float('nan')):.1%} | "
                         f"{r['peak_gb']:.1f} | {r.get('first_loss', float('nan')):.3f} -> "
                         f"{r.get('last_loss', float('nan')):.3f} |")
    estimate = plan_estimate(args, config)
    lines.append(f"\n`finetune plan` estimated {estimate:.1f} GB per GPU for ours"
                 + (f" (measured {rows[0][1]['peak_gb']:.1f} GB)" if rows and "peak_gb" in rows[0][1] else ""))
    ours = rows[0][1] if rows and rows[0][0] == "ours" else {}
    for impl, r in rows[1:]:
        if "tokens_per_s" in r and "tokens_per_s" in ours:
            lines.append(f"\nours / {impl}: {ours['tokens_per_s'] / r['tokens_per_s']:.2f}x speed, "
                         f"{ours['peak_gb'] / r['peak_gb']:.2f}x peak memory")
    text = "\n".join(lines)
    print(text)
    with open(args.results, "a", encoding="utf-8") as f:
        f.write(text + "\n")
    if args.json:
        from llama_core.files import write_json
        write_json(args.json, {"preset": args.preset, "method": args.method, "batch": args.batch, "seq": args.seq,
                               "packed": args.packed, "device": device, "plan_estimate_gb": estimate,
                               "rows": dict(rows)})


def bench_zero3(config, args) -> dict:
    """Training steps through finetune's DeepSpeedEngine (ZeRO-3, bf16) on this rank's GPU."""
    import dataclasses

    import deepspeed

    from finetune.deepspeed_engine import DeepSpeedEngine
    from finetune.precision import resolve_precision
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
    engine = DeepSpeedEngine(recipe, _Vocab(), resolve_precision("bf16", device.type), device)
    batch = {k: v.cpu() for k, v in batch_of(config, args.batch, args.seq, args.packed).items()}
    engine.set_lr(1e-5)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = engine.loss_sum(batch) / batch["input_ids"].numel()
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    tokens_per_s = args.batch * args.seq * len(times) / sum(times)
    return {"tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * model_flops_per_token(config, args.seq, args.method) / peak_flops(),
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9}


if __name__ == "__main__":
    sys.exit(main())
