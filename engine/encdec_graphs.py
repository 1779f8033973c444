"""CUDA graphs for the decoder steps of an encoder-decoder model (translation).

Once a group's encoder has run, every step of each of its beams is one decoder token:
self-attention over the beam's own cache, cross-attention over the source's K/V that the
encoder step wrote. So every decoder forward is a decode step, launch-bound on a GPU like a
small decoder-only model's (a Marian layer is a dozen kernels of a few microseconds). As in
engine.cuda_graphs.DecodeGraphs, a step's inputs go into static buffers and the graph captured
for its padded batch size replays. Here a graph also has a bound for each attention (longest
target, longest source), and padding rows attend to nothing in either: length 0, their K/V
written into a scratch block. The encoders of newly admitted groups run eagerly before the
replay, since their lengths change from step to step.
"""
from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from engine.cuda_graphs import DecodeGraphs, HostInputs
from engine.forward_context import ForwardContext


class EncDecGraphs(DecodeGraphs):
    """DecodeGraphs for `model.decode(ids, positions, self_ctx, cross_ctx)`: a fifth input row
    (source lengths), the sources' block tables, and keys (padded batch, target bound, source
    bound). Sources and targets share the model's length limit, so the same bounds.

    `run(tokens, positions, block_tables, source_lens, source_tables)` fills the buffers and
    replays; it returns the hidden states of the real rows.
    """

    VEC_ROWS = 5  # token ids, positions, slots, target lengths, source lengths

    def _more_buffers(self, rows: int, pin: bool) -> None:
        self.source_tables = torch.zeros((rows, self.max_blocks), dtype=torch.int32, device=self.device)
        self._source_host = [HostInputs(rows, self.max_blocks, pin, vec_rows=0) for _ in range(2)]

    def _keys(self) -> list[tuple[int, ...]]:
        return [(b, t, s) for b in self.sizes for t in self.bounds for s in self.bounds]

    def _context(  # type: ignore[override]
        self, b: int, target: int, source: int
    ) -> tuple[ForwardContext, ForwardContext]:
        self_meta = self._meta(b, self.vec[3], self.tables, self.vec[2, :b], target, causal=True)
        cross_meta = self._meta(b, self.vec[4], self.source_tables, None, source, causal=False)
        return (ForwardContext(self_meta, self.backend, self.kv_caches),
                ForwardContext(cross_meta, self.backend, self.kv_caches))

    def _forward(self, key: tuple[int, ...]) -> torch.Tensor:
        b = key[0]
        return self.model.decode(self.vec[0, :b], self.vec[1, :b], *self._ctx[key])

    def _pad_all(self) -> None:
        super()._pad_all()
        self.source_tables.zero_()

    def run(  # type: ignore[override]
        self,
        tokens: Seq[int],
        positions: Seq[int],
        block_tables: Seq[list[int]],
        source_lens: Seq[int],
        source_tables: Seq[list[int]],
    ) -> torch.Tensor:
        """Hidden states (len(tokens), d_model) of one decoder step, a view valid until the next
        call; the caller checks the size fits."""
        b = len(tokens)
        size, turn = self._fill(tokens, positions, block_tables)
        self._host[turn].np_vec[4, :b] = source_lens  # padding rows' are 0 already
        source_host = self._source_host[turn]
        source_host.write_tables(source_tables)
        self._upload(size, turn)
        self.source_tables[:size].copy_(source_host.tables[:size], non_blocking=True)
        return self._replay((size, self._bound(max(positions) + 1), self._bound(max(source_lens))), b)
