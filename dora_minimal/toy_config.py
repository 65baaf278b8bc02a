"""The toy experiment's settings (dora_minimal.toy), apart from the experiment so that the main
command can read its defaults and check its options without importing torch."""

from dataclasses import dataclass


@dataclass
class ToyConfig:
    seed: int = 0
    in_features: int = 32
    hidden: int = 64
    hidden_layers: int = 6         # the (hidden, hidden) layers: shifted, then measured
    out_features: int = 8
    train_size: int = 8192
    test_size: int = 1024
    batch: int = 64
    pretrain_steps: int = 1500
    pretrain_lr: float = 3e-3
    finetune_steps: int = 600      # per method; the main command's --finetune-steps (or --steps)
    checkpoints: int = 4           # the paper: 3 intermediate checkpoints and the final one
    rank: int = 4
    lora_alpha: float = 8.0
    lr: float = 2e-3               # LoRA and DoRA
    full_lr: float = 1e-3          # full fine-tuning
    rescale: float = 0.3           # rescaled layers: each row times a factor in [1 - 0.3, 1 + 0.3]
    tilt: float = 0.5              # tilted layers: a rank-2 update of 0.5 x the weight's norm
    shift: str = "alternate"       # or "both": every hidden layer rescaled and tilted (a control)
    device: str = "cpu"
    methods: tuple = ("full", "lora", "dora")

    def layer_sizes(self):
        """[(in, out)] of the MLP's linear layers: in -> hidden, hidden_layers x (hidden -> hidden),
        hidden -> out."""
        sizes = [self.in_features] + [self.hidden] * (self.hidden_layers + 1) + [self.out_features]
        return list(zip(sizes[:-1], sizes[1:]))

    def trainable_count(self, method, rank=None):
        """How many parameters `method` ('full', 'lora' or 'dora') trains, at `rank` (default
        self.rank): every weight and bias; r (in + out) per layer; that plus out per layer."""
        r = self.rank if rank is None else rank
        sizes = self.layer_sizes()
        if method == "full":
            return sum(fan_in * fan_out + fan_out for fan_in, fan_out in sizes)
        lora = sum(r * (fan_in + fan_out) for fan_in, fan_out in sizes)
        return lora + (sum(fan_out for _, fan_out in sizes) if method == "dora" else 0)
