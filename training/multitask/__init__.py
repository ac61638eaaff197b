"""Multi-task training: one trunk, one head per task, the task losses balanced by GradNorm or equally.

`run_dir = train(TrainConfig(..., multitask=MultitaskSection(...)))` runs training/train.py's loop with the
`MultitaskObjective` of objective.py in place of the single-task cross-entropy.

tasks.py      the tasks learned from the bundled digits (class, ink, parity): targets, losses, evaluation
gradnorm.py   GradNorm: the task weights w_i and the loss L_grad that moves them
objective.py  MultitaskObjective: what the loop minimises (sum_i w_i L_i) and what it adds to the run
report.py     tasks.png and comparison.png, from metrics.jsonl alone
compare.py    `--compare`: equal weights vs GradNorm on the same seed and data

This file imports nothing, so that importing one of them does not import the others.
"""
