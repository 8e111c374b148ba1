"""The training engine behind main.py: recipes, the run's state and its step, the training loop, inference,
the other commands, run folders, checkpoints and promotion, reports. docs/code.md maps it file by file."""
