"""dm.cached_scale: inside it a DoRA layer computes c = m / ‖V'‖_c once, and never uses a stale
one. Every layer kind, float64, both detach_norm modes: the cached output equals the uncached
layer's, and after each change that c depends on (an optimizer step, foreach and fused, a load,
merge/unmerge, .to(), an in-place write, lora_alpha) the next output is the uncached layer's
again. The reference is a deep copy of the layer, which is never cached."""

import copy

import pytest
import torch
from torch import nn

import dora_minimal as dm
from dora_minimal import cache as cache_module
from test_layer_kinds import KINDS, make

LINEAR = (lambda: nn.Linear(6, 5), lambda: torch.randn(3, 6), dm.DoRALinear)
# every layer kind once (conv1d_dilated is conv1d's code)
ALL_KINDS = {"linear": LINEAR, **{k: v for k, v in KINDS.items() if k != "conv1d_dilated"}}


def make_layer(kind, detach_norm=True, seed=0):
    """An adapted float64 layer of `kind` with a trained-looking adapter (magnitudes of either
    sign, a dead unit), and its input."""
    if kind == "linear":
        KINDS["linear"] = LINEAR  # make() reads its table
        try:
            _, layer, x = make("linear", detach_norm=detach_norm, seed=seed)
        finally:
            del KINDS["linear"]
    else:
        _, layer, x = make(kind, detach_norm=detach_norm, seed=seed)
    return layer.eval(), x


def uncached(layer, x):
    """The output of the layer as it is now, computed by an uncached copy."""
    with torch.no_grad():
        return copy.deepcopy(layer)(x)


def check_recomputed(layer, x, change):
    """Inside cached_scale: c is cached, `change(layer)` runs, and the next output is the
    uncached layer's, which the change moved (so a stale c would show)."""
    with dm.cached_scale(layer):
        with torch.no_grad():
            before = layer(x)
            assert torch.equal(layer(x), before)  # (from the cache)
        change(layer)
        with torch.no_grad():
            after = layer(x)
    expected = uncached(layer, x)
    assert not torch.allclose(expected.double(), before.double(), rtol=1e-4, atol=0)
    torch.testing.assert_close(after, expected, rtol=1e-12, atol=1e-12)


kinds = pytest.mark.parametrize("kind", ALL_KINDS)
modes = pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "exact"])


@modes
@kinds
def test_the_cached_output_equals_the_uncached_layer_and_is_computed_once(kind, detach_norm):
    layer, x = make_layer(kind, detach_norm)
    expected = uncached(layer, x)
    with dm.cached_scale(layer):
        assert layer._scale_cache.scale is None
        with torch.no_grad():
            first = layer(x)
        scale = layer._scale_cache.scale
        with torch.no_grad():
            second = layer(x)
        assert layer._scale_cache.scale is scale  # not computed again
        with torch.inference_mode():
            third = layer(x)
    for y in (first, second, third):
        torch.testing.assert_close(y, expected, rtol=1e-13, atol=1e-13)
    assert layer._scale_cache is None  # outside: no cache


@modes
@kinds
def test_an_optimizer_step_foreach_or_fused_is_seen(kind, detach_norm):
    """A step writes lora_A, lora_B and m in place; a fused step does not bump their version
    counters, so the post-step hook counts it."""
    for options in ({"foreach": True}, {"fused": True}):
        layer, x = make_layer(kind, detach_norm)
        optimizer = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad],
                                      lr=0.1, **options)

        def step(layer):
            layer.train()
            y = layer(x)  # grad mode inside the block: computed as outside, gradients exact
            y.square().sum().backward()
            optimizer.step()
            layer.eval()

        check_recomputed(layer, x, step)


@kinds
def test_load_state_dict_in_place_or_assigned_is_seen(kind):
    for assign in (False, True):
        layer, x = make_layer(kind)
        other, _ = make_layer(kind, seed=1)
        check_recomputed(layer, x, lambda layer: layer.load_state_dict(other.state_dict(),
                                                                       assign=assign))


@pytest.mark.parametrize("name", ["weight", "lora_A", "lora_B", "magnitude"])
@kinds
def test_an_in_place_write_under_no_grad_is_seen(kind, name):
    layer, x = make_layer(kind)

    def write(layer):
        with torch.no_grad():
            getattr(layer, name).mul_(1.5)

    check_recomputed(layer, x, write)


@kinds
def test_a_change_of_lora_alpha_or_scaling_is_seen(kind):
    for attribute in ("lora_alpha", "scaling"):
        layer, x = make_layer(kind)
        check_recomputed(layer, x, lambda layer: setattr(layer, attribute,
                                                         3 * getattr(layer, attribute)))


@kinds
def test_merge_and_unmerge_are_seen(kind):
    layer, x = make_layer(kind, detach_norm=True)
    layer.magnitude.data[-1] = 1.0  # (merge() refuses m = 0 on a row it cannot restore)
    layer.magnitude.data[-2] = 1.0
    merged = layer.to_base()
    with dm.cached_scale(layer), torch.no_grad():
        before = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), merged(x), rtol=0, atol=0)
        layer.unmerge()
        after = layer(x)
    torch.testing.assert_close(after, uncached(layer, x), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)


@kinds
def test_a_conversion_is_seen_even_where_the_storage_comes_back(kind):
    """.float() gives new storages; .half().double() rounds every value and may give the old
    storages back, with the old version counters: the conversion itself drops c."""
    layer, x = make_layer(kind)
    check_recomputed(layer, x, lambda layer: layer.half().double())
    layer, x = make_layer(kind)
    x32 = x.float() if x.is_floating_point() else x
    with dm.cached_scale(layer), torch.no_grad():
        layer(x)
        layer.float()
        after = layer(x32)
    assert after.dtype == torch.float32
    torch.testing.assert_close(after, uncached(layer, x32), rtol=0, atol=0)
    with dm.cached_scale(layer), torch.no_grad():  # a freed storage may come back at its old
        layer(x32)                                  # address with its old version counter, so
        layer.to(torch.float32)                     # any conversion drops c
        assert layer._scale_cache.scale is None


def test_a_new_storage_assigned_to_data_is_seen():
    layer, x = make_layer("linear")
    check_recomputed(layer, x, lambda layer: setattr(layer.lora_B, "data", 2 * layer.lora_B))


def test_a_write_through_data_is_not_seen_until_refresh():
    """The one change the layer cannot see (documented): `.data` has its own version counter."""
    layer, x = make_layer("linear")
    with dm.cached_scale(layer) as cache, torch.no_grad():
        layer(x)
        layer.lora_B.data.mul_(2)
        stale = layer(x)  # (B's new value in y0, but c from the old one)
        cache.refresh()
        after = layer(x)
    torch.testing.assert_close(after, uncached(layer, x), rtol=1e-13, atol=1e-13)
    assert not torch.allclose(stale, after, rtol=1e-4, atol=0)  # as documented


@kinds
def test_calls_that_record_gradients_are_computed_as_outside(kind):
    """Grad mode inside the block: no cache, and the gradients of the uncached layer."""
    layer, x = make_layer(kind, detach_norm=False)
    reference = copy.deepcopy(layer)
    x_grad = x.clone().requires_grad_() if x.is_floating_point() else x
    x_ref = x.clone().requires_grad_() if x.is_floating_point() else x
    with dm.cached_scale(layer):
        with torch.no_grad():
            layer(x)  # c cached
        layer.lora_B.data.mul_(2)  # unseen by the cache; grad mode must not use it
        reference.lora_B.data.mul_(2)
        layer(x_grad).square().sum().backward()
    reference(x_ref).square().sum().backward()
    for name, p in reference.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(getattr(layer, name).grad, p.grad, rtol=1e-13, atol=0)
    if x.is_floating_point():
        torch.testing.assert_close(x_grad.grad, x_ref.grad, rtol=1e-13, atol=0)


def test_torch_compile_computes_without_the_cache():
    """Traced code computes c on every call, as outside: a `.data` write, which the cache cannot
    see, shows in the compiled layer's next output."""
    layer, x = make_layer("linear")
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    with dm.cached_scale(layer), torch.no_grad():
        before = compiled(x)
        layer(x)  # the eager call caches c
        layer.lora_B.data.mul_(2)
        after = compiled(x)
    torch.testing.assert_close(after, uncached(layer, x), rtol=1e-13, atol=1e-13)
    assert not torch.allclose(after, before)


def test_a_model_nested_blocks_copies_and_lora_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.Linear(4, 3))
    model = dm.inject_adapters(model, dm.LoraConfig(r=2, use_dora=True, target_modules=["0",
                                                                                          "2"]))
    model[3] = dm.DoRALinear.from_base(model[3], 2, 4, use_dora=False)  # LoRA: nothing to cache
    x = torch.randn(5, 6)
    with dm.cached_scale(model) as outer:
        assert [layer for layer in outer.layers] == [model[0], model[2]]
        cache = model[0]._scale_cache
        with dm.cached_scale(model[0]):  # an inner block keeps the outer one's cache
            assert model[0]._scale_cache is cache
        assert model[0]._scale_cache is cache
        assert model[3]._scale_cache is None
        assert copy.deepcopy(model)[0]._scale_cache is None  # a copy starts uncached
        assert cache_module._hook is not None
    assert model[0]._scale_cache is None and model[2]._scale_cache is None
    assert cache_module._hook is None  # no optimizer hook left behind
    block = dm.cached_scale(model)
    with block:
        with block:  # the same object entered twice
            pass
        assert model[0]._scale_cache is not None
    assert model[0]._scale_cache is None
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        dm.cached_scale(torch.zeros(3))


def test_a_parameter_replaced_by_one_of_another_shape_is_a_clear_error():
    layer, x = make_layer("conv2d")
    with dm.cached_scale(layer), torch.no_grad():
        layer(x)
        layer.magnitude = nn.Parameter(torch.ones(1, dtype=torch.float64))
        with pytest.raises(ValueError, match="magnitude: expected shape"):
            layer(x)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.interop
def test_generate_inside_cached_scale_gives_the_merged_models_tokens(family):
    """transformers' generate() (greedy, 32 new tokens, float64) with the DoRA adapters unmerged
    inside cached_scale: the tokens the merged model generates."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=16, n_layer=2,
                                         n_head=2)
        base = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=2, num_attention_heads=2,
                                          num_key_value_heads=2)
        base = transformers.LlamaForCausalLM(config)
    model = dm.get_peft_model(base.double().eval(), dm.LoraConfig(r=2, use_dora=True))
    with torch.no_grad():  # a trained-looking adapter
        for _, layer in dm.adapter_layers(model):
            layer.lora_B.normal_(0, 0.3)
            layer.magnitude.mul_(torch.rand_like(layer.magnitude) + 0.5)
    prompt = torch.tensor([[1, 5, 9, 2]])
    options = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    merged = dm.merge_adapters(copy.deepcopy(model))
    with torch.no_grad():
        expected = merged.generate(prompt, **options)
        with dm.cached_scale(model):
            tokens = model.generate(prompt, **options)
            assert all(layer._scale_cache.scale is not None
                       for _, layer in dm.adapter_layers(model))
    assert expected.shape == (1, 36)
    assert torch.equal(tokens, expected)


def test_swap_tensors_and_the_swapping_conversions_work_inside_and_are_seen():
    """The cache holds no weak reference to a parameter, which torch.utils.swap_tensors refuses
    (and with it .to() and load_state_dict under set_swap_module_params_on_conversion)."""
    layer, x = make_layer("linear")
    swapped = nn.Parameter(torch.randn_like(layer.lora_B))
    check_recomputed(layer, x, lambda l: torch.utils.swap_tensors(l.lora_B, swapped))
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        def load(l):
            state = l.state_dict()
            state["magnitude"] = state["magnitude"] * 2
            l.load_state_dict(state)
        check_recomputed(layer, x, load)
        
        def convert(l):
            l.float().double()
            with torch.no_grad():
                l.lora_A.mul_(2)
        check_recomputed(layer, x, convert)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


def test_inference_tensors_and_vmap_are_computed_as_outside():
    """Inference tensors have no version counter and vmap's batched tensors no storage: such
    calls are not cached, and give the uncached numbers."""
    layer, x = make_layer("linear")
    with torch.inference_mode():
        doubled = {name: p * 2 for name, p in layer.named_parameters()}  # inference tensors
        expected = torch.func.functional_call(layer, doubled, (x,))
    stacked = {name: torch.stack([p, p * 2]) for name, p in layer.named_parameters()}
    with torch.no_grad():
        expected_vmap = torch.func.vmap(
            lambda p: torch.func.functional_call(layer, p, (x,)))(stacked)
    with dm.cached_scale(layer):
        with torch.inference_mode():
            layer(x)
            assert torch.equal(torch.func.functional_call(layer, doubled, (x,)), expected)
        with torch.no_grad():
            got_vmap = torch.func.vmap(
                lambda p: torch.func.functional_call(layer, p, (x,)))(stacked)
    assert torch.equal(got_vmap, expected_vmap)
