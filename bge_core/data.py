"""Training data for contrastive finetuning: FlagEmbedding's schema and group sampling.

An example is ``{"query": str, "pos": [str, ...], "neg": [str, ...]}`` (JSONL, one per
line, as FlagEmbedding reads it; or the same columns in Parquet), at a local path or any
fsspec URI, read in ranges by `bge_core.io`. Each example becomes a group: one positive
and ``train_group_size - 1`` negatives drawn with an RNG keyed by ``(seed, epoch, example
key)``, so every worker, restart and re-run draws the same group for the same example,
whatever the order or sharding. Short negative lists are refilled by repetition;
negatives never come from the positives. Invalid examples raise `TrainingDataError`
naming the file and line (or row). A group also carries all its example's listed
positives, so the loss can keep them out of the query's negatives (`listed_keys` hashes
them, only when finetuning asks for it; `bge_core.losses`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bge_core.batching import pad_batch
from bge_core.errors import InputError
from bge_core.grad_cache import TokenBatch
from bge_core.io import RANGE_ROWS, DataFileError, FileRange, list_files, plan_ranges, read_range

FILE_STRIDE = 1 << 32  # example key = file index * FILE_STRIDE + line number


class TrainingDataError(DataFileError):
    """An invalid training file or example; the message names the file and line."""


@dataclass(frozen=True)
class Group:
    """One query and its G passages (positive first)."""

    query: str
    passages: list[str]
    listed: tuple[str, ...] = ()  # every positive the example lists, once each


def text_key(text: str) -> int:
    """A signed 64-bit key of `text` (BLAKE2b): equal texts, equal keys on every process."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little",
                          signed=True)


def listed_keys(groups: Sequence[Group]) -> dict[str, torch.Tensor]:
    """`info_nce`'s ``positive_keys`` (B, P) and ``passage_keys`` (B*G,) for a batch: a row
    is padded with the key of the group's own positive (masking never drops the target)."""
    passage_keys = [[text_key(p) for p in g.passages] for g in groups]
    rows = [[text_key(t) for t in g.listed] or keys[:1] for g, keys in zip(groups, passage_keys)]
    width = max(map(len, rows))
    padded = [row + [keys[0]] * (width - len(row)) for row, keys in zip(rows, passage_keys)]
    return {"positive_keys": torch.tensor(padded, dtype=torch.int64),
            "passage_keys": torch.tensor([k for keys in passage_keys for k in keys],
                                         dtype=torch.int64)}


def list_data_files(path: str) -> list[str]:
    """The data files at `path`: a file, or the JSONL/Parquet files in a folder or glob."""
    return list_files(path, "training data", TrainingDataError)


def check_example(obj: Any, group_size: int = 1) -> str | None:
    """Why `obj` is not a valid example for groups of `group_size` (None when it is): the
    one training-example check every job uses (`bge_core.records`)."""
    from bge_core.records import check_training_example

    return check_training_example(obj, group_size)


def _negatives(obj: dict[str, Any]) -> list[str]:
    """The negatives that are not also positives (never train a positive as a negative)."""
    positives = set(obj["pos"])
    return [n for n in obj.get("neg") or [] if n.strip() and n not in positives]


def _record(key: int, obj: dict[str, Any] | None, error: str | None, where: str) -> dict:
    """One row of the parsed dataset (a fixed schema, bad rows included)."""
    good = error is None
    return {
        "key": key,
        "query": obj["query"] if good else "",
        "pos": [p for p in obj["pos"] if p.strip()] if good else [],
        "neg": _negatives(obj) if good else [],
        "error": None if good else f"{where}: {error}",
    }


def parse_range(part: FileRange, group_size: int = 1) -> list[dict]:
    """Parse one range of a data file (`bge_core.io`); bad lines become rows whose
    `error` names them (file and line, or Parquet row).

    Args:
        part: the range (its `file_index` is part of each example's key).
        group_size: ``train_group_size`` (examples without negatives fail when > 1).
    """
    unit = "row" if part.fmt == "parquet" else "line"
    rows = []
    for row, obj, error in read_range(part):
        error = error or check_example(obj, group_size)
        number = row + 1
        key = part.file_index * FILE_STRIDE + number
        rows.append(_record(key, obj, error, f"{part.path} {unit} {number}"))
    return rows


def cap_examples(rows: list[dict], limit: int | None, seed: int, file_index: int) -> list[dict]:
    """At most `limit` rows of one file, a seeded random sample kept in file order
    (FlagEmbedding's ``--max_example_num_per_dataset``; None keeps all)."""
    if limit is None or len(rows) <= limit:
        return rows
    keep = np.random.default_rng([seed, file_index]).choice(len(rows), size=limit, replace=False)
    return [rows[i] for i in sorted(keep)]


def split_bad(rows: Sequence[dict[str, Any]], skip_bad_examples: bool) -> list[dict[str, Any]]:
    """The good rows; raise on the first bad one unless `skip_bad_examples`."""
    bad = [r["error"] for r in rows if r["error"] is not None]
    if bad and not skip_bad_examples:
        raise TrainingDataError(f"invalid training example: {bad[0]} ({len(bad)} invalid in "
                                "all; pass --skip_bad_examples to drop them)")
    return [r for r in rows if r["error"] is None]


def load_examples(path: str, group_size: int = 1,
                  skip_bad_examples: bool = False) -> tuple[list[dict], int]:
    """Read every example at `path` in one process (tests, benchmarks, small data).

    Returns:
        (good rows, number of bad examples skipped).
    """
    rows = []
    for index, file in enumerate(list_data_files(path)):
        for part in plan_ranges(file, index, RANGE_ROWS):
            rows += parse_range(part, group_size)
    good = split_bad(rows, skip_bad_examples)
    return good, len(rows) - len(good)


def group_rng(seed: int, epoch: int, key: int) -> np.random.Generator:
    """The RNG for one example in one epoch: independent of order, worker and restart."""
    return np.random.default_rng([seed, epoch, key])


def sample_group(example: dict[str, Any], group_size: int, seed: int, epoch: int,
                 query_instruction: str | None = None) -> Group:
    """One positive and ``group_size - 1`` negatives for `example`.

    Negatives are drawn without replacement while there are enough, and refilled by
    repetition when there are fewer. Positives are never used as negatives.
    """
    if group_size < 1:
        raise InputError(f"train_group_size must be >= 1, got {group_size}")
    rng = group_rng(seed, epoch, int(example["key"]))
    pos = list(example["pos"])
    negs = list(example["neg"])
    positive = pos[int(rng.integers(len(pos)))]
    need = group_size - 1
    if need and not negs:  # `check_example` rejects these when the data is read
        raise TrainingDataError(f"example {example['key']} has no negatives but "
                                f"train_group_size={group_size} needs {need}")
    if len(negs) >= need:
        chosen = [negs[i] for i in rng.choice(len(negs), size=need, replace=False)]
    else:
        repeats = -(-need // len(negs))  # ceil
        pool = (negs * repeats)[:need]
        chosen = [pool[i] for i in rng.permutation(need)]
    query = (query_instruction or "") + example["query"]
    return Group(query=query, passages=[positive, *chosen], listed=tuple(dict.fromkeys(pos)))


def collate(tokenize: Any, groups: Sequence[Group], query_max_len: int,
            passage_max_len: int, pad_id: int) -> tuple[TokenBatch, TokenBatch]:
    """Tokenise and pad a batch of groups: (B, Tq) queries and (B*G, Tp) passages.

    Args:
        tokenize: `Encoder.tokenize` (texts, max_length) → (ids, truncated).
    """
    q_ids, _ = tokenize([g.query for g in groups], query_max_len)
    p_ids, _ = tokenize([p for g in groups for p in g.passages], passage_max_len)
    return TokenBatch(*pad_batch(q_ids, pad_id)), TokenBatch(*pad_batch(p_ids, pad_id))
