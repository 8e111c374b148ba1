"""Tools around the project, run from the root as python -m tools.NAME: bench (speed), sweep (several runs at
once), results (docs/results.csv's tables and picture), judge_holdout (runs judged on their held-out rows)."""
