"""Sampler: filters against transformers' logits processors, seeds, penalties, logprobs."""
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from engine.sampler import Sampler, SamplingRow, apply_penalties, filter_logits
from engine.sampling_params import SamplingParams
from engine.errors import InvalidRequestError


def row(**kw) -> SamplingRow:
    return SamplingRow(SamplingParams(**kw), [], [], None)


@pytest.mark.parametrize(
    "kw",
    [dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8), dict(temperature=1.0, min_p=0.1),
     dict(temperature=0.5, top_k=10, top_p=0.9), dict(temperature=1.0, typical_p=0.5),
     dict(temperature=0.8, top_k=20, typical_p=0.9), dict(temperature=1.2, typical_p=0.2)],
)
def test_filters_keep_the_same_tokens_as_transformers(kw):
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    ours = filter_logits(logits, [row(**kw)] * 4)
    ref = logits.clone()
    ref = TemperatureLogitsWarper(kw["temperature"])(None, ref)
    if kw.get("top_k"):
        ref = TopKLogitsWarper(kw["top_k"])(None, ref)
    if kw.get("top_p"):
        ref = TopPLogitsWarper(kw["top_p"])(None, ref)
    if kw.get("min_p"):
        ref = MinPLogitsWarper(kw["min_p"])(None, ref)
    if kw.get("typical_p"):
        ref = TypicalLogitsWarper(kw["typical_p"])(None, ref)
        assert (~torch.isinf(ref)).sum() < ref.numel() * 0.9  # it did cut: the case can fail
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = ~torch.isinf(ref)
    assert torch.allclose(ours[finite], ref[finite], atol=1e-6)


def test_typical_p_only_on_its_own_rows():
    """A batch mixing typical_p with plain rows cuts only the typical rows."""
    torch.manual_seed(1)
    logits = torch.randn(3, 64) * 2
    ours = filter_logits(logits, [row(typical_p=0.3), row(), row(typical_p=0.95)])
    assert torch.isinf(ours[0]).any() and not torch.isinf(ours[1]).any()
    assert torch.equal(torch.isinf(ours[2]), torch.isinf(TypicalLogitsWarper(0.95)(None, logits[2:3].clone()))[0])


def test_extreme_values_in_range_sample_sensibly():
    """A near-zero temperature or repetition penalty overflows logits to inf; a NaN softmax then
    picked token 0 (even one a grammar masked out). Now the likeliest allowed token wins."""
    logits = torch.randn(3, 50) * 3
    logits[:, 0] = float("-inf")  # masked, as a grammar masks
    logits[:, 7] = 30.0
    sampler = Sampler(torch.Generator().manual_seed(0))
    rows = [SamplingRow(SamplingParams(temperature=5e-324), [], [], None),
            SamplingRow(SamplingParams(temperature=1e-4, repetition_penalty=5e-324), [7], [], None),
            SamplingRow(SamplingParams(temperature=2.0, repetition_penalty=1e-30, top_p=5e-324), [7], [], None)]
    assert rows[0].params.is_greedy and not rows[1].params.is_greedy
    tokens, _ = sampler(logits, rows)
    assert tokens == [7, 7, 7]


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(1)
    logits = torch.randn(1, 30)
    prompt, output = [1, 4, 9], [4, 17]
    ours = apply_penalties(logits, [SamplingRow(SamplingParams(repetition_penalty=1.3), prompt, output, None)])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), logits.clone())
    assert torch.allclose(ours, ref)


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.zeros(1, 10)
    r = SamplingRow(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [3], [2, 2, 7], None)
    out = apply_penalties(logits, [r])
    assert out[0, 2] == pytest.approx(-0.5 - 0.5)
    assert out[0, 7] == pytest.approx(-0.5 - 0.25)
    assert out[0, 3] == 0.0  # prompt tokens are not penalised by presence/frequency


def test_greedy_and_seeded_sampling_independent_of_batch():
    torch.manual_seed(2)
    logits = torch.randn(3, 100)
    sampler = Sampler(torch.Generator().manual_seed(0))
    greedy, _ = sampler(logits, [row(temperature=0.0)] * 3)
    assert greedy == logits.argmax(-1).tolist()

    def seeded(rows_before: int) -> list[int]:
        tokens = []
        gen = torch.Generator().manual_seed(1234)
        for _ in range(5):
            batch = torch.cat([torch.randn(rows_before, 100), logits[:1]])
            rows = [row(temperature=1.0)] * rows_before + [SamplingRow(SamplingParams(seed=1234), [], [], gen)]
            out, _ = sampler(batch, rows)
            tokens.append(out[-1])
        return tokens

    assert seeded(0) == seeded(5)


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    sampler = Sampler(torch.Generator().manual_seed(0))
    counts = torch.zeros(3)
    for _ in range(2000):
        tok, _ = sampler(logits, [row(temperature=1.0)])
        counts[tok[0]] += 1
    assert torch.allclose(counts / 2000, torch.tensor([0.7, 0.2, 0.1]), atol=0.04)


def test_logprobs_are_raw_log_softmax_with_top_n():
    torch.manual_seed(3)
    logits = torch.randn(1, 20)
    sampler = Sampler(torch.Generator().manual_seed(0))
    tokens, lps = sampler(logits, [row(temperature=0.0, logprobs=3)])
    ref = logits.log_softmax(-1)[0]
    assert lps[0].token_id == tokens[0]
    assert lps[0].logprob == pytest.approx(float(ref[tokens[0]]), abs=1e-6)
    top = ref.topk(3)
    assert list(lps[0].top) == top.indices.tolist()


@pytest.mark.parametrize(
    "kw", [dict(temperature=-1), dict(top_p=2), dict(top_p=0), dict(n=0), dict(max_tokens=-1),
           dict(top_k=-5), dict(min_p=1.5), dict(typical_p=0), dict(typical_p=1.5), dict(logprobs=50), dict(stop=("",)), dict(repetition_penalty=0),
           dict(seed=2**63), dict(seed=-(2**63) - 1), dict(num_beams=17), dict(no_repeat_ngram_size=-1),
           dict(length_penalty=10.5), dict(length_penalty=-1e111)],
)
def test_out_of_range_parameters_raise(kw):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kw)
    assert err.value.param == next(iter(kw))


def test_bounds_edges_and_messages():
    from engine.sampling_params import Bound
    assert Bound(0.0, 1.0, low_open=True).holds(1.0) and not Bound(0.0, 1.0, low_open=True).holds(0.0)
    assert Bound(-1).holds(-1) and not Bound(-1).holds(-2) and Bound(-1).holds(10**30)
    assert str(Bound(0.0, 1.0, low_open=True)) == "in (0, 1]" and str(Bound(1)) == ">= 1"
    assert str(Bound(-(2**63), 2**63 - 1)) == f"in [{-(2**63)}, {2**63 - 1}]"
    SamplingParams(seed=2**63 - 1, n=16, top_p=1.0, temperature=2.0, top_k=-1, logprobs=20)  # all at the edge
