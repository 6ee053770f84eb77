"""Fast computations of a decomposed convolution: three 1D convolutions of ``(B, C, A0, A1, A2)``,
one along each axis (kernel ``k`` on its axis and 1 on the others, zero padding ``k // 2`` on its
axis only, the same stride on all three), summed.

Every function here computes the same sums as three ``F.conv3d`` calls, to float rounding (the
parity tests hold them to the original implementation); they only choose cheaper arithmetic:

* depthwise kernels become banded matrix products (oneDNN's depthwise Conv3d is slow on CPU,
  forward and backward);
* an input with few channels (the stem's first convolution) gathers all taps and does one product;
* kernel 3 merges the three centre taps, which read the same voxel, into one;
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_EINSUM = ("coh,bchwd->bcowd", "cow,bchwd->bchod", "cod,bchwd->bchwo")


def kernel_size(kernels: Sequence[Tensor]) -> int:
    """The 1D kernel length of a branch triple (the size of branch 0 along axis 0)."""
    return kernels[0].shape[2]


def padding(axis: int, k: int) -> tuple[int, int, int]:
    """A branch's padding: ``k // 2`` on its own axis only."""
    pad = [0, 0, 0]
    pad[axis] = k // 2
    return tuple(pad)


def banded(weight: Tensor, length: int) -> Tensor:
    """``(C, k)`` kernels -> ``(C, length, length)`` matrices ``M[c, out, in] = w[c, in - out + k//2]``,
    zero outside the band (the zero padding of a same-size convolution); taps that cannot reach a
    position of a short axis are left out."""
    half = weight.shape[1] // 2
    if half > length - 1:
        weight, half = weight[:, half - (length - 1) : half + length], length - 1
    padded = F.pad(weight, (length - 1 - half, length - weight.shape[1] + half))
    return padded.unfold(1, length, 1).flip(1)


def depthwise_along(x: Tensor, weight: Tensor, bias: Tensor | None, axis: int) -> Tensor:
    """A depthwise 1D convolution along ``axis`` (stride 1) as a product with each channel's banded
    matrix: several times faster than oneDNN's depthwise Conv3d on CPU, backward included."""
    c = x.shape[1]
    y = torch.einsum(_EINSUM[axis], banded(weight.reshape(c, -1), x.shape[2 + axis]), x)
    return y if bias is None else y + bias.view(1, c, 1, 1, 1)


def gather_taps(x: Tensor, k: int, stride: int) -> Tensor:
    """Every input value each output position of the three branches reads: ``(B, C, *A)`` ->
    ``(B, *A_out, 3 * C * k)``, ordered branch, channel, tap (the order of the flattened kernels)."""
    columns = []
    for axis in range(3):
        index = [slice(None), slice(None)] + [slice(None, None, stride)] * 3
        index[2 + axis] = slice(None)
        pad = [0] * 6
        pad[4 - 2 * axis : 6 - 2 * axis] = [k // 2, k // 2]
        taps = F.pad(x[tuple(index)], pad).unfold(2 + axis, k, stride)
        columns.append(taps.permute(0, 2, 3, 4, 1, 5).flatten(4))
    return torch.cat(columns, dim=4)


def taps_matrix(kernels: Sequence[Tensor]) -> Tensor:
    """The three branches' kernels as one ``(C_out, 3 * C_in * k)`` matrix over :func:`gather_taps`."""
    return torch.cat([kernel.flatten(1) for kernel in kernels], dim=1)


def taps_product(x: Tensor, kernels: Sequence[Tensor], bias: Tensor, stride: int) -> Tensor:
    """The branch sum as one product of the gathered taps; the result is channels-last in memory,
    the layout the stem's following convolutions run fastest in."""
    taps = gather_taps(x, kernel_size(kernels), stride)
    y = torch.addmm(bias, taps.flatten(0, 3), taps_matrix(kernels).t())
    return y.view(*taps.shape[:4], -1).permute(0, 4, 1, 2, 3)


def merged_centre(x: Tensor, kernels: Sequence[Tensor], bias: Tensor | None) -> Tensor:
    """Kernel 3, stride 1, dense: the three centre taps read the same voxel, so they are summed into
    branch 0, and branches 1 and 2 become 2-tap kernels dilated by 2 (offsets -1 and +1): 7 taps
    of work instead of 9."""
    centre = kernels[0][:, :, 1:2] + kernels[1][:, :, :, 1:2] + kernels[2][:, :, :, :, 1:2]
    first = torch.cat([kernels[0][:, :, :1], centre, kernels[0][:, :, 2:]], dim=2)
    y = F.conv3d(x, first, bias, padding=(1, 0, 0))
    y = y + F.conv3d(x, kernels[1][:, :, :, ::2], padding=(0, 1, 0), dilation=(1, 2, 1))
    return y + F.conv3d(x, kernels[2][:, :, :, :, ::2], padding=(0, 0, 1), dilation=(1, 1, 2))


def branch_sum(x: Tensor, kernels: Sequence[Tensor], bias: Tensor | None, stride: int, groups: int) -> Tensor:
    """``sum_a conv_a(x, kernels[a]) + bias`` by the cheapest of the computations above."""
    k = kernel_size(kernels)
    c_out, c_in = kernels[0].shape[0], kernels[0].shape[1] * groups
    if groups == c_in == c_out and stride == 1:
        y = depthwise_along(x, kernels[0], bias, 0)
        return y + depthwise_along(x, kernels[1], None, 1) + depthwise_along(x, kernels[2], None, 2)
    if gathers_taps(kernels, groups) and bias is not None:
        return taps_product(x, kernels, bias, stride)
    if groups == 1 and k == 3 and stride == 1:
        return merged_centre(x, kernels, bias)
    y = F.conv3d(x, kernels[0], bias, stride, padding(0, k), groups=groups)
    for axis in (1, 2):
        y = y + F.conv3d(x, kernels[axis], None, stride, padding(axis, k), groups=groups)
    return y


def gathers_taps(kernels: Sequence[Tensor], groups: int) -> bool:
    """Whether the gathered taps (``3 * C_in * k`` per position) are no more than the output channels,
    so that :func:`taps_product` is the cheaper computation."""
    return groups == 1 and 3 * kernels[0].shape[1] * kernel_size(kernels) <= kernels[0].shape[0]
