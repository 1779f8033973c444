"""Thinking budgets (vLLM's `thinking_token_budget`, Anthropic's `thinking.budget_tokens`): after so many
tokens inside the reasoning block, `</think>` is forced token by token and the model answers. The
answer after the forced end equals transformers' greedy continuation of the same tokens; landing
each step, running ahead and with n-gram drafts; the chat and Messages routes split it into reasoning
and content, and refuse a budget they cannot enforce."""
from __future__ import annotations

import httpx
import pytest
import torch

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from engine.thinking_budget import ThinkingBudget
from server.settings import ServerSettings
from tests.server_helpers import free_port, serve
from tests.test_engine_generation import random_prompts

START, END = (7, 8), (5, 6)  # token ids of a made-up opening and closing tag
MAX = 24


def test_forced_tokens_follow_the_block():
    opened = ThinkingBudget(3, START, END, opened=True)
    # read off the output alone: from the budget on, the end's tokens by position
    assert [opened.forced_token([1] * n) for n in range(6)] == [None, None, None, 5, 6, None]
    assert opened.forced_token([1, 1, 1, 5]) == 6  # the end, one token per step
    assert opened.forced_token([1, 1, 1, 5, 6]) is None  # closed: the model answers
    assert opened.forced_token([1, 5, 6, 1, 1, 1, 1]) is None  # closed by the model itself, early
    assert opened.forced_token([1, 5, 1]) == 5  # a lone first token of the end is not the end
    later = ThinkingBudget(2, START, END, opened=False)
    assert later.forced_token([1, 1, 1, 1]) is None  # no block opened: nothing to count
    assert later.forced_token([1, 7, 8, 2, 2]) == 5  # counted from the opening tag
    assert later.forced_token([1, 7, 8, 2]) is None
    assert ThinkingBudget(0, START, END, opened=True).forced_token([]) == 5
    with pytest.raises(ValueError):
        ThinkingBudget(1, (), END, opened=False)


def _hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("mode", ["land", "run_ahead", "drafts"])
def test_the_end_is_forced_and_the_answer_follows(tiny_llama, hf_tiny_llama, mode):
    kwargs = dict(num_kv_blocks=96, block_size=4, max_num_batched_tokens=32, run_ahead=mode == "run_ahead")
    if mode == "drafts":
        kwargs["speculative_config"] = {"num_speculative_tokens": 3, "prompt_lookup_min": 1}
    llm = LLM(str(tiny_llama), **kwargs)
    end = tuple(llm.engine.tokenizer.encode("</think>", add_special_tokens=False))
    prompts = random_prompts(3, 4, 12, seed=5)
    budgets = [0, 3, 6]
    params = [SamplingParams(temperature=0.0, max_tokens=MAX, ignore_eos=True,
                             thinking_budget=ThinkingBudget(b, (1,), end, opened=True)) for b in budgets]
    free = SamplingParams(temperature=0.0, max_tokens=MAX, ignore_eos=True)
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts + prompts[:1], params + [free])]
    unbudgeted = _hf_greedy(hf_tiny_llama, prompts[0], MAX)
    assert outs[-1] == unbudgeted  # a free row in the same batch is untouched
    for prompt, budget, out in zip(prompts, budgets, outs):
        thought = _hf_greedy(hf_tiny_llama, prompt, budget) if budget else []
        assert out[:budget] == thought and tuple(out[budget:budget + len(end)]) == end, out
        head = out[:budget + len(end)]
        assert len(head) < MAX and out[len(head):] == _hf_greedy(hf_tiny_llama, prompt + head, MAX - len(head))
    assert outs[0] != unbudgeted
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}"


@pytest.fixture(scope="module")
def served(tiny_llama):
    """The tiny Llama behind a server whose reasoning parser (DeepSeek-R1's) opens the block in the prompt,
    and an offline twin."""
    from engine.config import CacheConfig, EngineConfig
    from engine.engine import LLMEngine

    (tiny_llama / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    engine = LLMEngine.from_config(EngineConfig(model=str(tiny_llama), cache=CacheConfig(block_size=4, num_blocks=64)))
    settings = ServerSettings(port=free_port(), shutdown_timeout_s=2.0, reasoning_parser="deepseek_r1")
    with serve({"m": engine}, settings) as url:
        yield url, LLM(str(tiny_llama), num_kv_blocks=64, block_size=4)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_chat_splits_the_budgeted_answer(served):
    url, offline = served
    tok = offline.engine.tokenizer
    prompt = tok.encode("hi\nA:")
    end = tuple(tok.encode("</think>", add_special_tokens=False))
    want = offline.generate([prompt], SamplingParams(temperature=0.0, max_tokens=MAX, ignore_eos=True, thinking_budget=
                                                     ThinkingBudget(4, (1,), end, opened=True)))[0].outputs[0]
    thought, answer = want.text.split("</think>", 1)
    r = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX, "temperature": 0,
        "ignore_eos": True, "thinking_token_budget": 4})
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert answer.strip()  # the model answered after the forced end
    assert message["reasoning"] == thought.strip() and message["content"] == answer.lstrip()
    assert want.token_ids[4:4 + len(end)] == list(end)


def test_messages_enforce_budget_tokens(served):
    url, offline = served
    body = {"model": "m", "max_tokens": MAX, "temperature": 0, "messages": [{"role": "user", "content": "hi"}],
            "thinking": {"type": "enabled", "budget_tokens": 2}}
    r = httpx.post(f"{url}/v1/messages", json=body, timeout=30)
    assert r.status_code == 200, r.text
    blocks = r.json()["content"]
    tok = offline.engine.tokenizer
    end = tuple(tok.encode("</think>", add_special_tokens=False))
    want = offline.generate([tok.encode("hi\nA:")], SamplingParams(temperature=0.0, max_tokens=MAX, thinking_budget=
                                                                   ThinkingBudget(2, (1,), end, opened=True)))[0]
    thought, answer = want.outputs[0].text.split("</think>", 1)
    assert blocks[0]["type"] == "thinking" and blocks[0]["thinking"] == thought.strip()
    assert answer.strip() and blocks[1]["type"] == "text" and blocks[1]["text"].strip() == answer.strip()


def test_a_budget_without_a_parser_is_refused(tiny_llama):
    from engine.config import CacheConfig, EngineConfig
    from engine.engine import LLMEngine

    engine = LLMEngine.from_config(EngineConfig(model=str(tiny_llama), cache=CacheConfig(block_size=4, num_blocks=32)))
    with serve({"m": engine}) as url:
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = httpx.post(f"{url}/v1/chat/completions", json=chat | {"thinking_token_budget": 4}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "thinking_token_budget", r.text
        # Anthropic's clients send a budget with every thinking request: accepted, as before
        r = httpx.post(f"{url}/v1/messages", timeout=30, json=chat | {"thinking": {"type": "enabled",
                                                                                   "budget_tokens": 1024}})
        assert r.status_code == 200, r.text
