"""Fixtures shared by the engine tests."""

import json
import os

import pytest

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")


@pytest.fixture(scope="session")
def eight_heads(tmp_path_factory) -> str:
    """An untied Llama config with 8 query and 2 KV heads (dummy weights), so that TP goes up to 8."""
    with open(os.path.join(FIXTURES, "llama2_mha_untied", "config.json")) as f:
        cfg = json.load(f)
    cfg.update(num_attention_heads=8, num_key_value_heads=2, hidden_size=128, head_dim=16, intermediate_size=192)
    path = tmp_path_factory.mktemp("eight_heads") / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.fixture
def ran(monkeypatch) -> list[tuple]:
    """The keys of the programs `run_once` ran, in order; the first runs forced on (as on a GPU)."""
    from jaxpaged import runner as runner_module

    keys, real_run_once = [], runner_module.run_once

    def recorded(runner, key, program):
        keys.append(key)
        real_run_once(runner, key, program)

    monkeypatch.setattr(runner_module, "RUN_ONCE_PLATFORMS", ("cpu",))
    monkeypatch.setattr(runner_module, "run_once", recorded)
    return keys
