"""The paper's figures from finished runs: Figs. 1 and 3-6 need the trained models, Fig. 7 the data.

A model comes from the committed run's kept model file when there is one (the tables' run exactly, no run
directory needed), else from its finished run directory, else from its retrained run's kept model (the
panel then says "retrained run")."""

import os

import numpy as np

from enquant import data as data_lib
from enquant import pipeline
from enquant import plots
from enquant import run_results
from experiments.paper import scales


def kernel_panels(path: str, data_dir: str | None, count: int = 4, channels: bool = False):
  """``count`` kernels (member 0) of :func:`experiments.paper.scales.kernel_layer` of a finished run (its
  run directory or kept model file): 3x3 kernels at fixed random positions, or whole output channels
  reshaped to (in_channels, 9) (the paper's "reshaped channels")."""
  _, _, variables = pipeline.load_trained(path, data_dir=data_dir, log=lambda *_: None)
  block, conv = scales.kernel_layer(variables["params"])
  kernel = np.asarray(variables["params"][block][conv]["kernel"][0])  # (3, 3, I, O)
  rng = np.random.default_rng(0)
  if channels:
    outs = rng.choice(kernel.shape[-1], count, replace=False)
    return np.stack([kernel[..., o].reshape(9, -1).T for o in outs])
  idx = [(rng.integers(kernel.shape[2]), rng.integers(kernel.shape[3])) for _ in range(count)]
  return np.stack([kernel[:, :, i, o] for i, o in idx])


KERNEL_FIGURES = (
    ("fig3_float_vs_binary_kernels.png", "Fig. 3: the same 3x3 kernels, binary (BR) and float (PGD-AT)",
     [("I", dict(ensembles=1, quant="br")), ("I", dict(ensembles=1, quant="float"))], False),
    ("fig4_ternary_channels_at.png", "Fig. 4: ternary channels under PGD-AT (zeros marked)",
     [("VII", dict(depth=20, noise=0.0, bits=2, loss="at"))], True),
    ("fig5_ternary_channels_natural.png", "Fig. 5: ternary channels under natural training",
     [("VII", dict(depth=56, noise=0.1, bits=2, loss="natural"))], True),
    ("fig6_ternary_channels_at_vs_tradeoff.png", "Fig. 6: ternary channels, PGD-AT vs loss (6)",
     [("VII", dict(depth=20, noise=0.1, bits=2, loss="at")),
      ("VII", dict(depth=20, noise=0.1, bits=2, loss="tradeoff"))], True),
)


def draw(runs_dir: str, out_dir: str, scale: str, data_dir: str | None, is_done, log=print,
         kept_model=lambda name: None) -> None:
  """Figs. 1 and 3-7, each drawn once its runs' models exist (module docstring): ``kept_model(name)`` is
  ``(model file, retrained)`` or None (:meth:`experiments.paper.committing.Store.kept_model`),
  ``is_done(workdir)`` whether a run directory holds the tables' finished run."""
  def source(table, **match):
    """``(run directory or model file or None, row, retrained)`` of the table's row matching ``match``."""
    row = next(r for r in scales.table(table).rows
               if r.oracle is None and all(getattr(r, k) == v for k, v in match.items()))
    name = scales.run_name(scales.build_config(row, scale))
    kept, workdir = kept_model(name), os.path.join(runs_dir, name)
    if kept is not None and not kept[1]:
      return kept[0], row, False
    if is_done(workdir):
      return workdir, row, False
    return (kept[0], row, True) if kept is not None else (None, row, False)

  for name, title, sources, channels in KERNEL_FIGURES:
    found = [source(t, **m) for t, m in sources]
    if all(path is not None for path, _, _ in found):
      panels = {f"{r.net} {r.quant_label} {r.loss_label}" + ("\n(retrained run)" if retrained else ""):
                kernel_panels(path, data_dir, channels=channels) for path, r, retrained in found}
      plots.kernels(os.path.join(out_dir, name), panels, title=title + f" ({scale} scale)")
      log(f"figure -> {out_dir}/{name}")
  # Fig. 1: FGSM on the paper's naturally trained ResNet56 (here the nearest run: Table VII's ternary one).
  fig1, row, _ = source("VII", depth=56, noise=0.0, bits=2, loss="natural")
  if fig1 is not None:
    cfg, model, variables = pipeline.load_trained(fig1, data_dir=data_dir, log=lambda *_: None)
    ds = data_lib.load(cfg.dataset, cfg.data_dir, source=cfg.data_source, max_train=1)
    path = os.path.join(out_dir, "fig1_fgsm_examples.png")
    run_results.figure_examples(cfg, model, variables, ds, path, kind="fgsm")
    log(f"figure -> {path} ({row.net} {row.quant_label} {row.loss_label})")
  for dataset in ("fmnist", "svhn"):  # Fig. 7: a mini-batch of each dataset we can read
    try:
      ds = data_lib.load(dataset, data_dir, max_train=32, max_test=1)
    except (ValueError, FileNotFoundError):
      continue
    plots.minibatch(os.path.join(out_dir, f"fig7_{dataset}_minibatch.png"), ds.train_images[:32],
                    ds.train_labels[:32], title=f"Fig. 7: a mini-batch of {dataset}")


__all__ = ["KERNEL_FIGURES", "draw", "kernel_panels"]
