"""Executes one translation step: encoders (flat, unpadded), cross K/V into their blocks, then one
decoder forward over every scheduled beam with paged self- and cross-attention.

Owns the KV cache tensors. Self- and cross-attention blocks share one pool of tensors (one
(k, v) pair per decoder layer); which blocks hold what is the scheduler's business.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.attention.base import AttentionBackend
from engine.attention.metadata import AttentionMetadata
from engine.encdec_graphs import EncDecGraphs
from engine.forward_context import ForwardContext, metadata_for_sequences
from engine.input_prep import prepare_inputs
from engine.model_runner import copy_blocks
from engine.top_logprobs import argmax, ban_
from engine.translation_scheduler import TranslationBatch
from engine.workspace import Workspace


class EncDecRunner:
    """Runs an encoder-decoder model (models/marian.py API) over a TranslationBatch."""

    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        backend: AttentionBackend,
        device: str,
        graphs: EncDecGraphs | None = None,
    ) -> None:
        self.model = model
        self.graphs = graphs  # decoder steps of at most graphs.max_batch beams replay these
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.backend = backend
        self.device = device
        self._logits = Workspace()  # each step's logits (CPU), consumed within the step

    @torch.inference_mode()
    def execute(self, batch: TranslationBatch) -> torch.Tensor:
        """Each beam's last hidden state (num beams, d_model): each group's beams in turn, in
        `batch.groups` order; `logits` or `greedy_tokens` turn rows of it into the next token."""
        copy_blocks(self.kv_caches, batch.block_copies, self.device)
        encoding = [g for g in batch.groups if g.needs_encoder]
        if encoding:
            self._encode([g.cross.token_ids for g in encoding], [g.cross.block_table for g in encoding])
        beams = [b for g in batch.groups for b in g.beams]
        enc_lens = [g.source_len for g in batch.groups for _ in g.beams]
        cross_tables = [g.cross.block_table for g in batch.groups for _ in g.beams]
        graphable = self.graphs is not None and len(beams) <= self.graphs.max_batch
        if graphable and all(len(b.token_ids) - b.num_computed_tokens == 1 for b in beams):
            return self.graphs.run([b.token_ids[-1] for b in beams], [b.num_computed_tokens for b in beams],
                                   [b.block_table for b in beams], enc_lens, cross_tables)
        inputs = prepare_inputs(
            token_chunks=[b.token_ids[b.num_computed_tokens :] for b in beams],
            starts=[b.num_computed_tokens for b in beams],
            block_tables=[b.block_table for b in beams],
            samples=[True] * len(beams),  # every beam computes up to its last token
            block_size=self.block_size,
            device=self.device,
        )
        self_ctx = ForwardContext(inputs.meta, self.backend, self.kv_caches)
        cross_ctx = ForwardContext(self._cross_meta(inputs.meta, enc_lens, cross_tables), self.backend, self.kv_caches)
        hidden = self.model.decode(inputs.input_ids, inputs.positions, self_ctx, cross_ctx)
        return hidden[inputs.sample_rows]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(rows, V) float32 next-token logits, valid until the next call."""
        return self.model.compute_logits(hidden, self._logits)

    def greedy_tokens(self, hidden: torch.Tensor, bans: list[list[int]]) -> torch.Tensor:
        """(rows,) int64: the argmax of `logits(hidden)` with each row's `bans` excluded: through the
        model's bf16 screen where it has one (engine/greedy_screen.py), else from fp32 logits."""
        if self.model.greedy_screen is not None:
            return self.model.greedy_screen.argmax(hidden, bans)
        return argmax(ban_(self.logits(hidden), bans))

    def _encode(self, sources: list[list[int]], tables: list[list[int]]) -> None:
        """Run the encoders of newly admitted groups as one flat batch; store their cross K/V."""
        placed = prepare_inputs(sources, [0] * len(sources), tables, [False] * len(sources),
                                self.block_size, self.device, causal=False)
        ctx = ForwardContext(metadata_for_sequences([len(s) for s in sources], causal=False, device=self.device),
                             self.backend)
        hidden = self.model.encode(placed.input_ids, placed.positions, ctx)
        for (k, v), (k_cache, v_cache) in zip(self.model.cross_kv(hidden), self.kv_caches):
            self.backend.store_kv(k, v, k_cache, v_cache, placed.meta.slot_mapping)

    def _cross_meta(self, self_meta: AttentionMetadata, enc_lens: list[int],
                    tables: list[list[int]]) -> AttentionMetadata:
        """Same queries as self-attention; keys are each beam's whole source, read-only."""
        width = max(len(t) for t in tables)
        block_tables = torch.zeros((len(tables), width), dtype=torch.int32)
        for i, table in enumerate(tables):  # one row copy per beam, not per token
            block_tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
        return AttentionMetadata(
            cu_seqlens_q=self_meta.cu_seqlens_q,
            seq_lens=torch.tensor(enc_lens, dtype=torch.int32, device=self.device),
            slot_mapping=None,
            block_tables=block_tables.to(self.device),
            max_seqlen_q=self_meta.max_seqlen_q,
            max_seqlen_k=max(enc_lens),
            query_lens=self_meta.query_lens,
            seq_lens_host=tuple(enc_lens),
            causal=False,
        )
