"""
collm.py: the LLM-as-recommender baselines, TALLRec and CoLLM, and the Yes/No scoring every LLM method shares.

Scoring (CoLLM minigpt4rec_v2.py forward_v2 L729-730; CoRA minigpt4rec_vx.py, same lines in spirit):
    s(u, i) = logit_"Yes"( LLM(prompt(u, i)) at the last prompt position )
    loss    = BCE-with-logits(s, y)
The raw "Yes" logit is the score (and the AUC input), not a softmax. TALLRec's own code normalises over
{Yes, No}; `score="yesno"` gives that: sigmoid(l_Yes - l_No) = softmax([l_No, l_Yes])[1].
Only the last position's final hidden state meets the LM head, and only the Yes/No rows of it.

TALLRec (as re-implemented in the CoLLM/CoRA papers, CoLLM stage 1): LoRA on the frozen LLM, text prompt only.
    W' = W + (alpha / r) B A,  A ~ kaiming-uniform, B = 0 (so step 0 is the base LLM), dropout on the LoRA input;
    official r=8, alpha=16, dropout 0.05, targets q and v.
CoLLM (Zhang et al. 2023): the frozen CF model's e_u, e_i pass through the CIE MLP
    g(e) = W_2 ReLU(W_1 e),  W_1: d -> 10d,  W_2: 10d -> d_model   (one MLP shared by users and items)
and replace the token embeddings at the <UserID> / <TargetItemID> placeholders of the CoLLM prompt.
Two steps as in the paper: step 1 trains the LoRA on the text prompt (= TALLRec), step 2 trains the CIE with
that LoRA loaded and frozen (`tune_lora=True` trains both).

Deliberate deviations, each documented where it happens:
- The prompt is tokenised piecewise around the placeholders, each placeholder becoming one reserved id
  (the tokenizer's unk id, as the official "<unk>" trick) whose position is recorded. The official code
  searches the whole sequence for unk ids, which breaks when a title itself contains "<unk>".
- Batches are length-bucketed (see `batches`); the official code pads every batch to its longest prompt
  in dataset order.
- Optional (--cf-norm standard, the default with SASRec only): CoLLM and CoRA read [e_u, e_i] standardised per
  feature with the mean and std over every train row, fixed buffers saved with the run (so an example's features
  never depend on its batch). The official code reads them raw. SASRec's user vectors are LayerNorm outputs that
  share one direction (cosine 0.965 to their mean, norm 14) and its item vectors have norm 0.04: raw, one CIE
  maps every item to nearly the same token, and CoRA's W_c is nearly the same for every example.
"""
import contextlib
import glob
import json
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file

import data
from cf import MAX_HISTORY, history_ids
from llama import Tokenizer, proj_dims, read_header


# ----------------------------------------------------------------------------- prompts -> token ids

def answer_ids(tok, prompt):
    """Ids of "Yes" and "No" as the first sub-token of the answer word where it follows the prompt."""
    base = tok.encode(prompt)
    ids = []
    for word in ("Yes", "No"):
        full = tok.encode(prompt + " " + word)
        if full[:len(base)] != base or len(full) == len(base):
            raise ValueError(f"{tok.path}: ' {word}' after the prompt changes the prompt's own tokens; "
                             f"cannot pick an answer token")
        ids.append(full[len(base)])
    if ids[0] == ids[1]:
        raise ValueError(f"{tok.path}: 'Yes' and 'No' start with the same token {ids[0]}; the score is undefined")
    return ids


def encode_split(tok, ds, split, template):
    """Token ids of every prompt of a split, and for the CoLLM template the placeholder positions (N, 2)."""
    texts = data.prompts(ds, split, template)
    if template != "collm":
        return [tok.encode(t) for t in texts], None
    seqs, slots = zip(*(encode_placeholders(tok, t) for t in texts))
    return list(seqs), np.array(slots, dtype=np.int64)


def encode_placeholders(tok, text):
    """Ids of a text holding USER_TOKEN then ITEM_TOKEN, each placeholder one token; and their positions."""
    head, rest = text.split(data.USER_TOKEN)
    mid, tail = rest.split(data.ITEM_TOKEN)
    a, b, c = tok.encode(head), tok.encode(mid, bos=False), tok.encode(tail, bos=False)
    placeholder = tok.unk_id
    return a + [placeholder] + b + [placeholder] + c, (len(a), len(a) + 1 + len(b))


def batches(lengths, batch_size, shuffle, seed=0, pool=50):
    """Length-bucketed batches of indices. Training: shuffle, sort within pools of `pool` batches, shuffle
    the batches (so left padding wastes little and order stays random). Evaluation: sorted by length."""
    lengths = np.asarray(lengths)
    if not shuffle:
        order = np.argsort(lengths, kind="stable")
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng = np.random.default_rng(seed)
    order, out = rng.permutation(len(lengths)), []
    for i in range(0, len(order), pool * batch_size):
        chunk = order[i:i + pool * batch_size]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        out += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    return [out[i] for i in rng.permutation(len(out))]


def collate(tok, seqs, slots, split, idx, device):
    """One batch: left-padded tokens/mask, ids, liked-item histories (for SASRec), labels, and placeholder positions
    shifted by the padding."""
    tokens, mask = tok.batch([seqs[i] for i in idx], device)
    b = dict(tokens=tokens, mask=mask, uid=torch.as_tensor(split.uid[idx], device=device),
             iid=torch.as_tensor(split.iid[idx], device=device),
             his=history_ids([split.history[i] for i in idx], MAX_HISTORY).to(device),  # (B, 25)
             label=torch.as_tensor(split.label[idx], dtype=torch.float32, device=device))
    if slots is not None:
        pad = tokens.shape[1] - mask.sum(1)                                    # (B,) left padding per row
        b["slots"] = torch.as_tensor(slots[idx], device=device) + pad[:, None]  # (B, 2) user, item positions
    return b


def rank_world():
    """(rank, number of processes) under torchrun, else (0, 1)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


@torch.no_grad()
def predict(model, seqs, slots, split, batch_size, device, partial=None):
    """(N,) scores of every row of a split; under torchrun each rank scores every world-th batch, then all gather.
    partial (a path prefix, or None): each rank appends every batch it scores to <partial>.<rank>.jsonl, one JSON
    line [rows, scores], and the rows found in any rank's file are not scored again: a long scoring cut short by a
    kill continues where it was. The caller names the prefix per weights and deletes the files once done."""
    model.eval()
    rank, world = rank_world()
    mine = batches([len(s) for s in seqs], batch_size, shuffle=False)[rank::world]
    scores, done = np.zeros(len(split), dtype=np.float32), np.zeros(len(split), dtype=bool)
    for idx, s in read_partial(partial, len(split)):
        scores[idx], done[idx] = s, True
    new = [idx for idx in mine if not done[idx].all()]
    with open(f"{partial}.{rank}.jsonl", "a", encoding="utf-8") if partial else contextlib.nullcontext() as log:
        for idx in new:
            scores[idx] = model(collate(model.tok, seqs, slots, split, idx, device)).cpu().numpy()
            if log:
                log.write("\n" + json.dumps([idx.tolist(), scores[idx].tolist()]))  # ends a line a kill cut
                log.flush()
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, [(idx, scores[idx]) for idx in new])
        for idx, s in (pair for part in parts for pair in part):
            scores[idx] = s
    return scores


def read_partial(partial, n):
    """The (rows, scores) lines of predict's <partial>.*.jsonl files; a line a kill cut short (or any line that is
    not a whole [rows, scores] pair of rows below n) is skipped, so those rows are scored again."""
    for path in sorted(glob.glob(glob.escape(partial) + ".*.jsonl")) if partial else ():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    idx, s = json.loads(line)
                    idx, s = np.asarray(idx, dtype=np.int64), np.asarray(s, dtype=np.float32)
                except (ValueError, TypeError):
                    continue
                if idx.ndim == 1 and idx.shape == s.shape and len(idx) and 0 <= idx.min() and idx.max() < n:
                    yield idx, s


def load_trained(path, expected, what):
    """The tensors of a run's weights file, once checked to be exactly expected's {name: tensor} (every name and
    shape); a ValueError naming the file and the first differences otherwise."""
    found = {k: shape for k, (_, shape) in read_header(path).items()}
    want = {k: tuple(v.shape) for k, v in expected.items()}
    if found != want:
        diff = [f"{k}: {found.get(k, 'absent')} in the file, {want.get(k, 'absent')} here"
                for k in sorted(set(found) | set(want)) if found.get(k) != want.get(k)]
        raise ValueError(f"{path} does not fit {what} ({len(diff)} tensors differ; {'; '.join(diff[:3])})")
    return load_file(path, device=str(next(iter(expected.values())).device))


# ----------------------------------------------------------------------------- shared pieces

class LoRA(nn.Module):
    """Shared low-rank deltas on chosen projections of every layer: ΔW = (alpha/r) B A (peft's init)."""

    def __init__(self, args, r=8, alpha=16, targets=("q", "v"), layers=None):
        super().__init__()
        self.scale, self.keys = alpha / r, [(l, p) for l in (layers or range(args.n_layers)) for p in targets]
        dims = proj_dims(args)                                                 # {proj: (d_out, d_in)}
        self.A = nn.ParameterList(nn.Parameter(torch.empty(r, dims[p][1])) for _, p in self.keys)
        self.B = nn.ParameterList(nn.Parameter(torch.zeros(dims[p][0], r)) for _, p in self.keys)
        for a in self.A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def deltas(self):
        return {k: (a, self.scale * b) for k, a, b in zip(self.keys, self.A, self.B)}


class RecLLM(nn.Module):
    """A frozen LLaMA that answers Yes/No; subclasses decide what is trainable and what the LLM reads."""
    template = "tallrec"

    def __init__(self, llm, tok: Tokenizer, yes_no, score="yes", delta_dropout=0.05):
        super().__init__()
        self.llm, self.tok, self.score, self.delta_dropout = llm.requires_grad_(False), tok, score, delta_dropout
        self.register_buffer("yes_no", torch.as_tensor(yes_no), persistent=False)

    def logits(self, batch, embeds=None, deltas=None):
        p = self.delta_dropout if self.training else 0.0                               # on the delta path only
        yn = self.llm(batch["tokens"] if embeds is None else None, batch["mask"], embeds=embeds, deltas=deltas,
                      delta_dropout=p, last_only=True, token_ids=self.yes_no)                       # (B, 2) fp32
        return yn[:, 0] if self.score == "yes" else yn[:, 0] - yn[:, 1]                         # (B,)

    def train(self, mode=True):  # frozen parts (the LLM, a CF model) stay in eval mode; dropout lives on the delta path
        super().train(mode)
        for frozen in (self.llm, getattr(self, "cf", None)):
            if frozen is not None:
                frozen.eval()
        return self

    def read_cf(self, cf):
        """Hold the frozen CF model (CoLLM, CoRA). Its features are read raw, as the official code does, until
        standardize() fixes per-feature statistics (--cf-norm standard): buffers, saved with the run."""
        self.cf = cf.requires_grad_(False).eval()
        self.register_buffer("x_mean", torch.zeros(2 * cf.dim))
        self.register_buffer("x_std", torch.ones(2 * cf.dim))

    @torch.no_grad()
    def standardize(self, uid, iid, his=None, chunk=4096):
        """Fix x_mean, x_std to the per-feature mean and std of [e_u, e_i] over these (train) rows."""
        rows = [slice(j, j + chunk) for j in range(0, len(uid), chunk)]
        x = torch.cat([torch.cat(self.cf.embed(uid[r], iid[r], None if his is None else his[r]), -1) for r in rows])
        x = x.double()                                                           # (N, 2d)
        self.x_mean.copy_(x.mean(0)), self.x_std.copy_(x.std(0).clamp_min(1e-6))

    def cf_features(self, uid, iid, his=None):
        """x = [e_u, e_i] of the frozen CF model, (x - x_mean) / x_std: (B, 2d). his (B, L) for SASRec."""
        with torch.no_grad():
            return (torch.cat(self.cf.embed(uid, iid, his), -1) - self.x_mean) / self.x_std

    def trainable_state(self):
        """What a run saves: the trainable parameters, and the CF feature statistics when there is a CF model."""
        stats = {k: v for k, v in self.named_buffers() if k in ("x_mean", "x_std")}
        return {**{k: v for k, v in self.named_parameters() if v.requires_grad}, **stats}


class TALLRec(RecLLM):
    def __init__(self, llm, tok, yes_no, r=8, alpha=16, targets=("q", "v"), **kw):
        super().__init__(llm, tok, yes_no, **kw)
        self.lora = LoRA(llm.args, r, alpha, targets)

    def forward(self, batch):
        return self.logits(batch, deltas=self.lora.deltas())


class CoLLM(TALLRec):
    template = "collm"

    def __init__(self, llm, tok, yes_no, cf, mid_times=10, tune_lora=False, **kw):
        super().__init__(llm, tok, yes_no, **kw)
        self.read_cf(cf)
        d = cf.dim
        self.cie = nn.Sequential(nn.Linear(d, d * mid_times), nn.ReLU(), nn.Linear(d * mid_times, llm.args.dim))
        self.lora.requires_grad_(tune_lora)

    def embed(self, tokens, uid, iid, slots, his=None):
        """Input embeddings of prompts whose placeholder positions slots (B, 2) get g(e_u), g(e_i)."""
        e = self.cf_features(uid, iid, his).view(len(uid), 2, -1)                       # (B, 2, d): e_u, e_i
        x = self.cie(e.to(self.cie[0].weight.dtype))                                    # (B, 2, d_model)
        emb = self.llm.embed_tokens(tokens)                                             # (B, T, d_model)
        rows = torch.arange(len(emb), device=emb.device)[:, None].expand(-1, 2)        # (B, 2)
        return emb.index_put((rows, slots), x.to(emb.dtype))                           # placeholders <- g(e)

    def forward(self, batch):
        emb = self.embed(batch["tokens"], batch["uid"], batch["iid"], batch["slots"], batch.get("his"))
        return self.logits(batch, embeds=emb, deltas=self.lora.deltas())
