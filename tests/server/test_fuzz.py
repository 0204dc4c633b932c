"""Fuzzing the two POST endpoints against the real engine: any body gives 2xx or 4xx, never 5xx (bounded).

schemathesis generates bodies from the server's own OpenAPI schema (valid and invalid ones); a hypothesis strategy
adds wrong-typed and out-of-range values the schema's shape does not suggest. Generation lengths are clamped to a
few tokens so that each example costs a few engine steps at most.
"""

import json

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxpaged.config import EngineArgs
from jaxpaged.server.app import build_app
from tests.server.conftest import API_KEY, MODEL

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
MAX_TOKENS = 3


def clamp(body) -> None:
    """Keeps every accepted request cheap: at most 4 prompts, 4 choices and MAX_TOKENS tokens per choice."""
    if not isinstance(body, dict):
        return
    if isinstance(body.get("prompt"), list) and body["prompt"] and isinstance(body["prompt"][0], (list, str)):
        body["prompt"] = body["prompt"][:4]
    if isinstance(body.get("n"), (int, float)) and not isinstance(body["n"], bool) and body["n"] > 4:
        body["n"] = 4
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        # floats too: the server takes an integral float such as 948.0 as max_tokens
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_TOKENS:
            body[key] = MAX_TOKENS
    if body.get("max_completion_tokens") is None and body.get("max_tokens") is None:
        body["max_tokens"] = MAX_TOKENS  # missing or null: the request would otherwise fill the context


# The schema of an app that is never started: the same routes and models as the server under test.
schema = schemathesis.openapi.from_dict(build_app(EngineArgs()).openapi())


@schema.include(method="POST", path_regex="^/v1/").parametrize()
@FUZZ
def test_schemathesis_post_endpoints_never_5xx(case, server):
    clamp(case.body)
    response = case.call(base_url=server[0], headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
    assert response.status_code < 500, (case.body, response.text)
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=12))
values = st.one_of(scalars, st.lists(scalars, max_size=4), st.lists(st.integers(-2, 60000), max_size=6),
                   st.dictionaries(st.text(max_size=5), scalars, max_size=2))
COMMON = {"model": st.sampled_from([MODEL, "other", None]), "max_tokens": st.one_of(st.integers(-1, 4), values),
          "temperature": values, "top_p": values, "top_k": values, "min_p": values, "n": st.integers(-1, 3),
          "stop": values, "seed": values, "presence_penalty": values, "repetition_penalty": values,
          "min_tokens": st.integers(-1, 3), "stop_token_ids": values, "stream": st.booleans(),
          "stream_options": values, "ignore_eos": values}
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]),
                                           "content": st.one_of(st.text(max_size=20), st.none(), values)}),
                    max_size=3)
completion_bodies = st.fixed_dictionaries({"prompt": values}, optional={**COMMON, "logprobs": values,
                                                                        "echo": values, "suffix": values})
chat_bodies = st.fixed_dictionaries({"messages": st.one_of(messages, values)},
                                    optional={**COMMON, "logprobs": values, "top_logprobs": values,
                                              "max_completion_tokens": st.integers(-1, 4)})


def post(http, path, body):
    clamp(body)
    r = http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})  # NaN as NaN
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@FUZZ
@given(body=completion_bodies)
def test_hypothesis_completions_never_5xx(http, body):
    post(http, "/v1/completions", body)


@FUZZ
@given(body=chat_bodies)
def test_hypothesis_chat_never_5xx(http, body):
    post(http, "/v1/chat/completions", body)
