"""dora_minimal: DoRA (weight-decomposed low-rank adaptation), small, exact and readable.

    reference    the four steps and their gradients in NumPy, as the paper writes them
    functional   dora_linear: the same in PyTorch, with a hand-written backward
    layer        DoRALinear: an nn.Linear with a LoRA or DoRA adapter
"""

from . import reference
from .functional import DoRAFunction, dora_linear, lora_linear
from .layer import DoRALinear

__all__ = ["reference", "DoRAFunction", "dora_linear", "lora_linear", "DoRALinear"]
