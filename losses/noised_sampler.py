"""Exact lazy sampler of the (k+1)-th largest entry of s + εZ, Z ~ N(0, I), for the noised top-k loss.

`pytopk` draws all n·n_sample normals of a row and takes a k-th value: ~60× `F.cross_entropy` at n = 1000.
Only the few entries that can reach the top k+1 matter, so this sampler draws a normal only where it can
matter, and is still exact in distribution (not a truncation: every entry keeps its full Gaussian law).

Per row (scores s, max M), once:
1. bucket the scores below M in steps Δ = W·ε (coarser when the row spans more than J buckets);
2. pick a threshold t0 whose expected number of exceedances Σ_i P(s_i + εZ_i > t0) is about
   k1 + 1.5·√k1 + ½ (k1 = k+1; estimated from the bucket counts; t0 only affects speed, not the law). t0 lies
   on a grid of step Δ/RF in rows narrow enough to crowd their buckets (so that its expected count lands
   close to the target), of step Δ otherwise; the tables of q, hazards and Robert's rates have that step.
Per draw, every entry's normal Z_i is generated lazily: for an entry in bucket g with top edge u_g, the
event Z_i > a_g := (t0 − u_g)/ε ≤ (t0 − s_i)/ε has probability q_g = Φ̄(a_g), a bucket constant. In the
buckets with q_g ≥ QB every entry's normal is simply drawn (cheaper than thinning); in the sparser ones the
entries with Z_i > a_g are found by a Poisson walk (hazard −log(1 − q_g) per entry, one exponential per
hit) and their Z_i drawn from N(0, 1) truncated to (a_g, ∞) (Robert 1995). Entry i exceeds t0 iff
s_i + εZ_i > t0. Buckets more than DFAR·W·ε (3 ε) below t0 share one walk over all n positions. Since
{i : s_i + εZ_i > t0} holds every noised value above t0 with its exact conditional law, the (k+1)-th
largest is read off it whenever it has ≥ k+1 entries. Otherwise (a few per cent of the draws at n = 1000,
scale 1) the other entries are independent N(s_i, ε²) truncated to (−∞, t0] given the exceedances, and
`_refill` finds the missing largest ones among them with the same machinery one level lower: a second
threshold t1 below t0, each bucket walked with a bound from the tables on P(x_i > t1 | x_i ≤ t0), each hit
kept with its own probability (thinning) and drawn in (t1, t0]; only if that is still short (or its far walk
would be long) is every remaining entry drawn, below t1. A lower t0 would make the fallback rarer and every
draw dearer: this target balances the two at the loss's defaults.
Cost per draw: the entries within ~0.7 ε of t0 plus O(k + √k) truncated normals; per row a few O(n) passes
(max/min on the float32 bits as integers, which vectorise, bucket codes, the counts, a listing of the
entries within 3 ε of t0 by bucket), with the next row's scores prefetched into the cache meanwhile.

Listing the near entries by bucket: the walks only need, per bucket, a fixed list of its entries (a hit at
position p of the bucket's grid is its p-th listed entry); which order a list has does not matter for the
law, since it is fixed before any draw of the row. Three layouts give such lists, chosen per row by its
shape only: a row spanning fewer than G2 buckets (scores of s.d. up to ~4.5 ε at n = 1000) writes every
entry into its bucket's block of n slots in the same pass that counts them (bucket g: lst[g·n : g·n +
hist[g]]; at most G2MEM slots, so fewer blocks at large n); a wider row with at least n/FULLSORT near
entries counting-sorts the whole row; otherwise the near entries are compacted and only they are sorted. The walks use
precomputed reciprocals of the hazards and of Robert's rates (multiplications, not divisions: the same
gaps up to float64 rounding). The layouts, the finer t0 and the two-stage fallback consume the random stream
in other orders than earlier versions, so a seed gives other draws than before (same law; the loss's
registry version is unchanged).

The draws of a row are sampled together, in blocks of DB: every walk runs over a bucket's (entry, draw)
grid, and a hit at grid position P is entry P // DB' of draw P mod DB' (DB' the block's size), which is the
same law as one walk per draw. Random numbers come from SplitMix64 (Steele et al. 2014; normals by Marsaglia
& Tsang's ziggurat, as Doornik's ZIGNOR; exponentials by their 256-layer ziggurat), the state a scalar passed
through inlined functions; seeded per row from one torch draw, so
`torch.manual_seed` makes the loss reproducible; the stream differs from pytopk's `torch.randn`, so only the
law (not the sample) matches pytopk. Computation is float64 inside (exact up to float64 rounding of the
bucket edges); the CPU kernel is compiled with numba (cached on disk), one thread.
"""
from __future__ import annotations

import math

import numpy as np

W = 0.25  # bucket width in units of ε (rows spanning more than J buckets get wider ones)
J = 2048  # buckets per row
DFAR = 12  # buckets whose bound a_g = d·W ≥ DFAR·W (3 ε below t0) go to the shared far walk
DMIN = -40  # buckets with a_g ≤ DMIN·W (t0 10 ε above their top) exceed with probability 1 − 1e-23: q = 1
DUP = 64  # t0 lies at most DUP buckets above the row max
DMU = 40  # the expected count sums buckets up to DMU below t0 (Φ̄(10) ≈ 8e-24 beyond)
RF = 4  # t0 moves in steps of Δ/RF (wide rows: Δ), so that its expected exceedances land close to the target
_NT = RF * (DFAR - DMIN) + 1  # q / hazard / λ tables cover a = DMIN·W..DFAR·W in steps of W/RF
_NM = RF * (DMU - DMIN) + 1  # the count table covers DMIN·W..DMU·W
_INV_SQRT2 = 1.0 / math.sqrt(2.0)


def _bound(t, rf, w):  # type: ignore[no-untyped-def]
    """The truncation point a of table entry t (bucket width w in ε, rf entries per bucket)."""
    return (t + rf * DMIN) * w / rf


def fill_tables(w: float, rf: int, q: np.ndarray, haz: np.ndarray, lam: np.ndarray, mid: np.ndarray) -> None:
    """Bucket constants for bucket width w (in ε) in steps of w/rf: q[t] = Φ̄(a), haz[t] = −log Φ(a) (inf at
    q = 1) and λ of the Robert sampler at a = _bound(t) = (t/rf + DMIN)·w, and mid[t] = Φ̄(a + w/2) (a
    bucket's midpoint) for the expected count."""
    for t in range(rf * (DFAR - DMIN) + 1):
        a = _bound_jit(t, rf, w)
        if t == 0:  # a ≤ DMIN·W: q = 1 up to 1e-23, drawn as a plain normal (no truncation at all)
            q[t], haz[t], lam[t] = 1.0, math.inf, 0.0
            continue
        q[t] = 0.5 * math.erfc(a * _INV_SQRT2)
        h = -math.log(0.5 * math.erfc(-a * _INV_SQRT2))
        haz[t] = h if h > 0.0 else 0.0  # not −0.0: e / haz must be +inf where Φ(a) rounds to 1
        lam[t] = 0.5 * (a + math.sqrt(a * a + 4.0))
    for t in range(rf * (DMU - DMIN) + 1):
        mid[t] = 0.5 * math.erfc((_bound_jit(t, rf, w) + 0.5 * w) * _INV_SQRT2)


def _next(st):  # type: ignore[no-untyped-def]
    """SplitMix64: (advanced state, 64 random bits). The state is a scalar passed in and out (not an array:
    numba reference-counts arrays at every inlined call, which cost a third of the sampler's time)."""
    st += np.uint64(0x9E3779B97F4A7C15)
    z = st
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return st, z ^ (z >> np.uint64(31))


def _unif(st):  # type: ignore[no-untyped-def]
    """(state, uniform on the open interval (0, 1), 53 bits)."""
    st, bits = _next_jit(st)
    return st, (float(bits >> np.uint64(11)) + 0.5) * 1.1102230246251565e-16


def _ziggurat_tables(c: int = 128, r: float = 3.442619855899, v: float = 9.91256303526217e-3):
    """Layer edges X and ratios R of Marsaglia & Tsang's ziggurat for N(0, 1), as in Doornik's ZIGNOR (2005)."""
    x = np.zeros(c + 1)
    f = math.exp(-0.5 * r * r)
    x[0], x[1] = v / f, r
    for i in range(2, c):
        x[i] = math.sqrt(-2.0 * math.log(v / x[i - 1] + f))
        f = math.exp(-0.5 * x[i] * x[i])
    return x, x[1:] / x[:-1]


_ZX, _ZR = _ziggurat_tables()
_ZIG_R = 3.442619855899


def _normal(st):  # type: ignore[no-untyped-def]
    """(state, standard normal) by the ziggurat (ZIGNOR: 128 layers, Marsaglia's tail beyond R)."""
    while True:
        st, bits = _next_jit(st)
        u = 2.0 * ((float(bits >> np.uint64(11)) + 0.5) * 1.1102230246251565e-16) - 1.0
        i = int(bits & np.uint64(0x7F))  # the low bits, not those of u
        if abs(u) < _ZR[i]:
            return st, u * _ZX[i]
        if i == 0:  # the base layer's tail
            while True:
                st, u1 = _unif_jit(st)
                st, u2 = _unif_jit(st)
                x = math.log(u1) / _ZIG_R
                y = math.log(u2)
                if -2.0 * y >= x * x:
                    return st, (x - _ZIG_R if u < 0.0 else _ZIG_R - x)
        x = u * _ZX[i]
        f0 = math.exp(-0.5 * (_ZX[i] * _ZX[i] - x * x))
        f1 = math.exp(-0.5 * (_ZX[i + 1] * _ZX[i + 1] - x * x))
        st, u1 = _unif_jit(st)
        if f1 + u1 * (f0 - f1) < 1.0:
            return st, x


def _ziggurat_exp_tables(c: int = 256, r: float = 7.69711747013104972, v: float = 3.949659822581572e-3):
    """Layer edges X (X[0] = v/f(r) the base strip's width, X[1] = r, …, X[c] = 0), ratios R = X[i+1]/X[i] and
    heights F = e^{−X} of Marsaglia & Tsang's (2000) 256-layer ziggurat for Exp(1)."""
    x = np.zeros(c + 1)
    x[0], x[1] = v / math.exp(-r), r
    for i in range(2, c):
        x[i] = -math.log(v / x[i - 1] + math.exp(-x[i - 1]))
    return x, x[1:] / x[:-1], np.exp(-x)


_EX, _ER, _EF = _ziggurat_exp_tables()
_EXP_R = 7.69711747013104972


def _exponential(st):  # type: ignore[no-untyped-def]
    """(state, Exp(1)) by the ziggurat: one 64-bit draw and a table look-up in ~99% of the calls (a logarithm
    costs more, and the sampler needs one or two exponentials per proposal)."""
    while True:
        st, bits = _next_jit(st)
        u = (float(bits >> np.uint64(11)) + 0.5) * 1.1102230246251565e-16
        i = int(bits & np.uint64(0xFF))  # the low bits, not those of u
        x = u * _EX[i]
        if u < _ER[i]:  # inside the layer's rectangle below the next edge
            return st, x
        st, u1 = _unif_jit(st)
        if i == 0:  # the base strip beyond r: the tail is r + Exp(1) (memoryless)
            return st, _EXP_R - math.log(u1)
        # the wedge between X[i+1] and X[i]: a uniform height in the layer, accepted below the density
        if _EF[i] + u1 * (_EF[i + 1] - _EF[i]) < math.exp(-x):
            return st, x


def _tn_above(a, lam, ilam, st):  # type: ignore[no-untyped-def]
    """Z ~ N(0, 1) conditioned on Z > a (a = −inf: no condition). a < 0.3: rejection from N(0, 1) (acceptance
    ≥ 0.38); else Robert's (1995) translated exponential with rate lam = (a + √(a² + 4))/2 (acceptance
    ≥ 0.8; ilam = 1/lam), accepted iff U ≤ e^{−d}, i.e. iff an Exp(1) draw is ≥ d (both exponentials from the
    ziggurat)."""
    if a < 0.3:
        while True:
            st, z = _normal_jit(st)
            if z > a:
                return st, z
    while True:
        st, e1 = _exp_jit(st)
        st, e2 = _exp_jit(st)
        z = a + e1 * ilam
        if e2 >= 0.5 * (z - lam) * (z - lam):
            return st, z


def _minmax(row):  # type: ignore[no-untyped-def]
    """(max, min) of a row; fastmath and four accumulators each, to pipeline or vectorise (NaN rows are caught
    by the caller)."""
    n = row.shape[0]
    m0 = m1 = m2 = m3 = row[0]
    n0 = n1 = n2 = n3 = row[0]
    i = 0
    while i + 4 <= n:
        m0, n0 = max(m0, row[i]), min(n0, row[i])
        m1, n1 = max(m1, row[i + 1]), min(n1, row[i + 1])
        m2, n2 = max(m2, row[i + 2]), min(n2, row[i + 2])
        m3, n3 = max(m3, row[i + 3]), min(n3, row[i + 3])
        i += 4
    while i < n:
        m0, n0 = max(m0, row[i]), min(n0, row[i])
        i += 1
    return float(max(max(m0, m1), max(m2, m3))), float(min(min(n0, n1), min(n2, n3)))


def _minmax32(row):  # type: ignore[no-untyped-def]
    """(max, min) of a float32 row through monotone integer keys of its bits (k = b ^ ((b >> 31) & 0x7FFFFFFF)
    orders floats as their values): integer max/min vectorise where float ones (NaN rules) do not, 3× faster.
    A NaN becomes the max or the min (so the caller's NaN check sees it)."""
    bits = row.view(np.int32)
    hi = np.int32(-2147483648)
    lo = np.int32(2147483647)
    for i in range(bits.shape[0]):
        b = bits[i]
        k = b ^ ((b >> 31) & 0x7FFFFFFF)
        hi = max(hi, k)
        lo = min(lo, k)
    return (float(_as_float32_jit(hi ^ ((hi >> 31) & 0x7FFFFFFF))),
            float(_as_float32_jit(lo ^ ((lo >> 31) & 0x7FFFFFFF))))


def _select(vals, idx, j, off, cnt, r):  # type: ignore[no-untyped-def]
    """Position u (0 ≤ u < cnt) of the r-th largest of vals[j, off:off + cnt] (idx alongside, reordered for
    large cnt). Rows and offsets, not slices: inlined, so that no array view is made (and reference-counted)."""
    if cnt <= 48:  # rank every value by counting, branch-free: cheaper than partitioning the usual ~10 values
        found = 0
        hits = 0
        for c in range(off, off + cnt):
            v = vals[j, c]
            above = 0
            for e in range(off, off + cnt):
                above += vals[j, e] > v
            hit = above == r - 1
            found = c if hit else found
            hits += hit
        if hits == 1:  # no ties among continuous draws (ties fall through to the partition)
            return found - off
    lo, hi, t = off, off + cnt - 1, off + r - 1
    while lo < hi:
        p = vals[j, (lo + hi) // 2]
        a, b = lo, hi
        while a <= b:
            while vals[j, a] > p:
                a += 1
            while vals[j, b] < p:
                b -= 1
            if a <= b:
                vals[j, a], vals[j, b] = vals[j, b], vals[j, a]
                idx[j, a], idx[j, b] = idx[j, b], idx[j, a]
                a += 1
                b -= 1
        if t <= b:
            hi = b
        elif t >= a:
            lo = a
        else:
            break
    return t - off


def _expected(hist, cum, gmax, j0, rf, mid):  # type: ignore[no-untyped-def]
    """Estimated Σ_i P(s_i + εZ_i > M − j0·Δ/rf) from the bucket counts (bucket midpoints); cum[g] =
    Σ_{g' < g} hist[g']. Buckets more than 16 below t0 (4 ε at the finest width) are left out, those more
    than 16 above count fully: this only steers t0, never the law."""
    jb = j0 // rf
    g0 = min(max(jb - 16, 0), gmax + 1)
    tot = float(cum[g0])
    for g in range(g0, min(jb + 16, gmax) + 1):
        tot += hist[g] * mid[rf * (g - DMIN) - j0]
    return tot


G2 = 128  # rows spanning fewer buckets list their entries by bucket while counting them …
G2MEM = 1 << 17  # … when G2·n slots fit in this many (fewer buckets then: 13 at n = 10000)
FULLSORT = 4  # rows with at least n / FULLSORT near entries sort all their entries by bucket
DB = 8  # draws sampled together (one pass over the buckets per block of DB draws)
TARGET_SD, TARGET_ADD = 1.5, 0.5  # t0's expected exceedances: k1 + TARGET_SD·√k1 + TARGET_ADD
# (these two, SHIFT_EXTRA and FARHITS only steer the speed; the tests pass extreme values to force every path)
QB = 0.25  # buckets with q ≥ QB draw every entry's normal; sparser ones skip by exponential gaps


def _tn_between(lo, hi, st):  # type: ignore[no-untyped-def]
    """(state, Z ~ N(0, 1) conditioned on lo < Z ≤ hi), lo < hi finite. Narrow intervals: uniform proposals
    accepted with the density's ratio to its maximum there; wide ones: _tn_above from the nearer end (the
    interval mirrored when it lies below 0), rejected beyond the other end."""
    if hi - lo < 1.0:
        ref = 0.0 if lo < 0.0 < hi else min(abs(lo), abs(hi))
        while True:
            st, u = _unif_jit(st)
            st, v = _unif_jit(st)
            z = lo + (hi - lo) * u
            if v <= math.exp(-0.5 * (z * z - ref * ref)):
                return st, z
    sign = 1.0
    if hi <= 0.0:
        lo, hi, sign = -hi, -lo, -1.0
    lam = 0.5 * (lo + math.sqrt(lo * lo + 4.0))
    while True:
        st, z = _tn_above_jit(lo, lam, 1.0 / lam, st)
        if z < hi:
            return st, sign * z


def _reach(hist, cum, gmax, rf, mid, start, unit, lo, hi, value):  # type: ignore[no-untyped-def]
    """Smallest u in (lo, hi] whose threshold j = start + u·unit (in steps of Δ/rf) expects at least `value`
    exceedances, by bisection (the count grows as the threshold falls); needs E(lo) < value ≤ E(hi)."""
    while hi - lo > 1:
        md = (lo + hi) // 2
        if _expected_jit(hist, cum, gmax, start + md * unit, rf, mid) >= value:
            hi = md
        else:
            lo = md
    return hi


def _shift(hist, cum, gmax, j0, rf, mid, extra):  # type: ignore[no-untyped-def]
    """Smallest L in 1..rf·DFAR whose threshold t0 − L·Δ/rf has at least `extra` more expected exceedances
    than t0 (rf·DFAR, i.e. 3 ε, when none has)."""
    base = _expected_jit(hist, cum, gmax, j0, rf, mid) + extra
    if _expected_jit(hist, cum, gmax, j0 + rf * DFAR, rf, mid) < base:
        return rf * DFAR
    return _reach_jit(hist, cum, gmax, rf, mid, j0, 1, 0, rf * DFAR, base)


def _take_below(row, i, eps, t0, lp, pg, j, c, vals, idx, st):  # type: ignore[no-untyped-def]
    """Entry i was hit with its bucket's bound pg on P(x_i > t0 − lp·ε | x_i ≤ t0); keep it with its own
    probability (thinning) and draw x_i in (t0 − lp·ε, t0] into vals[j, c]. Returns (state, next c)."""
    si = float(row[i])
    a0 = (t0 - si) / eps
    if a0 > 0.0:  # from the upper tails: 1 − Φ(a0 − lp)/Φ(a0) = (Φ̄(a0 − lp) − Φ̄(a0))/(1 − Φ̄(a0))
        up = 0.5 * math.erfc(a0 * _INV_SQRT2)
        pa = (0.5 * math.erfc((a0 - lp) * _INV_SQRT2) - up) / (1.0 - up)
    else:
        cdf = 0.5 * math.erfc(-a0 * _INV_SQRT2)
        pa = 1.0 - 0.5 * math.erfc((lp - a0) * _INV_SQRT2) / cdf if cdf > 0.0 else 1.0  # far above t0: mass at t0
    st, v = _unif_jit(st)
    if v * pg <= pa:
        st, z = _tn_between_jit(a0 - lp, a0, st)
        vals[j, c] = si + eps * z
        idx[j, c] = i
        c += 1
    return st, c


def _walk(st, p, ih, size):  # type: ignore[no-untyped-def]
    """(state, the next hit at or after position p of a Poisson walk with 1/hazard ih over positions < size;
    size when there is none)."""
    st, e = _exp_jit(st)
    f = e * ih
    return st, (p + int(f) if f < size - p else size)


SHIFT_EXTRA = 7.0  # the second threshold of a fallback expects this many more exceedances than t0
FARHITS = 64.0  # the second stage runs when its far walk expects at most this many hits
_TUNE = np.array([TARGET_SD, TARGET_ADD, SHIFT_EXTRA, FARHITS])


def _refill(row, eps, t0, w, rf, lshift, k1, j, cj, vals, idx, mark, code, gnear, lst, b_start, b_size, b_t,
            nne, haz, tfar, nnear, farhits, paths, st):  # type: ignore[no-untyped-def]
    """A draw j with cj < k1 exceedances of t0 (in vals[j, :cj]): given them, the other entries are
    independent N(s_i, ε²) truncated to (−∞, t0]. Returns (state, position in vals[j] of the k1-th largest).

    Second stage: t1 = t0 − lp·ε (lp = lshift·w/rf). Entry i lies in (t1, t0] with probability
    1 − Φ(a_i − lp)/Φ(a_i), a_i = (t0 − s_i)/ε, which falls as a_i grows (Φ is log-concave), so a bucket whose
    top edge lies a_g below t0 bounds it by 1 − Φ(a_g − lp)/Φ(a_g), i.e. the hazard haz(a_g − lp) − haz(a_g)
    from the tables. Each bucket is walked with its bound (the far buckets share the bound at DFAR·w), each hit
    kept with its own probability (thinning) and drawn in (t1, t0]. If that gives the k1 − cj needed values,
    they are read off; otherwise (or when the far walk would be long) every remaining entry is drawn below
    t1 (below t0 when the second stage did not run) and the rest read off those."""
    n = row.shape[0]
    need = k1 - cj
    for c in range(cj):
        mark[idx[j, c]] = 1
    c2 = cj
    tcut = t0
    hfar = math.inf if tfar - lshift <= 0 else max(haz[tfar - lshift] - haz[tfar], 0.0)
    pfar = -math.expm1(-hfar)
    if (n - nnear) * pfar <= farhits:
        lp = lshift * w / rf
        tcut = t0 - lp * eps
        paths[1] += 1
        for u in range(nne):
            t = b_t[u]
            h2 = math.inf if t - lshift <= 0 else max(haz[t - lshift] - haz[t], 0.0)
            ih2 = 1.0 / h2
            pg = -math.expm1(-h2)
            ng = b_size[u]
            base = b_start[u]
            st, p = _walk_jit(st, 0, ih2, ng)
            while p < ng:
                i = lst[base + p]
                if not mark[i]:
                    st, c2 = _take_below_jit(row, i, eps, t0, lp, pg, j, c2, vals, idx, st)
                st, p = _walk_jit(st, p + 1, ih2, ng)
        if nnear < n:
            ihf = 1.0 / hfar
            st, p = _walk_jit(st, 0, ihf, n)
            while p < n:
                if code[p] >= gnear and not mark[p]:
                    st, c2 = _take_below_jit(row, p, eps, t0, lp, pfar, j, c2, vals, idx, st)
                st, p = _walk_jit(st, p + 1, ihf, n)
    if c2 - cj >= need:
        pos = cj + _select_jit(vals, idx, j, cj, c2 - cj, need)
    else:  # every other entry, drawn below tcut
        paths[2] += 1
        for c in range(cj, c2):
            mark[idx[j, c]] = 1
        c3 = c2
        for i in range(n):
            if mark[i]:
                continue
            si = float(row[i])
            ai = (tcut - si) / eps
            lm = 0.5 * (-ai + math.sqrt(ai * ai + 4.0))
            st, z = _tn_above_jit(-ai, lm, 1.0 / lm, st)
            vals[j, c3] = si - eps * z
            idx[j, c3] = i
            c3 += 1
        for c in range(cj, c2):
            mark[idx[j, c]] = 0
        pos = c2 + _select_jit(vals, idx, j, c2, c3 - c2, need - (c2 - cj))
    for c in range(cj):
        mark[idx[j, c]] = 0
    return st, pos


def _rows(s, k1, eps, seed, q0, haz0, lam0, mid0, out_val, out_idx, tune, paths):  # type: ignore[no-untyped-def]
    """For every row b of s [B, n] and draw j: out_val[b, j], out_idx[b, j] = value and position of the
    k1-th largest entry of s[b] + εZ (see the module docstring). seed: uint64. tune: (TARGET_SD, TARGET_ADD,
    SHIFT_EXTRA, FARHITS). paths[0], [1], [2] count the draws that fell back, ran _refill's second stage, and
    drew every other entry (for the tests)."""
    nb, n = s.shape
    ns = out_val.shape[1]
    code = np.empty(n, np.int32)
    hist = np.zeros(J + 1, np.int64)
    cum = np.zeros(J + 2, np.int64)
    fill = np.empty(J + 2, np.int64)
    gblk = max(min(G2, G2MEM // n), 1)  # blocks of n slots for narrow rows (at most G2MEM slots in all)
    lst = np.empty(gblk * n, np.int32)  # the near entries by bucket (block g at g·n in narrow rows)
    vals = np.empty((DB, n), np.float64)  # exceedances of each draw of a block
    idx = np.empty((DB, n), np.int64)
    cnt = np.zeros(DB, np.int64)
    tmp = np.empty(n, np.int64)
    mark = np.zeros(n, np.uint8)
    # per non-empty near bucket: first list slot, size, q, hazard, truncation point, Robert rate
    b_start = np.empty(J, np.int64)
    b_t = np.empty(J, np.int64)  # table entry
    b_size = np.empty(J, np.int64)
    b_q = np.empty(J)
    b_h = np.empty(J)
    b_ih = np.empty(J)  # 1 / hazard (inf where the hazard is 0)
    b_a = np.empty(J)
    b_lam = np.empty(J)
    b_il = np.empty(J)
    qw, hazw, lamw, midw = np.empty(_NT), np.empty(_NT), np.empty(_NT), np.empty(_NM)  # tables of wide buckets
    target = k1 + tune[0] * math.sqrt(k1) + tune[1]
    line = max(64 // s.itemsize, 1)  # scores per cache line
    for b in range(nb):
        row = s[b]
        if b + 1 < nb:  # the next row is read in ~2 µs: fetch it into the cache meanwhile
            for i in range(0, n, line):
                _prefetch_jit(s, b + 1, i)
        st, _ = _next_jit(seed + np.uint64(b) * np.uint64(0xD1B54A32D192ED03))
        m, mn = _minmax32_jit(row) if s.itemsize == 4 else _minmax_jit(row)
        # --- bucket width: W·ε, wider when the row spans more than J − 1 buckets
        w = W
        rf = RF  # t0 in steps of Δ/rf; wide rows (rare) fill their tables per row, so in whole buckets
        q, haz, lam, mid = q0, haz0, lam0, mid0
        if m - mn > (J - 1) * W * eps:
            w = (m - mn) / ((J - 1) * eps) * (1.0 + 1e-9)
            rf = 1
            q, haz, lam, mid = qw, hazw, lamw, midw
            fill_tables_jit(w, rf, q, haz, lam, mid)
        delta = w * eps
        inv = 1.0 / delta
        # --- bucket codes (bucket g holds M − (g+1)Δ < s ≤ M − gΔ) and counts; non-finite rows give NaN
        # a row spanning fewer than G2 buckets lists every entry in its bucket's block of n slots in the same pass
        # as the counts (bucket g: lst[g·n : g·n + hist[g]]); codes are clamped to the blocks there
        narrow = (m - mn) * inv < gblk - 1
        gcap = gblk - 1 if narrow else J - 1
        bad = False
        for i in range(n):  # branch-free, so that it vectorises
            x = (m - float(row[i])) * inv
            bad |= not x < 1e18
            code[i] = max(min(int(min(x, 1e18)), gcap), 0)
        if narrow:
            for g in range(gblk):
                fill[g] = g * n
            for i in range(n):  # unsigned indices: no negative-index wrap-around in this store-bound loop
                g = np.uint32(code[i])
                f = np.uint64(fill[g])
                lst[f] = i
                fill[g] = f + np.uint64(1)
            for g in range(gblk):
                hist[g] = fill[g] - g * n
        else:
            for i in range(n):
                hist[code[i]] += 1
        if bad:
            hist[:] = 0
            out_val[b, :] = math.nan
            out_idx[b, :] = 0
            continue
        gmax = min(int((m - mn) * inv), J - 1)
        # --- t0 = M − j0·Δ: the highest with expected exceedances ≥ target (dense when none is), searched
        # around the bucket gt where the counts reach the target (cum: prefix counts, as far as needed)
        gt = 0
        cum[1] = hist[0]
        while gt < gmax and cum[gt + 1] < target:
            gt += 1
            cum[gt + 1] = cum[gt] + hist[gt]
        for g in range(gt + 1, min(gmax, gt + 24) + 1):
            cum[g + 1] = cum[g] + hist[g]
        unit = 1 if narrow else rf  # in steps of Δ/rf where buckets are crowded (narrow rows), else of Δ
        lo, hi = max(gt - 40, -DUP) * rf // unit, (gt + 20) * rf // unit
        if _expected_jit(hist, cum, gmax, hi * unit, rf, mid) < target:
            j0 = (gmax - DMIN) * rf  # every entry exceeds t0 with probability 1 − 1e-23: drawn as plain normals
        else:
            if _expected_jit(hist, cum, gmax, lo * unit, rf, mid) >= target:
                lo = -DUP * rf // unit
            j0 = _reach_jit(hist, cum, gmax, rf, mid, 0, unit, lo, hi, target) * unit
        t0 = m - j0 * delta / rf  # bucket g's top edge lies a_g = (rf·g − j0)·w/rf (in ε) below t0
        gnear = min(gmax + 1, max(-((-j0 - rf * DFAR) // rf), 0))  # buckets with a_g < DFAR·w walk on their own
        tfar = rf * (DFAR - DMIN)  # the table entry of a = DFAR·w, the bound of the shared far walk
        lshift = -1  # the second threshold of a fallback (see _refill), found at the row's first one
        afar = DFAR * w
        ihfar = 1.0 / haz[tfar]
        lfar = lam[tfar]
        # --- list the near entries bucket by bucket (a branch-free compaction, then a counting sort of the
        # compacted ones only), and the buckets' constants
        nne = 0
        pos = 0
        for g in range(gnear):
            fill[g] = pos
            if hist[g] > 0:
                t = max(rf * (g - DMIN) - j0, 0)
                b_t[nne] = t
                b_start[nne] = g * n if narrow else pos
                b_size[nne] = hist[g]
                b_q[nne] = q[t]
                b_h[nne] = haz[t]
                b_ih[nne] = 1.0 / haz[t]
                b_a[nne] = -math.inf if t == 0 else _bound_jit(t, rf, w)
                b_lam[nne] = lam[t]
                b_il[nne] = 1.0 / lam[t] if lam[t] > 0.0 else 0.0
                nne += 1
            pos += hist[g]
        nnear = pos
        if narrow:
            pass  # listed with the counts
        elif FULLSORT * nnear >= n:  # many near entries: a counting sort of the whole row (no compaction pass)
            for g in range(gnear, gmax + 1):
                fill[g] = pos
                pos += hist[g]
            for i in range(n):
                g = code[i]
                lst[fill[g]] = i
                fill[g] += 1
        elif nnear > 0:
            c = 0
            if 16 * nnear < n:  # few near entries: a rarely taken branch is cheaper
                for i in range(n):
                    if code[i] < gnear:
                        tmp[c] = i
                        c += 1
            else:  # branch-free: near ones are kept
                for i in range(n):
                    tmp[c] = i
                    c += code[i] < gnear
            for u in range(nnear):
                i = tmp[u]
                g = code[i]
                lst[fill[g]] = i
                fill[g] += 1
        for jb in range(0, ns, DB):  # blocks of at most DB draws (bounded buffers for any n_sample)
            nsb = min(DB, ns - jb)
            rnsb = 1.0 / nsb
            # --- the draws of a block at once, bucket by bucket over the grid (entry, draw); exceedances of draw j
            # in vals[j, :cnt[j]] (the Poisson walks run over the concatenated grids, e carried between them)
            cnt[:] = 0
            st, e = _exp_jit(st)
            for u in range(nne):
                ng = b_size[u]
                base = b_start[u]
                if b_q[u] >= QB:  # dense bucket: every entry's normal is drawn in full (cheaper than thinning)
                    for p in range(ng):
                        i = lst[base + p]
                        si = float(row[i])
                        for j in range(nsb):
                            st, z = _normal_jit(st)
                            x = si + eps * z
                            c = cnt[j]
                            vals[j, c] = x
                            idx[j, c] = i
                            cnt[j] = c + (x > t0)  # kept iff it exceeds t0 (branch-free)
                    continue
                h = b_h[u]
                ih = b_ih[u]
                a = b_a[u]
                tot = ng * nsb
                pp = 0
                while True:  # sparse bucket: exponential gaps of the Poisson walk over its ng·nsb grid
                    f = e * ih
                    if not f < tot - pp:
                        e -= (tot - pp) * h
                        break
                    pp += int(f)
                    p = int((pp + 0.5) * rnsb)  # pp // nsb, by a multiplication (exact: pp < 2^40)
                    j = pp - p * nsb
                    i = lst[base + p]
                    st, z = _tn_above_jit(a, b_lam[u], b_il[u], st)
                    x = float(row[i]) + eps * z
                    c = cnt[j]
                    vals[j, c] = x
                    idx[j, c] = i
                    cnt[j] = c + (x > t0)
                    pp += 1
                    st, e = _exp_jit(st)
            if nnear < n:  # far entries: one walk over all (position, draw) pairs, near ones skipped
                tot = n * nsb
                pp = 0
                while True:
                    st, f = _exp_jit(st)
                    f *= ihfar
                    if not f < tot - pp:
                        break
                    pp += int(f)
                    i = int((pp + 0.5) * rnsb)
                    if code[i] >= gnear:
                        st, z = _tn_above_jit(afar, lfar, 1.0 / lfar, st)
                        x = float(row[i]) + eps * z
                        if x > t0:
                            j = pp - i * nsb
                            vals[j, cnt[j]] = x
                            idx[j, cnt[j]] = i
                            cnt[j] += 1
                    pp += 1
            for j in range(nsb):
                cj = cnt[j]
                if cj >= k1:
                    r = _select_jit(vals, idx, j, 0, cj, k1)
                    out_val[b, jb + j] = vals[j, r]
                    out_idx[b, jb + j] = idx[j, r]
                    continue
                # fallback: fewer than k1 exceedances (a few per cent of draws); the rest is found below t0 by _refill
                if lshift < 0:  # the row's first fallback
                    lshift = _shift_jit(hist, cum, gmax, j0, rf, mid, tune[2])
                paths[0] += 1
                st, r = _refill_jit(row, eps, t0, w, rf, lshift, k1, j, cj, vals, idx, mark, code, gnear, lst,
                                    b_start, b_size, b_t, nne, haz, tfar, nnear, tune[3], paths, st)
                out_val[b, jb + j] = vals[j, r]
                out_idx[b, jb + j] = idx[j, r]
        hist[: gmax + 1] = 0


def _hinge_loss(s, labels, margins, scale, k1, eps, n_sample, seed, q0, haz0, lam0, mid0):  # type: ignore[no-untyped-def]
    """The loss forward in one call: the draws (as `sample_kth`), then mean_b relu(scale·(m_b + φ_b − s[b, y_b]))
    with φ_b the mean of row b's draws and m_b = margins[y_b] (margins[0] when it holds one value). Returns (the
    value [1] in s's dtype, the draws' positions [B, n_sample], active[b] = (row b's argument > 0)); a NaN
    argument propagates to the value, as torch.relu's."""
    nb = s.shape[0]
    vals = np.empty((nb, n_sample))
    pos = np.empty((nb, n_sample), np.int64)
    _rows_jit(s, k1, eps, seed, q0, haz0, lam0, mid0, vals, pos, _TUNE, np.zeros(3, np.int64))
    active = np.empty(nb, np.bool_)
    per_class = margins.shape[0] > 1
    tot = 0.0
    for b in range(nb):
        phi = 0.0
        for j in range(n_sample):
            phi += vals[b, j]
        y = labels[b]
        if not 0 <= y < s.shape[1]:  # (the gradient is written at y unchecked)
            raise ValueError("noised_topk: a label is outside 0..num_classes-1")
        z = scale * (margins[y if per_class else 0] + phi / n_sample - float(s[b, y]))
        active[b] = z > 0.0
        tot += z if not z <= 0.0 else 0.0
    value = np.empty(1, s.dtype)
    value[0] = tot / nb
    return value, pos, active


def _hinge_grad(s, pos, labels, active, coef):  # type: ignore[no-untyped-def]
    """The loss gradient [B, n] in s's dtype, written in one pass: row b is w_b·(mean_j onehot(pos[b, j]) −
    onehot(labels[b])) with w_b = coef·active[b]."""
    out = np.empty_like(s)
    nb, ns = pos.shape
    for b in range(nb):
        out[b, :] = 0.0
        if active[b]:
            for j in range(ns):
                out[b, pos[b, j]] += coef / ns
            out[b, labels[b]] -= coef
    return out


_next_jit = _next
_unif_jit = _unif
_normal_jit = _normal
_exp_jit = _exponential
_minmax_jit = _minmax
_minmax32_jit = _minmax32
_tn_above_jit = _tn_above
_select_jit = _select
_expected_jit = _expected
_bound_jit = _bound
_tn_between_jit = _tn_between
_shift_jit = _shift
_reach_jit = _reach
_take_below_jit = _take_below
_walk_jit = _walk
_refill_jit = _refill
fill_tables_jit = fill_tables
_rows_jit = _rows
_hinge_loss_jit = _hinge_loss  # replaced by the compiled versions in _kernel()
_hinge_grad_jit = _hinge_grad
_KERNEL = None
_TABLES: tuple[np.ndarray, ...] | None = None


def _prefetch(arr, row, col):  # type: ignore[no-untyped-def]
    """A hint to fetch arr[row, col]'s cache line (replaced by the compiled intrinsic in _kernel())."""


_prefetch_jit = _prefetch


def _as_float32(bits):  # type: ignore[no-untyped-def]
    """The float32 with these int32 bits (replaced by the compiled intrinsic in _kernel())."""
    return np.int32(bits).view(np.float32)


_as_float32_jit = _as_float32


def _as_float32_intrinsic():  # type: ignore[no-untyped-def]
    """Bit cast int32 → float32 as a numba intrinsic."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def as_float32(typingctx, bits):  # type: ignore[no-untyped-def]
        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.int32), codegen

    return as_float32


def _prefetch_intrinsic():  # type: ignore[no-untyped-def]
    """llvm.prefetch of arr[row, col] (read, high locality) as a numba intrinsic: numba has no prefetch."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def prefetch(typingctx, arr, row, col):  # type: ignore[no-untyped-def]
        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            ptr = cgutils.get_item_pointer(context, builder, signature.args[0], ary, [args[1], args[2]])
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
            builder.call(fn, [ptr, i32(0), i32(3), i32(1)])
            return context.get_dummy_value()

        return types.void(arr, row, col), codegen

    return prefetch


def _kernel():  # type: ignore[no-untyped-def]
    """Compile the sampler once (numba, cached on disk); imported lazily so `import losses` stays fast."""
    global _KERNEL, _TABLES
    if _KERNEL is None:
        import numba

        jit = numba.njit(cache=True, error_model="numpy")  # x / 0 = inf where a hazard underflows to 0
        g = globals()
        inline = numba.njit(cache=True, error_model="numpy", inline="always")  # no per-call array refcounts
        for name, fn in (("_next_jit", _next), ("_unif_jit", _unif), ("_normal_jit", _normal),
                         ("_exp_jit", _exponential), ("_tn_above_jit", _tn_above)):
            g[name] = inline(fn)
        for name, fn in (("_select_jit", _select), ("_expected_jit", _expected), ("_bound_jit", _bound),
                         ("_tn_between_jit", _tn_between), ("_take_below_jit", _take_below),
                         ("_walk_jit", _walk), ("_reach_jit", _reach)):
            g[name] = inline(fn)
        g["_prefetch_jit"] = _prefetch_intrinsic()
        g["_as_float32_jit"] = _as_float32_intrinsic()
        g["_minmax32_jit"] = jit(_minmax32)
        g["_shift_jit"] = jit(_shift)
        g["_refill_jit"] = jit(_refill)
        g["fill_tables_jit"] = jit(fill_tables)
        g["_minmax_jit"] = numba.njit(cache=True, fastmath=True)(_minmax)
        g["_hinge_grad_jit"] = jit(_hinge_grad)
        g["_hinge_loss_jit"] = jit(_hinge_loss)
        _KERNEL = g["_rows_jit"] = jit(_rows)
        tables = (np.empty(_NT), np.empty(_NT), np.empty(_NT), np.empty(_NM))
        fill_tables(W, RF, *tables)
        _TABLES = tables
    return _KERNEL


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernels for float32 scores, the common case, so that the
    first training step (and bench-loss's memory pass) does not pay for it."""
    sample_kth(np.zeros((1, 2), np.float32), 1, 1.0, 1, 0)
    s, labels = np.zeros((1, 2), np.float32), np.zeros(1, np.int64)
    _, pos, active = hinge_loss(s, labels, np.ones(1), 1.0, 1, 1.0, 1, 0)
    hinge_grad(s, pos, labels, active, 1.0)


def sample_kth(s: np.ndarray, k1: int, eps: float, n_sample: int, seed: int, paths: np.ndarray | None = None,
               tune: tuple[float, float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(values [B, n_sample] float64, positions [B, n_sample] int64) of the k1-th largest of s + εZ per draw.

    s: C-contiguous float32 or float64 [B, n]; 1 ≤ k1 ≤ n; eps > 0; seed: any int (only its low 64 bits).
    For the tests: paths, an int64 [3] array the fallbacks are counted into (see _rows); tune, other values of
    (TARGET_SD, TARGET_ADD, SHIFT_EXTRA, FARHITS), which change the speed but not the law."""
    kernel = _kernel()
    assert _TABLES is not None
    out_val = np.empty((s.shape[0], n_sample), np.float64)
    out_idx = np.empty((s.shape[0], n_sample), np.int64)
    kernel(s, int(k1), float(eps), np.uint64(seed & 0xFFFFFFFFFFFFFFFF), *_TABLES, out_val, out_idx,
           _TUNE if tune is None else np.array(tune, np.float64), np.zeros(3, np.int64) if paths is None else paths)
    return out_val, out_idx


def hinge_loss(s: np.ndarray, labels: np.ndarray, margins: np.ndarray, scale: float, k1: int, eps: float,
               n_sample: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The noised hinge's CPU forward (see `_hinge_loss`): (value [1] in s's dtype, positions [B, n_sample],
    active [B]). s: C-contiguous float32 or float64 [B, n]; labels int64 [B]; margins float64, per class or one."""
    _kernel()
    assert _TABLES is not None
    return _hinge_loss_jit(s, labels, margins, float(scale), int(k1), float(eps), int(n_sample),
                           np.uint64(seed & 0xFFFFFFFFFFFFFFFF), *_TABLES)


def hinge_grad(s: np.ndarray, pos: np.ndarray, labels: np.ndarray, active: np.ndarray, coef: float) -> np.ndarray:
    """The noised hinge's CPU gradient [B, n] in s's dtype (see `_hinge_grad`)."""
    _kernel()
    return _hinge_grad_jit(s, pos, labels, active, float(coef))
