"""Reused CPU buffers: the workspace, logits written into it, in-place log-softmax."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.top_logprobs import log_softmax_
from engine.workspace import Workspace
from models.layers import vocab_logits


def test_workspace_reuses_and_grows() -> None:
    ws, cpu = Workspace(), torch.device("cpu")
    a = ws.take((4, 10), torch.float32, cpu)
    b = ws.take((3, 10), torch.float32, cpu)
    assert a.shape == (4, 10) and b.shape == (3, 10)
    assert b.data_ptr() == a.data_ptr()  # same storage: no fresh allocation
    c = ws.take((100, 10), torch.float32, cpu)  # bigger: a new buffer, with headroom
    d = ws.take((120, 10), torch.float32, cpu)
    assert c.data_ptr() == d.data_ptr() and d.is_contiguous()
    e = ws.take((2, 2), torch.int64, cpu)  # another dtype: its own buffer
    assert e.dtype == torch.int64


@pytest.mark.parametrize("rows", [2, 7, 256, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_vocab_logits_into_workspace(rows: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, 32, generator=g)
    weight = torch.randn(5000, 32, generator=g)  # several vocabulary chunks, a partial last one
    bias = torch.randn(5000, generator=g) if with_bias else None
    head = nn.Linear(32, 5000, bias=False)
    head.weight = nn.Parameter(weight, requires_grad=False)
    ws = Workspace()
    ws.take((1, 1), torch.float32, hidden.device).fill_(1.0)
    got = vocab_logits(hidden, head, bias, chunk=2048, workspace=ws)
    fresh = vocab_logits(hidden, head, bias, chunk=2048)
    assert torch.equal(got, fresh)  # same arithmetic, only the destination differs
    assert got.data_ptr() == ws.take(got.shape, torch.float32, hidden.device).data_ptr()
    torch.testing.assert_close(got, F.linear(hidden, weight, bias), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 8, 21])
def test_log_softmax_in_place_is_bit_identical(rows: int) -> None:
    x = torch.randn(rows, 3001, generator=torch.Generator().manual_seed(rows)) * 5
    want = torch.log_softmax(x, dim=-1)
    view = x[:]  # in place through a view, as the engine does on its logits
    assert log_softmax_(view, rows_per_chunk=8) is view
    assert torch.equal(x, want)
