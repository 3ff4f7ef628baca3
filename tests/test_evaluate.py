"""Evaluation on hand-made models whose natural and robust predictions are known exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from enquant import attacks
from enquant import evalprograms
from enquant import evaluate as ev
from enquant import files

EPS = 0.1
SCALE = 10.0
# One informative pixel p = x[0, 0, 0]; class 1 iff p > 0.5. An eps = 0.1 attack flips exactly the
# correctly classified examples with |p - 0.5| < 0.1 and cannot repair the misclassified ones.
# /255: .05 .30 .45 .55 .70 .95 .42
PIXELS_UINT8 = np.array([13, 77, 115, 140, 179, 242, 107], np.uint8)
LABELS = np.array([0, 0, 0, 1, 1, 0, 1], np.int32)
NATURAL = 5 / 7  # all but .95 (label 0) and .42 (label 1)
ROBUST = 3 / 7  # .05, .30, .70: at least 0.1 from the boundary


def _images_uint8():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (7, 2, 2, 1), dtype=np.uint8)  # the other pixels are ignored
  images[:, 0, 0, 0] = PIXELS_UINT8
  return images


def _pixel_logits(p, sign=1.0):
  """Three classes (class 2 never wins), so the DLR loss is defined."""
  z = sign * SCALE * (p - 0.5)
  return jnp.stack([-z, z, jnp.full_like(z, -2.0)], axis=-1)


def pixel_model(x, key):
  del key
  return _pixel_logits(x[:, 0, 0, 0])


def flipped_model(x, key):
  """Predicts the opposite class: its adversarial directions push the pixel model's examples away."""
  del key
  return _pixel_logits(x[:, 0, 0, 0], sign=-1.0)


def noisy_model(x, key):
  return _pixel_logits(x[:, 0, 0, 0]) + 3.0 * jax.random.normal(key, (x.shape[0], 3))


# 10 x 0.02 steps cover the ball twice; few steps keep the (unrolled) compiles short
SPECS = ev.parse_attacks("none,fgsm,pgd10,cw10,apgd-ce10,apgd-dlr10", eps=EPS, step_size=0.02)


@pytest.fixture(scope="module")
def white_box():
  # rolled loops (max_unroll=0) compile fastest; the unrolled default is compared below
  return ev.evaluate(pixel_model, _images_uint8(), LABELS, SPECS, batch_size=4, key=jax.random.key(0),
                     progress=False, max_unroll=0)


def test_accuracies_of_a_model_with_known_predictions(white_box):
  assert white_box["n"] == 7  # the padded last batch (3 of 4) is counted once
  assert white_box["natural"] == pytest.approx(NATURAL)
  assert white_box["none"] == pytest.approx(NATURAL)
  for name in ("fgsm", "pgd10", "cw10", "apgd-ce10", "apgd-dlr10"):
    assert white_box[name] == pytest.approx(ROBUST), name
  assert set(white_box) == {"natural", "n", *(s.name for s in SPECS)}


def test_float_images_and_any_batch_size_give_the_same_numbers(white_box):
  images = _images_uint8().astype(np.float32) / 255.0
  got = ev.evaluate(pixel_model, images, LABELS, SPECS[:2], batch_size=3, key=jax.random.key(0),
                    progress=False)
  assert got == {k: white_box[k] for k in ("natural", "none", "fgsm", "n")}


def test_rolled_and_unrolled_attack_loops_give_the_same_numbers(white_box):
  got = ev.evaluate(pixel_model, _images_uint8(), LABELS, SPECS[2:4], batch_size=4,
                    key=jax.random.key(0), progress=False)
  assert got == {k: white_box[k] for k in ("natural", "pgd10", "cw10", "n")}


def test_transfer_from_an_oracle_with_opposite_gradients():
  # The flipped oracle pushes every example away from the pixel model's boundary: the correct ones stay
  # correct and .42 (label 1) is moved to .52, which the target now classifies correctly.
  got = ev.transfer(flipped_model, pixel_model, _images_uint8(), LABELS, SPECS[1:3], batch_size=4,
                    key=jax.random.key(0), progress=False)
  assert got == {"natural": pytest.approx(NATURAL), "fgsm": pytest.approx(6 / 7),
                 "pgd10": pytest.approx(6 / 7), "n": 7}


# --------------------------------------------------------------------------------------------------
# Randomized model: reproducible keys, restarts, transfer == white box
# --------------------------------------------------------------------------------------------------

N_NOISY = 24
NOISY_SPECS = ev.parse_attacks("none-r3,pgd3-eot2", eps=EPS)


def _noisy_data():
  rng = np.random.default_rng(1)
  images = rng.uniform(0.0, 1.0, (N_NOISY, 2, 2, 1)).astype(np.float32)
  labels = (images[:, 0, 0, 0] > 0.5).astype(np.int32)
  return images, labels


@pytest.fixture(scope="module")
def noisy_runs():
  images, labels = _noisy_data()
  run = lambda key: ev.evaluate(noisy_model, images, labels, NOISY_SPECS, batch_size=8, key=key,
                                progress=False)
  return run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))


def test_randomized_model_is_reproducible_with_the_same_key(noisy_runs):
  first, again, other = noisy_runs
  assert first == again
  assert first != other  # a different key draws different noise (checked for these two keys)
  assert 0.0 < first["natural"] < 1.0


def test_natural_and_restarts_follow_the_documented_key_derivation(noisy_runs):
  """Recomputes "natural" and "none-r3" (3 noise draws, robust only if correct on all) by hand."""
  images, labels = _noisy_data()
  key = jax.random.key(1)
  natural = robust = 0
  stream = attacks.core.stream_id("none-r3")
  for b in range(N_NOISY // 8):
    x, y = jnp.asarray(images[8 * b:8 * b + 8]), labels[8 * b:8 * b + 8]
    batch_key = jax.random.fold_in(key, b)
    natural += np.sum(np.argmax(noisy_model(x, jax.random.fold_in(batch_key, 0)), -1) == y)
    ok = np.ones(8, bool)
    for r in range(3):
      _, eval_key = jax.random.split(jax.random.fold_in(jax.random.fold_in(batch_key, stream), r))
      ok &= np.argmax(noisy_model(x, eval_key), -1) == y
    robust += ok.sum()
  first = noisy_runs[0]
  assert first["natural"] == pytest.approx(natural / N_NOISY)
  assert first["none-r3"] == pytest.approx(robust / N_NOISY)
  assert first["none-r3"] < first["natural"]  # three draws must all be right: strictly harder here


def test_transfer_with_oracle_equal_to_target_is_the_white_box_evaluation(noisy_runs):
  images, labels = _noisy_data()
  got = ev.transfer(noisy_model, noisy_model, images, labels, NOISY_SPECS, batch_size=8,
                    key=jax.random.key(1), progress=False)
  assert got == noisy_runs[0]


def test_partial_logits_fn_reuses_the_compiled_attack_for_new_weights():
  def apply(sign, x, key):
    del key
    return _pixel_logits(x[:, 0, 0, 0], sign=sign)

  images = _images_uint8()
  spec = SPECS[1:2]  # fgsm
  a = ev.evaluate(jax.tree_util.Partial(apply, jnp.float32(1.0)), images, LABELS, spec, batch_size=4,
                  key=jax.random.key(0), progress=False)
  size = evalprograms.attack_correct._cache_size()  # pylint: disable=protected-access
  b = ev.evaluate(jax.tree_util.Partial(apply, jnp.float32(-1.0)), images, LABELS, spec, batch_size=4,
                  key=jax.random.key(0), progress=False)
  assert evalprograms.attack_correct._cache_size() == size  # pylint: disable=protected-access
  assert a["natural"] == pytest.approx(NATURAL) and a["fgsm"] == pytest.approx(ROBUST)
  # flipped: correct on .95 (label 0, 0.45 from the boundary: robust) and .42 (label 1, 0.08: not)
  assert b["natural"] == pytest.approx(2 / 7) and b["fgsm"] == pytest.approx(1 / 7)


def _counting(fn, fail_after=None):
  """``fn`` that counts its calls (``.calls``) and raises KeyboardInterrupt on call ``fail_after + 1``."""
  def wrapped(*args, **kwargs):
    if fail_after is not None and wrapped.calls == fail_after:
      raise KeyboardInterrupt("killed (injected)")
    wrapped.calls += 1
    return fn(*args, **kwargs)
  wrapped.calls = 0
  return wrapped


def test_a_killed_evaluation_resumes_where_it_stopped_with_the_same_numbers(noisy_runs, monkeypatch,
                                                                            tmp_path):
  images, labels = _noisy_data()
  path = str(tmp_path / "progress.json")
  run = lambda key: ev.evaluate(noisy_model, images, labels, NOISY_SPECS, batch_size=8, key=key,
                                progress=False, resume_path=path)
  calls_per_batch = sum(spec.restarts for spec in NOISY_SPECS)  # none-r3: 3 calls, pgd3-eot2: 1
  # killed in batch 1's second spec: batch 0 and batch 1's natural pass and first spec are saved
  original = ev._spec_correct
  monkeypatch.setattr(ev, "_spec_correct", _counting(original, fail_after=calls_per_batch + 3))
  with pytest.raises(KeyboardInterrupt):
    run(jax.random.key(1))
  saved = files.read_json(path)
  assert saved["done"] == ["0/natural", "0/none-r3", "0/pgd3-eot2", "1/natural", "1/none-r3"]
  resumed = _counting(original)
  monkeypatch.setattr(ev, "_spec_correct", resumed)
  assert run(jax.random.key(1)) == noisy_runs[0]  # equal to the uninterrupted evaluation
  assert resumed.calls == 1 + calls_per_batch  # batch 1's pgd3-eot2 and batch 2: nothing redone
  # another key (a different fingerprint) ignores the saved units and recomputes everything
  assert run(jax.random.key(2)) == noisy_runs[2]
  assert resumed.calls == 1 + 4 * calls_per_batch


def test_resuming_tells_apart_the_weights_held_by_a_partial(tmp_path):
  def apply(sign, x, key):
    del key
    return _pixel_logits(x[:, 0, 0, 0], sign=sign)

  path = str(tmp_path / "progress.json")
  run = lambda sign: ev.evaluate(jax.tree_util.Partial(apply, jnp.float32(sign)), _images_uint8(), LABELS,
                                 SPECS[1:2], batch_size=4, key=jax.random.key(0), progress=False,
                                 resume_path=path)
  assert run(1.0)["fgsm"] == pytest.approx(ROBUST)
  assert run(-1.0)["fgsm"] == pytest.approx(1 / 7)  # not the saved units of the other weights
  with open(path, "w") as f:
    f.write("{not json")
  assert run(1.0)["fgsm"] == pytest.approx(ROBUST)  # an unreadable file is overwritten, not trusted


# --------------------------------------------------------------------------------------------------
# Specs, presets, entries, errors
# --------------------------------------------------------------------------------------------------


def test_parse_attacks_short_names():
  specs = ev.parse_attacks("fgsm, PGD20 ,cw50,pgd20-eot10,apgd-ce,apgd-dlr50-r3,pgd7-rs,a2-eot4",
                           eps=0.031)
  by_name = {s.name: s for s in specs}
  assert list(by_name) == ["fgsm", "pgd20", "cw50", "pgd20-eot10", "apgd-ce", "apgd-dlr50-r3",
                           "pgd7-rs", "A2-eot4"]
  assert by_name["fgsm"] == ev.AttackSpec("fgsm", "fgsm", eps=0.031)
  assert by_name["pgd20"] == ev.AttackSpec("pgd20", "pgd", eps=0.031, step_size=0.031 * 0.003 / 0.031,
                                           steps=20)
  assert by_name["pgd20"].step_size == pytest.approx(0.003)
  assert by_name["cw50"].kind == "cw" and by_name["cw50"].steps == 50 and by_name["cw50"].kappa == 50.0
  assert by_name["pgd20-eot10"].eot_samples == 10 and not by_name["pgd20-eot10"].random_start
  assert by_name["apgd-ce"].steps == 100 and by_name["apgd-ce"].random_start
  assert (by_name["apgd-dlr50-r3"].kind, by_name["apgd-dlr50-r3"].steps,
          by_name["apgd-dlr50-r3"].restarts) == ("apgd-dlr", 50, 3)
  assert by_name["pgd7-rs"].random_start and by_name["pgd7-rs"].restarts == 1
  assert by_name["A2-eot4"].steps == 20 and by_name["A2-eot4"].eot_samples == 4
  cwl2, cwl2_10 = ev.parse_attacks("cwl2,cwl210-eot3", eps=0.031)  # the EnResNet code's C&W
  assert (cwl2.kind, cwl2.steps, cwl2.random_start) == ("cw-l2", 50, False)
  assert (cwl2_10.steps, cwl2_10.eot_samples) == (10, 3)
  assert by_name["fgsm"].to_dict() == {
      "name": "fgsm", "kind": "fgsm", "eps": 0.031, "step_size": 0.0, "steps": 0,
      "random_start": False, "restarts": 1, "eot_samples": 1, "kappa": 0.0}


def test_paper_presets_scale_the_step_with_eps():
  a1, a2, a3 = ev.paper_specs()
  assert (a1.kind, a1.eps) == ("fgsm", 0.031)
  assert (a2.kind, a2.steps, a2.random_start) == ("pgd", 20, False)
  assert a2.step_size == pytest.approx(0.003)
  assert (a3.kind, a3.steps) == ("cw", 50) and a3.step_size == pytest.approx(0.003)
  _, a2_mnist, _ = ev.paper_specs(0.3, eot_samples=10)
  assert a2_mnist.step_size == pytest.approx(0.3 * 0.003 / 0.031)
  assert a2_mnist.name == "A2-eot10" and a2_mnist.eot_samples == 10


def test_parse_attacks_rejects_unknown_and_duplicate_names():
  with pytest.raises(ValueError, match="unknown attack 'pgdx'"):
    ev.parse_attacks("fgsm,pgdx", eps=0.1)
  with pytest.raises(ValueError, match="unknown attack 'apgd-kl'"):
    ev.parse_attacks(["apgd-kl"], eps=0.1)
  with pytest.raises(ValueError, match="attack 'FGSM' is listed twice"):
    ev.parse_attacks("fgsm,FGSM", eps=0.1)
  with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
    ev.parse_attacks("pgd0", eps=0.1)
  with pytest.raises(ValueError, match="kind must be one of"):
    ev.AttackSpec("x", "deepfool")


def test_robustbench_entry():
  result = {"natural": 0.8, "A2": 0.45, "n": 100}
  assert ev.robustbench_entry(result, "A2", eps=8 / 255) == {
      "clean_acc": 0.8, "robust_acc": 0.45, "threat_model": "Linf", "eps": 8 / 255,
      "counting": ev.COUNTING["worst_case"]}
  with pytest.raises(ValueError, match="no attack named 'A3'"):
    ev.robustbench_entry(result, "A3", eps=0.031)


def test_worst_case_and_robustbench_entry_count_clean_and_robust_images():
  # The flipped oracle moves .42 (label 1, wrong when clean) to .52, right under attack: the paper's
  # per-attack counting (6/7) exceeds clean accuracy (5/7); the field's counting does not.
  acc, masks = ev.transfer(flipped_model, pixel_model, _images_uint8(), LABELS, SPECS[1:2],
                           batch_size=4, key=jax.random.key(0), progress=False, return_masks=True)
  assert acc["natural"] == pytest.approx(NATURAL) and acc["fgsm"] == pytest.approx(6 / 7)
  expected = np.array([1, 1, 1, 1, 1, 0, 0], bool)  # .95 wrong clean; .42 wrong clean, right attacked
  np.testing.assert_array_equal(masks["fgsm"], [1, 1, 1, 1, 1, 0, 1])
  np.testing.assert_array_equal(ev.worst_case(masks), expected)
  np.testing.assert_array_equal(ev.worst_case(masks, clean=False), masks["fgsm"])
  entry = ev.robustbench_entry(acc, "fgsm", eps=EPS, masks=masks)
  assert entry["robust_acc"] == pytest.approx(5 / 7) and entry["robust_acc"] <= entry["clean_acc"]
  with pytest.raises(ValueError, match="exceeds the clean accuracy"):
    ev.robustbench_entry(acc, "fgsm", eps=EPS)  # paper counting refused as a RobustBench number
  with pytest.raises(ValueError, match="needs masks\\['natural'\\]"):
    ev.worst_case({"fgsm": masks["fgsm"]})


def test_bad_data_raise_clear_errors():
  images = _images_uint8()
  with pytest.raises(ValueError, match="float images must lie in"):
    ev.evaluate(pixel_model, images * 2.0, LABELS, SPECS[:1], batch_size=4, key=jax.random.key(0))
  with pytest.raises(ValueError, match="labels must have shape"):
    ev.evaluate(pixel_model, images, LABELS[:5], SPECS[:1], batch_size=4, key=jax.random.key(0))
  with pytest.raises(ValueError, match="explicit PRNG key"):
    ev.evaluate(pixel_model, images, LABELS, SPECS[:1], batch_size=4, key=None)
  with pytest.raises(ValueError, match="duplicate attack names"):
    ev.evaluate(pixel_model, images, LABELS, SPECS[:1] * 2, batch_size=4, key=jax.random.key(0))


def test_worst_case_counts_an_image_robust_only_if_every_attack_failed():
  masks = {"natural": np.array([1, 1, 1, 0], bool), "A1": np.array([1, 0, 1, 1], bool),
           "A2": np.array([1, 1, 0, 1], bool), "n": 4}
  np.testing.assert_array_equal(ev.worst_case(masks, clean=False), [True, False, False, True])
  np.testing.assert_array_equal(ev.worst_case(masks), [True, False, False, False])
  np.testing.assert_array_equal(ev.worst_case(masks, ["A2"], clean=False), masks["A2"])
  # Per image, the worst case is below the strongest single attack (0.5 < min(0.75, 0.75)).
  assert ev.worst_case(masks, clean=False).mean() < min(masks["A1"].mean(), masks["A2"].mean())
  with pytest.raises(ValueError, match="at least one attack"):
    ev.worst_case(masks, [])


# --------------------------------------------------------------------------------------------------
# Shared programs, progress
# --------------------------------------------------------------------------------------------------

_W1 = jnp.asarray(np.random.default_rng(3).standard_normal((4, 6)), jnp.float32)
_W2 = jnp.asarray(np.random.default_rng(4).standard_normal((6, 3)), jnp.float32)


def mlp_model(x, key):
  """A small nonlinear randomized model (attacks take several different steps on it)."""
  h = jnp.tanh(4.0 * x.reshape(x.shape[0], -1) @ _W1)
  return h @ _W2 + 0.5 * jax.random.normal(key, (x.shape[0], 3))


def _direct_attack(spec, x, y, key):
  """The attack of ``spec`` called with its settings as Python numbers (a program per spec)."""
  common = dict(eps=spec.eps, key=key, eot_samples=spec.eot_samples)
  if spec.kind == "fgsm":
    return attacks.fgsm(mlp_model, x, y, **common)
  if spec.kind == "cw-l2":
    return attacks.cw_l2_rescaled(mlp_model, x, y, steps=spec.steps, **common)
  common.update(steps=spec.steps, random_start=spec.random_start)
  if spec.kind == "pgd":
    return attacks.pgd(mlp_model, x, y, step_size=spec.step_size, **common)
  if spec.kind == "cw":
    return attacks.cw_linf(mlp_model, x, y, step_size=spec.step_size, kappa=spec.kappa, **common)
  return attacks.apgd(mlp_model, x, y, loss=spec.kind[5:], **common)


def test_shared_programs_craft_the_same_adversarial_examples_as_a_program_per_spec():
  images, labels = _noisy_data()
  x, y, key = jnp.asarray(images[:8]), jnp.asarray(labels[:8]), jax.random.key(5)
  shared = jax.jit(evalprograms.craft_program, static_argnums=0)
  fn = jax.tree_util.Partial(mlp_model)
  names = "fgsm-eot2,pgd4-eot2-rs,cw4,cwl24-eot2,apgd-dlr4-eot2"
  for spec in ev.parse_attacks(names, eps=EPS, step_size=0.03,
                               kappa=2.0):
    program = evalprograms.program_of(spec, 0)
    expected = jax.jit(lambda xx, yy, k, spec=spec: _direct_attack(spec, xx, yy, k))(x, y, key)
    got = shared(program, evalprograms.constants_of(spec), fn, x, y, key)
    assert float(jnp.max(jnp.abs(expected - x))) > 0, spec.name  # the attack moved the images
    # Bitwise equal for fgsm/pgd/cw; APGD's fused arithmetic may differ in the last bit (1 ulp).
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7, err_msg=spec.name)


@pytest.mark.parametrize("kinds", [("pgd", "pgd"), ("apgd-ce", "apgd-dlr")])
def test_specs_differing_only_in_constants_share_one_compiled_program(kinds):
  images, labels = _noisy_data()
  specs = (ev.AttackSpec("a", kinds[0], eps=0.1, step_size=0.03, steps=3, eot_samples=2),
           ev.AttackSpec("b", kinds[1], eps=0.05, step_size=0.01, steps=3, eot_samples=2,
                         restarts=2 if kinds[1] == "pgd" else 1))
  size = evalprograms.attack_correct._cache_size()  # pylint: disable=protected-access
  acc, masks = ev.evaluate(mlp_model, images, labels, specs, batch_size=8, key=jax.random.key(1),
                           progress=False, return_masks=True)
  assert evalprograms.attack_correct._cache_size() == size + 1  # pylint: disable=protected-access
  for spec in specs:  # the documented keys with a program per spec give the same masks
    expected = []
    for b in range(N_NOISY // 8):
      x, y = jnp.asarray(images[8 * b:8 * b + 8]), labels[8 * b:8 * b + 8]
      batch_key = jax.random.fold_in(jax.random.key(1), b)
      spec_key = jax.random.fold_in(batch_key, attacks.core.stream_id(spec.name))
      ok = np.ones(8, bool)
      for r in range(spec.restarts):
        attack_key, eval_key = jax.random.split(jax.random.fold_in(spec_key, r))
        ok &= np.argmax(mlp_model(_direct_attack(spec, x, y, attack_key), eval_key), -1) == y
      expected.append(ok)
    np.testing.assert_array_equal(masks[spec.name], np.concatenate(expected), err_msg=spec.name)
    assert acc[spec.name] == pytest.approx(np.concatenate(expected).mean())


def test_with_the_persistent_cache_on_compiled_calls_hold_no_callback_and_the_bar_still_ends(capsys):
  assert jax.config.jax_compilation_cache_dir  # the tests' conftest turns the cache on
  assert not evalprograms.in_call_ticks()
  events = []
  spec = ev.parse_attacks("pgd5", eps=EPS, step_size=0.02)
  got = ev.evaluate(pixel_model, _images_uint8(), LABELS, spec, batch_size=4, key=jax.random.key(0),
                    progress=True, progress_fn=events.append)
  assert got["pgd5"] == pytest.approx(ROBUST) and len(events) == 4  # natural, pgd5 per batch
  assert "14/14" in capsys.readouterr().err  # 7 images, natural and pgd5: the bar reaches its end
  x = jnp.zeros((4, 2, 2, 1))
  program = evalprograms.program_of(spec[0], 0)
  hlo = evalprograms.attack_correct.lower(jax.tree_util.Partial(pixel_model), jax.tree_util.Partial(
      pixel_model), x, jnp.zeros(4, jnp.int32), jax.random.key(0), evalprograms.constants_of(spec[0]),
      program=program).as_text()
  assert "callback" not in hlo
  ticking = evalprograms.ticking(jax.tree_util.Partial(pixel_model))
  assert "callback" in evalprograms.attack_correct.lower(
      ticking, jax.tree_util.Partial(pixel_model), x, jnp.zeros(4, jnp.int32), jax.random.key(0),
      evalprograms.constants_of(spec[0]), program=program).as_text()


def test_apgd_dlr_on_two_classes_is_refused_before_any_compile():
  spec = ev.parse_attacks("apgd-dlr3", eps=EPS)
  two_classes = lambda x, key: _pixel_logits(x[:, 0, 0, 0])[:, :2]
  size = evalprograms.attack_correct._cache_size()  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="apgd-dlr needs at least 3 classes"):
    ev.evaluate(two_classes, _images_uint8(), LABELS, spec, batch_size=4, key=jax.random.key(0),
                progress=False)
  assert evalprograms.attack_correct._cache_size() == size  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="apgd-dlr needs at least 3 classes"):
    ev.craft(spec[0], two_classes, jnp.zeros((2, 2, 2, 1)), jnp.zeros(2, jnp.int32), jax.random.key(0))


def test_progress_fn_is_called_per_attack_and_per_batch_with_images_done_and_robust_so_far():
  events = []
  acc, masks = ev.evaluate(pixel_model, _images_uint8(), LABELS, SPECS[1:3], batch_size=4,
                           key=jax.random.key(0), progress=False, return_masks=True,
                           progress_fn=events.append)
  assert [(e.attack, e.batch, e.images_done) for e in events] == [
      ("natural", 0, 4), ("fgsm", 0, 4), ("pgd10", 0, 4), ("natural", 1, 7), ("fgsm", 1, 7),
      ("pgd10", 1, 7)]
  assert all(e.batches == 2 and e.images == 7 for e in events)
  for e in events:
    assert e.correct == masks[e.attack][:e.images_done].sum()
  # robust so far: correct clean and under every attack finished on that image
  steps = [masks["natural"], masks["natural"] & masks["fgsm"], ev.worst_case(masks)]
  expected = [int(m[:4].sum()) for m in steps] + [int(steps[2][:4].sum() + m[4:7].sum()) for m in steps]
  assert [e.robust for e in events] == expected
  assert events[-1].robust == round(7 * ROBUST) and acc["pgd10"] == pytest.approx(ROBUST)


def test_the_bar_moves_inside_a_compiled_call_and_first_compiles_are_announced(capsys, monkeypatch):
  positions = []
  move = ev._Progress._move  # pylint: disable=protected-access

  def recording_move(self, fraction):
    move(self, fraction)
    positions.append((self.base, self.bar.n, fraction))
  monkeypatch.setattr(ev._Progress, "_move", recording_move)  # pylint: disable=protected-access
  monkeypatch.setattr(evalprograms, "in_call_ticks", lambda: True)  # the persistent cache off
  spec = ev.parse_attacks("pgd6", eps=EPS, step_size=0.02)
  for _ in range(2):
    got = ev.evaluate(pixel_model, _images_uint8(), LABELS, spec, batch_size=4, key=jax.random.key(0),
                      progress=True)
    assert got["pgd6"] == pytest.approx(ROBUST)
  err = capsys.readouterr().err
  assert err.count("compiling the PGD-6 program (first use; cached afterwards)") == 1
  # 6 passes per call, 2 batches, 2 evaluations: the bar moved within every call, never past its end
  assert len(positions) == 4 * 6
  assert all(0 < f < 1 for _, _, f in positions)
  assert any(base < n for base, n, _ in positions)
