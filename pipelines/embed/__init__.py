"""The bulk embedding job (`pipelines/embed_corpus.py`): config, plan (what to encode), Ray Data
stages, Parquet and Lance output, compact vectors.
"""
