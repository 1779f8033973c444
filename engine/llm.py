"""Offline Python API: `LLM(model).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine import LLMEngine
from engine.lora import LoRAConfig, LoRARequest
from engine.outputs import RequestOutput
from engine.request import GenerationRequest
from engine.sampling_params import SamplingParams
from engine.speculative import SpeculativeConfig


class LLM:
    """Runs prompts to completion through the same engine the server uses."""

    def __init__(
        self,
        model: str,
        dtype: str = "float32",
        device: str = "cpu",
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory_gib: float = 1.0,
        gpu_memory_utilization: float = 0.9,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
        attention_backend: str | None = None,
        seed: int = 0,
        decode_graphs: bool | None = None,
        max_graph_batch: int = 256,
        run_ahead: bool | None = None,
        gemv_max_rows: int = 0,
        enable_pdl: bool = False,
        enable_prefix_caching: bool = True,
        speculative_config: dict | SpeculativeConfig | None = None,
        enable_lora: bool = False,
        max_loras: int = 4,
        max_lora_rank: int = 16,
        scheduling_policy: str = "fcfs",
    ) -> None:
        """`speculative_config`: vLLM's, e.g. {"method": "ngram", "num_speculative_tokens": 4}.
        `enable_lora`: requests may run PEFT LoRA adapters (`generate(..., lora_request=)`)."""
        if isinstance(speculative_config, dict):
            speculative_config = SpeculativeConfig.from_dict(speculative_config)
        config = EngineConfig(
            model=model,
            dtype=dtype,
            device=device,
            attention_backend=attention_backend,
            max_model_len=max_model_len,
            cache=CacheConfig(block_size=block_size, num_blocks=num_kv_blocks, kv_cache_memory_gib=kv_cache_memory_gib,
                              gpu_memory_utilization=gpu_memory_utilization,
                              enable_prefix_caching=enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                      policy=scheduling_policy),
            seed=seed,
            decode_graphs=decode_graphs,
            max_graph_batch=max_graph_batch,
            run_ahead=run_ahead,
            gemv_max_rows=gemv_max_rows,
            enable_pdl=enable_pdl,
            speculative=speculative_config,
            lora=LoRAConfig(max_loras=max_loras, max_lora_rank=max_lora_rank) if enable_lora else None,
        )
        self.engine = LLMEngine.from_config(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: str | Seq[str] | Seq[list[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
        priority: Seq[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs in prompt order. `lora_request`:
        the adapter every prompt (or each prompt, given a list) runs; None: the base model.
        `priority`: each prompt's (lower first; needs `scheduling_policy="priority"`)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        token_lists = [p if isinstance(p, list) else self.tokenizer.encode(p) for p in prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(token_lists)
        loras = lora_request if isinstance(lora_request, Seq) else [lora_request] * len(token_lists)
        for lora in {lr.lora_name: lr for lr in loras if lr is not None}.values():
            if lora.lora_name not in self.engine.lora_names and lora.lora_path:  # else add_request says it is unknown
                self.engine.add_lora(lora.lora_name, lora.lora_path)
        order = []
        for ids, p, lora, rank in zip(token_lists, params, loras, priority or [0] * len(token_lists)):
            request_id = f"offline-{next(self._ids)}"
            self.engine.add_request(request_id, GenerationRequest(ids, p, lora.lora_name if lora else None, rank))
            order.append(request_id)
        return self._run(order)

    def chat(
        self, conversations: list[list[dict]], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        # the template already holds the BOS token where the model wants one
        return self.generate([self.tokenizer.encode(p, add_special_tokens=False) for p in prompts], params)

    def _run(self, order: list[str]) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[r] for r in order]
