"""
train.py: one command for every method of the comparison.

    python train.py --method mf|lightgcn|sasrec [--data toy|ml-1m|amazon-book]  CF pretraining (cf.run_cf)
    python train.py --method tallrec|collm|cora [--data ...] [--llm DIR]     LLM methods on a frozen LLaMA
    python train.py --method all [--seeds 3] [--lgcn] [--data ...] [--llm DIR]  the whole comparison, one table
    python train.py --bench [--data ml-1m --llm DIR]            shared LoRA vs CoRA, fp32 vs bf16: time, memory
    python train.py --eval-general|--generate --llm DIR --adapter RUN ...     the paper's Fig. 1 / Fig. 2 analyses
    torchrun --nproc_per_node N train.py --method tallrec|collm|cora ...      DDP over the trainable parameters

The LLM training loop (setup -> train -> finish) is CoLLM's runner, flattened: fused AdamW on the trainable
parameters (weight decay on matrices only), linear warm-up then a cosine over --max-steps (the official max_epoch x
iters_per_epoch, so the LR stays near init_lr while early stopping ends the run), gradient accumulation, optional
clipping (--clip; none by default, as officially), validation every --eval-every steps, early stopping on valid AUC
after --patience validations without gain, test metrics of the best state. Each validation appends a row to
history.tsv; the run prints a learning curve at the end. --train-limit / --valid-limit / --test-limit take seeded
subsets for CPU-sized runs. Every --ckpt-every steps it saves state.safetensors (weights, AdamW moments, best weights,
RNG states, counters, history), and at the start and end of each validation; --resume continues bit-exactly, in
the validation it was at (the scores of its finished batches are kept as they come: validate, collm.predict), and
the test scoring likewise. A run cut short by --max-minutes is tested and committed and keeps its checkpoint, so
--resume trains it on. A NaN/inf loss or gradient stops the run naming the step and that checkpoint. --dtype auto
keeps the frozen LLM in bf16 on CUDA and on CPUs with native bf16 (llama.resolve_dtype); trainable weights,
optimizer state, logits and loss are fp32 whatever it is.

Run folders <out>/<data>/<run> are written and checked by data.py (commit_run, check_run, run_lock): a finished run
stays whole until a new one commits, a second writer is refused, every reader checks the digests. LLM methods
pretrain a missing CF checkpoint first (cf.cf_checkpoint); CoLLM trains a missing TALLRec first (its step 1);
without --llm the toy run builds a tiny untrained LLaMA + tokenizer (toy_llm). Checked before any work: every number
on the command line (argparse, exit 2), --out, the LLM folder, every prompt against the LLM's positions, the data
files. Ctrl-C exits with code 130, naming the last checkpoint and the command that resumes from it.
"""
import argparse
import contextlib
import gc
import glob
import hashlib
import json
import math
import os
import secrets
import shlex
import subprocess
import sys
import time
from datetime import timedelta
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch.nn.parallel import DistributedDataParallel

import cf
import collm
import cora
import data
import llama
from cf import CF_METHODS, HYPER
from collm import rank_world

# ----------------------------------------------------------------------------------------------------------- defaults
# CF models: cf.CF_DEFAULTS. LLM methods, the official values: CoLLM train_configs/collm_pretrain_mf_ood.yaml (TALLRec =
# its step 1, and CoLLM): lr 1e-3 -> min 8e-5 cosine, warm-up 200 from 1e-5, wd 1e-3, batch 16 x 2 GPUs, valid every
# 50 iterations, max_epoch 200 x iters_per_epoch 50 = 10k iterations (the cosine's horizon), stop after 20
# evaluations without gain, no clipping. CoRA plora_pretrain_mf_ood_movie.yaml: the same schedule with batch 8, valid
# every 100, 1000 x 100 = 100k iterations, r 16, alpha 32, q/k/v/o; plora_pretrain_{lgcn,sasrec}_movie.yaml: r 64,
# alpha 128, batch 16, 200 x 50. An official "epoch" is iters_per_epoch iterations, not a pass over the data: no pass
# limit (epochs 0) here either. TALLRec/CoLLM LoRA (CoLLM's lora_config): r 8, alpha 16, q and v, dropout 0.05.
LLM_METHODS = ("tallrec", "collm", "cora")
LLM_BASE = dict(min_lr=8e-5, warmup_lr=1e-5, warmup=200, wd=1e-3, patience=20, epochs=0, accum=1, clip=0.0,
                eval_batch_size=32)
LLM_DEFAULTS = {
    "tallrec": dict(lr=1e-3, batch_size=32, eval_every=50, max_steps=10_000, r=8, alpha=16.0),
    "collm": dict(lr=1e-3, batch_size=32, eval_every=50, max_steps=10_000, r=8, alpha=16.0),
    "cora": dict(lr=1e-3, batch_size=8, eval_every=100, max_steps=100_000, r=16, alpha=32.0),
    "cora-lightgcn": dict(lr=1e-3, batch_size=16, eval_every=50, max_steps=10_000, r=64, alpha=128.0),
    "cora-sasrec": dict(lr=1e-3, batch_size=16, eval_every=50, max_steps=10_000, r=64, alpha=128.0),
}
# The toy LLM (no --llm on --data toy): a few passes, quick validations.
TOY_LLM = dict(epochs=4, max_steps=0, warmup=50, eval_every=100, patience=5, eval_batch_size=128, batch_size=32)
# Settings that do not change what a run computes, so --reuse takes a finished run made with other values and
# --resume continues with new ones. --max-minutes is one (a time limit for an invocation, not a recipe): the table
# names a run it cut short, which keeps its checkpoint for --resume. --batch-size and --accum count by their product.
RUN_CONTROL = {"threads", "out", "resume", "ckpt_every", "skip_nonfinite", "seeds", "lgcn", "sas", "ablation", "reuse",
               "eval_general", "generate", "adapter", "general_text", "bench", "compile", "eval_batch_size",
               "max_minutes"}
STAGE1 = ("r", "alpha", "lora_targets")  # what CoLLM's step-1 TALLRec run must share with it
STARTED = time.time()  # a checkpoint older than this process is not one it saved


def fill_llm_defaults(args):
    """The official schedule (LLM_BASE, LLM_DEFAULTS; TOY_LLM for the toy LLM) for every option left unset."""
    own = LLM_DEFAULTS.get(f"{args.method}-{args.cf}", LLM_DEFAULTS[args.method])  # CoRA-LGCN / -SAS: their own
    toy = TOY_LLM if args.data == "toy" and not args.llm else {}
    # patience: the official 20 evaluations as a span of steps (CoRA 2,000; TALLRec/CoLLM, CoRA-LGCN/-SAS 1,000), so
    # a longer --eval-every waits as long without gain before stopping, in fewer validations (the toy LLM: its own)
    span = LLM_BASE["patience"] * own["eval_every"]
    patience = max(1, round(span / (args.eval_every or own["eval_every"])))
    defaults = {**LLM_BASE, "patience": patience, **own, **toy}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not (args.max_steps or args.epochs):
        raise ValueError("--max-steps 0 with --epochs 0 sets no end to training: give either a positive value")
    if args.cf_norm is None:
        args.cf_norm = "standard" if args.cf == "sasrec" and args.method != "tallrec" else "none"
    return args


def computes(a):
    """A run's arguments {name: value} as what they compute: a step's global batch (--batch-size x --accum, which
    only splits it into micro-batches, for memory) in place of the two."""
    a = dict(a)
    accum = a.pop("accum", None) or 1
    if a.get("batch_size") is not None:
        a["batch_size"] *= accum
    return a


def lr_at(step, args, total):
    """Linear warm-up from warmup_lr, then a cosine to min_lr at step total (CoLLM's linear_warmup_cosine_lr)."""
    if step < args.warmup:
        return args.warmup_lr + (args.lr - args.warmup_lr) * step / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------- building a method

def run_name(method, cf_name="mf", weight_types="qkvo", prompt="text"):
    """The run folder's name: mf, lightgcn, sasrec, tallrec, collm, cora-qkvo; "-lightgcn"/"-sasrec" for CoLLM/CoRA
    on them, "-id-only" for prompts without titles."""
    name = f"cora-{weight_types}" if method == "cora" else method
    name += f"-{cf_name}" if method in ("collm", "cora") and cf_name != "mf" else ""
    return name + ("-id-only" if method in LLM_METHODS and prompt == "id-only" else "")


def llm_run_dir(args):
    return data.run_dir(args.out, args.data, run_name(args.method, args.cf, args.weight_types, args.prompt))


def checkpointed(folder):
    """Whether a run folder holds the checkpoint of an unfinished run (which --resume trains on)."""
    return os.path.isfile(os.path.join(folder, "state.safetensors"))


def weights_file(method):
    """The weights file of a run folder: cf.safetensors for CF models, trainable.safetensors for LLM methods."""
    return "cf.safetensors" if method in CF_METHODS else "trainable.safetensors"


def toy_llm(ds, out):
    """The embedded default LLM: a tiny random LLaMA + a tokenizer trained on the toy prompts (untrained!)."""
    folder = os.path.join(out, "toy-llama")
    with data.run_lock(folder, wait=True):  # two first runs at once: one builds it, the other waits for it
        if not os.path.isfile(os.path.join(folder, "model.safetensors")):
            texts = [p + a for s in (ds.train, ds.valid, ds.test) for t in ("tallrec", "collm")
                     for p in data.prompts(ds, s, t)[:3000] for a in (" Yes", " No")]
            llama.build_tiny_llama(folder, texts, vocab_size=600)
            print(f"built an untrained tiny LLaMA + tokenizer in {folder}")
    return folder


def llm_fingerprint(folder):
    """SHA-256 of an LLM folder's config.json and of each weights file's size and 17 samples of 64 KiB (the header
    first): cheap, and another model or checkpoint differs (a run records it; its readers compare)."""
    h = hashlib.sha256()
    for path in [os.path.join(folder, "config.json"), *sorted(set(llama.checkpoint_files(folder).values()))]:
        size = os.path.getsize(path)
        h.update(f"{os.path.basename(path)} {size}\n".encode())
        with open(path, "rb") as f:
            for k in range(17):
                f.seek(size * k // 17)
                h.update(f.read(2 ** 16))
    return h.hexdigest()


def rank0_first(fn, *a, **kw):
    """fn on rank 0 first (it may build and write files), then on the other ranks (they find them built)."""
    rank, world = rank_world()
    if rank > 0:
        dist.barrier()
    out = fn(*a, **kw)
    if rank == 0 and world > 1:
        dist.barrier()
    return out


def build_llm_method(args, ds, llm, tok, yes_no, fingerprint):
    """The method of args on the frozen llm (fingerprint: llm_fingerprint of its folder); for CoLLM with its step-1
    TALLRec LoRA loaded, that run trained first when absent."""
    kw = dict(score=args.score, delta_dropout=args.lora_dropout)
    lora = dict(r=args.r, alpha=args.alpha, targets=tuple(args.lora_targets.split(",")), **kw)
    if args.method == "tallrec":
        return collm.TALLRec(llm, tok, yes_no, **lora)
    path = rank0_first(cf.cf_checkpoint, args.data, args.cf, args.out, args.data_root, args.seed, ds)
    cf_model = cf.load_cf(path)
    if (cf_model.n_users, cf_model.n_items) != (ds.n_users, ds.n_items):
        raise ValueError(f"{path} has tables of {cf_model.n_users} users and {cf_model.n_items} items, but --data "
                         f"{args.data} (--data-root {args.data_root}) has {ds.n_users} and {ds.n_items} (ids + "
                         f"padding): it was trained on other data; delete {os.path.dirname(path)} or use another --out")
    if args.method == "collm":
        m = collm.CoLLM(llm, tok, yes_no, cf_model, tune_lora=args.tune_lora, **lora)
        tallrec = data.run_dir(args.out, args.data, run_name("tallrec", prompt=args.prompt))
        if not os.path.isfile(os.path.join(tallrec, "results.json")):  # step 1 = TALLRec, trained first when absent
            print(f"CoLLM step 1: no finished TALLRec run in {tallrec}; training it first")
            run_llm(argparse.Namespace(**{**vars(args), "method": "tallrec", "resume": args.resume and
                                          checkpointed(tallrec)}))
        res = data.check_run(tallrec, "trainable.safetensors")
        diff = {k: (res["args"].get(k), vars(args)[k]) for k in STAGE1 if res["args"].get(k) != vars(args)[k]}
        if diff or res.get("llm_fingerprint") != fingerprint:
            raise ValueError(f"{tallrec} is not this CoLLM's step 1: " + (f"its settings differ (saved vs now: {diff})"
                             if diff else f"it was trained on another LLM ({res.get('llm')})") + "; move it away")
        stage1 = os.path.join(tallrec, "trainable.safetensors")
        lora = collm.load_trained(stage1, {f"lora.{k}": v for k, v in m.lora.state_dict().items()},
                                  "this CoLLM's LoRA")
        m.lora.load_state_dict({k.removeprefix("lora."): v for k, v in lora.items()})
        m.stage1 = res["files"]["trainable.safetensors"]  # recorded by the CoLLM run, compared by load_run
    else:
        m = cora.CoRA(llm, tok, yes_no, cf_model, weight_types=args.weight_types, r=args.r, alpha=args.alpha,
                      n_queries=args.n_queries, n_blocks=args.n_blocks, ffn_dim=args.ffn_dim, **kw)
    if args.cf_norm == "standard":  # fixed statistics of the frozen CF features over every train row
        t = ds.train
        m.standardize(*(torch.as_tensor(v) for v in (t.uid, t.iid, cf.history_ids(t.history, cf.MAX_HISTORY))))
    return m


# ---------------------------------------------------------------------------------------- checkpoints and history

def save_state(path, model, opt, best, meta):
    """Everything a run needs to continue, in one safetensors file written atomically (temp + fsync + rename):
    trainable weights, AdamW moments, the best weights so far, the RNG states; the counters in its metadata."""
    t = {f"model.{k}": v for k, v in model.trainable_state().items()}
    t.update({f"best.{k}": v for k, v in (best or {}).items()})
    for i, state in opt.state_dict()["state"].items():
        t.update({f"opt.{i}.{k}": v for k, v in state.items()})
    t["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        t["rng.cuda"] = torch.cuda.get_rng_state()
    blob = safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in t.items()}, {"state": json.dumps(meta)})
    data.atomic_write(path, blob)


def load_state(path, model, opt, args):
    """Restore save_state's file into model and opt; returns (best weights or None, counters)."""
    llama.read_header(path)  # a truncated or foreign file: one CheckpointError naming it, before reading tensors
    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("state", "null")) or {}
        t = {k: f.get_tensor(k) for k in f.keys()}
    saved, now = computes(meta.get("args", {})), computes(vars(args))
    diff = {k: (v, now.get(k)) for k, v in saved.items() if k not in RUN_CONTROL and v != now.get(k)}
    if "step" not in meta or diff:
        raise ValueError(f"{path}: not a checkpoint of this run (settings that differ, saved vs now: {diff}); "
                         f"resume with the same arguments, or delete it to start afresh")
    own = model.trainable_state()
    weights = {k.removeprefix("model."): v for k, v in t.items() if k.startswith("model.")}
    if set(weights) != set(own) or any(weights[k].shape != v.shape for k, v in own.items()):
        raise ValueError(f"{path}: its trainable tensors do not match this model's; delete it to start afresh")
    model.load_state_dict(weights, strict=False)
    sd = {**opt.state_dict(), "state": {}}
    for k, v in t.items():
        if k.startswith("opt."):                                             # opt.<param index>.<exp_avg|...>
            _, i, name = k.split(".", 2)
            sd["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(sd)
    torch.set_rng_state(t["rng.torch"])
    if "rng.cuda" in t and torch.cuda.is_available():
        torch.cuda.set_rng_state(t["rng.cuda"])
    best = {k[5:]: v.to(own[k[5:]].device) for k, v in t.items() if k.startswith("best.")}  # k[5:]: after "best."
    return best or None, meta


HISTORY = ("step", "epoch", "lr", "train_loss", "grad_norm", "valid_auc", "valid_uauc", "train_examples_per_s")


def history_tsv(rows, header=True):
    """The rows of a run's history.tsv: one per validation; train loss, gradient norm and train examples/s are over
    the steps since the last (the validations' own time left out)."""
    fmt = lambda v: "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)
    lines = ["\t".join(HISTORY)] * header + ["\t".join(fmt(r[k]) for k in HISTORY) for r in rows]
    return "".join(line + "\n" for line in lines)


def learning_curve(rows, width=40, most=12):
    """A few lines of text: valid AUC (bar) and mean train loss at up to `most` evenly spaced validations."""
    if not rows:
        return "learning curve: no validation ran"
    n = min(most, len(rows))
    pick = sorted({round(i * (len(rows) - 1) / max(1, n - 1)) for i in range(n)})  # the first and the last included
    aucs = [rows[i]["valid_auc"] for i in pick]
    lo, hi = min(aucs), max(aucs)
    lines = [f"learning curve (history.tsv): valid AUC {lo:.4f} .. {hi:.4f}"]
    for i, auc in zip(pick, aucs):
        bar = "#" * (1 + round((width - 1) * (auc - lo) / (hi - lo or 1)))
        lines.append(f"  step {rows[i]['step']:>6}  loss {rows[i]['train_loss']:.4f}  valid auc {auc:.4f} {bar}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- the LLM training loop

def run_llm(args):
    """Train and test one LLM method (args filled by fill_llm_defaults); rank 0 holds the run folder's lock."""
    with data.run_lock(llm_run_dir(args)) if rank_world()[0] == 0 else contextlib.nullcontext():
        run = setup(args)
        train(args, run)
        return finish(args, run)


def setup(args):
    """Data, frozen LLM, method, optimizer and counters (from the checkpoint with --resume), in one namespace."""
    r = SimpleNamespace(t0=time.time(), out=llm_run_dir(args))
    torch.manual_seed(args.seed)
    r.device, r.dtype = llama.DEVICE, llama.resolve_dtype(args.dtype)  # the frozen LLM's dtype; trainables stay fp32
    r.rank, r.world = rank_world()  # torchrun: every rank trains on 1/world of each global batch; rank 0 writes
    r.log = print if r.rank == 0 else (lambda *a, **kw: None)
    # data: the splits (seeded subsets with --*-limit), checked, and their prompts tokenised once
    ds = data.load_dataset(args.data, args.data_root)
    ds = data.id_only(ds) if args.prompt == "id-only" else ds
    r.splits = {k: data.limit(ds.split(k), getattr(args, f"{k}_limit"), args.seed) for k in ("train", "valid", "test")}
    for name, split in r.splits.items():
        data.check_split(split, name, f"--data {args.data}")
    if args.batch_size * args.accum > len(r.splits["train"]):
        raise ValueError(f"--batch-size {args.batch_size} x --accum {args.accum} is larger than the "
                         f"{len(r.splits['train'])} train rows")
    r.state_path, r.running = (os.path.join(r.out, f) for f in ("state.safetensors", "history.running.tsv"))
    held = checkpointed(r.out)
    if args.resume and not held:
        raise FileNotFoundError(f"--resume: no checkpoint {r.state_path} to resume from (the run finished, or never "
                                f"saved one); run without --resume")
    if not args.resume and held:  # hours of an unfinished run are not overwritten unasked
        raise ValueError(f"{r.state_path} is the checkpoint of an unfinished run: continue it with --resume, or delete "
                         f"it to start afresh")
    r.folder = args.llm or rank0_first(toy_llm, ds, os.path.join(args.out, args.data))
    llm, r.tok = llama.load(r.folder, r.dtype, r.device)
    llm = llama.compile_elementwise(llm) if args.compile else llm
    template = collm.CoLLM.template if args.method == "collm" else "tallrec"
    r.enc = {k: collm.encode_split(r.tok, ds, s, template) for k, s in r.splits.items()}  # {split: (ids, slots)}
    for k, (seqs, _) in r.enc.items():
        longest = max(map(len, seqs))
        if longest > llm.args.max_seq_len:
            raise ValueError(f"the longest {k} prompt has {longest} tokens, more than the "
                             f"{llm.args.max_seq_len} positions of {r.folder} (max_position_embeddings, or its "
                             f"sliding_window)")
    # the method on the frozen LLM; DDP all-reduces the gradients of its trainable parameters only
    yes_no = collm.answer_ids(r.tok, data.build_prompt(ds, ds.train.history[0], ds.train.iid[0], template))
    r.fingerprint = llm_fingerprint(r.folder)
    r.model = r.net = build_llm_method(args, ds, llm, r.tok, yes_no, r.fingerprint).to(r.device)
    r.params = [p for p in r.model.parameters() if p.requires_grad]
    if r.world > 1:
        frozen = [n for n, p in r.model.named_parameters() if not p.requires_grad] + [
            n for n, _ in r.model.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(r.model, frozen)
        r.net = DistributedDataParallel(r.model, device_ids=[torch.cuda.current_device()] if r.device == "cuda"
                                        else None)  # every buffer is ignored: none is broadcast
    r.opt = torch.optim.AdamW([{"params": [p for p in r.params if p.ndim >= 2], "weight_decay": args.wd},
                               {"params": [p for p in r.params if p.ndim < 2], "weight_decay": 0.0}], lr=args.lr,
                              fused=True)  # one kernel over every tensor (CPU and CUDA): the same update, faster
    steps_per_epoch = math.ceil(len(r.splits["train"]) / args.batch_size / args.accum)
    r.total = min(n for n in (args.max_steps, args.epochs * steps_per_epoch) if n)  # also the cosine's horizon
    # counters: step, the step its epoch began at (seeds the epoch's batch order), batches done in that epoch, the
    # sums of train loss and gradient norm over the steps since the last validation (for history.tsv), and the wall
    # time of the invocations before this one (a resumed run's wall time is the sum of its invocations'); whether a
    # validation was under way and the train throughput it logs; the run's id, which names its partial score files
    r.best, r.history = None, []  # history: one row per validation (HISTORY), kept in the checkpoint
    r.c = dict(step=0, epoch_start=0, pos=0, best_auc=-1.0, bad=0, loss_sum=0.0, norm_sum=0.0, since=0, wall_s=0.0,
               validating=False, train_ex_s=0.0, run=secrets.token_hex(4))
    if args.resume:
        r.best, meta = load_state(r.state_path, r.model, r.opt, args)
        r.c, r.history = {**r.c, **{k: meta[k] for k in r.c if k in meta}}, meta.get("history", [])
        r.log(f"resumed from {r.state_path} at step {r.c['step']} (best valid auc {r.c['best_auc']:.4f})"
              + (", in the validation it was at" if r.c["validating"] else ""))
    if r.world > 1:  # one id on every rank
        run_id = [r.c["run"]]
        dist.broadcast_object_list(run_id, src=0)
        r.c["run"] = run_id[0]
    r.wall = lambda: r.c["wall_s"] + time.time() - r.t0  # this run's wall time so far, over every invocation
    if r.rank == 0:  # the finished run's history.tsv stays whole until commit; this one grows meanwhile
        os.makedirs(r.out, exist_ok=True)
        data.atomic_write(r.running, history_tsv(r.history))
    r.log(f"{args.method} on {args.data}: {len(r.splits['train'])} train rows, {sum(p.numel() for p in r.params):,} "
          f"trainable parameters, {r.total} steps of {args.batch_size}x{args.accum}, {r.device} "
          f"{str(r.dtype).removeprefix('torch.')}" + (f", {r.world} processes" if r.world > 1 else ""))
    return r


def epoch_batches(c, lengths, size, seed):
    """The global batches from the counters' place on, without end: each epoch a length-bucketed order seeded by the
    step it began at, so --resume (c["epoch_start"], c["pos"]) continues the same order."""
    while True:
        yield from collm.batches(lengths, size, True, seed + c["epoch_start"])[c["pos"]:]
        c["epoch_start"], c["pos"] = c["step"], 0


def train(args, r):
    """Until --max-steps, --patience validations without gain or --max-minutes: forward and backward over the
    micro-batches, clip, AdamW step; validate and log every --eval-every steps, checkpoint every --ckpt-every."""
    c, (seqs, slots), rank, world = r.c, r.enc["train"], r.rank, r.world
    t_start, seen, skipped = time.time(), 0, 0

    def out_of_time():  # --max-minutes spent in this invocation; rank 0's clock decides for every rank
        if not args.max_minutes:
            return False
        up = time.time() - t_start > 60 * args.max_minutes
        if world > 1:
            t = torch.tensor([float(up)], device=r.device)
            dist.broadcast(t, 0)
            up = t.item() > 0
        return up

    if c["validating"]:  # resumed from the checkpoint a validation began with: that validation comes first
        validate(args, r)
    since = dict(rows=0, t=time.time())  # train rows and time since the last validation (or resume): throughput
    for group in epoch_batches(c, [len(s) for s in seqs], args.batch_size * args.accum, args.seed):
        if c["step"] >= r.total or c["bad"] >= args.patience or out_of_time() and r.history:
            break  # out of time (once validated): the best weights so far go to the test, with no further step
        c["pos"] += 1
        if len(group) < world * args.accum:  # an epoch's remainder too small for every process and micro-batch
            continue
        # forward and backward, one micro-batch at a time; DDP averages over ranks, so the weight
        # world * |idx| / |group| makes the sum the mean loss of the global batch
        r.net.train()
        loss_sum = 0.0
        for k, idx in enumerate(np.array_split(group[rank::world], args.accum)):  # this rank's micro-batches
            b = collm.collate(r.tok, seqs, slots, r.splits["train"], idx, r.device)
            with r.net.no_sync() if world > 1 and k < args.accum - 1 else contextlib.nullcontext():
                loss = F.binary_cross_entropy_with_logits(r.net(b), b["label"]) * len(idx) * world / len(group)
                loss.backward()
            loss_sum += loss.item() / world
        if world > 1:  # the global loss: the log and the NaN check agree on every rank
            t = torch.tensor([loss_sum], device=r.device)
            dist.all_reduce(t)
            loss_sum = t.item()
        # clip (--clip 0: measure the norm only) and step, unless the loss or the gradient is not finite
        for g in r.opt.param_groups:
            g["lr"] = lr_at(c["step"], args, r.total)
        norm = torch.nn.utils.clip_grad_norm_(r.params, args.clip or math.inf)
        if not math.isfinite(loss_sum) or not torch.isfinite(norm):
            last = r.state_path if os.path.isfile(r.state_path) else "none saved yet"
            msg = (f"step {c['step'] + 1}: non-finite {'loss' if not math.isfinite(loss_sum) else 'gradient norm'}"
                   f" (loss {loss_sum}); last good checkpoint: {last}")
            skipped += 1
            if not args.skip_nonfinite or skipped >= 10:
                raise FloatingPointError(msg + ("; 10 steps in a row were non-finite" if args.skip_nonfinite else
                                                "; lower --lr and --resume, or pass --skip-nonfinite"))
            r.log(msg + "; step skipped (--skip-nonfinite)")
            r.opt.zero_grad(set_to_none=True)
            continue  # the step counter does not advance: the batch is dropped
        r.opt.step()
        r.opt.zero_grad(set_to_none=True)
        skipped, seen, since["rows"] = 0, seen + len(group), since["rows"] + len(group)
        c.update(step=c["step"] + 1, loss_sum=c["loss_sum"] + loss_sum, norm_sum=c["norm_sum"] + norm.item(),
                 since=c["since"] + 1)
        step = c["step"]
        # validate and log at intervals (and at the end); checkpoint every --ckpt-every steps and at each validation
        if step % args.eval_every == 0 or step == r.total or out_of_time():
            c["train_ex_s"] = since["rows"] / (time.time() - since["t"])
            validate(args, r, hours=(r.total - step) * len(group) / (seen / (time.time() - t_start)) / 3600)
            since = dict(rows=0, t=time.time())
        elif step % (args.ckpt_every or args.eval_every) == 0:
            checkpoint(args, r)
    # why training ended, kept in results.json: a run cut short by time is not passed off as converged
    r.cut_short = c["bad"] < args.patience and c["step"] < r.total  # by --max-minutes: the checkpoint stays
    r.stopped_by = (f"--max-minutes {args.max_minutes:g}" if r.cut_short else "early stopping"
                    if c["bad"] >= args.patience else "step limit")
    r.log(f"training ended after {c['step']} steps: {r.stopped_by}")


def checkpoint(args, r):
    if r.rank == 0:
        save_state(r.state_path, r.model, r.opt, r.best, {**r.c, "wall_s": r.wall(), "args": vars(args),
                                                          "history": r.history})


def partial_scores(r, split):
    """The prefix of collm.predict's partial files for scoring split with this run's weights at this step."""
    return os.path.join(r.out, f"{split}.step{r.c['step']}.{r.c['run']}.partial")


def drop_partial(r):
    if r.rank == 0:
        for path in glob.glob(os.path.join(glob.escape(r.out), "*.partial.*.jsonl")):
            os.remove(path)


def validate(args, r, hours=None):
    """Score the valid split, keep the best weights, append a history row (also to history.running.tsv) and log it.
    A checkpoint marked "validating" comes first and the scores of finished batches are kept as they come (in
    <run>/valid.step<N>.<id>.partial.<rank>.jsonl), so a kill costs one batch of scoring; a checkpoint after."""
    c, step = r.c, r.c["step"]
    c["validating"] = True
    checkpoint(args, r)
    scores = collm.predict(r.model, *r.enc["valid"], r.splits["valid"], args.eval_batch_size, r.device,
                           partial=partial_scores(r, "valid"))
    valid = cf.evaluate(r.splits["valid"], scores)
    if valid["auc"] > c["best_auc"]:
        c["best_auc"], c["bad"] = valid["auc"], 0
        r.best = {k: v.detach().clone() for k, v in r.model.trainable_state().items()}
    else:
        c["bad"] += 1
    r.history.append(dict(step=step, epoch=round(step * args.batch_size * args.accum / len(r.splits["train"]), 4),
                          lr=lr_at(step - 1, args, r.total), train_loss=c["loss_sum"] / c["since"],
                          grad_norm=c["norm_sum"] / c["since"], valid_auc=valid["auc"], valid_uauc=valid["uauc"],
                          train_examples_per_s=c["train_ex_s"]))
    c.update(loss_sum=0.0, norm_sum=0.0, since=0, validating=False)
    row = r.history[-1]
    r.log(f"step {step}/{r.total} loss {row['train_loss']:.4f} lr {lr_at(step, args, r.total):.2e} valid auc "
          f"{row['valid_auc']:.4f} uauc {row['valid_uauc'] or float('nan'):.4f} best {c['best_auc']:.4f} "
          f"({c['bad']}/{args.patience} without gain) | train {row['train_examples_per_s']:.1f} ex/s"
          + (f", --max-steps {r.total} in {hours:.1f} h at most" if hours is not None else ""))
    if r.rank == 0:
        with open(r.running, "a", encoding="utf-8") as f:
            f.write(history_tsv(r.history[-1:], header=False))
    checkpoint(args, r)
    drop_partial(r)


def finish(args, r):
    """Test the best weights; commit the run folder (weights, history, predictions, results.json); print the learning
    curve and the test row beside the CF model's on the same rows."""
    r.model.load_state_dict(r.best, strict=False)
    scores = collm.predict(r.model, *r.enc["test"], r.splits["test"], args.eval_batch_size, r.device,
                           partial=partial_scores(r, "test"))
    test = cf.evaluate(r.splits["test"], scores)
    result = dict(method=args.method, data=args.data, args=vars(args), best_valid_auc=r.c["best_auc"],
                  steps=r.c["step"], stopped_by=r.stopped_by, trainable_params=sum(p.numel() for p in r.params),
                  wall_time_s=r.wall(), train_rows=len(r.splits["train"]), test_rows=len(r.splits["test"]),
                  llm=r.folder, llm_fingerprint=r.fingerprint, device=r.device,
                  dtype=str(r.dtype).removeprefix("torch."), test=test, peak_memory_mb=cf.peak_memory_mb(),
                  processes=r.world, stage1=getattr(r.model, "stage1", None))
    if r.rank > 0:
        return result
    weights = safetensors_bytes({k: v.cpu().contiguous() for k, v in r.best.items()})
    data.commit_run(r.out, {"trainable.safetensors": weights, "history.tsv": history_tsv(r.history).encode()},
                    data.predictions_tsv(r.splits["test"], scores), result)
    # the run is complete: weights, history, predictions and results remain; one cut short by --max-minutes keeps its
    # checkpoint too, so --resume trains on from where it stopped (and tests and commits again when it ends)
    for path in () if r.cut_short else (r.state_path, r.running):
        if os.path.isfile(path):
            os.remove(path)
    drop_partial(r)
    r.log(learning_curve(r.history))
    table = cf.markdown_table(args.method, {"test": test}, result["wall_time_s"])
    cf_dir = data.run_dir(args.out, args.data, args.cf)
    cf_run = data.finished(cf_dir, "cf.safetensors")
    if cf_run:  # the CF model on exactly the same test rows, beside it
        cf_model = cf.load_cf(os.path.join(cf_dir, "cf.safetensors"))
        cf_test = cf.evaluate(r.splits["test"], cf.predict(cf_model, r.splits["test"]))
        table += "\n" + cf.markdown_table(args.cf, {"test": cf_test}, cf_run["wall_time_s"]).split("\n")[-1]
    print(table)
    return result


# ------------------------------------------------------------------------------------------------------- benchmark

def bench_llm(args, ds):
    """The LLM folder --bench times: --llm, or the toy LLM built once under --out."""
    return args.llm or toy_llm(ds, os.path.join(args.out, args.data))


def bench_batch(args, ds):
    """A typical training batch: the --batch-size (8) train prompts among the first 40 batches' worth whose token
    lengths are nearest the median, as length bucketing would group them."""
    B, tok = 8 if args.batch_size is None else args.batch_size, llama.Tokenizer(bench_llm(args, ds))
    split = ds.train.subset(np.arange(min(len(ds.train), 40 * B)))
    seqs, _ = collm.encode_split(tok, ds, split, "tallrec")
    lengths = np.array([len(s) for s in seqs])
    return collm.collate(tok, seqs, None, split, np.sort(np.argsort(np.abs(lengths - np.median(lengths)))[:B]),
                         llama.DEVICE)


def bench_steps(args, dtype, ds, b, only=None):
    """{case: one call} for a shared LoRA and CoRA of equal rank and targets on the batch b: a training step
    (forward, backward, AdamW) and a forward-only scoring pass, sharing one frozen LLM stored in dtype.
    only: build that method alone ("shared LoRA" or "CoRA")."""
    llm, tok = llama.load(bench_llm(args, ds), dtype, llama.DEVICE)
    sum(float(p.float().sum()) for p in llm.parameters())  # page the weights in before anything is timed
    llm = llama.compile_elementwise(llm) if args.compile else llm  # compiled during the warm-up call
    yes_no = collm.answer_ids(tok, data.build_prompt(ds, ds.train.history[0], ds.train.iid[0], "tallrec"))
    r = 16 if args.r is None else args.r
    build = {"shared LoRA": lambda: collm.TALLRec(llm, tok, yes_no, r=r, alpha=2 * r,
                                                  targets=cora.WEIGHT_TYPES[args.weight_types]),
             "CoRA": lambda: cora.CoRA(llm, tok, yes_no, cf.MF(ds.n_users, ds.n_items, 256), args.weight_types, r=r,
                                       alpha=2 * r)}
    steps = {}
    for name in [only] if only else build:
        m = build[name]().to(llama.DEVICE)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, fused=True)

        def train_step(m=m, opt=opt):
            m.train()
            F.binary_cross_entropy_with_logits(m(b), b["label"]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps[f"{name} train"] = train_step
        steps[f"{name} forward"] = torch.no_grad()(lambda m=m: m.eval()(b))
    return steps


def bench_dtypes(name, device=llama.DEVICE):
    """The dtypes --bench times: --dtype fp32 or bf16 alone; auto: fp32 and bf16 where bf16 is native (CUDA, AMX /
    AVX-512 BF16 CPUs), else fp32 alone (emulated bf16 would take most of an hour to bench for figures no run uses)."""
    if name != "auto":
        return [name]
    return ["fp32", "bf16"] if llama.resolve_dtype("auto", device) == torch.bfloat16 else ["fp32"]


def bench(args, reps=3):
    """Shared LoRA vs CoRA (q, k, v, o; r 16) on one length-bucketed batch of real prompts, in bench_dtypes(--dtype):
    examples/s, step time, peak memory and the implied ML-1M epoch. The cases of a dtype are timed in this process
    in interleaved rounds (so machine noise hits them alike); each case's peak memory comes from a fresh child
    process that runs it twice (`--bench-case`)."""
    ds = data.load_dataset(args.data, args.data_root)
    b = bench_batch(args, ds)
    B = len(b["label"])
    dtypes = bench_dtypes(args.dtype)
    print(f"bench: {args.llm or 'toy LLM'}, batch {B} x {b['tokens'].shape[1]} tokens, {args.weight_types} "
          f"r {16 if args.r is None else args.r}, {llama.DEVICE}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}" + ("; bf16 not timed: this CPU has no native bf16 (--dtype bf16 times it)"
                                          if args.dtype == "auto" and dtypes == ["fp32"] else ""))
    res = {}
    for dt in dtypes:
        steps = bench_steps(args, llama.resolve_dtype(dt), ds, b)
        times = {k: [] for k in steps}
        for k, f in steps.items():  # warm-up (and compile)
            f()
        for _ in range(reps):
            for k, f in steps.items():
                t = time.perf_counter()
                f()
                torch.cuda.synchronize() if llama.DEVICE == "cuda" else None
                times[k].append(time.perf_counter() - t)
        for k in steps:
            argv = [sys.executable, os.path.abspath(__file__), *to_argv(args, dtype=dt), "--bench-case", k]
            out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()
            sec, mb = float(np.median(times[k])), float(out[-1])
            res[(dt, k)] = (sec, mb)
            epoch = f", ML-1M {'train epoch' if 'train' in k else 'test split'}: " + \
                f"{(33891 if 'train' in k else 7331) / (B / sec) / 60:.1f} min"
            print(f"{dt:5s} {k:20s} {sec * 1e3:8.1f} ms {B / sec:7.2f} examples/s  peak +{mb:7.1f} MB{epoch}",
                  flush=True)
        for mode in ("train", "forward"):
            (t0, m0), (t1, m1) = res[(dt, f"shared LoRA {mode}")], res[(dt, f"CoRA {mode}")]
            print(f"{dt:5s} CoRA / shared LoRA {mode}: {t1 / t0:.2f}x time, {m1 / m0:.2f}x peak memory")
    if len(dtypes) == 2:
        for k in steps:
            print(f"bf16 / fp32 {k}: {res[('fp32', k)][0] / res[('bf16', k)][0]:.2f}x faster")
    bench_merge(B, b["tokens"].shape[1], reps=reps)
    return res


def bench_merge(B, T, d=2048, r=8, reps=3):
    """One d x d projection with per-example rank-r increments: the delta path x W^T + (x A_b^T) B_b^T against the
    materialised merge bmm(x, (W + B_b A_b)^T), forward and with gradients to A and B (fp32)."""
    x, W = torch.randn(B, T, d, device=llama.DEVICE), torch.randn(d, d, device=llama.DEVICE) / d ** 0.5
    A = (torch.randn(B, r, d, device=llama.DEVICE) / d ** 0.5).requires_grad_()
    Bf = (torch.randn(B, d, r, device=llama.DEVICE) / r ** 0.5).requires_grad_()
    ways = {"delta path": lambda: F.linear(x, W) + (x @ A.mT) @ Bf.mT,
            "materialised merge": lambda: torch.bmm(x, (W + Bf @ A).mT)}            # (B, d, d) per example
    sec = {}
    for mode in ("forward", "train"):
        for name, f in ways.items():
            step = torch.no_grad()(f) if mode == "forward" else lambda f=f: f().square().mean().backward()
            step()
            t = time.perf_counter()
            for _ in range(reps):
                step()
            sec[mode, name] = (time.perf_counter() - t) / reps
        print(f"per-example delta vs materialised merge, {mode} (d {d}, r {r}, batch {B} x {T}): "
              f"{sec[mode, 'delta path'] * 1e3:.1f} vs {sec[mode, 'materialised merge'] * 1e3:.1f} ms, "
              f"{sec[mode, 'materialised merge'] / sec[mode, 'delta path']:.1f}x faster")


def bench_case(args):
    """Child of bench: run one case twice; print the peak memory it added above set-up (MB)."""
    ds = data.load_dataset(args.data, args.data_root)
    method = args.bench_case.rsplit(" ", 1)[0]
    step = bench_steps(args, llama.resolve_dtype(args.dtype), ds, bench_batch(args, ds), method)[args.bench_case]
    base = cf.peak_memory_mb(reset=True)
    step(), step()
    print(cf.peak_memory_mb() - base)


# ----------------------------------------------------------------------------- the comparison: --method all

# What --method all prints alongside: the paper's test AUC, UAUC (Vicuna-7B for the LLM methods), from its Table 3
# and, for CoRA-MF with W_c on other weight types, its Table 4.


PAPER = {
    "ml-1m": {"mf": (0.6486, 0.6396), "lightgcn": (0.5858, 0.6512), "sasrec": (0.7005, 0.6734),
              "collm-sasrec": (0.7059, 0.6531), "cora-qkvo-sasrec": (0.7019, 0.6517), "tallrec": (0.7044, 0.6741),
              "collm": (0.7028, 0.6714), "collm-lightgcn": (0.7164, 0.6842), "cora-qkvo": (0.7361, 0.6884),
              "cora-qkvo-lightgcn": (0.7128, 0.6966),
              "cora-qkvof": (0.7312, 0.6801), "cora-qkv": (0.6947, 0.5933), "cora-qko": (0.7111, 0.5973),
              "cora-qk": (0.6784, 0.5887)},
    "amazon-book": {"mf": (0.7105, 0.5543), "lightgcn": (0.7026, 0.5619), "sasrec": (0.6675, 0.5614),
                    "collm-sasrec": (0.7538, 0.5874), "cora-qkvo-sasrec": (0.7677, 0.5961), "tallrec": (0.6583, 0.4971),
                    "collm": (0.8021, 0.5782), "collm-lightgcn": (0.7835, 0.5663), "cora-qkvo": (0.8179, 0.6262),
                    "cora-qkvo-lightgcn": (0.7886, 0.5689),
                    "cora-qkvof": (0.8141, 0.6068), "cora-qkv": (0.7741, 0.5747), "cora-qko": (0.8091, 0.5949),
                    "cora-qk": (0.7685, 0.5644)}}
DISPLAY = {"mf": "MF", "lightgcn": "LightGCN", "tallrec": "TALLRec", "collm": "CoLLM-MF",
           "collm-lightgcn": "CoLLM-LGCN",
           "cora-qkvo": "CoRA-MF", "cora-qkvo-lightgcn": "CoRA-LGCN", "sasrec": "SASRec", "collm-sasrec": "CoLLM-SAS",
           "cora-qkvo-sasrec": "CoRA-SAS"}
DISPLAY.update({f"cora-{w}": f"CoRA-MF ({w})" for w in cora.WEIGHT_TYPES if w != "qkvo"})
DISPLAY.update({f"{k}-id-only": f"{v} (ID-only)" for k, v in DISPLAY.items()})
ALL = [("mf", "mf"), ("lightgcn", "mf"), ("tallrec", "mf"), ("collm", "mf"), ("cora", "mf")]
ALL_LGCN = [("collm", "lightgcn"), ("cora", "lightgcn")]
ALL_SAS = [("sasrec", "mf"), ("collm", "sasrec"), ("cora", "sasrec")]



def to_argv(args, **override):
    """args (with overrides) back to this program's command line, options at their default left out."""
    argv = []
    for a in cli()._actions:
        v = override.get(a.dest, getattr(args, a.dest, None))
        if not a.option_strings or a.dest == "help" or v == a.default:
            continue
        argv += [a.option_strings[0]] if a.nargs == 0 else [a.option_strings[0], str(v)]
    return argv


def run_all(args):
    """Every method of the comparison (or, with --ablation weights, CoRA with each weight type of the paper's
    Table 4), one child process each (so each row's peak memory is its own), for each seed; then one table,
    markdown + JSON, with the paper's numbers alongside. The CF rows keep their tuned configurations: the shared
    hyperparameter options (--lr, --batch-size, --epochs, ...) apply to the LLM methods only."""
    seeds = [args.seed + k for k in range(args.seeds)]
    if args.ablation == "weights":
        runs = [dict(method="cora", cf=args.cf, weight_types=w) for w in cora.WEIGHT_TYPES]
    else:
        runs = [dict(method=m, cf=c) for m, c in ALL + (ALL_LGCN if args.lgcn else []) + (ALL_SAS if args.sas else [])]
        if args.ablation == "text":
            runs += [dict(r, prompt="id-only") for r in runs if r["method"] in LLM_METHODS]
    rows, t0 = {}, time.time()
    for seed in seeds:
        out = args.out if len(seeds) == 1 else os.path.join(args.out, f"seed-{seed}")
        for run in runs:
            run = dict(dict(prompt="text", weight_types=args.weight_types), **run)
            cf_only = {k: None for k in HYPER} if run["method"] in CF_METHODS else {}
            name = run_name(run["method"], run["cf"], run["weight_types"], run["prompt"])
            folder = data.run_dir(out, args.data, name)
            path, resume = os.path.join(folder, "results.json"), args.resume and checkpointed(folder)
            argv = to_argv(args, seed=seed, out=out, seeds=1, lgcn=False, sas=False, ablation=None, reuse=False,
                           resume=resume, **cf_only, **run)
            if args.reuse and not resume and finished_with(path, cli().parse_args(argv)):  # --resume: train it on
                print(f"\n--reuse: {path} was run with these arguments; not run again", flush=True)
            else:
                print(f"\n$ python train.py {' '.join(argv)}", flush=True)
                code = subprocess.run([sys.executable, os.path.abspath(__file__), *argv]).returncode
                if code:
                    raise ValueError(f"python train.py {' '.join(argv)} failed (exit code {code}; its error is above)")
            with open(path) as f:
                rows.setdefault(name, []).append(json.load(f))
    ref = run_name("cora", args.cf if args.ablation == "weights" else "mf", args.weight_types)  # CoRA-MF, qkvo
    deltas = cf.paired_deltas(os.path.join(args.out, args.data), rows, ref) if len(seeds) == 1 else {}
    table = comparison_table(args.data, rows, deltas, ref)
    summary = {"data": args.data, "seeds": seeds, "wall_time_s": time.time() - t0, "command": to_argv(args),
               "rows": {k: [dict(seed=r["args"]["seed"], test=r["test"], wall_time_s=r["wall_time_s"],
                                 trainable_params=r.get("trainable_params"), peak_memory_mb=r.get("peak_memory_mb"))
                            for r in v] for k, v in rows.items()},
               "auc_minus_cora_paired_se": deltas}
    os.makedirs(os.path.join(args.out, args.data), exist_ok=True)
    data.atomic_write(os.path.join(args.out, args.data, "all.md"), table + "\n")
    data.atomic_write(os.path.join(args.out, args.data, "all.json"), json.dumps(summary, indent=2) + "\n")
    print(f"\n{table}\n\nwritten to {os.path.join(args.out, args.data, 'all.md')} and all.json")
    return summary


def finished_with(path, child):
    """Whether results.json at path records a finished run (check_run) of the child's arguments: every argument both
    record agrees, except RUN_CONTROL ones and CF hyperparameters the child leaves to the tuned configuration."""
    res = data.finished(os.path.dirname(path), weights_file(child.method), lambda e: print(f"--reuse: {e}; not reused"))
    if res is None:
        return False
    stored = computes(res["args"])
    child = computes(vars(fill_llm_defaults(child) if child.method in LLM_METHODS else child))
    return all(stored[k] == v for k, v in child.items() if k in stored and v is not None and k not in RUN_CONTROL)


def comparison_table(data_name, rows, deltas=None, ref="cora-qkvo"):
    """{run name: [results.json of each seed]} -> markdown in the layout of the paper's Table 3; deltas
    {run name: (AUC difference to run ref, its SE)} (paired_deltas) fills a column; ref's own row reads "reference"."""
    mb = lambda v: f"{v:,.0f} MB" if v else "-"  # runs saved before peak memory was recorded have none
    hours = lambda s: f"{s:.0f} s" if s < 3600 else f"{s / 3600:.1f} h"

    def trained(r):  # LLM methods: steps, and why training ended (runs saved before this was recorded: steps alone)
        if "steps" in r:
            return f"{r['steps']:,} steps" + (f", {r['stopped_by']}" if r.get("stopped_by") else "")
        return f"best epoch {r['best_epoch']} of {r['epochs_run']}" if "best_epoch" in r else "-"  # CF models

    def stat(rs, key):
        v = [r["test"][key] for r in rs if r["test"][key] is not None]
        if not v:
            return "-"
        return f"{np.mean(v):.4f}" + (f" ± {np.std(v):.4f}" if len(v) > 1 else "")
    paper, deltas = PAPER.get(data_name, {}), deltas or {}
    header = ["method", "AUC", "UAUC", "warm AUC", "cold AUC", f"AUC - {DISPLAY.get(ref, ref)} (paired SE)",
              "paper AUC / UAUC", "training", "wall time", "trainable params", "peak memory"]
    cells = []
    for name, rs in rows.items():
        p, d = paper.get(name), deltas.get(name)
        cells.append([DISPLAY.get(name, name), *(stat(rs, k) for k in ("auc", "uauc", "warm_auc", "cold_auc")),
                      "reference" if d and name == ref else f"{d[0]:+.4f} ± {d[1]:.4f}" if d else "-",
                      f"{p[0]:.4f} / {p[1]:.4f}" if p else "-",
                      trained(rs[0]), hours(np.mean([r["wall_time_s"] for r in rs])),
                      f"{rs[0].get('trainable_params', 0):,}",
                      mb(max(r.get("peak_memory_mb") or 0 for r in rs))])
    return cf.table(header, cells)


# ----------------------------------------------------------------------------- general ability (paper Fig. 1)

CLOZE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cloze.tsv")  # prompt, right answer, wrong answer
PPL_WINDOW = 256  # tokens per perplexity window


@torch.no_grad()
def perplexity(model, tok, text, window=PPL_WINDOW, max_tokens=4096, batch=4, deltas=None):
    """exp(mean next-token NLL) over the first max_tokens tokens of text, in independent windows."""
    ids = tok.encode(text, bos=False)[: max_tokens + 1]
    n = (len(ids) - 1) // window
    if n == 0:
        raise ValueError(f"perplexity needs more than {window} tokens of text, got {len(ids)}")
    x = torch.tensor(ids[: n * window + 1], device=model.embed_tokens.weight.device)
    inputs, targets = x[:-1].view(n, window), x[1:].view(n, window)      # (n, window) each
    nll = 0.0
    for i in range(0, n, batch):
        logits = model(inputs[i:i + batch], deltas=deltas).float()      # (b, window, V)
        nll += F.cross_entropy(logits.flatten(0, 1), targets[i:i + batch].flatten(), reduction="sum").item()
    return math.exp(nll / (n * window))


@torch.no_grad()
def answer_logprob(model, tok, prompts, answers, deltas=None, per_token=False):
    """log P(answer | prompt), summed over the answer's tokens (per_token: averaged), for each pair: (N,)."""
    seqs, n_answer = [], []
    for p, a in zip(prompts, answers):
        head, full = tok.encode(p), tok.encode(p + a)
        full = full if full[:len(head)] == head and len(full) > len(head) else head + tok.encode(a, bos=False)
        if len(full) == len(head):
            raise ValueError(f"answer {a!r} to {p!r} has no tokens")
        seqs.append(full)
        n_answer.append(len(full) - len(head))
    tokens, mask = tok.batch(seqs, model.embed_tokens.weight.device)   # left padded: answers end every row
    logp = model(tokens, mask, deltas=deltas).float().log_softmax(-1)  # (N, T, V)
    lp = torch.stack([logp[b, -n - 1:-1].gather(-1, tokens[b, -n:, None]).sum() for b, n in enumerate(n_answer)])
    return lp / torch.tensor(n_answer, device=lp.device) if per_token else lp


def load_run(run, llm, tok, folder):
    """A finished LLM run folder (check_run) rebuilt on llm, the LLM of the folder it was trained on: (its arguments,
    its dataset, the method with its trained weights)."""
    if not os.path.isdir(run):
        raise FileNotFoundError(f"--adapter {run}: no such run folder (a finished LLM run, e.g. runs/ml-1m/cora-qkvo)")
    res = data.check_run(run, "trainable.safetensors")
    a = argparse.Namespace(**{**vars(cli().parse_args([])), **res["args"], "resume": False})
    fingerprint = llm_fingerprint(folder)
    if a.method not in LLM_METHODS or res.get("llm_fingerprint") != fingerprint:
        raise ValueError(f"--adapter {run}: " + (f"a {a.method} run, not an LLM method's" if a.method not in LLM_METHODS
                         else f"trained on the LLM {res.get('llm')}, not on --llm {folder} (their files differ)"))
    if a.method == "collm":  # its step 1 must still be there: build_llm_method would train a missing one
        data.check_run(data.run_dir(a.out, a.data, run_name("tallrec", prompt=a.prompt)), "trainable.safetensors")
    ds = data.load_dataset(a.data, a.data_root)
    yes_no = collm.answer_ids(tok, data.build_prompt(ds, ds.train.history[0], ds.train.iid[0], "tallrec"))
    m = build_llm_method(a, ds, llm, tok, yes_no, fingerprint).to(llama.DEVICE).eval()
    if a.method == "collm" and m.stage1 != res.get("stage1"):
        raise ValueError(f"--adapter {run}: its step-1 TALLRec run has been trained again since; the CoLLM run no "
                         f"longer has the LoRA it was trained with")
    path = os.path.join(run, "trainable.safetensors")
    m.load_state_dict(collm.load_trained(path, m.trainable_state(), f"{a.method} on --llm {folder}"), strict=False)
    return a, ds, m


def sample_pairs(ds, n, seed):
    """n seeded test rows: user ids (n,), item ids (n,), liked-item histories (n, MAX_HISTORY)."""
    k = np.random.default_rng(seed).choice(len(ds.test), min(n, len(ds.test)), replace=False)
    his = cf.history_ids([ds.test.history[j] for j in k], cf.MAX_HISTORY)
    return tuple(torch.as_tensor(v, device=llama.DEVICE) for v in (ds.test.uid[k], ds.test.iid[k], his))


def general_ability(args):
    """Perplexity on general English text and accuracy on a cloze set (right answer more likely than wrong), for the
    base LLM and for the LLM as each trained run in --adapter leaves it: TALLRec/CoLLM with their LoRA applied,
    CoRA with the W_c of --pairs seeded test (user, item) pairs (default 8, averaged)."""
    with open(args.general_text, encoding="utf-8", errors="replace") as f:
        text = f.read()
    with open(CLOZE, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    prompts, right, wrong = zip(*rows)
    llm, tok = llama.load(args.llm, llama.resolve_dtype(args.dtype), llama.DEVICE)
    if len(tok.encode(text, bos=False)) <= PPL_WINDOW:
        raise ValueError(f"--general-text {args.general_text}: {len(tok.encode(text, bos=False))} tokens, too short "
                         f"for a perplexity (more than {PPL_WINDOW} needed)")
    runs = {run: load_run(run, llm, tok, args.llm) for run in args.adapter or []}  # every one checked before scoring

    def scores(deltas_list):
        ppl = [perplexity(llm, tok, text, window=PPL_WINDOW, deltas=d) for d in deltas_list]
        acc = [(answer_logprob(llm, tok, prompts, right, d) > answer_logprob(llm, tok, prompts, wrong, d))
               .float().mean().item() for d in deltas_list]
        return dict(perplexity=float(np.mean(ppl)), cloze_accuracy=float(np.mean(acc)))

    res = {"base LLM": scores([None])}
    for run, (a, ds, m) in runs.items():
        if a.method == "cora":
            uid, iid, his = sample_pairs(ds, 8 if args.pairs is None else args.pairs, args.seed)
            with torch.no_grad():
                deltas = [m.deltas(uid[j:j + 1], iid[j:j + 1], his[j:j + 1]) for j in range(len(uid))]
        else:
            deltas = [m.lora.deltas()]
        res[run] = scores(deltas)
    base = res["base LLM"]
    print(f"general ability of {args.llm} ({args.general_text}, first 4,096 tokens; {CLOZE}, {len(rows)} items)")
    print(cf.table(["LLM as left by", "perplexity", "change", "cloze accuracy", "change"],
                   [[k, f"{v['perplexity']:.2f}", f"{v['perplexity'] / base['perplexity'] - 1:+.1%}",
                     f"{v['cloze_accuracy']:.3f}", f"{v['cloze_accuracy'] - base['cloze_accuracy']:+.3f}"]
                    for k, v in res.items()]))
    return res


# ----------------------------------------------------------------------------- semantic disruption (paper Fig. 2)

QUESTION = 'Describe the {item} "{title}" in one sentence:'
QUESTION_COLLM = ("The user's preferences are encoded in the feature " + data.USER_TOKEN + '. The {item} "{title}" has '
                  "the feature " + data.ITEM_TOKEN + '. Describe the {item} "{title}" in one sentence:')


@torch.no_grad()
def semantic_disruption(args, max_new_tokens=24, show=3):
    """Greedy answers to a free-text question about the target item: base LLM; CoLLM with its collaborative
    embeddings in the prompt (and its LoRA); CoRA with the pair's W_c; TALLRec with its LoRA. Each answer is scored
    by the base LLM's perplexity given the plain question (lower = still fluent, on-topic text)."""
    llm, tok = llama.load(args.llm, llama.resolve_dtype(args.dtype), llama.DEVICE)
    runs = [load_run(run, llm, tok, args.llm) for run in args.adapter or []]
    ds = runs[0][1] if runs else data.load_dataset(args.data, args.data_root)
    uid, iid, his = sample_pairs(ds, 30 if args.pairs is None else args.pairs, args.seed)
    item = "book" if ds.kind == "book" else "movie"
    control = any(a.method == "collm" for a, _, _ in runs)  # the base LLM on CoLLM's wording, placeholders as text
    names = ["base LLM"] + ["base LLM, CoLLM's prompt"] * control + [os.path.normpath(r) for r in args.adapter or []]
    nll, examples = [], []
    for j in range(len(uid)):
        title = ds.titles[iid[j]].strip()
        q = QUESTION.format(item=item, title=title)
        ids = torch.tensor([tok.encode(q)], device=llama.DEVICE)
        cids, slots = collm.encode_placeholders(tok, QUESTION_COLLM.format(item=item, title=title))
        cids = torch.tensor([cids], device=llama.DEVICE)
        outs = [(ids, llm.generate(ids, max_new_tokens, tok.eos_id))]
        if control:
            outs.append((cids, llm.generate(cids, max_new_tokens, tok.eos_id)))
        for a, _, m in runs:
            if a.method == "collm":
                at = torch.tensor([slots], device=llama.DEVICE)
                emb = m.embed(cids, uid[j:j + 1], iid[j:j + 1], at, his[j:j + 1])
                outs.append((cids, llm.generate(cids, max_new_tokens, tok.eos_id, embeds=emb, deltas=m.lora.deltas())))
            else:
                deltas = m.deltas(uid[j:j + 1], iid[j:j + 1], his[j:j + 1]) if a.method == "cora" else m.lora.deltas()
                outs.append((ids, llm.generate(ids, max_new_tokens, tok.eos_id, deltas=deltas)))
        texts = [tok.decode([i for i in o[0, p.shape[1]:].tolist() if i != tok.eos_id]) for p, o in outs]
        said = [k for k, text in enumerate(texts) if text.strip()]  # an empty answer has no perplexity
        row = np.full(len(texts), np.nan)  # mean NLL per token of each answer: the base LLM, the plain question
        if said:
            lp = answer_logprob(llm, tok, [q] * len(said), [texts[k] for k in said], per_token=True)
            row[said] = -lp.cpu().numpy()
        nll.append(row)
        examples.append((title, texts))
    nll = np.array(nll)  # (pairs, LLMs), NaN where the answer is empty (the LLM said EOS at once)
    empty = np.isnan(nll).sum(0)
    with np.errstate(invalid="ignore"):  # 0 / 0: an LLM whose answers are all empty has no perplexity (NaN)
        ppl = np.exp(np.nansum(nll, 0) / (len(uid) - empty))
    print(f"semantic disruption: {len(uid)} test pairs of {ds.name}, greedy, {max_new_tokens} new tokens at most; "
          f"answers scored by the base LLM given the plain question")
    print(cf.table(["LLM as left by", "perplexity of its answers", "empty answers"],
                   [[n, f"{p:.2f}", f"{e} of {len(uid)}"] for n, p, e in zip(names, ppl, empty)]))
    for title, texts in examples[:show]:
        print(f"\n{QUESTION.format(item=item, title=title)}")
        print("\n".join(f"  {n}: {t.strip()!r}" for n, t in zip(names, texts)))
    return dict(zip(names, ppl.tolist())), examples




# --------------------------------------------------------------------------------------------------- command line

DIST_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
DIST_TIMEOUT = timedelta(minutes=30)  # for the process group to form, and for any collective (rank 0 may train CF)


def init_distributed(args):
    """torchrun's process group (nccl on CUDA, gloo on CPU). WORLD_SIZE and friends left over in a shell without
    torchrun are refused: the process would wait for peers that never come."""
    env = {k: os.environ[k] for k in DIST_VARS if k in os.environ}
    if not (env.get("TORCHELASTIC_RUN_ID") or all(env.get(k) for k in DIST_VARS[1:5])):
        raise ValueError(f"{' '.join(f'{k}={v}' for k, v in env.items())} in the environment, but no torchrun "
                         f"(TORCHELASTIC_RUN_ID, or LOCAL_RANK + RANK + MASTER_ADDR + MASTER_PORT): unset them, or "
                         f"launch with torchrun --nproc_per_node N train.py ...")
    if args.method not in LLM_METHODS:
        raise ValueError(f"--method {args.method}: torchrun runs the LLM methods (tallrec, collm, cora); "
                         f"train CF models and --method all with plain python")
    try:
        dist.init_process_group("nccl" if llama.DEVICE == "cuda" else "gloo", timeout=DIST_TIMEOUT)
    except RuntimeError as e:  # the store's timeout, a refused connection
        raise ValueError(f"torchrun: the {env['WORLD_SIZE']} processes did not connect within {DIST_TIMEOUT} "
                         f"({e})") from None
    if llama.DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def interrupted(args):
    """What Ctrl-C leaves to say: the last checkpoint a run saved and the command that continues from it."""
    if args.method == "all":
        return ("interrupted; the same command with --reuse --resume keeps the finished runs and trains on the one "
                "with a checkpoint")
    if args.method in CF_METHODS or args.bench or args.eval_general or args.generate:
        return "interrupted (nothing to continue: only LLM methods save checkpoints)"
    folders = [llm_run_dir(args)] + [data.run_dir(args.out, args.data, run_name("tallrec", prompt=args.prompt))] * (
        args.method == "collm")  # CoLLM may have been training its step 1
    states = [p for p in (os.path.join(f, "state.safetensors") for f in folders)
              if os.path.isfile(p) and (args.resume or os.path.getmtime(p) >= STARTED)]
    if not states:
        return "interrupted before the first checkpoint (every --ckpt-every steps): nothing saved to continue from"
    argv = sys.argv[1:] + ["--resume"] * ("--resume" not in sys.argv)
    return (f"interrupted; the last checkpoint is {max(states, key=os.path.getmtime)}; continue with:\n"
            f"  python {shlex.quote(sys.argv[0])} {shlex.join(argv)}")


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bench_case:
        return bench_case(args)
    if not (args.eval_general or args.generate or args.bench and args.llm):  # a run writes under --out
        data.check_out(args.out)
    if args.bench:
        return bench(args)
    if args.eval_general or args.generate:
        if not args.llm:
            raise ValueError("--eval-general and --generate need --llm PATH (the base LLM of the --adapter runs)")
        return general_ability(args) if args.eval_general else semantic_disruption(args)
    if args.method == "all":
        with data.run_lock(os.path.join(args.out, args.data)):  # all.md / all.json: one comparison at a time
            return run_all(args)
    if os.environ.get("WORLD_SIZE", "1") != "1" and not dist.is_initialized():  # launched by torchrun
        init_distributed(args)
    if args.method in CF_METHODS:
        if args.epochs == 0:
            raise ValueError("--epochs 0: a CF model trains for at least one epoch (0 means no limit for LLM methods)")
        torch.set_num_threads(args.threads or 1)  # 1 thread is fastest for these small models
        hp = {k: getattr(args, k) for k in HYPER}
        return cf.run_cf(args.data, args.method, args.out, args.data_root, args.seed, hp)
    if args.llm and not os.path.isfile(os.path.join(args.llm, "config.json")):
        raise FileNotFoundError(f"--llm {args.llm}: no such Hugging Face LLaMA folder (config.json + "
                                f"model.safetensors + tokenizer.model or tokenizer.json; README.md, Bring your own "
                                f"LLaMA), or omit --llm for the toy LLM")
    fill_llm_defaults(args)
    try:
        return run_llm(args)
    finally:
        if dist.is_initialized():  # free the DDP wrapper (in reference cycles) while Python still runs: left to
            gc.collect()           # interpreter exit, its gloo work aborted ~1 in 25 torchrun runs (SIGABRT)
            dist.destroy_process_group()


def at_least(low, kind=int, strict=False, below=None):
    """An argparse type: a finite kind (int or float) >= low (> low when strict; < below when given). A value out
    of range exits at once with argparse's "argument --flag: ..." line."""
    def parse(text):
        v = kind(text)
        if not math.isfinite(v) or v < low or strict and v == low or below is not None and v >= below:
            what = f"{'an integer' if kind is int else 'a number'} {'>' if strict else '>='} {low}"
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: expected {what}" + f" and < {below}" * (
                below is not None))
        return v
    parse.__name__ = kind.__name__  # argparse: "invalid int value: 'x'"
    return parse


def projections(text):
    """An argparse type: comma-separated LLaMA projections (llama.PROJ), kept as the text."""
    if not text or any(p not in llama.PROJ for p in text.split(",")):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated projections of {', '.join(llama.PROJ)}")
    return text


def cli():
    """The command line (a function so that tests can parse argument lists). Every number is range-checked here."""
    natural, zero_off = at_least(1), at_least(0)  # zero_off: >= 0, where 0 switches the limit off
    positive, nonneg, dropout = at_least(0, float, strict=True), at_least(0.0, float), at_least(0.0, float, below=1)
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n")[1])
    parser.add_argument("--method", default="cora", choices=CF_METHODS + LLM_METHODS + ("all",))
    parser.add_argument("--seeds", type=natural, default=1, help="--method all: repeat with seeds seed, seed+1, ...")
    parser.add_argument("--lgcn", action="store_true", help="--method all: add CoLLM-LGCN and CoRA-LGCN")
    parser.add_argument("--sas", action="store_true", help="--method all: add SASRec, CoLLM-SAS and CoRA-SAS")
    parser.add_argument("--ablation", choices=("text", "weights"), help="--method all: text = each LLM method also "
                        "with --prompt id-only (paper Fig. 6); weights = CoRA with each --weight-types (paper Table 4)")
    parser.add_argument("--reuse", action="store_true", help="--method all: keep a finished run (results.json) made "
                        "with the same arguments instead of training it again; with --resume, every run that holds a "
                        "checkpoint (interrupted, or cut short by --max-minutes) trains on from it")
    parser.add_argument("--prompt", default="text", choices=("text", "id-only"),
                        help="id-only: every title becomes \"item <id>\" (paper Fig. 6)")
    parser.add_argument("--data", default="toy", choices=("toy", "ml-1m", "amazon-book"))
    parser.add_argument("--data-root", default=None, help="data folder (default: env CORA_ML1M / CORA_BOOK)")
    parser.add_argument("--out", default="runs")
    parser.add_argument("--seed", type=at_least(0, below=2 ** 63), default=2023)
    parser.add_argument("--epochs", type=zero_off, help="passes over the train rows at most (LLM methods: 0 = none)")
    parser.add_argument("--lr", type=positive)
    parser.add_argument("--wd", type=nonneg)
    parser.add_argument("--dim", type=natural, help="CF embedding size")
    parser.add_argument("--batch-size", type=natural, help="rows per (micro-)batch; LLM methods: a step "
                        "reads --batch-size x --accum rows")
    parser.add_argument("--patience", type=natural, help="evaluations without a better valid AUC before stopping "
                        "(LLM default: the official span, CoRA 2,000 steps, TALLRec/CoLLM 1,000, over --eval-every)")
    parser.add_argument("--init-std", type=positive, help="CF embedding init std (default: per data/method, see above)")
    parser.add_argument("--threads", type=natural, default=None, help="torch CPU threads (CF default 1)")
    g = parser.add_argument_group("LLM methods (tallrec, collm, cora)")
    g.add_argument("--llm", help="HF LLaMA folder; default: a tiny untrained LLaMA built for the toy data")
    g.add_argument("--cf", default="mf", choices=CF_METHODS, help="CF model read by collm/cora")
    g.add_argument("--weight-types", default="qkvo", choices=list(cora.WEIGHT_TYPES), help="CoRA: weights given W_c")
    g.add_argument("--r", type=natural, help="rank (TALLRec/CoLLM LoRA 8, CoRA 16)")
    g.add_argument("--alpha", type=positive, help="scaling numerator, W_c and LoRA scaled by alpha/r (16 / 32)")
    g.add_argument("--lora-targets", default="q,v", type=projections, help="TALLRec/CoLLM LoRA projections")
    g.add_argument("--lora-dropout", type=dropout, default=0.05, help="dropout on the delta path input")
    g.add_argument("--tune-lora", action="store_true", help="CoLLM step 2 also trains the step-1 LoRA")
    g.add_argument("--score", default="yes", choices=("yes", "yesno"), help="raw Yes logit, or Yes-No (TALLRec)")
    g.add_argument("--cf-norm", choices=("none", "standard"), help="CoLLM/CoRA: [e_u, e_i] as is (official), or "
                   "standardised with fixed train-set statistics (default: standard for --cf sasrec, none otherwise)")
    g.add_argument("--n-queries", type=natural, default=4)
    g.add_argument("--n-blocks", type=natural, default=8)
    g.add_argument("--ffn-dim", type=natural, default=3072)
    g.add_argument("--accum", type=natural, help="micro-batches per step (gradient accumulation): the same "
                   "run as one batch of their sum, in less memory")
    g.add_argument("--eval-every", type=natural, help="optimizer steps between validations")
    g.add_argument("--eval-batch-size", type=natural)
    g.add_argument("--warmup", type=zero_off, help="linear warm-up steps")
    g.add_argument("--warmup-lr", type=nonneg, help="learning rate at step 0 of the warm-up")
    g.add_argument("--min-lr", type=nonneg, help="learning rate at the end of the cosine decay")
    g.add_argument("--clip", type=nonneg, help="gradient-norm clipping (0 = none)")
    g.add_argument("--max-steps", type=zero_off, help="optimizer steps at most, the cosine's horizon (0: --epochs)")
    g.add_argument("--max-minutes", type=nonneg, default=0, help="stop training after this long (validate "
                   "unless just done, test the best weights, keep the checkpoint for --resume); --resume with a tiny "
                   "value tests them at once")
    g.add_argument("--train-limit", type=zero_off, default=0, help="train on a seeded random subset of this many rows")
    g.add_argument("--valid-limit", type=zero_off, default=0, help="validate on a seeded subset of this many rows")
    g.add_argument("--test-limit", type=zero_off, default=0, help="test on a seeded subset of this many rows")
    g.add_argument("--resume", action="store_true", help="continue from <run>/state.safetensors (same arguments); "
                   "without it a run refuses a folder that holds one")
    g.add_argument("--ckpt-every", type=zero_off, default=0, help="steps between checkpoints (0: --eval-every)")
    g.add_argument("--skip-nonfinite", action="store_true", help="drop a step whose loss or gradient is NaN/inf "
                   "instead of stopping")
    g.add_argument("--eval-general", action="store_true", help="perplexity + cloze accuracy of --llm, --adapter runs")
    g.add_argument("--generate", action="store_true", help="answers to a question about the item, base vs --adapter")
    g.add_argument("--adapter", nargs="*", help="--eval-general: trained LLM run folders, e.g. runs/ml-1m/cora-qkvo")
    g.add_argument("--pairs", type=natural, help="--eval-general / --generate: seeded test (user, item) pairs (8 / 30)")
    g.add_argument("--general-text", default="/usr/share/common-licenses/GPL-3", help="--eval-general: English text")
    g.add_argument("--compile", action="store_true", help="torch.compile the LLM's elementwise work (RMSNorm, RoPE, "
                   "SwiGLU): about 1.1x faster on a 2-core AMX CPU in bf16 (README, Speed); not yet measured on a GPU")
    g.add_argument("--bench", action="store_true", help="shared LoRA vs CoRA, fp32 vs bf16: step time and memory")
    g.add_argument("--bench-case", help=argparse.SUPPRESS)  # one case of --bench, in a child process
    g.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"), help="the frozen LLM's dtype; auto: "
                   "bf16 on CUDA and on CPUs with native bf16 (AMX / AVX-512 BF16), else fp32")
    return parser


if __name__ == "__main__":
    parser = cli()
    args = parser.parse_args()
    try:
        main(args)
    except KeyboardInterrupt:
        parser.exit(130, f"\ntrain.py: {interrupted(args)}\n")
    except (ValueError, OSError, FloatingPointError) as e:  # one clear line (CheckpointError is a ValueError)
        parser.exit(2, f"train.py: error: {e}\n")
