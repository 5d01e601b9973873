"""Evaluating checkpoints: suites, pass@k, reward-model win rates, safety, the alignment tax."""
