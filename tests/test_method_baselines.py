"""The baselines (sgd with heavy-ball / Nesterov momentum, adam) against a literal replay of
torch.optim.SGD / torch.optim.Adam in float64 (skipped without torch), the fast forms against
the independent flat-θ dense forms, and the exact block-diagonal natural gradient against
the GGN blocks (= the exact Fisher for cross-entropy and MSE) solved here."""
import numpy as np
import pytest

import refcurv as rc
from refcurv import curvature as cv
from refcurv.errors import ArgumentTypeError, DrawsError, HyperParameterError, StateError
from refcurv.methods import REGISTRY, Batch, Draws
from refcurv.nn import MSE, CrossEntropy, Linear, Sequential, Tanh
from refcurv.testing.tolerance import forward_tol, residual_tol, tolerance

NET = Sequential([Linear(4, 5), Tanh(), Linear(5, 3)])
STEPS = 6
LR = 0.1


def _batches(n=STEPS, N=8, seed=0, loss=None):
    rng = np.random.default_rng(seed)
    loss = loss or CrossEntropy()
    if isinstance(loss, MSE):
        return [Batch(rng.standard_normal((N, 4)), rng.standard_normal((N, 3)), loss) for _ in range(n)]
    return [Batch(rng.standard_normal((N, 4)), rng.integers(0, 3, N), loss) for _ in range(n)]


def _run(method, batches, dense=False, params=None, lr=LR):
    """Parameters after ``θ ← θ + lr·d`` over ``batches``, and the directions."""
    params = NET.init(0) if params is None else params
    state, dirs = method.init(NET, params), []
    for k, b in enumerate(batches):
        d, state = method.step(state, NET, params, b, rng=k, dense=dense)
        dirs.append(d)
        params = [W + lr * D for W, D in zip(params, d)]
    return params, dirs, state


def _rel(a, b):
    a, b = rc.flatten(a), rc.flatten(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


SGD_CONFIGS = [dict(), dict(momentum=0.9), dict(momentum=0.5, nesterov=True)]
ADAM_CONFIGS = [dict(), dict(damping=1e-3, momentum=0.5, beta=0.9)]


# ------------------------------------------------------------------ torch replay

def _torch_replay(opt_name, hp, batches, lr=LR):
    """The same run with torch.nn / torch.optim in float64 (weights from refcurv's params:
    weight = W[:, :-1], bias = W[:, -1]; CrossEntropyLoss(reduction='mean') = refcurv's CE)."""
    torch = pytest.importorskip("torch")
    params = NET.init(0)
    layers = [torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)]
    model = torch.nn.Sequential(*layers).double()
    with torch.no_grad():
        for lin, W in zip((layers[0], layers[2]), params):
            lin.weight.copy_(torch.from_numpy(W[:, :-1]))
            lin.bias.copy_(torch.from_numpy(W[:, -1]))
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=hp.get("momentum", 0.0),
                              nesterov=hp.get("nesterov", False))
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr, eps=hp.get("damping", 1e-8),
                               betas=(hp.get("momentum", 0.9), hp.get("beta", 0.999)))
    crit = torch.nn.CrossEntropyLoss()
    for b in batches:
        opt.zero_grad()
        crit(model(torch.from_numpy(b.x)), torch.from_numpy(b.y)).backward()
        opt.step()
    return [np.concatenate([lin.weight.detach().numpy(), lin.bias.detach().numpy()[:, None]], axis=1)
            for lin in (layers[0], layers[2])]


@pytest.mark.parametrize("name,hp", [("sgd", h) for h in SGD_CONFIGS] + [("adam", h) for h in ADAM_CONFIGS])
@pytest.mark.parametrize("dense", [False, True], ids=["fast", "dense"])
def test_matches_a_literal_torch_optim_replay(name, hp, dense):
    """Parameters after 6 steps equal torch.optim's in float64. The two differ by the
    rounding of two backprop implementations (O(n·u) per step, relative) carried through
    elementwise updates of condition O(1) and accumulated over the steps:
    tolerance(n_params, cond=STEPS)."""
    batches = _batches()
    want = _torch_replay(name, hp, batches)
    got, _, _ = _run(REGISTRY[name](**hp), batches, dense=dense)
    err, tol = _rel(got, want), tolerance(NET.n_params, cond=STEPS)
    assert err <= tol, f"{name} {hp}: ‖θ − θ_torch‖/‖θ_torch‖ = {err:.2e} > {tol:.2e}"
    # and the run moved: a replay of nothing would pass trivially
    assert _rel(got, NET.init(0)) > 1e-3


# ------------------------------------------------------------------ fast vs dense

@pytest.mark.parametrize("name,hp", [("sgd", h) for h in SGD_CONFIGS] + [("adam", h) for h in ADAM_CONFIGS])
def test_fast_equals_the_flat_dense_replay(name, hp):
    """Elementwise updates: the two forms are the same float64 arithmetic in another layout,
    equal to residual_tol(n) at every step."""
    batches = _batches()
    _, fast, _ = _run(REGISTRY[name](**hp), batches)
    _, dense, _ = _run(REGISTRY[name](**hp), batches, dense=True)
    for k, (a, b) in enumerate(zip(fast, dense)):
        assert _rel(a, b) <= residual_tol(NET.n_params), (name, hp, k)


def test_sgd_formulas_written_out():
    """Heavy ball d = −(μ m + g) with m the previous buffer, Nesterov d = −(g + μ(μ m + g)),
    from the gradients at the parameters of each step (written out here)."""
    batches, mu = _batches(3), 0.8
    for nesterov in (False, True):
        params, m = NET.init(0), None
        state, method = None, REGISTRY["sgd"](momentum=mu, nesterov=nesterov)
        state = method.init(NET, params)
        for k, b in enumerate(batches):
            g = rc.flatten(NET.grad(params, b.x, b.y, b.loss))
            m = g if m is None else mu * m + g
            want = -(g + mu * m) if nesterov else -m
            d, state = method.step(state, NET, params, b, rng=k)
            assert _rel(d, rc.unflatten(want, NET)) <= residual_tol(NET.n_params)
            params = [W + LR * D for W, D in zip(params, d)]


def test_adam_first_step_is_minus_sign_of_the_gradient():
    """Bias correction: at t = 1, m̂ = g and v̂ = g², so d = −g/(|g| + ε) ≈ −sign(g)
    ([Adam] §2: the first step's magnitude is ≈ lr in every coordinate)."""
    b = _batches(1)[0]
    params = NET.init(0)
    g = rc.flatten(NET.grad(params, b.x, b.y, b.loss))
    m = REGISTRY["adam"](damping=1e-12)
    d, _ = m.step(m.init(NET, params), NET, params, b, rng=0)
    want = -g / (np.abs(g) + 1e-12)
    assert _rel(d, rc.unflatten(want, NET)) <= residual_tol(NET.n_params)


def test_bad_hyper_parameters_are_named():
    with pytest.raises(HyperParameterError, match="nesterov=True needs momentum"):
        REGISTRY["sgd"](nesterov=True)
    with pytest.raises(HyperParameterError, match="nesterov"):
        REGISTRY["sgd"](momentum=0.9, nesterov="yes")
    with pytest.raises(HyperParameterError, match="momentum"):
        REGISTRY["sgd"](momentum=1.0)
    with pytest.raises(HyperParameterError, match="damping"):
        REGISTRY["adam"](damping=0.0)
    with pytest.raises(HyperParameterError, match="beta"):
        REGISTRY["adam"](beta=1.0)
    with pytest.raises(HyperParameterError, match="damping"):
        REGISTRY["natural_gradient"](damping=-1.0)
    with pytest.raises(HyperParameterError, match="fisher"):
        REGISTRY["natural_gradient"](fisher="ggn")


def test_curvature_before_a_step_is_a_state_error():
    for name in ("adam", "natural_gradient"):
        m = REGISTRY[name]()
        with pytest.raises(StateError, match="take a step first"):
            m.curvature(m.init(NET, NET.init(0)))
    m = REGISTRY["sgd"]()
    with pytest.raises(ArgumentTypeError, match="needs net"):
        m.curvature(m.init(NET, NET.init(0)))


# ------------------------------------------------------------------ natural gradient

def _ggn_direction(params, b, F_bar, lam, g=None):
    """−(F̄_l + λI)⁻¹ g_l with the solve written here (numpy.linalg.solve per block)."""
    g = NET.grad(params, b.x, b.y, b.loss) if g is None else g
    return [-np.linalg.solve(F + lam * np.eye(F.shape[0]), gl.ravel()).reshape(gl.shape) for F, gl in zip(F_bar, g)]


@pytest.mark.parametrize("loss", [CrossEntropy(), MSE()], ids=["ce", "mse"])
@pytest.mark.parametrize("beta", [0.0, 0.7])
@pytest.mark.parametrize("dense", [False, True], ids=["fast", "dense"])
@pytest.mark.parametrize("mu,form", [(0.0, "heavy_ball"), (0.9, "ema"), (0.5, "heavy_ball")])
def test_natural_gradient_is_the_damped_exact_block_solve(loss, beta, dense, mu, form):
    """With fisher='exact' the blocks are the GGN's (the exact Fisher equals the GGN for
    these losses, thesis §1.2), built here by refcurv.curvature.ggn — another code path
    (the loss Hessian instead of fisher_output) — averaged with β and solved by
    numpy.linalg.solve. Tolerance: forward error of the solve, C·n·eps·κ(F̄_l + λI)."""
    lam = 1e-2
    method = REGISTRY["natural_gradient"](damping=lam, beta=beta, momentum=mu, momentum_form=form)
    params, state, F_bar, m = NET.init(0), None, None, None
    state = method.init(NET, params)
    for k, b in enumerate(_batches(4, loss=loss)):
        F = cv.ggn(NET, params, b.x, b.y, b.loss, blocks=True)
        F_bar = F if F_bar is None else [beta * a + (1 - beta) * c for a, c in zip(F_bar, F)]
        g = NET.grad(params, b.x, b.y, b.loss)
        c = 1.0 if form == "heavy_ball" else 1 - mu
        m = [c * gi for gi in g] if m is None else [mu * a + c * gi for a, gi in zip(m, g)]
        want = _ggn_direction(params, b, F_bar, lam, g=m)
        d, state = method.step(state, NET, params, b, rng=k, dense=dense)
        kappa = max(np.linalg.cond(Fb + lam * np.eye(Fb.shape[0])) for Fb in F_bar)
        assert _rel(d, want) <= forward_tol(NET.n_params, kappa), (k, _rel(d, want))
        params = [W + LR * D for W, D in zip(params, d)]


def test_natural_gradient_mc_consumes_the_labels_and_empirical_uses_data_labels():
    """fisher='mc' with injected labels equals the solve with
    refcurv.curvature.fisher(kind='mc', labels=…); fisher='empirical' with the data labels
    as the injected 'samples' equals the same thing (one label per input)."""
    b = _batches(1)[0]
    params = NET.init(0)
    m = REGISTRY["natural_gradient"](fisher="mc", damping=0.1)
    draws = m.draw(np.random.default_rng(0), m.init(NET, params), NET, params, b)
    assert draws.labels.shape == (1, 8)
    F = cv.fisher(NET, params, b.x, loss=b.loss, kind="mc", labels=draws.labels, blocks=True)
    want = _ggn_direction(params, b, F, 0.1)
    for dense in (False, True):
        d, _ = m.step(m.init(NET, params), NET, params, b, draws=draws, dense=dense)
        kappa = max(np.linalg.cond(Fl + 0.1 * np.eye(Fl.shape[0])) for Fl in F)
        assert _rel(d, want) <= forward_tol(NET.n_params, kappa)
    e = REGISTRY["natural_gradient"](fisher="empirical", damping=0.1)
    d_emp, _ = e.step(e.init(NET, params), NET, params, b, rng=0)
    d_mc, _ = m.step(m.init(NET, params), NET, params, b, draws=Draws(method="natural_gradient", labels=b.y[None]))
    assert _rel(d_emp, d_mc) <= forward_tol(NET.n_params, kappa)
    with pytest.raises(DrawsError, match=r"natural_gradient: draws.labels must have shape"):
        m.step(m.init(NET, params), NET, params, b, draws=Draws(method="natural_gradient", labels=b.y[None, :4]))
    with pytest.raises(DrawsError, match="consumes no labels"):
        e.step(e.init(NET, params), NET, params, b, draws=draws)


def test_natural_gradient_beats_sgd_on_an_ill_conditioned_problem():
    """A sanity property, not a tolerance: on a linear least-squares problem with badly
    scaled inputs, 20 natural-gradient steps at lr = 1 reduce the loss by far more than 20
    SGD steps at the largest stable lr (the natural gradient of a linear MSE model is the
    Gauss-Newton step)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4)) * np.array([10.0, 1.0, 0.1, 0.01])
    y = x @ rng.standard_normal((4, 2))
    net = Sequential([Linear(4, 2)])
    p0 = net.init(0)
    from refcurv.train import train

    _, h_ng = train(REGISTRY["natural_gradient"](damping=1e-8), net, p0, x, y, MSE(), 20, 1.0)
    _, h_sgd = train(REGISTRY["sgd"](), net, p0, x, y, MSE(), 20, 0.009)
    assert h_ng["loss"][-1] < 1e-6 * h_ng["loss"][0]
    assert h_sgd["loss"][-1] > 1e-3 * h_sgd["loss"][0]
