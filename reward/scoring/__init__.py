"""Scoring rollouts in RL: reward workers, reward components, verifiers, adaptive-thinking shaping, custom and remote rewards."""
