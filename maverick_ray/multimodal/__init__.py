"""Image inputs: decoding, Llama 4 tiling, and the image token layout in prompts."""
