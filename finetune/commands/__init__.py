"""The `finetune` command line: one module per command, each with `main(argv) -> int`.

Commands sit on top of the library (`finetune.*`, `llama_core.*`) and are never imported by it: they parse
arguments, call the library and print. `finetune.cli` imports a command's module only when it runs (start-up time).
"""

COMMANDS = {
    "train": "fine-tune as a recipe describes (the default: `finetune --recipe R.yaml`)",
    "validate": "check a recipe and report every problem",
    "preprocess": "show how a recipe's data is templated, masked and packed",
    "merge": "merge a LoRA adapter into its base model",
    "export": "convert a checkpoint between layouts (HF, Meta) or to GGUF for llama.cpp",
    "eval": "MMLU k-shot accuracy, or loss over a dataset",
    "generate": "complete prompts with a model",
    "chat": "chat with a model in its template",
    "launch": "start a DeepSpeed run on one machine or several",
    "plan": "parameters and per-GPU memory of a recipe",
    "serve": "an OpenAI-compatible HTTP server for a model",
    "plot": "loss curves of one run or several",
}
