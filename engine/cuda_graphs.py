"""CUDA graphs for decode steps: one graph per padded batch size, replayed with fresh inputs.

A decode step of a small model is launch-bound on a GPU: hundreds of kernels of a few
microseconds each, and the Python that launches them takes longer than the GPU does. Replaying
a captured graph launches them all at once. A graph binds memory addresses, so every input
lives in static buffers that each step overwrites, and a batch is padded up to the next
captured size. Padding rows compute on token 0 at position 0, write their K/V into a scratch
block the block manager never hands out, and attend to nothing (sequence length 0), so they
touch no real sequence.

Only the fused (Triton) backend can be captured: the torch reference plans its work from host
copies of the lengths, which a graph would freeze. With `capture=False` the same static-buffer
path runs eagerly, which is how CPU tests check the padding under the interpreted kernels.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence as Seq

import numpy as np
import torch
from torch import nn

from engine.attention.base import AttentionBackend
from engine.attention.metadata import AttentionMetadata
from engine.forward_context import ForwardContext


def graph_batch_sizes(max_batch: int) -> list[int]:
    """Captured sizes: 1, 2, 4, 8, then every multiple of 16 (vLLM's ladder), up to max_batch.

    Padding is then at most 15 rows, and capture stays a few dozen graphs."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch]
    sizes += list(range(16, max_batch + 1, 16))
    if not sizes or sizes[-1] < max_batch:
        sizes.append(max_batch)
    return sizes


def padded_size(sizes: Seq[int], batch: int) -> int | None:
    """The smallest captured size that holds `batch` rows; None when none does."""
    i = bisect.bisect_left(sizes, batch)
    return sizes[i] if i < len(sizes) else None


class DecodeGraphs:
    """Static inputs and captured forwards per batch size, for steps of one token per sequence.

    `run(tokens, positions, block_tables)` fills the buffers (two host-to-device copies) and
    replays the graph of the padded size; it returns the hidden states of the real rows.

    A graph fixes its attention plan, sized for the longest context it may meet. So each batch
    size gets a graph per context bound: the backend's split-K partition (`partition_size`),
    under which decode runs single-pass, one launch per layer, and `max_model_len`, where it
    splits long contexts (two launches per layer). A step replays the smallest bound that holds
    its longest context.
    """

    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        backend: AttentionBackend,
        block_size: int,
        max_batch: int,
        max_model_len: int,
        scratch_block: int,
        device: str,
        capture: bool = True,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.scratch_slot = scratch_block * block_size
        self.device = device
        self.sizes = graph_batch_sizes(max_batch)
        n = self.sizes[-1]
        self.max_blocks = -(-max_model_len // block_size)
        # rows: token ids, positions, slots, sequence lengths; int32 keeps one copy per step
        self.vec = torch.zeros((4, n), dtype=torch.int32, device=device)
        self.tables = torch.zeros((n, self.max_blocks), dtype=torch.int32, device=device)
        pin = device.startswith("cuda")
        # Two sets of pinned host inputs, used in turn: a step run ahead fills one while the
        # previous step's copies from the other may still be queued (engine.engine).
        self._host = [_HostInputs(n, self.max_blocks, pin) for _ in range(2)]
        self._turn = 0
        self.cu_seqlens = torch.arange(n + 1, dtype=torch.int32, device=device)
        short = getattr(backend, "partition_size", None)
        self.bounds = ([short] if short is not None and short < max_model_len else []) + [max_model_len]
        self._ctx = {(b, bound): self._context(b, bound) for b in self.sizes for bound in self.bounds}
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            self._capture()

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def graph_for(self, batch: int, longest: int) -> torch.cuda.CUDAGraph:
        """The captured forward a step of `batch` rows with contexts up to `longest` replays
        (benchmarks time it alone: the GPU's share of a step, without the host's)."""
        size = padded_size(self.sizes, batch)
        assert size is not None and self._graphs, "no graph captured for that batch"
        return self._graphs[self._key(size, longest)][0]

    def _key(self, size: int, longest: int) -> tuple[int, int]:
        """(padded batch, the smallest context bound that holds `longest`): a graph's key."""
        return size, next(bound for bound in self.bounds if bound >= longest)

    def _context(self, b: int, bound: int) -> ForwardContext:
        # The host lengths are the graph's bound, not a step's: the decode kernel sizes its
        # split-K grid from max_seqlen_k, and programs past a sequence's end return at once.
        meta = AttentionMetadata(
            cu_seqlens_q=self.cu_seqlens[: b + 1],
            seq_lens=self.vec[3, :b],
            slot_mapping=self.vec[2, :b],
            block_tables=self.tables[:b],
            max_seqlen_q=1,
            max_seqlen_k=bound,
            query_lens=(1,) * b,
            seq_lens_host=(bound,) * b,
            causal=True,
        )
        return ForwardContext(meta=meta, backend=self.backend, kv_caches=self.kv_caches)

    def _forward(self, key: tuple[int, int]) -> torch.Tensor:
        b = key[0]
        return self.model(self.vec[0, :b], self.vec[1, :b], self._ctx[key])

    def _pad_all(self) -> None:
        self.vec[0].zero_()
        self.vec[1].zero_()
        self.vec[2].fill_(self.scratch_slot)
        self.vec[3].zero_()
        self.tables.zero_()

    @torch.inference_mode()
    def _capture(self) -> None:
        self._pad_all()  # warm-up and capture write only the scratch block
        pool = None
        # largest first (batch, then bound): smaller graphs reuse its pool memory
        for key in sorted(self._ctx, reverse=True):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compiles kernels and settles allocations off-graph
                for _ in range(2):
                    self._forward(key)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self._forward(key)
            pool = graph.pool()
            self._graphs[key] = (graph, hidden)
        torch.cuda.synchronize()

    def run(
        self,
        tokens: Seq[int],
        positions: Seq[int],
        block_tables: Seq[list[int]],
        carried: tuple[torch.Tensor | None, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Hidden states (len(tokens), hidden) of one decode step, a view valid until the next
        call; the caller checks the size fits.
        `carried` (rows, or None for rows 0..k-1; device tokens) overrides those rows' tokens with
        ones still on the device (sampled by a step whose result the host has not read).

        The host side is on the critical path of every step (the GPU waits for it), so the
        buffers are filled through numpy views from the Python lists, with no torch op per row."""
        b = len(tokens)
        size = padded_size(self.sizes, b)
        assert size is not None, f"batch {b} over the largest captured size {self.max_batch}"
        host = self._host[self._turn]
        self._turn ^= 1
        bs = self.block_size
        vec = host.np_vec
        vec[0, :b] = tokens
        vec[1, :b] = positions
        vec[2, :b] = [table[p // bs] * bs + p % bs for table, p in zip(block_tables, positions)]
        np.add(vec[1, :b], 1, out=vec[3, :b])
        if size > b:  # padding rows: token 0 at position 0, K/V into the scratch block, length 0
            vec[:, b:size] = 0
            vec[2, b:size] = self.scratch_slot
        host.write_tables(block_tables)
        self.vec[:, :size].copy_(host.vec[:, :size], non_blocking=True)
        self.tables[:size].copy_(host.tables[:size], non_blocking=True)
        if carried is not None:
            rows, carried_tokens = carried
            if rows is None:
                self.vec[0, : carried_tokens.shape[0]].copy_(carried_tokens)
            else:
                self.vec[0].index_copy_(0, rows, carried_tokens.to(torch.int32))
        longest = max(positions) + 1
        key = self._key(size, longest)
        if self._graphs:
            graph, hidden = self._graphs[key]
            graph.replay()
        else:
            hidden = self._forward(key)
        # A view of the graph's output, valid until the next replay: the caller's logits and
        # sampling are queued before it on the same stream, and keep nothing of it. A pinned
        # buffer set is refilled two steps later, after the host has read the tokens of the
        # step that copied from it.
        return hidden[:b]


class _HostInputs:
    """Pinned host copies of DecodeGraphs' inputs, with numpy views to fill them from lists."""

    def __init__(self, rows: int, max_blocks: int, pin: bool) -> None:
        self.vec = torch.zeros((4, rows), dtype=torch.int32, pin_memory=pin)
        self.tables = torch.zeros((rows, max_blocks), dtype=torch.int32, pin_memory=pin)
        self.np_vec, self.np_tables = self.vec.numpy(), self.tables.numpy()
        self.written: list[tuple[list[int] | None, int]] = [(None, 0)] * rows  # per row: table, entries written

    def write_tables(self, block_tables: Seq[list[int]]) -> None:
        """Block-table rows, rewriting only what changed since the row's last step.

        The block manager appends to a running sequence's table and gives it a new list when it
        frees it, so a row that holds the same list object as last time differs only in the
        entries appended since, plus the last one written (copy-on-write replaces the block a
        decode writes into). Entries past a table's end are left stale: the kernels read blocks
        only below a sequence's length, and a padding row has length 0."""
        rows = self.np_tables
        written = self.written
        for i, table in enumerate(block_tables):
            kept, n = written[i]
            start = n - 1 if kept is table and n else 0
            rows[i, start : len(table)] = table[start:]
            written[i] = (table, len(table))
