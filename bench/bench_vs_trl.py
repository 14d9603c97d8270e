"""End to end: the `finetune` command vs TRL's `SFTTrainer`, each in its own process, several rounds.

    python bench/bench_vs_trl.py                          # full and LoRA, 12 steps, 3 rounds (~16 min, 2 quiet cores)
    python bench/bench_vs_trl.py --rounds 1 --steps 3     # a quick check that both sides run
    python bench/bench_vs_trl.py --methods lora --json out.json --keep

What one side's figure covers: the whole process, from start to exit (imports, loading the model, preparing the
data, training, writing the final model), its wall clock and its peak RSS (`os.wait4` gives each child's own
rusage). Both sides get the same inputs, made once in a temporary folder:
  model      a random `llama-58m` (dim 512, 8 layers, 8 heads, FFN 1376; 58M parameters at vocab 32000) built with
             llama_core, saved as a Hugging Face folder by transformers (config.json, model.safetensors, the tokenizer)
  tokenizer  --tokenizer, else /work/shared/data/llama_tokenizer.model (LLaMA's, 32,000 pieces) when present, else
             one trained on the data with a smaller vocabulary (said in the output); TRL gets the same file
             converted by transformers (`LlamaTokenizer.from_pretrained` on the folder), pad = <unk> (id 0); setup
             checks that both give the same ids for every example and that TRL's completion mask equals ours
  data       data/instructions.jsonl (Alpaca format), repeated whole as often as needed for 1.5x the token budget
             (ours: `data.dedup: false`, so the copies stay, as they do in TRL); ours renders it with the built-in
             `alpaca` template, TRL gets the same text as a prompt-completion dataset (Stanford Alpaca's prompt, the
             output as completion, EOS added by TRL), so both train on the response + EOS only
  training   the same number of optimizer steps (--steps) of --micro-batch packed rows of --seq-len tokens,
             best-fit-decreasing packing on both sides (ours: trl's `pack_dataset`; TRL: `packing_strategy="bfd"`,
             which makes it padding-free: position ids restart per example, and with sdpa transformers builds a
             block-diagonal mask from them), gradient accumulation 1, AdamW (fused) with ours' defaults on both
             sides (betas 0.9/0.95, weight decay 0.1, clipping 1.0, cosine to 10% of the peak, no warmup; ours
             reaches the 10% at the last step, transformers' schedule one step later), lr 2e-5
             (full) or 2e-4 (LoRA r 16, alpha 32, dropout 0.05, the 7 linear layers of each block), fp32 (or
             --precision bf16), logging every step, no evaluation, no checkpoints but what each side writes at the
             end (ours: its final checkpoint with the optimizer state, then final/; TRL: `save_model`)
  logging    ours: metrics.jsonl, TensorBoard off (TRL: report_to "none"); ours' tokenized-data cache is emptied
             before each of its runs, so its data preparation is timed every round, as TRL's is
Rounds alternate the two sides (ours first in odd rounds, TRL first in even ones). Reported: per round, the best of
the rounds, and the median of the paired per-round ratios: speed = TRL wall / ours wall, memory = ours peak RSS / TRL
peak RSS; also tokens trained and the step-1 and final losses of each side (same model and data: both start near
ln(vocab); the step-1 batches differ, as each side shuffles with its own generator).

Targets (issue 15): >= 3x wall clock (bf16 where the CPU has AMX) and <= 0.5x peak RSS for both methods; never
below 2x / above 0.6x on any machine. Put the figures in bench/RESULTS.md with the CPU named (this script prints
the CPU's model name and flags, and the library versions, beside the results).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_TOKENIZER = "/work/shared/data/llama_tokenizer.model"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = {"full": 2e-5, "lora": 2e-4}
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
# Stanford Alpaca's PROMPT_DICT (train.py), as a TRL user writes it; setup checks it against our `alpaca` template.
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                   "request.\n\n### Instruction:\n{instruction}\n\n### Response:")


def alpaca_prompt(row: dict) -> str:
    template = PROMPT_INPUT if row.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=row["instruction"], input=row.get("input", ""))


# ------------------------------------------------------------------------------------------------- the TRL side

def trl_worker(args) -> None:
    """One TRL run, end to end, in this process; its results go to --result as JSON."""
    stamps = {"start": time.time()}
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    class CountingSFTTrainer(SFTTrainer):
        """SFTTrainer that also adds up the trained tokens of each step (which it gets anyway)."""
        trained_tokens = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if num_items_in_batch is not None and model.training:
                self.trained_tokens += int(num_items_in_batch)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    stamps["imported"] = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    stamps["model_loaded"] = time.time()
    with open(args.data, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    dataset = Dataset.from_list([{"prompt": alpaca_prompt(r), "completion": r["output"]} for r in rows])
    peft_config = None
    if args.method == "lora":
        from peft import LoraConfig
        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS,
                                 task_type="CAUSAL_LM")
    config = SFTConfig(
        output_dir=args.out_dir, max_steps=args.steps, per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=1, learning_rate=LR[args.method], warmup_steps=0,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
        optim="adamw_torch_fused", seed=1234,
        max_length=args.seq_len, packing=True, packing_strategy="bfd", padding_free=True, completion_only_loss=True,
        bf16=args.precision == "bf16", fp16=False, use_cpu=True,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", dataloader_num_workers=0)
    trainer = CountingSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                 peft_config=peft_config)
    stamps["data_prepared"] = time.time()  # SFTTrainer tokenizes and packs in its constructor
    output = trainer.train()
    stamps["trained"] = time.time()
    trainer.save_model(os.path.join(args.out_dir, "final"))
    stamps["saved"] = time.time()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
    # imported after the peak, so that our code adds nothing to TRL's memory
    from llama_core.files import write_json
    write_json(args.result, {
        "steps": trainer.state.global_step, "losses": losses, "tokens": int(tokens[-1]) if tokens else None,
        "trained_tokens": trainer.trained_tokens, "packed_rows": len(trainer.train_dataset),
        "train_runtime_s": output.metrics.get("train_runtime"), "threads": torch.get_num_threads(),
        "phases_s": {name: round(stamps[name] - stamps[prev], 2) for prev, name in zip(stamps, list(stamps)[1:])}})


# ------------------------------------------------------------------------------------------------- setup

def cpu_info() -> dict:
    name, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": name, "cores": os.cpu_count(), "flags": {flag: flag in flags for flag in CPU_FLAGS}}


def versions() -> dict:
    import datasets
    import peft
    import torch
    import transformers
    import trl
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "peft": peft.__version__, "datasets": datasets.__version__}


def read_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def pick_tokenizer(requested: str | None, tmp: str, rows: list[dict]) -> tuple[str, str]:
    """(path of a SentencePiece model, how it was chosen)."""
    if requested:
        return requested, f"{requested} (--tokenizer)"
    if os.path.isfile(SHARED_TOKENIZER):
        return SHARED_TOKENIZER, f"{SHARED_TOKENIZER} (LLaMA's tokenizer)"
    from llama_core.tokenizer import train_tokenizer
    texts = [alpaca_prompt(r) + r["output"] for r in rows]
    path = os.path.join(tmp, "trained_tokenizer.model")
    for vocab in (4000, 2000, 1000, 500):  # the largest vocabulary this small corpus can fill
        try:
            train_tokenizer(texts, path, vocab)
            return path, (f"a {vocab}-piece tokenizer trained on the data ({SHARED_TOKENIZER} not found): NOT the "
                          f"32,000-piece reference size, so the figures are not comparable with RESULTS.md")
        except ValueError:
            continue
    raise SystemExit("error: could not train a fallback tokenizer; pass --tokenizer PATH")


def make_model(model_dir: str, tokenizer_path: str) -> dict:
    """A random llama-58m saved as a Hugging Face folder (by transformers) with both tokenizer forms."""
    import transformers

    from llama_core.config import get_config
    from llama_core.model import Transformer
    from llama_core.tokenizer import Tokenizer

    vocab = Tokenizer(tokenizer_path).vocab_size
    config = get_config("llama-58m", vocab_size=vocab)
    model = Transformer(config)
    model.reset_parameters(seed=0)
    hf = {k: v for k, v in config.to_hf().items() if k not in ("architectures", "torch_dtype")}
    twin = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf))
    twin.load_state_dict(model.state_dict())
    twin.save_pretrained(model_dir, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    del model, twin
    # transformers converts the SentencePiece file it finds in the folder (the slow `vocab_file=` path gives an
    # empty vocabulary in transformers 5); the converted tokenizer.json is what TRL's side loads.
    shutil.copyfile(tokenizer_path, os.path.join(model_dir, "tokenizer.model"))
    hf_tok = transformers.LlamaTokenizer.from_pretrained(model_dir, add_bos_token=True)
    hf_tok.pad_token = hf_tok.unk_token  # LLaMA has no pad piece; ours pads with id 0 (<unk>) too
    hf_tok.save_pretrained(model_dir)
    return {"parameters": params, "vocab_size": vocab}


def check_tokenizers(rows: list[dict], tokenizer_path: str, model_dir: str) -> dict:
    """Compare, for every example: our template's text with the Alpaca prompt TRL gets; our ids with the HF
    tokenizer's ids of prompt + completion + EOS; our trained positions with TRL's completion mask (the tokens after
    the common prefix of the prompt's ids and the whole text's ids)."""
    from transformers import AutoTokenizer

    from finetune.templates import encode_segments, load_template, segments_text
    from llama_core.tokenizer import Tokenizer

    ours, template = Tokenizer(tokenizer_path), load_template("alpaca")
    theirs = AutoTokenizer.from_pretrained(model_dir)
    text_diff, ids_diff, mask_diff, examples = 0, 0, 0, []
    for row in rows:
        messages = [{"role": "user", "content": row["instruction"], "input": row.get("input", "")},
                    {"role": "assistant", "content": row["output"]}]
        segments = template.render(messages)
        pieces = encode_segments(segments, ours)
        our_ids = [i for p in pieces for i in p]
        our_trained = sum(len(p) for s, p in zip(segments, pieces) if s.trained)
        prompt, completion = alpaca_prompt(row), row["output"] + theirs.eos_token
        text_diff += segments_text(segments, "", "") != prompt + row["output"]
        prompt_ids = theirs(prompt)["input_ids"]
        full_ids = theirs(prompt + completion)["input_ids"]
        common = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), min(map(len, (prompt_ids,
                                                                                                      full_ids))))
        ids_diff += full_ids != our_ids
        mask_diff += len(full_ids) - common != our_trained
        if full_ids != our_ids and len(examples) < 2:
            examples.append({"row": row, "ours": our_ids, "trl": full_ids})
    samples = ["Hello world", "Rewrite: We eat an apple.\n\n### Response:We ate an apple.", "61 × 92 = 5612."]
    sample_ids = {s: (ours.encode(s, bos=True), theirs(s)["input_ids"]) for s in samples}
    return {"examples": len(rows), "text_differs": text_diff, "ids_differ": ids_diff, "mask_differs": mask_diff,
            "first_differences": examples, "samples_equal": all(a == b for a, b in sample_ids.values()),
            "trl_special_ids": {"bos": theirs.bos_token_id, "eos": theirs.eos_token_id, "pad": theirs.pad_token_id,
                                "unk": theirs.unk_token_id},
            "our_special_ids": {"bos": ours.bos_id, "eos": ours.eos_id, "pad": ours.pad_id, "unk": ours.unk_id}}


def write_data(rows: list[dict], path: str, tokens_per_copy: int, budget: int) -> int:
    """The rows repeated whole, enough for 1.5x the token budget; returns the number of copies."""
    from llama_core.files import write_text
    copies = max(1, math.ceil(1.5 * budget / tokens_per_copy))
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) * copies)
    return copies


def count_tokens(rows: list[dict], tokenizer_path: str) -> int:
    from finetune.templates import encode_segments, load_template
    from llama_core.tokenizer import Tokenizer
    tok, template = Tokenizer(tokenizer_path), load_template("alpaca")
    return sum(len(i) for r in rows for i in encode_segments(template.render([
        {"role": "user", "content": r["instruction"], "input": r.get("input", "")},
        {"role": "assistant", "content": r["output"]}]), tok))


# ------------------------------------------------------------------------------------------------- the runs

def run_child(cmd: list[str], log_path: str, env: dict) -> dict:
    """Run `cmd` to its exit; its own wall clock and peak RSS (ru_maxrss of this child alone, via wait4)."""
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return {"rc": proc.returncode, "wall_s": wall, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,
            "cpu_s": usage.ru_utime + usage.ru_stime}


def tail(path: str, lines: int = 15) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def our_recipe(s, method: str, out_dir: str) -> str:
    recipe = {
        "model": {"checkpoint": s.model_dir},
        "tokenizer": {"path": s.tokenizer},
        "template": "alpaca",
        "datasets": [{"path": s.data, "format": "alpaca"}],
        "data": {"max_seq_len": s.seq_len, "packing": True, "dedup": False, "cache_dir": s.cache_dir},
        "training": {"method": method, "max_steps": s.steps, "micro_batch_size": s.micro_batch,
                     "gradient_accumulation_steps": 1, "lr": LR[method], "warmup_steps": 0,
                     "precision": s.precision},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "logging": {"every_steps": 1, "tensorboard": False},
        "output_dir": out_dir,
    }
    return json.dumps(recipe, indent=1)  # JSON is YAML


def run_ours(s, method: str, tag: str) -> dict:
    from llama_core.files import write_text
    out_dir = os.path.join(s.tmp, "runs", tag)
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.rmtree(s.cache_dir, ignore_errors=True)  # data preparation is timed in every round
    recipe = os.path.join(s.tmp, f"recipe-{method}.yaml")
    write_text(recipe, our_recipe(s, method, out_dir))
    log = os.path.join(s.tmp, f"{tag}.log")
    r = run_child([sys.executable, "-m", "finetune", "--recipe", recipe], log, s.env)
    r["log"] = log
    if r["rc"] != 0:
        r["error"] = f"{sys.executable} -m finetune --recipe {recipe} exited with {r['rc']}:\n{tail(log)}"
        return r
    with open(os.path.join(out_dir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        losses = [m["train_loss"] for m in map(json.loads, f) if "train_loss" in m]
    r.update(steps=summary["steps"], tokens=summary["tokens"], trained_tokens=summary["trained_tokens"],
             losses=losses, train_phase_s=summary["wall_time_s"])
    if not s.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    return r


def run_trl(s, method: str, tag: str) -> dict:
    out_dir, result = os.path.join(s.tmp, "runs", tag), os.path.join(s.tmp, f"{tag}.json")
    shutil.rmtree(out_dir, ignore_errors=True)
    log = os.path.join(s.tmp, f"{tag}.log")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "trl", "--method", method, "--model-dir",
           s.model_dir, "--data", s.data, "--out-dir", out_dir, "--result", result, "--steps", str(s.steps),
           "--micro-batch", str(s.micro_batch), "--seq-len", str(s.seq_len), "--precision", s.precision]
    r = run_child(cmd, log, s.env)
    r["log"] = log
    if r["rc"] != 0 or not os.path.isfile(result):
        r["error"] = f"TRL worker exited with {r['rc']}: {' '.join(cmd)}\n{tail(log)}"
        return r
    with open(result, encoding="utf-8") as f:
        r.update(json.load(f))
    r["train_phase_s"] = round(r["phases_s"]["trained"] + r["phases_s"]["saved"], 1)
    if not s.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    return r


# ------------------------------------------------------------------------------------------------- report

def show_run(method: str, side: str, r: dict) -> str:
    if "error" in r:
        return f"  {method:<5} {side:<5} FAILED after {r['wall_s']:.1f} s (log {r['log']}, kept with --keep)"
    losses = r.get("losses") or [float("nan")]
    return (f"  {method:<5} {side:<5} {r['wall_s']:7.1f} s  {r['peak_rss_gb']:5.2f} GB peak RSS  "
            f"{r['cpu_s']:7.1f} CPU-s  {r['steps']} steps, {r['tokens']:,} tokens ({r['trained_tokens']:,} trained)  "
            f"loss {losses[0]:.4f} -> {losses[-1]:.4f}  (train+save {r['train_phase_s']:.1f} s)")


def summarize(method: str, runs: list[tuple[dict, dict]]) -> dict | None:
    good = [(o, t) for o, t in runs if "error" not in o and "error" not in t]
    if not good:
        return None
    speed = [t["wall_s"] / o["wall_s"] for o, t in good]
    cpu = [t["cpu_s"] / o["cpu_s"] for o, t in good]  # less sensitive than wall clock to other work on the machine
    memory = [o["peak_rss_gb"] / t["peak_rss_gb"] for o, t in good]
    best_ours, best_trl = min(o["wall_s"] for o, _ in good), min(t["wall_s"] for _, t in good)
    mem_ours, mem_trl = min(o["peak_rss_gb"] for o, _ in good), min(t["peak_rss_gb"] for _, t in good)
    return {"method": method, "rounds": len(good), "ours_wall_s": best_ours, "trl_wall_s": best_trl,
            "speed_best": best_trl / best_ours, "speed_paired_median": statistics.median(speed),
            "ours_peak_gb": mem_ours, "trl_peak_gb": mem_trl, "memory_best": mem_ours / mem_trl,
            "memory_paired_median": statistics.median(memory), "cpu_time_paired_median": statistics.median(cpu),
            "speed_per_round": speed, "memory_per_round": memory, "cpu_time_per_round": cpu}


def without_log(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "log"}  # a temporary path means nothing later


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="full,lora")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tokenizer", help="a SentencePiece tokenizer.model (default: LLaMA's, when present)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: ours training.precision bf16, TRL bf16=True (for CPUs with AMX)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both sides (default: torch's default)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    p.add_argument("--json", help="write every figure to this JSON file")
    # the TRL worker (internal)
    p.add_argument("--worker", choices=("trl",), help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        trl_worker(args)
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in LR for m in methods):
        p.error(f"--methods: a comma-separated list of full, lora; got {args.methods!r}")
    sys.path.insert(0, ROOT)
    s = argparse.Namespace(**vars(args))
    s.tmp = tempfile.mkdtemp(prefix="bench_vs_trl_")
    try:
        bench(s, methods)
    finally:
        if args.keep:
            print(f"\nkept {s.tmp}")
        else:
            shutil.rmtree(s.tmp, ignore_errors=True)


def bench(s, methods: list[str]) -> None:
    import torch

    from llama_core.files import write_json

    info = {"cpu": cpu_info(), "versions": versions(), "threads": torch.get_num_threads() if not s.threads
            else s.threads, "load_before": loadavg()}
    s.env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
             "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    if s.threads:
        s.env["OMP_NUM_THREADS"] = str(s.threads)
    flags = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in info["cpu"]["flags"].items())
    print(f"CPU: {info['cpu']['model']} ({info['cpu']['cores']} logical cores; {flags})")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print(f"torch threads: {info['threads']} (both sides); load average before: {info['load_before']}")

    rows = read_rows(os.path.join(ROOT, "data", "instructions.jsonl"))
    s.tokenizer, how = pick_tokenizer(s.tokenizer, s.tmp, rows)
    s.model_dir, s.cache_dir = os.path.join(s.tmp, "model"), os.path.join(s.tmp, "data-cache")
    model = make_model(s.model_dir, s.tokenizer)
    check = check_tokenizers(rows, s.tokenizer, s.model_dir)
    tokens = count_tokens(rows, s.tokenizer)
    budget = s.steps * s.micro_batch * s.seq_len
    s.data = os.path.join(s.tmp, "data.jsonl")
    copies = write_data(rows, s.data, tokens, budget)
    info.update(tokenizer=how, model=model, tokenizer_check=check, data={
        "source": "data/instructions.jsonl", "rows": len(rows), "tokens": tokens, "copies": copies,
        "token_budget": budget})
    print(f"tokenizer: {how}")
    print(f"model: llama-58m, {model['parameters']:,} parameters, vocab {model['vocab_size']}, random (seed 0)")
    print(f"ids TRL sees: bos {check['trl_special_ids']['bos']}, eos {check['trl_special_ids']['eos']}, pad "
          f"{check['trl_special_ids']['pad']} (<unk>); ours: bos {check['our_special_ids']['bos']}, eos "
          f"{check['our_special_ids']['eos']}, pad {check['our_special_ids']['pad']}")
    print(f"tokenizer check on {check['examples']} examples: prompt text differs {check['text_differs']}, ids differ "
          f"{check['ids_differ']}, trained positions differ {check['mask_differs']}; sample texts equal: "
          f"{check['samples_equal']}")
    for d in check["first_differences"]:
        print(f"  differs: {d['row']}\n    ours {d['ours']}\n    trl  {d['trl']}")
    print(f"data: {len(rows)} rows ({tokens:,} tokens with the template) x {copies} copies; budget {s.steps} steps x "
          f"{s.micro_batch} rows x {s.seq_len} tokens = {budget:,} tokens; precision {s.precision}\n")

    runs: dict[str, list[tuple[dict, dict]]] = {m: [] for m in methods}
    failed: set[str] = set()
    for round_ in range(1, s.rounds + 1):
        print(f"round {round_} (load average {loadavg()})", flush=True)
        for method in methods:
            if method in failed:
                continue
            results = {}
            for side in (("ours", "trl") if round_ % 2 else ("trl", "ours")):
                tag = f"{side}-{method}-r{round_}"
                results[side] = (run_ours if side == "ours" else run_trl)(s, method, tag)
                print(show_run(method, side, results[side]), flush=True)
                if "error" in results[side]:
                    print("    " + results[side]["error"].replace("\n", "\n    "), flush=True)
                    failed.add(method)  # no ratio this round, and the same inputs fail the same way in the next
                    break
            skipped = {"error": "not run: the other side failed"}
            runs[method].append((results.get("ours", skipped), results.get("trl", skipped)))
    info["load_after"] = loadavg()

    summaries = [x for x in (summarize(m, runs[m]) for m in methods) if x]
    print(f"\n{info['cpu']['model']}, {info['threads']} threads, {s.precision}; llama-58m, {s.steps} steps of "
          f"{s.micro_batch} x {s.seq_len} packed tokens; whole process, {s.rounds} round(s); load average "
          f"{info['load_before']} before, {info['load_after']} after")
    print("speed = TRL wall / ours wall (higher is better), memory = ours peak RSS / TRL peak RSS (lower is better);"
          " 'paired' = median of the rounds' ratios; cpu = TRL CPU-seconds / ours (user + system, paired)")
    print(f"{'method':<7}{'ours s':>8}{'TRL s':>8}{'speed':>8}{'paired':>8}{'ours GB':>9}{'TRL GB':>8}{'memory':>8}"
          f"{'paired':>8}{'cpu':>7}")
    for x in summaries:
        print(f"{x['method']:<7}{x['ours_wall_s']:>8.1f}{x['trl_wall_s']:>8.1f}{x['speed_best']:>7.2f}x"
              f"{x['speed_paired_median']:>7.2f}x{x['ours_peak_gb']:>9.2f}{x['trl_peak_gb']:>8.2f}"
              f"{x['memory_best']:>7.2f}x{x['memory_paired_median']:>7.2f}x{x['cpu_time_paired_median']:>6.2f}x")
    for method in sorted(failed):
        print(f"{method}: no ratio (a side failed; see above)")
    if s.json:
        write_json(s.json, {**info, "settings": {k: getattr(s, k) for k in ("steps", "rounds", "micro_batch",
                                                                            "seq_len", "precision")},
                            "summaries": summaries,
                            "runs": {m: [{"ours": without_log(o), "trl": without_log(t)} for o, t in runs[m]]
                                     for m in methods}})
        print(f"wrote {s.json}")


if __name__ == "__main__":
    main()
