"""Greedy generation speed: llama_core's KV-cache `generate` vs transformers' `generate`, side by side.

    python bench/bench_generate.py                 # 58M model, 16-token prompts, 64 new tokens, batch 1 and 8

Same weights, fp32 CPU; both must produce the same tokens (checked), so the comparison is like for like.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from llama_core.config import get_config
    from llama_core.generate import generate
    from llama_core.model import Transformer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-58m")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    config = get_config(args.preset)
    ours = Transformer(config)
    ours.reset_parameters(seed=0)
    ours.eval()
    hf = config.to_hf()
    theirs = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype")}))
    theirs.load_state_dict(ours.state_dict())
    theirs.eval()
    gen = GenerationConfig(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    print(f"{args.preset}: {args.prompt_len}-token prompts, {args.new} new tokens, greedy, fp32, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'batch':>5}{'ours tok/s':>12}{'hf tok/s':>10}{'speed':>8}")
    for batch in map(int, args.batches.split(",")):
        prompts = torch.randint(3, config.vocab_size, (batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
        best = {}
        for _ in range(args.repeats):
            for name in ("ours", "hf"):
                start = time.perf_counter()
                with torch.no_grad():
                    if name == "ours":
                        out = generate(ours, prompts.tolist(), max_new_tokens=args.new, eos_id=None)
                    else:
                        out = theirs.generate(prompts, attention_mask=torch.ones_like(prompts),
                                              generation_config=gen)[:, args.prompt_len:].tolist()
                rate = batch * args.new / (time.perf_counter() - start)
                best[name] = max(best.get(name, 0), rate)
                best[name + "_out"] = out
        assert best["ours_out"] == best["hf_out"], "the two implementations generated different tokens"
        print(f"{batch:>5}{best['ours']:>12.1f}{best['hf']:>10.1f}{best['ours'] / best['hf']:>7.2f}x")


if __name__ == "__main__":
    main()
