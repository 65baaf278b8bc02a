"""A tiny GPT-2 (transformers' Conv1D layers, weights stored (in, out)) adapted here and by
Hugging Face PEFT: the same logits and gradients, and adapters saved by one load into the other.
Skipped where PEFT or transformers is not installed (neither is a dependency)."""

import copy

import pytest
import torch

import dora_minimal as dm
from helpers import rel_error

pytestmark = pytest.mark.interop  # needs PEFT or transformers: .ci/run checks that none skips
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2,
                                     n_head=2)
    return transformers.GPT2LMHeadModel(config).eval()


def peft_model(base, use_dora):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                             use_dora=use_dora, fan_in_fan_out=True)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    torch.manual_seed(1)
    with torch.no_grad():  # move every adapter away from its init
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
            if "lora_magnitude" in name:
                p.mul_(torch.rand_like(p) + 0.5)
    return model


def logits_and_gradients(model, ids):
    model.zero_grad()
    logits = model(ids).logits
    logits.square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.requires_grad}
    return logits.detach(), grads


@pytest.mark.parametrize("use_dora", [True, False], ids=["dora", "lora"])
def test_gpt2_conv1d_layers_agree_with_peft_and_load_both_ways(tmp_path, use_dora):
    base = tiny_gpt2()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(2))
    theirs = peft_model(base, use_dora)
    ours = dm.get_peft_model(copy.deepcopy(base), dm.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], use_dora=use_dora))
    kinds = {type(layer).__name__ for _, layer in dm.adapter_layers(ours)}
    assert kinds == {"DoRAConv1D"} and len(dm.adapter_layers(ours)) == 6
    dm.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    (y_theirs, g_theirs), (y_ours, g_ours) = (logits_and_gradients(m, ids)
                                              for m in (theirs, ours))
    assert rel_error(y_ours.numpy(), y_theirs.numpy()) < 1e-6
    # the same adapter gradients, under PEFT's keys
    ours_by_key = dm.to_peft_state_dict(ours)
    assert len(ours_by_key) == len(g_theirs)
    for name, grad in g_theirs.items():
        key = name.replace(".default", "")
        key = key[:-len(".weight")] if "lora_magnitude" in key else key
        ours_grad = g_ours[key.replace("base_model.model.", "").replace(
            "lora_A.weight", "lora_A").replace("lora_B.weight", "lora_B").replace(
            "lora_magnitude_vector", "magnitude")]
        assert rel_error(ours_grad.numpy(), grad.numpy()) < 1e-5, name
    # saved here, opened by PEFT; saved by PEFT, opened here
    dm.save_pretrained(ours, tmp_path / "ours")
    reopened = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = dm.from_pretrained(copy.deepcopy(base), tmp_path / "theirs").eval()
    with torch.no_grad():
        for model in (reopened, loaded):
            assert rel_error(model(ids).logits.numpy(), y_theirs.numpy()) < 1e-6
        merged = dm.merge_and_unload(loaded)
        assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
        assert rel_error(merged(ids).logits.numpy(), y_theirs.numpy()) < 1e-5
