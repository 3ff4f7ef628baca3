"""Paper tables rebuilt from run results: the paper's numbers and ours side by side, as Markdown and JSON.

:func:`table_rows` pairs every row of a :class:`enquant.paper.Table` with the ``results.json`` of its run
(and, for transfer rows, the transfer evaluation); :func:`table_markdown` renders them with the protocol in
the header. Missing runs appear as ``pending``, never as numbers.
"""

from typing import Any

from enquant import paper as paper_lib


def _fmt(value: float | None, column: str) -> str:
  if value is None:
    return "-"
  return f"{value:.4f}" if column == "M" else f"{value:.2f}"


def table_rows(tbl: paper_lib.Table, scale: str, results: dict[str, dict], transfers: dict[tuple, dict]
               ) -> list[dict[str, Any]]:
  """One dict per table row: labels, run name, state, and per column the paper's number, ours, the difference.

  Args:
    tbl: the table.
    scale: "paper", "cpu" or "gpu<E>".
    results: ``results.json`` contents by run name (finished runs only).
    transfers: transfer evaluations by ``(target run name, oracle run name)``.
  """
  out = []
  for row in tbl.rows:
    cfg = paper_lib.build_config(row, scale)
    name = paper_lib.run_name(cfg)
    res = results.get(name)
    oracle_name = None
    transfer = None
    if row.oracle is not None:
      oracle_name = paper_lib.run_name(paper_lib.build_config(row.oracle, scale))
      transfer = transfers.get((name, oracle_name))
    done = res is not None and (row.oracle is None or transfer is not None)
    entry: dict[str, Any] = {
        "net": row.net, "dataset": row.dataset, "run_dataset": cfg.dataset, "run_net": cfg.model.name,
        "quant": row.quant_label, "loss": row.loss_label, "run": name, "oracle_run": oracle_name,
        "oracle": None if row.oracle is None else f"{row.oracle.net} {row.oracle.quant_label}",
        "state": "done" if done else "pending", "columns": {},
        "wall_seconds": None if res is None else res.get("wall_seconds"),
        "examples_robust": None if res is None else res.get("robust", {}).get("examples"),
    }
    paper_numbers = dict(row.paper)
    for column in tbl.columns:
      ours = paper_lib.measured(res, column, transfer) if done else None
      theirs = paper_numbers.get(column)
      entry["columns"][column] = {
          "paper": theirs, "ours": ours,
          "diff": None if ours is None or theirs is None else ours - theirs}
    if done:
      entry["worst_case"] = None if transfer is not None else (
          100 * res["robust"]["accuracy_worst_case"] if "accuracy_worst_case" in res.get("robust", {})
          else None)
      extra = {k: 100 * v for k, v in res.get("robust", {}).get("accuracy", {}).items()
               if k not in ("natural", "n", *tbl.columns)}
      entry["extra_attacks"] = extra
    out.append(entry)
  return out


def _noise_note(tbl: paper_lib.Table) -> str:
  """Which generator drew EnResNet's N(0, 1) noise in the table's rows (enquant.models.noise)."""
  legacy = [f"{r.dataset} {r.quant_label}" for r in tbl.rows
            if (r.noise_rng or paper_lib.PAPER_NOISE_RNG) != paper_lib.PAPER_NOISE_RNG]
  note = f"Noise normals from the {paper_lib.PAPER_NOISE_RNG} generator"
  return note + (f" ({', '.join(legacy)}: threefry, as trained before the hash existed)." if legacy else ".")


def table_markdown(tbl: paper_lib.Table, scale: str, rows: list[dict[str, Any]]) -> str:
  """The Markdown of a rebuilt table (header with the protocol and the claim, then the rows)."""
  if scale == "paper":
    protocol = ("paper scale: the paper's protocol (200 epochs, PGD-10 training attack, A1-A3 at eps 0.031 "
                "on the whole test set).")
  elif paper_lib.gpu_epochs(scale) is not None:
    protocol = paper_lib.gpu_note(paper_lib.gpu_epochs(scale))
  else:
    kinds = sorted({paper_lib.cpu_kind(r) for r in tbl.rows})
    labels = {"claim": "CIFAR/SVHN rows", "direct": "MNIST/Fashion-MNIST rows"}
    protocol = " ".join(f"*{labels[k]}:* {paper_lib.CPU_NOTES[k]}" for k in kinds)
  lines = [f"# Table {tbl.name}: {tbl.title}", "",
           f"**Claim:** {tbl.claim}.", "", f"**Protocol:** {protocol}", "",
           "Numbers in %, except M. *paper* = the paper's value, *ours* = this run, *diff* = ours - paper. "
           "A2 = IFGSM-20 (step 0.003), A3 = CW-l_inf (50 steps, margin loss; the paper's C&W was an L2 "
           "attack), worst = per-image worst case over every attack run at eps 0.031. " + _noise_note(tbl),
           ""]
  header = ["net", "dataset", "quant", "loss"]
  if tbl.transfer:
    header.append("oracle")
  for c in tbl.columns:
    header += [f"{c} paper", f"{c} ours", f"{c} diff"]
  header += ["worst", "other attacks (ours)", "run (dataset, net)", "wall"]
  lines.append("| " + " | ".join(header) + " |")
  lines.append("|" + "---|" * len(header))
  for r in rows:
    cells = [r["net"], r["dataset"], r["quant"], r["loss"]]
    if tbl.transfer:
      cells.append(r["oracle"] or "")
    for c in tbl.columns:
      v = r["columns"][c]
      diff = "-" if v["diff"] is None else f"{v['diff']:+.2f}" if c != "M" else f"{v['diff']:+.4f}"
      cells += [_fmt(v["paper"], c), _fmt(v["ours"], c) if r["state"] == "done" else "pending", diff]
    cells.append(_fmt(r.get("worst_case"), "N"))
    cells.append(", ".join(f"{k} {v:.2f}" for k, v in sorted(r.get("extra_attacks", {}).items())) or "-")
    cells.append(f"{r['run_dataset']}, {r['run_net']}")
    wall = r.get("wall_seconds")
    cells.append("-" if wall is None else f"{wall / 60:.0f} min")
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  lines.append("")
  return "\n".join(lines)


__all__ = ["table_markdown", "table_rows"]
