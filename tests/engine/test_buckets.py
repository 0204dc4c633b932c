"""Bucket shapes: every step shape the runner can ask for is compiled at warm-up, and no more."""

import pytest

from jaxpaged.buckets import Buckets


@pytest.mark.parametrize("tokens,seqs", [(8192, 256), (256, 16), (512, 32), (2048, 128), (64, 8), (1000, 24)])
def test_every_step_shape_is_among_the_compiled_ones_and_each_compiled_one_is_reachable(tokens, seqs):
    b = Buckets(tokens, seqs)
    reached = {b.shape(t, s) for t in range(1, tokens + 1) for s in range(1, min(t, seqs) + 1)}
    assert reached == set(b.all_shapes())


def test_large_token_buckets_keep_only_the_top_sequence_bucket():
    b = Buckets(8192, 256)
    assert len(b.all_shapes()) == 30  # 50 with every sequence bucket under every token bucket
    assert b.shape(1024, 3) == (1024, 256) and b.shape(900, 3) == (1024, 256)
    assert b.shape(512, 3) == (512, 8) and b.shape(17, 9) == (32, 16)
    assert [s for t, s in b.all_shapes() if t >= 1024] == [256] * 4
