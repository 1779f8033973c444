"""The translation engine: encoder-decoder models (Marian, T5) on the paged engine.

Each request runs its encoder once (batched with other newly admitted requests by token budget,
flat and unpadded); its cross-attention K/V go into blocks it holds until it finishes. Decoder
self-attention K/V are paged like a decoder-only model's. Every step decodes one token for every
running request (greedy, sampled, or every beam of a beam search) in one forward. Beams share
prefix blocks by ref count; a beam that writes into a shared block copies it first.
Preemption is by recompute (see engine/translation_scheduler.py). Implements StepEngine.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import torch

from engine.attention import get_backend
from engine.beam_search import BeamSearch, BeamStep, Constraints, DecoderRows, beam_steps
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.encdec_graphs import EncDecGraphs
from engine.encdec_runner import EncDecRunner
from engine.engine import resolve_num_blocks
from engine.errors import InvalidRequestError, PromptTooLongError
from engine.model_runner import caches_and_graphs
from engine.outputs import CompletionOutput
from engine.request import EngineStats
from engine.sampler import Sampler, SamplingRow
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.translation_request import TranslationOutput, TranslationRequest
from engine.translation_scheduler import TranslationGroup, TranslationScheduler, group_max_blocks
from models.loader import LoadedModel, load_model


@dataclass
class _RequestState:
    group: TranslationGroup
    params: SamplingParams
    beam: BeamSearch | None
    generator: torch.Generator | None
    arrival_time: float
    stream: bool  # an output every step (with its text), not only the final one
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_ids: list[int] | None = None  # the result, once finished (beam: the best hypothesis)
    text: str = ""
    sent_text: str = ""  # prefix of `text` already streamed
    sent_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | None = None

    @property
    def seq(self) -> Sequence:
        return self.group.beams[0]


def _generation_params(defaults: dict) -> dict[str, Any]:
    """generation_config.json -> SamplingParams fields (greedy unless it says do_sample)."""
    out: dict[str, Any] = {"temperature": 0.0, "max_tokens": None}
    if defaults.get("do_sample"):
        out["temperature"] = defaults.get("temperature", 1.0)
        for key in ("top_k", "top_p"):
            if defaults.get(key) is not None:
                out[key] = defaults[key]
    if defaults.get("max_new_tokens"):
        out["max_tokens"] = defaults["max_new_tokens"]
    elif defaults.get("max_length"):
        out["max_tokens"] = max(1, defaults["max_length"] - 1)  # HF's max_length counts the start token
    # HF applies both minimums; min_length counts the start token as max_length does
    minimum = max((defaults.get("min_length") or 0) - 1, defaults.get("min_new_tokens") or 0, 0)
    if minimum:
        out["min_tokens"] = minimum
    for key in ("num_beams", "length_penalty", "no_repeat_ngram_size", "repetition_penalty"):
        if defaults.get(key) is not None:
            out[key] = defaults[key]
    if isinstance(defaults.get("early_stopping"), bool):  # "never" is not supported: keep False
        out["early_stopping"] = defaults["early_stopping"]
    return out


def _task_params(defaults: dict, task: dict) -> dict[str, Any]:
    """SamplingParams fields of a task (config.json's task_specific_params entry) laid over the
    generation defaults, as HF's pipelines do; its `prefix` is the server's business."""
    merged = defaults | {k: v for k, v in task.items() if k != "prefix"}
    if "max_length" in task:
        merged.pop("max_new_tokens", None)  # the task's own length wins
    return _generation_params(merged)


def _constraints(defaults: dict, eos_token_ids: tuple[int, ...]) -> Constraints:
    bad = [tuple(w) for w in defaults.get("bad_words_ids") or [] if isinstance(w, list) and w]
    return Constraints(
        banned_ids=tuple(w[0] for w in bad if len(w) == 1),
        bad_sequences=tuple(w for w in bad if len(w) > 1),
        forced_eos_token_id=defaults.get("forced_eos_token_id"),
        eos_token_ids=eos_token_ids,
    )


class TranslationEngine:
    """Encoder-decoder translation over a paged KV cache with continuous batching and beams."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.config = config
        self.info = loaded.info
        self.tokenizer = loaded.tokenizer
        dtype = getattr(torch, config.dtype)
        self.block_size = config.cache.block_size
        self.num_blocks = resolve_num_blocks(loaded, config, dtype)
        self.max_model_len = min(loaded.info.max_model_len, config.max_model_len or 10**9)
        self.block_manager = BlockManager(self.num_blocks, self.block_size)
        self.scheduler = TranslationScheduler(
            self.block_manager, config.scheduler.max_num_batched_tokens, config.scheduler.max_num_seqs
        )
        backend = get_backend(config.device, config.attention_backend)
        caches, graphs = caches_and_graphs(EncDecGraphs, loaded.model, loaded.model.kv_cache_spec, self.num_blocks,
                                           self.block_size, dtype, backend, config, self.max_model_len)
        self.runner = EncDecRunner(loaded.model, caches, self.block_size, backend, config.device, graphs)
        self.sampler = Sampler(torch.Generator(device=config.device).manual_seed(config.seed))
        defaults = loaded.info.generation_defaults or {}
        self.generation_params = _generation_params(defaults)
        self.task_params = {task: _task_params(defaults, p) for task, p in loaded.info.task_defaults.items()}
        self.decoder_start_token_id = loaded.info.decoder_start_token_id
        if self.decoder_start_token_id is None:
            self.decoder_start_token_id = loaded.info.pad_token_id or 0
        self.eos_token_ids = tuple(loaded.info.eos_token_ids)
        self.constraints = _constraints(defaults, self.eos_token_ids)
        # BART's <s>: forced as the first output token when a request forces nothing else
        forced_bos = defaults.get("forced_bos_token_id")
        self.forced_bos: tuple[int, ...] = () if forced_bos is None else (int(forced_bos),)
        self._requests: dict[str, _RequestState] = {}
        self._pending_outputs: list[TranslationOutput] = []  # aborts, reported at the next step
        self._seq_ids = itertools.count()
        self._offline_ids = itertools.count()
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> TranslationEngine:
        loaded = load_model(config.model, getattr(torch, config.dtype), config.device, config.max_model_len,
                            served_name=config.served_name)
        return cls(loaded, config)

    def default_params(self, task: str | None = None, **overrides: Any) -> SamplingParams:
        """The model's generation_config.json defaults (with `task`'s settings laid over them
        where config.json has some, e.g. "summarization"), then `overrides` (None values ignored).
        Asking for sampling (temperature > 0) without num_beams turns the default beams off, and a
        max_tokens under the default minimum lowers the minimum to it (as HF's forced eos would)."""
        fields = dict(self.task_params.get(task or "", self.generation_params))
        given = {k: v for k, v in overrides.items() if v is not None}
        if given.get("temperature", 0.0) > 0.0 and "num_beams" not in given:
            fields["num_beams"] = 1
        if "max_tokens" in given and "min_tokens" not in given and "min_tokens" in fields:
            fields["min_tokens"] = min(fields["min_tokens"], given["max_tokens"])
        return SamplingParams(**(fields | given))

    # ---- admission ------------------------------------------------------------------
    def validate(self, payload: TranslationRequest) -> None:
        self._resolve_max_tokens(payload)

    def _resolve_max_tokens(self, payload: TranslationRequest) -> int:
        """Check the request; the decoder length it may reach. An unset max_tokens becomes the most
        that fits the context and the block pool; an explicit one that does not fit is an error."""
        src, params = payload.source_token_ids, payload.params
        if not src:
            raise InvalidRequestError("the input is empty", param="input")
        vocab = self.info.vocab_size
        if min(src) < 0 or max(src) >= vocab:
            raise InvalidRequestError(f"input token ids must be in [0, {vocab})", param="input")
        limit = self.max_model_len
        if len(src) > limit:
            raise PromptTooLongError(
                f"This model's maximum input length is {limit} tokens. However, your input has {len(src)} tokens.",
                param="input",
            )
        if params.n != 1:
            raise InvalidRequestError("n must be 1 for translations (use num_beams)", param="n")
        if params.logprobs is not None:
            raise InvalidRequestError("logprobs are not supported for translations", param="logprobs")
        if params.stop:
            raise InvalidRequestError("stop strings are not supported for translations", param="stop")
        if params.logit_bias:
            raise InvalidRequestError("logit_bias is not supported for translations", param="logit_bias")
        if params.structured is not None:
            raise InvalidRequestError("structured outputs are not supported for translations", param="structured_outputs")
        if params.num_beams > 1:
            if not params.is_greedy:
                raise InvalidRequestError("beam search is deterministic: use temperature 0 with num_beams > 1",
                                          param="num_beams")
            if params.needs_penalties:
                raise InvalidRequestError("penalties are not supported with beam search", param="num_beams")
        beams = params.num_beams
        fits = self._max_fitting_tokens(len(src), beams)
        forced = len(self._forced(payload))
        if params.max_tokens is not None and params.max_tokens <= forced:
            raise InvalidRequestError(f"max_tokens must exceed the {forced} token(s) forced at the start of the output",
                                      param="max_tokens")
        if params.max_tokens is None:
            if fits < 1:
                raise PromptTooLongError(f"input of {len(src)} tokens with num_beams={beams} does not fit the "
                                         f"KV cache ({self.num_blocks} blocks of {self.block_size})", param="input")
            return fits
        if params.max_tokens > limit:
            raise PromptTooLongError(f"max_tokens is {params.max_tokens}; this model's limit is {limit}",
                                     param="max_tokens")
        if params.max_tokens > fits:
            raise PromptTooLongError(
                f"input of {len(src)} tokens with num_beams={beams} and max_tokens={params.max_tokens} needs more "
                f"than the KV cache's {self.num_blocks} blocks of {self.block_size}; at most {fits} tokens fit",
                param="max_tokens",
            )
        return params.max_tokens

    def _forced(self, payload: TranslationRequest) -> tuple[int, ...]:
        return self.forced_bos if payload.forced_prefix is None else payload.forced_prefix

    def _max_fitting_tokens(self, source_len: int, num_beams: int) -> int:
        """Longest output whose worst-case footprint (group_max_blocks with a decoder of
        max_tokens + 1 tokens) fits the pool, capped by the context."""
        bs = self.block_size
        blocks_per_beam = (self.num_blocks - group_max_blocks(source_len, 0, 0, bs)) // num_beams - 1
        fits = min(self.max_model_len, bs * blocks_per_beam - 1)
        assert fits < 1 or group_max_blocks(source_len, fits + 1, num_beams, bs) <= self.num_blocks
        return fits

    def add_request(self, request_id: str, payload: TranslationRequest) -> None:
        max_tokens = self._resolve_max_tokens(payload)
        if request_id in self._requests:
            raise InvalidRequestError(f"duplicate request id {request_id!r}")
        params = payload.params
        src = list(payload.source_token_ids)
        now = time.monotonic()
        cross = Sequence(next(self._seq_ids), request_id, src, len(src), params, max_tokens=0, arrival_time=now)
        forced = self._forced(payload)
        first = Sequence(next(self._seq_ids), request_id, [self.decoder_start_token_id, *forced], 1,
                         params, max_tokens=max_tokens, arrival_time=now)
        group = TranslationGroup(request_id, cross, [first], num_beams=params.num_beams)
        beam = None
        if params.num_beams > 1:
            beam = BeamSearch(params.num_beams, self.eos_token_ids, max_tokens, params.length_penalty,
                              params.early_stopping)
            beam.num_generated = len(forced)  # already the first beam's output
        generator = None
        if params.seed is not None and not params.is_greedy:
            generator = torch.Generator(device=self.config.device).manual_seed(params.seed)
        self._requests[request_id] = _RequestState(group, params, beam, generator, now, payload.stream)
        self.scheduler.add(group)
        self.num_prompt_tokens += len(src)

    def abort_request(self, request_id: str) -> None:
        """Free the request's blocks now; its final output (finish_reason "abort") comes next step."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return
        self.scheduler.finish(state.group)
        state.finish_reason = "abort"
        if state.token_ids is None:
            state.token_ids = state.seq.output_token_ids if state.beam is None else []
        state.text = self._decode(state.token_ids)
        self._pending_outputs.append(self._output(state))

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._pending_outputs)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- the step ---------------------------------------------------------------------
    @torch.inference_mode()  # logits are inference tensors; the constraints edit them in place
    def step(self) -> list[TranslationOutput]:
        batch = self.scheduler.schedule()
        outputs, self._pending_outputs = self._pending_outputs, []
        if batch.is_empty:
            return outputs
        hidden = self.runner.execute(batch)
        now = time.monotonic()
        states = [self._requests[g.request_id] for g in batch.groups]
        for state in states:
            group = state.group
            group.cross.num_computed_tokens = group.source_len
            for b in group.beams:
                b.num_computed_tokens = b.num_tokens
            if state.first_scheduled_time is None:
                state.first_scheduled_time = now
            if state.first_token_time is None:
                state.first_token_time = now
        # rows of each group in `hidden`; one batched call per kind of decoding, not per request
        starts = list(itertools.accumulate((len(s.group.beams) for s in states), initial=0))
        kinds = [self._kind(s) for s in states]
        for kind, run in (("greedy", self._greedy), ("sample", self._sample), ("beam", self._beam)):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            if idx:
                rows = [r for i in idx for r in range(starts[i], starts[i + 1])]
                run([states[i] for i in idx], hidden if len(rows) == len(hidden) else hidden[rows])
        for state in states:
            if state.finish_reason is not None or (state.stream and state.beam is None):
                outputs.append(self._output(state))
            if state.finish_reason is not None:
                del self._requests[state.group.request_id]
        return outputs

    @staticmethod
    def _constraint_rows(rows: list[Sequence]) -> DecoderRows:
        return DecoderRows([s.token_ids for s in rows], [s.num_output_tokens for s in rows],
                           [s.max_tokens for s in rows], [s.params.min_tokens for s in rows],
                           [s.params.no_repeat_ngram_size for s in rows])

    @staticmethod
    def _kind(state: _RequestState) -> str:
        """beam: top-k of log-probs; greedy: an argmax (screened in bf16 where the model can);
        sample: the sampler, which takes whole rows of logits."""
        if state.beam is not None:
            return "beam"
        if state.params.is_greedy and state.params.is_plain:  # min_tokens is one of the argmax's bans
            return "greedy"
        return "sample"

    def _greedy(self, states: list[_RequestState], hidden: torch.Tensor) -> None:
        """Greedy requests without penalties: the argmax of `_sample`'s constrained logits (the
        same bans; forced eos overrides it as it does there)."""
        seqs = [s.seq for s in states]
        tokens = self.constraints.argmax(lambda bans: self.runner.greedy_tokens(hidden, bans),
                                         self._constraint_rows(seqs))
        self._append(states, seqs, tokens)

    def _beam(self, states: list[_RequestState], hidden: torch.Tensor) -> None:
        k = max(s.beam.num_candidates for s in states)  # type: ignore[union-attr]
        top_lp, top_ids = self.constraints.top_logprobs(
            self.runner.logits(hidden), k, self._constraint_rows([b for s in states for b in s.group.beams]))
        self._beam_steps(states, top_lp, top_ids)

    def _sample(self, states: list[_RequestState], hidden: torch.Tensor) -> None:
        """Sampled requests (and greedy ones with penalties or logprobs): one token each, from one
        batched sampler call."""
        seqs = [s.seq for s in states]
        logits = self.constraints.apply(self.runner.logits(hidden), self._constraint_rows(seqs))
        rows = [
            SamplingRow(
                params=s.params,
                prompt_ids=s.seq.token_ids[:1] if s.params.needs_penalties else [],
                output_ids=s.seq.output_token_ids if s.params.needs_penalties else [],
                generator=s.generator,
            )
            for s in states
        ]
        tokens, _ = self.sampler(logits, rows)
        self._append(states, seqs, tokens)

    def _append(self, states: list[_RequestState], seqs: list[Sequence], tokens: list[int]) -> None:
        """Each request's next token; finish those that stop or reach their limit."""
        self.num_generation_tokens += len(tokens)
        for state, seq, token in zip(states, seqs, tokens):
            seq.token_ids.append(token)
            params = state.params
            if token in params.stop_token_ids:
                state.finish_reason, state.stop_reason = "stop", token
            elif not params.ignore_eos and token in self.eos_token_ids:
                state.finish_reason = "stop"
            elif seq.num_output_tokens >= seq.max_tokens:
                state.finish_reason = "length"
            state.token_ids = seq.output_token_ids
            if state.stream or state.finish_reason is not None:  # a whole-text decode is not O(1)
                state.text = self._decode(state.token_ids)
            if state.finish_reason is not None:
                self.scheduler.finish(state.group)

    def _beam_steps(self, states: list[_RequestState], top_lp: torch.Tensor, top_ids: torch.Tensor) -> None:
        """Advance every beam search with its running beams' best constrained log-probs and their
        tokens (rows in `states` order), searches of one shape in one batched call; fork the
        chosen parents so continuations share their blocks."""
        shapes: dict[tuple[int, int], list[int]] = {}  # (num_beams, num_candidates) -> indices into states
        rows: list[tuple[torch.Tensor, torch.Tensor, list[Sequence]]] = []
        offset = 0
        for i, state in enumerate(states):
            assert state.beam is not None
            group = state.group
            n = len(group.beams)
            lp, ids = top_lp[offset : offset + n], top_ids[offset : offset + n]
            offset += n
            if n != group.num_beams:  # first step: one beam, the search sees num_beams copies
                beams = group.beams * group.num_beams
                lp, ids = lp.expand(len(beams), -1), ids.expand(len(beams), -1)
            else:
                beams = group.beams
            rows.append((lp, ids, beams))
            shapes.setdefault((group.num_beams, state.beam.num_candidates), []).append(i)
        for members in shapes.values():  # beam_steps keeps each row's first num_candidates
            lp = torch.stack([rows[i][0] for i in members])
            ids = torch.stack([rows[i][1] for i in members])
            searches = [states[i].beam for i in members]
            running = [[b.output_token_ids for b in rows[i][2]] for i in members]
            for i, step in zip(members, beam_steps(searches, lp, ids, running)):  # type: ignore[arg-type]
                self._advance(states[i], step, rows[i][2])

    def _advance(self, state: _RequestState, step: BeamStep, beams: list[Sequence]) -> None:
        """Apply one search step: finish the request, or replace its beams by forked children."""
        assert state.beam is not None
        group = state.group
        self.num_generation_tokens += len(group.beams)
        if step.done:
            state.token_ids = state.beam.best()
            ends_with_eos = bool(state.token_ids) and state.token_ids[-1] in self.eos_token_ids
            state.finish_reason = "stop" if ends_with_eos else "length"
            state.text = self._decode(state.token_ids)
            self.scheduler.finish(group)
            return
        children = []
        for parent_idx, token in zip(step.parents, step.tokens):
            parent = beams[parent_idx]
            child = Sequence(next(self._seq_ids), group.request_id, parent.token_ids + [token], 1, state.params,
                             max_tokens=parent.max_tokens, arrival_time=parent.arrival_time,
                             num_computed_tokens=parent.num_computed_tokens)
            self.block_manager.fork(parent, child)
            children.append(child)
        for old in group.beams:
            self.block_manager.free(old)
        group.beams = children

    def _decode(self, ids: list[int]) -> str:
        # T5 checkpoints pad the embedding past the tokenizer (t5-small: 32128 rows, 32100 pieces);
        # a model may still emit those ids, which have no text
        size = self.tokenizer.vocab_size
        return self.tokenizer.decode([i for i in ids if i < size])

    def _output(self, state: _RequestState) -> TranslationOutput:
        finished = state.finish_reason is not None
        token_ids = list(state.token_ids or [])
        text = state.text
        if text.startswith(state.sent_text):
            # hold back a trailing partial character until the next token completes it
            end = len(text) if finished else len(text.rstrip("\ufffd"))
            new_text = text[len(state.sent_text) : max(end, len(state.sent_text))]
            state.sent_text += new_text
        else:  # detokenization rewrote sent text (rare); the final text stays authoritative
            new_text = ""
        sample = CompletionOutput(
            index=0,
            text=text,
            token_ids=token_ids,
            finish_reason=state.finish_reason,
            stop_reason=state.stop_reason,
            new_text=new_text,
            num_new_tokens=len(token_ids) - state.sent_tokens,
        )
        state.sent_tokens = len(token_ids)
        return TranslationOutput(
            request_id=state.group.request_id,
            prompt_token_ids=state.group.cross.token_ids,
            outputs=[sample],
            finished=finished,
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
            num_blocks_total=self.num_blocks,
        )

    # ---- offline API ------------------------------------------------------------------
    def translate(
        self,
        inputs: str | Seq[str] | Seq[list[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        forced_prefix: tuple[int, ...] | None = None,
    ) -> list[TranslationOutput]:
        """Translate every input (text, or source token ids with eos); outputs in input order.
        `forced_prefix`: the first output tokens of every input (NLLB's target-language code;
        None: the model's forced_bos_token_id, if any)."""
        if isinstance(inputs, str):
            inputs = [inputs]
        sources = [list(x) if not isinstance(x, str) else self.tokenizer.encode(x) for x in inputs]
        if params is None or isinstance(params, SamplingParams):
            params = [params or self.default_params()] * len(sources)
        order = []
        for src, p in zip(sources, params):
            request_id = f"translate-{next(self._offline_ids)}"
            self.add_request(request_id, TranslationRequest(src, p, forced_prefix=forced_prefix))
            order.append(request_id)
        done: dict[str, TranslationOutput] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[r] for r in order]
