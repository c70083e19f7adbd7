"""Freed host memory kept for reuse (`resd.allocator`), measured in page faults.

Blocks of 64 and 48 MiB are above glibc's mmap threshold: as glibc stands, freeing the
first gives its pages back, and the second is mapped afresh, 12,288 new 4 KiB pages
faulted in. Kept, the second block is cut from the first one's pages. (A block of the
very same size would not fit: `posix_memalign` asks a little more than the freed block
holds.) Each case runs in a process of its own, since the setting lasts as long as the
process.
"""

from __future__ import annotations

import logging
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

# Prints the minor page faults of allocating and filling 48 MiB after freeing 64 MiB.
REFAULT = """
import resource, torch
torch.ones(64 * 2**20 // 4).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(48 * 2**20 // 4)
print("FAULTS", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = 48 * 2**20 // 4096


def refaults(setup: str, tmp_path) -> int:
    script = tmp_path / "refault.py"
    script.write_text(textwrap.dedent(setup) + REFAULT)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split("FAULTS")[-1])


def test_freed_memory_is_handed_out_again_without_faulting_pages_in(tmp_path):
    as_is = refaults("", tmp_path)
    kept = refaults(
        "from resd.allocator import keep_freed_memory\nassert keep_freed_memory()\n", tmp_path
    )
    assert as_is > PAGES // 2  # the premise: glibc as it stands maps the block afresh
    assert kept < PAGES // 20


@pytest.mark.parametrize("keep", [True, False])
def test_the_trainer_keeps_freed_memory_on_cpu_unless_told_not_to(tiny_model_dir, tmp_path, keep):
    trainer = f"""
    from resd.config import load_config
    from resd.training.trainer import Trainer
    Trainer(load_config(None, ["model={tiny_model_dir}", "env=arithmetic", "device=cpu",
                               "output_dir={tmp_path / "run"}", "keep_host_memory={str(keep).lower()}"]))
    """
    faults = refaults(trainer, tmp_path)
    assert (faults < PAGES // 20) if keep else (faults > PAGES // 2)


# The cases below run in the test process itself: at most they set what any trainer test
# on the CPU in this process sets already (no mmap), and glibc refuses or is never asked
# the rest.


def test_a_setting_glibc_refuses_is_reported_not_claimed(monkeypatch, caplog):
    """Catches `keep_freed_memory` answering True (or nothing) and staying silent when glibc
    refuses a setting: mallopt parameter 1 (M_MXFAST) takes at most 160 bytes, not 2 GiB."""
    from resd import allocator

    monkeypatch.setattr(allocator, "M_TRIM_THRESHOLD", 1)
    with caplog.at_level(logging.WARNING, logger="resd.allocator"):
        assert allocator.keep_freed_memory() is False
    assert "glibc refused mallopt" in caplog.text


def test_a_c_library_that_cannot_be_loaded_is_left_as_it_is(monkeypatch):
    """Catches `keep_freed_memory` raising (and so failing the trainer) when the C library
    it finds will not load, instead of answering False."""
    import ctypes.util

    from resd import allocator

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "/nonexistent/libc.so.6")
    assert allocator.keep_freed_memory() is False


def test_a_system_without_glibc_is_left_as_it_is(monkeypatch):
    """Catches `keep_freed_memory` going on to glibc's settings (or answering anything but
    False) where Python finds another C library: musl reports no glibc version."""
    from resd import allocator

    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.keep_freed_memory() is False
