"""The quick demo: a small En2ResNet on the MNIST sample shipped with the package, on 2 CPU cores.

    python -m experiments.demo                 # writes runs/demo/
    python -m experiments.demo --workdir=/tmp/d --overwrite

It runs the whole pipeline at toy scale: Binary-Relax binary weights, the paper's trade-off loss (6) with
PGD adversarial examples, then natural and robust accuracy (FGSM, IFGSM-20, CW-l_inf), sparsity and the
bit-packed size. Every flag of the other experiments works here too; only the defaults differ.
"""

from absl import app
from absl import flags

from experiments import common

flags.adopt_module_key_flags(common)

DEMO_DEFAULTS = dict(
    data_source="embedded", ensembles=2, depth=8, width=8, epochs=3, batch_size=64, lr=0.1,
    lr_schedule="cosine", quant="br", bits=1, br_growth=1.3, br_growth_every=0.2,
    br_relax_fraction=0.67, loss="tradeoff", alpha=1.0, beta=8.0, train_eps=0.1,
    train_step_size=0.04, train_steps=3, eval_eps=0.1, eval_max=200, eot_samples=0,
    max_unroll=0, workdir="runs/demo", eval_extra_eps=[], train_attack_bn="eval", noise_rng="hash",
)

if __name__ == "__main__":
  app.run(common.main_for("mnist", DEMO_DEFAULTS), flags_parser=common.parse_flags)
