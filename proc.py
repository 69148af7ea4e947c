"""Image preprocessing.

1. kmeans_for_img_size: cluster the image sizes (H, W) of a folder into at most 32 sizes with k-means
   and resize every image to its cluster's size, so that a size-bucketed batch sampler can put any
   images of one cluster in one batch without padding. Incremental (a cache records what was written)
   and resumable (every output is written atomically).
2. deng_process: the im2latex-100k image processing of Deng et al., "Image-to-Markup Generation with
   Coarse-to-Fine Attention", ICML 2017 (im2markup scripts/preprocessing/preprocess_images.py):
   crop to ink, pad 8 px, paste top-left into the smallest of 21 buckets, downsample x2.
3. import_im2latex: convert the public im2latex-100k data (the release, raw or processed, or the
   im2markup repository's sample) into the data layout of README.md / docs/formats.md:
   <root_dir>/images/ and <root_dir>/labels/{train,val,test}.txt, labels normalized (normalize_formula).

    python3 proc.py                                   # re-cluster math + chemistry of data/demo
    python3 proc.py --root_dir D                      # ... of another root
    python3 proc.py --img_root DIR --out DIR2         # any folder
    python3 proc.py --import_im2latex SRC --root_dir D
"""
import argparse
import json
import multiprocessing
import os
import re
import shutil
import sys
import textwrap
import time
from collections import Counter
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from data import DEFAULT_ROOT, IMAGE_EXTENSIONS, ImageError, Problems, atomic_write, load_gray
from utils import ink_bounds, n_workers, save_png, write_json, write_text

# -----------------------------------------------------------------------------
# defaults

N_CLUSTERS = 32            # k of the size k-means
SEED = 0                   # k-means random_state
KMEANS_N_INIT = 10         # k-means restarts (fixed, so results do not depend on sklearn's default)
CACHE_NAME = '.kmeans.json'  # per output folder: source size + mtime + target size of every image
CACHE_VERSION = 1
# PIL's Lanczos (a=3) resamples each axis with a support scaled to the zoom factor: when shrinking it
# averages over the source pixels (antialiased, thin strokes are kept as gray rather than dropped as
# with nearest/bilinear); when enlarging it interpolates sharper than bicubic. Overshoot at stroke
# edges is clipped to 0..255. Deng's script uses Lanczos for the x2 downsample as well.
RESAMPLE = Image.Resampling.LANCZOS
RESIZE_METHOD = 'L-lanczos-png-1'  # stored in the cache; a different method rewrites every output
FLUSH_SECONDS = 5.0        # write the cache at least this often while resizing (resume point)

# Deng's 21 buckets, (W, H) before the x2 downsample, in the order of his preprocess script.
DENG_BUCKETS_WH = [(240, 100), (320, 80), (400, 80), (400, 100), (480, 80), (480, 100), (560, 80),
                   (560, 100), (640, 80), (640, 100), (720, 80), (720, 100), (720, 120), (720, 200),
                   (800, 100), (800, 320), (1000, 200), (1000, 400), (1200, 200), (1600, 200),
                   (1600, 1600)]
DENG_PAD = 8
DENG_DOWNSAMPLE = 2
INK_THRESHOLD = 240        # deng_process: a pixel darker than this is ink (white = 255)

SPLIT_FILES = (('train', 'train'), ('validate', 'val'), ('test', 'test'))  # release name -> ours


# -----------------------------------------------------------------------------
# small helpers

def _pmap(fn, tasks, workers, desc):
    """Yield fn(task) for every task (in any order), over a process pool when workers > 1, with a
    tqdm bar. fn must be a top-level function and must not raise for bad input (return the error)."""
    if not tasks:
        return
    n = n_workers(workers, len(tasks))
    if n <= 1 or len(tasks) < 4:
        for t in tqdm(tasks, desc=desc, unit='img', dynamic_ncols=True):
            yield fn(t)
        return
    chunk = max(1, min(32, len(tasks) // (n * 8)))
    with multiprocessing.get_context().Pool(n) as pool:  # pool before bar: fork without tqdm's thread
        with tqdm(total=len(tasks), desc=desc, unit='img', dynamic_ncols=True) as bar:
            for r in pool.imap_unordered(fn, tasks, chunksize=chunk):
                bar.update()
                yield r


def _resize(u8, hw):
    """uint8 (H, W) -> uint8 hw = (H', W') with RESAMPLE."""
    if u8.shape == tuple(hw):
        return u8
    return np.asarray(Image.fromarray(u8).resize((int(hw[1]), int(hw[0])), RESAMPLE))


def list_images(root, exclude=()):
    """Relative posix paths of the image files under root (recursive, sorted). Hidden files and
    folders (e.g. atomic_write's '.name.XXXX.tmp' leftovers) and the folders in exclude are skipped."""
    root = os.path.abspath(root)
    exclude = {os.path.abspath(e) for e in exclude}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith('.') and os.path.join(dirpath, d) not in exclude)
        for f in filenames:
            if not f.startswith('.') and f.lower().endswith(IMAGE_EXTENSIONS):
                out.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, '/'))
    return sorted(out)


_STRAY_TEMP = re.compile(r'\..+\.[A-Za-z0-9_]{8}\.tmp')  # atomic_write's mkstemp names: .<name>.<8 random>.tmp


def _remove_stray_temps(folder):
    """Remove atomic_write leftovers ('.<name>.<8 random chars>.tmp') of an interrupted run under folder."""
    n = 0
    for dirpath, _, filenames in os.walk(folder):
        for f in filenames:
            if _STRAY_TEMP.fullmatch(f):
                os.remove(os.path.join(dirpath, f))
                n += 1
    return n


# -----------------------------------------------------------------------------
# k-means over image sizes

def cluster_sizes(hw, n_clusters=N_CLUSTERS, seed=SEED):
    """hw: int array (N, 2) of (H, W). Returns (centres, labels): centres int (K, 2) sorted (H, W) with
    K = min(n_clusters, distinct sizes), labels (N,) the centre index of each size.

    Feature space: (log H, log W). Squared distances there are squared *relative* changes of height
    and width, so a 20x60 image and a 200x600 image count the same error for the same relative
    distortion (in pixels, large images would dominate and small ones be squeezed hard), and the
    aspect-ratio change log(W'/H') - log(W/H) is a difference of the two coordinates, so it is small
    when both are. Each centre is the geometric mean of its sizes, rounded to integer pixels.
    k-means runs on the distinct sizes weighted by their counts (same optimum, much faster).

    Worked example: sizes 40x120 (x3), 41x118, 80x300, k=2 -> one centre near 40x120 (the two close
    sizes), one at 80x300; with k >= 3 every distinct size is its own centre (no distortion).
    """
    hw = np.asarray(hw, dtype=np.int64).reshape(-1, 2)
    distinct, inverse, counts = np.unique(hw, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    if len(distinct) <= n_clusters:  # nothing to merge: every distinct size is a cluster
        return distinct, inverse
    from sklearn.cluster import KMeans  # lazy: importing proc (render.py does) stays fast
    x = np.log(distinct.astype(np.float64))  # (D, 2) features (log H, log W)
    km = KMeans(n_clusters=n_clusters, n_init=KMEANS_N_INIT, random_state=seed).fit(x, sample_weight=counts)
    centres = np.maximum(1, np.rint(np.exp(km.cluster_centers_))).astype(np.int64)  # (K, 2)
    order = np.lexsort((centres[:, 1], centres[:, 0]))  # stable ids: sorted by (H, W)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return centres[order], rank[km.labels_][inverse]


def _aspect_change(src_hw, dst_hw):
    """Relative change of the aspect ratio W/H, |(W'/H') / (W/H) - 1|, per row of (N, 2) arrays."""
    src = np.asarray(src_hw, dtype=np.float64)
    dst = np.asarray(dst_hw, dtype=np.float64)
    return np.abs((dst[:, 1] / dst[:, 0]) / (src[:, 1] / src[:, 0]) - 1.0)


def _load_cache(path):
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding='utf-8') as f:
            cache = json.load(f)
        if cache.get('version') != CACHE_VERSION or not isinstance(cache.get('images'), dict):
            raise ValueError(f'unknown format (version {cache.get("version")!r})')
        return cache
    except (OSError, ValueError) as e:
        print(f'{path}: ignoring the cache ({e}); every image is read and written again', file=sys.stderr)
        return {}


def _write_cache(path, img_root, n_clusters, seed, entries):
    cache = {'version': CACHE_VERSION, 'method': RESIZE_METHOD, 'img_root': os.path.abspath(img_root),
             'n_clusters': n_clusters, 'seed': seed, 'images': entries}
    write_json(path, cache, indent=None)


def _read_size_task(task):
    """Worker: (rel, path) -> (rel, path, mtime_ns, bytes, (H, W) or None, error or None).
    Decodes the whole image so a truncated file is found here, before it takes part in clustering."""
    rel, path = task
    try:
        st = os.stat(path)  # before reading: a later edit shows up as a new mtime next run
        shape = load_gray(path).shape
        return rel, path, st.st_mtime_ns, st.st_size, shape, None
    except ImageError as e:
        return rel, path, None, None, None, e.reason
    except OSError as e:
        return rel, path, None, None, None, str(e)


def _resize_task(task):
    """Worker: (rel, src, dst, (H, W)) -> (rel, error or None)."""
    rel, src, dst, hw = task
    try:
        save_png(_resize(load_gray(src), hw), dst)
        return rel, None
    except ImageError as e:
        return rel, e.reason


def _output_names(img_root, out_root, problems):
    """{relative source path: relative output path (stem + '.png')} of the images under img_root; a
    source whose output name another one already has is reported and left out."""
    out_of, owner = {}, {}
    for rel in list_images(img_root, exclude=[out_root]):
        out_rel = os.path.splitext(rel)[0] + '.png'
        if out_rel in owner:
            problems.report(os.path.join(img_root, rel), None, 'name collision',
                            f'same output name {out_rel} as {owner[out_rel]}: skipped (rename one of them)')
            continue
        owner[out_rel] = rel
        out_of[rel] = out_rel
    return out_of


def _source_sizes(img_root, out_of, cached, workers, problems):
    """{rel: cache entry} with the source size of every readable image: from the cache when its mtime
    and byte size match, else decoded (in parallel). Missing and corrupt images are reported."""
    entries, todo = {}, []
    for rel, out_rel in out_of.items():
        path = os.path.join(img_root, rel)
        e = cached.get(rel)
        e = e if isinstance(e, dict) and isinstance(e.get('src'), list) and len(e['src']) == 2 else None
        try:
            st = os.stat(path)
        except OSError as err:
            problems.report(path, None, 'missing image', f'cannot stat ({err})')
            continue
        if e and e.get('mtime_ns') == st.st_mtime_ns and e.get('bytes') == st.st_size and e.get('out') == out_rel:
            entries[rel] = {'src': list(e['src']), 'mtime_ns': st.st_mtime_ns, 'bytes': st.st_size,
                            'out': out_rel, 'target': e.get('target')}
        else:
            todo.append((rel, path))
    bad = []  # reported after the progress bar is closed, so messages and bar do not interleave
    for rel, path, mtime_ns, nbytes, shape, err in _pmap(_read_size_task, todo, workers, 'reading sizes'):
        if err:
            bad.append((path, err))
            continue
        entries[rel] = {'src': list(shape), 'mtime_ns': mtime_ns, 'bytes': nbytes, 'out': out_of[rel],
                        'target': None}  # None: no up-to-date output yet
    for path, err in sorted(bad):
        problems.report(path, None, 'corrupt image', f'{err}: skipped')
    return entries


def _cluster_entries(entries, n_clusters, seed):
    """The clustering part of kmeans_for_img_size's result for the sizes in entries."""
    names = sorted(entries)
    result = {'sizes': {}, 'centres': [], 'counts': [], 'distinct': 0, 'aspect_mean': 0.0,
              'aspect_max': 0.0, 'images': len(names)}
    if names:
        src = np.array([entries[n]['src'] for n in names], dtype=np.int64)  # (N, 2)
        centres, labels = cluster_sizes(src, n_clusters, seed)
        dst = centres[labels]  # (N, 2) target size of every image
        change = _aspect_change(src, dst)
        used = np.unique(dst, axis=0)
        result.update(
            sizes={n: (int(h), int(w)) for n, (h, w) in zip(names, dst)},
            centres=[(int(h), int(w)) for h, w in used],
            counts=[int(np.sum(np.all(dst == c, axis=1))) for c in used],
            distinct=len(used), aspect_mean=float(change.mean()), aspect_max=float(change.max()))
    return result


def _remove_gone_outputs(out_root, old_images, entries):
    """Remove the outputs written earlier (per the cache) for sources that are gone or now bad. -> count."""
    current_outs = {e['out'] for e in entries.values()}
    removed = 0
    for rel, e in old_images.items():
        out_rel = e.get('out') if isinstance(e, dict) else None
        if rel not in entries and out_rel and out_rel not in current_outs:
            p = os.path.join(out_root, out_rel)
            if os.path.isfile(p):
                os.remove(p)
                removed += 1
    return removed


def _resize_outputs(img_root, out_root, entries, result, caching, workers, save_cache, problems):
    """Write the resized copy of every image whose output is missing or out of date; the cache is
    saved now and then (save_cache()), and also on Ctrl-C, so a re-run resumes. Updates entries and
    result ('written', 'unchanged', 'removed', 'sizes')."""
    tasks = []
    for rel in sorted(entries):
        e, target = entries[rel], list(result['sizes'][rel])
        out_path = os.path.join(out_root, e['out'])
        if caching and e['target'] == target and os.path.isfile(out_path):
            result['unchanged'] += 1
        else:
            tasks.append((rel, os.path.join(img_root, rel), out_path, tuple(target)))
    save_cache()  # sizes survive an interruption
    last_flush, bad = time.time(), []
    try:
        for rel, err in _pmap(_resize_task, tasks, workers, f'resizing {os.path.basename(img_root)}'):
            if err:
                bad.append((os.path.join(img_root, rel), err))
                stale = os.path.join(out_root, entries.pop(rel)['out'])
                if os.path.isfile(stale):  # an output of an earlier version of this source
                    os.remove(stale)
                    result['removed'] += 1
                result['sizes'].pop(rel, None)
                continue
            entries[rel]['target'] = list(result['sizes'][rel])
            result['written'] += 1
            if time.time() - last_flush > FLUSH_SECONDS:
                save_cache()
                last_flush = time.time()
    finally:  # also on Ctrl-C: what was written is recorded
        save_cache()
    for path, err in sorted(bad):
        problems.report(path, None, 'corrupt image', f'{err}: skipped')


def kmeans_for_img_size(img_root, caching=True, resize=True, n_clusters=N_CLUSTERS, out_root=None,
                        seed=SEED, workers=None, problems=None):
    """Cluster the sizes of every image under img_root into min(n_clusters, distinct sizes) sizes
    (see cluster_sizes) and write each image, resized to its cluster's size, as a grayscale PNG under
    out_root (default img_root + '_resized'; same relative path, file stem + '.png').

    caching: read <out_root>/.kmeans.json and skip what is up to date (same source mtime and byte
    size, same target size, output present); False reads and rewrites everything (the cache is still
    written afterwards). The cache is written while resizing, so an interrupted run resumes.
    Outputs of sources that disappeared (or turned corrupt) are removed, using the cache's record of
    what this function wrote; nothing else in out_root is touched, img_root never.
    resize=False: cluster and report only; nothing is written.
    Corrupt images are reported to problems ('corrupt image'), skipped and counted.

    Returns {'sizes': {rel: (H, W) target}, 'centres': [(H, W), ...], 'counts': [n per centre],
    'distinct': int, 'aspect_mean': float, 'aspect_max': float, 'images': int, 'written': int,
    'unchanged': int, 'removed': int, 'skipped': int, 'img_root': str, 'out_root': str, 'resize': bool,
    'seconds': float}.
    """
    t0 = time.time()
    problems = Problems() if problems is None else problems
    img_root = os.path.normpath(os.fspath(img_root))
    if not os.path.isdir(img_root):
        raise FileNotFoundError(f'{img_root}: no such folder')
    out_root = os.path.normpath(os.fspath(out_root)) if out_root else img_root + '_resized'
    if os.path.abspath(out_root) == os.path.abspath(img_root):
        raise ValueError(f'{out_root}: the output folder must differ from the input folder '
                         '(originals are never overwritten)')
    skipped_before = len(problems)
    cache_path = os.path.join(out_root, CACHE_NAME)
    old = _load_cache(cache_path)
    old_images = old.get('images', {})
    cached = old_images if caching and old.get('method') == RESIZE_METHOD else {}

    out_of = _output_names(img_root, out_root, problems)
    entries = _source_sizes(img_root, out_of, cached, workers, problems)
    result = _cluster_entries(entries, n_clusters, seed)
    result.update(written=0, unchanged=0, removed=0, skipped=0, img_root=img_root, out_root=out_root,
                  resize=bool(resize))
    if resize:
        os.makedirs(out_root, exist_ok=True)
        _remove_stray_temps(out_root)
        result['removed'] += _remove_gone_outputs(out_root, old_images, entries)
        _resize_outputs(img_root, out_root, entries, result, caching, workers,
                        lambda: _write_cache(cache_path, img_root, n_clusters, seed, entries), problems)
    result['skipped'] = len(problems) - skipped_before
    result['seconds'] = time.time() - t0
    return result


def format_report(r):
    """Human-readable summary of a kmeans_for_img_size result (a few lines)."""
    sizes = ', '.join(f'{h}x{w} ({n})' for (h, w), n in zip(r['centres'], r['counts']))
    lines = [f'{r["img_root"]}: {r["images"]} images -> {r["distinct"]} distinct sizes (H x W, images):',
             textwrap.fill(sizes, width=100, initial_indent='  ', subsequent_indent='  ') if sizes else '  (none)',
             f'  aspect-ratio change: mean {r["aspect_mean"]:.2%}, max {r["aspect_max"]:.2%}',
             f'  {r["out_root"]}: {r["written"]} written, {r["unchanged"]} unchanged, '
             f'{r["removed"]} stale removed, {r["skipped"]} skipped ({r["seconds"]:.1f} s)'
             if r.get('resize', True) else
             f'  clustered only (nothing written), {r["skipped"]} skipped ({r["seconds"]:.1f} s)']
    return '\n'.join(lines)


# -----------------------------------------------------------------------------
# Deng et al. processing of a full-page render

def _pick_bucket(h, w, buckets_wh):
    """Smallest bucket (by area; ties in the given order) that holds h x w, as (H, W); None if none."""
    for i in sorted(range(len(buckets_wh)), key=lambda i: (buckets_wh[i][0] * buckets_wh[i][1], i)):
        bw, bh = buckets_wh[i]
        if w <= bw and h <= bh:
            return bh, bw
    return None


def deng_process(page, pad=DENG_PAD, buckets_wh=DENG_BUCKETS_WH, downsample=DENG_DOWNSAMPLE,
                 threshold=INK_THRESHOLD):
    """Deng et al. 2017 (im2markup preprocess_images.py) on a page, uint8 (H, W) white = 255:
    crop to the ink, pad `pad` px of white on every side, paste top-left into the smallest bucket
    that holds it (if none does, shrink the crop to fit the largest bucket), downsample by
    `downsample` with Lanczos. Returns uint8 (H', W'), or None for a blank page. Pure and fast.

    Ink = pixels darker than `threshold`, plus the fainter non-white pixels within 1 px of it (the
    antialiased fringe of the glyphs), so faint specks elsewhere on the page do not grow the crop
    while a clean render crops exactly as Deng's (`!= 255`).

    Worked example: ink 100 wide x 30 high -> padded 116 x 46 -> bucket 240x100 (W x H), ink at
    (8, 8) -> downsampled x2 -> array of shape (50, 120) with the ink at (4, 4).
    """
    page = np.asarray(page)
    if page.ndim != 2 or page.dtype != np.uint8:
        raise ValueError(f'deng_process needs a uint8 (H, W) page, got {page.dtype} {page.shape}')
    box = ink_bounds(page, threshold, fringe=True)
    if box is None:
        return None
    top, bottom, left, right = box
    crop = page[top:bottom, left:right]  # (h, w)
    h, w = crop.shape
    bucket = _pick_bucket(h + 2 * pad, w + 2 * pad, buckets_wh)
    if bucket is None:  # Deng leaves such pages unbucketed; we shrink them into the largest bucket
        bw, bh = max(buckets_wh, key=lambda b: b[0] * b[1])
        s = min((bw - 2 * pad) / w, (bh - 2 * pad) / h)
        crop = _resize(crop, (max(1, int(h * s)), max(1, int(w * s))))
        h, w = crop.shape
        bucket = (bh, bw)
    bh, bw = bucket
    canvas = np.full((bh, bw), 255, dtype=np.uint8)  # (H, W) of the bucket
    canvas[pad:pad + h, pad:pad + w] = crop
    if downsample != 1:  # Deng: int(size / ratio), Lanczos
        canvas = _resize(canvas, (int(bh / downsample), int(bw / downsample)))
    return canvas


# -----------------------------------------------------------------------------
# import of the public im2latex-100k data (the release's two variants and the im2markup sample)

class Layout(NamedTuple):
    """Where one publication of im2latex-100k keeps its files (names relative to the source folder)."""
    name: str            # shown in messages
    formulas: str        # one formula per line
    lists: str           # split lists, '{split}' is train / validate / test
    image_dirs: tuple    # the first one that exists holds the images
    variant: str         # 'raw': full-page renders (Deng's processing); 'processed': cropped and bucketed


LAYOUTS = (  # tried in this order; processed before raw when both are there
    Layout('processed im2latex-100k release', 'im2latex_formulas.norm.lst', 'im2latex_{split}_filter.lst',
           ('formula_images_processed', 'images'), 'processed'),
    Layout('raw im2latex-100k release', 'im2latex_formulas.lst', 'im2latex_{split}.lst',
           ('formula_images', 'images'), 'raw'),
    Layout('processed im2markup sample', 'formulas.norm.lst', '{split}_filter.lst',
           ('images_processed',), 'processed'),
    Layout('im2markup sample', 'formulas.lst', '{split}.lst', ('images', 'formula_images'), 'raw'),
)


def _looked_for(layout):
    lists = layout.lists.format(split='{' + ','.join(s for s, _ in SPLIT_FILES) + '}')
    return f'{layout.formulas} + {lists}, images in {" or ".join(d + "/" for d in layout.image_dirs)}'


def detect_layout(src, variant='auto'):
    """The first of LAYOUTS (of that variant unless 'auto') whose formulas file and at least one split
    list are in src. Raises FileNotFoundError listing every file name looked for, and what src holds."""
    candidates = [lay for lay in LAYOUTS if variant in ('auto', lay.variant)]
    for lay in candidates:
        if os.path.isfile(os.path.join(src, lay.formulas)) and any(
                os.path.isfile(os.path.join(src, lay.lists.format(split=s))) for s, _ in SPLIT_FILES):
            return lay
    found = sorted(f for f in os.listdir(src) if f.endswith('.lst') or os.path.isdir(os.path.join(src, f)))
    holds = ', '.join(found[:12]) + (' ...' if len(found) > 12 else '') if found else 'no .lst file or folder'
    looked = '\n'.join(f'  {lay.name}: {_looked_for(lay)}' for lay in candidates)
    raise FileNotFoundError(
        f'{src}: not an im2latex-100k release or im2markup sample{"" if variant == "auto" else f" ({variant})"}. '
        f'Looked in {src} for:\n{looked}\nIt holds: {holds}')


# Label normalization: what the image cannot show is taken out of the labels. TeX tokens are scanned
# (so `\%` and `\\label` are not mistaken for a comment or the command).
_TEX_TOKEN = re.compile(r'\\(?:[A-Za-z]+|.|\Z)|.', re.DOTALL)
_LINE_END = re.compile(r'[\r\n]')          # TeX ends a line (and a comment) at either
INVISIBLE_COMMANDS = ('\\nonumber', '\\notag')   # no ink: dropped
LABEL_COMMAND = '\\label'                        # no ink: dropped with its argument
NOTHING_VISIBLE = 'nothing visible'              # normalize_formula's reason for an emptied formula


def _strip_comments(s):
    """'a % note\\rb' -> 'a  b': an unescaped % and the rest of its line (up to '\\r' or '\\n') become
    one space. -> (text, whether a comment was found)."""
    out, pos, found = [], 0, False
    while pos < len(s):
        m = _TEX_TOKEN.match(s, pos)
        if m.group() == '%':
            end = _LINE_END.search(s, pos)
            pos, found = (end.end() if end else len(s)), True
            out.append(' ')
        else:
            out.append(m.group())
            pos = m.end()
    return ''.join(out), found


def _argument_end(s, pos):
    """End of the macro argument at s[pos:] (white space skipped): a {...} group with balanced braces
    or one token. None if there is none or the group is not closed."""
    while pos < len(s) and s[pos].isspace():
        pos += 1
    depth = 0
    while pos < len(s):
        m = _TEX_TOKEN.match(s, pos)
        pos = m.end()
        depth += (m.group() == '{') - (m.group() == '}')
        if depth <= 0:
            return pos if depth == 0 else None
    return None


def _strip_commands(s):
    """Drop \\label with its argument, \\nonumber and \\notag. -> (text, names removed, error or None)."""
    out, removed, pos = [], [], 0
    while pos < len(s):
        m = _TEX_TOKEN.match(s, pos)
        tok, pos = m.group(), m.end()
        if tok in INVISIBLE_COMMANDS:
            removed.append(tok)
            out.append(' ')
        elif tok == LABEL_COMMAND:
            end = _argument_end(s, pos)
            if end is None:
                return s, removed, 'unclosed \\label argument'
            removed.append(tok)
            out.append(' ')
            pos = end
        else:
            out.append(tok)
    return ''.join(out), removed, None


def _strip_trailing_breaks(s):
    """'a \\\\ b \\\\' -> 'a \\\\ b ': a line break after the last line draws nothing. -> (text, count)."""
    spans = [m.span() for m in _TEX_TOKEN.finditer(s) if not m.group().isspace()]
    n = 0
    while spans and s[spans[-1][0]:spans[-1][1]] == '\\\\':
        s = s[:spans.pop()[0]]
        n += 1
    return s, n


def normalize_formula(raw):
    """A formula as published -> (label, what was removed), removing what draws no ink:
    'leading %' (%s that start the formula are no comment: the published images show what follows them),
    '% comment' (any other unescaped % to the end of its line, which '\\r' also ends; `\\%` is a
    percent sign and stays), '\\label' (with its argument), '\\nonumber', '\\notag', 'trailing \\\\'
    (a line break after the last line). White space is collapsed (clean_formula). \\tag, \\eqno and
    spacing commands stay: they change the image. The label is '' when nothing visible is left
    (removed then ends with NOTHING_VISIBLE) or a \\label argument is not closed (removed ends with
    that reason).

    Example: 'E=mc^2 \\label{eq:1} % Einstein' -> ('E=mc^2', ['% comment', '\\label'])."""
    removed, s = [], raw.strip()
    if s.startswith('%'):  # the published images show what follows a leading run of % (the sample's line 767)
        s = s.lstrip('%')
        removed.append('leading %')
    if '%' in s:
        s, found = _strip_comments(s)
        removed += ['% comment'] if found else []
    s = clean_formula(s)
    if LABEL_COMMAND in s or any(c in s for c in INVISIBLE_COMMANDS):
        s, names, err = _strip_commands(s)
        if err:
            return '', removed + [err]
        removed += names
    if s.endswith('\\\\'):
        s, n = _strip_trailing_breaks(s)
        removed += ['trailing \\\\'] * n
    s = clean_formula(s)
    if removed and not s:
        removed.append(NOTHING_VISIBLE)
    return s, removed


def normalize_formulas(raws, path, n_examples=5):
    """normalize_formula over a formulas file's lines -> (labels, report). report: formulas, changed
    (something removed, label kept), dropped (nothing visible left), removed {what: formulas},
    examples [{'line', 'before', 'after'}] of changed and dropped ones ('after' '' when dropped)."""
    labels, removed_count = [], Counter()
    changed = dropped = 0
    examples, dropped_examples = [], []
    for i, raw in enumerate(raws):
        label, removed = normalize_formula(raw)
        labels.append(label)
        if not removed:
            continue
        removed_count.update(set(removed))
        if label:
            changed += 1
            target = examples
        else:
            dropped += 1
            target = dropped_examples
        if len(target) < n_examples:
            target.append({'line': i + 1, 'before': clean_formula(raw), 'after': label})
    return labels, {'file': path, 'formulas': len(raws), 'changed': changed, 'dropped': dropped,
                    'removed': dict(removed_count.most_common()), 'examples': examples + dropped_examples}


def format_normalization(report):
    """The import's normalization report as a few printable lines."""
    what = ', '.join(f'{k} {n}' for k, n in report['removed'].items()) or 'nothing'
    lines = [f'normalized {report["formulas"]} formulas of {report["file"]}: {report["changed"]} changed, '
             f'{report["dropped"]} dropped (formulas with: {what})']
    for e in report['examples']:
        lines.append(f'  {report["file"]}:{e["line"]}: {_short(e["before"])}\n'
                     f'    -> {_short(e["after"]) if e["after"] else "(dropped)"}')
    return '\n'.join(lines)


def _short(s, n=100):
    return s if len(s) <= n else s[:n - 3] + '...'


def clean_formula(s):
    """Every run of white space (including '\\r', tabs, Unicode spaces) -> one space, ends stripped;
    a trailing control space ('\\ ') is kept."""
    s = re.sub(r'\s+', ' ', s.lstrip('\ufeff')).lstrip()
    if s.endswith(' '):
        body = s[:-1]
        backslashes = len(body) - len(body.rstrip('\\'))
        s = s if backslashes % 2 == 1 else body
    return s


def read_formulas(path, problems):
    """A formulas file: one formula per b'\\n'-separated line, returned as published ('\\r' inside a
    formula kept: it ends a TeX comment). UTF-8, falling back to Latin-1 for a line that is not
    (reported with file and line, still used)."""
    with open(path, 'rb') as f:
        lines = f.read().split(b'\n')
    if lines and lines[-1] == b'':
        lines.pop()
    out = []
    for i, b in enumerate(lines):
        try:
            s = b.decode('utf-8')
        except UnicodeDecodeError as e:
            s = b.decode('latin-1')
            problems.report(path, i + 1, 'not utf-8', f'not UTF-8 (byte {e.start}: {e.reason}); read as Latin-1')
        out.append(s)
    return out


def _parse_list_line(fields, variant):
    """Fields of one split-list line -> (image file name, formula index); raises ValueError.
    3 fields: 'formula_idx image_name render_type'. 2 fields: the one ending in .png is the image,
    else the layout's order ('formula_idx image_name' raw, 'image_name formula_idx' processed).
    A name without an extension gets '.png'."""
    if len(fields) == 3:
        idx, name = fields[0], fields[1]
    elif len(fields) == 2:
        png = [f.lower().endswith('.png') for f in fields]
        name_first = png[0] if png[0] != png[1] else variant == 'processed'
        name, idx = fields if name_first else fields[::-1]
    else:
        raise ValueError
    name = name if name.lower().endswith(IMAGE_EXTENSIONS) else name + '.png'
    return name, int(idx)


def _read_list(path, variant, problems):
    """A split list -> [(line number, image file name, formula index)]; bad lines are reported and skipped."""
    expected = "'formula_idx image_name [render_type]' or 'image_name.png formula_idx'"
    with open(path, 'rb') as f:
        lines = f.read().split(b'\n')
    out = []
    for i, b in enumerate(lines, 1):
        try:
            fields = b.decode('utf-8').split()
        except UnicodeDecodeError:
            problems.report(path, i, 'bad line', f'not UTF-8, expected {expected}: skipped')
            continue
        if not fields:
            continue
        try:
            name, idx = _parse_list_line(fields, variant)
        except ValueError:
            problems.report(path, i, 'bad line', f'expected {expected}, got {b[:80]!r}: skipped')
            continue
        if name != os.path.basename(name) or name.startswith('.'):
            problems.report(path, i, 'bad line', f'image name {name!r} is not a plain file name: skipped')
            continue
        out.append((i, name, idx))
    return out


def _import_task(task):
    """Worker: (name, src, dst, variant) -> (name, status, message); status 'ok', 'blank', 'corrupt'."""
    name, src, dst, variant = task
    try:
        if variant == 'raw':
            out = deng_process(load_gray(src))
            if out is None:
                return name, 'blank', 'blank page (no ink): skipped'
            save_png(out, dst)
        else:
            u8 = load_gray(src)  # validates the whole file
            if not (u8 < INK_THRESHOLD).any():
                return name, 'blank', 'blank image (no ink): skipped'
            with Image.open(src) as im:
                plain = im.format == 'PNG' and im.mode == 'L'
            if plain:
                atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
            else:  # e.g. the release's RGB PNGs: store grayscale like every image of the repo
                save_png(u8, dst)
        return name, 'ok', ''
    except ImageError as e:
        return name, 'corrupt', f'{e.reason}: skipped'


def _release_folders(src, root_dir, variant):
    """-> (layout, folder of the source's images, our images folder), after checking that they exist
    and that importing does not overwrite the source's own images."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f'{src}: no such folder')
    if variant not in ('auto', 'raw', 'processed'):
        raise ValueError(f'variant must be auto, raw or processed, not {variant!r}')
    layout = detect_layout(src, variant)
    image_dirs = [os.path.join(src, d) for d in layout.image_dirs if os.path.isdir(os.path.join(src, d))]
    if not image_dirs:
        raise FileNotFoundError(f'{src}: no image folder ({" or ".join(layout.image_dirs)}) for the '
                                f'{layout.name} ({layout.formulas} was found)')
    img_dir, out_dir = image_dirs[0], os.path.join(root_dir, 'images')
    if layout.variant == 'raw' and os.path.realpath(img_dir) == os.path.realpath(out_dir):
        raise ValueError(f'{img_dir} would be overwritten by the processed images: choose another --root_dir')
    return layout, img_dir, out_dir


def _plan_import(src, layout, img_dir, out_dir, problems):
    """Read and normalize the formulas, read the split lists -> (samples {our split: [(name, label,
    original)]}, tasks of the images still to import, count of images already imported, normalization
    report). Bad lines, out-of-range indexes, empty formulas, formulas the normalization drops, duplicate
    names and missing images are reported and left out."""
    formulas_path = os.path.join(src, layout.formulas)
    raws = read_formulas(formulas_path, problems)
    labels, report = normalize_formulas(raws, formulas_path)
    samples, seen, tasks, existing = {}, {}, [], 0
    for theirs, ours in SPLIT_FILES:
        list_path = os.path.join(src, layout.lists.format(split=theirs))
        if not os.path.isfile(list_path):
            print(f'{list_path}: not found, no {ours} split', file=sys.stderr)
            continue
        samples[ours] = []
        for lineno, name, idx in _read_list(list_path, layout.variant, problems):
            why = _unusable(idx, raws, labels, name, seen, formulas_path)
            if why:
                problems.report(list_path, lineno, *why)
                continue
            seen[name] = f'{list_path}:{lineno}'
            src_img, dst_img = os.path.join(img_dir, name), os.path.join(out_dir, name)
            if os.path.isfile(dst_img):
                existing += 1
            elif not os.path.isfile(src_img):
                problems.report(list_path, lineno, 'missing image', f'image {src_img} not found: skipped')
                continue
            else:
                tasks.append((name, src_img, dst_img, layout.variant))
            samples[ours].append((name, labels[idx], raws[idx]))
    return samples, tasks, existing, report


def _unusable(idx, raws, labels, name, seen, formulas_path):
    """(kind, message) when a list line cannot be imported, else None."""
    if not 0 <= idx < len(raws):
        return ('formula index out of range',
                f'formula index {idx} not in 0..{len(raws) - 1} of {formulas_path}: skipped')
    where = f'formula {idx} ({formulas_path}:{idx + 1})'
    if not clean_formula(raws[idx]):
        return 'empty formula', f'{where} is empty: skipped'
    if not labels[idx]:
        reason = normalize_formula(raws[idx])[1][-1]
        shown = _short(clean_formula(raws[idx]), 60)
        return 'dropped by normalization', f'{where}: {reason} once normalized ({shown!r}): skipped'
    if name in seen:
        return 'duplicate image', f'{name} already used at {seen[name]}: skipped'
    return None


_LINE_BREAKING = re.compile(r'[\t\n\r\v\f\x1c-\x1e\x85\u2028\u2029]')   # would split or shift a label line


def _write_labels(root_dir, samples, failed):
    """labels/<split>.txt ('<image>\\t<label>') and, line for line, labels/<split>.orig.txt ('<image>\\t<formula
    as published>', characters that would break the line written as spaces). -> {split: samples}."""
    counts = {}
    for split, items in samples.items():
        kept = [(name, label, raw) for name, label, raw in items if name not in failed]
        counts[split] = len(kept)
        write_text(os.path.join(root_dir, 'labels', f'{split}.txt'),
                   ''.join(f'{name}\t{label}\n' for name, label, _ in kept))
        write_text(os.path.join(root_dir, 'labels', f'{split}.orig.txt'),
                   ''.join(f'{name}\t{_LINE_BREAKING.sub(" ", raw)}\n' for name, _, raw in kept))
    return counts


def import_im2latex(src, root_dir, workers=None, problems=None, variant='auto'):
    """Import the public im2latex-100k data in src into <root_dir>/images/ and
    <root_dir>/labels/{train,val,test}.txt (validate -> val; lines '<image>.png\\t<label>').

    Layouts (LAYOUTS, detect_layout): the release, raw (im2latex_formulas.lst,
    im2latex_{train,validate,test}.lst, full pages in formula_images/) or processed
    (im2latex_formulas.norm.lst, im2latex_{split}_filter.lst, formula_images_processed/), and the
    im2markup repository's sample (formulas.lst, {train,validate,test}.lst, full pages in images/;
    processed: formulas.norm.lst, {split}_filter.lst, images_processed/). Full pages go through
    deng_process; processed images are copied (grayscale PNG kept byte for byte, other modes converted).
    Every formula is normalized (normalize_formula: comments, \\label, \\nonumber, \\notag out); the
    published text is kept line for line in labels/<split>.orig.txt, and labels/import.json records
    the import with the normalization report. Missing images, bad lines, out-of-range formula indexes,
    empty formulas, formulas with nothing visible, duplicate names, corrupt images and blank pages are
    reported to problems and skipped. Images already in <root_dir>/images/ are not redone (resumable).

    Returns {'layout', 'variant', 'image_dir', 'splits': {split: n samples}, 'written', 'existing',
    'skipped', 'normalization', 'seconds'}.
    """
    t0 = time.time()
    problems = Problems() if problems is None else problems
    src, root_dir = os.fspath(src), os.fspath(root_dir)
    layout, img_dir, out_dir = _release_folders(src, root_dir, variant)
    skipped_before = len(problems)
    samples, tasks, existing, report = _plan_import(src, layout, img_dir, out_dir, problems)

    os.makedirs(out_dir, exist_ok=True)
    _remove_stray_temps(out_dir)
    failed, written = {}, 0
    for name, status, msg in _pmap(_import_task, tasks, workers, f'importing the {layout.name}'):
        if status == 'ok':
            written += 1
        else:
            failed[name] = (status, msg)
    for name, (status, msg) in sorted(failed.items()):  # after the progress bar
        problems.report(os.path.join(img_dir, name), None, 'blank page' if status == 'blank' else 'corrupt image', msg)

    counts = _write_labels(root_dir, samples, failed)
    result = {'layout': layout.name, 'variant': layout.variant, 'source': os.path.abspath(src),
              'image_dir': img_dir, 'splits': counts, 'written': written, 'existing': existing,
              'skipped': len(problems) - skipped_before, 'normalization': report, 'seconds': time.time() - t0}
    write_json(os.path.join(root_dir, 'labels', 'import.json'),
               dict(result, skipped_by_kind=dict(problems.counts), seconds=round(result['seconds'], 1)))
    return result


# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    p = argparse.ArgumentParser(
        description='Re-cluster image sizes with k-means and resize (default: the math and chemistry '
                    'sets of --root_dir), or import the public im2latex-100k data.')
    p.add_argument('--root_dir', default=DEFAULT_ROOT,
                   help='data root; without --img_root, <root_dir>/adaptation_data/{math,chemistry}_images '
                        'are clustered into *_images_resized; --import_im2latex writes here (default: %(default)s)')
    p.add_argument('--img_root', default=None, help='cluster and resize the images of this folder instead')
    p.add_argument('--out', default=None, help='output folder for --img_root (default: <img_root>_resized)')
    p.add_argument('--clusters', type=int, default=N_CLUSTERS,
                   help='number of k-means sizes, fewer if there are fewer distinct sizes (default: %(default)s)')
    p.add_argument('--no_cache', action='store_true',
                   help='ignore the cache (<out>/.kmeans.json): read every image and rewrite every output')
    p.add_argument('--no_resize', action='store_true', help='only cluster and report; write nothing')
    p.add_argument('--workers', type=int, default=None,
                   help='worker processes (default: every CPU core this process may use)')
    p.add_argument('--seed', type=int, default=SEED, help='k-means random seed (default: %(default)s)')
    p.add_argument('--import_im2latex', metavar='SRC', default=None,
                   help='import im2latex-100k from SRC into --root_dir: the release (im2latex_formulas.lst, '
                        'im2latex_{train,validate,test}.lst, formula_images/; or its processed variant) or the '
                        'im2markup sample (formulas.lst, {train,validate,test}.lst, images/). Labels are '
                        'normalized (comments, \\label, \\nonumber, \\notag removed) and the published text '
                        'kept in labels/<split>.orig.txt')
    p.add_argument('--variant', choices=('auto', 'raw', 'processed'), default='auto',
                   help='which variant --import_im2latex reads: raw (full pages) or processed (cropped and '
                        'bucketed); auto takes processed if present (default: %(default)s)')
    args = p.parse_args(argv)
    if args.clusters < 1:
        p.error('--clusters must be >= 1')
    if args.out and not args.img_root:
        p.error('--out needs --img_root')
    problems = Problems()

    if args.import_im2latex:
        try:
            r = import_im2latex(args.import_im2latex, args.root_dir, args.workers, problems, args.variant)
        except (FileNotFoundError, ValueError) as e:
            print(f'error: {e}', file=sys.stderr)
            return 2
        splits = ', '.join(f'{s} {n}' for s, n in r['splits'].items())
        print(format_normalization(r['normalization']))
        print(f'imported the {r["layout"]} into {args.root_dir}: {splits} samples; {r["written"]} images '
              f'written, {r["existing"]} already there ({r["seconds"]:.1f} s). Labels as published: '
              f'{os.path.join(args.root_dir, "labels", "<split>.orig.txt")}; record: '
              f'{os.path.join(args.root_dir, "labels", "import.json")}')
        if problems.summary():
            print(problems.summary())
        return 0

    if args.img_root:
        jobs = [(args.img_root, args.out)]
    else:
        jobs = []
        for domain in ('math', 'chemistry'):
            folder = os.path.join(args.root_dir, 'adaptation_data', f'{domain}_images')
            if os.path.isdir(folder):
                jobs.append((folder, None))
            else:
                print(f'{folder}: not found, no {domain} images to re-cluster. '
                      f'`python3 render.py --root_dir {args.root_dir}` makes the demo data there.', file=sys.stderr)
    if not jobs:
        return 1
    status = 0
    for img_root, out in jobs:
        try:
            r = kmeans_for_img_size(img_root, caching=not args.no_cache, resize=not args.no_resize,
                                    n_clusters=args.clusters, out_root=out, seed=args.seed,
                                    workers=args.workers, problems=problems)
        except (FileNotFoundError, ValueError) as e:
            print(f'error: {e}', file=sys.stderr)
            status = 2
            continue
        print(format_report(r))
    if problems.summary():
        print(problems.summary())
    return status


if __name__ == '__main__':
    sys.exit(main())
