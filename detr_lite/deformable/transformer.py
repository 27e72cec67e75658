"""Deformable DETR's transformer: multi-scale deformable encoder + decoder (batch-first).

Inputs are the projected pyramid levels ``srcs`` (list of ``[B, d, H_l, W_l]``), their padding masks
(``[B, H_l, W_l]``, True = padded) and sine position codes. Everything is flattened level after level
into one token sequence ``[B, S, d]`` with ``S = sum_l H_l * W_l``; ``spatial_shapes`` ``[L, 2]`` and
``level_start_index`` ``[L]`` remember where each level lives in that sequence.

Official semantics (fundamentalvision/Deformable-DETR), parameter names included:

* ``level_embed`` ``[L, d]`` is added to each level's position code, so a token knows its scale.
* ``valid_ratios`` ``[B, L, 2]`` = (valid width, valid height) / (padded W, H) per level.
* Encoder layer: deformable *self*-attention ``query = src + pos`` around the token's own cell
  centre, post-norm, ReLU FFN (``d_ffn`` 1024). Reference points of the encoder are the cell
  centres normalised by the *valid* size, then scaled by every level's valid ratio.
* Decoder layer: ordinary self-attention among queries (``q = k = tgt + query_pos``) -> ``norm2``;
  deformable cross-attention into the encoder memory around the query's reference point -> ``norm1``;
  FFN -> ``norm3``. ``query_embed`` ``[Q, 2d]`` is split into ``query_pos`` and ``tgt``; the initial
  reference points are ``sigmoid(reference_points(query_pos))``.
* Iterative box refinement: the decoder receives the per-layer box heads; after layer ``i`` the
  reference becomes ``sigmoid(bbox_embed[i](h) + inverse_sigmoid(reference))`` (detached).
* Two-stage: every encoder token proposes a box (``gen_encoder_output_proposals``), the top-``Q``
  by the first class logit become the decoder's reference boxes, and their sine code (``pos_trans``)
  gives ``query_pos`` and ``tgt``.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr_lite.deformable.msda import MSDeformAttn
from detr_lite.transformer import Attention


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``log(x / (1 - x))`` with x clamped to [eps, 1 - eps] (the official helper)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _as_shape_list(spatial_shapes) -> list:
    """``[L, 2]`` tensor -> list of ``(h, w)``; a list or tuple of pairs is returned as is."""
    return spatial_shapes.tolist() if isinstance(spatial_shapes, Tensor) else list(spatial_shapes)


def get_valid_ratio(mask: Tensor) -> Tensor:
    """``[B, H, W]`` padding mask -> ``[B, 2]`` (valid_W / W, valid_H / H), counted on the first row/col."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


class DeformableTransformerEncoderLayer(nn.Module):
    """Deformable self-attention over all levels + FFN, post-norm."""

    def __init__(
        self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4, implementation="auto"
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, implementation=implementation)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        attended = self.self_attn(
            src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask, validate=False
        )
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, layer: DeformableTransformerEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes, valid_ratios: Tensor, device) -> Tensor:
        """Centres of every cell of every level -> ``[B, S, L, 2]`` reference points.

        ``spatial_shapes``: ``[L, 2]`` tensor or a list of ``(h, w)`` (Python ints, or the symbolic
        sizes of ``torch.export``: the list keeps the shapes out of tensor data, so nothing is read
        back with ``.tolist()`` and an exported graph follows the input size).

        Cell (i, j) of level l has centre ((j + 0.5) / (valid_W_l), (i + 0.5) / (valid_H_l)) in units of the
        valid image (the official normalisation); multiplying by each level's valid ratio expresses it in
        that level's padded map, which is what the sampling code expects.
        """
        refs = []
        for lvl, (h, w) in enumerate(_as_shape_list(spatial_shapes)):
            # = linspace(0.5, h - 0.5, h), exactly; arange keeps h symbolic under torch.export
            ys = torch.arange(h, dtype=torch.float32, device=device) + 0.5
            xs = torch.arange(w, dtype=torch.float32, device=device) + 0.5
            ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((ref_x, ref_y), -1))
        ref = torch.cat(refs, 1)  # [B, S, 2]
        return ref[:, :, None] * valid_ratios[:, None]  # [B, S, L, 2]

    def forward(self, src, spatial_shapes, level_start_index, valid_ratios, pos, padding_mask=None, shapes=None):
        """``shapes``: the level sizes as a list of ``(h, w)`` (default: read from ``spatial_shapes``)."""
        reference_points = self.get_reference_points(
            spatial_shapes if shapes is None else shapes, valid_ratios, src.device
        )
        out = src
        for layer in self.layers:
            out = layer(out, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return out


class DeformableTransformerDecoderLayer(nn.Module):
    """Query self-attention -> deformable cross-attention into the memory -> FFN (post-norm)."""

    def __init__(
        self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4, implementation="auto"
    ):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, implementation=implementation)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = Attention(d_model, n_heads, dropout=dropout)  # nn.MultiheadAttention's names
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self, tgt, query_pos, reference_points, src, spatial_shapes, level_start_index, src_padding_mask
    ):
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, q, tgt)))
        attended = self.cross_attn(
            tgt + query_pos,
            reference_points,
            src,
            spatial_shapes,
            level_start_index,
            src_padding_mask,
            validate=False,
        )
        tgt = self.norm1(tgt + self.dropout1(attended))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class DeformableTransformerDecoder(nn.Module):
    """Stack of decoder layers; returns every layer's output and the reference points it produced."""

    def __init__(self, layer: DeformableTransformerDecoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers

    def forward(
        self,
        tgt,
        reference_points,
        src,
        spatial_shapes,
        level_start_index,
        valid_ratios,
        query_pos,
        src_padding_mask=None,
        bbox_embed: nn.ModuleList | None = None,
    ):
        """``reference_points`` ``[B, Q, 2]`` (points) or ``[B, Q, 4]`` (boxes), normalised to the valid
        image. ``bbox_embed`` (per-layer box heads) switches on iterative refinement. Returns
        ``hs [L, B, Q, d]`` and ``references [L, B, Q, 2 or 4]`` (the reference after each layer)."""
        out = tgt
        hs, refs = [], []
        for lid, layer in enumerate(self.layers):
            # express the reference (relative to the valid image) in every level's padded map
            if reference_points.shape[-1] == 4:
                ratios = torch.cat([valid_ratios, valid_ratios], -1)
            else:
                ratios = valid_ratios
            ref_input = reference_points[:, :, None] * ratios[:, None]
            out = layer(out, query_pos, ref_input, src, spatial_shapes, level_start_index, src_padding_mask)
            if bbox_embed is not None:  # iterative refinement: this layer's box becomes the next reference
                delta = bbox_embed[lid](out)
                if reference_points.shape[-1] == 4:
                    new_ref = (delta + inverse_sigmoid(reference_points)).sigmoid()
                else:
                    new_ref = torch.cat(
                        [delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1
                    )
                    new_ref = new_ref.sigmoid()
                reference_points = new_ref.detach()
            hs.append(out)
            refs.append(reference_points)
        return torch.stack(hs), refs


class DeformableTransformer(nn.Module):
    """Flatten the pyramid, encode it, pick queries (learned or two-stage proposals), decode."""

    def __init__(
        self,
        d_model=256,
        nhead=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dim_feedforward=1024,
        dropout=0.1,
        num_feature_levels=4,
        dec_n_points=4,
        enc_n_points=4,
        two_stage=False,
        two_stage_num_proposals=300,
        implementation="auto",
    ):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.num_feature_levels = num_feature_levels
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        enc_layer = DeformableTransformerEncoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points, implementation
        )
        self.encoder = DeformableTransformerEncoder(enc_layer, num_encoder_layers)
        dec_layer = DeformableTransformerDecoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, dec_n_points, implementation
        )
        self.decoder = DeformableTransformerDecoder(dec_layer, num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    # ------------------------------------------------------------------------------ two-stage helpers
    @staticmethod
    def get_proposal_pos_embed(
        proposals: Tensor, num_pos_feats: int = 128, temperature: float = 10000
    ) -> Tensor:
        """Sine code of unnormalised boxes ``[B, Q, 4]`` -> ``[B, Q, 4 * num_pos_feats]`` (= 2d: the
        official code fixes 128 features per coordinate for d = 256; we use d / 2 in general)."""
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
        pos = proposals.sigmoid() * (2 * math.pi)
        pos = pos[:, :, :, None] / dim_t  # [B, Q, 4, F]
        return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)

    def gen_encoder_output_proposals(self, memory: Tensor, padding_mask: Tensor, spatial_shapes):
        """One box proposal per encoder token: its cell centre with side 0.05 * 2^level (in valid-image
        units), as logits. Padded or border tokens (any coordinate outside (0.01, 0.99)) get +inf and a
        zeroed memory. Returns (``enc_output_norm(enc_output(memory))`` [B, S, d], proposals [B, S, 4])."""
        b = memory.shape[0]
        proposals = []
        cur = 0
        for lvl, (h, w) in enumerate(_as_shape_list(spatial_shapes)):
            mask_l = padding_mask[:, cur : cur + h * w].view(b, h, w)
            valid_h = (~mask_l[:, :, 0]).sum(1)
            valid_w = (~mask_l[:, 0, :]).sum(1)
            grid_y, grid_x = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=memory.device),  # = linspace(0, h - 1, h)
                torch.arange(w, dtype=torch.float32, device=memory.device),
                indexing="ij",
            )
            grid = torch.stack([grid_x, grid_y], -1)  # [h, w, 2]
            scale = torch.stack([valid_w, valid_h], 1).view(b, 1, 1, 2)
            grid = (grid[None].expand(b, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0**lvl)
            proposals.append(torch.cat((grid, wh), -1).view(b, -1, 4))
            cur += h * w
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        proposals = proposals.masked_fill(padding_mask[..., None], float("inf"))
        proposals = proposals.masked_fill(~valid, float("inf"))
        out_memory = memory.masked_fill(padding_mask[..., None], 0.0).masked_fill(~valid, 0.0)
        return self.enc_output_norm(self.enc_output(out_memory)), proposals

    # ------------------------------------------------------------------------------------- forward
    def forward(
        self,
        srcs: list[Tensor],
        masks: list[Tensor],
        pos_embeds: list[Tensor],
        query_embed: Tensor | None = None,
        class_embed: nn.ModuleList | None = None,
        bbox_embed: nn.ModuleList | None = None,
        refine: bool = False,
    ) -> dict:
        """Returns a dict with ``hs`` [L, B, Q, d], ``init_reference`` [B, Q, 2|4], ``references``
        (list of L [B, Q, 2|4]), ``memory`` [B, S, d], ``spatial_shapes``, ``level_start_index``,
        ``valid_ratios``, ``mask_flatten`` and, for two-stage, ``enc_outputs_class`` [B, S, K] and
        ``enc_outputs_coord_unact`` [B, S, 4]. ``class_embed``/``bbox_embed`` are the model's heads
        (two-stage uses the extra last pair on the encoder; refinement uses the per-layer boxes)."""
        if len(srcs) != self.num_feature_levels or len(masks) != len(srcs) or len(pos_embeds) != len(srcs):
            raise ValueError(
                f"DeformableTransformer: expected {self.num_feature_levels} levels of srcs/masks/pos_embeds, "
                f"got {len(srcs)}/{len(masks)}/{len(pos_embeds)}"
            )
        if not self.two_stage and query_embed is None:
            raise ValueError("DeformableTransformer: query_embed [Q, 2d] is required unless two_stage=True")

        # flatten every level to [B, H_l*W_l, d] and concatenate
        src_flat, mask_flat, pos_flat, shapes = [], [], [], []
        for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            b, c, h, w = src.shape
            if c != self.d_model or tuple(mask.shape) != (b, h, w) or tuple(pos.shape) != (b, c, h, w):
                raise ValueError(
                    f"DeformableTransformer: level {lvl}: src {tuple(src.shape)} (expected C={self.d_model}), "
                    f"mask {tuple(mask.shape)}, pos {tuple(pos.shape)} must agree"
                )
            shapes.append((h, w))
            src_flat.append(src.flatten(2).transpose(1, 2))
            mask_flat.append(mask.flatten(1))
            pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src_flat = torch.cat(src_flat, 1)
        mask_flat = torch.cat(mask_flat, 1)
        pos_flat = torch.cat(pos_flat, 1)
        # [L, 2] built with tensor ops, not torch.as_tensor: under torch.export the sizes are symbolic
        # and as_tensor would fix them to the example input's
        spatial_shapes = torch.stack(
            [torch.stack([torch.full((), v, dtype=torch.long, device=src_flat.device) for v in hw]) for hw in shapes]
        )
        level_start_index = torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([get_valid_ratio(m) for m in masks], 1)  # [B, L, 2]

        # the Python list of sizes goes along, so that no size is read back from a tensor (torch.export)
        memory = self.encoder(
            src_flat, spatial_shapes, level_start_index, valid_ratios, pos_flat, mask_flat, shapes=shapes
        )

        b, _, c = memory.shape
        out = {}
        if self.two_stage:
            if class_embed is None or bbox_embed is None:
                raise ValueError(
                    "DeformableTransformer: two_stage needs the model's class_embed and bbox_embed"
                )
            out_memory, out_proposals = self.gen_encoder_output_proposals(memory, mask_flat, shapes)
            n_dec = self.decoder.num_layers
            enc_class = class_embed[n_dec](out_memory)
            enc_coord_unact = bbox_embed[n_dec](out_memory) + out_proposals
            # official choice: rank proposals by the logit of the first class
            topk = torch.topk(enc_class[..., 0], self.two_stage_num_proposals, dim=1)[1]
            topk_coords_unact = torch.gather(enc_coord_unact, 1, topk[..., None].expand(-1, -1, 4)).detach()
            reference_points = topk_coords_unact.sigmoid()
            pos_trans = self.pos_trans_norm(
                self.pos_trans(self.get_proposal_pos_embed(topk_coords_unact, c // 2))
            )
            query_pos, tgt = torch.split(pos_trans, c, dim=2)
            out["enc_outputs_class"] = enc_class
            out["enc_outputs_coord_unact"] = enc_coord_unact
        else:
            query_pos, tgt = torch.split(query_embed, c, dim=1)
            query_pos = query_pos[None].expand(b, -1, -1)
            tgt = tgt[None].expand(b, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()

        hs, references = self.decoder(
            tgt,
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            query_pos,
            mask_flat,
            bbox_embed=bbox_embed if refine else None,
        )
        out.update(
            hs=hs,
            init_reference=reference_points,
            references=references,
            memory=memory,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
            valid_ratios=valid_ratios,
            mask_flatten=mask_flat,
        )
        return out
