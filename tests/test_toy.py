"""The toy experiment (dora_minimal.toy), the main command (python -m dora_minimal) and the
tutorial's figures (dora_minimal.figures)."""

import importlib.util
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import dora_minimal.__main__ as main_command
from dora_minimal import figures, ranks, toy
from dora_minimal.toy import MethodResult, ToyConfig, ToyRun, run

SMALL = dict(pretrain_steps=30, finetune_steps=20, checkpoints=4, train_size=256, test_size=128)
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as the main command uses: two are many times slower on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the experiment ---------------------------------------------------------------------------

def test_checkpoints_are_evenly_spread_and_end_at_the_last_step():
    assert toy.checkpoint_steps(600, 4) == [150, 300, 450, 600]
    assert toy.checkpoint_steps(10, 3) == [3, 7, 10]
    assert toy.checkpoint_steps(5, 5) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="count: expected 1 <= count <= steps = 3, got 4"):
        toy.checkpoint_steps(3, 4)


def test_shifted_task_rescales_or_tilts_the_hidden_layers_and_nothing_else():
    cfg = ToyConfig(hidden=16, hidden_layers=4)
    model = toy.make_mlp(cfg)
    shifted = toy.shifted_copy(model, cfg, torch.Generator().manual_seed(0))
    shifts = toy.hidden_layer_shifts(cfg)
    assert shifts == {"2": "rescale", "4": "tilt", "6": "rescale", "8": "tilt"}
    for name, module in model.named_children():
        if not isinstance(module, torch.nn.Linear):
            continue
        W0, W = module.weight.detach(), shifted.get_submodule(name).weight.detach()
        norms0, norms = W0.norm(dim=1), W.norm(dim=1)
        cos = (W * W0).sum(1) / (norms * norms0)
        if shifts.get(name) == "rescale":  # same directions, norms within 1 ± rescale
            assert torch.allclose(cos, torch.ones_like(cos), atol=1e-6)
            ratio = norms / norms0
            assert ((ratio - 1).abs() <= cfg.rescale + 1e-6).all() and ratio.std() > 0.05
        elif shifts.get(name) == "tilt":  # same norms, turned rows
            assert torch.allclose(norms, norms0, rtol=1e-5)
            assert (1 - cos).mean() > 0.01
        else:
            assert torch.equal(W, W0), name


def test_the_control_task_tilts_and_rescales_every_hidden_layer():
    cfg = ToyConfig(hidden=16, hidden_layers=2, shift="both")
    model = toy.make_mlp(cfg)
    shifted = toy.shifted_copy(model, cfg, torch.Generator().manual_seed(0))
    for name in ("2", "4"):
        W0, W = model.get_submodule(name).weight, shifted.get_submodule(name).weight
        cos = torch.nn.functional.cosine_similarity(W, W0, dim=1)
        ratio = W.norm(dim=1) / W0.norm(dim=1)
        assert (1 - cos).mean() > 0.01 and (ratio - 1).abs().mean() > 0.05
    with pytest.raises(ValueError, match="shift: expected 'alternate' or 'both', got 'all'"):
        toy.hidden_layer_shifts(ToyConfig(shift="all"))


def test_pooled_correlation_is_pearson_over_every_layer_and_checkpoint():
    rng = np.random.default_rng(0)
    points = [(step, layer, rng.random(), rng.random()) for step in (5, 10) for layer in "abc"]
    result = MethodResult("dora", 1, 2, trajectory=points)
    delta_m, delta_d = [p[2] for p in points], [p[3] for p in points]
    assert result.correlation() == pytest.approx(np.corrcoef(delta_m, delta_d)[0, 1], rel=1e-12)
    assert result.final() == pytest.approx((np.mean(delta_m[3:]), np.mean(delta_d[3:])))


def test_toy_run_is_deterministic_measures_each_hidden_layer_and_merging_changes_nothing():
    cfg = ToyConfig(**SMALL)
    first, again = run(cfg, log=lambda line: None), run(cfg, log=lambda line: None)
    assert [r.method for r in first.results] == ["full", "lora", "dora"]
    for a, b in zip(first.results, again.results):
        assert (a.train_loss, a.test_loss, a.losses, a.trajectory) == (
            b.train_loss, b.test_loss, b.losses, b.trajectory)
    linears = [(32, 64)] + [(64, 64)] * 6 + [(64, 8)]  # (in, out) of the 8 layers
    lora = sum(4 * (fan_in + fan_out) for fan_in, fan_out in linears)
    assert [r.trainable for r in first.results] == [
        sum(fan_in * fan_out + fan_out for fan_in, fan_out in linears), lora,
        lora + sum(fan_out for _, fan_out in linears)]
    assert first.merge_difference < 1e-5
    dora = first.results[2]
    assert len(dora.losses) == 20
    assert [(t[0], t[1]) for t in dora.trajectory] == [
        (step, name) for step in (5, 10, 15, 20) for name in ("2", "4", "6", "8", "10", "12")]
    assert all(t[2] > 0 and t[3] > 0 for t in dora.trajectory)


def test_progress_lines_come_within_each_phase_and_the_log_says_what_each_loss_is():
    lines, log = [], []
    toy_run = run(ToyConfig(**SMALL, methods=("lora",)), log=log.append, progress=lines.append,
                  progress_lines=2)
    assert re.fullmatch(f"pretraining: 30 steps, held-out loss {toy_run.pretrain_loss:.4f} "
                        r"imitating a random teacher \([0-9]+\.[0-9] s\)", log[0]), log[0]
    assert log[1] == ("shifted task: the pretrained MLP, hidden layers rescaled or tilted; "
                      f"fine-tuning starts at {toy_run.start_loss:.4f}")
    assert log[2].startswith("fine-tuning (LoRA): 20 steps, train loss ")
    assert lines == ["  pretraining: step 15/30, batch loss " + lines[0].split()[-1],
                     "  pretraining: step 30/30, batch loss " + lines[1].split()[-1],
                     "  fine-tuning (LoRA): step 10/20, batch loss " + lines[2].split()[-1],
                     "  fine-tuning (LoRA): step 20/20, batch loss " + lines[3].split()[-1]]


def test_the_table_has_a_legend_and_says_when_no_correlation_exists():
    still = [(step, name, 0.0, 0.0) for step in (1, 2) for name in ("2", "4")]
    cfg = ToyConfig(hidden_layers=2, checkpoints=2, finetune_steps=2)
    table = toy.format_table(ToyRun(cfg, [MethodResult("lora", 10, 20, trajectory=still)],
                                    0.5, 0.25, None))
    assert "LoRA r=4" in table and " n/a " in table and "nan" not in table
    assert max(len(line) for line in table.splitlines()) <= 100
    table = " ".join(table.split())  # the legend is wrapped
    for text in ["losses: mean squared error", "before fine-tuning: 0.2500",
                 "ΔM, ΔD: Eq. 3-4", "Pearson over 4 points (2 layers x 2 checkpoints)",
                 "negative sign", "n/a: ΔM or ΔD did not vary over the points"]:
        assert text in table
    assert "diverged" not in table
    diverged = MethodResult("dora", 10, 20, test_loss=float("nan"), trajectory=still)
    table = toy.format_table(ToyRun(cfg, [diverged], 0.5, 0.25, None))
    assert "DoRA: the loss ended above where it started" in " ".join(table.split())


# --- the main command -------------------------------------------------------------------------

RANKS_EXPECTED = ("argument --ranks: expected ranks separated by commas, such as 1,2,4,8, each "
                  "an integer from 1 to 64,")


def parse_error(capsys, *argv):
    """The one-line error of the main command for argv (it must exit 2 before any work)."""
    with pytest.raises(SystemExit) as exit_info:
        main_command.main(list(argv))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("python -m dora_minimal: error: ")
    return error.removeprefix("python -m dora_minimal: error: ")


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "argument --lr: expected a finite number > 0, got -1"),
    (["--lr", "0"], "argument --lr: expected a finite number > 0, got 0"),
    (["--full-lr", "-1"], "argument --full-lr: expected a finite number > 0, got -1"),
    (["--pretrain-lr", "nan"], "argument --pretrain-lr: expected a finite number > 0, got nan"),
    (["--lora-alpha", "0"], "argument --lora-alpha: expected a finite number > 0, got 0"),
    (["--lora-alpha", "inf"], "argument --lora-alpha: expected a finite number > 0, got inf"),
    (["--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
    (["--rank", "0"], "argument --rank: expected an integer from 1 to 64, got 0"),
    (["--rank", "100"], "argument --rank: expected an integer from 1 to 64, got 100: the hidden "
     "layers are 64 x 64, where an update B A has rank at most 64, so a higher rank only adds "
     "parameters (LoRA would train 93,600, full fine-tuning trains 27,592)"),
    (["--threads", "0"], "argument --threads: expected an integer >= 1, got 0"),
    (["--steps", "0"], "argument --finetune-steps/--steps: expected an integer >= 1, got 0"),
    (["--finetune-steps", "abc"],
     "argument --finetune-steps/--steps: expected an integer >= 1, got 'abc'"),
    (["--pretrain-steps", "1.5"], "argument --pretrain-steps: expected an integer >= 1, got '1.5'"),
    (["--seed", "-3"], "argument --seed: expected an integer >= 0, got -3"),
    (["--steps", "3", "--checkpoints", "4"],
     "argument --checkpoints: expected at most --finetune-steps = 3 checkpoints, got 4"),
    (["--device", "gpu"], "argument --device: expected cpu, cuda or cuda:N, got 'gpu'"),
    (["--ranks", "1,x"], f"{RANKS_EXPECTED} got '1,x': 'x' is no integer"),
    (["--ranks", "1,,2"], f"{RANKS_EXPECTED} got '1,,2': '' is no integer"),
    (["--ranks", "4"], None),  # one rank is a sweep too
    (["--ranks", "0,2"], f"{RANKS_EXPECTED} got '0,2': 0 is below 1"),
    (["--ranks", "8,4,8"], f"{RANKS_EXPECTED} got '8,4,8': 8 is there twice"),
    (["--ranks", "2,65"], f"{RANKS_EXPECTED} got '2,65': 65 is above 64: the hidden layers are "
     "64 x 64, where an update B A has rank at most 64, so a higher rank only adds parameters "
     "(LoRA would train 60,840, full fine-tuning trains 27,592)"),
    (["--ranks", "1,2", "--rank", "8"], "argument --rank: not allowed with argument --ranks"),
    (["--seeds", "3"], "argument --seeds: only with --ranks (a single run has one seed: --seed), "
     "got --seeds 3 alone"),
    (["--ranks", "1,2", "--seeds", "1"], "argument --seeds: expected an integer >= 2, got 1"),
])
def test_bad_options_are_one_line_errors_before_any_work(capsys, monkeypatch, argv, message):
    monkeypatch.setattr(toy, "run", lambda *a, **k: pytest.fail("work was started"))
    if message is None:  # a good option: parsed, not refused
        assert main_command.parse_args(argv).ranks == [4]
        return
    monkeypatch.setattr(ranks, "rank_sweep", lambda *a, **k: pytest.fail("work was started"))
    assert parse_error(capsys, *argv) == message


def test_rank_may_be_the_hidden_width_and_steps_is_short_for_finetune_steps():
    args = main_command.parse_args(["--rank", "64", "--steps", "7"])
    assert (args.rank, args.finetune_steps) == (64, 7)
    assert main_command.parse_args(["--finetune-steps", "8"]).finetune_steps == 8
    cfg = ToyConfig()
    assert (cfg.trainable_count("full"), cfg.trainable_count("lora", 100),
            cfg.trainable_count("dora")) == (27_592, 93_600, 3_744 + 456)


def test_a_cuda_device_needs_a_gpu_that_torch_sees(capsys, monkeypatch):
    version = main_command.torch_built_without_cuda()
    built_without = torch.version.cuda is None and torch.version.hip is None
    assert version == (torch.__version__ if built_without else None)
    if version:
        assert parse_error(capsys, "--device", "cuda") == (
            f"argument --device: expected cpu: torch {version} is built without CUDA, so it "
            "sees no CUDA GPU, got 'cuda'")
    monkeypatch.setattr(main_command, "torch_built_without_cuda", lambda: None)  # a CUDA build
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parse_error(capsys, "--device", "cuda:0") == (
        "argument --device: expected cpu: torch sees no CUDA GPU here, got 'cuda:0'")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_error(capsys, "--device", "cuda:2") == (
        "argument --device: expected cpu or cuda:0 to cuda:1 (the CUDA GPUs torch sees), "
        "got 'cuda:2'")
    assert main_command.parse_args(["--device", "cuda:1"]).device == "cuda:1"


@pytest.mark.parametrize("argv", [["--rank", "0"], ["--rank", "100"], ["--steps", "abc"],
                                  ["--lora-alpha", "0"], ["--device", "cuda"],
                                  ["--steps", "3", "--checkpoints", "4"],
                                  ["--plot", "figure.txt"], ["--ranks", "1,x"],
                                  ["--ranks", "2,100"], ["--ranks", "1", "--seeds", "1"],
                                  ["--seeds", "5"]])
def test_a_bad_option_is_answered_before_torch_or_numpy_is_imported(argv):
    if argv[0] == "--device" and main_command.torch_built_without_cuda() is None:
        pytest.skip("this torch has CUDA: whether a GPU is there, torch is asked")
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "dora_minimal", *argv],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith("python -m dora_minimal: error: argument ")
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "argparse" in imported and "dora_minimal.toy_config" in imported
    assert not imported & {"torch", "numpy"}


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main_command.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    defaults = ToyConfig()
    for option, value in [("--threads", 1), ("--lr", defaults.lr), ("--full-lr", defaults.full_lr),
                          ("--pretrain-lr", defaults.pretrain_lr),
                          ("--lora-alpha", defaults.lora_alpha),
                          ("--finetune-steps", defaults.finetune_steps), ("--rank", defaults.rank)]:
        assert option in help_text and f"(default: {value})" in help_text
    assert "--finetune-steps FINETUNE_STEPS, --steps FINETUNE_STEPS" in help_text


def test_main_prints_progress_the_table_its_legend_and_the_plot(tmp_path):
    path = tmp_path / "figure.png"
    plot = ["--plot", str(path)] if HAS_MATPLOTLIB else []
    result = subprocess.run([sys.executable, "-m", "dora_minimal", "--pretrain-steps", "20",
                             "--finetune-steps", "10", "--checkpoints", "2", *plot],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    stdout = " ".join(result.stdout.split())
    for text in ["pretraining: 20 steps", "imitating a random teacher", "shifted task:",
                 "full fine-tuning", "LoRA r=4", "DoRA r=4", "corr(ΔM,ΔD)",
                 "losses: mean squared error", "Pearson over 12 points", "merged vs unmerged"]:
        assert text in stdout
    assert "fine-tuning (DoRA): step 10/10, batch loss" in result.stderr
    if HAS_MATPLOTLIB:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the rank sweep (python -m dora_minimal --ranks) ------------------------------------------

SWEEP = dict(pretrain_steps=20, finetune_steps=10, checkpoints=1)  # a tiny sweep


@pytest.fixture(scope="module")
def own_runs():
    """{(seed, rank): ToyRun} of the toy's own run (python -m dora_minimal --seed S --rank R) at
    the tiny sweep's settings, seeds 3-4 and ranks 1-2: what the sweep must reproduce."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runs = {(seed, rank): run(ToyConfig(seed=seed, rank=rank, **SWEEP), log=lambda line: None)
            for seed in (3, 4) for rank in (1, 2)}
    torch.set_num_threads(threads)
    return runs


def own_losses(own_runs, method, rank):
    """Held-out losses of `method` over seeds 3, 4 in the toy's own runs."""
    index = ("full", "lora", "dora").index(method)
    return [own_runs[seed, rank or 1].results[index].test_loss for seed in (3, 4)]


def test_the_rank_command_prints_what_the_toys_own_run_gives_for_each_seed_and_rank(
        own_runs, capsys, monkeypatch):
    sweeps = []

    def keep(sweep):  # the sweep behind the table, to compare its losses in full
        sweeps.append(sweep)
        return format_rank_table(sweep)
    format_rank_table = ranks.format_rank_table
    monkeypatch.setattr(ranks, "format_rank_table", keep)
    main_command.main(["--ranks", "2,1", "--seeds", "2", "--seed", "3", "--pretrain-steps", "20",
                       "--steps", "10", "--checkpoints", "1"])
    sweep, = sweeps
    assert sorted(sweep.losses, key=str) == sorted(
        [("full", None), ("lora", 1), ("dora", 1), ("lora", 2), ("dora", 2)], key=str)
    for method, rank in sweep.losses:  # one pretraining per seed, yet each run as if alone
        assert sweep.losses[method, rank] == own_losses(own_runs, method, rank), (method, rank)

    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split() == ["rank", "LoRA", "trained", "LoRA", "held-out", "DoRA", "trained",
                                "DoRA", "held-out", "LoRA/DoRA", "DoRA", "lower"]
    cfg = ToyConfig()

    def shown(losses):  # mean ± sample std, computed here with NumPy
        return [f"{np.mean(losses):.2e}", "±", f"{np.std(losses, ddof=1):.1e}"]
    for line, rank in zip(lines[1:3], (1, 2)):  # the ranks in increasing order
        lora, dora = own_losses(own_runs, "lora", rank), own_losses(own_runs, "dora", rank)
        ratios = np.array(lora) / np.array(dora)
        assert line.split() == [str(rank), f"{cfg.trainable_count('lora', rank):,}", *shown(lora),
                                f"{cfg.trainable_count('dora', rank):,}", *shown(dora),
                                f"{np.exp(np.log(ratios).mean()):.3g}",
                                str((ratios > 1).sum()), "of", "2"]
    assert lines[3] == (f"full fine-tuning ({cfg.trainable_count('full'):,} trained): held-out "
                        + " ".join(shown(own_losses(own_runs, "full", None))))
    assert lines[4] == ""
    legend = " ".join(" ".join(lines[5:]).split())
    start = [own_runs[seed, 1].start_loss for seed in (3, 4)]
    assert legend.startswith("held-out: mean squared error on the shifted task's held-out set "
                             "after 10 fine-tuning steps, mean ± standard deviation (n - 1) over "
                             f"seeds 3, 4; before fine-tuning: {' '.join(shown(start))}.")
    assert "LoRA and DoRA 0.002, full fine-tuning 0.001; lora_alpha 8" in legend
    assert "diverged" not in legend
    assert [line.split(":")[0] for line in captured.err.splitlines()] == ["seed 3", "seed 4"]


def test_the_rank_table_says_which_training_diverged():
    losses = {("full", None): [0.1, 0.2], ("lora", 4): [0.3, float("nan")],
              ("dora", 4): [0.1, 0.6]}  # starts: 0.5, 0.5
    sweep = ranks.RankSweep(ToyConfig(), [4], [0, 1], losses, dict.fromkeys(losses, 10),
                            [0.5, 0.5])
    legend = " ".join(ranks.format_rank_table(sweep).split())
    assert ("LoRA r=4, DoRA r=4: on some seed the loss ended above where it started (or is not "
            "finite): that training diverged") in legend


# --- the figures ------------------------------------------------------------------------------

def test_row_split_example_keeps_the_decomposition():
    e = figures.row_split_example()
    assert np.linalg.norm(e["w0"]) == pytest.approx(e["m0"])
    assert np.allclose(e["m0"] * e["d0"], e["w0"])
    assert np.allclose(e["V"], e["w0"] + e["update"])
    assert np.linalg.norm(e["w"]) == pytest.approx(e["m"]) and e["m"] != pytest.approx(e["m0"])
    assert np.allclose(e["w"] / e["m"], e["V"] / np.linalg.norm(e["V"]))
    assert e["d"] @ e["d0"] < 0.99  # the direction turned


def test_layer_paths_number_the_checkpoints_in_step_order():
    result = MethodResult("full", 1, 1, trajectory=[(20, "b", 0.3, 0.4), (10, "a", 0.1, 0.2),
                                                    (10, "b", 0.5, 0.6), (20, "a", 0.7, 0.8)])
    assert figures.layer_paths(result) == {"a": ([1, 2], [0.2, 0.8], [0.1, 0.7]),
                                           "b": ([1, 2], [0.6, 0.4], [0.5, 0.3])}


def test_fit_line_and_moving_average():
    rng = np.random.default_rng(1)
    x, y = rng.random(9), rng.random(9)
    slope, intercept = figures.fit_line(x, y)
    assert (slope, intercept) == pytest.approx(tuple(np.polyfit(x, y, 1)), rel=1e-10)
    assert np.sign(slope) == np.sign(np.corrcoef(x, y)[0, 1])
    assert np.allclose(figures.moving_average([1, 2, 3, 4, 6], 2), [1.5, 2.5, 3.5, 5])
    assert figures.moving_average([1, 2], 5).tolist() == [1.5]  # a window longer than the data


def test_hidden_layers_are_named_as_chapter_7_counts_them():
    assert figures.hidden_layer_labels(ToyConfig(hidden_layers=3)) == {
        "2": "hidden layer 1", "4": "hidden layer 2", "6": "hidden layer 3"}


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed (the plot extra)")
def test_the_scatter_names_hidden_layers_and_its_checkpoint_numbers_are_readable(tmp_path,
                                                                                 monkeypatch):
    import matplotlib.pyplot as plt
    cfg = ToyConfig(hidden_layers=2, checkpoints=2, finetune_steps=2)
    rng = np.random.default_rng(0)
    results = [MethodResult(method, 1, 2, trajectory=[
        (step, name, rng.random(), rng.random()) for step in (1, 2) for name in ("2", "4")])
        for method in ("full", "lora", "dora")]
    drawn = []
    monkeypatch.setattr(plt, "close", drawn.append)  # keep the figure to look at it
    figures.plot_delta_scatter(ToyRun(cfg, results, 0.5, 0.25, None), tmp_path / "scatter.png")
    figure, = drawn
    assert [text.get_text() for text in figure.legends[0].get_texts()] == [
        "hidden layer 1 (rescaled)", "hidden layer 2 (tilted)"]
    numbers = [text for axis in figure.axes for text in axis.texts]
    assert sorted(text.get_text() for text in numbers) == ["1"] * 6 + ["2"] * 6
    assert min(text.get_fontsize() for text in numbers) >= 8
    plt.close(figure)


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed (the plot extra)")
def test_figures_script_writes_four_small_pngs(tmp_path):
    paths = figures.make_figures(tmp_path, ToyConfig(**SMALL), log=lambda line: None,
                                 ranks=(1, 2), seeds=2)
    assert [p.name for p in paths] == ["row_split.png", "delta_m_delta_d.png",
                                       "training_curves.png", "loss_by_rank.png"]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 200_000


def test_figures_command_refuses_a_missing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        figures.main([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert "directory: expected an existing folder" in capsys.readouterr().err


def test_figures_command_without_matplotlib_says_so(tmp_path, capsys, monkeypatch):
    def no_matplotlib():
        raise ImportError("No module named 'matplotlib'")
    monkeypatch.setattr(figures, "_pyplot", no_matplotlib)
    monkeypatch.setattr(figures, "make_figures", lambda *a: pytest.fail("work was started"))
    with pytest.raises(SystemExit) as exit_info:
        figures.main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "matplotlib is not installed (pip install matplotlib)" in capsys.readouterr().err
