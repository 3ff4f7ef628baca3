"""The data-parallel train step, natural training on real MNIST, resume equality, run directories."""

import dataclasses
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from enquant import config as config_lib
from enquant import data as data_lib
from enquant import losses
from enquant import pipeline
from enquant import train as train_lib
from enquant.models import EnResNet, ModelConfig

TINY_MODEL = ModelConfig(num_classes=10, depth=8, widths=(4, 8, 8), noise_coef=0.1, ensembles=2)


def tiny_config() -> config_lib.ExperimentConfig:
  """Float natural training of an En2ResNet8 (widths 8/16/16) on 1920 real MNIST images, 120 steps."""
  return config_lib.ExperimentConfig(
      dataset="mnist", data_source="embedded", max_train=1920, max_test=256,
      model=dataclasses.replace(TINY_MODEL, widths=(8, 16, 16)),
      train=config_lib.TrainConfig(epochs=2, batch_size=32, lr=0.2, lr_schedule="cosine"),
      eval=config_lib.EvalConfig(attacks="", max_examples=64),
  )


def test_two_device_step_equals_one_device_step():
  assert jax.device_count() >= 2, "conftest sets 2 host devices"
  model = EnResNet(TINY_MODEL)
  cfg = config_lib.TrainConfig(epochs=1, batch_size=8, lr=0.1)
  qcfg = config_lib.QuantConfig()  # Binary-Relax under a mesh: tests/test_relax.py
  tx, _ = train_lib.make_optimizer(cfg, qcfg, steps_per_epoch=4)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, (8,)).astype(np.int32)
  objective = losses.make_objective(losses.LossConfig(kind="natural"))
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:2]):
    mesh = train_lib.data_mesh(devices)
    repl, batch = train_lib.shardings(mesh)
    state = train_lib.create_train_state(model, tx, jax.random.PRNGKey(0),
                                         data_lib.to_float(images[:1]))
    state = jax.device_put(state, repl)
    step = train_lib.make_train_step(model, tx, objective, augment=False, mesh=mesh)
    for _ in range(2):
      state, metrics = step(state, jax.device_put(images, batch), jax.device_put(labels, batch))
    assert len(state.params["stem"]["kernel"].sharding.device_set) == len(devices)
    results.append((jax.device_get(state.params), jax.device_get(state.batch_stats),
                    jax.device_get(metrics)))
  (p1, s1, m1), (p2, s2, m2) = results
  chex.assert_trees_all_close(p1, p2, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(s1, s2, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(m1, m2, atol=1e-5, rtol=1e-5)


def test_batch_not_divisible_by_devices_is_a_clear_error():
  mesh = train_lib.data_mesh(jax.devices()[:2])
  with pytest.raises(ValueError, match="divisible by the number of devices"):
    train_lib.check_batch(7, mesh)


def _final_params(workdir, cfg):
  from enquant import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  model = EnResNet(cfg.model)
  tx, _ = train_lib.make_optimizer(cfg.train, cfg.quant, cfg.max_train // cfg.train.batch_size)
  target = train_lib.create_train_state(model, tx, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  state, meta = ckpt.restore(ckpt.latest_epoch(), target)
  ckpt.close()
  return state, meta


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run_full"))
  cfg = tiny_config()
  results = pipeline.train_and_evaluate(cfg, workdir, progress=False, log=lambda *_: None)
  return cfg, workdir, results


def test_resumed_run_equals_uninterrupted_run(uninterrupted, tmp_path):
  cfg, full_dir, full_results = uninterrupted
  workdir = str(tmp_path / "run")
  assert pipeline.train_and_evaluate(cfg, workdir, progress=False, stop_after_epochs=1,
                                     log=lambda *_: None) is None
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  metrics = os.path.join(workdir, "metrics.jsonl")
  good = open(metrics).read()
  with open(metrics, "a") as f:  # a row without its epoch: one line naming the file, before any training
    f.write('{"step": 60}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl: row 2 has no integer 'epoch'"):
    pipeline.train_and_evaluate(cfg, workdir, progress=False, log=lambda *_: None)
  with open(metrics, "w") as f:  # the run was killed while writing epoch 2's row
    f.write(good + '{"epoch": 2, "step": 1')
  with pytest.warns(UserWarning, match="dropped a truncated last line"):
    resumed = pipeline.train_and_evaluate(cfg, workdir, progress=False, log=lambda *_: None)
  full_state, _ = _final_params(full_dir, cfg)
  resumed_state, meta = _final_params(workdir, cfg)
  assert meta["epoch"] == 2
  chex.assert_trees_all_equal(full_state, resumed_state)
  assert resumed["natural_accuracy"] == full_results["natural_accuracy"]
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["epoch"] for r in rows] == [1, 2]


def test_short_natural_training_on_real_mnist_beats_chance(uninterrupted):
  _, workdir, results = uninterrupted
  # 120 steps on 1920 real MNIST images; chance is 0.10.
  assert results["natural_accuracy"] > 0.6, results["natural_accuracy"]
  saved = json.load(open(os.path.join(workdir, "results.json")))
  assert saved["natural_accuracy"] == results["natural_accuracy"]
  assert saved["config"]["model"]["ensembles"] == 2


def test_load_run_restores_through_an_eval_shape_target_what_an_initialised_target_restores(uninterrupted):
  cfg, workdir, _ = uninterrupted
  _, _, variables, state = pipeline.load_run(workdir)
  expected, _ = _final_params(workdir, cfg)  # restored into a compiled, initialised train state
  chex.assert_trees_all_equal(jax.device_get(state), jax.device_get(expected))
  assert variables["params"] is state.params  # float run: the evaluated weights are the trained ones


def test_ctrl_c_during_an_epoch_names_the_epoch_and_the_step():
  mesh = train_lib.data_mesh(jax.devices()[:1])
  calls = []

  def step(state, images, labels):  # the third step of epoch 2 is interrupted
    calls.append(1)
    if len(calls) == 4 + 3:
      raise KeyboardInterrupt
    return state, {"loss": np.float32(1.0)}

  images, labels = np.zeros((32, 28, 28, 1), np.uint8), np.zeros((32,), np.int32)
  with pytest.raises(train_lib.Interrupted) as info:
    train_lib.run_epochs(step, None, images, labels, cfg=config_lib.TrainConfig(epochs=3, batch_size=8),
                         mesh=mesh, start_epoch=0, stop_epoch=3, progress=False)
  assert info.value.where == "at epoch 2, step 3" and isinstance(info.value, KeyboardInterrupt)


def test_finished_run_is_not_overwritten_and_other_config_is_refused(uninterrupted):
  cfg, workdir, _ = uninterrupted
  with pytest.raises(pipeline.RunExistsError, match="finished run"):
    pipeline.prepare_workdir(cfg, workdir)
  other_dir = os.path.dirname(workdir) + "/other"
  os.makedirs(other_dir, exist_ok=True)
  pipeline.prepare_workdir(cfg, other_dir)
  changed = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, ensembles=3))
  with pytest.raises(pipeline.RunExistsError, match="another configuration"):
    pipeline.prepare_workdir(changed, other_dir)


def test_checkpoint_of_another_configuration_is_refused(uninterrupted, tmp_path):
  from enquant import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  cfg, workdir, _ = uninterrupted
  other = dataclasses.replace(cfg.model, widths=(8, 8, 8))
  model = EnResNet(other)
  tx, _ = train_lib.make_optimizer(cfg.train, cfg.quant, 16)
  target = train_lib.create_train_state(model, tx, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  with pytest.raises(ValueError, match="another configuration"):
    ckpt.restore(ckpt.latest_epoch(), target, expect_fingerprint="not-this-one")
  with pytest.raises(ValueError, match="does not match"):
    ckpt.restore(ckpt.latest_epoch(), target)
  ckpt.close()
