"""python -m dora_minimal: full fine-tuning vs LoRA vs DoRA on a toy task (see dora_minimal.toy).

Every option is checked before torch is imported (a few seconds): a bad one is answered at once.
"""

import argparse
import importlib.util
import math
import re
import sys
from pathlib import Path

from .toy_config import ToyConfig

PLOT_FORMATS = (".png", ".pdf", ".svg")

DESCRIPTION = """\
Pretrain an 8-layer tanh MLP on a synthetic regression task; fine-tune it on a shifted task (its
hidden layers, one after another, rescaled row by row or tilted by a rank-2 turn) with full
fine-tuning, LoRA and DoRA at the same rank; print trainable parameters, losses, the paper's
magnitude and direction changes (ΔM, ΔD, Eq. 3-4) of the hidden layers and their correlation over
all layers and checkpoints (the paper's Figure 2), and time. Then merge the DoRA model and print
how far its outputs moved.

With --ranks (e.g. --ranks 1,2,4,8,16,32 --seeds 5): fine-tune with LoRA and DoRA at each rank
and with full fine-tuning, over several seeds, and print the held-out loss of each, mean ± std."""

EPILOG = """\
The table's legend is printed under it; progress lines go to stderr. Chapter 7 of the tutorial
explains the experiment.

Every option is checked before torch is imported: a bad one is answered at once. Only a CUDA
--device with a torch built for CUDA imports torch to ask for the GPU, after all else passed.

Threads: torch's intra-op threads gain nothing on these 64-wide matrices and wait for each other
when other programs keep the cores busy, so --threads defaults to 1 (chapter 7 has the timings).
"""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default (but None) and keeps the description's line breaks."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def positive_number(text):
    """argparse type: a finite float > 0 (a learning rate, lora_alpha)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def integer(minimum, maximum=None, too_large=None):
    """argparse type: an integer from minimum to maximum (or above); too_large(value), if given,
    says what a value above maximum would mean."""
    expected = (f"an integer >= {minimum}" if maximum is None else
                f"an integer from {minimum} to {maximum}")

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            why = f": {too_large(value)}" if too_large and value > minimum else ""
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}{why}")
        return value
    return parse


def rank_list(width, too_large):
    """argparse type: distinct ranks separated by commas, each from 1 to width; sorted.
    too_large(rank) says what a rank above width would mean."""
    expected = f"ranks separated by commas, such as 1,2,4,8, each an integer from 1 to {width}"

    def parse(text):
        ranks = []
        for item in text.split(","):
            try:
                rank = int(item)
            except ValueError:
                why = f"{item.strip()!r} is no integer"
            else:
                why = (f"{rank} is below 1" if rank < 1 else
                       f"{rank} is above {width}: {too_large(rank)}" if rank > width else
                       f"{rank} is there twice" if rank in ranks else None)
            if why:
                raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}: {why}")
            ranks.append(rank)
        return sorted(ranks)
    return parse


def device(text):
    """argparse type: cpu, cuda or cuda:N (whether a GPU is there is checked last)."""
    if re.fullmatch(r"cpu|cuda(:[0-9]+)?", text) is None:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def torch_built_without_cuda():
    """The installed torch's version if it is built without CUDA and ROCm (a CPU build), so that
    it can see no CUDA GPU; None when it has one of them, or when that cannot be told.

    Asked without importing torch, which takes seconds: its public torch.version module, run
    here on its own, says which build it is (torch.version.cuda and .hip are None in a CPU
    build). Anything unexpected answers None, and torch itself is asked.
    """
    try:
        torch_spec = importlib.util.find_spec("torch")
        path = Path(torch_spec.origin).with_name("version.py")
        spec = importlib.util.spec_from_file_location("_torch_version", path)
        version = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(version)
        return version.__version__ if version.cuda is None and version.hip is None else None
    except Exception:  # no such file, another layout: let torch answer
        return None


def check_cuda(parser, action, name):
    """parser.error unless torch can use the CUDA GPU `name` (cuda or cuda:N) of the option
    `action`. A CPU build of torch is told apart at once; any other build is asked, which imports
    torch."""
    version = torch_built_without_cuda()
    if version:
        error(parser, action, f"expected cpu: torch {version} is built without CUDA, so it sees "
                              f"no CUDA GPU, got {name!r}")
    import torch
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        error(parser, action, f"expected cpu: torch sees no CUDA GPU here, got {name!r}")
    if int(name.partition(":")[2] or 0) >= count:
        error(parser, action, f"expected cpu or cuda:0 to cuda:{count - 1} (the CUDA GPUs torch "
                              f"sees), got {name!r}")


def error(parser, action, message):
    """parser.error in argparse's own words: 'argument --option: message' (exit status 2)."""
    parser.error(str(argparse.ArgumentError(action, message)))


def parse_args(argv):
    """The options, every one checked; only a CUDA --device on a torch built with CUDA imports
    torch here, after all the others passed."""
    defaults = ToyConfig()
    width = defaults.hidden
    parser = argparse.ArgumentParser(
        prog="python -m dora_minimal", formatter_class=_Formatter,
        epilog=EPILOG,
        description=DESCRIPTION)
    options = {}

    one_rank_or_many = parser.add_mutually_exclusive_group()

    def add(*names, group=parser, **kwargs):
        action = group.add_argument(*names, **kwargs)
        options[action.dest] = action

    add("--device", type=device, default=defaults.device, help="cpu or cuda (or cuda:N)")
    add("--threads", type=integer(1), default=1, help="torch CPU threads (torch.set_num_threads)")
    add("--seed", type=integer(0), default=defaults.seed,
        help="seed of data, models and adapters")

    def rank_too_large(r):
        return (f"the hidden layers are {width} x {width}, where an update B A has rank at most "
                f"{width}, so a higher rank only adds parameters (LoRA would train "
                f"{defaults.trainable_count('lora', r):,}, full fine-tuning trains "
                f"{defaults.trainable_count('full'):,})")
    add("--rank", type=integer(1, width, rank_too_large), default=defaults.rank,
        group=one_rank_or_many, help=f"adapter rank r, at most the hidden layers' width {width}")
    add("--ranks", type=rank_list(width, rank_too_large), group=one_rank_or_many,
        help="compare LoRA and DoRA at each of these ranks, e.g. 1,2,4,8,16,32, over --seeds "
             "seeds, beside full fine-tuning; --plot draws the loss against the rank")
    add("--seeds", type=integer(2), help="with --ranks: how many seeds, --seed, --seed + 1, ... "
        "(at least 2, for a spread; default: 5)")
    add("--lora-alpha", type=positive_number, default=defaults.lora_alpha,
        help="the scaling's numerator: s = lora_alpha / r")
    add("--pretrain-steps", type=integer(1), default=defaults.pretrain_steps,
        help="pretraining steps on the original task")
    add("--pretrain-lr", type=positive_number, default=defaults.pretrain_lr,
        help="learning rate of pretraining")
    add("--finetune-steps", "--steps", type=integer(1), default=defaults.finetune_steps,
        help="fine-tuning steps per method (ToyConfig.finetune_steps; --steps is short for it)")
    add("--checkpoints", type=integer(1), default=defaults.checkpoints,
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
        f"Figure 2, into FILE ({', '.join(PLOT_FORMATS)}); with --ranks the loss against the "
        "rank; needs matplotlib")
    args = parser.parse_args(argv)

    if args.checkpoints > args.finetune_steps:
        error(parser, options["checkpoints"], f"expected at most --finetune-steps = "
              f"{args.finetune_steps} checkpoints, got {args.checkpoints}")
    if args.seeds is not None and args.ranks is None:
        error(parser, options["seeds"], f"only with --ranks (a single run has one seed: "
              f"--seed), got --seeds {args.seeds} alone")
    args.seeds = args.seeds or 5
    if args.plot:
        plot = Path(args.plot)
        if importlib.util.find_spec("matplotlib") is None:
            error(parser, options["plot"], "needs matplotlib, which is not installed "
                  "(pip install matplotlib); nothing was run")
        if plot.suffix.lower() not in PLOT_FORMATS:
            error(parser, options["plot"], f"expected a file name ending in "
                  f"{', '.join(PLOT_FORMATS)}, got {args.plot!r}")
        if not plot.resolve().parent.is_dir():
            error(parser, options["plot"], f"the folder {str(plot.parent)!r} does not exist")
    if args.device.startswith("cuda"):  # last: it may import torch
        check_cuda(parser, options["device"], args.device)
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch  # only now: every option is good

    from . import toy
    torch.set_num_threads(args.threads)
    cfg = ToyConfig(seed=args.seed, rank=args.rank, lora_alpha=args.lora_alpha,
                    pretrain_steps=args.pretrain_steps, pretrain_lr=args.pretrain_lr,
                    finetune_steps=args.finetune_steps, checkpoints=args.checkpoints,
                    lr=args.lr, full_lr=args.full_lr, shift=args.shift, device=args.device)
    if args.ranks:
        from .ranks import format_rank_table, rank_sweep
        sweep = rank_sweep(cfg, args.ranks, range(args.seed, args.seed + args.seeds),
                           log=lambda line: print(line, file=sys.stderr, flush=True))
        print(format_rank_table(sweep))
        if args.plot:
            from .figures import plot_rank_sweep
            plot_rank_sweep(sweep, args.plot)
            print(f"plot written to {args.plot}")
        return
    toy_run = toy.run(cfg, log=print,
                      progress=lambda line: print(line, file=sys.stderr, flush=True))
    print()
    print(toy.format_table(toy_run))
    print(f"\nDoRA merged vs unmerged: largest output difference {toy_run.merge_difference:.2e}")
    if args.plot:
        from .figures import plot_delta_scatter
        plot_delta_scatter(toy_run, args.plot)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
