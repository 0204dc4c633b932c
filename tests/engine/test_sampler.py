"""On-device sampler: greedy, filters, penalties, banned tokens, logprobs and per-request determinism."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.sampling_batch import HostSampling, SeqSampling
from jaxpaged.sampler import sample


def row(**kw):
    base = dict(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, seed=0, position=0, presence_penalty=0.0,
                frequency_penalty=0.0, repetition_penalty=1.0, penalty_tokens=None, num_prompt_tokens=0,
                banned_tokens=[])
    base.update(kw)
    return SeqSampling(**base)


_sample = jax.jit(sample)


def run(logits, rows):
    st = HostSampling(rows).to_tensors(len(rows))
    return _sample(jnp.asarray(logits, jnp.float32), st)


LOGITS = np.log(np.array([[0.1, 0.2, 0.3, 0.4]] * 2))


def test_greedy_picks_argmax_and_reports_raw_logprobs():
    out = run(LOGITS, [row(), row()])
    assert list(out.token_ids) == [3, 3]
    np.testing.assert_allclose(out.logprobs, np.log(0.4), rtol=1e-6)
    assert list(out.ranks) == [1, 1]
    assert list(out.top_ids[0, :4]) == [3, 2, 1, 0]


def test_banned_tokens_are_never_sampled():
    out = run(LOGITS, [row(banned_tokens=[3]), row(banned_tokens=[3, 2])])
    assert list(out.token_ids) == [2, 1]
    assert list(out.ranks) == [2, 3]


def test_top_k_one_equals_greedy_at_any_temperature():
    out = run(LOGITS, [row(temperature=5.0, top_k=1, seed=s) for s in (1, 2)])
    assert list(out.token_ids) == [3, 3]


def test_top_p_keeps_smallest_prefix_reaching_p():
    # sorted 0.4, 0.3, 0.2, 0.1: top_p=0.5 keeps {3, 2}
    seen = set()
    for seed in range(40):
        seen |= set(run(LOGITS, [row(temperature=1.0, top_p=0.5, seed=seed)] * 2).token_ids.tolist())
    assert seen == {2, 3}


def test_min_p_drops_unlikely_tokens():
    seen = set()
    for seed in range(40):
        seen |= set(run(LOGITS, [row(temperature=1.0, min_p=0.6, seed=seed)] * 2).token_ids.tolist())
    assert seen == {2, 3}  # 0.3 >= 0.6 * 0.4, 0.2 < 0.24


def test_same_seed_and_position_give_same_token_in_any_batch():
    alone = run(np.tile(LOGITS[:1], (1, 1)), [row(temperature=1.0, seed=7, position=3)]).token_ids[0]
    batch = run(np.tile(LOGITS[:1], (3, 1)), [row(temperature=1.0, seed=s, position=3) for s in (1, 7, 9)])
    assert batch.token_ids[1] == alone


def test_repetition_and_frequency_penalties_shift_choice():
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4]]))
    out = run(logits, [row(repetition_penalty=2.0, penalty_tokens=[3], num_prompt_tokens=1)])
    assert out.token_ids[0] == 2  # log(0.4) * 2 < log(0.3)
    # frequency applies to output tokens only: token 3 appears twice in the output
    out = run(logits, [row(frequency_penalty=0.2, penalty_tokens=[0, 3, 3], num_prompt_tokens=1)])
    assert out.token_ids[0] == 2  # log(.4) - .4 = -1.32 < log(.3) = -1.20
    out = run(logits, [row(frequency_penalty=0.2, penalty_tokens=[3, 3, 0], num_prompt_tokens=2)])
    assert out.token_ids[0] == 3  # prompt occurrences do not count
