"""Recovering a pruned model from its dense teacher: Masked Knowledge Distillation as a training task."""
