"""Greedy references for engine tests: our single-process model, or transformers."""

from __future__ import annotations

from pathlib import Path

import torch

from maverick_ray.config import ModelConfig


def prompts_for(ckpt) -> list[list[int]]:
    vocab = ModelConfig.from_pretrained(ckpt).text.vocab_size
    g = torch.Generator().manual_seed(1)
    return [torch.randint(10, vocab - 50, (n,), generator=g).tolist() for n in (5, 17, 40)]


_REFERENCES: dict[tuple, list[list[int]]] = {}


def checkpoint_state(ckpt) -> tuple:
    """What a cached reference depends on: the checkpoint's files, as they are now."""
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(Path(ckpt).iterdir()) if f.is_file())


def greedy_reference(ckpt, prompts, max_tokens: int, use_hf: bool, hf_piece: int = 0) -> list[list[int]]:
    """Greedy continuations of `prompts` from our single-process model or transformers. Computed
    once per session for the same checkpoint files, prompts and length (several tests and
    parametrized cases compare against the same reference; each gets its own copy).

    hf_piece > 0: transformers prefills each prompt `hf_piece` tokens at a time through its own
    cache (`hf_greedy_in_pieces`), for prompts whose one-shot eager attention would not fit."""
    key = (str(Path(ckpt).resolve()), checkpoint_state(ckpt), tuple(map(tuple, prompts)), max_tokens, use_hf,
           hf_piece)
    if key not in _REFERENCES:
        if hf_piece:
            if not use_hf:
                raise ValueError("hf_piece is a transformers reference: it needs use_hf=True")
            model = _hf_model(ckpt)  # loaded once for every prompt
            _REFERENCES[key] = [hf_greedy_in_pieces(model, p, max_tokens, hf_piece) for p in prompts]
        else:
            _REFERENCES[key] = _greedy_reference(ckpt, prompts, max_tokens, use_hf)
    return [list(out) for out in _REFERENCES[key]]


def _hf_model(ckpt):
    from transformers import Llama4ForConditionalGeneration

    return Llama4ForConditionalGeneration.from_pretrained(ckpt, torch_dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy_in_pieces(model, prompt: list[int], max_tokens: int, piece: int) -> list[int]:
    """transformers' greedy continuation of one prompt, prefilled `piece` tokens per forward into
    its own DynamicCache (chunked-attention layers as transformers windows them). Eager attention
    over a 32k prompt in one forward needs tens of GB; in 1024-token pieces it needs ~0.5 GB."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.get_text_config())
    ids = torch.tensor([prompt])
    for s in range(0, len(prompt), piece):
        out = model(input_ids=ids[:, s:s + piece], past_key_values=cache, use_cache=True, logits_to_keep=1)
    tokens = []
    for _ in range(max_tokens):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(input_ids=torch.tensor([tokens[-1:]]), past_key_values=cache, use_cache=True)
    return tokens


@torch.no_grad()
def _greedy_reference(ckpt, prompts, max_tokens: int, use_hf: bool) -> list[list[int]]:
    if use_hf:
        model = _hf_model(ckpt)
        outs = []
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(input_ids=ids, max_new_tokens=max_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
        return outs
    from maverick_ray.checkpoint.loader import load_state_dict
    from maverick_ray.model.batch import ForwardBatch
    from maverick_ray.model.kv_cache import PagedKVCache
    from maverick_ray.model.text import TextModel

    cfg = ModelConfig.from_pretrained(ckpt)
    model = TextModel(cfg.text).eval()
    model.load_state_dict(load_state_dict(ckpt, cfg, include_vision=False, progress=False))
    outs = []
    for p in prompts:
        t = cfg.text
        cache = PagedKVCache.for_sequences(t, 1, len(p) + max_tokens)
        logits = model(torch.tensor(p), ForwardBatch.single(len(p)), cache)
        out = []
        for i in range(max_tokens):
            out.append(int(logits[0].argmax()))
            logits = model(torch.tensor(out[-1:]), ForwardBatch.single(1, start=len(p) + i), cache)
        outs.append(out)
    return outs


def worker_tables(worker, reverse: bool = False):
    """Block tables over a RankWorker's KV pages, as the scheduler keeps them (reverse: hand out
    pages from the other end of the pool)."""
    from maverick_ray.engine.kv_blocks import BlockTables

    tables = BlockTables(worker.cache.layout, worker.cache.num_pages)
    if reverse:
        tables.free.reverse()
    return tables


def paged_work(tables, seq_id: str, start: int, tokens: list[int], params=None):
    """A SeqWork for positions start.. of a sequence, its pages allocated from `tables`."""
    from maverick_ray.engine.step_types import SeqWork

    first, pages = tables.allocate(seq_id, start, start + len(tokens))
    return SeqWork(seq_id, start, tokens, params, first=first, pages=pages)


def settle_rebalance(engine, timeout: float = 60.0) -> None:
    """Waits until the engine's live rebalance, asked for or staging, is swapped in or dropped
    (the loop finishes one on idle heartbeats when the traffic that started it has ended)."""
    import time

    deadline = time.monotonic() + timeout
    while engine.eplb.busy:
        assert time.monotonic() < deadline, f"the rebalance did not settle in {timeout:g} s: {engine.stats()['eplb']}"
        time.sleep(0.05)
