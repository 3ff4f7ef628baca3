"""Converts committed results files to the current schema (:data:`enquant.results.SCHEMA_VERSION`).

    PYTHONPATH=$PWD python scripts/convert_results.py [results]     # every results/<scale>/... JSON

Run results (``runs/``, ``seeds_runs/``, ``epochs_runs/``, ``reruns/``) and transfer evaluations
(``transfers/``) of an earlier schema get:

* ``schema_version``;
* the worst case counted as robust AND clean-correct from the per-image masks (it must equal the stored
  value: a file where it does not is reported and left alone); without masks it cannot be verified and is
  removed with its RobustBench-style entry;
* ``total/dispersion_channels`` of the paper-counted sparsity (the input channels the pooled zero
  dispersion averages: every 3x3 input channel of a ternary or 4-bit run, none of a float or binary run);
* for a transfer evaluation kept without masks, the discordant counts of its kept claim check, recovered
  exactly from the kept difference and normal interval (so that the exact McNemar test can decide it).

Every converted file must load as :class:`enquant.results.RunResults` (or an evaluation) before it is
written. Files already at the schema are skipped.

A run configuration written without ``model.noise_rng`` (runs whose noise came from threefry, made before
the field existed) gets ``"noise_rng": "threefry"``; its run name (a hash of the configuration) changes, so
the file is renamed (:func:`name_noise_rng`) and the tables are rebuilt with
``python -m experiments.paper --table=all --tables_only``.
"""

import glob
import math
import os
import sys

import numpy as np

from enquant import evalfiles
from enquant import files
from enquant import results as results_lib

Z95 = 1.959964


def _worst_case(robust: dict, where: str) -> None:
  """Recounts ``robust``'s worst case as robust AND clean-correct (or drops it when it has no masks)."""
  if "accuracy_worst_case" not in robust:
    return
  masks, entry = robust.get("masks"), robust.get("robustbench")
  if not masks or entry is None:
    print(f"{where}: no per-image masks; the unverifiable worst case is removed")
    robust.pop("accuracy_worst_case")
    robust.pop("robustbench", None)
    return
  n = int(robust["accuracy"]["n"])
  both = np.logical_and.reduce([evalfiles.unpack_mask(masks[k], n) for k in ["natural", *entry["attacks"]]])
  if float(both.mean()) != robust["accuracy_worst_case"]:
    raise ValueError(f"{where}: robust AND clean-correct gives {both.mean()}, the file holds "
                     f"{robust['accuracy_worst_case']}; left unconverted")
  entry["aggregation"] = f"per-image worst case, {results_lib.WORST_CASE_COUNTING}"


def _discordant(column: dict) -> None:
  """Adds ``b`` and ``c`` (better-only and worse-only correct images) to a kept paired difference."""
  n, d = column["n"], column["diff"] / 100
  sd = (column["high"] - column["low"]) / 200 * math.sqrt(n) / Z95
  total = n * (sd * sd * (n - 1) / n + d * d)
  if abs(total - round(total)) > 1e-3 or abs(n * d - round(n * d)) > 1e-6:
    raise ValueError(f"kept interval {column} does not come from integer discordant counts")
  b = (round(total) + round(n * d)) // 2
  column.update(b=b, c=round(total) - b)


def convert_run(data: dict, where: str) -> dict:
  out = {"schema_version": results_lib.SCHEMA_VERSION, **data}
  if out.get("robust") is not None:
    _worst_case(out["robust"], where)
  counted = out.get("efficiency", {}).get("sparsity_paper_counting")
  if counted is not None and "total/dispersion_channels" not in counted:
    bits = out["efficiency"]["bits"]
    counted["total/dispersion_channels"] = counted["total/in_channels"] if bits in (2, 4) else 0
  results_lib.RunResults.from_dict(out, where)
  return out


def convert_transfer(data: dict, where: str) -> dict:
  out = {"schema_version": results_lib.SCHEMA_VERSION, **data}
  if "natural" not in out["accuracy"]:  # kept without its clean pass: the worst case cannot be recounted
    out.pop("accuracy_worst_case", None)
  _worst_case(out, where)
  if "check" in out and "masks" not in out:
    for column in out["check"]["columns"].values():
      _discordant(column)
    out["reconstructed_from"] = "results/cpu/table_III.json of commit 5202526, kept without per-image masks"
  results_lib.Evaluation.from_dict(out, where)
  return out


def name_noise_rng(root: str) -> int:
  """Writes ``noise_rng: threefry`` into run configurations without it and renames their files."""
  from experiments.paper import scales  # pylint: disable=g-import-not-at-top
  from enquant.config import ExperimentConfig  # pylint: disable=g-import-not-at-top
  renamed = 0
  for path in sorted(glob.glob(os.path.join(root, "*", "*", "*.json"))):
    data = files.read_json(path)
    model = data.get("config", {}).get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or "noise_rng" in model:
      continue
    model["noise_rng"] = "threefry"
    old = os.path.basename(path)[:-len(".json")]
    new = scales.run_name(ExperimentConfig.from_dict(data["config"]))
    if data.get("workdir", "").endswith(old):
      data["workdir"] = data["workdir"][:-len(old)] + new
    target = os.path.join(os.path.dirname(path), new + ".json")
    files.write_json_atomic(target, data)
    if target != path:
      os.remove(path)
    print(f"{path} -> {target}")
    renamed += 1
  return renamed


def main(root: str) -> int:
  changed = name_noise_rng(root)
  for path in sorted(glob.glob(os.path.join(root, "*", "*", "*.json"))):
    kind = os.path.basename(os.path.dirname(path))
    if kind not in ("runs", "seeds_runs", "epochs_runs", "reruns", "transfers"):
      continue
    data = files.read_json(path)
    if data.get("schema_version") == results_lib.SCHEMA_VERSION:
      continue
    convert = convert_transfer if kind == "transfers" else convert_run
    files.write_json_atomic(path, convert(data, path))
    changed += 1
  print(f"{changed} results file(s) converted under {root}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "results"))
