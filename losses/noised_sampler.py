"""Exact lazy sampler of the (k+1)-th largest entry of s + εZ, Z ~ N(0, I), for the noised top-k loss.

`pytopk` draws all n·n_sample normals of a row and takes a k-th value: ~60× `F.cross_entropy` at n = 1000.
Only the few entries that can reach the top k+1 matter, so this sampler draws a normal only where it can
matter, and is still exact in distribution (not a truncation: every entry keeps its full Gaussian law).

Per row (scores s, max M), once:
1. bucket the scores below M in steps Δ = W·ε (coarser when the row spans more than J buckets);
2. pick a threshold t0 = M − j0·Δ whose expected number of exceedances Σ_i P(s_i + εZ_i > t0) is about
   k+1 + a few standard deviations (estimated from the bucket counts; t0 only affects speed, not the law).
Per draw, every entry's normal Z_i is generated lazily: for an entry in bucket g with top edge u_g, the
event Z_i > a_g := (t0 − u_g)/ε ≤ (t0 − s_i)/ε has probability q_g = Φ̄(a_g), a bucket constant. The
entries with Z_i > a_g are found by a Poisson walk over the buckets (hazard −log(1 − q_g) per entry, one
exponential per hit), their Z_i drawn from N(0, 1) truncated to (a_g, ∞) (Robert 1995), and entry i
exceeds t0 iff s_i + εZ_i > t0. Far buckets (a_g ≥ DFAR·W) share one walk over all n positions. Since
{i : s_i + εZ_i > t0} holds every noised value above t0 with its exact conditional law, the (k+1)-th
largest is read off it whenever it has ≥ k+1 entries; otherwise (rare) the remaining entries are drawn
from N(s_i, ε²) truncated to (−∞, t0], which is their exact conditional law given the exceedances.
Cost per draw: O(k + √k) truncated normals; per row one O(n) pass plus O(buckets).

Random numbers come from SplitMix64 (Steele et al. 2014) seeded per row from one torch draw, so
`torch.manual_seed` makes the loss reproducible; the stream differs from pytopk's `torch.randn`, so only the
law (not the sample) matches pytopk. Computation is float64 inside; the CPU kernel is compiled with numba.
"""
from __future__ import annotations

import math

import numpy as np

W = 0.25  # bucket width in units of ε (rows spanning more than J buckets get wider ones)
J = 2048  # buckets per row
DFAR = 14  # buckets whose bound a_g = d·W ≥ DFAR·W (3.5 ε below t0) go to the shared far walk
DMIN = -40  # buckets with a_g ≤ DMIN·W (t0 10 ε above their top) exceed with probability 1 − 1e-23: q = 1
DUP = 64  # t0 lies at most DUP buckets above the row max
DMU = 40  # the expected count sums buckets up to DMU below t0 (Φ̄(10) ≈ 8e-24 beyond)
_NT = DFAR - DMIN + 1  # q / hazard / λ tables cover d = DMIN..DFAR
_NM = DMU - DMIN + 1  # the count table covers d = DMIN..DMU
_INV_SQRT2 = 1.0 / math.sqrt(2.0)


def fill_tables(w: float, q: np.ndarray, haz: np.ndarray, lam: np.ndarray, mid: np.ndarray) -> None:
    """Bucket constants for bucket width w (in ε): q[d] = Φ̄(a), haz[d] = −log Φ(a) (inf at q = 1), λ of the
    Robert sampler at a = (d + DMIN)·w, and mid[d] = Φ̄((d + DMIN + ½)·w) for the expected count."""
    for t in range(_NT):
        a = (t + DMIN) * w
        if t == 0:  # a ≤ DMIN·W: q = 1 up to 1e-23, drawn as a plain normal (no truncation at all)
            q[t], haz[t], lam[t] = 1.0, math.inf, 0.0
            continue
        q[t] = 0.5 * math.erfc(a * _INV_SQRT2)
        h = -math.log(0.5 * math.erfc(-a * _INV_SQRT2))
        haz[t] = h if h > 0.0 else 0.0  # not −0.0: e / haz must be +inf where Φ(a) rounds to 1
        lam[t] = 0.5 * (a + math.sqrt(a * a + 4.0))
    for t in range(_NM):
        mid[t] = 0.5 * math.erfc((t + DMIN + 0.5) * w * _INV_SQRT2)


def _next(st):  # type: ignore[no-untyped-def]
    """SplitMix64: advance the state st[0] and return 64 random bits."""
    st[0] += np.uint64(0x9E3779B97F4A7C15)
    z = st[0]
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _unif(st):  # type: ignore[no-untyped-def]
    """Uniform on the open interval (0, 1), 53 bits."""
    return (float(_next_jit(st) >> np.uint64(11)) + 0.5) * 1.1102230246251565e-16


def _normal(st):  # type: ignore[no-untyped-def]
    """Standard normal (Box–Muller, one of the pair)."""
    return math.sqrt(-2.0 * math.log(_unif_jit(st))) * math.cos(6.283185307179586 * _unif_jit(st))


def _tn_above(a, lam, st):  # type: ignore[no-untyped-def]
    """Z ~ N(0, 1) conditioned on Z > a (a = −inf: no condition). a < 0: rejection from N(0, 1) (acceptance
    ≥ ½); a ≥ 0: Robert's (1995) translated exponential with rate lam = (a + √(a² + 4))/2 (acceptance ≥ 0.76)."""
    if a < 0.0:
        while True:
            z = _normal_jit(st)
            if z > a:
                return z
    while True:
        z = a - math.log(_unif_jit(st)) / lam
        d = z - lam
        if _unif_jit(st) <= math.exp(-0.5 * d * d):
            return z


def _select(vals, idx, cnt, r):  # type: ignore[no-untyped-def]
    """Partially reorder vals[:cnt] (idx alongside) so that position r−1 holds the r-th largest; return it."""
    lo, hi, t = 0, cnt - 1, r - 1
    while lo < hi:
        p = vals[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while vals[i] > p:
                i += 1
            while vals[j] < p:
                j -= 1
            if i <= j:
                vals[i], vals[j] = vals[j], vals[i]
                idx[i], idx[j] = idx[j], idx[i]
                i += 1
                j -= 1
        if t <= j:
            hi = j
        elif t >= i:
            lo = i
        else:
            break
    return t


def _rows(s, k1, eps, seed, q0, haz0, lam0, mid0, out_val, out_idx):  # type: ignore[no-untyped-def]
    """For every row b of s [B, n] and draw j: out_val[b, j], out_idx[b, j] = value and position of the
    k1-th largest entry of s[b] + εZ (see the module docstring). seed: uint64."""
    nb, n = s.shape
    ns = out_val.shape[1]
    code = np.empty(n, np.int64)
    hist = np.zeros(J + 1, np.int64)
    start = np.empty(J + 1, np.int64)
    lst = np.empty(n, np.int64)
    nonempty = np.empty(J, np.int64)
    vals = np.empty(n, np.float64)
    idx = np.empty(n, np.int64)
    mark = np.zeros(n, np.uint8)
    cum = np.zeros(J + 2, np.int64)
    fill = np.empty(J + 1, np.int64)
    q, haz, lam, mid = np.empty(_NT), np.empty(_NT), np.empty(_NT), np.empty(_NM)
    st = np.empty(1, np.uint64)
    target = k1 + 2.5 * math.sqrt(k1) + 3.0
    for b in range(nb):
        row = s[b]
        st[0] = seed + np.uint64(b) * np.uint64(0xD1B54A32D192ED03)
        _next_jit(st)
        # --- pass 1: max, min, finiteness
        m = float(row[0])
        mn = m
        tot = 0.0
        for i in range(n):
            v = float(row[i])
            tot += v
            if v > m:
                m = v
            if v < mn:
                mn = v
        if not math.isfinite(tot):
            for j in range(ns):
                out_val[b, j] = math.nan
                out_idx[b, j] = 0
            continue
        # --- bucket width: W·ε, wider when the row spans more than J − 1 buckets
        w = W
        if m - mn > (J - 1) * W * eps:
            w = (m - mn) / ((J - 1) * eps) * (1.0 + 1e-9)
            fill_tables_jit(w, q, haz, lam, mid)
        else:
            q[:] = q0
            haz[:] = haz0
            lam[:] = lam0
            mid[:] = mid0
        delta = w * eps
        inv = 1.0 / delta
        # --- pass 2: bucket codes (bucket g holds M − (g+1)Δ < s ≤ M − gΔ) and counts
        gmax = 0
        for i in range(n):
            g = int((m - float(row[i])) * inv)
            if g > J - 1:
                g = J - 1
            code[i] = g
            hist[g] += 1
            if g > gmax:
                gmax = g
        for g in range(gmax + 1):
            cum[g + 1] = cum[g] + hist[g]
        # --- t0 = M − j0·Δ: the highest with expected exceedances ≥ target (dense when none is)
        lo, hi = -DUP, gmax + DFAR
        if _expected_jit(hist, cum, gmax, hi, mid) < target:
            j0 = gmax - DMIN  # every entry exceeds t0 with probability 1 - 1e-23: drawn as plain normals
        else:
            while hi - lo > 1:
                mdl = (lo + hi) // 2
                if _expected_jit(hist, cum, gmax, mdl, mid) >= target:
                    hi = mdl
                else:
                    lo = mdl
            j0 = hi
        t0 = m - j0 * delta
        gnear = min(gmax + 1, max(j0 + DFAR, 0))  # buckets 0..gnear−1 walk on their own, the rest share one
        # --- pass 3: list the near entries bucket by bucket
        nne = 0
        pos = 0
        for g in range(gnear):
            start[g] = pos
            pos += hist[g]
            if hist[g] > 0:
                nonempty[nne] = g
                nne += 1
        nnear = pos
        if nnear > 0:
            fill[:gnear] = start[:gnear]
            for i in range(n):
                g = code[i]
                if g < gnear:
                    lst[fill[g]] = i
                    fill[g] += 1
        afar = DFAR * w
        hfar = haz[_NT - 1]
        lfar = lam[_NT - 1]
        for j in range(ns):
            cnt = 0
            e = -math.log(_unif_jit(st))
            for u in range(nne):
                g = nonempty[u]
                d = g - j0
                if d < DMIN:
                    d = DMIN
                t = d - DMIN
                h = haz[t]
                a = -math.inf if t == 0 else d * w
                ng = hist[g]
                p = 0
                while p < ng:
                    if h == math.inf:
                        off = 0
                    else:
                        f = e / h
                        if not f < ng - p:
                            e -= (ng - p) * h
                            break
                        off = int(f)
                    i = lst[start[g] + p + off]
                    x = float(row[i]) + eps * _tn_above_jit(a, lam[t], st)
                    if x > t0:
                        vals[cnt] = x
                        idx[cnt] = i
                        cnt += 1
                    p += off + 1
                    e = -math.log(_unif_jit(st))
            if nnear < n:  # far entries: one walk over all positions, near ones skipped
                p = 0
                while True:
                    f = -math.log(_unif_jit(st)) / hfar
                    if not f < n - p:
                        break
                    i = p + int(f)
                    if code[i] >= gnear:
                        x = float(row[i]) + eps * _tn_above_jit(afar, lfar, st)
                        if x > t0:
                            vals[cnt] = x
                            idx[cnt] = i
                            cnt += 1
                    p = i + 1
            if cnt >= k1:
                r = _select_jit(vals, idx, cnt, k1)
                out_val[b, j] = vals[r]
                out_idx[b, j] = idx[r]
                continue
            # fallback: fewer than k1 exceedances; the others are N(s_i, ε²) truncated to (−∞, t0]
            for c in range(cnt):
                mark[idx[c]] = 1
            c2 = cnt
            for i in range(n):
                if mark[i]:
                    continue
                si = float(row[i])
                ai = (t0 - si) / eps
                z = -_tn_above_jit(-ai, 0.5 * (-ai + math.sqrt(ai * ai + 4.0)), st)
                vals[c2] = si + eps * z
                idx[c2] = i
                c2 += 1
            for c in range(cnt):
                mark[idx[c]] = 0
            # the cnt exceedances are the largest; the (k1 − cnt)-th largest of the rest is the answer
            r = _select_jit(vals[cnt:c2], idx[cnt:c2], c2 - cnt, k1 - cnt)
            out_val[b, j] = vals[cnt + r]
            out_idx[b, j] = idx[cnt + r]
        for g in range(gmax + 1):
            hist[g] = 0


def _expected(hist, cum, gmax, j0, mid):  # type: ignore[no-untyped-def]
    """Estimated Σ_i P(s_i + εZ_i > M − j0·Δ) from the bucket counts (bucket midpoints); cum[g] = Σ_{g' < g}
    hist[g']."""
    g0 = min(max(j0 + DMIN, 0), gmax + 1)
    tot = float(cum[g0])  # buckets more than −DMIN·W·ε above t0 count fully
    for g in range(g0, min(j0 + DMU, gmax) + 1):
        tot += hist[g] * mid[g - j0 - DMIN]
    return tot


_next_jit = _next
_unif_jit = _unif
_normal_jit = _normal
_tn_above_jit = _tn_above
_select_jit = _select
_expected_jit = _expected
fill_tables_jit = fill_tables
_KERNEL = None
_TABLES: tuple[np.ndarray, ...] | None = None


def _kernel():  # type: ignore[no-untyped-def]
    """Compile the sampler once (numba, cached on disk); imported lazily so `import losses` stays fast."""
    global _KERNEL, _TABLES
    if _KERNEL is None:
        import numba

        jit = numba.njit(cache=True, error_model="numpy")  # x / 0 = inf where a hazard underflows to 0
        g = globals()
        for name, fn in (("_next_jit", _next), ("_unif_jit", _unif), ("_normal_jit", _normal),
                         ("_tn_above_jit", _tn_above), ("_select_jit", _select), ("fill_tables_jit", fill_tables),
                         ("_expected_jit", _expected)):
            g[name] = jit(fn)
        _KERNEL = jit(_rows)
        tables = (np.empty(_NT), np.empty(_NT), np.empty(_NT), np.empty(_NM))
        fill_tables(W, *tables)
        _TABLES = tables
    return _KERNEL


def sample_kth(s: np.ndarray, k1: int, eps: float, n_sample: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(values [B, n_sample] float64, positions [B, n_sample] int64) of the k1-th largest of s + εZ per draw.

    s: C-contiguous float32 or float64 [B, n]; 1 ≤ k1 ≤ n; eps > 0; seed: any int (only its low 64 bits)."""
    kernel = _kernel()
    assert _TABLES is not None
    out_val = np.empty((s.shape[0], n_sample), np.float64)
    out_idx = np.empty((s.shape[0], n_sample), np.int64)
    kernel(s, int(k1), float(eps), np.uint64(seed & 0xFFFFFFFFFFFFFFFF), *_TABLES, out_val, out_idx)
    return out_val, out_idx
