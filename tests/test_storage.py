"""The storage rules every job shares: which URIs are local, and write-then-move."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from bge_core.storage import as_uris, is_local, local_path, write_then_move


@pytest.mark.parametrize("uri", ["/data/corpus", "data/corpus", "./x.jsonl", "~/out", "x",
                                 "file:///data/corpus", "file://data/x", "local:///data/x"])
def test_plain_paths_and_file_uris_are_local(uri: str) -> None:
    assert is_local(uri)


@pytest.mark.parametrize("uri", ["s3://bucket/x", "s3a://bucket/x", "gs://b/x", "memory://x",
                                 "memory:///x", "simplecache::s3://bucket/x", "hf://datasets/x",
                                 "https://host/x.parquet"])
def test_every_other_fsspec_uri_is_not(uri: str) -> None:
    assert not is_local(uri)


def test_the_rule_is_the_filesystem_fsspec_opens(tmp_path: Path) -> None:
    """`is_local` agrees with the filesystem `url_to_fs` picks, without opening it."""
    for uri in [str(tmp_path), f"file://{tmp_path}", "rel/x", "memory://x", "s3://bucket/x"]:
        fs, _ = fsspec.core.url_to_fs(uri)
        assert is_local(uri) == ("file" in fs.protocol), uri


def test_local_path_strips_the_protocol_only() -> None:
    assert local_path("file:///data/x") == "/data/x"
    assert local_path("local:///data/x") == "/data/x"
    assert local_path("/data/x") == "/data/x"
    assert local_path("rel/x") == "rel/x"  # relative stays relative
    with pytest.raises(ValueError, match="s3://b/x is not a local path"):
        local_path("s3://b/x")


def test_listed_paths_keep_the_protocol_of_a_store_only() -> None:
    fs = fsspec.filesystem("memory")
    assert as_uris(fs, ["/b/a.parquet"], "memory://b") == ["memory:///b/a.parquet"]
    local = fsspec.filesystem("file")
    assert as_uris(local, ["/d/a.parquet"], "/d") == ["/d/a.parquet"]
    assert as_uris(local, ["/d/a.parquet"], "file:///d") == ["/d/a.parquet"]


@pytest.fixture(params=["file", "memory"])
def store(request: pytest.FixtureRequest,
          tmp_path: Path) -> Iterator[tuple[fsspec.AbstractFileSystem, str]]:
    """A local folder and an in-memory store, each with a folder to write into."""
    if request.param == "file":
        yield fsspec.filesystem("file"), str(tmp_path / "out")
        return
    fs = fsspec.filesystem("memory")
    root = f"/wtm-{tmp_path.name}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _names(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    return sorted(p.rsplit("/", 1)[1] for p in fs.find(folder)) if fs.exists(folder) else []


def test_a_file_appears_under_its_name_only_when_complete(store) -> None:
    fs, root = store
    with write_then_move(fs, f"{root}/part-1.parquet") as tmp:
        with fs.open(tmp, "wb") as handle:
            handle.write(b"half")
        assert not fs.exists(f"{root}/part-1.parquet")  # nothing under the real name yet
        assert tmp.rsplit("/", 1)[1].startswith(".tmp-part-1.parquet-")  # hidden, beside it
        with fs.open(tmp, "ab") as handle:
            handle.write(b" and the rest")
    assert fs.cat_file(f"{root}/part-1.parquet") == b"half and the rest"
    assert _names(fs, root) == ["part-1.parquet"]  # no temporary file left


def test_a_failed_write_or_check_leaves_nothing(store) -> None:
    fs, root = store
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/kept.json", b"old")
    with pytest.raises(OSError, match="disk full"):
        with write_then_move(fs, f"{root}/kept.json") as tmp:
            fs.pipe_file(tmp, b"half")
            raise OSError("disk full")

    def refuse(written: str) -> None:
        assert fs.cat_file(written) == b"new"  # the check sees the written file
        raise RuntimeError("lease lost")

    with pytest.raises(RuntimeError, match="lease lost"):
        with write_then_move(fs, f"{root}/kept.json", check=refuse) as tmp:
            fs.pipe_file(tmp, b"new")
    assert fs.cat_file(f"{root}/kept.json") == b"old"  # the old file untouched
    assert _names(fs, root) == ["kept.json"]


def test_a_local_folder_is_renamed_into_place_whole(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "model"
    with write_then_move(fsspec.filesystem("file"), str(target), tag="build") as tmp:
        assert Path(tmp).name.startswith(".build-model-")
        (Path(tmp) / "sub").mkdir(parents=True)
        (Path(tmp) / "sub" / "w.bin").write_bytes(b"w")
        assert not target.exists()
    assert (target / "sub" / "w.bin").read_bytes() == b"w"
    with pytest.raises(KeyboardInterrupt):
        with write_then_move(fsspec.filesystem("file"), str(tmp_path / "cache" / "b")) as tmp:
            Path(tmp).mkdir()
            (Path(tmp) / "w.bin").write_bytes(b"half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["model"]
