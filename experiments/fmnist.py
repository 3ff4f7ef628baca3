"""Train and evaluate an (En)ResNet on Fashion-MNIST, the paper's protocol as defaults.

An alias of ``python -m experiments.train --dataset=fmnist``.

Data: the official IDX files in --data_dir (fashion-mnist/ or the folder itself) or TFDS.

    python -m experiments.fmnist --data_dir=~/data --quant=br --bits=2
    python -m experiments.fmnist --help    # the flags, grouped by topic
"""

from absl import flags

from experiments import common

flags.adopt_module_key_flags(common)  # absl's own --helpshort/--helpxml list them too

if __name__ == "__main__":
  common.launch("fmnist")
