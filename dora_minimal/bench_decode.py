"""The adapter in use, not trained: `python -m dora_minimal.bench --decode` and `--generate`.

--decode    one linear layer in eval mode under torch.no_grad(), T tokens per call (T = 1 is one
            generate() step), for each size in --decode-sizes: the frozen layer, our LoRA, our
            DoRA uncached, inside dm.cached_scale and merged (to_base()), and where peft is
            installed its LoRA, DoRA and DoRA inside its DoraCaching (PEFT's layers called
            directly, adapters in the layer's dtype). Medians of interleaved rounds (each
            round calls every variant once); each row's ratio is to the frozen layer at the
            same T; MiB: the peak memory a call adds, and what the variant holds between calls
            (a cache).
--generate  transformers' generate() (greedy, --new-tokens tokens) of a tiny GPT-2 and a tiny
            Llama (4 layers of --generate-width) with LoRA or DoRA on every linear layer
            (r = --rank): tokens per second of LoRA, DoRA uncached, DoRA inside cached_scale and
            the merged DoRA model, and whether each generates the merged model's tokens.
"""

import copy

import torch

from .adapters import LoraConfig, adapter_layers, get_peft_model, merge_adapters
from .bench import DTYPES, device_name, make_layers, measure, peft_copy, timer
from .cache import cached_scale


def held_mib(layer):
    """MiB a layer keeps between calls beyond its parameters: ours, c; PEFT's, its DoRA cache."""
    cache = getattr(layer, "_scale_cache", None)
    if cache is not None:
        return 0.0 if cache.scale is None else cache.scale.nbytes / 2**20
    magnitude = getattr(layer, "lora_magnitude_vector", None)
    if magnitude is None or "default" not in magnitude:
        return 0.0
    values = magnitude["default"]._dora_cache.values()
    return sum(v.nbytes for v in values if isinstance(v, torch.Tensor)) / 2**20


def peft_decode_layers(base, ours, rank, alpha):
    """PEFT's LoRA and DoRA layers (two DoRA ones: PEFT's cache is cleared by an uncached call)
    on our weights, adapters in the layer's dtype; {} without peft."""
    try:
        import peft
        from peft.helpers import DoraCaching
    except ImportError:
        return {}, None
    layers = {}
    for name, use_dora in (("peft-lora", False), ("peft-dora", True), ("peft-dora-cached", True)):
        model = peft_copy(peft, base, ours["dora" if use_dora else "lora"], rank, alpha, use_dora,
                          keep=True)
        layers[name] = model.base_model.model[0].eval()
    return layers, DoraCaching


def decode_rows(args, size, tokens_list, device, dtype):
    """Rows {variant, tokens, ms, x_frozen, extra_mib, held_mib} for one in = out = size."""
    sized = copy.copy(args)
    sized.in_features = sized.out_features = size
    base, ours = make_layers(sized, device, dtype)
    cached = copy.deepcopy(ours["dora"])
    layers = {"frozen": base, "lora": ours["lora"], "dora": ours["dora"],
              "dora-cached": cached, "merged": ours["dora"].to_base()}
    peft_layers, peft_caching = ({}, None) if args.no_peft else peft_decode_layers(
        base, ours, args.rank, args.alpha)
    layers.update(peft_layers)
    for layer in layers.values():
        layer.eval()
    # fewer rounds above 1024 (a sixteenth at 4096): the uncached DoRA calls dominate the run
    repeat = max(7, args.repeat * 1024**2 // max(size, 1024)**2)
    rows = []
    with torch.no_grad(), cached_scale(cached):
        for tokens in tokens_list:
            x = torch.randn(tokens, size, device=device, dtype=dtype)
            calls = {name: (lambda layer=layer: layer(x)) for name, layer in layers.items()}
            if "peft-dora-cached" in calls:
                def peft_cached(layer=layers["peft-dora-cached"]):
                    with peft_caching():
                        return layer(x)
                calls["peft-dora-cached"] = peft_cached
            results = measure(calls, device, args.warmup, repeat)
            floor = results["frozen"][0]
            for name, (ms, mib) in results.items():
                rows.append({"variant": name, "size": size, "tokens": tokens, "ms": ms,
                             "x_frozen": ms / floor, "extra_mib": mib,
                             "held_mib": held_mib(layers[name])})
    return rows


def run_decode(args):
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    rows = []
    for size in args.decode_sizes:
        rows += decode_rows(args, size, args.decode_tokens, device, dtype)
    return {"device": device_name(device), "torch": torch.__version__, "peft": peft_version(),
            "dtype": args.dtype, "rank": args.rank, "alpha": args.alpha, "rows": rows}


def peft_version():
    try:
        import peft
    except ImportError:
        return None
    return peft.__version__


def format_decode(result):
    rows, lines = result["rows"], []
    head = (f"decode: one layer, eval, no_grad; {result['device']}, torch {result['torch']}, "
            f"peft {result['peft'] or '-'}, {result['dtype']}, r={result['rank']}, "
            f"alpha={result['alpha']:g}")
    lines.append(head)
    for size in dict.fromkeys(r["size"] for r in rows):
        block = [r for r in rows if r["size"] == size]
        tokens_list = list(dict.fromkeys(r["tokens"] for r in block))
        lines.append(f"\n{size} x {size}   " + "".join(
            f"{f'T={t}: ms':>12}{'x frozen':>9}{'MiB':>7}" for t in tokens_list)
            + f"{'held MiB':>10}")
        for variant in dict.fromkeys(r["variant"] for r in block):
            cells = {r["tokens"]: r for r in block if r["variant"] == variant}
            lines.append(f"{variant:<18}" + "".join(
                f"{cells[t]['ms']:>12.3f}{cells[t]['x_frozen']:>9.2f}{cells[t]['extra_mib']:>7.1f}"
                for t in tokens_list) + f"{cells[tokens_list[0]]['held_mib']:>10.3f}")
        get = {(r["variant"], r["tokens"]): r["ms"] for r in block}
        ratios = [f"T={t}: ours {get['dora-cached', t] / get['lora', t]:.2f}" + (
            f", PEFT's {get['peft-dora-cached', t] / get['peft-lora', t]:.2f}"
            if ("peft-dora-cached", t) in get else "") for t in tokens_list]
        lines.append("DoRA cached / LoRA: " + "; ".join(ratios))
    return "\n".join(lines)


# --- generate() --------------------------------------------------------------------------------

def tiny_models(width):
    """{name: a tiny transformers causal LM}: GPT-2 and Llama, 4 layers of `width`."""
    import transformers as T
    torch.manual_seed(0)
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=1000, n_positions=128, n_embd=width,
                                          n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0))
    torch.manual_seed(0)
    llama = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=1000, hidden_size=width,
                                             intermediate_size=2 * width, num_hidden_layers=4,
                                             num_attention_heads=4, num_key_value_heads=4))
    return {"gpt2": gpt2, "llama": llama}


def generate_rows(args):
    """Rows {model, variant, tokens_per_s, same_as_merged} of generate() per variant."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    rows, clock = [], timer(device)
    options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                   do_sample=False, pad_token_id=0)
    for name, base in tiny_models(args.generate_width).items():
        base = base.to(device=device, dtype=dtype).eval()
        models = {}
        for use_dora in (False, True):
            torch.manual_seed(1)
            model = get_peft_model(copy.deepcopy(base), LoraConfig(
                r=args.rank, lora_alpha=args.alpha, target_modules="all-linear",
                use_dora=use_dora))
            with torch.no_grad():  # a trained-looking adapter
                for _, layer in adapter_layers(model):
                    layer.lora_B.normal_(0, 0.01)
                    if use_dora:
                        layer.magnitude.mul_(1.01)
            models["dora" if use_dora else "lora"] = model
        models["merged"] = merge_adapters(copy.deepcopy(models["dora"]))
        models["dora-cached"] = copy.deepcopy(models["dora"])
        prompt = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(2))
        prompt = prompt.to(device)
        calls = {variant: (lambda m=model: m.generate(prompt, **options))
                 for variant, model in models.items()}
        calls = {v: calls[v] for v in ("lora", "dora", "dora-cached", "merged")}
        times = {v: [] for v in calls}
        with torch.no_grad(), cached_scale(models["dora-cached"]):
            tokens = {v: call() for v, call in calls.items()}  # (also the warm-up)
            for _ in range(args.generate_rounds):
                for v, call in calls.items():
                    times[v].append(clock(call))
        for v in calls:
            ms = sorted(times[v])[len(times[v]) // 2]
            same = None if v == "lora" else bool(torch.equal(tokens[v], tokens["merged"]))
            rows.append({"model": name, "variant": v, "tokens_per_s": 1e3 * args.new_tokens / ms,
                         "same_as_merged": same})
    return rows


def format_generate(rows, args):
    lines = [f"\ngenerate(): {args.new_tokens} new tokens, greedy, batch 1, 4 layers of width "
             f"{args.generate_width}, every linear layer adapted, r={args.rank}, {args.dtype}; "
             f"median of {args.generate_rounds} rounds",
             f"{'model':<8}{'variant':<14}{'tokens/s':>10}{'x LoRA':>8}  "
             f"same tokens as the merged DoRA model"]
    for row in rows:
        lora = next(r for r in rows if r["model"] == row["model"] and r["variant"] == "lora")
        lines.append(f"{row['model']:<8}{row['variant']:<14}{row['tokens_per_s']:>10.1f}"
                     f"{row['tokens_per_s'] / lora['tokens_per_s']:>8.2f}  "
                     f"{ {None: '-', True: 'yes', False: 'NO'}[row['same_as_merged']]}")
    return "\n".join(lines)
