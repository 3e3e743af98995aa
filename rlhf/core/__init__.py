"""The core layer: what rollout/, reward/ and the orchestration all stand on.

``config/`` the run config; ``data/`` prompts, chat, samples, the rollout batch, packing, think blocks; ``tasks/``
the built-in tasks; ``models/`` students, tokenizers, LoRA, safe loading; ``checkpoints/`` atomic writes and resume;
``distributed/`` Ray clusters, DeepSpeed ranks, worker pools, weight sync; ``http/`` server and client plumbing;
``algorithms`` the pure advantage and loss functions. Modules here import only each other (tests/test_layers.py).
"""
