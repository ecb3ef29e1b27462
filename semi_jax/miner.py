"""OHEML: hard-example mining by pseudo-label entropy (SeMi, section 5).

An unlabeled example whose pseudo-label distribution has high entropy is "hard". The paper weights the
unlabeled loss by ``H / log C * scale + (1 - scale)`` (``ohem_weights``); the rank-based variant gives
weight 1 to the hardest fraction of the GLOBAL batch and a smaller weight to the rest (``rank_weights``).

All functions are pure, shape-static and jittable. Rankings are computed over the whole global batch,
so they do not depend on how the batch is sharded. On a mesh with Explicit axes the scores are gathered
to every device first, because XLA sorts only along unsharded axes (with Auto axes XLA does this itself).
"""
from fractions import Fraction
from numbers import Real
from typing import NamedTuple

import jax
import jax.numpy as jnp

from semi_jax import sharding

MODES = ("entropy", "rank")

# hard_fraction is used as an exact fraction p/q with q <= this, so that e.g. 0.7 of 10 examples is 7
# (0.7 * 10 is 7.000000000000001 in floating point) and rank * q fits int32 for batches up to 2 million.
_MAX_FRACTION_DENOMINATOR = 1000


class MinerOutput(NamedTuple):
  """Result of ``mine`` for a batch of N examples.

  Attributes:
    weights: f32[N] per-example weight of the unlabeled loss.
    entropy: f32[N] normalised entropy of each pseudo-label, in [0, 1].
    rank: int32[N] 0 = hardest (highest entropy) in the global batch.
    is_hard: bool[N] the ceil(hard_fraction * N_valid) hardest valid examples.
  """
  weights: jax.Array
  entropy: jax.Array
  rank: jax.Array
  is_hard: jax.Array


def normalized_entropy(probs: jax.Array, eps: float = 1e-8) -> jax.Array:
  """f32[N]: entropy of each row of ``probs`` [N, C] divided by log(C).

  Rows are clamped to [eps, 1 - eps] first (as the reference does, to keep log finite), so a one-hot row
  gives ~0 and a uniform row gives 1.
  """
  if probs.ndim != 2 or probs.shape[1] < 2:
    raise ValueError(f"normalized_entropy: probs must be [N, C] with C >= 2, got shape {probs.shape}.")
  p = jnp.clip(probs.astype(jnp.promote_types(probs.dtype, jnp.float32)), eps, 1.0 - eps)
  return -jnp.sum(p * jnp.log(p), axis=1) / jnp.log(jnp.asarray(probs.shape[1], p.dtype))


def ohem_weights(entropy: jax.Array, scale) -> jax.Array:
  """The paper's OHEML weight ``entropy * scale + (1 - scale)``: 1 for the hardest, 1 - scale for the easiest.

  ``scale`` may be a traced scalar (it comes from a schedule).
  """
  return entropy * scale + (1.0 - scale)


def entropy_rank(entropy: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """int32[N]: rank of every example by entropy over the global batch, 0 = hardest (highest entropy).

  Ties go to the lower index. With ``valid`` (bool[N]), invalid examples rank after every valid one (in
  index order), so the valid examples hold ranks 0 .. N_valid - 1.
  """
  entropy = jnp.asarray(entropy)
  if entropy.ndim != 1:
    raise ValueError(f"entropy_rank: entropy must be 1-D [N], got shape {entropy.shape}.")
  n = entropy.shape[0]
  entropy = sharding.unshard_if_explicit(entropy)
  index = jnp.arange(n, dtype=jnp.int32)
  if valid is None:
    _, order = jax.lax.sort((-entropy, index), num_keys=1, is_stable=True)
  else:
    invalid = ~sharding.unshard_if_explicit(_check_valid(valid, n, "entropy_rank")).astype(bool)
    _, _, order = jax.lax.sort((invalid, -entropy, index), num_keys=2, is_stable=True)
  # order is a permutation, so this scatter has no duplicate indices.
  return jnp.zeros(n, jnp.int32).at[order].set(index, unique_indices=True)


def _check_valid(valid, n: int, caller: str):
  if jnp.shape(valid) != (n,):
    raise ValueError(f"{caller}: valid must have shape ({n},) like the batch, got {jnp.shape(valid)}.")
  return jnp.asarray(valid)


def _hard_fraction_ratio(hard_fraction) -> Fraction:
  if not isinstance(hard_fraction, Real):
    raise ValueError(
        f"hard_fraction must be a Python float (a static config value, not a traced array), got "
        f"{type(hard_fraction).__name__}; pass it through functools.partial or as a static argument.")
  if not 0.0 <= hard_fraction <= 1.0:
    raise ValueError(f"hard_fraction must lie in [0, 1] (e.g. 0.5), got {hard_fraction}.")
  return Fraction(float(hard_fraction)).limit_denominator(_MAX_FRACTION_DENOMINATOR)


def hard_mask(rank: jax.Array, hard_fraction: float, valid: jax.Array | None = None) -> jax.Array:
  """bool[N]: rank < ceil(hard_fraction * N_valid), i.e. the hardest fraction of the (valid) batch.

  ``hard_fraction`` is static (a Python float in [0, 1]), taken as the nearest fraction with denominator
  <= 1000 so that e.g. 0.7 of 10 is exactly 7. N_valid is N without ``valid``.
  """
  ratio = _hard_fraction_ratio(hard_fraction)
  n = rank.shape[0]
  if valid is None:
    num_valid = jnp.asarray(n, jnp.int32)
  else:
    valid = _check_valid(valid, n, "hard_mask").astype(bool)
    num_valid = jnp.sum(valid, dtype=jnp.int32)
  # rank < ceil(p * n_valid / q)  <=>  rank * q < p * n_valid, exact in integers.
  is_hard = rank * ratio.denominator < ratio.numerator * num_valid
  return is_hard if valid is None else is_hard & valid


def rank_weights(entropy: jax.Array, hard_fraction: float, easy_weight, valid: jax.Array | None = None
                 ) -> jax.Array:
  """f32[N]: 1 for the ceil(hard_fraction * N_valid) hardest examples (``entropy_rank``), else ``easy_weight``.

  ``hard_fraction`` is static (a Python float in [0, 1], see ``hard_mask``); ``easy_weight`` may be traced.
  Invalid examples are never hard.
  """
  is_hard = hard_mask(entropy_rank(entropy, valid), hard_fraction, valid)
  return jnp.where(is_hard, 1.0, jnp.asarray(easy_weight, jnp.float32)).astype(jnp.float32)


def mine(probs: jax.Array, *, mode: str, scale, hard_fraction: float, valid: jax.Array | None = None
         ) -> MinerOutput:
  """Scores, ranks and weights a batch of pseudo-label distributions ``probs`` [N, C].

  Args:
    probs: [N, C] pseudo-label distributions (rows sum to 1).
    mode: static; 'entropy' (paper default): weights = ``ohem_weights(entropy, scale)``; 'rank': weights =
      ``rank_weights(entropy, hard_fraction, easy_weight=1 - scale)``.
    scale: OHEML scale (0.75 in the paper); may be traced.
    hard_fraction: static Python float in [0, 1]. In both modes ``is_hard`` marks the
      ceil(hard_fraction * N_valid) highest-entropy valid examples; in 'entropy' mode it is diagnostic only.
    valid: optional bool[N]; examples outside it (e.g. masked-out pseudo-labels) rank last and are never
      hard. Their 'entropy' weight is still computed (callers multiply by the mask anyway).

  Returns:
    MinerOutput(weights, entropy, rank, is_hard).
  """
  if mode not in MODES:
    raise ValueError(f"mine: unknown mode {mode!r}; allowed values are {MODES}.")
  entropy = normalized_entropy(probs)
  rank = entropy_rank(entropy, valid)
  is_hard = hard_mask(rank, hard_fraction, valid)
  if mode == "entropy":
    weights = ohem_weights(entropy, scale)
  else:
    weights = jnp.where(is_hard, 1.0, 1.0 - jnp.asarray(scale, jnp.float32))
  return MinerOutput(weights=weights.astype(jnp.float32), entropy=entropy, rank=rank, is_hard=is_hard)
