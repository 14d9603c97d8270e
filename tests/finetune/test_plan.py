"""`finetune plan`: memory per GPU agrees with DeepSpeed's own estimators for the model states."""
from __future__ import annotations

import os

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from finetune.cli import main
from finetune.plan import count_parameters, memory_plan
from finetune.recipe import load_recipe
from llama_core.config import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _recipe(*overrides):
    return load_recipe(os.path.join(ROOT, "recipes", "llama7b_full_zero3.yaml"), list(overrides), check_paths=False)


@pytest.mark.parametrize("offload_optimizer,offload_params", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("nproc,nodes", [(8, 1), (4, 2)])
def test_zero3_model_states_match_deepspeed(offload_optimizer, offload_params, nproc, nodes):
    recipe = _recipe(f"distributed.offload_optimizer={str(offload_optimizer).lower()}",
                     f"distributed.offload_params={str(offload_params).lower()}")
    config = get_config("llama-7b")
    plan = memory_plan(recipe, config, nproc, nodes)
    total, largest = count_parameters(config)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, nproc, nodes, cpu_offload=offload_optimizer,
                                                        cpu_offload_params=offload_params, zero_init=True)
    assert plan["weights"] + plan["gradients"] + plan["optimizer"] == pytest.approx(gpu, abs=2)
    assert plan["cpu_per_node"] == pytest.approx(cpu, abs=2)


@pytest.mark.parametrize("offload_optimizer", [False, True])
def test_zero2_model_states_match_deepspeed(offload_optimizer):
    recipe = _recipe("distributed.zero_stage=2", f"distributed.offload_optimizer={str(offload_optimizer).lower()}")
    config = get_config("llama-13b")
    plan = memory_plan(recipe, config, 8)
    cpu, gpu = estimate_zero2_model_states_mem_needs(count_parameters(config)[0], 8, 1, cpu_offload=offload_optimizer)
    assert plan["weights"] + plan["gradients"] + plan["optimizer"] == pytest.approx(gpu, abs=2)
    assert plan["cpu_per_node"] == pytest.approx(cpu, abs=2)


def test_parameter_count_and_activation_checkpointing():
    config = get_config("llama-7b")
    total, largest = count_parameters(config)
    assert total == 6_738_415_616 and largest == 32000 * 4096  # the embedding (and the output head) are largest
    with_ckpt = memory_plan(_recipe(), config, 8)["activations"]
    without = memory_plan(_recipe("training.activation_checkpointing=false"), config, 8)["activations"]
    assert with_ckpt < without / 5


def test_plan_command(capsys):
    recipe = os.path.join(ROOT, "recipes", "llama7b_full_zero3.yaml")
    assert main(["plan", "--recipe", recipe, "--nproc", "8", "--gpu-mem", "80GB"]) == 2  # no checkpoint here
    assert "--preset" in capsys.readouterr().err
    assert main(["plan", "--recipe", recipe, "--preset", "llama-7b", "--nproc", "8", "--gpu-mem", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "6.74B parameters" in out and "ZeRO stage 3 on 8 GPU(s)" in out and "fits in 80GB (74.5 GiB) per GPU" in out
    assert main(["plan", "--recipe", recipe, "--preset", "llama-7b", "--nproc", "1", "--gpu-mem", "24GB"]) == 1
    assert "does NOT fit" in capsys.readouterr().out


def test_lora_base_weights_follow_precision_and_quantization():
    config = get_config("llama-7b")
    lora = ["training.method=lora", "distributed.backend=none"]
    total = count_parameters(config)[0]
    assert memory_plan(_recipe(*lora, "training.precision=bf16"), config, 1)["weights"] == 2 * total
    assert memory_plan(_recipe(*lora, "training.precision=fp32"), config, 1)["weights"] == 4 * total
    nf4 = memory_plan(_recipe(*lora, "training.quantize=4bit"), config, 1)["weights"]
    assert 0.55 * total < nf4 < 0.65 * total  # NF4 linear layers, 16-bit embeddings and head


def test_plan_and_launch_argument_errors(capsys, tmp_path):
    recipe = os.path.join(ROOT, "recipes", "llama7b_full_zero3.yaml")
    cases = [(["plan", "--recipe", recipe, "--preset", "llama-7b", "--gpu-mem", "lots"], "--gpu-mem: invalid size"),
             (["plan", "--recipe", recipe, "--preset", "llama-7b", "--nproc", "0"], "--nproc and --nodes must be >= 1"),
             (["launch", "--nproc-per-node", "0", "--recipe", recipe], "--nproc-per-node must be >= 1"),
             (["launch", "--nproc-per-node", "2", "--num-nodes", "2", "--recipe", recipe], "needs --hostfile"),
             (["launch", "--nproc-per-node", "2", "--hostfile", str(tmp_path / "hosts"), "--recipe", recipe],
              "hosts: no such file")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
