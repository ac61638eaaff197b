"""`gradserve study`: the checkpoint rule measured on the user's own data, against what every other trainer does.

Trains a config once per seed (reusing finished runs), then scores on the test split, without retraining, the
checkpoint each strategy keeps: the rule with the configured parameters, the rule with parameters picked from a
small grid on the validation split, the best validation loss, the last checkpoint, and the hindsight oracle
(the best test metric: a bound no trainer can reach, the yardstick of every gap).

strategies.py  pure arithmetic on one run's records: each strategy's choice, early stopping cut, the grid
analysis.py    pure: every run x variant (early stopping on/off, multi-task scoring) -> the study's numbers
runs.py        train or reuse runs_dir/<name>-study/seed-<k>/ and read what the study needs from its files
markdown.py    study.md and the suite's table          plot.py   study.png and suite.png
suite.py       `make study`: several studies from one suite file, and their table
cli.py         the command

This file imports nothing, so that importing one of them does not import the others.
"""
