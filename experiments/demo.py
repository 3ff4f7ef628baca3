"""The quick demo: a small En2ResNet on the MNIST sample shipped with the package, on 2 CPU cores.

    python -m experiments.demo                 # writes runs/demo/
    python -m experiments.demo --workdir=/tmp/d --overwrite

It runs the whole pipeline at toy scale: Binary-Relax binary weights, the paper's trade-off loss (6) with
PGD adversarial examples, then natural and robust accuracy (FGSM, IFGSM-20, CW-l_inf), sparsity and the
bit-packed size. Every flag of the other experiments works here too; only the defaults differ.
"""

from absl import flags

from experiments import common

flags.adopt_module_key_flags(common)

# The demo's settings over MNIST's preset (paths of enquant.config.ExperimentConfig).
DEMO_DEFAULTS = {
    "data_source": "embedded", "model.ensembles": 2, "model.depth": 8, "model.widths": (8, 16, 32),
    "model.noise_rng": "hash", "train.epochs": 3, "train.batch_size": 64, "train.lr": 0.1,
    "train.lr_schedule": "cosine", "quant.mode": "br", "quant.bits": 1, "quant.growth": 1.3,
    "quant.growth_every_epochs": 0.2, "quant.relax_fraction": 0.67, "loss.kind": "tradeoff",
    "loss.alpha": 1.0, "loss.beta": 8.0, "loss.eps": 0.1, "loss.step_size": 0.04, "loss.steps": 3,
    "loss.attack_bn": "eval", "eval.eps": 0.1, "eval.max_examples": 200, "eval.eot_samples": 0,
    "eval.max_unroll": 0, "eval.extra_eps": (),
}

if __name__ == "__main__":
  common.launch("mnist", DEMO_DEFAULTS, workdir="runs/demo")
