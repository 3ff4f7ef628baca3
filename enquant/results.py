"""Typed run results: ``results.json`` of a run and its robust (or transfer) evaluations, validated.

A results file is JSON with a ``schema_version``; :class:`RunResults` reads it, refuses what cannot be true
with one line naming the file (:class:`ResultsError`), and gives typed access to what readers need, so
that no reader digs into the dict by string paths. The whole dict is kept (``to_dict`` returns it
unchanged), so a file read and written again is the same file.

What is checked:

* every accuracy is a number in [0, 1] (not a string, not a bool), counts are positive integers;
* per-image masks, where present, unpack to the evaluated image count, and each accuracy is its mask's
  mean;
* the worst case (and the RobustBench-style entry) counts an image as robust only if it is correct on
  the clean image and under every attack at the main eps (robust AND clean-correct), so it is at most the
  clean accuracy and at most every one of those attacks;
* the per-attack accuracies keep the paper's counting (correct under the attack, whatever the clean
  pass gives), so an attack may exceed the clean accuracy only as far as its mask allows.

Example::

  results = RunResults.from_json("results/cpu/runs/<run>.json")
  results.natural_accuracy, results.robust.accuracy["A2"], results.robust.mask("A2")
"""

import dataclasses
import json
import math
from typing import Any, Mapping

import numpy as np

from enquant import evalfiles
from enquant import files

SCHEMA_VERSION = 2
WORST_CASE_COUNTING = "robust and clean-correct"


class ResultsError(ValueError):
  """A results file that cannot be true (or cannot be read); the message is one line naming it."""


def _fail(where: str, what: str) -> None:
  raise ResultsError(f"{where}: {what}")


def _fraction(value: Any, where: str, key: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
    _fail(where, f"{key} must be an accuracy in [0, 1], got {value!r}")
  return float(value)


def _count(value: Any, where: str, key: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    _fail(where, f"{key} must be a positive integer, got {value!r}")
  return value


def _seconds(data: Mapping[str, Any], where: str, key: str) -> float | None:
  value = data.get(key)
  if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                            or not math.isfinite(value) or value < 0):
    _fail(where, f"{key} must be a non-negative number, got {value!r}")
  return None if value is None else float(value)


def _mapping(value: Any, where: str, key: str) -> Mapping[str, Any]:
  if not isinstance(value, dict):
    _fail(where, f"{key} must be an object, got {type(value).__name__}")
  return value


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """A robust evaluation: ``results.json``'s ``robust`` entry, or a transfer evaluation file.

  Attributes:
    accuracy: ``"natural"`` (clean accuracy on the evaluated images) and every attack by name, fractions;
      attacks count an image as robust when the attack leaves it correct (the paper's counting).
    examples: evaluated images.
    worst_case: per image, robust AND clean-correct under every attack at the main eps (None if absent).
    worst_case_attacks: the attacks the worst case takes (the RobustBench-style entry's).
    masks: packed per-image correctness by name (:func:`enquant.evalfiles.pack_mask`); may be empty.
    data: the whole entry as read.
  """

  accuracy: Mapping[str, float]
  examples: int
  worst_case: float | None
  worst_case_attacks: tuple[str, ...]
  masks: Mapping[str, str]
  data: Mapping[str, Any]

  @property
  def attack_accuracy(self) -> dict[str, float]:
    """Every attack's accuracy (``accuracy`` without ``"natural"``)."""
    return {k: v for k, v in self.accuracy.items() if k != "natural"}

  def mask(self, name: str) -> np.ndarray:
    """The per-image correctness of ``name`` (``"natural"`` or an attack). KeyError if not kept."""
    return evalfiles.unpack_mask(self.masks[name], self.examples)

  def unpacked_masks(self) -> dict[str, np.ndarray]:
    return {name: self.mask(name) for name in self.masks}

  @classmethod
  def from_dict(cls, data: Any, where: str) -> "Evaluation":
    """Validates an evaluation (module docstring); ResultsError naming ``where``."""
    data = _mapping(data, where, "the evaluation")
    raw = _mapping(data.get("accuracy"), where, "accuracy")
    n = _count(raw.get("n"), where, "accuracy.n")
    if "examples" in data and data["examples"] != n:
      _fail(where, f"examples {data['examples']!r} differs from accuracy.n {n}")
    accuracy = {k: _fraction(v, where, f"accuracy.{k}") for k, v in raw.items() if k != "n"}
    masks = _mapping(data.get("masks", {}), where, "masks")
    unpacked = {}
    for name, packed in masks.items():
      try:
        unpacked[name] = evalfiles.unpack_mask(packed, n)
      except (TypeError, ValueError) as e:
        _fail(where, f"mask {name!r} is not a packed mask of {n} images ({e})")
      if name in accuracy and abs(unpacked[name].mean() - accuracy[name]) > 0.5 / n:
        _fail(where, f"accuracy.{name} = {accuracy[name]!r} but its per-image mask gives "
                     f"{unpacked[name].mean():.4f}")
    worst, names = _worst_case(data, accuracy, unpacked, where)
    return cls(accuracy=accuracy, examples=n, worst_case=worst, worst_case_attacks=names, masks=masks,
               data=data)

  def to_dict(self) -> dict[str, Any]:
    return json.loads(json.dumps(self.data))


def _worst_case(data, accuracy, masks, where) -> tuple[float | None, tuple[str, ...]]:
  """The validated worst case and its attacks (see :class:`Evaluation`)."""
  entry = data.get("robustbench")
  names: tuple[str, ...] = ()
  if entry is not None:
    entry = _mapping(entry, where, "robustbench")
    names = tuple(entry.get("attacks", ()))
    if _fraction(entry.get("robust_acc"), where, "robustbench.robust_acc") > _fraction(
        entry.get("clean_acc"), where, "robustbench.clean_acc") + 1e-12:
      _fail(where, f"robustbench.robust_acc {entry['robust_acc']!r} exceeds its clean_acc "
                   f"{entry['clean_acc']!r} (an image counts as robust only if it is also clean-correct)")
  if "accuracy_worst_case" not in data:
    return None, names
  worst = _fraction(data["accuracy_worst_case"], where, "accuracy_worst_case")
  for name in ("natural",) + names:
    if name not in accuracy:
      _fail(where, f"the worst case takes {name!r}, which has no accuracy")
    if worst > accuracy[name] + 1e-12:
      _fail(where, f"accuracy_worst_case {worst!r} exceeds accuracy.{name} {accuracy[name]!r} (robust AND "
                   "clean-correct cannot exceed either)")
  if names and all(k in masks for k in ("natural",) + names):
    both = np.logical_and.reduce([masks[k] for k in ("natural",) + names])
    if abs(both.mean() - worst) > 0.5 / len(both):
      _fail(where, f"accuracy_worst_case {worst!r} is not the per-image masks' robust AND clean-correct "
                   f"{both.mean():.4f}")
  return worst, names


def _total(efficiency: Mapping[str, Any], group: str, key: str) -> Any:
  return efficiency.get(group, {}).get(f"total/{key}")


@dataclasses.dataclass(frozen=True)
class RunResults:
  """A run's ``results.json``, validated (module docstring).

  Attributes:
    natural_accuracy: clean accuracy on the whole test set.
    test_examples: test-set size.
    model_name: e.g. ``"En2ResNet20"``.
    config: the run's configuration as written (``ExperimentConfig.to_dict``).
    robust: the robust evaluation on the first ``robust.examples`` test images, or None.
    m_bound: the paper's M = max over epochs of M_t, or None.
    train_seconds: every training epoch of every call (None when not recorded).
    eval_seconds: the final evaluation's last call (None when not recorded).
    wall_seconds: the run's last call (None when not recorded).
    data: the whole file as read.
  """

  natural_accuracy: float
  test_examples: int
  model_name: str
  config: Mapping[str, Any]
  robust: Evaluation | None
  m_bound: float | None
  train_seconds: float | None
  eval_seconds: float | None
  wall_seconds: float | None
  data: Mapping[str, Any]

  @classmethod
  def from_dict(cls, data: Any, where: str = "results") -> "RunResults":
    """Validates a results dict; ResultsError (one line naming ``where``) if it cannot be true."""
    data = _mapping(data, where, "the results")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
      _fail(where, f"schema_version {version!r} is not {SCHEMA_VERSION} (scripts/convert_results.py "
                   "converts a results file of an earlier schema)")
    config = _mapping(data.get("config"), where, "config")
    if not isinstance(config.get("dataset"), str) or not isinstance(data.get("model_name"), str):
      _fail(where, "config.dataset and model_name must be strings")
    robust = None if data.get("robust") is None else Evaluation.from_dict(data["robust"], where)
    efficiency = _mapping(data.get("efficiency", {}), where, "efficiency")
    for group in ("sparsity", "sparsity_paper_counting"):
      for key, value in _mapping(efficiency.get(group, {}), where, f"efficiency.{group}").items():
        if key.endswith("sparsity"):
          _fraction(value, where, f"efficiency.{group}.{key}")
    m_bound = _seconds(data, where, "m_bound")
    history = data.get("history", [])
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
      _fail(where, "history must be a list of objects")
    return cls(natural_accuracy=_fraction(data.get("natural_accuracy"), where, "natural_accuracy"),
               test_examples=_count(data.get("test_examples"), where, "test_examples"),
               model_name=data["model_name"], config=config, robust=robust, m_bound=m_bound,
               train_seconds=_seconds(data, where, "train_seconds"),
               eval_seconds=_seconds(data, where, "eval_seconds"),
               wall_seconds=_seconds(data, where, "wall_seconds"), data=data)

  @classmethod
  def from_json(cls, path: str) -> "RunResults":
    """Reads and validates ``path``; ResultsError naming it (unreadable JSON included)."""
    try:
      data = files.read_json(path)
    except (OSError, ValueError) as e:
      raise ResultsError(f"{path}: not a readable JSON results file ({str(e).splitlines()[0]})") from None
    return cls.from_dict(data, where=path)

  def to_dict(self) -> dict[str, Any]:
    """The whole results dict (a copy)."""
    return json.loads(json.dumps(self.data))

  def to_json(self, path: str) -> None:
    """Writes the results atomically (validated on construction, so what is written reads back)."""
    files.write_json_atomic(path, self.to_dict())

  @property
  def efficiency(self) -> Mapping[str, Any]:
    return self.data.get("efficiency", {})

  @property
  def history(self) -> list[Mapping[str, Any]]:
    """The per-epoch metrics rows ([] when not kept)."""
    return list(self.data.get("history", []))

  @property
  def epochs(self) -> int:
    return self.config["train"]["epochs"]

  @property
  def seconds(self) -> float | None:
    """Training (every epoch of every call) plus the final evaluation; the last call's wall time for a
    run that recorded only that."""
    if self.train_seconds is not None and self.eval_seconds is not None:
      return self.train_seconds + self.eval_seconds
    return self.wall_seconds

  def sparsity(self, key: str, paper_counting: bool = False) -> float | None:
    """``total/<key>`` of the efficiency report (``paper_counting``: the 3x3 convolutions' report)."""
    return _total(self.efficiency, "sparsity_paper_counting" if paper_counting else "sparsity", key)

  def accuracies(self) -> dict[str, float]:
    """Headline accuracies: ``N`` (whole test set) and every attack."""
    return {"N": self.natural_accuracy, **(self.robust.attack_accuracy if self.robust else {})}


def check_accuracies(data: Mapping[str, Any], where: str) -> None:
  """Validates the accuracy fields of a results dict being assembled (natural and robust), as
  :meth:`RunResults.from_dict` will; ResultsError naming ``where``."""
  _fraction(data.get("natural_accuracy"), where, "natural_accuracy")
  if data.get("robust") is not None:
    Evaluation.from_dict(data["robust"], where)


def read_evaluation(path: str) -> Evaluation:
  """A transfer (or other) evaluation file, validated; ResultsError naming it."""
  try:
    data = files.read_json(path)
  except (OSError, ValueError) as e:
    raise ResultsError(f"{path}: not a readable JSON evaluation file ({str(e).splitlines()[0]})") from None
  return Evaluation.from_dict(data, where=path)


__all__ = ["Evaluation", "ResultsError", "RunResults", "SCHEMA_VERSION", "WORST_CASE_COUNTING",
           "check_accuracies", "read_evaluation"]
