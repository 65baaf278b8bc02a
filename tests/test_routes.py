"""Each named route of dora_minimal.routes is the core (dora_minimal.core) computed another way:
the same output and gradients in float64, in both detach_norm modes, to ~1e-12. And LoRA's output
(core.linear_lora_output, which the core's y0 and a LoRA layer share) is Eq. 1 with its bias."""

import numpy as np

import pytest
import torch
from hypothesis import given, strategies as st

from dora_minimal import dora_linear, lora_linear, routes
from helpers import ROW_KINDS, problems, rel_error

# (the eval route forms W' when tokens >= in; bias and a separate adapter input vary too)
SPEEDY = ["merged_weight", "blocked"]


def run(route, p, detach_norm, dropout, train=True):
    """y and the gradients of (x, x_a, A, B, m) of dora_linear on problem p, by `route`."""
    x, A, B, m = (torch.tensor(a, requires_grad=train) for a in (p.x, p.A, p.B, p.m))
    W0 = torch.tensor(p.W0)
    bias = None if p.bias is None else torch.tensor(p.bias)
    # a fixed stand-in for dropout(x): the adapter branch's own input
    x_a = (2 * x * torch.tensor(p.x > 0)) if dropout else None
    with routes.force_route(route), torch.set_grad_enabled(train):
        y = dora_linear(x, W0, A, B, m, p.scaling, bias, detach_norm, lora_input=x_a)
    if not train:
        return [y], None
    grads = torch.autograd.grad(y, (x, A, B, m), torch.tensor(p.grad_y), allow_unused=True)
    return [y.detach(), *grads], type(y.grad_fn).__name__


@pytest.mark.parametrize("route", SPEEDY)
@given(p=problems(min_tokens=1, rows=ROW_KINDS), detach_norm=st.booleans(), dropout=st.booleans())
def test_a_route_gives_the_cores_output_and_gradients(route, p, detach_norm, dropout):
    ours, function = run(route, p, detach_norm, dropout)
    core, core_function = run("core", p, detach_norm, dropout)
    assert core_function == "DoRAFunctionBackward"
    # merged_weight cannot serve a separate adapter input: that call takes the core
    expected = "DoRAFunctionBackward" if (route, dropout) == ("merged_weight", True) else \
        {"merged_weight": "MergedWeightBackward", "blocked": "BlockedBackward"}[route]
    assert function == expected
    # in exact mode a gradient can cancel to ~0 (in = 1: all of it), so differences are
    # measured against the size of the terms it was summed from (the detached gradients)
    terms, _ = run("core", p, True, dropout)
    for name, a, b, t in zip(("y", "x", "A", "B", "m"), ours, core, terms):
        assert rel_error(a.numpy(), b.numpy(), scale=t.abs().max().item()) < 1e-12, name


@pytest.mark.parametrize("route", SPEEDY)
@given(p=problems(min_tokens=1, rows=ROW_KINDS), dropout=st.booleans())
def test_a_route_gives_the_cores_output_in_eval(route, p, dropout):
    (ours,), _ = run(route, p, True, dropout, train=False)
    (core,), _ = run("core", p, True, dropout, train=False)
    assert rel_error(ours.numpy(), core.numpy()) < 1e-12


def test_without_the_private_names_every_call_takes_the_core(monkeypatch):
    """The two private torch names are read once; where a torch release lacks them, routes go
    through Function.apply, or none is taken (the core is correct everywhere), with the same
    numbers."""
    x = torch.randn(4, 6, dtype=torch.float64)
    W0 = torch.randn(5, 6, dtype=torch.float64)
    assert routes.choose_route(x, None, W0, True) == "merged_weight"
    monkeypatch.setattr(routes, "_cpp_apply", None)  # Function.apply instead: the same numbers
    A, B, m = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((2, 6), (5, 2),
                                                                                   (5,)))
    y = dora_linear(x, W0, A, B, m, 1.5)
    assert type(y.grad_fn).__name__ == "MergedWeightBackward"
    expected = dora_linear(x, W0, A, B, m, 1.5)
    monkeypatch.setattr(routes, "_transforms_active", None)
    assert routes.choose_route(x, None, W0, True) == "core"
    with routes.force_route("blocked"):
        assert routes.choose_route(x, None, W0, True) == "core"
    y = dora_linear(x, W0, A, B, m, 1.5)
    assert type(y.grad_fn).__name__ == "DoRAFunctionBackward"
    assert torch.allclose(y, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("route", SPEEDY)
@pytest.mark.parametrize("detach_norm", [True, False])
def test_a_routes_backward_differentiated_again_or_batched_is_the_cores(route, detach_norm):
    """create_graph=True and is_grads_batched=True: the routes' backward hands over to the core
    (forward once more under autograd), so a gradient penalty and batched gradients agree."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    W0 = torch.randn(5, 6, dtype=torch.float64)
    A, B = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((2, 6), (5, 2)))
    m = torch.randn(5, dtype=torch.float64, requires_grad=True)
    results = []
    for name in (route, "core"):
        with routes.force_route(name):
            y = dora_linear(x, W0, A, B, m, 1.5, None, detach_norm)
        gx, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        penalty = torch.autograd.grad(gx.square().sum(), (A, B, m), retain_graph=True)
        batched = torch.autograd.grad(y, (A, m), torch.randn(4, *y.shape, dtype=y.dtype,
                                                             generator=torch.Generator()
                                                             .manual_seed(1)),
                                      is_grads_batched=True)
        results.append([*penalty, *batched])
    for a, b in zip(*results):
        assert rel_error(a.detach().numpy(), b.detach().numpy()) < 1e-12


@given(p=problems(), dropout=st.booleans())
def test_loras_output_is_eq_1_with_its_bias(p, dropout):
    """y = x W0^T + b + s·(x_a A^T) B^T (Eq. 1) for any batch shape, x_a a separate adapter
    input or x; always with a bias (dora_linear adds its bias after the scale, so only LoRA's
    output passes one to linear_lora_output)."""
    bias = p.bias if p.bias is not None else np.linspace(-1.0, 2.0, p.W0.shape[0])
    x_a = 2 * p.x * (p.x > 0) if dropout else p.x  # a fixed stand-in for dropout(x)
    base, update = p.x @ p.W0.T + bias, p.scaling * (x_a @ p.A.T) @ p.B.T  # (..., out)
    y = lora_linear(*(torch.from_numpy(a) for a in (p.x, p.W0, p.A, p.B)), p.scaling,
                    torch.from_numpy(bias), lora_input=torch.from_numpy(x_a) if dropout else None)
    assert y.shape == base.shape
    scale = np.abs(base).max(initial=0.0) + np.abs(update).max(initial=0.0)
    assert rel_error(y.numpy(), base + update, scale=scale) < 1e-12
