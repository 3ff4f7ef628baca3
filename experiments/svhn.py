"""Train and evaluate an (En)ResNet on SVHN (cropped digits), the paper's protocol as defaults.

An alias of ``python -m experiments.train --dataset=svhn``.

Data: train_32x32.mat and test_32x32.mat in --data_dir, or TFDS.

    python -m experiments.svhn --data_dir=~/data --ensembles=2 --depth=56 --quant=br --bits=4
    python -m experiments.svhn --help    # the flags, grouped by topic
"""

from absl import flags

from experiments import common

flags.adopt_module_key_flags(common)  # absl's own --helpshort/--helpxml list them too

if __name__ == "__main__":
  common.launch("svhn")
