"""Driver-side handles of actor groups: rollout, reward and teacher workers, and weight broadcast."""
