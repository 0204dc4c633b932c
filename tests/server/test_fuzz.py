"""Hypothesis fuzzing of the two POST endpoints: any body gives 2xx or 4xx, never 5xx (bounded in count)."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import MODEL

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.floats(-3, 3, allow_nan=False),
                    st.text(max_size=12))
values = st.one_of(scalars, st.lists(scalars, max_size=4), st.lists(st.integers(-2, 60000), max_size=6))
COMMON = {"model": st.sampled_from([MODEL, "other", None]), "max_tokens": st.one_of(st.integers(-1, 4), values),
          "temperature": values, "top_p": values, "top_k": values, "min_p": values, "n": st.integers(-1, 3),
          "stop": values, "seed": values, "presence_penalty": values, "repetition_penalty": values,
          "min_tokens": st.integers(-1, 3), "stop_token_ids": values, "stream": st.booleans(),
          "ignore_eos": values}
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]),
                                           "content": st.one_of(st.text(max_size=20), st.none())}), max_size=3)
completion_bodies = st.fixed_dictionaries({"prompt": values}, optional={**COMMON, "logprobs": values,
                                                                        "echo": values})
chat_bodies = st.fixed_dictionaries({"messages": st.one_of(messages, values)},
                                    optional={**COMMON, "logprobs": values, "top_logprobs": values,
                                              "max_completion_tokens": st.integers(-1, 4)})
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


def check(http, path, body):
    body.setdefault("max_tokens", 2)
    r = http.post(path, json=body)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert "error" in r.json()


@FUZZ
@given(body=completion_bodies)
def test_fuzz_completions(http, body):
    check(http, "/v1/completions", body)


@FUZZ
@given(body=chat_bodies)
def test_fuzz_chat(http, body):
    check(http, "/v1/chat/completions", body)
