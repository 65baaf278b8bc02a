"""python .ci/precision.py: the float32 error of each route where s·B A nearly cancels a row of W0.

A 64 -> 16 DoRALinear (r = 8, lora_alpha = 16, s = 2) with lora_A[0] = -(1-ε)·W0[0]/s,
lora_B[0, 0] = 1 and the rest of B zero, so that V'[0] = ε·W0[0]. The truth is the textbook in
float64 on the same (float32) parameters: V' formed, W' = m V'/‖V'‖_c, y = x W'^T + b. Each
route's error (max |route - truth| / max |truth|, of y, ∂L/∂x and ∂L/∂m, L = Σ G ⊙ y, 32 tokens)
is printed as a multiple of the float32 textbook's error (median over 5 seeds). Then the eval
batch dependence: the largest difference of one token's output between batches of 1..80 tokens,
and what forming W' in every eval call would cost: the eval time of the core and of
`merged_weight` on a 1024-wide layer (r = 16, one thread, medians of interleaved runs).
"""

import statistics
import sys
import time

import torch

sys.path.insert(0, ".")
import dora_minimal as dm  # noqa: E402
from dora_minimal.routes import force_route  # noqa: E402


def cancelling_layer(eps, seed):
    torch.manual_seed(seed)
    layer = dm.DoRALinear.from_base(torch.nn.Linear(64, 16), r=8, lora_alpha=16)
    with torch.no_grad():
        layer.lora_A[0] = -(1 - eps) * layer.weight[0] / layer.scaling
        layer.lora_B.zero_()
        layer.lora_B[0, 0] = 1
    return layer


def textbook(layer, x, G, dtype):
    """y, ∂L/∂x, ∂L/∂m of the textbook DoRA in `dtype` (the norm detached, as the layer's)."""
    W0, A, B, m, b = (t.detach().to(dtype) for t in (layer.weight, layer.lora_A, layer.lora_B,
                                                      layer.magnitude, layer.bias))
    x, m = x.detach().to(dtype).requires_grad_(), m.requires_grad_()
    V = W0 + layer.scaling * (B @ A)  # (out, in): V'
    W = (m / torch.linalg.vector_norm(V, dim=1).detach())[:, None] * V  # W' = m V'/‖V'‖_c
    y = x @ W.T + b
    y.backward(G.to(dtype))
    return y.detach(), x.grad, m.grad


def ours(layer, x, G, route):
    x = x.detach().clone().requires_grad_()
    layer.magnitude.grad = None
    with force_route(route):
        y = layer(x)
    y.backward(G)
    return y.detach(), x.grad, layer.magnitude.grad


def peft_route(layer, x, G):
    from peft import LoraConfig, get_peft_model
    base = torch.nn.Sequential(torch.nn.Linear(64, 16))
    with torch.no_grad():
        base[0].weight.copy_(layer.weight)
        base[0].bias.copy_(layer.bias)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, use_dora=True,
                                            target_modules=["0"]))
    peft_layer = model.base_model.model[0]
    magnitude = peft_layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
        peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
        magnitude.copy_(layer.magnitude)
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(G)
    return y.detach(), x.grad, magnitude.grad


def error(a, truth):
    return ((a.double() - truth).abs().max() / truth.abs().max()).item()


def main():
    try:
        import peft  # noqa: F401,F811
        peers = ["peft"]
    except ImportError:
        peers = []
    names = ["core", "blocked", "merged_weight", *peers]
    print(f"torch {torch.__version__}; ratio of each route's float32 error to the float32 "
          f"textbook's (median of 5 seeds); in brackets the textbook's own error")
    print("| ε | quantity | textbook f32 error | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for eps in (1e-2, 1e-4, 1e-6):
        ratios = {(q, n): [] for q in range(3) for n in names}
        base_errors = {q: [] for q in range(3)}
        for seed in range(5):
            layer = cancelling_layer(eps, seed)
            x, G = torch.randn(32, 64), torch.randn(32, 16)
            truth = textbook(layer, x, G, torch.float64)
            single = [error(a, t) for a, t in zip(textbook(layer, x, G, torch.float32), truth)]
            for q in range(3):
                base_errors[q].append(single[q])
            for name in names:
                got = peft_route(layer, x, G) if name == "peft" else ours(layer, x, G, name)
                for q in range(3):
                    ratios[q, name].append(error(got[q], truth[q]) / max(single[q], 1e-30))
        for q, quantity in enumerate(("y", "∂L/∂x", "∂L/∂m")):
            cells = " | ".join(f"{statistics.median(ratios[q, n]):.3g}" for n in names)
            print(f"| {eps:g} | {quantity} | {statistics.median(base_errors[q]):.2g} | {cells} |")
    print("\neval (no_grad): max |y(token in a batch of k) - y(same token alone)| / max |y|, "
          "k = 1..80, by the route chosen | the core forced | merged_weight forced")
    for eps in (1e-2, 1e-4, 1e-6):
        layer = cancelling_layer(eps, 0).eval()
        x, cells = torch.randn(80, 64), []
        for route in (None, "core", "merged_weight"):
            with torch.no_grad(), force_route(route):
                alone = layer(x[:1])
                worst = max((layer(x[:k])[:1] - alone).abs().max().item() for k in range(1, 81))
            cells.append(f"{worst / alone.abs().max().item():.2g}")
        print(f"ε = {eps:g}: " + " | ".join(cells))

def eval_cost(rounds=60):
    print("\neval time (ms), in = out = 1024, r = 16, one thread: core | merged_weight")
    torch.set_num_threads(1)
    layer = dm.DoRALinear.from_base(torch.nn.Linear(1024, 1024), r=16, lora_alpha=32).eval()
    for tokens in (1, 16, 256, 1024):
        x, times = torch.randn(tokens, 1024), {"core": [], "merged_weight": []}
        with torch.no_grad():
            for _ in range(rounds):
                for route, runs in times.items():
                    with force_route(route):
                        start = time.perf_counter()
                        layer(x)
                        runs.append(1e3 * (time.perf_counter() - start))
        print(f"{tokens} tokens: " + " | ".join(f"{statistics.median(t[3:]):.2f}"
                                                 for t in times.values()))


if __name__ == "__main__":
    if sys.argv[1:] != ["--eval-cost-only"]:
        main()
    eval_cost()
