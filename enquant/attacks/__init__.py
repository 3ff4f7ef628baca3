"""Adversarial attacks on any JAX model ``logits_fn(x, key) -> logits``, l_inf, with explicit keys.

Modules by topic, on one public core:
  - :mod:`~enquant.attacks.core`: the model type :data:`LogitsFn`, input checks, the l_inf projection,
    the key schedule, the EOT gradient and the loop over targets/restarts;
  - :mod:`~enquant.attacks.objectives`: the per-example losses (cross-entropy, CW margin, DLR);
  - :mod:`~enquant.attacks.fgsm_pgd`: FGSM, PGD (IFGSM) and CW-l_inf;
  - :mod:`~enquant.attacks.autopgd`: APGD-CE/-DLR and APGD-T (Auto-PGD);
  - :mod:`~enquant.attacks.carlini_wagner`: the EnResNet code's C&W (L2, Adam, rescaled to eps);
  - :mod:`~enquant.attacks.fab`, :mod:`~enquant.attacks.square`: FAB-T and Square;
  - :mod:`~enquant.attacks.autoattack`: AutoAttack (``autoattack.run`` on a batch,
    ``autoattack.evaluate`` on a dataset; its settings in :mod:`~enquant.attacks.autoattack_settings`).

Example::

  from enquant import attacks
  x_adv = attacks.pgd(logits_fn, x, y, eps=8 / 255, step_size=2 / 255, steps=10, key=key)
  from enquant.attacks import autoattack
  result = autoattack.run(logits_fn, x, y, eps=8 / 255, key=key, version="standard")
"""

from enquant.attacks import autoattack
from enquant.attacks import autoattack_settings
from enquant.attacks import autopgd
from enquant.attacks import carlini_wagner
from enquant.attacks import core
from enquant.attacks import fab
from enquant.attacks import fgsm_pgd
from enquant.attacks import objectives
from enquant.attacks import square
from enquant.attacks.autopgd import APGD_LOSSES, APGDState, apgd, apgd_checkpoints, apgd_run, apgd_t
from enquant.attacks.carlini_wagner import cw_l2, cw_l2_rescaled
from enquant.attacks.core import PAPER_EPS, LogitsFn
from enquant.attacks.fgsm_pgd import PGD_LOSSES, cw_linf, fgsm, pgd
from enquant.attacks.objectives import (cross_entropy, dlr_loss, margin, neg_margin,
                                        targeted_dlr_loss)

__all__ = [
    "APGDState", "APGD_LOSSES", "LogitsFn", "PAPER_EPS", "PGD_LOSSES", "apgd", "apgd_checkpoints",
    "apgd_run", "apgd_t", "autoattack", "autoattack_settings", "autopgd", "carlini_wagner", "core",
    "cross_entropy", "cw_l2", "cw_l2_rescaled", "cw_linf", "dlr_loss", "fab", "fgsm", "fgsm_pgd",
    "margin", "neg_margin", "objectives", "pgd", "square", "targeted_dlr_loss",
]
