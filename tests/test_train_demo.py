"""Training the demo model (maverick_ray/train): autograd through the serving modules, the data's
masks and determinism. Runs on the tiny preset, so it is fast."""

from __future__ import annotations

import random

import pytest
import torch

from maverick_ray.config import ModelConfig


@pytest.fixture(scope="module")
def tiny_parts(tiny_ckpt):
    from maverick_ray.checkpoint.tokenizer import ChatTokenizer
    from maverick_ray.train.conversations import ChatEncoder

    cfg = ModelConfig.from_pretrained(tiny_ckpt)
    tok = ChatTokenizer.from_pretrained(tiny_ckpt)
    return cfg, tok, ChatEncoder(tok, cfg)


def _image_batch(encoder, seed=0):
    from maverick_ray.train.batches import pack
    from maverick_ray.train.data_images import image_example

    rng = random.Random(seed)
    png, q, a = image_example(rng, size=56)
    seqs = [encoder.encode([(q, a, png)]), encoder.encode([("What is 12+30?", "42", None), ("Hi!", "Hello", None)])]
    return pack(seqs)


def test_gradients_reach_router_experts_shared_expert_vision_and_projector(tiny_parts):
    from maverick_ray.train.model import DemoModel

    cfg, _, encoder = tiny_parts
    model = DemoModel(cfg)
    model.init_weights(0)
    batch = _image_batch(encoder)
    routed_ids: list = []
    logits = model(batch.ids, batch.lengths, batch.pixels, routed_ids=routed_ids)
    # every position in the loss, so every routed row matters (with the answer-only mask, the
    # last MoE layer's prompt rows rightly get no gradient)
    torch.nn.functional.cross_entropy(logits[:-1], batch.ids[1:]).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for block, ids in zip(model.text.moe_blocks, routed_ids):
        routed = torch.bincount(ids.reshape(-1), minlength=block.num_experts)
        assert block.router.weight.grad.abs().sum() > 0          # through the sigmoid score scaling the input
        assert block.shared_expert.up_proj.weight.grad.abs().sum() > 0
        per_expert = block.experts.gate_up_proj.grad.abs().sum(dim=(1, 2))  # (E,)
        assert torch.equal(per_expert > 0, routed > 0)           # exactly the experts tokens went to
    for name in ("vision.vision_model.patch_embedding.linear.weight", "vision.vision_model.model.layers.0.mlp.fc1.weight",
                 "vision.vision_model.vision_adapter.mlp.fc1.weight", "vision.multi_modal_projector.linear_1.weight"):
        assert grads[name].abs().sum() > 0, name


def test_training_forward_equals_the_inference_forward(tiny_parts):
    """Grad mode takes the torch paths; the values must be those of inference (no_grad)."""
    from maverick_ray.train.model import DemoModel

    cfg, _, encoder = tiny_parts
    model = DemoModel(cfg)
    model.init_weights(1)
    batch = _image_batch(encoder, seed=3)
    train_logits = model(batch.ids, batch.lengths, batch.pixels)
    with torch.no_grad():
        infer_logits = model(batch.ids, batch.lengths, batch.pixels)
    assert train_logits.requires_grad
    assert torch.allclose(train_logits.detach(), infer_logits, atol=1e-5)


def test_loss_falls_when_training_on_one_batch(tiny_parts):
    from maverick_ray.train.loop import RouterTap, losses
    from maverick_ray.train.model import DemoModel

    cfg, _, encoder = tiny_parts
    torch.manual_seed(0)
    model = DemoModel(cfg)
    model.init_weights(0)
    tap = RouterTap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = _image_batch(encoder)
    first = None
    for _ in range(30):
        parts = losses(model, batch, tap)
        loss = parts["chat"] + 0.01 * parts["balance"]
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first


def test_chat_encoder_trains_only_the_answers_and_matches_the_serving_prompt(tiny_parts):
    _, tok, encoder = tiny_parts
    seq = encoder.encode([("What is 2+3?", "5", None), ("And 4+4?", "8", None)], system="Be brief.")
    answer_ids = [i for i, t in zip(seq.ids, seq.targets) if t]
    eot = tok.special_id("<|eot|>")
    assert answer_ids == tok.encode("5") + [eot] + tok.encode("8") + [eot]
    first_prompt = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "What is 2+3?"}])
    assert seq.ids[:len(first_prompt)] == first_prompt
    assert not any(seq.targets[:len(first_prompt)])


def test_image_turn_has_one_patch_token_per_feature(tiny_parts):
    from maverick_ray.train.data_images import image_example

    cfg, _, encoder = tiny_parts
    png, q, a = image_example(random.Random(0), size=120)   # several tiles + the global tile
    seq = encoder.encode([(q, a, png)])
    patches = sum(1 for i in seq.ids if i == cfg.image_token_id)
    assert seq.pixels.shape[0] > 1
    assert patches == seq.pixels.shape[0] * cfg.vision.tokens_per_tile


def test_data_is_deterministic_and_held_out_sums_are_never_trained(tiny_parts):
    from maverick_ray.train.batches import Mixture
    from maverick_ray.train.data_chat import addition, addition_held_out

    _, tok, encoder = tiny_parts
    docs = {"prose": [list(range(5, 400))], "code": [list(range(7, 300))]}
    mix = Mixture(docs, encoder, tok.special_id("<|begin_of_text|>"), seed=5, chat_tokens=300)
    a, b = mix.batch(3), mix.batch(3)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.ids[:50], mix.batch(4).ids[:50]) or a.lengths != mix.batch(4).lengths
    rng = random.Random(0)
    for _ in range(3000):
        q, ans = addition(rng)
        x, y = (int(v) for v in q.replace(" ", "").strip("?.=").split("is")[-1].replace("Add", "").replace(
            "thesumof", "").replace("Compute", "").replace("and", "+").split("+"))
        assert x + y == int(ans)
        assert not (x >= 10 and y >= 10 and addition_held_out(x, y))


def test_vision_pretraining_trains_only_the_vision_side_and_its_loss_falls(tiny_parts):
    from maverick_ray.train.model import DemoModel
    from maverick_ray.train.vision_pretrain import pretrain_vision

    cfg, _, _ = tiny_parts
    torch.manual_seed(0)
    model = DemoModel(cfg)
    model.init_weights(0, fusion_std=0.1)
    text_before = {k: v.clone() for k, v in model.text.state_dict().items()}
    proj_before = model.vision.multi_modal_projector.linear_1.weight.clone()
    losses = pretrain_vision(model, steps=30, lr=3e-3, seed=0, batch=8)
    assert len(losses) == 30 and sum(losses[-5:]) < 0.95 * sum(losses[:5])  # measured: 0.88
    assert all(torch.equal(v, text_before[k]) for k, v in model.text.state_dict().items())
    assert not torch.equal(model.vision.multi_modal_projector.linear_1.weight, proj_before)
