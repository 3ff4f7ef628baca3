"""Compares every number of two builds of the paper tables (``table_*.json`` and ``table_*.md``).

    PYTHONPATH=$PWD python scripts/compare_tables.py BEFORE_DIR AFTER_DIR

JSON: every numeric leaf of BEFORE (rows, checks, trends) found at the same path in AFTER must be equal;
leaves AFTER drops are counted by name. Markdown: per table row, every cell of BEFORE's row (``<column>
ours``, ``<column> paper``, ``<column> diff``, worst, other attacks, wall) must equal the cell of the same
column in AFTER's ours, paper and diff lines. Exit 1 on any difference.
"""

import collections
import glob
import json
import os
import sys


def leaves(obj, path=()):
  if isinstance(obj, bool):
    return
  if isinstance(obj, (int, float)):
    yield path, obj
  elif isinstance(obj, dict):
    for k, v in obj.items():
      yield from leaves(v, path + (k,))
  elif isinstance(obj, list):
    for i, v in enumerate(obj):
      yield from leaves(v, path + (i,))


def md_rows(path):
  """``(header, [cells])`` of the first Markdown table of ``path`` (the table's rows)."""
  lines = [l for l in open(path).read().split("\n\n") if l.startswith("| ")]
  block = lines[0].splitlines()
  split = lambda l: [c.strip() for c in l.strip().strip("|").split("|")]
  return split(block[0]), [split(l) for l in block[2:]]


def compare_md(before, after):
  hb, rb = md_rows(before)
  ha, ra = md_rows(after)
  groups, current = [], None
  for cells in ra:  # ours line, paper line, optional diff line
    row = dict(zip(ha, cells))
    if row["numbers"].startswith("ours"):
      current = {"ours": row}
      groups.append(current)
    else:
      current[row["numbers"].split(" ")[0]] = row
  assert len(groups) == len(rb), (before, len(groups), len(rb))
  same, removed, diffs = 0, collections.Counter(), []
  for cells, group in zip(rb, groups):
    old = dict(zip(hb, cells))
    for key, value in old.items():
      col, _, kind = key.rpartition(" ")
      if kind in ("ours", "paper", "diff") and col in ha:
        line = group.get(kind)
        if line is None:
          removed[f"{kind} (stand-in row)"] += 1
          continue
        new = line[col]
      elif key in ("worst", "wall", "other attacks (ours)"):
        new = group["ours"]["other attacks" if key.startswith("other") else key]
      else:
        removed[key] += 1
        continue
      if key == "worst" and new == "-":
        removed["worst (no per-image masks to verify it)"] += 1
      elif new == value:
        same += 1
      else:
        diffs.append((before, key, value, new))
  return same, removed, diffs


def main(before_dir, after_dir):
  total, dropped, bad = 0, collections.Counter(), []
  md_same, md_removed = 0, collections.Counter()
  for before in sorted(glob.glob(os.path.join(before_dir, "table_*.json"))):
    after = os.path.join(after_dir, os.path.basename(before))
    new = dict(leaves(json.load(open(after))))
    for path, value in leaves(json.load(open(before))):
      if path not in new:
        dropped["/".join(str(p) for p in path if not isinstance(p, int))] += 1
      elif new[path] != value:
        bad.append((before, path, value, new[path]))
      else:
        total += 1
    same, removed, diffs = compare_md(before[:-5] + ".md", after[:-5] + ".md")
    md_same += same
    md_removed.update(removed)
    bad += diffs
  print(f"JSON: {total} numbers equal; {sum(dropped.values())} dropped: {dict(dropped)}")
  print(f"Markdown: {md_same} cells equal; {sum(md_removed.values())} dropped: {dict(md_removed)}")
  for b in bad:
    print("DIFFERENT", *b)
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1], sys.argv[2]))
