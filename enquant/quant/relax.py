"""Binary-Relax and Binary-Connect as optax gradient transformations.

The transformation wraps an inner optimizer (e.g. SGD with momentum and weight decay) and keeps, in its
own state, the float weights ``w`` and the relaxed weights ``u`` that the model sees. With a projection
``P`` onto the quantized set ``Q`` (see :mod:`enquant.quant.projections`), one update is Algorithm 1 of
Li, Wang, Xin (Yin et al. 2018):

* ``w <- w + inner_updates``, where ``inner`` is given ``w`` as its params (so weight decay acts on the
  float weights) and the gradients were computed at ``u``;
* ``u <- (lam * P(w) + w) / (lam + 1)`` while fewer than ``relax_steps`` updates were done (the closed-form
  minimiser of ``1/2 ||w - u||^2 + lam/2 dist(u, Q)^2``), afterwards ``u <- P(w)`` exactly
  (Binary-Connect);
* ``lam <- lam * growth`` every ``growth_every`` updates.

The emitted updates are ``u_new - params`` on the quantized leaves (so ``optax.apply_updates`` moves the
params to ``u``) and exactly ``inner_updates`` elsewhere. Floating-point addition makes
``params + (u_new - params)`` differ from ``u_new`` in the last bit; call :func:`snap_params` after
``optax.apply_updates`` to make the params exactly the state's ``u`` (then, after ``relax_steps``, they lie
exactly in ``Q``).

Example:

  >>> tx = binary_relax(optax.sgd(0.1, momentum=0.9), project_binary, growth_every=390,
  ...                   relax_steps=80 * 390)
  >>> opt_state = tx.init(params)
  >>> grads = jax.grad(loss)(params)          # gradient at u (the params)
  >>> updates, opt_state = tx.update(grads, opt_state, params)
  >>> params = snap_params(optax.apply_updates(params, updates), opt_state)
  >>> eval_params = quantized(opt_state, project_binary)   # P(w) for evaluation / export

References:
  Yin, Zhang, Lyu, Osher, Qi, Xin. "BinaryRelax: A relaxation approach for training deep neural networks
  with quantized weights." SIAM J. Imaging Sciences 11(4):2205-2223, 2018.
  https://arxiv.org/abs/1801.06313
  Courbariaux, Bengio, David. "BinaryConnect: Training deep neural networks with binary weights during
  propagations." NeurIPS 2015. https://arxiv.org/abs/1511.00363
"""

from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

Projection = Callable[[jax.Array], jax.Array]
MaskOrFn = Union[Any, Callable[[optax.Params], Any]]

_LAM_MAX = float(np.finfo(np.float32).max)


class BinaryRelaxState(NamedTuple):
  """State of :func:`binary_relax`.

  Attributes:
    count: number of updates done so far (int32 scalar).
    lam: the relaxation weight lambda the next update uses (float32 scalar),
      ``lambda0 * growth ** (count // growth_every)`` (capped at the float32 maximum; it keeps growing
      after ``relax_steps``, where it is no longer used).
    w: the float weights (full params tree); the inner optimizer's params.
    u: the relaxed / quantized weights the model sees (full params tree; equal to ``w`` on leaves that
      are not quantized).
    inner_state: the inner optimizer's state.
  """

  count: jax.Array
  lam: jax.Array
  w: optax.Params
  u: optax.Params
  inner_state: optax.OptState


# ------------------------------------------------------------------------------------------- masks


def path_names(path) -> list[str]:
  """The names along a ``jax.tree_util`` key path (dict keys, attribute names, sequence indices)."""
  names = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        names.append(str(getattr(entry, attr)))
        break
  # nnx.State leaves sit under a Variable node (``.../kernel/value``): drop that wrapper level.
  while names and names[-1] in ("value", "raw_value"):
    names.pop()
  return names


def conv_kernel_mask(params: optax.Params) -> Any:
  """The default quantization mask: True for conv kernels, False elsewhere.

  A leaf is quantized when its path ends in ``"kernel"`` and it has ``ndim >= 4``: conv kernels (HWIO)
  and ensemble-stacked conv kernels (a leading member axis, ndim 5). The dense layer (kernel ndim 2, or 3
  when stacked), biases and BatchNorm parameters stay float (as in the BinaryRelax code; the first conv
  is quantized too). Works for Linen ``params`` dicts and ``nnx.State`` trees.

  Args:
    params: a pytree of arrays (or of ``jax.ShapeDtypeStruct``).

  Returns:
    A pytree of Python bools with the structure of ``params``.
  """

  def is_conv_kernel(path, leaf) -> bool:
    names = path_names(path)
    return bool(names) and names[-1] == "kernel" and len(np.shape(leaf)) >= 4

  return jax.tree_util.tree_map_with_path(is_conv_kernel, params)


def resolve_mask(mask: MaskOrFn | None, params: optax.Params) -> Any:
  """The mask as a pytree of Python bools (``None``: :func:`conv_kernel_mask`); ValueError if its
  structure is not that of ``params``."""
  if mask is None:
    tree = conv_kernel_mask(params)
  elif callable(mask):
    tree = mask(params)
  else:
    tree = mask
  if jax.tree.structure(tree) != jax.tree.structure(params):
    raise ValueError(
        "mask must have the structure of params: got mask "
        f"{jax.tree.structure(tree)} for params {jax.tree.structure(params)}"
    )

  return jax.tree.map(_static_bool, tree)


# jax.core is being slimmed down across JAX releases; Tracer has stayed public so far.
_TRACER = getattr(jax.core, "Tracer", None) or __import__("jax._src.core", fromlist=["Tracer"]).Tracer


def _static_bool(leaf) -> bool:
  if isinstance(leaf, _TRACER):
    raise ValueError("mask leaves must be static Python bools, got a traced value")
  arr = np.asarray(leaf)
  if arr.shape != () or arr.dtype != np.bool_:
    raise ValueError(f"mask leaves must be Python bools, got {leaf!r}")
  return bool(arr)


# --------------------------------------------------------------------------- the transformations


def _check_number(name: str, value, ok: Callable[[float], bool], what: str) -> None:
  if isinstance(value, _TRACER):  # e.g. under optax.inject_hyperparams: cannot be checked
    return
  is_real = isinstance(value, (int, float, np.integer, np.floating)) or (
      isinstance(value, (np.ndarray, jax.Array)) and value.shape == ()
      and np.issubdtype(value.dtype, np.number))
  if isinstance(value, bool) or not is_real or not ok(float(value)):
    raise ValueError(f"{name} must be a number {what}, got {value!r}")


def _check_count(value, name: str, minimum: int):
  """As :func:`enquant.attacks.core.check_int` (same argument order), but also accepting numpy integers
  and, unchecked, traced values (optax.inject_hyperparams)."""
  if isinstance(value, _TRACER):
    return value
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def _lam_at(count: jax.Array, lambda0, growth, growth_every: int) -> jax.Array:
  """``lambda0 * growth ** (count // growth_every)`` in float32, capped at the float32 maximum."""
  exponent = (count // growth_every).astype(jnp.float32)
  lam = jnp.asarray(lambda0, jnp.float32) * jnp.power(jnp.asarray(growth, jnp.float32), exponent)
  return jnp.minimum(lam, _LAM_MAX)  # finite even after very many growth events


def _relaxed_leaf(projection: Projection, w_leaf: jax.Array, lam: jax.Array, relaxing: jax.Array
                  ) -> jax.Array:
  """``u`` of one quantized leaf: ``(lam P(w) + w) / (lam + 1)`` while ``relaxing``, else ``P(w)``.

  The relaxed value is computed as ``P + (w - P) / (lam + 1)``: the same value, finite for a huge
  ``lam`` (where it tends to exactly ``P(w)``).
  """
  p = projection(w_leaf)
  relaxed = p + (w_leaf - p) / (lam + 1.0)  # = (lam P(w) + w) / (lam + 1)
  return jnp.where(relaxing, relaxed.astype(w_leaf.dtype), p.astype(w_leaf.dtype))


def binary_relax(
    inner: optax.GradientTransformation,
    projection: Projection,
    *,
    lambda0: float = 1.0,
    growth: float = 1.05,
    growth_every: int,
    relax_steps: int,
    mask: MaskOrFn | None = None,
) -> optax.GradientTransformation:
  """Binary-Relax (Yin et al. 2018) around an inner optimizer, switching to Binary-Connect.

  For the k-th update (``k = 0, 1, ...``, counted in the state), with ``lam_k = lambda0 *
  growth ** (k // growth_every)``::

    w_{k+1} = w_k + inner_updates       # inner.update(grads, inner_state, w_k)
    u_{k+1} = (lam_k P(w_{k+1}) + w_{k+1}) / (lam_k + 1)   if k < relax_steps
    u_{k+1} = P(w_{k+1})                                   otherwise (Binary-Connect)

  on the masked leaves (computed as ``P + (w - P) / (lam + 1)``, the same value, which stays finite and
  tends to exactly ``P(w)`` for a huge ``lam``). Unmasked leaves have ``u = w`` and receive exactly
  ``inner_updates``. ``u_0 = w_0`` (the initial params). The gradients passed to ``update`` must be
  those of the loss at ``u`` (the params the model sees).

  The projection is applied per leaf: for ensembles with stacked parameters pass
  ``per_member(projection)`` so each member's kernel is projected on its own.

  Args:
    inner: the optimizer that updates the float weights (it sees ``w`` as its params, so
      ``optax.add_decayed_weights`` inside it decays ``w``).
    projection: ``w -> P(w)`` for one leaf, e.g. ``project_ternary`` or ``make_projection(bits)``.
    lambda0: initial relaxation weight (> 0); Algorithm 1 uses 1.
    growth: factor (>= 1) applied to lambda every ``growth_every`` updates.
    growth_every: cadence of the growth in updates (e.g. steps per epoch).
    relax_steps: number of relaxed updates; from then on ``u = P(w)`` (0 gives Binary-Connect).
    mask: pytree of Python bools with the params' structure, or a callable ``params -> such a tree``,
      selecting the quantized leaves; ``None`` uses :func:`conv_kernel_mask`.

  Returns:
    An ``optax.GradientTransformation`` whose state is (or, in a chain, contains) a
    :class:`BinaryRelaxState`. ``update`` requires ``params``.

  Raises:
    ValueError: for a bad argument.

  References:
    Yin et al. "BinaryRelax: A relaxation approach for training deep neural networks with quantized
    weights." SIAM J. Imaging Sciences, 2018 (Algorithm 1).
    Courbariaux et al. "BinaryConnect: Training deep neural networks with binary weights during
    propagations." NeurIPS 2015.
  """
  if not (hasattr(inner, "init") and hasattr(inner, "update")):
    raise ValueError(f"inner must be an optax.GradientTransformation, got {inner!r}")
  if not callable(projection):
    raise ValueError(f"projection must be callable, got {projection!r}")
  _check_number("lambda0", lambda0, lambda v: v > 0, "> 0")
  _check_number("growth", growth, lambda v: v >= 1, ">= 1")
  growth_every = _check_count(growth_every, "growth_every", 1)
  relax_steps = _check_count(relax_steps, "relax_steps", 0)
  if mask is not None and not callable(mask):
    jax.tree.map(_static_bool, mask)  # its structure is checked against params at update time

  def init_fn(params: optax.Params) -> BinaryRelaxState:
    # Own copies, so the state never aliases the caller's params buffers (buffer donation).
    return BinaryRelaxState(
        count=jnp.zeros([], jnp.int32),
        lam=_lam_at(jnp.zeros([], jnp.int32), lambda0, growth, growth_every),
        w=jax.tree.map(jnp.copy, params),
        u=jax.tree.map(jnp.copy, params),
        inner_state=inner.init(params),
    )

  def update_fn(updates, state: BinaryRelaxState, params=None):
    if params is None:
      raise ValueError("binary_relax needs `params` (the current u) in update(grads, state, params)")
    is_quantized = resolve_mask(mask, params)
    inner_updates, inner_state = inner.update(updates, state.inner_state, state.w)
    w = optax.apply_updates(state.w, inner_updates)
    relaxing = state.count < relax_steps

    def new_u(quantize: bool, w_leaf):
      return _relaxed_leaf(projection, w_leaf, state.lam, relaxing) if quantize else w_leaf

    u = jax.tree.map(new_u, is_quantized, w)
    emitted = jax.tree.map(
        lambda quantize, u_leaf, p_leaf, i_leaf: (u_leaf - p_leaf) if quantize else i_leaf,
        is_quantized, u, params, inner_updates,
    )
    count = optax.safe_int32_increment(state.count)
    lam = _lam_at(count, lambda0, growth, growth_every)
    new_state = BinaryRelaxState(count=count, lam=lam, w=w, u=u, inner_state=inner_state)
    return emitted, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def binary_connect(
    inner: optax.GradientTransformation, projection: Projection, *, mask: MaskOrFn | None = None
) -> optax.GradientTransformation:
  """Binary-Connect: ``binary_relax`` with ``relax_steps=0`` (``u = P(w)`` from the first update).

  Args:
    inner: the optimizer of the float weights.
    projection: ``w -> P(w)`` for one leaf.
    mask: the quantized leaves (see :func:`binary_relax`).

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Courbariaux, Bengio, David. "BinaryConnect: Training deep neural networks with binary weights
    during propagations." NeurIPS 2015.
  """
  return binary_relax(inner, projection, lambda0=1.0, growth=1.0, growth_every=1, relax_steps=0,
                      mask=mask)


# ------------------------------------------------------------------------------- state accessors


def _find_states(tree) -> list[BinaryRelaxState]:
  is_state = lambda x: isinstance(x, BinaryRelaxState)  # noqa: E731
  return [x for x in jax.tree.leaves(tree, is_leaf=is_state) if is_state(x)]


def _find_state(opt_state) -> BinaryRelaxState:
  states = _find_states(opt_state)
  if not states:
    raise ValueError(
        "no BinaryRelaxState found in the optimizer state (was it built with binary_relax/binary_connect?)"
    )
  if len(states) > 1:
    raise ValueError(f"found {len(states)} BinaryRelaxStates in the optimizer state; expected one")
  return states[0]


def float_weights(opt_state: optax.OptState) -> optax.Params:
  """The float weights ``w`` kept by Binary-Relax.

  Args:
    opt_state: a :class:`BinaryRelaxState` or any state containing exactly one (``optax.chain`` tuples,
      ``inject_hyperparams`` states, ...).

  Returns:
    The params tree ``w``.

  Raises:
    ValueError: when the state holds no (or several) BinaryRelaxState.
  """
  return _find_state(opt_state).w


def relaxed_weights(opt_state: optax.OptState) -> optax.Params:
  """The relaxed weights ``u`` (what the model's params should be) kept by Binary-Relax.

  Args:
    opt_state: a state containing exactly one :class:`BinaryRelaxState`.

  Returns:
    The params tree ``u``.

  Raises:
    ValueError: when the state holds no (or several) BinaryRelaxState.
  """
  return _find_state(opt_state).u


def snap_params(params: optax.Params, opt_state: optax.OptState) -> optax.Params:
  """The state's ``u`` (exactly), or ``params`` unchanged when the state has no BinaryRelaxState.

  ``optax.apply_updates(params, u_new - params)`` is ``u_new`` only up to rounding; a train step calls
  ``params = snap_params(optax.apply_updates(params, updates), opt_state)`` so the model's params are
  bitwise the relaxed (after ``relax_steps``: exactly quantized) weights.

  Args:
    params: the params after ``optax.apply_updates``.
    opt_state: the new optimizer state.

  Returns:
    A params tree.

  Raises:
    ValueError: when the state's ``u`` does not have the structure of ``params``, or the state holds
      several BinaryRelaxStates.
  """
  states = _find_states(opt_state)
  if not states:
    return params
  u = _find_state(opt_state).u
  if jax.tree.structure(u) != jax.tree.structure(params):
    raise ValueError(
        f"the BinaryRelaxState's u has structure {jax.tree.structure(u)}, params have "
        f"{jax.tree.structure(params)}"
    )
  return u


def quantized(params_or_state, projection: Projection, mask: MaskOrFn | None = None) -> optax.Params:
  """P(w) on the quantized leaves, the other leaves unchanged; for evaluation and export.

  Args:
    params_or_state: an optimizer state containing a :class:`BinaryRelaxState` (its float ``w`` is
      projected) or a params tree (projected as is).
    projection: ``w -> P(w)`` for one leaf (``per_member(...)`` for stacked ensembles).
    mask: the quantized leaves; ``None`` uses :func:`conv_kernel_mask`.

  Returns:
    A params tree.
  """
  if not callable(projection):
    raise ValueError(f"projection must be callable, got {projection!r}")
  tree = float_weights(params_or_state) if _find_states(params_or_state) else params_or_state
  is_quantized = resolve_mask(mask, tree)
  return jax.tree.map(lambda q, leaf: projection(leaf) if q else leaf, is_quantized, tree)
