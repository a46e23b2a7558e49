"""Exact top-k search over encoded corpora, and the two jobs built on it: hard-negative mining
(`pipelines/mine_hard_negatives.py`) and evaluation (`pipelines/evaluate.py`).
"""
