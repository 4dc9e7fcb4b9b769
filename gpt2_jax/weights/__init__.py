"""Weights in and out: OpenAI / gpt-2-simple TF checkpoints, Hugging Face safetensors, our native orbax format.

loading.py         detect a path's format and load it (`load_model`, `read_weights`)
openai.py          OpenAI's variable names <-> params; writing an OpenAI-style checkpoint
tf_bundle.py       TensorFlow's tensor-bundle files (.index + .data), read and written without TensorFlow
crc32c.py          the CRC-32C that TF checkpoints carry
huggingface.py     Hugging Face's tensor names <-> params, config.json
hf_export.py       the rest of a Hugging Face export: tokenizer files, generation config, model card
hub.py             Hugging Face Hub ids, resolved through the local HF cache (downloaded when online)
safetensors_io.py  safetensors files (single or sharded) read and written without torch
native.py          our own format: gpt2_jax.json + an orbax params directory
checksums.py       CRC-32 manifests of saved params, and of a params tree's values
lora_run.py        a LoRA run's record of its adapters and base model; its checkpoints' adapters
peft_export.py     a LoRA run's adapters for Hugging Face PEFT (adapter_model.safetensors + adapter_config.json)
"""
