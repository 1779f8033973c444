"""Host cost of the engine's bookkeeping alone: Scheduler + BlockManager per decode step, no model.

Each of `batch` sequences has a 59-token prompt and decodes; a step is `schedule()` then `update()`
with one token per sequence. Prefix caching on and off, so its cost (naming each block as it
fills, a SHA-256 per block) is measured against the same loop without it.

    python benchmarks/bench_bookkeeping.py [--batches 1,8,64] [--steps 1000]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, table  # noqa: E402
from engine.block_manager import BlockManager  # noqa: E402
from engine.config import SchedulerConfig  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.scheduler import Scheduler  # noqa: E402
from engine.sequence import Sequence  # noqa: E402


def us_per_step(batch: int, steps: int, prefix_caching: bool, block_size: int = 16) -> float:
    bm = BlockManager(4096, block_size, prefix_caching)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=4096, max_num_seqs=256, max_model_len=4096), bm)
    for i in range(batch):
        sched.add(Sequence(i, f"r{i}", list(range(i, i + 59)), 59, SamplingParams(ignore_eos=True), steps + 8))
    out = sched.schedule()  # the prefills
    sched.update(out, [7] * len(out.seqs))
    start = time.perf_counter()
    for k in range(steps):
        out = sched.schedule()
        sched.update(out, [k % 300 + 5] * len(out.seqs))
    return (time.perf_counter() - start) / steps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--steps", type=int, default=1000)
    args = ap.parse_args()
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        off, on = (min(us_per_step(batch, args.steps, cache) for _ in range(3)) for cache in (False, True))
        rows.append([batch, off, on, on - off])
    print(f"Machine: {machine()}\n")
    print(table(["batch", "us/step, no prefix caching", "us/step, prefix caching", "difference"], rows))


if __name__ == "__main__":
    main()
