"""Train and evaluate an (En)ResNet on CIFAR-10, the paper's protocol as defaults.

An alias of ``python -m experiments.train --dataset=cifar10``.

Data: the official binary/python versions (folders or .tar.gz) in --data_dir, or TFDS.

    python -m experiments.cifar10 --data_dir=~/data --ensembles=5 --quant=br   # Table I's BR row
    python -m experiments.cifar10 --help    # the flags, grouped by topic
"""

from absl import flags

from experiments import common

flags.adopt_module_key_flags(common)  # absl's own --helpshort/--helpxml list them too

if __name__ == "__main__":
  common.launch("cifar10")
