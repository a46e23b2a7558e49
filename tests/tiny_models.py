"""Tiny random BERTs and a word-level vocabulary, built on the spot: tests never download."""

from __future__ import annotations

from pathlib import Path

from transformers import BertConfig, BertModel, BertTokenizerFast

WORDS = (
    "the a an of to and in is was for on with as by at from that this it be are or not "
    "query passage document text search find cat dog fish bird tree house car road city "
    "river sea sky sun moon star water fire earth wind red blue green black white big small "
    "old new good bad fast slow hot cold day night year time man woman child food health "
    "disease heart blood cancer diet vitamin protein study risk effect patient drug cell"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LETTERS = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")


def write_vocab(path: Path) -> Path:
    """A WordPiece vocab: specials, whole words, letters and '##' letter pieces."""
    vocab = SPECIALS + WORDS + LETTERS + [f"##{c}" for c in LETTERS]
    path.write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    return path


def make_tokenizer(directory: Path) -> BertTokenizerFast:
    directory.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab(directory / "vocab.txt")
    # transformers 5 takes the vocab (path or dict) as `vocab`; `vocab_file` is silently ignored
    # there, which left a 5-token vocabulary of specials only.
    return BertTokenizerFast(vocab=str(vocab), do_lower_case=True, model_max_length=128)


def make_tiny_bert(directory: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Save a random tiny BERT + tokenizer in `directory` (a plain HF folder) and return it."""
    import torch

    tokenizer = make_tokenizer(directory)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
