"""A toy fine-tuning experiment: pretrain a small MLP on a synthetic task, then adapt it to a
shifted task three ways (full fine-tuning, LoRA, DoRA at the same rank) and compare them.

The task: regress the outputs of a random "teacher" MLP. The shifted task's teacher has every
weight row rescaled (a change of magnitude) and tilted by a low-rank update (a change of
direction), so both halves of DoRA's decomposition have something to learn.
"""

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import LoraConfig, inject_adapters, merge_adapters, trainable_parameters
from .analysis import correlation, decomposition_by_layer, effective_weights


@dataclass
class ToyConfig:
    seed: int = 0
    in_features: int = 32
    hidden: int = 64
    out_features: int = 8
    train_size: int = 8192
    test_size: int = 1024
    batch: int = 128
    pretrain_steps: int = 1500
    finetune_steps: int = 600
    checkpoints: int = 10
    rank: int = 4
    lora_alpha: float = 8.0
    lr: float = 3e-3
    full_lr: float = 1e-3
    device: str = "cpu"
    methods: tuple = ("full", "lora", "dora")


def make_mlp(cfg, gain=1.0):
    """in -> hidden -> hidden -> out with tanh; gain > 1 makes a more nonlinear teacher."""
    mlp = nn.Sequential(nn.Linear(cfg.in_features, cfg.hidden), nn.Tanh(),
                        nn.Linear(cfg.hidden, cfg.hidden), nn.Tanh(),
                        nn.Linear(cfg.hidden, cfg.out_features))
    with torch.no_grad():
        for layer in mlp[::2]:
            layer.weight.mul_(gain)
    return mlp


def shifted_teacher(teacher, generator, magnitude=0.3, direction=0.5, rank=2):
    """A copy of teacher with each weight's rows rescaled by 1 ± magnitude and tilted by a rank-2
    update of relative size `direction`."""
    shifted = copy.deepcopy(teacher)
    with torch.no_grad():
        for layer in shifted:
            if isinstance(layer, nn.Linear):
                W = layer.weight
                out, inp = W.shape
                update = torch.randn(out, rank, generator=generator) @ torch.randn(
                    rank, inp, generator=generator)
                V = W + direction * W.norm() / update.norm() * update
                scale = 1 + magnitude * (2 * torch.rand(out, generator=generator) - 1)
                W.copy_(scale[:, None] * W.norm(dim=1, keepdim=True) * V / V.norm(dim=1,
                                                                                  keepdim=True))
    return shifted


def make_data(teacher, size, in_features, generator, y_scale=1.0):
    x = torch.randn(size, in_features, generator=generator)
    with torch.no_grad():
        y = teacher(x) / y_scale
    return x, y


def train(model, data, steps, lr, batch, generator, on_checkpoint=None, every=None):
    """Adam on the mean squared error over random mini-batches; returns the final train loss."""
    x, y = data
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(1, steps + 1):
        index = torch.randint(0, len(x), (batch,), generator=generator).to(x.device)
        loss = nn.functional.mse_loss(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if on_checkpoint is not None and step % every == 0:
            on_checkpoint(step)
    return evaluate(model, data)


def evaluate(model, data):
    model.eval()
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(data[0]), data[1]))


@dataclass
class MethodResult:
    method: str
    trainable: int
    total: int
    train_loss: float
    test_loss: float
    seconds: float
    trajectory: list = field(default_factory=list)  # [(step, layer, ΔM, ΔD)]

    def final(self):
        """Mean ΔM and ΔD over layers at the last checkpoint."""
        last = [t for t in self.trajectory if t[0] == self.trajectory[-1][0]]
        return (sum(t[2] for t in last) / len(last), sum(t[3] for t in last) / len(last))

    def correlation(self):
        """ΔM-ΔD correlation over checkpoints, per layer, averaged over layers."""
        layers = sorted({t[1] for t in self.trajectory})
        values = [correlation([t[2] for t in self.trajectory if t[1] == layer],
                              [t[3] for t in self.trajectory if t[1] == layer])
                  for layer in layers]
        return sum(values) / len(values)


def run(cfg=None, log=print):
    """Pretrain, fine-tune with each method, and report. Returns (results, merge_difference)."""
    cfg = cfg or ToyConfig()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    teacher = make_mlp(cfg, gain=3.0)
    new_teacher = shifted_teacher(teacher, generator)
    # targets scaled to unit variance on the original task, so a loss of 1 is "learned nothing"
    y_scale = float(make_data(teacher, cfg.test_size, cfg.in_features, generator)[1].std())

    def data(t, size):
        return tuple(a.to(device) for a in make_data(t, size, cfg.in_features, generator,
                                                      y_scale))
    pretrain_data = data(teacher, cfg.train_size)
    train_data, test_data = data(new_teacher, cfg.train_size), data(new_teacher, cfg.test_size)

    start = time.perf_counter()
    pretrained = make_mlp(cfg).to(device)
    loss = train(pretrained, pretrain_data, cfg.pretrain_steps, cfg.full_lr * 3, cfg.batch,
                 generator)
    log(f"pretraining: {cfg.pretrain_steps} steps, loss {loss:.4f} on the original task, "
        f"{evaluate(pretrained, test_data):.4f} on the shifted one "
        f"({time.perf_counter() - start:.1f} s)")
    base_weights = effective_weights(pretrained)

    results, dora_model = [], None
    for method in cfg.methods:
        torch.manual_seed(cfg.seed + 1)
        method_generator = torch.Generator().manual_seed(cfg.seed + 1)
        model = copy.deepcopy(pretrained)
        if method != "full":
            inject_adapters(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha,
                                              use_dora=method == "dora"))
        counts = trainable_parameters(model)
        result = MethodResult(method, counts.trainable, counts.total, 0.0, 0.0, 0.0)

        def checkpoint(step, model=model, result=result):
            changes = decomposition_by_layer(base_weights, effective_weights(model))
            result.trajectory += [(step, name, dm, dd) for name, (dm, dd) in changes.items()]
        start = time.perf_counter()
        result.train_loss = train(model, train_data, cfg.finetune_steps,
                                  cfg.full_lr if method == "full" else cfg.lr, cfg.batch,
                                  method_generator, checkpoint,
                                  max(1, cfg.finetune_steps // cfg.checkpoints))
        result.seconds = time.perf_counter() - start
        result.test_loss = evaluate(model, test_data)
        log(f"fine-tuning ({method}): {cfg.finetune_steps} steps, train loss "
            f"{result.train_loss:.4f}, held-out {result.test_loss:.4f} ({result.seconds:.1f} s)")
        results.append(result)
        if method == "dora":
            dora_model = model

    merge_difference = None
    if dora_model is not None:
        with torch.no_grad():
            unmerged = dora_model(test_data[0])
            merged = merge_adapters(copy.deepcopy(dora_model))(test_data[0])
        merge_difference = float((merged - unmerged).abs().max())
    return results, merge_difference


NAMES = {"full": "full fine-tuning", "lora": "LoRA", "dora": "DoRA"}


def format_table(results, rank):
    lines = [f"{'method':<18}{'trainable':>11}{'train loss':>12}{'held-out':>10}"
             f"{'ΔM':>9}{'ΔD':>9}{'corr(ΔM,ΔD)':>14}{'time s':>8}"]
    for r in results:
        delta_m, delta_d = r.final()
        name = NAMES[r.method] + ("" if r.method == "full" else f" r={rank}")
        lines.append(f"{name:<18}{r.trainable:>11,}{r.train_loss:>12.4f}{r.test_loss:>10.4f}"
                     f"{delta_m:>9.4f}{delta_d:>9.4f}{r.correlation():>14.2f}{r.seconds:>8.1f}")
    return "\n".join(lines)


def plot(results, path):
    """The paper's Figure 2: ΔD (x) against ΔM (y) at each checkpoint, one panel per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 4), squeeze=False)
    for axis, r in zip(axes[0], results):
        for layer in sorted({t[1] for t in r.trajectory}):
            points = [(t[3], t[2], t[0]) for t in r.trajectory if t[1] == layer]
            axis.scatter([p[0] for p in points], [p[1] for p in points], s=14,
                         label=f"layer {layer}")
        axis.set(title=f"{NAMES[r.method]} (corr {r.correlation():.2f})", xlabel="ΔD",
                 ylabel="ΔM")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
