"""Train and evaluate an (En)ResNet on MNIST, the paper's protocol as defaults.

An alias of ``python -m experiments.train --dataset=mnist``.

Data: the official IDX files in --data_dir, TFDS, or the 5000/1000-image sample shipped in
the package (--data_source=embedded; --quick uses it on a machine without local files).

    python -m experiments.mnist --quick                    # CPU smoke run, no data needed
    python -m experiments.mnist --help    # the flags, grouped by topic
"""

from absl import flags

from experiments import common

flags.adopt_module_key_flags(common)  # absl's own --helpshort/--helpxml list them too

if __name__ == "__main__":
  common.launch("mnist")
