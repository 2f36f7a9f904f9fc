"""Bytes autograd saves for backward in one micro-batch of the LLaVA forward that src/model/{clip,llama,llava}.rs
run, measured by PyTorch itself (torch.autograd.graph.saved_tensors_hooks), by part: the oracle for the
activation term of src/memplan/mod.rs.

The forward below repeats the Rust code op for op (same tensor ops, same order, same dtypes): CLIP tower up to
the feature layer, projector, embedding splice, LLaMA decoder (RMSNorm in fp32, RoPE, GQA repeat, SDPA with a
boolean mask), final norm and log-probs at response positions only, in chunks, fp32 log_softmax. Every
parameter requires grad (full fine-tuning). A saved storage is counted once, in the part whose forward saved it
first; parameters are not counted.

stdin: a list of {"config": <config.json of the model>, "dtype": "fp32"|"bf16", "shared": bool, "pairs": B,
        "prompt": P, "response": R}  (every response R tokens; the prompt holds the visual tokens first)
stdout: a list of {"vision": bytes, "projector": bytes, "language_model": bytes, "logits": bytes}
"""
import json
import sys

import torch
import torch.nn.functional as F

CHUNK = 1024  # llava::LOGPROB_CHUNK


class Counter:
    def __init__(self):
        self.part = None
        self.params = set()
        self.seen = set()
        self.bytes = {"vision": 0, "projector": 0, "language_model": 0, "logits": 0}

    def pack(self, t):
        s = t.untyped_storage()
        key = s.data_ptr()
        if key not in self.params and key not in self.seen:
            self.seen.add(key)
            self.bytes[self.part] += s.nbytes()
        return t


def saved_bytes(req):
    cfg, tc, vc = req["config"], req["config"]["text_config"], req["config"]["vision_config"]
    kind = torch.float32 if req["dtype"] == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    counter = Counter()
    params = []

    def param(*shape):
        p = (torch.randn(*shape) * 0.02).to(kind).requires_grad_(True)
        params.append(p)
        return p

    # Variables, shaped as Llava::new makes them.
    dv, iv, hv = vc["hidden_size"], vc["intermediate_size"], vc["num_attention_heads"]
    patch, img = vc["patch_size"], vc["image_size"]
    n_pos = (img // patch) ** 2 + 1
    V = dict(cls=param(dv), patch=param(dv, 3, patch, patch), pos=param(n_pos, dv),
             pre_w=param(dv), pre_b=param(dv))
    n_vis = vc["num_hidden_layers"]
    fl = cfg["vision_feature_layer"]
    feature_layer = n_vis + 1 + fl if fl < 0 else fl
    vlayers = [dict(l1w=param(dv), l1b=param(dv), q=param(dv, dv), qb=param(dv), k=param(dv, dv),
                    kb=param(dv), v=param(dv, dv), vb=param(dv), o=param(dv, dv), ob=param(dv),
                    l2w=param(dv), l2b=param(dv), f1=param(iv, dv), f1b=param(iv), f2=param(dv, iv),
                    f2b=param(dv)) for _ in range(feature_layer)]
    D, I, H = tc["hidden_size"], tc["intermediate_size"], tc["num_attention_heads"]
    K = tc.get("num_key_value_heads") or H
    hd, vocab = D // H, tc["vocab_size"]
    P1, P1b, P2, P2b = param(D, dv), param(D), param(D, D), param(D)
    embed = param(vocab, D)
    layers = [dict(n1=param(D), q=param(H * hd, D), k=param(K * hd, D), v=param(K * hd, D),
                   o=param(D, H * hd), n2=param(D), g=param(I, D), u=param(I, D), dn=param(D, I))
              for _ in range(tc["num_hidden_layers"])]
    norm, head = param(D), param(vocab, D)
    counter.params = {p.untyped_storage().data_ptr() for p in params}

    # One micro-batch: B pairs, every prompt P tokens (visual tokens first), every response R tokens.
    B, P, R = req["pairs"], req["prompt"], req["response"]
    n_img = (img // patch) ** 2 + (1 if cfg["vision_feature_select_strategy"] == "full" else 0)
    image_id = cfg["image_token_index"]
    g = torch.Generator().manual_seed(1)
    text = lambda n: torch.randint(0, min(image_id, vocab), (n,), generator=g)
    prompts = [torch.cat([torch.full((n_img,), image_id), text(P - n_img)]) for _ in range(B)]
    chosen = [text(R) for _ in range(B)]
    rejected = [text(R) for _ in range(B)]
    pixels = torch.randn(B, 3, img, img)

    def rms(x, w):
        k = x.dtype
        xf = x.to(torch.float32)
        var = xf.pow(2).mean(-1, keepdim=True)
        return w * (xf * (var + tc.get("rms_norm_eps", 1e-5)).rsqrt()).to(k)

    def rot(x):
        h = x.shape[-1] // 2
        return torch.cat([-x[..., h:], x[..., :h]], -1)

    def quick_gelu(x):
        return x * (x * 1.702).sigmoid()

    act = {"quick_gelu": quick_gelu, "gelu": lambda x: F.gelu(x)}

    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        # clip.rs: ClipVision::hidden_states up to the feature layer.
        counter.part = "vision"
        pv = pixels.to(V["cls"].dtype)
        x = F.conv2d(pv, V["patch"], stride=patch).flatten(2, -1).transpose(1, 2)
        cls = V["cls"].view(1, 1, -1).expand(B, 1, -1).to(x.dtype)
        x = torch.cat([cls, x], 1)
        pos = F.embedding(torch.arange(x.shape[1]), V["pos"])
        x = F.layer_norm(x + pos.unsqueeze(0), (dv,), V["pre_w"], V["pre_b"], vc.get("layer_norm_eps", 1e-5))
        for L in vlayers:
            b, t, d = x.shape
            a = F.layer_norm(x, (d,), L["l1w"], L["l1b"], vc.get("layer_norm_eps", 1e-5))
            sp = lambda y: y.view(b, t, hv, d // hv).transpose(1, 2)
            q, k, v = (sp(F.linear(a, L[w], L[w + "b"])) for w in "qkv")
            y = F.scaled_dot_product_attention(q, k, v)
            x = x + F.linear(y.transpose(1, 2).contiguous().view(b, t, d), L["o"], L["ob"])
            f = F.linear(F.layer_norm(x, (d,), L["l2w"], L["l2b"], vc.get("layer_norm_eps", 1e-5)), L["f1"], L["f1b"])
            x = x + F.linear(act[vc.get("hidden_act", "quick_gelu")](f), L["f2"], L["f2b"])
        # llava.rs: image_features.
        counter.part = "projector"
        f = x
        if cfg["vision_feature_select_strategy"] == "default":
            f = f.narrow(1, 1, f.shape[1] - 1)
        feats = F.linear(act[cfg["projector_hidden_act"]](F.linear(f, P1, P1b)), P2, P2b).flatten(0, 1)

        counter.part = "language_model"
        if req["shared"]:
            # collate.rs Packed: [prompt | chosen | rejected], rejected numbered from the prompt's end.
            ids = torch.stack([torch.cat([p, c, r]) for p, c, r in zip(prompts, chosen, rejected)])
            Lr = ids.shape[1]
            segments = torch.tensor([0] * P + [1] * R + [2] * R).repeat(B, 1)
            positions = torch.tensor(list(range(P)) + list(range(P, P + R)) * 2).repeat(B, 1)
            pred, targets = [], []
            for i in range(B):
                base = i * Lr
                for toks, at in ((chosen[i], P), (rejected[i], P + R)):
                    for kk in range(R):
                        pred.append(base + (P - 1 if kk == 0 else at + kk - 1))
                        targets.append(int(toks[kk]))
            pred, targets = torch.tensor(pred), torch.tensor(targets)
            image_rows = None
        else:
            # [chosen; rejected] rows, right-padded (all the same length here).
            ids = torch.stack([torch.cat([p, c]) for p, c in zip(prompts, chosen)]
                              + [torch.cat([p, r]) for p, r in zip(prompts, rejected)])
            Lr = ids.shape[1]
            labels = torch.full_like(ids, -100)
            labels[:, P:] = ids[:, P:]
            image_rows = torch.arange(2 * B) % B
        rows = ids.shape[0]
        # llava.rs: embed.
        embeds = F.embedding(ids, embed)
        fe = feats.to(embeds.dtype)
        if image_rows is not None:
            fe = fe.view(-1, n_img, fe.shape[1]).index_select(0, image_rows).flatten(0, 1)
        is_image = ids.eq(image_id)
        mask_img = is_image.unsqueeze(-1).expand_as(embeds)
        x = embeds.masked_scatter(mask_img, fe)
        # llama.rs: rotary tables and masks.
        exps = torch.arange(0, hd, 2).to(torch.float32) / hd
        inv = torch.tensor(float(tc.get("rope_theta", 10000.0))).pow(exps).reciprocal()
        fr = torch.arange(Lr).to(torch.float32).unsqueeze(1) * inv.unsqueeze(0)
        emb = torch.cat([fr, fr], -1)
        cos = emb.cos().to(x.dtype).view(1, 1, Lr, hd)
        sin = emb.sin().to(x.dtype).view(1, 1, Lr, hd)
        if req["shared"]:
            at = lambda tb: tb.view(Lr, hd).index_select(0, positions.reshape(-1)).view(rows, 1, Lr, hd)
            cos, sin = at(cos), at(sin)
            causal = torch.ones(Lr, Lr, dtype=torch.bool).tril().view(1, 1, Lr, Lr)
            qs, ks = segments.view(rows, 1, Lr, 1), segments.view(rows, 1, 1, Lr)
            visible = ks.eq(0).logical_or(ks.eq(qs))
            mask = causal.logical_and(visible).logical_and(ks.ne(3))
        else:
            causal = torch.ones(Lr, Lr, dtype=torch.bool).tril()
            keys = torch.ones(rows, Lr, dtype=torch.bool).view(rows, 1, 1, Lr)
            mask = causal.view(1, 1, Lr, Lr).logical_and(keys)
            mask = mask.logical_or(torch.eye(Lr, dtype=torch.bool).view(1, 1, Lr, Lr))
        for L in layers:
            h = rms(x, L["n1"])
            q = F.linear(h, L["q"]).view(rows, Lr, H, hd).transpose(1, 2)
            k = F.linear(h, L["k"]).view(rows, Lr, K, hd).transpose(1, 2)
            v = F.linear(h, L["v"]).view(rows, Lr, K, hd).transpose(1, 2)
            q = q * cos + rot(q) * sin
            k = k * cos + rot(k) * sin
            if K != H:
                k, v = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + F.linear(y.transpose(1, 2).contiguous().view(rows, Lr, H * hd), L["o"])
            h = rms(x, L["n2"])
            x = x + F.linear(F.silu(F.linear(h, L["g"])) * F.linear(h, L["u"]), L["dn"])
        hidden = rms(x, norm)

        # llava.rs: logps_at / response_logps (chunks of CHUNK positions).
        counter.part = "logits"
        flat = hidden.reshape(-1, D)
        if not req["shared"]:
            y = labels.reshape(-1)
            first = torch.arange(rows * Lr).remainder(Lr).eq(0)
            out = y.ne(-100).logical_and(first.logical_not()).nonzero().squeeze(1)
            pred, targets = out - 1, y.index_select(0, out)
        parts = []
        for s in range(0, pred.shape[0], CHUNK):
            n = min(CHUNK, pred.shape[0] - s)
            logits = F.linear(flat.index_select(0, pred.narrow(0, s, n)), head).to(torch.float32)
            lp = logits.log_softmax(-1, dtype=torch.float32)
            parts.append(lp.gather(1, targets.narrow(0, s, n).unsqueeze(1)).squeeze(1))
        total = torch.cat(parts).sum()
    total.backward()  # the graph is sound
    return counter.bytes


def main():
    json.dump([saved_bytes(r) for r in json.load(sys.stdin)], sys.stdout)


if __name__ == "__main__":
    main()
