"""The whole BGE recipe on a new domain: RetroMAE → mine → finetune → evaluate, in order.

Run it by path, ``python pipelines/recipe.py --help`` (also as
``ray job submit -- python pipelines/recipe.py ...``), or as a module.
The job lives in `pipelines.chain.recipe`; docs/recipe.md explains the steps.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path: import from the repository root, not pipelines/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipelines.chain.recipe import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
