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


def test_batches_by_length_hold_every_prompt_once_in_length_order():
    """Random prompt lengths: each prompt lands in exactly one row, padded right, with
    its own ids and mask; the first ``first`` prompts come first, then the rest, each
    part in order of length (ties in list order)."""
    from aquin_nb._activations import token_batches

    rng = random.Random(3)
    for trial in range(40):
        lists = [[rng.randrange(1, 50) for _ in range(rng.randrange(1, 12))] for _ in range(37)]
        size = rng.randrange(1, 9)
        first = 0 if trial < 20 else rng.randrange(0, 45)
        seen: list[int] = []
        widths = []
        batches = token_batches(
            lists, batch_size=size, skip_first=True, by_length=True, first=first
        )
        for batch in batches:
            assert len(batch.prompt_index) <= size
            widths.append(batch.tokens.shape[1])
            for row, index in enumerate(batch.prompt_index.tolist()):
                ids = lists[index]
                assert batch.tokens[row, : len(ids)].tolist() == ids
                assert batch.tokens[row, len(ids) :].eq(0).all()
                assert batch.mask[row].nonzero().flatten().tolist() == list(range(1, len(ids)))
                seen.append(index)
        assert sorted(seen) == list(range(len(lists)))
        lead = min(first, len(lists))
        lengths = [len(ids) for ids in lists]
        expected = sorted(range(lead), key=lengths.__getitem__)
        expected += sorted(range(lead, len(lists)), key=lengths.__getitem__)
        assert seen == expected
        if not first:
            assert widths == sorted(widths)
