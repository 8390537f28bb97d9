"""Evaluation: refusal rate, KL divergence, perplexity, on-topic replies, lm-eval benchmarks."""
