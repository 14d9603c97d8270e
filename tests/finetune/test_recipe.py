"""Recipe loading and validation: every problem at once, with its key, file and line; overrides; shipped recipes."""
from __future__ import annotations

import glob
import json
import os

import pytest

from finetune.cli import main
from finetune.recipe import RecipeError, dump_recipe, load_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GOOD = """\
model:
  preset: tiny
tokenizer:
  path: {tok}
datasets:
  - path: {data}
training:
  method: lora
  lr: 2e-4
output_dir: {out}
"""


@pytest.fixture
def files(tmp_path, tokenizer):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    return {"tok": tokenizer.path, "data": data, "out": tmp_path / "out"}


def _write(tmp_path, text: str, **files) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(text.format(**files))
    return str(path)


def test_defaults_follow_the_paper(tmp_path, files):
    r = load_recipe(_write(tmp_path, GOOD, **files))
    t = r.training
    assert t.betas == [0.9, 0.95] and t.weight_decay == 0.1 and t.grad_clip == 1.0
    assert t.schedule == "cosine" and t.min_lr_ratio == 0.1
    assert t.lr == 2e-4  # "2e-4" is a string in YAML 1.1; a float field accepts it


def test_every_problem_is_reported_with_key_file_and_line(tmp_path, files):
    text = GOOD.replace("  lr: 2e-4\n", "  lr: fast\n  method: lorra\n  micro_batch_sise: 2\n  epochs: -1\n")
    text = text.replace("  method: lora\n", "")
    path = _write(tmp_path, text + "lora:\n  target_modules: [q_proj, lm_head, qproj]\n", **files)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert "r.yaml: 6 problems:" in msg, msg
    assert "r.yaml:8: training.lr: expected a number, got str 'fast'" in msg
    assert "r.yaml:9: training.method: 'lorra' is not one of 'full', 'lora' (did you mean 'lora'?)" in msg
    assert "r.yaml:10: training.micro_batch_sise: unknown key; did you mean 'micro_batch_size'?" in msg
    assert "r.yaml:11: training.epochs: must be > 0, got -1.0" in msg
    assert "lora.target_modules[1]: 'lm_head' is not a LoRA target (the output head" in msg
    assert "lora.target_modules[2]: 'qproj' is not a LoRA target; did you mean 'q_proj'?" in msg


def test_duplicate_keys_are_errors(tmp_path, files):
    with pytest.raises(RecipeError, match=r"r.yaml:11: training: duplicate key \(first at line 7\)"):
        load_recipe(_write(tmp_path, GOOD + "training:\n  lr: 1.0e-3\n", **files))


def test_unknown_keys_wrong_types_ranges(tmp_path, files):
    text = GOOD + "data:\n  max_seq_lenght: 512\n  packing: yes please\nlogging:\n  every_steps: 0\n"
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, text, **files))
    msg = str(e.value)
    assert "data.max_seq_lenght: unknown key; did you mean 'max_seq_len'?" in msg
    assert "data.packing: expected true or false" in msg
    assert "logging.every_steps: must be >= 1, got 0" in msg


def test_missing_files_and_model_rules(tmp_path, files):
    text = GOOD.replace("preset: tiny", "preset: llama-8b\n  checkpoint: /nope") \
        .replace("path: {data}", "path: ./missing.jsonl")
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, text, **files))
    msg = str(e.value)
    assert "model.checkpoint: folder not found: '/nope'" in msg
    assert "datasets[0].path: file not found: './missing.jsonl'" in msg


def test_unknown_preset_lists_valid_ones(tmp_path, files):
    with pytest.raises(RecipeError, match="unknown preset 'llama-8b'; did you mean 'llama-7b'.*llama-13b"):
        load_recipe(_write(tmp_path, GOOD.replace("preset: tiny", "preset: llama-8b"), **files))


def test_overrides_are_typed_like_yaml(tmp_path, files):
    path = _write(tmp_path, GOOD, **files)
    r = load_recipe(path, ["training.lr=2e-5", "lora.r=16", "lora.target_modules=[q_proj,k_proj]",
                           "data.packing=false", "eval.every_steps=5", "data.val_fraction=0.1"])
    assert (r.training.lr, r.lora.r, r.lora.target_modules, r.data.packing) == (2e-5, 16, ["q_proj", "k_proj"], False)
    with pytest.raises(RecipeError) as e:
        load_recipe(path, ["lora.r=sixteen", "nonsense", "training.lr.x=1"])
    msg = str(e.value)
    assert "command line: lora.r: expected an integer" in msg
    assert "'nonsense': overrides look like section.key=value" in msg
    assert "training.lr is not a section" in msg


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  preset: tiny\n training: [\n")
    with pytest.raises(RecipeError, match=r"bad.yaml:3: not valid YAML"):
        load_recipe(str(path))


def test_deepspeed_file_conflicts_are_validation_errors(tmp_path, files):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": "auto",
                              "zero_optimization": {"stage": 2, "overlap_comm": True}, "scheduler": {}}))
    text = GOOD + f"distributed:\n  backend: deepspeed\n  zero_stage: 3\n  config_file: {ds}\n"
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, text, **files))
    msg = str(e.value)
    assert "train_micro_batch_size_per_gpu is 8 but the recipe's training.micro_batch_size gives 4" in msg
    assert "zero_optimization.stage is 2 but the recipe's distributed.zero_stage gives 3" in msg
    assert "scheduler" in msg and "gradient_accumulation_steps" not in msg  # "auto" is filled in, not a conflict
    from finetune.ds_config import deepspeed_config
    ds.write_text(json.dumps({"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 1000}}))
    r = load_recipe(_write(tmp_path, text, **files))
    merged = deepspeed_config(r, "fp32", world_size=2)
    assert merged["zero_optimization"]["reduce_bucket_size"] == 1000 and merged["zero_optimization"]["stage"] == 3
    assert merged["train_batch_size"] == 8 and merged["gradient_clipping"] == 1.0


def test_validate_and_print_config_commands(tmp_path, files, capsys):
    path = _write(tmp_path, GOOD, **files)
    assert main(["validate", "--recipe", path, "--print-config", "lora.r=4"]) == 0
    out = capsys.readouterr().out
    assert "r: 4" in out and out.rstrip().endswith("ok")
    assert main(["validate", "--recipe", str(tmp_path / "none.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err


def test_dump_round_trips(tmp_path, files):
    text = GOOD + "data:\n  validation:\n    - path: {data}\n      columns: {{output: answer}}\n"
    r = load_recipe(_write(tmp_path, text, **files))
    again = tmp_path / "again.yaml"
    again.write_text(dump_recipe(r))
    loaded = load_recipe(str(again))
    assert loaded.source != r.source
    loaded.source = r.source
    assert loaded == r and loaded.data.validation[0].columns == {"output": "answer"}


def test_hub_ids_validate_and_missing_local_paths_do_not(tmp_path, files):
    for hub_id in ("tatsu-lab/alpaca", "alpaca"):
        assert load_recipe(_write(tmp_path, GOOD, **files), [f"datasets[0].path={hub_id}"]).datasets[0].path == hub_id
    for local in ("./x", "x.jsonl", "a/b/c", "~/surely-not-here.jsonl"):
        with pytest.raises(RecipeError, match=r"command line: datasets\[0\]\.path: file not found"):
            load_recipe(_write(tmp_path, GOOD, **files), [f"datasets[0].path={local}"])


def test_list_items_and_new_sections_can_be_overridden(tmp_path, files):
    r = load_recipe(_write(tmp_path, GOOD, **files), ["datasets[0].weight=2", "eval.max_batches=3"])
    assert r.datasets[0].weight == 2.0 and r.eval.max_batches == 3
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, GOOD, **files), ["datasets[1].weight=2", "trainig.lr=1"])
    assert "datasets has 1 items" in str(e.value) and "command line: trainig: unknown key" in str(e.value)


def test_no_follow_on_errors_and_values_checked_before_training(tmp_path, files):
    path = _write(tmp_path, GOOD, **files)
    with pytest.raises(RecipeError) as e:
        load_recipe(path, ["tokenizer.path=nope.model", "model.config.dim=100", "training.epochs=.inf",
                           f"output_dir={files['data']}", "datasets[0].columns={instrucion: q, output: 5}"])
    msg = str(e.value)
    assert "6 problems" in msg and "not found: 'nope.model'" in msg, msg
    assert "a preset model needs tokenizer.path" not in msg
    assert "model.config: invalid model config" in msg and "expected a finite number, got inf" in msg
    assert "output_dir must be a folder" in msg and "columns.instrucion: not a field of the 'alpaca' format" in msg
    assert "columns.output: expected a column name, got int 5" in msg


def test_unreadable_recipe_and_template_files(tmp_path, files, capsys):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"model:\n  preset: caf\xe9\n")
    assert main(["validate", "--recipe", str(latin1)]) == 2
    assert "latin1.yaml:2: not UTF-8 text" in capsys.readouterr().err
    assert main(["validate", "--recipe", str(tmp_path)]) == 2
    assert "is a folder, not a recipe file" in capsys.readouterr().err
    template = tmp_path / "t.yaml"
    template.write_text('name: t\nuser: "{content} {input}"\nassistant: "{content}"\nname: again\n')
    with pytest.raises(RecipeError, match=r"template file .*t\.yaml: invalid template:\n  line 4: name: duplicate"):
        load_recipe(_write(tmp_path, GOOD, **files), [f"template={template}"])
    template.write_text('name: t\nuser: "{content} {input}"\nassistant: "{content}"\n')
    with pytest.raises(RecipeError, match=r"line 2: 'user' cannot use \{input\} \(only 'user_with_input'"):
        load_recipe(_write(tmp_path, GOOD, **files), [f"template={template}"])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml"))),
                         ids=os.path.basename)
def test_every_shipped_recipe_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    # Recipes that start from a downloaded checkpoint (or the quickstart's output) cannot find it here: their
    # files are checked only where they ship with the project.
    recipe = load_recipe(path, check_paths=os.path.basename(path) == "quickstart.yaml")
    assert recipe.output_dir and recipe.datasets


def test_keys_of_other_tools_are_answered_with_ours(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {preset: tiny}\nlearning_rate: 2.0e-4\ntraining:\n  learning_rate: 2.0e-4\n"
                      "  num_epochs: 3\n  gradient_checkpointing: true\nlora_r: 16\ndata: {sequence_len: 512}\n")
    assert main(["validate", "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    for line in ("r.yaml:2: learning_rate: unknown key; this recipe calls it 'training.lr'",
                 "r.yaml:4: training.learning_rate: unknown key; this recipe calls it 'training.lr'",
                 "r.yaml:5: training.num_epochs: unknown key; this recipe calls it 'training.epochs'",
                 "training.gradient_checkpointing: unknown key; this recipe calls it 'training.activation_checkpointing'",
                 "r.yaml:7: lora_r: unknown key; this recipe calls it 'lora.r'",
                 "data.sequence_len: unknown key; this recipe calls it 'data.max_seq_len'"):
        assert line in err, (line, err)


def test_overrides_before_and_after_the_flags(tmp_path, capsys):
    recipe = os.path.join(ROOT, "recipes", "quickstart.yaml")
    out = f"output_dir={tmp_path / 'out'}"
    assert main(["validate", "--recipe", recipe, "training.lr=1e-3", "--print-config", "training.max_steps=2",
                 out]) == 0
    printed = capsys.readouterr().out
    assert "max_steps: 2" in printed and "lr: 0.001" in printed


def test_a_key_of_the_wrong_type_is_one_problem(capsys):
    recipe = os.path.join(ROOT, "recipes", "quickstart.yaml")
    assert main(["validate", "--recipe", recipe, "training.betas=0.9"]) == 2
    err = capsys.readouterr().err
    assert "1 problem:" in err and "training.betas: expected a list, got float 0.9" in err, err
