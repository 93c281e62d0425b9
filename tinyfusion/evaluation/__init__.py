"""Evaluation: the ADM evaluator's maths and the FID measured while training."""
