"""LapSum soft top-k (Struski, Bednarczyk, Podolak, Tabor, ICML 2025) and its top-k cross-entropy.

Ł. Struski et al. "LapSum – One Method to Differentiate Them All: Ranking, Sorting and Top-k
Selection", ICML 2025. With the Laplace CDF F(u) = ½e^u (u ≤ 0), 1 − ½e^{−u} (u > 0) and a scale
α > 0, the soft top-k of scores s is

    p_i = F((s_i − b)/α),   b such that Σ_i p_i = k,

for any real k ∈ (0, n). Σ_i F((s_i − b)/α) is, between two consecutive sorted scores, of the form
c + ½A·e^{−t} − ½B·e^{t}, so after one sort (and cumulative log-sum-exps for A and B at every knot)
b is the root of a quadratic in e^t on the segment where the knot values cross k: O(n log n) and
O(n) memory. Gradients by the implicit-function theorem on Σ F = k, with f_i = F'(u_i) = ½e^{−|u_i|}:
∂b/∂s_i = f_i/Σf, ∂b/∂k = −α/Σf, ∂b/∂α = −Σ f_i u_i / Σf; p then differentiates through autograd, so
the operator has gradients in the scores, α **and k** (fractional or learned k).

Choices the paper leaves open, and ours:
* The quadratic's root is taken in log form, ``log T = log(|c| + √(c² + AB)) − log B`` (c > 0) or
  ``log A − log(|c| + √(c² + AB))`` (c ≤ 0), with log A, log B from one-step recurrences over the
  sorted scores: no overflow for any α or score scale, no cancellation; b is clamped to its segment
  against rounding. The sort and the O(n) scan run in float64 on the CPU (numpy's sort, a numba loop:
  torch's CPU sort and logcumsumexp cost ~50× CE at n = 1000 here); CUDA tensors make a round trip.
* Classification loss: the top-k cross-entropy of Petersen et al. 2022 over p (``losses.topk_ce``),
  with P_K = [.5, 0, 0, 0, .5] and the k = 1 term by softmax (``top1_mode=sm``) by default — the setup
  of the top-k learning experiments that LapSum compares against; one b per k in the support of P_K.
* α = 1 by default (scores in logit units); α → 0 gives the hard top-k mask (ties aside).
"""
from __future__ import annotations

import numpy as np
import torch

from harness.registry import Log, Param, register_loss
from losses.topk_ce import TopKCrossEntropy, topk_ce_params


def laplace_cdf(u: torch.Tensor) -> torch.Tensor:
    """F(u) = ½e^u for u ≤ 0, 1 − ½e^{−u} for u > 0 (no overflow on either side)."""
    half = 0.5 * torch.exp(-u.abs())
    return torch.where(u > 0, 1 - half, half)


def _thresholds(xs: np.ndarray, decays: np.ndarray, k: np.ndarray, out: np.ndarray) -> None:
    """b' [B, J] with Σ_i F(x_i − b') = k for ascending rows xs [B, n] (scores / α), float64 (compiled).

    A_j = Σ_{i≤j} e^{xs_i − xs_j} ∈ [1, n] and B_j = Σ_{i>j} e^{−(xs_i − xs_j)} ∈ [0, n) by their one-step
    recurrences (decays[:, j] = e^{−(xs_j − xs_{j−1})}, precomputed; no overflow; B may underflow, so log B
    is re-derived where used); the knot values Σ F(x − xs_j) = (n−1−j) + ½A_j − ½B_j decrease in j.
    """
    batch, n = xs.shape
    a = np.empty(n)
    bb = np.empty(n)
    for row in range(batch):
        x = xs[row]
        decay = decays[row]
        a[0] = 1.0
        for j in range(1, n):
            a[j] = 1.0 + a[j - 1] * decay[j]
        bb[n - 1] = 0.0
        for j in range(n - 2, -1, -1):
            bb[j] = decay[j + 1] * (1.0 + bb[j + 1])
        for col in range(k.shape[1]):
            kk = k[row, col]
            lo, hi = 0, n  # count = #{j : knot_j ≥ k} (knots decrease)
            while lo < hi:
                mid = (lo + hi) // 2
                if (n - 1 - mid) + 0.5 * a[mid] - 0.5 * bb[mid] >= kk:
                    lo = mid + 1
                else:
                    hi = mid
            count = lo
            if count == 0:  # b' below every score: n − ½ e^{b'} Σ e^{−x} = k
                out[row, col] = np.log(2 * (n - kk)) + x[0] - np.log1p(bb[0])
            elif count == n:  # above every score: ½ e^{−b'} Σ e^{x} = k
                out[row, col] = x[n - 1] + np.log(a[n - 1]) - np.log(2 * kk)
            else:
                j = count - 1
                la = np.log(a[j])
                lb = -(x[j + 1] - x[j]) + np.log1p(bb[j + 1])  # log B_j without underflow
                c = (n - 1 - j) - kk
                log_c = np.log(abs(c)) if c != 0 else -np.inf
                root = np.logaddexp(log_c, 0.5 * np.logaddexp(2 * log_c, la + lb))  # log(|c| + √(c² + AB))
                b = x[j] + (root - lb if c > 0 else la - root)
                out[row, col] = min(max(b, x[j]), x[j + 1])


_KERNEL = None


def _threshold(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """b' with Σ_i F(x_i − b') = k for x [B, n] (scores / α) and k [B, J] in (0, n): [B, J]."""
    global _KERNEL
    if _KERNEL is None:
        import numba

        _KERNEL = numba.njit(cache=True)(_thresholds)
    # values only, sorted in the input's precision (exact) by numpy's vectorised sort: far faster than torch's
    values = x.detach().cpu()
    values = values if values.dtype in (torch.float32, torch.float64) else values.double()
    xs = np.sort(values.numpy(), axis=1).astype(np.float64)
    decays = np.empty_like(xs)  # e^{−(xs_j − xs_{j−1})}: one vectorised exp instead of n scalar ones per row
    decays[:, 0] = 0.0
    np.exp(xs[:, :-1] - xs[:, 1:], out=decays[:, 1:])
    out = np.empty(tuple(k.shape))
    _KERNEL(xs, decays, np.ascontiguousarray(k.detach().double().cpu().numpy()), out)
    return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)


class _LapSumThreshold(torch.autograd.Function):
    """(s [B, n], k [B, J], α [B, 1]) -> b [B, J] with Σ_i F((s_i − b)/α) = k; implicit gradient."""

    @staticmethod
    def forward(ctx, s, k, alpha):  # type: ignore[override]
        b = _threshold(s / alpha, k) * alpha
        ctx.save_for_backward(s, b, alpha)
        return b

    @staticmethod
    def backward(ctx, grad_b):  # type: ignore[override]
        s, b, alpha = ctx.saved_tensors
        u = (s.unsqueeze(1) - b.unsqueeze(2)) / alpha.unsqueeze(2)  # [B, J, n]
        weight = torch.softmax(-u.abs(), dim=2)  # f_i / Σf, stable when every f_i underflows
        grad_s = (grad_b.unsqueeze(2) * weight).sum(1)
        grad_alpha = None
        if ctx.needs_input_grad[2]:  # a constant α (the loss's) needs none
            grad_alpha = -(grad_b * (weight * u).sum(2)).sum(1, keepdim=True)
        grad_k = None
        if ctx.needs_input_grad[1]:  # ∂b/∂k = −α/Σf (unbounded when b sits in a wide gap between scores)
            total = 0.5 * torch.logsumexp(-u.abs(), dim=2).exp()
            grad_k = -alpha * grad_b / total
        return grad_s, grad_k, grad_alpha


CHUNK = 16  # scores per chunk of the candidate bound in _label_thresholds


def _label_thresholds(e: np.ndarray, ks: np.ndarray, state: np.ndarray) -> None:
    """T = e^{b' − max x} [B, J] with Σ_i F(x_i − b') = ks[j] for rows e = exp(x − max x) [B, n] (x = scores/α),
    float64, without a sort; (T, Σ_i e^{−|x_i − b'|}) per threshold into state [B, J, 2].

    On a segment between consecutive scores Σ F = c + ½A/T − ½B·T (c scores above b', i.e. e_i > T;
    A = Σ_below e_i, B = Σ_above 1/e_i): solving that model for T from the current segment gives
    b'_new ≥ b'* (each term's model majorises F, cosh ≥ 1), so from T_0 = Σe/2k (every score below) the
    iterates decrease to the root, exact once the segment stops changing. b'* ≥ x_(2k) (the 2k largest
    scores have F ≥ ½ there) ≥ L, the 2k-th largest maximum of chunks of CHUNK scores; so only scores
    above L can be above b': one pass collects them (and Σe over the rest), the steps read only those."""
    batch, n = e.shape
    jmax = ks.shape[0]
    need = min(n, 2 * int(np.ceil(ks.max())))
    chunks = (n + CHUNK - 1) // CHUNK
    maxima = np.empty(chunks)
    sums = np.empty(chunks)
    best = np.empty(need)
    cand = np.empty(n)
    for row in range(batch):
        es = e[row]
        total = 0.0
        for c in range(chunks):  # chunk maxima and sums (full chunks: a fixed trip count that vectorises)
            mx, sm = 0.0, 0.0
            base = c * CHUNK
            if base + CHUNK <= n:
                for i in range(CHUNK):
                    v = es[base + i]
                    mx = max(mx, v)
                    sm += v
            else:
                for i in range(base, n):
                    mx = max(mx, es[i])
                    sm += es[i]
            maxima[c] = mx
            sums[c] = sm
            total += sm
        low = -1.0
        if chunks > need:  # the need-th largest chunk maximum: a descending buffer of the need largest
            filled = 0
            for c in range(chunks):
                v = maxima[c]
                if filled == need and v <= best[need - 1]:
                    continue
                pos = filled if filled < need else need - 1
                filled = min(filled + 1, need)
                while pos > 0 and best[pos - 1] < v:
                    best[pos] = best[pos - 1]
                    pos -= 1
                best[pos] = v
            low = best[need - 1]
        rest, top = 0.0, 0
        for c in range(chunks):  # only chunks reaching above L hold candidates; the others add their sums
            if maxima[c] <= low:
                rest += sums[c]
                continue
            for i in range(c * CHUNK, min(n, c * CHUNK + CHUNK)):
                if es[i] > low:
                    cand[top] = es[i]
                    top += 1
                else:
                    rest += es[i]
        for j in range(jmax):
            k = ks[j]
            t = total / (2 * k)
            count, a, bb = -1, rest, 0.0
            for _ in range(top + 2):
                c, a, bb = 0, rest, 0.0
                for i in range(top):
                    if cand[i] > t:
                        c += 1
                        bb += 1.0 / cand[i]
                    else:
                        a += cand[i]
                if c == count:
                    break
                count = c
                gap = k - c
                root = np.sqrt(gap * gap + a * bb)
                t = a / (gap + root) if gap > 0 else ((root - gap) / bb if bb > 0 else t)
            state[row, j, 0] = t
            state[row, j, 1] = a / t + bb * t


def _label_threshold_backward(e: np.ndarray, state: np.ndarray, grad: np.ndarray, out: np.ndarray) -> None:
    """out[b, i] = Σ_j grad[b, j]·e^{−|x_i − b'_j|}/Σ_l e^{−|x_l − b'_j|} (∂b/∂s, the implicit function)."""
    batch, n = e.shape
    for row in range(batch):
        for j in range(state.shape[1]):
            t, c = state[row, j, 0], grad[row, j] / state[row, j, 1]
            below = c / t  # e^{x_i − b'} = e_i/T below b', T/e_i above
            for i in range(n):
                ei = e[row, i]
                f = ei * below if ei <= t else c * t / ei
                out[row, i] = f if j == 0 else out[row, i] + f


_LABEL_KERNELS: dict = {}


def _solve_fixed(s: torch.Tensor, ks: tuple, alpha: float, top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(e = exp((s − max s)/α) [B, n], state [B, J, 2] of ``_label_thresholds``), float64, CPU."""
    if not _LABEL_KERNELS:
        import numba

        # rows are finite (wider ones take the general path); error_model="numpy": no zero-division checks
        options = {"cache": True, "nogil": True, "error_model": "numpy"}
        _LABEL_KERNELS["rows"] = numba.njit(fastmath=True, **options)(_label_thresholds)
        _LABEL_KERNELS["backward"] = numba.njit(fastmath={"contract"}, **options)(_label_threshold_backward)
    e = s.detach().numpy().astype(np.float64)
    e -= top.astype(np.float64)[:, None]
    if alpha != 1:
        e /= alpha
    np.exp(e, out=e)  # one vectorised pass, the only [B, n] temporary
    state = np.empty((e.shape[0], len(ks), 2))
    _LABEL_KERNELS["rows"](e, np.asarray(ks, dtype=np.float64), state)
    return e, state


class _LapSumFixed(torch.autograd.Function):
    """(s [B, n] float32/64 on the CPU, rows spanning ≤ 600·α, constant ks [J] and α) -> b [B, J] with
    Σ_i F((s_i − b)/α) = k_j; gradient in s only (the loss's k and α are constants)."""

    @staticmethod
    def forward(ctx, s, ks: tuple, alpha: float, top):  # type: ignore[override]
        e, state = _solve_fixed(s, ks, alpha, top)
        ctx.save_for_backward(torch.from_numpy(e), torch.from_numpy(state))
        ctx.dtype = s.dtype
        b = top.astype(np.float64)[:, None] + alpha * np.log(state[:, :, 0])
        return torch.from_numpy(b).to(s.dtype)

    @staticmethod
    def backward(ctx, grad_b):  # type: ignore[override]
        e, state = (a.numpy() for a in ctx.saved_tensors)
        out = np.empty(e.shape, dtype=np.float32 if ctx.dtype == torch.float32 else np.float64)
        _LABEL_KERNELS["backward"](e, state, np.ascontiguousarray(grad_b.detach().double().numpy()), out)
        return torch.from_numpy(out), None, None, None


class _LapSumMass(torch.autograd.Function):
    """(s [B, n] CPU float32/64 spanning ≤ 600·α, labels [B], constant ks, weights [J] and α) ->
    Σ_j w_j·F((s_y − b_j)/α), [B]: the loss's label mass in one node. With c_j = w_j·F'(u_yj)/α,
    ∂/∂s_i = Σ_j c_j·(δ_iy − ∂b_j/∂s_i): the threshold backward fed −g·c_j, plus g·Σ_j c_j at the label."""

    @staticmethod
    def forward(ctx, s, labels, ks: tuple, weights: tuple, alpha: float, top):  # type: ignore[override]
        e, state = _solve_fixed(s, ks, alpha, top)
        rows = np.arange(e.shape[0])
        idx = labels.numpy()
        u = np.log(e[rows, idx])[:, None] - np.log(state[:, :, 0])  # (s_y − b_j)/α, [B, J]
        half = 0.5 * np.exp(-np.abs(u))  # F'(u)
        w = np.asarray(weights, dtype=np.float64)
        mass = np.where(u > 0, 1 - half, half) @ w
        ctx.save_for_backward(torch.from_numpy(e), torch.from_numpy(state), torch.from_numpy(half * w / alpha),
                              labels)
        ctx.dtype = s.dtype
        return torch.from_numpy(mass).to(s.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        e, state, coef, labels = ctx.saved_tensors
        e, state, coef = e.numpy(), state.numpy(), coef.numpy()
        g = grad.detach().double().numpy()
        out = np.empty(e.shape, dtype=np.float32 if ctx.dtype == torch.float32 else np.float64)
        _LABEL_KERNELS["backward"](e, state, np.ascontiguousarray(-g[:, None] * coef), out)
        out[np.arange(out.shape[0]), labels.numpy()] += g * coef.sum(1)
        return torch.from_numpy(out), None, None, None, None, None


def _fits(s: torch.Tensor, alpha: float) -> np.ndarray | None:
    """Row maxima of s when the label kernels apply (CPU float32/64, rows spanning ≤ 600·α, no NaN), else None."""
    if s.device.type != "cpu" or s.dtype not in (torch.float32, torch.float64):
        return None
    values = s.detach().numpy()
    top = values.max(1)
    return top if float((top - values.min(1)).max()) <= 600 * alpha else None  # e = exp(x − max x) stays normal


def lapsum_thresholds_fixed(s: torch.Tensor, ks: list[float], alpha: float) -> torch.Tensor:
    """``lapsum_threshold(s, ks (one row for every sample), alpha)`` [B, J] for constant ks and α (gradient in
    s only); on the CPU by ``_label_thresholds`` (no sort), elsewhere or for very wide rows the general path."""
    n = s.shape[1]
    if any(not 0 < k < n for k in ks) or not alpha > 0:
        raise ValueError(f"LapSum needs 0 < k < n={n} and alpha > 0")
    top = _fits(s, alpha)
    if top is not None:
        return _LapSumFixed.apply(s, tuple(float(k) for k in ks), float(alpha), top)
    k = torch.tensor(ks, dtype=s.dtype, device=s.device).expand(s.shape[0], len(ks))
    return lapsum_threshold(s, k, alpha)


def lapsum_threshold(s: torch.Tensor, k: torch.Tensor | float, alpha: torch.Tensor | float) -> torch.Tensor:
    """The threshold b [B, J] for scores [B, n], k broadcastable to [B, J] (default J = 1), α to [B, 1]."""
    k = torch.as_tensor(k, dtype=s.dtype, device=s.device)
    alpha = torch.as_tensor(alpha, dtype=s.dtype, device=s.device)
    k = k.reshape(1, 1) if k.dim() == 0 else k.reshape(k.shape[0], -1) if k.dim() <= 2 else k
    k = k.expand(s.shape[0], k.shape[1])
    n = s.shape[1]
    if bool(((k <= 0) | (k >= n)).any()):
        raise ValueError(f"LapSum needs 0 < k < n={n}")
    alpha = alpha.reshape(-1, 1).expand(s.shape[0], 1)
    if bool((alpha <= 0).any()):
        raise ValueError("LapSum needs alpha > 0")
    return _LapSumThreshold.apply(s, k, alpha)


def lapsum_topk(s: torch.Tensor, k: torch.Tensor | float, alpha: torch.Tensor | float) -> torch.Tensor:
    """Soft top-k mask p [B, n] (or [B, J, n] for k of shape [B, J] with J > 1), Σ_i p_i = k."""
    b = lapsum_threshold(s, k, alpha)
    a = torch.as_tensor(alpha, dtype=s.dtype, device=s.device).reshape(-1, 1, 1)
    p = laplace_cdf((s.unsqueeze(1) - b.unsqueeze(2)) / a)
    return p.squeeze(1) if p.shape[1] == 1 else p


@register_loss(
    "lapsum",
    family="lapsum",
    paper="Struski, Bednarczyk, Podolak, Tabor. LapSum - One Method to Differentiate Them All: "
    "Ranking, Sorting and Top-k Selection. ICML 2025",
    version=1,
    contract={"params": {"p_k": [0.5, 0.5]}, "min_classes": 3},  # harness.testing: K = len(p_k) < n
    params={**topk_ce_params(), "alpha": Param(float, 1.0, gt=0.0, doc="Laplace scale α (temperature)",
                                                      search=Log(1e-2, 10.0))},
)
class LapSumLoss(TopKCrossEntropy):
    """Top-k cross-entropy over the LapSum soft top-k mask."""

    def __init__(self, num_classes: int, p_k: list | tuple = (0.5, 0.0, 0.0, 0.0, 0.5), m: int | None = None,
                 top1_mode: str = "sm", alpha: float = 1.0) -> None:
        super().__init__(num_classes, p_k, m, top1_mode)
        if not alpha > 0:
            raise ValueError(f"alpha={alpha} must be > 0")
        self.alpha = float(alpha)

    def label_mass(self, s: torch.Tensor, labels: torch.Tensor, ks: list[int], weights: list[float]) -> torch.Tensor:
        top = _fits(s, self.alpha)
        if top is not None and 0 < min(ks) and max(ks) < s.shape[1]:  # one node, CPU kernels
            return _LapSumMass.apply(s, labels, tuple(float(k) for k in ks), tuple(weights), self.alpha, top)
        b = lapsum_thresholds_fixed(s, ks, self.alpha)  # [B, J]
        s_y = s.gather(1, labels.unsqueeze(1))
        p_y = laplace_cdf((s_y - b) / self.alpha)  # [B, J]
        return p_y @ torch.tensor(weights, dtype=s.dtype, device=s.device)
