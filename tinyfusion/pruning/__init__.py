"""TinyFusion's pruning: source models and pruned checkpoints, the BI baseline, LoRA, the gate search."""
