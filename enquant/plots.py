"""Figures as PNG files (matplotlib, Agg backend): Fig. 1-style adversarial examples, training curves."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120, bbox_inches="tight")
  plt.close(fig)
  os.replace(tmp, path)
  return path


def _show(ax, image: np.ndarray, title: str) -> None:
  image = np.asarray(image, np.float32)
  if image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
  else:
    ax.imshow(np.clip(image, 0.0, 1.0))
  ax.set_title(title, fontsize=8)
  ax.axis("off")


def adversarial_examples(path: str, clean: np.ndarray, adversarial: np.ndarray, labels: np.ndarray,
                         clean_probs: np.ndarray, adv_probs: np.ndarray, *, eps: float,
                         attack: str, class_names=None) -> str:
  """Fig. 1 of the paper: clean image, perturbation (rescaled to [0, 1]), adversarial image.

  Each panel is titled with the model's predicted class and its confidence (softmax probability).
  """
  n = len(clean)
  names = class_names or [str(i) for i in range(clean_probs.shape[-1])]
  fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5.2), squeeze=False)
  for i in range(n):
    pc, pa = int(np.argmax(clean_probs[i])), int(np.argmax(adv_probs[i]))
    _show(axes[0, i], clean[i], f"true {names[labels[i]]}\npred {names[pc]} ({clean_probs[i, pc]:.0%})")
    delta = (np.asarray(adversarial[i]) - np.asarray(clean[i])) / (2 * eps) + 0.5
    _show(axes[1, i], delta, "perturbation")
    _show(axes[2, i], adversarial[i], f"pred {names[pa]} ({adv_probs[i, pa]:.0%})")
  fig.suptitle(f"{attack}, eps={eps:.3g}: clean (top), perturbation (middle, x1/(2 eps)), adversarial",
               fontsize=9)
  return _save(fig, path)


def training_curves(path: str, rows: list[dict],
                    keys=("test_acc", "train_loss", "m_bound", "weight_sparsity"), x: str = "epoch") -> str:
  """``keys`` of ``rows`` (those present) against ``x``: by default test accuracy, training loss and (when
  logged) the M_t bound against epochs (cf. Fig. 2). ``None`` values are left out of their panel."""
  keys = [k for k in keys if rows and k in rows[0]]
  fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3), squeeze=False)
  for ax, k in zip(axes[0], keys):
    points = [(r[x], r[k]) for r in rows if r.get(k) is not None]
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3)
    ax.set_xlabel(x)
    ax.set_title({"m_bound": "M_t = max_layer mean|w|"}.get(k, k), fontsize=9)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  return _save(fig, path)


def m_curves(path: str, curves: dict[str, tuple[list[int], list[float]]]) -> str:
  """Fig. 2 of the paper: ``M_t`` (max over conv layers of mean|w|) against epochs, one line per model."""
  fig, ax = plt.subplots(figsize=(4.8, 3.2))
  for label, (epochs, values) in curves.items():
    ax.plot(epochs, values, marker="o", ms=3, label=label)
  ax.set_xlabel("epoch")
  ax.set_ylabel("M_t")
  ax.set_title("M_t = max over conv layers of mean |w|", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def minibatch(path: str, images: np.ndarray, labels: np.ndarray, *, title: str, columns: int = 8,
              class_names=None) -> str:
  """Fig. 7 of the paper: a mini-batch of a dataset, each image titled with its label."""
  n = len(images)
  rows = -(-n // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(1.2 * columns, 1.35 * rows), squeeze=False)
  for i, ax in enumerate(axes.reshape(-1)):
    if i < n:
      image = np.asarray(images[i], np.float32)
      image = image / 255.0 if image.max() > 1.0 else image
      name = class_names[int(labels[i])] if class_names else str(int(labels[i]))
      _show(ax, image, name)
    else:
      ax.axis("off")
  fig.suptitle(title, fontsize=9)
  return _save(fig, path)


def kernels(path: str, panels: dict[str, np.ndarray], *, title: str) -> str:
  """Figs. 3-6 of the paper: 3x3 kernels (or reshaped channels) side by side, one column per model.

  Args:
    path: PNG file.
    panels: ``{column title: (k, H, W) array}``; every column shows its k kernels top to bottom on a
      symmetric colour scale, exact zeros drawn in white-on-grey so sparsity is visible.
    title: figure title.
  """
  cols = list(panels)
  k = max(len(v) for v in panels.values())
  fig, axes = plt.subplots(k, len(cols), figsize=(1.9 * len(cols), 1.5 * k), squeeze=False)
  for c, name in enumerate(cols):
    for r in range(k):
      ax = axes[r, c]
      ax.axis("off")
      if r >= len(panels[name]):
        continue
      w = np.asarray(panels[name][r], np.float32)
      scale = float(np.abs(w).max()) or 1.0
      ax.imshow(w, cmap="coolwarm", vmin=-scale, vmax=scale)
      zeros = np.argwhere(w == 0)
      if len(zeros):
        ax.scatter(zeros[:, 1], zeros[:, 0], s=6, c="k", marker="s")
      if r == 0:
        ax.set_title(name, fontsize=8)
  fig.suptitle(title, fontsize=9)
  return _save(fig, path)
