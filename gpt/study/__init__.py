"""Optimizer studies: a study file (configs/study/<name>.yaml) turned into tuned runs at several budgets and a
report of end-of-training speed-ups with confidence intervals. `conduct` runs one; scripts/study.py is its
command line. What lives in each module and what may import this package: README.md here."""
