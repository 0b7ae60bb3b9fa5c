"""
test_all.py: the specification. Differential tests against independent naive references written here
(explicit per-head loops, per-example materialised weights) and golden values (SmolLM2-135M logits, HF tokenizer ids)
from the optional asset folder CORA_SHARED (default ../shared); tests that need it skip without it. Large init scale
(std ~0.3) so that layout bugs show. Ordered as the code is read: llama -> CoRA -> baselines -> CF models and metrics
-> data -> training, robustness, analyses. Run: python -m pytest -q test_all.py
"""
import collections
import fcntl
import functools
import gzip
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import unicodedata
import warnings
from graphlib import TopologicalSorter
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cf
import collm
import cora
import data
import llama
import train
from llama import CheckpointError, Llama, ModelArgs, Tokenizer, load_llama, save_llama

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("CORA_SHARED", os.path.join(HERE, "..", "shared"))
SMOL = os.environ.get("CORA_SMOLLM2", os.path.expanduser("~/.cache/cora-ref/smollm2-135m"))
torch.set_num_threads(2)
ML1M = os.environ.get("CORA_ML1M") or os.path.join(SHARED, "data", "ml-1m")  # optional real assets: CORA_SHARED
needs_ml1m = pytest.mark.skipif(not os.path.isfile(os.path.join(ML1M, "train.tsv")), reason=f"no ML-1M TSVs in {ML1M}")


# ----------------------------------------------------------------------------- helpers

def tiny_args(**kw):
    return ModelArgs(**{**dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, vocab_size=61,
                               tie_word_embeddings=True, rope_theta=500.0), **kw})


def random_llama(args, std=0.3, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    m = Llama(args)
    for n, p in m.named_parameters():
        with torch.no_grad():
            p.copy_(torch.randn_like(p) * std + (1.0 if p.dim() == 1 else 0.0))  # norms around 1
    return m.to(dtype).eval().requires_grad_(False)


def naive_logits(m, tokens):
    """Independent reference: one unpadded sequence, explicit loops over heads, positions and RoPE pairs."""
    a, sd = m.args, {k: v.double() for k, v in m.state_dict().items()}
    hd, H, KV = a.head_dim, a.n_heads, a.n_kv_heads
    rms = lambda x, w: w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + a.norm_eps)

    def rope(v, pos):  # HF layout: dimension j is paired with j + hd/2
        out = v.clone()
        for j in range(hd // 2):
            ang = pos * a.rope_theta ** (-2 * j / hd)
            c, s = math.cos(ang), math.sin(ang)
            out[j], out[j + hd // 2] = v[j] * c - v[j + hd // 2] * s, v[j + hd // 2] * c + v[j] * s
        return out

    x = sd["embed_tokens.weight"][tokens]
    T = len(tokens)
    for l in range(a.n_layers):
        p = lambda n: sd[f"layers.{l}.{n}.weight"]
        h = rms(x, p("input_layernorm"))
        q, k, v = h @ p("self_attn.q_proj").T, h @ p("self_attn.k_proj").T, h @ p("self_attn.v_proj").T
        att = torch.zeros(T, H * hd, dtype=torch.float64)
        for head in range(H):
            g = head // (H // KV)  # the key/value head this query head shares
            for t in range(T):
                qt = rope(q[t, head * hd:(head + 1) * hd], t)
                scores = torch.stack([rope(k[s, g * hd:(g + 1) * hd], s) @ qt / math.sqrt(hd) for s in range(t + 1)])
                w = torch.softmax(scores, 0)
                att[t, head * hd:(head + 1) * hd] = sum(w[s] * v[s, g * hd:(g + 1) * hd] for s in range(t + 1))
        x = x + att @ p("self_attn.o_proj").T
        h = rms(x, p("post_attention_layernorm"))
        x = x + (F.silu(h @ p("mlp.gate_proj").T) * (h @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
    return rms(x, sd["norm.weight"]) @ sd["lm_head.weight"].T


def write_folder(tmp, model, shards=1, dtype=torch.float32, tokenizer=None):
    """A HF-layout folder written by the test itself (single file or shards + index)."""
    os.makedirs(tmp, exist_ok=True)
    sd = {("" if k == "lm_head.weight" else "model.") + k: v.to(dtype).contiguous()
          for k, v in model.state_dict().items() if not (k == "lm_head.weight" and model.args.tie_word_embeddings)}
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(model.args.to_config(), f)
    if shards == 1:
        save_file(sd, os.path.join(tmp, "model.safetensors"))
    else:
        keys, wm = sorted(sd), {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: sd[k] for k in keys[i::shards]}
            save_file(part, os.path.join(tmp, name))
            wm.update({k: name for k in part})
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": wm}, f)
    return tmp


def smollm2():
    """The real SmolLM2-135M folder: converted once into a cache folder (needs gguf + protobuf)."""
    gguf_dir = os.path.join(SHARED, "models", "smollm2-135m")
    if not os.path.isdir(gguf_dir):
        pytest.skip("../shared/models/smollm2-135m is absent")
    if not os.path.isfile(os.path.join(SMOL, "model.safetensors")):
        pytest.importorskip("gguf")
        subprocess.run([sys.executable, os.path.join(gguf_dir, "convert.py"), SMOL], check=True)
    return SMOL, load_file(os.path.join(gguf_dir, "golden.safetensors"))


def damage_safetensors(path, what):
    """Cut a safetensors file to half ("truncated"), or make its header claim twice the file's size ("header lies")."""
    blob = bytearray(open(path, "rb").read())
    if what == "truncated":
        blob = blob[: len(blob) // 2]
    else:
        blob[:8] = (len(blob) * 2).to_bytes(8, "little")
    open(path, "wb").write(bytes(blob))


class FakeCF(torch.nn.Module):
    """A stand-in CF model: random user/item tables behind the `embed` interface of cf.py."""

    def __init__(self, n_users=9, n_items=11, dim=8, std=0.3):
        super().__init__()
        self.dim, self.u, self.i = dim, torch.nn.Embedding(n_users, dim), torch.nn.Embedding(n_items, dim)
        torch.nn.init.normal_(self.u.weight, std=std), torch.nn.init.normal_(self.i.weight, std=std)

    def embed(self, uid, iid, his=None):
        return self.u(uid), self.i(iid)


def token_batch(rows, uid, iid, pad=0):
    T = max(map(len, rows))
    return dict(tokens=torch.tensor([[pad] * (T - len(r)) + r for r in rows]),
                mask=torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows]),
                uid=torch.tensor(uid), iid=torch.tensor(iid), label=torch.ones(len(rows)))


def tiny_cora(weight_types="qkvo", std=0.3, seed=0):
    llm = random_llama(tiny_args(), dtype=torch.float32, seed=seed)
    torch.manual_seed(seed)
    m = cora.CoRA(llm, None, [5, 7], FakeCF(), weight_types=weight_types, r=4, alpha=8, n_blocks=2, n_heads=2,
                  ffn_dim=24, gen_dropout=0.0, delta_dropout=0.0).eval()
    if std:  # large, non-zero W_proj so that W_c matters; a generator whose output clearly depends on its input
        with torch.no_grad():  # (the official BERT init, N(0, 0.02), makes the queries nearly the same at step 0)
            for p in m.proj.values():
                p.normal_(0, std)
            for lin in (x for x in m.generator.modules() if isinstance(x, torch.nn.Linear)):
                lin.weight.normal_(0, lin.in_features ** -0.5)
            m.fc.weight.mul_(30)
    return m


@pytest.fixture(scope="module")
def toy_llm(tmp_path_factory):
    return train.toy_llm(data.make_toy(), str(tmp_path_factory.mktemp("toy-llm")))


# ----------------------------------------------------------------------------- llama.py: model, loader, tokenizers

def test_llama_matches_naive_reference():
    m = random_llama(tiny_args())
    tokens = [3, 17, 42, 5, 60, 1, 9]
    ref = naive_logits(m, tokens)
    out = m(torch.tensor([tokens]))[0]
    assert ref.abs().max() > 1  # large init: a layout bug would show
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(m(torch.tensor([tokens]), last_only=True)[0], ref[-1], atol=1e-4, rtol=0)
    ids = torch.tensor([5, 7])
    out = m(torch.tensor([tokens]), last_only=True, token_ids=ids)[0]
    torch.testing.assert_close(out, ref[-1, ids], atol=1e-4, rtol=0)


def test_llama_untied_no_gqa_head_dim_matches_reference():
    m = random_llama(tiny_args(n_kv_heads=4, head_dim=6, tie_word_embeddings=False), seed=1)
    tokens = [1, 2, 3, 4, 50]
    torch.testing.assert_close(m(torch.tensor([tokens]))[0], naive_logits(m, tokens), atol=1e-4, rtol=0)


def test_left_padded_batch_equals_rows_alone():
    m = random_llama(tiny_args(), dtype=torch.float32)
    rows = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    T = 7
    tokens = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    out = m(tokens, mask, last_only=True)
    assert torch.isfinite(m(tokens, mask)).all()  # padded rows do not poison anything with NaN
    for i, r in enumerate(rows):
        torch.testing.assert_close(out[i], m(torch.tensor([r]), last_only=True)[0], atol=1e-5, rtol=0)


def test_embeds_input_equals_tokens():
    m = random_llama(tiny_args())
    tokens = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(m(embeds=m.embed_tokens(tokens)), m(tokens))


@pytest.mark.parametrize("proj", llama.PROJ)
@pytest.mark.parametrize("per_example", [False, True])
def test_delta_path_equals_materialised_merge(proj, per_example):
    a = tiny_args()
    m = random_llama(a)
    B, r, layer = 3, 4, 1
    lin = getattr(m.layers[layer].self_attn if proj in "qkvo" else m.layers[layer].mlp, f"{proj}_proj")
    d_out, d_in = lin.weight.shape
    torch.manual_seed(2)
    A = (torch.randn(B, r, d_in) if per_example else torch.randn(r, d_in)).double().mul(0.3).requires_grad_()
    Bf = (torch.randn(B, d_out, r) if per_example else torch.randn(d_out, r)).double().mul(0.3).requires_grad_()
    tokens = torch.randint(0, a.vocab_size, (B, 6))
    out = m(tokens, deltas={(layer, proj): (A, Bf)})
    W0 = lin.weight.clone()
    for b in range(B):  # naive: materialise W + B A for this example and run it alone
        dW = (Bf[b] @ A[b]) if per_example else Bf @ A
        with torch.no_grad():
            lin.weight.copy_(W0 + dW)
        torch.testing.assert_close(out[b], m(tokens[b:b + 1])[0], atol=1e-8, rtol=1e-8)
        with torch.no_grad():
            lin.weight.copy_(W0)
    out.square().mean().backward()
    assert A.grad.abs().sum() > 0 and Bf.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.parameters())


def _sdpa_reference(q, k, v, bias):
    """The attention llama.attend replaces: SDPA with a boolean mask."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias == 0, enable_gqa=True)


def test_attend_equals_masked_sdpa_padded_per_example_deltas(monkeypatch):
    """The explicit-matmul attention (and the last layer's single query) equals masked SDPA on a left-padded batch
    whose rows have long fully padded prefixes, with per-example deltas on q, k, v, o: forward and gradients; and
    without autograd (SDPA with the 0/-inf bias) the same forward."""
    a = tiny_args()
    m = random_llama(a, dtype=torch.float32)
    lengths, T = [9, 1, 4, 2], 9
    torch.manual_seed(4)
    tokens = torch.randint(0, a.vocab_size, (4, T))
    mask = torch.tensor([[0] * (T - n) + [1] * n for n in lengths])
    dims = llama.proj_dims(a)
    deltas = {(l, p): ((0.3 * torch.randn(4, 3, dims[p][1])).requires_grad_(),
                       (0.3 * torch.randn(dims[p][0], 3)).requires_grad_()) for l in range(a.n_layers) for p in "qkvo"}
    leaves = [t for ab in deltas.values() for t in ab]

    def run(last_only):
        out = m(tokens, mask, deltas=deltas, last_only=last_only)
        real = out if last_only else out[mask.bool()]                      # padded positions are never read
        return real, torch.autograd.grad(real.square().sum(), leaves)
    fast = run(False), run(True)
    monkeypatch.setattr(llama, "attend", _sdpa_reference)
    ref = run(False), run(True)
    for (out, grads), (out_ref, grads_ref) in zip(fast, ref):
        assert out_ref.abs().max() > 1
        torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, atol=1e-5 * g_ref.abs().max().item(), rtol=1e-5)  # fp32 sums
    torch.testing.assert_close(fast[1][0], fast[0][0].view(-1, a.vocab_size)[np.cumsum(lengths) - 1], atol=1e-5, rtol=0)
    monkeypatch.undo()
    with torch.no_grad():  # scoring takes SDPA with the same bias: equal to the explicit path above
        for last_only, (out, _) in zip((False, True), fast):
            real = m(tokens, mask, deltas=deltas, last_only=last_only)
            torch.testing.assert_close(real if last_only else real[mask.bool()], out, atol=1e-5, rtol=1e-5)


def test_fast_dropout_statistics_and_delta_dropout_only_while_training():
    """fast_dropout keeps 1 - p of the entries (p rounded to 2^-16) and scales them by 1 / (1 - p); the delta path
    applies it in training mode only, with one mask for the projections that read the same input."""
    x = torch.ones(400, 1000, dtype=torch.bfloat16)
    y = llama.fast_dropout(x, 0.05)
    keep = y != 0
    assert abs(keep.float().mean().item() - 0.95) < 0.002 and y.dtype == torch.bfloat16
    assert torch.equal(y[keep], torch.full_like(y[keep], 65536 / (65536 - 3277)))
    m = collm.TALLRec(random_llama(tiny_args(), dtype=torch.float32), None, [5, 7], r=4, targets=("q", "k", "v"),
                      delta_dropout=0.3)
    for b in m.lora.B:
        torch.nn.init.normal_(b, std=0.3)
    batch = dict(tokens=torch.randint(0, 61, (3, 6)), mask=torch.ones(3, 6, dtype=torch.long))
    with torch.no_grad():
        m.eval()
        assert torch.equal(m(batch), m(batch))
        m.train()
        assert not torch.equal(m(batch), m(batch)) and not m.llm.training
        calls = []
        real = llama.fast_dropout
        llama.fast_dropout = lambda x, p: calls.append(x.shape) or real(x, p)
        try:
            m(batch)
        finally:
            llama.fast_dropout = real
    assert len(calls) == 2  # two layers, each one mask for q, k, v together; none for o, gate, up, down


def test_bf16_agrees_with_fp32_toy_llm(toy_llm):
    """The toy LLM in bf16 against fp32: last-position logits within 0.1 (measured: at most 0.04 over 64 prompts whose
    logits reach 1.5; bf16 keeps 8 bits of mantissa, about 3 significant digits, rounded at every layer)."""
    m32, tok = llama.load(toy_llm, torch.float32)
    m16, _ = llama.load(toy_llm, "bf16")
    assert m16.embed_tokens.weight.dtype == torch.bfloat16
    tokens, mask = tok.batch(data.prompts(data.make_toy(), "test")[:16])
    ids = torch.tensor([5, 7])
    with torch.no_grad():
        a, b = m32(tokens, mask, last_only=True, token_ids=ids), m16(tokens, mask, last_only=True, token_ids=ids)
    assert b.dtype == torch.float32 and a.abs().max() > 0.1
    assert (a - b).abs().max() < 0.1, (a - b).abs().max()


def test_bf16_step_changes_only_fp32_trainables():
    """One AdamW step of CoRA on a bf16 LLM: the frozen weights stay bit-identical, every trainable tensor, its
    gradient and its optimizer state are fp32, and the loss is fp32."""
    llm = random_llama(tiny_args(), std=0.1, dtype=torch.bfloat16)
    m = cora.CoRA(llm, None, [5, 7], FakeCF(), r=4, alpha=8, n_queries=2, n_blocks=1, n_heads=2, ffn_dim=24)
    for p in m.proj.values():
        torch.nn.init.normal_(p, std=0.1)
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = dict(tokens=torch.randint(0, 61, (3, 6)), mask=torch.ones(3, 6, dtype=torch.long),
                 uid=torch.tensor([0, 1, 2]), iid=torch.tensor([1, 2, 3]), label=torch.tensor([1.0, 0.0, 1.0]))
    m.train()
    loss = F.binary_cross_entropy_with_logits(m(batch), batch["label"])
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    assert all(p.grad is None for p in llm.parameters())
    opt.step()
    assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values() if v.dim())
    assert all(torch.equal(before[k], v) for k, v in llm.state_dict().items())


def test_dtype_auto_follows_the_cpu(monkeypatch):
    """auto: bf16 where it is native (CUDA, AMX / AVX-512 BF16), fp32 elsewhere; --bench times what auto allows;
    bf16 asked for on a CPU that emulates it runs, with one warning naming the cost."""
    assert llama.resolve_dtype("fp32") == torch.float32 and llama.resolve_dtype("bf16") == torch.bfloat16
    assert llama.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert train.bench_dtypes("bf16", "cpu") == ["bf16"] and train.bench_dtypes("auto", "cuda") == ["fp32", "bf16"]
    for has, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(llama, "cpu_has_bf16", lambda: has)
        assert llama.resolve_dtype("auto", "cpu") == want
        assert train.bench_dtypes("auto", "cpu") == (["fp32", "bf16"] if has else ["fp32"])
        with warnings.catch_warnings(record=True) as caught:  # bf16 asked for where it is emulated: one warning
            warnings.simplefilter("always")
            assert llama.resolve_dtype("bf16", "cpu") == llama.resolve_dtype("bf16", "cuda") == torch.bfloat16
        assert [str(w.message)[:40] for w in caught] == ([] if has else ["--dtype bf16 on a CPU without native bf1"])


def test_compiled_elementwise_equals_eager():
    """--compile: torch.compile'd RMSNorm, RoPE and SwiGLU (dynamo capture; the eager backend keeps CI free of a C++
    compile) give eager's logits and delta gradients, for two prompt lengths, padding and per-example deltas."""
    a = tiny_args()
    eager, compiled = random_llama(a, dtype=torch.float32), random_llama(a, dtype=torch.float32)
    llama.compile_elementwise(compiled, backend="eager")
    assert compiled.layers[1].mlp.swiglu is not llama.swiglu and eager.layers[1].mlp.swiglu is llama.swiglu
    assert list(compiled.state_dict()) == list(eager.state_dict())
    torch.manual_seed(3)
    for T in (6, 9):
        tokens, mask = torch.randint(0, a.vocab_size, (3, T)), torch.ones(3, T)
        mask[0, :3] = 0
        deltas = {(l, p): ((0.3 * torch.randn(3, 4, a.dim)).requires_grad_(), 0.3 * torch.randn(3, d_out, 4))
                  for l in range(a.n_layers) for p, (d_out, _) in llama.proj_dims(a).items() if p in "qkvo"}
        outs = [m(tokens, mask, deltas=deltas, last_only=True) for m in (eager, compiled)]
        grads = [torch.autograd.grad(o.square().sum(), [A for A, _ in deltas.values()]) for o in outs]
        torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
        for g1, g0 in zip(grads[1], grads[0]):
            torch.testing.assert_close(g1, g0, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not shutil.which("c++"), reason="inductor compiles C++ kernels")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own, as inductor imports its parts
def test_inductor_elementwise_agrees_with_eager(toy_llm):
    """--compile as users run it (inductor's C++ kernels) on the toy LLM: fp32 last-position logits within 1e-5 of
    eager, with and without autograd; bf16 within the 0.1 of fp32 that eager bf16 keeps (the fused kernels round to
    bf16 once per piece, not once per operation)."""
    tok = Tokenizer(toy_llm)
    tokens, mask = tok.batch(data.prompts(data.make_toy(), "test")[:8])
    ids, out = torch.tensor([5, 7]), {}
    for dt in ("fp32", "bf16"):
        for compiled in (False, True):
            m = llama.load(toy_llm, dt)[0]
            m = llama.compile_elementwise(m) if compiled else m
            out[dt, compiled] = m(tokens, mask, last_only=True, token_ids=ids)             # with autograd
            with torch.no_grad():
                out[dt, compiled, "scoring"] = m(tokens, mask, last_only=True, token_ids=ids)
    ref = out["fp32", False]
    for k in [("fp32", True), ("fp32", False, "scoring"), ("fp32", True, "scoring")]:
        torch.testing.assert_close(out[k], ref, atol=1e-5, rtol=1e-5)
    assert ref.abs().max() > 0.1 and all((out[k] - ref).abs().max() < 0.1 for k in out if k[0] == "bf16")


def test_sharded_bf16_tied_untied_load(tmp_path):
    for tie in (True, False):
        m = random_llama(tiny_args(tie_word_embeddings=tie), dtype=torch.float32)
        tokens = torch.tensor([[1, 2, 3, 4]])
        single = load_llama(write_folder(tmp_path / f"s{tie}", m))
        sharded = load_llama(write_folder(tmp_path / f"m{tie}", m, shards=3))
        assert torch.equal(single(tokens), sharded(tokens)) and torch.equal(single(tokens), m(tokens))
        assert (single.lm_head.weight is single.embed_tokens.weight) == tie
        bf = load_llama(write_folder(tmp_path / f"b{tie}", m, dtype=torch.bfloat16), dtype=torch.bfloat16)
        assert bf.embed_tokens.weight.dtype == torch.bfloat16
        assert torch.isfinite(bf(tokens)).all()
        torch.testing.assert_close(bf(tokens).float(), m(tokens), atol=0.1 * m(tokens).abs().max().item(), rtol=0)


def test_save_load_roundtrip_and_rope_llama3(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}
    m = random_llama(tiny_args(rope_scaling=scaling), dtype=torch.float32)
    save_llama(m, tmp_path)
    m2 = load_llama(tmp_path)
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    assert torch.equal(m(tokens), m2(tokens))
    # llama3 scaling per its definition: wavelengths above old/low are divided by factor, below old/high kept
    inv = llama.rope_freqs(tiny_args(), "cpu")
    inv3 = llama.rope_freqs(m.args, "cpu")
    wl = 2 * math.pi / inv
    assert torch.allclose(inv3[wl > 8], inv[wl > 8] / 8) and torch.equal(inv3[wl < 2], inv[wl < 2])


def _smollm2_with_tokenizer_json(tmp):
    """The SmolLM2 weights next to the original Hugging Face tokenizer.json instead of tokenizer.model."""
    folder, shared = smollm2()[0], os.path.join(SHARED, "models", "smollm2-135m")
    os.makedirs(tmp, exist_ok=True)
    for name, src in [("config.json", folder), ("model.safetensors", folder), ("tokenizer.json", shared),
                      ("tokenizer_config.json", shared)]:
        os.symlink(os.path.join(src, name), os.path.join(tmp, name))
    return str(tmp)


@pytest.mark.parametrize("kind", ["tokenizer.model", "tokenizer.json"])
def test_smollm2_golden_logits_and_greedy(tmp_path, kind):
    folder, g = smollm2()
    folder = folder if kind == "tokenizer.model" else _smollm2_with_tokenizer_json(tmp_path)
    m, tok = llama.load(folder)
    assert os.path.basename(tok.path) == kind
    with torch.no_grad():
        batch = m(g["tokens"], g["attention_mask"], last_only=True)
        torch.testing.assert_close(batch, g["last_logits"], atol=1e-4, rtol=0)
        for i in range(len(g["tokens"])):
            n = int(g["attention_mask"][i].sum())
            alone = m(g["tokens"][i:i + 1, -n:], last_only=True)[0]
            torch.testing.assert_close(alone, g["last_logits"][i], atol=1e-4, rtol=0)
    out = m.generate(g["greedy_prompt"][None], 20)[0, len(g["greedy_prompt"]):]
    assert out.tolist() == g["greedy_continuation"].tolist()
    # bf16 weights: the Yes/No logits within 0.25 of HF's fp32 ones (measured 0.06; over 64 ML-1M prompts at most
    # 0.31 against our fp32, on logits near 16: bf16's 3 significant digits, rounded in each of 30 layers)
    ids = torch.tensor([9230, 2838])
    with torch.no_grad():
        yes_no = load_llama(folder, torch.bfloat16)(g["tokens"], g["attention_mask"], last_only=True, token_ids=ids)
    assert yes_no.dtype == torch.float32 and (yes_no - g["last_logits"][:, ids]).abs().max() < 0.25
    assert tok.encode("The movie Toy Story (1995) is about") == g["greedy_prompt"].tolist()
    assert tok.encode(" Yes") == [9230] and tok.encode(" No") == [2838]


def _corrupt(tmp, what):
    m = random_llama(tiny_args(), dtype=torch.float32)
    folder = write_folder(tmp, m)
    st, cfg = os.path.join(folder, "model.safetensors"), os.path.join(folder, "config.json")
    c = json.load(open(cfg))
    if what == "missing file":
        os.remove(st)
    elif what in ("truncated", "header lies"):  # "header lies": a header claiming more bytes than the file holds
        damage_safetensors(st, what)
    elif what == "missing key":
        sd = load_file(st)
        sd.pop("model.norm.weight")
        save_file(sd, st)
    elif what == "wrong shape":
        c["intermediate_size"] = 50
    elif what == "rope scaling":
        c["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    json.dump(c, open(cfg, "w"))
    return folder, {"missing file": folder, "truncated": st, "header lies": st, "missing key": "norm.weight",
                    "wrong shape": "mlp.gate_proj", "rope scaling": "config.json"}[what]


@pytest.mark.parametrize("what", ["missing file", "truncated", "header lies", "missing key", "wrong shape",
                                  "rope scaling"])
def test_bad_checkpoints_raise_one_clear_error(tmp_path, what):
    folder, named = _corrupt(tmp_path, what)
    with pytest.raises(CheckpointError) as e:
        load_llama(folder)
    assert str(named) in str(e.value) and str(folder) in str(e.value)


def _bin_folder(folder, model, shards):
    """A published-style folder: config.json + pytorch_model.bin (or shards + index) of the HF-named state dict."""
    os.makedirs(folder)
    json.dump(model.args.to_config(), open(os.path.join(folder, "config.json"), "w"))
    sd = {("" if k == "lm_head.weight" else "model.") + k: v for k, v in model.state_dict().items()}  # tied: shared
    if shards == 1:
        torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
        return str(folder)
    names = [f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin" for i in range(shards)]
    for i, name in enumerate(names):
        torch.save({k: v for j, (k, v) in enumerate(sorted(sd.items())) if j % shards == i}, os.path.join(folder, name))
    wm = {k: names[j % shards] for j, k in enumerate(sorted(sd))}
    json.dump({"metadata": {}, "weight_map": wm}, open(os.path.join(folder, "pytorch_model.bin.index.json"), "w"))
    return str(folder)


@pytest.mark.parametrize("shards", [1, 2])
def test_bin_checkpoint_refused_with_command_then_converted_exactly(tmp_path, shards, capsys):
    m = random_llama(tiny_args(tie_word_embeddings=shards == 1), dtype=torch.float32)
    src, out = _bin_folder(tmp_path / "bin", m, shards), str(tmp_path / "st")
    open(os.path.join(src, "tokenizer_config.json"), "w").write("{}")
    with pytest.raises(CheckpointError, match=re.escape(f"python llama.py --convert {src} OUT")):
        load_llama(src)
    if shards == 1:
        llama.convert_bin(src, out)
        assert "converted" in capsys.readouterr().out
    else:  # the command line the error names
        r = subprocess.run([sys.executable, os.path.join(HERE, "llama.py"), "--convert", src, out], capture_output=True,
                           text=True, check=True)
        assert f"in {out}" in r.stdout and os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))
    assert not any(f.endswith(".bin") for f in os.listdir(out))
    m2 = load_llama(out)
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6]])
    assert torch.equal(m(tokens), m2(tokens))
    assert (m2.lm_head.weight is m2.embed_tokens.weight) == (shards == 1)


def test_tokenizer_left_padding():
    folder = os.path.join(SHARED, "models", "llama2-tokenizer")
    if not os.path.isdir(folder):
        pytest.skip("../shared/models/llama2-tokenizer is absent")
    tok = Tokenizer(folder)
    assert tok.add_bos and tok.encode("Hello")[0] == tok.bos_id
    assert tok.decode(tok.encode("Hello world")) == "Hello world"
    tokens, mask = tok.batch(["Hello world, this is long", "Hi"])
    n = len(tok.encode("Hi"))
    assert mask[1].tolist() == [0] * (tokens.shape[1] - n) + [1] * n
    assert tokens[1, -n:].tolist() == tok.encode("Hi") and mask[0].all()


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        Tokenizer(str(tmp_path))


def test_missing_tokenizer_names_both_kinds(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.model .*tokenizer.json"):
        Tokenizer(str(tmp_path))


BPE_GOLDEN = ["smollm2-135m", "bpe-llama3-style"]


def _shared_tokenizer(name):
    folder = os.path.join(SHARED, "models", name)
    if not os.path.isfile(os.path.join(folder, "tokenizer_golden.json")):
        pytest.skip(f"../shared/models/{name} is absent")
    return folder, json.load(open(os.path.join(folder, "tokenizer_golden.json")))


@pytest.mark.parametrize("name", BPE_GOLDEN)
def test_tokenizer_json_ids_and_decode_equal_hf_tokenizers(name):
    folder, golden = _shared_tokenizer(name)
    tok = Tokenizer(folder)
    assert isinstance(tok, llama.BPETokenizer) and len(golden["texts"]) >= 100
    for g in golden["texts"]:
        assert tok.encode(g["text"], bos=False) == g["ids"], g["text"]
        assert tok.decode(g["ids"]) == g["decode"], g["text"]


@pytest.mark.parametrize("name", BPE_GOLDEN)
def test_tokenizer_json_bos_template_and_config(tmp_path, name):
    folder, golden = _shared_tokenizer(name)
    tok, spec = Tokenizer(folder), json.load(open(os.path.join(folder, "tokenizer.json")))
    text, ids = golden["texts"][0]["text"], golden["texts"][0]["ids"]
    if name == "bpe-llama3-style":  # TemplateProcessing prepends <|begin_of_text|>; the config agrees
        assert tok.add_bos and tok.bos_id == 0 and tok.encode(text) == [0] + ids and tok.encode(text, bos=False) == ids
    else:  # SmolLM2: no BOS by its config (add_bos_token false); bos=True adds its bos_token <|im_start|>
        assert not tok.add_bos and tok.encode(text) == ids and tok.encode(text, bos=True) == [1] + ids
        assert (tok.bos_id, tok.eos_id, tok.n_words, tok.unk_id) == (1, 2, 49152, 0)
    assert tok.encode(text, eos=True) == tok.encode(text) + [tok.eos_id]
    for cfg, template, add_bos in [({}, True, True), ({}, False, False), ({"add_bos_token": False}, True, False)]:
        d = tmp_path / f"{name}-{template}-{len(cfg)}"  # without a config the template decides, else the config
        d.mkdir()
        post = spec["post_processor"] if template and name == "bpe-llama3-style" else None
        if template and name == "smollm2-135m":
            post = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}}], "special_tokens": {"<|im_start|>": {"ids": [1]}}}
        json.dump({**spec, "post_processor": post}, open(d / "tokenizer.json", "w"))
        json.dump(cfg, open(d / "tokenizer_config.json", "w"))
        t = Tokenizer(str(d))
        assert t.add_bos == add_bos and t.encode(text) == [t.bos_id] * add_bos + ids
        assert t.encode(text, bos=False) == ids


def test_tokenizer_json_answer_ids_on_ml1m_prompts():
    folder, _ = _shared_tokenizer("smollm2-135m")
    if not os.path.isfile(os.path.join(ML1M, "train.tsv")):
        pytest.skip(f"no ML-1M TSVs in {ML1M}")
    ds = data.load_dataset("ml-1m", ML1M)
    prompts = data.prompts(ds, "test")[::50]
    toks = [Tokenizer(folder)] + ([Tokenizer(SMOL)] if os.path.isfile(os.path.join(SMOL, "tokenizer.model")) else [])
    for tok in toks:
        assert all(collm.answer_ids(tok, p) == [9230, 2838] for p in prompts), tok.path
    a, b = toks[0].encode(prompts[0]), toks[-1].encode(prompts[0])
    assert a == b and 100 < len(a) < 250


def _tiny_tokenizer_json(folder, merges_as_lists=False, individual=True, ignore_merges=False, **top):
    """A hand-made byte-level BPE tokenizer.json (Digits, then ByteLevel with GPT-2's regex) and its folder."""
    vocab = {p: i for i, p in enumerate("a b c Ġ 1 2 3 ab abc Ġab 12 bc ca Ġbca".split())} | {"<s>": 14}
    merges = [("a", "b"), ("Ġ", "ab"), ("ab", "c"), ("1", "2"), ("b", "c")]
    spec = {"version": "1.0", "normalizer": None, "added_tokens": [
        {"id": 14, "content": "<s>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": individual},
                          {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}], "special_tokens": {"<s>": {"ids": [14]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": ignore_merges,
                  "vocab": vocab, "merges": [list(m) if merges_as_lists else " ".join(m) for m in merges]}}
    for key, value in top.items():  # "model.byte_fallback" -> spec["model"]["byte_fallback"]
        *path, last = key.split(".")
        functools.reduce(dict.get, path, spec)[last] = value
    os.makedirs(folder, exist_ok=True)
    json.dump(spec, open(os.path.join(folder, "tokenizer.json"), "w"))
    return str(folder)


def test_tokenizer_json_hand_made_merges_digits_ignore_merges(tmp_path):
    text = "ab abc 123 bca"  # pieces: ab | Ġabc | Ġ | 1 | 2 | 3 | Ġbca
    expected = [7, 9, 2, 3, 4, 5, 6, 3, 11, 0]  # Ġabc: a+b, then Ġ+ab (rank 1) before ab+c (rank 2)
    for i, (kw, ids) in enumerate([({}, expected), ({"merges_as_lists": True}, expected),
                                   ({"ignore_merges": True}, expected[:7] + [13]),  # Ġbca is in the vocabulary
                                   ({"individual": False}, expected[:4] + [10, 6] + expected[7:])]):  # 12 | 3
        tok = Tokenizer(_tiny_tokenizer_json(tmp_path / str(i), **kw))
        assert tok.encode(text, bos=False) == ids, kw
        assert tok.decode(ids) == text and tok.encode(text) == [14] + ids and tok.add_bos
    assert tok.encode("<s>ab<s>", bos=False) == [14, 7, 14] and tok.decode([14, 7]) == "<s>ab"
    tok = Tokenizer(os.path.join(_tiny_tokenizer_json(tmp_path / "x"), "tokenizer.json"))
    assert tok.encode("xab", bos=False) == [7]  # no x in the vocabulary and no unk_token: dropped, as HF does


@pytest.mark.parametrize("field, value, named", [
    ("normalizer", {"type": "NFC"}, "normalizer"),
    ("model.type", "Unigram", "model.type"),
    ("model.byte_fallback", True, "model.byte_fallback"),
    ("model.continuing_subword_prefix", "##", "model.continuing_subword_prefix"),
    ("decoder", {"type": "Metaspace"}, "decoder.type"),
    ("pre_tokenizer", {"type": "Whitespace"}, "pre_tokenizer"),
    ("pre_tokenizer", {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "\\w+"},
                       "behavior": "Isolated", "invert": False}, {"type": "ByteLevel"}]}, "pre_tokenizer[0].pattern"),
    ("pre_tokenizer", {"type": "Split", "pattern": {"Regex": " "}, "behavior": "MergedWithPrevious"}, "pre_tokenizer"),
    ("pre_tokenizer", {"type": "Digits", "individual_digits": True}, "pre_tokenizer"),  # no ByteLevel step
    ("post_processor", {"type": "RobertaProcessing"}, "post_processor"),
    ("added_tokens", [{"id": 14, "content": "<s>", "lstrip": True}], "added_tokens[14].lstrip"),
])
def test_tokenizer_json_unsupported_field_refused_by_name(tmp_path, field, value, named):
    folder = _tiny_tokenizer_json(tmp_path, **{field: value})
    with pytest.raises(CheckpointError, match=re.escape(named)) as e:
        Tokenizer(folder)
    assert os.path.join(folder, "tokenizer.json") in str(e.value) and "not implemented" in str(e.value)


def test_unicode_classes_are_exact_and_fast():
    llama._category_runs.cache_clear()
    llama.unicode_class.cache_clear()
    t = time.perf_counter()
    L, N = re.compile(f"[{llama.unicode_class('L')}]"), re.compile(f"[{llama.unicode_class('N')}]")
    assert time.perf_counter() - t < 2.0
    for cp in list(range(0x3000)) + list(range(0x10000, 0x10000 + 0x3000, 7)) + [0x1F600, 0x20000, 0x10FFFF]:
        c = chr(cp)
        assert bool(L.match(c)) == unicodedata.category(c).startswith("L"), hex(cp)
        assert bool(N.match(c)) == unicodedata.category(c).startswith("N"), hex(cp)
    rx = llama.onig_to_re(r"\s+(?!\S)|[^\s\p{L}]+")  # Oniguruma's \s is White_Space: U+001C..U+001F are not
    assert rx.findall("a \x1c\u3000b") == ["\x1c"]  # Python's own \s would give [" \x1c"]


# ----------------------------------------------------------------------------- cora.py: CoRA

@pytest.mark.parametrize("weight_types", list(cora.WEIGHT_TYPES))
def test_cora_equals_materialised_per_example_merge(weight_types):
    m = tiny_cora(weight_types)
    rows = [[3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14]]
    b = token_batch(rows, [1, 2, 3], [4, 5, 6])
    with torch.no_grad():
        out = m(b)
        q = m.generator(torch.cat(m.cf.embed(b["uid"], b["iid"]), -1)[:, None])
        A = m.factor(m.fc, q)  # (B, r, d)
        A_f = m.factor(m.fc_ffn, q) if m.fc_ffn else None
        base = {k: v.clone() for k, v in m.llm.state_dict().items()}
        for j, r in enumerate(rows):  # naive: build W + W_c for example j, run the plain LLM on its prompt alone
            for l, p in m.targets:
                blk = m.llm.layers[l]
                lin = getattr(blk.self_attn if p in "qkvo" else blk.mlp, f"{p}_proj")
                a = A_f[j] if p == "down" else A[j]
                W_c = m.scale * m.proj[f"{l}_{p}"] @ a                           # (d_out, d_in)
                lin.weight.copy_(base[f"layers.{l}.{'self_attn' if p in 'qkvo' else 'mlp'}.{p}_proj.weight"] + W_c)
            ref = m.llm(torch.tensor([r]), last_only=True, token_ids=m.yes_no)[0, 0]
            m.llm.load_state_dict(base)
            torch.testing.assert_close(out[j], ref, atol=1e-5, rtol=0)
    assert (out - m.llm(b["tokens"], b["mask"], last_only=True, token_ids=m.yes_no)[:, 0]).abs().min() > 1e-3


def test_cora_per_pair_weights_and_batch_invariance():
    m = tiny_cora()
    with torch.no_grad():
        d = m.deltas(torch.tensor([1, 2, 1]), torch.tensor([4, 4, 4]))
        A = d[(0, "q")][0]
        assert (A[0] - A[1]).abs().max() > 1e-3 and torch.equal(A[0], A[2])
        alone = m(token_batch([[3, 4, 5]], [1], [4]))
        batched = m(token_batch([[9, 9, 9, 9, 9, 9], [3, 4, 5], [7, 8]], [2, 1, 3], [5, 4, 6]))
    torch.testing.assert_close(batched[1], alone[0], atol=1e-5, rtol=0)


def test_cora_zero_init_is_base_llm():
    m = tiny_cora(std=0)
    b = token_batch([[3, 4, 5, 6], [8, 9]], [1, 2], [3, 4])
    base = m.llm(b["tokens"], b["mask"], last_only=True, token_ids=m.yes_no)[:, 0]
    assert torch.equal(m(b), base)


def test_cora_gradients_reach_only_generator_and_heads():
    m = tiny_cora(weight_types="qkvof").train()
    with torch.no_grad():
        for p in m.proj.values():
            p.normal_(0, 0.3)
    logits = m(token_batch([[3, 4, 5], [6, 7]], [1, 2], [3, 4]))
    F.binary_cross_entropy_with_logits(logits, torch.tensor([1.0, 0.0])).backward()
    trainable = dict(m.named_parameters())
    assert all(p.grad is None for p in m.llm.parameters()) and all(p.grad is None for p in m.cf.parameters())
    assert not any(k.startswith(("llm.", "cf.")) for k, p in trainable.items() if p.requires_grad)
    for k in ["generator.queries", "generator.blocks.0.cross_attn.v.weight", "fc.weight", "fc_ffn.weight", "proj.0_q",
              "proj.1_down"]:
        assert trainable[k].grad is not None and trainable[k].grad.abs().sum() > 0, k


def test_cf_norm_uses_fixed_train_statistics_and_saves_them():
    uid, iid = torch.arange(9).repeat(2)[:15], torch.arange(11).flip(0).repeat(2)[:15]  # the "train" rows
    u, i = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    m = tiny_cora()
    c = collm.CoLLM(random_llama(tiny_args(), dtype=torch.float32), None, [5, 7], FakeCF(), delta_dropout=0.0)
    with torch.no_grad():
        for model in (m, c):
            model.cf.u.weight.add_(torch.linspace(-5, 5, 8)), model.cf.i.weight.mul_(0.01)  # shared offset, tiny scale
            model.standardize(uid, iid, chunk=4)
            x = torch.cat([model.cf.u.weight[uid], model.cf.i.weight[iid]], -1).double()  # (15, 16)
            mean, std = x.sum(0) / 15, ((x - x.sum(0) / 15) ** 2).sum(0).div(14).sqrt()
            torch.testing.assert_close(model.x_mean, mean.float()), torch.testing.assert_close(model.x_std, std.float())
            z = ((torch.cat([model.cf.u.weight[u], model.cf.i.weight[i]], -1) - mean) / std).float()  # (3, 16)
            if model is m:  # CoRA: the generator reads the standardised [e_u, e_i]
                torch.testing.assert_close(m.deltas(u, i)[(1, "o")][0], m.factor(m.fc, m.generator(z[:, None])),
                                           atol=1e-6, rtol=0)
            else:           # CoLLM: the CIE maps the standardised e_u and e_i into the placeholders
                emb = c.embed(torch.tensor([[3, 0, 4, 0]] * 3), u, i, torch.tensor([[1, 3]] * 3))
                torch.testing.assert_close(emb[:, [1, 3]], c.cie(z.view(3, 2, 8)), atol=1e-6, rtol=0)
            assert {"x_mean", "x_std"} <= set(model.trainable_state())
        alone = m(token_batch([[3, 4, 5]], [1], [4]))
        batched = m(token_batch([[9, 9, 9, 9, 9, 9], [3, 4, 5], [7, 8]], [2, 1, 3], [5, 4, 6]))
        torch.testing.assert_close(batched[1], alone[0], atol=1e-5, rtol=0)  # fixed statistics: batch-invariant
        again = tiny_cora()
        again.cf.load_state_dict(m.cf.state_dict())
        again.load_state_dict(m.trainable_state(), strict=False)  # what a run saves restores the statistics
        assert torch.equal(again(token_batch([[3, 4, 5]], [1], [4])), alone)
    assert "x_mean" not in collm.TALLRec(random_llama(tiny_args(), dtype=torch.float32), None, [5, 7]).trainable_state()


def test_cf_norm_default_is_standard_for_sasrec_only():
    for method, cf_name, flag, want in [
            ("cora", "mf", [], "none"), ("cora", "lightgcn", [], "none"), ("cora", "sasrec", [], "standard"),
            ("collm", "sasrec", [], "standard"), ("collm", "mf", [], "none"), ("tallrec", "sasrec", [], "none"),
            ("cora", "sasrec", ["--cf-norm", "none"], "none"), ("collm", "mf", ["--cf-norm", "standard"], "standard")]:
        args = train.cli().parse_args(["--method", method, "--cf", cf_name, *flag])
        assert train.fill_llm_defaults(args).cf_norm == want


# ----------------------------------------------------------------------------- collm.py: TALLRec / LoRA, CoLLM

def test_lora_trains_frozen_weights_stay():
    a = tiny_args()
    m = random_llama(a, dtype=torch.float32)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    A = torch.randn(4, a.dim).mul(0.1).requires_grad_()
    Bf = torch.zeros(a.n_heads * a.head_dim, 4, requires_grad=True)
    opt = torch.optim.AdamW([A, Bf], lr=1e-2)
    loss = m(torch.tensor([[1, 2, 3]]), deltas={(0, "q"): (A, Bf)}, last_only=True)[0, 0]
    loss.backward()
    opt.step()
    assert Bf.abs().sum() > 0
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


class PadTok:
    """The one piece of llama.Tokenizer that collm.collate uses: left padding of id lists (pad id 9 here)."""

    def batch(self, seqs, device):
        b = token_batch(seqs, [0] * len(seqs), [0] * len(seqs), pad=9)
        return b["tokens"], b["mask"]


def test_collm_placeholders_and_zero_cie():
    llm = random_llama(tiny_args(), dtype=torch.float32)
    m = collm.CoLLM(llm, None, [5, 7], FakeCF(), delta_dropout=0.0).eval()
    seqs = [[3, 4, 0, 5, 0, 6], [7, 0, 8, 0]]                                   # placeholder id 0 at known places
    slots = torch.tensor([[2, 4], [1, 3]]).numpy()
    split = type("S", (), dict(uid=torch.tensor([1, 2]).numpy(), iid=torch.tensor([3, 4]).numpy(),
                               label=torch.tensor([1.0, 0.0]).numpy(), history=[np.array([5, 6]), np.array([], int)]))
    tok = PadTok()
    b = collm.collate(tok, seqs, slots, split, [0, 1], "cpu")
    assert b["slots"].tolist() == [[2, 4], [3, 5]]                             # shifted by row 2's left padding
    assert b["his"].shape == (2, 25) and b["his"][0, -2:].tolist() == [5, 6] and not b["his"][1].any()
    assert (b["tokens"].gather(1, b["slots"]) == 0).all()
    with torch.no_grad():
        m.cie[-1].weight.zero_(), m.cie[-1].bias.zero_()                      # CIE output = 0 at the placeholders
        rows = torch.tensor([[0, 0], [1, 1]])
        emb = llm.embed_tokens(b["tokens"]).index_put((rows, b["slots"]), torch.zeros(2, 2, 32))
        torch.testing.assert_close(m(b), m.logits(b, embeds=emb, deltas=m.lora.deltas()))
        assert not torch.equal(m(b), m.logits(b, deltas=m.lora.deltas()))   # the placeholder token itself is replaced


def test_answer_ids_and_length_buckets(tmp_path):
    texts = ([f"#Question: movie {i} is good? \\n#Answer: Yes" for i in range(50)] +
             [f"#Question: movie {i} is bad? \\n#Answer: No" for i in range(50)])
    folder = llama.build_tiny_llama(str(tmp_path), texts, vocab_size=80)
    tok = Tokenizer(folder)
    yes, no = collm.answer_ids(tok, "#Question: movie 3 is good? \\n#Answer:")
    assert yes != no and tok.decode([yes]).strip() == "Yes"[:len(tok.decode([yes]).strip())]
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10]
    for shuffle in (False, True):
        bs = collm.batches(lengths, 3, shuffle, seed=1, pool=2)
        assert sorted(int(i) for b in bs for i in b) == list(range(10))
    assert [lengths[i] for b in collm.batches(lengths, 3, False) for i in b] == sorted(lengths)


def test_one_step_changes_only_trainable_parameters():
    for make in (lambda llm: collm.TALLRec(llm, None, [5, 7]), lambda llm: collm.CoLLM(llm, None, [5, 7], FakeCF()),
                 lambda llm: tiny_cora(std=0)):
        m = make(random_llama(tiny_args(), dtype=torch.float32)).train()
        frozen_state = lambda: {k: v.clone() for k, v in m.state_dict().items() if k.startswith(("llm.", "cf."))}
        frozen = frozen_state()
        assert not m.llm.training and not getattr(m, "cf", m.llm).training
        params = [p for p in m.parameters() if p.requires_grad]
        before = [p.clone() for p in params]
        opt = torch.optim.AdamW(params, lr=1e-2)
        b = token_batch([[3, 4, 0, 5, 0], [6, 0, 7, 0]], [1, 2], [3, 4])
        b["slots"] = torch.tensor([[2, 4], [2, 4]])
        F.binary_cross_entropy_with_logits(m(b), torch.tensor([1.0, 0.0])).backward()
        opt.step()
        assert any(not torch.equal(a, p) for a, p in zip(before, params))
        after = frozen_state()
        assert frozen.keys() == after.keys() and all(torch.equal(frozen[k], after[k]) for k in frozen)


# ----------------------------------------------------------------------------- cf.py: MF, LightGCN, SASRec, metrics

class _OneThread:
    """Small CPU models run fastest on one thread of a shared machine; restore the setting afterwards."""
    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def test_lightgcn_propagation_matches_dense_computation():
    train = data.Interactions(np.array([1, 1, 2, 2, 3, 1]), np.array([1, 2, 2, 3, 1, 1]),
                              np.array([1, 1, 1, 0, 1, 1], np.float32), np.arange(6), [np.array([], np.int64)] * 6,
                              np.ones(6, bool))   # (1, 1) liked twice; (2, 3) disliked -> no edge; item 4 isolated
    torch.manual_seed(0)
    model = cf.LightGCN(n_users=4, n_items=5, dim=3, n_layers=2, train=train).eval()
    a = np.zeros((9, 9))
    for u, i in [(1, 1), (1, 2), (2, 2), (3, 1), (1, 1)]:
        a[u, 4 + i] += 1
        a[4 + i, u] += 1
    degree = a.sum(1)
    d = np.where(degree > 0, 1 / np.sqrt(np.maximum(degree, 1e-12)), 0.0)
    norm = d[:, None] * a * d[None, :]
    assert np.allclose(model.graph.to_dense().numpy(), norm)
    e0 = torch.cat([model.user.weight, model.item.weight]).detach().double().numpy()
    expected = (e0 + norm @ e0 + norm @ norm @ e0) / 3
    users, items = model.tables()
    assert np.allclose(users.numpy(), expected[:4], atol=1e-6) and np.allclose(items.numpy(), expected[4:], atol=1e-6)
    e_u, e_i = model.embed(torch.tensor([1, 3]), torch.tensor([2, 4]))
    assert e_u.shape == (2, 3) and np.allclose(e_i[1].numpy(), expected[4 + 4], atol=1e-6)
    assert np.allclose(model(torch.tensor([1]), torch.tensor([2])).item(), expected[1] @ expected[6], atol=1e-6)


def test_mf_and_lightgcn_learn_on_toy_deterministically():
    ds = data.make_toy()
    with _OneThread():
        for kind in ("mf", "lightgcn"):
            model, result = cf.train_cf(kind, ds, dim=32, lr=1e-2, wd=1e-4, batch_size=256, epochs=12, patience=3,
                                        seed=0, init_std=0.1, log=lambda s: None)
            assert result["valid"]["auc"] > 0.6 and result["test"]["auc"] > 0.6, (kind, result)
            assert not model.training and model.dim == 32
            cold_users = torch.from_numpy(np.setdiff1d(np.arange(ds.n_users), ds.train.uid))   # padding 0 included
            e_u, _ = model.embed(cold_users, torch.ones_like(cold_users))
            assert len(cold_users) > 1 and torch.all(e_u == 0)        # ids absent from train stay exactly zero
        lines = [[], []]
        for run in lines:
            cf.train_cf("lightgcn", ds, 16, 1e-2, 1e-4, 512, 2, 2, seed=3, log=run.append)
        assert [s.split("|")[:4] for s in lines[0]] == [s.split("|")[:4] for s in lines[1]]
        assert re.fullmatch(r"epoch +1 \| loss \d\.\d{4} \| valid auc 0\.\d{4} \| test auc 0\.\d{4} \| [\d.]+s",
                            lines[0][-1])


def test_toy_mf_reproduces_the_readme_figure(tmp_path):
    """The README's toy MF row (test AUC 0.6559, UAUC 0.6728): pins the RNG order of CF initialisation."""
    with _OneThread():
        _, res = cf.run_cf("toy", "mf", str(tmp_path), log=lambda *a: None)
    assert abs(res["test"]["auc"] - 0.6559) < 1e-4 and abs(res["test"]["uauc"] - 0.6728) < 1e-4, res["test"]


def test_sasrec_causal_padding_ignored_and_history_read():
    torch.manual_seed(0)
    m = cf.SASRec(5, 40, dim=16, n_layers=2, n_heads=2, maxlen=25, init_std=0.3).eval()
    his = torch.randint(1, 40, (3, 25))
    his[2, :20] = 0                                                         # a short history, left-padded
    out = m.encode(his, every_position=True)                               # (3, 25, 16)
    later = his.clone()
    later[:, 15:] = torch.randint(1, 40, (3, 10))                           # change only positions 15..24
    assert torch.allclose(m.encode(later, every_position=True)[:, :15], out[:, :15], atol=1e-6)  # causal
    assert not torch.allclose(m.encode(later), out[:, -1])
    short = his[2:, 15:]                                                    # the same 5 items with less padding
    assert torch.allclose(m.encode(short), out[2:, -1], atol=1e-5)          # padded keys take no attention
    assert torch.equal(m.encode(torch.zeros(1, 25, dtype=torch.long)), torch.zeros(1, 16))  # empty history: no signal
    with pytest.raises(ValueError, match="history"):
        m.embed(torch.tensor([1]), torch.tensor([2]))


def test_sasrec_learns_on_toy_and_round_trips(tmp_path):
    ds = data.make_toy()
    m, res = cf.train_cf("sasrec", ds, dim=32, lr=1e-2, wd=1e-4, batch_size=256, epochs=4, patience=2, seed=0,
                         log=lambda *a: None)
    assert res["valid"]["auc"] > 0.56 and res["test"]["auc"] > 0.56, res
    assert res["test"]["cold_auc"] > 0.53  # unlike MF, it reads the history of cold users
    cf.save_cf(str(tmp_path / "s.safetensors"), m, {"dataset": "toy"})
    loaded = cf.load_cf(str(tmp_path / "s.safetensors"), kind="sasrec")
    assert np.array_equal(cf.predict(loaded, ds.test), cf.predict(m, ds.test))


def test_checkpoint_round_trip_and_errors(tmp_path):
    ds = data.make_toy()
    torch.manual_seed(0)
    models = [cf.MF(ds.n_users, ds.n_items, 8, init_std=0.1), cf.LightGCN(ds.n_users, ds.n_items, 8, 2, ds.train)]
    for model in models:
        path = str(tmp_path / f"{model.kind}.safetensors")
        cf.save_cf(path, model, {"dataset": "toy", "lr": 0.01})
        assert os.listdir(tmp_path).count(f"{model.kind}.safetensors") == 1
        loaded = cf.load_cf(path, kind=model.kind)
        assert type(loaded) is type(model) and not loaded.training and loaded.dim == 8
        assert not any(p.requires_grad for p in loaded.parameters())
        assert loaded.meta["dataset"] == "toy" and json.loads(loaded.meta["lr"]) == 0.01
        assert np.array_equal(cf.predict(loaded, ds.test), cf.predict(model, ds.test))
        e_u, e_i = loaded.embed(torch.from_numpy(ds.test.uid[:5]), torch.from_numpy(ds.test.iid[:5]))
        assert e_u.shape == e_i.shape == (5, 8)
        e_u2, e_i2 = loaded.train().embed(torch.from_numpy(ds.test.uid[:5]), torch.from_numpy(ds.test.iid[:5]))
        assert torch.equal(e_u, e_u2) and torch.equal(e_i, e_i2)   # frozen: same embeddings inside a module in train()
    assert sorted(os.listdir(tmp_path)) == ["lightgcn.safetensors", "mf.safetensors"]   # no temporary files left
    with pytest.raises(ValueError, match="holds a mf model"):
        cf.load_cf(str(tmp_path / "mf.safetensors"), kind="lightgcn")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        cf.load_cf(str(tmp_path / "bad.safetensors"))
    with pytest.raises(FileNotFoundError, match="train.py"):
        cf.load_cf(str(tmp_path / "missing.safetensors"))


def _pairwise_auc(labels, scores):
    """Naive O(n^2) AUC: P(score_pos > score_neg) + 0.5 P(tie)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    return ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))


def test_auc_hand_values_with_ties():
    assert cf.auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # pos {0.5, 0.9} vs neg {0.5, 0.2}: tie 0.5 + 1 + 1 + 1 = 3.5 of 4 pairs
    assert cf.auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)
    assert cf.auc([1, 0, 1, 0], [3.0, 3.0, 3.0, 3.0]) == pytest.approx(0.5)
    assert cf.auc([1, 0], [0.0, 1.0]) == pytest.approx(0.0)


def test_auc_matches_pairwise_and_raises_on_one_class():
    rng = np.random.default_rng(0)
    for n in (7, 50, 400):
        labels = rng.integers(0, 2, n)
        scores = np.round(rng.normal(size=n), 1)              # many ties
        assert cf.auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores), abs=1e-12)
    with pytest.raises(ValueError, match="both classes"):
        cf.auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        cf.auc([0, 1], [0.1, np.nan])


def test_uauc_hand_values():
    uids = np.array([4, 1, 1, 2, 2, 2, 3, 3])
    labels = np.array([1, 1, 0, 1, 0, 0, 1, 1])
    scores = np.array([0.3, 0.9, 0.1, 0.2, 0.5, 0.2, 0.4, 0.6])
    # user 1: 1.0; user 2: pos 0.2 vs negs {0.5, 0.2} = (0 + 0.5) / 2 = 0.25; user 3 one class, user 4 one row
    value, used, skipped = cf.uauc(uids, labels, scores)
    assert (value, used, skipped) == (pytest.approx(0.625), 2, 2)
    with pytest.raises(ValueError, match="no user"):
        cf.uauc([1, 2], [1, 0], [0.3, 0.4])


def test_uauc_matches_per_user_loop():
    rng = np.random.default_rng(1)
    uids, labels = rng.integers(0, 40, 600), rng.integers(0, 2, 600)
    scores = np.round(rng.normal(size=600), 1)
    per_user = [_pairwise_auc(labels[uids == u], scores[uids == u]) for u in np.unique(uids)
                if 0 < labels[uids == u].sum() < (uids == u).sum()]
    value, used, skipped = cf.uauc(uids, labels, scores)
    assert value == pytest.approx(np.mean(per_user), abs=1e-12)
    assert used == len(per_user) and used + skipped == len(np.unique(uids))


def test_paired_bootstrap_se_matches_a_loop():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    a, b = y + rng.normal(0, 1.5, 300), np.round(y + rng.normal(0, 1.5, 300))  # b with ties
    idx = np.random.default_rng(7).integers(0, 300, (40, 300))
    naive = np.std([cf.auc(y[i], a[i]) - cf.auc(y[i], b[i]) for i in idx])
    assert cf.auc_diff_se(y, a, b, n_boot=40, seed=7) == pytest.approx(naive, abs=1e-12) and naive > 0.01
    assert cf.auc_diff_se(y, a, a) == 0.0


def test_evaluate_warm_cold_and_undefined_subsets():
    rows = data.Interactions(np.array([1, 1, 2, 2, 3]), np.array([1, 2, 1, 2, 3]),
                             np.array([1, 0, 0, 1, 1], np.float32), np.arange(5), [np.array([], np.int64)] * 5,
                             np.array([True, True, True, True, False]))
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.5])
    out = cf.evaluate(rows, scores)
    assert out["n"] == 5 and out["n_warm"] == 4 and out["n_cold"] == 1
    assert out["auc"] == pytest.approx(_pairwise_auc(rows.label, scores))
    # warm: pos {0.9, 0.2} vs neg {0.1, 0.8} -> 3 of 4 pairs; per user: 1.0 (user 1) and 0.0 (user 2)
    assert out["warm_auc"] == pytest.approx(0.75) and out["warm_uauc"] == pytest.approx(0.5)
    assert out["uauc"] == pytest.approx(0.5) and out["n_users_uauc"] == 2
    assert out["cold_auc"] is None and out["cold_uauc"] is None      # one class: None, not a crash


# ----------------------------------------------------------------------------- data.py: datasets, prompts, TSVs

def _unix(day):
    """'2001-06-05' -> unix seconds at noon UTC."""
    return int(np.datetime64(f"{day}T12:00:00", "s").astype(np.int64))


def _write_ml1m_raw(folder):
    movies = "10::Alpha (1990)::Drama\n20::Beta (1991)::Comedy\n30::Gamma (1992)::Action\n40::Amélie (2001)::Comedy\n"
    ratings = [  # UserID, MovieID, Rating, day
        (7, 10, 5, "2000-04-10"),   # month 0: sets the origin, dropped (< 14)
        (9, 30, 4, "2001-06-05"),   # month 14: train
        (5, 20, 3, "2001-07-01"),   # train, disliked
        (5, 10, 5, "2001-06-20"),   # train
        (5, 30, 5, "2001-05-31"),   # month 13: dropped
        (5, 40, 4, "2002-05-01"),   # month 25: valid
        (9, 20, 2, "2002-05-02"),   # valid
        (5, 30, 1, "2002-10-01"),   # month 30: test
        (9, 40, 5, "2002-10-01"),   # test; tied with the next row: movie 10 appeared first in this file -> goes first
        (5, 99, 5, "2002-06-01"),   # unknown movie: dropped by the inner join
        (9, 10, 4, "2002-10-01"),   # test
        (5, 20, 4, "2003-01-31"),   # month 33: test
        (9, 10, 5, "2003-02-10"),   # month 34: dropped
    ]
    with open(os.path.join(folder, "movies.dat"), "w", encoding="latin-1") as f:
        f.write(movies)
    with open(os.path.join(folder, "ratings.dat"), "w", encoding="latin-1") as f:
        f.writelines(f"{u}::{m}::{r}::{_unix(d)}\n" for u, m, r, d in ratings)
    return os.path.join(folder, "ratings.dat"), os.path.join(folder, "movies.dat")


def _assert_rows(rows, uid, iid, label, history, warm):
    assert rows.uid.tolist() == uid and rows.iid.tolist() == iid and rows.label.tolist() == label
    assert [h.tolist() for h in rows.history] == history and rows.warm.tolist() == warm
    assert rows.uid.dtype == np.int64 and rows.label.dtype == np.float32 and rows.warm.dtype == bool


def test_ml1m_raw_recipe_by_hand(tmp_path):
    ds = data.ml1m_from_raw(*_write_ml1m_raw(str(tmp_path)))
    # users 5 -> 1, 9 -> 2; items by first appearance in the (user, time) walk: 10 -> 1, 20 -> 2, 40 -> 3, 30 -> 4
    assert (ds.n_users, ds.n_items, ds.kind, ds.n_history) == (3, 5, "movie", 10)
    assert ds.titles == ["", "Alpha (1990)", "Beta (1991)", "Amélie (2001)", "Gamma (1992)"]
    _assert_rows(ds.train, [1, 1, 2], [1, 2, 4], [1, 0, 1], [[], [1], []], [True, True, True])
    _assert_rows(ds.valid, [1, 2], [3, 2], [1, 0], [[1], [4]], [False, True])
    _assert_rows(ds.test, [1, 1, 2, 2], [4, 2, 1, 3], [0, 1, 1, 1], [[1, 3], [1, 3], [4], [4, 1]],
                 [True, True, True, False])
    assert ds.test.timestamp.tolist()[-2:] == [_unix("2002-10-01")] * 2
    assert len(ds.valid_small) == 1 and ds.valid_small.iid[0] in ds.valid.iid      # a seeded half of valid
    again = data.ml1m_from_raw(*_write_ml1m_raw(str(tmp_path)))
    assert again.valid_small.iid.tolist() == ds.valid_small.iid.tolist()
    prompt = data.build_prompt(ds, ds.test.history[3], ds.test.iid[3])
    assert '"Gamma (1992)", "Alpha (1990)"' in prompt and 'movie titled "Amélie (2001)"' in prompt


def _write_amazon_raw(folder):
    meta = [{"asin": "B2", "title": "Book Two"}, {"asin": "B1", "title": "Book One (old)"},
            {"asin": "B3", "title": "Book Three"}, {"asin": "B5"}, {"asin": "B1", "title": "Book One"},
            {"asin": "B6", "title": "var d = new Date().getTime()"}, {"asin": "B4", "title": "Book Four"}]
    reviews = [("U1", "B1", 5.0, "2017-01-10"), ("U2", "B1", 4.0, "2017-02-10"), ("U1", "B2", 5.0, "2017-03-10"),
               ("U2", "B2", 5.0, "2017-12-05"), ("U1", "B3", 3.0, "2017-12-01"), ("U3", "B3", 5.0, "2017-04-01"),
               ("U2", "B3", 5.0, "2017-12-20"), ("U1", "B1", 5.0, "2017-12-20"), ("U2", "B2", 2.0, "2017-05-01"),
               ("U1", "B4", 5.0, "2017-06-01"), ("U2", "B4", 5.0, "2017-06-02"), ("U1", "B5", 5.0, "2017-06-03"),
               ("U1", "B6", 5.0, "2017-06-04"), ("U2", "B7", 5.0, "2017-06-05"), ("U1", "B2", 5.0, "2016-12-31"),
               ("U2", "B1", 5.0, "2018-01-02"), ("U2", "B1", 5.0, "2017-12-28")]
    meta_path, reviews_path = os.path.join(folder, "meta_Books.json.gz"), os.path.join(folder, "Books_5.json")
    with gzip.open(meta_path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(m) + "\n" for m in meta)
    with open(reviews_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"reviewerID": u, "asin": a, "overall": r, "unixReviewTime": _unix(d),
                                 "reviewText": "..."}) + "\n" for u, a, r, d in reviews)
    return reviews_path, meta_path


def test_amazon_recipe_on_generated_sample(tmp_path):
    ds = data.amazon_book_from_raw(*_write_amazon_raw(str(tmp_path)), min_count=2)
    # kept: titled 2017 rows of users and items with > 2 such rows, counted in one pass (U3's row keeps B3 at 3);
    # numbered in the merged order (metadata order, last duplicate): B2 -> 1, B3 -> 2, B1 -> 3; U1 -> 1, U2 -> 2.
    # December (5 rows) sorted by time: the first 2 are valid, the other 3 test.
    assert (ds.n_users, ds.n_items, ds.kind, ds.n_history) == (3, 4, "book", 10)  # both official loaders: 10
    assert ds.titles == ["", "Book Two", "Book Three", "Book One"]
    _assert_rows(ds.train, [1, 1, 2, 2], [3, 1, 3, 1], [1, 1, 0, 0], [[], [3], [], []], [True] * 4)
    _assert_rows(ds.valid, [1, 2], [2, 1], [0, 1], [[3, 1], []], [False, True])
    _assert_rows(ds.test, [1, 2, 2], [3, 2, 3], [1, 1, 1], [[3, 1], [1], [1, 2]], [True, False, True])
    assert data.prompts(ds, "test")[2].startswith(
        '#Question: A user has given high ratings to the following books: "Book Two", "Book Three". Leverage')


@needs_ml1m
def test_ml1m_tsv_split_sizes_and_statistics():
    ds = data.load_dataset("ml-1m", ML1M)
    assert (len(ds.train), len(ds.valid), len(ds.test), len(ds.valid_small)) == (33_891, 10_401, 7_331, 5_200)
    assert (ds.n_users, ds.n_items, ds.kind, ds.n_history) == (839, 3_256, "movie", 10)
    assert [round(float(s.label.mean()), 3) for s in (ds.train, ds.valid, ds.test)] == [0.537, 0.528, 0.545]
    assert ds.train.warm.all() and round(float(ds.valid.warm.mean()), 3) == 0.635
    assert len(np.unique(ds.test.uid)) == 320 and len(np.unique(ds.test.iid)) == 2_203
    assert ds.titles[1] == "Shawshank Redemption, The (1994)" and ds.train.history[1].tolist() == [1]


@needs_ml1m
def test_ml1m_raw_recipe_reproduces_the_tsvs(tmp_path):
    """Rebuild a ratings.dat from the TSVs (raw ids, a shuffled order) and check the recipe gives them back.
    Tied rows (one user, one second) keep the official pandas order, i.e. movies in first-appearance order of
    ratings.dat, so the file starts with one dropped row per movie in an order consistent with the TSV ties."""
    ds = data.load_dataset("ml-1m", ML1M)
    every = (ds.train, ds.valid, ds.test)
    u, i, y, t = (np.concatenate([getattr(s, c) for s in every]) for c in ("uid", "iid", "label", "timestamp"))
    tied = np.flatnonzero((u[1:] == u[:-1]) & (t[1:] == t[:-1]))       # the TSVs are in walk order
    order = TopologicalSorter({k: set() for k in range(1, ds.n_items)})
    for k in tied:
        order.add(int(i[k + 1]), int(i[k]))
    items = open(os.path.join(ML1M, "items.tsv"), encoding="utf-8").read().split("\n")[1:]
    movie_id = {int(r.split("\t")[0]): int(r.split("\t")[1]) for r in items if r}
    movies = list(order.static_order())
    lines = [f"1::{movie_id[movies[0]]}::5::{_unix('2000-04-25')}\n"]                         # month 0
    lines += [f"9999::{movie_id[m]}::3::{_unix('2003-03-01')}\n" for m in movies]            # month 35: dropped
    lines += [f"{3 * u[k] + 10}::{movie_id[i[k]]}::{5 if y[k] else 2}::{t[k]}\n"
              for k in np.random.default_rng(0).permutation(len(u))]
    ratings = tmp_path / "ratings.dat"
    ratings.write_text("".join(lines), encoding="latin-1")
    raw = data.ml1m_from_raw(str(ratings), os.path.join(ML1M, "movies.dat"))
    assert (raw.n_users, raw.n_items, raw.titles) == (ds.n_users, ds.n_items, ds.titles)
    for a, b in zip(every, (raw.train, raw.valid, raw.test)):
        assert all(np.array_equal(getattr(a, c), getattr(b, c)) for c in ("uid", "iid", "label", "timestamp", "warm"))
        assert all(np.array_equal(x, z) for x, z in zip(a.history, b.history))


def test_toy_dataset_deterministic_schema_and_signal():
    t0 = time.time()
    ds = data.load_dataset("toy")
    assert time.time() - t0 < 1.0
    again = data.make_toy()
    for split in ("train", "valid", "test", "valid_small"):
        a, b = ds.split(split), again.split(split)
        assert all(np.array_equal(getattr(a, c), getattr(b, c)) for c in ("uid", "iid", "label", "timestamp", "warm"))
        assert all(np.array_equal(x, y) for x, y in zip(a.history, b.history))
        assert a.uid.dtype == a.iid.dtype == a.timestamp.dtype == np.int64 and a.label.dtype == np.float32
        assert 0.4 < a.label.mean() < 0.6 and a.uid.min() >= 1 and a.iid.max() < ds.n_items
    assert ds.titles == again.titles and ds.titles[0] == ""
    assert all(re.fullmatch(r"The [A-Z][a-z]+ [A-Z][a-z]+ \(\d{4}\)", t) for t in ds.titles[1:])
    assert 250 <= ds.n_users <= 301 and 150 <= ds.n_items <= 201
    assert 10_000 < len(ds.train) + len(ds.valid) + len(ds.test) < 14_000
    assert ds.train.warm.all() and 0 < ds.valid.warm.mean() < 1 and 0 < ds.test.warm.mean() < 1   # cold rows exist
    assert ds.train.timestamp.max() < ds.valid.timestamp.min() and ds.valid.timestamp.max() < ds.test.timestamp.min()
    # a history is the user's earlier liked items, oldest first
    every = [ds.train, ds.valid, ds.test]
    u, i, y, t = (np.concatenate([getattr(s, c) for s in every]) for c in ("uid", "iid", "label", "timestamp"))
    history = [h for s in every for h in s.history]
    for k in np.random.default_rng(0).choice(len(u), 30, replace=False):
        earlier = (u == u[k]) & (y == 1) & (t < t[k])
        assert set(history[k].tolist()) >= set(i[earlier].tolist())
        assert len(history[k]) == earlier.sum()       # no timestamp ties in the toy data


def _tiny_dataset(kind="movie", n_history=2):
    rows = data.Interactions(np.array([1, 1]), np.array([1, 2]), np.array([1.0, 0.0], np.float32),
                             np.array([10, 20]), [np.array([], np.int64), np.array([1])], np.array([True, True]))
    titles = ["", "Heat (1995)", " Up (2009) ", "Fargo (1996)"]
    return data.Dataset("tiny", kind, 2, 4, titles, rows, rows, rows, n_history=n_history)


def test_id_only_prompts_have_no_titles_and_the_same_items():
    ds = data.make_toy()
    ids = data.id_only(ds)
    for template in ("tallrec", "collm"):
        for a, b, h, i in zip(data.prompts(ds, "test", template)[:300], data.prompts(ids, "test", template),
                              ds.test.history, ds.test.iid):
            assert not any(ds.titles[j] in b for j in [*h.tolist(), i] if ds.titles[j])
            assert a.count('"') == b.count('"')  # the same items
            assert b.count('"item ') == a.count('"') // 2 - 2  # every title but "Yes", "No"
            assert f'titled "item {i}"' in b


def test_prompt_text_exact():
    ds = _tiny_dataset()
    assert data.build_prompt(ds, np.array([3, 1, 2]), 2) == (
        '#Question: A user has given high ratings to the following movies: "Heat (1995)", " Up (2009) ". '
        'Leverage the information to predict whether the user would enjoy the movie titled "Up (2009)"? '
        'Answer with "Yes" or "No". \\n#Answer:')
    collm = data.build_prompt(_tiny_dataset("book"), np.array([], np.int64), 3, template="collm")
    assert collm == (
        '#Question: A user has given high ratings to the following books: unkow. Additionally, we have information '
        "about the user's preferences encoded in the feature <UserID>. Using all available information, make a "
        'prediction about whether the user would enjoy the book titled "Fargo (1996)" with the feature '
        '<TargetItemID>? Answer with "Yes" or "No". \\n#Answer:')
    assert "\n" not in collm and collm.endswith("\\n#Answer:")
    assert data.USER_TOKEN == "<UserID>" and data.ITEM_TOKEN == "<TargetItemID>"
    assert data.prompts(ds, "train")[0].count("unkow") == 1
    with pytest.raises(ValueError, match="template"):
        data.build_prompt(ds, np.array([1]), 2, template="nope")


def test_tsv_round_trip_and_errors_name_file_and_line(tmp_path):
    toy = data.make_toy()
    root = str(tmp_path / "toy")
    data.save_tsv(toy, root)
    back = data.load_tsv(root, "toy")
    assert (back.n_users, back.n_items, back.titles) == (toy.n_users, toy.n_items, toy.titles)
    for split in data.SPLITS:
        a, b = toy.split(split), back.split(split)
        assert all(np.array_equal(getattr(a, c), getattr(b, c)) for c in ("uid", "iid", "label", "timestamp", "warm"))
        assert all(np.array_equal(x, y) for x, y in zip(a.history, b.history))
    train = os.path.join(root, "train.tsv")
    lines = open(train, encoding="utf-8").read().split("\n")

    def load_with(line_no, text):
        broken = list(lines)
        broken[line_no - 1] = text
        with open(train, "w", encoding="utf-8") as f:
            f.write("\n".join(broken))
        return data.load_tsv(root)

    with pytest.raises(ValueError, match=r"train\.tsv:5: expected 7"):
        load_with(5, "1\t2\t1")
    fields = lines[6].split("\t")
    with pytest.raises(ValueError, match=r"train\.tsv:7: iid 9999 is not in items\.tsv"):
        load_with(7, "\t".join(fields[:1] + ["9999"] + fields[2:]))
    with pytest.raises(ValueError, match=r"train\.tsv:7: history iid 777 is not in items\.tsv"):
        load_with(7, "\t".join(fields[:6] + ["1 777"]))
    with pytest.raises(ValueError, match=r"train\.tsv:7: timestamp is not an integer"):
        load_with(7, "\t".join(fields[:3] + ["soon"] + fields[4:]))
    with pytest.raises(ValueError, match=r"train\.tsv:7: label must be 0 or 1"):
        load_with(7, "\t".join(fields[:2] + ["2"] + fields[3:]))
    with pytest.raises(ValueError, match=r"train\.tsv:1: missing column\(s\) \['not_cold'\]"):
        load_with(1, lines[0].replace("not_cold", "cold"))
    with open(train, "w", encoding="utf-8") as f:
        f.write(lines[0] + "\n")
    with pytest.raises(ValueError, match=r"train\.tsv: no data rows"):
        data.load_tsv(root)
    os.remove(train)
    with pytest.raises(FileNotFoundError, match="train.tsv"):
        data.load_tsv(root)
    with pytest.raises(FileNotFoundError, match="CORA_ML1M"):
        data.load_dataset("ml-1m", root=str(tmp_path / "nowhere"))


def test_raw_files_errors_name_file_and_line(tmp_path):
    ratings, movies = _write_ml1m_raw(str(tmp_path))
    with open(ratings, "a", encoding="latin-1") as f:
        f.write("5::10::five::1000000000\n")
    with pytest.raises(ValueError, match=r"ratings\.dat:14: Rating is not an integer"):
        data.ml1m_from_raw(ratings, movies)
    reviews, meta = _write_amazon_raw(str(tmp_path))
    with open(reviews, "a", encoding="utf-8") as f:
        f.write('{"reviewerID": "U1", "asin": \n')
    with pytest.raises(ValueError, match=r"Books_5\.json:18: not valid JSON"):
        data.amazon_book_from_raw(reviews, meta, min_count=2)
    with pytest.raises(FileNotFoundError, match="nope.dat"):
        data.ml1m_from_raw(str(tmp_path / "nope.dat"), movies)


# ----------------------------------------------------------------------------- train.py: training, running, analyses

def _train_log(tmp, *argv, threads=1):
    """train.py in a subprocess (stdout + stderr piped, unbuffered)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--out", str(tmp), "--threads", str(threads), *argv]
    return subprocess.Popen(cmd, env=env, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # Ctrl-C as in a shell


def _train(tmp, *argv):
    p = _train_log(tmp, *argv, threads=2)
    log = p.communicate()[0]
    assert p.returncode == 0, log[-3000:]
    return log


def test_toy_end_to_end_cora_learns_in_bf16_as_in_fp32_and_collm_runs(tmp_path):
    """Tiny untrained LLaMA + toy data: CoRA's valid AUC clearly above 0.5 after 300 steps, and the bf16 run's test
    AUC within 0.005 of the fp32 run's (measured 0.5937 / 0.5936); CoLLM's two steps run."""
    argv = ["--method", "cora", "--max-steps", "300", "--eval-every", "100", "--valid-limit", "800",
            "--test-limit", "600"]
    _train(tmp_path / "fp32", *argv, "--dtype", "fp32")
    _train(tmp_path, *argv, "--dtype", "bf16")
    run = tmp_path / "toy" / "cora-qkvo"
    res, res32 = (json.load(open(p / "toy" / "cora-qkvo" / "results.json")) for p in (tmp_path, tmp_path / "fp32"))
    assert res["dtype"] == "bfloat16" and res32["dtype"] == "float32"
    assert res["best_valid_auc"] > 0.55 and res["test"]["auc"] > 0.55, res
    assert abs(res["test"]["auc"] - res32["test"]["auc"]) < 0.005, (res["test"], res32["test"])
    pred = open(run / "predictions.tsv").read().splitlines()
    assert pred[0] == "uid\tiid\tlabel\tscore" and len(pred) == 601
    saved = load_file(run / "trainable.safetensors")
    assert any(k.startswith("generator.") for k in saved) and not any(k.startswith(("llm.", "cf.")) for k in saved)
    _train(tmp_path, "--method", "collm", "--max-steps", "20", "--eval-every", "10", "--valid-limit", "200",
           "--test-limit", "200")
    stage1, stage2 = (load_file(tmp_path / "toy" / m / "trainable.safetensors") for m in ("tallrec", "collm"))
    assert all(k.startswith("lora.") for k in stage1)
    assert {k.split(".")[0] for k in stage2} == {"cie", "x_mean", "x_std"}
    assert json.load(open(tmp_path / "toy" / "collm" / "results.json"))["test"]["n"] == 200


def test_schedule_official_horizon_no_clipping_and_generator_init():
    """The official recipe: the cosine spans max_epoch x iters_per_epoch (CoRA 100k steps, TALLRec/CoLLM 10k), so the
    LR stays near init_lr for the steps a run really takes; no gradient clipping; the Q-Former's Linear layers drawn
    N(0, 0.02) with zero biases (BERT's init), W_FC left at PyTorch's default."""
    parse = lambda *argv: train.fill_llm_defaults(train.cli().parse_args([*argv, "--llm", "x", "--data", "ml-1m"]))
    a, t, s = parse("--method", "cora"), parse("--method", "tallrec"), parse("--method", "cora", "--cf", "sasrec")
    assert (a.max_steps, a.epochs, a.clip, a.batch_size, a.eval_every, a.r) == (100_000, 0, 0.0, 8, 100, 16)
    assert (t.max_steps, t.batch_size, t.eval_every, t.r, t.alpha) == (10_000, 32, 50, 8, 16.0)
    assert (s.max_steps, s.batch_size, s.eval_every, s.r, s.alpha) == (10_000, 16, 50, 64, 128.0)
    # early stopping waits the official 20 evaluations' span of steps (CoRA 2,000, the others 1,000) at any interval
    assert (a.patience, t.patience, s.patience) == (20, 20, 20)
    every = lambda method, n, *more: parse("--method", method, "--eval-every", str(n), *more).patience
    assert (every("cora", 200), every("tallrec", 200), every("collm", 200), every("cora", 200, "--cf", "sasrec")) == \
           (10, 5, 5, 5)
    assert (every("cora", 3000), every("tallrec", 25), every("cora", 200, "--patience", "3")) == (1, 40, 3)
    toy = train.fill_llm_defaults(train.cli().parse_args(["--method", "cora", "--eval-every", "7"]))  # toy LLM: its own
    assert (toy.patience, toy.eval_every) == (5, 7)
    g = cora.QueryGenerator(64, n_queries=4, n_blocks=2, n_heads=4, ffn_dim=256)
    w = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, torch.nn.Linear)])
    b = torch.cat([m.bias for m in g.modules() if isinstance(m, torch.nn.Linear)])
    assert abs(w.std().item() - 0.02) < 0.0005 and abs(w.mean().item()) < 0.0005 and not b.any()


def test_lr_by_step_follows_the_official_cosine(tmp_path, toy_llm):
    """Read back from history.tsv: warm-up from warmup_lr, then the cosine over --max-steps; the loss is finite."""
    argv = ["--method", "tallrec", "--llm", toy_llm, "--max-steps", "40", "--eval-every", "10", "--warmup", "10",
            "--train-limit", "320", "--valid-limit", "100", "--test-limit", "100", "--batch-size", "8"]
    _train(tmp_path, *argv)
    rows = [line.split("\t") for line in (tmp_path / "toy" / "tallrec" / "history.tsv").read_text().splitlines()]
    lr = {int(r[0]): float(r[2]) for r in rows[1:]}
    cosine = lambda s: 8e-5 + 0.5 * (1e-3 - 8e-5) * (1 + math.cos(math.pi * (s - 10) / 30))
    assert lr[10] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 9 / 10, rel=1e-5)  # step 10 ran at warm-up step 9
    assert all(lr[s] == pytest.approx(cosine(s - 1), rel=1e-5) for s in (20, 30, 40))


def test_learning_curve_shows_first_and_last_validation():
    rows = [dict(step=s, train_loss=0.7, valid_auc=0.5 + s / 1e4) for s in range(50, 1001, 50)]
    lines = train.learning_curve(rows, most=6).splitlines()
    assert len(lines) == 7 and "step     50" in lines[1] and "step   1000" in lines[-1] and lines[-1].endswith("#" * 40)


def test_given_numbers_are_kept_and_zero_switches_limits_off():
    """A value the user gives is never replaced by a default (the old `args.r or 8`); 0 is accepted where it means
    "no limit" (--clip, --max-steps, --*-limit, --warmup) and refused elsewhere (the table above)."""
    parse = lambda *argv: train.fill_llm_defaults(train.cli().parse_args(["--method", "cora", *argv]))
    a = parse("--r", "4", "--clip", "0", "--max-steps", "0", "--train-limit", "0", "--warmup", "0")
    assert (a.r, a.alpha, a.clip, a.max_steps, a.train_limit, a.warmup) == (4, 32.0, 0.0, 0, 0, 0)
    assert (parse("--alpha", "0.5").r, parse("--alpha", "0.5").alpha) == (16, 0.5)


def test_reuse_and_resume_compare_the_global_batch(tmp_path):
    """--accum splits a step's batch into micro-batches: --batch-size 16 --accum 2 is the run that 32 x 1 made (the
    same rows per step, the same order), 32 x 2 is another run; --reuse and --resume (computes) agree."""
    argv = ["--method", "tallrec", "--out", str(tmp_path)]
    made = train.fill_llm_defaults(train.cli().parse_args(argv))                    # toy schedule: batch 32, accum 1
    folder = tmp_path / "toy" / "tallrec"
    folder.mkdir(parents=True)
    data.commit_run(str(folder), {"trainable.safetensors": b"w"}, "uid\tiid\tlabel\tscore\n", {"args": vars(made)})
    reused = lambda *more: train.finished_with(str(folder / "results.json"), train.cli().parse_args(argv + [*more]))
    assert reused() and reused("--batch-size", "16", "--accum", "2") and reused("--batch-size", "8", "--accum", "4")
    assert not reused("--accum", "2") and not reused("--batch-size", "16")
    assert train.computes(dict(batch_size=16, accum=2, lr=1e-3)) == dict(batch_size=32, lr=1e-3)
    assert train.computes(dict(batch_size=None, accum=None)) == dict(batch_size=None)  # a CF child: tuned batch


def test_results_say_why_training_ended(tmp_path, toy_llm):
    """results.json (and --method all's table) names what ended training: the step limit, early stopping or
    --max-minutes; a run cut short by time is reported as such, not passed off as converged."""
    argv = ["--method", "tallrec", "--llm", toy_llm, "--train-limit", "64", "--valid-limit", "50", "--test-limit",
            "50", "--batch-size", "8", "--threads", "1"]
    cases = {"step limit": ["--max-steps", "3"],
             "early stopping": ["--max-steps", "40", "--eval-every", "1", "--patience", "1", "--lr", "1e-12",
                                "--warmup", "0"],
             "--max-minutes 1e-05": ["--max-steps", "40", "--max-minutes", "0.00001"]}
    for i, (why, more) in enumerate(cases.items()):
        res = train.main(train.cli().parse_args(argv + more + ["--out", str(tmp_path / str(i))]))
        saved = json.load(open(tmp_path / str(i) / "toy" / "tallrec" / "results.json"))
        assert res["stopped_by"] == saved["stopped_by"] == why, (why, saved["stopped_by"], saved["steps"])
        assert saved["steps"] == {"step limit": 3, "early stopping": 2, "--max-minutes 1e-05": 1}[why]


def _count_batches(monkeypatch):
    """Patch collm.collate to count train and scoring batches in the Counter returned; setting its "stop_train" or
    "stop_score" to n raises RuntimeError("stopped") at the n-th batch of that kind."""
    calls, real = collections.Counter(), collm.collate

    def collate(*a, **kw):
        kind = "train" if torch.is_grad_enabled() else "score"
        calls[kind] += 1
        if calls[kind] == calls.get(f"stop_{kind}"):
            raise RuntimeError("stopped")
        return real(*a, **kw)

    monkeypatch.setattr(collm, "collate", collate)
    return calls


def test_a_run_cut_short_by_max_minutes_is_tested_kept_reused_and_resumed_bit_exactly(tmp_path, toy_llm, monkeypatch):
    """A run stopped at step 5 (validated at step 4), resumed with a --max-minutes already spent: no step is trained
    and nothing validated again; its best (step 4) weights are tested, results.json says why training ended, --reuse
    takes it whatever --max-minutes asks, and its checkpoint stays. --resume then trains on to the step limit: the
    same weights and test scores, bit for bit, as the run never stopped, and the checkpoint goes."""
    argv = ["--method", "tallrec", "--llm", toy_llm, "--train-limit", "64", "--valid-limit", "50", "--test-limit",
            "50", "--batch-size", "8", "--threads", "1", "--max-steps", "12", "--eval-every", "4", "--ckpt-every", "1"]
    cut, run, calls = argv + ["--out", str(tmp_path / "cut")], tmp_path / "cut" / "toy" / "tallrec", _count_batches(
        monkeypatch)
    calls["stop_train"] = 6
    with pytest.raises(RuntimeError, match="stopped"):
        train.main(train.cli().parse_args(cut))
    calls.clear()
    res = train.main(train.cli().parse_args(cut + ["--resume", "--max-minutes", "1e-9"]))
    assert calls["train"] == 0 and calls["score"] > 0  # no step; the test was scored
    assert (res["steps"], res["stopped_by"]) == (5, "--max-minutes 1e-09")
    assert [line.split("\t")[0] for line in (run / "history.tsv").read_text().splitlines()[1:]] == ["4"]
    assert (run / "state.safetensors").exists()
    for more in ([], ["--max-minutes", "60"]):
        assert train.finished_with(str(run / "results.json"), train.cli().parse_args(argv + more))
    res = train.main(train.cli().parse_args(cut + ["--resume"]))
    assert (res["steps"], res["stopped_by"]) == (12, "step limit") and not (run / "state.safetensors").exists()
    whole = train.main(train.cli().parse_args(argv + ["--out", str(tmp_path / "whole")]))
    assert res["test"] == whole["test"] and res["best_valid_auc"] == whole["best_valid_auc"]
    whole_run = tmp_path / "whole" / "toy" / "tallrec"
    for name in ("trainable.safetensors", "predictions.tsv"):
        assert (run / name).read_bytes() == (whole_run / name).read_bytes(), name
    history = lambda p: [line.split("\t")[:-1] for line in (p / "history.tsv").read_text().splitlines()]
    assert history(run) == history(whole_run)  # all but the throughput column


def train_hist_columns():
    return train.HISTORY


def test_kill_and_resume_equals_uninterrupted_and_same_seed_is_deterministic(tmp_path, toy_llm):
    """CoRA (dropout in the generator and on the delta path: the RNG state matters): SIGKILL after a checkpoint,
    --resume, and the predictions equal an uninterrupted run's; a second uninterrupted run is identical too. The
    resumed run's wall time adds the checkpoint's (set to 1000 s here) to its own."""
    argv = ["--method", "cora", "--llm", toy_llm, "--max-steps", "12", "--eval-every", "6", "--ckpt-every", "2",
            "--train-limit", "200", "--valid-limit", "100", "--test-limit", "100", "--batch-size", "16",
            "--warmup", "4"]
    runs = {name: tmp_path / name for name in ("a", "b", "killed")}
    for p in (_train_log(runs["a"], *argv), _train_log(runs["b"], *argv)):
        assert p.wait() == 0, p.stdout.read()
    p, state = _train_log(runs["killed"], *argv), runs["killed"] / "toy" / "cora-qkvo" / "state.safetensors"
    while not state.exists() and p.poll() is None:
        time.sleep(0.01)
    p.kill()  # SIGKILL right after the first checkpoint
    p.wait()
    assert p.returncode == -9 and not (runs["killed"] / "toy" / "cora-qkvo" / "results.json").exists()
    tensors, counters = load_file(state), json.loads(safe_open(state, "pt").metadata()["state"])
    assert counters["wall_s"] > 0  # the first invocation's wall time, recorded
    save_file(tensors, state, {"state": json.dumps({**counters, "wall_s": 1000.0})})
    t0, p = time.time(), _train_log(runs["killed"], *argv, "--resume")
    log = p.communicate()[0]
    assert p.returncode == 0, log
    wall = json.load(open(runs["killed"] / "toy" / "cora-qkvo" / "results.json"))["wall_time_s"]
    assert 1000 < wall < 1000 + time.time() - t0
    step = int(re.search(r"resumed from .* at step (\d+)", log).group(1))
    assert 0 < step < 12
    preds = {k: (v / "toy" / "cora-qkvo" / "predictions.tsv").read_text() for k, v in runs.items()}
    assert preds["a"] == preds["b"] == preds["killed"]
    res = {k: json.load(open(v / "toy" / "cora-qkvo" / "results.json"))["test"] for k, v in runs.items()}
    assert abs(res["a"]["auc"] - res["killed"]["auc"]) < 1e-6 and res["a"]["auc"] == res["b"]["auc"]
    assert not state.exists()  # a finished run leaves trainable.safetensors + results.json only
    hist = {k: [line.split("\t")[:-1] for line in (v / "toy" / "cora-qkvo" / "history.tsv").read_text().splitlines()]
            for k, v in runs.items()}  # every column but the throughput
    assert hist["a"][0] == list(train_hist_columns())[:-1] and [r[0] for r in hist["a"][1:]] == ["6", "12"]
    assert hist["killed"] == hist["a"] == hist["b"]  # the history survives --resume, row for row
    assert not (runs["killed"] / "toy" / "cora-qkvo" / "history.running.tsv").exists()


def test_a_run_killed_while_validating_resumes_in_that_validation(tmp_path, toy_llm, monkeypatch):
    """A run stopped in the middle of a validation's scoring (an exception from the 3rd valid batch stands in for a
    kill: the files are what a kill leaves) resumes in that validation: no train step is redone, no valid batch is
    scored twice, a line a kill cut short and another run's partial file are ignored, and everything it writes
    equals an uninterrupted run's."""
    argv = ["--method", "cora", "--llm", toy_llm, "--max-steps", "8", "--eval-every", "4", "--ckpt-every", "3",
            "--train-limit", "200", "--valid-limit", "60", "--test-limit", "60", "--batch-size", "16",
            "--warmup", "2", "--eval-batch-size", "8", "--threads", "1"]
    calls = _count_batches(monkeypatch)
    train.main(train.cli().parse_args(argv + ["--out", str(tmp_path / "a")]))
    whole = dict(calls)
    calls.clear()
    calls["stop_score"] = 8 + 3  # 8 = the 60 valid rows in batches of 8
    with pytest.raises(RuntimeError, match="stopped"):
        train.main(train.cli().parse_args(argv + ["--out", str(tmp_path / "k")]))
    run = tmp_path / "k" / "toy" / "cora-qkvo"
    meta = json.loads(safe_open(run / "state.safetensors", "pt").metadata()["state"])
    assert meta["validating"] and meta["step"] == 8 and len(meta["history"]) == 1
    (partial,) = run.glob("valid.step8.*.partial.0.jsonl")
    assert len(partial.read_text().split("\n")) == 1 + 2  # the two batches scored before the stop, a line each
    with open(partial, "a") as f:
        f.write("\n[[1, 2], [0.5")  # a line a kill cut short
    (run / partial.name.replace(meta["run"], "deadbeef")).write_text(json.dumps([list(range(60)), [9.0] * 60]))
    first = dict(calls)
    calls.clear()
    train.main(train.cli().parse_args(argv + ["--out", str(tmp_path / "k"), "--resume"]))
    assert first["train"] + calls["train"] == whole["train"]  # no step trained twice
    assert first["score"] - 1 + calls["score"] == whole["score"]  # no batch scored twice (the stopped one was not)
    done = tmp_path / "a" / "toy" / "cora-qkvo"
    assert (run / "predictions.tsv").read_text() == (done / "predictions.tsv").read_text()
    cut = lambda p: [line.split("\t")[:-1] for line in p.read_text().splitlines()]  # all but the throughput
    assert cut(run / "history.tsv") == cut(done / "history.tsv")
    assert not list(run.glob("*.partial.*")) and not (run / "state.safetensors").exists()


def test_rerun_killed_or_interrupted_leaves_the_finished_run_whole(tmp_path, toy_llm):
    """A finished run, then a re-run with other settings into its folder: SIGKILL after the re-run's first checkpoint,
    then Ctrl-C after its resumed one (exit 130, naming the checkpoint and the command that continues). Both times
    the finished run's files are byte for byte as they were and --reuse's check still accepts them; the printed
    command then finishes the re-run, which replaces the old run whole."""
    common = ["--method", "tallrec", "--llm", toy_llm, "--train-limit", "64", "--valid-limit", "50", "--test-limit",
              "50", "--clip", "0"]
    first = common + ["--out", str(tmp_path), "--max-steps", "2", "--threads", "1"]
    train.main(train.cli().parse_args(first))
    run = tmp_path / "toy" / "tallrec"
    files = {p: p.read_bytes() for p in (run / n for n in ("results.json", "predictions.tsv", "trainable.safetensors"))}
    assert max(v.abs().max().item() for k, v in load_file(run / "trainable.safetensors").items() if ".B." in k) > 0
    rerun, state = common + ["--max-steps", "60", "--ckpt-every", "1", "--lr", "5e-4"], run / "state.safetensors"
    for argv, sig in ((rerun, signal.SIGKILL), (rerun + ["--resume"], signal.SIGINT)):
        since = state.stat().st_mtime_ns if state.exists() else 0
        p = _train_log(tmp_path, *argv)
        while (not state.exists() or state.stat().st_mtime_ns == since) and p.poll() is None:
            time.sleep(0.01)
        p.send_signal(sig)  # after the re-run's (resumed) first checkpoint
        log = p.communicate()[0]
        assert p.returncode == (-9 if sig == signal.SIGKILL else 130), log
        assert all(path.read_bytes() == blob for path, blob in files.items()) and state.exists()
        assert train.finished_with(str(run / "results.json"), train.cli().parse_args(first))
    assert "Traceback" not in log and f"the last checkpoint is {state}; continue with:" in log, log
    command = shlex.split(log.strip().splitlines()[-1])
    assert command[-1] == "--resume" and command.count("--resume") == 1
    p = subprocess.run([sys.executable, *command[1:]], cwd=HERE, capture_output=True, text=True)
    assert p.returncode == 0 and "resumed from" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    assert (run / "results.json").read_bytes() != files[run / "results.json"] and not state.exists()
    assert train.finished_with(str(run / "results.json"), train.cli().parse_args(rerun + ["--out", str(tmp_path)]))
    assert not train.finished_with(str(run / "results.json"), train.cli().parse_args(first))
    (run / "predictions.tsv").write_text("uid\tiid\tlabel\tscore\n")  # now a folder that mixes runs
    with pytest.raises(ValueError, match="predictions.tsv is not the file .*results.json records"):
        data.check_run(str(run), "trainable.safetensors")


def _edit_tsv(root, name, edit):
    """Toy data as a TSV folder (data.save_tsv) with `edit(lines) -> lines` applied to one file."""
    if not os.path.isdir(root):
        data.save_tsv(data.make_toy(), str(root))
    path = os.path.join(root, name)
    lines = open(path, encoding="utf-8").read().rstrip("\n").split("\n")
    open(path, "w", encoding="utf-8").write("\n".join(edit(lines)) + "\n")
    return ["--data", "ml-1m", "--data-root", str(root)]


def _only_label(lines, label):
    col = lines[0].split("\t").index("label")
    return lines[:1] + [l for l in lines[1:] if l.split("\t")[col] == label]


def _set_line(n, f):
    return lambda lines: lines[:n - 1] + [f(lines[n - 1].split("\t"))] + lines[n:]


def _broken_llm(tmp, llm, what):
    """A copy of the toy LLM with one thing wrong in its config, weights or tokenizer files."""
    folder = str(tmp / "llm")
    if not os.path.isdir(folder):
        shutil.copytree(llm, folder)
    st, cfg = os.path.join(folder, "model.safetensors"), os.path.join(folder, "config.json")
    c = json.load(open(cfg))
    config = {"config sizes": {"hidden_size": c["hidden_size"] * 2}, "config type": {"hidden_size": "64"},
              "tokenizer vocab": {"vocab_size": c["vocab_size"] // 2}, "config sign": {"num_hidden_layers": -2},
              "gemma": {"model_type": "gemma"}, "short positions": {"max_position_embeddings": 16},
              "mistral window": {"model_type": "mistral", "sliding_window": 16}}
    weights = {"integer": lambda t: t.to(torch.int8), "float8": lambda t: t.to(torch.float8_e4m3fn),
               "nan": lambda t: t.index_fill(0, torch.tensor([0]), float("nan")), "other": lambda t: t + 1}
    if what in ("truncated", "header lies"):
        damage_safetensors(st, what)
    elif what in config:
        json.dump({**c, **config[what]}, open(cfg, "w"))
    elif what in weights:
        sd = load_file(st)
        sd["model.norm.weight"] = weights[what](sd["model.norm.weight"])
        save_file(sd, st)
    elif what == "tokenizer garbage":
        open(os.path.join(folder, "tokenizer.model"), "wb").write(b"\x00 not a sentencepiece model")
    elif what == "tokenizer_config.json":
        open(os.path.join(folder, what), "w").write('{"add_bos_token": tru')
    elif what == "shard index":
        open(os.path.join(folder, "model.safetensors.index.json"), "w").write('{"weight_map": [')
    return ["--llm", folder]


def _state(tmp, what):
    """A state.safetensors for --resume: truncated, or from a run with other settings."""
    run = tmp / "toy" / "tallrec"
    os.makedirs(run, exist_ok=True)
    path = str(run / "state.safetensors")
    save_file({"model.x": torch.zeros(3)}, path, metadata={"state": json.dumps({"step": 3, "args": {"lr": 0.5}})})
    if what == "truncated":
        blob = open(path, "rb").read()
        open(path, "wb").write(blob[:-5])
    return ["--resume"]


def _seal(folder, weights, **result):
    """Make folder a finished run around the weights file it holds (data.commit_run), as a test fixture."""
    blob = open(os.path.join(folder, weights), "rb").read()
    data.commit_run(str(folder), {weights: blob}, "uid\tiid\tlabel\tscore\n", {"args": {}, **result})


def _cf_ckpt(tmp, what, llm=None):
    """runs/toy/mf holding a CF checkpoint that is damaged, foreign, unsealed or mixed; or a CoLLM step 1 that is."""
    path = str(tmp / "toy" / "mf" / "cf.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    toy = data.make_toy()
    if what == "garbage":
        open(path, "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    else:
        shape = (toy.n_users, toy.n_items) if what.startswith(("stage1", "mixed")) else (5, 5)
        cf.save_cf(path, cf.MF(*shape, 4), {"dataset": "ml-1m" if what == "other data" else "toy"})
    if what != "unsealed":
        _seal(os.path.dirname(path), "cf.safetensors")
    if what == "mixed":  # another run's weights over a finished run's
        cf.save_cf(path, cf.MF(toy.n_users, toy.n_items, 8), {"dataset": "toy"})
    if not what.startswith("stage1"):
        return ["--method", "cora"]
    lora = tmp / "toy" / "tallrec" / "trainable.safetensors"  # CoLLM's step 1, a TALLRec LoRA
    os.makedirs(lora.parent, exist_ok=True)
    save_file({"lora.A.0": torch.zeros(8, 64)}, str(lora))
    args = dict(r=4 if what == "stage1 settings" else 8, alpha=16.0, lora_targets="q,v")
    _seal(lora.parent, "trainable.safetensors", args=args, llm_fingerprint=train.llm_fingerprint(llm) * (
        what != "stage1 other LLM"))
    if what == "stage1 truncated":
        lora.write_bytes(lora.read_bytes()[:-9])
    return ["--method", "collm"]


@functools.lru_cache
def _finished(llm):
    """One finished 2-step TALLRec run on the toy LLM, made once beside it; cases damage copies of it."""
    out = os.path.join(os.path.dirname(llm), "finished")
    train.main(train.cli().parse_args(["--method", "tallrec", "--out", out, "--llm", llm, "--max-steps", "2",
                                       "--threads", "1", "--train-limit", "64", "--valid-limit", "50",
                                       "--test-limit", "50"]))
    return os.path.join(out, "toy", "tallrec")


def _adapter(tmp, llm, what):
    """--eval-general on a copy of the finished run: damaged, unfinished or resealed around other weights; or on the
    run as it is with another --llm."""
    run, text = tmp / "run", tmp / "text.txt"
    shutil.copytree(_finished(llm), run)
    text.write_text(" ".join(data.prompts(data.make_toy(), "valid")[:30]))
    argv = ["--eval-general", "--general-text", str(text), "--adapter", str(run)]
    if what == "truncated":
        (run / "trainable.safetensors").write_bytes((run / "trainable.safetensors").read_bytes()[:-9])
    elif what == "unfinished":
        os.rename(run / "results.json", run / "state.safetensors")
    elif what == "other shapes":
        save_file({"lora.x": torch.zeros(3)}, str(run / "trainable.safetensors"))
        _seal(run, "trainable.safetensors", **{k: v for k, v in json.load(open(run / "results.json")).items()
                                               if k != "files"})
    elif what == "other LLM":
        argv += _broken_llm(tmp, llm, "other")
    return argv


_HELD = []  # lock files a case holds open while train.main runs


def _held_lock(tmp):
    """A second writer: this process holds runs/toy/tallrec/.lock as a running train.py would."""
    os.makedirs(tmp / "toy" / "tallrec")
    _HELD.append(open(tmp / "toy" / "tallrec" / ".lock", "a+"))
    fcntl.flock(_HELD[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
    return []


def _env(**variables):
    os.environ.update(variables)  # the test restores os.environ
    return []


def _file(path, text=""):
    path.write_text(text)
    return path


def _stale_checkpoint(t):
    """An unfinished run's checkpoint in the toy TALLRec folder (no arguments added)."""
    (t / "toy" / "tallrec").mkdir(parents=True)
    _file(t / "toy" / "tallrec" / "state.safetensors")
    return []


def _llm(what):
    return lambda t, l: _broken_llm(t, l, what)


def _cf(what):
    return lambda t, l: _cf_ckpt(t, what, l)


def _ad(what):
    return lambda t, l: _adapter(t, l, what)


# (id, setup(tmp, toy_llm) -> extra argv, error class, text the message must contain). SystemExit = argparse.
BAD_INPUTS = [
    ("unknown method", lambda t, l: ["--method", "bert4rec"], SystemExit, "--method"),
    ("unknown weight type", lambda t, l: ["--weight-types", "qq"], SystemExit, "--weight-types"),
    ("unknown dataset", lambda t, l: ["--data", "netflix"], SystemExit, "--data"),
    ("non-numeric lr", lambda t, l: ["--lr", "fast"], SystemExit, "--lr"),
    ("unknown LoRA target", lambda t, l: ["--lora-targets", "q,x"], SystemExit, "--lora-targets"),
    ("missing --llm folder", lambda t, l: ["--llm", str(t / "nowhere")], FileNotFoundError, "--llm"),
    ("batch larger than data", lambda t, l: ["--batch-size", "100000"], ValueError, "--batch-size 100000"),
    ("--out is a file", lambda t, l: ["--out", str(_file(t / "out"))], ValueError, "--out"),
    ("a fresh run over a checkpoint", lambda t, l: _stale_checkpoint(t), ValueError,
     "tallrec/state.safetensors is the checkpoint of an unfinished run: continue it with --resume"),
    ("--out below a file", lambda t, l: ["--out", str(_file(t / "out") / "runs")], ValueError, "--out"),
    ("no data folder", lambda t, l: ["--data", "ml-1m", "--data-root", str(t / "nowhere")], FileNotFoundError,
     "nowhere"),
    ("malformed TSV line", lambda t, l: _edit_tsv(t / "tsv", "train.tsv", _set_line(5, lambda f: "1\t2\t1")),
     ValueError, "train.tsv:5"),
    ("unknown item id", lambda t, l: _edit_tsv(t / "tsv", "train.tsv",
                                              _set_line(7, lambda f: "\t".join(f[:1] + ["9999"] + f[2:]))),
     ValueError, "train.tsv:7"),
    ("absurd user id", lambda t, l: _edit_tsv(t / "tsv", "train.tsv",
                                              _set_line(6, lambda f: "\t".join(["9" * 16] + f[1:]))),
     ValueError, "train.tsv:6: uid 9999999999999999 is implausibly large"),
    ("duplicate row in a split", lambda t, l: _edit_tsv(t / "tsv", "test.tsv", lambda lines: lines + lines[3:4]),
     ValueError, "is line 4 again"),
    ("missing title", lambda t, l: _edit_tsv(t / "tsv", "items.tsv", _set_line(3, lambda f: f[0] + "\t ")),
     ValueError, "items.tsv:3"),
    ("empty split", lambda t, l: _edit_tsv(t / "tsv", "test.tsv", lambda lines: lines[:1]), ValueError, "test.tsv"),
    ("one-class valid split", lambda t, l: _edit_tsv(t / "tsv", "valid.tsv", lambda lines: _only_label(lines, "1")),
     ValueError, "valid split"),
    ("truncated weights", _llm("truncated"), CheckpointError, "model.safetensors"),
    ("header claims more bytes", _llm("header lies"), CheckpointError, "model.safetensors"),
    ("config disagrees with tensors", _llm("config sizes"), CheckpointError, "config.json"),
    ("config value of the wrong type", _llm("config type"), CheckpointError,
     "config.json: hidden_size is '64', expected an integer"),
    ("config value of the wrong sign", _llm("config sign"), CheckpointError, "config.json: num_hidden_layers is -2"),
    ("config of another architecture", _llm("gemma"), CheckpointError,
     "model_type 'gemma' is not a LLaMA; supported: llama, mistral"),
    ("integer weights", _llm("integer"), CheckpointError, "model.norm.weight is I8 (1 of"),
    ("float8 weights", _llm("float8"), CheckpointError, "is F8_E4M3 (1 of 20 weights are not float): float8"),
    ("NaN weights", _llm("nan"), CheckpointError, "model.norm.weight holds NaN"),
    ("prompts longer than the LLM's positions", _llm("short positions"), ValueError, "the longest train prompt has"),
    ("prompts longer than a mistral sliding window", _llm("mistral window"), ValueError, "more than the 16 positions"),
    ("tokenizer larger than embedding", _llm("tokenizer vocab"), CheckpointError, "tokenizer.model"),
    ("corrupt tokenizer", _llm("tokenizer garbage"), CheckpointError, "tokenizer.model"),
    ("corrupt tokenizer_config.json", _llm("tokenizer_config.json"), CheckpointError,
     "tokenizer_config.json: not valid JSON"),
    ("corrupt shard index", _llm("shard index"), CheckpointError, "model.safetensors.index.json: not valid JSON"),
    ("corrupt CF checkpoint", _cf("garbage"), ValueError, "mf/cf.safetensors"),
    ("CF checkpoint of another dataset", _cf("other data"), ValueError, "'ml-1m'"),
    ("CF checkpoint of other ids", _cf("other ids"), ValueError, "has tables of 5 users"),
    ("CF checkpoint without its results", _cf("unsealed"), ValueError, "mf holds no finished run"),
    ("CF folder mixing two runs", _cf("mixed"), ValueError, "mf/cf.safetensors is not the file"),
    ("truncated CoLLM step-1 LoRA", _cf("stage1 truncated"), ValueError,
     "tallrec/trainable.safetensors is not the file"),
    ("CoLLM step 1 on another LLM", _cf("stage1 other LLM"), ValueError, "on another LLM"),
    ("CoLLM step 1 with another rank", _cf("stage1 settings"), ValueError, "'r': (4, 8)"),
    ("CoLLM step 1 of other tensors", _cf("stage1 shapes"), ValueError, "does not fit"),
    ("--adapter truncated", _ad("truncated"), ValueError, "trainable.safetensors is not the"),
    ("--adapter unfinished", _ad("unfinished"), ValueError, "run holds no finished run"),
    ("--adapter of other tensors", _ad("other shapes"), ValueError, "does not fit tallrec"),
    ("--adapter trained on another LLM", _ad("other LLM"), ValueError, "not on --llm"),
    ("empty --general-text", lambda t, l: ["--eval-general", "--general-text", str(_file(t / "empty.txt"))],
     ValueError, "empty.txt: 0 tokens, too short"),
    ("--resume without a checkpoint", lambda t, l: ["--resume"], FileNotFoundError, "state.safetensors"),
    ("--resume a truncated checkpoint", lambda t, l: _state(t, "truncated"), CheckpointError, "state.safetensors"),
    ("--resume another run's checkpoint", lambda t, l: _state(t, "other run"), ValueError, "'lr': (0.5, 0.001)"),
    ("a second run into a locked folder", lambda t, l: _held_lock(t), ValueError,
     "toy/tallrec is in use by another run"),
    ("torchrun variables without torchrun", lambda t, l: _env(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1"),
     ValueError, "WORLD_SIZE=2 RANK=0 MASTER_ADDR=127.0.0.1 in the environment, but no torchrun"),
]
OUT_OF_RANGE = [("--batch-size", "-1"), ("--epochs", "-1"), ("--patience", "0"), ("--eval-every", "0"), ("--r", "0"),
                ("--alpha", "0"), ("--threads", "0"), ("--train-limit", "-1"), ("--seed", "-1"), ("--seeds", "0"),
                ("--n-queries", "0"), ("--n-blocks", "0"), ("--ffn-dim", "0"), ("--accum", "0"), ("--pairs", "0"),
                ("--max-steps", "-1"), ("--max-minutes", "-1"), ("--ckpt-every", "-1"), ("--lr", "0"), ("--wd", "-1"),
                ("--warmup", "-1"), ("--clip", "-1"), ("--lr", "nan"), ("--lora-dropout", "1"), ("--dim", "0"),
                ("--eval-batch-size", "0"), ("--init-std", "0"), ("--min-lr", "-1"), ("--warmup-lr", "inf")]
BAD_INPUTS += [(f"{flag} {value}", lambda t, l, a=(flag, value): list(a), SystemExit, f"argument {flag}: '{value}' is "
                f"out of range") for flag, value in OUT_OF_RANGE]
BAD_INPUTS += [("no end to training", lambda t, l: ["--max-steps", "0", "--epochs", "0"], ValueError, "sets no end"),
               ("CF model for 0 epochs", lambda t, l: ["--method", "mf", "--epochs", "0"], ValueError, "--epochs 0")]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_one_clear_error_nothing_left_behind(tmp_path, toy_llm, capsys, case):
    """One clear error before any work: its class, a one-line message naming the argument or file, exit code 2
    from argparse; and every file already there (finished runs included) untouched, no new results, weights,
    predictions or temporary file."""
    _, setup, error, text = case
    argv = ["--method", "tallrec", "--out", str(tmp_path), "--llm", toy_llm, "--max-steps", "2", "--threads", "1"]
    with mock.patch.dict(os.environ):
        try:
            argv += setup(tmp_path, toy_llm)
            before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
            with pytest.raises(error) as e:
                train.main(train.cli().parse_args(argv))
        finally:
            while _HELD:
                _HELD.pop().close()
    message = capsys.readouterr().err.strip().splitlines()[-1] if error is SystemExit else str(e.value)
    assert text in message and "Traceback" not in message, message
    assert error is not SystemExit or e.value.code == 2 and message.startswith("train.py: error: argument")
    after = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert all(p.read_bytes() == blob for p, blob in before.items()), "a file that was there has changed"
    assert not [p for p in after - set(before) if p.name != ".lock"], after - set(before)


def test_nonfinite_loss_stops_with_step_and_checkpoint(tmp_path, toy_llm, capsys):
    """lr 1e30 blows the LoRA up after one step: the run stops at step 2 naming the last good checkpoint."""
    argv = ["--method", "tallrec", "--out", str(tmp_path), "--llm", toy_llm, "--max-steps", "6", "--lr", "1e30",
            "--warmup", "0", "--ckpt-every", "1", "--eval-every", "100", "--threads", "1", "--train-limit", "64"]
    with pytest.raises(FloatingPointError) as e:
        train.main(train.cli().parse_args(argv))
    state = tmp_path / "toy" / "tallrec" / "state.safetensors"
    assert "step 2: non-finite" in str(e.value) and str(state) in str(e.value) and state.exists()
    with pytest.raises(FloatingPointError, match="10 steps in a row"):
        train.main(train.cli().parse_args(argv + ["--skip-nonfinite", "--resume"]))  # from the good step-1 state


def test_method_all_runs_every_method_and_writes_one_table(tmp_path, toy_llm):
    common = ("--llm", toy_llm, "--max-steps", "2", "--eval-every", "2", "--batch-size", "16", "--train-limit", "64",
              "--valid-limit", "64", "--test-limit", "64")
    _train(tmp_path, "--method", "all", "--ablation", "text", *common)
    summary = json.load(open(tmp_path / "toy" / "all.json"))
    llm_runs = ["tallrec", "collm", "cora-qkvo"]
    assert list(summary["rows"]) == ["mf", "lightgcn", *llm_runs, *(f"{r}-id-only" for r in llm_runs)]
    table = (tmp_path / "toy" / "all.md").read_text()
    names = ("MF", "LightGCN", "TALLRec", "CoLLM-MF", "CoRA-MF", "CoRA-MF (ID-only)")
    assert all(f"| {name} |" in table for name in names)
    for name, (row,) in summary["rows"].items():  # every row is that run's own results.json
        own = json.load(open(tmp_path / "toy" / name / "results.json"))
        assert row["test"] == own["test"] and row["peak_memory_mb"] > 0 and row["trainable_params"] > 0
    assert json.load(open(tmp_path / "toy" / "mf" / "results.json"))["args"]["batch_size"] == 256  # CF: tuned config
    # Table 4 in one command; --reuse keeps the finished cora-qkvo run and trains the other weight types
    qkvo = tmp_path / "toy" / "cora-qkvo" / "results.json"
    before = qkvo.stat().st_mtime_ns
    log = _train(tmp_path, "--method", "all", "--ablation", "weights", "--reuse", *common)
    assert qkvo.stat().st_mtime_ns == before and f"--reuse: {qkvo} was run with these arguments" in log
    same = ["--method", "cora", "--out", str(tmp_path), *common]
    assert train.finished_with(str(qkvo), train.cli().parse_args(same + ["--threads", "2"]))
    assert not train.finished_with(str(qkvo), train.cli().parse_args(same + ["--lr", "0.5"]))
    rows = json.load(open(tmp_path / "toy" / "all.json"))["rows"]
    assert list(rows) == ["cora-qk", "cora-qkv", "cora-qko", "cora-qkvo", "cora-qkvof"]
    assert rows["cora-qk"][0]["trainable_params"] < rows["cora-qkvof"][0]["trainable_params"]
    table = (tmp_path / "toy" / "all.md").read_text()
    assert "| CoRA-MF (qkvof) |" in table and "| AUC - CoRA-MF (paired SE) |" in table
    assert re.search(r"\| CoRA-MF \|( [^|]+ \|){4} reference \|", table) and table.count(" reference |") == 1, table
    deltas = json.load(open(tmp_path / "toy" / "all.json"))["auc_minus_cora_paired_se"]
    assert deltas["cora-qkvo"] == [0.0, 0.0] and set(deltas) == set(rows)  # all scored the same 64 test rows
    pred = {n: np.loadtxt(tmp_path / "toy" / n / "predictions.tsv", skiprows=1) for n in ("cora-qk", "cora-qkvo")}
    assert deltas["cora-qk"][0] == pytest.approx(cf.auc(pred["cora-qk"][:, 2], pred["cora-qk"][:, 3]) -
                                                 cf.auc(pred["cora-qkvo"][:, 2], pred["cora-qkvo"][:, 3]))
    # a run cut short by --max-minutes keeps its checkpoint: --reuse --resume trains it on and keeps the others
    cut = train.main(train.cli().parse_args(same + ["--weight-types", "qk", "--max-minutes", "1e-9"]))
    qk = tmp_path / "toy" / "cora-qk"
    assert (cut["steps"], cut["stopped_by"]) == (1, "--max-minutes 1e-09") and (qk / "state.safetensors").exists()
    log = _train(tmp_path, "--method", "all", "--ablation", "weights", "--reuse", "--resume", *common)
    assert f"resumed from {qk / 'state.safetensors'} at step 1" in log and log.count("--reuse: ") == 4, log[-3000:]
    done = json.load(open(qk / "results.json"))
    assert (done["steps"], done["stopped_by"]) == (2, "step limit") and not (qk / "state.safetensors").exists()
    test = lambda a: {"auc": a, "uauc": a, "warm_auc": a, "cold_auc": None}
    fake = {"mf": [{"test": test(a), "wall_time_s": 1.0, "best_epoch": 3, "epochs_run": 9, "trainable_params": 5,
                    "peak_memory_mb": 1.0} for a in (0.6, 0.7)],
            "cora-qkvo": [{"test": test(0.7), "wall_time_s": 5 * 3600.0, "steps": 3200, "trainable_params": 7,
                           "stopped_by": "--max-minutes 300"}]}
    table = train.comparison_table("ml-1m", fake)
    assert ("| MF | 0.6500 ± 0.0500 | 0.6500 ± 0.0500 | 0.6500 ± 0.0500 | - | - | 0.6486 / 0.6396 | "
            "best epoch 3 of 9 | 1 s | 5 | 1 MB |" in table)
    assert ("| CoRA-MF | 0.7000 | 0.7000 | 0.7000 | - | - | 0.7361 / 0.6884 | 3,200 steps, --max-minutes 300 | 5.0 h "
            "| 7 | - |" in table)


def test_torchrun_two_gloo_processes_equal_one_process(tmp_path, toy_llm):
    """DDP over the trainable parameters (gloo, CPU): 2 processes x 8 rows = 1 process x 16 rows, step for step."""
    argv = ["--method", "tallrec", "--llm", toy_llm, "--max-steps", "6", "--eval-every", "3", "--batch-size", "16",
            "--train-limit", "160", "--valid-limit", "100", "--test-limit", "100", "--lora-dropout", "0",
            "--warmup", "2", "--threads", "1", "--dtype", "fp32"]  # bf16 rounding depends on the batch's split
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    train_py = os.path.join(HERE, "train.py")
    for cmd in ([sys.executable, train_py, "--out", str(tmp_path / "one"), *argv],
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", train_py,
                 "--out", str(tmp_path / "two"), *argv]):
        p = subprocess.run(cmd, env=env, cwd=HERE, capture_output=True, text=True)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = {k: json.load(open(tmp_path / k / "toy" / "tallrec" / "results.json")) for k in ("one", "two")}
    assert res["two"]["processes"] == 2 and res["one"]["processes"] == 1 and res["two"]["steps"] == 6
    pred = {k: np.loadtxt(tmp_path / k / "toy" / "tallrec" / "predictions.tsv", skiprows=1) for k in ("one", "two")}
    assert np.array_equal(pred["one"][:, :3], pred["two"][:, :3])
    assert np.abs(pred["one"][:, 3] - pred["two"][:, 3]).max() < 1e-4
    assert abs(res["one"]["test"]["auc"] - res["two"]["test"]["auc"]) < 1e-3
    lora = load_file(tmp_path / "two" / "toy" / "tallrec" / "trainable.safetensors")
    assert max(v.abs().max().item() for k, v in lora.items() if ".B." in k) > 1e-4  # it trained: not a trivial match
    # --max-minutes under DDP: rank 0's clock ends training on both ranks at the same step (no rank left waiting)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        train_py, "--out", str(tmp_path / "timed"), *argv, "--max-steps", "200", "--max-minutes",
                        "0.002"], env=env, cwd=HERE, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.load(open(tmp_path / "timed" / "toy" / "tallrec" / "results.json"))
    assert res["stopped_by"] == "--max-minutes 0.002" and 0 < res["steps"] < 200


def test_general_ability_scores_match_naive_and_zero_lora_changes_nothing(toy_llm):
    model, tok = llama.load(toy_llm)
    text = " ".join(data.prompts(data.make_toy(), "test")[:40])
    ppl = train.perplexity(model, tok, text, window=64, max_tokens=256, batch=3)
    ids = torch.tensor(tok.encode(text, bos=False)[:257])
    naive = [F.cross_entropy(model(ids[i:i + 64][None])[0], ids[i + 1:i + 65]).item() for i in range(0, 256, 64)]
    assert math.isfinite(ppl) and abs(ppl - math.exp(np.mean(naive))) < 1e-3 * ppl
    prompts, answers = ["The Haunted", "#Question: A user"], [" Harbor (1987)", " has"]
    lp = train.answer_logprob(model, tok, prompts, answers)
    mean = train.answer_logprob(model, tok, prompts, answers, per_token=True)
    for p, a, got, got_mean in zip(prompts, answers, lp, mean):
        head, full = tok.encode(p), tok.encode(p + a)
        logp = model(torch.tensor([full])).log_softmax(-1)[0]
        want = sum(logp[t - 1, full[t]].item() for t in range(len(head), len(full)))
        assert abs(got.item() - want) < 1e-4 and abs(got_mean.item() - want / (len(full) - len(head))) < 1e-4
    lora = collm.LoRA(model.args, r=4, alpha=8, targets=("q", "v", "down")).deltas()  # B = 0: the base LLM exactly
    assert train.perplexity(model, tok, text, window=64, max_tokens=256, batch=3, deltas=lora) == ppl
    assert torch.equal(train.answer_logprob(model, tok, prompts, answers, deltas=lora), lp)


@pytest.mark.skipif(not os.path.isfile(os.path.join(SMOL, "model.safetensors")), reason=f"no SmolLM2 in {SMOL}")
def test_smollm2_cloze_accuracy_clearly_above_chance():
    model, tok = llama.load(SMOL)
    rows = [l.rstrip("\n").split("\t") for l in open(train.CLOZE, encoding="utf-8")][1:]
    assert len(rows) >= 50 and all(len(r) == 3 and r[1] != r[2] for r in rows)
    p, right, wrong = zip(*rows)
    acc = (train.answer_logprob(model, tok, p, right) > train.answer_logprob(model, tok, p, wrong)).float().mean()
    assert acc > 0.85, acc  # 63 of 65 measured


def test_eval_general_rebuilds_trained_runs(tmp_path, toy_llm, capsys):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(data.prompts(data.make_toy(), "valid")[:30]))
    base = ["--out", str(tmp_path), "--llm", toy_llm, "--threads", "1"]
    for method in ("tallrec", "cora"):
        train.main(train.cli().parse_args(base + ["--method", method, "--max-steps", "3", "--eval-every", "3",
                                                  "--train-limit", "64", "--valid-limit", "50", "--test-limit", "50"]))
    runs = [str(tmp_path / "toy" / r) for r in ("tallrec", "cora-qkvo")]
    res = train.main(train.cli().parse_args(base + ["--eval-general", "--general-text", str(text), "--adapter", *runs]))
    assert list(res) == ["base LLM", *runs] and all(math.isfinite(v["perplexity"]) for v in res.values())
    assert res[runs[0]]["perplexity"] != res["base LLM"]["perplexity"] != res[runs[1]]["perplexity"]
    assert "| base LLM |" in capsys.readouterr().out


def test_generate_with_embeds_and_deltas_matches_step_by_step(toy_llm):
    model, tok = llama.load(toy_llm)
    ids = torch.tensor([tok.encode("#Question: A user has given high ratings")])
    assert torch.equal(model.generate(ids, 6, embeds=model.embed_tokens(ids)), model.generate(ids, 6))
    torch.manual_seed(0)
    deltas = {(l, p): (torch.randn(1, 4, 64) * 0.3, torch.randn(1, *llama.proj_dims(model.args)[p][:1], 4) * 0.3)
              for l in range(2) for p in ("q", "o")}  # one example's per-example factors
    want = ids
    for _ in range(6):
        want = torch.cat((want, model(want, deltas=deltas)[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(model.generate(ids, 6, deltas=deltas), want) and not torch.equal(want, model.generate(ids, 6))


def test_generate_semantic_disruption_end_to_end(tmp_path, toy_llm, capsys):
    base = ["--out", str(tmp_path), "--llm", toy_llm, "--threads", "1"]
    for method in ("collm", "cora"):  # collm trains its TALLRec step 1 first
        train.main(train.cli().parse_args(base + ["--method", method, "--max-steps", "3", "--eval-every", "3",
                                                  "--train-limit", "64", "--valid-limit", "50", "--test-limit", "50"]))
    runs = [str(tmp_path / "toy" / r) for r in ("collm", "cora-qkvo")]
    args = train.cli().parse_args(base + ["--generate", "--pairs", "3", "--adapter", *runs])
    ppl, examples = train.semantic_disruption(args, max_new_tokens=5)
    assert list(ppl) == ["base LLM", "base LLM, CoLLM's prompt", *runs] and len(examples) == 3
    assert all(len(t) == 4 for _, t in examples)
    empty = [sum(not t[k].strip() for _, t in examples) for k in range(4)]  # an empty answer: no perplexity, counted
    out = capsys.readouterr().out
    for k, (name, p) in enumerate(ppl.items()):
        assert f"| {name} | {p:.2f} | {empty[k]} of 3 |" in out, out
