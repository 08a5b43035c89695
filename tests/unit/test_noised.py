"""Garcin et al. noised top-k hinge: pytopk's law (draw for draw on the dense path, in distribution on the
lazy CPU sampler), exact expectations on small n, robustness."""
from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.stats import binom, binomtest, kstest, norm, truncnorm

import losses  # noqa: F401  (registers the losses)
from harness import LOSSES, build_loss
from harness.registry import RegistryError
from losses.noised import noised_kth
from losses.noised_sampler import sample_kth


def _data(seed: int, b: int, n: int, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(b, n, generator=gen) * scale
    return s, torch.randint(0, n, (b,), generator=gen)


def _pytopk(imbalanced: bool, k: int, eps: float, ns: int, **kw):  # type: ignore[no-untyped-def]
    pytopk = pytest.importorskip("pytopk")
    if imbalanced:
        return pytopk.ImbalNoisedTopK(k=k, epsilon=eps, n_sample=ns, max_m=kw["max_m"], scale=kw["scale"],
                                      cls_num_list=kw["counts"])
    return pytopk.BalNoisedTopK(k=k, epsilon=eps, n_sample=ns)


def _value_and_grad(fn, s: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:  # type: ignore[no-untyped-def]
    x = s.clone().requires_grad_(True)
    out = fn(x, y)
    out.backward()
    return out.item(), x.grad


def test_entry_runs_without_pytopk(monkeypatch) -> None:
    entry = LOSSES.get("noised_topk")
    assert entry.requires == ()
    monkeypatch.setitem(sys.modules, "pytopk", None)  # `import pytopk` now fails
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pytopk" else real(name, *a))
    assert entry.unavailable_reason is None
    s, y = _data(0, 8, 10)
    assert torch.isfinite(build_loss("noised_topk", 10, k=2)(s, y))


CONFIGS = [
    (False, dict(k=5, epsilon=1.0, n_sample=5)),
    (False, dict(k=1, epsilon=0.3, n_sample=3)),
    (False, dict(k=3, epsilon=2.0, n_sample=1)),
    (True, dict(k=2, epsilon=0.5, n_sample=7, max_m=0.3, scale=2.0)),
]


@pytest.mark.parametrize(("imbalanced", "params"), CONFIGS)
def test_dense_path_is_pytopk_draw_for_draw(imbalanced: bool, params: dict) -> None:
    """The dense computation (used on CUDA) reproduces pytopk's loss and gradient under the same seed."""
    n = 20
    s, y = _data(1, 32, n)
    counts = list(range(1, n + 1))
    kw = dict(counts=counts, max_m=params.get("max_m"), scale=params.get("scale"))
    ref = _pytopk(imbalanced, params["k"], params["epsilon"], params["n_sample"], **kw)
    extra = {"imbalanced": True, "class_counts": counts} if imbalanced else {}
    ours = build_loss("noised_topk", n, **params, **extra)
    ours.dense = True
    torch.manual_seed(123)
    v_ours, g_ours = _value_and_grad(ours, s, y)
    torch.manual_seed(123)
    v_ref, g_ref = _value_and_grad(ref, s, y)
    assert v_ours == pytest.approx(v_ref, rel=1e-6, abs=1e-7)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("params", [dict(k=2, epsilon=0.5, n_sample=3),
                                    dict(k=1, imbalanced=True, max_m=0.4, scale=3.0, class_counts=[5, 1, 9, 2, 7, 3])])
def test_bench_reference_row_is_pytopk(params: dict) -> None:
    """bench-loss's `ref:pytopk` row is the package with our parameters (same draws as our dense path)."""
    pytest.importorskip("pytopk")
    from harness.lossbench import reference_impls

    (impl,) = reference_impls("noised_topk", params, 6, {})
    assert impl.label == "ref:pytopk" and impl.unavailable is None
    ref = impl.build(torch.device("cpu"))
    ours = build_loss("noised_topk", 6, **params)
    ours.dense = True
    s, y = _data(6, 16, 6)
    torch.manual_seed(3)
    a = ours(s, y)
    torch.manual_seed(3)
    assert ref(s, y).item() == pytest.approx(a.item(), rel=1e-6)


def _z_max(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |difference of means| / standard error over the trailing entries of two [R, ...] samples."""
    se = np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b))
    diff = np.abs(a.mean(0) - b.mean(0))
    ok = se > 0
    assert np.all(diff[~ok] < 1e-9), "an entry that never varies differs"
    return float((diff[ok] / se[ok]).max()) if ok.any() else 0.0


@pytest.mark.parametrize(("imbalanced", "params"), CONFIGS)
@pytest.mark.parametrize(("n", "scale"), [(20, 2.0), (300, 3.0), (300, 30.0)])
def test_lazy_sampler_matches_pytopk_in_distribution(imbalanced: bool, params: dict, n: int, scale: float) -> None:
    """Mean loss and mean gradient over many calls equal pytopk's within Monte-Carlo error (4.5 SE, the
    gradient entries taken together with a Bonferroni-sized bound)."""
    base, y0 = _data(2, 4, n, scale)
    reps = 60 if n == 20 else 8
    s, y = base.repeat(reps, 1), y0.repeat(reps)
    counts = [1 + (7 * i) % 50 for i in range(n)]
    kw = dict(counts=counts, max_m=params.get("max_m"), scale=params.get("scale"))
    ref = _pytopk(imbalanced, params["k"], params["epsilon"], params["n_sample"], **kw)
    extra = {"imbalanced": True, "class_counts": counts} if imbalanced else {}
    ours = build_loss("noised_topk", n, **params, **extra)
    torch.manual_seed(0)
    samples = {}
    for name, fn in (("ours", ours), ("ref", ref)):
        vals, grads = [], []
        for _ in range(60):
            v, g = _value_and_grad(fn, s, y)
            vals.append(v)
            grads.append(g.reshape(reps, 4, n).mean(0).numpy())
        samples[name] = (np.array(vals), np.array(grads))
    assert _z_max(samples["ours"][0], samples["ref"][0]) < 4.5
    bound = norm.isf(0.0005 / (4 * n))  # family-wise error 1e-3 over the 4n gradient entries
    assert _z_max(samples["ours"][1].reshape(60, -1), samples["ref"][1].reshape(60, -1)) < bound


def _exact_kth(s: np.ndarray, k1: int, eps: float) -> tuple[float, np.ndarray]:
    """E[(s + εZ)_[k1]] and P(entry i is the k1-th largest), by quadrature over the threshold t with the
    exact Poisson-binomial count of the other entries above t."""
    n = len(s)

    def above_probs(t: float) -> np.ndarray:
        return norm.sf((t - s) / eps)

    def count_dist(p: np.ndarray) -> np.ndarray:  # P(exactly c of the entries exceed), c = 0..len(p)
        dist = np.zeros(len(p) + 1)
        dist[0] = 1.0
        for pi in p:
            dist[1:] = dist[1:] * (1 - pi) + dist[:-1] * pi
            dist[0] *= 1 - pi
        return dist

    lo, hi = s.min() - 12 * eps, s.max() + 12 * eps
    pts = sorted(set(np.concatenate([s - 3 * eps, s, s + 3 * eps])))

    def tail(t: float) -> float:  # P(k1-th largest > t) = P(at least k1 exceed t)
        return float(count_dist(above_probs(t))[k1:].sum())

    # E[X] = lo + ∫_lo^hi P(X > t) dt (X lies in [lo, hi] up to 1e-30)
    mean = lo + integrate.quad(tail, lo, hi, points=pts, limit=400, epsabs=1e-12)[0]
    probs = np.empty(n)
    for i in range(n):
        others = np.delete(s, i)

        def dens(t: float, i: int = i, others: np.ndarray = others) -> float:
            return norm.pdf((t - s[i]) / eps) / eps * count_dist(norm.sf((t - others) / eps))[k1 - 1]

        # entry i's density lives within 12ε of s_i
        probs[i] = integrate.quad(dens, s[i] - 12 * eps, s[i] + 12 * eps, points=[s[i]], limit=400,
                                  epsabs=1e-13)[0]
    return mean, probs


@pytest.mark.parametrize(("n", "k1", "eps", "scale"), [
    (2, 2, 1.0, 1.0), (6, 3, 0.7, 1.0), (6, 1, 1.0, 30.0), (30, 3, 1.0, 1.0), (30, 6, 0.05, 3.0),
    (40, 40, 0.5, 1.0), (25, 4, 1e-3, 300.0),
])
def test_lazy_sampler_exact_expectation(n: int, k1: int, eps: float, scale: float) -> None:
    """Sample mean of the k1-th largest and the frequency of each position agree with their exact values
    (quadrature) within Monte-Carlo error; covers the dense mode (k1 = n), the rare fallback (n = 30, few
    expected exceedances), coarse buckets (a range of 1e5 ε) and float32 input."""
    rng = np.random.default_rng(n * 100 + k1)
    s = rng.standard_normal(n) * scale
    draws = 100_000
    vals, pos = sample_kth(s[None, :].astype(np.float64), k1, eps, draws, seed=n + k1)
    mean, probs = _exact_kth(s, k1, eps)
    se = vals.std() / math.sqrt(draws)
    assert abs(vals.mean() - mean) < 4.5 * se + 1e-9
    counts = np.bincount(pos[0], minlength=n)
    # exact binomial test per entry (rare entries are far from normal), family-wise level 1e-3
    pvals = [binomtest(int(c), draws, min(max(p, 0.0), 1.0)).pvalue for c, p in zip(counts, probs)]
    assert min(pvals) > 1e-3 / n
    if n == 2:  # closed form of E[min(X1, X2)] too
        th = eps * math.sqrt(2)
        d = (s[1] - s[0]) / th
        closed = s[0] * norm.cdf(d) + s[1] * norm.cdf(-d) - th * norm.pdf(d)
        assert mean == pytest.approx(closed, abs=1e-9)


def test_lazy_sampler_far_entries_exact() -> None:
    """Many entries far below the threshold (the shared far walk) still reach the top with their exact
    probability: 15 entries at 0 and 20,000 at −3.5 (ε = 1), k1 = 8; the mean and the share of draws whose
    k1-th largest comes from the far group equal their exact values (two binomial counts, quadrature)."""
    na, nb, low, k1 = 15, 20_000, -3.5, 8
    s = np.concatenate([np.zeros(na), np.full(nb, low)])

    def n_above_pmf(t: float, a: int, b: int) -> np.ndarray:  # P(N_A + N_B = c), c < k1
        pa, pb = binom.pmf(np.arange(k1), a, norm.sf(t)), binom.pmf(np.arange(k1), b, norm.sf(t - low))
        return np.convolve(pa, pb)[:k1]

    lo, hi = low - 10, 10.0
    mean = lo + integrate.quad(lambda t: 1 - n_above_pmf(t, na, nb).sum(), lo, hi, points=[low, 0.0],
                               limit=400, epsabs=1e-12)[0]
    share_far = integrate.quad(lambda t: nb * norm.pdf(t - low) * n_above_pmf(t, na, nb - 1)[k1 - 1], lo, hi,
                               points=[low, 0.0], limit=400, epsabs=1e-13)[0]
    draws = 40_000
    vals, pos = sample_kth(s[None, :], k1, 1.0, draws, seed=3)
    assert abs(vals.mean() - mean) < 4.5 * vals.std() / math.sqrt(draws)
    assert 0.05 < share_far < 0.95  # the far group matters
    assert binomtest(int((pos >= na).sum()), draws, share_far).pvalue > 1e-3


@pytest.mark.parametrize("a", [-math.inf, -1.0, 0.2, 0.5, 2.0, 5.0])
def test_truncated_normal_generator(a: float) -> None:
    """The sampler's N(0, 1) (ziggurat) and N(0, 1) | Z > a (rejection / Robert) pass a KS test."""
    numba = pytest.importorskip("numba")
    import losses.noised_sampler as ns

    ns._kernel()
    tn = ns._tn_above_jit
    lam = 0.5 * (a + math.sqrt(a * a + 4.0)) if math.isfinite(a) else 0.0
    ilam = 1.0 / lam if lam > 0.0 else 0.0

    @numba.njit
    def draw(count, st):  # type: ignore[no-untyped-def]
        out = np.empty(count)
        for i in range(count):
            st, out[i] = tn(a, lam, ilam, st)
        return out

    z = draw(200_000, np.uint64(7))
    ref = norm if not math.isfinite(a) else truncnorm(a, np.inf)
    assert kstest(z, ref.cdf).pvalue > 1e-3
    assert z.min() > a


def test_exponential_generator() -> None:
    """The ziggurat Exp(1) (gaps of the Poisson walks, Robert's proposals and acceptance) passes a KS test,
    in the body and in the tail beyond the base strip (r ≈ 7.7) alike."""
    numba = pytest.importorskip("numba")
    import losses.noised_sampler as ns

    ns._kernel()
    ex = ns._exp_jit

    @numba.njit
    def draw(count, st):  # type: ignore[no-untyped-def]
        out = np.empty(count)
        for i in range(count):
            st, out[i] = ex(st)
        return out

    z = draw(2_000_000, np.uint64(11))
    assert z.min() > 0
    assert kstest(z[:300_000], "expon").pvalue > 1e-3
    tail = z[z > 5.0] - 5.0  # memoryless: the excess over 5 (across the base strip's edge r) is Exp(1) again
    assert len(tail) > 10_000 and kstest(tail, "expon").pvalue > 1e-3
    assert binomtest(int((z > 7.69711747013104972).sum()), len(z), math.exp(-7.69711747013104972)).pvalue > 1e-3


def test_float32_and_float64_rows_give_the_same_draws() -> None:
    s = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    a = sample_kth(s, 4, 0.5, 20, seed=9)
    b = sample_kth(s.astype(np.float64), 4, 0.5, 20, seed=9)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    c = sample_kth(s.astype(np.float64), 4, 0.5, 20, seed=10)
    assert not np.array_equal(a[0], c[0])


def test_seeded_by_torch() -> None:
    s, y = _data(4, 16, 30)
    loss = build_loss("noised_topk", 30, k=3)
    torch.manual_seed(5)
    a = loss(s, y)
    torch.manual_seed(5)
    assert loss(s, y).item() == a.item()
    torch.manual_seed(5)
    v, p = noised_kth(s, 4, 1.0, 5)
    torch.manual_seed(5)
    v2, p2 = noised_kth(s, 4, 1.0, 5)
    assert torch.equal(v, v2) and torch.equal(p, p2)


def test_small_epsilon_tends_to_calibrated_hinge() -> None:
    s, y = _data(2, 64, 10)
    torch.manual_seed(0)
    got = build_loss("noised_topk", 10, k=3, epsilon=1e-6)(s, y).item()
    kth = s.topk(4, dim=1).values[:, 3]
    ref = torch.clamp(1 + kth - s.gather(1, y[:, None]).squeeze(1), min=0).mean().item()
    assert got == pytest.approx(ref, abs=1e-4)


def test_gradcheck_with_fixed_noise() -> None:
    s, y = _data(3, 4, 6)
    s = s.double().requires_grad_(True)
    loss = build_loss("noised_topk", 6, k=2, epsilon=0.5, n_sample=3)

    def fn(x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)  # same Z at every evaluation: a piecewise-linear function of s
        return loss(x, y)

    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-5)


def test_finite_on_extremes_and_small_inputs_nan_propagates() -> None:
    torch.manual_seed(0)
    loss = build_loss("noised_topk", 7, k=3)
    y = torch.randint(0, 7, (8,))
    for x in (torch.randn(8, 7) * 1e4, torch.full((8, 7), 1e4), torch.randint(-1, 2, (8, 7)).float(),
              torch.randn(8, 7).double()):
        x = x.requires_grad_(True)
        out = loss(x, y)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(x.grad).all()
    assert torch.isfinite(loss(torch.randn(1, 7), y[:1]))
    small = build_loss("noised_topk", 2, k=1)
    assert torch.isfinite(small(torch.tensor([[1e4, -1e4], [0.0, 0.0]]), torch.tensor([1, 0])))
    for bad in (math.nan, math.inf):
        x = torch.randn(8, 7)
        x[2, 5] = bad
        assert torch.isnan(loss(x, torch.zeros(8, dtype=torch.long)))


def test_labels_out_of_range_raise() -> None:
    """The CPU kernel writes the gradient at the label unchecked, so it refuses a label outside the classes."""
    loss = build_loss("noised_topk", 10, k=2)
    s = torch.randn(4, 10, requires_grad=True)
    for bad in (10, -1):
        with pytest.raises(ValueError, match="label"):
            loss(s, torch.tensor([0, 1, 2, bad]))


def test_invalid_params() -> None:
    for k in (10, 11):
        with pytest.raises(ValueError, match="k="):
            build_loss("noised_topk", 10, k=k)
    with pytest.raises(RegistryError, match="epsilon"):
        build_loss("noised_topk", 10, epsilon=0.0)
    with pytest.raises(RegistryError, match="n_sample"):
        build_loss("noised_topk", 10, n_sample=0)
    with pytest.raises(ValueError, match="class_counts"):
        build_loss("noised_topk", 6, imbalanced=True, k=2, class_counts=[1, 2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("imbalanced", [False, True])
def test_compiled_hinge_equals_torch_formula_on_the_same_draws(dtype: torch.dtype, imbalanced: bool) -> None:
    """The CPU path's one-pass forward (hinge_forward) and backward (hinge_grad) equal the torch formula
    mean_b relu(scale·(m_b + mean_j v_bj − s_{b,y_b})) and its scatter gradient on the very same draws, with
    active and inactive rows (a wide score range makes some hinges zero)."""
    n, k = 12, 3
    s, y = _data(8, 40, n, scale=3.0)
    s = s.to(dtype)
    counts = [1 + (5 * i) % 17 for i in range(n)]
    extra = {"imbalanced": True, "class_counts": counts, "scale": 2.5, "max_m": 0.4} if imbalanced else {}
    loss = build_loss("noised_topk", n, k=k, epsilon=0.7, n_sample=4, **extra)
    x = s.clone().requires_grad_(True)
    torch.manual_seed(21)
    out = loss(x, y)
    out.backward()
    torch.manual_seed(21)
    vals, pos = noised_kth(s, k + 1, 0.7, 4)
    margin = loss.m_list[y].double() if imbalanced else 1.0
    scale = loss.scale
    z = scale * (margin + vals.mean(1) - s.double().gather(1, y[:, None]).squeeze(1))
    assert 0 < int((z > 0).sum()) < len(z)
    assert out.dtype == dtype
    assert out.item() == pytest.approx(torch.relu(z).mean().item(), rel=1e-6 if dtype == torch.float32 else 1e-12)
    w = scale / len(z) * (z > 0).double()
    ref = torch.zeros(s.shape, dtype=torch.float64)
    ref.scatter_add_(1, pos, (w / 4)[:, None].expand(-1, 4).contiguous())
    ref.scatter_add_(1, y[:, None], -w[:, None])
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(x.grad.double(), ref, rtol=tol, atol=tol)


def test_many_draws_are_sampled_in_blocks_with_the_same_law() -> None:
    """n_sample larger than the sampler's block of draws (DB): draws of later blocks have the same law as
    the first block's (mean and per-position frequencies agree within Monte-Carlo error)."""
    import losses.noised_sampler as ns

    rng = np.random.default_rng(4)
    s = rng.standard_normal((1, 30))
    draws = 3 * ns.DB + 3
    vals, pos = sample_kth(np.repeat(s, 4000, axis=0), 4, 0.8, draws, seed=2)
    first, later = vals[:, : ns.DB].ravel(), vals[:, ns.DB:].ravel()
    se = math.sqrt(first.var() / len(first) + later.var() / len(later))
    assert abs(first.mean() - later.mean()) < 4.5 * se
    mean, probs = _exact_kth(s[0], 4, 0.8)
    assert abs(later.mean() - mean) < 4.5 * later.std() / math.sqrt(len(later))
    counts = np.bincount(pos[:, ns.DB:].ravel(), minlength=30)
    pvals = [binomtest(int(c), pos[:, ns.DB:].size, min(max(p, 0.0), 1.0)).pvalue for c, p in zip(counts, probs)]
    assert min(pvals) > 1e-3 / 30


def _row(kind: str) -> tuple[np.ndarray, int, float, bool]:
    """(scores, k1, ε, whether the row spans fewer than G2 buckets) for the sampler's row layouts."""
    rng = np.random.default_rng(len(kind))
    z = rng.standard_normal(40)
    return {
        "narrow-dense": (z, 6, 1.0, True),  # scale 1, ε = 1: every entry near t0 (the defaults' regime)
        "narrow-far": (z, 3, 0.2, True),  # 90 buckets: near buckets listed in blocks, the rest far
        "ties": (np.round(2 * z) / 2, 4, 0.5, True),  # many equal scores
        "full-sort": (np.concatenate([z[:32], np.full(8, -60.0)]), 5, 1.0, False),  # wide, most entries near
        "compaction": (np.concatenate([z[:8], np.full(32, -60.0)]), 3, 1.0, False),  # wide, a few near
        "tiny-scale": (z[:30] * 1e-6, 5, 1.0, True),  # one bucket
        "huge-scale": (z[:30] * 1e6, 3, 1.0, False),  # buckets wider than W·ε
    }[kind]


@pytest.mark.parametrize("kind", ["narrow-dense", "narrow-far", "ties", "full-sort", "compaction", "tiny-scale",
                                  "huge-scale"])
def test_lazy_sampler_row_layouts_exact(kind: str) -> None:
    """Each way the sampler lists a row's near entries (blocks while counting in narrow rows, a counting sort
    of the whole row, a compaction then a sort, one wide bucket) gives the exact mean and per-position
    frequencies (quadrature), with a number of draws that is not a multiple of the block size DB."""
    import losses.noised_sampler as ns

    s, k1, eps, narrow = _row(kind)
    assert ((s.max() - s.min()) / (ns.W * eps) < ns.G2 - 1) == narrow  # the layout this case is meant to hit
    draws = 60_003
    assert draws % ns.DB
    vals, pos = sample_kth(s[None, :], k1, eps, draws, seed=11)
    mean, probs = _exact_kth(s, k1, eps)
    assert abs(vals.mean() - mean) < 4.5 * vals.std() / math.sqrt(draws) + 1e-9 * max(1.0, abs(mean))
    counts = np.bincount(pos[0], minlength=len(s))
    pvals = [binomtest(int(c), draws, min(max(p, 0.0), 1.0)).pvalue for c, p in zip(counts, probs)]
    assert min(pvals) > 1e-3 / len(s)


FALLBACK_TUNES = {  # (TARGET_SD, TARGET_ADD, SHIFT_EXTRA, FARHITS): t0 too high, so that nearly every draw falls back
    "second-stage": (-1.5, 0.0, 7.0, 64.0),  # ... and its second stage finds what it needs
    "second-stage-short": (-1.5, 0.0, 0.5, 64.0),  # ... but a second threshold too close: every other entry drawn
    "no-second-stage": (-1.5, 0.0, 7.0, 0.0),  # ... its far walk over budget: every other entry drawn at once
}


@pytest.mark.parametrize("tune", list(FALLBACK_TUNES))
@pytest.mark.parametrize("kind", ["narrow-dense", "narrow-far", "compaction", "huge-scale"])
def test_lazy_sampler_fallback_paths_exact(kind: str, tune: str) -> None:
    """The draws with fewer than k1 exceedances of t0 (rare at the defaults) are exact on each of their paths:
    forced here in most draws by a t0 set too high, with the path checked by the sampler's own counts, and the
    mean and per-position frequencies compared with quadrature."""
    s, k1, eps, _ = _row(kind)
    draws = 40_000
    paths = np.zeros(3, np.int64)
    vals, pos = sample_kth(s[None, :], k1, eps, draws, seed=5, paths=paths, tune=FALLBACK_TUNES[tune])
    fell_back, second, everything = paths
    assert fell_back > draws // 2
    if tune == "second-stage":
        assert second == fell_back
    else:  # every other entry drawn in many draws (when the second stage was too short, or skipped)
        assert everything > draws // 4 and everything >= fell_back - second
    mean, probs = _exact_kth(s, k1, eps)
    assert abs(vals.mean() - mean) < 4.5 * vals.std() / math.sqrt(draws) + 1e-9 * max(1.0, abs(mean))
    counts = np.bincount(pos[0], minlength=len(s))
    pvals = [binomtest(int(c), draws, min(max(p, 0.0), 1.0)).pvalue for c, p in zip(counts, probs)]
    assert min(pvals) > 1e-3 / len(s)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_lazy_sampler_large_rows_match_brute_force(scale: float) -> None:
    """n = 3000 (fewer blocks than G2 fit the narrow layout's memory cap; scale 2 exceeds them): the values
    and positions of the k1-th largest have the law of brute-force sorting of s + εZ (two-sample KS test on
    the values, chi-square on the positions of the 30 highest scores and the rest pooled)."""
    from scipy.stats import chi2_contingency, ks_2samp

    import losses.noised_sampler as ns

    n, k1, draws = 3000, 6, 20_000
    s = np.random.default_rng(5).standard_normal(n) * scale
    assert (max(1, min(ns.G2, ns.G2MEM // n)) - 1 > (s.max() - s.min()) / ns.W) == (scale == 1.0)
    vals, pos = sample_kth(s[None, :], k1, 1.0, draws, seed=3)
    rng = np.random.default_rng(6)
    ref_vals, ref_pos = np.empty(draws), np.empty(draws, np.int64)
    for c in range(0, draws, 1000):
        x = s + rng.standard_normal((1000, n))
        p = np.argpartition(-x, k1 - 1, axis=1)[:, k1 - 1]
        ref_pos[c:c + 1000], ref_vals[c:c + 1000] = p, x[np.arange(1000), p]
    assert ks_2samp(vals[0], ref_vals).pvalue > 1e-3
    top = np.argsort(-s)[:30]
    slot = np.full(n, 30)
    slot[top] = np.arange(30)
    table = np.array([np.bincount(slot[pos[0]], minlength=31), np.bincount(slot[ref_pos], minlength=31)])
    table = table[:, table.sum(0) > 0]
    assert chi2_contingency(table).pvalue > 1e-3


def test_non_finite_rows_give_nan_and_leave_the_others_alone() -> None:
    """A row with a NaN or an infinity gets NaN values (position 0); every other row's draws are those it gets
    in a batch without the bad rows (each row has its own stream), narrow and wide rows alike."""
    rng = np.random.default_rng(1)
    s = np.stack([rng.standard_normal(50), rng.standard_normal(50) * 300, rng.standard_normal(50),
                  rng.standard_normal(50)])
    bad = s.copy()
    bad[2, 7], bad[3, 0] = math.nan, -math.inf
    for arr in (s, bad):
        arr.setflags(write=False)
    v_ok, p_ok = sample_kth(s, 4, 1.0, 13, seed=8)
    v_bad, p_bad = sample_kth(bad, 4, 1.0, 13, seed=8)
    assert np.isnan(v_bad[2:]).all() and (p_bad[2:] == 0).all()
    np.testing.assert_array_equal(v_bad[:2], v_ok[:2])
    np.testing.assert_array_equal(p_bad[:2], p_ok[:2])
    assert np.isfinite(v_ok).all()
