"""DoRAConv1d, DoRAConv2d, DoRAConv3d: convolutions with a LoRA or DoRA adapter.

    y0 = conv(x; W0) + s·conv_1x1(conv(drop(x); A); B)     A: the base's kernel, stride, padding
                                                            and dilation; B: a 1×1 convolution
    y  = c ⊙ y0 + b,  c = m / ‖W0 + s·B A‖_c per output channel          (DoRA)
    y  = y0 + b                                                          (LoRA)

A convolution is a linear map of each input patch (unfolded to in·k values, k the kernel's size),
so its DoRA is the linear layer's DoRA on the flattened weights: W0 (out, in·k), A (r, in·k),
B (out, r). The composite B∘A is the convolution with weight B A reshaped to (out, in, *kernel),
which is what merge() writes. Parameters keep PEFT's shapes: lora_A (r, in, *kernel),
lora_B (out, r, 1, ...), magnitude (out,) (saved for PEFT as (1, out, 1, ...)).

Unlike PEFT 0.21.2, whose lora_A ignores the base's dilation (a dilated convolution then fails with
a shape error), lora_A here takes the base's dilation, so B∘A has the base's receptive field and
merges exactly. Grouped convolutions (groups > 1) are refused: B∘A is a full convolution, which
neither merges into a grouped weight nor has DoRA's per-channel norm in its layout (PEFT refuses
to merge them too). padding_mode other than "zeros" is refused.
"""

import math

from torch import nn
from torch.nn import functional as F

from .base import AdaptedLayer
from .checks import check_positive_int


def _check_sizes(name, value, dims, least):
    """An int or a tuple of `dims` ints, each >= least -> a tuple of `dims` ints."""
    values = (value,) * dims if isinstance(value, int) and not isinstance(value, bool) else value
    if not (isinstance(values, tuple) and len(values) == dims
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= least
                    for v in values)):
        raise ValueError(f"{name}: expected an integer >= {least} or a tuple of {dims} of them, "
                         f"got {value!r}")
    return values


class _DoRAConvNd(AdaptedLayer):
    """A convolution y = conv(x; W) + b whose frozen weight is adapted by LoRA or DoRA.

    Args:
        in_channels, out_channels, kernel_size, stride, padding ("same", "valid" or sizes),
        dilation, bias: as the torch convolution.
        r, lora_alpha (scaling = lora_alpha / r), lora_dropout, use_dora, detach_norm: as
        DoRALinear. groups must be 1 and padding_mode "zeros" (see the module's docstring).
    """
    TRAILING_DIMS = 0  # the spatial dims, after the output's channel dim
    CONV = None

    def __init__(self, in_channels, out_channels, kernel_size, r, lora_alpha, *, stride=1,
                 padding=0, dilation=1, groups=1, bias=True, padding_mode="zeros",
                 lora_dropout=0.0, use_dora=True, detach_norm=True, device=None, dtype=None):
        n = self.TRAILING_DIMS
        in_channels = check_positive_int("in_channels", in_channels)
        out_channels = check_positive_int("out_channels", out_channels)
        kernel_size = _check_sizes("kernel_size", kernel_size, n, 1)
        stride = _check_sizes("stride", stride, n, 1)
        dilation = _check_sizes("dilation", dilation, n, 1)
        if padding not in ("same", "valid"):
            padding = _check_sizes("padding", padding, n, 0)
        if padding == "same" and stride != (1,) * n:
            raise ValueError(f"padding: 'same' needs stride 1, got stride={stride}")
        if groups != 1:
            raise ValueError(f"groups: only groups=1 convolutions can be adapted (B∘A is a full "
                             f"convolution, which merges into no grouped weight), got {groups!r}")
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode: only 'zeros' is supported, got {padding_mode!r}")
        super().__init__(r, lora_alpha, lora_dropout, use_dora, detach_norm, bias, dtype)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, \
            kernel_size
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self._create_parameters((out_channels, in_channels, *kernel_size),
                                (self.r, in_channels, *kernel_size),
                                (out_channels, self.r) + (1,) * n, out_channels, bias, device,
                                dtype)

    @classmethod
    def _like(cls, conv, **kwargs):
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                   padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                   bias=conv.bias is not None, padding_mode=conv.padding_mode, **kwargs)

    def _plain_module(self):
        conv_class = self.BASE_TYPES[0]
        return conv_class(self.in_channels, self.out_channels, self.kernel_size,
                          stride=self.stride, padding=self.padding, dilation=self.dilation,
                          bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)

    def _init_base(self):
        """As the torch convolution initializes its weight and bias."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())  # 1 / sqrt(fan_in), fan_in = in·k
            nn.init.uniform_(self.bias, -bound, bound)

    # the (out, in·k) views: every weight flattened after its first dim
    def _weight_view(self, W):
        return W.flatten(1)  # (out, in·k)

    def _from_view(self, V):
        return V.reshape(self.weight.shape)  # (out, in, *kernel)

    def _lora_views(self):
        return self.lora_A.flatten(1), self.lora_B.flatten(1)  # (r, in·k), (out, r)

    def _base_op(self, x, W, b):
        return self.CONV(x, W, b, self.stride, self.padding, self.dilation)

    def _lora_op(self, x):
        after_A = self.CONV(x, self.lora_A, None, self.stride, self.padding, self.dilation)
        return self.CONV(after_A, self.lora_B * self.scaling)  # the 1×1 convolution s·B

    def _check_input_size(self, x, name):
        """(batch, in_channels, *spatial) or (in_channels, *spatial), as the torch convolution."""
        n = self.TRAILING_DIMS
        if x.ndim not in (n + 1, n + 2) or x.shape[-n - 1] != self.in_channels:
            raise ValueError(f"x: {name} expected shape (batch, {self.in_channels}, "
                             f"{n} spatial dims) or ({self.in_channels}, {n} spatial dims), "
                             f"got {tuple(x.shape)}")

    def _peft_magnitude_shape(self, magnitude):
        return magnitude.reshape((1, -1) + (1,) * self.TRAILING_DIMS)  # (1, out, 1, ...)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"r={self.r}, lora_alpha={self.lora_alpha:g}, use_dora={self.use_dora}, "
                f"merged={self.merged}")


class DoRAConv1d(_DoRAConvNd):
    __doc__ = _DoRAConvNd.__doc__.replace("A convolution", "A 1-d convolution (nn.Conv1d)")
    BASE_TYPES, TRAILING_DIMS, CONV = (nn.Conv1d,), 1, staticmethod(F.conv1d)


class DoRAConv2d(_DoRAConvNd):
    __doc__ = _DoRAConvNd.__doc__.replace("A convolution", "A 2-d convolution (nn.Conv2d)")
    BASE_TYPES, TRAILING_DIMS, CONV = (nn.Conv2d,), 2, staticmethod(F.conv2d)


class DoRAConv3d(_DoRAConvNd):
    __doc__ = _DoRAConvNd.__doc__.replace("A convolution", "A 3-d convolution (nn.Conv3d)")
    BASE_TYPES, TRAILING_DIMS, CONV = (nn.Conv3d,), 3, staticmethod(F.conv3d)
