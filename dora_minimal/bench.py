"""python -m dora_minimal.bench: what an adapter costs next to the frozen layer it adapts.

For one layer (same weights, same input) it times forward+backward and eval forward, and on CUDA
measures peak memory beyond the parameters and the input, for:

    frozen          the base linear, forward + input gradient: the floor any adapter pays
    lora            this project's LoRA (DoRALinear, use_dora=False)
    dora            this project's DoRA, norm detached (Eq. 11)
    dora-exact      this project's DoRA, exact gradient (Eq. 6)
    textbook        DoRA as the paper writes it: materialize V', plain autograd
    peft-lora, peft-dora                    Hugging Face PEFT, adapters upcast to float32 (default)
    peft-lora-keep, peft-dora-keep          PEFT with autocast_adapter_dtype=False
    (the PEFT rows only when peft is importable; it is never a dependency)
    dora@core, dora@merged_weight, dora@blocked    with --compare-routes: DoRA with each named
                    route of dora_minimal.routes forced (--route NAME forces one everywhere)

Times are medians over --repeat runs after warm-up (CUDA events on a GPU). Memory is the CUDA
allocator's peak on a GPU; elsewhere it is counted (PeakMemory: the bytes of tensors alive at
once). Each row's ratio is to the floor, measured in the same run. `--device meta` counts memory
at any size without computing anything (and times nothing).
"""

import argparse
import copy
import json
import platform
import statistics
import time
import weakref
from datetime import date

import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .checks import check_command_line
from .layer import DoRALinear
from .routes import ROUTES, force_route

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def make_layers(args, device, dtype):
    """The base nn.Linear and our adapted layers, with B != 0 and m != ‖W0‖_c (trained-like)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(args.in_features, args.out_features, device=device, dtype=dtype)
    base.requires_grad_(False)
    dora = DoRALinear.from_base(base, args.rank, args.alpha)
    with torch.no_grad():
        dora.lora_B.normal_(0, 0.01)
        dora.magnitude.mul_(1.01)
    exact = copy.deepcopy(dora)
    exact.detach_norm = False
    lora = DoRALinear.from_base(base, args.rank, args.alpha, use_dora=False)
    with torch.no_grad():
        lora.lora_A.copy_(dora.lora_A)
        lora.lora_B.copy_(dora.lora_B)
    return base, {"lora": lora, "dora": dora, "dora-exact": exact}


def textbook_dora(layer):
    """DoRA as written in the paper: V' materialized, norm detached, autograd does the rest."""
    def forward(x):
        V = layer.weight + layer.scaling * layer.lora_B @ layer.lora_A  # (out, in)
        norm = torch.linalg.vector_norm(V, dim=1).detach()
        return F.linear(x, layer.magnitude.to(V.dtype)[:, None] * V / norm[:, None], layer.bias)
    return forward


def peft_layers(base, ours, args):
    """PEFT's LoRA and DoRA on the same weights, when peft is importable (else {})."""
    try:
        import peft
    except ImportError:
        return {}
    layers = {}
    for use_dora in (False, True):
        for keep in (False, True):
            name = f"peft-{'dora' if use_dora else 'lora'}{'-keep' if keep else ''}"
            layers[name] = peft_copy(peft, base, ours["dora" if use_dora else "lora"], args.rank,
                                     args.alpha, use_dora, keep)
    return layers


def peft_copy(peft, base, source, rank, alpha, use_dora, keep):
    """A PeftModel around nn.Sequential(copy of base) holding source's lora_A, lora_B (and
    magnitude); keep: the adapter stays in the layer's dtype (autocast_adapter_dtype=False)."""
    model = peft.get_peft_model(
        torch.nn.Sequential(copy.deepcopy(base)),
        peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"], use_dora=use_dora),
        autocast_adapter_dtype=not keep)
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(source.lora_A)
        layer.lora_B["default"].weight.copy_(source.lora_B)
        if use_dora:
            layer.lora_magnitude_vector["default"].weight.copy_(source.magnitude)
    return model


def timer(device):
    """A function that runs fn and returns its time in ms (CUDA events on a GPU)."""
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
    else:
        def run(fn):
            begin = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - begin)
    return run


class PeakMemory(TorchDispatchMode):
    """Inside `with PeakMemory() as memory:`, memory.peak is the most bytes that tensors created
    inside it took at one time: what torch.cuda.max_memory_allocated counts on a GPU (less its
    rounding), but on any device, meta included. A tensor counts by its storage, from the op that
    creates it until it is freed. One difference: autograd does not add two gradients of one
    tensor in place while such a mode is on, so a model whose input gets gradients from two
    branches counts one gradient more than a GPU holds."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _free(self, size):
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        # a view, an in-place or an out= result shares an input's storage: nothing new
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(result):
            storage = t.untyped_storage() if isinstance(t, torch.Tensor) else None
            if storage is not None and storage._cdata not in inputs:
                self.live += storage.nbytes()
                weakref.finalize(storage, self._free, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return result


def peak_memory_mib(fn, device):
    """Peak memory of fn() beyond what was allocated before it, in MiB: the CUDA allocator's
    on a GPU, else counted by PeakMemory."""
    if device.type != "cuda":
        with PeakMemory() as memory:
            fn()
        return memory.peak / 2**20
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure(functions, device, warmup, repeat):
    """{name: (median ms or None on meta, peak extra MiB)} of each fn() in `functions`.

    The timed runs are interleaved (one run of each, `repeat` times), so that a machine that
    speeds up or slows down during the run affects every variant alike.
    """
    clock, memory = timer(device), {}
    for name, fn in functions.items():
        for _ in range(warmup):
            fn()
        memory[name] = peak_memory_mib(fn, device)
    if device.type == "meta":  # nothing is computed there, so there is nothing to time
        return {name: (None, memory[name]) for name in functions}
    times = {name: [] for name in functions}
    for _ in range(repeat):
        for name, fn in functions.items():
            times[name].append(clock(fn))
    return {name: (statistics.median(times[name]), memory[name]) for name in functions}


def train_step(module, x, grad_y, parameters):
    """forward + backward; then every gradient is freed, so none is accumulated into."""
    def step():
        module(x).backward(grad_y)
        for p in parameters:
            p.grad = None
    return step


def forcing(route, fn):
    """fn() with every DoRA call of a linear layer taking `route` (dora_minimal.routes)."""
    def forced():
        with force_route(route):
            return fn()
    return forced


def run(args):
    with force_route(args.route):
        return _run(args)


def _run(args):
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    base, ours = make_layers(args, device, dtype)
    x = torch.randn(args.tokens, args.in_features, device=device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(args.tokens, args.out_features, device=device, dtype=dtype)
    train = {"frozen": base, **ours, "textbook": textbook_dora(ours["dora"])}
    if not args.no_peft:
        train.update(peft_layers(base, ours, args))

    parameters = [x] + [p for m in train.values() if isinstance(m, torch.nn.Module)
                        for p in m.parameters()]
    steps = {name: train_step(module, x, grad_y, parameters) for name, module in train.items()}
    for route in ROUTES if args.compare_routes else ():
        steps[f"dora@{route}"] = forcing(route, steps["dora"])
    rows = [{"variant": name, "phase": "fwd+bwd", "ms": ms, "extra_mib": mib}
            for name, (ms, mib) in measure(steps, device, args.warmup, args.repeat).items()]

    # (meta tensors hold no values to merge; a merged layer has the base layer's shapes)
    merged = ours["dora"].to_base() if device.type != "meta" else copy.deepcopy(base)
    evaluation = {"frozen": base, "lora": ours["lora"], "dora": ours["dora"], "merged": merged}
    for module in evaluation.values():
        module.eval()
    with torch.no_grad():
        forwards = {name: (lambda module=module: module(x)) for name, module in evaluation.items()}
        for route in ROUTES if args.compare_routes else ():
            forwards[f"dora@{route}"] = forcing(route, forwards["dora"])
        rows += [{"variant": name, "phase": "eval", "ms": ms, "extra_mib": mib}
                 for name, (ms, mib) in measure(forwards, device, args.warmup,
                                                args.repeat).items()]
    check = args.check and device.type != "meta"  # meta tensors hold no numbers to check
    accuracy = accuracy_against_float64(ours["dora"], x, grad_y) if check else None
    for row in rows:
        floor = next(r for r in rows if r["variant"] == "frozen" and r["phase"] == row["phase"])
        row["x_floor"] = None if row["ms"] is None else row["ms"] / floor["ms"]
        if floor["extra_mib"]:
            row["mib_x_floor"] = row["extra_mib"] / floor["extra_mib"]
    memory = "CUDA allocator's peak" if device.type == "cuda" else "counted (PeakMemory)"
    return {"config": vars(args), "device": device_name(device), "torch": torch.__version__,
            "date": date.today().isoformat(), "rows": rows, "memory": memory,
            "accuracy": accuracy}


def accuracy_against_float64(layer, x, grad_y):
    """Relative error (max|a-b| / max|b|) of DoRA's output and gradients against the same layer
    in float64, on the same numbers."""
    errors, results = {}, []
    for dtype in (None, torch.float64):
        module = copy.deepcopy(layer).train() if dtype is None else copy.deepcopy(layer).double()
        inputs = x.detach().clone().to(dtype or x.dtype).requires_grad_()
        y = module(inputs)
        y.backward(grad_y.to(y.dtype))
        results.append({"y": y.detach(), "x": inputs.grad, "lora_A": module.lora_A.grad,
                        "lora_B": module.lora_B.grad, "magnitude": module.magnitude.grad})
    for name, exact in results[1].items():
        errors[name] = float((results[0][name].double() - exact).abs().max() / exact.abs().max())
    return errors


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def format_table(result):
    c = result["config"]
    lines = [f"{result['device']}, torch {result['torch']}, {result['date']}: {c['dtype']}, "
             f"in={c['in_features']}, out={c['out_features']}, tokens={c['tokens']}, "
             f"r={c['rank']}, alpha={c['alpha']:g}",
             f"{'phase':<8}{'variant':<16}{'ms':>9}{'x floor':>9}{'extra MiB':>11}{'x floor':>9}"]
    for r in result["rows"]:
        time = f"{r['ms']:>9.3f}{r['x_floor']:>9.2f}" if r["ms"] is not None else f"{'-':>9}" * 2
        lines.append(f"{r['phase']:<8}{r['variant']:<16}{time}{r['extra_mib']:>11.1f}"
                     f"{r.get('mib_x_floor', float('nan')):>9.2f}")
    return "\n".join(lines + [f"memory: {result['memory']}"])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dora_minimal.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--in-features", type=int, default=1024)
    parser.add_argument("--out-features", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--repeat", type=int, default=20, help="timed runs (median is reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT even if installed")
    parser.add_argument("--route", choices=ROUTES, default=None,
                        help="make every DoRA call take this route (default: as chosen)")
    parser.add_argument("--compare-routes", action="store_true",
                        help="add a row 'dora@NAME' for each route, forced")
    parser.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (torch.set_num_threads; default: torch's)")
    parser.add_argument("--decode", action="store_true",
                        help="instead: the eval table of one layer at T tokens per call, cached "
                             "and merged DoRA included (dora_minimal.bench_decode)")
    parser.add_argument("--generate", action="store_true",
                        help="instead (or after --decode): generate() tokens/s of a tiny GPT-2 "
                             "and Llama (needs transformers)")
    parser.add_argument("--decode-sizes", type=int, nargs="+", default=[1024, 4096],
                        metavar="N", help="--decode: in = out = N for each N")
    parser.add_argument("--decode-tokens", type=int, nargs="+", default=[1, 8, 64],
                        metavar="T", help="--decode: tokens per call")
    parser.add_argument("--new-tokens", type=int, default=32, help="--generate: tokens per call")
    parser.add_argument("--generate-rounds", type=int, default=5,
                        help="--generate: timed rounds (median is reported)")
    parser.add_argument("--generate-width", type=int, default=256,
                        help="--generate: the models' hidden size (4 heads, 4 layers)")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the accuracy check of DoRA against float64")
    args = parser.parse_args(argv)
    check_command_line(parser, args, ("in_features", "out_features", "tokens", "rank", "repeat",
                                      "new_tokens", "generate_rounds", "generate_width"))
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads: expected an integer >= 1, got {args.threads}")
    for name in ("decode_sizes", "decode_tokens"):
        if min(getattr(args, name)) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected integers >= 1, "
                         f"got {getattr(args, name)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.decode or args.generate:
        return main_decode(args)
    result = run(args)
    print(format_table(result))
    if result["accuracy"]:
        print("DoRA vs float64, relative error: " + ", ".join(
            f"{name} {error:.1e}" for name, error in result["accuracy"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def main_decode(args):
    """--decode and/or --generate: print the tables (and write them to --json)."""
    from . import bench_decode  # (it imports this module)
    result = {}
    if args.decode:
        result["decode"] = bench_decode.run_decode(args)
        print(bench_decode.format_decode(result["decode"]))
    if args.generate:
        result["generate"] = bench_decode.generate_rows(args)
        print(bench_decode.format_generate(result["generate"], args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
