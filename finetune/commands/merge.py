"""`finetune merge --adapter OUT/final --output MERGED/`: a LoRA adapter merged into its base, checked on a probe."""
from __future__ import annotations

from .common import parser


def size_text(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def main(argv: list[str]) -> int:
    p = parser("finetune merge", "Merge a LoRA adapter into its base model and write a Hugging Face checkpoint.")
    p.add_argument("--adapter", required=True, help="the adapter folder (a run's OUT/final)")
    p.add_argument("--output", required=True, help="the folder to write")
    p.add_argument("--base", help="the base checkpoint (default: adapter_config.json's base_model_name_or_path)")
    p.add_argument("--shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="default: the base's dtype")
    p.add_argument("--template", help="chat template to embed (default: the adapter's template.yaml)")
    p.add_argument("--dequantize", action="store_true", help="allow a base whose config declares quantization")
    p.add_argument("--overwrite", action="store_true",
                   help="--output may be an existing folder that is not a checkpoint: the files are written beside "
                        "the ones there (none of which is replaced or deleted)")
    a = p.parse_args(argv)
    from ..merge import merge

    r = merge(a.adapter, a.output, base=a.base, dtype=a.dtype, max_shard_size=a.shard_size, template=a.template,
              dequantize=a.dequantize, overwrite=a.overwrite)
    print(f"merged {a.adapter} into {r['base']} ({r['dtype']}); probe check passed: max logit difference "
          f"{r['probe_max_diff']:.2e} <= {r['probe_tolerance']:.2e} (the adapter moves logits by up to "
          f"{r['adapter_effect']:.3g})")
    if r["template"] is None:
        print("note: no template.yaml in the adapter and no --template: tokenizer_config.json has no chat_template")
    print(f"wrote {r['output']}/:")
    for name, size in r["files"].items():
        print(f"  {name:<40} {size_text(size):>10}")
    return 0
