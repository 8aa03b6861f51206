"""Building tinymixtral's C++ kernels (`csrc/*.cpp`) on first use, with torch's cpp_extension: the flags of this
machine's CPU (AVX2 + FMA + F16C, and its VNNI instructions where it has them), cached in torch's extensions
directory under a name that hashes the sources, torch's version and the flags."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import sys
from pathlib import Path

import torch

from ..errors import first_line


def load_avx2() -> bool:
    """Build (on first use) and load the AVX2 kernels; False, with one line on stderr if the build fails."""
    if os.environ.get("TINYMIXTRAL_KERNELS", "").lower() == "torch":
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    flags = cpuinfo()
    if flags and not all(f" {f}" in flags for f in ("avx2", "fma", "f16c")):
        return False
    try:
        from torch.utils import cpp_extension

        if shutil.which("ninja") is None:  # the `ninja` package's binary, where its venv is not on PATH
            with contextlib.suppress(ImportError):
                import ninja
                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        csrc = Path(__file__).parent / "csrc"
        srcs = sorted(csrc.glob("*.cpp"))
        cflags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", *vnni_flags(flags)]  # omp: torch's (libgomp)
        text = "".join(f.read_text() for f in sorted(csrc.glob("*.[ch]*")))
        tag = hashlib.sha1((text + torch.__version__ + " ".join(cflags)).encode()).hexdigest()[:12]
        name = f"tinymixtral_avx2_{tag}"
        build_dir = Path(cpp_extension._get_build_directory(name, False))
        if not (build_dir / f"{name}.so").exists():
            print("tinymixtral: building the AVX2 int8/int4 kernels (once; about a minute)", file=sys.stderr)
        with build_lock(build_dir):
            cpp_extension.load(name=name, sources=[str(f) for f in srcs], extra_cflags=cflags,
                               extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        return True
    except Exception as e:  # no compiler, no ninja, a failed build: torch's kernels
        print(f"tinymixtral: AVX2 kernels unavailable ({first_line(e)}); using torch's", file=sys.stderr)
        return False


@contextlib.contextmanager
def build_lock(build_dir: Path):
    """Builds of one extension one at a time, under an flock that the kernel drops when its holder dies. torch's own
    lock is a file in the build directory that the next build waits on for ever if a build was killed (Ctrl-C during
    the first run); under our lock no other build is running, so that file can only be left over, and goes."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's lock alone
        yield
        return
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir.parent / f"{build_dir.name}.flock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        yield


@functools.cache
def cpuinfo() -> str:
    """/proc/cpuinfo's text ("" where there is none): the CPU's vendor and instruction-set flags."""
    return Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""


def vnni_flags(cpuinfo: str) -> list[str]:
    """The compiler flags of the CPU's VNNI instructions (int8 dot products in one instruction: woq::dpbusd), if
    /proc/cpuinfo lists them: AVX512-VNNI with VL, else AVX-VNNI. The build is this machine's own (cached by flags)."""
    has = set(cpuinfo.split())
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= has:
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
    return ["-mavxvnni"] if "avx_vnni" in has else []


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX: torch.cpu's own CPUID probes), so that a bf16
    matmul beats an fp32 one (2-4x the rate; on CPUs without them about half)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
