"""A toy fine-tuning experiment: the paper's Figure 2 (Section 3.2) measured on a small MLP.

Pretrain an 8-layer tanh MLP (in -> hidden x 7 -> out) to imitate a random "teacher" network.
Then build the shifted task from the pretrained model itself: its hidden (hidden, hidden) layers
are changed, alternating layer by layer, by a pure per-row rescale (magnitudes change, directions
do not) or by a norm-preserving rank-2 tilt (directions change, magnitudes do not). Some layers
need only magnitude, the others only direction, and an exact solution exists. Fine-tune the
pretrained model on the shifted task three ways (full fine-tuning, LoRA and DoRA at the same
rank) and measure, as Section 3.2 does, ΔM and ΔD (Eq. 3-4) of each hidden layer at a few
checkpoints, every method's points pooled.
"""

import copy
import math
import textwrap
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim import optimizer as torch_optimizer

from .adapters import LoraConfig, inject_adapters, merge_adapters, trainable_parameters
from .analysis import correlation, decomposition_by_layer, effective_weights
from .toy_config import ToyConfig


def make_mlp(cfg, gain=1.0):
    """in -> hidden -> (hidden -> hidden) x hidden_layers -> out, tanh between; gain scales the
    initial weights (a teacher with gain > 1 is more nonlinear)."""
    layers = []
    for fan_in, fan_out in cfg.layer_sizes():
        layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
    mlp = nn.Sequential(*layers[:-1])
    with torch.no_grad():
        for layer in mlp[::2]:
            layer.weight.mul_(gain)
    return mlp


def hidden_layer_names(cfg):
    """Names of the (hidden, hidden) layers in make_mlp's Sequential: '2', '4', ..."""
    return [str(2 * i) for i in range(1, cfg.hidden_layers + 1)]


def hidden_layer_shifts(cfg):
    """{hidden layer name: 'rescale', 'tilt' or 'both'}: how the shifted task changes it."""
    if cfg.shift not in ("alternate", "both"):
        raise ValueError(f"shift: expected 'alternate' or 'both', got {cfg.shift!r}")
    return {name: "both" if cfg.shift == "both" else ("rescale", "tilt")[i % 2]
            for i, name in enumerate(hidden_layer_names(cfg))}


def shifted_copy(model, cfg, generator):
    """A copy of model whose hidden layers are rescaled (1st, 3rd, ...) and tilted (2nd, 4th,
    ...), or, with cfg.shift == "both", each tilted then rescaled.

    Tilt: V = W + tilt ‖W‖_F / ‖U‖_F U with U of rank 2, then w_j <- ‖w_j‖ v_j / ‖v_j‖ (ΔM = 0).
    Rescale: w_j <- k_j w_j with k_j uniform in [1 - rescale, 1 + rescale] (ΔD = 0).
    """
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for name, shift in hidden_layer_shifts(cfg).items():
            W = shifted.get_submodule(name).weight  # (hidden, hidden)
            out_features, in_features = W.shape
            if shift in ("tilt", "both"):
                U = (torch.randn(out_features, 2, generator=generator)
                     @ torch.randn(2, in_features, generator=generator)).to(W.device)  # rank 2
                V = W + cfg.tilt * W.norm() / U.norm() * U
                W.copy_(W.norm(dim=1, keepdim=True) * V / V.norm(dim=1, keepdim=True))
            if shift in ("rescale", "both"):
                factor = 1 + cfg.rescale * (2 * torch.rand(out_features, generator=generator) - 1)
                W.mul_(factor.to(W.device)[:, None])  # (out, 1)
    return shifted


def make_data(teacher, size, in_features, generator, y_scale=1.0):
    """(x, teacher(x) / y_scale) for `size` standard normal inputs, on the teacher's device."""
    x = torch.randn(size, in_features, generator=generator).to(teacher[0].weight.device)
    with torch.no_grad():
        y = teacher(x) / y_scale
    return x, y


def checkpoint_steps(steps, count):
    """`count` steps evenly spread over 1..steps, the last one `steps` (the final checkpoint)."""
    if not 1 <= count <= steps:
        raise ValueError(f"count: expected 1 <= count <= steps = {steps}, got {count}")
    return [round(k * steps / count) for k in range(1, count + 1)]


def fused_adam_available(parameters):
    """Whether this torch has the fused Adam for every parameter's device (it checks only at
    the first step, so ask first)."""
    devices = getattr(torch_optimizer, "_get_fused_kernels_supported_devices", None)
    return devices is not None and all(p.device.type in devices() for p in parameters)


def train(model, data, steps, lr, batch, generator, on_step=None):
    """Adam (no weight decay) on the mean squared error over random mini-batches;
    on_step(step, batch loss) after every step. Returns the batch losses."""
    x, y = data
    parameters = [p for p in model.parameters() if p.requires_grad]
    # one fused kernel for all parameters where torch has it for their device: at toy sizes
    # the for-loop Adam's dozen small operations per parameter took a third of each step
    optimizer = torch.optim.Adam(parameters, lr=lr, fused=fused_adam_available(parameters))
    model.train()
    losses = []
    for step in range(1, steps + 1):
        index = torch.randint(0, len(x), (batch,), generator=generator).to(x.device)
        loss = nn.functional.mse_loss(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def evaluate(model, data):
    model.eval()
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(data[0]), data[1]))


@dataclass
class MethodResult:
    method: str
    trainable: int
    total: int
    train_loss: float = 0.0
    test_loss: float = 0.0
    seconds: float = 0.0
    losses: list = field(default_factory=list)      # batch loss after each fine-tuning step
    trajectory: list = field(default_factory=list)  # [(step, layer, ΔM, ΔD)]

    def final(self):
        """Mean ΔM and ΔD over the measured layers at the last checkpoint."""
        last = [t for t in self.trajectory if t[0] == self.trajectory[-1][0]]
        return (sum(t[2] for t in last) / len(last), sum(t[3] for t in last) / len(last))

    def correlation(self):
        """Pearson correlation of ΔM and ΔD over all (layer, checkpoint) points, pooled as the
        paper's Figure 2 pools them; its sign is the sign of the least-squares slope."""
        return correlation([t[2] for t in self.trajectory], [t[3] for t in self.trajectory])


@dataclass
class ToyRun:
    config: ToyConfig
    results: list                # one MethodResult per method
    pretrain_loss: float         # held-out loss of the pretrained model on the original task
    start_loss: float            # ... and on the shifted task, before fine-tuning
    merge_difference: float      # largest |merged - unmerged| output of the DoRA model (or None)


@dataclass
class ShiftedTask:
    """What each method fine-tunes: the pretrained model and the shifted task's data."""
    pretrained: nn.Module
    train_data: tuple            # (x, y) of the shifted task
    test_data: tuple
    pretrain_loss: float         # held-out loss of the pretrained model on the original task
    start_loss: float            # ... and on the shifted task, before fine-tuning


def reporter(progress, progress_lines, phase, steps):
    """An on_step for train: progress(line) every steps // progress_lines steps (if given)."""
    every = max(1, steps // progress_lines)

    def report(step, loss):
        if progress is not None and step % every == 0:
            progress(f"  {phase}: step {step}/{steps}, batch loss {loss:.4f}")
    return report


def pretrain_and_shift(cfg, log=print, progress=None, progress_lines=5):
    """Pretrain on the original task, then build the shifted one; a ShiftedTask. cfg.seed draws
    the teacher, the data, the pretrained model's start and the shift."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    teacher = make_mlp(cfg, gain=3.0).to(device)
    # targets divided by the teacher's output std: a loss of 1 is about what predicting 0 scores
    y_scale = float(make_data(teacher, cfg.test_size, cfg.in_features, generator)[1].std())

    def data(model, size):
        return make_data(model, size, cfg.in_features, generator, y_scale)

    start = time.perf_counter()
    pretrained = make_mlp(cfg).to(device)
    pretrain_data, pretrain_test = data(teacher, cfg.train_size), data(teacher, cfg.test_size)
    train(pretrained, pretrain_data, cfg.pretrain_steps, cfg.pretrain_lr, cfg.batch, generator,
          reporter(progress, progress_lines, "pretraining", cfg.pretrain_steps))
    task = shifted_copy(pretrained, cfg, generator)
    train_data, test_data = data(task, cfg.train_size), data(task, cfg.test_size)
    pretrain_loss, start_loss = evaluate(pretrained, pretrain_test), evaluate(pretrained, test_data)
    log(f"pretraining: {cfg.pretrain_steps} steps, held-out loss {pretrain_loss:.4f} imitating a "
        f"random teacher ({time.perf_counter() - start:.1f} s)")
    shifts = "rescaled and tilted" if cfg.shift == "both" else "rescaled or tilted"
    log(f"shifted task: the pretrained MLP, hidden layers {shifts}; fine-tuning starts at "
        f"{start_loss:.4f}")
    return ShiftedTask(pretrained, train_data, test_data, pretrain_loss, start_loss)


def finetune(task, cfg, method, progress=None, progress_lines=5):
    """Fine-tune a copy of task.pretrained with `method` ('full', or 'lora' / 'dora' at cfg.rank),
    measuring ΔM and ΔD at the checkpoints; (MethodResult, the fine-tuned model). The adapters'
    start and the batches are drawn from cfg.seed + 1, the same for every method and rank."""
    torch.manual_seed(cfg.seed + 1)
    method_generator = torch.Generator().manual_seed(cfg.seed + 1)
    base_weights = effective_weights(task.pretrained)
    measured = hidden_layer_names(cfg)
    at_checkpoint = set(checkpoint_steps(cfg.finetune_steps, cfg.checkpoints))
    model = copy.deepcopy(task.pretrained)
    if method != "full":
        inject_adapters(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha,
                                          use_dora=method == "dora"))
    counts = trainable_parameters(model)
    result = MethodResult(method, counts.trainable, counts.total)
    report = reporter(progress, progress_lines, f"fine-tuning ({NAMES[method]})",
                      cfg.finetune_steps)

    def on_step(step, loss):
        if step in at_checkpoint:  # Eq. 3-4 for each measured layer against the pretrained
            changes = decomposition_by_layer(base_weights, effective_weights(model))
            result.trajectory += [(step, name, *changes[name]) for name in measured]
        report(step, loss)
    start = time.perf_counter()
    result.losses = train(model, task.train_data, cfg.finetune_steps,
                          cfg.full_lr if method == "full" else cfg.lr, cfg.batch,
                          method_generator, on_step)
    result.seconds = time.perf_counter() - start
    result.train_loss = evaluate(model, task.train_data)
    result.test_loss = evaluate(model, task.test_data)
    return result, model


def run(cfg=None, log=print, progress=None, progress_lines=5):
    """Pretrain, fine-tune with each method, measure ΔM and ΔD; returns a ToyRun.

    log(line) gets one line per phase; progress(line), if given, `progress_lines` lines within it.
    """
    cfg = cfg or ToyConfig()
    task = pretrain_and_shift(cfg, log, progress, progress_lines)
    results, dora_model = [], None
    for method in cfg.methods:
        result, model = finetune(task, cfg, method, progress, progress_lines)
        log(f"fine-tuning ({NAMES[method]}): {cfg.finetune_steps} steps, train loss "
            f"{result.train_loss:.4f}, held-out {result.test_loss:.4f} ({result.seconds:.1f} s)")
        results.append(result)
        if method == "dora":
            dora_model = model

    merge_difference = None
    if dora_model is not None:
        test_x = task.test_data[0]
        with torch.no_grad():
            unmerged = dora_model(test_x)
            merged = merge_adapters(copy.deepcopy(dora_model))(test_x)
        merge_difference = float((merged - unmerged).abs().max())
    return ToyRun(cfg, results, task.pretrain_loss, task.start_loss, merge_difference)


NAMES = {"full": "full fine-tuning", "lora": "LoRA", "dora": "DoRA"}


def format_table(toy_run):
    """The results as a table, with a legend under it saying what each column is."""
    cfg = toy_run.config
    columns = [("method", 17), ("trainable", 10), ("train loss", 11), ("held-out", 9),
               ("ΔM", 8), ("ΔD", 8), ("corr(ΔM,ΔD)", 13), ("time s", 7)]

    def row(*cells):  # one space between columns, however wide a number gets
        return " ".join(f"{cell:<{width}}" if i == 0 else f"{cell:>{width}}"
                        for i, (cell, (_, width)) in enumerate(zip(cells, columns)))
    lines = [row(*(title for title, _ in columns))]
    for r in toy_run.results:
        delta_m, delta_d = r.final()
        corr = r.correlation()
        lines.append(row(NAMES[r.method] + ("" if r.method == "full" else f" r={cfg.rank}"),
                         f"{r.trainable:,}", f"{r.train_loss:.4f}", f"{r.test_loss:.4f}",
                         f"{delta_m:.4f}", f"{delta_d:.4f}",
                         "n/a" if corr != corr else f"{corr:+.2f}", f"{r.seconds:.1f}"))
    points = cfg.hidden_layers * cfg.checkpoints
    legend = [
        "losses: mean squared error over the whole train / held-out set, targets in units of the "
        "teacher's output std (predicting 0 scores about 1; before fine-tuning: "
        f"{toy_run.start_loss:.4f}).",
        f"ΔM, ΔD: Eq. 3-4 against the pretrained weights: the mean over the {cfg.hidden} rows of "
        "a hidden layer of |‖w'‖ - ‖w0‖| and of 1 - cos(w', w0); shown: their mean over the "
        f"{cfg.hidden_layers} hidden layers at step {cfg.finetune_steps}.",
        f"corr(ΔM,ΔD): Pearson over {points} points ({cfg.hidden_layers} layers x "
        f"{cfg.checkpoints} checkpoints) pooled, as the paper's Figure 2 pools them; its sign is "
        "the sign of the least-squares slope of ΔM against ΔD. " + (
            "Here half the hidden layers need only a magnitude change, half only a direction "
            "change: a method that follows that (large ΔM with small ΔD, or the reverse) gets a "
            "negative sign; one whose magnitude changes come with direction changes gets a "
            "positive one." if cfg.shift == "alternate" else
            "Here every hidden layer needs both a magnitude and a direction change."),
        "time s: seconds of fine-tuning.",
    ]
    if any(r.correlation() != r.correlation() for r in toy_run.results):
        legend.append("n/a: ΔM or ΔD did not vary over the points (nothing moved) or is not "
                      "finite, so no correlation exists.")
    diverged = [NAMES[r.method] for r in toy_run.results
                if not (math.isfinite(r.test_loss) and r.test_loss <= toy_run.start_loss)]
    if diverged:
        legend.append(f"{', '.join(diverged)}: the loss ended above where it started (or is "
                      "not finite): that training diverged; try a smaller learning rate.")
    lines.append("")
    lines += [textwrap.fill(paragraph, 96, subsequent_indent="  ") for paragraph in legend]
    return "\n".join(lines)
