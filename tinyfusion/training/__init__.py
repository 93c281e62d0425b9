"""The one training loop (its configuration, resumable state, tasks, resume, schedules and hooks)
and fine-tuning, one of its three tasks (Masked KD is tinyfusion.distillation's, the gate search
tinyfusion.pruning's)."""
