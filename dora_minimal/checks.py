"""Argument checks shared by the NumPy reference, the PyTorch function and the layer.

Every check raises before anything is computed or changed, and its message names the argument,
what was expected and what was given. They work on NumPy arrays and torch tensors alike
(both have `.shape`, `.ndim` and `.dtype`).
"""

import math
import numbers

import numpy as np


def _describe(value):
    """A short description of `value` for an error message."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{value!r} ({type(value).__name__})"


def check_positive_int(name, value):
    """`value` must be an integer >= 1 (a rank, a number of features)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer >= 1, got {_describe(value)}")
    if value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value}")
    return int(value)


def check_rank(r):
    """`r` must be an integer >= 1 (the LoRA rank)."""
    return check_positive_int("r", r)


def check_positive(name, value):
    """`value` must be a finite real number > 0 (lora_alpha, scaling)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a finite real number > 0, got {_describe(value)}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected a finite real number > 0, got {value}")
    return float(value)


def check_dropout(p):
    """`p` must be a real number in [0, 1)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"lora_dropout: expected a real number in [0, 1), got {_describe(p)}")
    if not 0 <= p < 1:
        raise ValueError(f"lora_dropout: expected a real number in [0, 1), got {p}")
    return float(p)


def check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {_describe(value)}")
    return bool(value)


def _is_real_float(dtype):
    if isinstance(dtype, np.dtype):
        return dtype.kind == "f"
    return bool(getattr(dtype, "is_floating_point", False))  # torch.dtype; complex is not


def check_array(name, value, ndim=None, array_type=None):
    """`value` must be an array (of `array_type`) with a real floating dtype and `ndim` dims."""
    kind = f"a {array_type.__name__}" if array_type is not None else "an array"
    if array_type is not None and not isinstance(value, array_type):
        raise TypeError(f"{name}: expected {kind}, got {_describe(value)}")
    if not (hasattr(value, "shape") and hasattr(value, "dtype") and hasattr(value, "ndim")):
        raise TypeError(f"{name}: expected {kind}, got {_describe(value)}")
    if str(getattr(value, "layout", "torch.strided")) != "torch.strided":  # a sparse tensor
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {value.layout}")
    if not _is_real_float(value.dtype):
        raise TypeError(f"{name}: expected a real floating dtype, got {_describe(value)}")
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimension(s), got {_describe(value)}")
    if ndim is None and value.ndim < 1:
        raise ValueError(f"{name}: expected at least 1 dimension, got {_describe(value)}")
    return value


def check_dora_arguments(x, weight, lora_A, lora_B, magnitude, bias=None, grad_y=None,
                         array_type=None, names=("x", "W0", "A", "B", "m"), needs_x=True,
                         needs_m=True):
    """Check types, dimensions and the shape contract shared by every DoRA entry point.

    x: (..., in), or None with needs_x=False; weight: (out, in); lora_A: (r, in); lora_B: (out, r);
    magnitude: (out,), or None with needs_m=False (plain LoRA); bias: (out,) or None;
    grad_y: (..., out) with x's leading dims, or None.
    Returns (out, in, r).
    """
    x_name, w_name, a_name, b_name, m_name = names
    check_array(w_name, weight, 2, array_type)
    check_array(a_name, lora_A, 2, array_type)
    check_array(b_name, lora_B, 2, array_type)
    out_features, in_features = weight.shape
    if out_features < 1 or in_features < 1:
        raise ValueError(f"{w_name}: expected shape (out, in) with out, in >= 1, "
                         f"got {tuple(weight.shape)}")
    r = lora_A.shape[0]
    if lora_A.shape[1] != in_features:
        raise ValueError(f"{a_name}: expected shape (r, {in_features}) to match {w_name} "
                         f"{tuple(weight.shape)}, got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"{b_name}: expected shape ({out_features}, {r}) from {w_name} "
                         f"{tuple(weight.shape)} and {a_name} {tuple(lora_A.shape)}, "
                         f"got {tuple(lora_B.shape)}")
    if r < 1:
        raise ValueError(f"{a_name}: expected rank r >= 1 rows, got shape {tuple(lora_A.shape)}")
    if needs_x or x is not None:
        check_array(x_name, x, None, array_type)
        if x.shape[-1] != in_features:
            raise ValueError(f"{x_name}: expected last dimension {in_features} (in_features of "
                             f"{w_name} {tuple(weight.shape)}), got shape {tuple(x.shape)}")
    for name, vector in ((m_name, magnitude), ("bias", bias)):
        if vector is not None or (name == m_name and needs_m):
            check_array(name, vector, 1, array_type)
            if vector.shape[0] != out_features:
                raise ValueError(f"{name}: expected shape ({out_features},) to match {w_name} "
                                 f"{tuple(weight.shape)}, got {tuple(vector.shape)}")
    if grad_y is not None:
        check_array("grad_y", grad_y, None, array_type)
        expected = tuple(x.shape[:-1]) + (out_features,)
        if tuple(grad_y.shape) != expected:
            raise ValueError(f"grad_y: expected shape {expected} (x's leading dims, out), "
                             f"got {tuple(grad_y.shape)}")
    return out_features, in_features, r


def check_command_line(parser, args, positive_ints):
    """For the commands: parser.error (exit 2, with the usage) when an integer option named in
    `positive_ints` is below 1, or when --device names a CUDA GPU that torch cannot see."""
    for name in positive_ints:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected an integer >= 1, "
                         f"got {getattr(args, name)}")
    import torch  # here, not at the top: the NumPy reference uses this module without torch
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA GPU here")
