"""python -m dora_minimal.bench at a tiny size: a smoke test of the command, not a timing test."""

import json

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
