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


def test_extend_in_chunks_gives_the_text_of_one_token_at_a_time(smollm2_tokenizer):
    text = " héllo 😀 世界 naïve, and more words after them"
    prompt = smollm2_tokenizer.encode("Say:")
    ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
    for size, read_each in [(1, True), (3, True), (8, True), (3, False), (len(ids), True)]:
        detok = IncrementalDetokenizer(smollm2_tokenizer, prompt)  # chunk borders split multi-byte characters
        for at in range(0, len(ids), size):
            detok.extend(ids[at:at + size])
            if read_each:  # else every chunk is decoded at the end, in one call
                assert "\ufffd" not in detok.text
        detok.extend([])
        assert detok.output_text == text, (size, read_each)
