"""Tests of non_local_emb_gaussian.py and transformer.py (CPU, small decoders where the test is about
decoding logic; the shape tests use the default encoder)."""
import copy
import itertools
import json
import socket
import urllib.request

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from data import EOS, PAD, SOS, UNK
from non_local_emb_gaussian import NonLocalBlock2D
from checkpoint import load_checkpoint
from data import SPECIALS, Vocab
from transformer import (CTCPrefixScorer, Im2LatexModel, build_model, decode_batch, decode_dataset, extend_vocab,
                         gnmt_length_penalty, pad_ctc_frames, pad_memories, uses_ctc)

torch.set_num_threads(min(2, torch.get_num_threads()))

SMALL = dict(d_model=64, nhead=4, num_layers=2, dim_ff=128)   # decoder size for decoding-logic tests


def calibrate_bn(model, images):
    """Give every BatchNorm the running statistics of `images`. A freshly initialised model in eval mode
    has running var 1 everywhere, its activations shrink ~10^-13 through the backbone and all images
    give the same memory; calibrated, different images give different memories and outputs."""
    saved = {}
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved[m] = m.momentum
            m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model.encode(images)
    for m, mom in saved.items():
        m.momentum = mom
    model.eval()


def ceil_div(a, b):
    return -(-a // b)


@pytest.fixture(scope='module')
def default_model():
    torch.manual_seed(0)
    return Im2LatexModel(40).eval()


@pytest.fixture(scope='module')
def small_model():
    """A small-decoder model with calibrated BatchNorm (images matter)."""
    torch.manual_seed(1)
    model = Im2LatexModel(30, **SMALL)
    calibrate_bn(model, torch.rand(8, 1, 32, 96))
    return model


def boosted_eos(model, memory, max_len, distinct=2):
    """Copy of `model` whose <eos> bias is raised until greedy sequences stop at >= `distinct`
    different steps, some before max_len (a random model rarely emits <eos> otherwise)."""
    m = copy.deepcopy(model)
    base = m.decoder.out.bias[EOS].item()
    for boost in [0.25 * i for i in range(1, 80)]:
        with torch.no_grad():
            m.decoder.out.bias[EOS] = base + boost
        ids, _ = m.greedy(memory=memory, max_len=max_len)
        lengths = [len(i) for i in ids]
        if len(set(lengths)) >= distinct and min(lengths) < max_len:
            return m
    raise AssertionError('no <eos> boost makes sequences stop at different steps')


# -----------------------------------------------------------------------------
# shapes

@pytest.mark.parametrize('h,w', [(33, 97), (17, 400), (160, 800), (16, 16)])
def test_output_shapes_default_encoder(default_model, h, w):
    b, t = 2, 7
    images = torch.rand(b, 1, h, w)
    tgt = torch.randint(4, 40, (b, t))
    with torch.no_grad():
        fmap = default_model.encoder.feature_map(images)
        memory = default_model.encode(images)
        logits = default_model(images, tgt)
    assert fmap.shape == (b, 1280, ceil_div(h, 16), ceil_div(w, 16))   # dynamic SAME padding: ceil
    assert memory.shape == (b, ceil_div(h, 16) * ceil_div(w, 16), 256)
    assert logits.shape == (b, t, 40)
    assert torch.isfinite(logits).all()
    if (h, w) == (16, 16):
        assert fmap.shape[-2:] == (1, 1)


@pytest.mark.parametrize('stride', [8, 32, (16, 8), [32, 8], (8, 16)])
def test_other_output_strides(stride):
    rows, cols = (stride, stride) if isinstance(stride, int) else stride
    model = Im2LatexModel(20, output_stride=stride, **SMALL).eval()
    with torch.no_grad():
        content = model.encoder.content(torch.rand(1, 1, 33, 97))
        memory = model.encode(torch.rand(1, 1, 33, 97))
    assert content.shape == (1, ceil_div(33, rows), ceil_div(97, cols), 64)
    assert memory.shape == (1, ceil_div(33, rows) * ceil_div(97, cols), 64)
    assert model.hparams['output_stride'] == (rows if rows == cols else [rows, cols])   # JSON-able


@pytest.mark.parametrize('stride,head', [((16, 8), 16), ((16, 8), (32, 16)), (8, (16, 8)), (16, 32)])
def test_head_stride_keeps_the_memory_at_the_output_stride(stride, head):
    """A coarser head (stages 6-7) runs at head_stride and is upsampled back to the output stride,
    where a projection of stage 5's output is added: memory and CTC columns keep the output stride."""
    rows, cols = (stride, stride) if isinstance(stride, int) else stride
    hr, hc = (head, head) if isinstance(head, int) else head
    model = Im2LatexModel(20, output_stride=stride, head_stride=head, ctc_frames=2, memory_norm=True, **SMALL).eval()
    images = torch.rand(2, 1, 33, 97)
    with torch.no_grad():
        fmap = model.encoder.feature_map(images)
        content = model.encoder.content(images)
    assert fmap.shape[-2:] == (ceil_div(33, hr), ceil_div(97, hc))
    assert content.shape == (2, ceil_div(33, rows), ceil_div(97, cols), 64)
    assert model.ctc_log_probs(content).shape == (2 * ceil_div(97, cols), 2, 20)
    assert model.encoder.skip_proj is not None
    # the hparams rebuild the same architecture (a checkpoint's model)
    again = build_model(model.hparams)
    assert list(again.state_dict()) == list(model.state_dict())
    # each memory position = head output at its coarse position + its own stage-5 projection
    skip = []
    with torch.no_grad():
        coarse = model.encoder.proj(model.encoder.feature_map(images, skip).permute(0, 2, 3, 1))
        fine = model.encoder.skip_proj(skip[0].permute(0, 2, 3, 1))
        y, x = ceil_div(33, rows) - 1, ceil_div(97, cols) - 1
        want = model.encoder.norm(coarse[:, y * rows // hr, x * cols // hc] + fine[:, y, x])
    assert torch.allclose(content[:, y, x], want, atol=1e-5)


def test_head_stride_equal_to_the_output_stride_is_the_plain_model():
    a = Im2LatexModel(20, output_stride=(16, 8), head_stride=(16, 8), **SMALL)
    b = Im2LatexModel(20, output_stride=(16, 8), **SMALL)
    assert a.hparams['head_stride'] is None and a.encoder.skip_proj is None
    assert list(a.state_dict()) == list(b.state_dict())


@pytest.mark.parametrize('stride,head', [((16, 8), (16, 32)), ((16, 8), 8), ((16, 8), 32), ((32, 8), (32, 16))])
def test_head_stride_rejects_what_it_cannot_build(stride, head):
    with pytest.raises(ValueError, match='head_stride'):
        Im2LatexModel(20, output_stride=stride, head_stride=head, **SMALL)


def test_output_stride_changes_no_weights():
    """A stride is a property of the forward pass: (16, 8) has exactly the parameters of 16, so weights
    move between the two (and old checkpoints, which stored an int, load as before)."""
    a = Im2LatexModel(20, output_stride=16, **SMALL).state_dict()
    b = Im2LatexModel(20, output_stride=(16, 8), **SMALL).state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)


def test_train_step_reaches_every_part():
    torch.manual_seed(0)
    model = Im2LatexModel(20, **SMALL).train()
    images = torch.rand(2, 1, 32, 64)
    tgt = torch.tensor([[SOS, 5, 6, 7, EOS], [SOS, 8, EOS, PAD, PAD]])
    logits = model(images, tgt[:, :-1], tgt[:, :-1] == PAD)
    loss = nn.functional.cross_entropy(logits.transpose(1, 2), tgt[:, 1:], ignore_index=PAD)
    loss.backward()
    for name in ['encoder.backbone._conv_stem.weight', 'encoder.backbone._blocks.15._project_conv.weight',
                 'encoder.nonlocal_blocks.10.W.1.weight', 'encoder.proj.weight',
                 'decoder.embed.weight', 'decoder.layers.0.kv.weight', 'decoder.out.weight']:
        g = dict(model.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    assert model.training   # decoding helpers restore the mode; training code is not affected


def test_pad_mask_does_not_change_real_positions(small_model):
    tgt_in = torch.tensor([[SOS, 5, 6, 7, EOS], [SOS, 8, EOS, PAD, PAD]])
    memory = torch.randn(2, 6, 64)
    with torch.no_grad():
        a = small_model.decode(tgt_in, memory)
        b = small_model.decode(tgt_in, memory, tgt_in == PAD)
    real = tgt_in != PAD
    assert torch.allclose(a[real], b[real], atol=1e-5)


def test_hparams_json_roundtrip_rebuilds_same_architecture():
    model = Im2LatexModel(33, **SMALL, nonlocal_after=(7, 14), output_stride=(32, 8))
    hp = json.loads(json.dumps(model.hparams))
    assert hp == model.hparams
    rebuilt = build_model(hp)
    assert rebuilt.hparams == model.hparams
    a, b = model.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    with pytest.raises(ValueError, match='unknown'):
        build_model({**hp, 'bogus': 1})


def test_bad_constructor_arguments():
    for bad in (4, (16, 4), (16, 8, 8), True):
        with pytest.raises(ValueError, match='output_stride'):
            Im2LatexModel(20, output_stride=bad)
    with pytest.raises(ValueError, match='nonlocal_after'):
        Im2LatexModel(20, nonlocal_after=(3, 16))
    with pytest.raises(ValueError, match='d_model'):
        Im2LatexModel(20, d_model=100, nhead=8)


def test_state_dict_keeps_efficientnet_keys(default_model):
    from efficientnet_pytorch import EfficientNet
    ref = EfficientNet.from_name('efficientnet-b0', image_size=None, include_top=False)
    ours = {k[len('encoder.backbone.'):] for k in default_model.state_dict() if k.startswith('encoder.backbone.')}
    assert ours == set(ref.state_dict())


@pytest.mark.parametrize('stride', [1, 2, (2, 1), (1, 2)])
@pytest.mark.parametrize('kernel,groups', [(1, 1), (3, 1), (3, 8), (5, 8)])
def test_same_padding_conv_equals_efficientnet_pytorch(stride, kernel, groups):
    """SamePaddingConv2d (padding inside the convolution) computes what efficientnet_pytorch's
    Conv2dDynamicSamePadding (a padded copy) computes, for even and odd sizes, both ways."""
    from efficientnet_pytorch.utils import Conv2dDynamicSamePadding
    from transformer import SamePaddingConv2d
    torch.manual_seed(0)
    ref = Conv2dDynamicSamePadding(8, 8, kernel, stride=stride, groups=groups, bias=True)
    ours = copy.deepcopy(ref)
    ours.__class__ = SamePaddingConv2d
    for h, w in [(1, 1), (2, 7), (5, 6), (9, 16), (16, 33)]:
        x = torch.randn(2, 8, h, w, requires_grad=True)
        a, b = ref(x), ours(x)
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-6), (h, w)
        ga = torch.autograd.grad(a.square().sum(), (x, ref.weight))
        gb = torch.autograd.grad(b.square().sum(), (x, ours.weight))
        assert all(torch.allclose(u, v, atol=1e-5) for u, v in zip(ga, gb)), (h, w)


def test_backbone_uses_same_padding_conv_everywhere(default_model):
    from efficientnet_pytorch.utils import Conv2dDynamicSamePadding
    from transformer import SamePaddingConv2d
    kinds = [type(m) for m in default_model.modules() if isinstance(m, Conv2dDynamicSamePadding)]
    assert kinds and set(kinds) == {SamePaddingConv2d}


def test_depthwise_conv_and_attention_run_in_fp32_under_cpu_bf16(small_model):
    """Under CPU bf16 autocast the depthwise convolutions and the training-path attention compute in
    fp32 (oneDNN's bf16 kernels are the slow ones there); the dense convolutions stay bf16."""
    from transformer import SamePaddingConv2d
    blocks = small_model.encoder.backbone._blocks
    dw, pw = blocks[1]._depthwise_conv, blocks[1]._project_conv
    assert isinstance(dw, SamePaddingConv2d) and dw.groups > 1 and pw.groups == 1
    x = torch.randn(2, dw.in_channels, 6, 10)
    with torch.no_grad():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y, z = dw(x), pw(torch.randn(2, pw.in_channels, 6, 10))
        assert y.dtype == torch.float32 and z.dtype == torch.bfloat16
        assert torch.allclose(y, dw(x), atol=1e-6)                       # the fp32 result itself
    from utils import fp32_under_cpu_autocast
    q = torch.randn(2, 4, 5, 8, dtype=torch.bfloat16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        a = fp32_under_cpu_autocast(F.scaled_dot_product_attention, q, q, q, is_causal=True)
    assert a.dtype == torch.float32
    assert fp32_under_cpu_autocast(F.scaled_dot_product_attention, q, q, q).dtype == torch.bfloat16  # no autocast
    tgt = torch.randint(4, 30, (2, 7))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits = small_model(torch.rand(2, 1, 32, 96), tgt)
    assert logits.shape == (2, 7, 30) and torch.isfinite(logits.float()).all()


# -----------------------------------------------------------------------------
# non-local block

@pytest.mark.parametrize('h,w', [(1, 1), (1, 9), (7, 1), (3, 5), (8, 8)])
def test_nonlocal_identity_at_init_any_size(h, w):
    torch.manual_seed(0)
    block = NonLocalBlock2D(16)
    x = torch.randn(2, 16, h, w)
    for mode in (True, False):
        block.train(mode)
        assert torch.equal(block(x), x)
        z, attn = block(x, return_attention=True)
        assert torch.equal(z, x) and torch.isfinite(attn).all()


@pytest.mark.parametrize('h,w,n_keys', [(1, 1, 1), (1, 9, 5), (7, 1, 4), (3, 5, 6), (8, 8, 16)])
def test_nonlocal_subsampling_guarded(h, w, n_keys):
    block = NonLocalBlock2D(8, sub_sample=True).eval()
    _, attn = block(torch.randn(2, 8, h, w), return_attention=True)
    assert attn.shape == (2, h * w, n_keys)           # each axis of length >= 2 pooled 2x (ceil)
    assert torch.allclose(attn.sum(-1), torch.ones(2, h * w))
    _, attn = NonLocalBlock2D(8, sub_sample=False).eval()(torch.randn(2, 8, h, w), return_attention=True)
    assert attn.shape == (2, h * w, h * w)


@pytest.mark.parametrize('scale', [True, False])
def test_nonlocal_fused_path_equals_explicit_attention(scale):
    torch.manual_seed(0)
    block = NonLocalBlock2D(12, scale=scale)
    nn.init.normal_(block.W[1].weight)
    nn.init.normal_(block.W[1].bias)
    block.eval()
    x = torch.randn(2, 12, 5, 6)
    z_fused = block(x)
    z_explicit, _ = block(x, return_attention=True)
    assert not torch.allclose(z_fused, x)
    assert torch.allclose(z_fused, z_explicit, atol=1e-5)


def test_nonlocal_gradient_flows_after_one_step():
    torch.manual_seed(0)
    block = NonLocalBlock2D(8).train()
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    x, target = torch.randn(4, 8, 3, 5), torch.randn(4, 8, 3, 5)
    nn.functional.mse_loss(block(x), target).backward()
    assert block.W[1].weight.grad.abs().sum() > 0           # the zero BN weight learns
    assert block.theta.weight.grad.abs().sum() == 0         # nothing else can yet (output x 0)
    opt.step()
    opt.zero_grad()
    assert block.W[1].weight.abs().sum() > 0
    nn.functional.mse_loss(block(x), target).backward()
    for conv in (block.theta, block.phi, block.g, block.W[0]):
        assert conv.weight.grad.abs().sum() > 0


def test_zero_init_residual_blocks_start_as_identity(default_model):
    """Zero gamma: every MBConv block with an identity shortcut returns its input exactly, in train and
    eval mode; the stage-entry blocks (no shortcut) keep gamma 1 and change their input."""
    torch.manual_seed(0)
    model = copy.deepcopy(default_model)
    blocks = model.encoder.backbone._blocks
    assert model.encoder.zero_init_residual_() == 9          # B0: 16 blocks, 7 of them open a stage
    zeroed = [i for i, b in enumerate(blocks) if not b._bn2.weight.any()]
    assert zeroed == [2, 4, 6, 7, 9, 10, 12, 13, 14]
    for i, block in enumerate(blocks):
        x = torch.randn(2, block._block_args.input_filters, 5, 7)
        for mode in (True, False):
            block.train(mode)
            with torch.no_grad():
                y = block(x)
            assert torch.equal(y, x) == (i in zeroed), i
    assert all(torch.equal(b._bn2.weight, torch.ones_like(b._bn2.weight)) for i, b in enumerate(blocks)
               if i not in zeroed)


def test_freeze_stops_gradients_of_the_stem_and_first_blocks(default_model):
    model = copy.deepcopy(default_model)
    net = model.encoder.backbone
    n = model.encoder.freeze_(3)
    frozen = [net._conv_stem, net._bn0] + list(net._blocks[:3])
    assert n == sum(p.numel() for m in frozen for p in m.parameters()) > 0
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for b in net._blocks[3:] for p in b.parameters())
    model.train()
    out = model(torch.rand(2, 1, 40, 96), torch.full((2, 5), SOS))
    out.sum().backward()
    assert all(p.grad is None for m in frozen for p in m.parameters())
    assert net._blocks[3]._project_conv.weight.grad is not None
    with pytest.raises(ValueError, match='0..16'):
        model.encoder.freeze_(17)


# -----------------------------------------------------------------------------
# decoding

def test_cached_greedy_equals_uncached_on_images(small_model):
    torch.manual_seed(2)
    images = torch.rand(3, 1, 32, 96)
    memory = small_model.encode(images)
    assert (memory[0] - memory[1]).abs().max() > 1e-3        # the images matter
    ids_c, lp_c = small_model.greedy(images, max_len=30)
    ids_u, lp_u = small_model.greedy(images, max_len=30, use_cache=False)
    assert ids_c == ids_u
    assert torch.allclose(lp_c, lp_u, atol=1e-4)
    assert all(0 < len(i) <= 30 for i in ids_c)
    assert not small_model.training


def test_cached_greedy_equals_uncached_with_early_eos(small_model):
    torch.manual_seed(3)
    memory = torch.randn(5, 12, 64)
    model = boosted_eos(small_model, memory, max_len=30, distinct=3)
    ids_c, lp_c = model.greedy(memory=memory, max_len=30)
    ids_u, lp_u = model.greedy(memory=memory, max_len=30, use_cache=False)
    assert ids_c == ids_u
    assert torch.allclose(lp_c, lp_u, atol=1e-4)
    assert len({len(i) for i in ids_c}) >= 3                  # stopped at different steps
    assert all(EOS not in i and PAD not in i and SOS not in i for i in ids_c)
    # batching and early stopping do not change any sequence
    for b in range(5):
        one, lp_one = model.greedy(memory=memory[b:b + 1], max_len=30)
        assert one[0] == ids_c[b]
        assert torch.allclose(lp_one[0], lp_c[b], atol=1e-4)
    # greedy's logp is the model's log-probability of its output (+ <eos> where it stopped)
    ended = [b for b, i in enumerate(ids_c) if len(i) < 30]
    tgt = nn.utils.rnn.pad_sequence([torch.tensor([SOS] + ids_c[b] + [EOS]) for b in ended], batch_first=True,
                                    padding_value=PAD)
    assert len(ended) >= 2
    assert torch.allclose(model.sequence_logprob(None, tgt, memory=memory[ended]), lp_c[ended], atol=1e-4)
    # ignore_eos forces the length
    ids_f, _ = model.greedy(memory=memory, max_len=17, ignore_eos=True)
    ids_fu, _ = model.greedy(memory=memory, max_len=17, ignore_eos=True, use_cache=False)
    assert ids_f == ids_fu and all(len(i) == 17 and EOS not in i for i in ids_f)


def test_beam1_equals_greedy(small_model):
    torch.manual_seed(4)
    memory = torch.randn(4, 10, 64)
    model = boosted_eos(small_model, memory, max_len=25)
    ids_g, lp_g = model.greedy(memory=memory, max_len=25)
    for alpha in (0.0, 1.0):
        ids_b, sc_b = model.beam_search(memory=memory, beam=1, max_len=25, length_penalty=alpha)
        assert ids_b == ids_g
        lengths = torch.tensor([len(i) + (len(i) < 25) for i in ids_g], dtype=torch.float32)  # + <eos>
        assert torch.allclose(sc_b, lp_g / gnmt_length_penalty(lengths, alpha), atol=1e-5)
    ids_b, _ = model.beam_search(memory=memory, beam=1, max_len=25, ignore_eos=True)
    assert ids_b == model.greedy(memory=memory, max_len=25, ignore_eos=True)[0]


def test_beam_nbest_sorted_scored_and_batch_independent(small_model):
    torch.manual_seed(5)
    memory = torch.randn(3, 10, 64)
    model = boosted_eos(small_model, memory, max_len=20)
    k, alpha = 4, 0.8
    nbest = model.beam_search_nbest(memory=memory, beam=k, max_len=20, length_penalty=alpha)
    for b, hyps in enumerate(nbest):
        assert 1 <= len(hyps) <= k
        scores = [h[0] for h in hyps]
        assert scores == sorted(scores, reverse=True)
        # each score is the model's length-normalised log-prob of that hypothesis
        for score, logp, ids in hyps:
            ended = len(ids) < 20
            tgt = torch.tensor([[SOS] + ids + ([EOS] if ended else [])])
            if ended:
                recomputed = model.sequence_logprob(None, tgt, length_penalty=alpha, memory=memory[b:b + 1])
                assert abs(recomputed.item() - score) < 1e-4
        # the same image decoded alone gives the same n-best list
        alone = model.beam_search_nbest(memory=memory[b:b + 1], beam=k, max_len=20, length_penalty=alpha)[0]
        assert [h[2] for h in alone] == [h[2] for h in hyps]
        assert all(abs(x[0] - y[0]) < 1e-4 for x, y in zip(alone, hyps))
    ids, sc = model.beam_search(memory=memory, beam=k, max_len=20, length_penalty=alpha)
    assert ids == [h[0][2] for h in nbest]
    assert torch.allclose(sc, torch.tensor([h[0][0] for h in nbest]))


def test_exhaustive_beam_equals_brute_force():
    """With a 2-token vocab (4 choices incl. <eos> and <unk>) and 3 steps there are 13 + 27 = 40
    hypotheses; a 40-beam must find all of them, in the order of brute-force scoring, and its best
    is at least as good as the 1-beam's in the same objective."""
    torch.manual_seed(6)
    model = Im2LatexModel(6, d_model=32, nhead=4, num_layers=2, dim_ff=64).eval()
    memory = torch.randn(2, 5, 32)
    max_len, alpha = 3, 1.0
    choices = [EOS, UNK, 4, 5]
    for b in range(2):
        hyps = []
        for n in range(1, max_len + 1):
            for seq in itertools.product(choices, repeat=n):
                if EOS in seq[:-1] or (n < max_len and seq[-1] != EOS):
                    continue
                ids = list(seq[:-1]) if seq[-1] == EOS else list(seq)
                tgt = torch.tensor([[SOS] + list(seq)])
                hyps.append((model.sequence_logprob(None, tgt, alpha, memory=memory[b:b + 1]).item(), ids))
        assert len(hyps) == 40
        hyps.sort(key=lambda h: -h[0])
        nbest = model.beam_search_nbest(memory=memory[b:b + 1], beam=40, max_len=max_len, length_penalty=alpha)[0]
        assert [h[2] for h in nbest] == [h[1] for h in hyps]
        assert all(abs(x[0] - y[0]) < 1e-4 for x, y in zip(nbest, hyps))
        _, one = model.beam_search(memory=memory[b:b + 1], beam=1, max_len=max_len, length_penalty=alpha)
        assert nbest[0][0] >= one.item() - 1e-6


def test_decoding_under_bf16_autocast(small_model):
    memory = torch.randn(2, 10, 64)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ids, lp = small_model.greedy(memory=memory, max_len=12, ignore_eos=True)
        _, sc = small_model.beam_search(memory=memory, beam=3, max_len=12)
    assert all(len(i) == 12 for i in ids) and lp.dtype == torch.float32 and torch.isfinite(lp).all()
    assert torch.isfinite(sc).all()


def test_max_len_bound(small_model):
    with pytest.raises(ValueError, match='max_len'):
        small_model.greedy(memory=torch.randn(1, 4, 64), max_len=small_model.hparams['max_len'] + 1)


# -----------------------------------------------------------------------------
# checkpoints

def _checkpoint(model, vocab, teacher=None, **extra):
    """A checkpoint dict as train.py writes it (docs/formats.md, "Checkpoints")."""
    return {'format_version': 1, 'model': model.state_dict(),
            'teacher': None if teacher is None else teacher.state_dict(),
            'optimizer': {}, 'scheduler': {}, 'scaler': None, 'epoch': 3, 'step': 120, 'batch_in_epoch': 0,
            'best_metric': 12.5, 'vocab': vocab, 'hparams': model.hparams, 'args': {'batchsz': 4},
            'train_on': 'openai', **extra}


def test_save_load_roundtrip_identical_outputs(small_model, tmp_path):
    vocab = ['<pad>', '<sos>', '<eos>', '<unk>'] + [f't{i}' for i in range(26)]
    teacher = copy.deepcopy(small_model)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    path = tmp_path / 'last.pt'
    torch.save(_checkpoint(small_model, vocab, teacher), path)
    images = torch.rand(2, 1, 32, 96)
    tgt = torch.randint(4, 30, (2, 6))
    for which, ref in (('model', small_model), ('teacher', teacher)):
        model, itos, ckpt = load_checkpoint(str(path), which=which)
        assert not model.training and itos == vocab and ckpt['step'] == 120
        with torch.no_grad():
            out = model(images, tgt)
            assert torch.isfinite(out).all() and torch.equal(out, ref.eval()(images, tgt))
        assert model.greedy(images, max_len=10)[0] == ref.greedy(images, max_len=10)[0]


def test_load_checkpoint_errors(small_model, tmp_path):
    vocab = ['<pad>', '<sos>', '<eos>', '<unk>'] + [f't{i}' for i in range(26)]
    missing = tmp_path / 'nope.pt'
    with pytest.raises(FileNotFoundError, match='nope.pt'):
        load_checkpoint(missing)
    text = tmp_path / 'notes.txt'
    text.write_text('hello')
    with pytest.raises(ValueError, match='notes.txt'):
        load_checkpoint(text)
    plain = tmp_path / 'plain.pt'
    torch.save(small_model.state_dict(), plain)
    with pytest.raises(ValueError, match='plain.pt.*format_version'):
        load_checkpoint(plain)
    no_teacher = tmp_path / 'student.pt'
    torch.save(_checkpoint(small_model, vocab), no_teacher)
    with pytest.raises(ValueError, match='student.pt.*teacher'):
        load_checkpoint(no_teacher, which='teacher')
    future = tmp_path / 'future.pt'
    torch.save({**_checkpoint(small_model, vocab), 'format_version': 2}, future)
    with pytest.raises(ValueError, match='future.pt.*format_version 2'):
        load_checkpoint(future)
    short = tmp_path / 'short_vocab.pt'
    torch.save(_checkpoint(small_model, vocab[:-1]), short)
    with pytest.raises(ValueError, match='short_vocab.pt.*vocab'):
        load_checkpoint(short)


def test_extend_vocab_keeps_old_logits(small_model):
    model = copy.deepcopy(small_model)
    with torch.no_grad():
        model.decoder.out.bias.normal_()          # a trained model's biases are not the zero init
    old_v = model.vocab_size
    old_bias = model.decoder.out.bias.detach().clone()
    old_embed = model.decoder.embed.weight.detach().clone()
    old_out_w = model.decoder.out.weight.detach().clone()
    images = torch.rand(2, 1, 32, 96)
    tgt = torch.randint(4, old_v, (2, 8))
    with torch.no_grad():
        before = model(images, tgt)
    extend_vocab(model, old_v + 7)
    assert model.vocab_size == model.hparams['vocab_size'] == old_v + 7
    assert torch.equal(model.decoder.embed.weight[:old_v], old_embed)
    assert torch.equal(model.decoder.out.weight[:old_v], old_out_w)
    assert torch.equal(model.decoder.out.bias[:old_v], old_bias)
    new_rows = model.decoder.embed.weight[old_v:]
    assert new_rows.abs().sum() > 0 and 0.5 < new_rows.std().item() / old_embed.std().item() < 2
    with torch.no_grad():
        after = model(images, tgt)
    assert after.shape == (2, 8, old_v + 7)
    assert torch.allclose(after[..., :old_v], before, rtol=0, atol=1e-6)
    # new tokens can be fed and predicted; the model still round-trips through build_model
    with torch.no_grad():
        model(images, torch.tensor([[SOS, old_v + 6, old_v]]).expand(2, -1))
    assert build_model(model.hparams).decoder.out.out_features == old_v + 7
    with pytest.raises(ValueError, match='shrink'):
        extend_vocab(model, old_v)


# -----------------------------------------------------------------------------
# no network; local ImageNet weights

@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('network access during model construction')
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)
    monkeypatch.setattr(urllib.request, 'urlopen', refuse)
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', refuse)
    monkeypatch.setattr(torch.hub, 'download_url_to_file', refuse)


@pytest.fixture(scope='module')
def fake_imagenet_file(tmp_path_factory):
    """An RGB efficientnet_pytorch B0 state_dict (with _fc) with non-trivial BatchNorm statistics."""
    from efficientnet_pytorch import EfficientNet
    torch.manual_seed(7)
    ref = EfficientNet.from_name('efficientnet-b0', image_size=None)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
    ref.train()
    with torch.no_grad():
        ref(torch.rand(4, 3, 64, 96))
    ref.eval()
    path = tmp_path_factory.mktemp('weights') / 'efficientnet-b0-fake.pth'
    torch.save(ref.state_dict(), path)
    return path, ref


def test_model_construction_needs_no_network(no_network, fake_imagenet_file):
    model = Im2LatexModel(20)
    assert model.encoder.backbone._conv_stem.weight.shape == (32, 1, 3, 3)
    Im2LatexModel(20, backbone_weights=fake_imagenet_file[0], **SMALL)


def test_backbone_weights_loading(fake_imagenet_file):
    path, ref = fake_imagenet_file
    model = build_model(dict(vocab_size=20, backbone_weights=str(path), output_stride=32, nonlocal_after=(),
                             **SMALL)).eval()
    assert model.hparams['backbone_weights'] is None    # loaded: a rebuild from hparams needs no file
    assert build_model(model.hparams).hparams == model.hparams
    rgb = torch.load(path)
    bb = model.encoder.backbone
    assert torch.allclose(bb._conv_stem.weight, rgb['_conv_stem.weight'].sum(dim=1, keepdim=True))
    assert torch.equal(bb._blocks[7]._depthwise_conv.weight, rgb['_blocks.7._depthwise_conv.weight'])
    assert torch.equal(bb._bn1.running_var, rgb['_bn1.running_var'])
    # a gray image through the summed stem == the RGB network on the gray image repeated 3 times
    x = torch.rand(2, 1, 40, 72)
    with torch.no_grad():
        ours = model.encoder.feature_map(x)
        theirs = ref.extract_features(x.expand(-1, 3, -1, -1))
    assert theirs.std() > 1e-2
    assert torch.allclose(ours, theirs, rtol=1e-3, atol=1e-4)
    # training mode: batch statistics and the same drop-connect draws (rate * idx / 16 per block)
    model.train()
    ref_train = copy.deepcopy(ref).train()
    torch.manual_seed(11)
    ours = model.encoder.feature_map(x)
    torch.manual_seed(11)
    theirs = ref_train.extract_features(x.expand(-1, 3, -1, -1))
    assert torch.allclose(ours, theirs, rtol=1e-3, atol=1e-4)


def test_backbone_weights_errors_name_the_file(fake_imagenet_file, tmp_path):
    sd = torch.load(fake_imagenet_file[0])
    del sd['_blocks.3._bn1.weight']
    broken = tmp_path / 'broken.pth'
    torch.save(sd, broken)
    with pytest.raises(ValueError, match=r'broken.pth.*missing keys: _blocks.3._bn1.weight'):
        Im2LatexModel(20, backbone_weights=broken, **SMALL)
    b3 = tmp_path / 'resnet.pth'
    torch.save({'conv1.weight': torch.zeros(64, 3, 7, 7)}, b3)
    with pytest.raises(ValueError, match='resnet.pth'):
        Im2LatexModel(20, backbone_weights=b3, **SMALL)
    with pytest.raises(FileNotFoundError, match='absent.pth'):
        Im2LatexModel(20, backbone_weights=tmp_path / 'absent.pth', **SMALL)


def test_ctc_head_shapes_and_vocab_extension():
    """The auxiliary CTC head emits ctc_frames frames per image column, in F.ctc_loss's (T, B, V) layout,
    normalised log-probs; extend_vocab keeps every old class's head outputs exactly, frame by frame."""
    torch.manual_seed(0)
    model = Im2LatexModel(30, **SMALL, memory_norm=True, ctc_frames=3).eval()
    images = torch.rand(2, 1, 32, 96)                 # stride 16: 2 x 6 positions -> 6 columns
    tgt = torch.randint(4, 30, (2, 5))
    with torch.no_grad():
        logits, log_probs = model(images, tgt, ctc=True)
        raw = model.ctc_head(model.encoder.content(images).mean(1))   # (B, w, 3 * V)
    assert logits.shape == (2, 5, 30) and log_probs.shape == (6 * 3, 2, 30)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(18, 2), atol=1e-5)
    assert torch.equal(logits, model(images, tgt))    # the head does not change the decoder's output
    extend_vocab(model, 34)
    with torch.no_grad():
        raw2 = model.ctc_head(model.encoder.content(images).mean(1))  # (B, w, 3 * 34)
    assert torch.allclose(raw2.view(2, 6, 3, 34)[..., :30], raw.view(2, 6, 3, 30), atol=1e-6)
    assert model.ctc_log_probs(model.encoder.content(images)).shape == (18, 2, 34)


def test_memory_norm_and_ctc_default_off_for_old_hparams():
    """Checkpoints written before memory_norm / ctc_frames existed lack the keys: they rebuild without
    the LayerNorm and the head, so their state dicts load strictly."""
    old = Im2LatexModel(30, **SMALL)
    hp = {k: v for k, v in old.hparams.items() if k not in ('memory_norm', 'ctc_frames')}
    rebuilt = build_model(hp)
    assert rebuilt.encoder.norm is None and rebuilt.ctc_head is None
    rebuilt.load_state_dict(old.state_dict(), strict=True)
    new = build_model({**hp, 'memory_norm': True})
    memory = new.encode(torch.rand(3, 1, 32, 96)) - transformer_positions(2, 6)
    assert torch.allclose(memory.mean(-1), torch.zeros(3, 12), atol=1e-5)   # LayerNorm'd content
    with pytest.raises(ValueError, match='no CTC head'):
        rebuilt.ctc_log_probs(torch.zeros(1, 2, 6, SMALL['d_model']))


def transformer_positions(h, w):
    from transformer import sinusoid_2d
    return sinusoid_2d(h, w, SMALL['d_model'])


# -----------------------------------------------------------------------------
# joint CTC-attention decoding

def _ctc_logprob(lp, b, ids):
    """log P_CTC(ids | column b of lp (T, B, V)) by F.ctc_loss (blank = <pad>)."""
    tgt = torch.tensor([ids], dtype=torch.long) if ids else torch.zeros(1, 0, dtype=torch.long)
    return -nn.functional.ctc_loss(lp[:, b:b + 1], tgt, torch.tensor([lp.shape[0]]), torch.tensor([len(ids)]),
                                   blank=PAD, reduction='sum').item()


def test_ctc_prefix_scores_equal_ctc_loss_and_the_sum_over_continuations():
    """Extended token by token (with a repeat), the <eos> column is log P_CTC of exactly the prefix
    (F.ctc_loss), and a prefix's score is the log of the summed probabilities of every formula that
    starts with it (brute force over the 3 tokens with mass, up to T tokens)."""
    torch.manual_seed(7)
    T, B, V = 6, 2, 6
    lp = torch.randn(T, B, V)
    lp[:, :, [SOS, EOS, UNK]] = -1e9                 # mass on the blank and tokens 4, 5 only
    lp = lp.log_softmax(-1)
    scorer = CTCPrefixScorer(lp)
    for b in range(B):
        seq = [4, 4, 5]
        r, last = scorer.initial(torch.tensor([b])), torch.tensor([-1])
        for i in range(len(seq) + 1):
            cand = torch.tensor([[seq[i] if i < len(seq) else 5, EOS]])
            psi, states = scorer.extend(torch.tensor([b]), r, last, cand)
            assert psi[0, 1].item() == pytest.approx(_ctc_logprob(lp, b, seq[:i]), abs=1e-4)
            prefix = seq[:i] + [int(cand[0, 0])]
            total = torch.logsumexp(torch.tensor(
                [_ctc_logprob(lp, b, prefix + list(tail)) for n in range(T - len(prefix) + 1)
                 for tail in itertools.product((4, 5), repeat=n)]), 0).item()
            assert psi[0, 0].item() == pytest.approx(total, abs=1e-4)
            if i < len(seq):
                r, last = states[:, :, 0], torch.tensor([seq[i]])


def test_joint_beam_scores_are_the_joint_log_probs_and_rank_exhaustively():
    """A beam wide enough for every hypothesis (tiny vocab, 3 steps): each finished hypothesis's summed
    score is (1 - w) log P_att + w log P_CTC recomputed by teacher forcing and F.ctc_loss, the list is in
    the order of brute-force joint scoring, and w = 0 ranks as the plain beam does."""
    torch.manual_seed(8)
    model = Im2LatexModel(6, d_model=32, nhead=4, num_layers=2, dim_ff=64, ctc_frames=2).eval()
    memory = torch.randn(2, 5, 32)
    lp = torch.randn(8, 2, 6).log_softmax(-1)        # (T, B, V) CTC frames
    max_len, alpha, w = 3, 1.0, 0.5
    for b in range(2):
        nbest = model.beam_search_nbest(memory=memory[b:b + 1], beam=40, max_len=max_len, length_penalty=alpha,
                                        ctc_log_probs=lp[:, b:b + 1], ctc_weight=w)[0]
        assert len(nbest) == 40
        for score, logp, ids in nbest:
            ended = len(ids) < max_len
            att = model.sequence_logprob(None, torch.tensor([[SOS] + ids + ([EOS] if ended else [])]),
                                         memory=memory[b:b + 1]).item()
            ctc = _ctc_logprob(lp, b, ids)
            if ended:
                assert logp == pytest.approx((1 - w) * att + w * ctc, abs=1e-3)
                n = len(ids) + 1
                assert score == pytest.approx(logp / gnmt_length_penalty(n, alpha), abs=1e-3)
        assert [h[0] for h in nbest] == sorted((h[0] for h in nbest), reverse=True)
        plain = model.beam_search_nbest(memory=memory[b:b + 1], beam=40, max_len=max_len, length_penalty=alpha)[0]
        zero = model.beam_search_nbest(memory=memory[b:b + 1], beam=40, max_len=max_len, length_penalty=alpha,
                                       ctc_log_probs=lp[:, b:b + 1], ctc_weight=1e-9)[0]
        assert [h[2] for h in zero] == [h[2] for h in plain]


def test_images_of_several_sizes_decode_together_as_alone():
    """Memories of 3 lengths stacked by pad_memories (CTC frames by pad_ctc_frames) and decoded as one batch:
    greedy, beam and joint beam give every image the tokens and score it gets alone; mask and blank frames
    sit where the docstrings' example puts them."""
    torch.manual_seed(10)
    model = Im2LatexModel(12, d_model=32, nhead=4, num_layers=2, dim_ff=64, ctc_frames=2).eval()
    mems = [torch.randn(2, 5, 32), torch.randn(1, 9, 32), torch.randn(2, 3, 32)]
    lps = [torch.randn(t, m.shape[0], 12).log_softmax(-1) for t, m in zip((10, 18, 6), mems)]
    memory, pad = pad_memories(mems)
    assert memory.shape == (5, 9, 32) and pad.sum(1).tolist() == [4, 4, 0, 6, 6]
    assert torch.equal(memory[0, :5], mems[0][0]) and not pad[0, :5].any() and (memory[0, 5:] == 0).all()
    ctc = pad_ctc_frames(lps)
    assert ctc.shape == (18, 5, 12) and torch.equal(ctc[:10, :2], lps[0])
    assert (ctc[10:, :2, PAD] == 0).all() and (ctc[10:, :2, 4:] == float('-inf')).all()
    alone = [(m[i:i + 1], lp[:, i:i + 1]) for m, lp in zip(mems, lps) for i in range(m.shape[0])]
    for kw in (dict(beam=1), dict(beam=3), dict(beam=3, ctc_weight=0.5)):
        ids, sc = decode_batch(model, memory=memory, memory_pad_mask=pad, ctc_log_probs=ctc, max_len=10, **kw)
        for b, (m, lp) in enumerate(alone):
            one, s1 = decode_batch(model, memory=m, ctc_log_probs=lp, max_len=10, **kw)
            assert one[0] == ids[b] and s1[0].item() == pytest.approx(sc[b].item(), abs=1e-4), (kw, b)
    unmasked, _ = decode_batch(model, memory=memory, beam=3, max_len=10)
    assert unmasked != ids          # the padding, if attended, changes what is read


class _Batches(list):
    """A loader for decode_dataset: lists of micro-batches, and a dataset of their size."""

    def __init__(self, batches):
        super().__init__(batches)
        self.dataset = list(range(sum(len(mb['indices']) for b in batches for mb in b)))


def test_decode_dataset_merges_sizes_and_gives_what_one_size_at_a_time_gives():
    """decode_dataset with batch_rows=32 (sizes decoded together) against batch_rows=1 (each size alone):
    the same predictions, prediction scores and gold scores, joint CTC decoding included."""
    torch.manual_seed(11)
    model = Im2LatexModel(12, d_model=32, nhead=4, num_layers=1, dim_ff=64, ctc_frames=2)
    vocab = Vocab(list(SPECIALS) + list('abcdefgh'))
    batches, n = [], 0
    for h, w in [(32, 64), (32, 96), (48, 64), (16, 128)]:
        tgt = torch.randint(4, 12, (2, 6))
        tgt[:, 0], tgt[:, -1] = SOS, EOS
        batches.append([{'images': torch.rand(2, 1, h, w), 'tgt': tgt, 'indices': torch.arange(n, n + 2)}])
        n += 2
    for kw in (dict(beam=1), dict(beam=3, ctc_weight=0.5)):
        one = decode_dataset(model, _Batches(batches), vocab, max_len=8, progress=False, batch_rows=1, **kw)
        together = decode_dataset(model, _Batches(batches), vocab, max_len=8, progress=False, **kw)
        assert [r.index for r in together] == list(range(n)) and model.training
        for a, b in zip(one, together):
            assert a.pred == b.pred and a.gold == b.gold
            assert a.score_pred == pytest.approx(b.score_pred, abs=1e-4)
            assert a.score_gold == pytest.approx(b.score_gold, abs=1e-4)


def test_joint_decoding_batched_equals_alone_and_survives_too_few_frames():
    """decode_batch with the CTC head: a batch gives each image what it gives alone; with 2 frames for up to
    12 tokens (CTC cannot emit longer prefixes) every image still gets a formula."""
    torch.manual_seed(9)
    model = Im2LatexModel(12, d_model=32, nhead=4, num_layers=1, dim_ff=64, ctc_frames=2).eval()
    memory = torch.randn(3, 6, 32)
    for frames in (10, 2):
        lp = torch.randn(frames, 3, 12).log_softmax(-1)
        ids, sc = decode_batch(model, memory=memory, beam=4, max_len=12, ctc_weight=0.5, ctc_log_probs=lp)
        assert len(ids) == 3 and torch.isfinite(sc).all()
        for b in range(3):
            one, s1 = decode_batch(model, memory=memory[b:b + 1], beam=4, max_len=12, ctc_weight=0.5,
                                   ctc_log_probs=lp[:, b:b + 1])
            assert one[0] == ids[b] and s1[0].item() == pytest.approx(sc[b].item(), abs=1e-4)
    assert uses_ctc(model, 4, 0.5) and not uses_ctc(model, 1, 0.5) and not uses_ctc(model, 4, 0.0)
    with pytest.raises(ValueError, match='ctc_log_probs'):
        decode_batch(model, memory=memory, beam=4, max_len=5, ctc_weight=0.5)
