"""The loss-vs-compute power law fit (cgpt_jax/scaling_law.py) and the scaling sweep's points.

The fit must recover a known law from points drawn from it, exactly without noise and within its
own error bars with noise, report larger errors for noisier points, and refuse input it cannot fit.
The sweep's every point must be a valid config that spends 20 tokens per parameter within a step.
"""

import math
import pathlib

import numpy as np
import pytest
from helpers import experiment

from cgpt_jax import presets, scaling_law
from cgpt_jax.errors import InputError
from cgpt_jax.train import setup

scaling = experiment("scaling")

TRUE = scaling_law.PowerLaw(a=3e9, b=0.15, c=1.2)
FLOPS = np.geomspace(5e10, 1e13, 7)  # the sweep's range


def noisy_losses(sigma: float, seed: int = 0) -> np.ndarray:
  return TRUE(FLOPS) + np.random.default_rng(seed).normal(0, sigma, len(FLOPS))


def test_paper_law_is_the_published_one():
  assert scaling_law.PAPER(5.984e22) == pytest.approx(1 + 0.5066)
  assert scaling_law.PAPER(5.984e22 * 2) == pytest.approx(2**-0.0737 + 0.5066)


def test_fit_recovers_a_noiseless_law():
  fit = scaling_law.fit(FLOPS, TRUE(FLOPS))
  assert fit.law.a == pytest.approx(TRUE.a, rel=1e-6)
  assert fit.law.b == pytest.approx(TRUE.b, rel=1e-6)
  assert fit.law.c == pytest.approx(TRUE.c, rel=1e-6)
  assert fit.rms_residual < 1e-9 and fit.sigma_b < 1e-6
  assert not fit.floor_at_bound


def test_points_without_a_floor_are_flagged():
  """Losses falling ever faster with log compute (small models leaving a plateau) have no floor."""
  losses = 3.0 - 0.01 * np.log(FLOPS / FLOPS[0]) ** 2
  assert scaling_law.fit(FLOPS, losses).floor_at_bound


def test_fit_recovers_a_noisy_law_within_its_error_bars():
  fit = scaling_law.fit(FLOPS, noisy_losses(0.005))
  assert abs(fit.law.b - TRUE.b) < 3 * fit.sigma_b
  assert abs(fit.law.c - TRUE.c) < 3 * fit.sigma_c
  assert abs(math.log(fit.law.a / TRUE.a)) < 3 * fit.sigma_log_a
  assert fit.n_points == len(FLOPS)


def test_uncertainty_shrinks_with_less_noise():
  sigmas = [scaling_law.fit(FLOPS, noisy_losses(noise)).sigma_b for noise in (0.02, 0.005, 0.001)]
  assert sigmas[0] > sigmas[1] > sigmas[2]


def test_pure_power_law_fit_recovers_its_coefficients_and_error_bars():
  pure = scaling_law.PowerLaw(a=3e9, b=0.15, c=0.0)
  exact = scaling_law.fit_pure(FLOPS, pure(FLOPS))
  assert exact.law.a == pytest.approx(pure.a, rel=1e-9) and exact.law.b == pytest.approx(0.15)
  assert exact.law.c == 0 and exact.sigma_b < 1e-9
  # Multiplicative noise of 1%: ln L gets N(0, 0.01), so the slope's error is the OLS one,
  # 0.01 / sqrt(sum (x - mean x)^2) up to the sample's own residual variance.
  noise = np.random.default_rng(1).normal(0, 0.01, len(FLOPS))
  fit = scaling_law.fit_pure(FLOPS, pure(FLOPS) * np.exp(noise))
  x = np.log(FLOPS)
  assert fit.sigma_b == pytest.approx(0.01 / np.sqrt(np.sum((x - x.mean()) ** 2)), rel=0.6)
  assert abs(fit.law.b - 0.15) < 3 * fit.sigma_b
  assert abs(math.log(fit.law.a / pure.a)) < 3 * fit.sigma_log_a


def test_bootstrap_spreads_around_the_fit():
  losses = noisy_losses(0.005)
  exponents = scaling_law.bootstrap_b(FLOPS, losses, samples=60)
  assert 30 < len(exponents) <= 60  # resamples with fewer than 4 distinct points are skipped
  low, high = np.percentile(exponents, [16, 84])
  assert low < scaling_law.fit(FLOPS, losses).law.b < high


@pytest.mark.parametrize(
  "flops,losses,message",
  [
    (FLOPS[:3], TRUE(FLOPS[:3]), "at least 4"),
    ([1e10, 1e10, 1e11, 1e12], [3.0, 2.9, 2.5, 2.2], "3 distinct compute values"),
    ([0.0, *FLOPS[1:]], TRUE(FLOPS), "finite and positive"),
    ([-1e10, *FLOPS[1:]], TRUE(FLOPS), "finite and positive"),
    (FLOPS, [np.nan, *TRUE(FLOPS[1:])], "losses must be finite and positive"),
    (FLOPS, [0.0, *TRUE(FLOPS[1:])], "losses must be finite and positive"),
    (FLOPS, TRUE(FLOPS[1:]), "equal length"),
  ],
)
def test_bad_points_are_input_errors(flops, losses, message):
  with pytest.raises(InputError, match=message):
    scaling_law.fit(flops, losses)


def with_overrides(point: dict):
  """The point's config as launch.py would build it: its config_arg, then its overrides."""
  c = scaling.get_config(point.get("config_arg"))
  for key, value in point.items():
    if key not in ("name", "devices", "mode", "config_arg"):
      *parents, leaf = key.split(".")
      node = c
      for parent in parents:
        node = node[parent]
      node[leaf] = value
  return c


def test_sweep_points_spend_the_chinchilla_budget_within_one_epoch(monkeypatch):
  """Each point builds (model parameters counted from its abstract shapes) and trains on
  20 tokens per parameter to within one step, on less than one epoch of the training split."""
  monkeypatch.chdir(pathlib.Path(scaling.__file__).parents[1])  # its data path is relative
  vocab, train_chars = scaling.corpus_chars()
  points = scaling.get_sweep(None)
  assert len(points) >= 5 and len({p["name"] for p in points}) == len(points)
  sizes = []
  for point in points:
    s = setup.build(with_overrides(point), vocab)
    d = s.cfg.data
    tokens_per_step = d.global_batch * d.seq_len
    tokens = s.cfg.train.steps * tokens_per_step
    assert 0 <= tokens - presets.TOKENS_PER_PARAM * s.n_params < tokens_per_step, point["name"]
    assert tokens < train_chars, point["name"]
    assert s.cfg.model.d_model // s.cfg.model.n_heads == scaling.D_HEAD
    assert s.n_params == scaling.params(s.cfg.model.n_layers, s.cfg.model.d_model)
    sizes.append(s.n_params)
  assert sizes == sorted(sizes)
