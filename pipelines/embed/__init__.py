"""The bulk embedding job (`pipelines/embed_corpus.py`): config, plan (what to encode), Ray Data
stages, row accounting (read task to done marker), the driver (job) and its manifest,
Parquet and Lance output, compact vectors.
"""
