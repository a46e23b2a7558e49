"""The online embeddings server on Ray Serve (`pipelines/serve_embeddings.py`).
"""
