#!/usr/bin/env python3
"""Set-up and the two everyday commands, on a fresh machine with only Python 3:

    python3 run.py demo   # the main job: prepare stories, train the demo model, generate a story
    python3 run.py test   # the test suite

Each creates (or reuses) a virtual environment in .venv and installs what it needs there.
Extra arguments after `test` go to pytest. Set TINYMIXTRAL_TORCH to choose the torch requirement
(default torch==2.13.0; on a CUDA machine pip picks the matching CUDA build).
"""

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".tinymixtral-installed"


def sh(*cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kw)


def ensure_env():
    if not PY.exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == want:
        return
    has_torch = subprocess.run([str(PY), "-c", "import torch"], capture_output=True).returncode == 0
    if not has_torch:
        # Installed first and pinned: an open range would pull the newest (multi-GB CUDA) build.
        sh(PY, "-m", "pip", "install", "-q", os.environ.get("TINYMIXTRAL_TORCH", "torch==2.13.0"))
    sh(PY, "-m", "pip", "install", "-q", "-e", ".[test]")
    llama_cpp_without_amx_where_it_faults()
    STAMP.write_text(want)


# Asks llama.cpp (in a child process) to run tiny Q8_0 and Q4_0 models; prints the compiler flags of a rebuild
# if it dies, nothing if it runs or is not installed.
PROBE = """import importlib.util, sys
if importlib.util.find_spec("llama_cpp"):
    from tinymixtral.bench_llama import NO_AMX_FLAGS, llama_cpp_runs_quantized
    if not llama_cpp_runs_quantized():
        print(NO_AMX_FLAGS)
"""


def llama_cpp_without_amx_where_it_faults():
    """llama-cpp-python builds llama.cpp with -march=native. On a CPU that reports AMX that compiles in llama.cpp's
    AMX kernels, and on some machines they die with SIGILL (seen on a VM). There, build it again without them."""
    flags = subprocess.run([str(PY), "-c", PROBE], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if not flags:
        return
    version = subprocess.run([str(PY), "-c", "import importlib.metadata as m; print(m.version('llama-cpp-python'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    print("llama.cpp's AMX kernels fault on this machine: building llama-cpp-python again without them (minutes)")
    sh(PY, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", "--no-cache-dir",
       f"llama-cpp-python=={version}", env={**os.environ, "CFLAGS": flags, "CXXFLAGS": flags})


def demo():
    """Prepare the offline story corpus, train the demo model for a few minutes, write a story."""
    tm = [PY, "-m", "tinymixtral"]
    data, run = ROOT / "data" / "stories", ROOT / "runs" / "demo"
    if not (data / "meta.json").exists():
        sh(*tm, "prepare", "stories", "--out", data, "--tokenizer", "bpe:2048", "--num-stories", "50000")
    if (run / "best").exists():
        print(f"reusing the model trained in {run} (delete that folder to train again)")
    else:
        if run.exists():  # an unfinished run: start over
            shutil.rmtree(run)
        sh(*tm, "params", "--preset", "demo")
        sh(*tm, "train", "--data", data, "--out", run, *DEMO_TRAIN)
    sh(*tm, "generate", "--model", run / "best", "--prompt", "Once upon a time", "--max-new-tokens", "250",
       "--temperature", "0.7", "--top-k", "40", "--seed", "0")


# The demo trains the `demo` recipe (model preset and training values: RECIPES in src/tinymixtral/train_config.py)
# for ~8 minutes on 2 CPU cores (see README, "The demo").
DEMO_TRAIN = ["--recipe", "demo", "--max-time", "8m"]


def main(argv):
    if not argv or argv[0] not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    ensure_env()
    try:
        if argv[0] == "demo":
            demo()
        elif argv[0] == "test":
            sh(PY, "-m", "pytest", *(argv[1:] or ["tests"]))
    except subprocess.CalledProcessError as e:
        return e.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
