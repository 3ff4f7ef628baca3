"""Fig. 1's claim at cpu scale: a naturally trained float ResNet under FGSM and C&W.

The paper's introduction: a naturally trained ResNet56 on CIFAR-10 falls from about 92 % to 17.26 % under
FGSM and to 5.12 % under C&W. Here the cpu scale's stand-in (Fashion-MNIST, depth 56 -> 14, the
protocol of the claim rows: ``experiments.paper.scales.build_config``), natural loss, float weights, no
noise, evaluated with A1 (FGSM), A2 (IFGSM-20), A3 (CW-l_inf) and ``cwl2`` (the EnResNet code's C&W) at
eps 0.031 on the first 1,000 test images.

    PYTHONPATH=$PWD python scripts/fig1_natural.py [--epochs=6] [--data_dir=../shared/data]

Trains into ``runs/paper/cpu/<run>`` (resumes a finished or interrupted run), then writes
``results/cpu/fig1_natural.{md,json}`` and keeps the model as ``results/cpu/fig1_natural.npz``.
"""

import argparse
import dataclasses
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from enquant import files, pipeline, results as results_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from experiments.paper import committing, reports, scales, tables  # noqa: E402  pylint: disable=g-import-not-at-top

PAPER = {"N": 92.0, "A1": 17.26, "A3": 5.12}  # the paper's introduction (Fig. 1), CIFAR-10 ResNet56
ROW = tables.Row("cifar10", 1, depth=56, quant="float", loss="natural", noise=0.0)
ATTACKS = "a1,a2,a3,cwl2"


def config(epochs: int):
  """The cpu-scale configuration of :data:`ROW`, evaluated with :data:`ATTACKS`."""
  cfg = scales.with_epochs(scales.build_config(ROW, "cpu"), epochs)
  return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, attacks=ATTACKS))


def markdown(name: str, res: results_lib.RunResults, command: str) -> str:
  acc = res.robust.accuracy
  ours = {"N": 100 * res.natural_accuracy, "N1000": 100 * acc["natural"],
          **{k: 100 * acc[k] for k in ("A1", "A2", "A3", "cwl2")}}
  lines = ["# Fig. 1: a naturally trained float ResNet under FGSM and C&W", "",
           f"Command: `{command}`. Run `{name}` (Fashion-MNIST stand-in, ResNet14, float, natural loss); "
           f"N on the whole test set, attacks at eps 0.031 on the first {res.robust.mask('A1').size} test images, per-attack "
           "counting (correct under the attack).", "",
           "| | N | N (attacked images) | A1 (FGSM) | A2 (IFGSM-20) | A3 (CW-l_inf) | cwl2 (EnResNet C&W) |",
           "|---|---|---|---|---|---|---|",
           "| ours | " + " | ".join(f"{ours[k]:.2f}" for k in ("N", "N1000", "A1", "A2", "A3", "cwl2")) + " |",
           f"| paper (CIFAR-10 ResNet56) | about {PAPER['N']:.0f} | | {PAPER['A1']:.2f} | - | {PAPER['A3']:.2f} "
           "(C&W) | |", ""]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=6)
  parser.add_argument("--data_dir", default=os.path.join(os.path.dirname(ROOT), "shared", "data"))
  parser.add_argument("--results", default=os.path.join(ROOT, "results", "cpu"))
  parser.add_argument("--runs", default=os.path.join(ROOT, "runs", "paper", "cpu"))
  args = parser.parse_args(argv)
  cfg = config(args.epochs)
  name = scales.run_name(cfg)
  store = committing.Store(runs_dir=args.runs, out_dir=args.results, scale="cpu", data_dir=args.data_dir)
  workdir = store.workdir(name)
  if not os.path.exists(os.path.join(workdir, "results.json")):
    pipeline.train_and_evaluate(committing.with_data_dir(cfg, args.data_dir), workdir, progress=False)
  res = results_lib.RunResults.from_json(os.path.join(workdir, "results.json"))
  command = f"PYTHONPATH=$PWD python scripts/fig1_natural.py --epochs={args.epochs}"
  kept = reports.portable(res.to_dict())
  if os.path.isabs(kept["config"].get("data_dir") or ""):  # no path of this machine in committed results
    kept["config"]["data_dir"] = os.path.relpath(kept["config"]["data_dir"])
  files.write_json_atomic(os.path.join(args.results, "fig1_natural.json"),
                          {"command": command, "paper": PAPER, "results": kept})
  files.write_text_atomic(os.path.join(args.results, "fig1_natural.md"), markdown(name, res, command))
  store.keep_model(name, float_run=True, dest=os.path.join(args.results, "fig1_natural.npz"))
  print(markdown(name, res, command))
  return 0


if __name__ == "__main__":
  sys.exit(main())
