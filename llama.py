"""
llama.py: a hand-written LLaMA decoder that loads Hugging Face safetensors checkpoints exactly.

The model every method of this project reads its prompts with (TALLRec, CoLLM and CoRA keep it frozen):

    h_0 = E[tokens]                     (or input embeddings, for CoLLM)
    h'  = h + Attn(RMSNorm(h))          GQA attention, RoPE in the HF rotate-half layout, causal + padding mask
    h   = h' + MLP(RMSNorm(h'))         SwiGLU: down(silu(gate(x)) * up(x))
    logits = RMSNorm(h_L) W_lm^T        W_lm tied to E when the checkpoint has no lm_head.weight

Low-rank deltas (one mechanism for LoRA and CoRA). Any projection p of any layer l may carry a pair (A, B):

    y = x W^T + (x A^T) B^T             A: (r, d_in) or (B, r, d_in),  B: (d_out, r) or (B, d_out, r)

A 2-D factor is shared by the whole batch (LoRA: ΔW = B A); a 3-D factor is per example (CoRA: each example
gets its own W_c = B_b A_b). Either way the d_out x d_in matrix W + ΔW is never built: the increment costs
two thin matmuls, O(B T r (d_in + d_out)) instead of O(B d_in d_out) to materialise per-example weights.
Any scaling (LoRA's alpha/r) is folded into B by the caller.

Deliberate choices:
- Left padding. `Tokenizer.batch` pads on the left and `forward` derives position ids from the mask
  (cumsum - 1), so every row's real tokens sit at positions 0..n-1 exactly as if run alone, and the last
  column is every row's last prompt token: Yes/No scoring reads h[:, -1] without gathering.
- Padded query rows may attend to themselves (the diagonal is always open). Their outputs are never read,
  but a fully masked row would make SDPA return NaN, and NaN * 0 in the next layer's attention is NaN.
- RoPE cos/sin are computed from per-row position ids on the fly (no cache): it is (B, T, head_dim/2) work.
- `generate` is greedy without a KV cache: it is for sanity checks and teaching, not serving.
- Loading reads the safetensors headers first (sizes, dtypes, offsets, key set, shapes) and names every
  problem in one error before any tensor is read; the model is built on the meta device and the loaded
  tensors are assigned in place, so the weights are never held twice.

Run `python llama.py --ckpt DIR --prompt "..."` to generate, `python llama.py --bench [--ckpt DIR]` to time.
"""
import contextlib
import json
import math
import os
import struct
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

PROJ = ("q", "k", "v", "o", "gate", "up", "down")  # the projections a delta may target
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32  # of frozen weights; trainable ones stay fp32


def autocast():
    """bf16 autocast on CUDA (frozen weights in bf16, trainable ones fp32, losses fp32); a no-op on CPU."""
    return torch.autocast("cuda", torch.bfloat16) if DEVICE == "cuda" else contextlib.nullcontext()


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded as it is; the message names the file and the fix."""


def parse_json(f, key=None):
    """json.load of the open file f (its object field key, when given); a CheckpointError naming the file if not."""
    try:
        c = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f.name}: not valid JSON ({e})") from None
    if not isinstance(c, dict) or key is not None and not isinstance(c.get(key), dict):
        raise CheckpointError(f"{f.name}: expected a JSON object" + (f" with an object {key!r}" if key else ""))
    return c if key is None else c[key]


# ----------------------------------------------------------------------------- config

@dataclass
class ModelArgs:
    dim: int = 4096                  # hidden_size
    n_layers: int = 32               # num_hidden_layers
    n_heads: int = 32                # num_attention_heads
    n_kv_heads: int | None = None    # num_key_value_heads (GQA); None = n_heads
    head_dim: int | None = None      # None = dim // n_heads
    hidden_dim: int = 11008          # intermediate_size (SwiGLU width)
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None or llama3-style {"rope_type": "llama3", "factor", ...}
    max_seq_len: int = 2048          # max_position_embeddings
    tie_word_embeddings: bool = False
    bos_id: int | None = 1
    eos_id: int | None = 2

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise CheckpointError(f"num_attention_heads={self.n_heads} is not a multiple of num_key_value_heads={self.n_kv_heads}")

    @classmethod
    def from_config(cls, path):
        """Build from a HF config.json (a folder or the file itself). Refuses, naming the field: another architecture
        (model_type llama and mistral only), a feature this model lacks, a value of the wrong type or sign."""
        path = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no config.json; point --llm at a Hugging Face LLaMA folder "
                                  f"(config.json + model.safetensors + tokenizer.model)")
        with open(path, encoding="utf-8") as f:
            c = parse_json(f)
        if c.get("model_type", "llama") not in ("llama", "mistral"):
            raise CheckpointError(f"{path}: model_type {c['model_type']!r} is not a LLaMA; supported: llama, mistral")
        lacks = {"hidden_act": ("silu", "swish"), "attention_bias": (False,), "mlp_bias": (False,)}
        bad = [f"{k}={c[k]!r}" for k, ok in lacks.items() if k in c and c[k] not in ok]
        if bad:
            raise CheckpointError(f"{path}: {', '.join(bad)} is not implemented here (LLaMA: SiLU, no biases)")

        def get(key, default=KeyError, kind=int, low=1):
            """c[key], or default when absent (None only as default): an int >= low, a number > low, a bool, a dict."""
            v = c.get(key, default)
            if v is KeyError:
                raise CheckpointError(f"{path}: missing required field {key!r}")
            ok = {int: type(v) is int and v >= low, float: type(v) in (int, float) and v > low, bool: type(v) is bool,
                  dict: type(v) is dict}[kind]
            if ok or v is None and default is None:
                return v
            want = {int: f"an integer >= {low}", float: f"a number > {low}", bool: "true or false", dict: "an object"}
            raise CheckpointError(f"{path}: {key} is {v!r}, expected {want[kind]}")
        scaling = get("rope_scaling", None, dict) or get("rope_parameters", None, dict)
        theta = get("rope_theta", (scaling or {}).get("rope_theta", 10000.0), float, 0)
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if kind not in ("default", "llama3"):
            raise CheckpointError(f"{path}: rope_scaling type {kind!r} is not implemented (supported: none, "
                                  f"'default', 'llama3'); use a checkpoint without it or add it to rope_freqs()")
        need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if kind == "llama3" and not (all(type(scaling.get(k)) in (int, float) and scaling[k] > 0 for k in need)
                                     and scaling["high_freq_factor"] > scaling["low_freq_factor"]):
            raise CheckpointError(f"{path}: llama3 rope_scaling needs positive {', '.join(need)} and high_freq_factor "
                                  f"> low_freq_factor; got {scaling}")
        if isinstance(c.get("eos_token_id"), list):  # several end tokens: the first one ends generation
            c["eos_token_id"] = (c["eos_token_id"] or [None])[0]
        max_len, window = get("max_position_embeddings", 2048), get("sliding_window", None)
        args = dict(dim=get("hidden_size"), n_layers=get("num_hidden_layers"), n_heads=get("num_attention_heads"),
                    n_kv_heads=get("num_key_value_heads", None), head_dim=get("head_dim", None),
                    hidden_dim=get("intermediate_size"), vocab_size=get("vocab_size"),
                    norm_eps=get("rms_norm_eps", 1e-5, float, 0), rope_theta=float(theta),
                    rope_scaling=scaling if kind == "llama3" else None,
                    max_seq_len=min(max_len, window or max_len),  # a prompt within a sliding window sees all of itself
                    tie_word_embeddings=get("tie_word_embeddings", False, bool),
                    bos_id=get("bos_token_id", None, low=0),
                    eos_id=get("eos_token_id", None, low=0) if "eos_token_id" in c else 2)
        head_dim = args["head_dim"] or args["dim"] // args["n_heads"]
        if head_dim % 2 or not args["head_dim"] and args["dim"] % args["n_heads"]:
            raise CheckpointError(f"{path}: hidden_size {args['dim']} / num_attention_heads {args['n_heads']} gives no "
                                  f"even head_dim (RoPE rotates pairs); give head_dim")
        return cls(**args)

    def to_config(self):
        """The HF config.json fields this class reads, so a saved folder loads in either world."""
        return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=self.dim,
                    intermediate_size=self.hidden_dim, num_hidden_layers=self.n_layers,
                    num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads, head_dim=self.head_dim,
                    vocab_size=self.vocab_size, rms_norm_eps=self.norm_eps, rope_theta=self.rope_theta,
                    rope_scaling=self.rope_scaling, max_position_embeddings=self.max_seq_len,
                    tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_id,
                    eos_token_id=self.eos_id, hidden_act="silu")


# ----------------------------------------------------------------------------- model

def rope_freqs(args, device):
    """inv_freq_j = theta^(-2j/hd), with llama3-style long-context scaling when the config asks for it."""
    hd = args.head_dim
    inv = 1.0 / args.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd)  # (hd/2,)
    if args.rope_scaling:  # Llama 3.1: divide low frequencies by `factor`, keep high ones, blend in between
        s = args.rope_scaling
        factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(medium, blended, scaled)
    return inv


def proj_dims(args):
    """{projection: (d_out, d_in)} of one layer's weights, the shapes a delta pair (A, B) must fit."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    return dict(q=(q, args.dim), k=(kv, args.dim), v=(kv, args.dim), o=(args.dim, q),
                gate=(args.hidden_dim, args.dim), up=(args.hidden_dim, args.dim), down=(args.dim, args.hidden_dim))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def project(linear, x, delta, dropout=0.0, training=False):
    """y = x W^T + (dropout(x) A^T) B^T, with shared (2-D) or per-example (3-D) factors."""
    y = linear(x)                                                       # (B, T, d_out)
    if delta is None:
        return y
    A, B = delta                                                        # (r, d_in) | (B, r, d_in); (d_out, r) | (B, d_out, r)
    x = F.dropout(x, dropout, training) if dropout else x
    return y + (x @ A.mT) @ B.mT                                        # (B, T, r) @ (.., r, d_out)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalise in (at least) fp32 as HF does, scale in the model dtype
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.q_proj = nn.Linear(a.dim, a.n_heads * a.head_dim, bias=False)
        self.k_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=False)
        self.v_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=False)
        self.o_proj = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=False)

    def forward(self, x, cos, sin, attn_mask, deltas, p):
        B, T, _ = x.shape
        q = project(self.q_proj, x, deltas.get("q"), p, self.training).view(B, T, self.n_heads, -1).transpose(1, 2)
        k = project(self.k_proj, x, deltas.get("k"), p, self.training).view(B, T, self.n_kv_heads, -1).transpose(1, 2)
        v = project(self.v_proj, x, deltas.get("v"), p, self.training).view(B, T, self.n_kv_heads, -1).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin  # (B, H, T, hd), (B, KV, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)  # (B, H, T, hd)
        return project(self.o_proj, y.transpose(1, 2).reshape(B, T, -1), deltas.get("o"), p, self.training)


class MLP(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.gate_proj = nn.Linear(a.dim, a.hidden_dim, bias=False)
        self.up_proj = nn.Linear(a.dim, a.hidden_dim, bias=False)
        self.down_proj = nn.Linear(a.hidden_dim, a.dim, bias=False)

    def forward(self, x, deltas, p):
        g = project(self.gate_proj, x, deltas.get("gate"), p, self.training)
        u = project(self.up_proj, x, deltas.get("up"), p, self.training)
        return project(self.down_proj, F.silu(g) * u, deltas.get("down"), p, self.training)


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(a.dim, a.norm_eps), RMSNorm(a.dim, a.norm_eps)
        self.self_attn, self.mlp = Attention(a), MLP(a)

    def forward(self, h, cos, sin, attn_mask, deltas, p):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, attn_mask, deltas, p)
        return h + self.mlp(self.post_attention_layernorm(h), deltas, p)


class Llama(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, tokens=None, mask=None, *, embeds=None, deltas=None, delta_dropout=0.0,
                last_only=False, token_ids=None, return_hidden=False):
        """tokens (B, T) or embeds (B, T, d); mask (B, T) 1 = real token, left padding; deltas {(layer, proj): (A, B)}.
        Returns logits (B, T, V); with last_only the last position only (B, V); with token_ids only those
        vocabulary rows (B, [T,] n); with return_hidden the final-normed hidden states instead of logits."""
        h = self.embed_tokens(tokens) if embeds is None else embeds            # (B, T, d)
        B, T, _ = h.shape
        if mask is None:
            pos, attn_mask = torch.arange(T, device=h.device).expand(B, T), None
        else:
            mask = mask.bool()
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0)                    # (B, T): 0 at each row's first real token
            causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
            eye = torch.eye(T, dtype=torch.bool, device=h.device)
            attn_mask = (causal & mask[:, None, None, :]) | eye                # (B, 1, T, T)
        freqs = pos[..., None].float() * rope_freqs(self.args, h.device)     # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), -1)[:, None]                          # (B, 1, T, hd) rotate-half layout
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        per_layer = [{} for _ in self.layers]
        for (layer, proj), ab in (deltas or {}).items():
            per_layer[layer][proj] = ab
        for layer, d in zip(self.layers, per_layer):
            h = layer(h, cos, sin, attn_mask, d, delta_dropout)
        if last_only:
            h = h[:, -1]                                                       # (B, d): left padding puts every row's last token here
        h = self.norm(h)
        if return_hidden:
            return h
        W = self.lm_head.weight if token_ids is None else self.lm_head.weight[token_ids]  # (V or n, d)
        return F.linear(h, W)

    @torch.no_grad()
    def generate(self, tokens, max_new_tokens, eos_id=None, *, embeds=None, deltas=None):
        """Greedy decoding of one unpadded prompt (1, T) -> (1, T + n). embeds (1, T, d) replaces the prompt's input
        embeddings (CoLLM's collaborative tokens); deltas apply at every step (CoRA's W_c)."""
        h = self.embed_tokens(tokens) if embeds is None else embeds            # (1, T, d)
        for _ in range(max_new_tokens):
            nxt = self(embeds=h, deltas=deltas, last_only=True).argmax(-1, keepdim=True)  # (1, 1)
            tokens, h = torch.cat((tokens, nxt), 1), torch.cat((h, self.embed_tokens(nxt)), 1)
            if eos_id is not None and nxt.item() == eos_id:
                break
        return tokens


def compile_blocks(model, backend="inductor"):
    """torch.compile every decoder block in place (regional compilation: the blocks share one compiled graph, so
    compiling costs one block, not n_layers). Shapes are dynamic because length buckets vary T. It fuses the
    elementwise work around the matmuls (RMSNorm, RoPE, SwiGLU, the delta path's add). State-dict keys are unchanged."""
    for layer in model.layers:
        layer.compile(dynamic=True, backend=backend)
    return model


# ----------------------------------------------------------------------------- language-model scores (paper Fig. 1)

@torch.no_grad()
def perplexity(model, tok, text, window=256, max_tokens=4096, batch=4, deltas=None):
    """exp(mean next-token NLL) over the first max_tokens tokens of text, in independent windows."""
    ids = tok.encode(text, bos=False)[: max_tokens + 1]
    n = (len(ids) - 1) // window
    if n == 0:
        raise ValueError(f"perplexity needs more than {window} tokens of text, got {len(ids)}")
    x = torch.tensor(ids[: n * window + 1], device=model.embed_tokens.weight.device)
    inputs, targets = x[:-1].view(n, window), x[1:].view(n, window)      # (n, window) each
    nll = 0.0
    for i in range(0, n, batch):
        with autocast():
            logits = model(inputs[i:i + batch], deltas=deltas).float()  # (b, window, V)
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
    with autocast():
        logp = model(tokens, mask, deltas=deltas).float().log_softmax(-1)  # (N, T, V)
    lp = torch.stack([logp[b, -n - 1:-1].gather(-1, tokens[b, -n:, None]).sum() for b, n in enumerate(n_answer)])
    return lp / torch.tensor(n_answer, device=lp.device) if per_token else lp


# ----------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """sentencepiece tokenizer.model with LLaMA's BOS/EOS convention and left-padded batches."""

    def __init__(self, path, add_bos=None):
        import sentencepiece as spm
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        path = os.path.join(path, "tokenizer.model") if os.path.isdir(path) else path
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no tokenizer.model (a sentencepiece model) in the checkpoint folder; "
                                  f"copy the model's tokenizer.model there")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except Exception as e:
            raise CheckpointError(f"{path}: not a sentencepiece model ({e})") from None
        self.path, self.n_words = path, self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = max(self.sp.pad_id(), 0)  # padded positions are masked, any valid id will do
        if add_bos is None:  # tokenizer_config.json decides; else LLaMA's "<s>" convention
            cfg = os.path.join(folder, "tokenizer_config.json")
            add_bos = parse_json(open(cfg, encoding="utf-8")).get("add_bos_token") if os.path.isfile(cfg) else None
            if add_bos is None:
                add_bos = self.bos_id >= 0 and self.sp.id_to_piece(self.bos_id) == "<s>"
        self.add_bos = bool(add_bos)

    def encode(self, s, bos=None, eos=False):
        ids = self.sp.encode(s)
        return ([self.bos_id] if (self.add_bos if bos is None else bos) else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])

    def batch(self, seqs, device="cpu"):
        """Texts or id lists -> left-padded tokens (B, T) and mask (B, T)."""
        seqs = [self.encode(s) if isinstance(s, str) else list(s) for s in seqs]
        T = max(map(len, seqs))
        tokens = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, T - len(s):], mask[i, T - len(s):] = torch.tensor(s, dtype=torch.long), 1
        return tokens.to(device), mask.to(device)


# ----------------------------------------------------------------------------- checkpoints

_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
              "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # what LLM weights may be stored as


def read_header(path):
    """Parse and validate a safetensors header without reading tensor data: {name: (dtype, shape)}."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
        if n is None or n > size - 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            entries = {}
            for name, t in header.items():
                (begin, end), shape = t["data_offsets"], [int(d) for d in t["shape"]]
                entries[name] = (t["dtype"], shape, int(begin), int(end))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupted safetensors header ({type(e).__name__}: {e})") from None
    out = {}
    for name, (dtype, shape, begin, end) in entries.items():
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype!r}, which this reader does not know "
                                  f"(known: {', '.join(_ST_DTYPES)})")
        if end - begin != math.prod(shape) * _ST_DTYPES[dtype] or not 0 <= begin <= end <= size - 8 - n:
            raise CheckpointError(f"{path}: tensor {name!r} ({dtype}, {shape}) claims bytes {begin}..{end} "
                                  f"but the file holds {size - 8 - n} data bytes: the file is truncated or corrupted")
        out[name] = (dtype, tuple(shape))
    return out


def checkpoint_files(folder):
    """{tensor name: file} for model.safetensors or a sharded model.safetensors.index.json."""
    index, single = os.path.join(folder, "model.safetensors.index.json"), os.path.join(folder, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = parse_json(f, "weight_map")
        return {k: os.path.join(folder, v) for k, v in weight_map.items()}
    if os.path.isfile(single):
        return {k: single for k in read_header(single)}
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json (only safetensors "
                          f"weights are read, never pickles); convert the checkpoint to safetensors first")


def load_llama(folder, dtype=torch.float32, device="cpu"):
    """Load a HF LLaMA folder strictly: every missing/unexpected key and shape mismatch in one error."""
    args = ModelArgs.from_config(folder)
    files = checkpoint_files(folder)
    headers = {f: read_header(f) for f in sorted(set(files.values()))}
    found = {k.removeprefix("model."): headers[f][k][1] for k, f in files.items() if k in headers[f]}
    args.tie_word_embeddings = args.tie_word_embeddings or "lm_head.weight" not in found
    with torch.device("meta"):
        model = Llama(args)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if args.tie_word_embeddings:
        expected.pop("lm_head.weight")
        found.pop("lm_head.weight", None)  # HF ties and ignores a stored head in this case too
    found = {k: v for k, v in found.items() if not k.endswith("rotary_emb.inv_freq")}  # old HF buffers
    problems = [f"missing key {k} {s}" for k, s in expected.items() if k not in found]
    problems += [f"unexpected key {k} {s}" for k, s in found.items() if k not in expected]
    problems += [f"listed in the index but absent from {f}: {k}" for k, f in files.items() if k not in headers[f]]
    problems += [f"shape mismatch {k}: file {found[k]} vs config {s}" for k, s in expected.items()
                 if k in found and found[k] != s]
    if problems:
        raise CheckpointError(f"{folder}: checkpoint does not match config.json:\n  " + "\n  ".join(problems))
    odd = [(k, headers[f][k][0], f) for k, f in files.items() if k.removeprefix("model.") in expected
           and headers[f][k][0] not in FLOAT_DTYPES]
    if odd:
        k, t, f = odd[0]
        raise CheckpointError(f"{f}: tensor {k} is {t} ({len(odd)} of {len(expected)} weights are not float): " + (
            "float8 weights are not supported; dequantize the checkpoint to bf16/fp16 first" if t.startswith("F8")
            else "integer weights (a quantized checkpoint?) are not supported; use float weights"))
    from safetensors import safe_open
    sd = {}
    for f in headers:
        with safe_open(f, framework="pt", device="cpu") as st:
            for k in st.keys():
                name = k.removeprefix("model.")
                if name in expected:
                    sd[name] = st.get_tensor(k).to(device=device, dtype=dtype)
                    if not torch.isfinite(sd[name]).all():
                        raise CheckpointError(f"{f}: tensor {k} holds NaN or inf values (as {dtype}): a damaged "
                                              f"checkpoint, or weights beyond the range of {dtype}")
    model.load_state_dict(sd, strict=False, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval().requires_grad_(False)


def load(folder, dtype=torch.float32, device="cpu"):
    """(model, tokenizer) of an HF LLaMA folder; the tokenizer is checked against config.json before the weights load."""
    tok, args = Tokenizer(folder), ModelArgs.from_config(folder)
    if tok.n_words > args.vocab_size:
        raise CheckpointError(f"{tok.path} has {tok.n_words} pieces but {folder}/config.json says vocab_size "
                              f"{args.vocab_size}: the tokenizer belongs to another model")
    return load_llama(folder, dtype, device), tok


def save_llama(model, folder, tokenizer_path=None):
    """Write config.json + model.safetensors (HF names), atomically; copy a tokenizer.model if given."""
    from safetensors.torch import save_file
    import shutil
    os.makedirs(folder, exist_ok=True)
    sd = {("" if k == "lm_head.weight" else "model.") + k: v.contiguous() for k, v in model.state_dict().items()
          if not (k == "lm_head.weight" and model.args.tie_word_embeddings)}
    tmp = os.path.join(folder, ".model.safetensors.tmp")
    save_file(sd, tmp)
    os.replace(tmp, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(model.args.to_config(), f, indent=1)
    if tokenizer_path:
        shutil.copyfile(tokenizer_path, os.path.join(folder, "tokenizer.model"))


def build_tiny_llama(folder, texts, vocab_size=512, seed=0, **shape):
    """A small random LLaMA + a sentencepiece tokenizer trained on `texts`, saved as a HF folder.
    The weights are untrained: runs on it exercise the mechanics, not the paper's results."""
    import io
    import sentencepiece as spm
    os.makedirs(folder, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
                                   pad_id=-1, num_threads=1, minloglevel=2, hard_vocab_limit=False)
    tok_path = os.path.join(folder, "tokenizer.model")
    with open(tok_path, "wb") as f:
        f.write(buf.getvalue())
    n_words = Tokenizer(tok_path).n_words  # may be below vocab_size for a small corpus
    args = ModelArgs(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=172, max_seq_len=512,
                               tie_word_embeddings=True), **shape, "vocab_size": n_words})
    torch.manual_seed(seed)
    model = Llama(args)
    for n, p in model.named_parameters():
        nn.init.normal_(p, std=args.dim ** -0.5) if p.dim() == 2 else nn.init.ones_(p)  # variance-preserving
    save_llama(model, folder)
    return folder


# ----------------------------------------------------------------------------- benchmark

def prefault(model):
    """Read every weight once, so that memory-mapped pages count in set-up, not in the measured step."""
    sum(float(p.sum()) for p in model.parameters())
    return model


def peak_memory_mb():
    """This process's peak memory so far: the CUDA allocator's on GPU, the maximum RSS on CPU."""
    if DEVICE == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(fn, reps):
    import time
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def _measure_child(build, args, reps, out):
    torch.set_num_threads(2)
    torch.manual_seed(0)
    step = build(*args)                     # set-up (weights, inputs) is not counted in the peak
    base = peak_memory_mb()
    sec = _time(step, reps)
    out.put((sec, peak_memory_mb() - base))


def _measure_cuda(build, args, reps):
    torch.manual_seed(0)
    step = build(*args)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sec = _time(lambda: (step(), torch.cuda.synchronize()), reps)
    return sec, (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def measure(build, *args, reps=3):
    """(seconds per call, peak MB above set-up) of the step `build(*args)` returns. On CPU in a fresh process,
    so that the process's max RSS is this case's peak alone (`build` must be a module-level function); on CUDA
    in this process, from the allocator's peak."""
    if DEVICE == "cuda":
        return _measure_cuda(build, args, reps * 5)
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_measure_child, args=(build, args, reps, q))
    p.start()
    res = q.get()
    p.join()
    return res


def _bench_step(case, ckpt, B, T):
    if case.startswith("merge"):  # one d x d projection with per-example rank-r increments
        d, r, kw = 2048, 8, dict(device=DEVICE, dtype=DTYPE)
        x, W = torch.randn(B, T, d, **kw), torch.randn(d, d, **kw) / d ** 0.5
        train = case.endswith("train")
        A = (torch.randn(B, r, d, **kw) / d ** 0.5).requires_grad_(train)
        Bf = (torch.randn(B, d, r, **kw) / r ** 0.5).requires_grad_(train)
        if case.startswith("merge-delta"):
            f = lambda: F.linear(x, W) + (x @ A.mT) @ Bf.mT
        else:
            f = lambda: torch.bmm(x, (W + Bf @ A).mT)  # (B, d, d) materialised per example
        return (lambda: f().square().mean().backward()) if train else torch.no_grad()(f)
    model = prefault(load_llama(ckpt, DTYPE, DEVICE))
    a, r, dims = model.args, 8, proj_dims(model.args)
    tokens = torch.randint(0, a.vocab_size, (B, T), device=DEVICE)
    if case == "forward":
        return lambda: torch.no_grad()(model)(tokens, last_only=True)
    lora = {(l, p): (torch.randn(r, a.dim, device=DEVICE).mul(0.02).requires_grad_(),
                     torch.zeros(dims[p][0], r, device=DEVICE).requires_grad_()) for l in range(a.n_layers) for p in "qv"}

    def step():
        with autocast():
            loss = model(tokens, deltas=lora, last_only=True).float().sum()
        loss.backward()
    return step


def bench(ckpt, B=8, T=160):
    res = {}
    for case in ["forward", "forward+backward (LoRA q,v r=8)", "merge-delta", "merge-materialised",
                 "merge-delta train", "merge-materialised train"]:
        if ckpt is None and not case.startswith("merge"):
            continue
        sec, mb = res[case] = measure(_bench_step, case, ckpt, B, T)
        extra = f"{B * T / sec:9.0f} tokens/s" if not case.startswith("merge") else f"{B / sec:9.1f} examples/s"
        print(f"{case:34s} {sec * 1e3:8.1f} ms/step {extra}  peak +{mb:7.1f} MB  ({DEVICE}, {DTYPE})")
    for mode in ("", " train"):
        (t1, m1), (t2, m2) = res["merge-delta" + mode], res["merge-materialised" + mode]
        print(f"per-example delta vs materialised merge{mode or ' forward'} (d=2048, r=8, B={B}, T={T}): "
              f"{t2 / t1:.1f}x faster, {m2 / max(m1, 1e-9):.1f}x less peak memory")
    return res


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--ckpt", help="HF LLaMA folder (config.json, model.safetensors, tokenizer.model)")
    ap.add_argument("--prompt", default="The movie Toy Story (1995) is about")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--bench", action="store_true", help="time forward / LoRA backward / per-example merge")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=160)
    a = ap.parse_args()
    if a.bench:
        bench(a.ckpt, a.batch, a.seq)
    elif not a.ckpt:
        ap.error("--ckpt DIR is required to generate")
    else:
        tok, model = Tokenizer(a.ckpt), load_llama(a.ckpt)
        out = model.generate(torch.tensor([tok.encode(a.prompt)]), a.max_new_tokens, tok.eos_id)
        print(tok.decode(out[0].tolist()))
