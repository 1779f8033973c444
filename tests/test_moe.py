"""Mixture-of-experts pieces: the grouped expert compute against a per-token loop, the configs HF
writes, Mixtral's weight names, decode graphs refused, and LoRA on an MoE model against PEFT.

Whole-model logits and greedy tokens against transformers are in test_models_decoder.py
(mixtral, qwen2_moe, qwen3_moe) and test_engine_generation.py (qwen3_moe, mixtral).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.cuda_graphs import wanted  # noqa: E402
from engine.errors import InvalidRequestError  # noqa: E402
from engine.fused import moe  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.lora import LoRARequest  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from models.moe import Expert, MoeConfig, mixtral_name  # noqa: E402
from tests.tiny_models import save_tiny  # noqa: E402


def per_token(x, weights, ids, w_gate_up, w_down):
    """The definition, one token and one chosen expert at a time."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), ids[t].tolist()):
            gate, up = (w_gate_up[e].double() @ x[t].double()).chunk(2)
            out[t] += w * (w_down[e].double() @ (F.silu(gate) * up))
    return out


def as_experts(w_gate_up: torch.Tensor, w_down: torch.Tensor) -> list[Expert]:
    """Experts as a loaded model holds them: separate gate and up, merged after loading."""
    experts = []
    for gate_up, down in zip(w_gate_up, w_down):
        expert = Expert(gate_up.shape[1], down.shape[1]).to(gate_up.dtype)
        gate, up = gate_up.chunk(2)
        for linear, w in ((expert.gate_proj, gate), (expert.up_proj, up), (expert.down_proj, down)):
            linear.weight.data.copy_(w)
        expert.merge_projections()
        experts.append(expert)
    return experts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_equal_the_per_token_definition(dtype):
    g = torch.Generator().manual_seed(0)
    num_experts, hidden, inter, tokens, top_k = 6, 16, 8, 9, 2
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    w_gate_up = (torch.randn(num_experts, 2 * inter, hidden, generator=g) * 0.3).to(dtype)
    w_down = (torch.randn(num_experts, hidden, inter, generator=g) * 0.3).to(dtype)
    logits = torch.randn(tokens, num_experts, generator=g)
    logits[:, 5] = -1e4  # an expert no token chooses
    logits[3:7, 2] = 1e4  # one several tokens share
    weights, ids = moe.route(logits, top_k, renormalize=True, weights_dtype=dtype)
    assert (ids[3:7, 0] == 2).all() and not (ids == 5).any()
    torch.testing.assert_close(weights.float().sum(-1), torch.ones(tokens), atol=1e-2 if dtype != torch.float32 else 1e-6,
                               rtol=0)
    with torch.no_grad():
        got = moe.experts(x, weights, ids, as_experts(w_gate_up, w_down))
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.double(), per_token(x, weights, ids, w_gate_up, w_down), atol=tol, rtol=tol)


def test_route_takes_the_top_k_of_the_softmax_and_renormalises_only_when_asked():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    probs = logits.softmax(-1)
    weights, ids = moe.route(logits, 2, renormalize=False, weights_dtype=torch.float32)
    assert ids.tolist() == [[1, 2]]
    torch.testing.assert_close(weights, probs[:, [1, 2]])
    weights, _ = moe.route(logits, 2, renormalize=True, weights_dtype=torch.float32)
    torch.testing.assert_close(weights, probs[:, [1, 2]] / probs[:, [1, 2]].sum())


def test_config_reads_each_family_and_dense_models_have_none():
    assert MoeConfig.from_hf({"num_hidden_layers": 2, "intermediate_size": 8}) is None
    mixtral = MoeConfig.from_hf({"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2,
                                 "intermediate_size": 14336, "num_hidden_layers": 32})
    assert mixtral == MoeConfig(8, 2, 14336, renormalize=True, fp32_weights=True)
    # Qwen3-30B-A3B's config.json; transformers 5 writes num_experts as num_local_experts, also read
    qwen3 = {"model_type": "qwen3_moe", "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
             "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "num_hidden_layers": 48}
    want = MoeConfig(128, 8, 768, renormalize=True, fp32_weights=False)
    assert MoeConfig.from_hf(qwen3) == want
    assert MoeConfig.from_hf({k: v for k, v in qwen3.items() if k != "num_experts"} | {"num_local_experts": 128}) == want
    qwen2 = MoeConfig.from_hf({"model_type": "qwen2_moe", "num_experts": 60, "num_experts_per_tok": 4,
                               "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
                               "decoder_sparse_step": 2, "mlp_only_layers": [3], "num_hidden_layers": 6})
    assert qwen2 is not None and not qwen2.renormalize and qwen2.shared_intermediate_size == 5632
    assert qwen2.dense_layers == (0, 2, 3, 4)
    with pytest.raises(ValueError, match="silu"):
        MoeConfig.from_hf(qwen3 | {"hidden_act": "gelu"})


def test_mixtral_names_become_the_family_names():
    assert mixtral_name("model.layers.3.block_sparse_moe.gate.weight") == "model.layers.3.mlp.gate.weight"
    assert mixtral_name("model.layers.0.block_sparse_moe.experts.7.w1.weight") == \
        "model.layers.0.mlp.experts.7.gate_proj.weight"
    assert mixtral_name("model.layers.0.block_sparse_moe.experts.7.w3.weight") == \
        "model.layers.0.mlp.experts.7.up_proj.weight"
    assert mixtral_name("model.layers.0.block_sparse_moe.experts.7.w2.weight") == \
        "model.layers.0.mlp.experts.7.down_proj.weight"
    assert mixtral_name("model.layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight"


def test_decode_graphs_are_off_for_models_they_cannot_hold():
    triton = SimpleNamespace(name="triton")  # the fused backend, as far as `wanted` asks
    assert wanted(None, "cuda", triton) and not wanted(None, "cuda", triton, capturable=False)
    with pytest.raises(InvalidRequestError, match="mixture-of-experts"):
        wanted(True, "cuda", triton, capturable=False)


# ---------------------------------------------------------------- a whole MoE model
@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory) -> Path:
    return save_tiny("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe"))


def test_model_routes_and_cannot_be_captured(qwen3_moe):
    llm = LLM(str(qwen3_moe), num_kv_blocks=32, block_size=4)
    model = llm.engine.runner.model
    assert not model.capturable and llm.engine.runner.graphs is None
    sparse = model.model.layers[1].mlp
    assert len(sparse.experts) == 8 and sparse.experts[0].gate_up_proj.out_features == 96
    with pytest.raises(InvalidRequestError, match="mixture-of-experts"):
        LLM(str(qwen3_moe), num_kv_blocks=32, block_size=4, attention_backend="triton", decode_graphs=True)


def test_lora_on_attention_equals_peft_and_expert_adapters_are_refused(qwen3_moe, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from safetensors.torch import load_file, save_file

    from models.lora import LoRALoadError

    attn = tmp_path / "attn"
    torch.manual_seed(1)
    get_peft_model(AutoModelForCausalLM.from_pretrained(qwen3_moe, dtype=torch.float32),
                   LoraConfig(init_lora_weights=False, r=4, lora_alpha=8,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])).save_pretrained(attn)
    base = AutoModelForCausalLM.from_pretrained(qwen3_moe, dtype=torch.float32).eval()
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qwen3_moe, dtype=torch.float32), attn).eval()
    llm = LLM(str(qwen3_moe), num_kv_blocks=64, block_size=4, enable_lora=True)
    prompt = list(range(5, 17))
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    out = llm.generate([prompt, prompt], params, lora_request=[LoRARequest("attn", 1, str(attn)), None])

    def greedy(model) -> list[int]:
        ids = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
        return ids[0, len(prompt):].tolist()

    assert out[0].outputs[0].token_ids == greedy(ref) != greedy(base)
    assert out[1].outputs[0].token_ids == greedy(base)
    # layer 0's dense MLP is a PEFT target too, but adapters of MoE models reach attention only
    # (PEFT 0.21 itself maps gate/up targets onto the stacked experts; the key is written as older PEFT did)
    mlp = tmp_path / "mlp"
    shutil.copytree(attn, mlp)
    tensors = load_file(mlp / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.gate_proj.lora_{}.weight"
    save_file(tensors | {key.format("A"): torch.zeros(4, 64), key.format("B"): torch.zeros(128, 4)},
              mlp / "adapter_model.safetensors")
    with pytest.raises(LoRALoadError, match="cannot serve weight 'base_model.model.model.layers.0.mlp.gate_proj"):
        llm.engine.add_lora("mlp", str(mlp))
    assert llm.engine.block_manager.usage == 0.0
