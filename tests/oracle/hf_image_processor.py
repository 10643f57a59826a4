"""Runs in the oracle venv (torch + torchvision + transformers): transformers' Llama 4 image
processor and Llama4Processor, the references the project's image path must match exactly.

    python hf_image_processor.py JOB.json OUT.pt
    python hf_image_processor.py --serve     one job per stdin line, a JSON [JOB.json, OUT.pt];
        answers each with a line "oracle: ok" or "oracle: error <traceback as a JSON string>"
        (the tests pay the interpreter's imports of torch and transformers once)
JOB: {"processor_dir": DIR, "images": [PATH, ...], "prompt": TEXT or null}
OUT: {"pixel_values": [(tiles, 3, S, S) per image], "aspect_ratios": [(rows, cols) per image],
      "input_ids": [ids] (with a prompt: Llama4Processor on the prompt and all images)}
"""

import json
import sys

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor


def run_job(job_path: str, out_path: str) -> None:
    job = json.loads(open(job_path).read())
    images = []
    for path in job["images"]:
        with Image.open(path) as img:
            img.load()
            images.append(img.copy())  # mode untouched: do_convert_rgb handles it
    proc = AutoImageProcessor.from_pretrained(job["processor_dir"])
    out = {"pixel_values": [], "aspect_ratios": [], "image_processor": type(proc).__name__}
    for img in images:
        enc = proc(images=[img], return_tensors="pt")
        out["pixel_values"].append(enc["pixel_values"].contiguous())
        out["aspect_ratios"].append(tuple(int(v) for v in enc["aspect_ratios"][0]))
    if job.get("prompt") is not None:
        processor = AutoProcessor.from_pretrained(job["processor_dir"])
        enc = processor(text=job["prompt"], images=images, add_special_tokens=False, return_tensors="pt")
        out["input_ids"] = enc["input_ids"][0].tolist()
        out["prompt_pixel_values"] = enc["pixel_values"].contiguous()
    torch.save(out, out_path)


def serve() -> None:
    import traceback

    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            run_job(*json.loads(line))
            answer = "ok"
        except Exception:
            answer = "error " + json.dumps(traceback.format_exc())
        print("oracle: " + answer, flush=True)


def main() -> None:
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        run_job(sys.argv[1], sys.argv[2])


if __name__ == "__main__":
    main()
