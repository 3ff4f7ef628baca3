"""Train and evaluate an (En)ResNet on cifar10: `python -m experiments.cifar10 --help`."""

from absl import app

from experiments import common

if __name__ == "__main__":
  app.run(common.main_for("cifar10"))
