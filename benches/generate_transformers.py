"""Baseline for benches/generate.rs: transformers' LlavaForConditionalGeneration.generate (fp32, CPU) on the same
model directory, prompts and thread count. Prints one JSON line per case with the median time.

usage: generate_transformers.py MODEL_DIR INPUTS.safetensors NEW_TOKENS ITERS THREADS CASES_JSON
CASES_JSON: [[prompts, samples], ...]; samples > 1 samples (temperature 1, no top-k/top-p), else greedy.
"""
import json
import sys
import time

import torch
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

model_dir, inputs = sys.argv[1], sys.argv[2]
new, iters, threads = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
cases = json.loads(sys.argv[6])
torch.set_num_threads(threads)
model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
x = load_file(inputs)
ids, mask, px = x["input_ids"].long(), x["attention_mask"].long(), x["pixel_values"].float()
for b, k in cases:
    # Exactly NEW tokens per answer: EOS is suppressed until then (min_new_tokens), as the Rust side never stops.
    kw = dict(max_new_tokens=new, min_new_tokens=new, pad_token_id=0, num_beams=1)
    if k > 1:
        kw.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=k)
    else:
        kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    args = dict(input_ids=ids[:b], attention_mask=mask[:b], pixel_values=px[:b], **kw)
    times = []
    with torch.inference_mode():
        model.generate(**args)  # warm-up
        for _ in range(iters):
            t = time.perf_counter()
            out = model.generate(**args)
            times.append(time.perf_counter() - t)
    assert out.shape == (b * k, ids.shape[1] + new), out.shape
    med = sorted(times)[len(times) // 2]
    print(json.dumps({"prompts": b, "samples": k, "median_s": med, "tokens_per_s": b * k * new / med}))
