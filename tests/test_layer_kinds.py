"""Convolutions, embeddings and transformers' Conv1D with LoRA and DoRA: the core's DoRAFunction
(its hand-written backward) against plain autograd on the textbook formula, the NumPy reference
on a convolution's flattened weight, merge and state, argument checks, and (where installed) PEFT
side by side."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import dora_minimal as dm
from dora_minimal import reference
from helpers import rel_error


class Conv1D(nn.Module):
    """A stand-in for transformers' Conv1D (the same class name, layout and forward)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(
            *x.shape[:-1], self.nf)


# kind: (the plain base layer, its input, the adapter class); dilation=1 where PEFT compares
KINDS = {
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), lambda: torch.randn(2, 3, 9),
               dm.DoRAConv1d),
    "conv1d_dilated": (lambda: nn.Conv1d(3, 4, 3, padding=2, dilation=2),
                       lambda: torch.randn(2, 3, 8), dm.DoRAConv1d),
    "conv2d": (lambda: nn.Conv2d(3, 5, (3, 2), stride=(1, 2), padding=1),
               lambda: torch.randn(2, 3, 6, 5), dm.DoRAConv2d),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, padding=1), lambda: torch.randn(1, 2, 3, 4, 3),
               dm.DoRAConv3d),
    "embedding": (lambda: nn.Embedding(7, 4, padding_idx=1),
                  lambda: torch.tensor([[0, 1, 2, 6, 2], [3, 1, 5, 4, 0]]), dm.DoRAEmbedding),
    "gpt2_conv1d": (lambda: Conv1D(5, 4), lambda: torch.randn(2, 3, 4), dm.DoRAConv1D),
}


def make(kind, use_dora=True, detach_norm=True, seed=0, base=None, dead_unit=True):
    """(plain base layer, adapted layer with a trained-looking adapter, input), in float64: the
    magnitudes of either sign, and (dead_unit) the last output a zero row of V' with m = 0."""
    make_base, make_x, adapter_class = KINDS[kind]
    torch.manual_seed(seed)
    base = (make_base() if base is None else base).double()
    layer = adapter_class.from_base(base, r=2, lora_alpha=4, use_dora=use_dora,
                                    detach_norm=detach_norm)
    with torch.no_grad():  # move the adapter away from its init
        layer.lora_A.normal_(0, 0.5)
        layer.lora_B.normal_(0, 0.5)
        if use_dora:  # magnitudes of either sign (row 0 negative)
            layer.magnitude.mul_(torch.rand_like(layer.magnitude) * 3 - 1.5)
            layer.magnitude[0] = -layer.magnitude[0].abs()
        if use_dora and dead_unit:  # a zero row of W0 and of B, so V'_j = 0, and m_j = 0
            layer._weight_view(layer.weight)[-1] = 0
            layer._lora_views()[1][-1] = 0
            layer.magnitude[-1] = 0
        if kind == "embedding":  # the padding column of A starts at 0 and gets no gradient
            layer.lora_A[:, layer.padding_idx] = 0
    x = make_x()
    return base, layer, x.double() if x.is_floating_point() else x


def textbook_weight(kind, layer, detach_norm=True):
    """W' in the base's layout by plain autograd: materialize V', normalise, rescale."""
    W0, A, B, s = layer.weight, layer.lora_A, layer.lora_B, layer.scaling
    if kind.startswith("conv"):
        delta = (B.flatten(1) @ A.flatten(1)).reshape(W0.shape)  # B∘A as one convolution
        norm_dims, m_shape = tuple(range(1, W0.ndim)), (-1,) + (1,) * (W0.ndim - 1)
    else:  # an embedding's or Conv1D's weight holds one output per column
        delta, norm_dims, m_shape = (B @ A).T, (0,), (1, -1)
    V = W0 + s * delta  # Eq. 5: V' = W0 + s·ΔW
    if layer.magnitude is None:
        return V
    norm = torch.linalg.vector_norm(V, dim=norm_dims, keepdim=True)
    norm = norm.detach() if detach_norm else norm
    norm = torch.where(norm == 0, torch.inf, norm)  # the zero-row rule: a dead unit stays 0
    return layer.magnitude.reshape(m_shape) * V / norm  # Eq. 5: W' = m · V'/‖V'‖_c


def base_forward(base, weight, x):
    """The plain base layer's own forward with its weight replaced."""
    return functional_call(base, {"weight": weight}, (x,))


def adapter_grads(layer):
    return {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_dora, detach_norm", [(False, True), (True, True), (True, False)],
                         ids=["lora", "dora", "dora_exact"])
@pytest.mark.parametrize("kind", KINDS)
def test_output_and_gradients_equal_plain_autograd_on_the_textbook_formula(kind, use_dora,
                                                                          detach_norm):
    base, layer, x = make(kind, use_dora, detach_norm)
    x_grad = x.is_floating_point()
    x1, x2 = (x.clone().requires_grad_(x_grad) for _ in range(2))
    y = layer(x1)
    G = torch.randn_like(y)
    (y * G).sum().backward()
    ours = adapter_grads(layer)
    layer.zero_grad()
    expected = base_forward(base, textbook_weight(kind, layer, detach_norm), x2)
    (expected * G).sum().backward()
    theirs = adapter_grads(layer)
    assert y.shape == expected.shape
    assert rel_error(y.detach(), expected.detach()) < 1e-12
    assert set(ours) == set(theirs) == ({"lora_A", "lora_B", "magnitude"} if use_dora
                                        else {"lora_A", "lora_B"})
    for name in ours:
        assert rel_error(ours[name], theirs[name]) < 1e-11, name
    if x_grad:
        assert rel_error(x1.grad, x2.grad) < 1e-11


def random_scale_inputs(trailing_dims=2, out=3, inner=5, r=2, seed=0):
    torch.manual_seed(seed)
    y0 = torch.randn(2, out, *(3,) * trailing_dims, dtype=torch.float64, requires_grad=True)
    W0 = torch.randn(out, inner, dtype=torch.float64)
    A, B, m, bias = (torch.randn(*shape, dtype=torch.float64, requires_grad=True)
                     for shape in ((r, inner), (out, r), (out,), (out,)))
    return y0, W0, A, B, m, bias


@pytest.mark.parametrize("trailing_dims", [0, 2])
@pytest.mark.parametrize("detach_norm", [True, False])
def test_dora_scale_passes_gradcheck_and_gradgradcheck(detach_norm, trailing_dims):
    """The exact mode's gradient is the true one for every input; with the norm detached it is
    for y0, m and the bias (A and B then reach the output only through y0, in a layer)."""
    y0, W0, A, B, m, bias = random_scale_inputs(trailing_dims)
    if detach_norm:
        A, B = A.detach(), B.detach()

    def f(y0, m, bias, *AB):
        return dm.dora_scale(y0, W0, *(AB or (A, B)), m, 1.5, bias, detach_norm, trailing_dims)

    inputs = (y0, m, bias) + (() if detach_norm else (A, B))
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_dora_scale_under_vmap_and_grad_equals_the_loop():
    y0, W0, A, B, m, bias = random_scale_inputs(1)

    def loss(A, y0):
        return dm.dora_scale(y0, W0, A, B, m, 2.0, bias, False, 1).square().sum()

    batched = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(A.detach(), y0.detach())
    looped = torch.stack([torch.func.grad(loss)(A.detach(), y0[i].detach())
                          for i in range(y0.shape[0])])
    assert rel_error(batched.detach(), looped.detach()) < 1e-12


@pytest.mark.parametrize("norm_in_blocks", [False, True])
@pytest.mark.parametrize("frozen", [None, "lora_A", "lora_B"])
@pytest.mark.parametrize("detach_norm", [True, False])
def test_dora_function_applied_directly_gives_each_mode_its_gradients(detach_norm, frozen,
                                                                     norm_in_blocks, monkeypatch):
    """DoRAFunction.apply as chapter 6 calls it, A and B not detached: with the norm detached
    they get no gradient through it (Eq. 11), in exact mode each gets its norm path even when the
    other is frozen (Eq. 6); also with V' formed two rows at a time, as a large layer forms it,
    and differentiated twice (a gradient penalty sees the norm as the mode has it)."""
    from dora_minimal.core import DoRAFunction, linear_lora_output
    if norm_in_blocks:  # blocks of 2 rows of V' (4 rows: two blocks)
        monkeypatch.setattr("dora_minimal.core.NORM_BLOCK_ELEMENTS", 2 * 6)
    torch.manual_seed(0)
    x = torch.randn(5, 6, dtype=torch.float64)
    W0 = torch.randn(4, 6, dtype=torch.float64)
    A, B, m = (torch.randn(*shape, dtype=torch.float64) for shape in ((2, 6), (4, 2), (4,)))
    A.requires_grad_(frozen != "lora_A")
    B.requires_grad_(frozen != "lora_B")
    m.requires_grad_()
    trained = [t for t in (A, B, m) if t.requires_grad]
    G = torch.randn(5, 4, dtype=torch.float64)
    y0 = linear_lora_output(x, W0, A, B, 1.5)
    y = DoRAFunction.apply(y0, W0, A, B, m, None, 1.5, detach_norm, 0)
    V = W0 + 1.5 * B @ A  # the textbook: Eq. 5 under autograd
    norm = V.norm(dim=1, keepdim=True)
    y_textbook = x @ (m[:, None] * V / (norm.detach() if detach_norm else norm)).T
    for output in (y, y_textbook):
        grads = torch.autograd.grad(output, trained, G, create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        results = [*grads, *torch.autograd.grad(penalty, trained)]
        if output is y:
            ours = results
    for a, b in zip(ours, results):
        assert rel_error(a.detach(), b.detach()) < 1e-12


def test_fp16_outputs_and_gradients_keep_their_dtypes_and_do_not_overflow():
    """y in y0's dtype; Σ G ⊙ y0 in float32, where fp16's products would overflow (> 65504)."""
    from dora_minimal.core import DoRAFunction
    y0, W0, A, B, m, bias = random_scale_inputs(trailing_dims=0, out=3, inner=4)
    y0 = (300 * y0.detach().sign()).half().requires_grad_()  # G ⊙ y0 = 9e4 > 65504
    W0, A, B, bias = W0.half(), A.detach().half(), B.detach().half(), bias.detach().half()
    m = m.detach().float().requires_grad_()
    y = DoRAFunction.apply(y0, W0, A, B, m, bias, 1.5, True, 0)
    assert y.dtype == torch.float16
    G = torch.full_like(y, 300.0)
    grad_m, = torch.autograd.grad(y, m, G)
    norm = (W0.double() + 1.5 * B.double() @ A.double()).norm(dim=1)
    expected = (G.double() * y0.detach().double()).sum(0) / norm  # Eq. 7
    assert grad_m.dtype == torch.float32 and torch.isfinite(grad_m).all()
    assert rel_error(grad_m.double(), expected) < 1e-3


def test_exact_mode_in_bf16_is_the_float64_gradient_to_bf16_precision():
    """The exact mode's norm path with bf16 weights: V' and its norm in float32, A and B too."""
    y0, W0, A, B, m, _ = random_scale_inputs(trailing_dims=0, out=6, inner=8, r=3)
    G = torch.randn_like(y0)
    grads = {}
    for dtype in (torch.bfloat16, torch.float64):
        W, a, b = (t.detach().to(dtype).requires_grad_(t.requires_grad) for t in (W0, A, B))
        y = dm.dora_scale(y0.detach().to(dtype), W, a, b, m, 1.5, None, False)
        grads[dtype] = torch.autograd.grad(y, (a, b), G.to(dtype))
    for low, exact in zip(*grads.values()):
        assert low.dtype == torch.bfloat16
        assert rel_error(low.double(), exact) < 2e-2


@pytest.mark.parametrize("detach_norm", [True, False])
def test_a_convolution_is_the_reference_dora_on_its_flattened_weight(detach_norm):
    """Unfold each input patch to a token of in·k values: the convolution's DoRA is then
    dora_minimal.reference's DoRA with W0 (out, in·k), A (r, in·k), B (out, r)."""
    base, layer, x = make("conv2d", detach_norm=detach_norm)
    x = x.requires_grad_(True)
    y = layer(x)  # (N, out, H', W')
    G = torch.randn_like(y)
    (y * G).sum().backward()
    patches = F.unfold(x.detach(), layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    tokens = patches.transpose(1, 2).reshape(-1, patches.shape[1]).numpy()  # (N·L, in·k)
    flat = dict(W0=layer.weight.detach().flatten(1).numpy(),
                A=layer.lora_A.detach().flatten(1).numpy(),
                B=layer.lora_B.detach().flatten(1).numpy(), m=layer.magnitude.detach().numpy(),
                scaling=layer.scaling)
    G_tokens = G.flatten(2).transpose(1, 2).reshape(-1, y.shape[1]).numpy()  # (N·L, out)
    y_ref = reference.forward(tokens, bias=layer.bias.detach().numpy(), **flat)
    assert rel_error(y.detach().flatten(2).transpose(1, 2).reshape(-1, y.shape[1]), y_ref) < 1e-12
    grads = reference.backward(tokens, grad_y=G_tokens, detach_norm=detach_norm, **flat)
    assert rel_error(layer.lora_A.grad.flatten(1), grads["A"]) < 1e-11
    assert rel_error(layer.lora_B.grad.flatten(1), grads["B"]) < 1e-11
    assert rel_error(layer.magnitude.grad, grads["m"]) < 1e-11


@pytest.mark.parametrize("use_dora", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_to_base_merge_unmerge_and_state_round_trip(kind, use_dora):
    base, layer, x = make(kind, use_dora)
    layer.eval()  # (a merged layer in training mode warns)
    expected = layer(x).detach()
    plain = layer.to_base()
    assert type(plain) is type(base)
    assert rel_error(plain(x).detach(), expected) < 1e-12
    W0 = layer.weight.detach().clone()
    state = copy.deepcopy(layer.state_dict())
    layer.merge()
    assert layer.merged and rel_error(layer(x).detach(), expected) < 1e-12
    assert torch.equal(layer.weight, plain.weight)
    restored = copy.deepcopy(layer)
    restored.load_state_dict(layer.state_dict())  # merged state travels as extra state
    assert restored.merged
    layer.unmerge()
    assert not layer.merged and rel_error(layer.weight, W0) < 1e-13
    assert rel_error(layer(x).detach(), expected) < 1e-12
    restored.unmerge()
    assert rel_error(restored.weight, state["weight"]) < 1e-13


@pytest.mark.parametrize("kind", ["conv2d", "embedding", "gpt2_conv1d"])
def test_at_init_the_adapted_layer_equals_the_base_and_shares_the_layer_behaviour(kind):
    make_base, make_x, adapter_class = KINDS[kind]
    base = make_base()
    x = make_x()
    layer = adapter_class.from_base(base, r=3, lora_alpha=6)
    assert torch.allclose(layer(x), base(x), atol=1e-6)
    zero, random = ((layer.lora_A, layer.lora_B) if kind == "embedding"  # PEFT's init
                    else (layer.lora_B, layer.lora_A))
    assert torch.all(zero == 0) and random.std() > 0
    assert layer.magnitude.shape == (layer._weight_view(layer.weight).shape[0],)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == \
        {"lora_A", "lora_B", "magnitude"}
    layer.to(torch.bfloat16)  # the magnitude stays float32
    assert layer.weight.dtype == torch.bfloat16 and layer.magnitude.dtype == torch.float32
    layer.to(torch.float32).merge()
    layer.train()
    with pytest.warns(UserWarning, match="the layer is merged"):
        layer(x).sum()
    layer.unmerge()
    with pytest.warns(UserWarning, match="without a magnitude"):
        layer.load_state_dict({"weight": layer.weight.detach()}, strict=False)


PEFT_SHAPES = {  # the shapes PEFT 0.21.2 saves, per kind, r = 2
    "conv2d": {"lora_A.weight": (2, 3, 3, 2), "lora_B.weight": (5, 2, 1, 1),
               "lora_magnitude_vector": (1, 5, 1, 1)},
    "embedding": {"lora_embedding_A": (2, 7), "lora_embedding_B": (4, 2),
                  "lora_magnitude_vector": (4,)},
    "gpt2_conv1d": {"lora_A.weight": (2, 4), "lora_B.weight": (5, 2),
                    "lora_magnitude_vector": (5,)},
}


@pytest.mark.parametrize("kind", PEFT_SHAPES)
def test_peft_tensors_have_peft_keys_and_shapes_and_load_back(kind):
    _, layer, x = make(kind)
    tensors = layer.peft_tensors()
    assert {k: tuple(t.shape) for k, t in tensors.items()} == PEFT_SHAPES[kind]
    other = copy.deepcopy(layer)
    other.reset_adapter()
    assert not torch.equal(other(x), layer(x))
    other.load_peft_tensors({k: t.clone() for k, t in tensors.items()})
    assert torch.equal(other(x), layer(x))
    key = "lora_magnitude_vector"
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=f"{key} expected shape"):
        other.load_peft_tensors({**tensors, key: tensors[key].reshape(-1)[1:]})
    with pytest.raises(ValueError, match="expected the keys"):
        other.load_peft_tensors({k: t for k, t in tensors.items() if k != key})
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items()
               if isinstance(v, torch.Tensor))


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"^groups: only groups=1 .*got 2"):
        dm.DoRAConv2d.from_base(nn.Conv2d(4, 4, 3, groups=2), r=2, lora_alpha=2)
    with pytest.raises(ValueError, match=r"^padding_mode: only 'zeros' .*got 'reflect'"):
        dm.DoRAConv2d.from_base(nn.Conv2d(2, 2, 3, padding_mode="reflect"), r=2, lora_alpha=2)
    with pytest.raises(TypeError, match=r"^module: DoRAConv2d adapts torch.nn.Conv2d, got Conv1d"):
        dm.DoRAConv2d.from_base(nn.Conv1d(2, 2, 3), r=2, lora_alpha=2)
    with pytest.raises(TypeError, match=r"^module: DoRAConv1D adapts transformers' Conv1D.*"
                                        r"got Conv1d"):
        dm.DoRAConv1D.from_base(nn.Conv1d(2, 2, 3), r=2, lora_alpha=2)
    with pytest.raises(ValueError, match=r"^kernel_size: expected an integer >= 1 or a tuple of "
                                         r"2 of them, got \(3, 0\)"):
        dm.DoRAConv2d(2, 2, (3, 0), r=1, lora_alpha=1)
    with pytest.raises(ValueError, match=r"^padding_idx: expected None or an integer in "
                                         r"\[-5, 5\), got 5"):
        dm.DoRAEmbedding(5, 3, r=1, lora_alpha=1, padding_idx=5)
    with pytest.raises(ValueError, match="^r: expected an integer >= 1, got 0"):
        dm.DoRAEmbedding(5, 3, r=0, lora_alpha=1)
    with pytest.raises(ValueError, match=r"^y0: expected 3 channels"):
        dm.dora_scale(torch.ones(2, 4), torch.ones(3, 5), torch.ones(1, 5), torch.ones(3, 1),
                      torch.ones(3), 1.0)
    assert dm.is_transformers_conv1d(Conv1D(3, 2)) and not dm.is_transformers_conv1d(
        nn.Conv1d(2, 3, 1))
    with pytest.raises(ValueError, match="no Conv1D class to return"):
        dm.DoRAConv1D(2, 3, r=1, lora_alpha=1).to_base()


# --- PEFT side by side (skipped without peft) ---------------------------------------------------

class Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


PREFIX = "base_model.model.layer."
PEFT_KINDS = ["conv1d", "conv2d", "conv3d", "embedding", "gpt2_conv1d"]


def peft_pair(kind, use_dora):
    """(our layer, PEFT's model around the same base with the same A, B, m, input)."""
    peft = pytest.importorskip("peft")
    base = None
    if kind == "gpt2_conv1d":
        base = pytest.importorskip("transformers.pytorch_utils").Conv1D(5, 4)
    # (no dead unit: PEFT divides by its zero norm, where the zero-row rule here gives 0)
    base, ours, x = make(kind, use_dora, base=base, dead_unit=False)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["layer"], use_dora=use_dora,
                             fan_in_fan_out=kind == "gpt2_conv1d")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(Holder(copy.deepcopy(base)), config)
    saved = {PREFIX + k: t.clone() for k, t in ours.peft_tensors().items()}
    result = peft.set_peft_model_state_dict(model, saved)
    assert not result.unexpected_keys
    return peft, ours, model, x, saved


@pytest.mark.interop
@pytest.mark.parametrize("use_dora", [True, False])
@pytest.mark.parametrize("kind", PEFT_KINDS)
def test_outputs_gradients_keys_and_merged_modules_equal_peft(kind, use_dora):
    peft, ours, model, x, saved = peft_pair(kind, use_dora)
    theirs_saved = peft.get_peft_model_state_dict(model)
    assert {k: tuple(t.shape) for k, t in theirs_saved.items()} == \
        {k: tuple(t.shape) for k, t in saved.items()}
    assert all(torch.equal(theirs_saved[k], saved[k]) for k in saved)
    x1, x2 = (x.clone().requires_grad_(x.is_floating_point()) for _ in range(2))
    y_ours, y_theirs = ours(x1), model(x2)
    assert rel_error(y_ours.detach(), y_theirs.detach()) < 1e-12
    G = torch.randn_like(y_ours)
    (y_ours * G).sum().backward()
    (y_theirs * G).sum().backward()
    ours_grads = {ours.PEFT_KEYS[n]: p.grad.reshape(saved[PREFIX + ours.PEFT_KEYS[n]].shape)
                  for n, p in ours.named_parameters() if p.grad is not None}
    theirs_grads = {n.replace(".default", "").replace("vector.weight", "vector")
                    .removeprefix(PREFIX): p.grad
                    for n, p in model.named_parameters() if p.grad is not None}
    assert set(ours_grads) == set(theirs_grads)
    for key in ours_grads:
        assert rel_error(ours_grads[key], theirs_grads[key]) < 1e-11, key
    if x.is_floating_point():
        assert rel_error(x1.grad, x2.grad) < 1e-11
    merged = model.merge_and_unload().layer
    plain = ours.to_base()
    assert type(merged) is type(plain)
    assert rel_error(merged.weight.detach(), plain.weight.detach()) < 1e-12
    assert rel_error(merged(x).detach(), plain(x).detach()) < 1e-12


def test_a_dilated_convolution_is_the_float64_truth_and_peft_side_by_side_as_information():
    """Ours against the textbook (W' formed in float64, then F.conv1d with the dilation),
    unmerged and merged. PEFT is only reported, never asserted: PEFT 0.21.2's lora_A ignored
    the base's dilation and failed here (a shape error); PEFT 0.22.0 runs and agrees."""
    base, ours, x = make("conv1d_dilated", dead_unit=False)
    with torch.no_grad():
        truth = F.conv1d(x, textbook_weight("conv1d_dilated", ours), base.bias, base.stride,
                         base.padding, base.dilation)
    assert rel_error(ours(x).detach(), truth) < 1e-12
    assert rel_error(ours.to_base()(x).detach(), truth) < 1e-12
    try:
        import peft
    except ImportError:
        return  # (the side by side is information only)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(Holder(copy.deepcopy(base)), peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["layer"], use_dora=True))
    try:
        peft.set_peft_model_state_dict(model, {PREFIX + k: t.clone() for k, t in
                                               ours.peft_tensors().items()})
        report = f"relative error {rel_error(model(x).detach(), truth):.1e} from the truth"
    except Exception as error:  # noqa: BLE001 (information only: PEFT's result cannot fail us)
        report = f"fails: {type(error).__name__}: {str(error)[:80]}"
    print(f"\nPEFT {peft.__version__} on a dilated Conv1d: {report}")