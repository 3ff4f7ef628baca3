"""Bit-packed export: exact round trips, the byte formula, hand-checked bit layouts, corrupt files."""

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from enquant import export, quant
from enquant.models import EnResNet, ModelConfig

# A stacked 2-member ResNet8 with widths (4, 4, 4): three kernel shapes only (few compilations).
CONFIG = ModelConfig(num_classes=10, depth=8, widths=(4, 4, 4), noise_coef=0.1, ensembles=2)


@pytest.fixture(scope="module")
def variables():
  shapes = jax.eval_shape(EnResNet(CONFIG).init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: rng.normal(0.0, 0.2, s.shape).astype(np.float32), shapes)


def _leaves_equal(a, b) -> bool:
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      x.dtype == y.dtype and np.array_equal(x, y)
      for x, y in zip(map(np.asarray, jax.tree.leaves(a)), map(np.asarray, jax.tree.leaves(b))))


def _kernel_sizes(tree) -> list[int]:
  mask = jax.tree.leaves(quant.conv_kernel_mask(tree))
  return [int(np.size(k)) for k, m in zip(jax.tree.leaves(tree), mask) if m]


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_pack_save_load_unpack_restores_the_projection_bitwise(variables, tmp_path, bits):
  projected = quant.quantized(variables, quant.per_member(quant.make_projection(bits)))
  packed = export.pack(variables, bits)
  path = tmp_path / f"model{bits}.npz"
  export.save(path, packed)
  restored = export.unpack(export.load(path))
  assert _leaves_equal(restored, projected)  # kernels: P(w) bitwise; other leaves (BN, fc) unchanged
  # Already-quantized weights are stored as they are (m-bit re-projection may move them by an ulp).
  assert _leaves_equal(export.unpack(export.pack(projected, bits)), projected)
  # The byte formula: ceil(size * bits / 8) per kernel, one float32 scale per member and kernel.
  report = export.size_report(variables, packed)
  sizes = _kernel_sizes(variables)
  assert report["code_bytes"] == sum(math.ceil(n * bits / 8) for n in sizes)
  assert report["scale_bytes"] == 4 * 2 * len(sizes)
  assert report["kernel_float32_bytes"] == 4 * sum(sizes) == 4 * report["quantized_weights"]
  assert report["code_bytes"] / report["kernel_float32_bytes"] == pytest.approx(bits / 32, rel=0.01)
  total = sum(int(np.size(a)) for a in jax.tree.leaves(variables))
  assert report["float32_bytes"] == 4 * total
  assert report["float_bytes"] == 4 * (total - sum(sizes))
  assert report["packed_bytes"] == report["code_bytes"] + report["scale_bytes"] + report["float_bytes"]
  assert report["compression"] == pytest.approx(report["float32_bytes"] / report["packed_bytes"])
  assert report["code_bits_per_weight"] == pytest.approx(bits, rel=0.01)
  assert 0 < os.path.getsize(path) - report["packed_bytes"] < 6000  # header + archive overhead


@pytest.mark.parametrize("bits", [1, 2, 4, 8])  # 3-bit codes: test_bit_layout_by_hand
def test_weights_already_in_the_set_round_trip_exactly(bits):
  rng = np.random.default_rng(bits)
  levels = 1 if bits <= 2 else 2 ** (bits - 1) - 1
  low = 1 if bits == 1 else 0
  codes = rng.integers(low, levels + 1, (3, 3, 3, 2, 5)) * rng.choice([-1, 1], (3, 3, 3, 2, 5))
  scales = np.array([0.1, 0.037, 1e-3], np.float32)  # one per member; awkward float32 values
  weights = scales[:, None, None, None, None] * codes.astype(np.float32)
  params = {"conv": {"kernel": weights}, "bn": {"bias": np.ones((3, 5), np.float32)}}
  packed = export.pack(params, bits)
  assert _leaves_equal(export.unpack(packed), params)
  np.testing.assert_array_equal(packed.kernels["conv/kernel"].scale, scales)


def test_bit_layout_by_hand():
  # Ternary, 2 bits two's complement, first code in the lowest bits: 01 | 11 | 00 | 01 -> 0b01001101.
  np.testing.assert_array_equal(export.pack_codes(np.array([1, -1, 0, 1]), 2), [0x4D])
  # Binary: +1 -> 1, -1 -> 0; 9 codes take 2 bytes, the padding bits are 0.
  np.testing.assert_array_equal(export.pack_codes(np.array([1, -1, -1, 1, 1, 1, -1, 1, 1]), 1),
                                [0b10111001, 0b00000001])
  # 4-bit: -7 -> 1001, 7 -> 0111, 0 -> 0000, -1 -> 1111; two codes per byte, low nibble first.
  np.testing.assert_array_equal(export.pack_codes(np.array([-7, 7, 0, -1]), 4), [0x79, 0xF0])
  rng = np.random.default_rng(0)
  for bits in range(1, 9):
    levels = 1 if bits <= 2 else 2 ** (bits - 1) - 1
    for size in (1, 7, 13, 64):
      codes = rng.integers(-levels, levels + 1, size)
      if bits == 1:
        codes = np.where(codes >= 0, 1, -1)
      data = export.pack_codes(codes, bits)
      assert data.dtype == np.uint8 and data.size == math.ceil(size * bits / 8)
      np.testing.assert_array_equal(export.unpack_codes(data, size, bits), codes)
  with pytest.raises(ValueError, match="lie in"):
    export.pack_codes(np.array([2]), 2)
  with pytest.raises(ValueError, match="invalid 2-bit code -2"):
    export.unpack_codes(np.array([0b10], np.uint8), 1, 2)
  with pytest.raises(ValueError, match="padding"):
    export.unpack_codes(np.array([0b100], np.uint8), 1, 2)


def _tiny_packed():
  codes = np.tile(np.array([1, -1, 0, 1, 1, -1], np.float32), 4).reshape(2, 1, 1, 3, 4)
  params = {"conv": {"kernel": 0.5 * codes},  # already ternary: stored as it is
            "fc": {"bias": np.arange(3, dtype=np.float32)}}
  return export.pack(params, 2)


def test_corrupt_or_mismatched_files_raise_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no packed model"):
    export.load(tmp_path / "missing.npz")
  path = tmp_path / "good.npz"
  export.save(path, _tiny_packed())
  raw = path.read_bytes()
  cases = {
      "garbage": b"not a zip file at all",
      "truncated": raw[: len(raw) // 2],
  }
  # Flip one byte inside the stored codes (zip CRC or our CRC-32 catches it).
  codes = export.load(path).kernels["conv/kernel"].data.tobytes()
  at = raw.index(codes)
  flipped = bytearray(raw)
  flipped[at] ^= 0xFF
  cases["flipped"] = bytes(flipped)
  for name, content in cases.items():
    bad = tmp_path / f"{name}.npz"
    bad.write_bytes(content)
    with pytest.raises(ValueError):
      export.load(bad)
  # A valid .npz that is not a packed model.
  other = tmp_path / "other.npz"
  np.savez(other, x=np.zeros(3))
  with pytest.raises(ValueError, match="no header"):
    export.load(other)
  # A header that does not match the stored arrays (a kernel shape with too few packed bytes).
  good = _tiny_packed()
  kernel = good.kernels["conv/kernel"]
  short = good._replace(kernels={"conv/kernel": kernel._replace(shape=(2, 1, 1, 3, 8))})
  export.save(tmp_path / "short.npz", short)
  with pytest.raises(ValueError, match="runs past the end"):
    export.load(tmp_path / "short.npz")
  # Invalid codes (binary pattern 10 = -2 is not ternary) are rejected on unpack.
  broken = good._replace(kernels={"conv/kernel": kernel._replace(data=np.full_like(kernel.data, 0xAA))})
  with pytest.raises(ValueError, match="invalid 2-bit code"):
    export.unpack(broken)
  # No temporary files are left behind by the atomic writes.
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_bad_arguments_raise_value_errors(variables):
  with pytest.raises(ValueError, match="bits"):
    export.pack(variables, 9)
  with pytest.raises(ValueError, match="ternary_method"):
    export.pack(variables, 2, ternary_method="nope")
  with pytest.raises(ValueError, match="structure"):
    export.pack(variables, 1, mask={"params": True})
  with pytest.raises(ValueError, match="nested dict"):
    export.pack([np.zeros((1, 3, 3, 1, 1), np.float32)], 1)
  with pytest.raises(ValueError, match="differ"):
    export.size_report({"other": np.zeros(3)}, _tiny_packed())
  with pytest.raises(ValueError, match="PackedModel"):
    export.save("/tmp/never-written.npz", {"bits": 1})


def test_a_file_with_batch_stats_and_model_config_is_a_standalone_model(variables, tmp_path):
  packed = export.pack(variables["params"], 2)
  path = tmp_path / "model.npz"
  export.save(path, packed, batch_stats=variables["batch_stats"], model_config=CONFIG, input_shape=(8, 8, 3))
  model, restored = export.load_model(path)
  assert isinstance(model, EnResNet) and model.config == CONFIG
  expected = {"params": export.unpack(packed), "batch_stats": variables["batch_stats"]}
  assert _leaves_equal(restored, expected)
  assert _leaves_equal(export.load(path).floats, packed.floats)  # load() still gives the parameters
  # A file without statistics or configuration is not a model; nor is one whose arrays do not fit.
  export.save(tmp_path / "bare.npz", packed)
  with pytest.raises(ValueError, match="no BatchNorm statistics"):
    export.load_model(tmp_path / "bare.npz")
  export.save(tmp_path / "no_config.npz", packed, batch_stats=variables["batch_stats"])
  with pytest.raises(ValueError, match="no model configuration"):
    export.load_model(tmp_path / "no_config.npz")
  other = dataclasses.replace(CONFIG, widths=(4, 4, 8))
  export.save(tmp_path / "other.npz", packed, batch_stats=variables["batch_stats"], model_config=other,
              input_shape=(8, 8, 3))
  with pytest.raises(ValueError, match="does not fit the model"):
    export.load_model(tmp_path / "other.npz")


@pytest.fixture(scope="module")
def model_file(variables, tmp_path_factory):
  path = tmp_path_factory.mktemp("model") / "model.npz"
  export.save(path, export.pack(variables["params"], 2), batch_stats=variables["batch_stats"],
              model_config=CONFIG, input_shape=(8, 8, 3))
  return path


def _with_header(src, dst, edit):
  """Copies the packed file ``src`` to ``dst`` with its JSON header changed by ``edit(header)``."""
  with np.load(src) as npz:
    arrays = {k: npz[k] for k in npz.files}
  header = json.loads(arrays["__meta__"].tobytes())
  edit(header)
  arrays["__meta__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
  np.savez(dst, **arrays)
  return dst


def test_a_header_claiming_a_million_blocks_is_refused_at_once(model_file, tmp_path):
  path = _with_header(model_file, tmp_path / "deep.npz",
                      lambda h: h["model"]["config"].update(depth=1_200_002))
  start = time.perf_counter()
  with pytest.raises(ValueError, match=r"deep\.npz: its configuration has 600000 residual blocks, but "
                                       r"the file holds only 39 arrays"):
    export.load_model(path)
  assert time.perf_counter() - start < 2.0


def _set(*keys_and_value):
  *keys, value = keys_and_value

  def edit(header):
    for k in keys[:-1]:
      header = header[k]
    header[keys[-1]] = value
  return edit


@pytest.mark.parametrize("edit,message", [
    (_set("model", "input_shape", "8x8"), 'input_shape is "8x8"'),
    (_set("model", "input_shape", 5), "input_shape is 5"),
    (_set("model", "config", "ensembles", 2.0), "field 'ensembles' must be an integer"),
    (_set("stacked", "no"), 'stacked is "no"'),
    (_set("ternary_method", 7), "ternary_method is 7"),
    (_set("kernels", 0, "path", 5), "a path in 'kernels' is 5"),
    (_set("floats", 0, "dtype", "|O"), 'the dtype of .* is "|O"'),
], ids=["input_shape_str", "input_shape_int", "ensembles_float", "stacked_str", "ternary_int",
        "path_int", "dtype_object"])
def test_a_wrong_typed_header_field_is_one_line_naming_the_file(model_file, tmp_path, edit, message):
  path = _with_header(model_file, tmp_path / "typed.npz", edit)
  with pytest.raises(ValueError, match=message) as info:
    export.load_model(path)
  assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_arrays_that_do_not_fit_the_configuration_are_refused_at_load_without_an_input_shape(
    variables, tmp_path):
  other = dataclasses.replace(CONFIG, widths=(4, 4, 8))
  export.save(tmp_path / "other.npz", export.pack(variables["params"], 2),
              batch_stats=variables["batch_stats"], model_config=other)
  with pytest.raises(ValueError, match=r"batch_stats/bn_final/mean does not fit the model of its "
                                       r"configuration \(\(2, 4\) vs \(2, 8\)\)"):
    export.load_model(tmp_path / "other.npz")
