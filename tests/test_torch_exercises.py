"""Property tests of the PyTorch core's scale, forward and hand-written backward (Eq. 5, 6, 7, 11):
exercises 11-13, in tutorial/exercises/dora_torch.py.

They check the `DoRAFunction` of the module that --impl chooses: dora_minimal.core by default,
your solutions in tutorial/exercises/dora_torch.py with `--impl=exercises`, or a copy of that file
with `--impl=PATH.py`. Every test is marked with the exercise that makes it runnable and the
equation it checks; `--exercise N` runs the tests of exercises 1..N, as for tests/test_reference.py
(see conftest.py). Every expected value comes from elsewhere, in float64: the textbook formula
(V' formed, W' = m·V'/‖V'‖_c) under plain autograd, the NumPy reference, and
torch.autograd.gradcheck; the layers are linear or convolutions (y0 with two trailing dims), with
magnitudes of either sign or zero.

With --shipped-exercises (CI), each test runs twice on the shipped stubs: with exercises 11..n
solved by the core's own forward and backward (below) it must pass, with exercise n a stub it must
fail; and the tests are checked to teach: the exercises as a learner writes them pass, and
solutions with mistakes learners make fail the tests of their exercise.
"""

import importlib.util
import inspect
import os
import re
import subprocess
import sys
import types
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, strategies as st
from torch.autograd.gradcheck import GradcheckError

from conftest import exercise_label
from dora_minimal import core, reference
from helpers import TORCH_EXERCISES, check, fail, note_example

ROOT = Path(__file__).resolve().parent.parent
STUBS = ROOT / "tutorial" / "exercises" / "dora_torch.py"
FIRST = 11  # the number of the first PyTorch exercise


def exercise(n, eq=None):
    """Marks a test that exercises 1..n make runnable and that checks the paper's Eq. `eq`."""
    return pytest.mark.exercise(n, eq)


# --- The module under test ---------------------------------------------------------------------

def core_backward(inputs, grad_y, wanted):
    """core.DoRAFunction's backward, run on a stand-in for autograd's ctx: the gradients of the
    inputs numbered `wanted`, as a tuple."""
    ctx = types.SimpleNamespace(needs_input_grad=tuple(i in wanted for i in range(len(inputs))))
    ctx.save_for_backward = lambda *tensors: setattr(ctx, "saved_tensors", tensors)
    core.DoRAFunction.setup_context(ctx, inputs, None)
    grads = core.DoRAFunction.backward(ctx, grad_y)
    return tuple(grads[i] for i in wanted)


# The solution of each exercise, as the core computes it: the stubs' signatures, and what CI puts
# in place of a stub to check that each test needs exactly the exercises it is marked with.
def solved_scale_forward(y0, weight, lora_A, lora_B, magnitude, bias, scaling, trailing_dims):
    return core.DoRAFunction.forward(y0, weight, lora_A, lora_B, magnitude, bias, scaling, True,
                                     trailing_dims)


def solved_scale_backward(grad_y, y0, weight, lora_A, lora_B, magnitude, scaling, trailing_dims):
    inputs = (y0, weight, lora_A, lora_B, magnitude, None, scaling, True, trailing_dims)
    return core_backward(inputs, grad_y, wanted=(0, 4, 5))  # y0, m, b


def solved_norm_path_backward(grad_y, y0, weight, lora_A, lora_B, magnitude, scaling,
                              trailing_dims):
    inputs = (y0, weight, lora_A, lora_B, magnitude, None, scaling, False, trailing_dims)
    return core_backward(inputs, grad_y, wanted=(2, 3))  # A, B: in exact mode, the norm's path


SOLUTIONS = [solved_scale_forward, solved_scale_backward, solved_norm_path_backward]


def load_file(path, name="dora_torch"):
    """A fresh module from a .py file: its DoRAFunction looks its three functions up in it."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def solved_up_to(n):
    """The shipped stubs with exercises 11..n replaced by the core's solutions."""
    module = load_file(STUBS, f"dora_torch_solved_up_to_{n}")
    for name, solution in zip(TORCH_EXERCISES[:n - FIRST + 1], SOLUTIONS):
        setattr(module, name, solution)
    return module


def pytest_generate_tests(metafunc):
    """Point each test that takes `dora_torch` at the module under test (see conftest.py's hook
    of the same name, which does this for tests/test_reference.py)."""
    if "dora_torch" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("exercise")
    label = exercise_label(marker)
    if not metafunc.config.getoption("--shipped-exercises"):
        metafunc.parametrize("dora_torch", [metafunc.config.getoption("--impl")], ids=[label],
                             indirect=True, scope="module")
        return
    n = marker.args[0]
    metafunc.parametrize("dora_torch", [
        pytest.param(n, id=f"{label}-solved"),
        pytest.param(n - 1, id=f"{label}-stub", marks=pytest.mark.xfail(
            raises=NotImplementedError, strict=True,
            reason=f"exercise {n} is a stub: the test must fail on it")),
    ], indirect=True, scope="module")


@pytest.fixture(scope="module")
def dora_torch(request):
    """The module whose DoRAFunction the tests check (see --impl and --shipped-exercises)."""
    if isinstance(request.param, int):
        return solved_up_to(request.param)
    if request.param == "reference":
        return core
    path = STUBS if request.param == "exercises" else Path(request.param)
    try:
        module = load_file(path)
    except Exception as error:  # once, not once per test
        pytest.exit(f"--impl={request.param}: importing it failed: "
                    f"{type(error).__name__}: {error}", returncode=1)
    if not hasattr(module, "DoRAFunction"):
        pytest.exit(f"--impl={request.param} has no DoRAFunction: tests/test_torch_exercises.py "
                    "checks tutorial/exercises/dora_torch.py or a copy of it", returncode=1)
    return module


# --- Random layers, and the textbook formula ---------------------------------------------------

@dataclass
class Layer:
    """An adapted linear layer or 2-d convolution in float64, and some ∂L/∂y = G. Leaves x, A,
    B, m (and bias) require gradients; W0 does not."""
    kind: str           # "linear" or "conv2d"
    x: torch.Tensor     # (..., in) or (N, in, H, W)
    W0: torch.Tensor    # (out, in) or (out, in, k, k)
    A: torch.Tensor     # (r, in) or (r, in, k, k)
    B: torch.Tensor     # (out, r)
    m: torch.Tensor     # (out,), of either sign or 0
    bias: torch.Tensor  # (out,) or None
    G: torch.Tensor     # shaped as y: (..., out) or (N, out, H', W')
    scaling: float

    @property
    def trailing_dims(self):
        return 0 if self.kind == "linear" else 2

    def leaves(self):
        """{name: tensor} of the tensors that get gradients."""
        named = dict(x=self.x, A=self.A, B=self.B, m=self.m)
        return named if self.bias is None else named | dict(bias=self.bias)

    def views(self):
        """W0 and A as (out, in') and (r, in'): what DoRAFunction takes."""
        return self.W0.flatten(1), self.A.flatten(1)

    def lora_output(self):
        """y0 = base(x; W0) + s·B(A(x)), under autograd."""
        if self.kind == "linear":
            return self.x @ self.W0.T + self.scaling * (self.x @ self.A.T) @ self.B.T
        down = torch.nn.functional.conv2d(self.x, self.A)  # (N, r, H', W')
        up = torch.nn.functional.conv2d(down, self.B[:, :, None, None])
        return torch.nn.functional.conv2d(self.x, self.W0) + self.scaling * up

    def textbook(self, detach_norm):
        """The textbook layer: V' = W0 + s·B A formed, W' = m·V'/‖V'‖_c (the norm a constant if
        detach_norm), y = base(x; W') + b, all under plain autograd."""
        W0, A = self.views()
        V = W0 + self.scaling * self.B @ A  # (out, in')
        norm = torch.linalg.vector_norm(V, dim=1, keepdim=True)
        W = self.m[:, None] * V / (norm.detach() if detach_norm else norm)
        if self.kind == "linear":
            y = self.x @ W.T
            return y if self.bias is None else y + self.bias
        return torch.nn.functional.conv2d(self.x, W.view_as(self.W0), self.bias)

    def without_row(self, row):
        """The same layer without output row `row`, on fresh leaves: what a dead row leaves."""
        keep = [j for j in range(self.W0.shape[0]) if j != row]
        channel = self.G.ndim - 1 - self.trailing_dims

        def fresh(t, dim=0):
            return None if t is None else t.detach()[(slice(None),) * dim + (keep,)].clone()
        smaller = replace(self, x=self.x.detach().clone(), A=self.A.detach().clone(),
                          W0=fresh(self.W0), B=fresh(self.B), m=fresh(self.m),
                          bias=fresh(self.bias), G=fresh(self.G, channel))
        for t in smaller.leaves().values():
            t.requires_grad_()
        return smaller


@st.composite
def layers(draw, kinds=("linear", "conv2d"), zero_row=False, scales=(-2, 2)):
    """A random Layer: small shapes, each array at its own scale 10^k (k drawn from `scales`),
    magnitudes of random sign (some 0). With zero_row, returns (layer, row) with row `row` of
    W0 and of B set to 0, so that row of V' is 0."""
    kind = draw(st.sampled_from(kinds), label="kind")
    out_features = draw(st.integers(2 if zero_row else 1, 5), label="out")
    # in = 1 last, as in helpers.problems: a shrunk example shows the norm's path turning V'
    in_features = draw(st.sampled_from([2, 3, 4, 1]), label="in")
    r = draw(st.integers(1, 3), label="r")
    scaling = draw(st.sampled_from([0.5, 1.0, 2.0, 16.0 / r]), label="scaling")
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
    exponent = st.integers(*scales)

    def array(*shape):
        return rng.standard_normal(shape) * 10.0 ** draw(exponent)

    if kind == "linear":
        batch = tuple(draw(st.lists(st.integers(0, 3), max_size=2), label="batch"))
        kernel, x, y_shape = (), array(*batch, in_features), batch + (out_features,)
    else:
        k, N = draw(st.integers(1, 2), label="k"), draw(st.integers(1, 2), label="N")
        size = [k + draw(st.integers(0, 2)) for _ in range(2)]
        kernel, x = (k, k), array(N, in_features, *size)
        y_shape = (N, out_features, size[0] - k + 1, size[1] - k + 1)
    W0, A = array(out_features, in_features, *kernel), array(r, in_features, *kernel)
    # B at a scale tied to W0's so that s·B A is an update, not a replacement of W0
    B = rng.standard_normal((out_features, r)) * np.abs(W0).max() / (np.abs(A).max() * scaling * r)
    signs = draw(st.lists(st.sampled_from([1.0, -1.0, 0.0]), min_size=out_features,
                          max_size=out_features), label="signs of m")
    m = np.linalg.norm(W0.reshape(out_features, -1), axis=1) * rng.uniform(0.5, 2.0, out_features)
    bias = array(out_features) if draw(st.booleans(), label="bias") else None
    row = draw(st.integers(0, out_features - 1), label="zero row") if zero_row else None
    if zero_row:
        W0[row], B[row] = 0.0, 0.0
    layer = Layer(kind, *(None if a is None else torch.tensor(a) for a in (
        x, W0, A, B, m * np.array(signs), bias, array(*y_shape))), scaling=scaling)
    for t in layer.leaves().values():
        t.requires_grad_()
    note_example(f"{kind}, out={out_features}, in={in_features}, r={r}, y0 {y_shape}, scaling "
                 f"{scaling:g}, float64, signs of m {signs}"
                 + ("" if row is None else f", zero row {row} of V'")
                 + (", no bias" if bias is None else ", a bias"))
    return (layer, row) if zero_row else layer


def scaled(dora_torch, layer, detach_norm, y0=None):
    """y = c ⊙ y0 + b by the DoRAFunction under test, y0 the layer's LoRA output by default."""
    W0, A = layer.views()
    y0 = layer.lora_output() if y0 is None else y0
    return dora_torch.DoRAFunction.apply(y0, W0, A, layer.B, layer.m, layer.bias,
                                         layer.scaling, detach_norm, layer.trailing_dims)


def gradients(y, layer):
    """{name: ∂L/∂name} for L = Σ G ⊙ y, over the layer's leaves."""
    leaves = layer.leaves()
    return dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), layer.G)))


# Each quantity's equation, as a failing test cites it: (the paper's equation number, formula).
OUTPUT = (5, "y = c ⊙ y0 + b, c = m/‖V'‖_c (0 for a zero row of V'), in y0's dtype")
THROUGH_Y0 = (11, "∂L/∂y0 = c ⊙ G (scale_backward's first result); autograd takes it on "
                  "through y0 to x, A and B")
GRAD_M = (7, "∂L/∂m = Σ G ⊙ y0 / ‖V'‖_c, Σ over every dim but the channel's "
             "(scale_backward's second result)")
GRAD_BIAS = (None, "∂L/∂b = Σ G over every dim but the channel's (scale_backward's third)")
NORM_PATH = (6, "∂L/∂n = -c ⊙ Σ G ⊙ y0 / n; ∂L/∂V'_j += ∂L/∂n_j V'_j/n_j; on to A and B "
                "as s·B^T ∂L/∂V' and s·∂L/∂V' A^T (norm_path_backward's results)")


def cited(name, detach_norm=True):
    """(equation, formula) of the gradient of leaf `name` (x, A, B, m, bias)."""
    if name in ("A", "B") and not detach_norm:
        return 6, "y0's path (c ⊙ G, Eq. 11) plus the norm's: " + NORM_PATH[1]
    return {"m": GRAD_M, "bias": GRAD_BIAS}.get(name, THROUGH_Y0)


def assert_gradients_agree(ours, expected, against, terms=None, detach_norm=True):
    """Each of `ours` within 1e-10 of `expected`, relative to the larger of the two or, where
    given, to terms[name]: the size of the terms it was summed from (rel_error's `scale`)."""
    __tracebackhide__ = True
    for name, grad in expected.items():
        scale = 0.0 if terms is None else float(np.max(np.abs(terms[name].numpy()), initial=0.0))
        equation, formula = cited(name, detach_norm)
        check(f"∂L/∂{name}", ours[name], grad, 1e-10, equation=equation, formula=formula,
              against=against, scale=scale)


def assert_norm_paths_agree(ours, ours_detached, expected, expected_detached, against, terms):
    """The norm's path of ∂L/∂A and ∂L/∂B, what norm_path_backward returns: the exact gradient
    minus the detached one, ours against expected's (within 1e-10 of the path's terms)."""
    __tracebackhide__ = True
    for index, name in enumerate(("A", "B")):
        scale = float(np.max(np.abs(terms[name].numpy()), initial=0.0))
        check(f"∂L/∂{name} along the norm's path (norm_path_backward's result {index + 1}: "
              "the exact gradient minus the detached one)",
              ours[name] - ours_detached[name], expected[name] - expected_detached[name], 1e-10,
              equation=6, formula=NORM_PATH[1], against=against, scale=scale)


def assert_finite(gradients, row):
    """Every gradient finite where row `row` of V' is 0."""
    __tracebackhide__ = True
    for name, grad in gradients.items():
        if not torch.isfinite(grad).all():
            fail(f"∂L/∂{name} is not finite where row {row} of V' is 0: 0/0 there? (the "
                 "zero-row rule: x / 0 counts as 0)", cited(name)[0])


def gradcheck(function, inputs, names):
    """torch.autograd.gradcheck, its failure said in a few lines: which input's gradient
    disagrees with finite differences."""
    __tracebackhide__ = True
    try:
        torch.autograd.gradcheck(function, inputs)
    except GradcheckError as error:
        found = re.search(r"with respect to input (\d+)", str(error))
        name = names[int(found.group(1))] if found else "an input"
        equation, formula = cited(name, detach_norm=True) if found else (None, None)
        first = str(error).strip().splitlines()[0]
        fail(f"∂L/∂{name} disagrees with finite differences (torch.autograd.gradcheck: {first})"
             + ("" if formula is None else f"\n  {formula}"), equation)


def path_sizes(layer):
    """The exact gradients' terms, to measure their errors against: y0's path (the detached
    gradients) and the norm's path (about as large where the two cancel)."""
    return gradients(layer.textbook(detach_norm=True), layer)


def channel_of(t, layer, row):
    """t's entries of output channel `row` (t shaped as y)."""
    return t.select(t.ndim - 1 - layer.trailing_dims, row)


def assume_no_row_nearly_cancels(layer):
    """Finite differences of ‖V'_j‖ need steps much shorter than ‖V'_j‖: skip the layers with a
    row of V' that s·B A nearly cancels."""
    W0_norms = torch.linalg.vector_norm(layer.views()[0], dim=1)
    assume(bool(norms_of(layer).min() > 1e-2 * W0_norms.max()))


def norms_of(layer):
    """‖V'‖_c (out,), computed here with V' formed."""
    W0, A = layer.views()
    return torch.linalg.vector_norm(W0 + layer.scaling * layer.B @ A, dim=1).detach()


# --- Exercise 11: scale_forward (Eq. 5) --------------------------------------------------------

@exercise(11, eq=5)
@given(layers())
def test_scale_forward_equals_the_layer_with_the_merged_weight(dora_torch, layer):
    """Eq. 5: c ⊙ y0 + b, c = m/‖V'‖_c, is the layer with weight W' = m·V'/‖V'‖_c (linear or a
    convolution, m of either sign)."""
    y = scaled(dora_torch, layer, detach_norm=True)
    check("y, scale_forward's result", y, layer.textbook(detach_norm=True), 1e-12,
          equation=OUTPUT[0], formula=OUTPUT[1], dtype="float64",
          against="the layer with weight W' = m·V'/‖V'‖_c formed")


@exercise(11, eq=5)
@given(layers(kinds=("linear",)))
def test_scale_forward_of_a_linear_layer_agrees_with_the_numpy_reference(dora_torch, layer):
    y = scaled(dora_torch, layer, detach_norm=True)
    numpy = [None if t is None else t.detach().numpy()
             for t in (layer.x, layer.W0, layer.A, layer.B, layer.m, layer.bias)]
    expected = torch.tensor(reference.forward(*numpy[:5], layer.scaling, numpy[5]))
    check("y, scale_forward's result", y, expected, 1e-12, equation=OUTPUT[0],
          formula=OUTPUT[1], against="the NumPy reference")


@exercise(11, eq=5)
@given(layers(zero_row=True))
def test_scale_forward_of_a_zero_row_outputs_the_bias(dora_torch, layer_and_row):
    """Zero-row rule: a row of V' that is exactly 0 has c = 0 (not 0/0); it outputs its bias."""
    layer, row = layer_and_row
    y = scaled(dora_torch, layer, detach_norm=True)
    channel = channel_of(y, layer, row)
    check(f"y's channel {row}, a zero row of V' (its bias: c = 0, not 0/0)", channel,
          torch.zeros_like(channel) + (0 if layer.bias is None else layer.bias[row]), 1e-300,
          equation=OUTPUT[0], formula=OUTPUT[1])


@exercise(11, eq=5)
def test_scale_forward_of_a_bf16_output_multiplies_by_c_in_float32(dora_torch):
    """bf16 holds c = 1.003 as 1, which would leave y0 = 1000 unchanged; c in float32 makes it
    1003, which rounds to bf16's 1004."""
    W0 = torch.zeros(2, 3, dtype=torch.bfloat16)
    W0[:, 0] = 1000.0  # rows of norm 1000
    A, B = torch.ones(1, 3, dtype=torch.bfloat16), torch.zeros(2, 1, dtype=torch.bfloat16)
    m = torch.tensor([1003.0, -1003.0])  # float32, as DoRALinear keeps it for a bf16 layer
    y0 = torch.full((4, 2), 1000.0, dtype=torch.bfloat16)
    y = dora_torch.DoRAFunction.apply(y0, W0, A, B, m, None, 2.0, True, 0)
    check("y, scale_forward's result for a bf16 y0", y, y, None, dtype="bfloat16")
    if y.float().tolist() != [[1004.0, -1004.0]] * 4:
        fail(f"y = {y[0].tolist()} for y0 = 1000 and c = ±1.003, expected [1004, -1004] "
             "(1003 rounded to bf16): c rounded to bf16 (1.003 is 1 there)? Compute c and "
             "c ⊙ y0 + b in float32, and round y once, at the end\n"
             f"  Eq. {OUTPUT[0]}: {OUTPUT[1]}", 5)


# --- Exercise 12: scale_backward (Eq. 7 and 11) ------------------------------------------------

@exercise(12, eq=11)
@given(layers())
def test_detached_backward_equals_autograd_of_the_textbook_formula(dora_torch, layer):
    """Eq. 11: with ‖V'‖_c a constant, every gradient (x, A, B, m, b) is autograd's of the
    textbook layer with its norm detached."""
    ours = gradients(scaled(dora_torch, layer, detach_norm=True), layer)
    expected = gradients(layer.textbook(detach_norm=True), layer)
    assert_gradients_agree(ours, expected, "autograd of the textbook formula")


@exercise(12, eq=11)
@given(layers(kinds=("linear",)))
def test_detached_backward_of_a_linear_layer_agrees_with_the_numpy_reference(dora_torch, layer):
    ours = gradients(scaled(dora_torch, layer, detach_norm=True), layer)
    numpy = [t.detach().numpy() for t in (layer.x, layer.W0, layer.A, layer.B, layer.m)]
    expected = reference.backward(*numpy, layer.scaling, layer.G.numpy(), detach_norm=True)
    assert_gradients_agree(ours, {k: torch.tensor(v) for k, v in expected.items()},
                           "the NumPy reference")


@exercise(12, eq=7)
@given(layers())
def test_magnitude_gradient_is_eq7_whatever_the_sign_of_m(dora_torch, layer):
    """Eq. 7: ∂L/∂m = Σ G ⊙ y0 / ‖V'‖_c, over every dim but the channel's: V' (not W', whose
    rows point the other way where m < 0) and y0 (not y)."""
    y0 = layer.lora_output().detach()
    channel = y0.ndim - 1 - layer.trailing_dims
    dims = [d for d in range(y0.ndim) if d != channel]
    products = layer.G * y0
    expected = (products.sum(dims) if dims else products) / norms_of(layer)  # (sum(dim=[]): all)
    y = scaled(dora_torch, layer, detach_norm=True, y0=y0)
    (grad_m,) = torch.autograd.grad(y, layer.m, layer.G)
    check("∂L/∂m", grad_m, expected, 1e-12, equation=GRAD_M[0], formula=GRAD_M[1])


@exercise(12, eq=7)
def test_magnitude_gradient_of_bf16_outputs_is_summed_in_float32(dora_torch):
    """Σ G ⊙ y0 over 257 tokens of 1s is 257, which bf16 rounds to 256: ∂L/∂m = 257/‖V'‖ needs
    the sum in float32, as for c (the magnitude itself is float32)."""
    W0 = torch.zeros(2, 3, dtype=torch.bfloat16)
    W0[:, 0] = 2.0  # rows of norm 2
    A, B = torch.ones(1, 3, dtype=torch.bfloat16), torch.zeros(2, 1, dtype=torch.bfloat16)
    m = torch.tensor([1.0, -1.0], requires_grad=True)
    y0 = torch.ones(257, 2, dtype=torch.bfloat16)
    y = dora_torch.DoRAFunction.apply(y0, W0, A, B, m, None, 2.0, True, 0)
    (grad_m,) = torch.autograd.grad(y, m, torch.ones_like(y))
    if grad_m.tolist() != [128.5, 128.5]:
        fail(f"∂L/∂m = {grad_m.tolist()} for 257 tokens of G = y0 = 1 (bf16) and ‖V'‖ = 2, "
             "expected 257/2 = 128.5: Σ G ⊙ y0 summed in bf16 (257 is 256 there)? Sum in "
             f"the dtype of adapted_row_norm's result\n  Eq. 7: {GRAD_M[1]}", 7)


@exercise(12, eq=7)
def test_magnitude_gradient_of_fp16_outputs_takes_the_products_in_float32(dora_torch):
    """G ⊙ y0 = 300 · 300 = 90000 is past fp16's largest number, 65504: the products of Σ G ⊙ y0
    are taken in float32 too, and ∂L/∂m = 90000/‖V'‖ is finite."""
    W0 = torch.zeros(2, 3, dtype=torch.float16)
    W0[:, 0] = 2.0  # rows of norm 2
    A, B = torch.ones(1, 3, dtype=torch.float16), torch.zeros(2, 1, dtype=torch.float16)
    m = torch.tensor([1.0, -1.0], requires_grad=True)
    y0 = torch.full((1, 2), 300.0, dtype=torch.float16)
    y = dora_torch.DoRAFunction.apply(y0, W0, A, B, m, None, 2.0, True, 0)
    (grad_m,) = torch.autograd.grad(y, m, torch.full_like(y, 300.0))
    if grad_m.tolist() != [45000.0, 45000.0]:
        fail(f"∂L/∂m = {grad_m.tolist()} for G = y0 = 300 (fp16) and ‖V'‖ = 2, expected "
             "90000/2 = 45000: G ⊙ y0 multiplied in fp16 (90000 is past its largest number, "
             "65504)? Take the products in the dtype of adapted_row_norm's result\n"
             f"  Eq. 7: {GRAD_M[1]}", 7)


@exercise(12, eq=11)
@given(layers(scales=(-1, 1)))
def test_scale_backward_is_torch_gradcheck(dora_torch, layer):
    """∂L/∂y0 (Eq. 11), ∂L/∂m (Eq. 7) and ∂L/∂b against finite differences (W0, A and B fixed)."""
    W0, A = layer.views()
    y0 = layer.lora_output().detach().requires_grad_()
    inputs = [y0, layer.m] + ([] if layer.bias is None else [layer.bias])

    def scale(y0, m, *bias):
        return dora_torch.DoRAFunction.apply(y0, W0, A.detach(), layer.B.detach(), m,
                                             *(bias or [None]), layer.scaling, True,
                                             layer.trailing_dims)
    gradcheck(scale, inputs, ["y0", "m", "bias"])


@exercise(12, eq=7)
@given(layers(zero_row=True))
def test_detached_backward_of_a_zero_row_is_finite_and_gives_the_row_nothing(dora_torch,
                                                                           layer_and_row):
    """Zero-row rule: c = 0 gives that row no gradient (its ∂L/∂y0 and ∂L/∂m are 0, not NaN),
    and every other gradient is that of the layer without the row."""
    layer, row = layer_and_row
    y0 = layer.lora_output()
    y = scaled(dora_torch, layer, detach_norm=True, y0=y0)
    (grad_y0,) = torch.autograd.grad(y, y0, layer.G, retain_graph=True)
    ours = gradients(y, layer)
    assert_finite(ours | {"y0": grad_y0}, row)
    zeros = channel_of(grad_y0, layer, row)
    check(f"∂L/∂y0's channel {row}, a zero row of V' (c = 0, not 0/0)", zeros,
          torch.zeros_like(zeros), 1e-300, equation=THROUGH_Y0[0], formula=THROUGH_Y0[1])
    check(f"∂L/∂m of zero row {row} of V' (x / 0 counts as 0)", ours["m"][row], 0.0, 1e-300,
          equation=GRAD_M[0], formula=GRAD_M[1])
    smaller = layer.without_row(row)
    expected = gradients(smaller.textbook(detach_norm=True), smaller)
    for name in ("B", "m", "bias"):
        if name in ours:
            ours[name] = torch.cat([ours[name][:row], ours[name][row + 1:]])
    assert_gradients_agree(ours, expected, "the layer without the zero row")


# --- Exercise 13: norm_path_backward (Eq. 6) ---------------------------------------------------

@exercise(13, eq=6)
@given(layers())
def test_exact_backward_equals_autograd_of_the_textbook_formula(dora_torch, layer):
    """Eq. 6: with ‖V'‖_c a function of A and B, every gradient is autograd's of the textbook."""
    ours = gradients(scaled(dora_torch, layer, detach_norm=False), layer)
    expected = gradients(layer.textbook(detach_norm=False), layer)
    assert_norm_paths_agree(ours, gradients(scaled(dora_torch, layer, detach_norm=True), layer),
                            expected, gradients(layer.textbook(detach_norm=True), layer),
                            "autograd of the textbook formula", path_sizes(layer))
    assert_gradients_agree(ours, expected, "autograd of the textbook formula", path_sizes(layer),
                           detach_norm=False)


@exercise(13, eq=6)
@given(layers(kinds=("linear",)))
def test_exact_backward_of_a_linear_layer_agrees_with_the_numpy_reference(dora_torch, layer):
    ours = gradients(scaled(dora_torch, layer, detach_norm=False), layer)
    numpy = [t.detach().numpy() for t in (layer.x, layer.W0, layer.A, layer.B, layer.m)]
    expected, detached = ({k: torch.tensor(v) for k, v in reference.backward(
        *numpy, layer.scaling, layer.G.numpy(), detach_norm=detach_norm).items()}
        for detach_norm in (False, True))
    assert_norm_paths_agree(ours, gradients(scaled(dora_torch, layer, detach_norm=True), layer),
                            expected, detached, "the NumPy reference", path_sizes(layer))
    assert_gradients_agree(ours, expected, "the NumPy reference", path_sizes(layer),
                           detach_norm=False)


@exercise(13, eq=6)
@given(layers(scales=(-1, 1)))
def test_exact_backward_is_torch_gradcheck(dora_torch, layer):
    """The gradients of y0, A, B, m and b, the norm's path included, against finite differences."""
    assume_no_row_nearly_cancels(layer)
    W0, A = layer.views()
    y0 = layer.lora_output().detach().requires_grad_()
    A = A.detach().requires_grad_()
    inputs = [y0, A, layer.B, layer.m] + ([] if layer.bias is None else [layer.bias])

    def scale(y0, A, B, m, *bias):
        return dora_torch.DoRAFunction.apply(y0, W0, A, B, m, *(bias or [None]), layer.scaling,
                                             False, layer.trailing_dims)
    gradcheck(scale, inputs, ["y0", "A", "B", "m", "bias"])


@exercise(13, eq=6)
@given(layers(zero_row=True))
def test_exact_backward_of_a_zero_row_is_finite_and_gives_the_row_nothing(dora_torch,
                                                                        layer_and_row):
    """Zero-row rule: the norm's path of a zero row adds nothing (not 0/0): every gradient is
    that of the layer without the row."""
    layer, row = layer_and_row
    ours = gradients(scaled(dora_torch, layer, detach_norm=False), layer)
    assert_finite(ours, row)
    check(f"∂L/∂B's row {row}, a zero row of V' (its norm's path adds nothing, not 0/0)",
          ours["B"][row], torch.zeros_like(ours["B"][row]), 1e-300, equation=6,
          formula=NORM_PATH[1])
    check(f"∂L/∂m of zero row {row} of V' (x / 0 counts as 0)", ours["m"][row], 0.0, 1e-300,
          equation=GRAD_M[0], formula=GRAD_M[1])
    smaller = layer.without_row(row)
    expected = gradients(smaller.textbook(detach_norm=False), smaller)
    for name in ("B", "m", "bias"):
        if name in ours:
            ours[name] = torch.cat([ours[name][:row], ours[name][row + 1:]])
    assert_gradients_agree(ours, expected, "the layer without the zero row", path_sizes(smaller),
                           detach_norm=False)


# --- The shipped stubs (CI: --shipped-exercises) -----------------------------------------------

shipped = pytest.mark.shipped_exercises


@shipped
def test_the_torch_stubs_are_the_three_exercises_and_the_function_that_assembles_them():
    stubs = load_file(STUBS)
    functions = [name for name, f in vars(stubs).items()
                 if getattr(f, "__module__", None) == stubs.__name__]
    assert sorted(functions) == sorted(TORCH_EXERCISES + ["DoRAFunction"])


@shipped
@pytest.mark.parametrize("number", range(FIRST, FIRST + len(TORCH_EXERCISES)))
def test_each_torch_stub_has_the_solutions_signature_and_raises_naming_its_exercise(number):
    name, solution = TORCH_EXERCISES[number - FIRST], SOLUTIONS[number - FIRST]
    stub = getattr(load_file(STUBS), name)
    assert inspect.signature(stub) == inspect.signature(solution)
    assert stub.__doc__.startswith(f"Exercise {number}")
    t = torch.ones(2, 3)
    with pytest.raises(NotImplementedError, match=f"^exercise {number}: {name}$"):
        stub(*[t] * (len(inspect.signature(stub).parameters) - 2), 1.0, 0)


def torch_stub_run(*options):
    """This file's exercise tests run on the shipped stubs, as on a learner's machine (with CI
    set, pytest would not shorten its summary lines)."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "BUILD_NUMBER")}
    return subprocess.run([sys.executable, "-m", "pytest", "tests/test_torch_exercises.py",
                           "--impl=exercises", "-p", "no:cacheprovider", "-m", "exercise",
                           *options], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)


@shipped
def test_the_torch_stub_run_stops_at_exercise_11_in_one_short_screen():
    """What a learner sees first: exercise 11's first test fails in a line, the rest are
    skipped, and the run says why and how to see every failure."""
    run = torch_stub_run()
    counts = re.search(r"=+ 1 failed, (\d+) skipped(?:, (\d+) deselected)? in", run.stdout)
    assert run.returncode == 1 and counts, run.stdout[-2000:]
    collected = int(re.search(r"collected (\d+) items", run.stdout).group(1))
    assert 1 + int(counts.group(1)) + int(counts.group(2) or 0) == collected
    assert run.stdout.count("not solved yet: NotImplementedError: exercise 11: ") == 1
    assert "Stopped at the first failing test of exercise 11" in run.stdout
    assert len(run.stdout.splitlines()) <= 40, run.stdout


@shipped
def test_the_torch_stub_run_with_every_failure_fails_every_test_in_one_short_screen_each():
    """With --every-failure every test fails, one line each, no hypothesis noise."""
    run = torch_stub_run("--every-failure")
    counts = re.search(r"=+ (\d+) failed(?:, (\d+) deselected)? in", run.stdout)
    assert run.returncode == 1 and counts, run.stdout[-2000:]
    failed = int(counts.group(1))
    collected = int(re.search(r"collected (\d+) items", run.stdout).group(1))
    assert failed == collected - int(counts.group(2) or 0)
    assert run.stdout.count("not solved yet: NotImplementedError: exercise ") == failed
    assert len(run.stdout.splitlines()) <= 3 * failed + 20


# --- The graded tests teach (CI: --shipped-exercises) -----------------------------------------

# The three exercises as a learner writes them, following the hints: appended to a copy of the
# stub file, they replace its stubs (its DoRAFunction looks them up when it runs).
NATURAL_SOLUTION = '''

def scale_forward(y0, weight, lora_A, lora_B, magnitude, bias, scaling, trailing_dims):
    norm = adapted_row_norm(weight, lora_A, lora_B, scaling)
    c = along_channel(divide_or_zero(magnitude.to(norm.dtype), norm), trailing_dims)
    y = y0 * c if bias is None else y0 * c + along_channel(bias, trailing_dims)
    return y.to(y0.dtype)


def scale_backward(grad_y, y0, weight, lora_A, lora_B, magnitude, scaling, trailing_dims):
    norm = adapted_row_norm(weight, lora_A, lora_B, scaling)
    c = divide_or_zero(magnitude.to(norm.dtype), norm)
    grad_y0 = (grad_y * along_channel(c, trailing_dims)).to(grad_y.dtype)
    products = grad_y.to(norm.dtype) * y0  # G ⊙ y0, in float32 for bf16 or fp16
    grad_m = divide_or_zero(sum_but_channel(products, trailing_dims, norm.dtype), norm)
    grad_b = sum_but_channel(grad_y, trailing_dims, norm.dtype).to(grad_y.dtype)
    return grad_y0, grad_m.to(magnitude.dtype), grad_b


def norm_path_backward(grad_y, y0, weight, lora_A, lora_B, magnitude, scaling, trailing_dims):
    norm = adapted_row_norm(weight, lora_A, lora_B, scaling)
    c = divide_or_zero(magnitude.to(norm.dtype), norm)
    products = grad_y.to(norm.dtype) * y0
    grad_norm = divide_or_zero(-c * sum_but_channel(products, trailing_dims, norm.dtype), norm)
    A, B = lora_A.to(norm.dtype), lora_B.to(norm.dtype)
    unit = divide_or_zero(weight.to(norm.dtype) + scaling * B @ A, norm[:, None])
    grad_V = grad_norm[:, None] * unit
    return (scaling * B.T @ grad_V).to(lora_A.dtype), (scaling * grad_V @ A.T).to(lora_B.dtype)
'''

# Exercise 12 as the docstring's words lead a learner to write it without the helper
# sum_but_channel: the dims listed by hand, a 1-d y0 kept whole (the trap of sum(dim=[])),
# ∂L/∂b in grad_y's dtype. Appended to NATURAL_SOLUTION, it replaces its scale_backward.
NATURAL_SCALE_BACKWARD_BY_HAND = '''

def scale_backward(grad_y, y0, weight, lora_A, lora_B, magnitude, scaling, trailing_dims):
    norm = adapted_row_norm(weight, lora_A, lora_B, scaling)
    c = divide_or_zero(magnitude.to(norm.dtype), norm)
    grad_y0 = (grad_y * along_channel(c, trailing_dims)).to(grad_y.dtype)
    channel = y0.ndim - 1 - trailing_dims
    dims = [d for d in range(y0.ndim) if d != channel]
    products = grad_y.to(norm.dtype) * y0
    sums = products.sum(dims) if dims else products  # sum(dim=[]) would sum everything
    grad_m = divide_or_zero(sums, norm).to(magnitude.dtype)
    G = grad_y.to(norm.dtype)
    grad_b = (G.sum(dims) if dims else G).to(grad_y.dtype)
    return grad_y0, grad_m, grad_b
'''

# Mistakes that learners make, each one function of NATURAL_SOLUTION written wrong:
# {name: (exercise, source)}. The tests of that exercise must catch each.
MISTAKES = {
    "|m| in the scale": (11, '''
def scale_forward(y0, weight, lora_A, lora_B, magnitude, bias, scaling, trailing_dims):
    norm = adapted_row_norm(weight, lora_A, lora_B, scaling)
    c = along_channel(divide_or_zero(magnitude.abs().to(norm.dtype), norm), trailing_dims)
    y = y0 * c if bias is None else y0 * c + along_channel(bias, trailing_dims)
    return y.to(y0.dtype)
'''),
    "c rounded to y0's dtype": (11, '''
def scale_forward(y0, weight, lora_A, lora_B, magnitude, bias, scaling, trailing_dims):
    norm = adapted_row_norm(weight, lora_A, lora_B, scaling)
    c = along_channel(divide_or_zero(magnitude.to(norm.dtype), norm), trailing_dims)
    c = c.to(y0.dtype)
    return y0 * c if bias is None else y0 * c + along_channel(bias, trailing_dims)
'''),
    "m / norm without the zero-row rule": (11, '''
def scale_forward(y0, weight, lora_A, lora_B, magnitude, bias, scaling, trailing_dims):
    norm = adapted_row_norm(weight, lora_A, lora_B, scaling)
    c = along_channel(magnitude.to(norm.dtype) / norm, trailing_dims)
    y = y0 * c if bias is None else y0 * c + along_channel(bias, trailing_dims)
    return y.to(y0.dtype)
'''),
    "dL/dm from W' instead of V'": (12, '''
_natural_scale_backward = scale_backward


def scale_backward(grad_y, y0, weight, lora_A, lora_B, magnitude, scaling, trailing_dims):
    grad_y0, grad_m, grad_b = _natural_scale_backward(grad_y, y0, weight, lora_A, lora_B,
                                                      magnitude, scaling, trailing_dims)
    return grad_y0, grad_m * magnitude.sign(), grad_b  # W'/‖W'‖ = sign(m) V'/‖V'‖
'''),
    "dL/dm summed in y0's dtype": (12, '''
_natural_scale_backward = scale_backward


def scale_backward(grad_y, y0, weight, lora_A, lora_B, magnitude, scaling, trailing_dims):
    grad_y0, _, grad_b = _natural_scale_backward(grad_y, y0, weight, lora_A, lora_B,
                                                 magnitude, scaling, trailing_dims)
    norm = adapted_row_norm(weight, lora_A, lora_B, scaling)
    sums = sum_but_channel(grad_y.to(norm.dtype) * y0, trailing_dims, y0.dtype).to(norm.dtype)
    return grad_y0, divide_or_zero(sums, norm).to(magnitude.dtype), grad_b
'''),
    "G ⊙ y0 multiplied in y0's dtype": (12, '''
_natural_scale_backward = scale_backward


def scale_backward(grad_y, y0, weight, lora_A, lora_B, magnitude, scaling, trailing_dims):
    grad_y0, _, grad_b = _natural_scale_backward(grad_y, y0, weight, lora_A, lora_B,
                                                 magnitude, scaling, trailing_dims)
    norm = adapted_row_norm(weight, lora_A, lora_B, scaling)
    sums = sum_but_channel(grad_y * y0, trailing_dims, norm.dtype)
    return grad_y0, divide_or_zero(sums, norm).to(magnitude.dtype), grad_b
'''),
    "Σ G ⊙ y0 by sum(dims), everything for a 1-d y0": (12, '''
def scale_backward(grad_y, y0, weight, lora_A, lora_B, magnitude, scaling, trailing_dims):
    norm = adapted_row_norm(weight, lora_A, lora_B, scaling)
    c = divide_or_zero(magnitude.to(norm.dtype), norm)
    grad_y0 = (grad_y * along_channel(c, trailing_dims)).to(grad_y.dtype)
    channel = y0.ndim - 1 - trailing_dims
    dims = [d for d in range(y0.ndim) if d != channel]
    grad_m = divide_or_zero((grad_y.to(norm.dtype) * y0).sum(dims), norm)
    grad_b = grad_y.to(norm.dtype).sum(dims).to(grad_y.dtype)
    return grad_y0, grad_m.to(magnitude.dtype), grad_b
'''),
    "dL/dm without the zero-row rule": (12, '''
_natural_scale_backward = scale_backward


def scale_backward(grad_y, y0, weight, lora_A, lora_B, magnitude, scaling, trailing_dims):
    grad_y0, _, grad_b = _natural_scale_backward(grad_y, y0, weight, lora_A, lora_B,
                                                 magnitude, scaling, trailing_dims)
    norm = adapted_row_norm(weight, lora_A, lora_B, scaling)
    sums = sum_but_channel(grad_y.to(norm.dtype) * y0, trailing_dims, norm.dtype)
    return grad_y0, (sums / norm).to(magnitude.dtype), grad_b
'''),
    "V' / norm without the zero-row rule": (13, '''
def norm_path_backward(grad_y, y0, weight, lora_A, lora_B, magnitude, scaling, trailing_dims):
    norm = adapted_row_norm(weight, lora_A, lora_B, scaling)
    c = divide_or_zero(magnitude.to(norm.dtype), norm)
    products = grad_y.to(norm.dtype) * y0
    grad_norm = divide_or_zero(-c * sum_but_channel(products, trailing_dims, norm.dtype), norm)
    A, B = lora_A.to(norm.dtype), lora_B.to(norm.dtype)
    grad_V = grad_norm[:, None] * (weight.to(norm.dtype) + scaling * B @ A) / norm[:, None]
    return (scaling * B.T @ grad_V).to(lora_A.dtype), (scaling * grad_V @ A.T).to(lora_B.dtype)
'''),
    "the norm's path with its sign flipped": (13, '''
def norm_path_backward(grad_y, y0, weight, lora_A, lora_B, magnitude, scaling, trailing_dims):
    norm = adapted_row_norm(weight, lora_A, lora_B, scaling)
    c = divide_or_zero(magnitude.to(norm.dtype), norm)
    products = grad_y.to(norm.dtype) * y0
    grad_norm = divide_or_zero(c * sum_but_channel(products, trailing_dims, norm.dtype), norm)
    A, B = lora_A.to(norm.dtype), lora_B.to(norm.dtype)
    grad_V = grad_norm[:, None] * divide_or_zero(weight.to(norm.dtype) + scaling * B @ A,
                                                 norm[:, None])
    return (scaling * B.T @ grad_V).to(lora_A.dtype), (scaling * grad_V @ A.T).to(lora_B.dtype)
'''),
}


def run_on(tmp_path, *sources, options=()):
    """Run this file's tests on a copy of the stub file with `sources` appended."""
    solution = tmp_path / "my_dora_torch.py"
    solution.write_text(STUBS.read_text() + "".join(sources))
    return subprocess.run([sys.executable, "-m", "pytest", "tests/test_torch_exercises.py",
                           f"--impl={solution}", "-p", "no:randomly", "-p", "no:cacheprovider",
                           "-q", "-rf", *options],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@shipped
def test_a_natural_solution_passes_every_exercise(tmp_path):
    run = run_on(tmp_path, NATURAL_SOLUTION)
    assert run.returncode == 0, run.stdout[-2000:]
    assert re.search(r"\d+ passed, \d+ skipped in", run.stdout), run.stdout[-2000:]


@shipped
def test_exercise_12_summed_by_hand_as_its_docstring_says_passes(tmp_path):
    """The docstring's two traps avoided (sum over dim=[] for a 1-d y0; ∂L/∂b's dtype): the
    solution passes exercises 11 and 12."""
    run = run_on(tmp_path, NATURAL_SOLUTION, NATURAL_SCALE_BACKWARD_BY_HAND,
                 options=("--exercise", "12", "--every-failure"))
    assert run.returncode == 0, run.stdout[-2000:]
    assert re.search(r"\d+ passed, \d+ deselected in", run.stdout), run.stdout[-2000:]


@shipped
@pytest.mark.parametrize("mistake", MISTAKES)
def test_the_tests_of_an_exercise_catch_a_mistake_learners_make(mistake, tmp_path):
    """A solution with this mistake fails the tests of its exercise, and the failure names the
    exercise, its chapter and its hint."""
    number, source = MISTAKES[mistake]
    run = run_on(tmp_path, NATURAL_SOLUTION, "\n" + source, options=("-k", f"ex{number:02d}"))
    assert run.returncode == 1, run.stdout[-2000:]
    assert re.findall(r"^FAILED tests/test_torch_exercises.py::(\w+)\[", run.stdout,
                      re.MULTILINE), run.stdout[-2000:]
    assert f"exercise {number} ({TORCH_EXERCISES[number - FIRST]})" in run.stdout
    assert f"read tutorial/06_pytorch.md; stuck? hint {number} in" in run.stdout


# Wrong answers as a learner runs them (the documented command, --exercise N): {name: (the
# mistake of MISTAKES, the exercise run, what the screen must say)}.
WRONG_ANSWERS = {
    "∂L/∂m not divided by the norm": (12, '''
_natural_scale_backward = scale_backward


def scale_backward(grad_y, y0, weight, lora_A, lora_B, magnitude, scaling, trailing_dims):
    grad_y0, _, grad_b = _natural_scale_backward(grad_y, y0, weight, lora_A, lora_B,
                                                 magnitude, scaling, trailing_dims)
    norm = adapted_row_norm(weight, lora_A, lora_B, scaling)
    sums = sum_but_channel(grad_y.to(norm.dtype) * y0, trailing_dims, norm.dtype)
    return grad_y0, sums.to(magnitude.dtype), grad_b
''', ["∂L/∂m is wrong", "Eq. 7: ∂L/∂m = Σ G ⊙ y0 / ‖V'‖_c",
      "exercise 12 (scale_backward), the paper's Eq. 7"]),
    "the norm's path with its sign flipped": (
        13, MISTAKES["the norm's path with its sign flipped"][1],
        ["∂L/∂A along the norm's path", "              -1\n",
         "exercise 13 (norm_path_backward), the paper's Eq. 6"]),
}


@shipped
@pytest.mark.parametrize("mistake", WRONG_ANSWERS)
def test_a_wrong_answer_fails_in_a_screenful(mistake, tmp_path):
    number, source, said = WRONG_ANSWERS[mistake]
    solution = tmp_path / "my_dora_torch.py"
    solution.write_text(STUBS.read_text() + NATURAL_SOLUTION + "\n" + source)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "BUILD_NUMBER")}
    run = subprocess.run([sys.executable, "-m", "pytest", "tests/test_torch_exercises.py",
                          f"--impl={solution}", "--exercise", str(number), "-p",
                          "no:cacheprovider"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 1 and " 1 failed" in run.stdout, run.stdout[-3000:]
    assert len(run.stdout.splitlines()) <= 40, run.stdout
    for text in said + ["example: linear", "--every-failure runs them"]:
        assert text in run.stdout, (text, run.stdout)
    for text in ["+ where", "Layer(", "assert ", "Falsifying", "Failing test case"]:
        assert text not in run.stdout, (text, run.stdout)
