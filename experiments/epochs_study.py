"""``python -m experiments.epochs_study``: the training-length study, :mod:`experiments.paper.epochs`."""

from experiments.paper import epochs

if __name__ == "__main__":
  epochs.cli()
