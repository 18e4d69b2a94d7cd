"""The authors' GM-DiT V2 (pi-Flow's student network), reproduced for the conversion tests.

The authors' class, ``_GMDiTTransformer2DModelV2`` in ``lakonlab/models/architecture/gmflow/gmdit_v2.py`` of
github.com/Lakonik/piFlow, subclasses diffusers' ``DiTTransformer2DModel`` but imports mmcv and mmgen (for
its registry, initialisation and checkpoint loading), which do not install on this test stack. This module
is the smallest faithful reproduction of what a converted checkpoint depends on: the same diffusers base
class, the same registered config fields (so ``config.json`` is what the authors' export tool writes), the
same sub-module names (so the state dict is theirs) and the same inference forward pass:

* a shared conditioning embedding ``emb``: diffusers' ``Timesteps(256, flip_sin_to_cos=True,
  downscale_freq_shift=0)`` (the original DiT's frequencies), ``TimestepEmbedding`` and a class table with
  ``num_classes + 1`` rows (the last is the null class), summed;
* blocks of adaLN-Zero (``norm1``), self-attention (``attn1``), a LayerNorm of eps ``norm_eps`` (``norm3``)
  modulated by the block's MLP shift/scale and a tanh-GELU MLP (``ff``), each branch gated;
* the head: LayerNorm (eps 1e-6) modulated by ``proj_out_1``, then ``proj_out_means`` (p·p·K·C per token)
  and ``proj_out_logweights`` (p·p·K per token, log-softmax over K) unpatchified to ``(N, K, C, H, W)`` and
  ``(N, K, 1, H, W)``, and ``proj_out_logstds`` (SiLU, Linear, SiLU, Linear) of the conditioning → ``(N, 1, 1,
  1, 1)``.

Training-only parts (label dropout, gradient checkpointing, the initialisation from a teacher) are left out.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.models import DiTTransformer2DModel
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import CombinedTimestepLabelEmbeddings, LabelEmbedding, PatchEmbed, Timesteps
from diffusers.models.normalization import AdaLayerNormZero
from torch import nn


class _LabelTable(LabelEmbedding):
    """A class table of num_classes + 1 rows and no label dropout (the authors' ``LabelEmbeddingMod``)."""

    def __init__(self, num_classes: int, hidden_size: int):
        nn.Module.__init__(self)
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes, self.dropout_prob = num_classes, 0.0


class _Conditioning(CombinedTimestepLabelEmbeddings):
    """Time + class embedding with the original DiT's frequencies (``CombinedTimestepLabelEmbeddingsMod``)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__(num_classes, dim, class_dropout_prob=0.0)
        self.time_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.class_embedder = _LabelTable(num_classes, dim)


class _Block(nn.Module):
    """One DiT block fed the shared conditioning (the authors' ``BasicTransformerBlockMod``)."""

    def __init__(self, dim: int, heads: int, head_dim: int, norm_eps: float):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim, None)
        self.attn1 = Attention(query_dim=dim, heads=heads, dim_head=head_dim, bias=True, out_bias=True)
        self.norm3 = nn.LayerNorm(dim, norm_eps, elementwise_affine=False)
        self.ff = FeedForward(dim, activation_fn="gelu-approximate")

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, emb=emb)
        x = x + gate_msa[:, None] * self.attn1(h)
        h = self.norm3(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp[:, None] * self.ff(h)


class _GMDiTTransformer2DModelV2(DiTTransformer2DModel):
    """GM-DiT V2 with the authors' config fields and module names; ``forward`` returns (means, logweights,
    logstds) as the authors' ``GMFlowModelOutput`` holds them."""

    @register_to_config
    def __init__(
        self,
        num_gaussians=16,
        constant_logstd=None,
        logstd_inner_dim=1024,
        gm_num_logstd_layers=2,
        class_dropout_prob=0.0,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        attention_bias: bool = True,
        sample_size: int = 32,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_zero",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-5,
    ):
        super(DiTTransformer2DModel, self).__init__()
        assert constant_logstd is None and gm_num_logstd_layers == 2 and out_channels in (None, in_channels)
        dim = num_attention_heads * attention_head_dim
        self.patch_size, self.out_channels = patch_size, in_channels
        self.pos_embed = PatchEmbed(
            height=sample_size, width=sample_size, patch_size=patch_size, in_channels=in_channels, embed_dim=dim
        )
        self.emb = _Conditioning(num_embeds_ada_norm, dim)
        self.transformer_blocks = nn.ModuleList(
            [_Block(dim, num_attention_heads, attention_head_dim, norm_eps) for _ in range(num_layers)]
        )
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out_1 = nn.Linear(dim, 2 * dim)
        pp = patch_size * patch_size
        self.proj_out_means = nn.Linear(dim, pp * num_gaussians * in_channels)
        self.proj_out_logweights = nn.Linear(dim, pp * num_gaussians)
        self.proj_out_logstds = nn.Sequential(
            nn.SiLU(), nn.Linear(dim, logstd_inner_dim), nn.SiLU(), nn.Linear(logstd_inner_dim, 1)
        )

    def _unpatchify(self, y: torch.Tensor, h: int, w: int, channels: int) -> torch.Tensor:
        """(N, h·w, p·p·K·ch) -> (N, K, ch, h·p, w·p): token (r, s), offset (i, j) is pixel (r·p + i, s·p + j)."""
        n, p, k = y.shape[0], self.patch_size, self.config.num_gaussians
        y = y.reshape(n, h, w, p, p, k * channels).permute(0, 5, 1, 3, 2, 4)
        return y.reshape(n, k, channels, h * p, w * p)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor):
        n, _, height, width = x.shape
        h, w = height // self.patch_size, width // self.patch_size
        tokens = self.pos_embed(x)
        cond = self.emb(timestep, class_labels, hidden_dtype=tokens.dtype)
        for block in self.transformer_blocks:
            tokens = block(tokens, cond)
        shift, scale = self.proj_out_1(F.silu(cond)).chunk(2, dim=1)
        tokens = self.norm_out(tokens) * (1 + scale[:, None]) + shift[:, None]
        means = self._unpatchify(self.proj_out_means(tokens), h, w, self.out_channels)
        logweights = self._unpatchify(self.proj_out_logweights(tokens), h, w, 1).log_softmax(dim=1)
        logstds = self.proj_out_logstds(cond.detach()).reshape(n, 1, 1, 1, 1)
        return means, logweights, logstds


def make_student(seed: int = 0, **config) -> _GMDiTTransformer2DModelV2:
    """The V2 network with random weights (every parameter drawn, the zero-initialised ones included), eval mode."""
    torch.manual_seed(seed)
    model = _GMDiTTransformer2DModelV2(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    return model


def export_student(model: _GMDiTTransformer2DModelV2, folder: str | os.PathLike, *, config: bool = True) -> None:
    """Writes the folder as the authors' ``tools/export_piflow_to_diffusers.py`` does: ``config.json`` (the
    registered fields, ``_class_name`` set to the config's type, ``GMDiTTransformer2DModelV2``; left out for
    ``config=False``, like a folder loaded only through the authors' ``pretrained=``) and
    ``diffusion_pytorch_model.safetensors`` with the policy in its metadata."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    if config:
        fields = json.loads(model.to_json_string())
        fields["_class_name"] = "GMDiTTransformer2DModelV2"
        with open(os.path.join(folder, "config.json"), "w") as f:
            f.write(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    metadata = {"policy_config": json.dumps({"type": "GMFlow"})}
    save_file(state, os.path.join(folder, "diffusion_pytorch_model.safetensors"), metadata=metadata)
