"""The base layer: what rollout/, reward/ and the orchestration all stand on.

Config, prompt data, students and tokenizers, tasks, think blocks, packing, checkpoints and resume, the pure
algorithm functions, and the DeepSpeed rank and Ray rank-group machinery. Modules here import only each other
(tests/test_layers.py checks it).
"""
