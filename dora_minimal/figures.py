"""The tutorial's figures, drawn from the project's own code (needs matplotlib: pip install
matplotlib, or the `plot` extra).

    python -m dora_minimal.figures tutorial/figures

writes row_split.png (a weight row as magnitude and direction, before and after an update),
delta_m_delta_d.png (ΔM against ΔD of the toy run, as the paper's Figure 2),
training_curves.png (the toy run's fine-tuning losses) and loss_by_rank.png (LoRA and DoRA
across ranks over 5 seeds, chapter 7's rank table). The rank sweep's 65 fine-tunings take most
of the time: 2 min 19 s of CPU time on a 2-core x86_64 CPU (torch 2.13.0+cpu, 2026-12-07), 12 min
39 s of wall time there with the machine loaded by other work (load average 11-17). The functions that compute what is drawn
need only NumPy; matplotlib is imported when drawing.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from . import reference
from .ranks import mean_and_std, rank_sweep
from .toy import NAMES, ToyConfig, hidden_layer_names, hidden_layer_shifts, run


# --- what is drawn (NumPy only) ---------------------------------------------------------------

def row_split_example():
    """One weight row in 2-D, split into magnitude and direction before and after a DoRA update.

    Before (Eq. 2): w0 = m0 d0 with m0 = ‖w0‖, d0 = w0 / ‖w0‖.
    After (Eq. 5): V' = w0 + s b A turns the direction to d' = V' / ‖V'‖; the trained magnitude
    m' sets the length: w' = m' d'. Returns {name: array of shape (2,) or float}.
    """
    W0 = np.array([[2.0, 1.0]])  # (out=1, in=2): one row
    A, B, scaling = np.array([[-0.4, 1.0]]), np.array([[0.9]]), 1.0  # r = 1, as if trained
    m0, D0 = reference.decompose(W0)  # (1,), (1, 2)
    V = reference.adapt(W0, A, B, scaling)  # V' = W0 + s B A, (1, 2)
    m = 0.8 * m0  # the magnitude after training, a separate vector of `out` numbers
    W = reference.recombine(m, V)  # W' = m V' / ‖V'‖_c, (1, 2)
    return {"w0": W0[0], "m0": float(m0[0]), "d0": D0[0], "update": scaling * (B @ A)[0],
            "V": V[0], "d": V[0] / np.linalg.norm(V[0]), "m": float(m[0]), "w": W[0]}


def layer_paths(result):
    """{layer: (checkpoint numbers 1.., ΔD values, ΔM values)} of a MethodResult, step order."""
    steps = sorted({t[0] for t in result.trajectory})
    paths = {}
    for step, layer, delta_m, delta_d in sorted(result.trajectory, key=lambda t: t[0]):
        numbers, delta_ds, delta_ms = paths.setdefault(layer, ([], [], []))
        numbers.append(steps.index(step) + 1)
        delta_ds.append(delta_d)
        delta_ms.append(delta_m)
    return paths


def fit_line(xs, ys):
    """Least-squares (slope, intercept) of ys against xs (slope nan when xs is constant)."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    spread = np.sum((x - x.mean()) ** 2)
    # slope = Σ (x - x̄)(y - ȳ) / Σ (x - x̄)²: the same sign as Pearson's correlation
    slope = np.sum((x - x.mean()) * (y - y.mean())) / spread if spread > 0 else float("nan")
    return float(slope), float(y.mean() - slope * x.mean())


def moving_average(values, window):
    """Mean of each run of `window` consecutive values (len(values) - window + 1 of them)."""
    values = np.asarray(values, dtype=float)
    window = max(1, min(window, len(values)))
    sums = np.cumsum(np.concatenate([[0.0], values]))
    return (sums[window:] - sums[:-window]) / window


SHIFT_NAMES = {"rescale": "rescaled", "tilt": "tilted", "both": "tilted and rescaled"}


# --- drawing (matplotlib, imported here) ------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_row_split(path):
    """Figure (a): a weight row as magnitude and direction, before and after an update."""
    plt, e = _pyplot(), row_split_example()
    figure, axes = plt.subplots(1, 2, figsize=(8, 3.6), sharex=True, sharey=True)
    circle = np.linspace(0, 2 * np.pi, 200)

    def arrow(axis, start, vector, color, label, style="-"):
        axis.annotate("", xy=start + vector, xytext=start,
                      arrowprops=dict(arrowstyle="->", color=color, lw=2, linestyle=style))
        axis.plot([], [], color=color, lw=2, linestyle=style, label=label)

    for axis in axes:
        axis.plot(np.cos(circle), np.sin(circle), color="0.7", lw=1, linestyle=":")
        axis.set_aspect("equal")
        axis.set(xlim=(-0.6, 3.0), ylim=(-0.3, 3.0), xlabel="input feature 1")
    origin = np.zeros(2)
    before, after = axes
    arrow(before, origin, e["w0"], "black", f"w0, length m0 = {e['m0']:.2f}")
    arrow(before, origin, e["d0"], "tab:blue", "direction d0 = w0 / ‖w0‖ (unit circle)")
    before.set(title="before: w0 = m0 · d0", ylabel="input feature 2")
    arrow(after, origin, e["w0"], "0.75", "w0")
    arrow(after, e["w0"], e["update"], "tab:orange", "s·b A (low rank)")
    arrow(after, origin, e["w"], "black", f"w' = m' · d', length m' = {e['m']:.2f}")
    arrow(after, origin, e["V"], "0.4", "V' = w0 + s·b A (only its direction counts)",
          style="--")
    arrow(after, origin, e["d"], "tab:blue", "direction d' = V' / ‖V'‖")
    after.set(title="after: d' turned, length m' trained")
    for axis in axes:
        axis.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def hidden_layer_labels(cfg):
    """{layer name in the Sequential: 'hidden layer 1', ...}, counted as chapter 7 counts them:
    the (hidden, hidden) layers, first to last."""
    return {name: f"hidden layer {i}" for i, name in enumerate(hidden_layer_names(cfg), 1)}


def plot_delta_scatter(toy_run, path):
    """Figure (b): ΔD (x) against ΔM (y) per method, as the paper's Figure 2: one point per
    measured layer and checkpoint (numbered 1.. in step order), the pooled least-squares line."""
    plt = _pyplot()
    results = toy_run.results
    # each panel its own scale: on shared axes full fine-tuning's points pile up in a corner
    figure, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results) + 2.4, 4.2),
                                squeeze=False, layout="constrained")
    shifts, labels = hidden_layer_shifts(toy_run.config), hidden_layer_labels(toy_run.config)
    colors = {"rescale": plt.get_cmap("Blues"), "tilt": plt.get_cmap("Oranges"),
              "both": plt.get_cmap("Greens")}
    for axis, result in zip(axes[0], results):
        paths = layer_paths(result)
        for i, (layer, (numbers, delta_ds, delta_ms)) in enumerate(paths.items()):
            color = colors[shifts[layer]](0.5 + 0.45 * i / max(1, len(paths) - 1))
            axis.plot(delta_ds, delta_ms, color=color, lw=1, zorder=1)
            axis.scatter(delta_ds, delta_ms, s=150, color=color, edgecolor="white", zorder=2,
                         label=f"{labels[layer]} ({SHIFT_NAMES[shifts[layer]]})")
            for number, x, y in zip(numbers, delta_ds, delta_ms):
                axis.annotate(str(number), (x, y), ha="center", va="center", fontsize=8,
                              fontweight="bold", color="white", zorder=3)
        all_d = [t[3] for t in result.trajectory]
        slope, intercept = fit_line(all_d, [t[2] for t in result.trajectory])
        xs = np.array([min(all_d), max(all_d)])
        axis.plot(xs, slope * xs + intercept, color="black", linestyle="--", lw=1, zorder=1.5)
        axis.set(title=f"{NAMES[result.method]}: corr {result.correlation():+.2f}",
                 xlabel="ΔD (mean 1 - cos)")
        axis.margins(0.08)
    axes[0][0].set(ylabel="ΔM (mean |‖w'‖ - ‖w0‖|)")
    figure.legend(*axes[0][-1].get_legend_handles_labels(), fontsize=8, loc="outside right center",
                  title="numbers: checkpoints\nin step order", title_fontsize=8)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_training_curves(toy_run, path, window=20):
    """Figure (c): the fine-tuning batch loss of each method (moving average), log scale."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.4))
    for result in toy_run.results:
        smooth = moving_average(result.losses, window)
        steps = np.arange(len(result.losses) - len(smooth) + 1, len(result.losses) + 1)
        axis.plot(steps, smooth, label=f"{NAMES[result.method]} ({result.trainable:,} trained)")
    axis.axhline(toy_run.start_loss, color="0.5", linestyle=":", label="before fine-tuning")
    axis.set(yscale="log", xlabel="fine-tuning step",
             ylabel=f"batch loss (mean of {window} steps)", title="fine-tuning on the shifted task")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def plot_rank_sweep(sweep, path):
    """Figure (d): the held-out loss against the rank, LoRA and DoRA (mean over the seeds, a bar
    of ± one standard deviation, each seed a dot), full fine-tuning a line (its band ± std)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.8))
    for offset, method, color in ((0.96, "lora", "tab:orange"), (1.04, "dora", "tab:blue")):
        xs = [rank * offset for rank in sweep.ranks]  # side by side on the log axis
        stats = [mean_and_std(sweep.losses[method, rank]) for rank in sweep.ranks]
        axis.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], color=color,
                      marker="o", capsize=3, label=f"{NAMES[method]}, mean ± std")
        for x, rank in zip(xs, sweep.ranks):
            losses = sweep.losses[method, rank]
            axis.scatter([x] * len(losses), losses, s=8, color=color, alpha=0.35, zorder=1)
    mean, std = mean_and_std(sweep.losses["full", None])
    axis.axhline(mean, color="black", linestyle="--", lw=1,
                 label=f"{NAMES['full']} ({sweep.trainable['full', None]:,} trained), mean ± "
                       "std (band)")
    axis.axhspan(mean - std, mean + std, color="0.85", zorder=0)
    axis.set(xscale="log", yscale="log", xlabel="rank r", ylabel="held-out loss",
             title=f"after {sweep.config.finetune_steps} fine-tuning steps, seeds "
                   f"{sweep.seeds[0]}-{sweep.seeds[-1]} (dots: each seed)")
    axis.set_xticks(sweep.ranks, [str(rank) for rank in sweep.ranks])
    axis.xaxis.set_minor_locator(plt.NullLocator())  # only the ranks on the rank axis
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


RANKS, SEEDS = (1, 2, 4, 8, 16, 32), 5  # the rank figure's, as chapter 7's table


def make_figures(directory, cfg=None, log=print, ranks=RANKS, seeds=SEEDS):
    """Run the toy experiment with cfg, and its rank sweep over `seeds` seeds from cfg.seed, and
    write the four figures into directory; their paths."""
    directory = Path(directory)
    cfg = cfg or ToyConfig()
    toy_run = run(cfg, log=log)
    sweep = rank_sweep(cfg, ranks, range(cfg.seed, cfg.seed + seeds), log=log)
    paths = [directory / name for name in ("row_split.png", "delta_m_delta_d.png",
                                           "training_curves.png", "loss_by_rank.png")]
    plot_row_split(paths[0])
    plot_delta_scatter(toy_run, paths[1])
    plot_training_curves(toy_run, paths[2])
    plot_rank_sweep(sweep, paths[3])
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dora_minimal.figures",
                                     description="Draw the tutorial's figures into DIRECTORY.")
    parser.add_argument("directory", help="an existing folder, e.g. tutorial/figures")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not Path(args.directory).is_dir():
        parser.error(f"directory: expected an existing folder, got {args.directory!r}")
    try:
        _pyplot()
    except ImportError:
        parser.error("matplotlib is not installed (pip install matplotlib); nothing was drawn")
    import torch
    torch.set_num_threads(1)  # see python -m dora_minimal --help: faster on a busy machine
    for path in make_figures(args.directory):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
