"""The resumable distributed sampler: coverage, no duplicates, world-size independent state."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distrain.data.sampler import ResumableSampler, eval_batches, even_slice


def epoch_indices(n, g, w, seed=0, epoch_state=None, stop_after=None):
    """Indices every rank sees in one epoch (real samples only), per rank."""
    samplers = [ResumableSampler(n, g, max(1, g // w), w, r, seed) for r in range(w)]
    if epoch_state:
        for s in samplers:
            s.load_state_dict(epoch_state)
    seen = [[] for _ in range(w)]
    steps = 0
    while not samplers[0].epoch_done and (stop_after is None or steps < stop_after):
        batches = [s.next_step() for s in samplers]
        assert len({len(b.micro_batches) for b in batches}) == 1  # every rank runs the same number of micro-steps
        for r, b in enumerate(batches):
            for m, real in zip(b.micro_batches, b.real):
                seen[r] += m[:real].tolist()
        steps += 1
    return seen, samplers[0].state_dict()


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 300), g=st.integers(1, 64), w=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_epoch_covers_every_index_exactly_once(n, g, w, seed):
    g = max(w, g - g % w)
    seen, _ = epoch_indices(n, g, w, seed)
    flat = [i for rank in seen for i in rank]
    assert sorted(flat) == list(range(n))


@settings(max_examples=100, deadline=None)
@given(n=st.integers(10, 200), g=st.sampled_from([4, 8, 12]), w1=st.sampled_from([1, 2, 4]),
       w2=st.sampled_from([1, 2, 4]), cut=st.integers(1, 10))
def test_resume_on_another_world_size_loses_and_repeats_nothing(n, g, w1, w2, cut):
    before, state = epoch_indices(n, g, w1, stop_after=cut)
    if state["position"] >= n:
        return
    after, _ = epoch_indices(n, g, w2, epoch_state=state)
    flat = [i for r in before + after for i in r]
    assert sorted(flat) == list(range(n))


def test_permutation_depends_on_seed_and_epoch_only():
    a = ResumableSampler(50, 10, 10, 1, 0, seed=3)
    b = ResumableSampler(50, 10, 10, 1, 0, seed=3)
    first = [a.next_step().micro_batches[0] for _ in range(5)]
    assert all(torch.equal(x, b.next_step().micro_batches[0]) for x in first)
    second = a.next_step().micro_batches[0]
    assert a.epoch == 1 and not torch.equal(second, first[0])
    assert not torch.equal(ResumableSampler(50, 10, 10, 1, 0, seed=4).next_step().micro_batches[0], first[0])


def test_state_is_two_integers():
    s = ResumableSampler(100, 8, 4, 2, 1, seed=0)
    s.next_step()
    assert s.state_dict() == {"epoch": 0, "position": 8}


def test_short_last_batch_gives_idle_ranks_a_zero_weight_stand_in():
    samplers = [ResumableSampler(9, 8, 4, 4, r, seed=0) for r in range(4)]
    for s in samplers:
        s.next_step()
    tail = [s.next_step() for s in samplers]  # one sample left for four ranks
    assert [b.real for b in tail] == [[1], [0], [0], [0]]
    assert all(b.global_size == 1 and len(b.micro_batches[0]) == 1 for b in tail)


@given(n=st.integers(1, 100), bs=st.integers(1, 16), w=st.integers(1, 5))
def test_eval_batches_cover_once_with_equal_counts(n, bs, w):
    per_rank = [eval_batches(n, bs, w, r) for r in range(w)]
    assert len({len(p) for p in per_rank}) == 1
    flat = sorted(i for p in per_rank for _, idx in p for i in idx)
    assert flat == list(range(n))


def test_even_slice():
    assert [even_slice(10, 3, i) for i in range(3)] == [(0, 4), (4, 7), (7, 10)]
