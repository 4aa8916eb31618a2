"""KL-weight schedules at chosen steps, in and out of jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_vaecf.core import schedules


def test_linear_schedule_paper_values():
  s = schedules.linear_schedule(cap=0.2, total_anneal_steps=200_000)
  for step, want in [(0, 0.0), (1, 5e-6), (20_000, 0.1), (40_000, 0.2),
                     (39_999, 0.199995), (10**7, 0.2)]:
    assert float(s(step)) == pytest.approx(want, rel=1e-5, abs=1e-9)
  jitted = jax.jit(s)
  assert float(jitted(jnp.int32(20_000))) == pytest.approx(0.1)


def test_linear_without_warmup_is_the_cap():
  s = schedules.linear_schedule(cap=0.3, total_anneal_steps=0)
  assert float(s(0)) == pytest.approx(0.3)


def test_constant_schedule():
  assert float(schedules.constant_schedule(0.7)(12345)) == pytest.approx(0.7)


def test_cyclical_schedule():
  s = schedules.cyclical_schedule(cycle_steps=100, cap=0.4, ratio=0.5)
  got = np.array([float(s(t)) for t in [0, 25, 50, 75, 99, 100, 125, 250]])
  np.testing.assert_allclose(got, [0, 0.2, 0.4, 0.4, 0.4, 0, 0.2, 0.4], atol=1e-6)
  assert float(jax.jit(s)(jnp.int32(125))) == pytest.approx(0.2)


@pytest.mark.parametrize("make", [
    lambda: schedules.linear_schedule(cap=1.5),
    lambda: schedules.linear_schedule(cap=-0.1),
    lambda: schedules.linear_schedule(total_anneal_steps=-1),
    lambda: schedules.cyclical_schedule(0),
    lambda: schedules.cyclical_schedule(10, ratio=0),
    lambda: schedules.get_schedule("cosine", cap=0.2, total_anneal_steps=10),
])
def test_bad_schedule_arguments(make):
  with pytest.raises(ValueError):
    make()
