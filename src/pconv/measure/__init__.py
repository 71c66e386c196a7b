"""Measuring an SNN: evaluation against its ANN (evaluate), costs per image (costs), the result types
(results), timing (timing) and the engine benchmark (benchmark)."""
