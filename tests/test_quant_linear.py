"""GGUF block kernels (engine/quant_linear_cpu.c) against the torch reference, the reference against
gguf-py, and the loader's matching of blocks to SmolLM2's Linears (merged and tied ones too)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from engine.quant_linear import FORMATS, QuantizedLinear, QuantizedWeight, dequantize, load, quant_linear
from models.gguf import BLOCKS, quantized_linears
from models.loader import ALIASES, load_model, resolve

pytestmark = pytest.mark.skipif(load() is None, reason="no C compiler: the fp32 path serves")


def random_blocks(fmt_name: str, out: int, inp: int, seed: int) -> QuantizedWeight:
    """Random quants with fp16 scales (and Q4_1 minimums) of a weight's usual size."""
    g = torch.Generator().manual_seed(seed)
    fmt = FORMATS[fmt_name]
    nb = inp // 32
    blocks = torch.randint(0, 256, (out, nb, fmt.block_bytes), dtype=torch.uint8, generator=g)
    scales = (torch.rand(out, nb, 2, generator=g) * 0.02 - (0.01 if fmt.has_min else 0)).half()
    head = 4 if fmt.has_min else 2
    blocks[..., :head] = scales[..., : head // 2].contiguous().view(torch.uint8).reshape(out, nb, head)
    return QuantizedWeight(fmt, blocks.reshape(out, -1))


@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_equals_the_dequantized_product(fmt, rows, with_bias):
    weight = random_blocks(fmt, 72, 160, seed=rows)
    x = torch.randn(rows, 160, generator=torch.Generator().manual_seed(7))
    bias = torch.randn(72) if with_bias else None
    got = quant_linear(load(), x, weight, bias)
    ref = F.linear(x.double(), dequantize(weight).double(), None if bias is None else bias.double())
    assert got.shape == (rows, 72)
    assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


@pytest.fixture(scope="module")
def smollm2_folder():
    return resolve("smollm2")[1]


def test_dequantize_equals_gguf_py_on_the_shipped_weights(smollm2_folder):
    root = Path(importlib.util.find_spec(ALIASES["smollm2"][0]).submodule_search_locations[0])
    reader = GGUFReader(str(next(root.glob("*.gguf"))))
    seen = set()
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind in FORMATS and kind not in seen:
            seen.add(kind)
            weight = QuantizedWeight(FORMATS[kind], torch.from_numpy(np.array(t.data)))
            ref = torch.from_numpy(np.array(gguf_dequantize(t.data, t.tensor_type), dtype=np.float32))
            assert torch.equal(dequantize(weight), ref), t.name
    assert seen == {"Q4_1", "Q8_0"}
    assert (smollm2_folder / BLOCKS).exists()  # the conversion keeps them


def test_every_smollm2_linear_reads_its_blocks_and_a_changed_weight_does_not(smollm2_folder):
    loaded = load_model("smollm2", pack_cpu_linears=False)
    model = loaded.model
    found = quantized_linears(model, smollm2_folder)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert len(found) == len(linears) == 30 * 4 + 1  # q/k/v and gate/up merged, and the tied head
    assert found[model.lm_head].format.name == "Q8_0"
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert found[qkv].format.name == "Q4_1"
    x = torch.randn(1, qkv.in_features)
    layer = QuantizedLinear(qkv.weight, qkv.bias, found[qkv])
    assert torch.allclose(layer(x), F.linear(x, qkv.weight), rtol=1e-5, atol=1e-5)
    qkv.weight.data[0, 0] += 1e-3  # after loading, blocks and weight part: the blocks are not used
    assert qkv not in quantized_linears(model, smollm2_folder)


def test_few_rows_read_the_blocks_and_more_rows_the_packed_weight():
    """Blocks of one weight beside the fp32 of another: the output says which one a row count used."""
    blocks = random_blocks("Q4_1", 40, 64, seed=1)
    other = torch.randn(40, 64)
    layer = QuantizedLinear(other, None, blocks, max_rows=2)
    for rows, source in ((1, dequantize(blocks)), (2, dequantize(blocks)), (3, other)):
        x = torch.randn(rows, 64)
        assert torch.allclose(layer(x), F.linear(x, source), rtol=1e-4, atol=1e-4), rows
    layer.lib = None  # no compiler: every row count takes the packed weight
    x = torch.randn(1, 64)
    assert torch.allclose(layer(x), F.linear(x, other), rtol=1e-4, atol=1e-4)
