#!/usr/bin/env python3
"""Oracle for tests/it/image_oracle.rs's live sweep: runs transformers' slow CLIPImageProcessor (+ LLaVA's
expand2square) on images the Rust test wrote.

Usage: clip_image_oracle.py DIR
DIR/cases.json is a list of {"image": "<file in DIR>", "config": {<preprocessor_config.json>}, "pad": bool};
for case i this writes DIR/<i>.f32 (pixel_values[0], little-endian float32, CHW) and prints one line "done N".
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import CLIPImageProcessor


def expand2square(pil_img, background_color):
    """LLaVA-1.5's llava/mm_utils.py expand2square, verbatim."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def main():
    d = Path(sys.argv[1])
    cases = json.loads((d / "cases.json").read_text())
    procs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(cases):
            key = json.dumps(case["config"], sort_keys=True)
            if key not in procs:
                cdir = Path(tmp) / str(len(procs))
                cdir.mkdir()
                (cdir / "preprocessor_config.json").write_text(key)
                proc = CLIPImageProcessor.from_pretrained(str(cdir))
                assert type(proc) is CLIPImageProcessor, type(proc)
                procs[key] = proc
            proc = procs[key]
            img = Image.open(d / case["image"]).convert("RGB")
            if case["pad"]:
                img = expand2square(img, tuple(int(x * 255) for x in proc.image_mean))
            pv = proc(img, return_tensors="np")["pixel_values"][0]
            assert pv.dtype == np.float32 and pv.shape[0] == 3, (pv.dtype, pv.shape)
            (d / f"{i}.f32").write_bytes(pv.astype("<f4").tobytes())
    print(f"done {len(cases)}")


if __name__ == "__main__":
    main()
