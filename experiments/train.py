"""Train and evaluate an (En)ResNet on any dataset, the paper's protocol for it as defaults.

The one training entry point (``experiments.cifar10``, ``experiments.mnist``, ... are aliases that fix
``--dataset``). Every setting of :class:`enquant.config.ExperimentConfig` is a flag, by its flat name or
its path:

    python -m experiments.train --dataset=cifar10 --ensembles=5 --quant=br --config.loss.beta=8
    python -m experiments.train --dataset=mnist --quick            # CPU smoke run, no data needed
    python -m experiments.train --help     # the flags, grouped by topic
"""

from absl import flags

from experiments import common

flags.adopt_module_key_flags(common)  # absl's own --helpshort/--helpxml list them too

if __name__ == "__main__":
  common.launch(common.config_lib.ExperimentConfig().dataset)
