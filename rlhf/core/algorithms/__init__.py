"""The RL arithmetic as small pure tensor functions, one module per job:

- ``advantages``: advantage estimators and ``ADVANTAGE_ESTIMATORS``, the registry ``algorithm.advantage`` names;
- ``policy_losses``: per-token policy-gradient losses and ``POLICY_LOSSES`` (``algorithm.policy_loss``), truncated
  importance weights, the per-token regularisers;
- ``preference_losses``: DPO and its IPO / length-normalised variants on (chosen, rejected) pairs;
- ``value_loss``: the critic's clipped value loss;
- ``aggregation``: the weights that turn per-token losses into one batch loss;
- ``kl``: KL estimators, the KL as a token reward, on-policy distillation's per-token term;
- ``shaping``: reward shaping in the driver before advantages (overlong penalty, dynamic sampling);
- ``tokens``: per-token log-probs and entropies from logits, masked means.

Nothing here reads config or talks to Ray, so each function is tested on its own against hand-computed numbers.
Shapes: B sequences, L token positions. Per-token tensors are aligned with ``input_ids``: position t holds the
log-probability of token t given tokens < t, and ``mask`` is 1 on response tokens only.
"""
