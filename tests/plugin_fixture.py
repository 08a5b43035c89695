"""A third-party loss plugin installed the way real ones are (a dist-info with an entry point),
so that spawned workers and subprocess runners see it too."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

PLUGIN = '''
"""Test plugin: losses that hang, or fail the way an allocation failure does."""
import os
import time

from torch import nn

from harness import register_loss


class _Base(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()


@register_loss("test_hang", family="test")
class HangLoss(_Base):
    """Sleeps far beyond any budget on its first call (a hung run)."""

    def forward(self, scores, labels):
        time.sleep(float(os.environ.get("TOPK_TEST_HANG_SECONDS", "600")))
        return scores.logsumexp(1).mean()


@register_loss("test_cpu_oom", family="test")
class CpuOomLoss(_Base):
    def forward(self, scores, labels):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
'''


def install_plugin(site: Path) -> Path:
    """Write the plugin module and its dist-info into `site`; import it here. Returns `site`."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "topk_test_plugin.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "topk_test_plugin-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: topk-test-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[topk_bench.losses]\ntest_plugin = topk_test_plugin\n")
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    import topk_test_plugin  # noqa: F401  (registers in this process)

    return site


def uninstall_plugin(site: Path) -> None:
    """Forget the plugin's losses and module in this process."""
    from harness.registry import LOSSES

    for name in ("test_hang", "test_cpu_oom"):
        LOSSES._entries.pop(name, None)
    sys.modules.pop("topk_test_plugin", None)
    if str(site) in sys.path:
        sys.path.remove(str(site))
