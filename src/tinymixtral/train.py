"""The training loop, in the nanoGPT shape (`tinymixtral train` is its command line).

setup() (processes, data, model, optimizer, resume) -> the loop: lr (a pure function of the step),
eval/checkpoint, accumulate micro-batches, clip, step, log. Runs on CPU or one GPU; under `torchrun` it
is DDP (gloo on CPU, NCCL on CUDA), or FSDP2 with --fsdp. Rank 0 alone logs and writes checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import uuid
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .alloc import keep_heap
from .analysis.stats import expert_load
from .build import build_model, pick_device
from .chats import train_starts
from .checkpoint import load_model, read_safetensors
from .config import ModelConfig
from .convert import from_hf
from .data import check_tokenizer, check_training_data, get_batch, load_mask, load_split
from .errors import TinyMixtralError
from .evaluate import bits_per_byte, evaluate, evaluated_tokens
from .optim import freeze, make_optimizer, peak_lr
from .params import fast_bf16, flops_per_token, measure_matmul_flops
from .plots import plot_run
from .run_state import (
    SHARDED,
    append_metrics,
    clean_stale,
    latest_checkpoint,
    load_trainer_state,
    start_run_dir,
    truncate_metrics,
)
from .train_compile import compile_model, compiles
from .train_run import Run
from .train_config import (  # noqa: F401
    DEFAULT_MAX_STEPS,
    RECIPES,
    TrainConfig,
    get_lr,
    load_run_config,
    save_run_config,
)

# TrainConfig, get_lr and the run.json I/O live in train_config.py; they stay importable from here
from .train_save import _any_process, save, tokenizer_dir  # noqa: F401 (tokenizer_dir: re-exported)


def train(tcfg: TrainConfig, mcfg: ModelConfig, resume: bool = False) -> dict:
    """Train (or resume) a run; returns the final metrics. The whole loop is in train_loop, top to bottom."""
    r = setup(tcfg, mcfg, resume)
    try:
        return train_loop(r)
    except BaseException:
        if r.wandb:  # a failed run ends its W&B run: else the process keeps it, and the next wandb.init returns it
            r.wandb.finish(exit_code=1)
        raise


def train_loop(r: Run) -> dict:
    """The training loop of a set-up run, then the final evaluations and checkpoint; returns the final metrics."""
    tcfg = r.tcfg
    # The bar shows whichever limit binds (steps, tokens or time) as a percentage.
    bar = tqdm(total=100.0, initial=round(100 * r.progress(), 1), disable=not (r.master and tcfg.progress),
               unit="%", dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.1f}% [{elapsed}<{remaining}{postfix}]")
    amp = r.amp()
    tokens_per_step = tcfg.batch_size * tcfg.seq_len * tcfg.grad_accum * r.world
    last, t_last, tok_last = {}, time.perf_counter(), r.tokens
    r.model.train()
    try:
        while r.progress() < 1.0:
            t_step = time.perf_counter()
            lr = get_lr(r.step, r.progress(), tcfg)
            for group in r.optimizer.param_groups:
                group["lr"] = peak_lr(group, tcfg) * lr / tcfg.lr
            if r.step > 0 and r.step != r.resumed_at:
                if r.step % tcfg.eval_interval == 0:
                    last.update(eval_and_log(r))
                if r.best_step == r.step or r.step % tcfg.ckpt_interval == 0:
                    save(r)
            r.raw.set_dropout(*r.dropout_now())
            parts_sum = {}
            for micro in range(tcfg.grad_accum):
                x, y = get_batch(r.train_data, tcfg.batch_size, tcfg.seq_len, r.data_gen, r.device, r.rank, r.world,
                                 r.train_mask, r.train_starts)
                sync = nullcontext()
                if isinstance(r.model, DistributedDataParallel) and micro < tcfg.grad_accum - 1:
                    sync = r.model.no_sync()  # all-reduce gradients once, on the last micro-batch
                with sync, amp:
                    loss, parts = r.model(x, y)
                r.scaler.scale(loss / tcfg.grad_accum).backward()
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v.detach() / tcfg.grad_accum
            r.scaler.unscale_(r.optimizer)  # clip the true gradients
            grad_norm = torch.nn.utils.clip_grad_norm_(r.model.parameters(), tcfg.grad_clip)
            if not skip_nonfinite(r, parts_sum["loss"], grad_norm, bar):  # NaN never reaches the weights
                r.scaler.step(r.optimizer)  # skipped by the scaler if fp16 gradients overflowed
            r.scaler.update()
            r.optimizer.zero_grad(set_to_none=True)
            r.step += 1
            r.tokens += tokens_per_step
            r.elapsed += time.perf_counter() - t_step
            if r.step % tcfg.log_interval == 0 or r.progress() >= 1.0:
                tps = (r.tokens - tok_last) / (time.perf_counter() - t_last)
                t_last, tok_last = time.perf_counter(), r.tokens
                row = log_step(r, lr, parts_sum, grad_norm, tps)
                last.update(row)
                bar.set_postfix(step=r.step, loss=f"{row['loss']:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
            bar.update(min(100.0, round(100 * r.progress(), 1)) - bar.n)
    except KeyboardInterrupt:
        bar.close()
        if r.master:
            print(f"\ninterrupted at step {r.step}: saving a checkpoint")
        save(r)
        raise
    bar.close()
    last.update(eval_and_log(r))
    save(r)
    last.update(eval_and_log(r, full=True))
    finish(r)
    return last


def setup(tcfg: TrainConfig, mcfg: ModelConfig, resume: bool) -> Run:
    """Processes, device, data, model (fresh, a model directory's, or the run's latest checkpoint), optimizer, W&B."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    keep_heap()  # a step's activations reuse the last step's pages (alloc.py)
    device = pick_device(tcfg.device)
    distributed = "RANK" in os.environ  # started by torchrun
    if distributed:
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    out = Path(tcfg.out)
    train_data, meta = load_split(tcfg.data, "train")
    val_data, _ = load_split(tcfg.data, "val")
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt or tcfg.init_from:  # data of another tokenizer: refused before anything else is said about them
        check_tokenizer(tcfg.data, meta, ckpt or tcfg.init_from)
    check_training_data(meta, train_data, val_data, tcfg.seq_len, mcfg)
    mcfg = mcfg.replace(bos_token_id=meta.get("bos_id", mcfg.bos_token_id), eos_token_id=meta.get("eos_id"))
    sharded = distributed and tcfg.fsdp
    if sharded and tcfg.optimizer == "muon":
        raise TinyMixtralError("--optimizer muon with --fsdp is not supported yet (its update needs whole matrices); "
                               "use DDP (--fsdp false) or --optimizer adamw")
    torch.manual_seed(tcfg.seed)
    if resume:
        if sharded and not (ckpt / SHARDED).is_dir():
            raise TinyMixtralError(f"{ckpt} was written without FSDP (its optimizer state is not sharded); "
                                   "resume it with --fsdp false")
        if (ckpt / SHARDED).is_dir():  # model and optimizer come from the sharded state below
            model = build_model(mcfg, device=device)
        else:
            model = build_model(mcfg, from_hf(read_safetensors(ckpt), mcfg), device=device)
    elif tcfg.init_from:  # its config with the run's routing options (commands/train.py checks the rest)
        model = build_model(mcfg, load_model(tcfg.init_from, dtype=torch.float32).state_dict(), device=device)
    else:
        model = build_model(mcfg, device=device)
    freeze(model, tcfg.train_only)
    if not resume and rank == 0:
        start_run_dir(out)
        save_run_config(out, tcfg, mcfg)
    train_mask, val_mask = load_mask(tcfg.data, "train", meta), load_mask(tcfg.data, "val", meta)
    raw = model
    if distributed and tcfg.fsdp:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if tcfg.fsdp_bf16 else None
        for layer in model.layers:
            fully_shard(layer, **({"mp_policy": mp} if mp else {}))
        fully_shard(model, **({"mp_policy": mp} if mp else {}))
    elif distributed:
        model = DistributedDataParallel(model)
    optimizer = make_optimizer(raw, tcfg, device)  # after sharding: FSDP replaces the parameters
    autocast = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16,
                "auto": torch.bfloat16 if fast_bf16(device) else None}[tcfg.autocast]
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=autocast is torch.float16)
    peak = measure_matmul_flops(device, autocast or torch.float32) if rank == 0 else 1.0  # MFU: at the products' dtype
    r = Run(tcfg, mcfg, out, device, rank, world, model, raw, optimizer, scaler, autocast, train_data, val_data,
            meta, torch.Generator().manual_seed(tcfg.seed), None, peak,
            flops_per_token(mcfg, tcfg.seq_len))
    r.train_mask, r.val_mask = train_mask, val_mask
    if train_mask is not None:
        r.train_starts = train_starts(train_data, train_mask, meta["bos_id"], meta["eos_id"], tcfg.seq_len)
    if resume:
        if (ckpt / SHARDED).is_dir():  # any number of processes: DCP reshards to this run's layout
            msd, osd = get_state_dict(raw, optimizer)
            state = {"model": msd, "optim": osd}
            with warnings.catch_warnings():  # one process reading a sharded run is what DCP warns about
                warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
                dcp.load(state, checkpoint_id=ckpt / SHARDED)
            set_state_dict(raw, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        scalars, rng = load_trainer_state(ckpt, None if (ckpt / SHARDED).is_dir() else optimizer)
        for k in ("step", "tokens", "elapsed", "best_val", "best_step", "nonfinite_skipped"):
            setattr(r, k, scalars.get(k, getattr(r, k)))
        if "grad_scaler" in scalars:
            scaler.load_state_dict(scalars["grad_scaler"])
        r.data_gen.set_state(rng["data"])
        torch.set_rng_state(rng["torch"])
        r.resumed_at = r.step
        if r.master:
            clean_stale(out)  # what writes interrupted by a kill left behind
            truncate_metrics(out, r.step)  # rows after the checkpoint are logged again from here
            print(f"resuming {out} from step {r.step}")
        if r.progress() >= 1.0:
            raise TinyMixtralError(f"{out} already reached its limit at step {r.step}; raise --max-steps, "
                                   "--max-tokens or --max-time to train further")
    if compiles(tcfg, device, distributed):
        compile_model(r)
    if tcfg.wandb and r.master:
        import wandb  # optional dependency

        id_file = out / "wandb_id"  # the same W&B run continues when this run is resumed
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12])
        r.wandb = wandb.init(project=tcfg.wandb_project, dir=str(out), id=id_file.read_text(), resume="allow",
                             config=dataclasses.asdict(tcfg) | {"model": dataclasses.asdict(mcfg)})
    return r


def eval_and_log(r: Run, full: bool = False) -> dict:
    """Validation loss of the current model, logged. In training (full=False) it is an estimate on
    eval_batches batches of windows spread over the split, and it picks the best checkpoint; at the end
    (full=True) every window of the split is read, and the row says final_val_loss / final_val_bpb."""
    # The windows one process with the global batch would read, shared out among the processes.
    t, batch = r.tcfg, r.tcfg.batch_size * r.world
    n_batches = None if full else t.eval_batches
    val = evaluate(r.raw if r.compiled else r.model, r.val_data, t.batch_size, t.seq_len, r.device, n_batches,
                   r.val_mask, r.meta.get("bos_id", 1), r.rank, r.world)
    name = "final_val" if full else "val"
    row = {"step": r.step, "tokens": r.tokens, f"{name}_loss": val, f"{name}_ppl": math.exp(min(val, 50)),
           f"{name}_bpb": bits_per_byte(val, r.meta, "val"),
           "val_tokens": evaluated_tokens(r.val_data, batch, t.seq_len, n_batches, r.val_mask, r.meta.get("bos_id", 1))}
    if r.master:
        append_metrics(r.out, row)
        if r.wandb:
            r.wandb.log(row, step=r.step)
    # every process: they all checkpoint under FSDP; a NaN evaluation is never the best
    if not full and math.isfinite(val) and (r.best_val is None or val < r.best_val):
        r.best_val, r.best_step = val, r.step
    return row


def log_step(r: Run, lr: float, parts: dict, grad_norm, tok_per_s: float) -> dict:
    """The metrics row of a training step: losses (averaged over processes), speed, MFU, expert load."""
    if r.distributed:
        for v in parts.values():
            dist.all_reduce(v, op=dist.ReduceOp.AVG)
    row = {"step": r.step, "tokens": r.tokens, "lr": lr, **{k: float(v) for k, v in parts.items()},
           "grad_norm": float(grad_norm), "tok_per_s": tok_per_s, "tok_per_s_per_process": tok_per_s / r.world,
           "mfu": tok_per_s * r.flops_per_token / r.peak_flops / r.world,
           "elapsed": r.elapsed, "autocast": str(r.autocast).removeprefix("torch.") if r.autocast else "none"}
    load = [expert_load(rt.experts_NK, rt.logits_NE.shape[-1]).tolist() for rt in r.raw.routing()]
    if load:
        row["expert_load"] = load
        row["load_max_min"] = [max(lay) / min(lay) if min(lay) > 0 else None for lay in load]  # None: idle expert
    if r.master:
        append_metrics(r.out, row)
        if r.wandb:
            r.wandb.log({k: v for k, v in row.items() if k != "expert_load"}, step=r.step)
    return row


def skip_nonfinite(r: Run, loss, grad_norm, bar) -> bool:
    """Whether this step's update must be skipped: its loss (or, without fp16's GradScaler, which skips
    overflowed steps itself, its gradient norm) is NaN or inf on some process. Past --skip-nonfinite such
    steps the run stops with one line, before the update, so the weights and checkpoints stay finite."""
    values = {"loss": float(loss)} | ({} if r.scaler.is_enabled() else {"gradient norm": float(grad_norm)})
    if not _any_process(r, not all(map(math.isfinite, values.values()))):
        return False
    r.nonfinite_skipped += 1
    what = " and ".join(f"{k} {v}" for k, v in values.items())
    if r.nonfinite_skipped > r.tcfg.skip_nonfinite:
        bar.close()
        raise TinyMixtralError(
            f"step {r.step + 1}: {what}: training diverged (lower --lr, or let --skip-nonfinite N skip such steps); "
            f"stopped before the update, no checkpoint holds it")
    if r.master:
        tqdm.write(f"warning: step {r.step + 1}: {what}: update skipped ({r.nonfinite_skipped} of "
                   f"--skip-nonfinite {r.tcfg.skip_nonfinite})", file=sys.stderr)
    return True


def finish(r: Run):
    if r.master:
        plot_run(r.out)
        if r.wandb:
            r.wandb.finish()
    if r.distributed:
        dist.barrier()  # no process may tear down gloo while another still talks to it
        dist.destroy_process_group()
