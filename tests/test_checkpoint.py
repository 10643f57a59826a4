"""Checkpoint writer and loader: transformers loads what we write, we load what it holds, errors name culprits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from maverick_ray.checkpoint.errors import CheckpointError
from maverick_ray.checkpoint.loader import load_state_dict, routed_expert_bytes
from maverick_ray.checkpoint.writer import write_checkpoint
from maverick_ray.config import ConfigError, ModelConfig


def test_transformers_loads_tiny_with_no_missing_or_unexpected_keys(tiny_ckpt):
    from transformers import Llama4ForConditionalGeneration

    model, info = Llama4ForConditionalGeneration.from_pretrained(tiny_ckpt, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = load_state_dict(tiny_ckpt, progress=False)
    hf = model.state_dict()
    for name, t in ours.items():
        hf_name = name if name.startswith(("vision_model.", "multi_modal_projector.")) else "language_model." + name
        hf_name = hf_name.replace("language_model.model.", "model.language_model.") if hf_name not in hf else hf_name
        ref = hf.get(hf_name)
        if ref is None:  # transformers 5 renames the top-level modules
            ref = hf[next(k for k in hf if k.endswith(name))]
        assert torch.equal(t, ref), name


def test_split_sharded_layout_loads_the_same_weights(tiny_ckpt, tiny_split_ckpt):
    assert len(list(tiny_split_ckpt.glob("model-*-of-*.safetensors"))) > 2
    assert (tiny_split_ckpt / "model.safetensors.index.json").exists()
    a = load_state_dict(tiny_ckpt, progress=False)
    b = load_state_dict(tiny_split_ckpt, progress=False)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("which", ["tiny_ckpt", "tiny_split_ckpt"])
def test_expert_subset_holds_only_those_experts(request, which):
    ckpt = request.getfixturevalue(which)
    full = load_state_dict(ckpt, progress=False)
    sub = load_state_dict(ckpt, expert_ids=[4, 5, 6, 7], progress=False)
    for name, t in sub.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            assert t.shape[0] == 4
            assert torch.equal(t, full[name][4:8])
        else:
            assert torch.equal(t, full[name])
    assert routed_expert_bytes(sub) * 4 == routed_expert_bytes(full)
    odd = load_state_dict(ckpt, expert_ids=[9, 1, 15], progress=False)
    name = "model.layers.1.feed_forward.experts.down_proj"
    assert torch.equal(odd[name], full[name][[1, 9, 15]])


RSS_SCRIPT = textwrap.dedent("""
    import gc, json, sys, resource
    from maverick_ray.checkpoint.loader import load_state_dict, routed_expert_bytes
    def rss():
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    before = rss()
    ids = None if sys.argv[2] == 'all' else list(range(int(sys.argv[2])))
    sd = load_state_dict(sys.argv[1], expert_ids=ids, include_vision=False, progress=False)
    gc.collect()
    print(json.dumps({"growth": rss() - before, "expert_bytes": routed_expert_bytes(sd)}))
""")


def test_expert_subset_process_memory_growth_is_about_a_quarter(tmp_path, capsys):
    """mini has 128 experts of 512x512 + 256x512 floats per MoE layer (~200 MB/layer): a rank that owns
    32 of them must not pay for the others (each load measured in a fresh process)."""
    ckpt = write_checkpoint(tmp_path / "mini", "mini", progress=False)

    def measure(n):
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(ckpt), n], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    full, quarter = measure("all"), measure("32")
    with capsys.disabled():
        print(f"\nRSS growth: all experts {full['growth'] / 2**20:.0f} MiB, 32/128 experts "
              f"{quarter['growth'] / 2**20:.0f} MiB; expert bytes {full['expert_bytes'] / 2**20:.0f} vs "
              f"{quarter['expert_bytes'] / 2**20:.0f} MiB")
    assert quarter["expert_bytes"] * 4 == full["expert_bytes"]
    dense = full["growth"] - full["expert_bytes"]
    expected = dense + full["expert_bytes"] / 4
    assert quarter["growth"] < expected * 1.25, "loading a quarter of the experts cost more than a quarter"
    assert quarter["growth"] < full["growth"] * 0.45


def test_writer_is_deterministic(tmp_path, tiny_ckpt):
    again = write_checkpoint(tmp_path / "again", "tiny", progress=False)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_ckpt / name).read_bytes(), name


def test_greedy_decoding_is_not_a_chain_of_near_ties(tiny_ckpt):
    from maverick_ray.model.text import TextModel

    cfg = ModelConfig.from_pretrained(tiny_ckpt)
    model = TextModel(cfg.text).eval()
    model.load_state_dict(load_state_dict(tiny_ckpt, include_vision=False, progress=False))
    ids = torch.randint(10, cfg.text.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        top2 = model(ids, all_logits=True).topk(2, dim=-1).values
    gaps = top2[:, 0] - top2[:, 1]
    assert float(gaps.median()) > 0.05 and float((gaps < 1e-3).float().mean()) < 0.1


def test_chat_template_matches_transformers(tiny_ckpt):
    """The tiny checkpoint's own template, rendered through transformers, gives the documented
    Llama 4 format; the broad parity suite (tools, images, /tokenize) is in test_chat_template.py."""
    from transformers import AutoTokenizer

    from maverick_ray.checkpoint.tokenizer import ChatTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_ckpt)
    ours = ChatTokenizer.from_pretrained(tiny_ckpt)
    conversations = [
        [{"role": "user", "content": "Hello!"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three experts."}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello, how are you?"},
         {"role": "user", "content": [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a story."}]}],
    ]
    for conv in conversations:
        ref = hf.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
        ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
        assert ours.apply_chat_template(conv) == list(ref)
    text = ours.render(conversations[1])
    assert text == ("<|begin_of_text|><|header_start|>system<|header_end|>\n\nYou are terse.<|eot|>"
                    "<|header_start|>user<|header_end|>\n\nName three experts.<|eot|>"
                    "<|header_start|>assistant<|header_end|>\n\n")
    assert ours.decode(ours.encode("The quick brown fox, 42 times!")) == "The quick brown fox, 42 times!"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_safetensors(path, fn):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path, tiny_ckpt):
    ck = _copy(tiny_ckpt, tmp_path / "c")
    _edit_safetensors(ck / "model.safetensors",
                      lambda t: t.pop("language_model.model.layers.2.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.self_attn\.k_proj\.weight: missing"):
        load_state_dict(ck, progress=False)


def test_wrong_shape_is_named_with_file(tmp_path, tiny_ckpt):
    ck = _copy(tiny_ckpt, tmp_path / "c")
    name = "language_model.model.layers.1.feed_forward.router.weight"
    _edit_safetensors(ck / "model.safetensors", lambda t: t.__setitem__(name, torch.zeros(3, 64)))
    with pytest.raises(CheckpointError, match=r"router\.weight: shape \(3, 64\) in model\.safetensors"):
        load_state_dict(ck, progress=False)


def test_missing_shard_and_bad_index_are_named(tmp_path, tiny_split_ckpt):
    ck = _copy(tiny_split_ckpt, tmp_path / "c")
    shard = sorted(ck.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: shard listed in model.safetensors.index.json"):
        load_state_dict(ck, progress=False)
    (ck / "model.safetensors.index.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not valid JSON"):
        load_state_dict(ck, progress=False)
    (ck / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="weight_map"):
        load_state_dict(ck, progress=False)


def test_no_weights_and_bad_config_are_named(tmp_path, tiny_ckpt):
    ck = _copy(tiny_ckpt, tmp_path / "c")
    (ck / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in"):
        load_state_dict(ck, progress=False)
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    cfg["text_config"]["num_key_value_heads"] = 3
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"text_config\.num_key_value_heads: num_attention_heads \(4\)"):
        ModelConfig.from_pretrained(ck)
    (ck / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(ck)


def test_corrupt_safetensors_is_named(tmp_path, tiny_ckpt):
    ck = _copy(tiny_ckpt, tmp_path / "c")
    (ck / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_state_dict(ck, progress=False)
