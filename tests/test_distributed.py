"""`train` under torchrun (gloo, CPU): DDP and FSDP2 match one process, evaluation is shared out among the
processes, an FSDP2 run killed with SIGKILL resumes bit-identically (also on another number of processes),
and two `torchrun` launches (two "nodes") meet through one rendezvous."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinymixtral import cli, load_model
from tinymixtral.run_state import read_metrics

pytestmark = pytest.mark.slow  # each test starts torchrun processes (10-40 s)

DIST_FLAGS = ["--preset", "demo", "--vocab-size", "320", "--d-model", "32", "--n-layers", "2", "--n-heads", "4",
              "--n-kv-heads", "2", "--d-ff", "64", "--n-experts", "4", "--top-k", "2", "--max-seq-len", "64",
              "--router-aux-loss-coef", "0", "--seq-len", "32", "--max-steps", "5", "--log-interval", "1",
              "--eval-interval", "100", "--eval-batches", "2", "--lr", "1e-2", "--warmup-steps", "2",
              "--seed", "11", "--progress", "false", "--optimizer", "adamw", "--schedule", "cosine",
              "--autocast", "none"]  # fp32: the runs must agree to 1e-5, which bf16 products (the recipe's auto) do not
# (AdamW: the comparisons were made for it; --fsdp without --optimizer takes AdamW anyway, test_train.py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun() -> str:
    exe = Path(sys.executable).with_name("torchrun")
    if exe.exists():
        return str(exe)
    found = shutil.which("torchrun")
    if not found:
        pytest.skip("torchrun is not available")
    return found


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _cmd(data_dir, out, *extra, launch=None) -> list[str]:
    launch = launch or ["--nproc_per_node", "2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    return [_torchrun(), *launch, "-m", "tinymixtral", "train", "--data", str(data_dir), "--out", str(out),
            "--batch-size", "4", *DIST_FLAGS, *extra]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("single") / "run"
    assert cli.main(["train", "--data", str(data_dir), "--out", str(out), "--batch-size", "8", *DIST_FLAGS]) == 0
    return out


def _launch(tmp_path, data_dir, *extra) -> Path:
    out = tmp_path / "run"
    r = subprocess.run(_cmd(data_dir, out, *extra), cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def _rows(run: Path, key: str) -> dict[int, float]:
    """{step: value} of the rows that have `key` (a later row of a step replaces an earlier one)."""
    return {r["step"]: r[key] for r in read_metrics(run) if key in r}


def _compare_losses(a: Path, b: Path):
    la, lb = _rows(a, "loss"), _rows(b, "loss")
    assert list(la) == list(lb) == [1, 2, 3, 4, 5]
    for s in la:
        assert abs(la[s] - lb[s]) < 1e-5, (la, lb)


def _compare_val(a: Path, b: Path):
    """Evaluation shared out among processes gives the loss of one process reading every window."""
    for key in ("val_loss", "final_val_loss"):
        va, vb = _rows(a, key), _rows(b, key)
        assert list(va) == list(vb) and va, key
        for s in va:
            assert vb[s] == pytest.approx(va[s], rel=1e-5), (key, va, vb)
    ta = [r["val_tokens"] for r in read_metrics(a) if "val_tokens" in r]
    assert ta == [r["val_tokens"] for r in read_metrics(b) if "val_tokens" in r]


def _tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "latest" / "model.safetensors")


def test_ddp_matches_a_single_process(tmp_path, data_dir, single_process):
    ddp = _launch(tmp_path, data_dir)
    _compare_losses(single_process, ddp)
    _compare_val(single_process, ddp)
    wa, wb = _weights(single_process), _weights(ddp)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0, msg=k)
    assert (ddp / "latest" / "trainer_state.safetensors").is_file() and (ddp / "loss.png").is_file()
    rows = [r for r in read_metrics(ddp) if "tok_per_s" in r]
    assert rows and all(r["tok_per_s_per_process"] == pytest.approx(r["tok_per_s"] / 2) for r in rows)


def test_fsdp2_matches_a_single_process(tmp_path, data_dir, single_process):
    fsdp = _launch(tmp_path, data_dir, "--fsdp", "true")
    _compare_losses(single_process, fsdp)
    _compare_val(single_process, fsdp)
    model = load_model(fsdp / "latest", dtype=torch.float32)
    ref = load_model(single_process / "latest", dtype=torch.float32)
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys()
    for k in sd:
        torch.testing.assert_close(sd[k], ref_sd[k], atol=1e-5, rtol=0, msg=k)
    assert (fsdp / "latest" / "sharded" / ".metadata").is_file()  # the sharded state, for --resume


def test_fsdp2_run_killed_after_a_checkpoint_resumes_bit_identically(tmp_path, data_dir):
    flags = ["--fsdp", "true", "--max-steps", "14", "--ckpt-interval", "2", "--eval-interval", "4",
             "--router-jitter-noise", "0.1"]  # the jitter draws from torch's RNG: resume must restore it
    (tmp_path / "whole").mkdir()
    whole = _launch(tmp_path / "whole", data_dir, *flags)
    killed = tmp_path / "killed" / "run"
    killed.parent.mkdir()
    proc = subprocess.Popen(_cmd(data_dir, killed, *flags), cwd=killed.parent, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "latest").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    for pid in _tree(proc.pid):  # torchrun and its workers (which run in sessions of their own)
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    at = int((killed / "latest").resolve().name.split("-")[1])
    assert at < 14, "the run finished before it could be killed"
    r = subprocess.run([_torchrun(), "--nproc_per_node", "2", "--master-addr", "127.0.0.1", "--master-port",
                        str(_free_port()), "-m", "tinymixtral", "train", "--resume", str(killed)],
                       cwd=killed.parent, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resuming {killed} from step {at}" in r.stdout
    assert _rows(killed, "loss") == _rows(whole, "loss")  # bit for bit, every step
    assert _rows(killed, "val_loss") == _rows(whole, "val_loss")
    wa, wb = _weights(whole), _weights(killed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    # Another number of processes: one process continues the two-process run (DCP reshards the state).
    one = tmp_path / "one"
    shutil.copytree(killed, one, symlinks=True)
    assert cli.main(["train", "--resume", str(one), "--max-steps", "16"]) == 0
    losses = _rows(one, "loss")
    assert sorted(losses) == list(range(1, 17)) and all(v == v for v in losses.values())


def test_two_torchrun_launches_meet_as_two_nodes(tmp_path, data_dir, single_process):
    out, port = tmp_path / "run", _free_port()
    procs = [subprocess.Popen(_cmd(data_dir, out, launch=["--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
                                                          str(rank), "--rdzv-endpoint", f"127.0.0.1:{port}"]),
                              cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-2000:] for log in logs)
    assert "done: step 5" in logs[0] and "done:" not in logs[1]  # rank 0 alone reports and writes
    _compare_losses(single_process, out)
    _compare_val(single_process, out)
