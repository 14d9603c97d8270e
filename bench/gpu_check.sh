#!/usr/bin/env bash
# Everything only a GPU can show, in one run of at most 8 minutes on one H100/H200, offline, random weights only.
#
#   bash bench/gpu_check.sh             on the GPU machine (first, here: bash bench/prepare_gpu_wheels.sh, and carry .whl)
#   bash bench/gpu_check.sh --dry-run   on CPU (CI): every step wired, nothing run on a GPU, under a minute
#
# Steps, each timed and bounded, a failure recorded and the next one run all the same:
#   install      the wheels in .whl/ (deepspeed, datasets, trl, bitsandbytes, liger-kernel...) into /tmp/site
#   environment  GPU, driver, torch, triton, transformers, peft, deepspeed... versions
#   pytest-gpu   python -m pytest -m gpu: Triton kernels, fused LoRA, QLoRA, packed attention, bf16 autocast
#   triton       tests/llama_core/test_triton_kernels.py's tests not marked gpu (they run on CUDA when there is one)
#   deepspeed    a ZeRO-3 one-GPU run of a few steps through `finetune launch`, then final/ loaded and checked
#   attention    python -m llama_core.packed_attention --bench: varlen vs flex vs the dense mask
#   bench-full, bench-lora   bench/bench_gpu.py: ours vs transformers (+ PEFT) vs Liger, Llama-3.2-1B shapes
# Results: $OUT/gpu_check.md (summary), $OUT/gpu_check.log (everything), $OUT/*.json and *.xml (when OUT is set),
# and the summary appended to bench/RESULTS-gpu.md. Exit status 1 when any step failed.
# GPU_CHECK_STEPS="pytest-gpu attention" runs only those steps (install and environment always run), for a rerun;
# GPU_CHECK_BUDGET_S (default 470) bounds the whole run: a step that would start later is recorded as not run.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
    "") ;;
    --dry-run) DRY=1 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    *) echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

export ROOT=$PWD DRY
export PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export WORK
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
export RES=${OUT:-$WORK}  # what comes back from the device machine: at most 8 files
mkdir -p "$RES"
LOG=$RES/gpu_check.log
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}  # the whole run, install included: 8 minutes less a margin
START=$SECONDS
FAILED=0
ROWS=()
: > "$LOG"

# The benchmark's arguments: Llama-3.2-1B shapes, 4 rows of 2048 packed tokens, bf16, a fixed number of steps.
BENCH_COMMON=(--preset llama3.2-1b --batch 4 --seq 2048 --packed --steps 8)
export BENCH_FULL="${BENCH_COMMON[*]} --method full --results $WORK/bench-full.md --json $RES/bench_full.json"
export BENCH_LORA="${BENCH_COMMON[*]} --method lora --results $WORK/bench-lora.md --json $RES/bench_lora.json"
# Llama-3.2-1B's attention: 32 query heads, 8 key/value heads, head size 64.
export ATTENTION_ARGS="--batch 4 --seq 2048 --heads 32 --kv-heads 8 --head-dim 64 --doc-len 256 --iters 20"

# step NAME LIMIT_S FUNCTION: run the function under `timeout` (its whole process group), output to the log and to
# $WORK/NAME.out, and record the result, the seconds and the function's one-line note ($WORK/NAME.note).
step() {
    local name=$1 limit=$2 fn=$3 rc=0 t0=$SECONDS left
    if [[ -n ${GPU_CHECK_STEPS:-} && $name != install && $name != environment \
          && " $GPU_CHECK_STEPS " != *" $name "* ]]; then
        ROWS+=("| $name | skipped | 0 | not in GPU_CHECK_STEPS |")
        return
    fi
    left=$((BUDGET_S - (SECONDS - START)))
    if ((left < 15)); then
        ROWS+=("| $name | not run | 0 | out of time (the run is held to ${BUDGET_S} s) |")
        FAILED=1
        echo "[not run] $name: out of time"
        return
    fi
    ((limit <= left)) || limit=$left
    echo "=== $name (at most ${limit} s)" >> "$LOG"
    timeout --kill-after=10 "$limit" bash -o pipefail -c "$fn" > "$WORK/$name.out" 2>&1 || rc=$?
    cat "$WORK/$name.out" >> "$LOG"
    local seconds=$((SECONDS - t0)) note result=ok
    if [[ -f $WORK/$name.note ]]; then  # the step's own one-line note, else its output's last line
        note=$(head -c 600 "$WORK/$name.note" | tr '\n|' ' /')
    else
        note=$(grep -v '^[[:space:]]*$' "$WORK/$name.out" | tail -n 1 | head -c 300 | tr '|' '/' || true)
    fi
    if ((rc == 124 || rc == 137)); then
        result=FAILED note="timed out after ${limit} s${note:+; $note}"
    elif ((rc != 0)); then
        result=FAILED note="exit $rc${note:+; $note}"
    fi
    ROWS+=("| $name | $result | $seconds | $note |")
    echo "[$result] $name (${seconds} s) $note"
    if [[ $result != ok ]]; then
        FAILED=1
        tail -n 15 "$WORK/$name.out" | sed 's/^/    /'
    fi
}

# --- the steps (functions run by `bash -c`, so exported) ---

note() { [[ -z $* ]] || echo "$*" > "$WORK/$STEP.note"; }  # the step's one-line note in the summary

do_install() {
    STEP=install
    if ! compgen -G ".whl/*.whl" > /dev/null; then
        note "no .whl/: run bash bench/prepare_gpu_wheels.sh where pip works, and carry .whl"
        return 1
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { note "pip install failed: nothing carried is installed"; return 1; }
    note "$(ls .whl/*.whl | wc -l) wheels into /tmp/site"
}

do_environment() {
    STEP=environment
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -n 1 > "$WORK/gpu.txt"
    fi
    "$PY" - <<'PY'
import importlib.metadata as md, os, platform
import torch
names = ["torch", "triton", "transformers", "peft", "accelerate", "deepspeed", "datasets", "trl", "bitsandbytes",
         "liger-kernel", "huggingface-hub", "safetensors", "tokenizers", "numpy", "pyarrow", "fsspec", "pydantic",
         "typing-extensions"]
versions = {}
for name in names:
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = "missing"
print(f"python {platform.python_version()}; torch cuda {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB; bf16 {torch.cuda.is_bf16_supported()}")
for name, version in versions.items():
    print(f"{name} {version}")
from llama_core import packed_attention
print("packed attention:", ", ".join(f"{i} {'available' if packed_attention.available(i) else 'missing'}"
                                      for i in packed_attention.IMPLS), "|", packed_attention._signature())
shown = ("torch", "triton", "transformers", "peft", "deepspeed", "bitsandbytes", "liger-kernel")
with open(os.path.join(os.environ["WORK"], "versions.txt"), "w") as f:
    f.write(", ".join(f"{n} {versions[n]}" for n in shown))
with open(os.path.join(os.environ["WORK"], "environment.note"), "w") as f:
    f.write(", ".join(f"{n} {versions[n]}" for n in names[5:10]))
PY
}

do_pytest_gpu() {
    STEP=pytest-gpu
    local rc=0
    # Only the files that mark tests gpu are collected (collecting the whole suite costs a dry run 15 s).
    local files
    files=$(grep -rlE --include='*.py' 'mark\.gpu\b' tests | sort)
    if [[ -z $files ]]; then
        note "no test is marked gpu"
        return 1
    fi
    if ((DRY)); then  # on CPU: the gpu tests are collected and every one skips
        "$PY" -m pytest -q -m gpu -p no:cacheprovider -rs $files | tee "$WORK/pytest.txt" || rc=$?
        note "$(tail -n 1 "$WORK/pytest.txt")"
        ((rc == 0)) || return $rc
        grep -Eq "[0-9]+ skipped" "$WORK/pytest.txt" || { note "no gpu-marked tests collected"; return 1; }
        ! grep -Eq "[0-9]+ (passed|failed|error)" "$WORK/pytest.txt" \
            || { note "a gpu-marked test ran without a GPU: $(tail -n 1 "$WORK/pytest.txt")"; return 1; }
        return 0
    fi
    "$PY" -m pytest -q -m gpu -p no:cacheprovider -rfEsP --junitxml="$RES/pytest_gpu.xml" $files \
        | tee "$WORK/pytest.txt" || rc=$?
    note "$(tail -n 1 "$WORK/pytest.txt")"
    return $rc
}

do_triton() {
    STEP=triton
    local rc=0
    # The kernel tests not (yet) marked gpu; exit status 5 is "none selected": all marked, run by pytest-gpu.
    "$PY" -m pytest -q -m "not gpu" -p no:cacheprovider -rfEs tests/llama_core/test_triton_kernels.py \
        | tee "$WORK/triton.txt" || rc=$?
    if ((rc == 5)); then
        note "all marked gpu (run in pytest-gpu)"
        return 0
    fi
    note "$(tail -n 1 "$WORK/triton.txt")"
    return $rc
}

write_recipe() {  # a tiny full fine-tuning under DeepSpeed ZeRO-3, bf16, on the quickstart data
    cat > "$WORK/zero3.yaml" <<EOF
model:
  preset: quickstart
tokenizer:
  path: data/quickstart/tokenizer.model
template: recipes/templates/quickstart.yaml
datasets:
  - path: data/quickstart/train.jsonl
    format: alpaca
    max_samples: 400
data:
  max_seq_len: 256
  packing: true
  cache_dir: $WORK/data-cache
training:
  method: full
  max_steps: 4
  micro_batch_size: 4
  lr: 1.0e-3
  precision: bf16
  seed: 1
distributed:
  backend: deepspeed
  zero_stage: 3
checkpoint:
  every_steps: 2
  keep_last: 1
logging:
  every_steps: 1
  tensorboard: false
output_dir: $WORK/zero3-run
EOF
}

do_deepspeed() {
    STEP=deepspeed
    write_recipe
    if ((DRY)); then
        "$PY" -m finetune validate --recipe "$WORK/zero3.yaml" && note "recipe valid" && return 0
        note "the smoke recipe does not validate"
        return 1
    fi
    local port
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$PY" -m finetune launch --nproc-per-node 1 --master-port "$port" --recipe "$WORK/zero3.yaml" \
        || { note "finetune launch failed"; return 1; }
    # The consolidated save: loads in transformers and in ours, same logits, finite losses for every step.
    "$PY" - "$WORK/zero3-run" <<'PY'
import json, os, sys
from pathlib import Path
import torch
from transformers import LlamaForCausalLM
from llama_core.config import get_config
from llama_core.model import Transformer
from llama_core.weights import load_model

run = Path(sys.argv[1])
final = run / "final"
config = json.loads((final / "config.json").read_text())
assert config["architectures"] == ["LlamaForCausalLM"], config
hf = LlamaForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
with torch.device("meta"):
    expected = sum(p.numel() for p in Transformer(get_config("quickstart")).parameters())
count = sum(p.numel() for p in hf.parameters())
assert count == expected, f"final/ holds {count} parameter values, the preset {expected}"
ours = load_model(final)
x = torch.randint(0, ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    theirs, mine = hf(x).logits, ours(x)
assert torch.isfinite(theirs).all()
torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
losses = {}
for line in (run / "metrics.jsonl").read_text().splitlines():
    m = json.loads(line)
    if "train_loss" in m:
        losses[m["step"]] = m["train_loss"]
assert sorted(losses) == [1, 2, 3, 4] and all(map(lambda v: v == v and abs(v) < 1e4, losses.values())), losses
note = f"ZeRO-3 bf16, 4 steps, loss {losses[1]:.3f} -> {losses[4]:.3f}; final/ ({config.get('torch_dtype')}) " \
       f"loads in transformers and ours, same logits"
print(note)
open(os.path.join(os.environ["WORK"], "deepspeed.note"), "w").write(note)
PY
}

do_attention() {
    STEP=attention
    if ((DRY)); then
        "$PY" -m llama_core.packed_attention --bench --dry-run $ATTENTION_ARGS
        return
    fi
    local rc=0
    "$PY" -m llama_core.packed_attention --bench $ATTENTION_ARGS --json "$RES/packed_attention.json" || rc=$?
    note "$(grep '^fastest' "$WORK/attention.out" 2> /dev/null || true)"
    return $rc
}

do_bench() {  # do_bench full|lora
    STEP=bench-$1
    local args
    [[ $1 == full ]] && args=$BENCH_FULL || args=$BENCH_LORA
    if ((DRY)); then
        local usage
        usage=$("$PY" bench/bench_gpu.py --help) || { note "bench_gpu.py --help fails"; return 1; }
        if ! grep -q -- --check-args <<< "$usage"; then
            note "bench_gpu.py has no --check-args (parse and check the arguments, exit 0 without a GPU): not checked"
            return 1
        fi
        "$PY" bench/bench_gpu.py --check-args $args
        return
    fi
    "$PY" bench/bench_gpu.py $args
}

export -f note do_install do_environment do_pytest_gpu do_triton write_recipe do_deepspeed do_attention do_bench

# --- the run ---

if ((DRY)); then
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    step self 10 'bash -n bench/gpu_check.sh && bash -n bench/prepare_gpu_wheels.sh && echo "bash -n: ok"'
    step wheels 20 'bash bench/prepare_gpu_wheels.sh --check'
else
    step install 60 do_install
    export PYTHONPATH=/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
step environment 40 do_environment
step pytest-gpu 150 do_pytest_gpu
((DRY)) || step triton 60 do_triton
step deepspeed 100 do_deepspeed
step attention 60 do_attention
step bench-full 110 'do_bench full'
step bench-lora 90 'do_bench lora'

# --- the summary ---

gpu=$(cat "$WORK/gpu.txt" 2> /dev/null || echo "no GPU")
versions=$(cat "$WORK/versions.txt" 2> /dev/null || echo "versions unknown")
{
    echo
    echo "## $(date -u '+%Y-%m-%d %H:%M UTC'): bench/gpu_check.sh$( ((DRY)) && echo ' --dry-run')"
    echo
    echo "$gpu; $versions. $((SECONDS - START)) s in all."
    echo
    echo "| step | result | seconds | notes |"
    echo "| --- | --- | --- | --- |"
    printf '%s\n' "${ROWS[@]}"
    for name in attention bench-full bench-lora; do
        figures=$WORK/$name.out
        [[ $name == bench-* ]] && figures=$WORK/$name.md
        if ((!DRY)) && [[ -s $figures ]]; then
            echo
            echo "### $name"
            echo
            if [[ $name == attention ]]; then grep -E '^(packed|\||fastest)' "$figures"; else cat "$figures"; fi
        fi
    done
} > "$WORK/summary.md"
[[ $RES == "$WORK" ]] || cp "$WORK/summary.md" "$RES/gpu_check.md"
cat "$WORK/summary.md" >> "$LOG"
if ((!DRY)); then
    [[ -f bench/RESULTS-gpu.md ]] || printf '# GPU results\n\nWritten by bench/gpu_check.sh, newest last.\n' \
        > bench/RESULTS-gpu.md
    cat "$WORK/summary.md" >> bench/RESULTS-gpu.md
fi
cat "$WORK/summary.md"
if ((DRY)) && [[ $RES == "$WORK" ]]; then
    rm -rf "$WORK"  # a CI run leaves nothing behind
else
    echo
    echo "log: $LOG"
fi
exit $FAILED
