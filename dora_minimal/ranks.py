"""Final loss against adapter rank: the toy experiment (dora_minimal.toy) fine-tuned with LoRA and
DoRA at each rank, full fine-tuning beside, over several seeds (python -m dora_minimal --ranks
1,2,4,8,16,32 --seeds 5; chapter 7).

A seed is the toy run's --seed: it draws the teacher, the pretraining, the shifted task and (as
seed + 1) the adapters' start and the batches. One pretraining per seed serves every method and
rank, and each fine-tuning gives what `python -m dora_minimal --seed S --rank R` gives.
"""

import math
import textwrap
import time
from dataclasses import dataclass, replace

from . import toy


@dataclass
class RankSweep:
    config: toy.ToyConfig
    ranks: list
    seeds: list
    losses: dict       # {("full", None) or ("lora" / "dora", rank): [held-out loss per seed]}
    trainable: dict    # {the same keys: trainable parameters}
    start_losses: list  # per seed: the shifted task's loss before fine-tuning


def rank_sweep(cfg, ranks, seeds, log=print):
    """Fine-tune each seed's pretrained model with full fine-tuning once and with LoRA and DoRA at
    each rank (cfg's other settings); a RankSweep. log(line) once per seed."""
    losses, trainable, start_losses = {}, {}, []
    for seed in seeds:
        start = time.perf_counter()
        seed_cfg = replace(cfg, seed=seed)
        task = toy.pretrain_and_shift(seed_cfg, log=lambda line: None)
        start_losses.append(task.start_loss)
        for method, rank in [("full", None)] + [(m, r) for r in ranks for m in ("lora", "dora")]:
            result, _ = toy.finetune(task, replace(seed_cfg, rank=rank or cfg.rank), method)
            losses.setdefault((method, rank), []).append(result.test_loss)
            trainable[method, rank] = result.trainable
        log(f"seed {seed}: pretrained, fine-tuned in full and with LoRA and DoRA at ranks "
            f"{','.join(map(str, ranks))} ({time.perf_counter() - start:.1f} s)")
    return RankSweep(cfg, list(ranks), list(seeds), losses, trainable, start_losses)


def mean_and_std(values):
    """The mean and the sample standard deviation (n - 1 in its denominator) of 2+ numbers; nan
    if one of them is (statistics.stdev raises on a nan instead)."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))


def paired_ratio(lora, dora):
    """Geometric mean over seeds of LoRA's loss / DoRA's loss (same seed: same pretrained model,
    task and batches), and on how many seeds DoRA's loss is the lower."""
    ratios = [a / b for a, b in zip(lora, dora)]
    return math.exp(sum(map(math.log, ratios)) / len(ratios)), sum(r > 1 for r in ratios)


def format_loss(values):
    mean, std = mean_and_std(values)
    return f"{mean:.2e} ± {std:.1e}"


def format_rank_table(sweep):
    """The sweep as a table, one row per rank and one for full fine-tuning, a legend under it."""
    cfg, n = sweep.config, len(sweep.seeds)
    columns = [("rank", 5), ("LoRA trained", 12), ("LoRA held-out", 19), ("DoRA trained", 12),
               ("DoRA held-out", 19), ("LoRA/DoRA", 9), ("DoRA lower", 10)]

    def row(*cells):
        return " ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, columns))
    lines = [row(*(title for title, _ in columns))]
    for rank in sweep.ranks:
        lora, dora = sweep.losses["lora", rank], sweep.losses["dora", rank]
        ratio, dora_lower = paired_ratio(lora, dora)
        lines.append(row(rank, f"{sweep.trainable['lora', rank]:,}", format_loss(lora),
                         f"{sweep.trainable['dora', rank]:,}", format_loss(dora), f"{ratio:.3g}",
                         f"{dora_lower} of {n}"))
    lines.append(f"full fine-tuning ({sweep.trainable['full', None]:,} trained): held-out "
                 f"{format_loss(sweep.losses['full', None])}")
    seeds = ", ".join(map(str, sweep.seeds))
    legend = [
        f"held-out: mean squared error on the shifted task's held-out set after "
        f"{cfg.finetune_steps} fine-tuning steps, mean ± standard deviation (n - 1) over seeds "
        f"{seeds}; before fine-tuning: {format_loss(sweep.start_losses)}.",
        f"LoRA/DoRA: geometric mean over the seeds of LoRA's loss / DoRA's (same seed: same "
        f"pretrained model, task and batches); above 1: DoRA lower. DoRA lower: on how many "
        f"seeds. Learning rates: LoRA and DoRA {cfg.lr:g}, full fine-tuning {cfg.full_lr:g}; "
        f"lora_alpha {cfg.lora_alpha:g}, so the scaling s = {cfg.lora_alpha:g} / r."]
    diverged = [toy.NAMES[method] + ("" if rank is None else f" r={rank}")
                for (method, rank), losses in sweep.losses.items()
                if not all(math.isfinite(loss) and loss <= start
                           for loss, start in zip(losses, sweep.start_losses))]
    if diverged:
        legend.append(f"{', '.join(diverged)}: on some seed the loss ended above where it started "
                      "(or is not finite): that training diverged; try a smaller learning rate.")
    return "\n".join(lines + [""] + [textwrap.fill(p, 96, subsequent_indent="  ")
                                     for p in legend])
