"""Instruction fine-tuning of LLaMA models: recipes, data, training, merge/export and evaluation."""
