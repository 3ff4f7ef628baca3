"""``python -m experiments.seeds_study``: the training-seeds study, :mod:`experiments.paper.seeds`."""

from experiments.paper import seeds

if __name__ == "__main__":
  seeds.cli()
