"""Decoding many token sequences at once gives what one `decode` call each gives."""

from __future__ import annotations

import random


def _tokenizer():
    from aquin_nb.models import load_hf_model

    return load_hf_model("tiny-gpt2")[1]


def test_decode_each_equals_one_decode_per_sequence():
    """Random ids over the whole vocabulary (special tokens and partial UTF-8 pieces
    included), single tokens, whole prompts and the empty sequence."""
    from aquin_nb._lens import _plain_fast_decode, decode_each

    tokenizer = _tokenizer()
    assert _plain_fast_decode(type(tokenizer))  # the fast path is the one under test
    rng = random.Random(0)
    vocab = len(tokenizer)
    sequences = [[rng.randrange(vocab) for _ in range(rng.randrange(1, 9))] for _ in range(300)]
    sequences += [[token] for token in range(vocab)] + [[], tokenizer.encode("Ünïcode → ok")]
    assert decode_each(tokenizer, sequences) == [tokenizer.decode(ids) for ids in sequences]


def test_decode_each_falls_back_where_decode_does_more():
    """A tokenizer class that overrides decoding, or one that cleans up spaces, is
    decoded one sequence at a time through its own ``decode``."""
    from aquin_nb._lens import decode_each

    tokenizer = _tokenizer()

    class Shouting(type(tokenizer)):
        def _decode(self, token_ids, **kwargs):
            return super()._decode(token_ids, **kwargs).upper()

    tokenizer.__class__ = Shouting
    ids = tokenizer.encode(" the cat", add_special_tokens=False)
    assert decode_each(tokenizer, [ids]) == [" THE CAT"]

    cleaning = _tokenizer()
    cleaning.clean_up_tokenization_spaces = True
    calls = []
    decode = cleaning.decode
    cleaning.decode = lambda ids: calls.append(ids) or decode(ids)
    assert decode_each(cleaning, [ids, ids[:1]]) == [decode(ids), decode(ids[:1])]
    assert calls == [ids, ids[:1]]
