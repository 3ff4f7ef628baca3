"""What a trained run's ``results.json`` holds: natural and robust accuracy, efficiency, figures, the Markdown row.

:func:`final_results` is the last stage of :func:`enquant.pipeline.train_and_evaluate`; the rest is shared with
``experiments.evaluate`` and ``experiments.paper`` (re-evaluations, transfer attacks, the tables' figures), so a
run evaluated again uses exactly the attacks and keys it was evaluated with (:func:`eval_specs`, the
configuration's typed attack specs).
"""

import os
from typing import Any

import jax
import numpy as np

from enquant import data as data_lib
from enquant import evalfiles
from enquant import evaluate as evaluate_lib
from enquant import export as export_lib
from enquant import files
from enquant import plots
from enquant import packing
from enquant import prune as prune_lib
from enquant import results as results_lib
from enquant import sparsity
from enquant import train as train_lib
from enquant.config import ExperimentConfig
from enquant.models.ensemble import EnResNet


def eval_specs(cfg: ExperimentConfig):
  """The final evaluation's typed attacks (:meth:`enquant.config.EvalConfig.attack_specs` of the run)."""
  return cfg.eval.attack_specs(cfg.model.noise_coef > 0)


def robust_evaluation(cfg: ExperimentConfig, model: EnResNet, variables, images, labels, *,
                      progress: bool, oracle=None, resume_path: str | None = None) -> dict[str, Any]:
  """Natural + robust accuracy on ``images`` for :func:`eval_specs` (white-box, or transferred from
  ``oracle = (model, variables)``), with the settings and a RobustBench-style entry; ``resume_path``
  records finished (batch, attack) units and resumes from them (:mod:`enquant.evaluate`)."""
  specs = eval_specs(cfg)
  key = jax.random.PRNGKey(cfg.eval.seed)
  target_fn = jax.tree_util.Partial(model.apply_eval, variables)
  if oracle is None:
    acc, masks = evaluate_lib.evaluate(target_fn, images, labels, specs,
                                       batch_size=cfg.eval.batch_size, key=key, progress=progress,
                                       max_unroll=cfg.eval.max_unroll, return_masks=True,
                                       resume_path=resume_path)
  else:
    oracle_fn = jax.tree_util.Partial(oracle[0].apply_eval, oracle[1])
    acc, masks = evaluate_lib.transfer(oracle_fn, target_fn, images, labels, specs,
                                       batch_size=cfg.eval.batch_size, key=key, progress=progress,
                                       max_unroll=cfg.eval.max_unroll, return_masks=True,
                                       resume_path=resume_path)
  # Per-image correctness (hex, evaluate.pack_mask): paired comparisons of two runs on the same images.
  out: dict[str, Any] = {"accuracy": acc, "attacks": [s.to_dict() for s in specs],
                         "eval_seed": cfg.eval.seed, "examples": int(acc["n"]),
                         "masks": {k: evalfiles.pack_mask(v) for k, v in masks.items()}}
  # The RobustBench-style row: per image, the worst case over every attack run at the main eps, counted
  # as RobustBench and AutoAttack count (robust AND clean-correct: an image counts only if it is correct
  # on the clean pass and no attack broke it), not the single strongest attack's accuracy.
  at_eps = [s.name for s in specs if s.kind != "none" and s.eps == cfg.eval.eps]
  if at_eps:
    worst = evaluate_lib.worst_case(masks, at_eps) & np.asarray(masks["natural"], bool)
    acc_worst = dict(acc, worst_case=float(worst.mean()))
    out["accuracy_worst_case"] = float(worst.mean())
    out["robustbench"] = dict(evaluate_lib.robustbench_entry(acc_worst, "worst_case", eps=cfg.eval.eps),
                              attacks=at_eps,
                              aggregation=f"per-image worst case, {results_lib.WORST_CASE_COUNTING}")
  return out


FLOAT_MODEL = "model_float32.npz"  # a float run's model, beside its results (a quantized run's: model_packed.npz)


def save_float_model(path: str, cfg: ExperimentConfig, variables, input_shape) -> None:
  """Writes a float run's model as float32 in :func:`enquant.export.save`'s format (no kernel packed), so
  that :func:`enquant.export.load_model` rebuilds it alone."""
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), jax.device_get(variables["params"]))
  flat = packing.flatten(params)
  # No kernel is packed: every leaf is a float32 array (the format needs a bits field; nothing uses it).
  packed = packing.PackedModel(bits=1, ternary_method=cfg.quant.ternary_method, stacked=True, kernels={},
                               floats=flat)
  export_lib.save(path, packed, batch_stats=jax.device_get(variables["batch_stats"]),
                  model_config=cfg.model, input_shape=tuple(input_shape))


def efficiency_report(cfg: ExperimentConfig, model: EnResNet, variables, ds, workdir: str, *,
                      log) -> dict[str, Any]:
  """Sparsity (ours and the paper's counting), M bound, bit-packed size, and channel pruning."""
  params = jax.device_get(variables["params"])
  shape = ds.test_images.shape[1:]
  out: dict[str, Any] = {"bits": cfg.quant.bits if cfg.quant.enabled else 32,
                         "flops_per_image": prune_lib.flops(cfg.model, shape)}
  report = sparsity.weight_report(params)
  paper = sparsity.weight_report(params, sparsity.spatial_conv_mask)
  out["sparsity"] = {k: v for k, v in report.items() if k.startswith("total/")}
  out["sparsity_paper_counting"] = {k: v for k, v in paper.items() if k.startswith("total/")}
  out["sparsity_per_layer"] = {k: v for k, v in report.items()
                               if k.endswith(("weight_sparsity", "channel_sparsity"))
                               and not k.startswith("total/")}
  if not cfg.quant.enabled:
    path = os.path.join(workdir, FLOAT_MODEL)
    save_float_model(path, cfg, variables, shape)
    out["float_model"] = {"file": FLOAT_MODEL, "file_bytes": os.path.getsize(path)}
    return out
  packed = export_lib.pack(params, cfg.quant.bits, cfg.quant.ternary_method)
  path = os.path.join(workdir, "model_packed.npz")
  export_lib.save(path, packed, batch_stats=variables["batch_stats"], model_config=cfg.model,
                  input_shape=shape)
  out["packed"] = dict(export_lib.size_report(params, packed), file=os.path.basename(path),
                       file_bytes=os.path.getsize(path))
  log(f"packed {cfg.quant.bits}-bit model: {out['packed']['packed_bytes'] / 1024:.1f} KiB "
      f"(float32 {out['packed']['float32_bytes'] / 1024:.1f} KiB) -> {path}")
  if cfg.quant.bits >= 2:
    n = min(len(ds.test_images), cfg.eval.max_examples or len(ds.test_images))
    out["pruning"] = prune_lib.pruning_report(cfg.model, variables, ds.test_images[:n],
                                              ds.test_labels[:n], jax.random.PRNGKey(cfg.eval.seed),
                                              batch_size=cfg.eval.batch_size)
  return out


def final_results(cfg, model, state, ds, *, mesh, eval_step, progress, log, workdir) -> dict[str, Any]:
  """Natural accuracy on the whole test set; robust accuracy, efficiency, figures and tables."""
  variables = {"params": train_lib.eval_params(state, cfg.quant), "batch_stats": state.batch_stats}
  acc = train_lib.natural_accuracy(eval_step, variables, ds.test_images, ds.test_labels,
                                   batch_size=cfg.train.batch_size,
                                   key=jax.random.PRNGKey(cfg.eval.seed), mesh=mesh)
  log(f"final natural test accuracy: {acc:.4f} on {len(ds.test_images)} images")
  results: dict[str, Any] = {"schema_version": results_lib.SCHEMA_VERSION, "natural_accuracy": acc,
                             "test_examples": len(ds.test_images)}
  variables = jax.device_get(variables)
  n = min(len(ds.test_images), cfg.eval.max_examples or len(ds.test_images))
  if eval_specs(cfg):
    # A killed evaluation resumes at its first unfinished (batch, attack) when the run is rerun.
    results["robust"] = robust_evaluation(cfg, model, variables, ds.test_images[:n],
                                          ds.test_labels[:n], progress=progress,
                                          resume_path=os.path.join(workdir, "evaluation_progress.json"))
    log("robust accuracy on %d images: %s" % (n, ", ".join(
        f"{k}={v:.4f}" for k, v in results["robust"]["accuracy"].items() if k != "n")))
    figure_examples(cfg, model, variables, ds, os.path.join(workdir, "adversarial_examples.png"))
  results["efficiency"] = efficiency_report(cfg, model, variables, ds, workdir, log=log)
  rows = files.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  for name in ("m_bound", "m_bound_3x3"):  # the paper's M = max over epochs t of M_t (Table IV)
    logged = [r for r in rows if name in r]
    if logged:
      best = max(logged, key=lambda r, n=name: r[n])
      results[name], results[name + "_epoch"] = best[name], int(best["epoch"])
  if rows:
    results["history"] = rows  # per-epoch metrics, so the results file alone redraws the M_t curves
    plots.training_curves(os.path.join(workdir, "training_curves.png"), rows)
  results_lib.check_accuracies(results, where=os.path.join(workdir, "results.json"))
  return results


def example_spec(cfg: ExperimentConfig, kind: str = "pgd"):
  """The attack a Fig. 1-style picture shows: the evaluation's first single-sample attack of ``kind``, else
  its first single-sample attack, else None."""
  specs = [s for s in eval_specs(cfg) if s.kind != "none" and s.eot_samples == 1]
  return next((s for s in specs if s.kind == kind), specs[0] if specs else None)


def figure_examples(cfg, model, variables, ds, path: str, count: int = 8, kind: str = "pgd") -> None:
  """Fig. 1-style PNG on the first test images for the evaluation's first single-sample attack of ``kind``
  (the paper's Fig. 1: ``"fgsm"``), or its first attack when it has none of that kind."""
  spec = example_spec(cfg, kind)
  if spec is None:
    return
  x = data_lib.to_float(ds.test_images[:count])
  y = jax.numpy.asarray(ds.test_labels[:count])
  key = jax.random.PRNGKey(cfg.eval.seed)
  fn = model.logits_fn(variables)
  x_adv = jax.jit(lambda xx, yy, k: evaluate_lib.craft(spec, fn, xx, yy, k,
                                                       max_unroll=cfg.eval.max_unroll))(x, y, key)
  probs = lambda z: np.asarray(jax.nn.softmax(fn(z, key)))
  plots.adversarial_examples(path, np.asarray(x), np.asarray(x_adv), ds.test_labels[:count],
                             probs(x), probs(x_adv), eps=spec.eps, attack=spec.name)


# What a results.md footnote says of each attack that ran (by the name's base, before -eotK and @eps).
ATTACK_NOTES = {"A1": "A1 FGSM", "A2": "A2 IFGSM-20",
                "A3": "A3 CW-l_inf (untargeted margin loss under PGD)",
                "cwl2": "cwl2 the EnResNet code's C&W (L2, Adam, rescaled to eps)"}


def _footnote(results: dict[str, Any], acc: dict[str, Any]) -> str:
  """The footnote of :func:`markdown_row`: the evaluation's images and eps, and only the attacks that ran."""
  bases = {k.split("@")[0].split("-eot")[0] for k in acc if k not in ("natural", "n")}
  named = [text for base, text in ATTACK_NOTES.items() if base in bases]
  eot = any("-eot" in k for k in acc)
  return (f"\n\nRobust accuracy on the first {acc.get('n', 0)} test images, eps "
          f"{results['config']['eval']['eps']:.4g}; N on all {results['test_examples']}. "
          + "".join(f"{text}, " for text in named)
          + "counted as the paper counts (correct under the attack); worst case: correct on the clean image "
          "and under every attack" + ("; -eotK: gradients averaged over K noise draws" if eot else "") + ".\n")


def markdown_row(results: dict[str, Any]) -> str:
  """The paper-style table row (N, A1..A3 with and without EOT, sparsity, size) as Markdown."""
  cfg = results["config"]
  acc = results.get("robust", {}).get("accuracy", {})
  eff = results.get("efficiency", {})
  q = cfg["quant"]
  cols = {"net": results["model_name"], "dataset": cfg["dataset"],
          "quant": q["mode"] if q["mode"] == "float" else f"{q['mode']} {q['bits']}-bit",
          "loss": cfg["loss"]["kind"] + (f" a={cfg['loss']['alpha']:g} b={cfg['loss']['beta']:g}"
                                         if cfg["loss"]["kind"] in ("tradeoff", "trades") else ""),
          "N": f"{100 * results['natural_accuracy']:.2f}%"}
  for k, v in acc.items():
    if k not in ("natural", "n"):
      cols[k] = f"{100 * v:.2f}%"
  if "robust" in results and "accuracy_worst_case" in results["robust"]:
    cols["worst case"] = f"{100 * results['robust']['accuracy_worst_case']:.2f}%"
  if "sparsity" in eff:
    cols["weight sparsity"] = f"{100 * eff['sparsity']['total/weight_sparsity']:.2f}%"
    cols["channel sparsity"] = f"{100 * eff['sparsity']['total/channel_sparsity']:.2f}%"
  paper = eff.get("sparsity_paper_counting", {})
  if "total/in_channel_sparsity" in paper:  # the paper's count: input channels of the 3x3 convs
    cols["channel sparsity (paper)"] = (f"{100 * paper['total/in_channel_sparsity']:.2f}% "
                                        f"({paper['total/zero_in_channels']:.0f}/{paper['total/in_channels']:.0f})")
  if "total/zero_dispersion" in paper:  # 1: zeros scattered; 9 x out-channels: whole zero channels
    cols["zero dispersion (3x3)"] = f"{paper['total/zero_dispersion']:.2f}"
  if "m_bound" in results:
    cols["M (all / 3x3)"] = f"{results['m_bound']:.4f} / {results['m_bound_3x3']:.4f}"
  if "packed" in eff:
    cols["packed KiB"] = f"{eff['packed']['packed_bytes'] / 1024:.1f}"
  if "pruning" in eff:
    pr = eff["pruning"]
    cols["pruned FLOPs"] = f"{pr.get('flops_after', 0) / max(pr.get('flops_before', 1), 1):.1%}"
  header = "| " + " | ".join(cols) + " |"
  sep = "|" + "|".join("---" for _ in cols) + "|"
  body = "| " + " | ".join(str(v) for v in cols.values()) + " |"
  note = _footnote(results, acc) if acc else "\n"
  return header + "\n" + sep + "\n" + body + note
