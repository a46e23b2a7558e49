"""Ray Train jobs: contrastive finetuning (`pipelines/finetune.py`) and RetroMAE pretraining
(`pipelines/pretrain_retromae.py`), with their shared flags, data, session and checkpoints.
"""
