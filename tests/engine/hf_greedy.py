"""The HF transformers greedy fixture of the embedded model (tests/make_fixtures.py) and its token-exact check."""

import json
import os

import pytest

from jaxpaged import SamplingParams

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "smollm2_greedy.json")
needs_fixture = pytest.mark.skipif(not os.path.exists(FIXTURE), reason="HF greedy fixture not generated")


def assert_greedy_matches_hf(llm) -> None:
    """Generates the fixture's prompts greedily (ignore_eos, as many tokens as HF did); asserts HF's token ids."""
    with open(FIXTURE) as f:
        cases = json.load(f)["cases"]
    params = SamplingParams(temperature=0, max_tokens=len(cases[0]["hf_token_ids"]), ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": c["prompt_token_ids"]} for c in cases], params, use_tqdm=False)
    for case, out in zip(cases, outs):
        assert out.outputs[0].token_ids == case["hf_token_ids"], case.get("prompt")
