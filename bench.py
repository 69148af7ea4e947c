"""Performance figures: training throughput, decoding latency, data loading; the learning benchmark (--learn).

    python3 bench.py --quick                            # ~1-2 min on a 2-core CPU
    python3 bench.py --json bench.json                  # the fuller run
    python3 bench.py --channels_last --dtypes fp32,bf16 # + the CPU fast paths
    python3 bench.py --sections decode --weights runs/openai/best.pt
    python3 bench.py --device cuda --compile            # GPU: fp32 / fp16 / bf16 x channels_last, + compile

Every figure is the median (with min, max and IQR) of --repeats timed runs after --warmup untimed ones
(a row stops repeating after --row_budget seconds once it has 3 runs). GPU timings are bracketed by
torch.cuda.synchronize(). Rows:
  train   images/s of one real optimizer step (train.Trainer.train_step: forward, loss, backward, unscale, clip,
          step, EMA), student only and student + mean teacher, on random images and 60-token targets;
  decode  ms per formula of greedy (with / without the key-value cache) and beam search from the encoder
          memory, lengths forced with ignore_eos (comparable across checkpoints), + the encoder's ms;
  data    images/s of loading a split (plain, cache build, cached), of an epoch through make_loader
          (workers 0 and N, files and cache), of proc.kmeans_for_img_size and of rendering the set;
  render  images/s of render.render_boxes with mathtext and with pdflatex (batched, and 1 formula per
          call), same formulas, one process.
'speed-up' rows (unit x) divide a fast path's figure by its baseline's (>1: the fast path is faster).

Measure on an otherwise idle machine: torch's OpenMP threads spin-wait, so one other busy process on a
2-core machine makes torch many times slower (measured here with one busy-looping process: train step 7x,
cached greedy decoding 20x; OMP_WAIT_POLICY=PASSIVE in the environment, or --threads 1, brings both back
to within ~1.3x of idle). bench.py waits (--wait_idle) until other processes use less than --idle_cores
cores, measures a row again when they did not stay quiet, and every row records `other_load`, the cores
other processes (and the hypervisor's steal time) used while it was measured, flagged with '!' in the
table when at or above --idle_cores. Runs on a shared VM still vary by ~+-30% from one run to the next:
compare figures of one run (the variants of a row group are interleaved for that reason).

There was no GPU when this was written: the CUDA paths (synchronize, fp16 + GradScaler, bf16 when
torch.cuda.is_bf16_supported(), channels_last, cudnn.benchmark, pin_memory, compile) are written per the
torch docs and checked only for structure on a CPU.
"""
import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import data
import train
import transformer
from checkpoint import load_checkpoint, load_model, trained_with_trim
from utils import amp_context, n_workers, write_json

# -----------------------------------------------------------------------------
# defaults (every one is a flag below; None = chosen by device, or by --quick)
SECTIONS = 'train,decode,data,render'
SIZES = '64x320,128x512'        # (H, W) training sizes: a common im2latex bucket and a large one
BATCH = {'cpu': '16', 'cuda': '16,64'}
TRAIN_TOKENS = 60               # target length (+ <sos>/<eos>): about the im2latex-100k mean
DTYPES = {'cpu': 'fp32', 'cuda': 'fp32,fp16,bf16'}
DECODE_SIZE = '64x320'
DECODE_TOKENS = '50,150'
DECODE_BATCH = {'cpu': 16, 'cuda': 64}   # the "full batch" of the decoding rows (batch 1 is always run)
BEAM = 5
VOCAB_SIZE = 750                # random model: about the demo vocab (pre_vocab.txt + specials)
REPEATS = {'cpu': 5, 'cuda': 20}
WARMUP = {'cpu': 1, 'cuda': 3}
ROW_BUDGET = {'cpu': 60.0, 'cuda': 30.0}  # s of timed runs per row (at least MIN_REPEATS runs)
MIN_REPEATS = 3
RETRIES = 2                     # a row measured while other processes were busy is measured again
DATA_N = 200                    # images of the data section's split (rendered, or a cap on --root_dir)
RENDER_N = 96                   # openai-style formulas of the render section (both renderers, one process)
DATA_DOMAIN, DATA_SPLIT = 'openai', 'train'
LOADER_MIN_ITEMS = 256          # one timed loader run = enough epochs for this many images
WAIT_IDLE = 120.0               # s to wait for other processes to go quiet before each section
IDLE_CORES = 0.2                # "idle": other processes use less than this many cores
SEED = 0
# --quick: what it changes (explicit flags still win)
# --learn: the fixed set and the recipe under test (the README quick start's)
LEARN_ROOT = 'data/learn'
LEARN_OUT = 'runs/learn'
LEARN_DOMAIN = 'math'
LEARN_N = 4000
LEARN_BUDGET = '800'    # steps: about what the quick start does in its minutes on a 2-core CPU (~760 at 16x8)
LEARN_TRAIN_ARGS = '--batchsz 16 --ctc 1.0 --drop_connect 0 --weight_decay 0 --dropout 0'   # SGD + OneCycle 0.3
DIAG_BATCHES = 8                # val batches the diagnostics look at

QUICK = dict(sizes='64x320', batch='8', decode_batch=8, repeats=3, warmup=1, row_budget=8.0, data_n=32, render_n=32)

AMP = {'fp32': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}
ROW_KEYS = ('section', 'name', 'device', 'dtype', 'torch', 'threads', 'params', 'median', 'min', 'max',
            'iqr', 'n', 'unit', 'higher_is_better', 'other_load')


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--quick', action='store_true',
                   help=f'short run (~1-2 min on 2 CPU cores): {QUICK}; explicit flags still apply')
    p.add_argument('--json', default=None, metavar='PATH', help='also write the rows (and run info) as JSON here')
    p.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'), help='where to measure')
    p.add_argument('--threads', type=int, default=None,
                   help=f'torch intra-op threads (default: torch\'s, {torch.get_num_threads()} here)')
    p.add_argument('--sections', default=SECTIONS, help=f'comma-separated subset of {SECTIONS}')
    p.add_argument('--repeats', type=int, default=None, help=f'timed runs per row (default {REPEATS})')
    p.add_argument('--warmup', type=int, default=None, help=f'untimed runs before them (default {WARMUP})')
    p.add_argument('--row_budget', type=float, default=None,
                   help=f'stop repeating a row after this many seconds once it has {MIN_REPEATS} runs '
                        f'(default {ROW_BUDGET})')
    p.add_argument('--wait_idle', type=float, default=WAIT_IDLE,
                   help='seconds to wait for other processes to go quiet, before each section and before '
                        'measuring again a row they disturbed (0: no waiting, no re-measuring)')
    p.add_argument('--idle_cores', type=float, default=IDLE_CORES,
                   help='other processes using fewer cores than this count as idle')
    p.add_argument('--seed', type=int, default=SEED, help='seed of the random model, images and targets')

    g = p.add_argument_group('model')
    g.add_argument('--weights', default=None, metavar='CKPT',
                   help='bench this checkpoint\'s model (default: a random default-size model)')
    g.add_argument('--vocab_size', type=int, default=VOCAB_SIZE, help='vocab of the random model')

    g = p.add_argument_group('train')
    g.add_argument('--sizes', default=None, help=f'image sizes HxW, comma-separated (default {SIZES})')
    g.add_argument('--batch', default=None, help=f'batch sizes, comma-separated (default {BATCH})')
    g.add_argument('--train_tokens', type=int, default=TRAIN_TOKENS, help='target tokens per formula')
    g.add_argument('--dtypes', default=None,
                   help=f'precisions among fp32,fp16,bf16 (default {DTYPES}; fp16 needs CUDA, bf16 on CUDA '
                        f'needs torch.cuda.is_bf16_supported())')
    g.add_argument('--channels_last', action='store_true',
                   help='also measure channels_last (always measured on CUDA)')
    g.add_argument('--compile', action='store_true',
                   help='also measure torch.compile (compile time per shape as separate rows; slow on a CPU)')
    g.add_argument('--no_mean_teacher', action='store_true', help='skip the student + teacher rows')

    g = p.add_argument_group('decode')
    g.add_argument('--decode_size', default=DECODE_SIZE, help='image size HxW of the decoding rows')
    g.add_argument('--decode_tokens', default=DECODE_TOKENS, help='forced output lengths, comma-separated')
    g.add_argument('--decode_batch', type=int, default=None,
                   help=f'the full batch of the decoding rows, beside batch 1 (default {DECODE_BATCH})')
    g.add_argument('--beam', type=int, default=BEAM, help='beam width of the beam-search rows (0: none)')

    g = p.add_argument_group('data')
    g.add_argument('--root_dir', default=None,
                   help='measure this data root (read only: a temp view of it gets the .cache); default: '
                        'render a small set into a temp dir')
    g.add_argument('--data_domain', default=DATA_DOMAIN, choices=data.DOMAINS, help='domain of the split')
    g.add_argument('--data_split', default=DATA_SPLIT, choices=data.SPLITS, help='split to load')
    g.add_argument('--data_n', type=int, default=None,
                   help=f'images of the split (rendered, or the first N of --root_dir; default {DATA_N})')
    g.add_argument('--loader_workers', type=int, default=None,
                   help='DataLoader workers of the "workers N" rows (default: CPU cores, at most 4)')
    g.add_argument('--loader_items', type=int, default=LOADER_MIN_ITEMS,
                   help='one timed loader run = enough epochs of the split for this many images')
    g = p.add_argument_group('render')
    g.add_argument('--render_n', type=int, default=None,
                   help=f'formulas rendered per timed run with each renderer (default {RENDER_N}, --quick 32); '
                        'latex rows only where pdflatex and pdftoppm are installed')

    g = p.add_argument_group('learning benchmark (--learn): does the model learn to read, and how fast')
    g.add_argument('--learn', action='store_true',
                   help='render a fixed demo set (once), train the recipe of --train_args for --budget, evaluate '
                        'val and test, diagnose, print a table and write learn.json + learn.png (instead of the '
                        'speed sections)')
    g.add_argument('--budget', default=LEARN_BUDGET,
                   help='training budget: optimizer steps (e.g. 600; deterministic for a seed on a CPU; the '
                        'schedule spans them) or minutes (e.g. 10min; SGD\'s OneCycle then spans --epochs and is '
                        'cut where the time ends)')
    g.add_argument('--learn_root', default=LEARN_ROOT, help='where the fixed set is rendered (once) and read')
    g.add_argument('--learn_n', type=int, default=LEARN_N,
                   help='training formulas of the fixed set (val and test get 10%% each)')
    g.add_argument('--learn_domain', default=LEARN_DOMAIN, choices=('openai', 'math', 'chemistry'),
                   help='domain of the fixed set')
    g.add_argument('--learn_out', default=LEARN_OUT, help='run folder: checkpoints, history, learn.json, learn.png')
    g.add_argument('--train_args', default=LEARN_TRAIN_ARGS,
                   help='train.py flags of the recipe under test (one string), e.g. "--Adam --initlr 3e-4"')
    args = p.parse_args(argv)
    if args.learn:
        try:
            args.budget = parse_budget(args.budget)
        except ValueError as e:
            p.error(str(e))
        return args

    args.sections = [s.strip() for s in args.sections.split(',') if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS.split(',')]
    if bad or not args.sections:
        p.error(f'--sections: unknown {bad}; choose from {SECTIONS}')
    if args.device == 'auto':
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.device == 'cuda' and not torch.cuda.is_available():
        p.error('--device cuda: torch sees no CUDA device')
    kind = args.device
    quick = QUICK if args.quick else {}
    for name, default in (('sizes', SIZES), ('batch', BATCH[kind]), ('dtypes', DTYPES[kind]),
                          ('decode_batch', DECODE_BATCH[kind]), ('repeats', REPEATS[kind]),
                          ('warmup', WARMUP[kind]), ('row_budget', ROW_BUDGET[kind]), ('data_n', DATA_N),
                          ('render_n', RENDER_N)):
        if getattr(args, name) is None:
            setattr(args, name, quick.get(name, default))
    try:
        args.sizes = [parse_size(s) for s in args.sizes.split(',')]
        args.decode_size = parse_size(args.decode_size)
        args.batch = [int(b) for b in args.batch.split(',')]
        args.decode_tokens = [int(t) for t in args.decode_tokens.split(',')]
    except ValueError as e:
        p.error(str(e))
    args.dtypes = [d.strip() for d in args.dtypes.split(',') if d.strip()]
    if any(d not in AMP for d in args.dtypes) or not args.dtypes:
        p.error(f'--dtypes: choose from {",".join(AMP)}, got {args.dtypes}')
    if min(args.batch) < 1 or args.decode_batch < 1 or min(args.decode_tokens) < 1 or args.train_tokens < 1:
        p.error('batch sizes and token counts must be >= 1')
    if args.repeats < 1 or args.warmup < 0 or args.data_n < 1 or args.loader_items < 1 or args.render_n < 1:
        p.error('--repeats, --data_n, --loader_items and --render_n must be >= 1, --warmup >= 0')
    if args.loader_workers is None:
        args.loader_workers = min(4, os.cpu_count() or 1)
    return args


def parse_size(text):
    """'64x320' -> (64, 320) = (H, W)."""
    try:
        h, w = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise ValueError(f'image size {text!r}: expected HxW, e.g. 64x320') from None
    if h < 1 or w < 1:
        raise ValueError(f'image size {text!r}: H and W must be >= 1')
    return h, w


# -----------------------------------------------------------------------------
# measuring

def summarize(values):
    """Robust summary of repeated measurements: median, min, max and interquartile range."""
    v = np.asarray(values, dtype=np.float64)
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {'median': float(med), 'min': float(v.min()), 'max': float(v.max()), 'iqr': float(q3 - q1),
            'n': int(v.size)}


class LoadMeter:
    """CPU cores used by *other* processes over an interval: all busy jiffies of /proc/stat minus those
    of this process, its threads and its descendants (DataLoader workers, render/proc pools). Linux
    only; elsewhere every reading is None."""

    def __init__(self):
        self.hz = os.sysconf('SC_CLK_TCK') if hasattr(os, 'sysconf') else 100
        self.ok = os.path.exists('/proc/stat')
        self._start = None

    @staticmethod
    def _busy():
        with open('/proc/stat') as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v) - v[3] - (v[4] if len(v) > 4 else 0)           # all but idle and iowait

    @staticmethod
    def processes():
        """{pid: (ppid, utime + stime (+ reaped children's for this process), command name)}"""
        me, out = os.getpid(), {}
        for pid in os.listdir('/proc'):
            if not pid.isdigit():
                continue
            try:
                with open(f'/proc/{pid}/stat') as f:
                    s = f.read()
            except OSError:
                continue
            comm = s[s.find('(') + 1:s.rfind(')')]
            f = s[s.rfind(')') + 2:].split()    # f[0] = state (field 3), f[1] = ppid, f[11:15] = u/s/cu/cs
            j = int(f[11]) + int(f[12]) + (int(f[13]) + int(f[14]) if int(pid) == me else 0)
            out[int(pid)] = (int(f[1]), j, comm)
        return out

    def _own(self, procs):
        tree, me = {os.getpid()}, os.getpid()
        changed = True
        while changed:
            changed = False
            for pid, (ppid, _, _) in procs.items():
                if ppid in tree and pid not in tree:
                    tree.add(pid)
                    changed = True
        return sum(procs[p][1] for p in tree if p in procs), tree, me

    def start(self):
        if self.ok:
            procs = self.processes()
            self._start = (time.perf_counter(), self._busy(), self._own(procs)[0], procs)
        return self

    def stop(self):
        """-> (cores used by others, {pid: jiffies of others}) since start()."""
        if not self.ok or self._start is None:
            return None, {}
        t0, busy0, own0, procs0 = self._start
        procs = self.processes()
        own, tree, _ = self._own(procs)
        dt = max(time.perf_counter() - t0, 1e-6)
        others = max(0.0, ((self._busy() - busy0) - (own - own0)) / self.hz / dt)
        per_pid = {p: procs[p][1] - procs0[p][1] for p in procs if p in procs0 and p not in tree}
        return others, per_pid


def _cmdline(pid):
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            return f.read().replace(b'\0', b' ').decode(errors='replace').strip()[:100]
    except OSError:
        return '?'


def wait_for_idle(max_wait, idle_cores, log=print):
    """Wait up to max_wait s until other processes use < idle_cores cores (1 s samples). -> last reading."""
    meter = LoadMeter()
    if not meter.ok:
        return None
    t_end = time.time() + max_wait
    said = False
    while True:
        meter.start()
        time.sleep(1.0)
        load, per_pid = meter.stop()
        if load < idle_cores:
            if said:
                log(f'  machine idle again ({load:.2f} cores used by other processes)')
            return load
        if time.time() >= t_end:
            log(f'  WARNING: other processes still use {load:.2f} cores; measuring anyway '
                f'(rows are flagged with "!")')
            return load
        if not said:
            top = sorted(per_pid.items(), key=lambda kv: -kv[1])[:2]
            who = '; '.join(f'pid {p}: {_cmdline(p)}' for p, j in top if j >= 0.1 * meter.hz)   # >= 0.1 core
            who = f' ({who})' if who else ''
            log(f'  machine busy: other processes use {load:.2f} cores{who}; waiting up to '
                f'{max_wait:.0f} s for them to finish (torch\'s spinning OpenMP threads make timings '
                f'meaningless on a shared core)')
            said = True


class Bench:
    """Holds the run's settings and rows; times callables and prints each row as it is measured."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.rows, self.errors = [], []
        self.waited = 0.0            # s spent waiting for an idle machine (part of the wall time)
        self.meter = LoadMeter()

    def sync(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def time_calls(self, fn, warmup=None, repeats=None, budget=None):
        """-> (list of timed seconds, seconds of the first call (warm-up or not), other_load)."""
        times, firsts, other = self.time_interleaved([fn], warmup, repeats, budget)
        return times[0], firsts[0], other

    def time_interleaved(self, fns, warmup=None, repeats=None, budget=None):
        """Time callables in rounds (A B C, A B C, ...) so that a drift of the machine's speed (other
        processes, other VMs, clock changes) hits all of them alike and their ratios stay fair.
        warmup untimed rounds first; at most `repeats` timed rounds, fewer once MIN_REPEATS rounds took
        more than `budget` s per callable. When other processes used >= --idle_cores cores meanwhile,
        wait for the machine to go quiet and measure again (RETRIES times at most).
        -> (per callable: list of seconds, per callable: seconds of its first call, other_load)."""
        warmup = self.args.warmup if warmup is None else warmup
        repeats = self.args.repeats if repeats is None else repeats
        budget = (self.args.row_budget if budget is None else budget) * len(fns)
        firsts = [None] * len(fns)
        for _ in range(warmup):
            for i, fn in enumerate(fns):
                dt = self._timed(fn)
                firsts[i] = dt if firsts[i] is None else firsts[i]
        for attempt in range(RETRIES + 1):
            times = [[] for _ in fns]
            self.meter.start()
            t_start = time.perf_counter()
            for r in range(repeats):
                for i, fn in enumerate(fns):
                    times[i].append(self._timed(fn))
                if r + 1 >= MIN_REPEATS and time.perf_counter() - t_start > budget:
                    break
            other, _ = self.meter.stop()
            if other is None or other < self.args.idle_cores or self.args.wait_idle <= 0 or attempt == RETRIES:
                break
            print(f'  (other processes used {other:.2f} cores meanwhile: waiting, then measuring again)', flush=True)
            tw = time.time()
            wait_for_idle(self.args.wait_idle, self.args.idle_cores)
            self.waited += time.time() - tw
        return times, [t[0] if f is None else f for t, f in zip(times, firsts)], other

    def _timed(self, fn):
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def add(self, section, name, values, unit, params, dtype='fp32', higher_is_better=True, other_load=None,
            note=None):
        row = {'section': section, 'name': name, 'device': self.device_name(), 'dtype': dtype,
               'torch': torch.__version__, 'threads': torch.get_num_threads(), 'params': params,
               **summarize(values), 'unit': unit, 'higher_is_better': higher_is_better,
               'other_load': None if other_load is None else round(other_load, 3)}
        if note:
            row['note'] = note
        self.rows.append(row)
        print(format_row(row, self.args.idle_cores), flush=True)
        return row

    def speedup(self, section, name, fast, base, params):
        """A derived row: fast path's figure / baseline's (both rows of one unit), >1 = faster."""
        if fast is None or base is None:
            return None
        if fast['higher_is_better']:
            r = fast['median'] / base['median']
        else:
            r = base['median'] / fast['median']
        loads = [x['other_load'] for x in (fast, base) if x['other_load'] is not None]
        return self.add(section, name, [r], 'x', params, dtype=fast['dtype'],
                        other_load=max(loads) if loads else None,
                        note=f'median of "{fast["name"]}" vs "{base["name"]}"')

    def device_name(self):
        if self.device.type == 'cuda':
            return f'cuda ({torch.cuda.get_device_name(self.device)})'
        return f'cpu ({cpu_model()}, {os.cpu_count()} cores)'

    def guard(self, what, fn, *a, **kw):
        """Run one row's measurement; an error (e.g. CUDA out of memory) is reported and the run goes on."""
        try:
            return fn(*a, **kw)
        except KeyboardInterrupt:
            raise
        except Exception as e:            # noqa: BLE001 (one bad row must not lose the others)
            msg = f'{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
            print(f'  FAILED {msg}', flush=True)
            self.errors.append(msg)
            if self.device.type == 'cuda':
                torch.cuda.empty_cache()
            return None


def cpu_model():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


TABLE_HIDDEN = ('images', 'sizes', 'source')   # in the JSON, the row name or the section's header line
TABLE_ABBREV = {'mean_teacher': 'teacher', 'channels_last': 'ch_last', 'cudnn_benchmark': 'cudnn_bm'}


def fmt_params(row):
    parts = []
    for k, v in row['params'].items():
        if k in TABLE_HIDDEN or (k == 'tokens' and row['section'] == 'train'):   # train: in the header line
            continue
        k = TABLE_ABBREV.get(k, k)
        if v is True:
            parts.append(k)
        elif v is False or v is None:
            continue
        elif k == 'size':
            parts.append(str(v))
        else:
            parts.append(f'{k} {v}')
    return ', '.join(parts)


def fmt_num(x):
    if x == 0 or not math.isfinite(x):
        return f'{x:g}'
    if abs(x) >= 100:
        return f'{x:.0f}'
    if abs(x) >= 10:
        return f'{x:.1f}'
    if abs(x) >= 1:
        return f'{x:.2f}'
    return f'{x:.3g}'


TABLE_HEAD = (f'{"section":<7} {"name":<36} {"parameters":<42} {"dtype":<5} {"median":>8} {"min":>8} '
              f'{"max":>8} {"IQR":>7} {"unit":<10} {"n":>2} {"load":>5}')


def format_row(row, idle_cores=IDLE_CORES):
    load = row['other_load']
    flag = '' if load is None else (f'{load:.2f}' + ('!' if load >= idle_cores else ' '))
    return (f'{row["section"]:<7} {row["name"][:36]:<36} {fmt_params(row)[:42]:<42} '
            f'{row["dtype"]:<5} {fmt_num(row["median"]):>8} {fmt_num(row["min"]):>8} {fmt_num(row["max"]):>8} '
            f'{fmt_num(row["iqr"]):>7} {row["unit"]:<10} {row["n"]:>2} {flag:>5}')


def print_table(rows, idle_cores=IDLE_CORES):
    print(TABLE_HEAD)
    print('-' * len(TABLE_HEAD))
    for r in rows:
        print(format_row(r, idle_cores))


# -----------------------------------------------------------------------------
# model and synthetic batches

def train_args(**overrides):
    """train.py's arguments (its defaults: SGD + Nesterov, clip 1, KL consistency) with overrides."""
    args = train.get_args([])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def base_model(b):
    """-> (model on the CPU, description). The --weights checkpoint's model, or a random default-size one."""
    if b.args.weights:
        model, itos, _ = load_checkpoint(b.args.weights, map_location='cpu')
        return model, f'{b.args.weights} (vocab {len(itos)})'
    torch.manual_seed(b.args.seed)
    model = transformer.build_model(train.model_hparams(train_args(), b.args.vocab_size))
    return model, f'random default-size model (vocab {b.args.vocab_size})'


def random_images(n, h, w, gen):
    """(n, 1, h, w) float32 binary "ink" (~8% of the pixels), like data.to_tensor output."""
    return (torch.rand(n, 1, h, w, generator=gen) < 0.08).float()


def make_micro(batch, h, w, tokens, vocab_size, mean_teacher, gen):
    """One bucketed training batch in collate's format: a list with one micro-batch of `batch` images
    of one size and targets [SOS] + `tokens` random ids + [EOS] (no padding: every row has the same length)."""
    ids = torch.randint(data.UNK + 1, vocab_size, (batch, tokens), generator=gen)        # (B, tokens)
    tgt = torch.cat([torch.full((batch, 1), data.SOS), ids, torch.full((batch, 1), data.EOS)], dim=1)
    mb = {'images': random_images(batch, h, w, gen),
          'images2': random_images(batch, h, w, gen) if mean_teacher else None,
          'tgt': tgt, 'tgt_pad_mask': torch.zeros_like(tgt, dtype=torch.bool),            # (B, tokens + 2)
          'indices': torch.arange(batch)}
    return [mb]


def pin(micro):
    return [{k: (v.pin_memory() if torch.is_tensor(v) else v) for k, v in mb.items()} for mb in micro]


# -----------------------------------------------------------------------------
# train

def train_variants(b):
    """(dtype, channels_last, compile, cudnn_benchmark) combinations to measure."""
    a, cuda = b.args, b.device.type == 'cuda'
    dtypes = []
    for d in a.dtypes:
        if d == 'fp16' and not cuda:
            print('  fp16 skipped: it needs CUDA (train.py --fp16 on a CPU trains in fp32)')
        elif d == 'bf16' and cuda and not torch.cuda.is_bf16_supported():
            print('  bf16 skipped: this GPU does not support bfloat16')
        else:
            dtypes.append(d)
    layouts = (False, True) if (cuda or a.channels_last) else (False,)
    out = [(d, cl, False, True) for d in dtypes for cl in layouts]
    if cuda:   # cudnn.benchmark (train.py sets it on CUDA): its gain on the fastest precision, channels_last
        amp = [d for d in ('bf16', 'fp16') if d in dtypes]
        best = amp[0] if amp else dtypes[0]
        out.append((best, True, False, False))
    if a.compile:
        for d in dtypes:
            out.append((d, layouts[-1], True, True))
    return out


def bench_train(b):
    """Per (size, batch, mean teacher): every variant's optimizer step, timed in interleaved rounds."""
    a = b.args
    model0, desc = base_model(b)
    print(f'train: {desc}, {sum(p.numel() for p in model0.parameters()) / 1e6:.2f}M parameters; '
          f'{a.train_tokens}-token targets; SGD (train.py defaults); variants timed in interleaved rounds')
    variants = train_variants(b)
    if any(v[2] for v in variants):
        torch._dynamo.reset()
        for knob in ('recompile_limit', 'cache_size_limit'):   # one compile per (size, batch) shape
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
    models = {}
    for v in variants:   # one model per variant, kept across shapes (a compiled one compiles once per shape)
        dtype, cl, compiled, _ = v
        model = copy.deepcopy(model0).to(b.device)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        models[v] = (model, torch.compile(model, dynamic=False) if compiled else model)
    del model0
    for (h, w) in a.sizes:
        for bs in a.batch:
            for mt in ((False,) if a.no_mean_teacher else (False, True)):
                b.guard(f'train {h}x{w} batch {bs}', train_group, b, models, h, w, bs, mt)
    del models
    gc.collect()
    if b.device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        torch.cuda.empty_cache()


def train_group(b, models, h, w, bs, mt):
    a = b.args
    steps, failed = {}, []
    for v, (model, run_model) in models.items():
        try:
            fn = TrainStep(b, model, run_model, v, h, w, bs, mt)
            fn()                 # first call (compiles a compiled variant for this shape): warm-up round 1
            steps[v] = fn
        except Exception as e:   # noqa: BLE001 (e.g. CUDA out of memory: the other variants go on)
            msg = f'train {v[0]} {"channels_last " if v[1] else ""}{"compile " if v[2] else ""}{h}x{w} batch {bs}' \
                  f'{" mean_teacher" if mt else ""}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
            print(f'  FAILED {msg}', flush=True)
            b.errors.append(msg)
            failed.append(v)
            if b.device.type == 'cuda':
                torch.cuda.empty_cache()
    if not steps:
        return
    first_call = {v: fn.first for v, fn in steps.items()}
    times, _, load = b.time_interleaved(list(steps.values()), warmup=max(a.warmup - 1, 0))
    rows = {}
    for (v, fn), t in zip(steps.items(), times):
        dtype, cl, compiled, cudnn_bm = v
        params = {'size': f'{h}x{w}', 'batch': bs, 'tokens': a.train_tokens, 'mean_teacher': mt,
                  'channels_last': cl, 'compile': compiled}
        if b.device.type == 'cuda':
            params['cudnn_benchmark'] = cudnn_bm
        name = 'train step, student + teacher' if mt else 'train step, student'
        rows[v] = b.add('train', name, [bs / x for x in t], 'images/s', params, dtype=dtype, other_load=load)
        if compiled and not mt:   # the student's graph was compiled at its first call for this shape
            b.add('train', 'compile time (first step - median)', [max(first_call[v] - float(np.median(t)), 1e-6)],
                  's', params, dtype=dtype, higher_is_better=False, other_load=load,
                  note='torch.compile(model, dynamic=False): one compile per image size and batch size')
        fn.release()
    train_speedups(b, rows)


class TrainStep:
    """One real optimizer step of train.py (train.Trainer.train_step) on a fixed synthetic batch, callable."""

    def __init__(self, b, model, run_model, variant, h, w, bs, mt):
        dtype, cl, compiled, cudnn_bm = variant
        self.b, self.run_model, self.cudnn_bm = b, run_model, cudnn_bm
        self.targs = train_args(channels_last=cl, fp16=dtype == 'fp16', bf16=dtype == 'bf16', mean_teacher=mt,
                                compile=compiled)
        self.amp_dtype, use_scaler = train.amp_settings(self.targs, b.device, print)
        self.optimizer = train.make_optimizer(self.targs, model)
        self.scaler = torch.amp.GradScaler(b.device.type, enabled=use_scaler)
        self.teacher = train.make_teacher(model) if mt else None
        if mt:
            self.teacher.train()
        self.run = train.Trainer(self.targs, run_model, self.teacher, self.optimizer, None, self.scaler,
                                 self.amp_dtype, b.device)
        gen = torch.Generator().manual_seed(b.args.seed)
        self.micro = make_micro(bs, h, w, b.args.train_tokens, model.vocab_size, mt, gen)
        if b.device.type == 'cuda':
            self.micro = pin(self.micro)
        self.step, self.first = 0, None

    def __call__(self):
        if self.b.device.type == 'cuda':
            torch.backends.cudnn.benchmark = self.cudnn_bm
        t0 = time.perf_counter()
        self.run.state['step'] = self.step
        out = self.run.train_step(self.micro, None, weights={'ce': 1.0, 'consistency': 1.0})
        self.b.sync()
        if self.first is None:
            self.first = time.perf_counter() - t0
        self.step += 1
        return out

    def release(self):
        """Free the optimizer state and the teacher (the model itself is kept for the next shape)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer = self.teacher = self.micro = self.run = None


def train_speedups(b, rows):
    """channels_last vs contiguous, autocast vs fp32, compile vs eager, cudnn.benchmark on vs off, from one
    interleaved group of rows {variant: row}."""
    for (dtype, cl, compiled, cudnn_bm), row in rows.items():
        p = dict(row['params'])
        if cl and not compiled and cudnn_bm:
            b.speedup('train', 'speed-up: channels_last', row, rows.get((dtype, False, False, True)), p)
        if dtype != 'fp32' and not compiled and cudnn_bm:
            b.speedup('train', f'speed-up: {dtype} autocast vs fp32', row, rows.get(('fp32', cl, False, True)), p)
        if compiled:
            b.speedup('train', 'speed-up: torch.compile', row, rows.get((dtype, cl, False, True)), p)
        if not cudnn_bm:
            b.speedup('train', 'speed-up: cudnn.benchmark', rows.get((dtype, cl, False, True)), row, p)


# -----------------------------------------------------------------------------
# decode

def bench_decode(b):
    a = b.args
    model, desc = base_model(b)
    model.to(b.device).eval()
    h, w = a.decode_size
    print(f'decode: {desc}; {h}x{w} images; ms per formula from the encoder memory (encode row separate); '
          f'lengths forced with ignore_eos; the decoders of one row group timed in interleaved rounds')
    dtypes = [d for d in a.dtypes if not (d == 'fp16' and b.device.type != 'cuda')
              and not (d == 'bf16' and b.device.type == 'cuda' and not torch.cuda.is_bf16_supported())]
    cl_model = None
    if a.channels_last or b.device.type == 'cuda':    # the encoder in channels_last too (test.py has no flag yet)
        cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(a.seed)
    for dtype in dtypes:
        for bs in sorted({1, a.decode_batch}):
            images = random_images(bs, h, w, gen).to(b.device)
            b.guard(f'decode {dtype} batch {bs}', decode_group, b, model, cl_model, images, dtype)


def decode_group(b, model, cl_model, images, dtype):
    """The encoder row(s), then per forced length: greedy with / without the KV cache and beam search."""
    a = b.args
    bs, (h, w) = images.shape[0], images.shape[-2:]
    params = {'size': f'{h}x{w}', 'batch': bs}

    def encoder(m, x):
        def encode():
            with torch.no_grad(), amp_context(b.device, AMP[dtype]):
                return m.encode(x)                                          # (B, S, d_model)
        return encode
    encoders = {'encode (encoder only)': encoder(model, images)}
    if cl_model is not None:
        encoders['encode, channels_last'] = encoder(cl_model, images.contiguous(memory_format=torch.channels_last))
    times, _, load = b.time_interleaved(list(encoders.values()))
    rows = [b.add('decode', name, [t / bs * 1e3 for t in ts], 'ms/formula',
                  dict(params, channels_last=name.endswith('channels_last')), dtype=dtype,
                  higher_is_better=False, other_load=load) for name, ts in zip(encoders, times)]
    if len(rows) == 2:
        b.speedup('decode', 'speed-up: channels_last encoder', rows[1], rows[0], rows[1]['params'])
    memory = encoders['encode (encoder only)']()
    for tokens in a.decode_tokens:
        if tokens > model.decoder.max_len:
            print(f'  {tokens} tokens skipped: the model\'s max_len is {model.decoder.max_len}')
            continue
        p = dict(params, tokens=tokens)
        fns = decode_fns(b, model, memory, tokens, a.beam, dtype)
        for name, fn in fns.items():                 # a first (untimed) run each, checking the forced length
            lengths = sorted({len(s) for s in fn()})
            if lengths != [tokens]:
                raise RuntimeError(f'{name}: output lengths {lengths}, expected {tokens} (ignore_eos)')
        times, _, load = b.time_interleaved(list(fns.values()), warmup=max(a.warmup - 1, 0))
        rows = {name: b.add('decode', name, [t / bs * 1e3 for t in ts], 'ms/formula', p, dtype=dtype,
                            higher_is_better=False, other_load=load)
                for name, ts in zip(fns, times)}
        b.speedup('decode', 'speed-up: greedy KV cache', rows['greedy, KV cache'], rows['greedy, no cache'], p)


def decode_fns(b, model, memory, tokens, beam, dtype):
    """{row name: callable returning the decoded id lists} for one memory (B, S, d_model) and length."""
    def greedy(use_cache):
        def fn():
            with amp_context(b.device, AMP[dtype]):
                ids, _ = model.greedy(memory=memory, max_len=tokens, use_cache=use_cache, ignore_eos=True)
            return ids
        return fn

    def beam_fn():
        with amp_context(b.device, AMP[dtype]):
            ids, _ = model.beam_search(memory=memory, beam=beam, max_len=tokens, ignore_eos=True)
        return ids
    fns = {'greedy, KV cache': greedy(True), 'greedy, no cache': greedy(False)}
    if beam > 0:
        fns[f'beam {beam}, KV cache'] = beam_fn
    return fns


# -----------------------------------------------------------------------------
# data

@contextlib.contextmanager
def quiet_output():
    """Silence prints and progress bars of the library calls being timed (this process only)."""
    with open(os.devnull, 'w') as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


def make_view(src_root, domain, split, n, dst):
    """A read-only view of src_root for the data rows: the first n lines of the split's label file
    (copied) and a symlink to its image folder, in the same layout under dst, so FormulaDataset's
    .cache is written into dst and the user's root is never touched."""
    lpath = data.label_path(src_root, domain, split)
    idir = data.image_dir(src_root, domain)
    if not os.path.isfile(lpath) or not os.path.isdir(idir):
        raise FileNotFoundError(f'{src_root}: no {domain} {split} split ({lpath}, {idir})')
    out_l = os.path.join(dst, os.path.relpath(lpath, src_root))
    out_i = os.path.join(dst, os.path.relpath(idir, src_root))
    os.makedirs(os.path.dirname(out_l), exist_ok=True)
    os.makedirs(os.path.dirname(out_i), exist_ok=True)
    with open(lpath, 'rb') as f:
        lines = [ln for ln in f.read().split(b'\n') if ln.strip()][:n]
    with open(out_l, 'wb') as f:
        f.write(b'\n'.join(lines) + b'\n')
    os.symlink(os.path.abspath(idir), out_i)


def kmeans_source(src_root, domain, n, dst):
    """A folder of symlinks to the first n images that proc.kmeans_for_img_size would cluster: the math
    originals (adaptation_data/math_images) when present, else the domain's image folder."""
    import proc
    folder = os.path.join(src_root, 'adaptation_data', 'math_images')
    if not os.path.isdir(folder):
        folder = data.image_dir(src_root, domain)
    os.makedirs(dst)
    for rel in proc.list_images(folder)[:n]:
        out = os.path.join(dst, rel.replace('/', '__'))
        os.symlink(os.path.abspath(os.path.join(folder, rel)), out)
    return folder


def bench_data(b):
    tmp = tempfile.mkdtemp(prefix='bench_data_')
    try:
        bench_data_in(b, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_data_in(b, tmp):
    a = b.args
    dom, split, n = a.data_domain, a.data_split, a.data_n
    src = data_source(b, tmp)
    view = os.path.join(tmp, 'view')
    make_view(src, dom, split, n, view)
    problems = data.Problems(quiet=True)
    ds = data.FormulaDataset(view, dom, split, problems=problems)
    count = len(ds)
    if count == 0:
        raise RuntimeError(f'{dom}/{split}: no usable images in {src}')
    p = {'images': f'{dom}/{split} {count} images', 'sizes': len(set(ds.sizes))}
    print(f'data: {p["images"]}, {p["sizes"]} distinct sizes')

    def load(cache):
        return data.FormulaDataset(view, dom, split, cache=cache, problems=data.Problems(quiet=True))
    split_load_rows(b, load, os.path.join(view, '.cache'), count, p)
    loader_rows(b, load, count, p)
    kmeans_rows(b, src, dom, n, tmp)


def data_source(b, tmp):
    """The data root the data rows read: --root_dir, or a small set rendered into tmp (timed: a row)."""
    a = b.args
    dom, split, n = a.data_domain, a.data_split, a.data_n
    if a.root_dir:
        print(f'data: {dom}/{split} of {a.root_dir} (first {n} images; read through a temp view, never written)')
        return a.root_dir
    import render
    src = os.path.join(tmp, 'rendered')
    sizes = {dom: tuple(n if s == split else 1 for s in data.SPLITS)}   # (train, val, test)
    if dom != 'math':
        sizes['math'] = (max(8, n // 2), 1, 1)
    print(f'data: rendering {n} {dom} + {sizes["math"][0]} math images (mathtext) into a temp dir ...', flush=True)
    t0 = time.perf_counter()
    with quiet_output():
        res = render.write_demo(src, seed=a.seed, quiet=True, domains=tuple(sizes), sizes=sizes)
    dt = time.perf_counter() - t0
    total = sum(d.get('rendered', 0) for d in res['domains'].values())
    b.add('data', 'render (render.write_demo)', [total / dt], 'images/s',
          {'images': f'{total} images', 'processes': n_workers()}, dtype='-',
          note='one run: rendering + Deng processing + proc.kmeans of math, all cores')
    return src


def bench_render(b):
    """images/s of render.render_boxes in one process: mathtext, latex with render.LATEX_CHUNK formulas per
    pdflatex call, and latex with one formula per call (what batching saves); the same openai-style
    formulas (no environments, and only those both renderers draw) at the demo's sizes."""
    import render
    n = b.args.render_n
    renderers = ('mathtext',) if render.latex_tools() is None else ('mathtext', 'latex')
    jobs = []
    for i in range(0, 10 * n, n):   # formulas that every renderer draws (real LaTeX refuses some the demo has)
        cand = [render.make_sample('openai', b.args.seed, 'train', k) for k in range(i, i + n)]
        cand = [(s['label'], s['fontsize'], s['dpi'], s['font']) for s in cand]
        ok = [all(not isinstance(r, render.RenderError) for r in rs)
              for rs in zip(*(render.render_boxes(cand, r) for r in renderers))]
        jobs += [j for j, good in zip(cand, ok) if good][:n - len(jobs)]
        if len(jobs) == n:
            break
    p = {'formulas': f'{len(jobs)} openai-style', 'processes': 1}
    rows = {'mathtext': b.guard('render mathtext', lambda: _render_row(b, 'render, mathtext', jobs, 'mathtext', p))}
    if render.latex_tools() is None:
        print(f'render: latex rows skipped ({render.LATEX_INSTALL_HINT})')
        return
    rows['latex'] = b.guard('render latex', lambda: _render_row(
        b, f'render, latex ({render.LATEX_CHUNK} per pdflatex call)', jobs, 'latex', p))
    few = jobs[:max(1, min(8, len(jobs)))]
    rows['latex1'] = b.guard('render latex 1', lambda: _render_row(
        b, 'render, latex (1 per pdflatex call)', few, 'latex', dict(p, formulas=f'{len(few)} openai-style'),
        per_call=True))
    b.speedup('render', 'speed-up: latex vs mathtext', rows['latex'], rows['mathtext'], p)
    b.speedup('render', 'speed-up: latex batched vs 1 per call', rows['latex'], rows['latex1'], p)


def _render_row(b, name, jobs, renderer, p, per_call=False):
    import render

    def run():
        out = [render.render_boxes([j], renderer)[0] for j in jobs] if per_call else render.render_boxes(jobs, renderer)
        bad = sum(isinstance(r, render.RenderError) for r in out)
        if bad:
            raise RuntimeError(f'{bad} of {len(jobs)} formulas did not render with {renderer}')
    times, _, load_ = b.time_calls(run, warmup=1)
    return b.add('render', name, [len(jobs) / t for t in times], 'images/s', p, dtype='-', other_load=load_,
                 note='render.render_boxes: typeset + rasterize, uncropped, one process')


def split_load_rows(b, load, cache_dir, count, p):
    """Loading a split (FormulaDataset): without the cache, building it, and from it."""
    def first_load():
        shutil.rmtree(cache_dir, ignore_errors=True)
        return load(True)

    rows = {}
    for name, fn, note in (
            ('load split, no cache', lambda: load(False), 'labels + PNG header check; pixels decoded per item'),
            ('load split, cache build', first_load, 'first --cache load: decode every image, write .cache '
                                                     '(files in the OS page cache after the first run)'),
            ('load split, cached', lambda: load(True), 'later --cache loads: fingerprint check + memory map')):
        def row(fn=fn, name=name, note=note):
            times, _, load_ = b.time_calls(fn, warmup=1)
            return b.add('data', name, [count / t for t in times], 'images/s', p, dtype='-', other_load=load_,
                         note=note)
        rows[name] = b.guard(name, row)
    b.speedup('data', 'speed-up: cached load vs cache build', rows['load split, cached'],
              rows['load split, cache build'], p)


def loader_rows(b, load, count, p):
    """An epoch of every item through make_loader, from the files and from the cache, with 0 and N workers."""
    a = b.args
    pre = data.read_token_list(data.PRE_VOCAB)
    cuda = b.device.type == 'cuda'
    first_rows = {}
    for source in ('files', 'cache', 'cache+augment'):   # cache+augment: --mean_teacher's two augmented views
        dset = load(source != 'files')
        dset.vocab = data.Vocab.build(pre, dset.tokens)
        if source == 'cache+augment':
            dset.augment, dset.views = data.Augment(1.0), 2
        by_workers = {}
        configs = [(0, False), (a.loader_workers, False)]
        if cuda:
            configs += [(a.loader_workers, True)]
        for workers, pinned in configs:
            lp = dict(p, source=source, workers=workers, batch=a.batch[0])
            if cuda:
                lp['pin_memory'] = pinned
            name = f'loader epoch, {source}, workers {workers}'
            by_workers[(workers, pinned)] = b.guard(name, loader_row, b, dset, name, workers, pinned, lp, count)
        b.speedup('data', f'speed-up: loader workers {a.loader_workers} ({source})',
                  by_workers.get((a.loader_workers, False)), by_workers.get((0, False)),
                  dict(p, source=source, workers=a.loader_workers))
        if cuda:
            b.speedup('data', f'speed-up: pin_memory ({source})', by_workers.get((a.loader_workers, True)),
                      by_workers.get((a.loader_workers, False)), dict(p, source=source, workers=a.loader_workers))
        first_rows[source] = by_workers.get((0, False))
    b.speedup('data', 'speed-up: loader from cache vs files', first_rows['cache'], first_rows['files'],
              dict(p, workers=0))
    if a.quick:
        print(f'  (quick: {count} images = a few batches per epoch, so the worker rows mostly show the per-epoch '
              f'start-up of the workers\' prefetching)')


def kmeans_rows(b, src, dom, n, tmp):
    """proc.kmeans_for_img_size: cluster + resize + write (caching off), and a cached re-run."""
    import proc
    ksrc = os.path.join(tmp, 'kmeans_src')
    folder = kmeans_source(src, dom, n, ksrc)
    kn = len(proc.list_images(ksrc))
    kp = {'images': f'{kn} images of {os.path.basename(folder)}'}
    kout = os.path.join(tmp, 'kmeans_out')

    def kmeans(caching):
        with quiet_output():
            return proc.kmeans_for_img_size(ksrc, caching=caching, resize=True, out_root=kout,
                                            problems=data.Problems(quiet=True))
    for name, caching, note in (('proc.kmeans_for_img_size', False, 'cluster + resize + write every image'),
                                ('proc.kmeans_for_img_size, re-run', True, 'cached: nothing changed')):
        def row(caching=caching, name=name, note=note):
            times, _, load_ = b.time_calls(lambda: kmeans(caching), warmup=1)
            return b.add('data', name, [kn / t for t in times], 'images/s', kp, dtype='-', other_load=load_,
                         note=note)
        b.guard(name, row)


def loader_row(b, dset, name, workers, pinned, params, count):
    loader, sampler = data.make_loader(dset, params['batch'], shuffle=True, seed=b.args.seed, workers=workers,
                                       pin_memory=pinned)
    held = {'loader': loader}    # dropped at the end, which stops its persistent workers
    del loader
    epochs = max(1, math.ceil(b.args.loader_items / count))
    epoch = [0]

    def run():
        seen = 0
        for _ in range(epochs):
            sampler.set_epoch(epoch[0])
            epoch[0] += 1
            for micro in held['loader']:
                for mb in micro:
                    if b.device.type == 'cuda':
                        mb['images'].to(b.device, non_blocking=True)
                    seen += mb['images'].shape[0]
        return seen
    try:
        times, _, load = b.time_calls(run, warmup=1)     # the warm-up epoch starts the (persistent) workers
    finally:
        held.clear()
        gc.collect()
    return b.add('data', name, [epochs * count / t for t in times], 'images/s', params, dtype='-', other_load=load,
                 note=f'{epochs} epoch(s) per run, batch {params["batch"]}, bucketed, with vocab encoding')


# -----------------------------------------------------------------------------

def meta_info(args, started, wall, waited):
    info = {'started': started, 'wall_s': round(wall, 1), 'waited_for_idle_s': round(waited, 1),
            'argv': sys.argv[1:], 'quick': args.quick,
            'torch': torch.__version__, 'python': platform.python_version(), 'platform': platform.platform(),
            'cpu': cpu_model(), 'cpu_count': os.cpu_count(), 'threads': torch.get_num_threads(),
            'device': args.device, 'seed': args.seed, 'weights': args.weights}
    if args.device == 'cuda':
        info['cuda_device'] = torch.cuda.get_device_name()
        info['cuda'] = torch.version.cuda
        info['cudnn'] = torch.backends.cudnn.version()
    return info


def write_results(path, b, started, t0, interrupted=False):
    out = {'meta': meta_info(b.args, started, time.time() - t0, b.waited), 'rows': b.rows, 'errors': b.errors,
           'interrupted': interrupted}
    write_json(path, out, indent=1)


# -----------------------------------------------------------------------------
# learning benchmark (--learn): a fixed rendered set, the recipe under test for a fixed budget, then the
# val and test figures, the loss curve and the diagnostics that tell a model that reads from one that
# only learned the language of the labels

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_budget(text):
    """'600' -> {'steps': 600}; '10min' -> {'minutes': 10.0}; '90s' -> {'minutes': 1.5}."""
    m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*(min|m|s|steps?)?\s*', str(text).lower())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f'--budget {text!r}: give optimizer steps (600) or minutes (10min, 90s)')
    value, unit = float(m.group(1)), m.group(2) or 'steps'
    if unit.startswith('step'):
        return {'steps': int(value)}
    return {'minutes': value / 60.0 if unit == 's' else value}


def _run(cmd, what):
    print('$ ' + ' '.join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.time()
    if subprocess.run(cmd, cwd=HERE).returncode != 0:
        raise SystemExit(f'bench --learn: {what} failed (command above)')
    return time.time() - t0


def learn_render(args):
    """Render the fixed set once (seed 0); later runs reuse it."""
    if os.path.isfile(data.label_path(args.learn_root, args.learn_domain, 'test')):
        return 0.0
    return _run([sys.executable, 'render.py', '--root_dir', args.learn_root, '--n', str(args.learn_n),
                 '--domains', args.learn_domain, '--seed', '0'], 'rendering the fixed set')


def learn_train(args, run_dir):
    """A fresh run of train.py with the recipe under test; -> wall seconds."""
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)          # the benchmark's own folder: every run starts from scratch
    steps = args.budget.get('steps')
    budget = (['--max_steps', str(steps)] if steps else ['--max_minutes', str(args.budget['minutes'])])
    log_every = max(1, min(25, (steps or 1000) // 40))               # about 40 points on the curve
    return _run([sys.executable, 'train.py', '--root_dir', args.learn_root, '--train_on', args.learn_domain,
                 '--out_dir', args.learn_out, '--seed', str(args.seed), '--cache', '--log_every', str(log_every)]
                + budget + shlex.split(args.train_args), 'training')


def learn_eval(args, weights, split, greedy):
    """test.py on a split with the final weights, greedy (--beam 1: what train.py validates with, the
    benchmark's learning figures) or with test.py's default decoding -> its metrics dict."""
    extra, suffix = (['--beam', '1', '--tag', 'greedy'], '_greedy') if greedy else ([], '')
    _run([sys.executable, 'test.py', '--root_dir', args.learn_root, '--test_on', args.learn_domain,
          '--out_dir', args.learn_out, '--weights', weights, '--split', split, '--cache'] + extra,
         f'test.py --split {split}' + (' --beam 1' if greedy else ''))
    path = os.path.join(args.learn_out, args.learn_domain, f'metrics_{args.learn_domain}_{split}{suffix}.json')
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def read_history(path):
    """train.py's history.jsonl -> (train rows, validation rows)."""
    rows = []
    with open(path, encoding='utf-8') as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return [r for r in rows if 'loss' in r], [r for r in rows if 'val' in r]


@torch.no_grad()
def _forced_ce(model, images, tgt, memory=None):
    """Teacher-forced cross entropy summed over the real tokens of a micro-batch."""
    memory = model.encode(images) if memory is None else memory
    return float(train.supervised_loss(model.decode(tgt[:, :-1], memory), tgt[:, 1:]))


@torch.no_grad()
def _read_probes(model, mask, out):
    """Entropy and peak of the cross-attention weights the layers kept, over real tokens."""
    for layer in model.decoder.layers:
        w = layer.probe.pop()                                        # (B, h, T, S)
        ent = -(w * w.clamp_min(1e-12).log()).sum(-1)                # (B, h, T)
        m = mask[:, None, :].expand_as(ent)
        out['entropy'] += float(ent[m].sum())
        out['peak'] += float(w.amax(-1)[m].sum())
        out['uniform'] += math.log(w.shape[-1]) * int(m.sum())
        out['n_att'] += int(m.sum())


def diagnose(model, loader, n_batches=DIAG_BATCHES):
    """Does the decoder use the image? Teacher-forced CE per token with the true images, with the images
    of the micro-batch rolled by one (another formula's image) and with blank images: the gaps are what
    the image contributes. Cross-attention entropy over the memory positions (uniform = not looking) and
    its mean peak weight. Gradient norms of the encoder's parts and the decoder on one training batch."""
    model.eval()
    out = dict(true=0.0, true_shuf=0.0, shuffled=0.0, blank=0.0, n_tok=0, n_shuf=0, entropy=0.0, peak=0.0,
               uniform=0.0, n_att=0)
    batches = [mb for i, micro in enumerate(loader) if i < n_batches for mb in micro]
    for mb in batches:
        images, tgt = mb['images'], mb['tgt']
        mask = tgt[:, 1:] != data.PAD                                # (B, T)
        memory = model.encode(images)
        for layer in model.decoder.layers:
            layer.probe = []
        ce_true = _forced_ce(model, images, tgt, memory)
        out['true'] += ce_true
        _read_probes(model, mask, out)
        for layer in model.decoder.layers:
            layer.probe = None
        out['blank'] += _forced_ce(model, torch.zeros_like(images), tgt)
        out['n_tok'] += int(mask.sum())
        if images.shape[0] > 1:                                      # another formula's image
            out['shuffled'] += _forced_ce(model, images, tgt, memory.roll(1, dims=0))
            out['true_shuf'] += ce_true
            out['n_shuf'] += int(mask.sum())
    diag = {'ce_true': out['true'] / max(1, out['n_tok']), 'ce_blank': out['blank'] / max(1, out['n_tok']),
            'ce_true_same_batches': out['true_shuf'] / max(1, out['n_shuf']),
            'ce_shuffled': out['shuffled'] / max(1, out['n_shuf']),
            'attention_entropy': out['entropy'] / max(1, out['n_att']),
            'attention_uniform_entropy': out['uniform'] / max(1, out['n_att']),
            'attention_peak': out['peak'] / max(1, out['n_att']), 'tokens': out['n_tok']}
    diag['grad_norms'] = part_grad_norms(model, batches[0])
    return diag


def part_grad_norms(model, mb):
    """Gradient norm of the mean token CE of one micro-batch (train mode), per part of the model."""
    model.train()
    model.zero_grad(set_to_none=True)
    tgt = mb['tgt']
    loss = train.supervised_loss(model(mb['images'], tgt[:, :-1]), tgt[:, 1:]) / int((tgt[:, 1:] != data.PAD).sum())
    loss.backward()
    parts = {'backbone': model.encoder.backbone, 'nonlocal': model.encoder.nonlocal_blocks,
             'projection': model.encoder.proj, 'decoder': model.decoder}
    if model.encoder.skip_proj is not None:       # the stage-5 skip of a coarser head stride
        parts['skip'] = model.encoder.skip_proj
    norms = {}
    for name, module in parts.items():
        grads = [p.grad.norm() ** 2 for p in module.parameters() if p.grad is not None]
        norms[name] = float(torch.stack(grads).sum().sqrt()) if grads else 0.0
    model.zero_grad(set_to_none=True)
    model.eval()
    return norms


def plot_learning(train_rows, val_rows, path, title):
    """Loss per token (train) and val BLEU-4 / exact match against the step, as a PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps, ce = [r['step'] for r in train_rows], [r['ce'] for r in train_rows]
    k = 5                                                   # each point is one batch's CE: smooth it
    smooth = [sum(ce[max(0, i - k + 1):i + 1]) / len(ce[max(0, i - k + 1):i + 1]) for i in range(len(ce))]
    a.plot(steps, ce, lw=0.8, alpha=0.35, label='per logged step')
    a.plot(steps, smooth, lw=1.6, label=f'mean of {k}')
    a.set(xlabel='step', ylabel='train CE (nats/token)', title='training loss')
    a.legend()
    a.grid(alpha=0.3)
    steps = [r['step'] for r in val_rows]
    b.plot(steps, [r['val']['bleu4'] for r in val_rows], 'o-', label='BLEU-4')
    b.plot(steps, [100 * r['val']['exact_match'] for r in val_rows], 's-', label='exact match (%)')
    b.set(xlabel='step', ylabel='val (%)', title='validation', ylim=(0, 100))
    b.grid(alpha=0.3)
    b.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path + '.tmp.png', dpi=100)
    plt.close(fig)
    os.replace(path + '.tmp.png', path)


def learn_table(res):
    d = res['diagnostics']
    rows = [('recipe', res['train_args']), ('budget', json.dumps(res['budget'])),
            ('steps', str(res['steps'])),
            ('train wall / images/s', f'{res["train_wall_s"]:.0f} s / {res["images_per_s"]:.1f}')]
    for split in ('val', 'test', 'test_decoded'):
        m = res[split]
        name = f'test, {m["decoding"]},' if split == 'test_decoded' else f'{split}, greedy,'
        rows.append((f'{name} BLEU-4 / exact / edit acc',
                     f'{m["bleu4"]:.2f} / {m["exact_match"]:.4f} / {m["edit_accuracy"]:.4f}'))
    rows += [('CE true / rolled / blank', f'{d["ce_true_same_batches"]:.3f} / {d["ce_shuffled"]:.3f} / {d["ce_blank"]:.3f}'
              f' (all batches: true {d["ce_true"]:.3f})'),
             ('attention entropy (uniform) / peak',
              f'{d["attention_entropy"]:.2f} ({d["attention_uniform_entropy"]:.2f}) / {d["attention_peak"]:.3f}'),
             ('grad norms', ' '.join(f'{k} {v:.3g}' for k, v in d['grad_norms'].items())),
             ('curve (step: CE)', ' '.join(f'{r["step"]}: {r["ce"]:.2f}' for r in res['curve'][::max(1, len(res['curve']) // 8)]))]
    width = max(len(k) for k, _ in rows)
    return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)


def learn(args):
    """bench.py --learn: render (once), train, evaluate val and test, diagnose, write JSON + PNG."""
    t0 = time.time()
    render_s = learn_render(args)
    run_dir = os.path.join(args.learn_out, args.learn_domain)
    train_wall = learn_train(args, run_dir)
    weights = os.path.join(run_dir, 'last.pt')
    train_rows, val_rows = read_history(os.path.join(run_dir, 'history.jsonl'))
    res = {'meta': {'date': datetime.date.today().isoformat(), 'torch': torch.__version__, 'cpu': cpu_model(),
                    'threads': torch.get_num_threads(), 'seed': args.seed},
           'root': args.learn_root, 'domain': args.learn_domain, 'train_args': args.train_args, 'budget': args.budget,
           'steps': train_rows[-1]['step'] if train_rows else 0,
           'train_wall_s': train_wall, 'render_s': render_s,
           'images_per_s': train_rows[-1].get('images_per_s', 0.0) if train_rows else 0.0,
           'curve': [{k: r[k] for k in ('step', 'loss', 'ce', 'lr') if k in r} for r in train_rows],
           'val_curve': [{'step': r['step'], **r['val']} for r in val_rows]}
    res['val'] = learn_eval(args, weights, 'val', greedy=True)
    res['test'] = learn_eval(args, weights, 'test', greedy=True)
    res['test_decoded'] = learn_eval(args, weights, 'test', greedy=False)   # test.py's default decoding
    model, vocab, ckpt, _ = load_model(weights)
    val_set = data.FormulaDataset(args.learn_root, args.learn_domain, 'val', vocab=vocab, cache=True,
                                  trim=trained_with_trim(ckpt))
    loader, _ = data.make_loader(val_set, 64, shuffle=False)     # one size per batch: all of it, up to 64
    res['diagnostics'] = diagnose(model, loader)
    res['wall_s'] = time.time() - t0
    write_json(os.path.join(args.learn_out, 'learn.json'), res)
    plot_learning(train_rows, val_rows, os.path.join(args.learn_out, 'learn.png'),
                  f'{args.learn_domain}, {args.train_args}, budget {args.budget}')
    print('\n' + learn_table(res))
    print(f'wrote {os.path.join(args.learn_out, "learn.json")} and learn.png')
    return res


def main(argv=None):
    args = get_args(argv)
    if args.learn:
        return learn(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
    t0 = time.time()
    b = Bench(args)
    print(f'bench: torch {torch.__version__}, {b.device_name()}, {torch.get_num_threads()} threads'
          + (', quick' if args.quick else '') + f'; sections {",".join(args.sections)}', flush=True)
    print(TABLE_HEAD)
    interrupted = False
    try:
        for section in args.sections:
            if args.wait_idle > 0:
                tw = time.time()
                wait_for_idle(args.wait_idle, args.idle_cores)
                b.waited += time.time() - tw
            fn = {'train': bench_train, 'decode': bench_decode, 'data': bench_data, 'render': bench_render}[section]
            b.guard(section, fn, b)
            if args.json:
                write_results(args.json, b, started, t0)
    except KeyboardInterrupt:
        interrupted = True
        print('\ninterrupted: the rows so far follow')
    wall = time.time() - t0
    waited = f' ({b.waited:.0f} s of it waiting for an idle machine)' if b.waited >= 1 else ''
    print(f'\n{len(b.rows)} rows in {wall:.0f} s{waited}; torch {torch.__version__}, {torch.get_num_threads()} '
          f'threads, {b.device_name()}; medians of timed runs; "load" = cores used by other processes ("!" >= '
          f'{args.idle_cores}: figures unreliable)')
    print_table(b.rows, args.idle_cores)
    if b.errors:
        print(f'{len(b.errors)} failed row(s):\n  ' + '\n  '.join(b.errors))
    if args.json:
        write_results(args.json, b, started, t0, interrupted)
        print(f'wrote {args.json}')
    return {'meta': meta_info(args, started, wall, b.waited), 'rows': b.rows, 'errors': b.errors,
            'interrupted': interrupted}


if __name__ == '__main__':
    main()
