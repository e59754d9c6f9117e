"""The ADaPT paper protocol that bench/paper_protocol.py runs, in parts with one job each:

  data      the CIFAR-10 tarball, the train/validation/held-out splits and the class subsets;
  results   the resumable results.csv, the methods a row can hold, and the configuration an output folder is for;
  runner    the runs: base models, the data-agnostic baseline, the per-subset methods;
  report    results.md and accuracy_vs_level.png from results.csv;
  progress  progress lines on stderr and the --max-minutes deadline.
"""
