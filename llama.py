"""
llama.py: a hand-written LLaMA decoder that loads Hugging Face safetensors checkpoints exactly.

The model every method of this project reads its prompts with (TALLRec, CoLLM and CoRA keep it frozen):

    h_0 = E[tokens]                     (or input embeddings, for CoLLM)
    h'  = h + Attn(RMSNorm(h))          GQA attention, RoPE in the HF rotate-half layout, causal + padding mask
    h   = h' + MLP(RMSNorm(h'))         SwiGLU: down(silu(gate(x)) * up(x))
    logits = RMSNorm(h_L) W_lm^T        W_lm tied to E when the checkpoint has no lm_head.weight

Low-rank deltas, one mechanism for LoRA and CoRA: any projection p of any layer l may carry a pair (A, B),

    y = x W^T + (x A^T) B^T             A: (r, d_in) or (B, r, d_in),  B: (d_out, r) or (B, d_out, r)

2-D factors are shared by the batch (LoRA: ΔW = B A), 3-D ones are per example (CoRA: W_c = B_b A_b). W + ΔW is
never built: two thin matmuls, O(B T r (d_in + d_out)). Any scaling (LoRA's alpha/r) is folded into B by the caller.

Deliberate choices:
- Left padding; position ids are cumsum(mask) - 1, so each row's tokens sit at 0..n-1 as if run alone and h[:, -1]
  is every row's last prompt token. Padded query rows attend to themselves (a fully masked softmax row is NaN).
- Attention is explicit matmuls with a 0/-inf bias, query heads grouped onto their key head by a view: on CPU
  faster than masked SDPA with gradients; without them (scoring) SDPA with the same bias is faster (tested equal).
  last_only runs the last layer on the last query only.
- Weights stay in their loaded dtype (bf16 on CUDA and AMX CPUs, no autocast); RMSNorm and the Yes/No logits run
  in fp32; the delta factors stay the caller's fp32 parameters, cast where they meet x.
- Delta-path dropout draws one mask per input (q, k, v share one; gate, up another) from 16-bit random numbers.
- RoPE cos/sin come from per-row position ids on the fly (no cache); `generate` is greedy without a KV cache.
- `--compile` (compile_elementwise) fuses RMSNorm, RoPE and SwiGLU only: whole compiled blocks ran slower on CPU.
- Loading checks every safetensors header and names every problem in one error before reading a tensor; the model
  is built on the meta device and the tensors assigned in place (never held twice). pytorch_model*.bin pickles
  are not read: `python llama.py --convert DIR OUT` turns them into safetensors once.
- Tokenizer: sentencepiece tokenizer.model, else tokenizer.json as byte-level BPE in the standard library alone
  (\\p{L}/\\p{N} from unicodedata); what it lacks (normalizers, Unigram, byte fallback, ...) is refused.

Run `python llama.py --ckpt DIR --prompt "..."` to generate; `python train.py --bench` times training steps.
"""
import functools
import io
import itertools
import json
import math
import os
import re
import shutil
import struct
import sys
import unicodedata
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

PROJ = ("q", "k", "v", "o", "gate", "up", "down")  # the projections a delta may target
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_bf16():
    """Whether this CPU multiplies bf16 natively (AMX or AVX-512 BF16): only then is bf16 faster than fp32 on it."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(name="auto", device=DEVICE):
    """--dtype auto|fp32|bf16 -> the frozen LLM's dtype. auto: bf16 on CUDA and on a CPU with native bf16, else fp32
    (bf16 asked for on a CPU without it warns: emulated, it is slower than fp32).
    Trainable weights, optimizer state, the Yes/No logits and the loss stay fp32 whatever this is."""
    if name == "auto":
        return torch.bfloat16 if device == "cuda" or cpu_has_bf16() else torch.float32
    if name == "bf16" and device == "cpu" and not cpu_has_bf16():
        warnings.warn("--dtype bf16 on a CPU without native bf16 (AMX or AVX-512 BF16): its bf16 matmuls are emulated, "
                      "6-40x slower than fp32 (README, Speed); --dtype auto takes fp32 here", stacklevel=2)
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded as it is; the message names the file and the fix."""


def parse_json(path, key=None):
    """The JSON object in the file path (its object field key, when given); a CheckpointError naming the file if not."""
    with open(path, encoding="utf-8") as f:
        try:
            c = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(c, dict) or key is not None and not isinstance(c.get(key), dict):
        raise CheckpointError(f"{path}: expected a JSON object" + (f" with an object {key!r}" if key else ""))
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
            raise CheckpointError(f"num_attention_heads={self.n_heads} is not a multiple of "
                                  f"num_key_value_heads={self.n_kv_heads}")

    @classmethod
    def from_config(cls, path):
        """Build from a HF config.json (a folder or the file itself). Refuses, naming the field: another architecture
        (model_type llama and mistral only), a feature this model lacks, a value of the wrong type or sign."""
        path = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no config.json; point --llm at a Hugging Face LLaMA folder "
                                  f"(config.json + model.safetensors + tokenizer.model or tokenizer.json)")
        c = parse_json(path)
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
        a = cls(**args)
        if a.head_dim % 2 or not args["head_dim"] and a.dim % a.n_heads:
            raise CheckpointError(f"{path}: hidden_size {a.dim} / num_attention_heads {a.n_heads} gives no "
                                  f"even head_dim (RoPE rotates pairs); give head_dim")
        return a

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
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
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


def project(linear, x, delta, xd=None, memo=None):
    """y = x W^T + (xd A^T) B^T; xd is x after the delta path's dropout (default: x). memo {id(A): xd A^T} lets
    projections reading the same input with the same A (CoRA's ΔW_A serves q, k and v) share one product."""
    y = linear(x)                                                       # (B, T, d_out)
    if delta is None:
        return y
    A, B = delta                                            # (r, d_in) | (B, r, d_in); (d_out, r) | (B, d_out, r)
    memo = {} if memo is None else memo
    if id(A) not in memo:
        memo[id(A)] = (x if xd is None else xd) @ A.to(x.dtype).mT      # (B, T, r)
    return y + memo[id(A)] @ B.to(x.dtype).mT                           # (B, T, r) @ (.., r, d_out)


def delta_input(x, deltas, names, p):
    """x as the delta path of the projections `names` reads it: one dropout mask for all, or x (no delta, or p 0)."""
    return fast_dropout(x, p) if p and any(n in deltas for n in names) else x


def fast_dropout(x, p):
    """Inverted dropout as F.dropout(x, p), its keep mask from 16 random bits per element (p rounded to a multiple of
    2^-16): on CPU the random numbers are most of dropout's cost, and this is about 3x faster (README, Speed)."""
    t = round(p * 65536)                                                # drop when the 16 bits fall below t
    bits = torch.randint(-2 ** 63, 2 ** 63 - 1, (x.numel() // 4 + 1,), dtype=torch.int64, device=x.device)
    keep = bits.view(torch.int16)[:x.numel()].view(x.shape) >= t - 32768
    return torch.where(keep, x, 0) * (65536 / (65536 - t))


def rms_norm(x, weight, eps):
    """Normalised in (at least) fp32 as HF does, scaled in the model dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(x, cos, sin):
    """x rotated in the HF rotate-half layout: x cos + [-x2, x1] sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def swiglu(g, u):
    return F.silu(g) * u


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight, self.fn = eps, nn.Parameter(torch.ones(dim)), rms_norm  # fn: compile_elementwise

    def forward(self, x):
        return self.fn(x, self.weight, self.eps)


def attend(q, k, v, bias):
    """softmax(q k^T / sqrt(hd) + bias) v; q (B, H, T, hd), k and v (B, KV, S, hd), bias (B or 1, 1, T, S) 0 or -inf.
    k and v are never repeated. The softmax runs in the model dtype (its kernels accumulate bf16 in fp32), matching
    HF's eager attention's fp32 softmax cast back to bf16. Without autograd (scoring) SDPA's fused kernel with the same
    bias is faster on CPU (2x a layer at batch 32 in bf16); with it slower (its backward): each path where it wins."""
    if not torch.is_grad_enabled():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    B, H, T, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    q = (q * hd ** -0.5).reshape(B, KV, H // KV * T, hd)                # (B, KV, G*T, hd): G query heads per key head
    att = ((q @ k.mT).view(B, KV, H // KV, T, S) + bias[:, None]).softmax(-1)  # (B, KV, G, T, S), bias over G
    y = att.view(B, KV, H // KV * T, S) @ v                             # (B, KV, G*T, hd)
    return y.view(B, H, T, hd)


class Attention(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.q_proj = nn.Linear(a.dim, a.n_heads * a.head_dim, bias=False)
        self.k_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=False)
        self.v_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=False)
        self.o_proj = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=False)
        self.rope = rope

    def forward(self, x, cos, sin, bias, deltas, p, last=False):
        """last: only the last position's output (B, 1, d), its query reading every key."""
        B, T, _ = x.shape
        xd, memo = delta_input(x, deltas, "qkv", p), {}                    # one dropout mask for q, k, v
        k = project(self.k_proj, x, deltas.get("k"), xd, memo).view(B, T, self.n_kv_heads, self.head_dim)
        v = project(self.v_proj, x, deltas.get("v"), xd, memo).view(B, T, self.n_kv_heads, self.head_dim)
        cq, sq = cos, sin
        if last:  # the query of the last position alone
            x, xd, cq, sq = x[:, -1:], xd[:, -1:], cos[:, :, -1:], sin[:, :, -1:]
            memo = {k: xa[:, -1:] for k, xa in memo.items()}
        q = project(self.q_proj, x, deltas.get("q"), xd, memo).view(B, -1, self.n_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, Tq, hd), (B, KV, T, hd)
        q, k = self.rope(q, cq, sq), self.rope(k, cos, sin)
        y = attend(q, k, v, bias[:, :, -1:] if last else bias)            # (B, H, Tq, hd)
        y = y.transpose(1, 2).reshape(B, q.shape[2], -1)                   # (B, Tq, H * hd)
        return project(self.o_proj, y, deltas.get("o"), delta_input(y, deltas, "o", p))


class MLP(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.gate_proj = nn.Linear(a.dim, a.hidden_dim, bias=False)
        self.up_proj = nn.Linear(a.dim, a.hidden_dim, bias=False)
        self.down_proj = nn.Linear(a.hidden_dim, a.dim, bias=False)
        self.swiglu = swiglu

    def forward(self, x, deltas, p):
        xd, memo = delta_input(x, deltas, ("gate", "up"), p), {}          # one dropout mask for gate, up
        g = project(self.gate_proj, x, deltas.get("gate"), xd, memo)      # (B, T, d_ffn)
        u = project(self.up_proj, x, deltas.get("up"), xd, memo)          # (B, T, d_ffn)
        h = self.swiglu(g, u)
        return project(self.down_proj, h, deltas.get("down"), delta_input(h, deltas, ("down",), p))


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(a.dim, a.norm_eps), RMSNorm(a.dim, a.norm_eps)
        self.self_attn, self.mlp = Attention(a), MLP(a)

    def forward(self, h, cos, sin, bias, deltas, p, last=False):
        h = (h[:, -1:] if last else h) + self.self_attn(self.input_layernorm(h), cos, sin, bias, deltas, p, last)
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
        Returns logits (B, T, V); last_only: the last position's (B, V); token_ids: those vocabulary rows only
        (B, [T,] n), in fp32; return_hidden: the final-normed hidden states instead."""
        h = self.embed_tokens(tokens) if embeds is None else embeds            # (B, T, d)
        B, T, _ = h.shape
        causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
        if mask is None:
            pos, allowed = torch.arange(T, device=h.device).expand(B, T), causal[None, None]  # (1, 1, T, T)
        else:
            mask = mask.bool()
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0)                    # (B, T): 0 at each row's first token
            allowed = (causal & mask[:, None, None, :]) | torch.eye(T, dtype=torch.bool, device=h.device)  # (B,1,T,T)
        bias = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device).masked_fill_(~allowed, float("-inf"))
        freqs = pos[..., None].float() * rope_freqs(self.args, h.device)     # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), -1)[:, None]                          # (B, 1, T, hd) rotate-half layout
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        per_layer = [{} for _ in self.layers]
        for (layer, proj), ab in (deltas or {}).items():
            per_layer[layer][proj] = ab
        for i, (layer, d) in enumerate(zip(self.layers, per_layer)):  # with last_only the last layer runs 1 query
            h = layer(h, cos, sin, bias, d, delta_dropout, last=last_only and i == len(self.layers) - 1)
        if last_only:
            h = h[:, -1]                                                       # (B, d): every row's last token
        h = self.norm(h)
        if return_hidden:
            return h
        W = self.lm_head.weight                                               # (V, d)
        if token_ids is not None:  # the Yes/No logits: those rows only, in (at least) fp32
            f32 = torch.promote_types(h.dtype, torch.float32)
            h, W = h.to(f32), W[token_ids].to(f32)                            # (n, d)
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


def compile_elementwise(model, backend="inductor"):
    """--compile: the elementwise work between the matmuls (RMSNorm, RoPE, SwiGLU) as torch.compile'd functions, each
    a fused kernel forward and backward with dynamic shapes (length buckets vary T), shared by every layer; matmuls,
    attention and dropout stay eager (compiling whole blocks was slower on CPU). State-dict keys are unchanged."""
    norm, rot, glu = (torch.compile(f, dynamic=True, backend=backend) for f in (rms_norm, rope, swiglu))
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.fn = norm
        elif isinstance(m, Attention):
            m.rope = rot
        elif isinstance(m, MLP):
            m.swiglu = glu
    return model


# ----------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """Tokenizer(path): the folder's sentencepiece tokenizer.model, else its Hugging Face tokenizer.json (byte-level
    BPE). Both have encode/decode, left-padded batches, path, n_words, bos/eos ids (-1: none) and pad/unk ids."""

    def __new__(cls, path, add_bos=None):
        if cls is Tokenizer:
            has = lambda name: os.path.isfile(os.path.join(path, name))
            if not os.path.isfile(path) and not has("tokenizer.model") and not has("tokenizer.json"):
                raise CheckpointError(f"{path}: neither tokenizer.model (sentencepiece) nor tokenizer.json (Hugging "
                                      f"Face BPE) in the checkpoint folder; copy the model's tokenizer file there")
            bpe = path.endswith(".json") or os.path.isdir(path) and not has("tokenizer.model")
            cls = BPETokenizer if bpe else SentencePieceTokenizer
        return super().__new__(cls)

    def encode(self, s, bos=None, eos=False):
        return [self.bos_id] * bool(self.add_bos if bos is None else bos) + self.ids(s) + [self.eos_id] * bool(eos)

    def batch(self, seqs, device="cpu"):
        """Texts or id lists -> left-padded tokens (B, T) and mask (B, T)."""
        seqs = [self.encode(s) if isinstance(s, str) else list(s) for s in seqs]
        T = max(map(len, seqs))
        tokens = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, T - len(s):], mask[i, T - len(s):] = torch.tensor(s, dtype=torch.long), 1
        return tokens.to(device), mask.to(device)


def tokenizer_config(folder):
    path = os.path.join(folder, "tokenizer_config.json")
    return parse_json(path) if os.path.isfile(path) else {}


class SentencePieceTokenizer(Tokenizer):
    """sentencepiece tokenizer.model with LLaMA's BOS/EOS convention."""

    def __init__(self, path, add_bos=None):
        import sentencepiece as spm
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        path = os.path.join(path, "tokenizer.model") if os.path.isdir(path) else path  # Tokenizer() checked it exists
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except Exception as e:
            also = os.path.isfile(os.path.join(folder, "tokenizer.json")) and "; tokenizer.json is read only without it"
            raise CheckpointError(f"{path}: not a sentencepiece model ({e}){also or ''}") from None
        self.path, self.n_words = path, self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id, self.unk_id = max(self.sp.pad_id(), 0), max(self.sp.unk_id(), 0)  # any valid id will do
        if add_bos is None:  # tokenizer_config.json decides; else LLaMA's "<s>" convention
            add_bos = tokenizer_config(folder).get("add_bos_token")
            if add_bos is None:
                add_bos = self.bos_id >= 0 and self.sp.id_to_piece(self.bos_id) == "<s>"
        self.add_bos = bool(add_bos)

    def ids(self, s):
        return self.sp.encode(s)

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])


_WS = r"\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"  # Unicode White_Space (Oniguruma's \s)
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"  # ByteLevel's use_regex
_OTHER = iter(range(256, 512))  # GPT-2's printable stand-in for each byte: the byte if printable, else 256, 257, ...
_BYTES = "".join(chr(b) if 33 <= b <= 126 or 161 <= b <= 255 and b != 173 else chr(next(_OTHER)) for b in range(256))
_BYTES_TABLE, _TO_BYTES = dict(enumerate(_BYTES)), {c: b for b, c in enumerate(_BYTES)}


@functools.cache
def _category_runs():
    """(general category, length) of each run of code points of one category, from one scan of unicodedata."""
    every = map(unicodedata.category, map(chr, range(sys.maxunicode + 1)))
    return [(cat, len(list(run))) for cat, run in itertools.groupby(every)]


@functools.cache
def unicode_class(name, bmp=False):
    """The ranges of \\p{name} (name a general category: L, N, Lu, Nd, ...) as the body of a Python re class;
    bmp: below U+10000 only (re tests those with one bitmap lookup, the others range by range)."""
    if not (name.isalpha() and len(name) <= 2 and any(cat.startswith(name) for cat, _ in _category_runs())):
        raise ValueError(f"\\p{{{name}}}")
    out, i = [], 0
    for inside, runs in itertools.groupby(_category_runs(), lambda r: r[0].startswith(name)):
        n = sum(k for _, k in runs)
        if inside and (i <= 0xFFFF or not bmp):
            out.append(f"\\U{i:08x}-\\U{min(i + n - 1, 0xFFFF if bmp else sys.maxunicode):08x}")
        i += n
    return "".join(out)


_UNITS = r"\[\^?\]?(?:\\.|[^\\\]])*\]|\\[pP]\{(\w*)\}|\\(.)|\((?!\?)"  # a [...] class, an escape, a "(" group


def onig_to_re(pattern, bmp=False):
    """A tokenizers (Oniguruma) regex as a Python re with one group around it: \\p{..} from unicodedata, \\s as
    White_Space. ValueError names a construct whose meaning differs (\\w, \\b, backreferences, nested classes).
    bmp: a faster twin, exact on text without code points above U+FFFF."""
    def escape(m, in_class):
        e = m.group()[1]
        if e in "sS" or e in "pP" and m.group(1) is not None:
            if in_class and e.isupper():
                raise ValueError(f"{m.group()} inside [...]")
            body = _WS if e in "sS" else unicode_class(m.group(1), bmp)
            return body if in_class else f"[{'^' * e.isupper()}{body}]"
        if e.isalnum() and e not in "dDrntfvxuA":
            raise ValueError(m.group())
        return m.group()

    def unit(m):
        u = m.group()
        if u[0] == "[" and re.search(r"\[|&&", re.sub(r"\\.", "", u[1:])):
            raise ValueError(f"nested or intersected classes {u}")
        if u[0] == "[":
            return re.sub(r"\\[pP]\{(\w*)\}|\\(.)", lambda e: escape(e, True), u)
        return "(?:" if u == "(" else escape(m, False)  # the only group is ours
    return re.compile("(" + re.sub(_UNITS, unit, pattern) + ")", re.M)  # Oniguruma's ^ and $ are per line


def _splitter(pattern, keep=True):
    """pieces -> pieces cut at the regex's matches; the matches become pieces of their own (keep) or are dropped."""
    full, bmp = onig_to_re(pattern), onig_to_re(pattern, bmp=True)
    rx, step = (lambda s: bmp if s.isascii() or max(s) < "\U00010000" else full), 1 if keep else 2
    return lambda pieces: [p for s in pieces for p in rx(s).split(s)[::step] if p]  # odd items are the matches


class BPETokenizer(Tokenizer):
    """A Hugging Face tokenizer.json with a byte-level BPE model, in the standard library alone: the ByteLevel,
    Split (Oniguruma regex), Digits and Sequence pre-tokenizers, merges by rank in either format, ignore_merges,
    added tokens (split out first), TemplateProcessing's BOS and the ByteLevel decoder. Anything else is refused."""

    def __init__(self, path, add_bos=None):
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        self.path = path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        try:
            with open(path, encoding="utf-8") as f:
                self._read(json.load(f), tokenizer_config(folder), add_bos)
        except CheckpointError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration) as e:
            raise CheckpointError(f"{path}: not a readable tokenizer.json ({type(e).__name__}: {e})") from None

    def _refuse(self, field, value, supported):
        raise CheckpointError(f"{self.path}: {field} = {json.dumps(value)[:300]} is not implemented (supported: "
                              f"{supported}); use the model's tokenizer.model or extend BPETokenizer")

    def _read(self, t, cfg, add_bos):
        m = t["model"]
        checks = [("model.type", m.get("type", "BPE"), ("BPE",)), ("normalizer", t.get("normalizer"), (None,)),
                  ("decoder.type", (t.get("decoder") or {}).get("type"), ("ByteLevel",))]
        checks += [(f"model.{k}", m.get(k), (None, ok)) for k, ok in [("dropout", 0), ("byte_fallback", False),
                   ("fuse_unk", False), ("continuing_subword_prefix", ""), ("end_of_word_suffix", "")]]
        checks += [(f"added_tokens[{a['id']}].{k}", a.get(k, False), (False,)) for a in t.get("added_tokens", [])
                   for k in ("single_word", "lstrip", "rstrip")]
        for field, value, ok in checks:
            if value not in ok:
                self._refuse(field, value, " or ".join(map(json.dumps, ok)))
        self.vocab, self.ignore_merges = m["vocab"], bool(m.get("ignore_merges"))
        self.ranks = {tuple(p.split(" ") if isinstance(p, str) else p): r for r, p in enumerate(m["merges"])}
        self.unk = self.vocab.get(m.get("unk_token"))  # for pieces outside the vocabulary; None: dropped, as HF does
        self.added = {a["content"]: a["id"] for a in t.get("added_tokens", [])}
        alternatives = "|".join(map(re.escape, sorted(self.added, key=len, reverse=True)))  # leftmost-longest
        self.added_rx = re.compile(f"({alternatives})") if self.added else None
        self.tokens = {i: s for s, i in [*self.vocab.items(), *self.added.items()]}  # id -> piece, for decode
        self.n_words = max(self.tokens) + 1
        self.steps = self._pre_tokenizer(t.get("pre_tokenizer"), "pre_tokenizer")
        if self._to_bytes not in self.steps:
            self._refuse("pre_tokenizer", t.get("pre_tokenizer"), "one with a ByteLevel step")
        prefix, post = [], t.get("post_processor") or {"type": "ByteLevel"}
        for p in post["processors"] if post.get("type") == "Sequence" else [post]:
            if p.get("type") == "TemplateProcessing":  # [BOS] $A: the BOS this model's encode(bos=True) adds
                k = [next(iter(x)) for x in p["single"]].index("Sequence")
                prefix = [i for x in p["single"][:k] for i in p["special_tokens"][x["SpecialToken"]["id"]]["ids"]]
                if len(prefix) > 1 or len(p["single"]) > k + 1:
                    self._refuse("post_processor.single", p["single"], "[BOS] $A or $A")
            elif p.get("type") != "ByteLevel":
                self._refuse("post_processor", p, "ByteLevel, TemplateProcessing or a Sequence of them")
        tid = lambda v: tid(v["content"]) if isinstance(v, dict) else self.added.get(v, self.vocab.get(v, -1))
        self.bos_id = prefix[0] if prefix else tid(cfg.get("bos_token"))
        self.eos_id, self.pad_id, self.unk_id = tid(cfg.get("eos_token")), 0, max(tid(m.get("unk_token")), 0)
        add_bos = cfg.get("add_bos_token", bool(prefix)) if add_bos is None else add_bos  # the config, else template
        if add_bos and self.bos_id < 0:
            self._refuse("post_processor", post, "a BOS token when tokenizer_config.json's add_bos_token is true")
        last = self.steps[-1] == self._to_bytes  # then the byte mapping runs once per distinct piece, in the cache
        self.steps = self.steps[:len(self.steps) - last]
        merge = (lambda p: self._merge(self._to_bytes([p])[0])) if last else self._merge
        self.add_bos, self._word = bool(add_bos), functools.lru_cache(2 ** 17)(merge)

    def _pre_tokenizer(self, spec, field):
        """The steps (pieces -> pieces) of a pre_tokenizer spec."""
        kind = (spec or {}).get("type")
        if kind == "Sequence":
            return [s for i, p in enumerate(spec["pretokenizers"]) for s in self._pre_tokenizer(p, f"{field}[{i}]")]
        if kind == "Split" and spec["behavior"] in ("Isolated", "Removed") and not spec.get("invert"):
            try:
                return [_splitter(spec["pattern"].get("Regex") or re.escape(spec["pattern"]["String"]),
                                  keep=spec["behavior"] == "Isolated")]
            except (ValueError, re.error) as e:
                self._refuse(f"{field}.pattern", spec["pattern"], f"regexes Python's re runs exactly; this one has {e}")
        if kind == "Digits":  # Rust's char::is_numeric, i.e. \p{N}
            return [_splitter(r"\p{N}" + "+" * (not spec.get("individual_digits")))]
        if kind == "ByteLevel":  # a space before every piece that lacks one, GPT-2's split, bytes -> stand-ins
            space = [lambda ps: [p if p[0] == " " else " " + p for p in ps]] * bool(spec.get("add_prefix_space"))
            regex = [_splitter(_GPT2)] * bool(spec.get("use_regex", True))
            return space + regex + [self._to_bytes]
        self._refuse(field, spec, "ByteLevel, Split (Isolated or Removed, not inverted), Digits, Sequence")

    @staticmethod
    def _to_bytes(pieces):
        return [p.encode().decode("latin-1").translate(_BYTES_TABLE) for p in pieces]

    def _merge(self, piece):
        """Ids of one pre-tokenized piece: merges applied lowest rank first (the piece itself under ignore_merges).
        The stand-ins hold no space, so a word is " a  b  c " and merging (a, b) everywhere is one str.replace."""
        if self.ignore_merges and piece in self.vocab:
            return (self.vocab[piece],)
        word = list(piece)
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: self.ranks.get(p, math.inf))
            if pair not in self.ranks:
                break
            word = f" {'  '.join(word)} ".replace(" %s  %s " % pair, " %s%s " % pair).split()
        return tuple(i for i in map(self.vocab.get, word, itertools.repeat(self.unk)) if i is not None)

    def ids(self, s):
        out = []
        for k, part in enumerate(self.added_rx.split(s) if self.added_rx else [s]):  # odd k: an added token
            if k % 2:
                out.append(self.added[part])
            elif part:
                pieces = functools.reduce(lambda ps, step: step(ps), self.steps, [part])
                out += itertools.chain.from_iterable(map(self._word, pieces))
        return out

    def decode(self, ids):
        pieces = [self.tokens[int(i)] for i in ids if int(i) in self.tokens]
        raw = (bytes(map(_TO_BYTES.get, p)) if all(c in _TO_BYTES for c in p) else p.encode() for p in pieces)
        return b"".join(raw).decode("utf-8", "replace")


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
        return {k: os.path.join(folder, v) for k, v in parse_json(index, "weight_map").items()}
    if os.path.isfile(single):
        return {k: single for k in read_header(single)}
    bins = os.path.isdir(folder) and [f for f in os.listdir(folder) if re.fullmatch(r"pytorch_model.*\.bin", f)]
    how = f"convert it once with `python llama.py --convert {folder} OUT` and use OUT" if bins else "convert it first"
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json (only safetensors weights "
                          f"are read, never pickles{': found ' + ', '.join(sorted(bins)) if bins else ''}); {how}")


def convert_bin(src, out):
    """pytorch_model.bin (or shards + pytorch_model.bin.index.json) -> model.safetensors (or shards + index) in out,
    with config.json and the tokenizer files. Read with torch's restricted unpickler: tensors only, no code runs."""
    index = os.path.join(src, "pytorch_model.bin.index.json")
    shards = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.isfile(index) else None
    shards = shards or ["pytorch_model.bin"]
    os.makedirs(out, exist_ok=True)
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        try:
            sd = torch.load(os.path.join(src, shard), map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise TypeError("not a {name: tensor} dict")
        except Exception as e:
            raise CheckpointError(f"{os.path.join(src, shard)}: not a readable PyTorch state dict ({e})") from None
        name = "model.safetensors" if len(shards) == 1 else f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        seen = set()
        for k, v in sd.items():  # safetensors holds no tensors sharing memory (tied weights): copy all but the first
            sd[k] = v.clone() if v.untyped_storage().data_ptr() in seen else v.contiguous()
            seen.add(v.untyped_storage().data_ptr())
        save_file(sd, os.path.join(out, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(sd, name))
    if len(shards) > 1:
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    for f in os.listdir(src) if not os.path.samefile(src, out) else []:  # config.json, tokenizer files, ...
        if f.endswith(".json") and not f.startswith("pytorch_model") or f == "tokenizer.model":
            shutil.copyfile(os.path.join(src, f), os.path.join(out, f))
    print(f"converted {len(weight_map)} tensors from {len(shards)} .bin file(s) in {src} to safetensors: "
          f"{', '.join(sorted(os.listdir(out)))} in {out}")


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
    """(model, tokenizer) of an HF LLaMA folder, the weights in dtype (a torch dtype or "auto" / "fp32" / "bf16");
    the tokenizer is checked against config.json before the weights load."""
    dtype = resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype
    tok, args = Tokenizer(folder), ModelArgs.from_config(folder)
    if tok.n_words > args.vocab_size:
        raise CheckpointError(f"{tok.path} has {tok.n_words} pieces but {folder}/config.json says vocab_size "
                              f"{args.vocab_size}: the tokenizer belongs to another model")
    return load_llama(folder, dtype, device), tok


def save_llama(model, folder, tokenizer_path=None):
    """Write config.json + model.safetensors (HF names), atomically; copy a tokenizer.model if given."""
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


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--ckpt", help="HF LLaMA folder (config.json, model.safetensors, tokenizer.model or .json)")
    ap.add_argument("--convert", nargs=2, metavar=("DIR", "OUT"), help="pytorch_model*.bin in DIR -> safetensors OUT")
    ap.add_argument("--prompt", default="The movie Toy Story (1995) is about")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    a = ap.parse_args()
    if a.convert:
        convert_bin(*a.convert)
    elif not a.ckpt:
        ap.error("--ckpt DIR is required to generate")
    else:
        tok, model = Tokenizer(a.ckpt), load_llama(a.ckpt)
        out = model.generate(torch.tensor([tok.encode(a.prompt)]), a.max_new_tokens, tok.eos_id)
        print(tok.decode(out[0].tolist()))
