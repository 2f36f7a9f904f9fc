#!/usr/bin/env python3
"""Oracle: greedy generation by Hugging Face transformers' LlavaForConditionalGeneration.generate.

Usage: llava_generate.py MODEL_DIR INPUTS.safetensors OUT.safetensors MAX_NEW_TOKENS EOS_ID PAD_ID

INPUTS   safetensors with input_ids [B, T] (left-padded, image tokens already expanded), attention_mask [B, T]
         and pixel_values [B, 3, H, W]
OUT      written with  batched [B, MAX_NEW_TOKENS]: generate(do_sample=False) on the whole batch, and
         single_<i> [1, n_i]: the same for row i alone (its padding removed); finished rows are padded
         with PAD_ID after EOS, as generate does

The model is loaded in fp32 on the CPU with SDPA attention (transformers' default), in eval mode.
"""

import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration


def main():
    model_dir, inputs_path, out_path = sys.argv[1:4]
    max_new, eos, pad = (int(x) for x in sys.argv[4:7])
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    x = load_file(inputs_path)
    ids, mask, pix = x["input_ids"].long(), x["attention_mask"].long(), x["pixel_values"].float()
    kw = dict(do_sample=False, max_new_tokens=max_new, min_new_tokens=0, eos_token_id=eos,
              pad_token_id=pad, num_beams=1, temperature=None, top_p=None, top_k=None)
    out = {}
    with torch.no_grad():
        t = ids.shape[1]
        seq = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pix, **kw)
        new = seq[:, t:]
        # generate stops early when every row has finished: pad to MAX_NEW_TOKENS for a fixed shape.
        out["batched"] = torch.nn.functional.pad(new, (0, max_new - new.shape[1]), value=pad).contiguous()
        for i in range(ids.shape[0]):
            keep = mask[i].bool()
            one = ids[i][keep].unsqueeze(0)
            seq = model.generate(input_ids=one, attention_mask=torch.ones_like(one),
                                 pixel_values=pix[i : i + 1], **kw)
            out[f"single_{i}"] = seq[:, one.shape[1]:].contiguous()
    save_file(out, out_path)
    print("ok", ids.shape[0])


if __name__ == "__main__":
    main()
