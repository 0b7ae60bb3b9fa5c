"""
cora.py: CoRA, collaborative information perceived through the LLM's weights (Liu et al., AAAI 2025).

The prompt stays the clean TALLRec text (paper Table 1); the collaborative signal enters as a per-example
low-rank increment of the frozen weights. In the order of the paper's Methodology section:

1. Collaborative features. A frozen CF model gives e_u, e_i; x = [e_u, e_i] in R^{2d}
   (the official code feeds this concatenation as ONE token of width 2d).
2. Collaborative query generator. k learnable queries Q^0 in R^{k x 2d}; N blocks, each
       Q <- LN(Q + SelfAttn(Q))            queries talk to each other
       Q <- LN(Q + CrossAttn(Q, x))        queries read the collaborative features
       Q <- LN(Q + FFN(Q))
   (post-norm BERT blocks, as the official BLIP-2 Q-Former copy). Official defaults: k=4, N=8, 8 heads,
   width 2d, FFN 3072 (BERT's default, not scaled), dropout 0.1; BERT's initialisation: every Linear N(0, 0.02)
   with zero bias, LayerNorm 1 and 0, the queries N(0, 0.02). W_FC keeps PyTorch's Linear init, as officially.
3. Collaborative weights.  W_c = R(q_c W_FC) W_proj  (paper Eq. for W_c), with the official order:
       a = mean_k(Q W_FC)                  W_FC: 2d -> d_model * r, pooled over the k queries ("q_c W_FC")
       ΔW_A = R(a / ||a||_2)               reshaped to (d_model x r), unit L2 norm over all d_model * r entries
       W_c^{l,p} = (alpha / r) ΔW_A W_proj^{l,p}    W_proj^{l,p}: (r x d_out), one per layer l and projection p
   ΔW_A is per example and shared by every adapted layer and projection; W_proj is per layer and projection.
4. Merge for this example only:  Ŵ = W + W_c, computed as  y = x W^T + (x ΔW_A) (alpha/r W_proj)
   through llama.py's delta path (A = ΔW_A^T per example, B = W_proj^T shared): no d x d matrix per example.
5. Train with BCE-with-logits on the "Yes" logit; only the generator, W_FC and W_proj train; the LLM and
   the CF model are frozen (asserted in __init__).

Initialisation: W_proj = 0, so W_c = 0 and step 0 is exactly the base LLM (official reset_lora_parameters).

Weight types: q, k, v, o (attention) and f = the FFN projections gate, up, down; "qkvo" is the paper's best.
Deviation: the official code multiplies every target's input by the same (B, d_model, r) factor, which cannot
fit down_proj (input width d_ffn). Here down_proj gets its own factor from a second head W_FC^f: 2d -> d_ffn * r.
Deviation, optional (--cf-norm standard, the default with SASRec only): x is standardised per feature with fixed
train-set statistics (RecLLM.cf_features in collm.py). Read raw, SASRec's features hardly vary, and W_c collapses
to one shared LoRA (README, "Where we differ from the official code").
Note (not a deviation): with a single CF token, cross-attention's softmax is over one key, so its output is
the same linear map of x for every query; the queries differ through their own embeddings and self-attention.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from collm import RecLLM
from llama import proj_dims

WEIGHT_TYPES = {"qk": ("q", "k"), "qkv": ("q", "k", "v"), "qko": ("q", "k", "o"), "qkvo": ("q", "k", "v", "o"),
                "qkvof": ("q", "k", "v", "o", "gate", "up", "down")}


class MultiHeadAttention(nn.Module):
    def __init__(self, width, n_heads, dropout):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x, ctx):                                                 # x (B, k, w), ctx (B, S, w)
        B, k, w = x.shape
        heads = lambda t: t.view(B, -1, self.n_heads, w // self.n_heads).transpose(1, 2)  # (B, h, ., w/h)
        y = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(ctx)), heads(self.v(ctx)),
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, k, w))


class QueryBlock(nn.Module):
    """Self-attention among queries, cross-attention to the CF features, FFN; residual + LayerNorm each."""

    def __init__(self, width, n_heads, ffn_dim, dropout):
        super().__init__()
        self.self_attn = MultiHeadAttention(width, n_heads, dropout)
        self.cross_attn = MultiHeadAttention(width, n_heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(width, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, width))
        self.ln1, self.ln2, self.ln3 = (nn.LayerNorm(width, eps=1e-12) for _ in range(3))
        self.drop = nn.Dropout(dropout)

    def forward(self, q, x):
        q = self.ln1(q + self.drop(self.self_attn(q, q)))
        q = self.ln2(q + self.drop(self.cross_attn(q, x)))
        return self.ln3(q + self.drop(self.ffn(q)))


class QueryGenerator(nn.Module):
    """[e_u, e_i] -> k collaborative queries (B, k, 2d)."""

    def __init__(self, width, n_queries=4, n_blocks=8, n_heads=8, ffn_dim=3072, dropout=0.1):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, n_queries, width) * 0.02)  # Q^0, official N(0, 0.02)
        self.ln, self.drop = nn.LayerNorm(width, eps=1e-12), nn.Dropout(dropout)  # BERT embedding LN on the queries
        self.blocks = nn.ModuleList(QueryBlock(width, n_heads, ffn_dim, dropout) for _ in range(n_blocks))
        for m in self.modules():  # BERT's init_weights (official Q-Former): Linear N(0, 0.02), zero bias; LN 1, 0
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02), nn.init.zeros_(m.bias)

    def forward(self, x):                                                      # x (B, 1, 2d)
        q = self.drop(self.ln(self.queries)).expand(len(x), -1, -1)            # (B, k, 2d)
        for block in self.blocks:
            q = block(q, x)
        return q


class CoRA(RecLLM):
    template = "tallrec"  # the clean text prompt: CF information enters through the weights only

    def __init__(self, llm, tok, yes_no, cf, weight_types="qkvo", layers=None, r=16, alpha=32, n_queries=4,
                 n_blocks=8, n_heads=8, ffn_dim=3072, gen_dropout=0.1, **kw):
        super().__init__(llm, tok, yes_no, **kw)
        if weight_types not in WEIGHT_TYPES:
            raise ValueError(f"weight_types {weight_types!r}: choose one of {', '.join(WEIGHT_TYPES)}")
        a, width = llm.args, 2 * cf.dim
        self.read_cf(cf)
        self.r, self.scale = r, alpha / r
        layers = range(a.n_layers) if layers is None else layers
        self.targets = [(l, p) for l in layers for p in WEIGHT_TYPES[weight_types]]
        self.generator = QueryGenerator(width, n_queries, n_blocks, n_heads, ffn_dim, gen_dropout)
        self.fc = nn.Linear(width, a.dim * r)                                  # W_FC
        self.fc_ffn = nn.Linear(width, a.hidden_dim * r) if "down" in WEIGHT_TYPES[weight_types] else None
        dims = proj_dims(a)                                                     # {proj: (d_out, d_in)}
        self.proj = nn.ParameterDict({f"{l}_{p}": nn.Parameter(torch.zeros(dims[p][0], r))  # W_proj^T, zero
                                      for l, p in self.targets})
        assert not any(p.requires_grad for p in [*self.llm.parameters(), *self.cf.parameters()])

    def factor(self, head, q):
        """ΔW_A^T for a batch: mean over queries, unit L2 norm, reshape. (B, k, 2d) -> (B, r, d_in)."""
        a = F.normalize(head(q).mean(1), dim=-1)                               # (B, d_in * r)
        return a.view(len(q), -1, self.r).mT                                    # R(.): (B, d_in, r) -> (B, r, d_in)

    def deltas(self, uid, iid, his=None):
        x = self.cf_features(uid, iid, his)[:, None].to(self.fc.weight.dtype)  # (B, 1, 2d); his (B, L): SASRec
        q = self.generator(x)                                                   # (B, k, 2d)
        A = self.factor(self.fc, q)                                             # (B, r, d_model)
        A_ffn = self.factor(self.fc_ffn, q) if self.fc_ffn is not None else None  # (B, r, d_ffn)
        return {(l, p): (A_ffn if p == "down" else A, self.scale * self.proj[f"{l}_{p}"]) for l, p in self.targets}

    def forward(self, batch):
        return self.logits(batch, deltas=self.deltas(batch["uid"], batch["iid"], batch.get("his")))
