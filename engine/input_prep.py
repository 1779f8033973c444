"""Pure, vectorised construction of one step's flat inputs from (start, length, blocks) triples."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention.metadata import AttentionMetadata
from engine.host_copy import to_device


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # (S,) int64: flat rows whose hidden state is sampled from, by sequence


def prepare_inputs(
    token_chunks: list[list[int]],
    starts: list[int],
    block_tables: list[list[int]],
    samples: list[bool] | list[int],
    block_size: int,
    device: torch.device | str = "cpu",
    causal: bool = True,
) -> StepInputs:
    """Sequence i computes `token_chunks[i]` at positions `starts[i]...`; its KV goes to
    `block_tables[i]`; its last `samples[i]` rows are sampled from (a bool: its last row or
    none; a count: its last token and the drafts after it, engine/speculative.py). Positions and
    slots come from tensor ops, not a per-token loop."""
    lens = torch.tensor([len(c) for c in token_chunks], dtype=torch.int64)
    start = torch.tensor(starts, dtype=torch.int64)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int64)
    cu[1:] = lens.cumsum(0)
    num_tokens = int(cu[-1])
    seq_of_token = torch.repeat_interleave(torch.arange(len(lens)), lens)
    positions = start[seq_of_token] + torch.arange(num_tokens) - cu[:-1][seq_of_token]
    max_blocks = max(len(t) for t in block_tables)
    tables = torch.zeros((len(block_tables), max_blocks), dtype=torch.int32)
    for i, table in enumerate(block_tables):  # one row copy per sequence, not per token
        tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
    block_ids = tables[seq_of_token, positions // block_size].long()
    slot_mapping = block_ids * block_size + positions % block_size
    seq_lens = start + lens
    flat_ids = [t for chunk in token_chunks for t in chunk]
    meta = AttentionMetadata(
        cu_seqlens_q=to_device(cu, device, torch.int32),
        seq_lens=to_device(seq_lens, device, torch.int32),
        slot_mapping=to_device(slot_mapping, device),
        block_tables=to_device(tables, device),
        max_seqlen_q=int(lens.max()),
        max_seqlen_k=int(seq_lens.max()),
        query_lens=tuple(lens.tolist()),
        seq_lens_host=tuple(seq_lens.tolist()),
        causal=causal,
    )
    counts = torch.tensor([int(c) for c in samples], dtype=torch.int64)
    # sequence i's last counts[i] rows: positions from seq_lens[i] - counts[i] on
    sample_rows = torch.nonzero(positions >= (seq_lens - counts)[seq_of_token]).squeeze(1)
    return StepInputs(
        input_ids=to_device(flat_ids, device, torch.int64),
        positions=to_device(positions, device),
        meta=meta,
        sample_rows=to_device(sample_rows, device),
    )
