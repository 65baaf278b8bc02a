"""Questions for the GPU session that the benchmark's table does not answer, in one short run:

1. blocks: DoRA's step with backward's token blocks as chosen (a quarter of the tokens), one
   block (all tokens at once) and eighths: time and peak memory, to check the choice;
2. launches: the frozen layer's and DoRA's step replayed as one CUDA graph against eager, to
   tell the GPU's work from the time lost between DoRA's ~50 kernel launches.

    python .ci/gpu_probe.py [--device cuda] [--out-features 4096]    (CPU: part 1 only)
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dora_minimal import bench, routes  # noqa: E402


def steps(device, out_features):
    args = bench.parse_args(["--device", device, "--dtype", "bfloat16", "--in-features", "4096",
                             "--out-features", str(out_features), "--tokens", "8192",
                             "--no-peft"])
    if device == "cpu":  # small enough for a dry run here
        args.in_features, args.out_features, args.tokens = 256, out_features // 16, 1024
    base, ours = bench.make_layers(args, torch.device(device), bench.DTYPES[args.dtype])
    x = torch.randn(args.tokens, args.in_features, device=device, dtype=base.weight.dtype,
                    requires_grad=True)
    grad_y = torch.randn(args.tokens, args.out_features, device=device, dtype=x.dtype)
    return {name: (module, x, grad_y) for name, module in
            (("frozen", base), ("dora", ours["dora"]))}


def time_and_memory(fn, device, repeat=30):
    """(median ms, peak extra MiB) of fn(), as the benchmark measures them."""
    return bench.measure({"fn": fn}, torch.device(device), 5, repeat)["fn"]


def blocks(device, layers):
    module, x, grad_y = layers["dora"]
    step = bench.train_step(module, x, grad_y, [x, *module.parameters()])
    chosen = routes.block_tokens
    print(f"\n1. backward's token blocks ({x.shape[0]} tokens), DoRA fwd+bwd:")
    for label, size in (("as chosen", None), ("one block", x.shape[0]),
                        ("eighths", x.shape[0] // 8)):
        routes.block_tokens = chosen if size is None else (lambda *a, size=size: size)
        ms, mib = time_and_memory(step, device)
        print(f"   {label:<10} {ms:8.3f} ms {mib:8.1f} MiB")
    routes.block_tokens = chosen


def graphs(layers):
    print("\n2. eager against one CUDA graph of the whole step (grads accumulate):")
    for name, (module, x, grad_y) in layers.items():
        def step(module=module, x=x, grad_y=grad_y):
            module(x).backward(grad_y)
        eager, _ = time_and_memory(step, "cuda")
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            replay, _ = time_and_memory(graph.replay, "cuda")
            print(f"   {name:<7} eager {eager:8.3f} ms  graph {replay:8.3f} ms")
        except Exception as error:  # a capture that fails must not hide part 1
            print(f"   {name:<7} eager {eager:8.3f} ms  graph failed: {error!r}"[:300])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-features", type=int, default=4096)
    args = parser.parse_args()
    layers = steps(args.device, args.out_features)
    blocks(args.device, layers)
    if args.device == "cuda":
        graphs(layers)


if __name__ == "__main__":
    main()
