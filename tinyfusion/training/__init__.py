"""The training loop of the three trainings (fine-tuning, Masked KD, the gate search), its resume, schedules and hooks."""
