"""Training speed and memory: llama_core vs transformers' LlamaForCausalLM, side by side in one run.

    python bench/bench_train.py                    # the shared reference size (58M parameters, vocab 32000)
    python bench/bench_train.py --steps 6 --methods full

Each (implementation, method) runs in its own process, so peak RSS is that configuration's alone; they run
alternately (ours, theirs, ours, theirs) and the table reports ratios, which drift less than absolute figures.
Same config, same random weights, same batch (every token trained), fp32, AdamW; the first step is warm-up.
Ours runs the `finetune` command's LocalEngine step, which on CPU by default returns freed heap pages to the OS
after each block and step (training.release_memory); --no-trim runs it with that off, to show the trade-off.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(impl: str, method: str, steps: int, batch: int, seq: int, preset: str, trim: bool) -> dict:
    import torch

    sys.path.insert(0, ROOT)
    from llama_core.config import get_config
    from llama_core.model import Transformer, count_targets

    torch.manual_seed(0)
    config = get_config(preset)
    model = Transformer(config)
    model.reset_parameters(seed=0)
    core = model
    if impl == "hf":
        import transformers
        hf = config.to_hf()
        twin = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **{k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype")}, attn_implementation="sdpa"))
        twin.load_state_dict(model.state_dict())
        del model, core
        model = twin
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        from finetune.lora import lora_config  # ours: as `finetune` builds it (PEFT with a fused forward)
        make_config = lora_config if impl == "ours" else LoraConfig
        model = get_peft_model(model, make_config(r=16, lora_alpha=32, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    # Fused AdamW on both sides: `finetune` uses it on CPU too, and it is one argument away for the peer.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    x = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    if impl == "ours":  # the finetune command's own step: LocalEngine (summed loss / tokens, memory release)
        from finetune.engine import LocalEngine
        from finetune.precision import resolve_precision
        engine = LocalEngine(model, core, optimizer, resolve_precision("fp32", "cpu"), torch.device("cpu"),
                             grad_clip=None, release_memory=trim)
        n_targets = count_targets(x).item()

        def train_step():
            loss = engine.loss_sum({"input_ids": x, "labels": x}) / n_targets
            engine.backward(loss)
            engine.step()
            return loss
    else:
        def train_step():
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss
    times, losses = [], []
    for step in range(steps + 1):
        start = time.perf_counter()
        loss = train_step()
        if step:  # the first step allocates and warms up
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
    tokens = batch * seq
    return {"impl": impl, "method": method, "tokens_per_s": tokens * len(times) / sum(times),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "first_loss": losses[0],
            "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-58m")
    p.add_argument("--methods", default="full,lora")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each configuration")
    p.add_argument("--no-trim", action="store_true",
                   help="ours with training.release_memory: false (freed heap pages stay with the process)")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.batch, args.seq, args.preset, not args.no_trim)))
        return
    results: dict[tuple, list] = {}
    for _ in range(args.repeats):
        for method in args.methods.split(","):
            for impl in ("ours", "hf"):
                out = subprocess.run([sys.executable, __file__, "--worker", impl, method, "--steps", str(args.steps),
                                      "--batch", str(args.batch), "--seq", str(args.seq), "--preset", args.preset]
                                     + (["--no-trim"] if args.no_trim else []),
                                     capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                results.setdefault((method, impl), []).append(r)
                print(f"  {method:<5} {impl:<5} {r['tokens_per_s']:8.0f} tok/s  {r['peak_rss_gb']:.2f} GB peak RSS  "
                      f"(loss {r['first_loss']:.4f})", flush=True)
    print(f"\n{args.preset}, batch {args.batch} x {args.seq}, fp32 CPU, {results[next(iter(results))][0]['threads']} "
          f"threads, best of {args.repeats}; 'paired' is the median of each round's ratio (ours, then theirs):")
    print(f"{'method':<6}{'ours tok/s':>12}{'hf tok/s':>10}{'speed':>8}{'paired':>8}{'ours GB':>9}{'hf GB':>7}"
          f"{'memory':>8}")
    for method in args.methods.split(","):
        ours_runs, hf_runs = results[(method, "ours")], results[(method, "hf")]
        ours = max(r["tokens_per_s"] for r in ours_runs)
        hf = max(r["tokens_per_s"] for r in hf_runs)
        paired = statistics.median(o["tokens_per_s"] / h["tokens_per_s"] for o, h in zip(ours_runs, hf_runs))
        ours_mem = min(r["peak_rss_gb"] for r in ours_runs)
        hf_mem = min(r["peak_rss_gb"] for r in hf_runs)
        print(f"{method:<6}{ours:>12.0f}{hf:>10.0f}{ours / hf:>7.2f}x{paired:>7.2f}x{ours_mem:>9.2f}{hf_mem:>7.2f}"
              f"{ours_mem / hf_mem:>7.2f}x")


if __name__ == "__main__":
    main()
