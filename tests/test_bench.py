"""python -m dora_minimal.bench at a tiny size: a smoke test of the command, not a timing test."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dora_minimal import bench


def test_bench_runs_every_variant_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    bench.main(["--in-features", "12", "--out-features", "10", "--tokens", "7", "--rank", "2",
                "--repeat", "2", "--warmup", "1", "--dtype", "float64", "--json", str(path)])
    result = json.loads(path.read_text())
    rows = {(r["phase"], r["variant"]): r for r in result["rows"]}
    for variant in ["frozen", "lora", "dora", "dora-exact", "textbook"]:
        assert rows["fwd+bwd", variant]["ms"] > 0
    for variant in ["frozen", "lora", "dora", "merged"]:
        assert rows["eval", variant]["x_floor"] > 0
    assert rows["fwd+bwd", "frozen"]["x_floor"] == 1.0
    assert all(error < 1e-12 for error in result["accuracy"].values())  # float64 vs float64
    printed = capsys.readouterr().out
    assert "dora-exact" in printed and "x floor" in printed


def test_bench_layers_compute_the_same_function():
    args = bench.parse_args(["--in-features", "9", "--out-features", "5", "--rank", "3",
                             "--dtype", "float64"])
    base, ours = bench.make_layers(args, torch.device("cpu"), torch.float64)
    x = torch.randn(4, 9, dtype=torch.float64)
    y = ours["dora"](x)
    assert torch.allclose(bench.textbook_dora(ours["dora"])(x), y, rtol=1e-12, atol=1e-12)
    assert torch.allclose(ours["dora-exact"](x), y, rtol=0, atol=0)
    assert not torch.allclose(base(x), y)


def test_bench_on_meta_counts_memory_at_full_size_without_computing(capsys):
    """Meta tensors have shapes and no values: memory is counted at a size this machine could not
    compute in a test, and no time is reported."""
    bench.main(["--device", "meta", "--dtype", "bfloat16", "--in-features", "4096",
                "--out-features", "4096", "--tokens", "8192", "--no-peft"])
    printed = capsys.readouterr().out
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in printed.splitlines()[2:-1]}
    # the floor holds y (8192, 4096) and ∂L/∂x (8192, 4096) in bf16: 64 + 64 MiB; no times
    assert rows["fwd+bwd", "frozen"] == ["-", "-", "128.0", "1.00"]
    assert float(rows["fwd+bwd", "dora"][2]) < 2 * 128
    assert "counted" in printed.splitlines()[-1]


def test_peak_memory_counts_live_tensors_once_and_not_views():
    with bench.PeakMemory() as memory:
        a = torch.empty(1000)  # 4000 bytes
        b = torch.empty(500)  # 2000
        view = a[:10]  # a view and an in-place result: nothing new
        b.add_(1)
        del a, view
        c = torch.empty(200)  # 800, after a's 4000 were freed
    assert memory.peak == 6000 and memory.live == 2800
    del b, c
    assert memory.live == 0


def test_the_gpu_sessions_scripts_run_here_as_far_as_a_cpu_can():
    """.ci/gpu is run once per GPU session, with minutes of device time: it must not fail for a
    name that changed since. Its probe runs here on the CPU (small sizes), and bash reads it."""
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run(["bash", "-n", str(root / ".ci" / "gpu")]).returncode == 0
    probe = subprocess.run([sys.executable, str(root / ".ci" / "gpu_probe.py"), "--device", "cpu"],
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    for label in ("as chosen", "one block", "eighths"):
        assert label in probe.stdout


def test_bench_rejects_bad_options_before_running(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--tokens", "0"])
    assert "--tokens: expected an integer >= 1, got 0" in capsys.readouterr().err
    if not torch.cuda.is_available():  # with a GPU, --device cuda is a valid choice
        with pytest.raises(SystemExit):
            bench.parse_args(["--device", "cuda"])
        assert "--device cuda: torch sees no CUDA GPU here" in capsys.readouterr().err


def test_bench_decode_prints_every_variant_at_every_size_and_token_count(tmp_path, capsys):
    path = tmp_path / "decode.json"
    bench.main(["--decode", "--decode-sizes", "8", "12", "--decode-tokens", "1", "3", "--rank",
                "2", "--repeat", "2", "--warmup", "1", "--dtype", "float64", "--json", str(path)])
    rows = json.loads(path.read_text())["decode"]["rows"]
    variants = ["frozen", "lora", "dora", "dora-cached", "merged"]
    try:
        import peft  # noqa: F401
        variants += ["peft-lora", "peft-dora", "peft-dora-cached"]
    except ImportError:
        pass
    assert [(r["size"], r["tokens"], r["variant"]) for r in rows] == [
        (size, tokens, variant) for size in (8, 12) for tokens in (1, 3) for variant in variants]
    assert all(r["ms"] > 0 for r in rows)
    held = {(r["size"], r["variant"]): r["held_mib"] for r in rows}
    assert held[12, "dora-cached"] == 12 * 8 / 2**20  # c: 12 float64 numbers
    assert held[12, "lora"] == 0
    printed = capsys.readouterr().out
    assert "dora-cached" in printed and "DoRA cached / LoRA: T=1" in printed


@pytest.mark.interop
def test_bench_generate_times_and_compares_tokens(capsys):
    pytest.importorskip("transformers")
    bench.main(["--generate", "--new-tokens", "2", "--generate-rounds", "1", "--rank", "2",
                "--generate-width", "8", "--dtype", "float64"])
    lines = capsys.readouterr().out.splitlines()
    table = {tuple(line.split()[:2]): line.split()[2:] for line in lines[3:]}
    for model in ("gpt2", "llama"):
        for variant in ("lora", "dora", "dora-cached", "merged"):
            assert float(table[model, variant][0]) > 0
            # float64: the merged DoRA model's tokens (LoRA's adapter is another one)
            assert table[model, variant][-1] == ("-" if variant == "lora" else "yes")
