"""oneDNN-packed Linears (engine/cpu_linear.py) against F.linear, their torch reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.cpu_linear import PackedLinear, pack_linears, padded_rows
from models.layers import tied_head, vocab_logits

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _linear(in_f: int, out_f: int, bias: bool, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).requires_grad_(False)


@pytest.mark.parametrize("rows", [0, 1, 7, 33, 300])  # 33 and 300 run padded (34, 304)
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear(rows: int, bias: bool) -> None:
    ref = _linear(96, 200, bias, rows)
    packed = PackedLinear.from_linear(ref)
    x = torch.randn(rows, 96)
    torch.testing.assert_close(packed(x), F.linear(x, ref.weight, ref.bias), rtol=1e-5, atol=1e-5)
    x3 = torch.randn(3, 11, 96)  # leading dims are kept, as nn.Linear does (33 rows: padded)
    assert packed(x3).shape == (3, 11, 200)
    torch.testing.assert_close(packed(x3), F.linear(x3, ref.weight, ref.bias), rtol=1e-5, atol=1e-5)
    xs = torch.randn(rows, 2 * 96)[:, ::2]  # a strided view, as q/k/v slices are
    torch.testing.assert_close(packed(xs), F.linear(xs, ref.weight, ref.bias), rtol=1e-5, atol=1e-5)


def test_padded_rows_bounds_waste_and_shape_count() -> None:
    assert [padded_rows(r) for r in (0, 1, 31, 32, 33, 64, 65, 300, 2040)] == [0, 1, 31, 32, 34, 64, 68, 304, 2048]
    assert all(r <= padded_rows(r) < r * 17 / 16 for r in range(1, 9000))
    assert padded_rows(padded_rows(1000)) == padded_rows(1000)  # a padded size is its own bucket
    assert len({padded_rows(r) for r in range(1, 4097)}) == 144  # one oneDNN primitive each


def test_bias_argument_overrides_the_layers_own() -> None:
    ref = _linear(16, 40, False, 0)
    other = torch.randn(40)
    x = torch.randn(3, 16)
    torch.testing.assert_close(PackedLinear.from_linear(ref)(x, other), F.linear(x, ref.weight, other))


def test_pack_linears_swaps_fp32_cpu_linears_only() -> None:
    model = nn.Sequential(_linear(8, 16, True, 1), nn.GELU(), nn.Sequential(_linear(16, 8, False, 2)),
                          _linear(8, 8, True, 3).to(torch.bfloat16), nn.Embedding(10, 8))
    x = torch.randn(4, 8)
    want = model[2](model[1](model[0](x)))
    assert pack_linears(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[2][0], PackedLinear)
    assert type(model[3]) is nn.Linear  # bf16: left to F.linear
    assert not hasattr(model[0], "weight")  # the packed copy replaces the plain weight
    torch.testing.assert_close(model[2](model[1](model[0](x))), want, rtol=1e-5, atol=1e-5)
    assert all("packed" not in k for k in model.state_dict())


@pytest.mark.parametrize("rows", [1, 5, 300])
def test_vocab_logits_through_a_packed_tied_head(rows: int) -> None:
    torch.manual_seed(rows)
    embed = nn.Embedding(3000, 48).requires_grad_(False)
    head = tied_head(embed)
    assert head.weight is embed.weight  # shared, not copied
    bias = torch.randn(3000)
    hidden = torch.randn(rows, 48)
    want = F.linear(hidden, embed.weight, bias)
    torch.testing.assert_close(vocab_logits(hidden, head, bias), want, rtol=1e-5, atol=1e-5)
    holder = nn.Module()
    holder.lm_head = head
    pack_linears(holder)
    assert isinstance(holder.lm_head, PackedLinear)
    torch.testing.assert_close(vocab_logits(hidden, holder.lm_head, bias), want, rtol=1e-5, atol=1e-5)
    assert embed.weight.shape == (3000, 48)  # the embedding keeps its own weight for lookups
