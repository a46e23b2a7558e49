"""Online embeddings on Ray Serve: OpenAI-compatible ``/v1/embeddings`` with the bulk job's model.

Run it by path, ``python pipelines/serve_embeddings.py --help`` (also as
``ray job submit -- python pipelines/serve_embeddings.py ...``), or as a module.
The job lives in `pipelines.serve.main`; docs/architecture.md maps the packages.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path: import from the repository root, not pipelines/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

# app_builder: the import path of pipelines/configs/serve.yaml and the RayService
from pipelines.serve.main import app_builder, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
