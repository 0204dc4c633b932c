"""Incremental detokenization: multi-byte characters split over tokens, stop strings and hold-back."""

from jaxpaged.detokenizer import IncrementalDetokenizer


def feed(tok, text, **kw):
    prompt = tok.encode("Say:")
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt, **kw)
    seen = []
    for i, t in enumerate(ids):
        stop = detok.append(t)
        seen.append(detok.text)
        if stop is not None:
            return detok, seen, stop, ids[: i + 1]
    return detok, seen, None, ids


def test_multibyte_characters_match_full_decode(smollm2_tokenizer):
    text = " héllo 😀 世界 naïve"
    detok, seen, _, ids = feed(smollm2_tokenizer, text)
    assert len(ids) > len(text.split())  # the emoji and CJK characters span several byte tokens
    assert detok.output_text == smollm2_tokenizer.decode(ids) == text
    assert all("\ufffd" not in s for s in seen)
    assert all(a == b[: len(a)] for a, b in zip(seen, seen[1:]))  # text only grows


def test_stop_string_is_cut_and_never_shown_early(smollm2_tokenizer):
    detok, seen, stop, _ = feed(smollm2_tokenizer, " The answer is Paris. Done", stop=["is Paris", "xyz"])
    assert stop == "is Paris"
    assert detok.text == " The answer "
    assert all("is P" not in s for s in seen)


def test_include_stop_str_in_output(smollm2_tokenizer):
    detok, _, stop, _ = feed(smollm2_tokenizer, " one two three four", stop=["three"],
                             include_stop_str_in_output=True)
    assert stop == "three" and detok.text == " one two three"
