"""The embedding engine: token-budget batches of whole inputs, one flat unpadded forward per step.

It serves encoder-only models of both kinds: embedding models (pooled, maybe normalised vectors)
and sequence classifiers (per-input logits; one label is a cross-encoder scoring a text pair).

Batching follows text-embeddings-inference's queue: each step takes waiting inputs FIFO until
`max_num_batched_tokens` is filled, concatenates them (`input_ids` + `cu_seqlens`, no padding),
runs the encoder once, pools, and hands each request its rows. The unit of scheduling is one
input: a request with many inputs may be spread over several steps (so one 2,048-input request
cannot starve a budget), and it finishes when its last input is embedded. An input never
splits, and a step always takes at least one, so an input longer than the budget still runs.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.attention import get_backend
from engine.config import EngineConfig
from engine.errors import InvalidRequestError, PromptTooLongError
from engine.forward_context import ForwardContext, metadata_for_sequences
from engine.request import EngineStats
from models.bert_splade import splade_config
from models.loader import LoadedModel, load_model
from models.pooling import DenseLayer, PoolingConfig, finish_embedding, pool, read_prompts


# Offline batches: past ~1k rows the GEMMs run no faster (measured on 2 cores), and bigger
# batches cost more: at 8,192 tokens an MLP activation is 50 MB, which glibc maps fresh and
# page-faults in on every step (the old default spent ~15% of its time in the kernel).
OFFLINE_BATCH_TOKENS = 2048


@dataclass(frozen=True)
class EmbeddingRequest:
    """What the server hands the engine: inputs already tokenized (special tokens included)."""

    inputs: list[list[int]]
    token_type_ids: list[list[int]] | None = None  # per input; text pairs for cross-encoders (BERT: 0..0 1..1)
    truncate: bool = False  # cut over-long inputs to the model's limit instead of refusing them
    dimensions: int | None = None  # keep the first d values (then renormalise unit-norm models)
    normalize: bool | None = None  # L2-normalise the vectors; None: as the model folder says (TEI's `normalize`)
    per_token: bool = False  # each input's last hidden states, one row per token, unpooled (TEI's /embed_all)


@dataclass
class EmbeddingOutput:
    """One finished request: a float32 CPU vector per input, in input order (a classifier's are
    its logits, one per label)."""

    request_id: str
    embeddings: list[torch.Tensor]
    num_prompt_tokens: int
    finished: bool = True
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    finished_time: float | None = None


@dataclass
class _Pending:
    request_id: str
    inputs: list[list[int]]  # after truncation
    token_type_ids: list[list[int]] | None
    dimensions: int | None
    normalize: bool
    per_token: bool
    arrival_time: float
    results: list[torch.Tensor] = field(default_factory=list)  # embedded inputs, a prefix of `inputs`
    first_scheduled_time: float | None = None

    @property
    def next_input(self) -> int:
        return len(self.results)


def special_suffix(tokenizer: object) -> list[int]:
    """Ids the tokenizer appends after the text ([SEP] for BERT, </s> for RoBERTa), found by
    encoding one character with and without special tokens; [] without a tokenizer."""
    if tokenizer is None:
        return []
    full, plain = tokenizer.encode("a"), tokenizer.encode("a", add_special_tokens=False)
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[start + len(plain):])
    return []


def truncate_ids(ids: list[int], limit: int, suffix: list[int]) -> list[int]:
    """Cut to `limit` tokens as HF tokenizers (hence sentence-transformers) do: the text is cut,
    the trailing special tokens stay."""
    if len(ids) <= limit:
        return ids
    n = len(suffix)
    if n and ids[-n:] == suffix and limit > n:
        return ids[: limit - n] + suffix
    return ids[:limit]


def pack_batches(lengths: list[int], order: list[int], budget: int) -> list[list[int]]:
    """Split `order` (indices into lengths) into consecutive batches of at most `budget` tokens;
    a batch holds at least one index, so over-budget inputs still run (alone)."""
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        if current and used + lengths[i] > budget:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        batches.append(current)
    return batches


class EmbeddingEngine:
    """Encoder-only embeddings behind the StepEngine protocol, plus an offline `embed()`.

    Pooling and normalisation come from the model folder (models/pooling.py). Encoders keep no
    KV cache, so a step is stateless: nothing to free on abort besides the queue entry.
    """

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.config = config
        self.model = loaded.model
        self.info = loaded.info
        self.tokenizer = loaded.tokenizer
        self.device = torch.device(config.device)
        self.backend = get_backend(config.device, config.attention_backend)
        self.max_model_len = loaded.info.max_model_len
        self.max_num_batched_tokens = config.scheduler.max_num_batched_tokens
        # A classifier's rows are its logits; an embedding model's, its pooled hidden states.
        self.is_classifier = hasattr(self.model, "classify")
        # a SPLADE model's rows are its vocabulary weights: (pooling, activation) from its folder
        self.sparse = (splade_config(Path(loaded.info.path)) or ("max", "relu")) if hasattr(self.model, "sparse") \
            else None
        self.causal = getattr(self.model, "causal", False)  # decoder-based embedding models attend causally
        self.prompts = read_prompts(loaded.info.path)  # TEI's prompt_name picks one of them
        self.pooling = PoolingConfig(normalize=False) if self.is_classifier or self.sparse else \
            PoolingConfig.from_folder(loaded.info.path, self.causal)
        hidden = self.model.config.hidden_size
        self.dense = [DenseLayer.from_folder(d).to(self.device) for d in self.pooling.dense]  # after pooling
        pooled_dim = self.dense[-1].weight.shape[0] if self.dense else hidden * len(self.pooling.modes)
        self.embedding_dim = len(loaded.info.labels) if self.is_classifier else self.info.vocab_size if self.sparse \
            else pooled_dim
        self.suffix = special_suffix(self.tokenizer)
        self.queue: collections.deque[_Pending] = collections.deque()
        self.num_prompt_tokens = 0
        self.num_steps = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> EmbeddingEngine:
        loaded = load_model(config.model, getattr(torch, config.dtype), config.device, config.max_model_len,
                            served_name=config.served_name)
        return cls(loaded, config)

    # ---- admission ------------------------------------------------------------------
    def validate(self, payload: EmbeddingRequest) -> None:
        if not payload.inputs:
            raise InvalidRequestError("input must not be empty", param="input")
        vocab = self.info.vocab_size
        limit = self.max_model_len
        types = payload.token_type_ids
        if types is not None and [len(t) for t in types] != [len(ids) for ids in payload.inputs]:
            raise InvalidRequestError("token_type_ids must match the inputs, one per token", param="input")
        if types is not None and payload.truncate:  # cutting would misalign them: pairs are cut when tokenized
            raise InvalidRequestError("truncate with token_type_ids: cut text pairs when tokenizing", param="truncate")
        for i, ids in enumerate(payload.inputs):
            if not ids:
                raise InvalidRequestError(f"input {i} is empty", param="input")
            if min(ids) < 0 or max(ids) >= vocab:
                raise InvalidRequestError(f"input {i} has token ids outside [0, {vocab})", param="input")
            if len(ids) > limit and not payload.truncate:
                raise PromptTooLongError(
                    f"This model's maximum context length is {limit} tokens. However, input {i} has "
                    f"{len(ids)} tokens. Shorten the input or pass truncate=true.",
                    param="input",
                )
        dims = payload.dimensions
        if dims is not None and self.is_classifier:
            raise InvalidRequestError("dimensions applies to embedding models, not classifiers", param="dimensions")
        if payload.normalize and self.is_classifier:
            raise InvalidRequestError("normalize applies to embedding models, not classifiers", param="normalize")
        if payload.per_token and (self.is_classifier or dims is not None or payload.normalize is not None):
            raise InvalidRequestError("per-token embeddings are an embedding model's hidden states, unpooled: "
                                      "no dimensions or normalize", param="input")
        if dims is not None and not 1 <= dims <= self.embedding_dim:
            raise InvalidRequestError(
                f"dimensions must be in [1, {self.embedding_dim}] for this model, got {dims}", param="dimensions"
            )

    def add_request(self, request_id: str, payload: EmbeddingRequest) -> None:
        self.validate(payload)
        if any(p.request_id == request_id for p in self.queue):
            raise InvalidRequestError(f"duplicate request id {request_id!r}")
        inputs = [truncate_ids(list(ids), self.max_model_len, self.suffix) for ids in payload.inputs]
        self.queue.append(_Pending(request_id, inputs, payload.token_type_ids, payload.dimensions,
                                   self._normalize(payload.normalize), payload.per_token, time.monotonic()))

    def abort_request(self, request_id: str) -> None:
        """Drop the request (its client left); inputs already embedded are discarded."""
        self.queue = collections.deque(p for p in self.queue if p.request_id != request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.queue)

    def num_waiting(self) -> int:
        return sum(1 for p in self.queue if p.next_input == 0)

    # ---- the step ---------------------------------------------------------------------
    def _schedule(self) -> list[tuple[_Pending, int]]:
        """(request, input index) pairs for this step, FIFO, within the token budget."""
        chosen: list[tuple[_Pending, int]] = []
        used = 0
        for pending in self.queue:
            for j in range(pending.next_input, len(pending.inputs)):
                n = len(pending.inputs[j])
                if chosen and used + n > self.max_num_batched_tokens:
                    return chosen
                chosen.append((pending, j))
                used += n
        return chosen

    def step(self) -> list[EmbeddingOutput]:
        chosen = self._schedule()
        if not chosen:
            return []
        now = time.monotonic()
        vectors = self._embed_batch([p.inputs[j] for p, j in chosen],
                                    [p.token_type_ids[j] if p.token_type_ids else None for p, j in chosen],
                                    per_token=[p.per_token for p, _ in chosen])
        for (pending, _), vec in zip(chosen, vectors):
            if pending.first_scheduled_time is None:
                pending.first_scheduled_time = now
            pending.results.append(vec if pending.per_token else finish_embedding(vec, pending.dimensions,
                                                                                  pending.normalize))
        self.num_steps += 1
        self.num_prompt_tokens += sum(len(p.inputs[j]) for p, j in chosen)
        outputs = []
        done = time.monotonic()
        while self.queue and self.queue[0].next_input == len(self.queue[0].inputs):
            p = self.queue.popleft()  # FIFO order means finished requests sit at the front
            outputs.append(EmbeddingOutput(
                request_id=p.request_id, embeddings=p.results, num_prompt_tokens=sum(map(len, p.inputs)),
                arrival_time=p.arrival_time, first_scheduled_time=p.first_scheduled_time, finished_time=done,
            ))
        return outputs

    @torch.inference_mode()
    def _embed_batch(self, seqs: list[list[int]], types: list[list[int] | None] | None = None,
                     per_token: list[bool] | None = None) -> torch.Tensor | list[torch.Tensor]:
        """One flat, unpadded forward over whole sequences -> (B, D) float32 on the CPU: pooled rows
        (not yet normalised) or a classifier's logits. With `per_token`, a list instead, whose rows
        asked for it are (length, H) hidden states."""
        lens = torch.tensor([len(s) for s in seqs])
        input_ids = torch.cat([torch.tensor(s) for s in seqs]).to(self.device)
        starts = torch.cumsum(lens, 0) - lens
        positions = torch.arange(int(lens.sum())) - torch.repeat_interleave(starts, lens)
        token_types = None  # the model then adds type 0's embedding, as HF does without them
        if types is not None and any(t is not None for t in types):
            token_types = torch.cat([torch.tensor(t if t is not None else [0] * len(s)) for s, t in zip(seqs, types)])
            token_types = token_types.to(self.device)
        meta = metadata_for_sequences(lens.tolist(), causal=self.causal, device=self.device)
        ctx = ForwardContext(meta, self.backend)
        hidden = self.model(input_ids, positions.to(self.device), ctx, token_type_ids=token_types)
        if self.is_classifier:
            return self.model.classify(hidden, meta.cu_seqlens_q).cpu()
        if self.sparse is not None:
            pooled = self.model.sparse(hidden, meta.cu_seqlens_q, *self.sparse).cpu()
        else:
            pooled = pool(hidden, meta.cu_seqlens_q, self.pooling.modes)
            for layer in self.dense:  # the folder's Dense projections (fp32, as pooled)
                pooled = layer(pooled)
            pooled = pooled.cpu()  # normalised per request, after
        if not per_token or not any(per_token):
            return pooled
        tokens = hidden.float().cpu().split(lens.tolist())
        return [tokens[i] if want else pooled[i] for i, want in enumerate(per_token)]

    # ---- offline API ------------------------------------------------------------------
    def embed(
        self,
        inputs: list[str] | list[list[int]],
        truncate: bool = False,
        dimensions: int | None = None,
        max_batch_tokens: int | None = None,
        normalize: bool | None = None,
    ) -> torch.Tensor:
        """Embed many inputs at once -> (N, D) float32, rows in input order.

        Unlike the online queue (FIFO), inputs are sorted by length before packing into
        token-budget batches (default OFFLINE_BATCH_TOKENS), so sequences of similar length
        share a batch and the reference attention runs on equal-length slices, unpadded.
        """
        if inputs and isinstance(inputs[0], str):
            token_ids = self._tokenize(inputs)  # type: ignore[arg-type]
        else:
            token_ids = [list(ids) for ids in inputs]  # type: ignore[arg-type]
        request = EmbeddingRequest(inputs=token_ids, truncate=truncate, dimensions=dimensions, normalize=normalize)
        self.validate(request)
        token_ids = [truncate_ids(ids, self.max_model_len, self.suffix) for ids in token_ids]
        out = self._run_offline(token_ids, None, max_batch_tokens or OFFLINE_BATCH_TOKENS)
        return finish_embedding(out, dimensions, self._normalize(normalize))

    def _normalize(self, asked: bool | None) -> bool:
        """Whether rows are L2-normalised: as asked, else as the folder says; never a classifier's logits."""
        return not self.is_classifier and (self.pooling.normalize if asked is None else asked)

    def score(self, first: str | list[str], second: str | list[str], truncate: bool = False,
              raw: bool = False) -> list[float]:
        """vLLM's LLM.score: one score per pair (one first text against each second text, or
        pairwise); a cross-encoder's activated logit (`raw`: the logit), or an embedding model's
        cosine similarity."""
        from engine.scoring import read_scores, score_job  # scoring builds on this module

        job = score_job(self, [first] if isinstance(first, str) else list(first),
                        [second] if isinstance(second, str) else list(second), truncate)
        self.validate(job.payload)
        out = self._run_offline(job.payload.inputs, job.payload.token_type_ids, OFFLINE_BATCH_TOKENS)
        return read_scores(job, list(out), self.info.activation, raw)

    def _run_offline(self, token_ids: list[list[int]], types: list[list[int]] | None, budget: int) -> torch.Tensor:
        """Rows for many inputs, sorted by length into token-budget batches, back in input order."""
        lengths = [len(ids) for ids in token_ids]
        order = sorted(range(len(token_ids)), key=lengths.__getitem__)
        out = torch.empty(len(token_ids), self.embedding_dim)
        for batch in pack_batches(lengths, order, budget):
            out[torch.tensor(batch)] = self._embed_batch([token_ids[i] for i in batch],
                                                         [types[i] for i in batch] if types else None)
        self.num_prompt_tokens += sum(lengths)
        return out

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        if any(not t for t in texts):
            raise InvalidRequestError("input must not contain empty strings", param="input")
        if hasattr(self.tokenizer, "encode_batch"):  # models.tokenizer.Tokenizer: all cores
            return self.tokenizer.encode_batch(texts)
        return [self.tokenizer.encode(t) for t in texts]

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=sum(1 for p in self.queue if p.next_input > 0),
            num_waiting=self.num_waiting(),
            kv_cache_usage=0.0,  # encoders keep no KV cache
            num_preemptions=0,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=0,
        )
