"""The stages of a run before and beside RL: the run directory, warm-up, traces, SFT, labelling and the reward-model stages."""
