#!/usr/bin/env python3
"""Oracle: Hugging Face PEFT loads a LoRA adapter that ddpo saved onto transformers' LlavaForConditionalGeneration
and runs it on inputs a Rust test wrote.

Usage: peft_logits.py BASE_MODEL_DIR ADAPTER_DIR INPUTS.safetensors OUT.safetensors [TRAIN_SEED]

BASE_MODEL_DIR  the base llava-hf checkpoint (fp32 on the CPU, eval mode, eager attention)
ADAPTER_DIR     adapter_config.json + adapter_model.safetensors, loaded with PeftModel.from_pretrained
INPUTS          input_ids [B, T], attention_mask [B, T], pixel_values [B, 3, H, W]
OUT             logits [B, T, vocab] f32
TRAIN_SEED      if given, the forward runs in training mode (LoRA dropout on, as adapter_config.json's
                lora_dropout says) right after torch.manual_seed(TRAIN_SEED)

Fails (exit 2, message on stderr) unless every tensor of the adapter file lands in a LoRA module of the model
(compared value for value with the module's weights after loading), the adapter touches no vision-tower
module, and at least one adapter B is non-zero (an adapter equal to the base would prove nothing).
Prints "ok <n adapted modules>" on success.
"""

import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration


def fail(msg):
    print(f"peft_logits.py: {msg}", file=sys.stderr)
    sys.exit(2)


base_dir, adapter_dir, inputs, out = sys.argv[1:5]
train_seed = int(sys.argv[5]) if len(sys.argv) > 5 else None
torch.manual_seed(0)
base = LlavaForConditionalGeneration.from_pretrained(base_dir, torch_dtype=torch.float32, attn_implementation="eager")
model = PeftModel.from_pretrained(base, adapter_dir)
model.eval()

saved = load_file(f"{adapter_dir}/adapter_model.safetensors")
params = dict(model.named_parameters())
nonzero_b = False
for key, value in saved.items():
    # PEFT names a loaded parameter <key without ".weight">.default.weight.
    name = key[: -len(".weight")] + ".default.weight"
    if name not in params:
        fail(f"adapter tensor {key} has no LoRA parameter {name} in the PEFT model")
    if not torch.equal(params[name].detach(), value):
        fail(f"{key}: the loaded values differ from the file")
    if "lora_B" in key and value.abs().max() > 0:
        nonzero_b = True
lora_modules = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
if any("vision_tower" in n for n in lora_modules):
    fail(f"the adapter reached the vision tower: {[n for n in lora_modules if 'vision_tower' in n][:3]}")
if len(lora_modules) * 2 != len(saved):
    fail(f"{len(lora_modules)} LoRA modules in the model but {len(saved)} adapter tensors in the file")
if not nonzero_b:
    fail("every lora_B is zero: the adapter equals the base model")

x = load_file(inputs)
if train_seed is not None:
    model.train()
    torch.manual_seed(train_seed)
with torch.no_grad():
    logits = model(
        input_ids=x["input_ids"].long(),
        attention_mask=x["attention_mask"].long(),
        pixel_values=x["pixel_values"].float(),
    ).logits
save_file({"logits": logits.float().contiguous()}, out)
print(f"ok {len(lora_modules)}")
