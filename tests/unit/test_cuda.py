"""CUDA: every loss gives the CPU's values and gradients; bench-loss and a bf16 training run work.

Marked `cuda`: skipped on machines without a GPU (see tests/conftest.py).
"""
from __future__ import annotations

import pytest
import torch

import harness
import losses  # noqa: F401
from harness.lossbench import bench_losses

pytestmark = pytest.mark.cuda
BUILTIN = [e.name for e in harness.list_losses() if e.obj is not None and e.obj.__module__.startswith("losses.")]
SORTERS = ["odd_even", "bitonic", "splitter_selection", "neuralsort", "softsort", "sinkhorn"]


def _value_and_grad(loss, x, y):
    x = x.clone().requires_grad_()
    value = loss(x, y)
    value.backward()
    return value.detach().cpu(), x.grad.cpu()


@pytest.mark.parametrize("name,params", [(n, {}) for n in BUILTIN if n not in ("difftopk", "noised_topk")]
                         + [("difftopk", {"sorter": s, "m": 16}) for s in SORTERS])
def test_cuda_matches_cpu(name, params):
    torch.manual_seed(0)
    x, y = torch.randn(32, 100) * 3, torch.randint(0, 100, (32,))
    loss = harness.build_loss(name, 100, **params)
    v_cpu, g_cpu = _value_and_grad(loss, x, y)
    v_gpu, g_gpu = _value_and_grad(loss.cuda(), x.cuda(), y.cuda())
    assert torch.allclose(v_cpu, v_gpu, rtol=1e-4, atol=1e-6)
    assert torch.allclose(g_cpu, g_gpu, rtol=1e-3, atol=1e-6 * g_cpu.abs().max().item())


@pytest.mark.parametrize("name", BUILTIN)
def test_cuda_bf16_scores(name):
    params = {"p_k": [0.5, 0, 0, 0, 0.5], "m": 16} if name == "difftopk" else {}
    loss = harness.build_loss(name, 100, **params).cuda()
    x = torch.randn(16, 100, device="cuda").bfloat16().requires_grad_()
    value = loss(x, torch.randint(0, 100, (16,), device="cuda"))
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value) and torch.isfinite(x.grad.float()).all()


def test_bench_loss_on_cuda():
    df = bench_losses([("difftopk", {"sorter": "bitonic", "m": 16}), ("berrada_smooth", {})], [1000], 128, "cuda",
                      None, repeats=3, warmup=1, reference=False)
    assert (df.status == "ok").all() and (df.median_ms > 0).all() and (df.peak_mem_mb >= 0).all()


def test_bf16_training_run_on_cuda(write_suite, tmp_path):
    from harness.cli import main

    path = write_suite("""
suite: cuda
seeds: [0]
dataset: {name: synthetic, params: {classes: 20, superclasses: 4, train_size: 512, val_size: 128, test_size: 128}}
model: {name: mlp, params: {hidden: 32}}
train: {epochs: 2, batch_size: 64, amp: bf16}
losses: [softmax, berrada_smooth, {name: difftopk, params: {sorter: bitonic}}]
resources: {device: cuda}
""")
    assert main(["run", str(path), "--results-dir", str(tmp_path / "r")]) == 0
