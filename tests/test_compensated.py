"""fp16x3 (workers/embedding/compensated.py): a linear layer from three fp16 products, against
float64, fp32 and a single fp16 product, on the CPU (which computes the same exact products)."""
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workers.embedding.compensated import CompensatedFp16, linear, product, split, weight_operand


def _operands(seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 48, 384, generator=g) * scale  # (batch, tokens, features), as in the model
    w = torch.randn(1536, 384, generator=g) / 20
    b = torch.randn(1536, generator=g) / 10 * scale
    return x, w, b


def _error(y: torch.Tensor, x, w, b) -> float:
    ref = F.linear(x.double(), w.double(), b.double())
    return float(((y.double() - ref).abs() / ref.abs().amax()).amax())


@pytest.mark.parametrize("scale", [1.0, 1e4, 1e-5])
def test_three_fp16_products_are_as_close_as_fp32_and_far_closer_than_one(scale):
    x, w, b = _operands(0, scale)
    y = linear(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (2, 48, 1536) and torch.isfinite(y).all()
    one = F.linear(x.half().float(), w.half().float(), b)  # a single fp16 product (exact, summed in fp32)
    fp32 = _error(F.linear(x, w, b), x, w, b)
    # Measured, of the largest output: ~5e-7 for fp16x3 and ~7e-7 for fp32 at every scale (powers
    # of two keep the parts clear of fp16's overflow and subnormals); ~3e-4 for one fp16
    # product, 1.5e-3 at 1e-5 (its subnormals).
    assert _error(y, x, w, b) < 4 * fp32 + 1e-7
    assert _error(one, x, w, b) > 100 * _error(y, x, w, b)


def test_split_parts_sum_to_the_scaled_value():
    x, _, _ = _operands(1)
    x[0, 0, :3] = torch.tensor([0.0, 7e4, -3e-9])  # beyond fp16's range and below its subnormals
    high, low, scale = split(x)
    assert high.dtype == low.dtype == torch.float16 and scale.dtype == torch.float32
    assert float(torch.log2(scale)) == round(float(torch.log2(scale)))  # a power of two: exact
    assert float(x.abs().amax() * scale) < 2 ** 12 and torch.isfinite(high).all()
    back = (high.double() + low.double()) / scale.double()
    assert float(((back - x.double()).abs() / x.abs().amax()).amax()) < 2 ** -21
    zero = split(torch.zeros(3, 4))
    assert not zero[0].any() and not zero[1].any() and float(zero[2]) == 2 ** 11  # 1 = 0.5 * 2**1


def test_zero_input_gives_the_bias_and_no_bias_is_allowed():
    _, w, b = _operands(2)
    x = torch.zeros(5, 384)
    assert torch.equal(linear(x, w, b), b.expand(5, -1))
    assert torch.equal(linear(x, w), torch.zeros(5, 1536))


def test_the_mode_changes_linear_layers_only_and_splits_each_weight_once():
    x, w, b = _operands(3)
    layer = torch.nn.Linear(384, 1536)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    mode = CompensatedFp16()
    with torch.inference_mode():
        with mode:
            y1 = layer(x)
            y2 = layer(x)
            other = torch.matmul(x, w.t())  # not a linear layer: runs as it is
        assert torch.equal(other, torch.matmul(x, w.t()))
        assert torch.equal(y1, y2) and torch.equal(y1, linear(x, w, b))
        assert not torch.equal(y1, layer(x))  # outside the mode: plain fp32
    assert len(mode._weights) == 1
    np.testing.assert_allclose(y1.numpy(), F.linear(x, w, b).numpy(), rtol=0, atol=1e-5)


def test_a_device_refusing_an_fp32_result_of_fp16_matrices_gets_the_same_values(caplog, monkeypatch):
    """This CPU's torch has no fp16 x fp16 -> fp32 `mm` (it raises NotImplementedError, as a
    GPU's torch without it would): asked to use it, `product` warns once, remembers the device
    and gives the emulation's values."""
    import workers.embedding.compensated as compensated

    monkeypatch.setattr(compensated, "_NO_FP32_RESULT", set())
    x, w, _ = _operands(4)
    xh, xl, _ = split(x)
    a, wo = torch.cat([xh, xh, xl], dim=-1).reshape(-1, 3 * 384), weight_operand(w)[0]  # as `linear` has them
    with caplog.at_level(logging.WARNING, logger="workers.embedding.compensated"):
        first = product(a, wo, fp16_units=True)
        again = product(a, wo, fp16_units=True)
    assert torch.equal(first, a.float() @ wo.float().t()) and torch.equal(again, first)
    assert first.dtype == torch.float32 and compensated._NO_FP32_RESULT == {"cpu"}
    [record] = caplog.records  # once per device
    assert record.getMessage().startswith(f"torch {torch.__version__} gives no fp32 result of fp16 matrices on cpu "
                                          "(NotImplementedError: Could not run 'aten::mm.dtype'")
