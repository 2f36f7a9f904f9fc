"""Baseline for ddpo's training step: one DDPO step written the way the RLHF-V code does it, with transformers'
LlavaForConditionalGeneration (fp32, CPU, every parameter trained, torch.optim.AdamW; or on a GPU with
`--device cuda --bf16`: fp32 weights and optimizer under bf16 autocast, Hugging Face Trainer's `bf16=True`).
Prints one JSON line.

usage:
  ddpo_step_transformers.py --model DIR --inputs BATCH.safetensors [--iters 5] [--threads 2]
                            [--beta 0.5] [--gamma 5] [--score mean|sum] [--lr 5e-7] [--weight-decay 0]
                            [--max-grad-norm 1.0] [--model-labels] [--gradient-checkpointing]
                            [--device cpu|cuda] [--bf16]
  ddpo_step_transformers.py --model DIR --synthetic [--pairs 2] [--prompt 40] [--response 100]
                            [--rejected-shorter 10] [--seed 0] [--save-inputs BATCH.safetensors] [same options]
  ddpo_step_transformers.py --matmul-peak [--threads 2] [--model DIR] [--device cpu|cuda] [--bf16]

What is followed from RLHF-V's released code (github.com/thunlp/Muffin, commit 85d72b4):
- muffin/train/trainers.py `MuffinDPOTrainer.compute_loss`: chosen and rejected rows concatenated along the batch
  (`concatenated_input_ids/labels/attention_mask`), the images duplicated (`torch.cat([images, images], dim=0)`),
  ONE forward over the 2B rows; the per-token log-probs split back into chosen/rejected halves; the reference
  scores computed from cached per-token reference log-probs with the same weights (`compute_weighted_logp`);
  `dpo_loss` (sigmoid: -logsigmoid(beta * ((pi_w - pi_l) - (ref_w - ref_l)))), `losses.mean()`
  (+ SFT_weight * -mean(policy chosen), 0 by default, as here).
- muffin/train/trainers.py `forward_DPO` -> muffin/eval/muffin_inference_logp.py `get_batch_logps(...,
  return_per_token_logp=True)`: logits of the full model output at EVERY position (the LM head over all T
  positions), `labels[:, 1:]`, `logits[:, :-1]`, `log_softmax(-1)` over the whole vocabulary, gather.
- muffin/train/trainers.py `compute_weighted_logp`: weighted_mask = token_weight * (labels[:, 1:] != -100);
  score = sum(logp * weighted_mask) (`sum`) or that / sum(weighted_mask) (`mean`, `--dpo_use_average`).
- muffin/train/train_muffin.py `DataCollatorForDPODataset`: token weight = `dpo_token_weight` (gamma) on the
  changed tokens found by `get_diff_ids`, 1 elsewhere.
- The optimizer part is Hugging Face Trainer's: clip_grad_norm_(max_grad_norm = 1.0), AdamW (torch.optim.AdamW,
  betas (0.9, 0.999), eps 1e-8; script/train/ddpo_muffin_PATH.sh: lr 5e-7, weight_decay 0), zero_grad.
- Deviations, on purpose: fp32 on CPU (the scripts ran bf16 + FSDP + gradient checkpointing on GPUs;
  `--gradient-checkpointing` turns on the latter); the model is transformers' llava-hf model instead of Muffin's
  own LLaVA class (the same op layout: CLIP tower -> projector -> image features replace the image-token
  embeddings -> LLaMA -> lm_head over all positions); Muffin also passes `labels=` to the model, which makes
  the model compute a cross-entropy loss that the DPO trainer discards: off by default (a leaner baseline),
  `--model-labels` reproduces it. The log-softmax is taken in fp32 (`logits.float()`, a no-op here).

INPUT FORMAT (`--inputs`, a safetensors file; B pairs, T = longest row, H = W = vision image_size):
  input_ids       int64 (int32 accepted) [2B, T]  rows [chosen_0 .. chosen_{B-1}; rejected_0 .. rejected_{B-1}],
                  each row prompt ++ response, right-padded (pad id arbitrary: masked). The prompt holds the
                  image placeholder already expanded as transformers 4.57 expects: exactly
                  (image_size / patch_size)^2 = 576 consecutive `image_token_index` ids (strategy "default":
                  CLS dropped) per row, one image per row.
  attention_mask  int64 [2B, T]   1 on real tokens, 0 on padding.
  labels          int64 [2B, T]   the token id at response positions (answer + EOS), -100 elsewhere (prompt,
                                  image tokens, padding). NOT shifted (Hugging Face convention): the log-prob
                                  of the token labels[r, t] is log_softmax(logits[r, t - 1])[labels[r, t]], so
                                  position 0 is never a label.
  changed         float32 [2B, T] 1.0 where t is a response position inside a changed segment, else 0.
                                  Token weight w = 1 + (gamma - 1) * changed on label positions, 0 elsewhere.
  weights         float32 [2B, T] optional, instead of `changed`: the per-token weights themselves (gamma
                                  already applied; only label positions are used; --gamma then ignored).
  pixel_values    float32 [B, 3, H, W] pair i's preprocessed image; rows i and B+i share it (the script
                                  duplicates it: [px; px], as RLHF-V does).
  reference, one of:
  ref_logps       float32 [2B, T] per-token reference log-probs, aligned like `labels` (ref_logps[r, t] =
                                  log p_ref(labels[r, t] | image, ids[r, :t])), 0 off labels; weighted in the
                                  step with the same weights and score as the policy (RLHF-V's way). Preferred.
  ref_chosen_logp, ref_rejected_logp   float32 [B]  reference SCORES already weighted with the same gamma and
                                  score (mean/sum) as the run: S_ref = sum(w * l) [/ sum(w)].
  If both are present `ref_logps` is used and the scalars are checked against it (max |diff| reported).
  Extra tensors are ignored. Metadata (optional, strings): beta, gamma, score set defaults for the options.

--synthetic builds such a batch itself (shape of benches/forward.rs): per row BOS, `--prompt` random text ids
(drawn in [3, image_token_index)) with the 576 image ids inserted after the first half, then the response:
chosen = `--response` ids ending in EOS, rejected = chosen with 3 segments of 3-6 ids replaced and
`--rejected-shorter` ids fewer (so 1 + 40 + 576 + 100 = 717 and 707 tokens by default), `changed` from the
docs/algorithm.md rule (difflib on the response ids, min_match 3), pixel_values ~ N(0, 1), and `ref_logps` from one
untimed no-grad forward of the initial model (so step 1's loss is ln 2). `--save-inputs F` writes exactly that
batch in the format above (with `changed`, `ref_logps`, the scalar `ref_*_logp` for the run's gamma/score, and
beta/gamma/score as metadata) for the Rust side to load.

MEASUREMENT: one warm-up step, then --iters steps (each: forward, log-probs, loss, backward, clip, AdamW,
zero_grad). The policy moves every step, so `losses` (all steps, warm-up first) is a trajectory: step 1 (the
warm-up) is the loss at the initial weights, the number to compare with the Rust trainer on identical inputs
(ln 2 = 0.693147 when the reference log-probs are the initial model's own, as in --synthetic).
Peak RSS (getrusage maxrss) includes the model, gradients and AdamW state (and, with --synthetic, the untimed
no-grad reference forward). The machine may be shared: `steps_foreign_cores` gives, per step, how many cores
OTHER processes kept busy meanwhile (from /proc/stat minus this process's CPU time); steps with that well above
0 are contaminated. `achieved_gflops` = counted step FLOPs / median step time; share of peak = that / the
`--matmul-peak` 2048^3 number.
"""
import argparse
import difflib
import json
import math
import os
import resource
import statistics
import time

import torch


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def load_avg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------------------------
# Matmul peak and FLOP count
# ----------------------------------------------------------------------------------------------------------------

def cpu_busy_s():
    """Machine-wide busy CPU seconds (all processes) from /proc/stat, or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
    except (OSError, ValueError):
        return None


def own_cpu_s():
    t = os.times()
    return t.user + t.system


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(threads, shapes, reps=10, min_s=1.0, device=torch.device("cpu"), dtype=torch.float32):
    """torch.mm GFLOP/s per (m, k, n) in `dtype` on `device`: best and median over >= `reps` calls and >= `min_s`
    seconds, after 2 warm-ups, into a preallocated out (no allocation in the timed call)."""
    torch.set_num_threads(threads)
    res = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        c = torch.empty(m, n, device=device, dtype=dtype)
        for _ in range(2):
            torch.mm(a, b, out=c)
        sync(device)
        ts = []
        busy0, own0 = cpu_busy_s(), own_cpu_s()
        start = time.perf_counter()
        while len(ts) < reps or time.perf_counter() - start < min_s:
            t = time.perf_counter()
            torch.mm(a, b, out=c)
            sync(device)
            ts.append(time.perf_counter() - t)
        wall = time.perf_counter() - start
        foreign = None if busy0 is None else max(0.0, (cpu_busy_s() - busy0 - (own_cpu_s() - own0)) / wall)
        flops = 2.0 * m * k * n
        res[f"{m}x{k}x{n}"] = {"calls": len(ts), "best_gflops": flops / min(ts) / 1e9,
                               "median_gflops": flops / statistics.median(ts) / 1e9,
                               "foreign_cores": foreign}
    return res


def model_flops(cfg, rows, seq_len, resp_tokens, images_encoded, lm_head_positions):
    """Forward matmul FLOPs (2 per multiply-add) of one step's forward, split by part.

    Counted: vision tower (patch-embedding conv as a matmul, per layer q/k/v/o projections, QK^T and AV over all
    577 tokens, the two MLP matmuls) for ALL vision layers (transformers runs every layer and selects
    `vision_feature_layer` from the hidden states), `images_encoded` images; projector (two linears on the 576
    patch features per image); decoder per layer q/k/v/o (GQA-aware), QK^T and AV dense over seq_len^2 (no causal
    halving: CPU SDPA with a mask computes the full square), gate/up/down MLP, over `rows` rows of the PADDED length
    `seq_len`; LM head 2 * hidden * vocab at `lm_head_positions` positions. Not counted: norms, activations,
    softmax, rotary, embedding lookups, log-softmax, the optimizer (all O(elements), not matmuls).
    Backward ~= 2x forward, so a training step ~= 3x forward (the vision patch-embedding's input gradient, which
    is not needed, is included in that 3x; it is < 0.1 %). `resp_tokens` is unused here, kept for the caller."""
    v, t = cfg.vision_config, cfg.text_config
    dv, iv, lv = v.hidden_size, v.intermediate_size, v.num_hidden_layers
    patches = (v.image_size // v.patch_size) ** 2
    sv = patches + 1
    conv = 2.0 * patches * (v.num_channels * v.patch_size ** 2) * dv
    vis_layer = 2.0 * sv * dv * dv * 4 + 2.0 * 2 * sv * sv * dv + 2.0 * 2 * sv * dv * iv
    vision = images_encoded * (conv + lv * vis_layer)
    dt = t.hidden_size
    heads = t.num_attention_heads
    kv = getattr(t, "num_key_value_heads", None) or heads
    hd = getattr(t, "head_dim", None) or dt // heads
    projector = images_encoded * (2.0 * patches * dv * dt + 2.0 * patches * dt * dt)
    proj_qkvo = 2.0 * seq_len * dt * (heads * hd * 2 + kv * hd * 2)
    attn = 2.0 * 2 * seq_len * seq_len * heads * hd
    mlp = 2.0 * 3 * seq_len * dt * t.intermediate_size
    decoder = rows * t.num_hidden_layers * (proj_qkvo + attn + mlp)
    lm_head = 2.0 * lm_head_positions * dt * t.vocab_size
    fwd = vision + projector + decoder + lm_head
    return {"vision": vision, "projector": projector, "decoder": decoder, "lm_head": lm_head,
            "forward": fwd, "step": 3.0 * fwd}


# ----------------------------------------------------------------------------------------------------------------
# Synthetic inputs
# ----------------------------------------------------------------------------------------------------------------

def changed_flags(rejected, chosen, min_match=3):
    """Changed segments, docs/algorithm.md (RLHF-V get_diff_ids on response ids): difflib blocks (autojunk on),
    blocks shorter than min_match dropped (sentinel kept), a gap is a change only when both sides are non-empty."""
    sm = difflib.SequenceMatcher(None, a=rejected, b=chosen)
    blocks = [m for m in sm.get_matching_blocks() if m.size >= min_match or m.size == 0]
    rc, cc = [False] * len(rejected), [False] * len(chosen)
    pa = pb = 0
    for m in blocks:
        if m.a > pa and m.b > pb:
            for i in range(pa, m.a):
                rc[i] = True
            for i in range(pb, m.b):
                cc[i] = True
        pa, pb = m.a + m.size, m.b + m.size
    return rc, cc


def synthetic_inputs(cfg, pairs, prompt, response, shorter, seed):
    """B pairs laid out like benches/forward.rs: BOS, `prompt` text tokens with the 576 image tokens inserted at
    prompt/2, then the response (`response` tokens incl. EOS for chosen; rejected = chosen with 2-3 segments
    replaced and `shorter` tokens fewer), right-padded. Text ids are drawn below the image token id."""
    g = torch.Generator().manual_seed(seed)
    img_id = cfg.image_token_index
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    bos = getattr(cfg.text_config, "bos_token_id", None) or 1
    eos = getattr(cfg.text_config, "eos_token_id", None) or 2
    pad = getattr(cfg.text_config, "pad_token_id", None) or 0
    lo = 3

    def rand(n):
        return torch.randint(lo, img_id, (n,), generator=g).tolist()

    rows = []
    for _ in range(pairs):
        text = rand(prompt)
        p = [bos] + text[: prompt // 2] + [img_id] * n_img + text[prompt // 2:]
        chosen = rand(response - 1) + [eos]
        rej = list(chosen[:-1])
        # Replace a few segments (lengths 3-6) and delete `shorter` tokens from the end region.
        for k in range(3 if len(rej) >= 30 else 0):
            at = int(torch.randint(5 + k * (len(rej) // 3), (k + 1) * (len(rej) // 3) - 8, (1,), generator=g))
            ln = int(torch.randint(3, 7, (1,), generator=g))
            rej[at:at + ln] = rand(ln)
        rej = rej[: len(rej) - shorter] + [eos] if shorter > 0 else rej + [eos]
        rc, cc = changed_flags(rej, chosen)
        rows.append((p, chosen, rej, cc, rc))
    seqs = [(p, c, cc) for p, c, _, cc, _ in rows] + [(p, r, rc) for p, _, r, _, rc in rows]
    t = max(len(p) + len(r) for p, r, _ in seqs)
    ids = torch.full((2 * pairs, t), pad, dtype=torch.long)
    mask = torch.zeros((2 * pairs, t), dtype=torch.long)
    labels = torch.full((2 * pairs, t), -100, dtype=torch.long)
    changed = torch.zeros((2 * pairs, t), dtype=torch.float32)
    for r, (p, resp, ch) in enumerate(seqs):
        n = len(p) + len(resp)
        ids[r, :n] = torch.tensor(p + resp)
        mask[r, :n] = 1
        labels[r, len(p):n] = torch.tensor(resp)
        changed[r, len(p):n] = torch.tensor(ch, dtype=torch.float32)
    side = cfg.vision_config.image_size
    px = torch.randn((pairs, 3, side, side), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "changed": changed, "pixel_values": px}


# ----------------------------------------------------------------------------------------------------------------
# The step, RLHF-V style
# ----------------------------------------------------------------------------------------------------------------

def get_batch_logps(logits, labels):
    """muffin/eval/muffin_inference_logp.py get_batch_logps(..., return_per_token_logp=True): [2B, T-1]."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    labels[labels == -100] = 0  # dummy token; masked later
    return torch.gather(logits.float().log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)


def compute_weighted_logp(per_token_logp, labels, token_weight, use_average):
    """muffin/train/trainers.py compute_weighted_logp; per_token_logp and token_weight are shifted [2B, T-1]."""
    loss_mask = labels[:, 1:].clone() != -100
    weighted_mask = token_weight * loss_mask
    logp = (per_token_logp * weighted_mask).sum(-1)
    if use_average:
        return logp / weighted_mask.sum(-1)
    return logp


def dpo_loss(pc, pr, rc, rr, beta):
    """muffin/train/trainers.py dpo_loss (sigmoid)."""
    logits = (pc - pr) - (rc - rr)
    losses = -torch.nn.functional.logsigmoid(beta * logits)
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def token_weights(x, gamma):
    """[2B, T] weights on label positions (0 elsewhere), unshifted like labels."""
    on = (x["labels"] != -100).float()
    if "weights" in x:
        return x["weights"].float() * on
    return (1.0 + (gamma - 1.0) * x["changed"].float()) * on


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--inputs")
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--save-inputs")
    ap.add_argument("--matmul-peak", action="store_true")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--response", type=int, default=100)
    ap.add_argument("--rejected-shorter", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--beta", type=float)
    ap.add_argument("--gamma", type=float)
    ap.add_argument("--score", choices=["mean", "sum"])
    ap.add_argument("--lr", type=float, default=5e-7)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--model-labels", action="store_true",
                    help="pass labels= to the model as Muffin does (an extra, discarded CE loss)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast over fp32 weights (HF Trainer bf16=True)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)

    if a.matmul_peak:
        # 2048^3: the machine's peak. The model's shapes (small preset, 2 pairs): 2868 = 4 rows x 717 tokens through
        # the decoder's 512-wide linears (q/k/v/o 512x512, MLP 512x1376 and back) and the 32k LM head; 2308 =
        # 4 images x 577 tokens through the vision tower's 256-wide linears.
        shapes = [(2048, 2048, 2048), (2868, 512, 512), (2868, 512, 1376), (2868, 1376, 512),
                  (2868, 512, 32000), (2308, 256, 256), (2308, 256, 1024)]
        # A GPU needs a larger product to reach its peak.
        peak_shape = (8192, 8192, 8192) if device.type == "cuda" else (2048, 2048, 2048)
        if peak_shape not in shapes:
            shapes.insert(0, peak_shape)
        dtype = torch.bfloat16 if a.bf16 else torch.float32
        g = matmul_peak(a.threads, shapes, device=device, dtype=dtype)
        key = "x".join(map(str, peak_shape))
        out = {"mode": "matmul_peak", "torch": torch.__version__, "threads": a.threads, "cpu": cpu_model(),
               "device": str(device), "dtype": str(dtype),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "load_avg": load_avg(), "gflops": g, "peak": dict(shape=key, **g[key])}
        print(json.dumps(out))
        return

    import transformers
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(a.seed)
    model = LlavaForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32)
    cfg = model.config

    meta = {}
    if a.synthetic:
        x = synthetic_inputs(cfg, a.pairs, a.prompt, a.response, a.rejected_shorter, a.seed)
    else:
        x = {k: v for k, v in load_file(a.inputs).items()}
        with safe_open(a.inputs, framework="pt") as f:
            meta = f.metadata() or {}
    beta = a.beta if a.beta is not None else float(meta.get("beta", 0.5))
    gamma = a.gamma if a.gamma is not None else float(meta.get("gamma", 5.0))
    score = a.score or meta.get("score", "mean")
    use_average = score == "mean"

    model.to(device)
    x = {k: v.to(device) if torch.is_tensor(v) else v for k, v in x.items()}
    ids = x["input_ids"].long()
    mask = x["attention_mask"].long()
    labels = x["labels"].long()
    px = x["pixel_values"].float()
    rows, seq = ids.shape
    b = rows // 2
    assert rows == 2 * b and px.shape[0] == b, "rows must be [chosen; rejected] with one image per pair"
    w = token_weights(x, gamma)  # [2B, T]
    # Shifted to Muffin's layout: column j is about token j + 1 (its `*_token_weight` and per-token logps are
    # [.., T-1]).
    concatenated_token_weight = w[:, 1:].contiguous()

    if a.synthetic:
        # Reference per-token log-probs = the initial policy's own (one no-grad forward, untimed), so step 1's
        # loss must be ln 2.
        model.eval()
        with torch.no_grad():
            lg = model(input_ids=ids, attention_mask=mask, pixel_values=torch.cat([px, px], 0)).logits
            lp = get_batch_logps(lg, labels) * (labels[:, 1:] != -100)
            del lg
        x["ref_logps"] = torch.cat([torch.zeros(rows, 1, device=device), lp], 1).contiguous()

    ref_check = None
    if "ref_logps" in x:
        ref_tok = x["ref_logps"].float()[:, 1:]
        ref_scores = compute_weighted_logp(ref_tok, labels, concatenated_token_weight, use_average)
        ref_win_logp, ref_rej_logp = ref_scores.split([b, b])
        if "ref_chosen_logp" in x and "ref_rejected_logp" in x:
            ref_check = max((ref_win_logp - x["ref_chosen_logp"].float()).abs().max().item(),
                            (ref_rej_logp - x["ref_rejected_logp"].float()).abs().max().item())
    else:
        ref_win_logp = x["ref_chosen_logp"].float()
        ref_rej_logp = x["ref_rejected_logp"].float()

    if a.save_inputs:
        x["ref_chosen_logp"] = ref_win_logp.contiguous()
        x["ref_rejected_logp"] = ref_rej_logp.contiguous()
        save_file({k: v.cpu().contiguous() for k, v in x.items()}, a.save_inputs,
                  metadata={"beta": str(beta), "gamma": str(gamma), "score": score})

    rss_loaded = peak_rss_mib()
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()  # as HF Trainer does (all dropouts are 0 in these configs)
    for p in model.parameters():
        p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=a.weight_decay)
    sft_weight = float(os.environ.get("SFT_weight", 0.0))

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.bf16)

    def now():
        sync(device)
        return time.perf_counter()

    def step():
        ph = {}
        busy0, own0 = cpu_busy_s(), own_cpu_s()
        t0 = now()
        with autocast:
            # MuffinDPOTrainer.compute_loss: images duplicated, one forward over [chosen; rejected].
            concatenated_images = torch.cat([px, px], dim=0)
            out = model(input_ids=ids, attention_mask=mask, pixel_values=concatenated_images,
                        labels=labels if a.model_labels else None)
            t1 = now()
            ph["forward"] = t1 - t0
            concatenated_logp = get_batch_logps(out.logits, labels)  # forward_DPO(token_weighted=True)
            concatenated_logp = compute_weighted_logp(concatenated_logp, labels, concatenated_token_weight,
                                                      use_average)
            policy_win_logp, policy_rej_logp = concatenated_logp.split([b, b])
            losses, chosen_rewards, rejected_rewards = dpo_loss(policy_win_logp, policy_rej_logp,
                                                                ref_win_logp, ref_rej_logp, beta)
            loss = losses.mean() - sft_weight * policy_win_logp.mean()
        t2 = now()
        ph["logps_loss"] = t2 - t1
        loss.backward()
        del out
        t3 = now()
        ph["backward"] = t3 - t2
        grad_norm = torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
        t4 = now()
        opt.step()
        t5 = now()
        opt.zero_grad(set_to_none=True)
        t6 = now()
        ph["clip"] = t4 - t3
        ph["adamw"] = t5 - t4
        ph["zero_grad"] = t6 - t5
        ph["total"] = t6 - t0
        own = own_cpu_s() - own0
        ph["cpu_s"] = own
        busy1 = cpu_busy_s()
        # Cores other processes kept busy during this step (the machine's load, not ours): a step measured
        # with this well above 0 is not a clean number.
        ph["foreign_cores"] = None if busy0 is None else max(0.0, (busy1 - busy0 - own) / ph["total"])
        m = {"loss": loss.item(), "grad_norm": grad_norm.item(),
             "rewards_chosen": chosen_rewards.mean().item(), "rewards_rejected": rejected_rewards.mean().item(),
             "logps_chosen": policy_win_logp.mean().item(), "logps_rejected": policy_rej_logp.mean().item()}
        return ph, m

    load0 = load_avg()
    warm, m0 = step()
    phases, metrics = [], [m0]
    for _ in range(a.iters):
        ph, m = step()
        phases.append(ph)
        metrics.append(m)
    totals = [p["total"] for p in phases]
    med = statistics.median(totals)
    # Steps during which other processes kept less than 0.2 cores busy.
    clean = [p["total"] for p in phases if p["foreign_cores"] is not None and p["foreign_cores"] < 0.2]

    n_img = int((ids == cfg.image_token_index).sum(1)[0])
    resp_tokens = int((labels != -100).sum())
    tokens = int(mask.sum())
    flops = model_flops(cfg, rows, seq, resp_tokens, images_encoded=rows, lm_head_positions=rows * seq)
    # What a trainer must do at least: each pair's image encoded once, the LM head only at the label positions.
    minimal = model_flops(cfg, rows, seq, resp_tokens, images_encoded=b, lm_head_positions=resp_tokens)
    print(json.dumps({
        "impl": "transformers-rlhfv", "transformers": transformers.__version__, "torch": torch.__version__,
        "threads": a.threads, "cpu": cpu_model(), "iters": a.iters, "pairs": b, "rows": rows,
        "shape": {"seq_len_padded": seq, "tokens_per_row": mask.sum(1).tolist(), "image_tokens": n_img,
                  "answer_tokens_per_row": (labels != -100).sum(1).tolist(),
                  "changed_tokens_per_row": ((x["changed"] > 0) if "changed" in x else
                                             (w != 1) & (labels != -100)).sum(1).tolist(),
                  "tokens": tokens},
        "beta": beta, "gamma": gamma, "score": score, "lr": a.lr, "model_labels": a.model_labels,
        "gradient_checkpointing": a.gradient_checkpointing,
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "median_s": med, "best_s": min(totals), "warmup_s": warm["total"], "steps_s": totals,
        "clean_steps": len(clean), "clean_median_s": statistics.median(clean) if clean else None,
        "steps_cpu_s": [p["cpu_s"] for p in phases],
        "steps_foreign_cores": [p["foreign_cores"] for p in phases], "warmup_foreign_cores": warm["foreign_cores"],
        "pairs_per_s": b / med, "tokens_per_s": tokens / med,
        "phases_median_s": {k: statistics.median(p[k] for p in phases) for k in phases[0]
                            if k not in ("cpu_s", "foreign_cores")},
        "losses": [m["loss"] for m in metrics], "step1_loss_minus_ln2": metrics[0]["loss"] - math.log(2.0),
        "metrics": metrics, "ref_scalar_vs_per_token_max_abs_diff": ref_check,
        "peak_rss_mib": peak_rss_mib(), "peak_rss_before_steps_mib": rss_loaded,
        "device": str(device), "bf16_autocast": a.bf16,
        "peak_gpu_alloc_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "flops_per_pair": {k: v / b for k, v in flops.items()},
        "minimal_flops_per_pair": {k: v / b for k, v in minimal.items()},
        "achieved_gflops": flops["step"] / med / 1e9,
        "load_avg_start": load0, "load_avg_end": load_avg(),
    }))


if __name__ == "__main__":
    main()
