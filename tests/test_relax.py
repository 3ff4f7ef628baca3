"""Tests of Binary-Relax / Binary-Connect as optax transformations (Algorithm 1, by hand and numerically)."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
from flax import nnx

from enquant import quant

KERNEL = (3, 3, 2, 4)  # the same conv-kernel shape as test_projections (shared jit cache)


def make_params(seed: int = 0):
  rng = np.random.default_rng(seed)
  f32 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
  return {
      "conv": {"kernel": f32(*KERNEL), "bias": f32(4)},
      "bn": {"scale": f32(4), "bias": f32(4)},
      "dense": {"kernel": f32(4, 3), "bias": f32(3)},
  }


def random_grads(params, seed: int):
  rng = np.random.default_rng(seed)  # numpy: no PRNG compile per shape
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)


def distinct_magnitudes(x) -> int:
  return np.unique(np.abs(np.asarray(x))).size


def train_step(tx, params, opt_state, grads):
  updates, opt_state = tx.update(grads, opt_state, params)
  params = quant.snap_params(optax.apply_updates(params, updates), opt_state)
  return params, opt_state, updates


# ------------------------------------------------------------------------------------------- mask


def test_conv_kernel_mask_selects_conv_kernels_only():
  params = {
      "stem": {"kernel": jnp.zeros((3, 3, 1, 4))},
      "members_conv": {"kernel": jnp.zeros((2, 3, 3, 4, 4))},  # stacked ensemble conv kernel
      "bn": {"scale": jnp.zeros(4), "bias": jnp.zeros(4)},
      "dense": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)},
      "members_dense": {"kernel": jnp.zeros((2, 4, 3))},
      "odd": {"weights": jnp.zeros((3, 3, 1, 4))},  # 4-D but not named kernel
  }
  mask = quant.conv_kernel_mask(params)
  assert mask == {
      "stem": {"kernel": True},
      "members_conv": {"kernel": True},
      "bn": {"scale": False, "bias": False},
      "dense": {"kernel": False, "bias": False},
      "members_dense": {"kernel": False},
      "odd": {"weights": False},
  }


def test_conv_kernel_mask_on_nnx_state():
  class Tiny(nnx.Module):

    def __init__(self, rngs):
      self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
      self.bn = nnx.BatchNorm(4, rngs=rngs)
      self.dense = nnx.Linear(4, 3, rngs=rngs)

  state = jax.eval_shape(lambda: nnx.state(Tiny(nnx.Rngs(0)), nnx.Param))  # shapes only: no compile
  flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(quant.conv_kernel_mask(state))}
  values = {k: (v.get_value() if isinstance(v, nnx.Variable) else v) for k, v in flat.items()}
  assert values == {"bn/bias": False, "bn/scale": False, "conv/bias": False, "conv/kernel": True,
                    "dense/bias": False, "dense/kernel": False}


# ----------------------------------------------------------------------------- the relaxed update


def _dist2_brute_force(u, patterns):
  """dist(u, R+ x codes^n)^2 by enumerating every code pattern (rows of `patterns`; scale >= 0)."""
  cc = np.sum(patterns * patterns, axis=1)
  a = np.maximum(0.0, patterns @ u / np.where(cc > 0, cc, 1.0))
  return float(min(np.min(np.sum((u[None, :] - a[:, None] * patterns) ** 2, axis=1)), u @ u))


@pytest.mark.parametrize("name,projection,codes", [
    ("binary", quant.project_binary, (-1, 1)),
    ("ternary", quant.project_ternary, (-1, 0, 1)),
])
def test_relaxed_update_is_the_closed_form_argmin(name, projection, codes):
  lam = 1.7
  w = np.array([0.9, -0.3, 0.05, 1.4], np.float32)
  params = {"v": jnp.asarray(w)}
  tx = quant.binary_relax(optax.sgd(0.1), projection, lambda0=lam, growth_every=1, relax_steps=10,
                          mask={"v": True})
  zero = {"v": jnp.zeros(4)}  # w_1 = w_0: the update computes u_1 = argmin for w = w_0
  _, state, _ = train_step(tx, params, tx.init(params), zero)
  u = np.asarray(quant.relaxed_weights(state)["v"], np.float64)
  w64 = w.astype(np.float64)

  patterns = np.array(list(itertools.product(codes, repeat=w.size)), np.float64)

  def objective(v):
    return 0.5 * np.sum((w64 - v) ** 2) + 0.5 * lam * _dist2_brute_force(v, patterns)

  rng = np.random.default_rng(0)
  starts = [w64, np.asarray(projection(w), np.float64), 0.5 * (w64 + u)] + list(rng.normal(size=(3, 4)))
  results = [scipy.optimize.minimize(objective, s, method="Nelder-Mead",
                                     options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 20000})
             for s in starts]
  best = min(results, key=lambda r: r.fun)
  assert objective(u) <= best.fun + 1e-9, name
  np.testing.assert_allclose(u, best.x, atol=1e-4, err_msg=name)
  # The closed form sits on the segment [w, P(w)] at t = lam / (lam + 1); a grid along it agrees.
  p = np.asarray(projection(w), np.float64)
  ts = np.linspace(0, 1, 2001)
  t_best = ts[np.argmin([objective(w64 + t * (p - w64)) for t in ts])]
  assert abs(t_best - lam / (lam + 1)) <= 1e-3
  # ... and u is not trivially w or P(w).
  assert np.linalg.norm(u - w64) > 0.1 and np.linalg.norm(u - p) > 0.05


def test_one_and_two_steps_reproduce_algorithm_1_by_hand():
  lr, lam0, growth = 0.1, 1.0, 2.0
  params = make_params()
  tx = quant.binary_relax(optax.sgd(lr), quant.project_ternary, lambda0=lam0, growth=growth,
                          growth_every=1, relax_steps=5)
  state = tx.init(params)
  g1, g2 = random_grads(params, 1), random_grads(params, 2)
  p1, state, updates = train_step(tx, params, state, g1)
  # Algorithm 1, step 1: w1 = w0 - lr g(u0); u1 = (lam0 P(w1) + w1) / (lam0 + 1) on the conv kernel.
  w1 = jax.tree.map(lambda w, g: w - lr * g, params, g1)
  u1 = dict(w1, conv=dict(w1["conv"], kernel=(lam0 * quant.project_ternary(w1["conv"]["kernel"]) +
                                             w1["conv"]["kernel"]) / (lam0 + 1)))
  chex.assert_trees_all_close(quant.float_weights(state), w1, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(quant.relaxed_weights(state), u1, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(optax.apply_updates(params, updates), u1, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_equal(p1, quant.relaxed_weights(state))  # snapped: bitwise u
  # Step 2 (gradient taken at u1; lam1 = growth * lam0): u2 = (lam1 P(w2) + w2) / (lam1 + 1).
  p2, state, _ = train_step(tx, p1, state, g2)
  lam1 = growth * lam0
  w2 = jax.tree.map(lambda w, g: w - lr * g, w1, g2)
  u2_kernel = (lam1 * quant.project_ternary(w2["conv"]["kernel"]) + w2["conv"]["kernel"]) / (lam1 + 1)
  chex.assert_trees_all_close(quant.float_weights(state), w2, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(p2["conv"]["kernel"], u2_kernel, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_equal(p2["dense"], w2["dense"])
  assert int(state.count) == 2 and float(state.lam) == pytest.approx(lam0 * growth**2)


@pytest.fixture(scope="module")
def jitted_ternary_run():
  """Five jitted BR steps (relax_steps = 2) with ternary projection; returns [(params, state), ...]."""
  tx = quant.binary_relax(optax.sgd(0.05, momentum=0.9), quant.project_ternary, growth=1.5,
                          growth_every=1, relax_steps=2)
  step = jax.jit(lambda p, s, g: train_step(tx, p, s, g)[:2], donate_argnums=(0, 1))
  params = make_params(3)
  state = tx.init(params)
  history = []
  for k in range(5):
    params, state = step(params, state, random_grads(params, 10 + k))
    history.append(jax.tree.map(np.asarray, (params, state)))
  return history


def test_after_relax_steps_params_are_exactly_in_q(jitted_ternary_run):
  for k, (params, state) in enumerate(jitted_ternary_run):
    kernel = params["conv"]["kernel"]
    chex.assert_trees_all_equal(params, state.u)  # snap_params: the model's params are u, bitwise
    if k < 2:  # relaxed: u lies strictly between w and P(w)
      assert distinct_magnitudes(kernel) > 3
    else:  # Binary-Connect: u = P(w) exactly, one scale and {-1, 0, 1}
      mags = np.unique(np.abs(kernel))
      assert mags.size == 2 and mags[0] == 0
      np.testing.assert_allclose(kernel, quant.project_ternary(state.w["conv"]["kernel"]), rtol=1e-6)
      np.testing.assert_array_equal(quant.quantized(state, quant.project_ternary)["conv"]["kernel"],
                                    quant.project_ternary(state.w["conv"]["kernel"]))
    # Unquantized leaves are the float weights.
    chex.assert_trees_all_equal(params["dense"], state.w["dense"])
    chex.assert_trees_all_equal(params["bn"], state.w["bn"])


def test_binary_connect_quantizes_from_the_first_update():
  params = make_params(4)
  tx = quant.binary_connect(optax.sgd(0.1), quant.project_binary)
  new_params, state, _ = train_step(tx, params, tx.init(params), random_grads(params, 5))
  assert distinct_magnitudes(new_params["conv"]["kernel"]) == 1
  np.testing.assert_allclose(new_params["conv"]["kernel"],
                             quant.project_binary(state.w["conv"]["kernel"]), rtol=1e-6)
  assert distinct_magnitudes(new_params["dense"]["kernel"]) > 1


def test_lambda_grows_on_schedule_and_is_used():
  lambda0, growth, every = 0.5, 1.5, 3
  params = make_params(5)
  tx = quant.binary_relax(optax.sgd(0.1), quant.project_ternary, lambda0=lambda0, growth=growth,
                          growth_every=every, relax_steps=100)
  state = tx.init(params)
  assert float(state.lam) == lambda0
  for k in range(7):
    lam_k = lambda0 * growth ** (k // every)  # used by the k-th update (k updates done before)
    np.testing.assert_allclose(state.lam, lam_k, rtol=1e-6)
    params, state, _ = train_step(tx, params, state, random_grads(params, 20 + k))
    w = state.w["conv"]["kernel"]
    expected = (lam_k * quant.project_ternary(w) + w) / (lam_k + 1)
    np.testing.assert_allclose(params["conv"]["kernel"], expected, rtol=1e-5, atol=1e-6)
  assert int(state.count) == 7
  np.testing.assert_allclose(state.lam, lambda0 * growth ** (7 // every), rtol=1e-6)


def test_inner_optimizer_sees_w_and_unmasked_leaves_follow_it_exactly():
  inner = optax.chain(optax.add_decayed_weights(5e-2), optax.sgd(0.1, momentum=0.9, nesterov=True))
  tx = quant.binary_relax(inner, quant.project_ternary, growth_every=1, relax_steps=2)
  params = make_params(6)
  br_params, br_state = params, tx.init(params)
  ref_params, ref_state = params, inner.init(params)
  for k in range(4):
    grads = random_grads(params, 30 + k)
    br_params, br_state, br_updates = train_step(tx, br_params, br_state, grads)
    ref_updates, ref_state = inner.update(grads, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, ref_updates)
    # The float weights are exactly the inner optimizer's own trajectory (all leaves) ...
    chex.assert_trees_all_equal(quant.float_weights(br_state), ref_params)
    # ... and unquantized leaves get exactly the inner updates and params.
    for name in ("dense", "bn"):
      chex.assert_trees_all_equal(br_updates[name], ref_updates[name])
      chex.assert_trees_all_equal(br_params[name], ref_params[name])
    chex.assert_trees_all_equal(br_updates["conv"]["bias"], ref_updates["conv"]["bias"])
  assert not np.allclose(br_params["conv"]["kernel"], ref_params["conv"]["kernel"])


def test_weight_decay_acts_on_w_not_u():
  decay, lr = 0.1, 1.0
  inner = optax.chain(optax.add_decayed_weights(decay), optax.sgd(lr))
  tx = quant.binary_relax(inner, quant.project_binary, growth_every=1, relax_steps=10)
  params = make_params(7)
  w0 = params["conv"]["kernel"]
  zero = jax.tree.map(jnp.zeros_like, params)
  p1, state, _ = train_step(tx, params, tx.init(params), zero)
  p2, state, _ = train_step(tx, p1, state, zero)
  w1 = (1 - lr * decay) * w0
  np.testing.assert_allclose(state.w["conv"]["kernel"], (1 - lr * decay) ** 2 * w0, rtol=1e-6)
  # Decaying u instead would have given w1 - lr * decay * u1, measurably different:
  wrong = w1 - lr * decay * p1["conv"]["kernel"]
  assert np.max(np.abs(wrong - state.w["conv"]["kernel"])) > 1e-3


# ----------------------------------------------------------------------------------- composition


def test_composes_with_chain_jit_and_inject_hyperparams():
  params = make_params(8)
  grads = [random_grads(params, 40 + k) for k in range(2)]

  def make(learning_rate):
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        quant.binary_relax(optax.sgd(learning_rate, momentum=0.9), quant.project_ternary,
                           growth_every=1, relax_steps=1),
    )

  results = []
  for tx, jit in [(make(0.1), False), (optax.inject_hyperparams(make)(learning_rate=0.1), True)]:
    step = jax.jit(lambda p, s, g, tx=tx: train_step(tx, p, s, g)[:2]) if jit else (
        lambda p, s, g, tx=tx: train_step(tx, p, s, g)[:2])
    p, s = params, tx.init(params)
    for g in grads:
      p, s = step(p, s, g)
    chex.assert_trees_all_equal(p, quant.relaxed_weights(s))
    results.append((p, quant.float_weights(s)))
  for p, w in results[1:]:
    chex.assert_trees_all_close((p, w), results[0], rtol=1e-6, atol=1e-7)
  assert distinct_magnitudes(results[0][0]["conv"]["kernel"]) == 2  # past relax_steps: in Q


def test_ensemble_members_are_quantized_separately():
  rng = np.random.default_rng(9)
  stacked = np.stack([rng.standard_normal(KERNEL), 10 * rng.standard_normal(KERNEL)])
  params = {"conv": {"kernel": jnp.asarray(stacked, jnp.float32)}, "dense": {"kernel": jnp.ones((2, 4, 3))}}
  tx = quant.binary_connect(optax.sgd(0.1), quant.per_member(quant.project_ternary))
  new_params, state, _ = train_step(tx, params, tx.init(params), random_grads(params, 50))
  kernel = new_params["conv"]["kernel"]
  scales = [np.max(np.abs(kernel[i])) for i in range(2)]
  for i in range(2):
    assert distinct_magnitudes(kernel[i]) == 2
    np.testing.assert_allclose(kernel[i], quant.project_ternary(state.w["conv"]["kernel"][i]), rtol=1e-6)
  assert scales[1] > 5 * scales[0]
  assert distinct_magnitudes(new_params["dense"]["kernel"]) > 1  # stacked dense stays float


def test_update_is_the_same_on_a_two_device_mesh():
  devices = jax.devices()
  if len(devices) < 2:
    pytest.skip("needs 2 (fake) devices")
  mesh = jax.sharding.Mesh(np.array(devices[:2]), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  tx = quant.binary_relax(optax.sgd(0.1), quant.project_ternary, growth_every=1, relax_steps=0)
  params = make_params(10)
  state = tx.init(params)
  grads = random_grads(params, 60)
  step = jax.jit(lambda p, s, g: train_step(tx, p, s, g)[:2])
  expected = step(params, state, grads)
  got = step(*jax.device_put((params, state, grads), replicated))
  chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-7)
  assert got[0]["conv"]["kernel"].sharding.is_fully_replicated


def test_state_round_trips_through_orbax(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   quant.binary_relax(optax.sgd(0.1, momentum=0.9), quant.project_ternary,
                                      growth=1.5, growth_every=1, relax_steps=3))
  params = make_params(11)
  state = tx.init(params)
  for k in range(2):
    params, state, _ = train_step(tx, params, state, random_grads(params, 70 + k))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "ckpt", state)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tx.init(params))
    restored = checkpointer.restore(tmp_path / "ckpt", abstract)
  assert isinstance(restored[1], quant.BinaryRelaxState)
  chex.assert_trees_all_equal(restored, state)
  grads = random_grads(params, 80)
  chex.assert_trees_all_equal(train_step(tx, params, restored, grads)[:2],
                              train_step(tx, params, state, grads)[:2])


# ------------------------------------------------------------------------------ accessors, errors


def test_quantized_projects_the_masked_leaves_of_w_or_params():
  params = make_params(12)
  tx = quant.binary_relax(optax.sgd(0.1), quant.project_binary, growth_every=1, relax_steps=5)
  _, state, _ = train_step(tx, params, tx.init(params), random_grads(params, 90))
  w = quant.float_weights(state)
  q = quant.quantized((state,), quant.project_binary)  # found inside any container
  np.testing.assert_array_equal(q["conv"]["kernel"], quant.project_binary(w["conv"]["kernel"]))
  chex.assert_trees_all_equal(q["dense"], w["dense"])
  chex.assert_trees_all_equal(q["conv"]["bias"], w["conv"]["bias"])
  q_params = quant.quantized(params, quant.project_binary)
  np.testing.assert_array_equal(q_params["conv"]["kernel"],
                                quant.project_binary(params["conv"]["kernel"]))

  def only_dense(p):
    return jax.tree.map(lambda _: False, p) | {"dense": {"kernel": True, "bias": False}}

  q_dense = quant.quantized(params, quant.project_binary, mask=only_dense)
  assert distinct_magnitudes(q_dense["dense"]["kernel"]) == 1
  chex.assert_trees_all_equal(q_dense["conv"], params["conv"])


def test_snap_params_without_binary_relax_is_identity_and_accessors_need_a_state():
  params = make_params(13)
  sgd_state = optax.sgd(0.1).init(params)
  assert quant.snap_params(params, sgd_state) is params
  with pytest.raises(ValueError, match="BinaryRelaxState"):
    quant.float_weights(sgd_state)
  with pytest.raises(ValueError, match="BinaryRelaxState"):
    quant.relaxed_weights(sgd_state)


@pytest.mark.parametrize("kwargs,match", [
    ({"lambda0": 0.0}, "lambda0"), ({"lambda0": -1.0}, "lambda0"), ({"lambda0": "1"}, "lambda0"),
    ({"growth": 0.99}, "growth"), ({"growth_every": 0}, "growth_every"),
    ({"growth_every": 1.5}, "growth_every"),
    ({"relax_steps": -1}, "relax_steps"), ({"mask": {"conv": 1}}, "mask"),
])
def test_bad_arguments_raise_eagerly(kwargs, match):
  args = {"growth_every": 1, "relax_steps": 0} | kwargs
  with pytest.raises(ValueError, match=match):
    quant.binary_relax(optax.sgd(0.1), quant.project_binary, **args)


def test_bad_update_calls_raise():
  params = make_params(14)
  tx = quant.binary_relax(optax.sgd(0.1), quant.project_binary, growth_every=1, relax_steps=0)
  state = tx.init(params)
  with pytest.raises(ValueError, match="params"):
    tx.update(params, state)
  bad_mask = quant.binary_relax(optax.sgd(0.1), quant.project_binary, growth_every=1, relax_steps=0,
                                mask={"conv": {"kernel": True}})
  with pytest.raises(ValueError, match="mask must have the structure"):
    bad_mask.update(params, bad_mask.init(params), params)
  with pytest.raises(ValueError, match="projection"):
    quant.binary_relax(optax.sgd(0.1), None, growth_every=1, relax_steps=0)
  with pytest.raises(ValueError, match="inner"):
    quant.binary_relax(None, quant.project_binary, growth_every=1, relax_steps=0)
