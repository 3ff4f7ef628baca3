"""Train and evaluate an (En)ResNet on CIFAR-100, the paper's protocol as defaults.

An alias of ``python -m experiments.train --dataset=cifar100``.

Data: the official binary/python versions (folders or .tar.gz) in --data_dir, or TFDS.

    python -m experiments.cifar100 --data_dir=~/data --ensembles=2
    python -m experiments.cifar100 --help    # the flags, grouped by topic
"""

from absl import flags

from experiments import common

flags.adopt_module_key_flags(common)  # absl's own --helpshort/--helpxml list them too

if __name__ == "__main__":
  common.launch("cifar100")
