"""Non-local block, embedded Gaussian version, for 2D feature maps.

Wang, Girshick, Gupta, He. "Non-local Neural Networks". CVPR 2018 (arXiv:1711.07971), Sec. 3.2-3.3:

    theta, phi, g : 1x1 convs C -> C'            (C' = C/2 by default)
    f   = theta(x)^T phi(x)                       (N x N', N = H*W, N' = positions of phi/g)
    A   = softmax(f [* C'^-0.5], dim=-1)          (embedded Gaussian = softmax of dot products)
    y   = A g(x)                                  (N x C')
    z   = BN(W y) + x                             (W: 1x1 conv C' -> C)

BatchNorm weight and bias start at zero, so the block is exactly the identity at initialisation and
can be inserted into a pretrained network without changing its output (the paper's Sec. 3.3).
Sub-sampling (the paper's "subsampling trick", Sec. 3.3): a 2x2 max-pool after phi and g divides
the number of key positions by 4. A 2x2 pool cannot be applied to an axis of length 1 (a formula
image 16-31 px high has a 1-row map at stride 16), so each axis is pooled only where it has >= 2
positions (a 1 x W map is pooled 1x2, a 1x1 map not at all), with ceil_mode so that odd sizes keep
their last row/column. The optional C'^-0.5 scaling follows the authors' video reference code.
"""
import torch
import torch.nn.functional as F
from torch import nn

from utils import fp32_under_cpu_autocast


class NonLocalBlock2D(nn.Module):
    """z = x + BN(W softmax(theta(x)^T phi(x)) g(x)); works for any H, W >= 1.

    in_channels: C; inter_channels: C' (default C // 2, at least 1); sub_sample: max-pool phi and g
    (per axis, only where the axis has >= 2 positions); scale: multiply f by C'^-0.5;
    bn_layer: W is conv + BatchNorm (zero-initialised) if True, else a zero-initialised conv.
    """

    def __init__(self, in_channels, inter_channels=None, sub_sample=True, scale=True, bn_layer=True):
        super().__init__()
        self.in_channels = in_channels
        self.inter_channels = inter_channels if inter_channels is not None else max(1, in_channels // 2)
        self.sub_sample = sub_sample
        self.scale = scale
        c, ci = in_channels, self.inter_channels
        self.theta = nn.Conv2d(c, ci, kernel_size=1)
        self.phi = nn.Conv2d(c, ci, kernel_size=1)
        self.g = nn.Conv2d(c, ci, kernel_size=1)
        if bn_layer:
            self.W = nn.Sequential(nn.Conv2d(ci, c, kernel_size=1), nn.BatchNorm2d(c))
            nn.init.zeros_(self.W[1].weight)
            nn.init.zeros_(self.W[1].bias)
        else:
            self.W = nn.Conv2d(ci, c, kernel_size=1)
            nn.init.zeros_(self.W.weight)
            nn.init.zeros_(self.W.bias)

    def _pool(self, t):
        """2x2 max-pool, per axis only where the axis has >= 2 positions: (B,C',H,W) -> (B,C',H',W')."""
        h, w = t.shape[-2:]
        kernel = (2 if h >= 2 else 1, 2 if w >= 2 else 1)
        if kernel == (1, 1):                      # 1x1 map: nothing to pool
            return t
        return F.max_pool2d(t, kernel_size=kernel, stride=kernel, ceil_mode=True)

    def forward(self, x, return_attention=False):
        """x: (B, C, H, W) -> z: (B, C, H, W); with return_attention also A: (B, H*W, H'*W')."""
        b, _, h, w = x.shape
        ci = self.inter_channels
        q = self.theta(x)                         # (B, C', H, W)
        k = self.phi(x)                           # (B, C', H, W)
        v = self.g(x)                             # (B, C', H, W)
        if self.sub_sample:
            k = self._pool(k)                     # (B, C', H', W'), H' = ceil(H/2) if H >= 2 else 1
            v = self._pool(v)                     # (B, C', H', W')
        q = q.flatten(2).transpose(1, 2)          # (B, N, C'),  N  = H*W (row-major)
        k = k.flatten(2).transpose(1, 2)          # (B, N', C'), N' = H'*W'
        v = v.flatten(2).transpose(1, 2)          # (B, N', C')
        scale = ci ** -0.5 if self.scale else 1.0
        if return_attention:
            f = torch.bmm(q, k.transpose(1, 2)) * scale        # (B, N, N')
            attn = torch.softmax(f.float(), dim=-1).to(v.dtype)  # (B, N, N'), rows sum to 1
            y = torch.bmm(attn, v)                               # (B, N, C')
        else:
            # same maths through the fused kernel (flash / memory-efficient attention where available)
            y = fp32_under_cpu_autocast(F.scaled_dot_product_attention, q.unsqueeze(1), k.unsqueeze(1),
                                        v.unsqueeze(1), scale=scale).squeeze(1)  # (B, 1, N, C') -> (B, N, C')
        y = y.transpose(1, 2).reshape(b, ci, h, w)  # (B, N, C') -> (B, C', N) -> (B, C', H, W)
        z = self.W(y) + x                         # (B, C, H, W)
        if return_attention:
            return z, attn
        return z
