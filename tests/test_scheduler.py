"""Scheduler: token budget, chunked prefill, admission limits and preemption order (no torch)."""
from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus

EOS = 99


def make_seq(seq_id: int, num_tokens: int, max_tokens: int = 8) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", list(range(num_tokens)), num_tokens, SamplingParams(), max_tokens)


def make_scheduler(num_blocks: int = 16, block_size: int = 4, budget: int = 16, max_seqs: int = 8):
    bm = BlockManager(num_blocks, block_size)
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=64)
    return Scheduler(cfg, bm, frozenset({EOS})), bm


def step(sched: Scheduler, token: int = 7):
    out = sched.schedule()
    sampled = [token if samples else None for samples in out.sampling]
    return out, sched.update(out, sampled)


def test_chunked_prefill_then_decode_shares_budget():
    sched, bm = make_scheduler(budget=10)
    a, b = make_seq(0, 14), make_seq(1, 3)
    sched.add(a)
    sched.add(b)
    out, _ = step(sched)
    assert [s.seq_id for s in out.seqs] == [0] and out.num_new_tokens == [10]
    assert not out.sampling[0] and a.num_computed_tokens == 10 and a.num_tokens == 14
    out, _ = step(sched)
    # a finishes its prompt (4) and samples; b gets the rest of the budget (3) and samples
    assert [s.seq_id for s in out.seqs] == [0, 1] and out.num_new_tokens == [4, 3]
    assert a.num_tokens == 15 and b.num_tokens == 4
    out, _ = step(sched)
    assert out.num_new_tokens == [1, 1]
    assert a.block_table == [0, 1, 2, 3] and b.block_table == [4]


def test_max_num_seqs_limits_admission():
    sched, _ = make_scheduler(budget=100, max_seqs=2)
    seqs = [make_seq(i, 2) for i in range(3)]
    for s in seqs:
        sched.add(s)
    out, _ = step(sched)
    assert [s.seq_id for s in out.seqs] == [0, 1]
    assert seqs[2].status is SequenceStatus.WAITING


def test_preempts_newest_and_resumes_it_first():
    # 4 blocks of 2 tokens: two sequences of 3 tokens take 2 blocks each; growing needs more
    sched, bm = make_scheduler(num_blocks=4, block_size=2, budget=16)
    a, b = make_seq(0, 3), make_seq(1, 3)
    sched.add(a)
    sched.add(b)
    step(sched)  # both prefilled: a=[0,1], b=[2,3], each sampled (4 tokens)
    assert a.block_table == [0, 1] and b.block_table == [2, 3] and bm.num_free_blocks == 0
    out, _ = step(sched)  # each decode fits in its second block
    assert out.num_new_tokens == [1, 1] and not out.preempted
    out, _ = step(sched)  # a needs a third block: b (newest) is preempted
    assert out.preempted == [b] and [s.seq_id for s in out.seqs] == [0]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert a.block_table == [0, 1, 3] and sched.waiting[0] is b and sched.num_preemptions == 1
    assert b.num_tokens == 5  # its sampled tokens are kept and will be recomputed


def test_finishes_on_eos_and_length_and_frees_blocks():
    sched, bm = make_scheduler()
    a, b = make_seq(0, 3, max_tokens=2), make_seq(1, 3, max_tokens=5)
    sched.add(a)
    sched.add(b)
    _, finished = step(sched, token=7)
    assert finished == []
    out = sched.schedule()
    finished = sched.update(out, [7, EOS])
    assert {s.seq_id for s in finished} == {0, 1}
    assert a.finish_reason == "length" and b.finish_reason == "stop"
    assert bm.num_free_blocks == 16 and not sched.has_unfinished()


def test_ignore_eos_and_stop_token_ids():
    sched, _ = make_scheduler()
    a = Sequence(0, "r0", [1, 2], 2, SamplingParams(ignore_eos=True, stop_token_ids=(5,)), 8)
    sched.add(a)
    out = sched.schedule()
    assert sched.update(out, [EOS]) == []
    out = sched.schedule()
    assert sched.update(out, [5]) == [a] and a.stop_reason == 5


def test_abort_waiting_and_running_frees_everything():
    sched, bm = make_scheduler(budget=4)
    a, b = make_seq(0, 4), make_seq(1, 4)
    sched.add(a)
    sched.add(b)
    step(sched)
    sched.finish(a, "abort")
    sched.finish(b, "abort")
    assert bm.num_free_blocks == 16 and not sched.has_unfinished()
    bm.check_integrity()


def test_never_deadlocks_under_pressure():
    # a pool that holds one 16-token sequence; 6 sequences must all finish
    sched, bm = make_scheduler(num_blocks=4, block_size=4, budget=8)
    seqs = [make_seq(i, 3 + i, max_tokens=16 - 3 - i) for i in range(6)]
    for s in seqs:
        sched.add(s)
    for _ in range(500):
        if not sched.has_unfinished():
            break
        step(sched)
    assert all(s.finish_reason == "length" for s in seqs)
    assert bm.num_free_blocks == 4 and sched.num_preemptions > 0


def test_a_token_in_flight_is_scheduled_as_the_next_input():
    """advance() without land(): the sampled token is on the device; the next step computes it."""
    sched, bm = make_scheduler(block_size=4)
    a = make_seq(0, 4, max_tokens=5)
    sched.add(a)
    out = sched.schedule()
    assert out.sampling == [True]
    sched.advance(out)
    assert a.num_computed_tokens == 4 and a.num_inflight == 1 and a.num_tokens == 4
    ahead = sched.schedule()
    assert ahead.seqs == [a] and ahead.num_new_tokens == [1] and ahead.sampling == [True]
    assert len(a.block_table) == 2  # position 4 opens a second block
    sched.advance(ahead)
    assert a.num_inflight == 2
    assert sched.land(out, [7]) == [] and a.token_ids[-1] == 7 and a.num_inflight == 1
    assert sched.land(ahead, [8]) == [] and a.token_ids[-2:] == [7, 8] and a.num_inflight == 0


def test_a_sequence_whose_token_in_flight_is_its_last_is_not_scheduled():
    sched, bm = make_scheduler(block_size=4)
    a, b = make_seq(0, 3, max_tokens=2), make_seq(1, 3, max_tokens=5)
    sched.add(a)
    sched.add(b)
    step(sched)  # both prefill and sample their first token
    out = sched.schedule()
    sched.advance(out)  # a's second token, its last, is in flight
    ahead = sched.schedule()
    assert ahead.seqs == [b]
    assert sched.land(out, [7, 7]) == [a] and a.finish_reason == "length"
    assert bm.num_free_blocks == 16 - len(b.block_table)


def test_landing_drops_the_token_of_a_sequence_finished_meanwhile():
    sched, bm = make_scheduler()
    a = make_seq(0, 3)
    sched.add(a)
    step(sched)
    out = sched.schedule()
    sched.advance(out)
    sched.finish(a, "abort")
    assert sched.land(out, [7]) == [] and a.num_tokens == 4 and bm.num_free_blocks == 16


def test_admission_starts_from_the_cached_prefix():
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=8, max_model_len=64), bm,
                      frozenset({EOS}))
    a, b = make_seq(0, 10), make_seq(1, 10)  # the same 10 tokens
    sched.add(a)
    sched.add(b)
    out, _ = step(sched)
    # a computes all 10; b, admitted in the same step, finds a's two full blocks named already
    assert out.num_new_tokens == [10, 2] and b.block_table[:2] == a.block_table[:2]
    assert (b.num_cached_tokens, a.num_cached_tokens) == (8, 0)
    assert (sched.num_prefix_queried_tokens, sched.num_prefix_hit_tokens) == (20, 8)
    bm.check_integrity()


def test_admission_that_does_not_fit_gives_the_cached_blocks_back():
    bm = BlockManager(4, 4, enable_prefix_caching=True)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=8, max_model_len=64), bm,
                      frozenset({EOS}))
    a = make_seq(0, 9, max_tokens=4)
    sched.add(a)
    step(sched)  # a holds 3 blocks, 2 of them named
    b = make_seq(1, 20)  # shares a's 2 named blocks, needs 3 more: only 1 is free
    sched.add(b)
    out, _ = step(sched)
    assert out.seqs == [a] and b.block_table == [] and b.num_computed_tokens == 0
    assert bm.ref_count(a.block_table[0]) == 1 and sched.num_prefix_hit_tokens == 0
    bm.check_integrity()


def make_priority_scheduler(num_blocks: int = 16, block_size: int = 4, budget: int = 16, max_seqs: int = 8):
    bm = BlockManager(num_blocks, block_size)
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=64, policy="priority")
    return Scheduler(cfg, bm, frozenset({EOS})), bm


def ranked(seq_id: int, num_tokens: int, priority: int, arrival: float, max_tokens: int = 8) -> Sequence:
    seq = make_seq(seq_id, num_tokens, max_tokens)
    seq.priority, seq.arrival_time = priority, arrival
    return seq


def test_priority_admits_by_priority_then_arrival():
    sched, _ = make_priority_scheduler(budget=100, max_seqs=1)
    seqs = [ranked(0, 2, 2, 0.0), ranked(1, 2, 0, 1.0), ranked(2, 2, 1, 2.0), ranked(3, 2, 0, 3.0)]
    for s in seqs:
        sched.add(s)
    assert [s.seq_id for s in sched.waiting] == [1, 3, 2, 0]
    out, _ = step(sched)
    assert [s.seq_id for s in out.seqs] == [1]  # one seat: the earliest of the highest priority
    # fcfs keeps arrival order whatever the priorities
    fcfs, _ = make_scheduler(budget=100, max_seqs=1)
    for s in [ranked(i, 2, p, float(i)) for i, p in enumerate((2, 0, 1))]:
        fcfs.add(s)
    assert [s.seq_id for s in fcfs.schedule().seqs] == [0]


def test_priority_preempts_the_lowest_ranked_not_the_newest():
    # 4 blocks of 2 tokens: two 3-token sequences take 2 blocks each; the next decode needs a third
    sched, bm = make_priority_scheduler(num_blocks=4, block_size=2, budget=16)
    low, high = ranked(0, 3, 5, 0.0), ranked(1, 3, 1, 1.0)  # the older one is the less important
    sched.add(low)
    sched.add(high)
    step(sched)
    assert [s.seq_id for s in sched.running] == [1, 0]  # kept in rank order
    assert step(sched)[0].preempted == []  # the 4th tokens fit the blocks they have
    out, _ = step(sched)
    assert out.preempted == [low] and [s.seq_id for s in out.seqs] == [1]
    assert low.status is SequenceStatus.WAITING and low.num_computed_tokens == 0 and high.num_tokens == 6
    bm.check_integrity()


def test_a_waiting_request_preempts_running_ones_it_outranks():
    sched, bm = make_priority_scheduler(budget=100, max_seqs=2)
    a, b = ranked(0, 2, 3, 0.0), ranked(1, 2, 1, 1.0)
    sched.add(a)
    sched.add(b)
    step(sched)
    same = ranked(2, 2, 1, 2.0)  # outranks a, but only by priority 1 vs 3: it takes a's seat
    sched.add(same)
    out, _ = step(sched)
    assert out.preempted == [a] and sorted(s.seq_id for s in out.seqs) == [1, 2]
    later = ranked(3, 2, 1, 3.0)  # ranks below both running ones (same priority, later): it waits
    sched.add(later)
    out, _ = step(sched)
    assert out.preempted == [] and [s.seq_id for s in sched.waiting] == [3, 0]
    # too few free blocks (not seats) also make room: 3 blocks of 4, two running hold 2
    sched, bm = make_priority_scheduler(num_blocks=3, block_size=4, budget=100)
    low, mid = ranked(0, 3, 2, 0.0), ranked(1, 3, 1, 1.0)
    sched.add(low)
    sched.add(mid)
    step(sched)
    urgent = ranked(2, 8, 0, 2.0)  # 8 tokens: 2 blocks, 1 free
    sched.add(urgent)
    out, _ = step(sched)
    assert out.preempted == [low] and urgent.status is SequenceStatus.RUNNING and mid.status is SequenceStatus.RUNNING
    bm.check_integrity()


def test_priority_runs_every_sequence_to_the_end():
    sched, bm = make_priority_scheduler(num_blocks=6, block_size=2, budget=8, max_seqs=3)
    seqs = [ranked(i, 1 + i % 3, (i * 7) % 4, float(i), max_tokens=5) for i in range(8)]
    finished = []
    for s in seqs[:4]:
        sched.add(s)
    for n in range(300):
        if n == 3:
            for s in seqs[4:]:
                sched.add(s)
        _, done = step(sched)
        finished += done
        bm.check_integrity()
        if not sched.has_unfinished():
            break
    assert sorted(s.seq_id for s in finished) == list(range(8)) and bm.num_free_blocks == 6
    assert all(s.num_output_tokens == 5 for s in seqs)
