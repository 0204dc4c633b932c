"""The official openai client against the real engine: completions, chat, streaming, n, logprobs, stop, seed."""

import json
import os

from tests.server.conftest import MODEL

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_list(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_plain(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == MODEL
    assert "Paris" in r.choices[0].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 8 and r.usage.total_tokens == 13


def test_completion_from_token_ids_equals_text_prompt(client):
    text = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    ids = client.completions.create(model=MODEL, prompt=[504, 3575, 282, 4649, 314], max_tokens=6, temperature=0)
    assert ids.choices[0].text == text.choices[0].text


def test_completion_stream_with_usage_equals_plain(client):
    plain = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == plain.choices[0].text
    assert all(c.choices and c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert chunks[-2].choices[0].finish_reason == "length"


def test_chat_plain_mentions_paris(client):
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=30)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert "Paris" in r.choices[0].message.content


def test_chat_without_max_tokens_stops_at_eos(client):
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0)
    assert r.choices[0].finish_reason == "stop" and "Paris" in r.choices[0].message.content


def test_chat_stream_first_delta_has_role_and_usage_last(client):
    msgs = [{"role": "user", "content": "Name three colors."}]
    plain = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=12)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == plain.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens) == (
        plain.usage.prompt_tokens, plain.usage.completion_tokens)
    assert usage.prompt_tokens_details.cached_tokens > 0  # the same prompt as `plain`: served from the cache


def test_n2_and_seed_reproducibility(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, n=2, seed=42)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text
    assert a.usage.completion_tokens == 24 and a.usage.prompt_tokens == 4


def test_chat_n2_streamed(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=6, n=2, seed=7,
                                                 stream=True))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason is not None


def test_logprobs_completion_and_chat(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.token_logprobs) == 3
    assert all(len(t) >= 2 for t in lp.top_logprobs) and all(x <= 0 for x in lp.token_logprobs)
    assert lp.token_logprobs[0] == max(lp.top_logprobs[0].values())  # greedy: the sampled token is the top one
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob
    assert content[0].logprob == content[0].top_logprobs[0].logprob


def test_echo_with_logprobs_scores_the_prompt_tokens_first(client, server):
    prompt = "The capital of France is"
    kw = dict(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=1, echo=True)
    r = client.completions.create(**kw)
    lp, text = r.choices[0].logprobs, r.choices[0].text
    ids = server[1].tokenizer.encode(prompt)
    assert text.startswith(prompt) and "".join(lp.tokens) == text
    assert len(lp.tokens) == len(ids) + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:]) and all(len(t) >= 1 for t in lp.top_logprobs[1:])
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    plain = client.completions.create(**{**kw, "echo": False}).choices[0].logprobs
    assert lp.token_logprobs[len(ids):] == plain.token_logprobs
    chunks = list(client.completions.create(**kw, stream=True))
    streamed = [x for c in chunks for x in c.choices[0].logprobs.token_logprobs]
    assert "".join(c.choices[0].text for c in chunks) == text and streamed == lp.token_logprobs
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == lp.text_offset


def test_use_beam_search_returns_the_beams_best_first(client, server):
    with open(os.path.join(os.path.dirname(__file__), "..", "fixtures", "smollm2_beams.json")) as f:
        case = json.load(f)["cases"][0]  # EOS disabled, 4 beams of 8 tokens, as HF transformers finds them
    r = client.completions.create(model=MODEL, prompt=case["prompt"], max_tokens=8, n=4,
                                  extra_body={"use_beam_search": True, "ignore_eos": True})
    tok = server[1].tokenizer
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [tok.decode(ids) for ids in case["hf_token_ids"]]
    assert r.usage.completion_tokens == 32
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                          n=2, extra_body={"use_beam_search": True, "length_penalty": 0.5})
    assert len(chat.choices) == 2 and chat.choices[0].message.content != chat.choices[1].message.content


def test_stop_string_and_stop_reason(client):
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 7"])
    assert r.choices[0].text == " 5, 6," and r.choices[0].finish_reason == "stop"
    assert r.choices[0].stop_reason == " 7"


def test_vllm_extras_in_extra_body(client):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0.8, seed=1,
                                  extra_body={"top_k": 5, "min_p": 0.05, "ignore_eos": True, "min_tokens": 5,
                                              "repetition_penalty": 1.1})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_repeated_prompt_reports_cached_tokens(client):
    prompt = "A long shared preamble about the history of European capitals and rivers. " * 4
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens > 32
    assert second.usage.prompt_tokens_details.cached_tokens >= 32
