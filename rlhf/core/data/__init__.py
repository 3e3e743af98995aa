"""Prompt data, chat rendering, samples and the typed rollout batch, think blocks, sequence packing."""
