"""LoRA adapters: bookkeeping without torch, then numbers against PEFT on tiny random Llama and Qwen2.

The oracle is PEFT itself: each adapter is made by `get_peft_model` with random A and B (PEFT's
default zero B would make any adapter a no-op, so a test that ignored it could pass), saved with
`save_pretrained`, and loaded back by `PeftModel.from_pretrained` for the reference, so PEFT and
kvserve read the same folder. Every test checks the adapter changes the output, so none can
pass by serving the base model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.block_manager import BlockManager  # noqa: E402
from engine.config import SchedulerConfig  # noqa: E402
from engine.errors import InvalidRequestError, ModelNotFoundError  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.lora import LoRAConfig, LoRAModule, LoRARequest, fits, prefix_root  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.scheduler import Scheduler  # noqa: E402
from engine.sequence import Sequence  # noqa: E402
from tests.tiny_models import save_tiny  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)


# ---------------------------------------------------------------- bookkeeping, no torch
def test_module_parses_both_vllm_forms():
    assert LoRAModule.parse("sql=/a/b") == LoRAModule("sql", "/a/b")
    assert LoRAModule.parse('{"name": "sql", "path": "/a", "base_model_name": "m"}') == LoRAModule("sql", "/a", "m")
    for bad in ("sql", "=/a", "sql=", '{"name": "x"}', '{"name": "x", "path": "/a", "rank": 2}', "{not json"):
        with pytest.raises(InvalidRequestError):
            LoRAModule.parse(bad)
    with pytest.raises(InvalidRequestError, match="unique"):
        LoRAConfig(modules=(LoRAModule("a", "/x"), LoRAModule("a", "/y")))
    with pytest.raises(InvalidRequestError, match="max_loras"):
        LoRAConfig(max_loras=0)


def test_fits_counts_distinct_adapters():
    assert fits(0, [1, 2, 3], 1)  # the base model is never limited
    assert fits(2, [1, 2, 0], 2) and not fits(3, [1, 2, 0], 2)
    assert fits(3, [1, 1, 0, 0], 2)


def _seq(i: int, lora_id: int, n: int = 8) -> Sequence:
    return Sequence(seq_id=i, request_id=f"r{i}", token_ids=list(range(10, 10 + n)), num_prompt_tokens=n,
                    params=SamplingParams(max_tokens=4), max_tokens=4, lora_id=lora_id)


def test_scheduler_skips_an_adapter_over_max_loras_and_keeps_its_place():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=4), BlockManager(64, 4), max_loras=2)
    seqs = [_seq(0, 1), _seq(1, 2), _seq(2, 3), _seq(3, 0), _seq(4, 1), _seq(5, 0)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert [s.seq_id for s in out.seqs] == [0, 1, 3, 4]  # adapter 3 would be a third one: it waits
    assert [s.seq_id for s in sched.waiting] == [2, 5]  # still ahead of those it let pass
    sched.finish(seqs[1])  # adapter 2 no longer runs: 3 may start
    out = sched.schedule()
    assert 2 in [s.seq_id for s in out.seqs]
    for s in list(sched.running):
        sched.finish(s)
    sched.block_manager.check_integrity()
    assert sched.block_manager.num_free_blocks == 64


def test_prefix_cache_keys_blocks_by_adapter():
    assert prefix_root(0) == b"" and prefix_root(1) != prefix_root(2)
    bm = BlockManager(32, 4, enable_prefix_caching=True)
    first = _seq(0, 1)
    assert bm.match_prefix(first) == 0 and bm.allocate_slots(first, 8)
    first.num_computed_tokens = 8
    bm.allocate_slots(first, 0)  # names its full blocks
    for other, want in ((_seq(1, 1), 4), (_seq(2, 2), 0), (_seq(3, 0), 0)):
        assert bm.match_prefix(other) == want, other.lora_id  # the last token is always computed again
        bm.free(other)
    bm.free(first)
    bm.check_integrity()


# ---------------------------------------------------------------- PEFT adapters and references
def make_adapter(base: Path, out: Path, seed: int, **lora_kwargs) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    get_peft_model(hf, LoraConfig(init_lora_weights=False, **lora_kwargs)).save_pretrained(out)
    return out


def reference(base: Path, adapter: Path | None) -> torch.nn.Module:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    return hf if adapter is None else PeftModel.from_pretrained(hf, adapter).eval()


def hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def tiny(request, tmp_path_factory):
    """A base folder, two adapters (all projections, r=8; q/v only, rsLoRA, a per-module rank) and
    their PEFT references."""
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    base = save_tiny(request.param, root / "base")
    adapters = {
        "all": make_adapter(base, root / "all", seed=1, r=8, lora_alpha=16, target_modules=ALL),
        "qv": make_adapter(base, root / "qv", seed=2, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           use_rslora=True, rank_pattern={"v_proj": 2}),
    }
    refs = {None: reference(base, None)} | {name: reference(base, path) for name, path in adapters.items()}
    return base, adapters, refs


def _prompts(n: int, seed: int = 0, lens=(5, 11, 7, 19)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (lens[i % len(lens)],), generator=g).tolist() for i in range(n)]


def _llm(base: Path, **kwargs) -> LLM:
    kwargs = dict(num_kv_blocks=64, block_size=4, enable_lora=True) | kwargs
    return LLM(str(base), **kwargs)


def _requests(adapters: dict[str, Path], names: list[str | None]) -> list[LoRARequest | None]:
    return [None if n is None else LoRARequest(n, 0, str(adapters[n])) for n in names]


def test_logits_equal_peft_in_one_mixed_batch(tiny):
    """One flat forward over base, `all` and `qv` rows gives each row PEFT's logits for its adapter."""
    from engine.attention import get_backend
    from engine.forward_context import ForwardContext, metadata_for_sequences
    from engine.lora_batch import LoRABatch

    base, adapters, refs = tiny
    llm = _llm(base)
    for name, path in adapters.items():
        llm.engine.add_lora(name, str(path))
    names = [None, "all", "qv", "all"]
    prompts = _prompts(4, seed=3)
    ids = llm.engine.loras
    lora_ids = [0 if n is None else ids.id_of(n) for n in names]
    model = llm.engine.runner.model
    flat = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    ctx = ForwardContext(metadata_for_sequences([len(p) for p in prompts]), get_backend("cpu", None),
                         lora=LoRABatch.build(ids.stack, lora_ids, [len(p) for p in prompts], "cpu"))
    with torch.inference_mode():
        ours = model.compute_logits(model(flat, positions, ctx)).split([len(p) for p in prompts])
        for name, prompt, got in zip(names, prompts, ours):
            want = refs[name](torch.tensor([prompt])).logits[0]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            if name is not None:  # the adapter matters at this tolerance
                assert (want - refs[None](torch.tensor([prompt])).logits[0]).abs().max() > 1e-2


@pytest.mark.parametrize("run_ahead", [False, True])
def test_greedy_mixed_batch_equals_peft_generate(tiny, run_ahead):
    """Base and adapter requests decode in the same steps; each equals its own PEFT reference
    (also with steps launched before the previous one's tokens are read)."""
    base, adapters, refs = tiny
    llm = _llm(base, run_ahead=run_ahead)
    names = [None, "all", "qv", "all", None, "qv"]
    prompts = _prompts(len(names), seed=4)
    outs = llm.generate(prompts, GREEDY, lora_request=_requests(adapters, names))
    got = [o.outputs[0].token_ids for o in outs]
    want = [hf_greedy(refs[n], p, GREEDY.max_tokens) for n, p in zip(names, prompts)]
    assert got == want
    assert got[1] != hf_greedy(refs[None], prompts[1], GREEDY.max_tokens)  # the adapter changes the tokens
    assert llm.engine.block_manager.usage == 0.0


def test_prefix_cache_never_crosses_adapters(tiny):
    """The same prompt under the base model, then an adapter, then the adapter again: the second
    finds no cached blocks (the base model's K/V are not its own), the third finds its own."""
    base, adapters, refs = tiny
    llm = _llm(base)
    prompt = _prompts(1, seed=5, lens=(22,))
    plain = llm.generate(prompt, GREEDY)[0]
    first, again = (llm.generate(prompt, GREEDY, lora_request=_requests(adapters, ["all"]))[0] for _ in range(2))
    want = hf_greedy(refs["all"], prompt[0], GREEDY.max_tokens)
    assert first.outputs[0].token_ids == want == again.outputs[0].token_ids != plain.outputs[0].token_ids
    assert first.num_cached_tokens == 0 and again.num_cached_tokens == 20
    llm.engine.block_manager.check_integrity()


def test_max_loras_one_serialises_adapters_with_the_same_tokens(tiny):
    base, adapters, refs = tiny
    llm = _llm(base, max_loras=1)
    names = ["all", "qv", "all", None, "qv"]
    prompts = _prompts(len(names), seed=6)
    engine = llm.engine
    for n, p, lora in zip(names, prompts, _requests(adapters, names)):
        if lora is not None and lora.lora_name not in engine.lora_names:
            engine.add_lora(lora.lora_name, lora.lora_path)
    from engine.request import GenerationRequest

    for i, (n, p) in enumerate(zip(names, prompts)):
        engine.add_request(f"r{i}", GenerationRequest(p, GREEDY, n))
    done, seen = {}, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        seen.append(len({s.lora_id for s in engine.scheduler.running if s.lora_id}))
    assert max(seen) == 1
    assert [done[f"r{i}"] for i in range(len(names))] == [
        hf_greedy(refs[n], p, GREEDY.max_tokens) for n, p in zip(names, prompts)]


def test_preemption_and_speculation_keep_adapter_tokens(tiny):
    """A pool too small for every request (preemption, chunked prompts) with n-gram drafts on."""
    base, adapters, refs = tiny
    names = ["all", None, "qv", "all"]
    prompts = [p * 3 for p in _prompts(len(names), seed=7, lens=(6, 5))]  # repeats, so drafts are proposed
    llm = _llm(base, num_kv_blocks=16, max_num_batched_tokens=16,
               speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    outs = llm.generate(prompts, GREEDY, lora_request=_requests(adapters, names))
    assert [o.outputs[0].token_ids for o in outs] == [
        hf_greedy(refs[n], p, GREEDY.max_tokens) for n, p in zip(names, prompts)]
    assert llm.engine.scheduler.num_preemptions > 0 and llm.engine.scheduler.num_draft_tokens > 0
    assert llm.engine.block_manager.usage == 0.0


# ---------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-refusals")
    return root, save_tiny("llama", root / "base")


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_modules=["q_proj"], use_dora=True), "DoRA"),
    (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(target_modules=["embed_tokens"]), "cannot serve weight"),
    (dict(target_modules=["q_proj"], r=32), "above max_lora_rank 16"),
])
def test_adapters_it_cannot_serve_exactly_are_refused(llama, kwargs, match):
    root, base = llama
    path = make_adapter(base, root / match.split()[0], seed=0, **kwargs)
    llm = _llm(base)
    with pytest.raises(InvalidRequestError, match=match):
        llm.engine.add_lora("x", str(path))
    assert llm.engine.lora_names == []


def test_other_refusals(llama, tmp_path):
    root, base = llama
    other = save_tiny("qwen2", tmp_path / "qwen2")  # one KV head, not two: k/v shapes differ
    foreign = make_adapter(other, tmp_path / "foreign", seed=0, target_modules=ALL)
    llm = _llm(base)
    with pytest.raises(InvalidRequestError, match="an adapter of another model"):
        llm.engine.add_lora("foreign", str(foreign))
    with pytest.raises(InvalidRequestError, match="no adapter_config.json"):
        llm.engine.add_lora("missing", str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotFoundError, match="no LoRA adapter of that name"):
        llm.generate([[5, 6, 7]], GREEDY, lora_request=LoRARequest("ghost"))
    gpt2 = save_tiny("gpt2", tmp_path / "gpt2")
    with pytest.raises(InvalidRequestError, match="does not take LoRA adapters"):
        LLM(str(gpt2), enable_lora=True, num_kv_blocks=16)
    plain = LLM(str(base), num_kv_blocks=16)
    with pytest.raises(InvalidRequestError, match="without LoRA support"):
        plain.engine.add_lora("x", str(foreign))


def test_unload_waits_for_users_and_a_reload_gets_a_new_id(llama):
    from engine.request import GenerationRequest

    root, base = llama
    path = make_adapter(base, root / "reload", seed=3, target_modules=ALL)
    engine = _llm(base).engine
    engine.add_lora("a", str(path))
    first = engine.loras.id_of("a")
    engine.add_request("r", GenerationRequest([5, 6, 7], GREEDY, "a"))
    with pytest.raises(InvalidRequestError, match="in use by 1 request"):
        engine.remove_lora("a")
    while engine.has_unfinished_requests():
        engine.step()
    engine.remove_lora("a")
    with pytest.raises(ModelNotFoundError):
        engine.validate(GenerationRequest([5], GREEDY, "a"))
    engine.add_lora("a", str(path))
    assert engine.loras.id_of("a") != first  # the prefix cache holds blocks named by the old id


# ---------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def served(llama):
    from engine.config import CacheConfig, EngineConfig
    from engine.engine import LLMEngine
    from server.settings import ServerSettings
    from tests.server_helpers import free_port, serve

    root, base = llama
    adapters = {"all": make_adapter(base, root / "http-all", seed=5, r=8, lora_alpha=16, target_modules=ALL),
                "qv": make_adapter(base, root / "http-qv", seed=6, target_modules=["q_proj", "v_proj"])}
    engine = LLMEngine.from_config(EngineConfig(model=str(base), cache=CacheConfig(block_size=4, num_blocks=64),
                                                lora=LoRAConfig()))
    engine.add_lora("all", str(adapters["all"]))
    port = free_port()
    settings = ServerSettings(port=port, shutdown_timeout_s=2.0, allow_runtime_lora_updating=True)
    with serve({engine.info.name: engine}, settings) as url:
        yield url, engine, base, adapters


def test_models_list_adapters_with_their_parent(served):
    url, engine, base, adapters = served
    data = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    assert [(m["id"], m["parent"], m["root"]) for m in data] == [
        (engine.info.name, None, engine.info.path), ("all", engine.info.name, str(adapters["all"]))]
    assert httpx.get(f"{url}/v1/models/all", timeout=10).json()["parent"] == engine.info.name


def test_requests_name_the_adapter_as_their_model(served):
    url, engine, base, adapters = served
    prompt = _prompts(1, seed=8)[0]
    want = hf_greedy(reference(base, adapters["all"]), prompt, 8)
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{url}/v1/completions", json=body | {"model": "all"}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "all"
    text = engine.tokenizer.decode(want, skip_special_tokens=True)
    assert r.json()["choices"][0]["text"] == text
    plain = httpx.post(f"{url}/v1/completions", json=body | {"model": engine.info.name}, timeout=60).json()
    assert plain["choices"][0]["text"] != text
    tgi = httpx.post(f"{url}/generate", json={"inputs": engine.tokenizer.decode(prompt), "parameters": {
        "adapter_id": "all", "max_new_tokens": 8, "details": True, "decoder_input_details": True}}, timeout=60)
    assert tgi.status_code == 200, tgi.text
    assert [t["id"] for t in tgi.json()["details"]["tokens"]] == hf_greedy(
        reference(base, adapters["all"]), engine.tokenizer.encode(engine.tokenizer.decode(prompt)), 8)
    for bad in ({"model": "nope"}, ):
        r = httpx.post(f"{url}/v1/completions", json=body | bad, timeout=10)
        assert r.status_code == 404 and r.json()["error"]["type"] == "model_not_found"
    r = httpx.post(f"{url}/generate", json={"inputs": "x", "parameters": {"adapter_id": "nope"}}, timeout=10)
    assert r.status_code == 404
    assert engine.block_manager.usage == 0.0


def test_runtime_load_and_unload(served):
    url, engine, base, adapters = served
    prompt = _prompts(1, seed=9)[0]
    body = {"model": "qv", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=10).status_code == 404
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "qv", "lora_path": str(adapters["qv"])},
                   timeout=30)
    assert r.status_code == 200 and "added" in r.text
    out = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    want = hf_greedy(reference(base, adapters["qv"]), prompt, 6)
    assert out["choices"][0]["text"] == engine.tokenizer.decode(want, skip_special_tokens=True)
    again = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "qv", "lora_path": str(adapters["qv"])},
                       timeout=30)
    assert again.status_code == 400 and "already served" in again.json()["error"]["message"]
    nobase = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(adapters["qv"]),
                                                             "base_model_name": "nope"}, timeout=30)
    assert nobase.status_code == 404 and nobase.json()["error"]["param"] == "base_model_name"
    bad = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(base)}, timeout=30)
    assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "qv"}, timeout=30).status_code == 200
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=10).status_code == 404
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "qv"}, timeout=30).status_code == 404
    assert [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]] == [engine.info.name, "all"]


def test_runtime_updating_is_off_by_default(llama):
    from engine.config import CacheConfig, EngineConfig
    from engine.engine import LLMEngine
    from tests.server_helpers import serve

    _, base = llama
    engine = LLMEngine.from_config(EngineConfig(model=str(base), cache=CacheConfig(block_size=4, num_blocks=16),
                                                lora=LoRAConfig()))
    with serve({engine.info.name: engine}) as url:
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/"}, timeout=10)
        assert r.status_code == 404
        assert json.loads(httpx.get(f"{url}/v1/models", timeout=10).text)["data"][0]["parent"] is None


def test_metrics_name_the_running_adapters(served):
    """vLLM's lora_requests_info: while an adapter's request streams, its label names the adapter;
    once it is done, one sample remains, naming none."""
    url, engine, _, _ = served
    body = {"model": "all", "prompt": [5, 6, 7], "max_tokens": 40, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        during = httpx.get(f"{url}/metrics", timeout=10).text
        for _ in lines:
            pass
    after = httpx.get(f"{url}/metrics", timeout=10).text

    def samples(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("kvserve:lora_requests_info{")]

    assert any('running_lora_adapters="all"' in line and 'max_lora="4"' in line for line in samples(during))
    assert len(samples(after)) == 1 and 'running_lora_adapters=""' in samples(after)[0]
    assert engine.block_manager.usage == 0.0


def test_phi3_adapters_target_its_merged_modules(tmp_path):
    """Phi-3 saves qkv_proj and gate_up_proj merged, and PEFT adapters name those modules."""
    base = save_tiny("phi3", tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "a", seed=5, r=4, lora_alpha=8,
                           target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    ref, plain = reference(base, adapter), reference(base, None)
    llm = _llm(base)
    prompts = _prompts(2, seed=6)
    outs = llm.generate(prompts, GREEDY, lora_request=[LoRARequest("a", 1, str(adapter)), None])
    assert outs[0].outputs[0].token_ids == hf_greedy(ref, prompts[0], GREEDY.max_tokens) \
        != hf_greedy(plain, prompts[0], GREEDY.max_tokens)
    assert outs[1].outputs[0].token_ids == hf_greedy(plain, prompts[1], GREEDY.max_tokens)
    assert llm.engine.block_manager.usage == 0.0
