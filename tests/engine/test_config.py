"""EngineArgs rejects out-of-range values with an error that names the argument and the allowed range."""

import pytest

from jaxpaged.config import EngineArgs


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_scheduler_steps=0), "num_scheduler_steps must be 1..64, got 0"),
    (dict(num_scheduler_steps=65), "num_scheduler_steps must be 1..64, got 65"),
    (dict(block_size=24), "block_size must be 8, 16, 32, 64 or 128, got 24"),
])
def test_out_of_range_engine_args_name_the_argument_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(**kwargs)


def test_in_range_engine_args_are_kept():
    assert EngineArgs(num_scheduler_steps=8).num_scheduler_steps == 8
