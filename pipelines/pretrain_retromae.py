"""RetroMAE pretraining on Ray Train: BGE's first stage, on raw text.

Run it by path, ``python pipelines/pretrain_retromae.py --help`` (also as
``ray job submit -- python pipelines/pretrain_retromae.py ...``), or as a module.
The job lives in `pipelines.train.retromae`; docs/architecture.md maps the packages.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path: import from the repository root, not pipelines/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipelines.train.retromae import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
