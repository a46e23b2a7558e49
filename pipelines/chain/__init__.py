"""The whole BGE recipe as one job (`pipelines/recipe.py`): RetroMAE on the corpus → mine hard
negatives → finetune → evaluate, each step one of the other jobs, skipped once complete.
"""
