"""CLIP text tokenizer: instruction strings -> int32 [N, 77] token ids (OpenAI CLIP layout).

Layout (``clip.tokenize``): ``<|startoftext|>`` 49406, the BPE ids, ``<|endoftext|>`` 49407, zero padding to
77; longer texts are truncated to 77 tokens with the end token kept as the last one.

Two sources of the BPE tables, same ids:
- a user CLIP folder (``vocab.json`` + ``merges.txt``, e.g. ``openai/clip-vit-base-patch32``), loaded with
  ``transformers.CLIPTokenizer.from_pretrained``;
- offline default: the OpenAI merges file ``bpe_simple_vocab_16e6.txt.gz`` shipped inside the PyPI package
  ``openai-clip`` (found on disk without importing ``clip``, whose ``__init__`` imports torchvision). The
  vocabulary is rebuilt from it exactly as OpenAI's ``SimpleTokenizer`` does.
"""

from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np

from dreamvla_jax.data.errors import DataError

CONTEXT = 77
SOT = 49406
EOT = 49407
VOCAB_SIZE = 49408
_MERGES_FILE = 'bpe_simple_vocab_16e6.txt.gz'


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table (256 entries)."""
    bs = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
          + list(range(ord('®'), ord('ÿ') + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def find_openai_merges() -> str:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` inside the installed ``openai-clip`` package."""
    spec = importlib.util.find_spec('clip')  # locates the package without running its __init__
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = os.path.join(loc, _MERGES_FILE)
        if os.path.exists(path):
            return path
    raise DataError(f"CLIP BPE file {_MERGES_FILE} not found: install it with "
                    "`pip install --no-deps openai-clip==1.0.1` or pass a CLIP tokenizer folder.")


def openai_vocab_and_merges(merges_path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Rebuilds OpenAI CLIP's vocabulary (49408 entries) and merge list from its gzip merges file."""
    lines = gzip.open(merges_path).read().decode('utf-8').split('\n')
    # OpenAI keeps 49152 - 256 - 2 merges after the header line (simple_tokenizer.py).
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + '</w>' for c in byte_chars] + [''.join(m) for m in merges]
    tokens += ['<|startoftext|>', '<|endoftext|>']
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise DataError(f"{merges_path}: rebuilt CLIP vocabulary has {len(vocab)} entries, expected "
                        f"{VOCAB_SIZE}.")
    return vocab, merges


class ClipTokenizer:
    """Callable ``texts -> np.int32 [N, 77]`` wrapping a transformers ``CLIPTokenizer``."""

    def __init__(self, hf_tokenizer, source: str):
        self.hf = hf_tokenizer
        self.source = source
        # A CLIPTokenizer without its vocab silently maps everything to a few special ids.
        if len(self.hf) != VOCAB_SIZE:
            raise DataError(f"CLIP tokenizer from {source} has vocabulary size {len(self.hf)}, "
                            f"expected {VOCAB_SIZE}.")
        for name, expected in (('<|startoftext|>', SOT), ('<|endoftext|>', EOT)):
            if self.hf.convert_tokens_to_ids(name) != expected:
                raise DataError(f"CLIP tokenizer from {source}: {name} is not id {expected}.")

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Returns int32 [N, 77]: SOT, ids, EOT, zeros."""
        texts = [' '.join(t.split()) for t in texts]  # OpenAI whitespace_clean
        ids = self.hf(texts, add_special_tokens=False)['input_ids']
        out = np.zeros((len(texts), CONTEXT), np.int32)
        for i, seq in enumerate(ids):
            seq = [SOT] + list(seq)[:CONTEXT - 2] + [EOT]
            out[i, :len(seq)] = seq
        return out


def load_tokenizer(clip_dir: str | None = None) -> ClipTokenizer:
    """The CLIP tokenizer from ``clip_dir`` (a transformers CLIP folder), or the offline OpenAI BPE."""
    from transformers import CLIPTokenizer  # heavy import, only when a tokenizer is needed

    if clip_dir:
        if not os.path.isdir(clip_dir):
            raise DataError(f"CLIP tokenizer folder {clip_dir} does not exist.")
        return ClipTokenizer(CLIPTokenizer.from_pretrained(clip_dir, local_files_only=True), clip_dir)
    path = find_openai_merges()
    vocab, merges = openai_vocab_and_merges(path)
    return ClipTokenizer(CLIPTokenizer(vocab=vocab, merges=merges), path)
