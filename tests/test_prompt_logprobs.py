"""Prompt logprobs (OpenAI's `echo` with `logprobs`) against transformers' logits: every prompt
token after the first scored, across prefill chunks, with the prefix cache holding the prompt."""
from __future__ import annotations

import torch

from engine.llm import LLM
from engine.prompt_logprobs import prompt_rows
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from tests.tiny_models import save_tiny


def test_rows_score_the_next_prompt_token_and_stop_before_the_last():
    seq = Sequence(0, "r", list(range(10)), 10, SamplingParams(prompt_logprobs=0), 4)
    other = Sequence(1, "s", list(range(5)), 5, SamplingParams(), 4)
    seq.num_computed_tokens = 4
    # a chunk of positions 4..9: rows 4..8 predict prompt tokens 5..9; row 9 predicts an output
    (part,) = prompt_rows([other, seq], [5, 6])
    assert part.seq_index == 1 and part.first_target == 5 and part.rows == range(5, 10)
    seq.num_computed_tokens = 9
    assert prompt_rows([seq], [1]) == []  # the last position: nothing of the prompt left


def test_prompt_logprobs_equal_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = save_tiny("llama", tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (37, 9)]
    prompts.append(prompts[0][:21] + [3, 4, 5])
    llm = LLM(str(folder), num_kv_blocks=64, block_size=4, max_num_batched_tokens=8)  # chunks of 8
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1))  # the prompts' blocks are cached now
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3, n=2))
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
        scored = out.prompt_logprobs
        assert len(scored) == len(prompt) and scored[0] is None and out.num_cached_tokens == 0
        for p in range(1, len(prompt)):
            assert scored[p].token_id == prompt[p]
            assert abs(scored[p].logprob - ref[p - 1, prompt[p]].item()) < 1e-4
            assert list(scored[p].top) == ref[p - 1].topk(3).indices.tolist()
            assert scored[p].rank == int((ref[p - 1] > ref[p - 1, prompt[p]]).sum()) + 1
    assert llm.engine.block_manager.usage == 0.0
    # without the field nothing is scored
    assert llm.generate(prompts[:1], SamplingParams(max_tokens=1))[0].prompt_logprobs is None


def test_echo_offsets_index_the_answer_text_where_special_tokens_take_no_room():
    from engine.outputs import TokenLogprob
    from server import generation as gen
    from tests.server_helpers import BOS, OFFSET, FakeTokenizer

    tok = FakeTokenizer()  # BOS is special: "<s>" as a token, nothing in the text
    text_of = gen.TokenText(tok)
    prompt = [BOS] + [ord(c) + OFFSET for c in "ab"]
    echo = tok.decode(prompt, skip_special_tokens=True)
    scored = [None, TokenLogprob(prompt[1], -1.0), TokenLogprob(prompt[2], -2.0)]
    completion, end = gen.completion_logprobs([TokenLogprob(ord("c") + OFFSET, -0.5)], text_of, len(echo))
    lp = gen.echo_logprobs(prompt, scored, text_of, completion)
    assert lp["tokens"] == ["<s>", "a", "b", "c"] and echo == "ab"
    assert lp["token_logprobs"] == [None, -1.0, -2.0, -0.5] and lp["top_logprobs"] == [None] * 4
    assert lp["text_offset"] == [0, 0, 1, 2] and end == 3  # into "abc": BOS takes no room


def test_vllms_prompt_logprobs_field_over_http(tmp_path):
    """`prompt_logprobs: N` on completions and chat (vLLM's extra): per prompt token after the first, its
    own logprob and rank, then the N best, keyed by token id, equal to transformers'."""
    import httpx
    from transformers import AutoModelForCausalLM

    from engine.config import CacheConfig, EngineConfig
    from engine.engine import LLMEngine
    from tests.server_helpers import serve

    folder = save_tiny("llama", tmp_path / "m")
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    engine = LLMEngine.from_config(EngineConfig(model=str(folder), cache=CacheConfig(block_size=4, num_blocks=64)))
    prompt = torch.randint(3, 320, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    with serve({"m": engine}) as url:
        body = {"model": "m", "prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2, "echo": True, "logprobs": 1}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        scored = choice["prompt_logprobs"]
        assert len(scored) == len(prompt) and scored[0] is None
        for p in range(1, len(prompt)):
            row, own = ref[p - 1], scored[p][str(prompt[p])]
            assert list(scored[p])[0] == str(prompt[p])  # the prompt's token first
            assert abs(own["logprob"] - row[prompt[p]].item()) < 1e-4
            assert own["rank"] == int((row > row[prompt[p]]).sum()) + 1
            best = row.topk(2).indices.tolist()
            assert all(str(t) in scored[p] and scored[p][str(t)]["rank"] == k + 1 for k, t in enumerate(best))
            assert len(scored[p]) == 2 + (prompt[p] not in best)
        # echo's own logprobs keep their N (1) although the prompt was scored with 2
        assert all(t is None or len(t) == 1 for t in choice["logprobs"]["top_logprobs"])
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
            "model": "m", "messages": [{"role": "user", "content": "abc"}], "max_tokens": 1, "prompt_logprobs": 0})
        assert chat.status_code == 200 and len(chat.json()["prompt_logprobs"]) == chat.json()["usage"]["prompt_tokens"]
        r = httpx.post(f"{url}/v1/completions", json={**body, "stream": True}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
