"""The conformance harness itself: reports, saving and replaying failures, the reproducer,
one-line errors for malformed impl results and arguments, and each declared convention end to
end against an implementation written here in that convention."""
import numpy as np
import pytest

from refcurv import curvature as cv
from refcurv.errors import RefcurvError
from refcurv.testing import (Conventions, ConventionsError, ImplementationError, Report, assert_conforms,
                             check_implementation, load_case, run_case)
from test_harness_mistakes import (TORCH, np_kfac_factors, np_per_sample_grads, torch_psg)


def psg(case):
    return cv.per_sample_grads(case.net, case.params, case.x, case.y, case.loss)


def half_ggn(case):
    return cv.ggn(case.net, case.params, case.x, case.y, case.loss) / 2


# ---------------------------------------------------------------------- reports
def test_report_of_a_passing_check():
    r = check_implementation("per_sample_grads", psg, max_examples=8)
    assert isinstance(r, Report) and r.ok and bool(r) and len(r.cases) == 8
    assert r.failure is None and r.saved is None and r.reproducer is None
    assert "PASS" in str(r) and "worst case" in str(r)
    assert all(c.ok and c.verdicts["per_sample_grads"].dtype == "float64" for c in r.cases)
    assert {c.description.split(" | ")[2] for c in r.cases} <= {"loss mse", "loss cross_entropy", "loss bce"}


def test_failure_is_shrunk_saved_and_replayed(tmp_path):
    r = check_implementation("ggn", half_ggn, save_dir=tmp_path, max_examples=10)
    assert not r.ok and r.failure is not None
    # shrunk: hypothesis' minimal network (one Linear layer of width 1) and batch (N = 2)
    assert r.failure.description.startswith("Linear(1→1") and "N = 2" in r.failure.description
    assert r.failure.verdicts["ggn"].error == pytest.approx(0.5)
    path = tmp_path / "ggn-failure.npz"
    assert str(r.saved) == str(path)
    with np.load(path, allow_pickle=False) as z:  # plain arrays and a JSON string
        assert {"x", "y", "params_0", "meta"} <= set(z.files)
    case = load_case(path)
    np.testing.assert_array_equal(case.x, r.failure.case.x)
    again = run_case(case, half_ggn)
    assert not again.ok and again.verdicts["ggn"].error == pytest.approx(0.5)
    assert run_case(case, lambda c: 2 * half_ggn(c)).ok
    # the reproducer snippet runs as printed
    ns = {"impl": half_ggn}
    exec(r.reproducer, ns)
    assert str(path) in r.reproducer and r.reproducer in str(r)


def test_failure_without_save_dir_says_how_to_save():
    r = check_implementation("ggn", half_ggn, max_examples=3)
    assert not r.ok and r.saved is None and "save_dir" in r.reproducer


def test_assert_conforms():
    assert assert_conforms("grad", lambda c: cv.grad(c.net, c.params, c.x, c.y, c.loss), max_examples=5).ok
    with pytest.raises(AssertionError, match="failing case: Linear"):
        assert_conforms("ggn", half_ggn, max_examples=5)


def test_method_report_names_the_step():
    from test_harness_mistakes import KFAC_HYPER, np_kfac
    r = check_implementation("kfac", np_kfac("stale"), nets="mlp", hyper=KFAC_HYPER,
                             conventions=Conventions(damping="exact"), max_examples=5)
    assert not r.ok
    assert not r.failure.verdicts["step 2 direction"].ok
    assert r.failure.verdicts["step 0 direction"].ok and r.failure.verdicts["step 1 direction"].ok


# ---------------------------------------------------------------------- malformed impl results
def _f32(case):
    return psg(case).astype(np.float32)


@pytest.mark.parametrize("target, impl, words", [
    ("per_sample_grads", lambda c: None, "None"),
    ("per_sample_grads", lambda c: psg(c)[:, :-1], "expected shape"),
    ("per_sample_grads", _f32, "dtype float32"),
    ("per_sample_grads", lambda c: "grads", "real array"),
    ("ggn", lambda c: np.zeros((2, 3)), "expected"),
    ("blocks", lambda c: [np.eye(1)] * 7, "list of"),
    ("kfac_factors", lambda c: [np.eye(2) for _ in c.net.param_shapes], "pair (A, G)"),
    ("kfac", lambda c: [c.params], "list of 3 per-step results"),
])
def test_impl_with_a_malformed_result_one_line(target, impl, words):
    with pytest.raises(ImplementationError) as e:
        check_implementation(target, impl, max_examples=3, nets="mlp")
    assert words in str(e.value) and "\n" not in str(e.value)


def test_float32_declared_but_float64_returned():
    with pytest.raises(ImplementationError, match="declared dtype float32"):
        check_implementation("per_sample_grads", psg, dtype=np.float32, max_examples=2)


@pytest.mark.parametrize("kw, err, words", [
    (dict(target="hessians"), RefcurvError, "target must be one of"),
    (dict(impl=3), RefcurvError, "impl"),
    (dict(conventions={"order": "torch"}), ConventionsError, "Conventions"),
    (dict(conventions=Conventions(bias="separate")), ConventionsError, "no bias split"),
    (dict(target="kfac", conventions=Conventions(conv="backpack")), ConventionsError, "backpack"),
    (dict(target="kfac", hyper={"conv": "reduce"}), ConventionsError, "contradicts"),
    (dict(target="seng", conventions=Conventions(damping="exact")), ConventionsError, "damping"),
    (dict(target="seng", conventions=Conventions(loss_scale=2.0)), ConventionsError, "loss_scale"),
    (dict(max_examples=0), RefcurvError, "max_examples"),
    (dict(nets=("rnn",)), RefcurvError, "nets"),
    (dict(losses=()), RefcurvError, "losses"),
    (dict(dtype=np.int64), RefcurvError, "dtype"),
    (dict(hyper={"fisher": "ggn"}), RefcurvError, "hyper fisher"),
    (dict(hyper={"n_samples": 0}), RefcurvError, "n_samples"),
    (dict(hyper={"damping": 1.0}), RefcurvError, "takes"),
    (dict(target="kfac", hyper={"dampnig": 1.0}), RefcurvError, "dampnig"),
    (dict(target="kfac", hyper={"damping": -1.0}), RefcurvError, "damping"),
    (dict(seed=-1), RefcurvError, "seed"),
])
def test_bad_arguments_one_line(kw, err, words):
    args = dict(target="per_sample_grads", impl=psg, max_examples=2)
    args.update(kw)
    target, impl = args.pop("target"), args.pop("impl")
    with pytest.raises(err) as e:
        check_implementation(target, impl, **args)
    assert words in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------- conventions end to end
def test_column_major_per_layer_matrices():
    """A user whose per-sample gradient of layer l is the matrix g aᵀ vectorized column-major."""
    def impl(case):
        U = np_per_sample_grads(case.spec, case.params, case.x, case.y, case.loss_name)
        out, start = [], 0
        for o, d in case.net.param_shapes:
            out.append(U[:, start:start + o * d].reshape(-1, o, d).transpose(0, 2, 1).reshape(len(U), -1))
            start += o * d
        return np.concatenate(out, 1)
    assert check_implementation("per_sample_grads", impl, conventions=Conventions(order="column_major"),
                                nets="mlp").ok
    assert not check_implementation("per_sample_grads", impl, nets="mlp").ok


def test_separate_bias_kfac_factors_and_blocks():
    """curvlinops' separate_weight_and_bias: (A_ww, G) for the weight, (1, G) for the bias."""
    def factors(case):
        out = []
        for (A, G), m in zip(np_kfac_factors(case.spec, case.params, case.x, case.y, case.loss_name),
                             case.net.layers_trainable):
            out += [(A[:-1, :-1], G), (np.ones((1, 1)), G)] if m.bias else [(A, G)]
        return out

    sep = Conventions(bias="separate")
    assert check_implementation("kfac_factors", factors, conventions=sep, nets="mlp").ok
    with pytest.raises(ImplementationError, match="pairs"):  # joint layout expects one pair per layer
        r = check_implementation("kfac_factors", factors, nets="mlp", max_examples=30)
        assert r.ok  # only reached if hypothesis drew no biased layer

    def blocks(case):
        M = cv.ggn(case.net, case.params, case.x, case.y, case.loss)
        out, start = [], 0
        for (o, d), m in zip(case.net.param_shapes, case.net.layers_trainable):
            idx = np.arange(start, start + o * d).reshape(o, d)
            parts = [idx[:, :-1].ravel(), idx[:, -1]] if m.bias else [idx.ravel()]
            out += [M[np.ix_(i, i)] for i in parts]
            start += o * d
        return out
    assert check_implementation("blocks", blocks, conventions=sep).ok


def torch_ggn(case):
    """GGN of PyTorch's objective (mean loss) in parameters() order: Jᵀ ∇²_f L J by torch.func."""
    import torch
    from torch.func import functional_call, hessian, jacrev
    mod, lossf = case.module, case.torch_loss()
    names = [k for k, _ in mod.named_parameters()]
    shapes = [p.shape for _, p in mod.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in mod.named_parameters()])
    x, y = case.tensors(case.x, case.y)

    def f(t):
        ps, i = {}, 0
        for k, s in zip(names, shapes):
            ps[k] = t[i:i + s.numel()].reshape(s)
            i += s.numel()
        return functional_call(mod, ps, (x,))

    J = jacrev(f)(theta).reshape(-1, theta.numel())  # (N·C, n)
    out = f(theta).detach()
    H = hessian(lambda o: lossf(o.reshape(out.shape), y))(out.reshape(-1))
    return J.T @ H @ J


def test_torch_loss_scales_ggn_and_empirical_fisher():
    pytest.importorskip("torch")
    for reduction in ("mean", "sum"):
        conv = Conventions(order="torch", loss_scale="torch", reduction=reduction)
        assert check_implementation("ggn", torch_ggn, conventions=conv, max_examples=10).ok

    def ef(case):  # c Σ_n g_n g_nᵀ with L = c Σ_n ℓ_n; mean: c = 1/N
        import torch
        U = torch.cat([g.reshape(case.N, -1) for g in torch_psg(case)], 1)
        return U.T @ U / case.N
    assert check_implementation("empirical_fisher", ef, conventions=TORCH, max_examples=10).ok
    # undeclared: refcurv's defaults (loss_scale 1) do not match PyTorch's MSE or BCE
    assert not check_implementation("ggn", torch_ggn, conventions=Conventions(order="torch"),
                                    losses=("mse", "bce"), max_examples=10).ok


def np_kfac_damped(damping, scale=1.0):
    """KFAC with damping placed as declared and the loss scaled by ``scale`` (``L = s·Ψ``):
    factors (Ω, sΓ) (MLP, T = 1), rhs the scaled gradient; refresh every step, β = 1/2."""
    def impl(case):
        lam, beta = case.hyper["damping"], case.hyper["beta"]
        stats, out = None, []
        for st in case.steps:
            new = [(A, scale * G) for A, G in np_kfac_factors(case.spec, st.params, st.x, st.y, case.loss_name)]
            stats = new if stats is None else [(beta * A + (1 - beta) * An, beta * G + (1 - beta) * Gn)
                                               for (A, G), (An, Gn) in zip(stats, new)]
            g = scale * np_per_sample_grads(case.spec, st.params, st.x, st.y, case.loss_name).mean(0)
            d, start, Cs = [], 0, []
            for A, G in stats:
                if damping == "method":  # thesis Alg. 12 line 19: π = √((tr Ω/dim Ω)/(tr Γ/dim Γ))
                    pi = np.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G)))
                    C = np.kron(G + np.sqrt(lam) / pi * np.eye(len(G)), A + pi * np.sqrt(lam) * np.eye(len(A)))
                elif damping == "sqrt":
                    C = np.kron(G + np.sqrt(lam) * np.eye(len(G)), A + np.sqrt(lam) * np.eye(len(A)))
                else:
                    C = np.kron(G, A) + lam * np.eye(len(G) * len(A))
                d.append(-np.linalg.solve(C, g[start:start + len(C)]))
                Cs.append(C)
                start += len(C)
            from scipy.linalg import block_diag
            out.append((np.concatenate(d), block_diag(*Cs)))
        return out
    return impl


@pytest.mark.parametrize("damping", ["method", "sqrt", "exact"])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_kfac_damping_placement_and_loss_scale(damping, scale):
    hyper = dict(fisher="exact", beta=0.5, momentum=0.0)
    conv = Conventions(damping=damping, loss_scale=scale)
    r = check_implementation("kfac", np_kfac_damped(damping, scale), conventions=conv, hyper=hyper, nets="mlp",
                             max_examples=10)
    assert r.ok, str(r)
    assert any("curvature" in k for k in r.cases[0].verdicts)
    other = {"method": "exact", "sqrt": "exact", "exact": "sqrt"}[damping]
    assert not check_implementation("kfac", np_kfac_damped(other, scale), conventions=conv, hyper=hyper,
                                    nets="mlp", max_examples=10).ok


def test_sign_preconditioned_gradient():
    from test_harness_mistakes import KFAC_HYPER, np_kfac
    conv = Conventions(damping="exact", sign="preconditioned_gradient")
    assert check_implementation("kfac", np_kfac("sign"), conventions=conv, hyper=KFAC_HYPER, nets="mlp",
                                max_examples=5).ok
    assert not check_implementation("kfac", np_kfac(), conventions=conv, hyper=KFAC_HYPER, nets="mlp",
                                    max_examples=5).ok


def test_case_draws_make_mc_methods_exact():
    """KFAC with sampled labels: an implementation that consumes the step's draws matches
    refcurv exactly; the case carries them as arrays."""
    from refcurv.methods import REGISTRY, Batch

    def impl(case):
        m = REGISTRY["kfac"](**case.hyper)
        state, out = m.init(case.net, case.params), []
        for st in case.steps:
            assert isinstance(st.labels, np.ndarray) and st.labels.shape[:2] == (2, case.N)
            d, state = m.step(state, case.net, st.params, Batch(st.x, st.y, case.loss), draws=st.draws)
            out.append({"direction": d, "curvature": m.curvature(state).todense()})
        return out
    assert check_implementation("kfac", impl, hyper=dict(fisher="mc", n_samples=2), max_examples=8).ok


def test_gram():
    def gram(case):
        U = np_per_sample_grads(case.spec, case.params, case.x, case.y, case.loss_name)
        return U @ U.T
    assert check_implementation("gram", gram, nets="mlp").ok


# ---------------------------------------------------------------------- input policy (fuzz)
from refcurv.testing.fuzz import MALFORMED, check_call, corrupt, positions  # noqa: E402


def _grad_impl(case):
    return cv.grad(case.net, case.params, case.x, case.y, case.loss)


FUZZ = {
    "compare": lambda: (compare_fn(), (np.ones(3), np.ones(3)), dict(dtype=np.float64, n=3, cond=1.0, kind="forward")),
    "Conventions": lambda: (Conventions, (), dict(Conventions().asdict())),
    "Conventions.from_dict": lambda: (Conventions.from_dict, (Conventions().asdict(),), {}),
    "Conventions.scales": lambda: (Conventions().scales, ("mse", 3, 4), {}),
    "Conventions.check_quantity": lambda: (Conventions().check_quantity, ("grad",), {}),
    "check_implementation": lambda: (check_implementation, ("grad", _grad_impl),
                                     dict(conventions=Conventions(), dtype=np.float64, max_examples=1, steps=1,
                                          hyper=None, nets=("mlp",), losses=("mse",), seed=0, save_dir=None)),
}


def compare_fn():
    from refcurv.testing import compare
    return compare


@pytest.mark.parametrize("key", sorted(FUZZ))
def test_malformed_arguments_are_refused_in_one_line(key):
    fn, args, kwargs = FUZZ[key]()
    assert check_call(key, fn, args, kwargs) == "accepted"
    for pos in positions(args, kwargs):
        for name, value in MALFORMED.items():
            a, k = corrupt(args, kwargs, pos, value)
            check_call(key, fn, a, k, f"{pos}={name}")


def test_float32_method_steps():
    """refcurv's own KFAC fast form run in float32 (its fast forms run in the input dtype) is
    judged at float32 tolerance against the float64 dense form, on parameters rounded to float32
    at every step."""
    from refcurv.methods import REGISTRY, Batch

    def impl(case):
        m = REGISTRY["kfac"](**case.hyper)
        state, out = m.init(case.net, case.params), []
        for st in case.steps:
            assert all(W.dtype == np.float32 for W in st.params) and st.x.dtype == np.float32
            d, state = m.step(state, case.net, st.params, Batch(st.x, st.y, case.loss), draws=st.draws)
            out.append(d)
        return out
    r = check_implementation("kfac", impl, dtype=np.float32, hyper=dict(fisher="exact"), max_examples=10)
    assert r.ok, str(r)
    assert all(v.dtype == "float32" for c in r.cases for v in c.verdicts.values())
