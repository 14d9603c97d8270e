"""`finetune plot RUN [RUN ...] [--output FILE]`: loss and learning rate of one run, or several runs compared."""
from __future__ import annotations

from .common import parser


def main(argv: list[str]) -> int:
    p = parser("finetune plot", "Draw the loss (train, validation) against tokens, and the learning rate, of runs "
                                "from their metrics.jsonl.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (output_dir of a training run)")
    p.add_argument("--output", help="the picture (.png, .svg, .pdf); default RUN/loss.png for one run, "
                                    "loss_comparison.png for several (replaced when they exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    args = p.parse_args(argv)
    from ..outputs import check_output_file
    from ..plots import plot

    if args.output:
        check_output_file(args.output, "--output", args.overwrite)

    print(plot(args.runs, args.output))
    return 0
