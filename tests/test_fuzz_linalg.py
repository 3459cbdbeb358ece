"""Input-policy fuzz test of :mod:`refcurv.linalg` (issue 14): every public callable (and every
public method of a public class), given a valid call with one argument replaced by a malformed
value, returns a finite result or raises a :class:`refcurv.RefcurvError` — and one explicit test
per class of bad input the issue lists for the kernels."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refcurv.errors import (ArgumentTypeError, HyperParameterError, NonFiniteError, NotSPDError,
                            ShapeError)
from refcurv.linalg import (batched, damping, ema, gfim, kronecker, lowrank, quasi_newton, roots, sketch,
                            tensor, woodbury)
from refcurv.testing.fuzz import check_call, fuzz_one, fuzzable, public_callables

MODULES = [batched, woodbury, quasi_newton, damping, roots, lowrank, sketch, tensor, kronecker, ema, gfim]


def _rng(seed=0):
    return np.random.default_rng(seed)


def _spd(n=3, seed=0):
    X = _rng(seed).standard_normal((n, n))
    return X @ X.T + n * np.eye(n)


def _orth(d=4, tau=2, seed=0):
    return np.linalg.qr(_rng(seed).standard_normal((d, tau)))[0]


def _pair(n=3):
    s = np.array([1.0, 0.5, -0.25][:n])
    return s, 2.0 * s + 0.1


def _memory(p=2, n=3):
    S = _rng(1).standard_normal((p, n))
    return S, 2.0 * S + 0.1 * _rng(2).standard_normal((p, n))


def _patches(N=4, d=3, T=2):
    return _rng(3).standard_normal((N, d, T))


def _rowsk():
    return sketch.row_sampling(5, 3, seed=0)


def _gausk():
    return sketch.gaussian(5, 3, seed=0)


def _qng_factors():
    return ema.qng_update_dense((), (), np.array([1.0, -0.5, 0.25]), 0.9)


EXAMPLES = {
    # batched
    "batched.spd_solve_batched": lambda: (batched.spd_solve_batched, (np.stack([_spd(), _spd(seed=1)]), np.ones((2, 3))),
                                          {"name": "A"}),
    "batched.randomized_svd_batched": lambda: (batched.randomized_svd_batched, (_rng().standard_normal((2, 5, 4)), 2),
                                               {"seed": 0, "oversample": 1, "power_iter": 1, "Omega": None}),
    "batched.randomized_svd_batched[Omega]": lambda: (batched.randomized_svd_batched,
                                                      (_rng().standard_normal((2, 5, 4)), 2),
                                                      {"Omega": _rng(1).standard_normal((2, 4, 3)), "oversample": 1}),
    "batched.truncated_svd_batched": lambda: (batched.truncated_svd_batched, (_rng().standard_normal((2, 5, 4)), 2), {}),
    # woodbury
    "woodbury.spd_solve": lambda: (woodbury.spd_solve, (_spd(), np.ones(3)), {"name": "A"}),
    "woodbury.lowrank_solve": lambda: (woodbury.lowrank_solve, (0.5, _orth(), np.ones(4)), {}),
    "woodbury.lowrank_inverse": lambda: (woodbury.lowrank_inverse, (0.5, _orth()), {}),
    "woodbury.gn_solve": lambda: (woodbury.gn_solve, (0.5, _rng().standard_normal((2, 3)), _spd(2), np.ones(3)),
                                  {"scale": 2.0, "symmetric": True}),
    "woodbury.gn_solve[unsym]": lambda: (woodbury.gn_solve, (0.5, _rng().standard_normal((2, 3)), _spd(2), np.ones(3)),
                                         {"symmetric": False}),
    "woodbury.sherman_morrison": lambda: (woodbury.sherman_morrison, (np.linalg.inv(_spd()), np.ones(3)),
                                          {"v": np.array([1.0, 0.0, 0.5])}),
    # quasi_newton
    "quasi_newton.bfgs_update_H": lambda: (quasi_newton.bfgs_update_H, (np.eye(3), *_pair()), {}),
    "quasi_newton.bfgs_update_B": lambda: (quasi_newton.bfgs_update_B, (np.eye(3), *_pair()), {}),
    "quasi_newton.broyden_update_H": lambda: (quasi_newton.broyden_update_H, (np.eye(3), *_pair(), 0.5), {}),
    "quasi_newton.lbfgs_dense": lambda: (quasi_newton.lbfgs_dense, _memory(), {"gamma": 0.5}),
    "quasi_newton.lbfgs_two_loop": lambda: (quasi_newton.lbfgs_two_loop, (*_memory(), np.ones(3)), {"gamma": 0.5}),
    "quasi_newton.lbfgs_compact": lambda: (quasi_newton.lbfgs_compact, _memory(), {"gamma": 0.5}),
    "quasi_newton.lbfgs_compact_apply": lambda: (quasi_newton.lbfgs_compact_apply, (*_memory(), np.ones((3, 2))),
                                                 {"gamma": 0.5}),
    # damping
    "damping.powell_B": lambda: (damping.powell_B, (*_pair(), np.eye(3), 0.2), {}),
    "damping.powell_H": lambda: (damping.powell_H, (*_pair(), np.eye(3), 0.2), {}),
    "damping.powell_H[callable]": lambda: (damping.powell_H, (*_pair(), lambda v: 2.0 * v, 0.2), {}),
    "damping.double_damping": lambda: (damping.double_damping, (*_pair(), np.eye(3), 0.2, 1.0), {}),
    "damping.dp_dlm": lambda: (damping.dp_dlm, (*_pair(), np.eye(3), 0.2, 0.5), {}),
    "damping.dpi_dlm": lambda: (damping.dpi_dlm, (*_pair(), 0.2, 0.5), {}),
    "damping.mu3": lambda: (damping.mu3, (0.2, 0.5), {}),
    # roots
    "roots.inv_root_eigh": lambda: (roots.inv_root_eigh, (_spd(), 4), {}),
    "roots.inv_root_newton": lambda: (roots.inv_root_newton, (_spd(), 4), {"max_iter": 50, "tol": 1e-6}),
    "roots.NewtonReport": lambda: (roots.NewtonReport, (3, 1e-7, True), {}),
    # lowrank
    "lowrank.brand_update": lambda: (lowrank.brand_update, (_orth(), np.array([2.0, 1.0]), np.ones(4)),
                                     {"c": 0.5, "rank": 2}),
    "lowrank.randomized_svd": lambda: (lowrank.randomized_svd, (_rng().standard_normal((5, 4)), 2),
                                       {"oversample": 1, "n_iter": 1, "seed": 0}),
    # sketch
    "sketch.RowSketch": lambda: (sketch.RowSketch, (5, np.array([0, 3, 3]), np.ones(3)), {}),
    "sketch.RowSketch.apply": lambda: (_rowsk().apply, (np.ones((5, 2)),), {}),
    "sketch.RowSketch.apply_right": lambda: (_rowsk().apply_right, (np.ones((2, 5)),), {}),
    "sketch.RowSketch.gram": lambda: (_rowsk().gram, (), {}),
    "sketch.RowSketch.to_dense": lambda: (_rowsk().to_dense, (), {}),
    "sketch.GaussianSketch": lambda: (sketch.GaussianSketch, (_rng().standard_normal((3, 5)),), {}),
    "sketch.GaussianSketch.apply": lambda: (_gausk().apply, (np.ones((5, 2)),), {}),
    "sketch.GaussianSketch.apply_right": lambda: (_gausk().apply_right, (np.ones((2, 5)),), {}),
    "sketch.GaussianSketch.gram": lambda: (_gausk().gram, (), {}),
    "sketch.GaussianSketch.to_dense": lambda: (_gausk().to_dense, (), {}),
    "sketch.leverage_scores": lambda: (sketch.leverage_scores, (_rng().standard_normal((5, 2)),), {}),
    "sketch.inclusion_probabilities": lambda: (sketch.inclusion_probabilities, (np.array([0.5, 0.3, 0.2]), 2), {}),
    "sketch.row_sampling": lambda: (sketch.row_sampling, (5, 3),
                                    {"probs": np.full(5, 0.2), "replace": False, "seed": 0, "scaling": "unbiased"}),
    "sketch.ngplus_sketch": lambda: (sketch.ngplus_sketch, (5, 3), {"seed": 0}),
    "sketch.gaussian": lambda: (sketch.gaussian, (5, 3), {"seed": 0}),
    # tensor
    "tensor.mat": lambda: (tensor.mat, (_patches(), 1), {}),
    "tensor.mode_product": lambda: (tensor.mode_product, (_patches(), np.ones((2, 3)), 1), {}),
    "tensor.contraction": lambda: (tensor.contraction, (_patches(), 2), {}),
    "tensor.kron_apply": lambda: (tensor.kron_apply, ([np.eye(4), np.ones((2, 3)), np.eye(2)], _patches()), {}),
    # kronecker
    "kronecker.split_pi": lambda: (kronecker.split_pi, (_spd(3), _spd(2)), {}),
    "kronecker.damped_split": lambda: (kronecker.damped_split, (_spd(3), _spd(2), 0.1), {"split": "sqrt"}),
    "kronecker.damping_split": lambda: (kronecker.damping_split, (0.1,), {"n_locations": 4}),
    "kronecker.factor_A": lambda: (kronecker.factor_A, (_patches(),), {}),
    "kronecker.mean_patch": lambda: (kronecker.mean_patch, (_patches(),), {}),
    "kronecker.hessian_action": lambda: (kronecker.hessian_action, (_patches(), np.ones(3)), {}),
    "kronecker.hessian_action_pair": lambda: (kronecker.hessian_action_pair, (np.eye(3), np.ones(3), _spd(3), 0.1), {}),
    "kronecker.hessian_action_pair[patches]": lambda: (kronecker.hessian_action_pair,
                                                       (np.eye(3), np.ones(3), _patches(), 0.1), {}),
    "kronecker.normalized_factors": lambda: (kronecker.normalized_factors, ([_spd(3), _spd(2)],), {}),
    "kronecker.add_damping": lambda: (kronecker.add_damping, ([_spd(3), _spd(2)], 0.1), {}),
    "kronecker.damped_factors": lambda: (kronecker.damped_factors, ([_spd(3), _spd(2)], 0.1), {}),
    "kronecker.f_tnt": lambda: (kronecker.f_tnt, ([_spd(3), _spd(2)],), {}),
    "kronecker.mode_marginal": lambda: (kronecker.mode_marginal, (_spd(6), (3, 2), 1), {}),
    # ema
    "ema.ema_matrix": lambda: (ema.ema_matrix, (_rng().standard_normal((2, 3)), 0.9), {"G0": _spd(3)}),
    "ema.qng_beta": lambda: (ema.qng_beta, (0.9, 2.0), {}),
    "ema.qng_factor": lambda: (ema.qng_factor, (np.ones(3), 0.05, 0.9), {}),
    "ema.qng_A": lambda: (ema.qng_A, (*_qng_factors(), 0.9, 3), {}),
    "ema.qng_G": lambda: (ema.qng_G, (*_qng_factors(), 0.9, 3), {}),
    "ema.qng_update_dense": lambda: (ema.qng_update_dense, (*_qng_factors(), np.ones(3), 0.9), {"tau": 2}),
    "ema.qng_solve_dense": lambda: (ema.qng_solve_dense, (*_qng_factors(), np.ones(3), 0.9), {}),
    "ema.ginger_K": lambda: (ema.ginger_K, (np.array([2.0, 1.0]), 0.5), {}),
    "ema.ginger_sigma": lambda: (ema.ginger_sigma, (np.array([0.5, 0.1]), 0.5), {}),
    "ema.ginger_matrix": lambda: (ema.ginger_matrix, (_orth(), np.array([2.0, 1.0]), 0.5), {}),
    "ema.ginger_update_dense": lambda: (ema.ginger_update_dense, (_orth(), np.array([2.0, 1.0]), np.ones(4), 0.9, 0.5),
                                        {}),
    "ema.ginger_solve_dense": lambda: (ema.ginger_solve_dense, (_orth(), np.array([2.0, 1.0]), np.ones(4), 0.5), {}),
    # gfim
    "gfim.sides": lambda: (gfim.sides, ([(2, 3), (4, 3)],), {"side": "auto"}),
    "gfim.orient": lambda: (gfim.orient, ("right", np.ones((2, 3))), {}),
    "gfim.oriented_factors": lambda: (gfim.oriented_factors, ("right", _patches(4, 2, 1), _patches(4, 3, 1)), {}),
    "gfim.mean_gradient": lambda: (gfim.mean_gradient, (_patches(4, 2, 2), _patches(4, 3, 2)), {}),
    "gfim.as_sketch": lambda: (gfim.as_sketch, (_rowsk().to_dense(),), {}),
    "gfim.sketch_rows": lambda: (gfim.sketch_rows, (_patches(4, 5, 2), _rowsk()), {}),
    "gfim.gram_from_factors": lambda: (gfim.gram_from_factors, (_patches(4, 3, 2), _patches(4, 5, 2)),
                                       {"sketch": _rowsk(), "block_size": 2}),
    "gfim.gram_of_matrix": lambda: (gfim.gram_of_matrix, (np.ones((3, 5)),), {"sketch": _gausk(), "block_size": 2}),
    "gfim.momentum_11": lambda: (gfim.momentum_11, (_spd(), _spd(seed=1), 0.9), {}),
    "gfim.minibatch_12": lambda: (gfim.minibatch_12, (None, _spd(), 0.9, 0.1, 1.0), {}),
    "gfim.block_mask": lambda: (gfim.block_mask, (5, 2), {}),
    "gfim.blocks_to_dense": lambda: (gfim.blocks_to_dense, (np.stack([_spd(2), _spd(2, 1)]), 3), {}),
    "gfim.dense_to_blocks": lambda: (gfim.dense_to_blocks, (_spd(3), 2), {}),
    "gfim.lowrank_factor": lambda: (gfim.lowrank_factor, (_patches(4, 3, 2), _patches(4, 5, 2)), {}),
    "gfim.cholesky_factor": lambda: (gfim.cholesky_factor, (_spd(), 0.1), {}),
    "gfim.cholesky_solve": lambda: (gfim.cholesky_solve, (np.linalg.cholesky(_spd()), np.ones((3, 2))), {}),
    "gfim.smw_factor": lambda: (gfim.smw_factor, (_orth(), 0.1), {}),
    "gfim.smw_solve": lambda: (gfim.smw_solve, (_orth(), gfim.smw_factor(_orth(), 0.1), 0.1, np.ones((4, 2))), {}),
    "gfim.ls_factor": lambda: (gfim.ls_factor, (_orth(5, 2), 0.1), {"sketch": _rowsk()}),
    "gfim.ls_solve": lambda: (gfim.ls_solve, (_orth(5, 2), gfim.ls_factor(_orth(5, 2), 0.1, _rowsk()), 0.1,
                                              np.ones((5, 2))), {"sketch": _rowsk()}),
    "gfim.damped_operator": lambda: (gfim.damped_operator, ("left", (2, 3), _spd(2), 0.1), {}),
    "gfim.project_ball": lambda: (gfim.project_ball, (np.ones((3, 2)), 0.5), {"L": _spd()}),
    "gfim.project_ball_dense": lambda: (gfim.project_ball_dense, (np.ones((3, 2)), 0.5, _spd()), {}),
}


def _key(mod, name):
    return f"{mod.__name__.rsplit('.', 1)[-1]}.{name}"


def test_every_public_callable_has_an_example():
    for mod in MODULES:
        for name, obj in public_callables(mod).items():
            assert _key(mod, name) in EXAMPLES, name
            if isinstance(obj, type):
                for meth in vars(obj):
                    if not meth.startswith("_") and callable(getattr(obj, meth)):
                        assert f"{_key(mod, name)}.{meth}" in EXAMPLES, meth


@pytest.mark.parametrize("key", sorted(EXAMPLES))
def test_valid_example_is_accepted(key):
    fn, args, kwargs = EXAMPLES[key]()
    assert check_call(key, fn, args, kwargs) == "accepted"


@pytest.mark.parametrize("key", fuzzable(EXAMPLES))
@given(data=st.data())
def test_malformed_argument_is_refused_clearly(key, data):
    fuzz_one(EXAMPLES, key, data)


# ---------------------------------------------------------------- one test per class of bad input (issue 14)
@pytest.mark.parametrize("value", [None, "1.0", b"x", object(), [0.5], True, 1j])
def test_non_numeric_or_none_scalar_is_refused_before_numpy(value):
    """`_checks.positive` & co. check the type first: no `isfinite` TypeError."""
    with pytest.raises(HyperParameterError, match="lam"):
        woodbury.lowrank_solve(value, _orth(), np.ones(4))
    with pytest.raises(HyperParameterError, match="mu"):
        damping.powell_B(*_pair(), np.eye(3), value)
    with pytest.raises(HyperParameterError, match="c must"):
        lowrank.brand_update(_orth(), np.array([2.0, 1.0]), np.ones(4), c=value)
    with pytest.raises(HyperParameterError, match="alpha"):
        ema.qng_beta(value, 1.0)


@pytest.mark.parametrize("empty", [np.zeros((0, 0)), np.zeros(0), []])
def test_zero_size_matrix_is_refused(empty):
    with pytest.raises(ShapeError, match="A must not be empty"):
        woodbury.spd_solve(empty, np.ones(3))
    with pytest.raises(ShapeError, match="H must not be empty"):
        quasi_newton.bfgs_update_H(empty, *_pair())
    with pytest.raises(ShapeError, match="A must not be empty"):
        roots.inv_root_eigh(empty, 2)


def test_empty_factor_list_is_refused():
    with pytest.raises(ArgumentTypeError, match="factors"):
        kronecker.f_tnt([])
    with pytest.raises(ArgumentTypeError, match="S must be a non-empty list"):
        kronecker.normalized_factors([])


def test_empty_lbfgs_memory_is_still_valid():
    """p = 0 stored pairs (K-BFGS's start) is not a zero-size input: H = γI."""
    S = np.zeros((0, 3))
    np.testing.assert_array_equal(quasi_newton.lbfgs_two_loop(S, S, np.ones(3), gamma=2.0), 2.0 * np.ones(3))


def test_complex_input_is_refused():
    with pytest.raises(ArgumentTypeError, match="A must be a real array, got complex"):
        woodbury.spd_solve(_spd().astype(complex), np.ones(3))
    with pytest.raises(ArgumentTypeError, match="U must be a real array, got complex"):
        sketch.leverage_scores(np.ones((4, 2), dtype=complex))


def test_bool_array_is_refused_and_int_array_converted():
    with pytest.raises(ArgumentTypeError, match="B must be a real array, got dtype bool"):
        woodbury.spd_solve(_spd(), np.ones(3, dtype=bool))
    x = woodbury.spd_solve(np.eye(3, dtype=np.int64) * 2, np.ones(3, dtype=np.int64))  # ints → float64
    assert x.dtype == np.float64 and np.allclose(x, 0.5)


def test_truthy_string_is_refused_where_a_bool_is_meant():
    with pytest.raises(ArgumentTypeError, match="replace"):
        sketch.row_sampling(5, 3, replace="no")
    with pytest.raises(ArgumentTypeError, match="symmetric"):
        woodbury.gn_solve(0.5, np.ones((2, 3)), _spd(2), np.ones(3), symmetric="yes")


def test_overflow_raises_non_finite_error_naming_the_quantity():
    with pytest.raises(NonFiniteError, match="\\(A \\+ u vᵀ\\)⁻¹ is not finite"), np.errstate(all="ignore"):
        woodbury.sherman_morrison(np.full((3, 3), 1e200), np.ones(3))
    with pytest.raises(NonFiniteError, match="λI \\+ UᵀU"), np.errstate(all="ignore"):
        gfim.smw_factor(np.full((3, 2), 1e200), 0.1)
    with pytest.raises(NonFiniteError, match="the factor A"), np.errstate(all="ignore"):
        kronecker.factor_A(np.full((2, 3, 1), 1e200))


def test_brand_update_refuses_a_u_that_is_not_orthonormal():
    U = 2.0 * _orth()
    with pytest.raises(HyperParameterError, match="U must have orthonormal columns"):
        lowrank.brand_update(U, np.array([2.0, 1.0]), np.ones(4))


def test_bfgs_spd_precondition_is_checked_in_debug_mode(monkeypatch):
    """H SPD is the caller's duty (an O(n³) check on an O(n²) update); debug mode checks it."""
    H = np.diag([1.0, -1.0, 1.0])
    quasi_newton.bfgs_update_H(H, *_pair())  # not checked by default
    from refcurv.linalg import _checks
    monkeypatch.setattr(_checks, "DEBUG", True)
    with pytest.raises(NotSPDError, match="H must be symmetric positive definite"):
        quasi_newton.bfgs_update_H(H, *_pair())
    with pytest.raises(NotSPDError, match="B must be symmetric positive definite"):
        quasi_newton.bfgs_update_B(H, *_pair())


def test_sketch_size_above_the_population_is_refused_not_clamped():
    with pytest.raises(HyperParameterError, match="q = 6 exceeds the population n = 5"):
        sketch.row_sampling(5, 6, replace=False)
    with pytest.raises(HyperParameterError, match="q = 3 exceeds the 2 rows"):
        sketch.row_sampling(4, 3, np.array([0.5, 0.5, 0.0, 0.0]), replace=False)
    sk = sketch.row_sampling(4, 2, np.array([0.5, 0.0, 0.5, 0.0]), replace=False, seed=0)  # q = support: all taken
    assert sorted(sk.index) == [0, 2] and np.all(sk.weight == 1.0)


def test_leverage_scores_are_float64_for_float32_input():
    U = _rng().standard_normal((7, 3)).astype(np.float32)
    p = sketch.leverage_scores(U)
    assert p.dtype == np.float64 and abs(p.sum() - 1) <= 1e-15
    sketch.row_sampling(7, 3, p, replace=False, seed=0)  # accepted as is (no float32 Σp ≠ 1)
    np.testing.assert_allclose(sketch.leverage_scores(np.full((2, 2), 1e200)), [0.5, 0.5])  # no overflow


def test_row_sketch_validates_its_fields():
    with pytest.raises(ShapeError, match="index must lie in"):
        sketch.RowSketch(3, np.array([0, 3]), np.ones(2))
    with pytest.raises(ArgumentTypeError, match="index must be"):
        sketch.RowSketch(3, np.array([0.0, 1.0]), np.ones(2))
    with pytest.raises(HyperParameterError, match="n must be a positive int"):
        sketch.RowSketch(True, np.array([0]), np.ones(1))
