"""Loss against training compute: the Cerebras-GPT paper's power law L(f) = (f / a)^(-b) + c.

f is training FLOPs, L the validation loss in nats per token, c the irreducible loss the curve
tends to, b the exponent. The paper's fit on the Pile (arXiv 2304.03208;
docs/cerebras_gpt.md#scaling-law) is
PAPER = (f / 5.984e22)^(-0.0737) + 0.5066.

`fit` works in log space (x = ln f, alpha = ln a: L = exp(-b (x - alpha)) + c) because a is a FLOP
count of order 1e20 that a least-squares solver cannot step in sensibly, and reports 1-sigma
standard errors from the fit's covariance; `bootstrap_b` gives a spread of b over resampled points.
"""

import dataclasses

import numpy as np
from scipy import optimize

from cgpt_jax.errors import InputError

MIN_POINTS = 4  # three coefficients plus at least one degree of freedom for their uncertainty


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """L(f) = (f / a)^(-b) + c."""

  a: float
  b: float
  c: float

  def __call__(self, flops):
    return (np.asarray(flops, dtype=float) / self.a) ** -self.b + self.c

  def __str__(self) -> str:
    return f"(f / {self.a:.4g})^(-{self.b:.4g}) + {self.c:.4g}"


PAPER = PowerLaw(a=5.984e22, b=0.0737, c=0.5066)


@dataclasses.dataclass(frozen=True)
class Fit:
  """A fitted law with 1-sigma standard errors (sigma_log_a is that of ln a) and the fit's
  residuals.

  `floor_at_bound`: c ended on 0 or on the smallest loss. The points then do not curve towards a
  floor (losses that fall ever faster with log compute do not), c is not determined by them, the
  covariance's errors are meaningless, and b is the exponent of the law with c pinned there.
  """

  law: PowerLaw
  sigma_log_a: float
  sigma_b: float
  sigma_c: float
  rms_residual: float
  n_points: int
  floor_at_bound: bool


def check_points(flops, losses) -> tuple[np.ndarray, np.ndarray]:
  """(flops, losses) as float arrays, or InputError saying what is wrong with them."""
  flops, losses = np.asarray(flops, dtype=float), np.asarray(losses, dtype=float)
  if flops.ndim != 1 or flops.shape != losses.shape:
    raise InputError(
      f"scaling-law fit: flops and losses must be 1-D and of equal length, got shapes "
      f"{flops.shape} and {losses.shape}."
    )
  if not np.all(np.isfinite(flops)) or np.any(flops <= 0):
    raise InputError(
      f"scaling-law fit: training FLOPs must be finite and positive, got {flops.tolist()}."
    )
  if len(np.unique(flops)) < MIN_POINTS:
    raise InputError(
      f"scaling-law fit: {len(np.unique(flops))} distinct compute values; a fit of "
      f"a, b and c with an uncertainty needs at least {MIN_POINTS}. Add model sizes."
    )
  if not np.all(np.isfinite(losses)) or np.any(losses <= 0):
    raise InputError(
      f"scaling-law fit: losses must be finite and positive (cross-entropies), got "
      f"{losses.tolist()} (a diverged run?)."
    )
  return flops, losses


def _model(x, alpha, b, c):
  return np.exp(-b * (x - alpha)) + c


def _initial_guess(x: np.ndarray, losses: np.ndarray) -> tuple[float, float, float]:
  """For trial floors c below the smallest loss, ln(L - c) is linear in x with slope -b: the floor
  whose straight line fits best starts the non-linear solver near the minimum, not in a flat
  valley."""
  best = None
  for c in np.linspace(0, losses.min(), 64, endpoint=False):
    slope, intercept = np.polyfit(x, np.log(losses - c), 1)
    guess = (intercept / -slope if slope < 0 else x.mean(), max(-slope, 1e-4), c)
    error = np.sum((_model(x, *guess) - losses) ** 2)
    if best is None or error < best[0]:
      best = (error, guess)
  return best[1]


def fit(flops, losses) -> Fit:
  """Least-squares fit of L = (f / a)^(-b) + c to (training FLOPs, loss) points, with b > 0 and
  0 <= c <= min(loss) (a cross-entropy floor is non-negative and below every observed loss)."""
  flops, losses = check_points(flops, losses)
  x = np.log(flops)
  guess = _initial_guess(x, losses)
  bounds = ([-np.inf, 0.0, 0.0], [np.inf, np.inf, losses.min()])
  params, cov = optimize.curve_fit(_model, x, losses, p0=guess, bounds=bounds, maxfev=20000)
  alpha, b, c = params
  sigma = np.sqrt(np.diag(cov))
  residuals = _model(x, *params) - losses
  return Fit(
    law=PowerLaw(a=float(np.exp(alpha)), b=float(b), c=float(c)),
    sigma_log_a=float(sigma[0]),
    sigma_b=float(sigma[1]),
    sigma_c=float(sigma[2]),
    rms_residual=float(np.sqrt(np.mean(residuals**2))),
    n_points=len(losses),
    floor_at_bound=bool(np.isclose(c, 0, atol=1e-9) or np.isclose(c, losses.min())),
  )


def fit_pure(flops, losses) -> Fit:
  """L = (f / a)^(-b) with the floor fixed at c = 0: a straight line ln L = -b ln f + b ln a, fitted
  by ordinary least squares, whose 1-sigma errors are the textbook ones (residual variance over
  n - 2 degrees of freedom). The fallback when the three-term fit pins c at its bound."""
  flops, losses = check_points(flops, losses)
  x, y = np.log(flops), np.log(losses)
  design = np.stack([np.ones_like(x), x], axis=1)
  (k, slope), *_ = np.linalg.lstsq(design, y, rcond=None)
  residuals = design @ np.array([k, slope]) - y
  cov = residuals @ residuals / (len(x) - 2) * np.linalg.inv(design.T @ design)
  b, log_a = -slope, k / -slope
  grad = np.array([-1 / slope, k / slope**2])  # d(ln a) / d(k, slope), ln a = -k / slope
  law = PowerLaw(a=float(np.exp(log_a)), b=float(b), c=0.0)
  return Fit(
    law=law,
    sigma_log_a=float(np.sqrt(grad @ cov @ grad)),
    sigma_b=float(np.sqrt(cov[1, 1])),
    sigma_c=0.0,
    rms_residual=float(np.sqrt(np.mean((law(flops) - losses) ** 2))),
    n_points=len(losses),
    floor_at_bound=False,
  )


def bootstrap_b(flops, losses, samples: int = 1000, seed: int = 0) -> np.ndarray:
  """Fitted exponents b over `samples` resamplings of the points with replacement.

  Resamples with fewer than MIN_POINTS distinct points cannot be fitted and are skipped, so fewer
  than `samples` values may come back; with few points that conditioning narrows the spread a bit.
  """
  flops, losses = check_points(flops, losses)
  rng = np.random.default_rng(seed)
  exponents = []
  for _ in range(samples):
    pick = rng.integers(len(flops), size=len(flops))
    if len(np.unique(flops[pick])) >= MIN_POINTS:
      exponents.append(fit(flops[pick], losses[pick]).law.b)
  return np.array(exponents)
