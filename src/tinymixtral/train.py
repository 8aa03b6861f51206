"""`tinymixtral train`: one readable training loop in the nanoGPT shape.

setup -> batches -> lr schedule (a pure function) -> loop: lr, eval/checkpoint, accumulate, clip,
step, log. Runs on CPU or one GPU; under `torchrun` it is DDP (gloo on CPU, NCCL on CUDA), or FSDP2
with --fsdp. Rank 0 alone logs and writes checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import ModelConfig
from .errors import TinyMixtralError


@dataclass
class TrainConfig:
    data: str = ""  # a prepared data directory (tinymixtral prepare)
    out: str = "runs/demo"
    batch_size: int = 16  # sequences per micro-batch (per process)
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    max_steps: int = 1000
    max_tokens: int | None = None  # stop after this many training tokens (all processes)
    max_time: float | None = None  # stop after this many seconds ("10m" and "1h" on the command line)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 200
    eval_batches: int = 20
    log_interval: int = 10
    ckpt_interval: int = 500
    keep_last: int = 2
    seed: int = 1337
    device: str | None = None  # default: cuda when available
    autocast: str = "none"  # none | bf16 | fp16 (bf16 was slower than fp32 on a 2-core CPU without AMX)
    compile: bool = False
    wandb: bool = False
    wandb_project: str = "tinymixtral"
    fsdp: bool = False
    progress: bool = True


def get_lr(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, times a cosine from 1 to min_lr_ratio over progress 0..1."""
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    cos = 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return cfg.lr * warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


def get_batch(data: np.ndarray, batch: int, seq_len: int, gen: torch.Generator, device, rank=0, world=1):
    """Random windows: every process draws the same global batch and keeps its own slice."""
    ix = torch.randint(len(data) - seq_len - 1, (batch * world,), generator=gen)[rank * batch:(rank + 1) * batch]
    x = torch.from_numpy(np.stack([data[i:i + seq_len + 1].astype(np.int64) for i in ix.tolist()]))
    x = x.to(device, non_blocking=True)
    return x[:, :-1], x[:, 1:]


def loss_fn(model, x, y):
    """Cross-entropy plus the router losses the config switches on; returns (total, parts)."""
    logits = model(x)
    ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
    parts = {"loss": ce}
    parts.update(_core(model).router_losses())
    return sum(parts.values()), parts


def _core(model):
    """The Transformer inside DDP / torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def expert_load(model) -> list[list[float]]:
    """Per layer, the fraction of token-expert assignments each expert got in the last forward."""
    from .analysis.stats import expert_load as load_E

    return [load_E(r.experts_NK, r.logits_NE.shape[-1]).tolist() for r in _core(model).routing()]


def save_run_config(out: Path, tcfg: TrainConfig, mcfg: ModelConfig):
    (out / "run.json").write_text(json.dumps(
        {"train": dataclasses.asdict(tcfg), "model": dataclasses.asdict(mcfg)}, indent=2) + "\n")


def load_run_config(run_dir: Path) -> tuple[TrainConfig, ModelConfig]:
    path = run_dir / "run.json"
    if not path.is_file():
        raise TinyMixtralError(f"{run_dir} is not a training run (no run.json)")
    d = json.loads(path.read_text())
    return TrainConfig(**d["train"]), ModelConfig(**d["model"])


def train(tcfg: TrainConfig, mcfg: ModelConfig, resume: bool = False) -> dict:
    """Train (or resume) a run; returns the final metrics. The whole loop is here, top to bottom."""
    from .bench import measure_matmul_flops
    from .data import load_split
    from .evaluate import bits_per_byte, evaluate
    from .model.transformer import Transformer
    from .params import flops_per_token
    from .run_state import append_metrics, latest_checkpoint, load_trainer_state, save_checkpoint

    # ---- setup: processes, device, data, model, optimizer ----------------------------------------
    distributed = "RANK" in os.environ
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = tcfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if distributed:
        import torch.distributed as dist

        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    master = rank == 0
    out = Path(tcfg.out)
    train_data, meta = load_split(tcfg.data, "train")
    val_data, _ = load_split(tcfg.data, "val")
    if meta["vocab_size"] > mcfg.vocab_size:
        raise TinyMixtralError(f"the data's tokenizer has {meta['vocab_size']} tokens but the model's vocab_size is "
                               f"{mcfg.vocab_size}; set --vocab-size {meta['vocab_size']} or more")
    if tcfg.seq_len > mcfg.max_seq_len:
        raise TinyMixtralError(f"--seq-len {tcfg.seq_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    if len(train_data) <= tcfg.seq_len + 1:
        raise TinyMixtralError(f"the train split has only {len(train_data)} tokens; need more than seq_len+1")
    if len(val_data) < tcfg.seq_len + 1:  # else the first evaluation fails after the training it cost
        raise TinyMixtralError(f"the val split has only {len(val_data)} tokens; need at least seq_len+1 "
                               f"({tcfg.seq_len + 1}): lower --seq-len or prepare with a larger --val-fraction")
    mcfg = mcfg.replace(bos_token_id=meta.get("bos_id", mcfg.bos_token_id), eos_token_id=meta.get("eos_id"))
    torch.manual_seed(tcfg.seed)
    model = Transformer(mcfg).to(device)
    data_gen = torch.Generator().manual_seed(tcfg.seed)
    state = {"step": 0, "tokens": 0, "elapsed": 0.0, "best_val": None, "best_step": None}
    if resume and tcfg.fsdp:
        raise TinyMixtralError("resuming an FSDP run is not supported yet (its checkpoints hold weights only)")
    if resume:
        from .checkpoint import read_safetensors
        from .convert import from_hf

        ckpt = latest_checkpoint(out)
        model.load_state_dict(from_hf(read_safetensors(ckpt), mcfg), strict=False)
    elif master:
        out.mkdir(parents=True, exist_ok=True)
        save_run_config(out, tcfg, mcfg)
    tokenizer_dir = Path(tcfg.data) / "tokenizer"
    raw_model = model
    if distributed and tcfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
    elif distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    # After sharding: FSDP replaces the parameters, and the optimizer must hold the new ones.
    decay = [p for n, p in raw_model.named_parameters() if p.dim() >= 2 and not n.startswith("embed.")]
    no_decay = [p for n, p in raw_model.named_parameters() if p.dim() < 2 or n.startswith("embed.")]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), fused=torch.device(device).type in ("cpu", "cuda"))
    if resume:
        scalars, rng = load_trainer_state(ckpt, optimizer)
        state.update({k: scalars[k] for k in state if k in scalars})
        data_gen.set_state(rng["data"])
        torch.set_rng_state(rng["torch"])
        if master:
            print(f"resuming {out} from step {state['step']}")

    def progress():
        fracs = [state["step"] / tcfg.max_steps]
        if tcfg.max_tokens:
            fracs.append(state["tokens"] / tcfg.max_tokens)
        if tcfg.max_time:
            fracs.append(state["elapsed"] / tcfg.max_time)
        return max(fracs)

    if resume and progress() >= 1.0:
        raise TinyMixtralError(f"{out} already reached its limit at step {state['step']}; raise --max-steps, "
                               "--max-tokens or --max-time to train further")
    if tcfg.compile:
        model = torch.compile(model)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[tcfg.autocast]
    ctx = torch.autocast(torch.device(device).type, dtype=amp) if amp else nullcontext()
    tokens_per_step = tcfg.batch_size * tcfg.seq_len * tcfg.grad_accum * world
    peak = measure_matmul_flops(device) if master else 1.0
    fpt = flops_per_token(mcfg, tcfg.seq_len)
    run = None
    if tcfg.wandb and master:
        import wandb

        id_file = out / "wandb_id"  # the same W&B run continues when this run is resumed
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12])
        run = wandb.init(project=tcfg.wandb_project, dir=str(out), id=id_file.read_text(), resume="allow",
                         config=dataclasses.asdict(tcfg) | {"model": dataclasses.asdict(mcfg)})

    def checkpoint():
        full = _full_model(raw_model, tcfg.fsdp)  # a collective under FSDP: every process takes part
        if master:
            rng = {"data": data_gen.get_state(), "torch": torch.get_rng_state()}
            save_checkpoint(out, state["step"], full, None if tcfg.fsdp else optimizer, state, rng,
                            tokenizer_dir, tcfg.keep_last, state["best_step"])

    def do_eval():
        # Every process evaluates the same windows, as many as one process with the global batch would.
        val = evaluate(model, val_data, tcfg.batch_size * world, tcfg.seq_len, device, tcfg.eval_batches)
        row = {"step": state["step"], "tokens": state["tokens"], "val_loss": val, "val_ppl": math.exp(min(val, 50)),
               "val_bpb": bits_per_byte(val, meta, "val")}
        if master:
            append_metrics(out, row)
            if run:
                run.log(row, step=state["step"])
        if state["best_val"] is None or val < state["best_val"]:  # every process: they all checkpoint under FSDP
            state["best_val"], state["best_step"] = val, state["step"]
        return row

    # ---- the loop --------------------------------------------------------------------------------
    from tqdm import tqdm

    # The bar shows whichever limit binds (steps, tokens or time) as a percentage.
    bar = tqdm(total=100.0, initial=round(100 * progress(), 1), disable=not (master and tcfg.progress),
               unit="%", dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.1f}% [{elapsed}<{remaining}{postfix}]")
    model.train()
    last, resumed_at = {}, state["step"]
    t_last, tok_last = time.perf_counter(), state["tokens"]
    try:
        while progress() < 1.0:
            t_step = time.perf_counter()
            lr = get_lr(state["step"], progress(), tcfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            at = state["step"] if state["step"] != resumed_at else -1  # no repeat of the step we resumed at
            if at > 0 and at % tcfg.eval_interval == 0:
                last.update(do_eval())
                if state["best_step"] == at:
                    checkpoint()
            if at > 0 and at % tcfg.ckpt_interval == 0 and state["best_step"] != at:
                checkpoint()
            parts_sum = {}
            for micro in range(tcfg.grad_accum):
                x, y = get_batch(train_data, tcfg.batch_size, tcfg.seq_len, data_gen, device, rank, world)
                sync = nullcontext()
                if distributed and not tcfg.fsdp and micro < tcfg.grad_accum - 1:
                    sync = model.no_sync()  # all-reduce gradients once, on the last micro-batch
                with sync, ctx:
                    loss, parts = loss_fn(model, x, y)
                (loss / tcfg.grad_accum).backward()
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v.detach() / tcfg.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["tokens"] += tokens_per_step
            state["elapsed"] += time.perf_counter() - t_step
            if state["step"] % tcfg.log_interval == 0 or progress() >= 1.0:
                if distributed:
                    for v in parts_sum.values():
                        dist.all_reduce(v, op=dist.ReduceOp.AVG)
                dt = time.perf_counter() - t_last
                tps = (state["tokens"] - tok_last) / dt
                t_last, tok_last = time.perf_counter(), state["tokens"]
                load = expert_load(model)
                row = {"step": state["step"], "tokens": state["tokens"], "lr": lr,
                       **{k: float(v) for k, v in parts_sum.items()}, "grad_norm": float(grad_norm),
                       "tok_per_s": tps, "mfu": tps * fpt / peak / world, "elapsed": state["elapsed"]}
                if load:
                    row["expert_load"] = load
                    row["load_max_min"] = [max(lay) / min(lay) if min(lay) > 0 else None for lay in load]  # None: idle expert
                if master:
                    append_metrics(out, row)
                    if run:
                        run.log({k: v for k, v in row.items() if k != "expert_load"}, step=state["step"])
                last.update(row)
                bar.set_postfix(step=state["step"], loss=f"{row['loss']:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
            bar.update(min(100.0, round(100 * progress(), 1)) - bar.n)
    except KeyboardInterrupt:
        bar.close()
        if master:
            print(f"\ninterrupted at step {state['step']}: saving a checkpoint")
        checkpoint()
        raise
    bar.close()
    last.update(do_eval())
    checkpoint()
    if master:
        from .plots import plot_run

        plot_run(out)
        if run:
            run.finish()
    if distributed:
        dist.barrier()  # no process may tear down gloo while another still talks to it
        dist.destroy_process_group()
    return last


def _full_model(model, fsdp: bool):
    """The model with full, unsharded tensors (FSDP shards them across processes)."""
    if not fsdp:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from .model.transformer import Transformer

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not sd:  # with cpu_offload only rank 0 receives the gathered tensors
        return None
    with torch.device("meta"):
        full = Transformer(model.cfg)
    full.load_state_dict(sd, assign=True)
    if model.cfg.tie_embeddings:
        full.lm_head.weight = full.embed.weight
    return full
