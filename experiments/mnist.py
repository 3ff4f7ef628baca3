"""Train and evaluate an (En)ResNet on mnist: `python -m experiments.mnist --help`."""

from absl import app

from experiments import common

if __name__ == "__main__":
  app.run(common.main_for("mnist"))
