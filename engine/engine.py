"""The generation engine: admission, the three-line step, and per-request outputs."""
from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch

from engine.attention import get_backend
from engine.bad_words import bad_words_token_ids
from engine.block_manager import BlockManager
from engine.config import EngineConfig, SchedulerConfig
from engine.cuda_graphs import DecodeGraphs
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import InvalidRequestError, ModelNotFoundError, PromptTooLongError
from engine.fused.gemv import launch_dependent, swap_gemv_linears
from engine.guided import Guides
from engine.lora_adapters import LoRAAdapters
from engine.model_runner import Launched, ModelRunner, caches_and_graphs, kv_block_bytes
from engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from engine.request import EngineStats, GenerationRequest
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence
from models.loader import LoadedModel, load_model
from models.lora import supports_lora


@dataclass
class _RequestState:
    request_id: str
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    logprobs: list[list[TokenLogprob]] | None
    # prompt position -> its token's logprobs (None at 0, nothing predicts it), for echo
    prompt_logprobs: list[TokenLogprob | None] | None
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    sent_tokens: list[int] = field(default_factory=list)  # per sample, tokens already reported


def resolve_num_blocks(loaded: LoadedModel, config: EngineConfig, dtype: torch.dtype) -> int:
    """Blocks from the explicit count, else from the memory budget.

    GPU: what is free now (the weights are loaded) less the (1 - gpu_memory_utilization) of the
    total kept for activations, CUDA graphs and other processes, times this engine's share. A
    budget that holds no block is an error that names the flags, not a server that can hold nothing.
    """
    cache = config.cache
    if cache.num_blocks is not None:
        return cache.num_blocks
    per_block = kv_block_bytes(loaded.model.kv_cache_spec, cache.block_size, dtype)
    if not config.device.startswith("cuda"):
        return max(1, int(cache.kv_cache_memory_gib * 2**30 // per_block))
    free, total = torch.cuda.mem_get_info(torch.device(config.device))
    budget = (free - total * (1.0 - cache.gpu_memory_utilization)) * cache.gpu_kv_share
    if budget < per_block:
        raise InvalidRequestError(
            f"no GPU memory left for {loaded.info.name}'s KV cache: {free / 2**30:.2f} of {total / 2**30:.2f} "
            f"GiB free, {1.0 - cache.gpu_memory_utilization:.0%} of it kept back, share {cache.gpu_kv_share:.2f}; "
            "raise --gpu-memory-utilization, serve fewer models, or set --num-kv-blocks"
        )
    return int(budget // per_block)


def _pdl_supported(device: str) -> bool:
    from engine.fused import pdl  # imports triton: only where asked for (CPU tests interpret it)

    return pdl.supported(device)


class LLMEngine:
    """Decoder-only generation over a paged KV cache with continuous batching.

    `step()` is schedule -> run -> update; everything else is bookkeeping around it. Implements
    the StepEngine protocol of engine.async_engine, so the server drives it from its worker.
    """

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.config = config
        self.info = loaded.info
        self.tokenizer = loaded.tokenizer
        dtype = getattr(torch, config.dtype)
        block_size = config.cache.block_size
        num_blocks = resolve_num_blocks(loaded, config, dtype)
        # A sequence must always fit in the pool on its own, or preemption could never end.
        self.max_model_len = min(
            loaded.info.max_model_len, config.max_model_len or 10**9, num_blocks * block_size
        )
        self.block_manager = BlockManager(num_blocks, block_size, config.cache.enable_prefix_caching,
                                          loaded.model.kv_cache_spec.sliding_window)
        sched_cfg = SchedulerConfig(
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            max_num_seqs=config.scheduler.max_num_seqs,
            max_model_len=self.max_model_len,
            policy=config.scheduler.policy,
        )
        self.loras = LoRAAdapters(config.lora, loaded.model, dtype, config.device) if config.lora is not None else None
        if self.loras is not None and not supports_lora(loaded.model):
            raise InvalidRequestError(f"{type(loaded.model).__name__} does not take LoRA adapters (the LLaMA "
                                      "family does)")
        self.scheduler = Scheduler(sched_cfg, self.block_manager, frozenset(self.info.eos_token_ids),
                                   speculative=config.speculative,
                                   max_loras=config.lora.max_loras if config.lora is not None else None)
        spec = loaded.model.kv_cache_spec
        if config.enable_pdl and not _pdl_supported(config.device):
            raise InvalidRequestError("programmatic dependent launch (--enable-pdl) needs a CUDA GPU of compute "
                                      f"capability 9.0 (Hopper) or newer; device {config.device!r} is not one")
        if config.gemv_max_rows:  # before graph capture: graphs record the GEMV launches
            swap_gemv_linears(loaded.model, config.gemv_max_rows)
            if config.enable_pdl:
                launch_dependent(loaded.model, skip=getattr(loaded.model, "lm_head", None))
        backend = get_backend(config.device, config.attention_backend, pdl=config.enable_pdl)
        on_cuda = config.device.startswith("cuda")
        caches, graphs = caches_and_graphs(DecodeGraphs, loaded.model, spec, num_blocks, block_size, dtype, backend,
                                           config, self.max_model_len)
        self.runner = ModelRunner(loaded.model, caches, block_size, backend, config.device, config.seed, graphs,
                                  eos_token_ids=self.info.eos_token_ids,
                                  loras=self.loras)
        for module in config.lora.modules if config.lora is not None else ():
            self.add_lora(module.name, module.path)
        # a step run ahead of would need the previous step's accepted drafts before they are known
        self.run_ahead = config.run_ahead if config.run_ahead is not None else (
            graphs is not None and on_cuda and config.speculative is None)
        self._inflight: Launched | None = None  # a step run ahead of: launched, its tokens not yet read
        self.guides = Guides(loaded.tokenizer, self.info.vocab_size, self.info.eos_token_ids)
        self._requests: dict[str, _RequestState] = {}
        self._pending_outputs: list[RequestOutput] = []  # aborts, reported at the next step
        self._seq_ids = itertools.count()
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        loaded = load_model(config.model, getattr(torch, config.dtype), config.device, config.max_model_len,
                            pack_cpu_linears=not config.gemv_max_rows, served_name=config.served_name)
        return cls(loaded, config)

    # ---- LoRA adapters -------------------------------------------------------------
    @property
    def lora_names(self) -> list[str]:
        return self.loras.names if self.loras is not None else []

    def add_lora(self, name: str, path: str) -> None:
        """Load a PEFT adapter that requests may then name; refused (400) where it does not fit."""
        adapters = self._adapters()
        if name == self.info.name:
            raise InvalidRequestError(f"a LoRA adapter cannot take the base model's name {name!r}", "lora_name")
        adapters.add(name, path)

    def remove_lora(self, name: str) -> None:
        """Unload an adapter; refused while a request still runs or waits on it."""
        adapters = self._adapters()
        lora_id = adapters.id_of(name)
        users = sum(any(s.lora_id == lora_id for s in state.seqs) for state in self._requests.values())
        if users:
            raise InvalidRequestError(f"LoRA adapter {name!r} is in use by {users} request(s); unload it once "
                                      "they finish", "lora_name")
        adapters.remove(name)

    def _adapters(self) -> LoRAAdapters:
        if self.loras is None:
            raise InvalidRequestError(f"{self.info.name} was started without LoRA support (--enable-lora)")
        return self.loras

    # ---- admission ------------------------------------------------------------------
    def validate(self, payload: GenerationRequest) -> None:
        if payload.priority != 0 and self.scheduler.config.policy != "priority":
            raise InvalidRequestError(f"priority {payload.priority} needs a server started with --scheduling-policy "
                                      "priority", param="priority")
        if payload.lora_name is not None:
            if self.loras is None:
                raise ModelNotFoundError(f"The model `{payload.lora_name}` does not exist: {self.info.name} "
                                         "serves no LoRA adapters", "model")
            self.loras.id_of(payload.lora_name)
        num_prompt = len(payload.prompt_token_ids)
        if num_prompt == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        vocab = self.info.vocab_size
        if min(payload.prompt_token_ids) < 0 or max(payload.prompt_token_ids) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if any(token >= vocab for token, _ in payload.params.logit_bias):
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab})", param="logit_bias")
        if any(max(ids) >= vocab for ids in payload.params.bad_words_token_ids):
            raise InvalidRequestError(f"bad_words_token_ids must be in [0, {vocab})", param="bad_words_token_ids")
        limit = self.max_model_len
        max_tokens = payload.params.max_tokens
        if num_prompt >= limit:
            raise PromptTooLongError(
                f"This model's maximum context length is {limit} tokens. However, your prompt has "
                f"{num_prompt} tokens, which leaves no room for output tokens.",
                param="prompt",
            )
        if max_tokens is not None and num_prompt + max_tokens > limit:
            raise PromptTooLongError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} for the "
                "completion). Please reduce the prompt or max_tokens.",
                param="max_tokens",
            )

    def add_request(self, request_id: str, payload: GenerationRequest) -> None:
        self.validate(payload)
        if request_id in self._requests:
            raise InvalidRequestError(f"duplicate request id {request_id!r}")
        params = payload.params
        if params.bad_words:  # vLLM's: the words' tokens as this model's tokenizer makes them
            words = bad_words_token_ids(params.bad_words, lambda text: self.tokenizer.encode(text, False))
            params = replace(params, bad_words_token_ids=params.bad_words_token_ids + words)
        prompt = list(payload.prompt_token_ids)
        room = self.max_model_len - len(prompt)
        max_tokens = min(params.max_tokens or room, room)
        lora_id = self.loras.id_of(payload.lora_name) if self.loras is not None and payload.lora_name else 0
        now = time.monotonic()
        seqs = [
            Sequence(
                seq_id=next(self._seq_ids),
                request_id=request_id,
                token_ids=list(prompt),
                num_prompt_tokens=len(prompt),
                params=params,
                max_tokens=max_tokens,
                sample_index=i,
                arrival_time=now,
                lora_id=lora_id,
                priority=payload.priority,
            )
            for i in range(params.n)
        ]
        if params.structured is not None:  # before any state: a grammar the vocabulary refuses is a 400
            self.guides.start([s.seq_id for s in seqs], params.structured)
        state = _RequestState(
            request_id=request_id,
            prompt_token_ids=prompt,
            seqs=seqs,
            detokenizers=[
                IncrementalDetokenizer(params.stop, params.include_stop_str_in_output, params.skip_special_tokens)
                for _ in seqs
            ],
            logprobs=[[] for _ in seqs] if params.logprobs is not None else None,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            arrival_time=now,
            sent_tokens=[0] * len(seqs),
        )
        self._requests[request_id] = state
        for seq in seqs:
            self.scheduler.add(seq)
        self.num_prompt_tokens += len(prompt) * len(seqs)

    def abort_request(self, request_id: str) -> None:
        """Free the request's blocks now; its final output (finish_reason "abort") comes next step."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return
        for seq in state.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
            self.runner.release(seq)
        self.guides.release([s.seq_id for s in state.seqs])
        self._pending_outputs.append(self._output(state, finished=True))

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._pending_outputs) or self._inflight is not None

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- the step ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, launch, then land the step before this one while this one computes.

        Running ahead (on by default with CUDA graphs), a step's tokens stay on the device and
        the next step is scheduled and launched before the host reads them, so the host's
        bookkeeping overlaps the GPU instead of idling it. Without it a step lands at once."""
        sched = self.scheduler.schedule()
        launched = None
        if not sched.is_empty:
            try:
                allowed = self.guides.bitmask(
                    [seq.seq_id if samples else None for seq, samples in zip(sched.seqs, sched.sampling)]
                ) if len(self.guides) else None
                launched = self.runner.launch(sched, self._inflight, defer=self.run_ahead, allowed=allowed)
            except Exception:
                self.block_manager.reset_prefix_cache()  # it named blocks this step never wrote
                raise
            self.scheduler.advance(sched)
        landed, self._inflight = self._inflight, None
        outputs, self._pending_outputs = self._pending_outputs, []  # aborts since the last step
        if landed is not None:
            outputs += self._land(landed)
        if launched is not None and launched.deferred:
            self._inflight = launched
        elif launched is not None:
            outputs += self._land(launched)
        return outputs

    def _land(self, launched: Launched) -> list[RequestOutput]:
        sched = launched.sched
        landed = launched.result()
        # a sequence stopped by the step before (or aborted) drops the token it sampled since
        sampled = [None if seq.is_finished else t for seq, t in zip(sched.seqs, landed.sampled)]
        before = [seq.num_tokens for seq in sched.seqs]
        self.scheduler.land(sched, sampled, landed.accepted)
        self._keep_prompt_logprobs(launched)
        # the tokens each row appended: its accepted drafts and its sample, up to a stop token
        appended = [seq.token_ids[n:] for seq, n in zip(sched.seqs, before)]
        return self._process(sched, appended, landed.logprobs)

    def _keep_prompt_logprobs(self, launched: Launched) -> None:
        """Append the step's scored prompt positions to their requests. A sequence preempted and
        recomputed scores its prompt again; the scores already kept stay."""
        for i, (first, entries) in launched.prompt_logprobs.items():
            state = self._requests.get(launched.sched.seqs[i].request_id)
            if state is None or state.prompt_logprobs is None:
                continue
            have = len(state.prompt_logprobs)
            if first <= have:
                state.prompt_logprobs += entries[have - first :]

    def _process(
        self,
        sched: SchedulerOutput,
        appended: list[list[int]],
        logprobs: list[list[TokenLogprob | None]],
    ) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        now = time.monotonic()
        touched: dict[str, _RequestState] = {}
        for seq, tokens, lps in zip(sched.seqs, appended, logprobs):
            state = self._requests.get(seq.request_id)
            if state is None:
                continue
            if state.first_scheduled_time is None:
                state.first_scheduled_time = now
            if not tokens:
                continue
            if state.first_token_time is None:
                state.first_token_time = now
            first_output = seq.num_output_tokens - len(tokens)
            for k, (token, lp) in enumerate(zip(tokens, lps)):
                self.num_generation_tokens += 1
                if state.logprobs is not None and lp is not None:
                    state.logprobs[seq.sample_index].append(lp)
                last = k == len(tokens) - 1
                if last and seq.finish_reason == "stop" and not seq.params.include_stop_str_in_output:
                    break  # the EOS or stop id that finished it: its text is not output (vLLM's rule)
                # before min_tokens no stop string ends it (EOS and stop ids were never allowed)
                stop = state.detokenizers[seq.sample_index].add(
                    self.tokenizer, token, check_stop=first_output + k + 1 >= seq.params.min_tokens)
                # a stop string met before the row's last token ends it there, even where a stop
                # token further on had finished it; at the last token the scheduler's reason stands
                if stop is not None and (not seq.is_finished or not last):
                    seq.stop_reason = stop
                    self.scheduler.finish(seq, "stop")
                    if not last:  # the tokens after it were never output
                        del seq.token_ids[seq.num_tokens - len(tokens) + k + 1 :]
                        break
                if seq.seq_id in self.guides and self.guides.advance(seq.seq_id, token) and not seq.is_finished:
                    self.scheduler.finish(seq, "stop")  # the grammar is complete: only EOS could follow
            touched[seq.request_id] = state
        for state in touched.values():
            done = all(s.is_finished for s in state.seqs)
            if not done and state.prompt_logprobs is not None and len(state.prompt_logprobs) < len(state.prompt_token_ids):
                # Another sample ahead of the one scoring the prompt: report both once it is scored.
                # FIFO admission never lets one get ahead today; this keeps a change from leaking
                # a partly scored prompt (tests/test_engine_randomized.py checks none is seen).
                continue
            outputs.append(self._output(state, finished=done))
            if done:
                del self._requests[state.request_id]
                for seq in state.seqs:
                    self.runner.release(seq)
                self.guides.release([s.seq_id for s in state.seqs])
        return outputs

    def _output(self, state: _RequestState, finished: bool) -> RequestOutput:
        samples = []
        for i, (seq, detok) in enumerate(zip(state.seqs, state.detokenizers)):
            token_ids = seq.output_token_ids
            samples.append(
                CompletionOutput(
                    index=i,
                    text=detok.text,
                    token_ids=token_ids,
                    logprobs=list(state.logprobs[i]) if state.logprobs is not None else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    new_text=detok.delta(seq.is_finished),
                    num_new_tokens=len(token_ids) - state.sent_tokens[i],
                )
            )
            state.sent_tokens[i] = len(token_ids)
        return RequestOutput(
            request_id=state.request_id,
            prompt_token_ids=state.prompt_token_ids,
            outputs=samples,
            finished=finished,
            num_cached_tokens=state.seqs[0].num_cached_tokens,
            prompt_logprobs=list(state.prompt_logprobs) if state.prompt_logprobs is not None else None,
            arrival_time=state.arrival_time,
            first_scheduled_time=state.first_scheduled_time,
            first_token_time=state.first_token_time,
            finished_time=time.monotonic() if finished else None,
        )

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.block_manager.usage,
            num_preemptions=self.scheduler.num_preemptions,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            num_blocks_total=self.block_manager.num_blocks,
            num_prefix_queried_tokens=self.scheduler.num_prefix_queried_tokens,
            num_prefix_hit_tokens=self.scheduler.num_prefix_hit_tokens,
            num_draft_tokens=self.scheduler.num_draft_tokens,
            num_accepted_tokens=self.scheduler.num_accepted_tokens,
            running_loras=self._lora_names_of(self.scheduler.running),
            waiting_loras=self._lora_names_of(self.scheduler.waiting),
            max_loras=self.config.lora.max_loras if self.config.lora is not None else 0,
        )

    def _lora_names_of(self, seqs: Iterable[Sequence]) -> tuple[str, ...]:
        if self.loras is None:
            return ()
        ids = {s.lora_id for s in seqs if s.lora_id}
        return tuple(sorted(a.name for i, a in self.loras.by_id.items() if i in ids))
