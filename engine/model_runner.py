"""Executes a scheduled step: flat inputs, one forward over every sequence, sampling.

Owns the KV cache tensors (one (k, v) pair per layer, laid out in blocks) and the sampler.
Performance tricks (CUDA graphs, pinned copies) belong here and in the attention backends.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.attention.base import AttentionBackend
from engine.cuda_graphs import DecodeGraphs
from engine.forward_context import ForwardContext
from engine.input_prep import prepare_inputs
from engine.outputs import TokenLogprob
from engine.sampler import Sampler, SamplingRow
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence
from engine.workspace import Workspace
from models.spec import KVCacheSpec


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


def copy_blocks(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], copies: list[tuple[int, int]],
                device: str) -> None:
    """Apply the block manager's copy-on-write (src, dst) decisions to every layer's cache,
    before the step writes anything."""
    if not copies:
        return
    src = torch.tensor([s for s, _ in copies], device=device)
    dst = torch.tensor([d for _, d in copies], device=device)
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
    ) -> None:
        self.model = model
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
    def execute(self, out: SchedulerOutput) -> tuple[list[int | None], list[TokenLogprob | None]]:
        """Compute the scheduled chunks; a token (and logprobs) for each sequence that samples."""
        self.copy_blocks(out.block_copies)
        seqs = out.seqs
        samples = [out.samples(i) for i in range(len(seqs))]
        graphable = self.graphs is not None and len(seqs) <= self.graphs.max_batch
        if graphable and all(n == 1 for n in out.num_new_tokens):
            hidden = self.graphs.run(
                [s.token_ids[s.num_computed_tokens] for s in seqs],
                [s.num_computed_tokens for s in seqs],
                [s.block_table for s in seqs],
            )
            if not all(samples):  # a one-token prefill chunk that does not end its prompt
                hidden = hidden[torch.tensor(samples, device=self.device)]
            return self._sample(hidden, seqs, samples)
        inputs = prepare_inputs(
            token_chunks=[
                s.token_ids[s.num_computed_tokens : s.num_computed_tokens + n]
                for s, n in zip(seqs, out.num_new_tokens)
            ],
            starts=[s.num_computed_tokens for s in seqs],
            block_tables=[s.block_table for s in seqs],
            samples=samples,
            block_size=self.block_size,
            device=self.device,
        )
        ctx = ForwardContext(meta=inputs.meta, backend=self.backend, kv_caches=self.kv_caches)
        hidden = self.model(inputs.input_ids, inputs.positions, ctx)
        return self._sample(hidden[inputs.sample_rows], seqs, samples)

    def _sample(
        self, hidden: torch.Tensor, seqs: list[Sequence], samples: list[bool]
    ) -> tuple[list[int | None], list[TokenLogprob | None]]:
        """Logits of the sampling rows' hidden states (in sequence order), then one token each."""
        sampled: list[int | None] = [None] * len(seqs)
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        if hidden.shape[0] == 0:
            return sampled, logprobs
        sampling_seqs = [i for i, s in enumerate(samples) if s]
        screen = getattr(self.model, "greedy_screen", None)  # bf16-screened argmax (engine/greedy_screen.py)
        if screen is not None:
            plain = [j for j, i in enumerate(sampling_seqs) if seqs[i].params.is_plain_greedy]
            if plain:
                for j, token in zip(plain, screen.argmax(hidden[plain], [[]] * len(plain)).tolist()):
                    sampled[sampling_seqs[j]] = token
                rest = [j for j, i in enumerate(sampling_seqs) if not seqs[i].params.is_plain_greedy]
                if not rest:
                    return sampled, logprobs
                hidden, sampling_seqs = hidden[rest], [sampling_seqs[j] for j in rest]
        logits = self.model.compute_logits(hidden, self._logits)
        rows = [
            SamplingRow(
                params=seqs[i].params,
                prompt_ids=seqs[i].token_ids[: seqs[i].num_prompt_tokens] if seqs[i].params.needs_penalties else [],
                output_ids=seqs[i].output_token_ids if seqs[i].params.needs_penalties else [],
                generator=self.generator_for(seqs[i]),
            )
            for i in sampling_seqs
        ]
        tokens, token_logprobs = self.sampler(logits, rows)
        for j, i in enumerate(sampling_seqs):
            sampled[i] = tokens[j]
            logprobs[i] = token_logprobs[j]
        return sampled, logprobs
