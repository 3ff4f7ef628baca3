"""Train and evaluate an (En)ResNet on svhn: `python -m experiments.svhn --help`."""

from absl import app

from experiments import common

if __name__ == "__main__":
  app.run(common.main_for("svhn"))
