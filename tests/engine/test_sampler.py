"""On-device sampler: greedy, filters, penalties, banned tokens, logprobs and per-request determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged.sampler import SamplerFlags, argmax_rows, sample
from jaxpaged.sampling_batch import SamplingBatch, pad_rows, unpack_tensors
from jaxpaged.sampling_params import SamplingParams

_PARAM_FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty")


def row(**kw):
    base = dict(temperature=0.0, seed=0, position=0, penalty_tokens=[], num_prompt_tokens=0, banned_tokens=[],
                logprobs=None)
    base.update(kw)
    return base


_sample = jax.jit(sample, static_argnums=2)


def tensors(rows):
    """The SamplingTensors and flags the runner would build for these rows (one slot each)."""
    batch = SamplingBatch(len(rows))
    for slot, r in enumerate(rows):
        params = SamplingParams(**{k: r[k] for k in _PARAM_FIELDS if k in r}, logprobs=r["logprobs"])
        batch.set(slot, params, r["seed"], r["num_prompt_tokens"])
    slots = np.arange(len(rows), dtype=np.int32)
    floats, ints = batch.gather(slots, np.array([r["position"] for r in rows], np.int32))
    pens = [r["penalty_tokens"] for r in rows]
    penalty = pad_rows(pens, len(rows), 64) if any(pens) else np.full((len(rows), 1), -1, np.int32)
    st = unpack_tensors(jnp.asarray(floats), jnp.asarray(ints), penalty,
                        pad_rows([r["banned_tokens"] for r in rows], len(rows), 8))
    return st, batch.flags(slots)


def run(logits, rows, flags=None):
    st, needed = tensors(rows)
    return _sample(jnp.asarray(logits, jnp.float32), st, flags or needed)


LOGITS = np.log(np.array([[0.1, 0.2, 0.3, 0.4]] * 2))


def test_greedy_picks_argmax_and_reports_raw_logprobs():
    out = run(LOGITS, [row(logprobs=2), row()])
    assert list(out.token_ids) == [3, 3]
    np.testing.assert_allclose(out.logprobs, np.log(0.4), rtol=1e-6)
    assert list(out.ranks) == [1, 1]
    assert list(out.top_ids[0, :4]) == [3, 2, 1, 0]


def test_banned_tokens_are_never_sampled():
    out = run(LOGITS, [row(banned_tokens=[3], logprobs=0), row(banned_tokens=[3, 2])])
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


def test_flags_ask_only_for_the_work_the_rows_need():
    assert tensors([row(), row()])[1] == SamplerFlags(random=False, filter=False, logprobs=False)
    assert tensors([row(), row(temperature=0.7)])[1] == SamplerFlags(random=True, filter=False, logprobs=False)
    assert tensors([row(temperature=0.7, top_p=0.9)])[1] == SamplerFlags(random=True, filter=True, logprobs=False)
    assert tensors([row(top_k=5), row(logprobs=1)])[1] == SamplerFlags(random=False, filter=False, logprobs=True)


def test_minimal_flags_sample_the_same_tokens_as_all_work_enabled():
    logits = np.random.default_rng(0).normal(size=(6, 50)).astype(np.float32)
    rows = [row(), row(temperature=0.9, seed=3, position=2), row(temperature=1.3, seed=4, top_k=7),
            row(temperature=0.5, seed=5, top_p=0.8), row(banned_tokens=[int(np.argmax(logits[4]))]),
            row(temperature=1.0, seed=6, min_p=0.2)]
    everything = run(logits, rows, SamplerFlags(True, True, True)).token_ids
    minimal = run(logits, rows)
    assert minimal.token_ids.tolist() == everything.tolist()
    assert (minimal.logprobs, minimal.top_ids) == (None, None)  # no logprob outputs: the host fills zeros
    greedy_rows = [rows[0], rows[4]]
    assert (run(logits[[0, 4]], greedy_rows).token_ids.tolist()
            == run(logits[[0, 4]], greedy_rows, SamplerFlags(True, True, True)).token_ids.tolist())


@pytest.mark.parametrize("vocab", [7, 128, 1000, 49152])
def test_argmax_rows_is_argmax_with_ties_and_masked_rows(vocab):
    x = np.random.default_rng(vocab).standard_normal((4, vocab)).astype(np.float32)
    x[0] = -np.inf  # every token banned: index 0, as jnp.argmax
    x[1, [2, vocab - 1]] = 50.0  # a tie across blocks: the first index
    x[2, vocab - 1] = 50.0  # the last token, in the padded block when the vocabulary is not a multiple of 128
    got = jax.jit(argmax_rows)(jnp.asarray(x))
    assert got.tolist() == np.argmax(x, axis=-1).tolist() and got.tolist()[:3] == [0, 2, vocab - 1]
