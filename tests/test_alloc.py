"""alloc.py: large tensors on huge pages after `import tinymixtral`, and keep_heap keeping freed memory.

Each case runs in a fresh interpreter: both settings act once per process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's /proc and glibc")


def python(code: str, **env) -> str:
    e = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    e.update(PYTHONPATH=SRC, **env)
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True,
                          timeout=120).stdout


HUGE = """
import tinymixtral, torch
x = torch.ones(16 << 20)  # 64 MB, touched
print(next(l.split()[1] for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')))
"""


@linux
@pytest.mark.skipif(not THP.exists() or "[madvise]" not in THP.read_text(), reason="THP in madvise mode only")
def test_import_puts_large_tensors_on_huge_pages():
    assert int(python(HUGE)) >= 32 << 10  # kB: most of the 64 MB
    assert int(python(HUGE, THP_MEM_ALLOC_ENABLE="0")) == 0  # the user's setting wins


KEEP = """
import os, torch
from tinymixtral.alloc import keep_heap
applied = keep_heap() if {keep} else None
def rss(): return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
x = torch.ones(4 << 20)  # 16 MB: under the 32 MB threshold
before = rss()
del x
print(applied, (before - rss()) >> 20)  # MB handed back at the free
"""


@linux
def test_keep_heap_keeps_freed_memory():
    handed_back = python(KEEP.format(keep=False), THP_MEM_ALLOC_ENABLE="0").split()
    assert int(handed_back[1]) >= 12  # glibc's default: a block this size is mmap'd and handed back at the free
    kept = python(KEEP.format(keep=True), THP_MEM_ALLOC_ENABLE="0").split()
    if kept[0] != "True":
        pytest.skip("not glibc")
    assert int(kept[1]) <= 1, kept  # kept in the heap for the next step
