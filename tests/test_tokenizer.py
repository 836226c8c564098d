"""CLIP tokenizer: exact OpenAI ids, layout (SOT, ids, EOT, zero padding, truncation), user folder."""

import gzip
import html
import json

import numpy as np
import pytest
import regex

from dreamvla_jax.data import tokenizer as tok_lib
from dreamvla_jax.data.errors import DataError


@pytest.fixture(scope='module')
def tok():
    return tok_lib.load_tokenizer(None)


class ReferenceBPE:
    """OpenAI's SimpleTokenizer algorithm (clip/simple_tokenizer.py) re-stated for ASCII text."""

    def __init__(self, merges_path):
        lines = gzip.open(merges_path).read().decode('utf-8').split('\n')[1:49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in lines]
        self.byte_encoder = tok_lib._bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + '</w>' for v in vocab] + [''.join(m) for m in merges]
        self.encoder = {v: i for i, v in enumerate(vocab + ['<|startoftext|>', '<|endoftext|>'])}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                                 r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

    def bpe(self, token):
        word = tuple(token[:-1]) + (token[-1] + '</w>',)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float('inf')))
            if best not in self.ranks:
                break
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    new.append(word[i] + word[i + 1])
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        return word

    def encode(self, text):
        text = ' '.join(html.unescape(html.unescape(text)).split()).strip().lower()
        ids = []
        for token in regex.findall(self.pat, text):
            token = ''.join(self.byte_encoder[b] for b in token.encode('utf-8'))
            ids.extend(self.encoder[t] for t in self.bpe(token))
        return ids


SENTENCES = [
    'pull the handle to open the drawer',
    'Take the red block from the drawer',
    'use the switch to turn on the light bulb',
    "slide the block that it falls into the drawer, then rotate it 90 degrees! (it's fine)",
    'go   push the\tpink block   left',
]


def test_known_ids(tok):
    # Ids printed by OpenAI's clip.tokenize (CLIP README / HF model card examples).
    out = tok(['a photo of a cat', 'a diagram'])
    assert out.dtype == np.int32 and out.shape == (2, 77)
    np.testing.assert_array_equal(out[0, :8], [49406, 320, 1125, 539, 320, 2368, 49407, 0])
    np.testing.assert_array_equal(out[1, :5], [49406, 320, 22697, 49407, 0])
    assert not out[0, 7:].any() and not out[1, 4:].any()


def test_matches_reference_bpe(tok):
    ref = ReferenceBPE(tok_lib.find_openai_merges())
    out = tok(SENTENCES)
    for row, text in zip(out, SENTENCES, strict=True):
        ids = ref.encode(text)
        assert len(ids) > 3
        np.testing.assert_array_equal(row[:len(ids) + 2], [tok_lib.SOT, *ids, tok_lib.EOT])
        assert not row[len(ids) + 2:].any()


def test_truncation_keeps_end_token(tok):
    out = tok(['open the drawer ' * 40])[0]
    assert out[0] == tok_lib.SOT and out[-1] == tok_lib.EOT
    assert (out[1:-1] != 0).all() and tok_lib.EOT not in out[1:-1]


def test_vocab_size_checked(tok):
    assert len(tok.hf) == tok_lib.VOCAB_SIZE == 49408
    from transformers import CLIPTokenizer

    with pytest.raises(DataError, match='vocabulary size'):
        tok_lib.ClipTokenizer(CLIPTokenizer(), 'an empty tokenizer')


def test_user_folder_gives_same_ids(tok, tmp_path):
    # A user CLIP folder in the layout of openai/clip-vit-base-patch32 (vocab.json + merges.txt).
    vocab, merges = tok_lib.openai_vocab_and_merges(tok_lib.find_openai_merges())
    (tmp_path / 'vocab.json').write_text(json.dumps(vocab))
    (tmp_path / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(' '.join(m) for m in merges) + '\n')
    user = tok_lib.load_tokenizer(str(tmp_path))
    np.testing.assert_array_equal(user(SENTENCES), tok(SENTENCES))
    with pytest.raises(DataError, match='does not exist'):
        tok_lib.load_tokenizer(str(tmp_path / 'nope'))
