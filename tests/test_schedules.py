"""lottery.schedules: formulas against numpy, exact end points, AGP == the paper's sparsity form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lottery import schedules


@pytest.mark.parametrize("fraction", [0.2, 0.1, 0.5])
def test_imp_density(fraction):
    for level in range(12):
        ref = np.prod(np.full(level, 1.0 - fraction))  # repeated multiplication, not a power
        assert schedules.imp_density(level, fraction) == pytest.approx(ref, rel=1e-12)
    assert schedules.imp_density(0, fraction) == 1.0
    assert float(jax.jit(schedules.imp_density)(jnp.int32(3), fraction)) == pytest.approx(
        (1 - fraction) ** 3, rel=1e-6)


@pytest.mark.parametrize("density,fraction", [(0.5, 0.2), (0.512, 0.2), (0.01, 0.2), (1.0, 0.2),
                                              (0.107, 0.2), (0.3, 0.5), (0.001, 0.1)])
def test_levels_to_density_is_smallest(density, fraction):
    levels = schedules.levels_to_density(density, fraction)
    # Independent: walk the levels one by one.
    walk, d = 0, 1.0
    while d > density:
        d *= 1.0 - fraction
        walk += 1
    assert levels == walk
    assert (1 - fraction) ** levels <= density
    assert levels == 0 or (1 - fraction) ** (levels - 1) > density


def test_levels_to_density_known_values():
    assert schedules.levels_to_density(1.0) == 0
    assert schedules.levels_to_density(0.8) == 1
    assert schedules.levels_to_density(0.8 ** 3) == 3  # 0.512...: a float boundary
    assert schedules.levels_to_density(0.5) == 4  # 0.8**3 = 0.512 > 0.5 >= 0.8**4
    assert schedules.levels_to_density(0.035) == 16  # 0.8**15 = 0.0352 > 0.035 >= 0.8**16


@pytest.mark.parametrize("density,rounds", [(0.01, 100), (0.2, 7), (0.5, 1), (1.0, 3)])
def test_exponential_and_linear_vs_numpy(density, rounds):
    r = np.arange(1, rounds + 1, dtype=np.float64)
    exp_ref = np.exp(np.log(density) * r / rounds)
    lin_ref = 1.0 - (1.0 - density) * r / rounds
    exp, lin = schedules.exponential(density, rounds), schedules.linear(density, rounds)
    np.testing.assert_allclose(exp, exp_ref, rtol=1e-12)
    np.testing.assert_allclose(lin, lin_ref, rtol=1e-12, atol=1e-15)
    assert exp.shape == lin.shape == (rounds,)
    assert exp[-1] == density and lin[-1] == density  # the end point is exact
    assert np.all(np.diff(exp) <= 0) and np.all(np.diff(lin) <= 0)
    # Traced density: the same values in float32.
    np.testing.assert_allclose(jax.jit(schedules.exponential, static_argnums=1)(
        jnp.float32(density), rounds), exp_ref, rtol=1e-5)
    np.testing.assert_allclose(jax.jit(schedules.linear, static_argnums=1)(
        jnp.float32(density), rounds), lin_ref, rtol=1e-5)


def test_linear_end_point_exact_where_one_minus_is_not():
    assert 1.0 - (1.0 - 0.1) != 0.1  # the naive form misses the end point ...
    assert schedules.linear(0.1, 10)[-1] == 0.1  # ... this one does not


def test_get():
    assert schedules.get("exponential") is schedules.exponential
    assert schedules.get("linear") is schedules.linear
    with pytest.raises(ValueError, match="schedule must be one of 'exponential', 'linear'"):
        schedules.get("cosine")


AGP = dict(final_density=0.1, start_step=100, end_step=1100, initial_density=0.9)


def agp_sparsity_form(t, s_i, s_f, t0, n_dt):
    """Zhu & Gupta's eq. (1), for t0 <= t <= t0 + n * dt, in sparsity."""
    return s_f + (s_i - s_f) * (1.0 - (t - t0) / n_dt) ** 3


def test_agp_equals_paper_sparsity_form_and_is_monotone():
    t = np.arange(0, 1500, 5)
    d = np.asarray([schedules.agp(x, **AGP) for x in t])
    inside = (t >= 100) & (t <= 1100)
    s = agp_sparsity_form(t[inside].astype(np.float64), 1 - 0.9, 1 - 0.1, 100, 1000)
    np.testing.assert_allclose(1.0 - d[inside], s, rtol=1e-12, atol=1e-15)
    assert np.all(d[t <= 100] == 0.9) and np.all(d[t >= 1100] == pytest.approx(0.1))
    assert schedules.agp(1100, **AGP) == 0.1 and schedules.agp(100, **AGP) == 0.9
    assert np.all(np.diff(d) <= 0) and np.any(np.diff(d) < 0)
    # Cubic: most of the pruning happens early (half the time removes 7/8 of the gap).
    assert schedules.agp(600, **AGP) == pytest.approx(0.1 + 0.8 / 8)


def test_agp_traced_step():
    f = jax.jit(lambda t: schedules.agp(t, **AGP))
    for t in [0, 100, 350, 1100, 2000]:
        assert float(f(jnp.int32(t))) == pytest.approx(schedules.agp(t, **AGP), rel=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(start_step=10, end_step=10), "start_step must be < end_step"),
    (dict(start_step=20, end_step=10), "start_step must be < end_step"),
    (dict(final_density=0.0), r"final_density must be in \(0, 1\]"),
    (dict(final_density=1.5), r"final_density must be in \(0, 1\]"),
    (dict(initial_density=0.05), "final_density must be <= initial_density"),
])
def test_agp_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedules.agp(5, **{**AGP, **kwargs})


def test_bad_input():
    for d in [0.0, -0.1, 1.5]:
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            schedules.exponential(d, 10)
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            schedules.linear(d, 10)
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            schedules.levels_to_density(d)
    with pytest.raises(ValueError, match="rounds must be"):
        schedules.exponential(0.1, 0)
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\)"):
        schedules.imp_density(2, 1.0)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
        schedules.levels_to_density(0.5, 0.0)
