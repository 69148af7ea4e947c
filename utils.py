"""Small helpers that several scripts share: messages, device and precision, joining a torchrun process
group, eval mode, atomic JSON and PNG files, cropping to the ink, and the number of worker processes.

Nothing here knows about formulas or the model; data.py holds the lower-level file helpers
(atomic_write, load_gray) and this module builds on them.
"""
import contextlib
import io
import json
import multiprocessing
import os
import sys

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from tqdm import tqdm

from data import atomic_write


# -----------------------------------------------------------------------------
# messages

def info(msg):
    """A message for the user on stderr (stdout carries only results: tables, transcriptions)."""
    print(msg, file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# device and precision

def pick_device(name, local_rank=None):
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device; under torchrun (local_rank set) CUDA is the
    process's own GPU. SystemExit when CUDA is asked for but torch sees none."""
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    dev = torch.device(name)
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise SystemExit('error: --device cuda asked for, but torch sees no CUDA device')
        if local_rank is not None:
            dev = torch.device('cuda', local_rank)
        elif dev.index is None:
            dev = torch.device('cuda', 0)
    return dev


def flush_denormals(device):
    """On a CPU, flush denormal floats (|x| < 1.2e-38) to zero (torch.set_flush_denormal, x86 FTZ/DAZ).
    A trained model's activations and gradients hold enough of them to slow every step: the quick
    start's model after 967 steps trained at 489 ms per step (batch 16, 2 threads) and at 416 with
    the flush (a fresh model: 388 and 381). The values flushed are far below anything that matters."""
    if device.type == 'cpu':
        torch.set_flush_denormal(True)


def init_distributed(device='auto'):
    """Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set): join the process group, NCCL when `device` is
    CUDA, else gloo. -> (rank, world size, local rank); (0, 1, None) for a plain single process."""
    if 'RANK' not in os.environ:
        return 0, 1, None
    import torch.distributed as dist
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    use_cuda = device != 'cpu' and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    backend = 'nccl' if use_cuda else 'gloo'
    if os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True':
        # torchrun shares its store with the workers for the whole job; a group restarted by
        # --max-restarts would read the lost group's addresses from it and fail to connect (torch 2.14):
        # each attempt uses keys of its own
        store, _, _ = next(dist.rendezvous('env://'))
        attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')
        dist.init_process_group(backend, store=dist.PrefixStore(f'attempt_{attempt}', store), rank=rank,
                                world_size=world)
    else:
        dist.init_process_group(backend)
    return rank, world, local_rank


def gather_lists(items, world):
    """Every rank's list `items` concatenated in rank order (one all_gather_object when world > 1)."""
    if world == 1:
        return list(items)
    parts = [None] * world
    torch.distributed.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def _cpu_has_native_bf16():
    return any(getattr(torch.cpu, f, lambda: False)() for f in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'))


def pick_amp(args, device, doing='decoding', log=None):
    """-> autocast dtype or None from args.fp16 / args.bf16; says what it does where a precision flag
    does not apply (fp16 needs CUDA; a GPU without bf16) or is slow (CPU bf16 without native support:
    bench.py measured 0.5-0.65x of fp32 training on such a CPU). log: where the notes go (default stderr)."""
    log = log or info
    if args.fp16:
        if device.type == 'cuda':
            return torch.float16
        log(f'--fp16 needs a CUDA device: {doing} in fp32 on the CPU (--bf16 gives CPU bfloat16 autocast)')
        return None
    if args.bf16:
        if device.type == 'cuda' and not torch.cuda.is_bf16_supported():
            log(f'this GPU has no bfloat16 support: {doing} in fp32')
            return None
        if device.type == 'cpu' and not _cpu_has_native_bf16():
            log('--bf16: this CPU has no native bfloat16 (AVX512-BF16 / AMX); autocast emulates it and is '
                'slower than fp32 here (python3 bench.py --dtypes fp32,bf16 measures it)')
        return torch.bfloat16
    return None


def amp_context(device, amp_dtype):
    """torch.autocast on `device` (a torch.device or its name) in amp_dtype; a no-op for None (fp32)."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=amp_dtype)


def fp32_under_cpu_autocast(fn, *tensors, **kwargs):
    """fn(*tensors, **kwargs), in float32 when CPU autocast is on (train.py / test.py --bf16 on a CPU).
    oneDNN's bf16 kernels for depthwise convolutions and for the backward of CPU flash attention are
    slower than its fp32 ones (measured on an Intel Xeon with AMX, 2 threads: a 5x5 depthwise conv at
    1152 channels, forward + backward, 24 ms in fp32 against 72 in bf16), while the dense convolutions
    and linear layers around them run ~2x faster in bf16; these ops are kept in fp32 there."""
    if tensors[0].device.type == 'cpu' and torch.is_autocast_enabled('cpu'):
        with torch.autocast('cpu', enabled=False):
            return fn(*(t.float() for t in tensors), **kwargs)
    return fn(*tensors, **kwargs)


@contextlib.contextmanager
def eval_mode(model):
    """Run the block with `model` in eval mode, then put it back in the mode it had (also on an error)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# -----------------------------------------------------------------------------
# files, written atomically (data.atomic_write: a temp file in the same folder, then a rename)

def write_text(path, text):
    """A str as a UTF-8 text file at path, atomically; '\n' stays '\n' on every platform."""
    def writer(tmp):
        with open(tmp, 'w', encoding='utf-8', newline='\n') as f:
            f.write(text)
    atomic_write(path, writer)


def write_json(path, obj, indent=2):
    """obj as UTF-8 JSON at path, atomically, with a final newline. Values JSON does not know (paths,
    dtypes) are written as their str(). indent=None writes it compact, on one line."""
    separators = (',', ':') if indent is None else None

    def writer(tmp):
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(obj, f, indent=indent, separators=separators, default=str)
            f.write('\n')
    atomic_write(path, writer)


def png_bytes(u8, meta=None, optimize=False):
    """uint8 (H, W) gray image -> PNG file contents; meta: {key: value} written as text chunks."""
    pnginfo = None
    if meta:
        pnginfo = PngImagePlugin.PngInfo()
        for k, v in meta.items():
            pnginfo.add_text(k, str(v))
    buf = io.BytesIO()
    Image.fromarray(np.asarray(u8, dtype=np.uint8)).save(buf, format='PNG', pnginfo=pnginfo, optimize=optimize)
    return buf.getvalue()


def save_png(u8, path, meta=None):
    """uint8 (H, W) -> grayscale PNG at path, atomically (meta: text chunks, see png_bytes)."""
    payload = png_bytes(u8, meta)

    def writer(tmp):
        with open(tmp, 'wb') as f:
            f.write(payload)
    atomic_write(path, writer)


# -----------------------------------------------------------------------------
# images

def ink_bounds(u8, threshold=255, fringe=False):
    """(top, bottom, left, right), bottom and right exclusive, of the pixels of a uint8 (H, W) image
    (white = 255) darker than `threshold`; None for an image without such a pixel.
    fringe: also take in the fainter non-white pixels within 1 px of that ink (the antialiased edge of
    the glyphs), so that faint specks elsewhere do not grow the box while a clean render's box is that
    of all its non-white pixels."""
    ink = u8 < threshold
    rows = np.flatnonzero(ink.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(ink.any(axis=0))
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    if fringe:
        top, left = max(top - 1, 0), max(left - 1, 0)
        bottom, right = min(bottom + 1, u8.shape[0]), min(right + 1, u8.shape[1])
        window = u8[top:bottom, left:right] < 255          # holds the ink, so it is never empty
        rows, cols = np.flatnonzero(window.any(axis=1)), np.flatnonzero(window.any(axis=0))
        top, bottom = top + int(rows[0]), top + int(rows[-1]) + 1
        left, right = left + int(cols[0]), left + int(cols[-1]) + 1
    return top, bottom, left, right


def crop_to_ink(u8, pad=0, threshold=255, fringe=False):
    """The box of ink_bounds(u8, threshold, fringe) with `pad` px of white (255) around it, as a new
    uint8 array at the same resolution; None for an image without ink. threshold 255 counts every
    non-white pixel as ink."""
    box = ink_bounds(u8, threshold, fringe)
    if box is None:
        return None
    top, bottom, left, right = box
    return np.pad(u8[top:bottom, left:right], pad, mode='constant', constant_values=255)


# -----------------------------------------------------------------------------
# processes

def n_workers(workers=None, n_tasks=None):
    """How many worker processes a pool gets: `workers` when given (at least 1), else the CPU cores
    this process may run on (its affinity mask; os.cpu_count where there is none); 1 inside a pool's
    own worker (a daemon process cannot start a pool); never more than n_tasks when that is given."""
    if workers is None:
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:
            n = os.cpu_count() or 1
    else:
        n = int(workers)
    if multiprocessing.current_process().daemon:
        n = 1
    if n_tasks is not None:
        n = min(n, n_tasks)
    return max(1, n)


@contextlib.contextmanager
def process_pool(n, use=True):
    """A multiprocessing pool of n processes for the block (closed and joined afterwards), or None
    when n <= 1 or not `use` (too little work to pay for starting processes)."""
    pool = multiprocessing.Pool(n) if n > 1 and use else None
    try:
        yield pool
    finally:
        if pool is not None:
            pool.close()
            pool.join()


def imap_progress(pool, n, fn, tasks, desc, quiet=False):
    """Yield fn(task) for every task in order, in `pool` (of n processes) when given, else here, with a
    progress bar that goes away when done. fn must be a top-level function when a pool is used."""
    chunk = max(1, min(32, len(tasks) // (8 * n)))  # ~8 chunks per worker: balanced, little overhead
    it = pool.imap(fn, tasks, chunksize=chunk) if pool is not None else map(fn, tasks)
    yield from tqdm(it, total=len(tasks), desc=desc, disable=quiet or not tasks, leave=False, dynamic_ncols=True)
