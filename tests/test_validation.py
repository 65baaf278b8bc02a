"""Bad input gets a clear error and changes nothing; edge cases simply work.

Errors are ValueError or TypeError, raised before anything is computed or changed, and their
message starts with the argument's name, then says what was expected and what was given.
"""

import copy

import numpy as np
import pytest
import torch
from hypothesis import assume, given, strategies as st

import dora_minimal as dm
from dora_minimal import DoRALinear, dora_linear, lora_linear, reference
from helpers import problems, rel_error

# --- a hypothesis test that throws malformed arguments at every public function ---------------

NUMPY_FUNCTIONS = {
    "forward": (reference.forward, ["x", "W0", "A", "B", "m", "scaling", "bias"]),
    "backward": (reference.backward, ["x", "W0", "A", "B", "m", "scaling", "grad_y"]),
    "merge": (reference.merge, ["W0", "A", "B", "m", "scaling"]),
    "unmerge": (reference.unmerge, ["W_merged", "A", "B", "m", "scaling", "norm"]),
    "adapt": (reference.adapt, ["W0", "A", "B", "scaling"]),
    "recombine": (reference.recombine, ["m", "V"]),
    "decompose": (reference.decompose, ["W"]),
    "row_norm": (reference.row_norm, ["W"]),
}
TORCH_FUNCTIONS = {
    "dora_linear": (dora_linear, ["x", "weight", "lora_A", "lora_B", "magnitude", "scaling",
                                  "bias"]),
    "lora_linear": (lora_linear, ["x", "weight", "lora_A", "lora_B", "scaling", "bias"]),
}
# the same arrays under the names each function gives them
SOURCE = {"W0": "W0", "W_merged": "W0", "W": "W0", "V": "W0", "weight": "W0", "A": "A",
          "lora_A": "A", "B": "B", "lora_B": "B", "m": "m", "magnitude": "m", "norm": "m",
          "x": "x", "bias": "bias", "grad_y": "grad_y"}


def corrupt(value, how, data, last_axis_only=False):
    """A malformed version of an array argument."""
    if how == "grow":  # one more entry along one axis
        first = value.ndim - 1 if last_axis_only else 0
        axis = data.draw(st.integers(first, value.ndim - 1), label="axis")
        return np.concatenate([value, np.take(value, [0], axis=axis)], axis=axis)
    if how == "extra_dim":
        return value[None]
    if how == "integer":
        return value.astype(np.int64)
    if how == "complex":
        return value.astype(np.complex128)
    if how == "boolean":
        return value > 0
    return data.draw(st.sampled_from([value.tolist(), None, "W", 3.0]), label="not an array")


@given(p=problems(min_tokens=1, batch_dims=(1, 2)), data=st.data(),
       kind=st.sampled_from(["numpy", "torch"]))
def test_malformed_arguments_raise_value_or_type_error_naming_the_argument(p, data, kind):
    functions = NUMPY_FUNCTIONS if kind == "numpy" else TORCH_FUNCTIONS
    function, names = functions[data.draw(st.sampled_from(sorted(functions)), label="function")]
    source = dict(x=p.x, W0=p.W0, A=p.A, B=p.B, m=np.abs(p.m), grad_y=p.grad_y, scaling=p.scaling,
                  bias=p.bias if p.bias is not None else np.zeros(p.W0.shape[0]))
    arguments = {name: source[SOURCE.get(name, name)] for name in names}
    target = data.draw(st.sampled_from(names), label="argument")
    if target == "scaling":
        bad = data.draw(st.sampled_from([0.0, -1.0, float("nan"), float("inf"), "2", True, None]))
    else:
        hows = ["grow", "extra_dim", "integer", "complex", "boolean", "not_array"]
        if target in ("x", "grad_y"):
            hows.remove("extra_dim")  # any number of batch dimensions is fine
        if target in ("W", "V", "m") and function in (reference.row_norm, reference.decompose,
                                                      reference.recombine):
            hows.remove("grow")  # these take any (out, in)
        bad = corrupt(arguments[target], data.draw(st.sampled_from(hows), label="how"), data,
                      last_axis_only=target == "x")  # x may have any batch shape
    assume(not (target == "bias" and bad is None))  # no bias is a valid choice
    arguments[target] = bad
    if kind == "torch":
        arguments = {n: torch.from_numpy(v) if isinstance(v, np.ndarray) and v.dtype != object
                     else v for n, v in arguments.items()}
    with pytest.raises((ValueError, TypeError)) as error:
        function(*arguments.values())
    assert str(error.value).split(":")[0] in names + ["weight"], str(error.value)


# --- messages ---------------------------------------------------------------------------------

def test_messages_name_the_argument_and_say_what_was_expected_and_given():
    W0, A, B, m = np.ones((4, 3)), np.ones((2, 3)), np.ones((4, 2)), np.ones(4)
    with pytest.raises(ValueError, match=r"^x: expected last dimension 3 .*got shape \(5, 2\)"):
        reference.forward(np.ones((5, 2)), W0, A, B, m, 1.0)
    with pytest.raises(ValueError, match=r"^B: expected shape \(4, 2\).*got \(4, 3\)"):
        reference.merge(W0, A, np.ones((4, 3)), m, 1.0)
    with pytest.raises(TypeError, match=r"^A: expected a real floating dtype, got .*int64"):
        reference.adapt(W0, A.astype(np.int64), B, 1.0)
    with pytest.raises(ValueError, match=r"^scaling: expected a finite real number > 0, got -1"):
        reference.adapt(W0, A, B, -1.0)
    with pytest.raises(ValueError, match=r"^norm: expected shape \(4,\).*got \(3,\)"):
        reference.unmerge(W0, A, B, m, 1.0, np.ones(3))
    with pytest.raises(TypeError, match=r"^detach_norm: expected True or False, got 'no'"):
        reference.backward(np.ones((1, 3)), W0, A, B, m, 1.0, np.ones((1, 4)), "no")


def test_torch_dtype_and_device_mismatches():
    W0, A, B, m = torch.ones(4, 3), torch.ones(2, 3), torch.ones(4, 2), torch.ones(4)
    with pytest.raises(TypeError, match=r"^lora_A: expected dtype torch.float32 \(weight's\), "
                                        r"got torch.float64"):
        dora_linear(torch.ones(2, 3), W0, A.double(), B, m, 1.0)
    with pytest.raises(ValueError, match="one device.*weight on meta"):
        dora_linear(torch.ones(2, 3), W0.to("meta"), A, B, m, 1.0)
    with pytest.raises(ValueError, match="^weight: expected a frozen weight"):
        dora_linear(torch.ones(2, 3), W0.requires_grad_(), A, B, m, 1.0)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(r=0), ValueError, "^r: expected an integer >= 1, got 0"),
    (dict(r=1.5), TypeError, "^r: expected an integer >= 1"),
    (dict(lora_alpha=0), ValueError, "^lora_alpha: expected a finite real number > 0, got 0"),
    (dict(lora_alpha=-2.0), ValueError, "^lora_alpha"),
    (dict(lora_dropout=1.0), ValueError, r"^lora_dropout: expected a real number in \[0, 1\)"),
    (dict(lora_dropout=-0.1), ValueError, "^lora_dropout"),
    (dict(in_features=0), ValueError, "^in_features: expected an integer >= 1, got 0"),
    (dict(use_dora=1), TypeError, "^use_dora: expected True or False"),
    (dict(dtype=torch.int64), TypeError, "^dtype: expected a floating torch.dtype"),
])
def test_layer_constructor_rejects_bad_hyperparameters(kwargs, error, message):
    arguments = dict(in_features=4, out_features=3, r=2, lora_alpha=4) | kwargs
    with pytest.raises(error, match=message):
        DoRALinear(**arguments)


def test_from_base_needs_an_nn_linear_and_from_linear_is_the_same():
    """from_base/to_base is every layer kind's pair; DoRALinear's from_linear/to_linear are the
    same methods (a subclass of nn.Linear with a forward of its own is refused by both)."""
    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)
    for make in (DoRALinear.from_base, DoRALinear.from_linear):
        with pytest.raises(TypeError, match="^module: DoRALinear adapts torch.nn.Linear, "
                                            "got Conv1d"):
            make(torch.nn.Conv1d(2, 3, 1), r=1, lora_alpha=1)
        with pytest.raises(TypeError, match="got Scaled"):
            make(Scaled(2, 3), r=1, lora_alpha=1)
    layer = DoRALinear.from_linear(torch.nn.Linear(4, 3), r=2, lora_alpha=2)
    assert torch.equal(layer.to_linear().weight, layer.to_base().weight)


def adapted_layers():
    """One adapted layer of each kind, with the input each expects: (layer, good x)."""
    class Conv1D(torch.nn.Module):  # transformers' Conv1D, as its class name and shapes
        def __init__(self, nf, nx):
            super().__init__()
            self.nf, self.weight = nf, torch.nn.Parameter(torch.randn(nx, nf))
            self.bias = torch.nn.Parameter(torch.zeros(nf))
    kw = {"r": 2, "lora_alpha": 4}
    return [(DoRALinear(4, 3, **kw), torch.ones(2, 4)),
            (dm.DoRAConv1D.from_base(Conv1D(3, 4), **kw), torch.ones(2, 4)),
            (dm.DoRAConv1d.from_base(torch.nn.Conv1d(4, 3, 1), **kw), torch.ones(2, 4, 5)),
            (dm.DoRAConv2d.from_base(torch.nn.Conv2d(4, 3, 1), **kw), torch.ones(2, 4, 5, 5)),
            (dm.DoRAConv3d.from_base(torch.nn.Conv3d(4, 3, 1), **kw), torch.ones(4, 2, 2, 2)),
            (dm.DoRAEmbedding.from_base(torch.nn.Embedding(4, 3), **kw), torch.ones(2, 5).long())]


@pytest.mark.parametrize("index", range(6), ids=["Linear", "Conv1D", "Conv1d", "Conv2d",
                                                 "Conv3d", "Embedding"])
def test_every_layer_kind_rejects_a_wrong_input_naming_itself_and_stays_as_it_was(index):
    """A wrong dtype or width names the layer, what it expected and what it got (not torch's
    "mat1 and mat2 shapes cannot be multiplied"), and changes nothing."""
    layer, x = adapted_layers()[index]
    name = type(layer).__name__
    before = copy.deepcopy(layer.state_dict())
    if name == "DoRAEmbedding":
        with pytest.raises(TypeError, match="^x: DoRAEmbedding expected a tensor of integer "
                                            "indices, got torch.float32"):
            layer(x.float())
    else:
        with pytest.raises(TypeError, match=f"^x: {name} expected dtype torch.float32 .*"
                                            f"got torch.float64"):
            layer(x.double())
        wider = torch.ones(*x.shape[:-1], 5) if x.ndim == 2 else torch.ones(2, 5, *x.shape[2:])
        with pytest.raises(ValueError, match=f"^x: {name} expected .*4.* got .*5"):
            layer(wider)
        with pytest.raises(TypeError, match=f"^x: {name} expected a dense torch.Tensor"):
            layer(x.numpy())
    layer(x)  # the right input still works
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items()
               if isinstance(v, torch.Tensor))


def test_a_merge_that_would_overflow_raises_naming_the_rows_and_changes_nothing():
    layer = DoRALinear(4, 3, r=2, lora_alpha=4, dtype=torch.float16)
    with torch.no_grad():
        layer.magnitude[1] = 1e6  # W' row 1 has norm 1e6: inf in float16 (max 65504)
    weight = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"^merge\(\): the result would contain NaN or inf in "
                                         r"rows \[1\]; the weights were left unchanged"):
        layer.merge()
    assert torch.equal(layer.weight, weight) and not layer.merged


def test_a_zero_magnitude_row_cannot_be_merged_in_place_but_to_linear_works():
    layer = DoRALinear(4, 3, r=2, lora_alpha=4)
    with torch.no_grad():
        layer.magnitude[2] = 0.0
    with pytest.raises(ValueError, match=r"rows \[2\] have magnitude 0"):
        layer.merge()
    assert not layer.merged
    x = torch.randn(5, 4)
    assert torch.allclose(layer.to_linear()(x), layer(x))
    with pytest.raises(ValueError, match=r"^m: rows \[0\] have magnitude 0"):
        reference.unmerge(np.ones((2, 3)), np.ones((1, 3)), np.ones((2, 1)), np.array([0.0, 1.0]),
                          1.0, np.ones(2))


# --- edge cases that must simply work ---------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 1), (4, 3, 7), (2, 9, 20)],
                         ids=["1x1", "r=1", "r>min(in,out)", "r>in+out"])
@pytest.mark.parametrize("batch", [(), (0,), (3,), (2, 3), (1, 2, 3)])
def test_small_shapes_any_batch_rank_and_empty_batches(shape, batch):
    out_features, in_features, r = shape
    layer = DoRALinear(in_features, out_features, r, lora_alpha=2 * r, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(*batch, in_features, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (*batch, out_features)
    G = torch.randn_like(y)
    y.backward(G)
    a = {k: getattr(layer, n).detach().numpy() for k, n in
         [("W0", "weight"), ("A", "lora_A"), ("B", "lora_B"), ("m", "magnitude")]}
    expected_y = reference.forward(x.detach().numpy(), **a, scaling=layer.scaling,
                                   bias=layer.bias.detach().numpy())
    expected = reference.backward(x.detach().numpy(), **a, scaling=layer.scaling,
                                  grad_y=G.numpy())
    assert rel_error(y.detach().numpy(), expected_y) < 1e-12
    assert rel_error(x.grad.numpy(), expected["x"]) < 1e-12
    assert rel_error(layer.lora_A.grad.numpy(), expected["A"]) < 1e-12
    assert rel_error(layer.magnitude.grad.numpy(), expected["m"]) < 1e-12


@pytest.mark.parametrize("detach_norm", [True, False])
def test_a_zero_norm_row_in_torch_gives_no_nan(detach_norm):
    layer = DoRALinear(4, 3, r=2, lora_alpha=4, dtype=torch.float64, detach_norm=detach_norm)
    with torch.no_grad():
        layer.weight[1] = 0.0
        layer.reset_adapter()
        layer.lora_B.normal_()
        layer.lora_B[1] = 0.0
        layer.magnitude[1] = 0.7  # the unit has a magnitude but no direction
    x = torch.randn(5, 4, dtype=torch.float64)
    y = layer(x)
    assert torch.all(torch.isfinite(y)) and torch.equal(y[:, 1], layer.bias[1].expand(5))
    y.square().sum().backward()
    for p in (layer.lora_A, layer.lora_B, layer.magnitude):
        assert torch.all(torch.isfinite(p.grad))
    layer.eval()
    with torch.no_grad():
        assert rel_error(layer(x).numpy(), y.detach().numpy()) < 1e-13
    layer.merge()
    assert torch.all(torch.isfinite(layer.weight))


@pytest.mark.parametrize("scale", [1e-20, 1e-10, 1e10, 1e20])
@pytest.mark.parametrize("detach_norm", [True, False])
def test_extreme_weight_scales_in_float64(scale, detach_norm):
    rng = np.random.default_rng(3)
    x, G = rng.standard_normal((6, 5)), rng.standard_normal((6, 4))
    W0, A = rng.standard_normal((4, 5)) * scale, rng.standard_normal((2, 5))
    B = rng.standard_normal((4, 2)) * scale * 0.3
    m = np.linalg.norm(W0 / scale, axis=1) * scale * 1.3
    t = [torch.tensor(v, requires_grad=True) for v in (x, A, B, m)]
    y = dora_linear(t[0], torch.tensor(W0), t[1], t[2], t[3], 2.0, detach_norm=detach_norm)
    y.backward(torch.tensor(G))
    expected = reference.backward(x, W0, A, B, m, 2.0, G, detach_norm)
    assert rel_error(y.detach().numpy() / scale, reference.forward(x, W0, A, B, m, 2.0) / scale) \
        < 1e-12
    for tensor, name in zip(t, "xABm"):
        assert torch.all(torch.isfinite(tensor.grad))
        norm = np.max(np.abs(expected[name]))
        assert rel_error(tensor.grad.numpy() / norm, expected[name] / norm) < 1e-10, name


def test_lora_config_and_helpers_reject_wrong_types():
    with pytest.raises(TypeError, match="^model: expected a torch.nn.Module"):
        dm.inject_adapters("model", dm.LoraConfig())
    with pytest.raises(TypeError, match="^config: expected a dora_minimal.LoraConfig"):
        dm.inject_adapters(torch.nn.Linear(2, 2), {"r": 2})
    with pytest.raises(ValueError, match="^model: is itself an nn.Linear"):
        dm.inject_adapters(torch.nn.Linear(2, 2), dm.LoraConfig(r=1))
    with pytest.raises(ValueError, match="^model: has no nn.Linear layer to adapt"):
        dm.inject_adapters(torch.nn.Sequential(torch.nn.ReLU()), dm.LoraConfig(r=1))
    model = dm.inject_adapters(torch.nn.Sequential(torch.nn.Linear(2, 2)), dm.LoraConfig(r=1))
    with pytest.raises(ValueError, match="already has adapter layers"):
        dm.inject_adapters(model, dm.LoraConfig(r=1))
    with pytest.raises(TypeError, match="expected a dict of tensors"):
        dm.load_adapter_state_dict(model, [1, 2])


def test_adapting_inside_autocast_takes_the_norms_in_float32():
    """Under torch.autocast the norm check of from_linear, inject_adapters and reset_magnitude
    ran in bf16 and refused ordinary weights; the norms are now float32 whatever autocast says."""
    linear = torch.nn.Linear(8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer = DoRALinear.from_linear(linear, r=2, lora_alpha=4)
        model = dm.inject_adapters(torch.nn.Sequential(torch.nn.Linear(8, 4)),
                                   dm.LoraConfig(r=2, use_dora=True))
        dm.reset_magnitude(model)
        layer.reset_magnitude()
    assert torch.allclose(layer.magnitude, linear.weight.norm(dim=1), rtol=1e-6)
    assert model[0].magnitude.dtype == torch.float32


@pytest.mark.parametrize("kwargs, error, message", [
    ({"scaling": -1.0}, ValueError, "scaling: expected a finite real number > 0, got -1"),
    ({"scaling": 0.0}, ValueError, "scaling: expected a finite real number > 0, got 0"),
    ({"scaling": float("nan")}, ValueError, "scaling: expected a finite real number > 0"),
    ({"scaling": float("inf")}, ValueError, "scaling: expected a finite real number > 0"),
    ({"scaling": True}, TypeError, "scaling: expected a finite real number > 0, got True"),
    ({"detach_norm": "no"}, TypeError, "detach_norm: expected True or False, got 'no'"),
    ({"detach_norm": None}, TypeError, "detach_norm: expected True or False, got None"),
    ({"trailing_dims": -1}, ValueError, "trailing_dims: expected an integer from 0 to"),
    ({"trailing_dims": 3}, ValueError, "trailing_dims: expected an integer from 0 to"),
])
def test_dora_scale_refuses_what_dora_linear_refuses(kwargs, error, message):
    y0, W0, A, B, m = torch.ones(2, 3), torch.ones(3, 5), torch.ones(1, 5), torch.ones(3, 1), \
        torch.ones(3)
    arguments = {"scaling": 1.0, "bias": None, "detach_norm": True, "trailing_dims": 0, **kwargs}
    with pytest.raises(error, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        dm.dora_scale(y0, W0, A, B, m, **arguments)
