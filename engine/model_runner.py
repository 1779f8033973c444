"""Executes a scheduled step: flat inputs, one forward over every sequence, sampling.

Owns the KV cache tensors (one (k, v) pair per layer, laid out in blocks) and the sampler.
Performance tricks (CUDA graphs, pinned copies) belong here and in the attention backends.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from engine import cuda_graphs
from engine.attention.base import AttentionBackend
from engine.bad_words import banned_by_bad_words
from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs
from engine.forward_context import ForwardContext
from engine.guided import apply_bitmask
from engine.host_copy import to_device
from engine.input_prep import prepare_inputs
from engine.lora_adapters import LoRAAdapters
from engine.lora_batch import LoRABatch
from engine.outputs import TokenLogprob
from engine.prompt_logprobs import PromptRows, prompt_rows, score
from engine.sampler import Sampler, SamplingRow
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence
from engine.speculative import num_accepted
from engine.workspace import Workspace
from models.spec import KVCacheSpec

PROMPT_LOGITS_ROWS = 256  # prompt rows scored per vocabulary projection (echo + logprobs)

Graphs = TypeVar("Graphs", bound=DecodeGraphs)


def kv_block_bytes(spec: KVCacheSpec, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * elem


def allocate_kv_caches(
    spec: KVCacheSpec, num_blocks: int, block_size: int, dtype: torch.dtype, device: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(spec.num_layers)
    ]


def caches_and_graphs(
    graphs_cls: type[Graphs], model: nn.Module, spec: KVCacheSpec, num_blocks: int, block_size: int,
    dtype: torch.dtype, backend: AttentionBackend, config: EngineConfig, max_model_len: int,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], Graphs | None]:
    """The KV caches of a pool of `num_blocks` blocks and, where the config wants graphs
    (cuda_graphs.wanted), `graphs_cls` over them: their padding rows write into one extra block
    past the pool, which the block manager never hands out. Captured on CUDA only."""
    use_graphs = cuda_graphs.wanted(config.decode_graphs, config.device, backend, getattr(model, "capturable", True))
    caches = allocate_kv_caches(spec, num_blocks + int(use_graphs), block_size, dtype, config.device)
    if not use_graphs:
        return caches, None
    graphs = graphs_cls(
        model, caches, backend, block_size, max_batch=min(config.scheduler.max_num_seqs, config.max_graph_batch),
        max_model_len=max_model_len, scratch_block=num_blocks, device=config.device,
        capture=config.device.startswith("cuda"),
    )
    return caches, graphs


def copy_blocks(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], copies: list[tuple[int, int]],
                device: str) -> None:
    """Apply the block manager's copy-on-write (src, dst) decisions to every layer's cache,
    before the step writes anything."""
    if not copies:
        return
    src = to_device([s for s, _ in copies], device)
    dst = to_device([d for _, d in copies], device)
    for k_cache, v_cache in kv_caches:
        k_cache[dst] = k_cache[src]
        v_cache[dst] = v_cache[src]


class ModelRunner:
    """Runs a decoder-only model over a SchedulerOutput and returns one token per sampling row."""

    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        backend: AttentionBackend,
        device: str,
        seed: int = 0,
        graphs: DecodeGraphs | None = None,
        eos_token_ids: tuple[int, ...] = (),
        loras: LoRAAdapters | None = None,
    ) -> None:
        """`loras`: the engine's loaded adapters, shared (it adds and removes them)."""
        self.model = model
        self.loras = loras
        self.eos_token_ids = tuple(eos_token_ids)  # held back, with stop ids, before min_tokens
        self.graphs = graphs  # decode steps of at most graphs.max_batch sequences replay these
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.backend = backend
        self.device = device
        self.sampler = Sampler(torch.Generator(device=device).manual_seed(seed))
        self._generators: dict[int, torch.Generator] = {}  # seq_id -> its seeded generator
        self._logits = Workspace()  # each step's logits (CPU), consumed within the step

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        copy_blocks(self.kv_caches, copies, self.device)

    def generator_for(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None or seq.params.is_greedy:
            return None
        gen = self._generators.get(seq.seq_id)
        if gen is None:
            # sample i of an n>1 request gets its own stream, still fixed by the seed
            gen = torch.Generator(device=self.device).manual_seed(seq.params.seed + seq.sample_index)
            self._generators[seq.seq_id] = gen
        return gen

    def release(self, seq: Sequence) -> None:
        self._generators.pop(seq.seq_id, None)

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, prev: Launched | None = None, defer: bool = False,
               allowed: torch.Tensor | None = None) -> Launched:
        """Queue the step's forward and sampling. Inputs still in flight (a decode fed the token
        `prev` sampled) are taken from `prev`'s device tokens. With `defer`, the tokens stay on
        the device until `Launched.result()`, unless a row needs them on the host first
        (logprobs, penalties over its own outputs next step, or a grammar). `allowed`: a bitmask
        row per scheduled sequence (engine/guided.py) for steps with constrained rows."""
        self.copy_blocks(out.block_copies)
        seqs = out.seqs
        drafts = out.drafts
        carried = self._carried(seqs, prev)
        # one row per token sampled: a row with drafts samples after its last token and each draft
        rows = [i for i, samples in enumerate(out.sampling) if samples for _ in range(1 + len(drafts[i]))]
        scored = prompt_rows(seqs, out.num_new_tokens)
        lora_ids = [s.lora_id for s in seqs]
        # graphs hold no LoRA deltas: a step with adapter rows runs eagerly
        graphable = self.graphs is not None and len(seqs) <= self.graphs.max_batch and not scored and not any(lora_ids)
        if graphable and all(n == 1 for n in out.num_new_tokens):
            hidden = self.graphs.run(
                [s.token_ids[s.num_computed_tokens] if s.num_computed_tokens < s.num_tokens else 0 for s in seqs],
                [s.num_computed_tokens for s in seqs],
                [s.block_table for s in seqs],
                carried,
            )
            if len(rows) < len(seqs):  # a one-token prefill chunk that does not end its prompt
                hidden = hidden[to_device(rows, self.device)]
        else:
            chunks = [
                (s.token_ids[s.num_computed_tokens : s.num_computed_tokens + n] + d) or [0]  # [0]: in flight
                for s, n, d in zip(seqs, out.num_new_tokens, drafts)
            ]
            inputs = prepare_inputs(
                token_chunks=chunks,
                starts=[s.num_computed_tokens for s in seqs],
                block_tables=[s.block_table for s in seqs],
                samples=[(1 + len(d)) * samples for samples, d in zip(out.sampling, drafts)],
                block_size=self.block_size,
                device=self.device,
            )
            if carried is not None:  # an in-flight input is a whole one-token chunk
                at, in_flight = carried
                firsts = inputs.meta.cu_seqlens_q[:-1].long()
                inputs.input_ids.index_copy_(0, firsts[: len(in_flight)] if at is None else firsts[at], in_flight)
            lora = LoRABatch.build(self.loras.stack, lora_ids, [len(c) for c in chunks], self.device) \
                if any(lora_ids) else None
            ctx = ForwardContext(meta=inputs.meta, backend=self.backend, kv_caches=self.kv_caches, lora=lora)
            flat = self.model(inputs.input_ids, inputs.positions, ctx)
            hidden = flat[inputs.sample_rows]
        tokens, logprobs = self._sample(hidden, seqs, rows, drafts, allowed)
        host_first = not all(seqs[i].params.is_plain for i in rows) or any(drafts)
        launched = Launched(out, tokens, rows, logprobs, deferred=defer and not host_first)
        if scored:
            launched.prompt_logprobs = self._score_prompts(flat, seqs, scored)
        return launched

    def _score_prompts(self, flat: torch.Tensor, seqs: list[Sequence],
                       scored: list[PromptRows]) -> dict[int, tuple[int, list[TokenLogprob]]]:
        """seq index -> (prompt position of the first scored token, its and the next ones' logprobs).
        The vocabulary logits are made a few hundred rows at a time: a whole 2k-token chunk's
        would be hundreds of MB."""
        found = {}
        for part in scored:
            seq = seqs[part.seq_index]
            entries: list[TokenLogprob] = []
            for lo in range(0, len(part.rows), PROMPT_LOGITS_ROWS):
                rows = part.rows[lo : lo + PROMPT_LOGITS_ROWS]
                logits = self.model.compute_logits(flat[rows.start : rows.stop])
                first = part.first_target + lo
                entries += score(logits, seq.token_ids[first : first + len(rows)], seq.params.prompt_logprobs or 0)
            found[part.seq_index] = (part.first_target, entries)
        return found

    def _carried(self, seqs: list[Sequence], prev: Launched | None) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """(rows of this step, their input tokens) for inputs sampled by `prev` and not yet on
        the host; rows None means rows 0..k-1. None when every input is on the host."""
        rows = [i for i, s in enumerate(seqs) if s.num_computed_tokens >= s.num_tokens]
        if not rows:
            return None
        assert prev is not None, "an input token in flight without the step that samples it"
        index = prev.index_of()
        src = [index[seqs[i].seq_id] for i in rows]
        if src == list(range(len(src))):
            tokens = prev.tokens[: len(src)]  # the same sequences in the same order: no gather
        else:
            tokens = prev.tokens[to_device(src, self.device)]
        if rows == list(range(len(rows))):
            return None, tokens
        return to_device(rows, self.device), tokens

    def _sample(
        self, hidden: torch.Tensor, seqs: list[Sequence], rows: list[int], drafts: list[list[int]],
        allowed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[TokenLogprob | None]]:
        """One token per sampling row (`rows`: their sequences' indices, a sequence's k-th row
        after its k-th draft; `hidden` holds their states in that order) as a device tensor, and
        logprobs per row for the sequences that asked (of the distribution a grammar leaves, as
        the token is drawn from it). A row after drafts sees them as its sequence's latest
        output: in its penalties and in how many tokens min_tokens still holds EOS back."""
        logprobs: list[TokenLogprob | None] = [None] * len(rows)
        offsets = [0] * len(rows)
        for j in range(1, len(rows)):
            offsets[j] = offsets[j - 1] + 1 if rows[j] == rows[j - 1] else 0
        if not rows:
            return torch.empty(0, dtype=torch.int64, device=self.device), logprobs
        screen = getattr(self.model, "greedy_screen", None)  # bf16-screened argmax (engine/greedy_screen.py)
        on_screen = [screen is not None and seqs[i].params.is_plain_greedy for i in rows]
        plain = [j for j, flag in enumerate(on_screen) if flag]
        rest = [j for j, flag in enumerate(on_screen) if not flag]
        if plain:
            screened = screen.argmax(hidden if not rest else hidden[plain], [[]] * len(plain))
            if not rest:
                return screened, logprobs
        logits = self.model.compute_logits(hidden[rest] if plain else hidden, self._logits)
        if allowed is not None:  # constrained rows are never plain: all of them are in `rest`
            apply_bitmask(logits, allowed[[rows[j] for j in rest]])
        sampling_rows = [
            SamplingRow(
                params=seqs[i].params,
                prompt_ids=seqs[i].token_ids[: seqs[i].num_prompt_tokens] if seqs[i].params.needs_penalties else [],
                output_ids=seqs[i].output_token_ids + drafts[i][:k] if seqs[i].params.needs_penalties else [],
                generator=self.generator_for(seqs[i]),
                banned=self._banned(seqs[i], drafts[i][:k]),
                forced=seqs[i].params.thinking_budget.forced_token(seqs[i].output_token_ids + drafts[i][:k])
                if seqs[i].params.thinking_budget is not None else None,
            )
            for i, k in ((rows[j], offsets[j]) for j in rest)
        ]
        sampled, token_logprobs = self.sampler.sample(logits, sampling_rows)
        for j, lp in zip(rest, token_logprobs):
            logprobs[j] = lp
        if not plain:
            return sampled, logprobs
        tokens = torch.empty(len(rows), dtype=torch.int64, device=sampled.device)
        tokens[plain] = screened.to(tokens.device, torch.int64)
        tokens[rest] = sampled
        return tokens, logprobs

    def _banned(self, seq: Sequence, drafts: list[int]) -> tuple[int, ...]:
        """The bad words' last tokens where the output so far (the drafts before the row included)
        ends with the rest of them, then EOS and stop ids while the token sampled now would come
        before min_tokens. Tokens still in flight count: it samples output token
        num_output_tokens + num_inflight + len(drafts). (A row with multi-token bad words is not
        plain, so its step lands before the next: none of its tokens are in flight.)"""
        params = seq.params
        bad = tuple(banned_by_bad_words(params.bad_words_token_ids, seq.output_token_ids + drafts)) \
            if params.bad_words_token_ids else ()
        if seq.num_output_tokens + seq.num_inflight + len(drafts) >= params.min_tokens:
            return bad
        return bad + params.stop_token_ids + (() if params.ignore_eos else self.eos_token_ids)


class Launched:
    """A launched step: its schedule, and its sampled tokens on the device (row order of
    `rows`, the schedule's sampling rows, one per token sampled) until `result()` brings them
    to the host."""

    def __init__(self, sched: SchedulerOutput, tokens: torch.Tensor, rows: list[int],
                 logprobs: list[TokenLogprob | None], deferred: bool) -> None:
        self.sched = sched
        self.tokens = tokens
        self.rows = rows
        self.logprobs = logprobs
        self.deferred = deferred
        # seq index -> (first prompt position scored, logprobs): rows scoring their prompt (echo)
        self.prompt_logprobs: dict[int, tuple[int, list[TokenLogprob]]] = {}
        self._host: torch.Tensor | None = None
        self._event: torch.cuda.Event | None = None
        if deferred and tokens.is_cuda:
            # the copy is queued behind the step; the host waits on the event only when it lands
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def index_of(self) -> dict[int, int]:
        """seq_id -> index of its token in `tokens` (a step run ahead of has no drafts: one each)."""
        return {self.sched.seqs[i].seq_id: j for j, i in enumerate(self.rows)}

    def result(self) -> Landed:
        """Per scheduled row: its drafts accepted, its token (None: did not sample) and the
        logprobs of both."""
        if self._event is not None:
            self._event.synchronize()
        values = (self._host if self._host is not None else self.tokens).tolist()
        num = len(self.sched.seqs)
        samples: list[list[int]] = [[] for _ in range(num)]
        row_logprobs: list[list[TokenLogprob | None]] = [[] for _ in range(num)]
        for j, i in enumerate(self.rows):
            samples[i].append(values[j])
            row_logprobs[i].append(self.logprobs[j])
        landed = Landed([None] * num, [[] for _ in range(num)], [[] for _ in range(num)])
        for i, drawn in enumerate(samples):
            if not drawn:
                continue
            drafts = self.sched.drafts[i]
            kept = num_accepted(drafts, drawn)
            landed.sampled[i] = drawn[kept]
            landed.accepted[i] = drafts[:kept]
            landed.logprobs[i] = row_logprobs[i][: kept + 1]
        return landed


@dataclass
class Landed:
    """A step's tokens on the host, per scheduled row: the drafts it accepted, then its sampled
    token (None: the row did not sample), and one logprob entry (or None) for each of them."""

    sampled: list[int | None]
    accepted: list[list[int]]
    logprobs: list[list[TokenLogprob | None]]
