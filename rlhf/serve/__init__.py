"""HTTP servers: an OpenAI-compatible policy server and the reward-model server."""
