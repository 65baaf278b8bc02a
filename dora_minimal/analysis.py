"""The paper's weight-decomposition analysis (Section 3.2, Eq. 3-4).

How did fine-tuning change each output unit's magnitude and direction? With rows as output
units (w0_j the pretrained row j, w'_j the fine-tuned one, k rows):

    Eq. 3   ΔM = (1/k) Σ_j | ‖w'_j‖ - ‖w0_j‖ |
    Eq. 4   ΔD = (1/k) Σ_j (1 - cos(w'_j, w0_j))

The paper computes them for the query matrices of several layers at four checkpoints and plots
every (ΔD, ΔM) point of a method together (its Figure 2): full fine-tuning and DoRA change
direction a lot with little change of magnitude or the reverse (a falling cloud of points), while
LoRA moves both together (a rising one). dora_minimal.toy repeats the measurement on a toy.
"""

import torch
from torch import nn

from .layer import DoRALinear


def magnitude_direction_change(W0, W):
    """(ΔM, ΔD) between a pretrained weight W0 (out, in) and a fine-tuned W (out, in), as floats."""
    if W0.shape != W.shape or W0.ndim != 2:
        raise ValueError(f"W: expected the shape of W0 {tuple(W0.shape)}, got {tuple(W.shape)}")
    W0, W = W0.detach().double(), W.detach().double()
    # Eq. 3: ΔM = mean_j |m'_j - m0_j|
    delta_m = (torch.linalg.vector_norm(W, dim=1) - torch.linalg.vector_norm(W0, dim=1)).abs()
    # Eq. 4: ΔD = mean_j (1 - cos(w'_j, w0_j))
    delta_d = 1 - torch.nn.functional.cosine_similarity(W, W0, dim=1)
    return float(delta_m.mean()), float(delta_d.mean())


def effective_weights(model):
    """{name: weight} of every linear layer, adapter layers contributing their merged W'."""
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, DoRALinear):
            weights[name] = module.to_base().weight.detach().clone()
        elif isinstance(module, nn.Linear):
            weights[name] = module.weight.detach().clone()
    return weights


def decomposition_by_layer(pretrained, finetuned):
    """{name: (ΔM, ΔD)} for every layer named in both dicts of weights (see effective_weights)."""
    return {name: magnitude_direction_change(pretrained[name], finetuned[name])
            for name in pretrained if name in finetuned}


def correlation(xs, ys):
    """Pearson correlation of two equally long sequences (nan when either is constant)."""
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = torch.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")
