"""`fp16x3`: each of the model's linear layers as three fp16 matrix products, close to fp32.

fp16 tensor cores multiply many times faster than a GPU's fp32 units, but an fp16 operand keeps
11 bits of its value: plain fp16 (autocast) moves an embedding value by up to ~1.5e-4, and ~3% of
the int8 codes differ from fp32's. Split instead each operand into its fp16 rounding and the
fp16 rounding of what is left, `x = xh + xl` (22 of fp32's 24 bits), and

    x·wᵀ ≈ xh·whᵀ + xh·wlᵀ + xl·whᵀ

(`xl·wlᵀ`, ~2^-22 of the product, is dropped). A product of two fp16 numbers is exact in fp32,
so with fp32 accumulation and an fp32 result the three products give fp32's value to ~2^-21:
the scheme CUTLASS calls 3xTF32, with fp16's longer mantissa. The three are one matrix product
over a three times longer inner dimension, `[xh, xh, xl]·[wh, wl, wh]ᵀ`.

Each operand is first scaled by a power of two (exact) that puts its largest value near 2^12,
so that neither part overflows fp16 nor loses bits as a subnormal. Everything that is not a
linear layer (attention's products, layer norms, softmax, pooling) runs in fp32.

On CUDA the product is `torch.mm(..., out_dtype=torch.float32)` (fp16 inputs, fp32
accumulation and result). On the CPU it is emulated with the parts cast to fp32, which computes
the same exact products: slower than fp32, there to test the numbers without a GPU. A device
whose torch refuses the fp32 result gets the same emulation, with a warning (`product`).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# The largest value of a scaled operand is below 2**TOP: far from fp16's 65504, and its
# low part (2**-11 of it) still far above fp16's smallest normal, 2**-14.
TOP = 12
# Devices whose `torch.mm` refused an fp32 result of fp16 inputs: they get the emulation.
_NO_FP32_RESULT: set[str] = set()

log = logging.getLogger(__name__)


def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(high, low, scale): `t * scale == high + low` to ~2^-22, high and low in fp16, scale a
    power of two (a 0-d fp32 tensor on t's device) that puts t's largest value near 2^TOP."""
    t = t.float()
    amax = t.abs().amax()
    _, exp = torch.frexp(torch.where(amax > 0, amax, torch.ones_like(amax)))  # amax = m * 2**exp, 0.5 <= m < 1
    scale = torch.exp2((TOP - exp).float())
    t = t * scale
    high = t.half()
    return high, (t - high.float()).half(), scale


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           weight_parts: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` in fp32, from fp16 products (module docstring).

    `weight_parts` is `weight_operand(weight)`, when the caller keeps it between calls."""
    w, w_scale = weight_parts if weight_parts is not None else weight_operand(weight)
    xh, xl, x_scale = split(x)
    a = torch.cat([xh, xh, xl], dim=-1).reshape(-1, w.shape[1])
    y = product(a, w, a.device.type != "cpu")
    y = (y / x_scale / w_scale).reshape(*x.shape[:-1], w.shape[0])  # powers of two: exact, one at a time
    return y if bias is None else y + bias.float()


def product(a: torch.Tensor, w: torch.Tensor, fp16_units: bool) -> torch.Tensor:
    """`a @ w.T` of fp16 matrices, summed and returned in fp32: on the device's fp16 units
    (`fp16_units`, a GPU's tensor cores) unless its torch has refused that before; else with
    the parts cast to fp32, which gives the same exact products."""
    where = str(a.device)
    if fp16_units and where not in _NO_FP32_RESULT:
        try:
            return torch.mm(a, w.t(), out_dtype=torch.float32)
        except torch.cuda.OutOfMemoryError:
            raise  # the encoder halves its batch
        except (RuntimeError, TypeError) as exc:
            _NO_FP32_RESULT.add(where)
            log.warning("torch %s gives no fp32 result of fp16 matrices on %s (%s: %s): fp16x3 computes its "
                        "products in fp32 there, with the same values, more slowly", torch.__version__, where,
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    return a.float() @ w.float().t()


def weight_operand(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight's side of the product, `[wh, wl, wh]` along the inner dimension, and its scale."""
    wh, wl, scale = split(weight)
    return torch.cat([wh, wl, wh], dim=1), scale


class CompensatedFp16(TorchFunctionMode):
    """While active, every `F.linear` call (so every `nn.Linear`) runs as `linear`. The weights'
    parts are kept, keyed by the weight tensor, so that each is split once."""

    def __init__(self):
        super().__init__()
        self._weights: dict[tuple[Any, ...], tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.linear:
            return func(*args, **kwargs)
        x, weight, *rest = args
        bias = rest[0] if rest else kwargs.get("bias")
        return linear(x, weight, bias, self._parts(weight))

    def _parts(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The weight itself is kept in the entry, so its address cannot be reused by another.
        key = (weight.data_ptr(), tuple(weight.shape), weight.device, weight.dtype, weight._version)
        entry = self._weights.get(key)
        if entry is None:
            entry = self._weights[key] = (weight, weight_operand(weight.detach()))
        return entry[1]
