"""Hard-negative mining with FlagEmbedding ``hn_mine``'s flags, corpus searched in shards on Ray.

Run it by path, ``python pipelines/mine_hard_negatives.py --help`` (also as
``ray job submit -- python pipelines/mine_hard_negatives.py ...``), or as a module.
The job lives in `pipelines.search.mine`; docs/architecture.md maps the packages.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path: import from the repository root, not pipelines/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipelines.search.mine import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
