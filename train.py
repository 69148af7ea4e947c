"""Train the image-to-LaTeX model (EfficientNet-B0 + non-local blocks + transformer decoder).

    python3 train.py                                   # demo data (rendered on first use), openai domain
    python3 train.py --train_on math --init_from runs/openai/best.pt --mean_teacher
    torchrun --nproc_per_node 2 train.py --fp16 ...    # data-parallel (DDP); only rank 0 logs and saves

Outputs go to <out_dir>/<train_on>/: last.pt (every --save_every steps or minutes, every epoch, and on
Ctrl-C / SIGTERM), best.pt (best validation BLEU-4; the teacher's when --mean_teacher), args.json,
history.jsonl, tb/ (TensorBoard). --resume continues last.pt with the run's saved settings, and under
`torchrun --max-restarts N ... --resume` a lost worker costs only the steps since the last checkpoint.

Reading order: defaults; the pieces (losses, learning-rate schedule, mean-teacher EMA, distributed
helpers, the checkpoint dict); the Trainer (one optimizer step, one epoch, validation, saving); then
the command line and main (build the data, build or restore the model, run the loop).
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from typing import Any, Callable, Optional

# oneDNN (torch's CPU convolutions) keeps 1,024 compiled kernels by default; a trimmed openai run has ~100
# image sizes x 50 convolutions x forward / two backward kernels, so the cache thrashed and every step
# rebuilt kernels (bf16 training 22 -> 27 images/s over 30 sizes with a larger cache, fp32 19 -> 21).
# Read when oneDNN starts, so set before torch is imported; a value in the environment wins.
os.environ.setdefault('ONEDNN_PRIMITIVE_CACHE_CAPACITY', '65536')

import numpy as np  # noqa: E402  (after the oneDNN setting above)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import checkpoint
import data
import transformer
from metrics import compute_metrics
from utils import (amp_context, eval_mode, flush_denormals, gather_lists, init_distributed, pick_amp,
                   pick_device, write_json)

# -----------------------------------------------------------------------------
# defaults (every one is a flag below)
BATCHSZ = 64
SGD_PEAK_LR = 0.3       # SGD: OneCycle's peak lr (see --initlr)
PCT_START = 0.3         # SGD: share of the steps over which OneCycle rises to its peak
ADAM_LR = 1e-3          # Adam: initial lr
EPOCHS = 10
MOMENTUM = 0.9          # SGD; OneCycle cycles it between 0.85 and this
WEIGHT_DECAY = 1e-4
ADAM_GAMMA = 0.9        # Adam: lr *= gamma after every epoch
CLIP = 1.0              # max global grad norm, once per optimizer step
EMA_DECAY = 0.999       # mean teacher
CONSISTENCY = 1.0       # weight of the consistency cost after ramp-up (KL)
RAMPUP = 5.0            # epochs of the sigmoid-shaped ramp-up
MAX_LEN = 150           # longest formula (tokens) trained on / decoded
WARMUP = 0              # steps of linear lr warm-up (on top of the schedule)
OUTPUT_STRIDE = '16x8'  # encoder output stride, rows x columns (--output_stride)
HEAD_STRIDE = 16        # 16x16: stride of stages 6-7 and the head where the output stride allows it (--head_stride)
CTC_FRAMES = 4          # frames per image column of the auxiliary CTC head (with --ctc > 0)
CURRICULUM = 0          # epochs ordered from small to large images (--curriculum)
SAVE_EVERY = '10m'      # last.pt at the first step boundary after 10 minutes of training: the work at risk


# -----------------------------------------------------------------------------
# losses: the objective is a weighted sum of named parts, computed in `objective` alone

def supervised_loss(logits, tgt_out, label_smoothing=0.0):
    """Token-level cross entropy summed over non-pad tokens (computed in fp32).
    logits: (B, T, V); tgt_out: (B, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), tgt_out.flatten(), ignore_index=data.PAD,
                           reduction='sum', label_smoothing=label_smoothing)


def consistency_loss(student_logits, teacher_logits, mask, kind='kl'):
    """Mean-teacher consistency cost (Tarvainen & Valpola, "Mean teachers are better role models",
    NeurIPS 2017) between student and (detached) teacher predictions, summed over the tokens where
    `mask` is True. kl: KL(teacher || student); mse: squared distance of the softmaxes.
    student_logits, teacher_logits: (B, T, V); mask: (B, T) bool."""
    s = student_logits.float()[mask]            # (N, V) real tokens only
    t = teacher_logits.detach().float()[mask]   # (N, V)
    if kind == 'kl':
        return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction='sum')
    if kind == 'mse':
        return ((F.softmax(s, -1) - F.softmax(t, -1)) ** 2).sum()
    raise ValueError(f'unknown consistency type {kind!r}')


def ctc_loss(log_probs, tgt_out):
    """Auxiliary CTC loss (Graves et al. 2006) of the image columns' frames against the formula's tokens,
    as in joint CTC-attention training (Kim, Hori & Watanabe, ICASSP 2017), summed over the batch
    (computed in fp32). Blank = <pad>, which is never a target. A formula with more tokens than frames
    cannot be aligned and adds 0 (zero_infinity).
    log_probs: (T, B, V) from Im2LatexModel.ctc_log_probs; tgt_out: (B, L) tokens, <eos>, padding."""
    keep = (tgt_out != data.PAD) & (tgt_out != data.EOS)              # (B, L) the formula's tokens
    frames = torch.full((tgt_out.shape[0],), log_probs.shape[0], dtype=torch.long)
    return F.ctc_loss(log_probs.float(), tgt_out[keep], frames, keep.sum(1), blank=data.PAD,
                      reduction='sum', zero_infinity=True)


def token_dropout(tgt_in, p):
    """Word dropout (Bowman et al., "Generating sentences from a continuous space", CoNLL 2016, Sec. 3.3):
    each decoder input token after <sos> becomes <unk> with probability p, so the next token cannot be
    guessed from the formula's own prefix alone and the decoder has to read it from the image (the same
    remedy for a decoder that ignores what it is conditioned on). <sos> and <pad> stay; targets are unchanged.
    tgt_in (B, T) -> (B, T)."""
    if p <= 0:
        return tgt_in
    drop = torch.rand(tgt_in.shape, device=tgt_in.device) < p                     # (B, T)
    drop &= tgt_in > data.UNK                                                     # real tokens only
    return tgt_in.masked_fill(drop, data.UNK)


def sigmoid_rampup(current, length):
    """Consistency ramp-up exp(-5 (1 - t/L)^2) of Laine & Aila (2017), used by the mean teacher;
    `current` and `length` in epochs (fractional). 1 after the ramp-up."""
    if length <= 0:
        return 1.0
    t = min(max(current, 0.0), length) / length
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def loss_weights(args, progress):
    """{part: weight} of the objective after `progress` epochs (fractional): CE 1; the auxiliary CTC loss
    --ctc; with --mean_teacher the consistency cost ramped up to --consistency."""
    weights = {'ce': 1.0, 'ctc': args.ctc}
    if args.mean_teacher:
        weights['consistency'] = args.consistency * sigmoid_rampup(progress, args.rampup)
    return weights


def objective(args, out, weights):
    """The training objective of one micro-batch from its parts -> (total, {part: value}).

    out (Trainer.forward): 'logits' (B, T, V) of the student, 'tgt_out' (B, T) targets, 'labeled',
    'teacher_logits' (B, T, V) or None, 'ctc_log_probs' (T', B, V) or None, 'n_tok' (real target
    tokens of the whole labeled batch).
    Every part is a sum over tokens divided by one token count: the labeled batch's for a labeled
    micro-batch (the accumulated gradient is then that of the batch's per-token mean), the micro-batch's
    own for an unlabeled one. total = sum of weights[part] * part; the step back-propagates it and the
    logger writes it and the parts. A new auxiliary loss is one more entry of `sums` (and its weight in
    loss_weights)."""
    mask = out['tgt_out'] != data.PAD                                 # (B, T) real tokens
    norm = max(1, out['n_tok'] if out['labeled'] else int(mask.sum()))
    sums = {}
    if out['labeled']:          # unlabeled targets are the teacher's own guesses: no CE on them
        sums['ce'] = supervised_loss(out['logits'], out['tgt_out'], args.label_smoothing)
    if out['ctc_log_probs'] is not None:
        # unlabeled: 0 x the head's output, so that the head takes part in this backward (under DDP the
        # unlabeled micro-batch's backward is the one that syncs, and it needs every parameter)
        sums['ctc'] = (ctc_loss(out['ctc_log_probs'], out['tgt_out']) if out['labeled']
                       else 0.0 * out['ctc_log_probs'].sum())
    if out['teacher_logits'] is not None:
        sums['consistency'] = consistency_loss(out['logits'], out['teacher_logits'], mask,
                                               args.consistency_type)
    parts = {k: v / norm for k, v in sums.items()}
    total = sum(weights[k] * v for k, v in parts.items())
    return total, parts


# -----------------------------------------------------------------------------
# optimizer and learning-rate schedule: one function of the optimizer step, applied once per step

def total_steps(args, steps_per_epoch):
    """Optimizer steps of the whole run: --max_steps, else --epochs full epochs."""
    return args.max_steps or max(1, args.epochs * steps_per_epoch)


def schedule_position(step, total, time_share):
    """The step (0-based, of `total`) whose lr the schedule gives next when `step` steps are done and
    `time_share` of the time budget is spent: the larger of `step` and that share of the way to the last
    step, total - 1. A budget-aware schedule (Li, Yumer & Ramanan, "Budgeted training", ICLR 2020): a run
    that the clock stops before its last step still ends at the schedule's end, annealed, instead of
    being cut at a high lr. With time_share 0 it is `step`.
    Example: total 1,001, step 250, half the minutes spent -> position 500."""
    return max(step, min(1.0, time_share) * (total - 1))


def lr_schedule(args, step, steps_per_epoch):
    """(lr, SGD momentum or None) for optimizer step `step` (0-based). The one place the schedule lives:
    SGD follows OneCycle over the whole run; Adam decays the lr by --gamma after every epoch. Both are
    scaled by a linear warm-up over the first --warmup steps (Vaswani et al. 2017; Adam's early steps
    are the noisiest, and OneCycle's own rise starts at initlr/25)."""
    warm = min(1.0, (step + 1) / args.warmup) if args.warmup > 0 else 1.0
    if args.Adam:
        return warm * args.initlr * args.gamma ** (step // steps_per_epoch), None
    lr, momentum = one_cycle(step, total_steps(args, steps_per_epoch), args.initlr,
                             max_momentum=max(args.momentum, 0.85), base_momentum=0.85,
                             pct_start=args.pct_start)
    return warm * lr, momentum


def one_cycle(step, total_steps, max_lr, max_momentum, base_momentum, pct_start=0.3, div_factor=25.0,
              final_div_factor=1e4):
    """OneCycle (Smith & Topin, "Super-convergence", 2019) with cosine phases, the values of torch's
    OneCycleLR: the lr rises from max_lr / div_factor to max_lr over the first pct_start of the steps,
    then falls to max_lr / div_factor / final_div_factor; the momentum moves the opposite way between
    max_momentum and base_momentum. -> (lr, momentum)."""
    def cos(start, end, pct):
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    low = max_lr / div_factor
    phases = [(float(pct_start * total_steps) - 1, low, max_lr, max_momentum, base_momentum),
              (total_steps - 1, max_lr, low / final_div_factor, base_momentum, max_momentum)]
    step, start = min(step, total_steps), 0.0
    for i, (end, lr0, lr1, m0, m1) in enumerate(phases):
        if step <= end or i == len(phases) - 1:
            pct = (step - start) / (end - start)
            return cos(lr0, lr1, pct), cos(m0, m1, pct)
        start = end


class StepSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Sets every param group's lr (and momentum) to fn(step) -> (lr, momentum or None) on each step().
    Its state is the step count alone (`last_epoch` in torch's naming)."""

    def __init__(self, optimizer, fn):
        self.fn = fn
        super().__init__(optimizer)

    def get_lr(self):
        lr, momentum = self.fn(self.last_epoch)
        if momentum is not None:
            for group in self.optimizer.param_groups:
                group['momentum'] = momentum
        return [lr] * len(self.optimizer.param_groups)

    def state_dict(self):
        return {k: v for k, v in super().state_dict().items() if k != 'fn'}

    def go_to(self, step):
        """Continue at optimizer step `step` (a resume)."""
        self.last_epoch = step
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group['lr'] = lr
        self._last_lr = [group['lr'] for group in self.optimizer.param_groups]


def make_scheduler(args, optimizer, steps_per_epoch, clock=None):
    """The run's schedule (lr_schedule), stepped once after every optimizer step. With --time_schedule
    the RunClock `clock` moves it too: lr_schedule at schedule_position(step, total, clock.share)."""
    total = total_steps(args, steps_per_epoch)

    def fn(step):
        share = clock.share if args.time_schedule and clock is not None else 0.0
        return lr_schedule(args, schedule_position(step, total, share), steps_per_epoch)
    return StepSchedule(optimizer, fn)


@dataclasses.dataclass
class RunClock:
    """The run's training time over resumes: the seconds of earlier processes (a checkpoint keeps them)
    plus this process's. `share` is the part of the time budget (--max_minutes) spent at the last
    tick(), the largest over all ranks, so that every rank sets the same lr and stops at the same step."""
    budget_s: float = 0.0                  # --max_minutes x 60; 0: no time budget
    before: float = 0.0                    # seconds of the processes before a resume
    started: float = dataclasses.field(default_factory=time.time)
    share: float = 0.0

    def seconds(self):
        return self.before + time.time() - self.started

    def restart(self, before):
        """Continue a resumed run: `before` seconds were spent by the earlier processes."""
        self.before, self.started = float(before), time.time()

    def tick(self, world):
        """Update `share` (one all-reduce when world > 1 and there is a budget). -> share."""
        if self.budget_s > 0:
            self.share = max_over_ranks(self.seconds() / self.budget_s, world)
        return self.share


def make_optimizer(args, model):
    """SGD (Nesterov momentum) or Adam; no weight decay on biases and norm/BN weights (1-D tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{'params': decay, 'weight_decay': args.weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
    if args.Adam:
        return torch.optim.Adam(groups, lr=args.initlr)
    return torch.optim.SGD(groups, lr=args.initlr, momentum=args.momentum, nesterov=True)


# -----------------------------------------------------------------------------
# mean teacher: the teacher is an exponential moving average of the student (Tarvainen & Valpola 2017)

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


def make_teacher(model, state=None):
    """A frozen copy of the model (with `state`'s weights when given) for the EMA."""
    teacher = copy.deepcopy(model)
    if state is not None:
        teacher.load_state_dict(state)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


# -----------------------------------------------------------------------------
# distributed helpers (torchrun / DDP) and a graceful Ctrl-C

def barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _dist_device():
    return torch.device('cuda', torch.cuda.current_device()) \
        if torch.distributed.get_backend() == 'nccl' else torch.device('cpu')


def agree(flags, world):
    """For each flag: True if it is true on any rank (one all-reduce of them all when world > 1)."""
    if world == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([float(f) for f in flags], device=_dist_device())
    torch.distributed.all_reduce(t)
    return [v > 0 for v in t.tolist()]


def max_over_ranks(value, world):
    """The largest of all ranks' `value` (one all-reduce when world > 1)."""
    if world == 1:
        return float(value)
    t = torch.tensor([float(value)], device=_dist_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()


def any_rank(flag, world):
    """True if `flag` is true on any rank (one all-reduce when world > 1)."""
    return agree([flag], world)[0]


def all_ranks_have_data(micro, world):
    """False when this batch is empty on any rank (every image of it failed to decode after the size
    scan, e.g. a truncated BMP or TIFF: only PNGs are checked end to end). All ranks then skip the step
    together: a rank without a backward would leave the others waiting in DDP's gradient all-reduce."""
    return not any_rank(not micro, world)


def unwrap(model):
    model = getattr(model, 'module', model)            # DDP
    return getattr(model, '_orig_mod', model)          # torch.compile


class StopRequested(Exception):
    pass


class GracefulStop:
    """Ctrl-C (SIGINT) or SIGTERM sets a flag that the training loop reads between optimizer steps, so
    last.pt is always written at a step boundary and --resume continues exactly. A second Ctrl-C stops
    at once. Under DDP the ranks agree (Trainer.after_step) so that all of them stop after the same step."""

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


# -----------------------------------------------------------------------------
# the checkpoint dict: what a resume or an evaluation needs, as state_dicts and plain values

def checkpoint_dict(run, rngs):
    """The Trainer `run`'s checkpoint: weights, optimizer and schedule state, counters, vocab, model
    hyperparameters, arguments and RNG states (`rngs`: every rank's, from gather_rng); tensors and plain
    values only, never whole models."""
    model, state = unwrap(run.model), run.state
    return {
        'format_version': checkpoint.FORMAT_VERSION,
        'model': model.state_dict(),
        'teacher': run.teacher.state_dict() if run.teacher is not None else None,
        'optimizer': run.optimizer.state_dict(),
        'scheduler': run.scheduler.state_dict(),
        'scaler': run.scaler.state_dict() if run.scaler.is_enabled() else None,
        'epoch': state['epoch'], 'step': state['step'], 'batch_in_epoch': state['batch_in_epoch'],
        'best_metric': state['best_metric'], 'skipped_steps': state['skipped_steps'],
        'train_seconds': run.clock.seconds(),
        'vocab': run.vocab.itos, 'hparams': model.hparams, 'args': vars(run.args),
        'train_on': run.args.train_on, 'rng': rngs[0], 'rng_ranks': rngs if len(rngs) > 1 else None,
    }


def restore(run, ckpt):
    """Continue the Trainer `run` from checkpoint_dict `ckpt` (model and teacher weights are loaded where
    they are built). The schedule is a function of the step, so it goes to the saved step; this also
    reads checkpoints written before the per-step schedule, whose 'scheduler' entry was a per-batch
    OneCycleLR (SGD) or a per-epoch ExponentialLR (Adam) state."""
    run.optimizer.load_state_dict(ckpt['optimizer'])
    if ckpt.get('scaler') and run.scaler.is_enabled():
        run.scaler.load_state_dict(ckpt['scaler'])
    for k in run.state:
        run.state[k] = ckpt.get(k, run.state[k])
    run.clock.restart(ckpt.get('train_seconds', 0.0))   # checkpoints before the run clock: 0
    run.clock.tick(run.world)
    run.scheduler.go_to(run.state['step'])
    if {'gamma', 'total_steps'} & set(ckpt.get('scheduler') or {}):
        run.log(f'(converted the older checkpoint\'s {"Adam per-epoch" if run.args.Adam else "OneCycle"} '
                f'scheduler state to the per-step schedule at step {run.state["step"]})')
    ranks = ckpt.get('rng_ranks') or [ckpt['rng']]
    if len(ranks) == run.world:
        set_rng_state(ranks[run.rank])          # each process continues its own random streams
        return
    set_rng_state(ckpt['rng'])
    if len(ranks) > 1:
        run.log(f'(the checkpoint was written by {len(ranks)} processes, this run has {run.world}: its data '
                'shards and random streams differ from those of an uninterrupted run)')
    else:
        run.log('(the checkpoint holds the random states of one process; every process starts from them, so '
                'dropout and drop-connect differ from those of an uninterrupted run)')


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def gather_rng(world):
    """Every rank's RNG states, in rank order (one all_gather when world > 1): a checkpoint holds all of
    them, so that each process of a resumed DDP run continues its own dropout / drop-connect streams."""
    state = rng_state()
    if world == 1:
        return [state]
    states = [None] * world
    torch.distributed.all_gather_object(states, state)
    return states


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


# -----------------------------------------------------------------------------
# the Trainer: a run's pieces in one object; one step, one epoch, validation, saving, the epoch loop

def new_counters():
    return {'epoch': 0, 'step': 0, 'batch_in_epoch': 0, 'best_metric': -1.0, 'skipped_steps': 0}


@dataclasses.dataclass
class Trainer:
    """One training run. `model` is the module the step runs (torch.compile'd and/or DDP-wrapped;
    unwrap(model) is the plain model that is saved and averaged into the teacher). `state` holds the
    counters that a checkpoint saves (and, after validation, 'val_metrics')."""
    args: argparse.Namespace
    model: torch.nn.Module
    teacher: Optional[torch.nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: Optional[StepSchedule]
    scaler: torch.amp.GradScaler
    amp_dtype: Optional[torch.dtype]
    device: torch.device
    vocab: Optional[data.Vocab] = None
    steps_per_epoch: int = 1
    run_dir: str = ''
    rank: int = 0
    world: int = 1
    log: Callable = print
    writer: Any = None
    state: dict = dataclasses.field(default_factory=new_counters)
    clock: RunClock = dataclasses.field(default_factory=RunClock)    # --max_minutes, --time_schedule
    last_save: float = dataclasses.field(default_factory=time.time)  # for --save_every in minutes

    def n_epochs(self):
        """Epochs of the run: --epochs, or enough for --max_steps (the last one may be partial)."""
        if self.args.max_steps:
            return math.ceil(self.args.max_steps / max(1, self.steps_per_epoch))
        return self.args.epochs

    # ---- one optimizer step

    def progress(self):
        """Epochs done, fractional (the consistency ramp-up's clock)."""
        return self.state['epoch'] + self.state['batch_in_epoch'] / max(1, self.steps_per_epoch)

    def step(self, micro, unlabeled):
        """One loader batch: an optimizer step (every rank skips it together when some rank's batch has
        no readable image, or when the gradient is not finite), then the schedule and the counters.
        -> train_step's dict plus the loss weights used."""
        weights = loss_weights(self.args, self.progress())
        if all_ranks_have_data(micro, self.world):
            out = self.train_step(micro, next(unlabeled) if unlabeled is not None else None, weights)
            why = 'non-finite loss/gradient'
        else:
            out = {'loss': 0.0, 'parts': {}, 'n_tok': 0, 'grad_norm': 0.0, 'skipped': True, 'n_images': 0}
            why = 'no readable image in the batch (on some process)'
        out['weights'] = weights
        if out['skipped']:
            self.state['skipped_steps'] += 1
            self.log(f'step {self.state["step"]}: {why}, step skipped ({self.state["skipped_steps"]} so far)')
        self.clock.tick(self.world)                 # before the schedule: --time_schedule reads it
        self.scheduler.step()
        self.state['step'] += 1
        self.state['batch_in_epoch'] += 1
        return out

    def train_step(self, micro, unlabeled_mb=None, weights=None):
        """One optimizer step on a batch = a list of same-size micro-batches (one with bucketed batches),
        plus an unlabeled micro-batch for the consistency cost. Gradients are accumulated over the
        micro-batches (DDP syncs on the last backward only). Order: backward of the scaled loss,
        unscale, clip once, step (skipped when the gradient is not finite, so a NaN never reaches the
        weights or the teacher), scaler update, EMA. weights: loss_weights' dict (default: this point
        of the run). -> {'loss': objective, 'parts': {part: value}, 'n_tok', 'grad_norm', 'skipped',
        'n_images'}, summed over the micro-batches."""
        weights = weights or loss_weights(self.args, self.progress())
        n_tok = sum(int((mb['tgt'][:, 1:] != data.PAD).sum()) for mb in micro)
        batches = [(mb, True) for mb in micro] + ([(unlabeled_mb, False)] if unlabeled_mb is not None else [])
        loss_sum, parts_sum = 0.0, {}
        for i, (mb, labeled) in enumerate(batches):
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, 'no_sync') else self.model.no_sync()
            with sync:
                loss, parts = objective(self.args, dict(self.forward(mb, labeled), n_tok=n_tok), weights)
                self.scaler.scale(loss).backward()
            values = torch.stack([loss.detach(), *(v.detach() for v in parts.values())]).tolist()  # one sync
            loss_sum += values[0]
            for k, v in zip(parts, values[1:]):
                parts_sum[k] = parts_sum.get(k, 0.0) + v
        grad_norm, skipped = self.apply_gradients()
        return {'loss': loss_sum, 'parts': parts_sum, 'n_tok': n_tok, 'grad_norm': grad_norm,
                'skipped': skipped, 'n_images': sum(mb['images'].shape[0] for mb in micro)}

    def apply_gradients(self):
        """Unscale, clip, optimizer step unless the gradient is not finite, EMA. -> (grad norm, skipped)."""
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.args.clip if self.args.clip > 0 else float('inf')
        gnorm = torch.nn.utils.clip_grad_norm_(params, clip)
        skipped = not bool(torch.isfinite(gnorm))
        if not skipped:
            self.scaler.step(self.optimizer)
            if self.teacher is not None:
                update_ema(self.teacher, unwrap(self.model), self.args.ema_decay, self.state['step'])
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return float(gnorm), skipped

    def forward(self, mb, labeled):
        """Student (and teacher) logits of one micro-batch: objective's `out` (less n_tok). Student and
        teacher read the same decoder input: the gold tokens of labeled images, the teacher's greedy
        output for unlabeled ones."""
        if labeled:
            tgt = mb['tgt'].to(self.device, non_blocking=True)
        else:
            tgt = self.pseudo_labels(self.put(mb['images2']))
        tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]          # (B, T-1) each: <sos> a b | a b <eos>
        if labeled:
            tgt_in = token_dropout(tgt_in, self.args.token_dropout)
        # no padding mask: padding is trailing, so the causal mask already hides it from every real token
        # (and the fused attention kernels stay available)
        ctc = unwrap(self.model).ctc_head is not None
        with amp_context(self.device, self.amp_dtype):
            out = self.model(self.put(mb['images']), tgt_in, ctc=ctc)    # (B, T-1, V) [, (T', B, V)]
        logits, ctc_log_probs = out if ctc else (out, None)
        t_logits = None
        if self.teacher is not None:
            with torch.no_grad(), amp_context(self.device, self.amp_dtype):
                t_logits = self.teacher(self.put(mb['images2']), tgt_in)
        return {'logits': logits, 'teacher_logits': t_logits, 'ctc_log_probs': ctc_log_probs, 'tgt_out': tgt_out,
                'labeled': labeled}

    def put(self, images):
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.args.channels_last else images

    @torch.no_grad()
    def pseudo_labels(self, images):
        """Teacher's greedy transcription of unlabeled images as a PAD-padded [SOS] .. [EOS] batch (B, T)."""
        with eval_mode(self.teacher), amp_context(self.device, self.amp_dtype):
            seqs, _ = self.teacher.greedy(images, max_len=self.args.max_len)
        T = max(len(s) for s in seqs) + 2
        tgt = torch.full((len(seqs), T), data.PAD, dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            tgt[i, :len(s) + 2] = torch.tensor([data.SOS] + list(s) + [data.EOS], dtype=torch.long)
        return tgt

    # ---- one epoch

    def train_epoch(self, d, stop):
        """One pass over the training batches of TrainData `d` (from state['batch_in_epoch'] on after a
        resume). -> the epoch's mean CE per token."""
        args, state = self.args, self.state
        self.model.train()
        if self.teacher is not None:
            self.teacher.train()       # teacher noise (dropout, BN batch statistics) as in the reference
        d.train_sampler.set_epoch(state['epoch'], skip_batches=state['batch_in_epoch'])
        pbar = tqdm(d.train_loader, total=self.steps_per_epoch, initial=state['batch_in_epoch'],
                    disable=self.rank != 0, desc=f'epoch {state["epoch"] + 1}/{self.n_epochs()}',
                    dynamic_ncols=True, leave=False)
        ce_sum, n_tok, seen, t0 = 0.0, 0, 0, time.time()
        for micro in pbar:
            out = self.step(micro, d.unlabeled)
            ce = out['parts'].get('ce', 0.0)
            if math.isfinite(ce):
                ce_sum += ce * out['n_tok']
                n_tok += out['n_tok']
            seen += out['n_images']
            self.log_step(out, pbar, seen / max(1e-9, time.time() - t0))
            if args.dry_run and state['batch_in_epoch'] >= 2 or self.budget_spent():
                break
            self.after_step(stop)
        pbar.close()
        return ce_sum / max(1, n_tok)

    def after_step(self, stop):
        """At a step boundary inside the epoch (every rank): raise StopRequested on a stop request (any
        rank's), or write last.pt when --save_every is due. The last step of an epoch is left to the
        epoch-end save, after validation."""
        steps, seconds = save_interval(self.args.save_every)
        late = bool(seconds) and time.time() - self.last_save >= seconds
        stop_now, late = agree([stop.requested, late], self.world)     # one all-reduce for both
        if stop_now:
            raise StopRequested
        due = late or bool(steps) and self.state['step'] % steps == 0
        if due and self.state['batch_in_epoch'] < self.steps_per_epoch:
            path = self.save('last.pt')
            if path:
                self.log(f'  saved {path} at step {self.state["step"]}')

    def budget_spent(self):
        """--max_steps reached, or --max_minutes of the run's training passed (at the last clock tick,
        which all ranks agree on)."""
        if self.args.max_steps and self.state['step'] >= self.args.max_steps:
            return True
        return bool(self.args.max_minutes) and self.clock.share >= 1.0

    def log_step(self, out, pbar, images_per_s):
        """Progress bar; every --log_every steps the objective, its parts and weights to TensorBoard."""
        lr = self.optimizer.param_groups[0]['lr']
        ce = out['parts'].get('ce', 0.0)
        if self.rank == 0:
            pbar.set_postfix(loss=f'{ce:.3f}', lr=f'{lr:.2e}', img_s=f'{images_per_s:.1f}')
        s = self.state['step']
        if self.writer is None or s % self.args.log_every:
            return
        scalars = {'loss': out['loss'], 'lr': lr, 'grad_norm': out['grad_norm'],
                   'skipped_steps': self.state['skipped_steps'], 'images_per_s': images_per_s}
        for part, w in out['weights'].items():
            scalars[part] = out['parts'].get(part, 0.0)
            if part != 'ce':                                   # CE's weight is always 1
                scalars[f'{part}_weight'] = w
        for k, v in scalars.items():
            self.writer.add_scalar(f'train/{k}', v, s)
        self.history(dict(step=s, epoch=round(self.progress(), 4), **scalars,
                          elapsed_s=round(self.clock.seconds(), 2)))

    def history(self, row):
        """Rank 0: append one JSON line to run_dir/history.jsonl (training rows every --log_every steps,
        one 'val' row per validation): the curves as plain data, for bench.py --learn and plots."""
        if self.rank != 0 or self.args.dry_run:
            return
        with open(os.path.join(self.run_dir, 'history.jsonl'), 'a', encoding='utf-8') as f:
            f.write(json.dumps(row) + '\n')

    # ---- validation, saving, the epoch loop

    def validate(self, loader):
        """Greedy-decode this rank's shard of the val split (the shards may differ in size) with the
        teacher (--mean_teacher) or the model; the metrics over all ranks. -> (metrics, records sorted by
        index)."""
        evaluated = self.teacher if self.teacher is not None else unwrap(self.model)
        records = transformer.decode_dataset(evaluated, loader, self.vocab, beam=1, max_len=self.args.max_len,
                                             amp_dtype=self.amp_dtype, device=self.device, progress=False)
        records = gather_lists(records, self.world)
        records.sort(key=lambda r: r['index'])
        golds = [r['gold'] for r in records]
        preds = [r['pred'] for r in records]
        return compute_metrics(golds, preds), records

    def save(self, *names):
        """Every rank (their RNG states are gathered): rank 0 writes the checkpoint to each run_dir/<name>.
        A failed write (a full disk) is said, leaves the previous file as it was and lets training go on.
        -> the first path, or None (not rank 0, --dry_run, or the write failed)."""
        rngs = gather_rng(self.world)
        self.last_save = time.time()
        if self.rank != 0 or self.args.dry_run:
            return None
        ckpt = checkpoint_dict(self, rngs)
        paths = [os.path.join(self.run_dir, name) for name in names]
        try:
            for path in paths:
                checkpoint.save(path, ckpt)
        except OSError as e:        # checkpoint.save's message names the file and says it is unchanged
            self.log(f'warning: {e}')
            return None
        return paths[0]

    def end_epoch(self, train_loss, metrics, records, val_set, seconds):
        """Count the epoch, keep the best BLEU-4, and on rank 0 log, write TensorBoard, save last.pt
        (and best.pt). metrics None: an epoch without validation (--val_every)."""
        state = self.state
        state['epoch'] += 1
        state['batch_in_epoch'] = 0
        best = metrics is not None and metrics['bleu4'] > state['best_metric']
        if metrics is not None:
            state['val_metrics'] = metrics
        if best:
            state['best_metric'] = metrics['bleu4']
        path = self.save('last.pt', 'best.pt') if best else self.save('last.pt')
        if self.rank != 0:
            return
        head = f'epoch {state["epoch"]}/{self.n_epochs()} | train loss {train_loss:.4f} | '
        skipped = f' | skipped steps {state["skipped_steps"]}' if state['skipped_steps'] else ''
        if metrics is None:
            self.log(head + f'no validation (--val_every {self.args.val_every}) | {seconds:.0f} s' + skipped)
        else:
            who = 'teacher ' if self.teacher is not None else ''
            self.log(head + f'{who}val bleu4 {metrics["bleu4"]:.2f} edit_acc {metrics["edit_accuracy"]:.4f} '
                     f'exact {metrics["exact_match"]:.4f} | {seconds:.0f} s' + skipped)
            self.history({'step': state['step'], 'epoch': state['epoch'], 'val': metrics})
            if self.writer is not None:
                for k, v in metrics.items():
                    self.writer.add_scalar(f'val/{k}', v, state['step'])
                log_val_samples(self.writer, val_set, records, state['step'])
                self.writer.flush()
        if path:
            self.log(f'  saved {path}' + (' and best.pt' if best else ''))

    def fit(self, d, stop):
        """The epoch loop over TrainData `d`: train, validate (every --val_every epochs and at the end),
        save; on a stop request save last.pt (rank 0) and raise StopRequested. -> state."""
        while self.state['epoch'] < self.n_epochs():
            t0 = time.time()
            try:
                train_loss = self.train_epoch(d, stop)
            except StopRequested:
                path = self.save('last.pt')
                if path:
                    self.log(f'interrupted: saved {path} at step {self.state["step"]}; continue with --resume')
                raise
            last = self.args.dry_run or self.budget_spent() or self.state['epoch'] + 1 >= self.n_epochs()
            metrics = records = None                 # an epoch without validation (--val_every)
            if last or (self.state['epoch'] + 1) % self.args.val_every == 0:
                metrics, records = self.validate(d.val_loader)
            self.end_epoch(train_loss, metrics, records, d.val_set, time.time() - t0)
            if last:
                break
        return self.state

    def open_logs(self, d, init_note='', resumed=False):
        """Rank 0: the run folder, args.json, history.jsonl (a new one, or up to the checkpoint when
        `resumed`), TensorBoard, and what this run is in a few lines."""
        if self.rank != 0:
            return
        args = self.args
        os.makedirs(self.run_dir, exist_ok=True)
        if not args.dry_run:
            write_json(os.path.join(self.run_dir, 'args.json'), vars(args))
            trim_history(os.path.join(self.run_dir, 'history.jsonl'), self.state if resumed else None)
            for name in ('last.pt', 'best.pt'):     # temp files of writes cut short by a kill
                for tmp in data.atomic_write_leftovers(os.path.join(self.run_dir, name)):
                    os.remove(tmp)
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(os.path.join(self.run_dir, 'tb'))
        n_params = sum(p.numel() for p in unwrap(self.model).parameters())
        self.log(f'{args.train_on}: {len(d.train_set.names)} train / {len(d.val_set.names)} val images from '
                 f'{args.root_dir}; vocab {len(self.vocab)}; {n_params / 1e6:.2f}M parameters; '
                 f'{self.steps_per_epoch} steps/epoch x {self.world} process(es) on {self.device}'
                 + (f'; autocast {self.amp_dtype}' if self.amp_dtype else '')
                 + (f'; mean teacher (ema {args.ema_decay}, {args.consistency_type} x {args.consistency})'
                    if self.teacher is not None else ''))
        if init_note:
            self.log(init_note)
        if self.teacher is not None:
            note = ema_horizon_note(args.ema_decay, total_steps(args, self.steps_per_epoch))
            if note:
                self.log(note)

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.world > 1:
            torch.distributed.destroy_process_group()


def trim_history(path, state):
    """history.jsonl of a resumed run: keep the rows up to the checkpoint's `state` (the steps after it
    are trained again and logged again); state None (a new run): remove the file."""
    if not os.path.exists(path):
        return
    if state is None:
        os.remove(path)
        return
    with open(path, encoding='utf-8') as f:
        rows = [line for line in f if line.strip()]
    keep = []
    for line in rows:
        try:
            row = json.loads(line)
        except ValueError:
            continue                        # a line cut short by a kill
        if row.get('step', 0) <= state['step'] and ('val' not in row or row.get('epoch', 0) <= state['epoch']):
            keep.append(line if line.endswith('\n') else line + '\n')

    def writer(tmp):
        with open(tmp, 'w', encoding='utf-8') as f:
            f.writelines(keep)
    data.atomic_write(path, writer)


def log_val_samples(writer, dataset, records, step, n=4):
    for r in records[:n]:
        img = dataset[r['index']]['image']                                # (1, H, W), ink = 1
        writer.add_image(f'val/{r["index"]}', 1.0 - img, step)
        writer.add_text(f'val/{r["index"]}', f'gold: `{data.detokenize(r["gold"])}`  \n'
                                              f'pred: `{data.detokenize(r["pred"])}`', step)


# -----------------------------------------------------------------------------
# command line and main: build the data, build or restore the model, run the loop

def make_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('data')
    g.add_argument('--root_dir', default=data.DEFAULT_ROOT,
                   help='data root in the layout of docs/formats.md; the default demo root is rendered if missing')
    g.add_argument('--train_on', default='openai', choices=data.DOMAINS, help='domain to train on')
    g.add_argument('--cache', action='store_true', help='use/build <root_dir>/.cache of decoded images')
    g.add_argument('--batchsz', type=int, default=BATCHSZ, help='images per optimizer step (per process)')
    g.add_argument('--split_batch', action='store_true',
                   help='random mixed-size batches, split into same-size micro-batches (gradient accumulation) '
                        'instead of size-bucketed batches')
    g.add_argument('--curriculum', type=int, default=CURRICULUM, metavar='N',
                   help='the first N epochs take their batches from small to large images (short formulas '
                        'first; curriculum learning, Bengio et al. 2009); 0: shuffled from the start')
    g.add_argument('--trim', action='store_true',
                   help='crop every image to its ink (+4 px, rounded up to multiples of 16 x 64 px where smaller) '
                        'when loading, here and in test.py (saved in the checkpoint): drops the white that '
                        'fixed-size buckets pad around short formulas (a third of the openai demo\'s pixels)')
    g.add_argument('--unlabeled', default=None, metavar='DIR',
                   help='folder of unlabeled target-domain images for the consistency cost (needs --mean_teacher)')
    g.add_argument('--workers', type=int, default=-1, help='DataLoader workers (-1: 0 on CPU, 4 on CUDA)')
    g.add_argument('--max_len', type=int, default=MAX_LEN,
                   help='formulas with more tokens are skipped in training; decoding stops here')
    g.add_argument('--augment', type=float, default=None,
                   help='augmentation strength, 0 = off (None: 1 with --mean_teacher, else 0)')
    g.add_argument('--val_max', type=int, default=0, help='validate on at most this many samples (0 = all)')
    g.add_argument('--val_every', type=int, default=1, metavar='N',
                   help='validate every N epochs (and always after the last one, which writes best.pt then)')

    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=int, default=EPOCHS, help='number of epochs')
    g.add_argument('--max_steps', type=int, default=0,
                   help='train exactly this many optimizer steps (sets the epoch count; the last epoch may be '
                        'partial; the schedule spans these steps). 0: --epochs decides')
    g.add_argument('--max_minutes', type=float, default=0.0,
                   help='stop at the first step boundary after this many minutes of training in this run, '
                        'counted over resumes (then validate and save as at an epoch end). 0: no time limit')
    g.add_argument('--time_schedule', action='store_true',
                   help='with --max_minutes: the lr schedule follows the clock as well as the steps (its position '
                        'is the larger of the share of steps and the share of minutes done), so a run that the '
                        'clock stops ends annealed instead of cut at a high lr; the steps then depend on the '
                        "machine's speed")
    g.add_argument('--warmup', type=int, default=WARMUP, help='steps of linear lr warm-up (0: none)')
    g.add_argument('--initlr', type=float, default=None,
                   help=f'peak lr of OneCycle (SGD) or initial lr (Adam); None: {SGD_PEAK_LR} with SGD, '
                        f'{ADAM_LR} with --Adam')
    g.add_argument('--pct_start', type=float, default=PCT_START,
                   help='SGD: share of the steps over which OneCycle rises from initlr/25 to initlr, in (0, 1)')
    g.add_argument('--Adam', action='store_true', help='Adam + exponential lr decay instead of SGD + OneCycle')
    g.add_argument('--gamma', type=float, default=ADAM_GAMMA, help='Adam: lr decay factor per epoch')
    g.add_argument('--momentum', type=float, default=MOMENTUM, help='SGD momentum (max of the OneCycle cycle)')
    g.add_argument('--weight_decay', type=float, default=WEIGHT_DECAY,
                   help='weight decay (not applied to biases and norm weights)')
    g.add_argument('--clip', type=float, default=CLIP, help='clip the global grad norm (0 = off)')
    g.add_argument('--token_dropout', type=float, default=0.0,
                   help='replace each decoder input token by <unk> with this probability (word dropout)')
    g.add_argument('--label_smoothing', type=float, default=0.0, help='label smoothing of the CE loss')
    g.add_argument('--ctc', type=float, default=0.0,
                   help='weight of the auxiliary CTC loss over the image columns (joint CTC-attention, Kim et al. '
                        '2017; builds the CTC head of a new model). 0: off')
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
    g.add_argument('--output_stride', type=stride_flag, default=OUTPUT_STRIDE, metavar='S|RxC',
                   help='encoder output stride: 8, 16 or 32 on both axes, or RxC for rows x columns '
                        f'(default {OUTPUT_STRIDE}: rows /16, columns /8, a memory column per ~8 px of the formula)')
    g.add_argument('--head_stride', type=stride_flag, default=None, metavar='S|RxC',
                   help='stride of the last EfficientNet stages (6-7) and the head, where most of the '
                        'computation is: the output stride or double it on an axis; when coarser, their '
                        'output is upsampled back and added to the output-stride features of stage 5 (a '
                        'top-down skip). Default: 16x16 where the output stride allows it (with the default '
                        '16x8: 1.2x faster steps on wide images, and it learns faster), else the output stride')
    g.add_argument('--drop_connect', type=float, default=0.2, help='stochastic-depth rate of the EfficientNet blocks')
    g.add_argument('--zero_init_residual', action=argparse.BooleanOptionalAction, default=True,
                   help='start every residual EfficientNet block as the identity (last BatchNorm scale 0, '
                        '"zero gamma", Goyal et al. 2017); not with --backbone_weights')
    g.add_argument('--memory_norm', action=argparse.BooleanOptionalAction, default=True,
                   help='LayerNorm on the encoder memory before the positions are added')
    g.add_argument('--ctc_frames', type=int, default=CTC_FRAMES,
                   help='CTC frames per image column (with --ctc > 0)')
    g.add_argument('--freeze', type=int, default=0, metavar='N',
                   help='keep the stem and the first N of the 16 EfficientNet blocks as loaded (no gradient): for '
                        'fine-tuning with --init_from or --backbone_weights; 3 freezes strides 2-4, which spares a '
                        'third of a step on wide images (0 = train everything)')
    g.add_argument('--backbone_weights', default=None, metavar='PATH',
                   help='local ImageNet state_dict of efficientnet_pytorch B0 (nothing is downloaded)')

    g = p.add_argument_group('run')
    g.add_argument('--out_dir', default='runs', help='checkpoints and logs go to <out_dir>/<train_on>/')
    g.add_argument('--init_from', default=None, metavar='CKPT',
                   help='start from this checkpoint\'s weights and architecture (vocab extended with the new '
                        'domain\'s tokens); --output_stride, --head_stride, --dropout, --drop_connect given here '
                        'apply to it, size flags must match it')
    g.add_argument('--init_weights', default='auto', choices=('auto', 'model', 'teacher'),
                   help='which weights of --init_from (auto: the teacher if it has one)')
    g.add_argument('--resume', action='store_true',
                   help='continue the run in <out_dir>/<train_on>/ with its saved settings: from last.pt, or from '
                        'step 0 with args.json when it was stopped before its first checkpoint; a new run when '
                        'the folder holds neither. Only the flags that say how to run (' + ', '.join(
                            '--' + k for k in RUNTIME_ARGS if k != 'resume') + ') may take new values; any other '
                        'flag given must equal the run\'s, or the resume is refused')
    g.add_argument('--save_every', default=SAVE_EVERY, type=save_every_flag, metavar='N|Mm',
                   help='also write last.pt inside an epoch, at the step boundary after every N optimizer steps '
                        '(e.g. 500) or M minutes of training (e.g. 10m, 0.5m); 0: only at epoch ends and on a stop')
    g.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    prec = g.add_mutually_exclusive_group()
    prec.add_argument('--fp16', action='store_true', help='CUDA autocast fp16 + GradScaler')
    prec.add_argument('--bf16', action='store_true', help='autocast bfloat16 (CUDA or CPU)')
    g.add_argument('--channels_last', action=argparse.BooleanOptionalAction, default=None,
                   help='channels_last memory format for the encoder (None: on on a CPU, where it measured '
                        '+14%% in fp32 and +10%% with --bf16; off elsewhere until measured on a GPU)')
    g.add_argument('--compile', action='store_true',
                   help='torch.compile the model, one graph per (bucket size, batch size); meant for CUDA '
                        '(on a CPU bench.py measured minutes of compilation per shape and a slower step)')
    g.add_argument('--log_every', type=int, default=10, help='TensorBoard scalars every N steps')
    g.add_argument('--dry_run', action='store_true',
                   help='two training steps and a short validation, nothing saved')
    return p


def get_args(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    if args.unlabeled and not args.mean_teacher:
        p.error('--unlabeled needs --mean_teacher (unlabeled images only enter the consistency cost)')
    if min(args.max_steps, args.max_minutes, args.warmup, args.ctc, args.curriculum) < 0 or \
            min(args.ctc_frames, args.val_every) < 1:
        p.error('--max_steps, --max_minutes, --warmup, --ctc and --curriculum must be >= 0, --ctc_frames and '
                '--val_every >= 1')
    if args.time_schedule and not args.max_minutes:
        p.error('--time_schedule runs the schedule to the end of --max_minutes: give --max_minutes')
    if not 0.0 <= args.token_dropout <= 1.0:
        p.error(f'--token_dropout is a probability: expected a value in [0, 1], got {args.token_dropout}')
    if args.freeze and not (args.init_from or args.backbone_weights or args.resume):
        p.error('--freeze keeps weights as loaded: it needs trained ones (--init_from or --backbone_weights)')
    if args.head_stride is None:
        args.head_stride = default_head_stride(args.output_stride)
    try:
        transformer.head_strides(args.output_stride, args.head_stride)
    except ValueError as e:
        p.error(f'--{e}')
    if not 0 < args.pct_start < 1:
        p.error(f'--pct_start is a share of the steps: expected a value in (0, 1), got {args.pct_start}')
    if args.augment is None:
        args.augment = 1.0 if args.mean_teacher else 0.0
    if args.initlr is None:     # SGD's step is lr x a clipped (norm <= --clip) gradient: it needs a larger lr
        args.initlr = ADAM_LR if args.Adam else SGD_PEAK_LR
    if args.dry_run:
        args.val_max = min(args.val_max or 8, 8)
    return args


def given_flags(argv=None):
    """The names (dests) of the flags that `argv` (default: the command line) gives explicitly."""
    p, unset = make_parser(), object()
    # argparse fills in a default only where the namespace has no value yet
    ns = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(p.parse_args([])), unset)))
    return {k for k, v in vars(ns).items() if v is not unset}


def save_interval(text):
    """--save_every's value -> (steps, seconds), one of them 0: '500' -> (500, 0), '10m' -> (0, 600.0),
    '0' -> (0, 0) (off). ValueError for anything else."""
    text = str(text).strip().lower()
    value = float(text[:-1]) if text.endswith('m') else int(text)
    if value < 0 or not math.isfinite(value):
        raise ValueError(f'--save_every must be >= 0, got {text}')
    return (0, 60.0 * value) if text.endswith('m') else (value, 0)


def stride_flag(text):
    """argparse type of --output_stride: '16' -> 16, '16x8' -> [16, 8] (rows, columns), checked."""
    try:
        parts = [int(t) for t in text.lower().split('x')]
        value = parts[0] if len(parts) == 1 else parts
        transformer.output_strides(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r}: expected 8, 16 or 32, or RxC with each of them (16x8)')
    return value


def default_head_stride(output_stride):
    """HEAD_STRIDE where it is a valid head stride for output_stride, else the output stride itself."""
    try:
        return transformer.stride_value(transformer.head_strides(output_stride, HEAD_STRIDE))
    except ValueError:
        return output_stride


def save_every_flag(text):
    """argparse type of --save_every: the text, checked."""
    try:
        save_interval(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r}: expected a number of steps (500) or of minutes (10m)')
    return text


# the flags that only say how to run: a resume may give them new values; every other setting is the run's
RUNTIME_ARGS = ('resume', 'root_dir', 'cache', 'workers', 'device', 'channels_last', 'compile', 'log_every',
                'max_minutes', 'save_every', 'dry_run')


def saved_settings(run_dir):
    """The settings of the run in run_dir -> (arguments dict, where they come from, last.pt's dict or None):
    last.pt's, else args.json's (a run stopped before its first checkpoint); (None, None, None) for none."""
    last_path, json_path = os.path.join(run_dir, 'last.pt'), os.path.join(run_dir, 'args.json')
    if os.path.exists(last_path):
        try:
            ckpt = checkpoint.load(last_path)
        except ValueError as e:
            sys.exit(f'--resume: {e}. Move it away to restart the run from step 0 with its args.json, or '
                     f'start a new run with another --out_dir')
        return ckpt['args'], last_path, ckpt
    if os.path.exists(json_path):
        try:
            with open(json_path, encoding='utf-8') as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            sys.exit(f'--resume: cannot read {json_path} ({e}); start a new run with another --out_dir')
        return saved, json_path, None
    return None, None, None


def resume_args(args, given, log):
    """--resume: -> (the run's saved arguments, with the values this command line gives to RUNTIME_ARGS,
    last.pt's dict or None); exits when a flag in `given` (given_flags) differs from the run's other than
    a RUNTIME_ARG. A folder without a run: a new run. Without --resume: (args, None)."""
    if not args.resume:
        return args, None
    run_dir = os.path.join(args.out_dir, args.train_on)
    saved, source, ckpt = saved_settings(run_dir)
    if saved is None:
        log(f'--resume: no run in {run_dir} yet (no last.pt, no args.json): starting a new run')
        return args, None
    differ = [k for k in sorted(given) if k not in RUNTIME_ARGS and k in saved and saved[k] != getattr(args, k)]
    if differ:
        sys.exit('--resume: ' + '; '.join(f'--{k} {getattr(args, k)} differs from the run\'s {saved[k]}'
                                          for k in differ)
                 + f' ({source}). A resume keeps the run\'s settings: drop these flags, or start a new run '
                   'with another --out_dir')
    merged = vars(args).copy()      # flags added since the run was started keep this line's values
    merged.update({k: v for k, v in saved.items() if not (k in RUNTIME_ARGS and k in given or k == 'resume')})
    if ckpt is not None:
        log(f'resuming {source}: epoch {ckpt["epoch"]}, step {ckpt["step"]} (the run\'s settings)')
    else:
        log(f'--resume: {run_dir} has no last.pt yet (the run stopped before its first checkpoint): '
            f'starting it again from step 0 with the settings of {source}')
    return argparse.Namespace(**merged), ckpt


def run_finished(args, ckpt):
    """True when checkpoint `ckpt` ends the run of `args`: its --max_steps (else its --epochs) done, or
    its --max_minutes of training spent (a resume may give a larger --max_minutes to go on)."""
    if args.max_minutes and ckpt.get('train_seconds', 0.0) >= 60.0 * args.max_minutes:
        return True
    return ckpt['step'] >= args.max_steps if args.max_steps else ckpt['epoch'] >= args.epochs


def amp_settings(args, device, log):
    """-> (autocast dtype or None, GradScaler enabled): fp16 autocast needs the scaler, bf16 does not."""
    dtype = pick_amp(args, device, doing='training', log=log)
    return dtype, dtype == torch.float16


def prepare(args, device, rank, log):
    """Seeds, precision, memory format, cuDNN autotuning, demo data. -> autocast dtype or None."""
    seed_everything(args.seed)
    amp_dtype, _ = amp_settings(args, device, log)
    if args.channels_last is None:
        args.channels_last = device.type == 'cpu'
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True     # few distinct bucket sizes: autotuning pays
    ensure_demo_data(args, rank, log)
    return amp_dtype


def ensure_demo_data(args, rank, log):
    """The default root is the demo data: render the domain trained on at first use (rank 0; the others
    wait). Each demo sample depends only on its seed, domain, split and index, so rendering one domain now
    and the others later (by train.py or render.py) gives the same sets as rendering all at once."""
    if os.path.normpath(args.root_dir) != os.path.normpath(data.DEFAULT_ROOT):
        return
    if os.path.exists(data.label_path(args.root_dir, args.train_on, 'train')):
        return
    if rank == 0:
        import render
        log(f'no {args.train_on} demo data in {args.root_dir}: rendering it now (python3 render.py --root_dir '
            f'{args.root_dir} --domains {args.train_on})')
        render.write_demo(args.root_dir, seed=0, domains=[args.train_on])
    barrier()


@dataclasses.dataclass
class TrainData:
    train_set: data.FormulaDataset
    val_set: data.FormulaDataset
    train_loader: Any
    train_sampler: Any
    val_loader: Any
    unlabeled: Any = None       # endless iterator of unlabeled micro-batches, or None

    @property
    def steps_per_epoch(self):
        return len(self.train_sampler)


def build_data(args, device, rank, world, log):
    """Training and validation sets and loaders (this rank's shard), unlabeled stream. -> TrainData."""
    problems = data.Problems(quiet=rank != 0)
    aug = data.Augment(args.augment) if args.augment > 0 else None
    train_set = data.FormulaDataset(args.root_dir, args.train_on, 'train', cache=args.cache, augment=aug,
                                    views=2 if args.mean_teacher else 1, problems=problems,
                                    max_tokens=args.max_len, trim=args.trim)
    val_set = data.FormulaDataset(args.root_dir, args.train_on, 'val', cache=args.cache, problems=problems,
                                  trim=args.trim)
    if args.val_max and len(val_set.names) > args.val_max:
        val_set = val_set.select(range(args.val_max))
    if len(train_set.names) == 0:
        sys.exit(f'no usable training samples in {data.label_path(args.root_dir, args.train_on, "train")}')
    kw = dict(num_replicas=world, rank=rank, pin_memory=device.type == 'cuda',
              workers=args.workers if args.workers >= 0 else (4 if device.type == 'cuda' else 0))
    train_loader, train_sampler = data.make_loader(train_set, args.batchsz, split_batch=args.split_batch,
                                                   shuffle=True, seed=args.seed, curriculum=args.curriculum, **kw)
    val_loader, _ = data.make_loader(val_set, args.batchsz, shuffle=False, equal_shards=False, **kw)
    unlabeled = None
    if args.unlabeled:
        u_set = data.UnlabeledDataset(args.unlabeled, augment=aug, views=2, problems=problems, trim=args.trim)
        unlabeled = cycle_unlabeled(*data.make_loader(u_set, args.batchsz, shuffle=True, seed=args.seed + 1, **kw))
    if problems.summary():
        log(problems.summary())
    return TrainData(train_set, val_set, train_loader, train_sampler, val_loader, unlabeled)


def cycle_unlabeled(loader, sampler):
    """Endless stream of unlabeled micro-batches (one size each), a new shuffle every pass."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for micro in loader:
            yield from micro
        epoch += 1


def model_hparams(args, vocab_size):
    return dict(vocab_size=vocab_size, d_model=args.d_model, nhead=args.nhead, num_layers=args.num_layers,
                dim_ff=args.dim_ff, dropout=args.dropout, max_len=max(512, args.max_len + 2),
                output_stride=args.output_stride, drop_connect=args.drop_connect, memory_norm=args.memory_norm,
                ctc_frames=args.ctc_frames if args.ctc > 0 else 0, backbone_weights=args.backbone_weights,
                head_stride=args.head_stride)


def build_model(args, ckpt, d, device, given=frozenset()):
    """The model, its vocab (set on the data sets) and the teacher: from last.pt (--resume), from
    --init_from (vocab extended with this domain's tokens; `given`: the flags on the command line), or
    new. -> (model, teacher, vocab, note)."""
    note = ''
    if ckpt is not None:
        vocab = data.Vocab(ckpt['vocab'])
        model = transformer.build_model(ckpt['hparams'])
        model.load_state_dict(checkpoint.model_state(ckpt, 'model'))
    elif args.init_from:
        model, vocab, note = init_from(args, d.train_set.tokens, given)
    else:
        vocab = data.Vocab.build(data.read_token_list(data.PRE_VOCAB), d.train_set.tokens)
        model = transformer.build_model(model_hparams(args, len(vocab)))
        if args.zero_init_residual and not args.backbone_weights:
            model.encoder.zero_init_residual_()
    d.train_set.vocab = d.val_set.vocab = vocab
    if args.freeze:
        try:
            n = model.encoder.freeze_(args.freeze)
        except ValueError as e:
            sys.exit(f'--{e}')
        note += f'{"; " if note else ""}froze the stem and {args.freeze} blocks ({n:,} parameters)'
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    teacher = None
    if args.mean_teacher:
        resumed = ckpt is not None and checkpoint.has_teacher(ckpt)
        teacher = make_teacher(model, checkpoint.model_state(ckpt, 'teacher') if resumed else None)
    return model, teacher, vocab, note


# --init_from takes the checkpoint's architecture. No weight's shape depends on these, so a run may set them
# anew (e.g. a finer --output_stride for larger images); the SHAPE_HPARAMS flags must match the weights.
RUN_HPARAMS = ('output_stride', 'head_stride', 'dropout', 'drop_connect')
SHAPE_HPARAMS = ('d_model', 'nhead', 'num_layers', 'dim_ff', 'memory_norm', 'ctc_frames')


def _same_hparam(key, a, b, hp):
    """Do flag value `a` and checkpoint value `b` of model hyperparameter `key` build the same model?
    (False for a stride that does not fit the output stride of `hp`: building the model says why.)"""
    try:
        if key == 'output_stride':
            return transformer.output_strides(a) == transformer.output_strides(b)
        if key == 'head_stride':
            out = hp['output_stride']
            return transformer.head_strides(out, a) == transformer.head_strides(out, b)
    except ValueError:
        return False
    if key == 'ctc_frames':
        return b == 0 or a == b          # a checkpoint without a CTC head: --ctc is ignored (init_from's note)
    return a == b


def with_run_hparams(args, model, given, path):
    """--init_from's `model` rebuilt with the RUN_HPARAMS flags given on the command line (`given`), the
    weights copied; args take the checkpoint's values of the architecture flags not given, so that the
    saved args tell the trained model. SystemExit when a given flag cannot fit the weights. -> (model, note)"""
    hp = dict(model.hparams)
    clash = [k for k in SHAPE_HPARAMS if k in given and not _same_hparam(k, getattr(args, k), hp[k], hp)]
    if clash:
        sys.exit('--init_from: ' + '; '.join(f'--{k} {getattr(args, k)} but {path} has {hp[k]}' for k in clash)
                 + ': its weights have those shapes; drop the flag(s) or train without --init_from')
    new = {k: getattr(args, k) for k in RUN_HPARAMS if k in given}
    if 'output_stride' in given and 'head_stride' not in given:   # the head as the checkpoint's: coarser or not
        new['head_stride'] = args.head_stride if hp['head_stride'] is not None else args.output_stride
    changed = [k for k, v in new.items() if not _same_hparam(k, v, hp[k], {**hp, **new})]
    for k in RUN_HPARAMS + SHAPE_HPARAMS:           # args tell the model built: given values, else the checkpoint's
        if k in new:
            setattr(args, k, new[k])
        elif not (k == 'ctc_frames' and hp[k] == 0):
            setattr(args, k, hp['output_stride'] if k == 'head_stride' and hp[k] is None else hp[k])
    if not changed:
        return model, ''
    try:
        rebuilt = transformer.build_model({**hp, **new})
        rebuilt.load_state_dict(model.state_dict(), strict=True)
    except (ValueError, RuntimeError) as e:
        sys.exit(f'--init_from: {path} cannot take ' + ' '.join(f'--{k} {new[k]}' for k in changed)
                 + f': {str(e).splitlines()[0]}')
    return rebuilt, '; ' + ', '.join(f'{k} {hp[k]} -> {new[k]}' for k in changed)


def init_from(args, tokens, given=frozenset()):
    """--init_from: the checkpoint's model (or teacher) weights, vocab extended by `tokens`; the RUN_HPARAMS
    flags in `given` (given_flags) replace the checkpoint's (with_run_hparams). -> (model, vocab, note)."""
    try:
        model, itos, init = checkpoint.load_checkpoint(args.init_from, which='model')
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f'--init_from: {e}')
    which = args.init_weights
    if which == 'auto':
        which = 'teacher' if checkpoint.has_teacher(init) else 'model'
    try:
        model.load_state_dict(checkpoint.model_state(init, which, args.init_from))
    except ValueError as e:
        sys.exit(f'--init_from: {e}; use --init_weights model')
    model, changed = with_run_hparams(args, model, given, args.init_from)
    vocab = data.Vocab(itos).extend(tokens)
    transformer.extend_vocab(model, len(vocab))
    no_head = '; it has no CTC head, so --ctc is ignored' if args.ctc > 0 and model.ctc_head is None else ''
    return model, vocab, (f'initialised from {args.init_from} ({which} weights{changed}); vocab {len(itos)} -> '
                          f'{len(vocab)} tokens{no_head}')


def build_trainer(args, model, teacher, vocab, device, amp_dtype, d, rank, world, log):
    """Optimizer, schedule, scaler, the compiled / DDP-wrapped model around `model`. -> Trainer."""
    optimizer = make_optimizer(args, model)
    clock = RunClock(budget_s=60.0 * args.max_minutes)
    run_model = model
    if args.compile:
        # one graph per (bucket size, batch size): 20-32 buckets x (full, last) batches exceed dynamo's
        # default recompile_limit of 8, after which new shapes would silently run eagerly
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
        if device.type == 'cpu':
            log('--compile on a CPU: minutes of compilation per bucket shape, and bench.py measured the '
                'compiled step slower than eager there; it is meant for CUDA')
        run_model = torch.compile(model, dynamic=False)
    if world > 1:
        run_model = torch.nn.parallel.DistributedDataParallel(
            run_model, device_ids=[device.index] if device.type == 'cuda' else None)
    return Trainer(args, run_model, teacher, optimizer, make_scheduler(args, optimizer, d.steps_per_epoch, clock),
                   torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16), amp_dtype, device,
                   vocab, d.steps_per_epoch, os.path.join(args.out_dir, args.train_on), rank, world, log,
                   clock=clock)


def main(argv=None):
    args = get_args(argv)
    log = print if int(os.environ.get('RANK', 0)) == 0 else (lambda *a, **k: None)   # rank 0 logs
    given = given_flags(argv)
    args, ckpt = resume_args(args, given, log)
    if args.resume and ckpt is None and os.path.exists(os.path.join(args.out_dir, args.train_on, 'args.json')):
        given |= set(RUN_HPARAMS)    # restarted from args.json: --init_from's strides as its first start set them
    if ckpt is not None and run_finished(args, ckpt):
        log(f'that run already finished (epoch {ckpt["epoch"]}, step {ckpt["step"]}, '
            f'{ckpt.get("train_seconds", 0.0) / 60:.1f} minutes of training); nothing to do')
        return ckpt
    rank, world, local_rank = init_distributed(args.device)
    device = pick_device(args.device, local_rank)
    flush_denormals(device)
    amp_dtype = prepare(args, device, rank, log)
    d = build_data(args, device, rank, world, log)
    model, teacher, vocab, init_note = build_model(args, ckpt, d, device, given)
    run = build_trainer(args, model, teacher, vocab, device, amp_dtype, d, rank, world, log)
    if ckpt is not None:
        restore(run, ckpt)
    run.open_logs(d, init_note, resumed=ckpt is not None)
    try:
        with GracefulStop() as stop:
            run.fit(d, stop)
    except StopRequested:
        sys.exit(130)
    finally:
        run.close()
    if rank == 0 and not args.dry_run:
        log(f'done: best val BLEU-4 {run.state["best_metric"]:.2f}; checkpoints in {run.run_dir}/ '
            f'(evaluate: python3 test.py --test_on {args.train_on} --out_dir {args.out_dir}'
            + (f' --root_dir {args.root_dir}' if args.root_dir != data.DEFAULT_ROOT else '')
            + (' --mean_teacher' if teacher is not None else '') + ')')
    return run.state


if __name__ == '__main__':
    main()
