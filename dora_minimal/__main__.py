"""python -m dora_minimal: full fine-tuning vs LoRA vs DoRA on a toy task (see dora_minimal.toy)."""

import argparse
import importlib.util
import sys

from .checks import check_command_line
from .toy import ToyConfig, format_table, plot, run


def parse_args(argv):
    defaults = ToyConfig()
    parser = argparse.ArgumentParser(
        prog="python -m dora_minimal",
        description="Pretrain a small MLP on a synthetic regression task, fine-tune it on a "
                    "shifted task with full fine-tuning, LoRA and DoRA at the same rank, and "
                    "print trainable parameters, losses, the paper's magnitude/direction "
                    "changes (ΔM, ΔD, Eq. 3-4) and their correlation, and time. Then merge the "
                    "DoRA model and print how far its outputs moved.")
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda (default: cpu)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--rank", type=int, default=defaults.rank, help="adapter rank r")
    parser.add_argument("--lora-alpha", type=float, default=defaults.lora_alpha)
    parser.add_argument("--pretrain-steps", type=int, default=defaults.pretrain_steps)
    parser.add_argument("--steps", type=int, default=defaults.finetune_steps,
                        help="fine-tuning steps per method")
    parser.add_argument("--checkpoints", type=int, default=defaults.checkpoints,
                        help="how many times ΔM and ΔD are measured during fine-tuning")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="adapter learning rate")
    parser.add_argument("--full-lr", type=float, default=defaults.full_lr,
                        help="learning rate of full fine-tuning")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="draw ΔD against ΔM per method (the paper's Figure 2); "
                             "needs matplotlib")
    args = parser.parse_args(argv)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib, which is not installed "
                     "(pip install matplotlib); nothing was run")
    check_command_line(parser, args, ("rank", "pretrain_steps", "steps", "checkpoints"))
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = ToyConfig(seed=args.seed, rank=args.rank, lora_alpha=args.lora_alpha,
                    pretrain_steps=args.pretrain_steps, finetune_steps=args.steps,
                    checkpoints=args.checkpoints, lr=args.lr, full_lr=args.full_lr,
                    device=args.device)
    results, merge_difference = run(cfg)
    print()
    print(format_table(results, cfg.rank))
    print(f"\nDoRA merged vs unmerged: largest output difference {merge_difference:.2e}")
    if args.plot:
        plot(results, args.plot)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
