"""Baseline for benches/forward.rs: transformers' LlavaForConditionalGeneration forward (fp32, CPU) on the
same model directory and inputs, same thread count. Prints one JSON line with the timing.

usage: forward_transformers.py MODEL_DIR INPUTS.safetensors ITERS THREADS
"""
import json
import sys
import time

import torch
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

model_dir, inputs, iters, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
model = LlavaForConditionalGeneration.from_pretrained(model_dir, torch_dtype=torch.float32)
model.eval()
x = load_file(inputs)
ids, mask, px = x["input_ids"], x["attention_mask"], x["pixel_values"]
rows = ids.shape[0]
# [chosen; rejected] rows share images: the baseline duplicates them, as the RLHF-V code does.
px = px.repeat(rows // px.shape[0], 1, 1, 1)
with torch.inference_mode():
    model(input_ids=ids, attention_mask=mask, pixel_values=px)  # warm-up
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, pixel_values=px)
        times.append(time.perf_counter() - t)
    # Breakdown: image features (vision tower + projector) and the decoder without the LM head.
    def timed(f):
        f()
        ts = []
        for _ in range(iters):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return sorted(ts)[len(ts) // 2]
    cfg = model.config
    vis = timed(lambda: model.model.get_image_features(
        pixel_values=px, vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy))
    hid = timed(lambda: model.model(input_ids=ids, attention_mask=mask, pixel_values=px))
tokens = int(mask.sum())
best = min(times)
med = sorted(times)[len(times) // 2]
print(json.dumps({"impl": "transformers", "torch": torch.__version__, "tokens": tokens,
                  "median_s": med, "best_s": best, "tokens_per_s": tokens / med,
                  "logits_shape": list(out.logits.shape), "vision_s": vis, "hidden_s": hid}))
