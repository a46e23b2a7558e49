"""Bulk embedding of a Parquet/JSONL corpus on Ray Data: resumable and incremental.

Run it by path, ``python pipelines/embed_corpus.py --help`` (also as
``ray job submit -- python pipelines/embed_corpus.py ...``), or as a module.
The job lives in `pipelines.embed.main`; docs/architecture.md maps the packages.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path: import from the repository root, not pipelines/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipelines.embed.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
