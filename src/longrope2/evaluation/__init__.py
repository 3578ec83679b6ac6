"""Evaluation suites: NIAH, perplexity, RULER, LongBench, the lm-eval harness and backends."""
