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
from collections.abc import Callable, Iterable
from collections.abc import Sequence as Seq
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from engine.attention.base import AttentionBackend
from engine.attention.metadata import AttentionMetadata
from engine.errors import InvalidRequestError
from engine.forward_context import ForwardContext

K = TypeVar("K", bound=tuple)


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


def wanted(decode_graphs: bool | None, device: str, backend: AttentionBackend, capturable: bool = True) -> bool:
    """Whether an engine runs its decode steps through graphs: `decode_graphs` (the config's) if
    set, else on CUDA with the fused backend (the only one a graph can capture), for a model whose
    step a graph can hold (`capturable`: not MoE models, whose routing syncs with the host).

    Asked for with another backend or such a model, it is refused. A graph's host-side lengths are
    its context bound (`DecodeGraphs._meta`); only the fused kernels read each sequence's own length
    on the device. The torch and CPU backends would attend over the whole bound."""
    if decode_graphs and backend.name != "triton":
        raise InvalidRequestError(f"decode graphs need the triton attention backend, not {backend.name!r}: "
                                  "it reads sequence lengths on the host, which a graph fixes at its bound")
    if decode_graphs and not capturable:
        raise InvalidRequestError("decode graphs cannot hold this model's steps: its mixture-of-experts layers "
                                  "group tokens by expert on the host; serve it without decode graphs")
    if not capturable:
        return False
    if decode_graphs is not None:
        return decode_graphs
    return device.startswith("cuda") and backend.name == "triton"


def context_bounds(partition_size: int | None, limit: int) -> list[int]:
    """The context bounds graphs are captured for: under the backend's split-K partition decode
    runs single-pass (one launch per layer); up to `limit` it may split long contexts."""
    return ([partition_size] if partition_size is not None and partition_size < limit else []) + [limit]


@torch.inference_mode()
def capture_graphs(
    keys: Iterable[K], forward: Callable[[K], torch.Tensor]
) -> dict[K, tuple[torch.cuda.CUDAGraph, torch.Tensor]]:
    """A graph of `forward(key)` for each key, with the output tensor it writes. The static
    inputs must hold padding (rows that write only a scratch block) while this runs."""
    graphs = {}
    pool = None
    # largest first (batch, then bounds): smaller graphs reuse its pool memory
    for key in sorted(keys, reverse=True):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compiles kernels and settles allocations off-graph
            for _ in range(2):
                forward(key)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            hidden = forward(key)
        pool = graph.pool()
        graphs[key] = (graph, hidden)
    torch.cuda.synchronize()
    return graphs


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

    VEC_ROWS = 4

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
        # rows: token ids, positions, slots, sequence lengths (and a subclass's own); int32
        # keeps one copy per step
        self.vec = torch.zeros((self.VEC_ROWS, n), dtype=torch.int32, device=device)
        self.tables = torch.zeros((n, self.max_blocks), dtype=torch.int32, device=device)
        pin = device.startswith("cuda")
        # Two sets of pinned host inputs, used in turn: a step run ahead fills one while the
        # previous step's copies from the other may still be queued (engine.engine).
        self._host = [HostInputs(n, self.max_blocks, pin, self.VEC_ROWS) for _ in range(2)]
        self._turn = 0
        self.cu_seqlens = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.bounds = context_bounds(getattr(backend, "partition_size", None), max_model_len)
        self._more_buffers(n, pin)
        self._ctx = {key: self._context(*key) for key in self._keys()}
        self._graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            self._pad_all()  # warm-up and capture write only the scratch block
            self._graphs = capture_graphs(self._ctx, self._forward)

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def forward_alone(self, batch: int, longest: int) -> Callable[[], object]:
        """The forward a step of `batch` rows with contexts up to `longest` runs, as a call on the
        inputs the last step left: the captured graph's replay, or the static-buffer forward
        where none was captured. Benchmarks time it alone: the GPU's share of a step."""
        size = padded_size(self.sizes, batch)
        assert size is not None, f"batch {batch} over the largest captured size {self.max_batch}"
        key = self._key(size, longest)
        if self._graphs:
            return self._graphs[key][0].replay

        def forward() -> torch.Tensor:
            with torch.inference_mode():
                return self._forward(key)

        return forward

    def _bound(self, longest: int) -> int:
        """The smallest context bound that holds `longest` keys."""
        return next(bound for bound in self.bounds if bound >= longest)

    def _key(self, size: int, longest: int) -> tuple[int, int]:
        """(padded batch, the context bound of the step's longest context): a graph's key."""
        return size, self._bound(longest)

    def _more_buffers(self, rows: int, pin: bool) -> None:
        """A subclass's own static inputs, made before its contexts refer to them."""

    def _keys(self) -> list[tuple[int, ...]]:
        return [(b, bound) for b in self.sizes for bound in self.bounds]

    def _meta(self, b: int, lengths: torch.Tensor, tables: torch.Tensor, slots: torch.Tensor | None,
              bound: int, causal: bool) -> AttentionMetadata:
        # The host lengths are the graph's bound, not a step's: the decode kernel sizes its
        # split-K grid from max_seqlen_k, and programs past a sequence's end return at once.
        return AttentionMetadata(
            cu_seqlens_q=self.cu_seqlens[: b + 1], seq_lens=lengths[:b], slot_mapping=slots,
            block_tables=tables[:b], max_seqlen_q=1, max_seqlen_k=bound, query_lens=(1,) * b,
            seq_lens_host=(bound,) * b, causal=causal,
        )

    def _context(self, b: int, bound: int) -> ForwardContext:
        meta = self._meta(b, self.vec[3], self.tables, self.vec[2, :b], bound, causal=True)
        return ForwardContext(meta=meta, backend=self.backend, kv_caches=self.kv_caches)

    def _forward(self, key: tuple[int, int]) -> torch.Tensor:
        b = key[0]
        return self.model(self.vec[0, :b], self.vec[1, :b], self._ctx[key])

    def _pad_all(self) -> None:
        self.vec.zero_()
        self.vec[2].fill_(self.scratch_slot)
        self.tables.zero_()

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
        size, turn = self._fill(tokens, positions, block_tables)
        self._upload(size, turn)
        if carried is not None:
            rows, carried_tokens = carried
            if rows is None:
                self.vec[0, : carried_tokens.shape[0]].copy_(carried_tokens)
            else:
                self.vec[0].index_copy_(0, rows, carried_tokens.to(torch.int32))
        return self._replay(self._key(size, max(positions) + 1), len(tokens))

    def _fill(self, tokens: Seq[int], positions: Seq[int], block_tables: Seq[list[int]]) -> tuple[int, int]:
        """Rows 0-3 and block tables of the next pinned host set; (padded size, that set's turn)."""
        b = len(tokens)
        size = padded_size(self.sizes, b)
        assert size is not None, f"batch {b} over the largest captured size {self.max_batch}"
        turn = self._turn
        host = self._host[turn]
        self._turn ^= 1
        bs = self.block_size
        vec = host.np_vec
        vec[0, :b] = tokens
        vec[1, :b] = positions
        vec[2, :b] = [table[p // bs] * bs + p % bs for table, p in zip(block_tables, positions)]
        np.add(vec[1, :b], 1, out=vec[3, :b])
        if size > b:  # padding rows: token 0 at position 0, K/V into the scratch block, lengths 0
            vec[:, b:size] = 0
            vec[2, b:size] = self.scratch_slot
        host.write_tables(block_tables)
        return size, turn

    def _upload(self, size: int, turn: int) -> None:
        """Host set `turn`'s first `size` rows to the device, queued (pinned memory: no wait)."""
        host = self._host[turn]
        self.vec[:, :size].copy_(host.vec[:, :size], non_blocking=True)
        self.tables[:size].copy_(host.tables[:size], non_blocking=True)

    def _replay(self, key: tuple[int, ...], b: int) -> torch.Tensor:
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


class HostInputs:
    """Pinned host copies of a graph's inputs (`vec_rows` int32 vectors and block tables), with
    numpy views to fill them from lists."""

    def __init__(self, rows: int, max_blocks: int, pin: bool, vec_rows: int = 4) -> None:
        self.vec = torch.zeros((vec_rows, rows), dtype=torch.int32, pin_memory=pin)
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
