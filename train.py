"""Train the image-to-LaTeX model (EfficientNet-B0 + non-local blocks + transformer decoder).

    python3 train.py                                   # demo data (rendered on first use), openai domain
    python3 train.py --train_on math --init_from runs/openai/best.pt --mean_teacher
    torchrun --nproc_per_node 2 train.py --fp16 ...    # data-parallel (DDP); only rank 0 logs and saves

Outputs go to <out_dir>/<train_on>/: last.pt (every epoch and on Ctrl-C), best.pt (best validation
BLEU-4; the teacher's when --mean_teacher), args.json, tb/ (TensorBoard).
"""
import argparse
import contextlib
import copy
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import test as evaluation   # metrics, decoding, device and precision helpers
import transformer

# -----------------------------------------------------------------------------
# defaults (every one is a flag below)
BATCHSZ = 64
INITLR = 1e-3
EPOCHS = 10
MOMENTUM = 0.9          # SGD; OneCycle cycles it between 0.85 and 0.95
WEIGHT_DECAY = 1e-4
ADAM_GAMMA = 0.9        # Adam: lr *= gamma after every epoch
CLIP = 1.0              # max global grad norm, once per optimizer step
EMA_DECAY = 0.999       # mean teacher
CONSISTENCY = 1.0       # weight of the consistency cost after ramp-up (KL)
RAMPUP = 5.0            # epochs of the sigmoid-shaped ramp-up
MAX_LEN = 150           # longest formula (tokens) trained on / decoded
CKPT_FORMAT = 1


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('data')
    g.add_argument('--root_dir', default=data.DEFAULT_ROOT,
                   help='data root in the layout of DESIGN.md; the default demo root is rendered if missing')
    g.add_argument('--train_on', default='openai', choices=data.DOMAINS, help='domain to train on')
    g.add_argument('--cache', action='store_true', help='use/build <root_dir>/.cache of decoded images')
    g.add_argument('--batchsz', type=int, default=BATCHSZ, help='images per optimizer step (per process)')
    g.add_argument('--split_batch', action='store_true',
                   help='random mixed-size batches, split into same-size micro-batches (gradient accumulation) '
                        'instead of size-bucketed batches')
    g.add_argument('--unlabeled', default=None, metavar='DIR',
                   help='folder of unlabeled target-domain images for the consistency cost (needs --mean_teacher)')
    g.add_argument('--workers', type=int, default=-1, help='DataLoader workers (-1: 0 on CPU, 4 on CUDA)')
    g.add_argument('--max_len', type=int, default=MAX_LEN,
                   help='formulas with more tokens are skipped in training; decoding stops here')
    g.add_argument('--augment', type=float, default=None,
                   help='augmentation strength, 0 = off (None: 1 with --mean_teacher, else 0)')
    g.add_argument('--val_max', type=int, default=0, help='validate on at most this many samples (0 = all)')

    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=int, default=EPOCHS, help='number of epochs')
    g.add_argument('--initlr', type=float, default=INITLR,
                   help='peak lr of OneCycle (SGD) or initial lr (Adam)')
    g.add_argument('--Adam', action='store_true', help='Adam + exponential lr decay instead of SGD + OneCycle')
    g.add_argument('--gamma', type=float, default=ADAM_GAMMA, help='Adam: lr decay factor per epoch')
    g.add_argument('--momentum', type=float, default=MOMENTUM, help='SGD momentum (max of the OneCycle cycle)')
    g.add_argument('--weight_decay', type=float, default=WEIGHT_DECAY,
                   help='weight decay (not applied to biases and norm weights)')
    g.add_argument('--clip', type=float, default=CLIP, help='clip the global grad norm (0 = off)')
    g.add_argument('--label_smoothing', type=float, default=0.0, help='label smoothing of the CE loss')
    g.add_argument('--seed', type=int, default=0, help='random seed')

    g = p.add_argument_group('mean teacher (Tarvainen & Valpola 2017)')
    g.add_argument('--mean_teacher', action='store_true', help='train with an EMA teacher and a consistency cost')
    g.add_argument('--ema_decay', type=float, default=EMA_DECAY, help='EMA decay of the teacher')
    g.add_argument('--consistency', type=float, default=CONSISTENCY, help='consistency weight after ramp-up')
    g.add_argument('--consistency_type', default='kl', choices=('kl', 'mse'),
                   help='per-token KL(teacher || student) or squared error between the softmaxes')
    g.add_argument('--rampup', type=float, default=RAMPUP, help='epochs of consistency ramp-up')

    g = p.add_argument_group('model (ignored with --init_from / --resume, which use the checkpoint\'s)')
    g.add_argument('--d_model', type=int, default=256, help='decoder width')
    g.add_argument('--nhead', type=int, default=8, help='attention heads')
    g.add_argument('--num_layers', type=int, default=3, help='decoder layers')
    g.add_argument('--dim_ff', type=int, default=1024, help='decoder feed-forward width')
    g.add_argument('--dropout', type=float, default=0.1, help='decoder dropout')
    g.add_argument('--output_stride', type=int, default=16, choices=(8, 16, 32), help='encoder output stride')
    g.add_argument('--backbone_weights', default=None, metavar='PATH',
                   help='local ImageNet state_dict of efficientnet_pytorch B0 (nothing is downloaded)')

    g = p.add_argument_group('run')
    g.add_argument('--out_dir', default='runs', help='checkpoints and logs go to <out_dir>/<train_on>/')
    g.add_argument('--init_from', default=None, metavar='CKPT',
                   help='start from this checkpoint\'s weights (vocab extended with the new domain\'s tokens)')
    g.add_argument('--init_weights', default='auto', choices=('auto', 'model', 'teacher'),
                   help='which weights of --init_from (auto: the teacher if it has one)')
    g.add_argument('--resume', action='store_true',
                   help='continue from <out_dir>/<train_on>/last.pt with its saved arguments')
    g.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    prec = g.add_mutually_exclusive_group()
    prec.add_argument('--fp16', action='store_true', help='CUDA autocast fp16 + GradScaler')
    prec.add_argument('--bf16', action='store_true', help='autocast bfloat16 (CUDA or CPU)')
    g.add_argument('--channels_last', action=argparse.BooleanOptionalAction, default=None,
                   help='channels_last memory format for the encoder (None: on for fp32 on a CPU, where '
                        'bench.py measured +14%%; off elsewhere until measured on a GPU)')
    g.add_argument('--compile', action='store_true',
                   help='torch.compile the model, one graph per (bucket size, batch size); meant for CUDA '
                        '(on a CPU bench.py measured minutes of compilation per shape and a slower step)')
    g.add_argument('--log_every', type=int, default=10, help='TensorBoard scalars every N steps')
    g.add_argument('--dry_run', action='store_true',
                   help='two training steps and a short validation, nothing saved')
    args = p.parse_args(argv)
    if args.unlabeled and not args.mean_teacher:
        p.error('--unlabeled needs --mean_teacher (unlabeled images only enter the consistency cost)')
    if args.augment is None:
        args.augment = 1.0 if args.mean_teacher else 0.0
    if args.dry_run:
        args.val_max = min(args.val_max or 8, 8)
    return args


# resume restores the saved arguments except these, which only say how to run
RUNTIME_ARGS = ('resume', 'workers', 'device', 'cache', 'log_every', 'dry_run')


# -----------------------------------------------------------------------------
# mean teacher pieces (Tarvainen & Valpola, "Mean teachers are better role models", NeurIPS 2017)

def sigmoid_rampup(current, length):
    """Consistency ramp-up exp(-5 (1 - t/L)^2) of Laine & Aila (2017), used by the mean teacher;
    `current` and `length` in epochs (fractional). 1 after the ramp-up."""
    if length <= 0:
        return 1.0
    t = min(max(current, 0.0), length) / length
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


@torch.no_grad()
def update_ema(teacher, student, decay, step):
    """Teacher <- EMA of the student's parameters after optimizer step `step` (0-based):
    a = min(1 - 1/(step+1), decay), t = a t + (1 - a) s. The warm-up term makes early teachers
    close to the student. Buffers (BatchNorm statistics) are the teacher's own, as in the reference."""
    a = min(1.0 - 1.0 / (step + 1), decay)
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(a).add_(s.detach(), alpha=1.0 - a)


def ema_horizon_note(decay, total_steps):
    """A warning (or None) when the run is short for the EMA decay. With the warm-up formula of
    update_ema the teacher is the plain average of every student since step 0 until 1 - 1/(step+1)
    reaches `decay`, i.e. for the first 1/(1-decay) steps; a run not several times longer ships a
    teacher that still carries the early, untrained weights."""
    window = 1.0 / (1.0 - decay) if decay < 1.0 else float('inf')
    if total_steps >= 3 * window:
        return None
    fits = [d for d in (0.999, 0.995, 0.99, 0.98, 0.95, 0.9) if d < decay and 3.0 / (1.0 - d) <= total_steps]
    return (f'--ema_decay {decay}: the teacher averages all weights of the first {window:.0f} steps, but this '
            f'run has {total_steps} steps, so it will lag far behind the student'
            + (f'; for a run this short use --ema_decay {fits[0]}' if fits else ''))


def consistency_loss(student_logits, teacher_logits, mask, kind='kl'):
    """Per-token consistency cost between student and (detached) teacher predictions, summed over the
    tokens where `mask` is True. kl: KL(teacher || student); mse: squared distance of the softmaxes.
    student_logits, teacher_logits: (B, T, V); mask: (B, T) bool."""
    s = student_logits.float()[mask]            # (N, V) real tokens only
    t = teacher_logits.detach().float()[mask]   # (N, V)
    if kind == 'kl':
        return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction='sum')
    if kind == 'mse':
        return ((F.softmax(s, -1) - F.softmax(t, -1)) ** 2).sum()
    raise ValueError(f'unknown consistency type {kind!r}')


def supervised_loss(logits, tgt_out, label_smoothing=0.0):
    """Token-level cross entropy summed over non-pad tokens (computed in fp32).
    logits: (B, T, V); tgt_out: (B, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), tgt_out.flatten(), ignore_index=data.PAD,
                           reduction='sum', label_smoothing=label_smoothing)


# -----------------------------------------------------------------------------
# setup helpers

def setup_distributed(args):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a single process."""
    if 'RANK' not in os.environ:
        return 0, 1, None
    import torch.distributed as dist
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    use_cuda = args.device != 'cpu' and torch.cuda.is_available()
    dist.init_process_group('nccl' if use_cuda else 'gloo')
    return rank, world, local_rank


def amp_settings(args, device, log):
    """-> (autocast dtype or None, GradScaler enabled): fp16 autocast needs the scaler, bf16 does not."""
    dtype = evaluation.pick_amp(args, device, doing='training', log=log)
    return dtype, dtype == torch.float16


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state():
    """All RNG states as tensors and plain values, so checkpoints load with torch.load(weights_only=True)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {'torch': torch.get_rng_state(),
             'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                       'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)},
             'python': {'version': version, 'internal': list(internal), 'gauss_next': gauss_next}}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    p = state['python']
    random.setstate((p['version'], tuple(p['internal']), p['gauss_next']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def make_optimizer(args, model):
    """SGD (Nesterov momentum) or Adam; no weight decay on biases and norm/BN weights (1-D tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{'params': decay, 'weight_decay': args.weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
    if args.Adam:
        return torch.optim.Adam(groups, lr=args.initlr)
    return torch.optim.SGD(groups, lr=args.initlr, momentum=args.momentum, nesterov=True)


def make_scheduler(args, optimizer, steps_per_epoch):
    """SGD: OneCycleLR over the whole run, stepped every batch (starts at initlr/25, peaks at initlr after
    30% of the steps, anneals to initlr/25/1e4). Adam: ExponentialLR, stepped after every epoch."""
    if args.Adam:
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.gamma)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.initlr, total_steps=max(1, args.epochs * steps_per_epoch),
        base_momentum=0.85, max_momentum=max(args.momentum, 0.85))


def model_hparams(args, vocab_size):
    return dict(vocab_size=vocab_size, d_model=args.d_model, nhead=args.nhead, num_layers=args.num_layers,
                dim_ff=args.dim_ff, dropout=args.dropout, max_len=max(512, args.max_len + 2),
                output_stride=args.output_stride, backbone_weights=args.backbone_weights)


def ensure_demo_data(args, rank, log):
    """The default root is the demo data: render it on first use (rank 0; the others wait)."""
    if os.path.normpath(args.root_dir) != os.path.normpath(data.DEFAULT_ROOT):
        return
    if os.path.exists(data.label_path(args.root_dir, args.train_on, 'train')):
        return
    if rank == 0:
        import render
        log(f'no demo data in {args.root_dir}: rendering it now (python3 render.py --root_dir {args.root_dir})')
        render.write_demo(args.root_dir, seed=0)
    barrier()


def barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class StopRequested(Exception):
    pass


class GracefulStop:
    """Ctrl-C (SIGINT) or SIGTERM sets a flag that the training loop reads between optimizer steps, so
    last.pt is always written at a step boundary and --resume continues exactly. A second Ctrl-C stops
    at once. Under DDP the ranks agree (all_reduce) so that all of them stop after the same step."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print('\nstopping after this step (again to stop at once)', file=sys.stderr)

    def check(self, world):
        """Raise StopRequested when a stop was asked for (on any rank)."""
        if any_rank(self.requested, world):
            raise StopRequested


def _dist_device():
    return torch.device('cuda', torch.cuda.current_device()) \
        if torch.distributed.get_backend() == 'nccl' else torch.device('cpu')


def any_rank(flag, world):
    """True if `flag` is true on any rank (one all-reduce when world > 1)."""
    if world > 1:
        t = torch.tensor([float(flag)], device=_dist_device())
        torch.distributed.all_reduce(t)
        return bool(t.item() > 0)
    return bool(flag)


def all_ranks_have_data(micro, world):
    """False when this batch is empty on any rank (every image of it failed to decode after the size
    scan, e.g. a truncated BMP or TIFF: only PNGs are checked end to end). All ranks then skip the step
    together: a rank without a backward would leave the others waiting in DDP's gradient all-reduce."""
    return not any_rank(not micro, world)


# -----------------------------------------------------------------------------
# checkpoints

def checkpoint_dict(args, model, teacher, optimizer, scheduler, scaler, vocab, state):
    """Everything a resume or an evaluation needs: state_dicts and plain values, never whole models."""
    return {
        'format_version': CKPT_FORMAT,
        'model': unwrap(model).state_dict(),
        'teacher': teacher.state_dict() if teacher is not None else None,
        'optimizer': optimizer.state_dict(),
        'scheduler': scheduler.state_dict(),
        'scaler': scaler.state_dict() if scaler.is_enabled() else None,
        'epoch': state['epoch'], 'step': state['step'], 'batch_in_epoch': state['batch_in_epoch'],
        'best_metric': state['best_metric'], 'skipped_steps': state['skipped_steps'],
        'vocab': vocab.itos, 'hparams': unwrap(model).hparams, 'args': vars(args),
        'train_on': args.train_on, 'rng': rng_state(),
    }


def unwrap(model):
    model = getattr(model, 'module', model)            # DDP
    return getattr(model, '_orig_mod', model)          # torch.compile


# -----------------------------------------------------------------------------
# training and validation

def train_one_epoch(args, model, teacher, loader, sampler, unlabeled, optimizer, scheduler, scaler,
                    amp_dtype, device, state, steps_per_epoch, writer, log, is_main, stop, world):
    """One pass over the training batches (train_step on each). Returns the mean CE per token.
    Updates `state` (step, batch_in_epoch, skipped_steps) in place."""
    model.train()
    if teacher is not None:
        teacher.train()       # teacher noise (dropout, BN batch statistics) as in the reference
    epoch = state['epoch']
    sampler.set_epoch(epoch, skip_batches=state['batch_in_epoch'])
    pbar = tqdm(loader, total=steps_per_epoch, initial=state['batch_in_epoch'], disable=not is_main,
                desc=f'epoch {epoch + 1}/{args.epochs}', dynamic_ncols=True, leave=False)
    sum_loss, sum_tok, t0, seen = 0.0, 0, time.time(), 0
    for micro in pbar:
        frac_epoch = epoch + state['batch_in_epoch'] / max(1, steps_per_epoch)
        w = args.consistency * sigmoid_rampup(frac_epoch, args.rampup) if teacher is not None else 0.0
        if all_ranks_have_data(micro, world):
            u_mb = next(unlabeled) if unlabeled is not None else None
            out = train_step(args, model, teacher, micro, u_mb, optimizer, scaler, amp_dtype, device,
                             state['step'], w)
            why = 'non-finite loss/gradient'
        else:
            out = {'ce': 0.0, 'n_tok': 0, 'cons': 0.0, 'grad_norm': 0.0, 'skipped': True, 'n_images': 0}
            why = 'no readable image in the batch (on some process)'
        if out['skipped']:
            state['skipped_steps'] += 1
            log(f'step {state["step"]}: {why}, step skipped ({state["skipped_steps"]} so far)')
        if not args.Adam:
            scheduler.step()
        state['step'] += 1
        state['batch_in_epoch'] += 1
        ce_tok = out['ce'] / max(1, out['n_tok'])
        if math.isfinite(out['ce']):
            sum_loss += out['ce']
            sum_tok += out['n_tok']
        seen += out['n_images']
        ips = seen / max(1e-9, time.time() - t0)
        lr = optimizer.param_groups[0]['lr']
        if is_main:
            pbar.set_postfix(loss=f'{ce_tok:.3f}', lr=f'{lr:.2e}', img_s=f'{ips:.1f}')
        if writer is not None and state['step'] % args.log_every == 0:
            s = state['step']
            writer.add_scalar('train/loss', ce_tok + w * out['cons'], s)
            writer.add_scalar('train/ce', ce_tok, s)
            writer.add_scalar('train/lr', lr, s)
            writer.add_scalar('train/grad_norm', out['grad_norm'], s)
            writer.add_scalar('train/skipped_steps', state['skipped_steps'], s)
            writer.add_scalar('train/images_per_s', ips, s)
            if teacher is not None:
                writer.add_scalar('train/consistency', out['cons'], s)
                writer.add_scalar('train/consistency_weight', w, s)
        if args.dry_run and state['batch_in_epoch'] >= 2:
            break
        stop.check(world)
    pbar.close()
    return sum_loss / max(1, sum_tok)


def train_step(args, model, teacher, micro, unlabeled_mb, optimizer, scaler, amp_dtype, device, step, w):
    """One optimizer step on a batch = a list of same-size micro-batches (one with bucketed batches),
    plus an unlabeled micro-batch for the consistency cost. Gradients are accumulated over the
    micro-batches (DDP syncs on the last backward only); CE is normalised by the batch's token count.
    Order (REFERENCES.md): backward of the scaled loss, unscale, clip once, step (skipped when the
    gradient is not finite, so a NaN never reaches the weights or the teacher), scaler update, EMA.
    -> {'ce': summed CE, 'n_tok', 'cons': mean consistency cost per token, 'grad_norm', 'skipped',
        'n_images'}"""
    n_tok = sum(int((mb['tgt'][:, 1:] != data.PAD).sum()) for mb in micro)
    parts = [('labeled', mb) for mb in micro]
    if unlabeled_mb is not None:
        parts.append(('unlabeled', unlabeled_mb))
    ce_sum = cons_sum = 0.0
    for i, (kind, mb) in enumerate(parts):
        last = i == len(parts) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, 'no_sync') else model.no_sync()
        with sync:
            ce, (cons, cons_tok) = step_losses(args, model, teacher, kind, mb, amp_dtype, device)
            norm = max(1, n_tok if kind == 'labeled' else cons_tok)
            loss = (ce / max(1, n_tok) if ce is not None else 0.0) + w * cons / norm
            scaler.scale(loss).backward()
        ce_sum += float(ce.detach()) if ce is not None else 0.0
        cons_sum += float(cons.detach()) / norm
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    gnorm = torch.nn.utils.clip_grad_norm_(params, args.clip if args.clip > 0 else float('inf'))
    skipped = not bool(torch.isfinite(gnorm))
    if not skipped:
        scaler.step(optimizer)
        if teacher is not None:
            update_ema(teacher, unwrap(model), args.ema_decay, step)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return {'ce': ce_sum, 'n_tok': n_tok, 'cons': cons_sum, 'grad_norm': float(gnorm), 'skipped': skipped,
            'n_images': sum(mb['images'].shape[0] for mb in micro)}


def step_losses(args, model, teacher, kind, mb, amp_dtype, device):
    """Forward one micro-batch. -> (CE summed over tokens or None, (consistency sum, token count)).
    Student and teacher read the same decoder input: the gold tokens for labeled images, the teacher's
    greedy output for unlabeled ones (which have no CE term)."""
    def put(images):
        images = images.to(device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if args.channels_last else images

    if kind == 'labeled':
        tgt = mb['tgt'].to(device, non_blocking=True)
    else:
        tgt = teacher_pseudo_labels(args, teacher, put(mb['images2']), amp_dtype, device)
    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]          # (B, T-1) each: <sos> a b | a b <eos>
    # no padding mask: padding is trailing, so the causal mask already hides it from every real token
    # (and the fused attention kernels stay available)
    with evaluation.amp_context(device, amp_dtype):
        logits = model(put(mb['images']), tgt_in)     # (B, T-1, V)
    ce = supervised_loss(logits, tgt_out, args.label_smoothing) if kind == 'labeled' else None
    if teacher is None:
        return ce, (torch.zeros((), device=device), 0)
    with torch.no_grad(), evaluation.amp_context(device, amp_dtype):
        t_logits = teacher(put(mb['images2']), tgt_in)
    mask = tgt_out != data.PAD
    return ce, (consistency_loss(logits, t_logits, mask, args.consistency_type), int(mask.sum()))


@torch.no_grad()
def teacher_pseudo_labels(args, teacher, images, amp_dtype, device):
    """Teacher's greedy transcription of unlabeled images as a PAD-padded [SOS] .. [EOS] batch (B, T)."""
    was_training = teacher.training
    teacher.eval()
    with evaluation.amp_context(device, amp_dtype):
        seqs, _ = teacher.greedy(images, max_len=args.max_len)
    teacher.train(was_training)
    T = max(len(s) for s in seqs) + 2
    tgt = torch.full((len(seqs), T), data.PAD, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        tgt[i, :len(s) + 2] = torch.tensor([data.SOS] + list(s) + [data.EOS], dtype=torch.long)
    return tgt


def cycle_unlabeled(loader, sampler):
    """Endless stream of unlabeled micro-batches (one size each), a new shuffle every pass."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for micro in loader:
            yield from micro
        epoch += 1


def validate(args, model, loader, vocab, amp_dtype, device, world):
    """Greedy-decode this rank's shard of the val split; the metrics over all ranks (DESIGN.md)."""
    records = evaluation.decode_dataset(model, loader, vocab, beam=1, max_len=args.max_len,
                                        amp_dtype=amp_dtype, device=device, progress=False)
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    records.sort(key=lambda r: r['index'])
    golds = [r['gold'] for r in records]
    preds = [r['pred'] for r in records]
    return evaluation.compute_metrics(golds, preds), records


def log_val_samples(writer, dataset, records, step, n=4):
    for r in records[:n]:
        img = dataset[r['index']]['image']                                # (1, H, W), ink = 1
        writer.add_image(f'val/{r["index"]}', 1.0 - img, step)
        writer.add_text(f'val/{r["index"]}', f'gold: `{data.detokenize(r["gold"])}`  \n'
                                              f'pred: `{data.detokenize(r["pred"])}`', step)


def train(args, model, teacher, train_loader, train_sampler, val_loader, val_set, unlabeled, vocab,
          optimizer, scheduler, scaler, amp_dtype, device, state, run_dir, writer, log, rank, world, stop):
    """The epoch loop: train, validate (the teacher with --mean_teacher), save last.pt / best.pt."""
    is_main = rank == 0
    steps_per_epoch = len(train_sampler)
    evaluated = teacher if teacher is not None else unwrap(model)
    while state['epoch'] < args.epochs:
        t0 = time.time()
        try:
            train_loss = train_one_epoch(args, model, teacher, train_loader, train_sampler, unlabeled,
                                         optimizer, scheduler, scaler, amp_dtype, device, state,
                                         steps_per_epoch, writer, log, is_main, stop, world)
        except StopRequested:
            if is_main and not args.dry_run:
                path = os.path.join(run_dir, 'last.pt')
                data.atomic_torch_save(checkpoint_dict(args, model, teacher, optimizer, scheduler, scaler,
                                                       vocab, state), path)
                log(f'interrupted: saved {path} at step {state["step"]}; continue with --resume')
            raise
        if args.Adam:
            scheduler.step()
        metrics, records = validate(args, evaluated, val_loader, vocab, amp_dtype, device, world)
        state['epoch'] += 1
        state['batch_in_epoch'] = 0
        state['val_metrics'] = metrics
        best = metrics['bleu4'] > state['best_metric']
        if best:
            state['best_metric'] = metrics['bleu4']
        if is_main:
            who = 'teacher ' if teacher is not None else ''
            log(f'epoch {state["epoch"]}/{args.epochs} | train loss {train_loss:.4f} | {who}val '
                f'bleu4 {metrics["bleu4"]:.2f} edit_acc {metrics["edit_accuracy"]:.4f} '
                f'exact {metrics["exact_match"]:.4f} | {time.time() - t0:.0f} s'
                + (f' | skipped steps {state["skipped_steps"]}' if state['skipped_steps'] else ''))
            if writer is not None:
                for k, v in metrics.items():
                    writer.add_scalar(f'val/{k}', v, state['step'])
                log_val_samples(writer, val_set, records, state['step'])
                writer.flush()
            if not args.dry_run:
                ckpt = checkpoint_dict(args, model, teacher, optimizer, scheduler, scaler, vocab, state)
                data.atomic_torch_save(ckpt, os.path.join(run_dir, 'last.pt'))
                if best:
                    data.atomic_torch_save(ckpt, os.path.join(run_dir, 'best.pt'))
                log(f'  saved {os.path.join(run_dir, "last.pt")}' + (' and best.pt' if best else ''))
        if args.dry_run:
            break
    return state


# -----------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    rank, world, local_rank = setup_distributed(args)
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    device = evaluation.pick_device(args.device, local_rank)
    run_dir = os.path.join(args.out_dir, args.train_on)
    last_path = os.path.join(run_dir, 'last.pt')

    ckpt = None
    if args.resume:
        if os.path.exists(last_path):
            ckpt = torch.load(last_path, map_location='cpu', weights_only=True)
            merged = vars(args).copy()      # flags added since the checkpoint keep their defaults
            merged.update({k: v for k, v in ckpt['args'].items() if k not in RUNTIME_ARGS})
            args = argparse.Namespace(**merged)
            log(f'resuming {last_path}: epoch {ckpt["epoch"]}, step {ckpt["step"]} (saved arguments restored)')
            if ckpt['epoch'] >= args.epochs:
                log(f'that run already finished its {args.epochs} epochs; nothing to do')
                return ckpt
        else:
            log(f'--resume: no {last_path} yet, starting a new run')
    seed_everything(args.seed)
    amp_dtype, use_scaler = amp_settings(args, device, log)
    if args.channels_last is None:
        args.channels_last = device.type == 'cpu' and amp_dtype is None
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True     # few distinct bucket sizes: autotuning pays
    ensure_demo_data(args, rank, log)

    # data
    problems = data.Problems(quiet=not is_main)
    aug = data.Augment(args.augment) if args.augment > 0 else None
    views = 2 if args.mean_teacher else 1
    train_set = data.FormulaDataset(args.root_dir, args.train_on, 'train', cache=args.cache, augment=aug,
                                    views=views, problems=problems, max_tokens=args.max_len)
    val_set = data.FormulaDataset(args.root_dir, args.train_on, 'val', cache=args.cache, problems=problems)
    if args.val_max and len(val_set.names) > args.val_max:
        val_set = val_set.select(range(args.val_max))
    if len(train_set.names) == 0:
        sys.exit(f'no usable training samples in {data.label_path(args.root_dir, args.train_on, "train")}')

    # vocab and model
    init_note = ''
    if ckpt is not None:
        vocab = data.Vocab(ckpt['vocab'])
        model = transformer.build_model(ckpt['hparams'])
        model.load_state_dict(ckpt['model'])
    elif args.init_from:
        model, itos, init = transformer.load_checkpoint(args.init_from, which='model')
        which = args.init_weights
        if which == 'auto':
            which = 'teacher' if init.get('teacher') is not None else 'model'
        if which == 'teacher':
            if init.get('teacher') is None:
                sys.exit(f'{args.init_from} has no teacher weights (trained without --mean_teacher); '
                         f'use --init_weights model')
            model.load_state_dict(init['teacher'])
        vocab = data.Vocab(itos).extend(train_set.tokens)
        transformer.extend_vocab(model, len(vocab))
        init_note = (f'initialised from {args.init_from} ({which} weights); vocab {len(itos)} -> {len(vocab)} '
                     f'tokens')
        del init
    else:
        pre = data.read_token_list(data.PRE_VOCAB)
        vocab = data.Vocab.build(pre, train_set.tokens)
        model = transformer.build_model(model_hparams(args, len(vocab)))
    train_set.vocab = vocab
    val_set.vocab = vocab
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    teacher = None
    if args.mean_teacher:
        teacher = copy.deepcopy(model)
        if ckpt is not None and ckpt.get('teacher') is not None:
            teacher.load_state_dict(ckpt['teacher'])
        for p in teacher.parameters():
            p.requires_grad_(False)

    # loaders
    workers = args.workers if args.workers >= 0 else (4 if device.type == 'cuda' else 0)
    pin = device.type == 'cuda'
    train_loader, train_sampler = data.make_loader(train_set, args.batchsz, split_batch=args.split_batch,
                                                   shuffle=True, seed=args.seed, num_replicas=world, rank=rank,
                                                   workers=workers, pin_memory=pin)
    val_loader, _ = data.make_loader(val_set, args.batchsz, shuffle=False, num_replicas=world, rank=rank,
                                     workers=workers, pin_memory=pin)
    unlabeled = None
    if args.unlabeled:
        u_set = data.UnlabeledDataset(args.unlabeled, augment=aug, views=2, problems=problems)
        u_loader, u_sampler = data.make_loader(u_set, args.batchsz, shuffle=True, seed=args.seed + 1,
                                               num_replicas=world, rank=rank, workers=workers, pin_memory=pin)
        unlabeled = cycle_unlabeled(u_loader, u_sampler)
    if problems.summary():
        log(problems.summary())

    # optimisation
    steps_per_epoch = len(train_sampler)
    optimizer = make_optimizer(args, model)
    scheduler = make_scheduler(args, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    state = {'epoch': 0, 'step': 0, 'batch_in_epoch': 0, 'best_metric': -1.0, 'skipped_steps': 0}
    if ckpt is not None:
        optimizer.load_state_dict(ckpt['optimizer'])
        scheduler.load_state_dict(ckpt['scheduler'])
        if ckpt.get('scaler') and use_scaler:
            scaler.load_state_dict(ckpt['scaler'])
        for k in state:
            state[k] = ckpt.get(k, state[k])
        set_rng_state(ckpt['rng'])
    train_model = model
    if args.compile:
        # one graph per (bucket size, batch size): 20-32 buckets x (full, last) batches exceed dynamo's
        # default recompile_limit of 8, after which new shapes would silently run eagerly
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
        if device.type == 'cpu':
            log('--compile on a CPU: minutes of compilation per bucket shape, and bench.py measured the '
                'compiled step slower than eager there; it is meant for CUDA')
        train_model = torch.compile(model, dynamic=False)
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == 'cuda' else None)

    writer = None
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        if not args.dry_run:
            evaluation.write_json(os.path.join(run_dir, 'args.json'), vars(args))
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(run_dir, 'tb'))
        n_params = sum(p.numel() for p in model.parameters())
        log(f'{args.train_on}: {len(train_set.names)} train / {len(val_set.names)} val images from {args.root_dir}; '
            f'vocab {len(vocab)}; {n_params / 1e6:.2f}M parameters; {steps_per_epoch} steps/epoch x {world} '
            f'process(es) on {device}' + (f'; autocast {amp_dtype}' if amp_dtype else '')
            + (f'; mean teacher (ema {args.ema_decay}, {args.consistency_type} x {args.consistency})'
               if teacher is not None else ''))
        if init_note:
            log(init_note)
        note = ema_horizon_note(args.ema_decay, steps_per_epoch * args.epochs) if teacher is not None else None
        if note:
            log(note)

    try:
        with GracefulStop() as stop:
            train(args, train_model, teacher, train_loader, train_sampler, val_loader, val_set, unlabeled,
                  vocab, optimizer, scheduler, scaler, amp_dtype, device, state, run_dir, writer, log, rank,
                  world, stop)
    except StopRequested:
        sys.exit(130)
    finally:
        if writer is not None:
            writer.close()
        if world > 1:
            torch.distributed.destroy_process_group()
    if is_main and not args.dry_run:
        log(f'done: best val BLEU-4 {state["best_metric"]:.2f}; checkpoints in {run_dir}/ '
            f'(evaluate: python3 test.py --test_on {args.train_on} --out_dir {args.out_dir}'
            + (f' --root_dir {args.root_dir}' if args.root_dir != data.DEFAULT_ROOT else '')
            + (' --mean_teacher' if teacher is not None else '') + ')')
    return state


if __name__ == '__main__':
    main()
