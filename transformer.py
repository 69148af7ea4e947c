"""The model: EfficientNet-B0 encoder with two non-local blocks, a transformer decoder, and
greedy / beam decoding with a key/value cache.

Encoder (Tan & Le, "EfficientNet", ICML 2019; efficientnet_pytorch 0.7.1, built with no download):
    image (B, 1, H, W), ink = 1
    -> stem + 16 MBConv blocks (output stride 16 here by default: the first block of stage 6 has stride 1;
       train.py's default is 16 for rows and 8 for columns, see _build_backbone),
       NonLocalBlock2D (Wang et al., CVPR 2018) after blocks 10 and 14
    -> _conv_head + _bn1 + swish: (B, 1280, h, w), h = ceil(H/16), w = ceil(W/16) (W/8 with 16x8)
    -> the "changed final FC": Linear(1280 -> d_model) at every position (the ImageNet `_fc` only saw
       the pooled vector and is dropped), + 2D sinusoidal positions -> memory (B, S = h*w, d_model)
    With a head_stride coarser than the output stride (train.py's default: 16x16 with 16x8), stages
    6-7 and the head run at the head stride; their projection is repeated back to the output stride
    and added to a projection of block 10's output (a top-down skip, see Encoder).
Decoder (Vaswani et al., "Attention is all you need", NeurIPS 2017; pre-norm as in Xiong et al.,
"On layer normalization in the transformer architecture", ICML 2020):
    scaled token embedding + 1D sinusoidal positions, N x [causal self-attention, cross-attention to
    the memory, feed-forward], final LayerNorm, Linear(d_model -> vocab).
Decoding: batched greedy (cached or uncached, identical tokens), batched cached beam search with the
length normalisation of Wu et al. 2016 (GNMT, eq. 14).
Also: building a model from hyperparameters (build_model), growing its vocab (extend_vocab), and
decoding a whole data set into Records (decode_dataset), as train.py validates and test.py evaluates.
The checkpoint file format is checkpoint.py's.
"""
import functools
import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from efficientnet_pytorch.utils import Conv2dDynamicSamePadding
from torch import nn
from tqdm import tqdm

from data import EOS, PAD, SOS
from non_local_emb_gaussian import NonLocalBlock2D
from utils import amp_context, eval_mode, fp32_under_cpu_autocast

# decoding defaults (test.py's --max_len and --length_penalty)
MAX_DECODE_LEN = 150    # decoding stops after this many tokens
LENGTH_PENALTY = 1.0    # beam score = sum log p / ((5 + len) / 6) ** LENGTH_PENALTY (Wu et al. 2016)
CTC_WEIGHT = 0.5        # beam search with a CTC head: ranked by (1 - w) log P_att + w log P_ctc
DECODE_BATCH_ROWS = 32  # decode_dataset: images decoded together (micro-batches of several sizes merged)
CTC_FLOOR = -1e4        # joint decoding: log P_ctc of a prefix the CTC head cannot emit

# Default non-local positions (block indexes of efficientnet_pytorch's `_blocks`, 0..15):
# after block 10 (end of stage 5, 112 ch) and block 14 (end of stage 6, 192 ch). With output stride
# 16 both run at stride 16, like the paper's res4 placement, where the attention is cheap: a 64x320
# image gives a 4x20 map (80 positions), im2latex's largest common bucket (800x100 after the x2
# downsample) 7x50 = 350, and even the 800x800 bucket 50x50 = 2500 positions x 625 sub-sampled keys
# (6 MB of attention per image). At stride 8 (stages 3-4) the same 800x800 image would need
# 10000 x 2500 per block, 16x more; at stride 32 (stage 7) a formula is only 1-2 rows high.
DEFAULT_NONLOCAL_AFTER = (10, 14)

# Decoder defaults: d_model 256, 8 heads (head dim 32), 3 layers, dim_ff 1024 (4 x d_model), dropout
# 0.1 (the base transformer's). ~3.4M decoder parameters at a 500-token vocab, next to the 4.4M of the
# encoder: im2latex targets are short (<= 150 tokens) over a small vocab, and the image, not the
# language model, is the hard part, so the budget goes to the encoder. 3 layers keep cached decoding
# at ~1-2 ms per token at batch 1 on a CPU (the decoder weights are read once per token). These are
# not tuned on im2latex-100k (no training runs were possible when this was written); the flags
# exist to tune them.
DEFAULTS = dict(d_model=256, nhead=8, num_layers=3, dim_ff=1024, dropout=0.1, max_len=512,
                output_stride=16, nonlocal_after=DEFAULT_NONLOCAL_AFTER, nonlocal_subsample=True,
                drop_connect=0.2, bn_momentum=0.1, memory_norm=False, ctc_frames=0, backbone_weights=None,
                head_stride=None)

NUM_BLOCKS_B0 = 16
SKIP_BLOCK = 10         # last block of stage 5 (112 ch): the fine-stride skip of a coarser head_stride
# index into efficientnet_pytorch's 7 stage block_args: stage 4 (blocks 5-7) and stage 6 (blocks 11-14)
_STAGE4, _STAGE6 = 3, 5


# -----------------------------------------------------------------------------
# positional encodings

def sinusoid(n, dim, device=None):
    """(n, dim) float32 sinusoidal encoding of positions 0..n-1 (Vaswani et al. 2017, Sec. 3.5):
    pe[p, 2i] = sin(p / 10000^(2i/dim)), pe[p, 2i+1] = cos(p / 10000^(2i/dim))."""
    pos = torch.arange(n, dtype=torch.float32, device=device)[:, None]              # (n, 1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device)
                     * (-math.log(10000.0) / dim))                                  # (dim/2,)
    pe = torch.zeros(n, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe


def sinusoid_2d(h, w, dim, device=None):
    """(h*w, dim) 2D encoding, row-major (s = y*w + x): the first dim/2 channels encode the row y,
    the last dim/2 the column x, each with sinusoid() (as in DETR, Carion et al. 2020)."""
    pe_y = sinusoid(h, dim // 2, device)                                            # (h, dim/2)
    pe_x = sinusoid(w, dim // 2, device)                                            # (w, dim/2)
    pe = torch.cat([pe_y[:, None, :].expand(h, w, dim // 2),
                    pe_x[None, :, :].expand(h, w, dim // 2)], dim=-1)               # (h, w, dim)
    return pe.reshape(h * w, dim)                                                   # (h*w, dim)


def gnmt_length_penalty(length, alpha):
    """Wu et al. 2016 (GNMT), eq. 14: lp(Y) = ((5 + |Y|) / 6)^alpha; |Y| counts the generated tokens
    including <eos>. Beam scores are log P(Y) / lp(Y); alpha = 0 gives the plain summed log-prob."""
    return ((5.0 + length) / 6.0) ** alpha


# -----------------------------------------------------------------------------
# encoder

def output_strides(output_stride):
    """Normalise an output stride to (rows, columns): 16 -> (16, 16), (16, 8) or [16, 8] -> (16, 8);
    each must be 8, 16 or 32. Raises ValueError."""
    pair = (output_stride, output_stride) if isinstance(output_stride, int) else tuple(output_stride)
    if len(pair) != 2 or any(isinstance(s, bool) or s not in (8, 16, 32) for s in pair):
        raise ValueError(f'output_stride={output_stride!r}: must be 8, 16 or 32, or a (rows, columns) pair of them')
    return int(pair[0]), int(pair[1])


def stride_value(pair):
    """(rows, columns) -> the JSON-able stride of hparams and flags: an int when square, else [rows, columns]."""
    return pair[0] if pair[0] == pair[1] else list(pair)


def head_strides(output_stride, head_stride):
    """The stride (rows, columns) of stages 6-7 and the head: head_stride, or the output stride when None.
    Per axis it must equal the output stride or double it (a coarser head whose output is upsampled back
    to the output stride, see Encoder). Raises ValueError."""
    out = output_strides(output_stride)
    if head_stride is None:
        return out
    head = output_strides(head_stride)
    if any(h not in (o, 2 * o) for o, h in zip(out, head)):
        raise ValueError(f'head_stride={head_stride!r}: each axis must equal the output stride {out} or double it')
    if head != out and 32 in out:
        raise ValueError(f'head_stride={head_stride!r}: a coarser head needs an output stride of 8 or 16 on '
                         f'both axes (stage 5, the skip, runs at 16 at most), got {out}')
    return head


def _build_backbone(output_stride, drop_connect, bn_momentum=0.1, head_stride=None):
    """efficientnet_pytorch B0 without any download: image_size=None gives dynamic "SAME" padding
    (output = ceil(input / stride) for every size; the default 224 makes static padding that floors
    other sizes), include_top=False drops `_fc` (unused: it only sees the pooled vector),
    grayscale stem (1 input channel). State-dict keys stay efficientnet_pytorch's.
    output_stride (rows, columns): B0 halves both axes in the stem and in the first blocks of stages 2,
    3, 4 and 6 (cumulative 2, 4, 8, 16, 32); each axis keeps the halvings of stages 4 and 6 only up to
    its stride. Example (16, 8) on a 40x150 image: stages 4-5 at 5x19 -> 3x19 (rows halved, columns
    not), stages 6-7 at 3x19 (neither), so the memory is 3 rows x 19 columns instead of 3 x 10.
    head_stride (rows, columns), coarser than the output stride on an axis: stage 6 halves that axis
    too; head_stride (16, 16) with output stride (16, 8) runs stages 6-7 at 3x10 on that image."""
    from efficientnet_pytorch import EfficientNet
    from efficientnet_pytorch.utils import get_model_params
    blocks_args, global_params = get_model_params(
        'efficientnet-b0', {'image_size': None, 'include_top': False, 'drop_connect_rate': drop_connect,
                            # efficientnet_pytorch stores TF's decay (0.99 = torch momentum 0.01)
                            'batch_norm_momentum': 1.0 - bn_momentum})
    rows, cols = output_strides(output_stride)
    head = head_strides(output_stride, head_stride)
    # the first block of stage 4 (block 5) takes the axis from stride 8 to 16, that of stage 6 (block 11)
    # from 16 to 32 (or from the output stride to the head's); a (row, column) stride list becomes the
    # depthwise conv's stride tuple
    blocks_args[_STAGE4] = blocks_args[_STAGE4]._replace(stride=[2 if rows >= 16 else 1, 2 if cols >= 16 else 1])
    blocks_args[_STAGE6] = blocks_args[_STAGE6]._replace(
        stride=[2 if o >= 32 or h > o else 1 for o, h in zip((rows, cols), head)])
    net = EfficientNet(blocks_args, global_params)
    net._change_in_channels(1)    # fresh 1-channel stem (dynamic padding since image_size is None)
    # nn.SiLU == x * sigmoid(x) == efficientnet_pytorch's swish, as one fused kernel each way (its
    # MemoryEfficientSwish is a Python autograd.Function saving the same input): encoder fwd+bwd
    # measured 3-10% faster on CPU (batch 16, 64x320). No parameters, so the state dict is unchanged.
    net._swish = nn.SiLU()
    for block in net._blocks:
        block._swish = nn.SiLU()
    for module in net.modules():
        if type(module) is Conv2dDynamicSamePadding:
            module.__class__ = SamePaddingConv2d     # same parameters and state-dict keys, faster forward
    return net


def _same_padding(size, kernel, stride, dilation):
    """TF "SAME" padding of one axis (efficientnet_pytorch's rule): the total that makes the output
    ceil(size / stride) long; pad // 2 goes before the input, the rest after."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


class SamePaddingConv2d(Conv2dDynamicSamePadding):
    """efficientnet_pytorch's Conv2dDynamicSamePadding with the same output, computed faster on a CPU.
    The original pads a copy of the input (F.pad) and convolves it with padding 0. Here the symmetric
    part of the padding (pad // 2 on both sides) is the convolution's own zero padding, and only an odd
    remainder (one row or column after the input, stride-2 convolutions) is still padded as a copy.
    Example: a 5x5 depthwise conv, stride 1, on a 3 x 64 map needs 2 rows and columns on every side: the
    original builds a 7 x 68 copy; here conv2d(padding=(2, 2)) reads the 3 x 64 map itself. Measured on
    2 CPU threads (oneDNN, channels_last): forward + backward of that conv at 1152 channels, batch 16,
    42 -> 24 ms (bf16 123 -> 72 ms). Under CPU bf16 autocast the depthwise convolutions run in fp32
    (utils.fp32_under_cpu_autocast)."""

    def forward(self, x):
        ph = _same_padding(x.shape[-2], self.weight.shape[-2], self.stride[0], self.dilation[0])
        pw = _same_padding(x.shape[-1], self.weight.shape[-1], self.stride[1], self.dilation[1])
        if ph % 2 or pw % 2:
            x = F.pad(x, [0, pw % 2, 0, ph % 2])                       # the odd row / column, after
        conv = functools.partial(F.conv2d, bias=self.bias, stride=self.stride, padding=(ph // 2, pw // 2),
                                 dilation=self.dilation, groups=self.groups)
        if self.groups > 1:                                             # depthwise: fp32 under CPU bf16
            return fp32_under_cpu_autocast(conv, x, self.weight)
        return conv(x, self.weight)


class Encoder(nn.Module):
    """EfficientNet-B0 (grayscale, output stride 8/16/32 per axis) + non-local blocks + per-position
    projection to d_model (+ LayerNorm with memory_norm) + 2D sinusoidal positions.
    (B, 1, H, W) -> memory (B, ceil(H/r)*ceil(W/c), d_model), (r, c) = output stride (rows, columns).

    memory_norm: a LayerNorm on the projected features before the positions are added, as pre-norm
    encoder-decoders normalise their encoder output (Xiong et al. 2020, "On Layer Normalization in the
    Transformer Architecture"). Without it the projection can shrink the image content far below the
    unit-scale sinusoids (or learn to cancel them), so cross-attention sees a memory that barely varies
    with the image and the decoder settles on the language model of the labels.

    head_stride coarser than output_stride (e.g. 16x16 with 16x8): stages 6-7 and the head run at the
    coarser stride, where most of B0's computation is (1152 expanded channels); their projected output
    is repeated back to the output stride and added to a projection of stage 5's output (block 10,
    112 ch), which is at the output stride: a top-down skip as in FPN (Lin et al., CVPR 2017) and
    U-Net. Example, a 48x512 image at output stride 16x8: stage 5 gives 3x64, the head 3x32; the
    head's column j feeds memory columns 2j and 2j+1, and each memory column adds its own stage-5
    features, so the memory keeps 3x64 positions."""

    def __init__(self, d_model, output_stride=16, nonlocal_after=DEFAULT_NONLOCAL_AFTER,
                 nonlocal_subsample=True, drop_connect=0.2, bn_momentum=0.1, memory_norm=False,
                 head_stride=None):
        super().__init__()
        self.d_model = d_model
        self.backbone = _build_backbone(output_stride, drop_connect, bn_momentum, head_stride)
        out = output_strides(output_stride)
        self.upsample = tuple(h // o for o, h in zip(out, head_strides(output_stride, head_stride)))  # (1|2, 1|2)
        skip_channels = self.backbone._blocks[SKIP_BLOCK]._bn2.num_features     # 112
        self.skip_proj = nn.Linear(skip_channels, d_model) if self.upsample != (1, 1) else None
        self.nonlocal_blocks = nn.ModuleDict()
        for idx in nonlocal_after:
            channels = self.backbone._blocks[idx]._bn2.num_features   # output channels of block idx
            self.nonlocal_blocks[str(idx)] = NonLocalBlock2D(channels, sub_sample=nonlocal_subsample)
        head_channels = self.backbone._bn1.num_features               # 1280
        self.proj = nn.Linear(head_channels, d_model)                 # the changed final FC
        self.norm = nn.LayerNorm(d_model) if memory_norm else None

    @torch.no_grad()
    def zero_init_residual_(self):
        """Zero the scale (gamma) of the last BatchNorm of every MBConv block that has an identity
        shortcut (9 of B0's 16 blocks: all but the first of each stage), so that each such block starts
        as the identity and the backbone as a shallow network (stem, the 7 stage-entry blocks, head)
        that deepens as its residual branches grow: "zero gamma" (Goyal et al. 2017, "Accurate, Large
        Minibatch SGD", Sec. 5.1; He et al. 2019, "Bag of Tricks for Image Classification", Sec. 3.1).
        The non-local blocks already start as the identity. -> the number of blocks zeroed."""
        n = 0
        for block in self.backbone._blocks:
            a = block._block_args
            if block.id_skip and a.stride == 1 and a.input_filters == a.output_filters:   # as MBConvBlock.forward
                nn.init.zeros_(block._bn2.weight)
                n += 1
        return n

    @torch.no_grad()
    def freeze_(self, n_blocks):
        """Stop training the stem and the first `n_blocks` MBConv blocks (requires_grad False; their
        BatchNorms keep using batch statistics). The first blocks run at the highest resolutions (stem
        and block 0 at stride 2, blocks 1-2 at 4, 3-4 at 8), where much of the backward pass's time goes
        on wide images (3 blocks: a step of 16 800x100 images 3.2 -> 2.1 s on 2 CPU threads), and they
        learn strokes that carry over between domains, so fine-tuning a trained encoder (train.py
        --init_from) can keep them as they are (Yosinski et al. 2014, "How transferable are features in
        deep neural networks?"). -> the number of parameters frozen."""
        net = self.backbone
        if not 0 <= n_blocks <= len(net._blocks):
            raise ValueError(f'freeze: expected 0..{len(net._blocks)} blocks, got {n_blocks}')
        modules = [net._conv_stem, net._bn0] + list(net._blocks[:n_blocks]) if n_blocks else []
        params = [p for m in modules for p in m.parameters()]
        for p in params:
            p.requires_grad_(False)
        return sum(p.numel() for p in params)

    def feature_map(self, images, skip=None):
        """(B, 1, H, W) -> (B, 1280, h', w') at the head stride. Same computation as
        EfficientNet.extract_features, with the block loop re-run here to insert the non-local blocks
        (same drop-connect scaling). skip: a list that receives block SKIP_BLOCK's output (B, 112, h, w)."""
        net = self.backbone
        x = net._swish(net._bn0(net._conv_stem(images)))              # (B, 32, ceil(H/2), ceil(W/2))
        n = len(net._blocks)
        for idx, block in enumerate(net._blocks):
            rate = net._global_params.drop_connect_rate
            if rate:
                rate *= float(idx) / n                                  # scale drop connect rate
            x = block(x, drop_connect_rate=rate)
            key = str(idx)
            if key in self.nonlocal_blocks:
                x = self.nonlocal_blocks[key](x)
            if skip is not None and idx == SKIP_BLOCK:
                skip.append(x)
        return net._swish(net._bn1(net._conv_head(x)))                # (B, 1280, h, w)

    def content(self, images):
        """(B, 1, H, W) -> the image content per position, before positions are added: (B, h, w, d_model)."""
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f'expected images of shape (B, 1, H, W), got {tuple(images.shape)}')
        skip = [] if self.skip_proj is not None else None
        x = self.feature_map(images, skip).permute(0, 2, 3, 1)       # (B, h', w', 1280)
        x = self.proj(x)                                              # (B, h', w', d_model)
        if skip is not None:
            fine = skip[0].permute(0, 2, 3, 1)                        # (B, h, w, 112), h' = ceil(h / 2) etc.
            h, w = fine.shape[1:3]
            x = x.repeat_interleave(self.upsample[0], 1).repeat_interleave(self.upsample[1], 2)[:, :h, :w]
            x = x + self.skip_proj(fine)                              # (B, h, w, d_model)
        return self.norm(x) if self.norm is not None else x

    def memory(self, content):
        """(B, h, w, d) -> memory (B, h*w, d) with 2D positions, row-major: s = y*w + x."""
        b, h, w, d = content.shape
        return content.reshape(b, h * w, d) + sinusoid_2d(h, w, d, content.device).to(content.dtype)

    def forward(self, images):
        return self.memory(self.content(images))                      # (B, S, d_model)

    def load_imagenet(self, path):
        """Load a local ImageNet state_dict (efficientnet_pytorch key names, e.g. the file of
        efficientnet-b0-355c32eb.pth) into the backbone: the RGB stem kernel (32, 3, 3, 3) is summed
        over its input-channel axis to (32, 1, 3, 3) (a gray image = equal R, G, B), `_fc.*` is skipped,
        every other key must match."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{path}: backbone weights file not found')
        try:
            sd = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:
            raise ValueError(f'{path}: cannot read backbone weights ({type(e).__name__}: {e})') from None
        if isinstance(sd, dict) and 'state_dict' in sd and isinstance(sd['state_dict'], dict):
            sd = sd['state_dict']
        if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
            raise ValueError(f'{path}: not a state_dict of tensors (expected efficientnet_pytorch '
                             f'EfficientNet-B0 weights)')
        sd = {k: v for k, v in sd.items() if not k.startswith('_fc.')}
        stem = sd.get('_conv_stem.weight')
        if stem is not None and stem.dim() == 4 and stem.shape[1] == 3:
            sd['_conv_stem.weight'] = stem.sum(dim=1, keepdim=True)      # (32, 3, 3, 3) -> (32, 1, 3, 3)
        own = self.backbone.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        wrong = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
        if missing or unexpected or wrong:
            def show(keys):
                return ', '.join(keys[:5]) + (f' ... ({len(keys)} in all)' if len(keys) > 5 else '')
            parts = []
            if missing:
                parts.append(f'missing keys: {show(missing)}')
            if unexpected:
                parts.append(f'unexpected keys: {show(unexpected)}')
            if wrong:
                parts.append('shape mismatch: ' + show([f'{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}'
                                                        for k in wrong]))
            raise ValueError(f'{path}: not efficientnet_pytorch EfficientNet-B0 weights ({"; ".join(parts)})')
        self.backbone.load_state_dict(sd, strict=True)


# -----------------------------------------------------------------------------
# decoder

class DecoderLayer(nn.Module):
    """Pre-norm transformer decoder layer: x += SelfAttn(LN(x)); x += CrossAttn(LN(x), memory);
    x += FFN(LN(x)). Attention is F.scaled_dot_product_attention on explicit Q/K/V so that the keys
    and values can be cached while decoding."""

    def __init__(self, d_model, nhead, dim_ff, dropout):
        super().__init__()
        self.nhead, self.head_dim, self.dropout = nhead, d_model // nhead, dropout
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)        # self-attention Q, K, V
        self.self_out = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.q = nn.Linear(d_model, d_model)              # cross-attention Q (from the tokens)
        self.kv = nn.Linear(d_model, 2 * d_model)         # cross-attention K, V (from the memory)
        self.cross_out = nn.Linear(d_model, d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, dim_ff)
        self.ff2 = nn.Linear(dim_ff, d_model)
        self.drop = nn.Dropout(dropout)
        self.probe = None     # a list: forward() appends its cross-attention weights (diagnostics)

    def _heads(self, x):
        """(B, T, d) -> (B, nhead, T, head_dim)"""
        b, t, _ = x.shape
        return x.view(b, t, self.nhead, self.head_dim).transpose(1, 2)

    def _merge(self, x):
        """(B, nhead, T, head_dim) -> (B, T, d)"""
        b, _, t, _ = x.shape
        return x.transpose(1, 2).reshape(b, t, self.nhead * self.head_dim)

    def memory_kv(self, memory):
        """memory (B, S, d) -> cross-attention keys, values, each (B, nhead, S, head_dim)."""
        k, v = self.kv(memory).chunk(2, dim=-1)           # 2 x (B, S, d)
        return self._heads(k), self._heads(v)

    def _ffn(self, x):
        return self.drop(self.ff2(self.drop(F.gelu(self.ff1(self.norm3(x))))))

    def forward(self, x, mem_k, mem_v, attn_mask=None, mem_mask=None):
        """Whole sequence (training / uncached decoding): x (B, T, d) -> (B, T, d).
        attn_mask: None (plain causal) or bool (B, 1, T, T), True = may attend; mem_mask: None or bool
        (B, 1, 1, S), True at the memory positions that may be attended (see Decoder.forward)."""
        p = self.dropout if self.training else 0.0
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)   # 3 x (B, T, d)
        a = fp32_under_cpu_autocast(F.scaled_dot_product_attention, self._heads(q), self._heads(k),
                                    self._heads(v), attn_mask=attn_mask, dropout_p=p,
                                    is_causal=attn_mask is None)  # (B, h, T, hd)
        x = x + self.drop(self.self_out(self._merge(a)))
        q = self._heads(self.q(self.norm2(x)))                 # (B, h, T, hd)
        if self.probe is not None:                             # weights (B, h, T, S), as SDPA computes them
            scores = q @ mem_k.transpose(-1, -2) / math.sqrt(self.head_dim)                # (B, h, T, S)
            if mem_mask is not None:
                scores = scores.masked_fill(~mem_mask, float('-inf'))
            self.probe.append(torch.softmax(scores, dim=-1))
        a = fp32_under_cpu_autocast(F.scaled_dot_product_attention, q, mem_k, mem_v, attn_mask=mem_mask,
                                    dropout_p=p)                  # (B, h, T, hd)
        x = x + self.drop(self.cross_out(self._merge(a)))
        return x + self._ffn(x)

    def step(self, x, pos, cache):
        """One new token per sequence at position `pos`, keys/values of positions < pos in `cache`:
        x (N, d) -> (N, d). Appends this position's self-attention K/V to the cache. Eval only (no
        dropout); the same maths as forward() with plain functions, since at batch 1 the per-call
        overhead of modules is as large as the matrix-vector products themselves."""
        n, d = x.shape
        h, hd = self.nhead, self.head_dim
        qkv = F.linear(_ln(self.norm1, x), self.qkv.weight, self.qkv.bias).view(n, 3, h, hd)  # (N, 3, h, hd)
        if cache['k'] is None:   # allocated at the first step: dtype follows autocast
            cache['k'] = qkv.new_empty(n, h, cache['max_len'], hd)   # (N, h, max_len, hd)
            cache['v'] = qkv.new_empty(n, h, cache['max_len'], hd)
        cache['k'].select(2, pos).copy_(qkv[:, 1])                    # (N, h, hd) at position pos
        cache['v'].select(2, pos).copy_(qkv[:, 2])
        a = F.scaled_dot_product_attention(qkv[:, 0].unsqueeze(2), cache['k'][:, :, :pos + 1],
                                           cache['v'][:, :, :pos + 1])   # (N, h, 1, hd)
        x = x + F.linear(a.reshape(n, d), self.self_out.weight, self.self_out.bias)   # (N, d)
        # cross-attention: the k hypotheses of an image (rows i*k + j) are k queries of its memory, which
        # is kept once per image, not once per hypothesis (k x less memory read per step)
        k = cache['repeat']
        q = F.linear(_ln(self.norm2, x), self.q.weight, self.q.bias).view(n // k, k, h, hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, cache['mk'], cache['mv'], attn_mask=cache['mmask'])  # (N/k, h, k, hd)
        a = a.transpose(1, 2).reshape(n, d)                                           # (N, d), rows i*k + j
        x = x + F.linear(a, self.cross_out.weight, self.cross_out.bias)               # (N, d)
        y = F.gelu(F.linear(_ln(self.norm3, x), self.ff1.weight, self.ff1.bias))     # (N, dim_ff)
        return x + F.linear(y, self.ff2.weight, self.ff2.bias)                       # (N, d)


def _ln(norm, x):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class Decoder(nn.Module):
    def __init__(self, vocab_size, d_model, nhead, num_layers, dim_ff, dropout, max_len):
        super().__init__()
        self.d_model, self.max_len = d_model, max_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.register_buffer('pos', sinusoid(max_len, d_model), persistent=False)   # (max_len, d)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(DecoderLayer(d_model, nhead, dim_ff, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab_size)
        for layer in self.layers:
            for m in layer.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
        init_embedding_(self.embed.weight)
        init_output_(self.out)

    def _embed(self, ids, start):
        """ids (B, T) at positions start..start+T-1 -> (B, T, d): sqrt(d)-scaled embedding + sinusoid."""
        t = ids.shape[1]
        if start + t > self.max_len:
            raise ValueError(f'sequence of {start + t} tokens exceeds this model\'s max_len={self.max_len} '
                             f'(filter longer formulas or build the model with a larger max_len)')
        return self.drop(self.embed(ids) * math.sqrt(self.d_model) + self.pos[start:start + t].to(
            self.embed.weight.dtype))

    def forward(self, tgt_in, memory, tgt_pad_mask=None, memory_pad_mask=None):
        """tgt_in (B, T) ids, memory (B, S, d) -> logits (B, T, V). memory_pad_mask: None or bool (B, S),
        True at padding: memories of different lengths stacked by pad_memories, padding never attended."""
        x = self._embed(tgt_in, 0)                              # (B, T, d)
        mask = None
        if tgt_pad_mask is not None:
            # Padding is trailing ([SOS] a b [EOS] PAD PAD), so the causal mask alone already hides it
            # from every real position; the key mask is applied anyway so any padding layout is handled.
            t = tgt_in.shape[1]
            causal = torch.ones(t, t, dtype=torch.bool, device=tgt_in.device).tril()   # (T, T)
            mask = causal[None, None] & ~tgt_pad_mask[:, None, None, :]               # (B, 1, T, T)
            mask = mask | torch.eye(t, dtype=torch.bool, device=tgt_in.device)        # no empty row
        mem_mask = _attend_mask(memory_pad_mask)                # (B, 1, 1, S) or None
        for layer in self.layers:
            mk, mv = layer.memory_kv(memory)
            x = layer(x, mk, mv, mask, mem_mask)
        return self.out(self.norm(x))                           # (B, T, V)

    def init_cache(self, memory, max_len, repeat=1, memory_pad_mask=None):
        """Per-layer cache for step(), which then takes `repeat` rows per image (beam search: rows
        b*repeat .. b*repeat+repeat-1): cross-attention K/V of the memory computed once per image (and
        the mask from memory_pad_mask (B, S), as in forward), self-attention K/V per row, allocated at
        the first step for max_len positions."""
        mmask = _attend_mask(memory_pad_mask)                   # (B, 1, 1, S) or None
        cache = []
        for layer in self.layers:
            mk, mv = layer.memory_kv(memory)                    # 2 x (B, h, S, hd)
            cache.append({'mk': mk, 'mv': mv, 'mmask': mmask, 'k': None, 'v': None, 'max_len': max_len,
                          'repeat': repeat})
        return cache

    def step(self, tok, pos, cache):
        """tok (N,) ids at position pos -> logits (N, V)."""
        if pos >= self.max_len:
            raise ValueError(f'position {pos} exceeds this model\'s max_len={self.max_len}')
        w = self.embed.weight
        x = F.embedding(tok, w) * math.sqrt(self.d_model) + self.pos[pos].to(w.dtype)   # (N, d)
        for layer, c in zip(self.layers, cache):
            x = layer.step(x, pos, c)
        return F.linear(_ln(self.norm, x), self.out.weight, self.out.bias)             # (N, V)


def _attend_mask(pad_mask):
    """(B, S) bool, True at padding -> (B, 1, 1, S) bool, True where attention may look; None stays None."""
    return None if pad_mask is None else ~pad_mask[:, None, None, :]


def init_embedding_(weight):
    """Token embeddings ~ N(0, d^-1/2): after the sqrt(d) scaling each entry has unit variance."""
    nn.init.normal_(weight, mean=0.0, std=weight.shape[1] ** -0.5)


def init_output_(linear):
    nn.init.xavier_uniform_(linear.weight)
    nn.init.zeros_(linear.bias)


def _select_cache(cache, rows, upto=None, filled=None):
    """Keep / reorder rows of every layer's cache (rows: indexes of step()'s rows, `repeat` per image).
    upto=None: images leave the batch (rows = whole images, in order): every tensor, the self-attention
    K/V only up to position `filled` (None: all; the rest is written before it is read). upto=t: beam
    reordering within images: only the self-attention K/V of positions < t (cross K/V are per image), and
    only of the rows whose hypothesis came from another row."""
    if upto is not None:
        moved = (rows != torch.arange(len(rows), device=rows.device)).nonzero()[:, 0]
    for c in cache:
        if upto is None:
            images = rows[::c['repeat']] // c['repeat']
            for key in ('mk', 'mv', 'mmask'):
                if c[key] is not None:
                    c[key] = c[key].index_select(0, images)
            for key in ('k', 'v'):
                if c[key] is not None:
                    old = c[key]
                    c[key] = old.new_empty((len(rows),) + old.shape[1:])     # (N', h, max_len, hd)
                    c[key][:, :, :filled] = old[rows, :, :filled]
        elif c['k'] is not None and moved.numel():
            c['k'][moved, :, :upto] = c['k'][rows[moved], :, :upto]
            c['v'][moved, :, :upto] = c['v'][rows[moved], :, :upto]


# -----------------------------------------------------------------------------
# joint CTC-attention decoding

class CTCPrefixScorer:
    """CTC prefix scores for a beam search (Watanabe et al. 2017, "Hybrid CTC/Attention Architecture for
    End-to-End Speech Recognition", Sec. IV-B and Algorithm 2), batched over hypotheses and candidates.
    log P_CTC(h...) of a prefix h is the probability that the CTC head's frames start with h (any
    continuation); of h + <eos>, that they emit exactly h. State of a prefix g: r (T, 2), the log-probs
    of g emitted by frames 1..t ending in a non-blank (r[:, 0]) or in a blank (r[:, 1]).
    log_probs (T, B, V): Im2LatexModel.ctc_log_probs of B images (blank = <pad>)."""

    def __init__(self, log_probs):
        self.x = log_probs.float()                                    # (T, B, V)
        self.T = self.x.shape[0]

    def initial(self, rows):
        """State of the empty prefix for hypotheses of images `rows` (H,) -> r (T, H, 2)."""
        blank = self.x[:, rows, PAD]                                  # (T, H)
        return torch.stack([torch.full_like(blank, float('-inf')), blank.cumsum(0)], dim=-1)

    def extend(self, rows, r, last, cand):
        """Prefixes g (images rows (H,), states r (T, H, 2), last tokens last (H,), -1 when g is empty)
        extended by each of cand (H, C) -> (psi (H, C) log P_CTC(g + c...), or log P_CTC(g) for c =
        <eos>; new states (T, H, C, 2))."""
        T, (H, C) = self.T, cand.shape
        xc = self.x[:, rows[:, None].expand(H, C), cand]              # (T, H, C) log p of c per frame
        xb = self.x[:, rows, PAD][:, :, None]                         # (T, H, 1)
        ninf = torch.tensor(float('-inf'), device=xc.device)
        # phi_t: g emitted by frames 1..t, and c may start at t+1 (after a blank if c repeats g's last)
        phi = torch.logaddexp(r[:, :, 1, None].expand(T, H, C),
                              torch.where(cand[None] == last[None, :, None], ninf, r[:, :, 0, None]))
        # s[t] = (r^n_t, r^b_t) of g + c; both recursions in one op per frame (the loop is per-op overhead):
        # s[t] = logaddexp(s[t-1], a[t-1]) + x[t], a[t] = (phi_t, r^n_t), x[t] = (log p_t(c), log p_t(blank))
        s = torch.full((T, 2, H, C), float('-inf'), device=xc.device)
        a = torch.stack([phi, phi], dim=1)                            # (T, 2, H, C); a[:, 1] set below
        x = torch.stack([xc, xb.expand(T, H, C)], dim=1)              # (T, 2, H, C)
        s[0, 0] = torch.where((last < 0)[:, None], xc[0], ninf)       # only the empty prefix starts at frame 1
        a[0, 1] = s[0, 0]
        for t in range(1, T):
            torch.logaddexp(s[t - 1], a[t - 1], out=s[t])
            s[t].add_(x[t])
            a[t, 1] = s[t, 0]
        psi = torch.logsumexp(torch.cat([s[:1, 0], phi[:-1] + xc[1:]]), dim=0)   # (H, C): c starts at some frame
        psi = torch.where(cand == EOS, torch.logaddexp(r[-1, :, 0], r[-1, :, 1])[:, None], psi)
        return psi, s.permute(0, 2, 3, 1).contiguous()               # (T, H, C, 2)


# -----------------------------------------------------------------------------
# the model

class Im2LatexModel(nn.Module):
    """EfficientNet-B0 + 2 non-local blocks encoder, transformer decoder; see the module docstring.

    vocab_size: V (specials <pad>=0 <sos>=1 <eos>=2 <unk>=3 first); d_model, nhead, num_layers, dim_ff,
    dropout: decoder size; max_len: longest token sequence (positions) the decoder accepts; output_stride:
    8, 16 or 32, or a (rows, columns) pair of them (see _build_backbone); nonlocal_after: backbone block
    indexes (0..15) followed by a NonLocalBlock2D; nonlocal_subsample: 2x2 max-pool of the non-local
    keys/values; drop_connect: the backbone's stochastic-depth rate; bn_momentum: BatchNorm
    running-statistics momentum (torch convention). efficientnet_pytorch's default, TF's 0.01, leaves the
    eval-mode statistics far behind the weights for thousands of steps: an overfit run of 75 steps at 0.1
    reached exact match 1.0 in eval mode while at 0.01 it stayed near 0; 0.1 (torch's default) is used here.
    memory_norm: LayerNorm on the encoder memory (see Encoder); ctc_frames: frames per image column of the
    auxiliary CTC head (0: no head; see ctc_log_probs). Both are off when a checkpoint's hparams lack them,
    as older ones do. backbone_weights: path of a local ImageNet state_dict of efficientnet_pytorch's B0
    (None: random init). `hparams` holds these kwargs (JSON-able), with backbone_weights set to None once
    the file is loaded: the weights live on in the state dict, and build_model(ckpt['hparams']) must not
    need the file (train.py keeps the path in its args).
    """

    def __init__(self, vocab_size, d_model=256, nhead=8, num_layers=3, dim_ff=1024, dropout=0.1,
                 max_len=512, output_stride=16, nonlocal_after=DEFAULT_NONLOCAL_AFTER,
                 nonlocal_subsample=True, drop_connect=0.2, bn_momentum=0.1, memory_norm=False,
                 ctc_frames=0, backbone_weights=None, head_stride=None):
        super().__init__()
        nonlocal_after = [int(i) for i in nonlocal_after]
        if vocab_size <= EOS:
            raise ValueError(f'vocab_size={vocab_size}: the vocab must hold at least <pad> <sos> <eos>')
        if d_model % nhead or d_model % 4:
            raise ValueError(f'd_model={d_model} must be divisible by nhead={nhead} and by 4 (2D positions)')
        out, head = output_strides(output_stride), head_strides(output_stride, head_stride)
        output_stride = stride_value(out)                          # JSON-able; a square stride stays an int
        head_stride = None if head == out else stride_value(head)
        if len(set(nonlocal_after)) != len(nonlocal_after) or any(
                not 0 <= i < NUM_BLOCKS_B0 for i in nonlocal_after):
            raise ValueError(f'nonlocal_after={nonlocal_after}: distinct block indexes in 0..{NUM_BLOCKS_B0 - 1}')
        self.hparams = dict(vocab_size=int(vocab_size), d_model=d_model, nhead=nhead, num_layers=num_layers,
                            dim_ff=dim_ff, dropout=dropout, max_len=max_len, output_stride=output_stride,
                            nonlocal_after=nonlocal_after, nonlocal_subsample=bool(nonlocal_subsample),
                            drop_connect=drop_connect, bn_momentum=bn_momentum,
                            memory_norm=bool(memory_norm), ctc_frames=int(ctc_frames), backbone_weights=None,
                            head_stride=head_stride)
        self.vocab_size = int(vocab_size)
        self.encoder = Encoder(d_model, output_stride, nonlocal_after, nonlocal_subsample, drop_connect,
                               bn_momentum, memory_norm, head_stride)
        self.decoder = Decoder(vocab_size, d_model, nhead, num_layers, dim_ff, dropout, max_len)
        # frame f of a column = outputs [f*V, (f+1)*V) of the head (see ctc_log_probs)
        self.ctc_head = nn.Linear(d_model, ctc_frames * self.vocab_size) if ctc_frames > 0 else None
        if backbone_weights is not None:
            self.encoder.load_imagenet(os.fspath(backbone_weights))

    # --- training-time API --------------------------------------------------
    def encode(self, images):
        """(B, 1, H, W) -> memory (B, S, d_model), S = ceil(H/r) * ceil(W/c), (r, c) = output stride."""
        return self.encoder(images)

    def decode(self, tgt_in, memory, tgt_pad_mask=None):
        """tgt_in (B, T) ids ([SOS] + tokens, teacher forcing) -> logits (B, T, V)."""
        return self.decoder(tgt_in, memory, tgt_pad_mask)

    def forward(self, images, tgt_in, tgt_pad_mask=None, ctc=False):
        """-> logits (B, T, V); with ctc=True also the CTC head's log-probs (see ctc_log_probs)."""
        content = self.encoder.content(images)                      # (B, h, w, d)
        logits = self.decode(tgt_in, self.encoder.memory(content), tgt_pad_mask)
        return (logits, self.ctc_log_probs(content)) if ctc else logits

    def ctc_log_probs(self, content):
        """Auxiliary CTC head over the image columns, left to right (joint CTC-attention training: Kim,
        Hori & Watanabe, ICASSP 2017). It gives the encoder a direct signal to tell symbols apart before
        the decoder's attention has learned where to look. Each column of the content (mean over its
        rows) emits ctc_frames frames, so a column can hold several tokens (`^ { 2 }` is 4 tokens for one
        small glyph). Class 0 (<pad>, never a target) is the CTC blank.
        content (B, h, w, d) -> log-probs (T = w * ctc_frames, B, V), the layout F.ctc_loss takes."""
        if self.ctc_head is None:
            raise ValueError('this model has no CTC head (built with ctc_frames=0)')
        b, _, w, _ = content.shape
        cols = content.mean(dim=1)                                    # (B, w, d)
        frames = self.ctc_head(cols).reshape(b, w * self.hparams['ctc_frames'], self.vocab_size)  # (B, T, V)
        return frames.float().log_softmax(-1).transpose(0, 1)         # (T, B, V)

    def encode_joint(self, images):
        """One encoder pass for joint decoding: (B, 1, H, W) -> (memory (B, S, d_model), CTC log-probs
        (T, B, V)); the CTC head reads the content before the positions are added."""
        content = self.encoder.content(images)                      # (B, h, w, d)
        return self.encoder.memory(content), self.ctc_log_probs(content)

    @staticmethod
    def ctc_sequence_logprob(log_probs, ids, rows=None):
        """log P_CTC(ids[n] | image rows[n]) (N,) float32: the CTC head's probability of each token list,
        summed over all its alignments to the frames (the forward algorithm of F.ctc_loss); -inf for a list
        that no alignment can emit (more tokens, counting the blanks between repeats, than frames).
        log_probs (T, B, V) from ctc_log_probs; ids: N lists of token ids (no <sos>/<eos>/<pad>);
        rows: the image (column of log_probs) of each list, default 0..N-1."""
        rows = list(range(len(ids))) if rows is None else list(rows)
        lp = log_probs[:, torch.as_tensor(rows, dtype=torch.long, device=log_probs.device)].float()  # (T, N, V)
        flat = torch.tensor([t for seq in ids for t in seq], dtype=torch.long)
        lengths = torch.tensor([len(seq) for seq in ids], dtype=torch.long)
        frames = torch.full((len(ids),), lp.shape[0], dtype=torch.long)
        nll = F.ctc_loss(lp, flat.to(lp.device), frames, lengths, blank=PAD, reduction='none', zero_infinity=False)
        return -nll.float().cpu()

    # --- decoding -----------------------------------------------------------
    def _choice_mask(self, ignore_eos, device):
        """(V,) additive float32 mask for choosing tokens: <pad> and <sos> are never generated (and
        <eos> not with ignore_eos). Scores always use the unmasked log-probs."""
        mask = torch.zeros(self.vocab_size, device=device)
        mask[PAD] = mask[SOS] = float('-inf')
        if ignore_eos:
            mask[EOS] = float('-inf')
        return mask

    def _memory(self, images, memory):
        if memory is None:
            if images is None:
                raise ValueError('give images or memory')
            memory = self.encode(images)
        return memory

    def _check_max_len(self, max_len):
        if not 1 <= max_len <= self.decoder.max_len:
            raise ValueError(f'max_len={max_len}: must be in 1..{self.decoder.max_len} (the model\'s max_len)')

    @torch.no_grad()
    def greedy(self, images=None, memory=None, max_len=MAX_DECODE_LEN, use_cache=True, ignore_eos=False,
               memory_pad_mask=None):
        """Batched greedy decoding. Returns (ids, logp): ids[b] the tokens without <sos>/<eos>,
        logp (B,) float32 on the CPU, their summed log-probability (including <eos> when emitted).
        A sequence stops at its <eos> (and leaves the batch); decoding stops when all have, or after
        max_len steps. ignore_eos: <eos> is never chosen, so every output has exactly max_len tokens
        (for benchmarks). use_cache=False re-runs the whole decoder on the prefix at every step
        (the reference path; same tokens). memory_pad_mask (B, S): padding of a memory from pad_memories.
        Runs in eval mode (restored afterwards)."""
        self._check_max_len(max_len)
        with eval_mode(self):
            return self._greedy(self._memory(images, memory), max_len, use_cache, ignore_eos, memory_pad_mask)

    def _greedy(self, memory, max_len, use_cache, ignore_eos, pad=None):
        b, device = memory.shape[0], memory.device
        choice_mask = self._choice_mask(ignore_eos, device)
        rows = torch.arange(b, device=device)              # original index of each row still decoding
        out = torch.full((b, max_len), PAD, dtype=torch.long, device=device)
        lengths = torch.full((b,), max_len, dtype=torch.long, device=device)
        logp_sum = torch.zeros(b, dtype=torch.float32, device=device)
        tok = torch.full((b,), SOS, dtype=torch.long, device=device)
        if use_cache:
            cache = self.decoder.init_cache(memory, max_len, memory_pad_mask=pad)
        else:
            prefix = tok[:, None]                           # (N, 1)
        for t in range(max_len):
            if use_cache:
                logits = self.decoder.step(tok, t, cache)                   # (N, V)
            else:
                logits = self.decoder(prefix, memory, memory_pad_mask=pad)[:, -1]   # (N, T, V) -> (N, V)
            logp = F.log_softmax(logits.float(), dim=-1)                    # (N, V), float32
            nxt = (logp + choice_mask).argmax(dim=-1)                       # (N,)
            logp_sum[rows] += logp.gather(1, nxt[:, None])[:, 0]
            out[rows, t] = nxt
            if not ignore_eos:
                done = nxt == EOS
                if done.any():
                    lengths[rows[done]] = t
                    keep = (~done).nonzero()[:, 0]
                    if keep.numel() == 0:
                        break
                    rows, nxt = rows[keep], nxt[keep]
                    if use_cache:
                        _select_cache(cache, keep, filled=t + 1)
                    else:
                        prefix, memory = prefix[keep], memory[keep]
                        pad = None if pad is None else pad[keep]
            tok = nxt
            if not use_cache:
                prefix = torch.cat([prefix, nxt[:, None]], dim=1)             # (N, t+2)
        out, lengths = out.tolist(), lengths.tolist()
        return [o[:n] for o, n in zip(out, lengths)], logp_sum.cpu()

    @torch.no_grad()
    def beam_search(self, images=None, memory=None, beam=5, max_len=MAX_DECODE_LEN, length_penalty=LENGTH_PENALTY,
                    ignore_eos=False, memory_pad_mask=None):
        """Batched beam search with a key/value cache. Returns (ids, score): the best hypothesis per
        image (tokens without <sos>/<eos>) and its score log P / ((5 + len) / 6)^length_penalty
        (Wu et al. 2016; len counts <eos>), float32 (B,) on the CPU. beam=1 gives the greedy tokens."""
        best = self.beam_search_nbest(images, memory, beam, max_len, length_penalty, ignore_eos,
                                      memory_pad_mask=memory_pad_mask)
        ids = [hyps[0][2] for hyps in best]
        score = torch.tensor([hyps[0][0] for hyps in best], dtype=torch.float32)
        return ids, score

    @torch.no_grad()
    def beam_search_nbest(self, images=None, memory=None, beam=5, max_len=MAX_DECODE_LEN,
                          length_penalty=LENGTH_PENALTY, ignore_eos=False, ctc_log_probs=None, ctc_weight=0.0,
                          memory_pad_mask=None):
        """As beam_search, but returns for each image its finished hypotheses (at most `beam`) sorted by
        score, best first: a list of (score, summed log-prob, ids) per image.
        With ctc_log_probs (T, B, V) and ctc_weight w > 0: one-pass joint CTC-attention decoding
        (Watanabe et al. 2017, Sec. IV-B): every live hypothesis is extended by its ceil(1.5 k) likeliest
        tokens, ranked by (1 - w) log P_att + w log P_CTC (CTCPrefixScorer); the summed log-prob is then
        that joint score. memory_pad_mask (B, S): padding of a memory from pad_memories (and ctc_log_probs
        then from pad_ctc_frames)."""
        self._check_max_len(max_len)
        if beam < 1:
            raise ValueError(f'beam={beam}: must be >= 1')
        ctc = (ctc_weight, CTCPrefixScorer(ctc_log_probs)) if ctc_log_probs is not None and ctc_weight > 0 else None
        with eval_mode(self):
            return self._beam(self._memory(images, memory), beam, max_len, length_penalty, ignore_eos, ctc,
                              memory_pad_mask)

    def _beam(self, memory, k, max_len, alpha, ignore_eos, ctc=None, pad=None):
        """Beam search in the manner of fairseq's sequence generator: at each step the 2k best
        continuations of the k live hypotheses of each image; those ending in <eos> among the top k are
        finished (scored with the length penalty), the k best not ending in <eos> live on. An image is
        done when it has k finished hypotheses; at max_len the live ones are finished as they are.
        ctc: None, or (weight, CTCPrefixScorer) for joint scores (see _joint_candidates)."""
        b, device = memory.shape[0], memory.device
        v = self.vocab_size
        choice_mask = self._choice_mask(ignore_eos, device)
        # step()'s rows i*k + j: image i, beam j
        cache = self.decoder.init_cache(memory, max_len, repeat=k, memory_pad_mask=pad)
        images = list(range(b))                                        # original index of each live image
        scores = torch.full((b, k), float('-inf'), device=device)      # (N, k) summed log-probs
        scores[:, 0] = 0.0                                             # one live hypothesis at the start
        hist = torch.empty(b, k, 0, dtype=torch.long, device=device)  # (N, k, t) tokens so far
        tok = torch.full((b * k,), SOS, dtype=torch.long, device=device)
        finished = [[] for _ in range(b)]                              # per image: (score, logp, ids)
        n_cand = min(2 * k, k * v)
        if ctc is not None:    # joint: att = summed attention log-probs, r = CTC prefix states
            att = scores.clone()                                       # (N, k)
            r = ctc[1].initial(torch.arange(b, device=device).repeat_interleave(k))   # (T, N*k, 2)
            n_cand = min(2 * k, k * min(v, math.ceil(1.5 * k)))
        for t in range(max_len):
            n = len(images)
            logits = self.decoder.step(tok, t, cache)                  # (N*k, V)
            logp = F.log_softmax(logits.float(), dim=-1) + choice_mask  # (N*k, V)
            if ctc is None:
                cand = (scores[:, :, None] + logp.view(n, k, v)).view(n, k * v)  # (N, k*V)
                top, idx = cand.topk(n_cand, dim=1)                    # (N, 2k), best first
                origin, token = idx // v, idx % v                      # beam of origin, new token
            else:
                top, origin, token, att, r = self._joint_candidates(ctc, images, att, r, logp, hist, n_cand)
            is_eos = token == EOS
            ended = is_eos[:, :k] & torch.isfinite(top[:, :k])
            if ended.any():
                lp = gnmt_length_penalty(t + 1, alpha)
                top_l, origin_l = top.tolist(), origin.tolist()
                for i, j in ended.nonzero().tolist():
                    ids = hist[i, origin_l[i][j]].tolist()
                    finished[images[i]].append((top_l[i][j] / lp, top_l[i][j], ids))
            # live on: the first k candidates not ending in <eos> (a stable sort on the flag keeps the
            # score order); there are >= k since each beam contributes at most one <eos> candidate
            order = torch.sort(is_eos.to(torch.uint8), dim=1, stable=True).indices[:, :k]   # (N, k)
            scores = top.gather(1, order)                              # (N, k)
            origin, token = origin.gather(1, order), token.gather(1, order)
            if ctc is not None:
                att = att.gather(1, order)                             # (N, k)
                r = r[:, (torch.arange(n, device=device)[:, None] * n_cand + order).view(-1)]  # (T, N*k, 2)
            hist = torch.cat([hist.gather(1, origin[:, :, None].expand(-1, -1, t)),
                              token[:, :, None]], dim=2)               # (N, k, t+1)
            rows = (torch.arange(n, device=device)[:, None] * k + origin).view(-1)   # (N*k,)
            _select_cache(cache, rows, upto=t + 1)
            tok = token.reshape(-1)                                    # (N*k,)
            if t == max_len - 1:   # out of steps: the live hypotheses finish as they are
                lp = gnmt_length_penalty(max_len, alpha)
                for i, (s_row, h_row) in enumerate(zip(scores.tolist(), hist.tolist())):
                    for s, ids in zip(s_row, h_row):
                        if math.isfinite(s):
                            finished[images[i]].append((s / lp, s, ids))
                break
            keep = [i for i, img in enumerate(images) if len(finished[img]) < k]
            if len(keep) < n:
                if not keep:
                    break
                keep_t = torch.tensor(keep, device=device)
                images = [images[i] for i in keep]
                scores, hist = scores[keep_t], hist[keep_t]
                rows = (keep_t[:, None] * k + torch.arange(k, device=device)).view(-1)  # (N'*k,)
                tok = tok[rows]
                _select_cache(cache, rows, filled=t + 1)
                if ctc is not None:
                    att, r = att[keep_t], r[:, rows]
        return [sorted(hyps, key=lambda h: -h[0])[:k] for hyps in finished]

    @staticmethod
    def _joint_candidates(ctc, images, att, r, logp, hist, n_cand):
        """One step of joint decoding for N live images x k hypotheses: each hypothesis's ceil(1.5 k)
        likeliest next tokens by attention (the pre-beam; rows whose hypothesis is dead stay -inf), scored
        by (1 - w) (att + log p_att(c)) + w log P_CTC(g + c...) -> the n_cand best per image, best first:
        (joint scores (N, n_cand), beam of origin (N, n_cand), token (N, n_cand), their attention sums
        (N, n_cand), their CTC states (T, N*n_cand, 2))."""
        w, scorer = ctc
        n, k = att.shape
        c = min(logp.shape[1], math.ceil(1.5 * k))
        pre_lp, pre = logp.topk(c, dim=1)                              # (N*k, C)
        last = hist[:, :, -1].reshape(-1) if hist.shape[2] else torch.full((n * k,), -1, device=logp.device)
        rows = torch.tensor(images, device=logp.device).repeat_interleave(k)   # (N*k,) image of each row
        psi, r_new = scorer.extend(rows, r, last, pre)                 # (N*k, C), (T, N*k, C, 2)
        att_c = att.reshape(-1, 1) + pre_lp                            # (N*k, C)
        joint = joint_score(att_c, psi, w)                             # (N*k, C), -inf where the hypothesis is dead
        top, idx = joint.view(n, k * c).topk(n_cand, dim=1)            # (N, n_cand)
        origin, j = idx // c, idx % c
        flat = (torch.arange(n, device=logp.device)[:, None] * k + origin) * c + j           # (N, n_cand)
        token = pre.view(-1).gather(0, flat.view(-1)).view(n, n_cand)
        att_top = att_c.view(-1).gather(0, flat.view(-1)).view(n, n_cand)
        r_top = r_new.reshape(r_new.shape[0], -1, 2)[:, flat.view(-1)]  # (T, N*n_cand, 2)
        return top, origin, token, att_top, r_top

    @torch.no_grad()
    def sequence_logprob(self, images, tgt, length_penalty=None, memory=None):
        """Summed log-probability (B,) float32 of the gold tgt (B, T) = [SOS] tokens [EOS], PAD-padded,
        given the images (or their memory; teacher forcing, eval mode). With length_penalty=alpha the
        sum is divided by ((5 + n) / 6)^alpha, n = tokens after <sos> including <eos>: the beam_search
        score of tgt. (greedy's logp is the plain sum: length_penalty=None.)"""
        with eval_mode(self):
            memory = self._memory(images, memory)
            tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]                     # (B, T-1) each
            logits = self.decode(tgt_in, memory, tgt_in == PAD)           # (B, T-1, V)
        logp = F.log_softmax(logits.float(), dim=-1)
        tok_logp = logp.gather(2, tgt_out[:, :, None])[:, :, 0]           # (B, T-1)
        real = tgt_out != PAD
        total = tok_logp.masked_fill(~real, 0.0).sum(dim=1)
        if length_penalty is not None:
            total = total / gnmt_length_penalty(real.sum(dim=1).float(), length_penalty)
        return total


# -----------------------------------------------------------------------------
# building and growing a model

def build_model(hparams):
    """Im2LatexModel(**hparams): a new model from train.py's flags, or the architecture of a checkpoint
    from ckpt['hparams'] (= model.hparams; missing keys take the defaults). A backbone_weights path is
    loaded; a model's own .hparams never holds one (see Im2LatexModel)."""
    hparams = dict(hparams)
    unknown = sorted(set(hparams) - set(DEFAULTS) - {'vocab_size'})
    if unknown:
        raise ValueError(f'unknown model hyperparameters {unknown} (written by a newer version?)')
    if 'vocab_size' not in hparams:
        raise ValueError('model hyperparameters lack vocab_size')
    return Im2LatexModel(**hparams)


@torch.no_grad()
def extend_vocab(model, new_vocab_size):
    """Grow the token embedding and the output layer to new_vocab_size (domain adaptation with a vocab
    extended by data.Vocab.extend). Old rows are kept bit-exact, new rows are initialised as in a fresh
    model, so the logits of the old tokens are unchanged for the same input. Build the optimizer after
    this call (the parameters are new tensors)."""
    dec = model.decoder
    old, d = dec.embed.num_embeddings, dec.embed.embedding_dim
    if new_vocab_size < old:
        raise ValueError(f'cannot shrink the vocab from {old} to {new_vocab_size}')
    if new_vocab_size == old:
        return
    w = dec.embed.weight
    embed = nn.Embedding(new_vocab_size, d, device=w.device, dtype=w.dtype)
    init_embedding_(embed.weight)
    embed.weight[:old] = w
    out = nn.Linear(d, new_vocab_size, device=w.device, dtype=dec.out.weight.dtype)
    init_output_(out)
    out.weight[:old] = dec.out.weight
    out.bias[:old] = dec.out.bias
    dec.embed, dec.out = embed, out
    if model.ctc_head is not None:              # per frame: the old V rows kept, new rows as in a fresh head
        k, head = model.hparams['ctc_frames'], model.ctc_head
        grown = nn.Linear(d, k * new_vocab_size, device=w.device, dtype=head.weight.dtype)
        grown.weight.view(k, new_vocab_size, d)[:, :old] = head.weight.view(k, old, d)
        grown.bias.view(k, new_vocab_size)[:, :old] = head.bias.view(k, old)
        model.ctc_head = grown
    model.vocab_size = new_vocab_size
    model.hparams['vocab_size'] = new_vocab_size


# -----------------------------------------------------------------------------
# decoding a data set (train.py's validation, test.py's evaluation and transcription)

class Record(NamedTuple):
    """One decoded sample. A tuple (index, gold, pred, score_pred, score_gold) that also answers
    record['gold'] etc. gold/pred are token lists; scores are summed log-probabilities (nan if unknown)."""
    index: int
    gold: list
    pred: list
    score_pred: float
    score_gold: float

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return tuple.__getitem__(self, key)


def model_max_len(model):
    """Longest token sequence (positions) the model's decoder accepts."""
    return int(getattr(model, 'hparams', {}).get('max_len', 10 ** 9))


def uses_ctc(model, beam, ctc_weight):
    """Whether decode_batch decodes jointly with the CTC head: a beam of 2 or more, a weight > 0 and a
    model that has the head (one trained with --ctc)."""
    return beam > 1 and ctc_weight > 0 and getattr(model, 'ctc_head', None) is not None


def joint_score(att_logp, ctc_logp, ctc_weight):
    """(1 - w) log P_att + w log P_ctc, elementwise (Watanabe et al. 2017, "Hybrid CTC/Attention
    Architecture for End-to-End Speech Recognition", Sec. IV): the joint beam search's ranking and the gold
    formula's score on its scale. log P_ctc is floored at CTC_FLOOR: a formula (or prefix) with more tokens
    than the CTC head has frames is ranked below every one it can emit, by attention among themselves, so a
    beam never runs out of hypotheses. Where log P_att is not finite (a dead hypothesis, a gold formula too
    long for the decoder) it is kept as it is."""
    att, ctc = torch.as_tensor(att_logp, dtype=torch.float32), torch.as_tensor(ctc_logp, dtype=torch.float32)
    return torch.where(torch.isfinite(att), (1 - ctc_weight) * att + ctc_weight * ctc.clamp_min(CTC_FLOOR), att)


def decode_batch(model, images=None, beam=1, max_len=MAX_DECODE_LEN, length_penalty=LENGTH_PENALTY, memory=None,
                 ctc_weight=0.0, ctc_log_probs=None, memory_pad_mask=None):
    """(B, 1, H, W) images of one size (or their memory) -> (id lists without SOS/EOS, (B,) scores).
    Greedy (cached) for beam 1, else beam search, which picks by the length-normalised score; the score
    returned is the plain summed log-prob (<eos> included when emitted), the scale of score_gold.
    With uses_ctc(model, beam, ctc_weight): one-pass joint CTC-attention beam search (see
    Im2LatexModel.beam_search_nbest), and the score is the joint (1 - w) log P_att + w log P_CTC.
    The CTC head's alignment is monotonic, which mends the attention decoder's dropped and repeated
    symbols. ctc_log_probs (T, B, V): the head's output for these images (computed from the images when
    None; a memory alone cannot give it, its positions are added). memory_pad_mask (B, S): the memories
    of images of several sizes stacked by pad_memories (their CTC frames by pad_ctc_frames)."""
    if beam <= 1:
        padded = {} if memory_pad_mask is None else dict(memory_pad_mask=memory_pad_mask)
        return model.greedy(images=images, memory=memory, max_len=max_len, **padded)
    joint = {}
    if uses_ctc(model, beam, ctc_weight):
        if ctc_log_probs is None:
            if images is None:
                raise ValueError('joint CTC decoding from a memory needs ctc_log_probs')
            with eval_mode(model):
                memory, ctc_log_probs = model.encode_joint(images)
        joint = dict(ctc_log_probs=ctc_log_probs, ctc_weight=ctc_weight)
    best = model.beam_search_nbest(images=images, memory=memory, beam=beam, max_len=max_len,
                                   length_penalty=length_penalty, memory_pad_mask=memory_pad_mask, **joint)
    ids = [hyps[0][2] if hyps else [] for hyps in best]      # hyps: (score, summed log-prob, ids), best first
    return ids, torch.tensor([hyps[0][1] if hyps else math.nan for hyps in best], dtype=torch.float32)


def gold_logprob(model, tgt, memory):
    """model.sequence_logprob of tgt (B, T) = [SOS] ids [EOS], PAD-padded, given the memory; nan for a
    gold sequence longer than the decoder's positions (such a formula is still decoded and scored)."""
    limit = model_max_len(model)                       # positions the decoder input tgt[:, :-1] may use
    lengths = (tgt != PAD).sum(dim=1)                  # (B,) incl. SOS and EOS
    fits = lengths - 1 <= limit
    out = torch.full((tgt.shape[0],), math.nan)
    if fits.any():
        rows = fits.nonzero()[:, 0]
        sub = tgt[rows, :int(lengths[rows].max())]    # (b, T') only fitting rows, trailing PAD cut
        out[rows.cpu()] = model.sequence_logprob(None, sub, memory=memory[rows]).float().cpu()
    return out


def pad_memories(memories):
    """Memories of images of different sizes [(B_i, S_i, d)] -> (memory (sum B_i, max S_i, d) zero-padded,
    pad (sum B_i, max S_i) bool, True at padding). Decoding with that mask attends to each image's own S_i
    positions only, so every image gets the tokens it gets alone (up to float rounding), while the decoder
    runs once for all: a trimmed test split of 600 formulas has ~75 sizes, so most sizes hold a few images,
    and decoding them one size at a time runs ~150 small decoder steps per size.
    Example: 2 images of 3 x 24 = 72 positions and 1 of 3 x 64 = 192 -> memory (3, 192, d); rows 0 and 1
    are masked from position 72 on."""
    s = max(m.shape[1] for m in memories)
    memory = torch.cat([F.pad(m, (0, 0, 0, s - m.shape[1])) for m in memories])    # (B, S, d)
    pad = torch.cat([(torch.arange(s, device=m.device) >= m.shape[1]).expand(m.shape[0], s) for m in memories])
    return memory, pad


def pad_ctc_frames(log_probs):
    """The CTC head's log-probs of images of different widths [(T_i, B_i, V)] -> (max T_i, sum B_i, V). The
    frames after an image's T_i emit the blank with probability 1 (log-prob 0 for <pad>, -inf for every
    token): blanks extend any alignment and add no token, so every prefix keeps the CTC probability it has
    over the image's own frames, and one that does not fit them stays impossible."""
    t = max(lp.shape[0] for lp in log_probs)
    padded = []
    for lp in log_probs:
        extra = lp.new_full((t - lp.shape[0], lp.shape[1], lp.shape[2]), float('-inf'))   # (t - T_i, B_i, V)
        extra[:, :, PAD] = 0.0
        padded.append(torch.cat([lp, extra]))
    return torch.cat(padded, dim=1)                                   # (T, B, V)


def _encode_micro_batch(model, mb, vocab, gold_tokens, device, gold_scores, decoding):
    """One micro-batch of data.collate (one image size) -> dict of its indices, gold token lists, memory
    (B, S, d_model), CTC log-probs (T, B, V) for joint decoding (else None) and gold scores (list)."""
    images = mb['images'].to(device, non_blocking=True)
    indices = mb['indices'].tolist()
    joint = uses_ctc(model, decoding['beam'], decoding.get('ctc_weight', 0.0))
    memory, ctc_lp = model.encode_joint(images) if joint else (model.encode(images), None)
    score_gold = [math.nan] * len(indices)
    if gold_scores and mb.get('tgt') is not None:
        tgt = mb['tgt'].to(device, non_blocking=True)
        scores = gold_logprob(model, tgt, memory)
        if joint:                                      # on the scale of the joint score_pred
            gold_ids = [[t for t in row if t > EOS] for row in tgt.tolist()]
            scores = joint_score(scores, model.ctc_sequence_logprob(ctc_lp, gold_ids), decoding['ctc_weight'])
        score_gold = scores.float().tolist()
    if gold_tokens is not None:
        golds = [list(gold_tokens[index]) for index in indices]
    elif mb.get('tgt') is not None:
        golds = [vocab.decode(row) for row in mb['tgt']]
    else:
        golds = [[] for _ in indices]
    return dict(indices=indices, golds=golds, memory=memory, ctc=ctc_lp, score_gold=score_gold)


def _decode_group(model, group, vocab, decoding):
    """Encoded micro-batches (_encode_micro_batch) of one or more image sizes, decoded as one batch (their
    memories padded and masked by pad_memories) -> their Records, in group order."""
    if len(group) == 1:
        memory, pad, ctc = group[0]['memory'], None, group[0]['ctc']
    else:
        memory, pad = pad_memories([g['memory'] for g in group])
        ctc = pad_ctc_frames([g['ctc'] for g in group]) if group[0]['ctc'] is not None else None
    ids, score_pred = decode_batch(model, memory=memory, ctc_log_probs=ctc, memory_pad_mask=pad, **decoding)
    preds, score_pred = iter(ids), iter(score_pred.float().tolist())
    return [Record(index, gold, vocab.decode(next(preds)), next(score_pred), score_gold)
            for g in group for index, gold, score_gold in zip(g['indices'], g['golds'], g['score_gold'])]


@torch.no_grad()
def decode_dataset(model, loader, vocab, beam=1, max_len=MAX_DECODE_LEN, amp_dtype=None, device=None, *,
                   progress=True, gold_scores=True, length_penalty=LENGTH_PENALTY, desc='decode', ctc_weight=0.0,
                   batch_rows=DECODE_BATCH_ROWS):
    """Decode every sample of `loader` (data.make_loader over a FormulaDataset, shuffle off or on)
    -> list of Record(index, gold tokens, pred tokens, score_pred, score_gold) sorted by index.

    gold tokens are the dataset's token strings (not vocab ids), so a gold token the vocab lacks can
    never be matched by a prediction: it counts as an error. score_gold is the model's summed log-prob
    of the gold ids ([SOS] .. [EOS], unknown tokens as <unk>); gold_scores=False skips it (nan).
    Each micro-batch (one image size) is encoded alone; consecutive ones are decoded together up to
    batch_rows images (pad_memories; 1: every size alone). The model is put in eval mode for the call
    and then back in its previous mode."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    decoding = dict(beam=beam, max_len=min(max_len, model_max_len(model)),   # no more than its positions
                    length_penalty=length_penalty, ctc_weight=ctc_weight)
    dataset = loader.dataset
    gold_tokens = getattr(dataset, 'tokens', None)
    records, group = [], []
    with eval_mode(model), amp_context(device, amp_dtype), tqdm(
            total=len(dataset), desc=desc, unit='formula', disable=not progress, dynamic_ncols=True) as bar:
        for micro_batches in loader:
            for mb in micro_batches:                   # one image size each
                rows = sum(len(g['indices']) for g in group)
                if group and rows + len(mb['indices']) > batch_rows:
                    records += _decode_group(model, group, vocab, decoding)
                    bar.update(rows)
                    group = []
                group.append(_encode_micro_batch(model, mb, vocab, gold_tokens, device, gold_scores, decoding))
        if group:
            records += _decode_group(model, group, vocab, decoding)
            bar.update(sum(len(g['indices']) for g in group))
    records.sort(key=lambda r: r.index)
    return records
