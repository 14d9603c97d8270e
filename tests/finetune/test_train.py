"""The `finetune` command end to end on tiny models: smoke runs, resume, accumulation, adapters, errors."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.inference import attach_adapter as load_adapter
from finetune.cli import main
from llama_core.weights import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = "the a of to and in is was for on with it be are have not but one two three".split()


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, 4)
        rows.append({"instruction": "Reverse the words.", "input": " ".join(words), "output": " ".join(words[::-1])})
    return rows


def _recipe(tmp_path, tokenizer, **sections) -> str:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in _rows(64)))
        (tmp_path / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(8, seed=1)))
    recipe = {
        "model": {"preset": "tiny"},
        "tokenizer": {"path": str(tokenizer.path)},
        "template": "plain",
        "datasets": [{"path": str(data)}],
        "data": {"max_seq_len": 256, "packing": True, "cache_dir": str(tmp_path / "cache"),
                 "validation": [{"path": str(tmp_path / "valid.jsonl")}]},
        "training": {"method": "full", "max_steps": 4, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 1,
                     "precision": "fp32"},
        "logging": {"every_steps": 1, "tensorboard": False, "progress": False},
        "output_dir": str(tmp_path / "out"),
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(section, {}).update(values)
        else:
            recipe[section] = values
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _losses(out) -> dict[int, float]:
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {m["step"]: m["train_loss"] for m in lines if "train_loss" in m}


# The losses of a tiny 4-step run, pinned (CPU, fp32): a change that alters the numbers must say so here.
PINNED_LOSSES = {"full": [5.751993391248915, 5.579174303028681, 5.5132622246269705, 5.478499702785326],
                 "lora": [5.751993391248915, 5.723885314105308, 5.737709938942849, 5.734142358752265],
                 "lora-train-tokens": [5.751993391248915, 5.720700616705908, 5.731746639217342, 5.726110043733017]}


@pytest.mark.parametrize("method", ["full", "lora", "lora-train-tokens"])
def test_pinned_losses(tmp_path, tokenizer, method):
    recipe = _recipe(tmp_path, tokenizer, training={"method": method.partition("-")[0]},
                     lora={"r": 8, "target_modules": "all-linear", "dropout": 0.0,
                           "train_tokens": "auto" if method == "lora-train-tokens" else "none"})
    assert main(["--recipe", recipe]) == 0
    losses = _losses(tmp_path / "out")
    torch.testing.assert_close([losses[step] for step in (1, 2, 3, 4)], PINNED_LOSSES[method], rtol=1e-5, atol=0)


def test_full_finetune_smoke(tmp_path, tokenizer, hf_twin):
    recipe = _recipe(tmp_path, tokenizer, eval={"every_steps": 2, "generate_prompts": 2, "max_new_tokens": 4},
                     logging={"tensorboard": True})
    assert main(["--recipe", recipe]) == 0
    out = tmp_path / "out"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    for name in ("recipe.yaml", "tokenizer.model", "metrics.jsonl", "summary.json", "final/config.json",
                 "final/model.safetensors", "final/tokenizer.model", "final/template.yaml", "samples"):
        assert (out / name).exists(), name
    assert sorted(_losses(out)) == [1, 2, 3, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["val_loss"] > 0
    # The final model is an HF checkpoint that transformers loads with the same logits.
    ours = load_model(out / "final")
    from transformers import LlamaForCausalLM
    theirs = LlamaForCausalLM.from_pretrained(out / "final").eval()
    x = torch.randint(0, 320, (2, 10))
    torch.testing.assert_close(ours(x), theirs(x).logits, atol=1e-5, rtol=0)


def test_loss_falls_on_a_memorizable_batch(tmp_path, tokenizer):
    recipe = _recipe(tmp_path, tokenizer, data={"packing": False},
                     training={"max_steps": 30, "micro_batch_size": 64, "lr": 3e-3, "schedule": "constant",
                               "weight_decay": 0.0})
    assert main(["--recipe", recipe]) == 0
    losses = _losses(tmp_path / "out")
    assert losses[30] < 0.5 * losses[1], losses


def test_lora_adapter_loads_in_peft_and_transformers(tmp_path, tokenizer):
    recipe = _recipe(tmp_path, tokenizer, training={"method": "lora", "lr": 1e-2},
                     lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
    assert main(["--recipe", recipe]) == 0
    out = tmp_path / "out"
    assert (out / "final" / "adapter_config.json").exists() and (out / "final" / "adapter_model.safetensors").exists()
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    assert all(".lora_" in k or "trainable_tokens_delta" in k for k in adapter)
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in adapter.items())
    # lora.train_tokens: auto trains the rows of <s> and </s> (embedding and head): PEFT's trainable tokens
    assert sorted(k for k in adapter if "trainable_tokens" in k) == [
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta",
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(out / "base")

    from peft import PeftModel
    from transformers import LlamaForCausalLM
    hf = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(out / "base"), out / "final").eval()
    ours = load_adapter(load_model(out / "base"), out / "final").eval()
    x = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=x), hf(input_ids=x).logits, atol=1e-5, rtol=0)
        # ... and the adapter changes the output (it was trained)
        assert (LlamaForCausalLM.from_pretrained(out / "base")(x).logits - hf(input_ids=x).logits).abs().max() > 1e-4


def test_dora_smoke(tmp_path, tokenizer):
    recipe = _recipe(tmp_path, tokenizer, training={"method": "lora", "max_steps": 2},
                     lora={"dora": True, "target_modules": ["q_proj", "v_proj"]})
    assert main(["--recipe", recipe]) == 0
    config = json.loads((tmp_path / "out" / "final" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    adapter = load_file(tmp_path / "out" / "final" / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in k for k in adapter)


def _final_weights(out) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "final", "model.safetensors"))


def test_gradient_accumulation_equals_one_large_batch(tmp_path, tokenizer):
    # Unpacked rows of different lengths: micro-batches hold different numbers of trained tokens, so dividing
    # each micro-batch's mean by the number of micro-batches would not give this equality.
    common = dict(data={"packing": False}, eval={}, checkpoint={"every_steps": None})
    a = _recipe(tmp_path, tokenizer, training={"max_steps": 2, "micro_batch_size": 8,
                                               "gradient_accumulation_steps": 1}, output_dir=str(tmp_path / "a"),
                **common)
    assert main(["--recipe", a]) == 0
    b = _recipe(tmp_path, tokenizer, training={"max_steps": 2, "micro_batch_size": 2,
                                               "gradient_accumulation_steps": 4}, output_dir=str(tmp_path / "b"),
                **common)
    assert main(["--recipe", b]) == 0
    wa, wb = _final_weights(tmp_path / "a"), _final_weights(tmp_path / "b")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=2e-6, rtol=1e-5)
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert la[1] == pytest.approx(lb[1], abs=1e-6) and la[2] == pytest.approx(lb[2], abs=1e-6)


def _final_files(out, method) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "final", "model.safetensors" if method == "full" else
                                  "adapter_model.safetensors"))


KILL_DURING_SAVE = """
import os, signal, sys
import finetune.train as train
real = train.save_checkpoint
def save_checkpoint(root, step, write, *args, **kwargs):
    def write_then_die(path):
        write(path)
        if step == int(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGKILL)
    return real(root, step, write_then_die, *args, **kwargs)
train.save_checkpoint = save_checkpoint
from finetune.cli import main
main(["--recipe", sys.argv[2]])
"""


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_after_sigkill_is_bitwise_equal(tmp_path, tokenizer, method):
    # LoRA with dropout: the resumed run must also restore the random generators.
    steps = 60
    settings = dict(training={"max_steps": steps, "micro_batch_size": 4, "method": method},
                    lora={"dropout": 0.1, "target_modules": "all-linear"},
                    checkpoint={"every_steps": 5, "keep_last": 2})
    reference = _recipe(tmp_path, tokenizer, output_dir=str(tmp_path / "ref"), **settings)
    assert main(["--recipe", reference]) == 0
    expected = _losses(tmp_path / "ref")

    recipe = _recipe(tmp_path, tokenizer, output_dir=str(tmp_path / "run"), **settings)
    # The run kills itself with SIGKILL in the middle of writing the step-15 checkpoint (the engine's files
    # written, the folder not yet complete): the moment is fixed, whatever the machine's speed.
    result = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, "15", recipe], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == [".tmp-step-00000015", "step-00000005", "step-00000010"], checkpoints
    assert not (tmp_path / "run" / "final").exists()

    assert main(["--recipe", recipe]) == 0
    resumed = _losses(tmp_path / "run")
    assert sorted(resumed) == list(range(1, steps + 1))
    assert not (tmp_path / "run" / "checkpoints" / ".tmp-step-00000015").exists()  # the torn save is cleaned up
    for step in range(11, steps + 1):
        assert resumed[step] == expected[step], (step, resumed[step], expected[step])  # bitwise on CPU
    ref_w, run_w = _final_files(tmp_path / "ref", method), _final_files(tmp_path / "run", method)
    assert all(torch.equal(ref_w[k], run_w[k]) for k in ref_w)


def test_bad_recipe_exits_2_with_every_problem(tmp_path, tokenizer, capsys):
    recipe = _recipe(tmp_path, tokenizer, training={"lr": "fast", "micro_batch_sise": 2, "method": "qlora"})
    assert main(["--recipe", recipe, "lora.r=0"]) == 2
    err = capsys.readouterr().err
    assert "recipe.yaml" in err and "training.lr" in err and "expected a number" in err
    assert "training.micro_batch_sise" in err and "did you mean 'micro_batch_size'" in err
    assert "training.method" in err and "command line: lora.r" in err
    assert "Traceback" not in err


def test_bad_recipe_subprocess_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  preset: llama-8b\ntraining:\n  lr: [1\n")
    result = subprocess.run([sys.executable, "-m", "finetune", "--recipe", str(bad)], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "bad.yaml:5" in result.stderr or "bad.yaml:4" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss(tmp_path, tokenizer, capsys, monkeypatch, policy):
    from finetune.engine import LocalEngine

    calls = {"n": 0}
    real = LocalEngine.loss_sum

    def poisoned(self, batch):  # the third micro-batch (step 2 of 2-step accumulation) gives NaN
        calls["n"] += 1
        loss = real(self, batch)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(LocalEngine, "loss_sum", poisoned)
    recipe = _recipe(tmp_path, tokenizer, training={"max_steps": 3, "gradient_accumulation_steps": 2,
                                                    "nan_policy": policy})
    code = main(["--recipe", recipe])
    err = capsys.readouterr().err
    if policy == "stop":
        assert code == 1 and "at step 2" in err and "nan_policy" in err and "Traceback" not in err
        assert not (tmp_path / "out" / "final").exists()
    else:
        assert code == 0 and "step 2: loss is nan, update skipped" in err
        strict = dict(parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))  # NaN is written as null
        summary = json.loads((tmp_path / "out" / "summary.json").read_text(), **strict)
        assert summary["skipped_steps"] == 1 and summary["steps"] == 3
        lines = [json.loads(line, **strict) for line in open(tmp_path / "out" / "metrics.jsonl")]
        assert [m["train_loss"] is None for m in lines if m.get("train_loss", 0) is None] == [True]


def test_mmlu_instruct_recipe_end_to_end(tmp_path, monkeypatch):
    """The shipped LLaMA-I recipe on the quickstart's tiny model: instruction tuning, then MMLU 5-shot on the
    bundled sample (accuracy near chance; the pipeline is what is checked)."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "mmlu-instruct"
    code = main(["--recipe", "recipes/mmlu_instruct.yaml", "model.checkpoint=null", "model.preset=quickstart",
                 "tokenizer.path=data/quickstart/tokenizer.model", "distributed.backend=none",
                 "training.precision=fp32", "training.max_steps=3", "training.micro_batch_size=4",
                 "training.gradient_accumulation_steps=1", "training.activation_checkpointing=true",
                 "data.max_seq_len=256", "data.overlong=truncate_prompt", f"data.cache_dir={tmp_path / 'cache'}",
                 "eval.every_steps=null", "logging.tensorboard=false", f"output_dir={out}"])
    assert code == 0
    report = json.loads((out / "mmlu.json").read_text())
    assert set(report["categories"]) >= {"STEM", "humanities", "social sciences", "other"}
    assert 0 <= report["average"] <= 1 and report["shots"] == 5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mmlu_average"] == report["average"] and summary["steps"] == 3


def test_ctrl_c_saves_a_checkpoint_and_resumes(tmp_path, tokenizer):
    recipe = _recipe(tmp_path, tokenizer, training={"max_steps": 400, "micro_batch_size": 4},
                     checkpoint={"every_steps": 1000})
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "--recipe", recipe], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 120
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: saved" in err and "Traceback" not in err
    checkpoints = sorted((tmp_path / "out" / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and not (tmp_path / "out" / "final").exists()
    saved = int(checkpoints[0].name.split("-")[1])
    assert 3 <= saved < 400 and max(_losses(tmp_path / "out")) == saved
    assert main(["--recipe", recipe, "training.max_steps=" + str(saved + 2)]) == 0
    assert sorted(_losses(tmp_path / "out")) == list(range(1, saved + 3))


def test_qlora_on_cpu_is_a_clear_error(tmp_path, tokenizer, capsys):
    recipe = _recipe(tmp_path, tokenizer, training={"method": "lora", "quantize": "4bit"})
    assert main(["--recipe", recipe]) == 2
    assert "4bit (QLoRA) needs a CUDA GPU" in capsys.readouterr().err


def test_resuming_a_different_run_is_refused(tmp_path, tokenizer, capsys):
    recipe = _recipe(tmp_path, tokenizer, checkpoint={"every_steps": 2})
    assert main(["--recipe", recipe]) == 0
    assert main(["--recipe", recipe, "training.method=lora"]) == 2
    err = capsys.readouterr().err
    assert "belongs to a run with a different training.method" in err and "Traceback" not in err
    assert main(["--recipe", recipe, "training.max_steps=6"]) == 0  # more steps of the same run: fine
    assert max(_losses(tmp_path / "out")) == 6


def test_resume_edge_cases(tmp_path, tokenizer, capsys):
    recipe = _recipe(tmp_path, tokenizer, checkpoint={"every_steps": 2, "keep_last": 2})
    out = tmp_path / "out"
    assert main(["--recipe", recipe]) == 0
    metrics = (out / "metrics.jsonl").read_text()
    assert main(["--recipe", recipe]) == 0  # finished: nothing is trained, evaluated or logged again
    assert "holds a finished run of 4 steps: nothing to do" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == metrics
    assert main(["--recipe", recipe, "training.max_steps=2"]) == 2
    assert "is at step 4, past this recipe's 2 steps" in capsys.readouterr().err
    assert main(["--recipe", recipe, "training.max_steps=6", "training.weight_decay=0"]) == 2
    assert "different training.weight_decay" in capsys.readouterr().err
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train_lo')  # torn by a crash
    assert main(["--recipe", recipe, "training.max_steps=6", f"data.cache_dir={tmp_path / 'other-cache'}"]) == 0
    assert sorted(_losses(out)) == [1, 2, 3, 4, 5, 6]
    last = sorted((out / "checkpoints").glob("step-*"))[-1]
    damaged = next(p for p in last.iterdir() if p.suffix == ".safetensors")
    damaged.write_bytes(damaged.read_bytes()[:100])
    assert main(["--recipe", recipe, "training.max_steps=8"]) == 2
    err = capsys.readouterr().err
    assert f"{damaged}: damaged" in err and "delete it to resume from" in err and "step-00000004" in err


def test_trackers_and_the_loss_picture(tmp_path, tokenizer, monkeypatch):
    """logging.report_to reaches the trackers (MLflow here, offline into a local store), and every run ends with
    OUT/loss.png."""
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    recipe = _recipe(tmp_path, tokenizer, training={"max_steps": 3},
                     logging={"report_to": ["mlflow"], "tensorboard": False})
    assert main(["--recipe", recipe]) == 0
    out = tmp_path / "out"
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    run_id = (out / "mlflow_run_id.txt").read_text().strip()
    client = mlflow.tracking.MlflowClient()
    history = client.get_metric_history(run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3] and client.get_run(run_id).info.status == "FINISHED"
    assert client.get_run(run_id).data.params["training.max_steps"] == "3"
    assert not (out / "tensorboard").exists()  # tensorboard: false drops it from report_to


def test_resume_refuses_edited_data(tmp_path, tokenizer, capsys):
    recipe = _recipe(tmp_path, tokenizer, training={"max_steps": 4}, checkpoint={"every_steps": 2})
    assert main(["--recipe", recipe, "training.max_steps=2"]) == 0
    data = tmp_path / "train.jsonl"
    rows = data.read_text().splitlines()
    data.write_text("\n".join(rows[:-1] + [rows[-1].replace("Reverse", "Invert")]) + "\n")  # one row edited
    capsys.readouterr()
    assert main(["--recipe", recipe]) == 2
    err = capsys.readouterr().err
    assert "the training data changed since" in err and "checkpoint.allow_data_change" in err
    assert main(["--recipe", recipe, "checkpoint.allow_data_change=true"]) == 0
    assert "WARNING: the training data changed" in capsys.readouterr().err
    assert sorted(_losses(tmp_path / "out")) == [1, 2, 3, 4]
