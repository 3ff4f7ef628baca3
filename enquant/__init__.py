"""enquant: robust (randomized EnResNet ensembles, adversarial training) and efficient (Binary-Relax
quantized, channel-sparse) image classifiers in JAX/Flax.

Submodules are imported explicitly (``from enquant import attacks``); importing the package itself stays
cheap and has no side effects on JAX's configuration.
"""

__version__ = "0.1.0"
