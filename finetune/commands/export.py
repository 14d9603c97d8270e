"""`finetune export --input DIR --output DIR --format hf|meta`: convert a checkpoint between layouts, or consolidate a
DeepSpeed training checkpoint (checkpoints/step-N) into either; `--format gguf --output FILE.gguf`: one GGUF file for
llama.cpp and Ollama."""
from __future__ import annotations

from ..errors import UserError
from .common import DTYPES, parser
from .merge import size_text

GGUF_DTYPES = ["f32", "f16", "bf16", "q8_0"]  # finetune.gguf_export.DTYPES (not imported: gguf is optional)
EPILOG = ("A GGUF file runs in llama.cpp as it is (llama-cli -m FILE.gguf --jinja: the run's chat template is inside) "
          "and in Ollama through a Modelfile (FROM ./FILE.gguf); see the README's 'Run it in llama.cpp / Ollama'.")


def main(argv: list[str]) -> int:
    p = parser("finetune export", "Convert a checkpoint between the Hugging Face and Meta layouts, consolidate a "
                                  "DeepSpeed training checkpoint (checkpoints/step-N) into either, or write one GGUF "
                                  "file for llama.cpp and Ollama (tokenizer, special tokens, rope settings and chat "
                                  "template inside).", EPILOG)
    p.add_argument("--input", required=True, help="a checkpoint folder (HF, Meta, or a DeepSpeed run's "
                                                  "checkpoints/step-N), or a Hugging Face Hub id owner/name[@revision]")
    p.add_argument("--output", required=True, help="the folder to write (hf, meta), or the FILE.gguf (gguf)")
    p.add_argument("--format", required=True, choices=["hf", "meta", "gguf"])
    p.add_argument("--shards", type=int, help="Meta model-parallel shards (default 1)")
    p.add_argument("--dtype", default="auto",
                   help=f"hf, meta: auto, {', '.join(DTYPES)}; gguf: auto, {', '.join(GGUF_DTYPES)} (norms stay f32). "
                        f"Default auto: the stored dtype (for gguf: float32 -> f32, bfloat16 -> bf16, float16 -> f16)")
    p.add_argument("--shard-size", help="largest safetensors file for --format hf (default 5GB)")
    p.add_argument("--config", help="model config.json or checkpoint folder, for a DeepSpeed checkpoint whose "
                                    "trainer_state.json recipe cannot give it")
    p.add_argument("--overwrite", action="store_true",
                   help="hf, meta: --output may be an existing folder that is not a checkpoint: the files are written "
                        "beside the ones there (none of which is replaced or deleted). gguf: an existing FILE.gguf is "
                        "replaced (only once the new file is complete; without --overwrite it is refused)")
    a = p.parse_args(argv)
    _check_combination(a)
    if a.format == "gguf":
        from ..gguf_export import export_gguf

        w = export_gguf(a.input, a.output, dtype=a.dtype, overwrite=a.overwrite, config=a.config)
        print(f"wrote {w.path} ({size_text(w.size)}, gguf {w.dtype}): {w.tensors} tensors, vocabulary of "
              f"{w.vocab_size:,} tokens, chat template: {'yes' if w.chat_template else 'no'}")
        return 0
    from ..merge import export

    out = export(a.input, a.output, format=a.format, shards=1 if a.shards is None else a.shards, dtype=a.dtype,
                 max_shard_size=a.shard_size or "5GB", config=a.config, overwrite=a.overwrite)
    print(f"wrote {out}/ ({a.format}):")
    for f in sorted(out.iterdir()):
        print(f"  {f.name:<40} {size_text(f.stat().st_size):>10}")
    return 0


def _check_combination(a) -> None:
    """--dtype's choices depend on --format; --shards and --shard-size are for the folder layouts only."""
    gguf = a.format == "gguf"
    choices = ["auto"] + (GGUF_DTYPES if gguf else DTYPES)
    if a.dtype not in choices:
        hint = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}.get(a.dtype) if gguf else None
        other = (" (a GGUF type: only with --format gguf)" if a.dtype in GGUF_DTYPES else
                 f" (did you mean {hint}?)" if hint else "")
        raise UserError(f"finetune export: --dtype {a.dtype} does not fit --format {a.format}{other}; choose "
                        f"{', '.join(choices)}")
    if gguf and (a.shards is not None or a.shard_size is not None):
        raise UserError("finetune export: --shards and --shard-size are for --format meta and hf; --format gguf "
                        "writes one file")
