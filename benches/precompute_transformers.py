"""Baseline for benches/train_step.rs: reference log-prob precompute with transformers'
LlavaForConditionalGeneration (fp32, CPU, inference mode), the way a typical DPO/RLHF-V trainer computes it,
on the same pairs as ddpo's precompute. Prints one JSON line with the timing.

The inputs are ddpo's: token ids are read from ddpo's cache file (`prompt_ids`, `chosen_ids`, `rejected_ids`),
images from the data shard (decoded with Pillow, LLaVA's expand2square, transformers' CLIPImageProcessor), so
both sides run the same sequences. Per batch of B pairs (timed from the image bytes):
    pixel_values = processor([expand2square(img) ...])          # [B, 3, H, W]
    rows = [prompt+chosen_i ...; prompt+rejected_i ...]        # 2B rows, right-padded, attention mask
    logits = model(input_ids, attention_mask, pixel_values.repeat(2, 1, 1, 1)).logits   # every position
    logps = log_softmax(logits[:, :-1].float(), -1).gather(-1, labels[:, 1:])            # response tokens
The log-probs are checked against ddpo's cached ones (max |difference| is reported).

usage: precompute_transformers.py MODEL_DIR SHARD CACHE_FILE BATCH_PAIRS THREADS REPEATS
"""
import io
import json
import sys
import time

import pyarrow.parquet as pq
import torch
import transformers
from PIL import Image
from transformers import CLIPImageProcessor, LlavaForConditionalGeneration

model_dir, shard, cache_file = sys.argv[1], sys.argv[2], sys.argv[3]
batch_pairs, threads, repeats = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(threads)

model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
model.eval()
proc = CLIPImageProcessor.from_pretrained(model_dir)
pad_id = 0  # masked out; any id works

cache = pq.read_table(cache_file).to_pylist()
images = pq.read_table(shard, columns=["image"]).column("image").to_pylist()


def image_bytes(cell):
    return cell["bytes"] if isinstance(cell, dict) else cell


def expand2square(img, background):
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


background = tuple(int(x * 255) for x in proc.image_mean)


def run_batch(pairs):
    imgs = [expand2square(Image.open(io.BytesIO(image_bytes(images[p["row"]]))).convert("RGB"), background)
            for p in pairs]
    px = proc(imgs, return_tensors="pt")["pixel_values"]
    t_fwd = time.perf_counter()
    seqs = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs] + \
           [(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
    t = max(len(a) + len(b) for a, b in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    labels = torch.full((len(seqs), t), -100, dtype=torch.long)
    for r, (prompt, resp) in enumerate(seqs):
        n = len(prompt) + len(resp)
        ids[r, :n] = torch.tensor(prompt + resp)
        mask[r, :n] = 1
        labels[r, len(prompt):n] = torch.tensor(resp)
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=px.repeat(2, 1, 1, 1)).logits
    lab = labels[:, 1:]
    keep = lab != -100
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    lp = lp.gather(-1, lab.clamp_min(0).unsqueeze(-1)).squeeze(-1) * keep
    out = [lp[r][keep[r]] for r in range(len(seqs))]
    return out, time.perf_counter() - t_fwd


runs = []
max_diff = 0.0
with torch.inference_mode():
    for rep in range(repeats):
        fwd = 0.0
        start = time.perf_counter()
        for i in range(0, len(cache), batch_pairs):
            pairs = cache[i:i + batch_pairs]
            out, f = run_batch(pairs)
            fwd += f
            if rep == 0:
                b = len(pairs)
                for j, p in enumerate(pairs):
                    for got, want in ((out[j], p["chosen_logps"]), (out[b + j], p["rejected_logps"])):
                        d = (got - torch.tensor(want)).abs().max().item()
                        max_diff = max(max_diff, d)
        runs.append((time.perf_counter() - start, fwd))

best = min(runs)
print(json.dumps({"impl": "transformers", "transformers": transformers.__version__, "torch": torch.__version__,
                  "pairs": len(cache), "batch_pairs": batch_pairs, "best_s": best[0], "forward_s": best[1],
                  "runs_s": [r[0] for r in runs], "pairs_per_s": len(cache) / best[0],
                  "max_abs_logp_diff": max_diff}))
