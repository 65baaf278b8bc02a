"""A model with an embedding, a convolution and a linear layer, adapted here and by Hugging Face
PEFT on the same weights: adapters saved by either library load in the other with the same
outputs. Skipped where PEFT is not installed (it is not a dependency)."""

import copy

import pytest
import torch
from torch import nn

import dora_minimal as dm
from helpers import rel_error

pytestmark = pytest.mark.interop  # needs PEFT or transformers: .ci/run checks that none skips
peft = pytest.importorskip("peft")


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        h = self.conv(self.embed(ids).transpose(1, 2)).tanh()  # (batch, 6, length)
        return self.head(h.transpose(1, 2))  # (batch, length, 3)


@pytest.mark.parametrize("use_dora", [True, False], ids=["dora", "lora"])
def test_embedding_conv_linear_adapters_load_both_ways_with_peft(tmp_path, use_dora):
    torch.manual_seed(0)
    base = Tagger().double()
    ids = torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(1))
    targets = ["embed", "conv", "head"]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=targets, use_dora=use_dora))
    torch.manual_seed(2)
    with torch.no_grad():  # every adapter away from its init
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn_like(p))
    expected = theirs(ids)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = dm.from_pretrained(copy.deepcopy(base), tmp_path / "theirs")
    kinds = sorted(type(layer).__name__ for _, layer in dm.adapter_layers(ours))
    assert kinds == ["DoRAConv1d", "DoRAEmbedding", "DoRALinear"]
    assert rel_error(ours(ids).detach().numpy(), expected.detach().numpy()) < 1e-12
    dm.save_pretrained(ours, tmp_path / "ours")
    reopened = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert rel_error(reopened(ids).detach().numpy(), expected.detach().numpy()) < 1e-12
    merged = dm.merge_and_unload(ours)
    assert [type(m).__name__ for m in (merged.embed, merged.conv, merged.head)] == [
        "Embedding", "Conv1d", "Linear"]
    assert rel_error(merged(ids).detach().numpy(), expected.detach().numpy()) < 1e-12
