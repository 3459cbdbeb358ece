"""Curvature operators: the matrix a method preconditions with, as an object to inspect.

In the spirit of SciPy's ``LinearOperator`` and kfac-jax's curvature blocks. Every operator
is a symmetric ``n × n`` matrix acting on vectors in refcurv's order (row-major ``vec`` per
layer, layers concatenated; :func:`refcurv.flatten`) and offers

* ``matvec(v)``   — ``C v`` for ``v`` of shape ``(n,)`` or ``(n, k)``;
* ``solve(v)``    — ``C⁻¹ v`` (Cholesky of the small factors, never an explicit inverse
  unless the operator *stores* an inverse, see :class:`Inverse`);
* ``todense()``   — the ``n × n`` matrix (what a user compares a foreign implementation with);
* ``eigvalsh()``  — the eigenvalues, ascending (from the factors' where the structure allows);
* ``aslinearoperator()`` — a :class:`scipy.sparse.linalg.LinearOperator` (host arrays).

Structures:

==========================  ==============================================================
:class:`ScaledIdentity`     ``c I``
:class:`Dense`              an explicit symmetric matrix ``M``
:class:`Kronecker`          ``F_1 ⊗ F_2 ⊗ ⋯ ⊗ F_k`` on the row-major ``vec̄`` of a tensor of
                            shape ``(dim F_1, …, dim F_k)``. For a layer ``W ∈ R^{out×d}``,
                            ``Kronecker(G, A)`` is the block ``G ⊗ A`` with
                            ``(G ⊗ A) vec(W) = vec(G W Aᵀ)`` (row-major ``vec``; in the papers'
                            column-major ``vec`` the same matrix reads ``A ⊗ G``)
:class:`KroneckerSum`       ``A ⊕ B = A ⊗ I + I ⊗ B`` (row-major, ``A`` acts on rows)
:class:`LowRankPlusIdentity` ``c I + U diag(K) Uᵀ``
:class:`BlockDiagonal`      blocks over disjoint index sets of θ (by default consecutive:
                            one per layer)
:class:`Inverse`            ``B⁻¹`` of an operator ``B`` (methods that store an inverse,
                            e.g. K-BFGS's ``H_g ⊗ H_a``)
==========================  ==============================================================
"""
from __future__ import annotations

import itertools
import math
import warnings
from functools import reduce

import numpy as np

from .backend import eigh, to_numpy, xp_of
from .errors import ArgumentTypeError, HyperParameterError, NonFiniteError, NotSPDError, ShapeError
from .linalg import _checks as C
from .linalg.woodbury import spd_solve

__all__ = ["Operator", "ScaledIdentity", "Diagonal", "Dense", "Kronecker", "KroneckerSum", "LowRankPlusIdentity",
           "BlockDiagonal", "Inverse"]


# ---------------------------------------------------------------- input checks
# (shared with refcurv.curvature; README "input policy": every argument is checked where it
# enters, and bad input raises a RefcurvError whose message names the argument)
def _describe(a):
    """What was given, for an error message: the type, and dtype/shape for arrays."""
    if isinstance(a, type):  # a class such as numpy.float64 has dtype/shape descriptors
        return f"the type {a.__module__}.{a.__qualname__}"
    if hasattr(a, "dtype") and hasattr(a, "shape"):
        return f"{type(a).__name__} of dtype {a.dtype} and shape {tuple(a.shape)}"
    return f"{type(a).__name__} {a!r}" if isinstance(a, (int, float, str, bytes)) else type(a).__name__


def _real_array(a, name):
    """``a`` as a finite real floating array: integer arrays are converted to float64
    (documented); complex (the imaginary part would be dropped), boolean, string and object
    input is refused (:class:`ArgumentTypeError`), NaN/Inf too (:class:`NonFiniteError`)."""
    xp = xp_of(a)
    if isinstance(a, (str, bytes)) or a is None or isinstance(a, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be a real floating array, got {_describe(a)}")
    try:
        arr = xp.asarray(a)
    except (TypeError, ValueError) as e:  # ragged nested lists and the like
        raise ArgumentTypeError(f"{name} must be a real floating array, got {type(a).__name__} ({e})") from None
    if arr.dtype.kind in "iu":
        arr = arr.astype(np.float64)
    elif arr.dtype.kind != "f":
        raise ArgumentTypeError(f"{name} must be a real floating (or integer) array, got {_describe(a)}")
    return C.finite(arr, name)


def _real_number(value, name):
    """A real, finite Python/NumPy number (not a bool, not an array)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise HyperParameterError(f"{name} must be a finite real number, got {_describe(value)}")
    if not np.isfinite(value):  # host: a scalar hyper-parameter, not array data
        raise HyperParameterError(f"{name} must be a finite real number, got {value!r}")
    return value


def _positive(value, name):
    return C.positive(_real_number(value, name), name)


def _finite_result(out, what):
    """Raise :class:`NonFiniteError` naming ``what`` if a result computed from finite,
    checked input is not finite (overflow)."""
    xp = xp_of(out)
    if not bool(xp.isfinite(out).all()):
        raise NonFiniteError(f"{what} is not finite (overflow: the inputs are finite but too large)")
    return out


def _checked_result(f, what):
    def wrapper(self, *args, **kwargs):
        return _finite_result(f(self, *args, **kwargs), f"{type(self).__name__}.{what}")

    wrapper.__name__, wrapper.__qualname__, wrapper.__doc__ = f.__name__, f.__qualname__, f.__doc__
    wrapper._finite_checked = True
    return wrapper


class Operator:
    """Base class: a symmetric ``n × n`` matrix. Subclasses implement ``_matvec``,
    ``_solve``, ``todense`` and may override ``eigvalsh``. ``matvec``, ``solve``,
    ``todense`` and ``eigvalsh`` refuse a non-finite result from finite input
    (:class:`~refcurv.errors.NonFiniteError`, overflow)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for meth in ("todense", "eigvalsh"):
            f = cls.__dict__.get(meth)
            if f is not None and not getattr(f, "_finite_checked", False):
                setattr(cls, meth, _checked_result(f, f"{meth}()"))

    n: int
    dtype = np.float64

    @property
    def shape(self):
        return (self.n, self.n)

    def _rhs(self, v):
        v = _real_array(v, "v")
        if v.ndim not in (1, 2) or v.shape[0] != self.n or v.size == 0:
            raise ShapeError(f"v must have {self.n} rows (shape (n,) or (n, k) with k >= 1), got shape {v.shape}")
        return v

    def matvec(self, v):
        """``C v``."""
        return _finite_result(self._matvec(self._rhs(v)), f"{type(self).__name__}.matvec(v)")

    def solve(self, v):
        """``C⁻¹ v``."""
        return _finite_result(self._solve(self._rhs(v)), f"{type(self).__name__}.solve(v)")

    def todense(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def eigvalsh(self):
        """Eigenvalues, ascending."""
        return xp_of(self.todense()).linalg.eigvalsh(self.todense())

    def inverse(self):
        return Inverse(self)

    def aslinearoperator(self):
        """A SciPy ``LinearOperator`` (host NumPy arrays; symmetric, so ``rmatvec = matvec``)."""
        from scipy.sparse.linalg import LinearOperator

        def mv(v):
            return to_numpy(self.matvec(np.asarray(v, dtype=self.dtype)))  # host: SciPy LinearOperator

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mv, rmatmat=mv, dtype=self.dtype)

    def __repr__(self):
        return f"{type(self).__name__}(n={self.n})"


class ScaledIdentity(Operator):
    """``c I`` (``c > 0``): SGD's curvature is ``I``. ``like``: an array (or list of arrays)
    whose backend :meth:`todense` and :meth:`eigvalsh` use (NumPy when ``None``); matvec and
    solve follow their argument."""

    def __init__(self, n, c=1.0, dtype=np.float64, like=None):
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
            raise ArgumentTypeError(f"n must be an int >= 1, got {_describe(n)}")
        if n < 1:  # ArgumentTypeError since the first release (tests/test_operators.py)
            raise ArgumentTypeError(f"n must be an int >= 1, got {n!r}")
        self.n, self.c, self.dtype = int(n), float(_positive(c, "c")), _float_dtype(dtype)
        self._xp = xp_of(like)

    def _matvec(self, v):
        return self.c * v

    def _solve(self, v):
        return v / self.c

    def todense(self):
        return self.c * self._xp.eye(self.n, dtype=self.dtype)

    def eigvalsh(self):
        return self._xp.full(self.n, self.c, dtype=self.dtype)


class Diagonal(Operator):
    """``diag(d)`` with ``d > 0`` (Adam's ``diag(√v̂) + εI``): ``O(n)`` storage, never an
    ``n × n`` array except in :meth:`todense`."""

    def __init__(self, d, name="d"):
        if not isinstance(name, str):
            raise ArgumentTypeError(f"name must be a str (used in error messages), got {_describe(name)}")
        d = _real_array(d, name)
        if d.ndim != 1 or d.shape[0] == 0:
            raise ShapeError(f"{name} must be a non-empty vector, got shape {tuple(d.shape)}")
        if not bool((d > 0).all()):
            raise NotSPDError(f"{name}: a Diagonal operator needs positive entries (min {float(d.min())!r})")
        self.d, self.n, self.dtype, self.name = d, d.shape[0], d.dtype, name

    def _col(self, v):  # d as a column for (n, k) right-hand sides
        return self.d.reshape((-1,) + (1,) * (v.ndim - 1))

    def _matvec(self, v):
        return self._col(v) * v

    def _solve(self, v):
        return v / self._col(v)

    def todense(self):
        return xp_of(self.d).diag(self.d)

    def eigvalsh(self):
        return xp_of(self.d).sort(self.d)


class Dense(Operator):
    """An explicit symmetric matrix ``M`` (solved by Cholesky, :func:`~refcurv.linalg.woodbury.spd_solve`)."""

    def __init__(self, M, name="M"):
        if not isinstance(name, str):
            raise ArgumentTypeError(f"name must be a str (used in error messages), got {_describe(name)}")
        self.M = _symmetric(M, name)
        self.n, self.dtype, self.name = self.M.shape[0], self.M.dtype, name

    def _matvec(self, v):
        return self.M @ v

    def _solve(self, v):
        return spd_solve(self.M, v, self.name)

    def todense(self):
        return self.M


def _float_dtype(dtype):
    """A NumPy floating dtype (``None``, booleans, integer/complex dtypes and non-dtypes are refused)."""
    if dtype is None or isinstance(dtype, (bool, np.bool_, np.ndarray)):
        raise ArgumentTypeError(f"dtype must be a floating dtype such as numpy.float64, got {_describe(dtype)}")
    try:
        with warnings.catch_warnings():  # deprecated aliases such as 'a' are refused below anyway
            warnings.simplefilter("ignore", DeprecationWarning)
            dt = np.dtype(dtype)
    except (TypeError, ValueError):
        raise ArgumentTypeError(f"dtype must be a floating dtype such as numpy.float64, got {_describe(dtype)}") from None
    if dt.kind != "f":
        raise ArgumentTypeError(f"dtype must be a floating dtype such as numpy.float64, got {dt}")
    return dt


def _symmetric(A, name):
    """A non-empty, square, finite, real, symmetric matrix (:func:`refcurv.linalg._checks.symmetric`)."""
    A = _real_array(A, name)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] == 0:
        raise ShapeError(f"{name} must be a non-empty square matrix, got shape {tuple(A.shape)}")
    return C.symmetric(A, name)


def _factor(F, i):
    return _symmetric(F, f"factor {i}")


class Kronecker(Operator):
    """``F_1 ⊗ ⋯ ⊗ F_k`` applied by mode products (thesis Proposition 1) on the row-major
    ``vec̄`` of a tensor of shape ``(dim F_1, …, dim F_k)``; solved factor by factor."""

    def __init__(self, *factors):
        if not factors:
            raise ArgumentTypeError("Kronecker needs at least one factor")
        self.factors = [_factor(F, i) for i, F in enumerate(factors)]
        self.dims = tuple(F.shape[0] for F in self.factors)
        self.n = math.prod(self.dims)
        self.dtype = np.result_type(*[F.dtype for F in self.factors])

    def _apply(self, v, fs):
        xp = xp_of(v)
        cols = v.reshape(self.n, -1)
        X = cols.T.reshape((cols.shape[1],) + self.dims)  # leading axis: right-hand sides
        for i, f in enumerate(fs):
            X = xp.moveaxis(xp.tensordot(X, f, axes=([i + 1], [1])), -1, i + 1)
        return X.reshape(cols.shape[1], self.n).T.reshape(v.shape)

    def _matvec(self, v):
        # (⊗ F_i) vec̄(X) = vec̄(X ×_1 F_1 ⋯ ×_k F_k): contract mode i with F_i's columns
        return self._apply(v, self.factors)

    def _solve(self, v):
        # (⊗ F_i)⁻¹ = ⊗ F_i⁻¹: one small SPD solve per mode
        xp = xp_of(v)
        cols = v.reshape(self.n, -1)
        X = cols.T.reshape((cols.shape[1],) + self.dims)
        for i, F in enumerate(self.factors):
            Xi = xp.moveaxis(X, i + 1, 0)
            shp = Xi.shape
            Xi = spd_solve(F, Xi.reshape(shp[0], -1), f"factor {i}").reshape(shp)
            X = xp.moveaxis(Xi, 0, i + 1)
        return X.reshape(cols.shape[1], self.n).T.reshape(v.shape)

    def todense(self):
        return reduce(xp_of(self.factors[0]).kron, self.factors)

    def eigvalsh(self):
        xp = xp_of(self.factors[0])
        ev = reduce(lambda a, b: xp.multiply.outer(a, b).ravel(), [xp.linalg.eigvalsh(F) for F in self.factors])
        return xp.sort(ev)


class KroneckerSum(Operator):
    """``A ⊕ B = A ⊗ I + I ⊗ B`` on the row-major ``vec`` of ``X ∈ R^{a×b}``:
    ``(A ⊕ B) vec(X) = vec(A X + X Bᵀ)``. Solved in the eigenbases of ``A`` and ``B``
    (Bartels–Stewart for symmetric factors)."""

    def __init__(self, A, B):
        self.A, self.B = _factor(A, 0), _factor(B, 1)
        self.dims = (self.A.shape[0], self.B.shape[0])
        self.n = self.dims[0] * self.dims[1]
        self.dtype = np.result_type(self.A.dtype, self.B.dtype)

    def _mats(self, v):
        cols = v.reshape(self.n, -1)
        return cols.T.reshape((cols.shape[1],) + self.dims), cols.shape[1]

    def _matvec(self, v):
        X, k = self._mats(v)
        Y = self.A @ X + X @ self.B.T
        return Y.reshape(k, self.n).T.reshape(v.shape)

    def _solve(self, v):
        X, k = self._mats(v)
        wa, Qa = eigh(self.A)
        wb, Qb = eigh(self.B)
        D = wa[:, None] + wb[None, :]
        if float(D.min()) <= 0:
            raise NotSPDError(f"A ⊕ B is not positive definite (smallest eigenvalue {float(D.min()):.3e})")
        Y = Qa @ ((Qa.T @ X @ Qb) / D) @ Qb.T
        return Y.reshape(k, self.n).T.reshape(v.shape)

    def todense(self):
        xp = xp_of(self.A)
        Ia, Ib = xp.eye(self.dims[0], dtype=self.dtype), xp.eye(self.dims[1], dtype=self.dtype)
        return xp.kron(self.A, Ib) + xp.kron(Ia, self.B)

    def eigvalsh(self):
        xp = xp_of(self.A)
        return xp.sort(xp.add.outer(xp.linalg.eigvalsh(self.A), xp.linalg.eigvalsh(self.B)).ravel())


class LowRankPlusIdentity(Operator):
    """``c I + U diag(K) Uᵀ`` (``U`` is ``n × r``, any rank; ``c > 0``; ``K`` may be
    indefinite, e.g. Ginger's negative inverse correction, as long as the sum is SPD).
    With the thin ``U = QR`` and ``R diag(K) Rᵀ = V diag(w) Vᵀ`` (an ``r × r`` problem), the
    operator is ``P diag(c + w) Pᵀ + c (I − PPᵀ)`` with ``P = QV`` — the Woodbury identity in
    the eigenbasis of the small core, which also gives ``eigvalsh`` without forming ``n × n``."""

    def __init__(self, c, U, K):
        self.c = float(_positive(c, "c"))
        self.U = _real_array(U, "U")
        if self.U.ndim != 2 or self.U.shape[0] == 0:
            raise ShapeError(f"U must be a matrix (n, r) with n >= 1, got shape {tuple(self.U.shape)}")
        K = _real_array(K, "K")
        if K.ndim != 1 or K.shape[0] != self.U.shape[1]:
            raise ShapeError(f"K must be a vector of length r = {self.U.shape[1]} (the columns of U), "
                             f"got shape {tuple(K.shape)}")
        self.K = K
        self.n, self.dtype = self.U.shape[0], self.U.dtype

    def _core(self):
        # C I + U K Uᵀ = Q (c I + R K Rᵀ) Qᵀ + c (I − QQᵀ) with U = QR (thin)
        xp = xp_of(self.U)
        Q, R = xp.linalg.qr(self.U)
        w, V = eigh((R * self.K) @ R.T)
        return Q @ V, w

    def _matvec(self, v):
        Kuv = self.K[:, None] * (self.U.T @ v.reshape(self.n, -1))
        return (self.c * v.reshape(self.n, -1) + self.U @ Kuv).reshape(v.shape)

    def _solve(self, v):
        P, w = self._core()
        lam = self.c + w
        if lam.size and float(lam.min()) <= 0:
            raise NotSPDError(f"c I + U diag(K) Uᵀ is not positive definite (eigenvalue {float(lam.min()):.3e})")
        V = v.reshape(self.n, -1)
        Pv = P.T @ V
        # on range(U): eigenvalues c + w; on its complement: c
        X = (V - P @ Pv) / self.c + P @ (Pv / lam[:, None])
        return X.reshape(v.shape)

    def todense(self):
        xp = xp_of(self.U)
        return self.c * xp.eye(self.n, dtype=self.dtype) + (self.U * self.K) @ self.U.T

    def eigvalsh(self):
        xp = xp_of(self.U)
        _, w = self._core()
        rest = xp.full(self.n - w.shape[0], self.c, dtype=self.dtype)
        return xp.sort(xp.concatenate([self.c + w, rest]))


class BlockDiagonal(Operator):
    """Blocks acting on disjoint index sets of θ. ``index=None``: consecutive blocks (one per
    layer for a method's curvature); otherwise ``index[b]`` lists the entries of θ (in
    refcurv's order) that block ``b`` acts on, in the block's own order — e.g. TNT's
    weight tensor and bias tensor of one layer, or Ginger's ``blocks="tensor"``."""

    def __init__(self, blocks, index=None):
        if not isinstance(blocks, (list, tuple)) or not blocks or not all(isinstance(b, Operator) for b in blocks):
            raise ArgumentTypeError(
                f"blocks must be a non-empty list of refcurv.operators.Operator, got {_describe(blocks)}"
                + (f" of {', '.join(sorted({type(b).__name__ for b in blocks}))}"
                   if isinstance(blocks, (list, tuple)) and blocks else ""))
        blocks = list(blocks)
        self.blocks = blocks
        sizes = [b.n for b in blocks]
        self.n = int(sum(sizes))
        if index is None:
            stops = itertools.accumulate(sizes)
            index = [np.arange(s - n, s) for s, n in zip(stops, sizes)]  # host: index metadata
        if not isinstance(index, (list, tuple)):
            raise ArgumentTypeError(f"index must be None or a list of integer index arrays (one per block), "
                                    f"got {_describe(index)}")
        if len(index) != len(blocks):
            raise ShapeError(f"index must give one index array per block ({len(blocks)}), got {len(index)}")
        arrays = []
        for b, (i, blk) in enumerate(zip(index, blocks)):
            if isinstance(i, (str, bytes)) or i is None:
                raise ArgumentTypeError(f"index[{b}] must be an integer index array, got {_describe(i)}")
            try:
                i = to_numpy(i)
            except (TypeError, ValueError):
                raise ArgumentTypeError(f"index[{b}] must be an integer index array, got {_describe(i)}") from None
            if i.dtype.kind not in "iu":
                raise ArgumentTypeError(f"index[{b}] must be an integer index array, got dtype {i.dtype}")
            if i.shape != (blk.n,):
                raise ShapeError(f"index[{b}] must have shape ({blk.n},) (block {b} has n = {blk.n}), got {i.shape}")
            arrays.append(i)
        index = arrays
        allidx = np.concatenate(index)  # host: validating the index metadata, not array data
        if np.sort(allidx).tolist() != list(range(self.n)):  # host: index metadata
            dup = sorted({int(j) for j in allidx if (allidx == j).sum() > 1})[:5]
            bad = sorted({int(j) for j in allidx if not 0 <= j < self.n})[:5]
            raise ShapeError(f"index must partition range({self.n}) (each entry of θ in exactly one block); "
                             f"got duplicates {dup} and out-of-range entries {bad}")
        self.index = index
        self.dtype = np.result_type(*[b.dtype for b in blocks])

    def _on(self, xp):
        """The index arrays on backend ``xp`` (they are kept on the host; moved once per
        backend, so CuPy fancy indexing gets device indices)."""
        if xp is np:
            return self.index
        cache = self.__dict__.setdefault("_index_on", {})
        if xp not in cache:
            cache[xp] = [xp.asarray(i) for i in self.index]
        return cache[xp]

    def _map(self, v, f):
        xp = xp_of(v)
        out = xp.zeros(v.shape, dtype=np.result_type(v.dtype, self.dtype))
        for b, i in zip(self.blocks, self._on(xp)):
            out[i] = f(b, v[i])
        return out

    def _matvec(self, v):
        return self._map(v, lambda b, x: b.matvec(x))

    def _solve(self, v):
        return self._map(v, lambda b, x: b.solve(x))

    def todense(self):
        dense = [b.todense() for b in self.blocks]
        xp = xp_of(dense[0])
        M = xp.zeros((self.n, self.n), dtype=self.dtype)
        for D, i in zip(dense, self._on(xp)):
            M[xp.ix_(i, i)] = D
        return M

    def eigvalsh(self):
        xp = xp_of(self.blocks[0].todense())
        return xp.sort(xp.concatenate([b.eigvalsh() for b in self.blocks]))


class Inverse(Operator):
    """``B⁻¹`` for an operator ``B``: ``matvec`` is ``B.solve`` and ``solve`` is
    ``B.matvec``. For a method that stores the *inverse* curvature ``H`` (K-BFGS's
    ``H_g ⊗ H_a``, Ginger's damped inverse), ``Inverse(H)`` is the curvature itself."""

    def __init__(self, B):
        if not isinstance(B, Operator):
            raise ArgumentTypeError(f"B must be a refcurv.operators.Operator, got {type(B).__name__}")
        self.B, self.n, self.dtype = B, B.n, B.dtype

    def _matvec(self, v):
        return self.B.solve(v)

    def _solve(self, v):
        return self.B.matvec(v)

    def todense(self):
        xp = xp_of(self.B.todense())
        return self.B.solve(xp.eye(self.n, dtype=self.dtype))

    def eigvalsh(self):
        return 1.0 / self.B.eigvalsh()[::-1]
