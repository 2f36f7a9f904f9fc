#!/usr/bin/env python3
"""Oracle: runs Hugging Face transformers' LlavaForConditionalGeneration on inputs a Rust test wrote.

Usage: llava_logits.py MODEL_DIR INPUTS.safetensors OUT.safetensors

MODEL_DIR    an HF checkpoint directory (config.json + model.safetensors or a sharded index), e.g. one the Rust
             code saved; loaded with from_pretrained(output_loading_info=True) in fp32 on the CPU, eval mode,
             eager attention
INPUTS       safetensors with input_ids [B, T] (integer), attention_mask [B, T] (integer or bool, optional:
             all ones when absent), pixel_values [B_img, 3, H, W] (float)
OUT          written with  logits [B, T, vocab] f32  and, when pixel_values was given, image_features
             [B_img, N, hidden] f32 (the projected image features, model.get_image_features)

Exits non-zero with a message on stderr when the checkpoint does not load cleanly: any missing, unexpected or
mismatched key, or any loader error message (a checkpoint transformers has to partly re-initialise must never
pass for a good one). Prints one line "ok <B>x<T>x<vocab>" on success.
"""

import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration


def fail(msg):
    print(f"llava_logits.py: {msg}", file=sys.stderr)
    sys.exit(2)


def main():
    if len(sys.argv) != 4:
        fail("usage: llava_logits.py MODEL_DIR INPUTS.safetensors OUT.safetensors")
    model_dir, inputs_path, out_path = sys.argv[1:]
    torch.set_num_threads(1)  # as tests/fixtures/gen_llava_fixtures.py: same reduction order, reproducible bits

    try:
        model, info = LlavaForConditionalGeneration.from_pretrained(
            model_dir,
            dtype=torch.float32,
            attn_implementation="eager",
            output_loading_info=True,
        )
    except Exception as e:  # size mismatches, unreadable files, bad config: all fatal
        fail(f"loading {model_dir} failed: {type(e).__name__}: {e}")
    problems = {k: list(v) for k, v in info.items() if v}
    if problems:
        lines = [f"  {k} ({len(v)}): {sorted(map(str, v))}" for k, v in problems.items()]
        fail(f"{model_dir} did not load cleanly:\n" + "\n".join(lines))
    model = model.to(torch.float32).eval()

    inp = load_file(inputs_path)
    if "input_ids" not in inp:
        fail(f"{inputs_path} has no input_ids (has {sorted(inp)})")
    input_ids = inp["input_ids"].to(torch.int64)
    attention_mask = inp.get("attention_mask")
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(torch.int64)
    pixel_values = inp.get("pixel_values")
    if pixel_values is not None:
        pixel_values = pixel_values.to(torch.float32)

    out = {}
    with torch.no_grad():
        res = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
        out["logits"] = res.logits.to(torch.float32).contiguous()
        if pixel_values is not None:
            feats = model.get_image_features(pixel_values=pixel_values)
            if isinstance(feats, (list, tuple)):
                feats = torch.stack(list(feats))
            out["image_features"] = feats.to(torch.float32).contiguous()
    save_file(out, out_path, metadata={"format": "pt"})
    print("ok " + "x".join(str(s) for s in out["logits"].shape))


if __name__ == "__main__":
    main()
