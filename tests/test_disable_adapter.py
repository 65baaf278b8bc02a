"""disable_adapter: inside the block the base model's outputs and gradients bit for bit (every
layer kind, LoRA and DoRA, dropout in train mode), after it the adapted ones; merged layers
refused before anything changes; blocks nest and survive an exception; nothing is copied."""

import copy

import pytest
import torch
from torch import nn

import dora_minimal as dm
from test_layer_kinds import KINDS

LAYERS = {"linear": (lambda: nn.Linear(5, 4), lambda: torch.randn(2, 3, 5), dm.DoRALinear),
          **KINDS}


def adapted(kind, use_dora, dropout, dtype=torch.float32):
    """(the base layer, a deep copy adapted with a trained-looking adapter, its input)."""
    make_base, make_x, adapter_class = LAYERS[kind]
    torch.manual_seed(0)
    base = make_base().to(dtype)
    layer = adapter_class.from_base(copy.deepcopy(base), r=2, lora_alpha=4,
                                    lora_dropout=dropout, use_dora=use_dora)
    with torch.no_grad():  # away from the init, where the adapted layer equals the base
        layer.lora_A.normal_(0, 0.5)
        layer.lora_B.normal_(0, 0.5)
        if use_dora:
            layer.magnitude.mul_(1.5)
    x = make_x()
    return base, layer, x.to(dtype) if x.is_floating_point() else x


def outputs_and_input_grad(module, x):
    """y and ∂L/∂x (L = Σ y·G, G fixed), or y alone for an index input."""
    if not x.is_floating_point():
        return module(x), None
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype))
    return y.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("use_dora", [True, False], ids=["dora", "lora"])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_inside_the_block_each_layer_kind_is_its_base_bit_for_bit_and_after_it_adapted(
        kind, use_dora, dtype):
    base, layer, x = adapted(kind, use_dora, dropout=0.5, dtype=dtype)
    for train in (True, False):  # dropout > 0 in train mode
        base.train(train), layer.train(train)
        torch.manual_seed(1)
        before, _ = outputs_and_input_grad(layer, x)
        expected, expected_grad = outputs_and_input_grad(base, x)
        layer.zero_grad(set_to_none=True)
        with dm.disable_adapter(layer):
            got, got_grad = outputs_and_input_grad(layer, x)
        assert torch.equal(got, expected)
        assert got_grad is None or torch.equal(got_grad, expected_grad)
        # the adapter got no gradient inside: only what the base uses
        assert all(p is None or p.grad is None for p in layer._adapter())
        torch.manual_seed(1)
        after, _ = outputs_and_input_grad(layer, x)
        assert torch.equal(after, before) and not torch.equal(after, expected)


def test_a_whole_model_in_train_mode_with_dropout_gives_the_base_model_outputs_and_gradients():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 8), nn.ReLU(), nn.Conv1d(5, 5, 3),
                             nn.Linear(6, 11))
    base = copy.deepcopy(original)
    model = dm.get_peft_model(original, dm.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.3,
                                                      use_dora=True,
                                                      target_modules=["0", "1", "3", "4"]))
    for _, layer in dm.adapter_layers(model):
        with torch.no_grad():
            layer.lora_A.normal_()
            layer.lora_B.normal_()
    tokens = torch.randint(0, 11, (8, 5))
    for p in base.parameters():
        p.requires_grad_(True)  # the base's weights, had they been trained: the same gradient
    model[1].weight.requires_grad_(True)
    with dm.disable_adapter(model) as inside:
        assert inside is model
        y = model(tokens)
        y.square().sum().backward()
    expected = base(tokens)
    expected.square().sum().backward()
    assert torch.equal(y, expected) and torch.equal(model[1].weight.grad, base[1].weight.grad)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora" in n or "magn" in n)
    model[1].weight.requires_grad_(False)  # (DoRA trains no weight)
    assert not torch.equal(model(tokens), expected)


@pytest.mark.interop
def test_gpt2_conv1d_layers_of_a_transformers_model_give_the_base_model_logits():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=17, n_positions=8,
                                     resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    torch.manual_seed(0)
    original = transformers.GPT2LMHeadModel(config)
    base = copy.deepcopy(original)
    model = dm.get_peft_model(original, dm.LoraConfig(r=2, lora_alpha=4, use_dora=True,
                                                      target_modules=["c_attn", "c_proj"]))
    for _, layer in dm.adapter_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_()
    tokens = torch.randint(0, 17, (2, 6))
    with dm.disable_adapter(model):
        reference = model(tokens).logits
    assert torch.equal(reference, base(tokens).logits)
    assert not torch.equal(model(tokens).logits, reference)


def test_merged_layers_are_refused_by_name_before_anything_changes():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    model = dm.get_peft_model(model, dm.LoraConfig(r=2, use_dora=True)).eval()
    model[1].merge()
    x = torch.randn(3, 4)
    before = model(x)
    with pytest.raises(ValueError, match=r"layers \['1'\] are merged.*unmerge\(\) them first"):
        with dm.disable_adapter(model):
            pass
    assert all(layer._adapter_off == 0 for _, layer in dm.adapter_layers(model))
    assert torch.equal(model(x), before)
    with dm.disable_adapter(model[0]):  # a single adapted layer
        with pytest.raises(ValueError, match=r"merge\(\): the adapter is switched off"):
            model[0].merge()
        model[0].load_state_dict(model[1].state_dict())  # merged by loading: refused in forward
        with pytest.raises(ValueError, match=r"the layer is merged.*unmerge\(\) it to switch"):
            model[0](x)
        model[0].unmerge()
    model[0].merge()
    model[0].unmerge()


def test_blocks_nest_and_the_adapter_comes_back_when_the_block_raises():
    base = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model = dm.get_peft_model(copy.deepcopy(base), dm.LoraConfig(r=2, use_dora=True))
    with torch.no_grad():
        for _, layer in dm.adapter_layers(model):
            layer.lora_B.normal_()
    x = torch.randn(3, 4)
    adapted_y = model(x)
    with pytest.raises(RuntimeError, match="inside"):
        with dm.disable_adapter(model):
            raise RuntimeError("inside")
    assert torch.equal(model(x), adapted_y)
    with dm.disable_adapter(model):
        with dm.disable_adapter(model[1]):
            assert torch.equal(model(x), base(x))
        assert torch.equal(model(x), base(x))  # the inner block's exit keeps the outer's
    assert torch.equal(model(x), adapted_y)
    state = model.state_dict()
    with dm.disable_adapter(model):
        assert model.state_dict().keys() == state.keys()  # nothing added, nothing copied
        assert all(value.data_ptr() == state[key].data_ptr()
                   for key, value in model.state_dict().items() if "_extra" not in key)


def test_a_model_without_adapters_and_modules_trained_in_full_are_said():
    with pytest.raises(ValueError, match="has no adapter layers"):
        with dm.disable_adapter(nn.Sequential(nn.Linear(2, 2))):
            pass
    with pytest.raises(TypeError, match="expected a torch.nn.Module, got list"):
        with dm.disable_adapter([]):
            pass
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    model = dm.get_peft_model(model, dm.LoraConfig(r=2, target_modules=["0"],
                                                   modules_to_save=["1"]))
    with pytest.warns(UserWarning, match=r"modules \['1'\] are trained in full"):
        with dm.disable_adapter(model):
            pass
