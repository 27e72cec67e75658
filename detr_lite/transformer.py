"""Stages 2b-4: DETR's encoder-decoder transformer (batch-first), and attention-map capture.

Shapes (batch-first, d = d_model): image tokens ``src``/``memory`` ``[B, HW, d]``, their positional code
``pos`` ``[B, HW, d]``, padding ``mask`` ``[B, HW]`` (True = padded), object queries ``query_embed``
``[Q, d]``, decoder output ``hs`` ``[L, B, Q, d]`` (one slice per decoder layer).
The official code is sequence-first (``[HW, B, d]``, ``[L, Q, B, d]``); the maths is identical.

Official DETR semantics (post-norm, ReLU FFN, dropout 0.1):

* encoder layer:  ``q = k = src + pos``, ``v = src``; ``src = norm1(src + attn)``; ``src = norm2(src + ffn(src))``
* decoder layer:  self-attention ``q = k = tgt + query_pos``, ``v = tgt`` -> ``norm1``;
  cross-attention ``q = tgt + query_pos``, ``k = memory + pos``, ``v = memory`` (padded keys masked) ->
  ``norm2``; FFN -> ``norm3``. ``tgt`` starts at zeros; the *learned* ``query_embed`` is only a positional code.
* the decoder's final LayerNorm is shared and applied to every layer's output (for the auxiliary losses).

``Attention`` keeps ``nn.MultiheadAttention``'s parameter names (``in_proj_weight`` = q, k, v stacked,
``in_proj_bias``, ``out_proj``), so official checkpoints load unchanged, but computes with
``F.scaled_dot_product_attention`` (fused, never materialises the weights) unless ``capture_attention``
asks for the weights.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head attention, batch-first, parameter-compatible with ``nn.MultiheadAttention``.

    ``forward(query [B, Lq, d], key [B, Lk, d], value [B, Lk, d], key_padding_mask [B, Lk] or None)``
    returns ``[B, Lq, d]``. When ``query is key`` the q and k projections share one matrix multiply.
    Attention-probability dropout is applied in training mode, like ``nn.MultiheadAttention``.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"Attention: embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)
        self._record: dict[str, Tensor] | None = None  # set by capture_attention
        self._record_name = ""

    def _heads(self, x: Tensor) -> Tensor:  # [B, L, d] -> [B, heads, L, d/heads]
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, -1).transpose(1, 2)

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        d = self.embed_dim
        w, bias = self.in_proj_weight, self.in_proj_bias
        if query is key:
            q, k = F.linear(query, w[: 2 * d], bias[: 2 * d]).chunk(2, dim=-1)
        else:
            q = F.linear(query, w[:d], bias[:d])
            k = F.linear(key, w[d : 2 * d], bias[d : 2 * d])
        v = F.linear(value, w[2 * d :], bias[2 * d :])
        q, k, v = self._heads(q), self._heads(k), self._heads(v)

        # boolean SDPA mask: True = this key takes part; broadcast over heads and queries
        keep = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        p = self.dropout if self.training else 0.0
        if self._record is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)
        else:  # explicit softmax so that the weights can be recorded
            scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            if keep is not None:
                scores = scores.masked_fill(~keep, float("-inf"))
            weights = scores.softmax(dim=-1)
            self._record[self._record_name] = weights.detach()
            out = F.dropout(weights, p, training=self.training) @ v
        out = out.transpose(1, 2).flatten(2)  # [B, Lq, d]
        return self.out_proj(out)


class _Layer(nn.Module):
    """What encoder and decoder layers share: self-attention, the ReLU FFN ``linear2(relu(linear1(x)))``,
    one LayerNorm and one dropout per sub-layer (``norm1..``, ``dropout1..``) and the norm placement.
    Subclasses set ``cross`` (whether a cross-attention sub-layer sits between the two). Attribute names
    (and their order) are the official ones, so official state dicts load unchanged."""

    cross = False

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        pre_norm: bool = False,
    ):
        super().__init__()
        self.pre_norm = pre_norm
        self.self_attn = Attention(d_model, nhead, dropout=dropout)
        if self.cross:
            self.multihead_attn = Attention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        n = 3 if self.cross else 2  # sub-layers: self-attn, (cross-attn), FFN
        for i in range(1, n + 1):
            setattr(self, f"norm{i}", nn.LayerNorm(d_model))
        for i in range(1, n + 1):
            setattr(self, f"dropout{i}", nn.Dropout(dropout))

    def ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class TransformerEncoderLayer(_Layer):
    """Encoder layer: self-attention over image tokens, then a ReLU FFN.

    Post-norm (official default): ``x = norm(x + sublayer(x))``. ``pre_norm=True`` (official
    ``--pre_norm``): ``x = x + sublayer(norm(x))``, and the encoder then ends with a final LayerNorm.
    """

    cross = False  # self-attention, FFN

    def forward(
        self, src: Tensor, pos: Tensor | None = None, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        if self.pre_norm:
            x = self.norm1(src)
            q = x if pos is None else x + pos
            src = src + self.dropout1(self.self_attn(q, q, x, key_padding_mask))
            return src + self.dropout2(self.ffn(self.norm2(src)))
        q = src if pos is None else src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(q, q, src, key_padding_mask)))
        return self.norm2(src + self.dropout2(self.ffn(src)))


class TransformerDecoderLayer(_Layer):
    """Decoder layer: query self-attention, cross-attention into the image, ReLU FFN (post-norm, or
    pre-norm with ``pre_norm=True`` as in the encoder layer)."""

    cross = True  # self-attention, cross-attention, FFN

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Tensor | None = None,
        pos: Tensor | None = None,
        query_pos: Tensor | None = None,
    ) -> Tensor:
        k = memory if pos is None else memory + pos
        if self.pre_norm:
            x = self.norm1(tgt)
            q = x if query_pos is None else x + query_pos
            tgt = tgt + self.dropout1(self.self_attn(q, q, x))
            x = self.norm2(tgt)
            q = x if query_pos is None else x + query_pos
            tgt = tgt + self.dropout2(self.multihead_attn(q, k, memory, memory_key_padding_mask))
            return tgt + self.dropout3(self.ffn(self.norm3(tgt)))
        q = tgt if query_pos is None else tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, q, tgt)))
        q = tgt if query_pos is None else tgt + query_pos
        cross = self.multihead_attn(q, k, memory, memory_key_padding_mask)
        tgt = self.norm2(tgt + self.dropout2(cross))
        return self.norm3(tgt + self.dropout3(self.ffn(tgt)))


def _clones(layer: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(layer) for _ in range(n))


class TransformerEncoder(nn.Module):
    """``num_layers`` encoder layers, then ``norm`` if given (official: a final LayerNorm only for pre-norm)."""

    def __init__(self, layer: TransformerEncoderLayer, num_layers: int, norm: nn.Module | None = None):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.norm = norm

    def forward(
        self, src: Tensor, pos: Tensor | None = None, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos, key_padding_mask)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    """``num_layers`` decoder layers; ``norm`` (shared) is applied to each layer's output.

    Returns ``[L, B, Q, d]`` when ``return_intermediate`` (DETR's auxiliary losses), else ``[1, B, Q, d]``.
    """

    def __init__(
        self, layer: TransformerDecoderLayer, num_layers: int, d_model: int, return_intermediate=True
    ):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.norm = nn.LayerNorm(d_model)
        self.return_intermediate = return_intermediate

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Tensor | None = None,
        pos: Tensor | None = None,
        query_pos: Tensor | None = None,
    ) -> Tensor:
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask, pos, query_pos)
            if self.return_intermediate:
                outputs.append(self.norm(tgt))
        if not self.return_intermediate:
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


class Transformer(nn.Module):
    """DETR's encoder-decoder. ``forward(src [B,HW,d], mask [B,HW] or None, query_embed [Q,d], pos [B,HW,d])``
    -> ``(hs [L, B, Q, d], memory [B, HW, d])``. Pass ``mask=None`` when nothing is padded (faster)."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        return_intermediate_dec: bool = True,
        pre_norm: bool = False,
    ):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        enc = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm)
        dec = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm)
        enc_norm = nn.LayerNorm(d_model) if pre_norm else None  # official: encoder_norm only for pre-norm
        self.encoder = TransformerEncoder(enc, num_encoder_layers, enc_norm)
        self.decoder = TransformerDecoder(dec, num_decoder_layers, d_model, return_intermediate_dec)
        for p in self.parameters():  # official init: Xavier-uniform for every matrix
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self, src: Tensor, mask: Tensor | None, query_embed: Tensor, pos: Tensor
    ) -> tuple[Tensor, Tensor]:
        b, n, d = src.shape
        if d != self.d_model or pos.shape != src.shape or query_embed.dim() != 2 or query_embed.shape[1] != d:
            raise ValueError(
                f"Transformer: expected src/pos [B, HW, {self.d_model}] and query_embed [Q, {self.d_model}], "
                f"got src {tuple(src.shape)}, pos {tuple(pos.shape)}, query_embed {tuple(query_embed.shape)}"
            )
        if mask is not None and tuple(mask.shape) != (b, n):
            raise ValueError(f"Transformer: expected mask [B, HW] = {(b, n)}, got {tuple(mask.shape)}")
        memory = self.encoder(src, pos, mask)
        query_pos = query_embed.unsqueeze(0).expand(b, -1, -1)
        tgt = torch.zeros_like(query_pos)
        hs = self.decoder(tgt, memory, mask, pos, query_pos)
        return hs, memory


@contextlib.contextmanager
def capture_attention(model: nn.Module, layers: Iterable[str] | None = None) -> Iterator[dict[str, Tensor]]:
    """Record attention weights during forward passes inside the ``with`` block, without editing the model.

    ``with capture_attention(model) as attn: model(images, mask)`` fills
    ``attn = {qualified module name: weights [B, heads, Lq, Lk]}`` (softmax over keys, padded keys get 0;
    detached; a module called twice keeps its last call). ``layers`` restricts the capture to modules whose
    name starts with one of the given prefixes (e.g. ``["transformer.decoder"]``).

    Works on this package's ``Attention`` and on any ``nn.MultiheadAttention`` (the latter through hooks
    that force ``need_weights=True, average_attn_weights=False``; call it with keyword arguments for those).
    Outside the block nothing changes: attention runs on the fused path without weights.
    """
    prefixes = None if layers is None else tuple(layers)
    record: dict[str, Tensor] = {}
    handles = []
    ours = []
    for name, module in model.named_modules():
        if prefixes is not None and not name.startswith(prefixes):
            continue
        if isinstance(module, Attention):
            module._record, module._record_name = record, name
            ours.append(module)
        elif isinstance(module, nn.MultiheadAttention):

            def pre(mod, args, kwargs):
                kwargs["need_weights"] = True
                kwargs["average_attn_weights"] = False
                return args, kwargs

            def post(mod, args, kwargs, output, _name=name):
                if output[1] is not None:
                    weights = output[1].detach()
                    record[_name] = weights if weights.dim() == 4 else weights[None]  # unbatched input
                return output

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        yield record
    finally:
        for module in ours:
            module._record, module._record_name = None, ""
        for handle in handles:
            handle.remove()
