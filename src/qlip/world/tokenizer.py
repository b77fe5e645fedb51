"""A real ``transformers.CLIPTokenizer`` for the reference world, built locally.

The BPE merges are learned with the ``tokenizers`` library on the domain's captions, with CLIP's
own normaliser and pre-tokeniser, so every domain word becomes one token. The vocabulary also
holds all 256 byte symbols, with and without CLIP's end-of-word suffix, so any English (or other)
text still tokenizes: unknown words fall back to byte pieces.

Example:
    >>> tokenizer = build_tokenizer()
    >>> tokenizer("a red circle").input_ids  # [bos, a, red, circle, eos]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import CLIPTokenizer

from qlip.world.domain import training_prompts

# Longest caption of the domain is 36 tokens with bos/eos; 48 leaves room for odd wording.
MODEL_MAX_LENGTH = 48
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
_CORPUS_PROMPTS = 20_000
_CORPUS_SEED = 7
# CLIP's pre-tokenisation regex (words, single digits, runs of punctuation).
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _clip_like_trainer_tokenizer() -> Tokenizer:
    """An untrained BPE tokenizer that normalises and splits text exactly as CLIPTokenizer does."""
    tokenizer = Tokenizer(BPE(end_of_word_suffix=END_OF_WORD, continuing_subword_prefix=""))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return tokenizer


def learn_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """Learn BPE on domain captions; return CLIP-format ``vocab`` and ``merges`` ("a b" lines)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    corpus = [prompt.text for prompt in training_prompts(_CORPUS_PROMPTS, _CORPUS_SEED)]
    tokenizer = _clip_like_trainer_tokenizer()
    trainer = BpeTrainer(
        vocab_size=4096,  # an upper bound: training stops once every word is one token
        min_frequency=1,
        special_tokens=[BOS, EOS],
        initial_alphabet=alphabet,
        end_of_word_suffix=END_OF_WORD,
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    vocab = _canonical_word_endings(dict(model["vocab"]), set(alphabet))
    # Byte fallback for unseen words: every byte symbol, also as a word ending.
    for symbol in alphabet + [s + END_OF_WORD for s in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    return vocab, merges


def _canonical_word_endings(vocab: dict[str, int], alphabet: set[str]) -> dict[str, int]:
    """Renumber the trainer's one-symbol word endings ("a</w>", ",</w>", ...) in sorted order.

    The BPE trainer adds them in hash-map order, which changes from process to process; without
    this, two builds of the tokenizer could give the word "a" different ids. They keep the block
    of ids the trainer gave them, so every other id is unchanged.
    """
    endings = [t for t in vocab if t.endswith(END_OF_WORD) and t[: -len(END_OF_WORD)] in alphabet]
    for token, index in zip(sorted(endings), sorted(vocab[t] for t in endings), strict=True):
        vocab[token] = index
    return vocab


def write_tokenizer_files(directory: str | Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (CLIP's formats) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = learn_vocab_and_merges()
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path


def build_tokenizer(model_max_length: int = MODEL_MAX_LENGTH) -> CLIPTokenizer:
    """Build the reference world's CLIPTokenizer (deterministic; takes about a second)."""
    with tempfile.TemporaryDirectory() as scratch:
        write_tokenizer_files(scratch)
        # Loading from files is the path every transformers version supports.
        tokenizer = CLIPTokenizer.from_pretrained(scratch, model_max_length=model_max_length)
    return tokenizer
