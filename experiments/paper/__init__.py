"""The paper's reproduction harness: its tables as data, its scales, the runs, the reports and the claim checks.

Li, Wang, Xin, "An Integrated Approach to Produce Robust Models with High Efficiency".

* :mod:`experiments.paper.tables`: every table (I-VIII) as rows with the paper's numbers, and the claims.
* :mod:`experiments.paper.scales`: the paper's protocol and the scales a row is run at (``paper``, ``cpu``,
  ``gpu<E>``), the run names.
* :mod:`experiments.paper.reports`: the tables rebuilt from typed run results (Markdown and JSON).
* :mod:`experiments.paper.checks`: the claim checks (exact McNemar test on paired per-image masks) and
  trends.
* :mod:`experiments.paper.seeds`, :mod:`experiments.paper.epochs`: training-seed and training-length studies.
* :mod:`experiments.paper.pool`: CPU-pinned worker processes.

``python -m experiments.paper`` trains what a table is missing, evaluates it and rebuilds the table.
Importing this package defines no flags.
"""
