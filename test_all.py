"""
test_all.py: the specification. Differential tests against independent naive references written here
(explicit per-head loops, per-example materialised weights) and golden values from ../shared.
Large init scale (std ~0.3) so that layout bugs show. Run: python -m pytest -q test_all.py
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import llama
from llama import CheckpointError, Llama, ModelArgs, Tokenizer, load_llama, save_llama

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("CORA_SHARED", os.path.join(HERE, "..", "shared"))
SMOL = os.environ.get("CORA_SMOLLM2", os.path.expanduser("~/.cache/cora-ref/smollm2-135m"))
torch.set_num_threads(2)


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


# ----------------------------------------------------------------------------- llama.py

def test_llama_matches_naive_reference():
    m = random_llama(tiny_args())
    tokens = [3, 17, 42, 5, 60, 1, 9]
    ref = naive_logits(m, tokens)
    out = m(torch.tensor([tokens]))[0]
    assert ref.abs().max() > 1  # large init: a layout bug would show
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(m(torch.tensor([tokens]), last_only=True)[0], ref[-1], atol=1e-4, rtol=0)
    ids = torch.tensor([5, 7])
    torch.testing.assert_close(m(torch.tensor([tokens]), last_only=True, token_ids=ids)[0], ref[-1, ids], atol=1e-4, rtol=0)


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


def test_smollm2_golden_logits_and_greedy():
    folder, g = smollm2()
    m = load_llama(folder)
    with torch.no_grad():
        batch = m(g["tokens"], g["attention_mask"], last_only=True)
        torch.testing.assert_close(batch, g["last_logits"], atol=1e-4, rtol=0)
        for i in range(len(g["tokens"])):
            n = int(g["attention_mask"][i].sum())
            alone = m(g["tokens"][i:i + 1, -n:], last_only=True)[0]
            torch.testing.assert_close(alone, g["last_logits"][i], atol=1e-4, rtol=0)
    out = m.generate(g["greedy_prompt"][None], 20)[0, len(g["greedy_prompt"]):]
    assert out.tolist() == g["greedy_continuation"].tolist()
    tok = Tokenizer(folder)
    assert tok.encode("The movie Toy Story (1995) is about") == g["greedy_prompt"].tolist()
    assert tok.encode(" Yes") == [9230] and tok.encode(" No") == [2838]


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


def _corrupt(tmp, what):
    m = random_llama(tiny_args(), dtype=torch.float32)
    folder = write_folder(tmp, m)
    st, cfg = os.path.join(folder, "model.safetensors"), os.path.join(folder, "config.json")
    c = json.load(open(cfg))
    if what == "missing file":
        os.remove(st)
    elif what == "truncated":
        data = open(st, "rb").read()
        open(st, "wb").write(data[: len(data) // 2])
    elif what == "header lies":  # a header claiming more bytes than the file holds
        data = bytearray(open(st, "rb").read())
        data[:8] = (len(data) * 2).to_bytes(8, "little")
        open(st, "wb").write(bytes(data))
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


@pytest.mark.parametrize("what", ["missing file", "truncated", "header lies", "missing key", "wrong shape", "rope scaling"])
def test_bad_checkpoints_raise_one_clear_error(tmp_path, what):
    folder, named = _corrupt(tmp_path, what)
    with pytest.raises(CheckpointError) as e:
        load_llama(folder)
    assert str(named) in str(e.value) and str(folder) in str(e.value)


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        Tokenizer(str(tmp_path))
