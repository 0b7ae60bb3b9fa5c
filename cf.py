"""Collaborative-filtering encoders (MF, LightGCN, SASRec): AUC/UAUC metrics, pretraining and checkpoints.

CoLLM and CoRA (arXiv 2408.10645) feed the LLM the user/item embeddings of a CF model that is pretrained on the click
labels and then frozen; embed(uid, iid) -> (e_u, e_i) is what the LLM methods read. Official facts followed
(zyang1580/CoLLM: minigpt4/models/rec_base_models.py, baseline_train_mf_ood.py, baseline_train_lightgcn_ood.py,
minigpt4/datasets/datasets/rec_gnndataset.py, minigpt4/tasks/rec_base_task.py):
- MF: nn.Embedding(n, d, padding_idx=0) for users and items, PyTorch's N(0, 1) init, score = <e_u, e_i>, no biases.
- LightGCN (He et al., SIGIR 2020): E(l+1) = D^-1/2 A D^-1/2 E(l) over the user-item graph of the POSITIVE train rows
  (a repeated positive pair counts twice, as the official scipy matrix sums duplicates), final embedding = mean of
  E(0..L), init N(0, 0.1), 2 layers, score = <e_u, e_i>. In eval mode the propagated tables are computed once and
  cached; checkpoints store them, so a loaded LightGCN needs no graph.
- SASRec (Kang & McAuley; CoLLM's baseline_train_sasrec.py): item + learned position embeddings, 2 pre-LN causal
  self-attention blocks (4 heads, dropout 0.2) over the row's last 25 liked items; the user is the output at the last
  position, score = <h_u, e_i>. ML-1M: d 64, lr 1e-2, wd 1e-2, batch 2048 (official). embed(uid, iid, his) reads
  the history his (B, L); MF and LightGCN ignore it.
- Pretraining: Adam(lr, weight_decay=wd), BCE-with-logits of the score against the label, shuffled minibatches; after
  every epoch the valid AUC; early stop when it has not improved for `patience` epochs; the best state is kept.
  Official ML-1M settings: MF d 256, lr 1e-3, wd 1e-4, batch 1024; LightGCN d 64, lr 1e-2, wd 1e-4, batch 1024.
- AUC = sklearn's roc_auc_score (ties count 1/2); UAUC = uAUC_me: unweighted mean of the per-user AUC over users with
  both labels (users with one row or one class skipped).
Deviations:
- Embedding rows of users/items absent from train start (and so stay) at exactly 0, like the padding row: they never
  get a data gradient, so officially they keep their random init shrunk by weight decay, and the cold rows of
  valid/test get random scores (cold AUC swung 0.43-0.60 between ML-1M runs). Zero rows score exactly 0 ("no
  collaborative information"), which makes valid-based model selection meaningful.
- ML-1M MF uses init N(0, 0.1) and wd 1.5e-4 (CF_DEFAULTS), chosen on valid AUC: valid / test 0.6742 / 0.6492, against
  0.6741 / 0.6449 with the official wd 1e-4 and N(0, 1) (d 256, lr 1e-3, batch 1024, patience 50; init N(0, 0.1)
  unless said: wd 1e-4 0.6736 / 0.6445, 2e-4 0.6722 / 0.6471, 3e-4 0.6590 / 0.6378; wd 2e-4 with d 128 0.6717 /
  0.6466, d 64 0.6711 / 0.6466, lr 3e-3 0.6704 / 0.6449). LightGCN and SASRec keep the official values.
- Metrics are vectorised numpy (one lexsort, tie-aware average ranks) instead of a per-user sklearn loop; the test
  AUC logged each epoch is information only (selection uses valid only, as the official script).
"""
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

import data

# ----------------------------------------------------------------------------------------------------------- metrics

def _group_auc(group, labels, scores):
    """(G,) AUC of every group (sorted by group id), NaN where a group lacks a class. All inputs (N,)."""
    group, scores = np.asarray(group), np.asarray(scores, np.float64)
    labels = np.asarray(labels)
    if not (len(group) == len(labels) == len(scores)):
        raise ValueError(f"lengths differ: {len(group)} groups, {len(labels)} labels, {len(scores)} scores")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    if len(scores) == 0:
        return np.full(0, np.nan)
    order = np.lexsort((scores, group))                       # by group, then score
    g, s, y = group[order], scores[order], labels[order].astype(np.float64)
    n = len(g)
    new_group = np.r_[True, g[1:] != g[:-1]]
    tie_start = np.flatnonzero(new_group | np.r_[True, s[1:] != s[:-1]])    # blocks of equal (group, score)
    tie_end = np.r_[tie_start[1:], n]
    group_start = np.flatnonzero(new_group)
    offset = np.repeat(group_start, np.diff(np.r_[group_start, n]))       # (N,) first position of the row's group
    rank = np.repeat((tie_start + tie_end + 1) / 2.0, tie_end - tie_start) - offset   # 1-based, ties averaged
    gid = np.cumsum(new_group) - 1
    n_pos, n_all = np.bincount(gid, weights=y), np.bincount(gid)
    n_neg = n_all - n_pos
    with np.errstate(divide="ignore", invalid="ignore"):      # Mann-Whitney U / (n_pos n_neg)
        result = (np.bincount(gid, weights=rank * y) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), result, np.nan)


def auc(labels, scores):
    """Tie-aware ROC AUC (= sklearn.metrics.roc_auc_score); ValueError when only one class is present."""
    value = _group_auc(np.zeros(len(labels), np.int64), labels, scores)
    if len(value) == 0 or np.isnan(value[0]):
        raise ValueError(f"AUC is undefined: the {len(labels)} labels do not hold both classes")
    return float(value[0])


def uauc(uids, labels, scores):
    """Unweighted mean of per-user AUC over users with both labels -> (uauc, n_users_used, n_users_skipped)."""
    per_user = _group_auc(uids, labels, scores)
    used = ~np.isnan(per_user)
    if not used.any():
        raise ValueError("UAUC is undefined: no user has both a positive and a negative row")
    return float(per_user[used].mean()), int(used.sum()), int((~used).sum())


def auc_diff_se(labels, scores_a, scores_b, n_boot=1000, seed=0):
    """Paired bootstrap standard error of AUC(a) - AUC(b), two models' scores of the same rows: the rows are resampled
    with replacement n_boot times (every replicate is one group of _group_auc), replicates lacking a class dropped."""
    idx = np.random.default_rng(seed).integers(0, len(labels), (n_boot, len(labels)))    # (n_boot, N)
    group, y = np.repeat(np.arange(n_boot), len(labels)), np.asarray(labels)[idx].ravel()
    a, b = (_group_auc(group, y, np.asarray(s, np.float64)[idx].ravel()) for s in (scores_a, scores_b))
    return float(np.nanstd(a - b))


def evaluate(rows, scores):
    """AUC/UAUC of a split (data.Interactions) and of its warm and cold rows; None where undefined."""
    scores = np.asarray(scores, np.float64)
    if len(scores) != len(rows):
        raise ValueError(f"{len(scores)} scores for {len(rows)} rows")
    out = {"n": len(rows), "n_warm": int(rows.warm.sum()), "n_cold": int((~rows.warm).sum())}
    for prefix, mask in (("", np.ones(len(rows), bool)), ("warm_", rows.warm), ("cold_", ~rows.warm)):
        y, s = rows.label[mask], scores[mask]
        out[prefix + "auc"] = auc(y, s) if 0 < y.sum() < len(y) else None
        try:
            out[prefix + "uauc"], used, _ = uauc(rows.uid[mask], y, s)
        except ValueError:
            out[prefix + "uauc"], used = None, 0
        if not prefix:
            out["n_users_uauc"] = used
    return out


def table(header, rows):
    """A markdown table: the header cells, a rule, then each row's cells (every table this project prints)."""
    lines = ["| " + " | ".join(map(str, cells)) + " |" for cells in [header, *rows]]
    return "\n".join([lines[0], "|" + "---|" * len(header), *lines[1:]])


def markdown_table(method, results, wall_s):
    """One markdown row per split of {split: evaluate(...) dict}."""
    fmt = lambda v: "-" if v is None else f"{v:.4f}"
    keys = ("auc", "uauc", "warm_auc", "warm_uauc", "cold_auc", "cold_uauc")
    header = ["method", "split", "AUC", "UAUC", "warm AUC", "warm UAUC", "cold AUC", "cold UAUC", "n", "wall time"]
    return table(header, [[method, split, *(fmt(m[k]) for k in keys), m["n"], f"{wall_s:.1f}s"]
                          for split, m in results.items()])


def paired_deltas(folder, names, ref):
    """{run: (its test AUC - run ref's, paired bootstrap SE)} for the runs in folder whose predictions.tsv scored the
    same test rows as ref's (a CF run on the full test split beside LLM runs on --test-limit rows is left out)."""
    if ref not in names:
        return {}
    preds = {n: np.loadtxt(os.path.join(folder, n, "predictions.tsv"), skiprows=1, ndmin=2) for n in names}
    r = preds[ref]                                                              # (N, 4): uid, iid, label, score
    return {n: (auc(r[:, 2], p[:, 3]) - auc(r[:, 2], r[:, 3]), auc_diff_se(r[:, 2], p[:, 3], r[:, 3]))
            for n, p in preds.items() if p.shape == r.shape and np.array_equal(p[:, :3], r[:, :3])}


# ------------------------------------------------------------------------------------------------------------ models

def _init_table(table, std, seen=None):
    """N(0, std) init; row 0 (padding) and, when the train ids `seen` are given, the rows absent from them start at 0:
    no gradient ever reaches those rows, so they stay exactly 0."""
    nn.init.normal_(table.weight, std=std)
    keep = torch.zeros(len(table.weight), dtype=torch.bool)
    keep[slice(1, None) if seen is None else torch.from_numpy(seen)] = True
    keep[0] = False
    with torch.no_grad():
        table.weight[~keep] = 0


class CFModel(nn.Module):
    """User and item tables, score = <e_u, e_i>; row 0 (padding) and, when train is given, the rows of ids absent
    from train start at 0. Subclasses define embed(uid, iid)."""
    kind = None

    def __init__(self, n_users, n_items, dim, init_std, train=None, user_table=True):
        super().__init__()
        self.n_users, self.n_items, self.dim, self.n_layers, self.maxlen = n_users, n_items, dim, 0, 0
        if user_table:
            self.user = nn.Embedding(n_users, dim, padding_idx=0)
        self.item = nn.Embedding(n_items, dim, padding_idx=0)  # both built, then both initialised: the RNG order
        if user_table:                                          # of every published MF/LightGCN figure
            _init_table(self.user, init_std, None if train is None else train.uid)
        _init_table(self.item, init_std, None if train is None else train.iid)

    def forward(self, uid, iid, his=None):        # (B,), (B,) [, (B, L)] -> (B,) logits
        e_u, e_i = self.embed(uid, iid, his)      # (B, d), (B, d)
        return (e_u * e_i).sum(-1)


class MF(CFModel):
    """Matrix factorisation (CoLLM's MatrixFactorization)."""
    kind = "mf"

    def __init__(self, n_users, n_items, dim, init_std=1.0, train=None):
        super().__init__(n_users, n_items, dim, init_std, train)

    def embed(self, uid, iid, his=None):
        return self.user(uid), self.item(iid)     # (B, d), (B, d)


def normalized_adjacency(n_users, n_items, train):
    """Sparse (U+I, U+I) D^-1/2 A D^-1/2 of the bipartite graph of train's positive rows (items after users)."""
    liked = train.label > 0.5
    u = torch.from_numpy(train.uid[liked])
    i = torch.from_numpy(train.iid[liked]) + n_users
    n = n_users + n_items
    a = torch.sparse_coo_tensor(torch.stack([torch.cat([u, i]), torch.cat([i, u])]), torch.ones(2 * len(u)),
                                (n, n), check_invariants=True).coalesce()  # duplicates summed
    degree = torch.sparse.sum(a, 1).to_dense()                            # (U+I,)
    d = torch.where(degree > 0, degree.clamp(min=1e-12).pow(-0.5), torch.zeros(()))
    row, col = a.indices()
    return torch.sparse_coo_tensor(a.indices(), d[row] * a.values() * d[col], (n, n), check_invariants=True).coalesce()


class LightGCN(CFModel):
    """LightGCN; train: the data.Interactions whose positive rows form the graph (None for a loaded checkpoint, which
    embeds with its stored propagated tables in any mode). Graph and tables are buffers: .to(device) moves them."""
    kind = "lightgcn"

    def __init__(self, n_users, n_items, dim, n_layers=2, train=None, init_std=0.1):
        super().__init__(n_users, n_items, dim, init_std, train)
        self.n_layers = n_layers
        graph = None if train is None else normalized_adjacency(n_users, n_items, train)
        self.register_buffer("graph", graph, persistent=False)
        self.register_buffer("user_final", None, persistent=False)   # (U, d) propagated: eval cache or stored
        self.register_buffer("item_final", None, persistent=False)   # (I, d)

    def propagate(self):
        x = torch.cat([self.user.weight, self.item.weight])                # (U+I, d)
        layers = [x]
        for _ in range(self.n_layers):
            x = torch.sparse.mm(self.graph, x)
            layers.append(x)
        final = torch.stack(layers).mean(0)                                  # (U+I, d)
        return final[:self.n_users], final[self.n_users:]

    def tables(self):
        if self.graph is None:
            if self.user_final is None:
                raise RuntimeError("this LightGCN has neither a graph nor stored tables")
        elif self.training:
            return self.propagate()
        elif self.user_final is None:
            with torch.no_grad():
                self.user_final, self.item_final = self.propagate()
        return self.user_final, self.item_final

    def train(self, mode=True):
        if self.graph is not None:               # the weights may change: drop the cached tables
            self.user_final = self.item_final = None
        return super().train(mode)

    def embed(self, uid, iid, his=None):
        users, items = self.tables()
        return users[uid], items[iid]             # (B, d), (B, d)


MAX_HISTORY = 25  # the longest liked-item history a CF model reads (SASRec's maxlen, CoLLM's ML-1M config)


def history_ids(history, maxlen):
    """(N, maxlen) int64: each row's last maxlen liked items, left-padded with 0 (the most recent item last)."""
    out = np.zeros((len(history), maxlen), np.int64)
    for k, h in enumerate(history):
        h = np.asarray(h[-maxlen:] if maxlen else h[:0], np.int64)
        out[k, maxlen - len(h):] = h
    return torch.from_numpy(out)


class SASRec(CFModel):
    """SASRec (Kang & McAuley, ICDM 2018) as CoLLM uses it: the user is the causal Transformer's output at the last
    position of the row's liked-item history (his, (B, L) left-padded); score = <h_u, e_i>. Pre-LN blocks as the
    official code (Q = LN(x), K = V = x; point-wise FFN with residual). Deviation: padded keys are masked out of
    attention (officially they are zero vectors that still take softmax weight), so extra padding changes nothing;
    an empty history gives h_u = 0 (no collaborative information), like an unseen user in MF."""
    kind = "sasrec"

    def __init__(self, n_users, n_items, dim=64, n_layers=2, n_heads=4, dropout=0.2, maxlen=25, init_std=None,
                 train=None):
        super().__init__(n_users, n_items, dim, 0.02 if init_std is None else init_std, train, user_table=False)
        self.n_layers, self.n_heads, self.maxlen = n_layers, n_heads, maxlen
        self.pos = nn.Embedding(maxlen, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(dim, eps=1e-8), qkv=nn.Linear(dim, 3 * dim), out=nn.Linear(dim, dim),
            ln2=nn.LayerNorm(dim, eps=1e-8),
            ffn=nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim))))
            for _ in range(n_layers))
        self.final, self.drop = nn.LayerNorm(dim, eps=1e-8), nn.Dropout(dropout)

    def encode(self, his, every_position=False):                           # (B, L) item ids, 0 = padding
        B, L = his.shape
        real = his != 0                                                     # (B, L)
        x = self.drop(self.item(his) * self.dim ** 0.5 + self.pos.weight[-L:]) * real[..., None]  # (B, L, d)
        causal = torch.ones(L, L, dtype=torch.bool, device=his.device).tril()
        mask = (causal & real[:, None, None, :]) | torch.eye(L, dtype=torch.bool, device=his.device)  # (B, 1, L, L)
        for b in self.blocks:
            q = b["ln1"](x)
            qh, kh, vh = (t.view(B, L, self.n_heads, -1).transpose(1, 2) for t in  # (B, H, L, d/H) each
                          (F.linear(q, *_rows(b["qkv"], 0, self.dim)), F.linear(x, *_rows(b["qkv"], 1, self.dim)),
                           F.linear(x, *_rows(b["qkv"], 2, self.dim))))
            p = self.drop.p if self.training else 0.0
            a = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, dropout_p=p)
            x = q + self.drop(b["out"](a.transpose(1, 2).reshape(B, L, -1)))
            y = b["ln2"](x)
            x = (y + self.drop(b["ffn"](y))) * real[..., None]
        h = self.final(x) * real[..., None]                                 # (B, L, d): 0 at padding
        return h if every_position else h[:, -1]                            # (B, d): 0 for an empty history

    def embed(self, uid, iid, his=None):
        if his is None:
            raise ValueError("SASRec embeds a user from the row's history: pass his (B, L)")
        return self.encode(his[:, -self.maxlen:]), self.item(iid)            # (B, d), (B, d)


def _rows(linear, k, d):
    """The k-th (d, d_in) block of a fused projection's weight and bias."""
    return linear.weight[k * d:(k + 1) * d], linear.bias[k * d:(k + 1) * d]


# ---------------------------------------------------------------------------------------------------------- training

@torch.no_grad()
def predict(model, rows, batch_size=65536):
    """(N,) float64 scores (logits) of a split; puts the model in eval mode."""
    model.eval()
    uid, iid, his = torch.from_numpy(rows.uid), torch.from_numpy(rows.iid), history_ids(rows.history, model.maxlen)
    scores = [model(u, i, h) for u, i, h in zip(*(t.split(batch_size) for t in (uid, iid, his)))]
    return torch.cat(scores).double().numpy()


def train_cf(kind, ds, dim, lr, wd, batch_size, epochs, patience, seed, n_layers=2, init_std=None, log=print):
    """Pretrain MF or LightGCN on ds.train; early stopping on valid AUC. -> (best model in eval mode, results)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    torch.manual_seed(seed)
    if kind == "mf":
        model = MF(ds.n_users, ds.n_items, dim, 1.0 if init_std is None else init_std, ds.train)
    elif kind == "lightgcn":
        model = LightGCN(ds.n_users, ds.n_items, dim, n_layers, ds.train, 0.1 if init_std is None else init_std)
    elif kind == "sasrec":
        model = SASRec(ds.n_users, ds.n_items, dim, n_layers, init_std=init_std, train=ds.train)
    else:
        raise ValueError(f"unknown CF model {kind!r}; choose 'mf', 'lightgcn' or 'sasrec'")
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    shuffle = torch.Generator().manual_seed(seed)
    uid, iid, label = (torch.from_numpy(a) for a in (ds.train.uid, ds.train.iid, ds.train.label))
    his = history_ids(ds.train.history, model.maxlen)                       # (N, maxlen); width 0 unless SASRec
    best_auc, best_epoch, best_state, t0 = -1.0, -1, None, time.time()
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(label), generator=shuffle).split(batch_size):
            loss = F.binary_cross_entropy_with_logits(model(uid[idx], iid[idx], his[idx]), label[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        valid_auc, test_auc = (auc(rows.label, predict(model, rows)) for rows in (ds.valid, ds.test))
        log(f"epoch {epoch:4d} | loss {total / len(label):.4f} | valid auc {valid_auc:.4f} | "
            f"test auc {test_auc:.4f} | {time.time() - t0:.1f}s")
        if valid_auc > best_auc:
            best_auc, best_epoch = valid_auc, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    result = {"kind": kind, "best_epoch": best_epoch, "epochs_run": epoch + 1, "train_time_s": time.time() - t0,
              "valid": evaluate(ds.valid, predict(model, ds.valid)), "test": evaluate(ds.test, predict(model, ds.test))}
    return model, result


# Pretraining settings, (data, method) -> hyperparameters (init_std None = the official init): the official CoLLM values
# (see above), fast ones for toy, and for ML-1M MF init N(0, 0.1) and wd 1.5e-4.
CF_METHODS = ("mf", "lightgcn", "sasrec")
CF_DEFAULTS = {
    ("ml-1m", "mf"): dict(dim=256, lr=1e-3, wd=1.5e-4, batch_size=1024, epochs=1000, patience=50, init_std=0.1),
    ("ml-1m", "lightgcn"): dict(dim=64, lr=1e-2, wd=1e-4, batch_size=1024, epochs=1000, patience=50, init_std=None),
    ("ml-1m", "sasrec"): dict(dim=64, lr=1e-2, wd=1e-2, batch_size=2048, epochs=1000, patience=100, init_std=None),
    ("amazon-book", "mf"): dict(dim=256, lr=1e-3, wd=1e-6, batch_size=10240, epochs=1000, patience=50, init_std=None),
    ("amazon-book", "lightgcn"): dict(dim=256, lr=1e-4, wd=1e-7, batch_size=10240, epochs=1000, patience=100,
                                      init_std=None),
    ("amazon-book", "sasrec"): dict(dim=64, lr=1e-3, wd=1e-3, batch_size=10240, epochs=1000, patience=100,
                                    init_std=None),
    ("toy", "mf"): dict(dim=32, lr=1e-2, wd=1e-4, batch_size=256, epochs=60, patience=5, init_std=0.1),
    ("toy", "lightgcn"): dict(dim=32, lr=1e-2, wd=1e-4, batch_size=256, epochs=60, patience=5, init_std=None),
    ("toy", "sasrec"): dict(dim=32, lr=1e-2, wd=1e-4, batch_size=256, epochs=60, patience=5, init_std=None),
}
HYPER = ("dim", "lr", "wd", "batch_size", "epochs", "patience", "init_std")


def peak_memory_mb(reset=False):
    """This process's peak memory so far: the CUDA allocator's on GPU, the peak resident set (VmHWM) on CPU. reset:
    start the peak again from now (a child's maximum RSS otherwise starts from its parent's)."""
    if torch.cuda.is_available():
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return torch.cuda.max_memory_allocated() / 2 ** 20
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the peak resident set size to the current one
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def run_cf(data_name, method, out="runs", data_root=None, seed=2023, overrides=None, ds=None, log=print):
    """Pretrain one CF model (CF_DEFAULTS, then overrides), commit its run folder <out>/<data>/<method> (cf.safetensors,
    predictions.tsv, results.json); returns (model, results)."""
    t0 = time.time()
    if (data_name, method) not in CF_DEFAULTS:
        raise ValueError(f"no CF defaults for {method!r} on {data_name!r}; known: {sorted(CF_DEFAULTS)}")
    hp = {**CF_DEFAULTS[(data_name, method)], **{k: v for k, v in (overrides or {}).items() if v is not None}}
    folder = data.run_dir(out, data_name, method)
    with data.run_lock(folder):
        ds = ds or data.load_dataset(data_name, data_root)
        log(f"{method} on {data_name}: {len(ds.train)}/{len(ds.valid)}/{len(ds.test)} rows, {ds.n_users} users, "
            f"{ds.n_items} items, {hp}")
        model, result = train_cf(method, ds, seed=seed, log=log, **hp)
        result.update(method=method, data=data_name, args={"data_root": data_root, "seed": seed, **hp},
                      wall_time_s=time.time() - t0, checkpoint=os.path.join(folder, "cf.safetensors"),
                      peak_memory_mb=peak_memory_mb(), trainable_params=sum(p.numel() for p in model.parameters()))
        data.commit_run(folder, {"cf.safetensors": cf_bytes(model, {"dataset": data_name, "seed": seed, **hp})},
                        data.predictions_tsv(ds.test, predict(model, ds.test)), result)
    log(markdown_table(method, {"valid": result["valid"], "test": result["test"]}, result["wall_time_s"]))
    return model, result


def cf_checkpoint(data_name, method, out="runs", data_root=None, seed=2023, ds=None, log=print):
    """Path of the CF checkpoint <out>/<data>/<method>/cf.safetensors, pretrained with the defaults if absent; a folder
    that holds one must be a finished run on that dataset (data.check_run)."""
    if method not in CF_METHODS:
        raise ValueError(f"unknown CF model {method!r}; choose from {CF_METHODS}")
    folder = data.run_dir(out, data_name, method)
    path = os.path.join(folder, "cf.safetensors")
    if os.path.isfile(path) or os.path.isfile(os.path.join(folder, "results.json")):
        data.check_run(folder, "cf.safetensors")
        stored = load_cf(path, kind=method).meta.get("dataset")
        if stored != data_name:
            raise ValueError(f"{path} was trained on {stored!r}, not {data_name!r}; delete it or use another --out")
        log(f"using the CF checkpoint {path}")
        return path
    run_cf(data_name, method, out, data_root, seed, ds=ds, log=log)
    return path


# ------------------------------------------------------------------------------------------------------- checkpoints

def save_cf(path, model, meta=None):
    """Write a CF model to safetensors atomically (cf_bytes)."""
    data.atomic_write(path, cf_bytes(model, meta))


def cf_bytes(model, meta=None):
    """A CF model as safetensors bytes. LightGCN also stores its propagated tables (no graph needed)."""
    tensors = ({f"sasrec.{k}": v for k, v in model.state_dict().items()} if isinstance(model, SASRec)
               else {"user": model.user.weight, "item": model.item.weight})
    if isinstance(model, LightGCN):
        with torch.no_grad():
            tensors["user_final"], tensors["item_final"] = model.tables() if model.graph is None else model.propagate()
    header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (meta or {}).items()}
    header.update(kind=model.kind, n_users=str(model.n_users), n_items=str(model.n_items), dim=str(model.dim),
                  n_layers=str(model.n_layers), dataset=str((meta or {}).get("dataset", "")),
                  n_heads=str(getattr(model, "n_heads", 0)), maxlen=str(model.maxlen))
    return safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, header)


def load_cf(path, kind=None):
    """A frozen, eval-mode CF model from save_cf's file; model.meta holds the stored metadata."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CF checkpoint {path} not found: pretrain one with "
                                f"`python train.py --method mf|lightgcn|sasrec --data ...`")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{path} is not a readable safetensors CF checkpoint ({e})") from None
    if meta.get("kind") not in ("mf", "lightgcn", "sasrec"):
        raise ValueError(f"{path}: metadata kind is {meta.get('kind')!r}, expected 'mf', 'lightgcn' or 'sasrec'")
    if kind is not None and meta["kind"] != kind:
        raise ValueError(f"{path} holds a {meta['kind']} model, but {kind} was asked for")
    need = {"mf": ("user", "item"), "lightgcn": ("user", "item", "user_final", "item_final"),
            "sasrec": ("sasrec.item.weight",)}[meta["kind"]]
    if any(k not in tensors for k in need):
        raise ValueError(f"{path}: missing tensors {[k for k in need if k not in tensors]}")
    try:
        n_users, n_items, dim, n_layers = (int(meta[k]) for k in ("n_users", "n_items", "dim", "n_layers"))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: bad or missing metadata ({e})") from None
    if meta["kind"] == "sasrec":
        model = SASRec(n_users, n_items, dim, n_layers, int(meta.get("n_heads", 4)), maxlen=int(meta.get("maxlen", 25)))
        state = {k.removeprefix("sasrec."): v for k, v in tensors.items()}
    else:
        model = MF(n_users, n_items, dim) if meta["kind"] == "mf" else LightGCN(n_users, n_items, dim, n_layers)
        state = {"user.weight": tensors["user"], "item.weight": tensors["item"]}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: tensor shapes do not match the metadata ({e})") from None
    model.requires_grad_(False).eval()
    if meta["kind"] == "lightgcn":
        model.user_final, model.item_final = tensors["user_final"], tensors["item_final"]
    model.meta = meta
    return model
