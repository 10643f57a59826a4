"""The training-mode model: the serving modules (TextModel, VisionModel) run under autograd.

Shape legend: T tokens of a batch (all sequences flattened), C text hidden, V vocab,
N image tiles of the batch, K patch tokens per tile.

There is no second model definition: `DemoModel` holds `model/text.py`'s TextModel and
`model/vision.py`'s VisionModel and fuses images as the engine does (projected features replace
the `<|patch|>` embeddings, in order). Under `torch.is_grad_enabled()` every layer takes its
torch path (the native RMSNorm, grouped-experts and paged-attention kernels have no backward and
are never attached here); the MoE block routes top-1 with the sigmoid score scaling each expert's
input, so gradients reach the router through the score.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoint.names import TEXT_PREFIX
from ..config import ModelConfig
from ..model.batch import ForwardBatch
from ..model.text import TextModel
from ..model.vision import VisionModel


class DemoModel(nn.Module):
    """Text decoder + vision tower and projector, with the checkpoint's tensor names."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.text = TextModel(cfg.text)
        self.vision = VisionModel(cfg) if cfg.vision is not None else None

    @classmethod
    def from_checkpoint(cls, ckpt) -> "DemoModel":
        """The model of an HF-layout checkpoint directory, in eval mode."""
        from ..checkpoint.loader import load_state_dict

        cfg = ModelConfig.from_pretrained(ckpt)
        model = cls(cfg)
        state = load_state_dict(ckpt, cfg, progress=False)
        vision_names = ("vision_model.", "multi_modal_projector.")
        model.text.load_state_dict({k: v for k, v in state.items() if not k.startswith(vision_names)})
        if model.vision is not None:
            model.vision.load_state_dict({k: v for k, v in state.items() if k.startswith(vision_names)})
        return model.eval()

    def init_weights(self, seed: int, fusion_std: float = 0.02) -> None:
        """Seeded init: matrices N(0, 0.02) (output projections scaled down by depth, as GPT-2
        does; the vision adapter and projector N(0, fusion_std)), norms 1, biases 0. TextModel
        leaves the experts uninitialised on purpose (they are loaded), so this must run before
        training."""
        g = torch.Generator().manual_seed(seed)
        depth = self.cfg.text.num_hidden_layers
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith(("norm.weight", "layernorm.weight", "layernorm_pre.weight", "layernorm_post.weight")):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                elif "vision_adapter." in name or "multi_modal_projector." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * fusion_std)
                else:
                    std = 0.02 / (2 * depth) ** 0.5 if name.endswith(("o_proj.weight", "down_proj.weight",
                                                                        "experts.down_proj")) else 0.02
                    p.copy_(torch.randn(p.shape, generator=g) * std)

    def forward(self, ids: torch.Tensor, lengths: list[int], pixels: torch.Tensor | None = None,
                routed_ids: list | None = None) -> torch.Tensor:
        """ids (T,) of sequences of `lengths` (each from position 0), pixels (N, 3, S, S) for the
        batch's images in order -> logits (T, V)."""
        x = self.text.embed(ids)                                             # (T, C)
        if pixels is not None and pixels.shape[0]:
            pos = (ids == self.cfg.image_token_id).nonzero().squeeze(1)     # (N*K,)
            feats = self.vision(pixels).to(x.dtype)                          # (N*K, C)
            if pos.numel() != feats.shape[0]:
                raise ValueError(f"{pos.numel()} patch tokens for {feats.shape[0]} image features")
            x = x.index_copy(0, pos, feats)
        batch = ForwardBatch.build([0] * len(lengths), lengths, device=ids.device)
        return self.text(inputs_embeds=x, batch=batch, all_logits=True, routed_ids=routed_ids)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """On-disk (HF) name -> tensor, contiguous fp32 copies."""
        out = {TEXT_PREFIX + k: v.detach().float().contiguous().clone() for k, v in self.text.state_dict().items()}
        if self.vision is not None:
            out.update({k: v.detach().float().contiguous().clone() for k, v in self.vision.state_dict().items()})
        return out
