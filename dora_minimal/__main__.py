"""python -m dora_minimal: full fine-tuning vs LoRA vs DoRA on a toy task (see dora_minimal.toy)."""

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import torch

from .checks import check_command_line
from .toy import ToyConfig, format_table, run

PLOT_FORMATS = (".png", ".pdf", ".svg")

DESCRIPTION = """\
Pretrain an 8-layer tanh MLP on a synthetic regression task; fine-tune it on a shifted task (its
hidden layers, one after another, rescaled row by row or tilted by a rank-2 turn) with full
fine-tuning, LoRA and DoRA at the same rank; print trainable parameters, losses, the paper's
magnitude and direction changes (ΔM, ΔD, Eq. 3-4) of the hidden layers and their correlation over
all layers and checkpoints (the paper's Figure 2), and time. Then merge the DoRA model and print
how far its outputs moved."""

EPILOG = """\
The table's legend is printed under it; progress lines go to stderr. Chapter 7 of the tutorial
explains the experiment.

Threads: torch's intra-op threads gain nothing on these 64-wide matrices and wait for each other
when other programs keep the cores busy. Wall time of this command with default options, 2-core
VM, torch 2.13.0+cpu, 2026-11-28 (the VM also ran other work, load average 3-10):
  --threads 1: 16.7 to 21.5 s (3 runs); beside two added busy loops: 64.8 s
  --threads 2: 149.3 to 186.1 s (2 runs); beside two added busy loops: 860.9 s
On a quiet VM, 2026-11-29 (after that day's speed-ups): 8.3 to 9.1 s with 1 thread (3 runs),
8.8 to 9.4 s with 2 (2 runs).
"""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default (but None) and keeps the description's line breaks."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _number(text, minimum_excluded):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > minimum_excluded):
        raise argparse.ArgumentTypeError(f"expected a finite number > {minimum_excluded:g}, "
                                         f"got {text}")
    return value


def positive_number(text):
    """argparse type: a finite float > 0 (a learning rate, lora_alpha)."""
    return _number(text, 0)


def parse_args(argv):
    defaults = ToyConfig()
    parser = argparse.ArgumentParser(
        prog="python -m dora_minimal", formatter_class=_Formatter,
        epilog=EPILOG,
        description=DESCRIPTION)
    add = parser.add_argument
    add("--device", default=defaults.device, help="cpu or cuda (or cuda:N)")
    add("--threads", type=int, default=1, help="torch CPU threads (torch.set_num_threads)")
    add("--seed", type=int, default=defaults.seed, help="seed of data, models and adapters")
    add("--rank", type=int, default=defaults.rank, help="adapter rank r")
    add("--lora-alpha", type=positive_number, default=defaults.lora_alpha,
        help="adapter scaling s = lora_alpha / r")
    add("--pretrain-steps", type=int, default=defaults.pretrain_steps,
        help="pretraining steps on the original task")
    add("--pretrain-lr", type=positive_number, default=defaults.pretrain_lr,
        help="learning rate of pretraining")
    add("--steps", type=int, default=defaults.finetune_steps,
        help="fine-tuning steps per method")
    add("--checkpoints", type=int, default=defaults.checkpoints,
        help="how many times ΔM and ΔD are measured, evenly over the fine-tuning, the last at "
             "the final step (the paper: 4)")
    add("--lr", type=positive_number, default=defaults.lr,
        help="learning rate of LoRA and DoRA")
    add("--full-lr", type=positive_number, default=defaults.full_lr,
        help="learning rate of full fine-tuning")
    add("--shift", choices=("alternate", "both"), default=defaults.shift,
        help="alternate: the hidden layers of the shifted task are rescaled and tilted in turn; "
             "both: each is tilted and rescaled (a control)")
    add("--plot", metavar="FILE", help="draw ΔD against ΔM per method, as the paper's "
        f"Figure 2, into FILE ({', '.join(PLOT_FORMATS)}); needs matplotlib")
    args = parser.parse_args(argv)

    check_command_line(parser, args, ("threads", "rank", "pretrain_steps", "steps",
                                      "checkpoints"))
    if args.seed < 0:
        parser.error(f"--seed: expected an integer >= 0, got {args.seed}")
    if args.checkpoints > args.steps:
        parser.error(f"--checkpoints: expected at most --steps = {args.steps} checkpoints, "
                     f"got {args.checkpoints}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        parser.error(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
    if args.plot:
        plot = Path(args.plot)
        if importlib.util.find_spec("matplotlib") is None:
            parser.error("--plot needs matplotlib, which is not installed "
                         "(pip install matplotlib); nothing was run")
        if plot.suffix.lower() not in PLOT_FORMATS:
            parser.error(f"--plot: expected a file name ending in {', '.join(PLOT_FORMATS)}, "
                         f"got {args.plot!r}")
        if not plot.resolve().parent.is_dir():
            parser.error(f"--plot: the folder {str(plot.parent)!r} does not exist")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    cfg = ToyConfig(seed=args.seed, rank=args.rank, lora_alpha=args.lora_alpha,
                    pretrain_steps=args.pretrain_steps, pretrain_lr=args.pretrain_lr,
                    finetune_steps=args.steps, checkpoints=args.checkpoints, lr=args.lr,
                    full_lr=args.full_lr, shift=args.shift, device=args.device)
    toy_run = run(cfg, log=print, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print()
    print(format_table(toy_run))
    print(f"\nDoRA merged vs unmerged: largest output difference {toy_run.merge_difference:.2e}")
    if args.plot:
        from .figures import plot_delta_scatter
        plot_delta_scatter(toy_run, args.plot)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
