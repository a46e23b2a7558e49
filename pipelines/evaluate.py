"""Retrieval evaluation on a BEIR-layout dataset, or Spearman on STS pairs, on Ray.

Run it by path, ``python pipelines/evaluate.py --help`` (also as
``ray job submit -- python pipelines/evaluate.py ...``), or as a module.
The job lives in `pipelines.search.evaluate`; docs/architecture.md maps the packages.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path: import from the repository root, not pipelines/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipelines.search.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
