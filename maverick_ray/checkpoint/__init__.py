"""Checkpoint I/O: HF Llama 4 names, the safetensors loader, tiny checkpoints, tokenizer and chat format."""
