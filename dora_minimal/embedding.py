"""DoRAEmbedding: an nn.Embedding with a LoRA or DoRA adapter (PEFT's layout and math).

An embedding looks up rows of W0 (num_embeddings, embedding_dim): it is the linear map of a one-hot
index with the (out, in') = (embedding_dim, num_embeddings) weight W0^T. Its adapter is B A on that
view, looked up as the base is:

    y0 = W0[x] + s·A^T[x] B^T          A (r, num_embeddings), B (embedding_dim, r)
    y  = c ⊙ y0,  c = m / ‖W0^T + s·B A‖_c                        (DoRA, m (embedding_dim,))

so the magnitude is one per embedding dimension: the norm of each COLUMN of W0 + s·(B A)^T over
all num_embeddings rows. As PEFT: A starts at zero and B normal (the opposite of a linear layer),
the keys are `lora_embedding_A` and `lora_embedding_B`, and the adapter's lookup takes the base's
padding_idx. max_norm is refused: the lookup would renormalize looked-up rows of W0 in place, after
the magnitude was taken from it, so the layer would silently drift (PEFT has that defect). Dropout
has no meaning on indices: lora_dropout is not applied (as PEFT). The base's sparse setting is kept
for its own lookup; the adapter's gradients are dense.
"""

import torch
from torch import nn
from torch.nn import functional as F

from .base import AdaptedLayer
from .checks import check_positive_int


class DoRAEmbedding(AdaptedLayer):
    """An embedding y = W[x] whose frozen weight is adapted by LoRA or DoRA.

    Args:
        num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq,
        sparse: as nn.Embedding.
        r, lora_alpha (scaling = lora_alpha / r), use_dora, detach_norm: as DoRALinear;
        lora_dropout is accepted and not applied (see the module's docstring).
    """
    BASE_TYPES = (nn.Embedding,)
    WEIGHT_STORED_TRANSPOSED = True  # the (out, in') view is W^T
    PEFT_KEYS = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B",
                 "magnitude": "lora_magnitude_vector"}

    def __init__(self, num_embeddings, embedding_dim, r, lora_alpha, *, padding_idx=None,
                 max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False,
                 lora_dropout=0.0, use_dora=True, detach_norm=True, device=None, dtype=None):
        num_embeddings = check_positive_int("num_embeddings", num_embeddings)
        embedding_dim = check_positive_int("embedding_dim", embedding_dim)
        if padding_idx is not None:
            if not (isinstance(padding_idx, int) and -num_embeddings <= padding_idx
                    < num_embeddings):
                raise ValueError(f"padding_idx: expected None or an integer in "
                                 f"[{-num_embeddings}, {num_embeddings}), got {padding_idx!r}")
            padding_idx %= num_embeddings  # as nn.Embedding stores it
        if max_norm is not None:
            raise ValueError(f"max_norm: expected None, got {max_norm!r}: an embedding with "
                             f"max_norm renormalizes the rows it looks up in place, in its frozen "
                             f"weight, after DoRA's magnitude was taken from that weight, so the "
                             f"adapted layer would silently compute something else; set the "
                             f"embedding's max_norm = None (renormalize its weight once first if "
                             f"you need to) before adapting it")
        super().__init__(r, lora_alpha, lora_dropout, use_dora, detach_norm, False, dtype)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = padding_idx, max_norm, norm_type
        self.scale_grad_by_freq, self.sparse = scale_grad_by_freq, sparse
        self._create_parameters((num_embeddings, embedding_dim), (self.r, num_embeddings),
                                (embedding_dim, self.r), embedding_dim, False, device, dtype)

    @classmethod
    def _like(cls, embedding, **kwargs):
        return cls(embedding.num_embeddings, embedding.embedding_dim,
                   padding_idx=embedding.padding_idx, max_norm=embedding.max_norm,
                   norm_type=embedding.norm_type, scale_grad_by_freq=embedding.scale_grad_by_freq,
                   sparse=embedding.sparse, **kwargs)

    def _plain_module(self):
        return nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx,
                            self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse,
                            device=self.weight.device, dtype=self.weight.dtype)

    def _init_base(self):
        """As nn.Embedding: normal, the padding row zero."""
        nn.init.normal_(self.weight)
        if self.padding_idx is not None:
            self.weight[self.padding_idx].zero_()

    def _init_adapter(self):
        """As PEFT: A = 0, B normal (the layer still equals the base layer)."""
        nn.init.zeros_(self.lora_A)
        nn.init.normal_(self.lora_B)


    def _lookup(self, x, table, sparse=False):
        return F.embedding(x, table, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, sparse)

    def _base_op(self, x, W, b):
        return self._lookup(x, W, self.sparse)  # (..., embedding_dim); an embedding has no bias

    def _lora_op(self, x):
        # s·A^T[x] B^T (..., embedding_dim)
        return self._lookup(x, self.lora_A.T) @ (self.lora_B * self.scaling).T

    def _check_input(self, x):
        """x: a tensor of integer indices (the embedding's weight dtype does not apply)."""
        if not isinstance(x, torch.Tensor) or x.is_floating_point() or x.is_complex() \
                or x.dtype == torch.bool:
            raise TypeError(f"x: DoRAEmbedding expected a tensor of integer indices, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")

    def _adapter_input(self, x):
        return x  # no dropout on indices

    def extra_repr(self):
        return (f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
                f"r={self.r}, lora_alpha={self.lora_alpha:g}, use_dora={self.use_dora}, "
                f"merged={self.merged}")
