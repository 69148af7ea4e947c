"""Evaluate an image-to-LaTeX checkpoint on a split with the field's metrics, or transcribe images.

    python3 test.py --test_on math --mean_teacher          # runs/math/best.pt on math/test
    python3 test.py --test_on openai --beam 5 --render_eval --report worst.html
    python3 test.py --weights runs/openai/best.pt --image a.png b.jpg scans/
    python3 test.py --score runs/math/predictions_math_test.tsv   # re-score a predictions file
    python3 test.py --test_on openai --exclude_overlap      # only test formulas that are not in train

Evaluation writes to <out_dir>/<test_on>/ (Deng et al. 2017 column order, so im2markup's scripts
can re-score the predictions):
    predictions_<domain>_<split>.tsv    image \\t gold \\t pred \\t score_pred \\t score_gold
    metrics_<domain>_<split>.json       the metrics, the checkpoint, how it was decoded, timing, and how
                                        many formulas also occur in train (overlap_with_train)
The TSV has no header; gold and pred are space-joined tokens; the scores are the model's summed
log-probabilities of its prediction and of the gold (<eos> included; nan if the gold is longer than
the model's positions), so score_gold > score_pred flags a search error.

Metrics (metrics.py; definitions in docs/formats.md), on token sequences:
    BLEU-4               corpus BLEU of the space-joined tokens, == multi-bleu.perl (0-100)
    edit accuracy        1 - sum lev(g, p) / sum max(len g, len p)       (Deng et al. 2017)
    norm. edit distance  mean of lev(g, p) / max(len g, len p)          (pix2tex)
    exact match          share of samples whose token sequences are equal
    image match          (--render_eval) Deng's image exact match and column edit accuracy, rendered with
                         pdflatex when installed (--renderer), else mathtext
    token errors         (--errors) the most common substitutions, missed and inserted tokens, and the
                         share of gold tokens recovered by how often each occurs in train

Under `torchrun --nproc_per_node N test.py ...` each process decodes its share of the split (the shares
may differ in size) and rank 0 gathers them, prints and writes the files; --image runs on rank 0 alone.

Transcription (--image) prints `path<TAB>latex` per image to stdout, in input order; an image that
cannot be read prints `path<TAB>ERROR: reason` in its place (a model output is space-joined tokens,
so it never starts with 'ERROR:'), and the exit code is 1 if any image failed.
"""
import argparse
import base64
import collections
import concurrent.futures
import datetime
import difflib
import functools
import html
import math
import os
import platform
import re
import sys
import time
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

import data
from checkpoint import load_model, trained_with_trim
from metrics import (METRIC_NAMES, compute_metrics, edit_distances, format_metrics, format_token_errors,
                     token_errors)
from transformer import (CTC_WEIGHT, LENGTH_PENALTY, MAX_DECODE_LEN, decode_batch, decode_dataset, model_max_len,
                         uses_ctc)
from utils import (amp_context, crop_to_ink, eval_mode, flush_denormals, gather_lists, info, init_distributed,
                   pick_amp, pick_device, png_bytes, write_json, write_text)

# -----------------------------------------------------------------------------
# defaults of the flags below
OUT_DIR = 'runs'
SPLIT = 'test'
BATCHSZ = 32          # images per decoding batch (beam search keeps beam x this many hypotheses)
BEAM = 5              # 1 = greedy; >= 2: beam search, joint with the CTC head when the model has one
MAX_LEN = MAX_DECODE_LEN   # decoding stops after this many tokens (150)
# LENGTH_PENALTY (transformer.py, 1.0): beam score = sum log p / ((5 + len) / 6) ** LENGTH_PENALTY (Wu et al. 2016)
REPORT_N = 50         # samples in the --report page
PREPROCESS = 'crop'   # --image: crop to ink + pad, keep resolution
# constants
CROP_PAD = 8          # px of white around the ink (as Deng's processing)
MAX_SIDE = 800        # --preprocess crop: longer images are shrunk to fit (Deng's largest bucket / 2)
CHUNK = 1024          # --image: images loaded and decoded per chunk (bounds memory on big folders)


# -----------------------------------------------------------------------------
# prediction files (Deng's 5 columns: image, gold, pred, score_pred, score_gold; no header)

class PredictionRow(NamedTuple):
    image: str
    gold: list
    pred: list
    score_pred: float
    score_gold: float


_CONTROL_WS = re.compile(r'[\t\r\n\f\v]')
# a token is `\` + one white-space character (LaTeX control space) or a run of non-space characters;
# tokens never contain other white space (data.tokenize drops it)
_FIELD_TOKEN_RE = re.compile(r'\\\s|\S+')


def _field(tokens):
    """Space-joined tokens for one TSV field. A control symbol `\\<tab>` or `\\<newline>` is written as
    `\\ ` (the same control space to LaTeX), so a field never holds a tab or line break."""
    return _CONTROL_WS.sub(' ', ' '.join(tokens))


def split_field(text):
    """Inverse of the TSV field: 'a \\  b' -> ['a', '\\ ', 'b'] (control space kept as one token)."""
    return _FIELD_TOKEN_RE.findall(text)


def _fmt_score(x):
    return 'nan' if x is None or (isinstance(x, float) and math.isnan(x)) else f'{x:.4f}'


def write_predictions(path, rows):
    """rows: iterable of (image name, gold tokens, pred tokens, score_pred, score_gold) -> TSV, atomically."""
    lines = []
    for image, gold, pred, score_pred, score_gold in rows:
        image = _CONTROL_WS.sub(' ', image)
        lines.append(f'{image}\t{_field(gold)}\t{_field(pred)}\t{_fmt_score(score_pred)}\t{_fmt_score(score_gold)}\n')
    write_text(path, ''.join(lines))


def read_predictions(path):
    """A predictions TSV -> list of PredictionRow (tokens as lists, scores as floats).
    Raises ValueError naming the file and line for a line without 5 tab-separated fields."""
    rows = []
    with open(path, encoding='utf-8', newline='\n') as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip('\n')
            if not line.strip():
                continue
            fields = line.split('\t')
            if len(fields) != 5:
                raise ValueError(f'{path}:{line_no}: expected 5 tab-separated fields '
                                 f'(image, gold, pred, score_pred, score_gold), found {len(fields)}')
            image, gold, pred, score_pred, score_gold = fields
            try:
                sp, sg = float(score_pred), float(score_gold)
            except ValueError:
                raise ValueError(f'{path}:{line_no}: scores must be numbers, found {score_pred!r} {score_gold!r}') from None
            rows.append(PredictionRow(image, split_field(gold), split_field(pred), sp, sg))
    return rows


# -----------------------------------------------------------------------------
# images for --image and the report

def shrink_to_fit(u8, max_side=MAX_SIDE):
    """Downscale (keeping the aspect ratio, area filter) so that H, W <= max_side; smaller images unchanged."""
    h, w = u8.shape
    if max(h, w) <= max_side:
        return u8
    from PIL import Image
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))      # PIL sizes are (W, H)
    return np.asarray(Image.fromarray(u8).resize(size, Image.Resampling.BOX), dtype=np.uint8)


def preprocess_image(u8, how=PREPROCESS, trim=False):
    """A loaded gray page -> the model's input image, or raise ValueError(reason).
    deng: crop to ink, pad 8, smallest of Deng's 21 buckets, downsample x2 (proc.deng_process) -- for
          full-resolution renders like im2latex-100k's raw pages;
    crop: crop to ink + pad 8 px, keep the resolution (shrunk only beyond MAX_SIDE) -- for images already
          at the training images' scale (screenshots, crops, the math/chemistry sets);
    none: as loaded.
    trim: then crop to the ink as train.py --trim did (data.trim_image), for a model trained so."""
    if how == 'none':
        return data.trim_image(u8) if trim else u8
    if how == 'deng':
        import proc
        out = proc.deng_process(u8)
    elif how == 'crop':
        import proc
        out = crop_to_ink(u8, CROP_PAD, proc.INK_THRESHOLD)
        out = shrink_to_fit(out) if out is not None else None
    else:
        raise ValueError(f'unknown preprocessing {how!r}')
    if out is None:
        raise ValueError('blank image (no ink found)')
    return data.trim_image(out) if trim else out


def expand_image_paths(paths):
    """Files as given (always tried, whatever their extension); folders -> their image files
    (proc.list_images: recursive, sorted, hidden files skipped). -> (paths, notes on empty folders)."""
    import proc
    out, notes = [], []
    for p in paths:
        if os.path.isdir(p):
            found = [os.path.join(p, *rel.split('/')) for rel in proc.list_images(p)]
            if not found:
                notes.append(f'{p}: folder has no image files ({" ".join(proc.IMAGE_EXTS)})')
            out += found
        else:
            out.append(p)
    return out, notes


def png_base64(u8):
    return base64.b64encode(png_bytes(u8, optimize=True)).decode('ascii')


# -----------------------------------------------------------------------------
# transcription

def _load_for_transcription(path, how, trim=False):
    try:
        return preprocess_image(data.load_gray(path), how, trim)
    except data.ImageError as e:
        return ValueError(e.reason)
    except (ValueError, OSError) as e:
        return e


def transcribe_arrays(model, vocab, arrays, beam=1, max_len=MAX_LEN, batchsz=BATCHSZ, amp_dtype=None,
                      device='cpu', length_penalty=LENGTH_PENALTY, progress=False, ctc_weight=0.0):
    """uint8 (H, W) images (white background) -> token lists, in order. Images of equal size are
    batched together (the model takes any size, but a batch needs one). A batch the model fails on
    (e.g. out of memory for a huge image) gives the exception in place of each of its token lists."""
    max_len = min(max_len, model_max_len(model))
    by_size = {}
    for i, a in enumerate(arrays):
        by_size.setdefault(a.shape, []).append(i)
    out = [None] * len(arrays)
    with eval_mode(model), torch.no_grad():
        with tqdm(total=len(arrays), desc='transcribe', unit='image', disable=not progress) as bar:
            for idxs in by_size.values():
                for s in range(0, len(idxs), batchsz):
                    chunk = idxs[s:s + batchsz]
                    try:
                        images = torch.stack([data.to_tensor(arrays[i]) for i in chunk]).to(device)  # (B, 1, H, W)
                        with amp_context(device, amp_dtype):
                            ids, _ = decode_batch(model, images, beam, max_len, length_penalty,
                                                  ctc_weight=ctc_weight)
                        for i, seq in zip(chunk, ids):
                            out[i] = vocab.decode(seq)
                    except (RuntimeError, ValueError) as e:
                        h, w = arrays[chunk[0]].shape
                        for i in chunk:
                            out[i] = RuntimeError(f'model failed on this {h}x{w} image ({type(e).__name__}: '
                                                  f'{str(e).splitlines()[0] if str(e) else ""})')
                    bar.update(len(chunk))
    return out


def transcribe(args, model, vocab, device, amp_dtype, out=None):
    """--image: print `path\\tlatex` (or `path\\tERROR: reason`) per image in input order. -> exit code."""
    out = out or sys.stdout
    paths, notes = expand_image_paths(args.image)
    for n in notes:
        info(f'warning: {n}')
    if not paths:
        info('error: no images to transcribe')
        return 1
    failed = 0
    workers = max(args.workers, 0)
    pool = concurrent.futures.ThreadPoolExecutor(workers) if workers > 0 else None
    try:
        for start in range(0, len(paths), CHUNK):
            chunk = paths[start:start + CHUNK]
            load = functools.partial(_load_for_transcription, how=args.preprocess, trim=args.trim)
            loaded = list(pool.map(load, chunk)) if pool else [load(p) for p in chunk]
            ok = [i for i, x in enumerate(loaded) if isinstance(x, np.ndarray)]
            toks = transcribe_arrays(model, vocab, [loaded[i] for i in ok], beam=args.beam, max_len=args.max_len,
                                     batchsz=args.batchsz, amp_dtype=amp_dtype, device=device,
                                     length_penalty=args.length_penalty, progress=len(paths) > args.batchsz,
                                     ctc_weight=args.ctc_weight)
            for i, t in zip(ok, toks):
                loaded[i] = t
            for p, res in zip(chunk, loaded):
                shown = _CONTROL_WS.sub(' ', p)          # one line per image, whatever the file name
                if isinstance(res, list):
                    print(f'{shown}\t{_field(res)}', file=out)
                else:
                    failed += 1
                    print(f'{shown}\tERROR: {_CONTROL_WS.sub(" ", str(res))}', file=out)
            out.flush()
    finally:
        if pool:
            pool.shutdown()
    if failed:
        info(f'{failed} of {len(paths)} images could not be transcribed (lines marked ERROR)')
    return 1 if failed else 0


# -----------------------------------------------------------------------------
# HTML report of the worst samples

_CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;width:100%}td,th{border:1px solid #ccc;padding:6px;vertical-align:top;text-align:left}
th{background:#f3f3f3}code{font-family:monospace;font-size:12px;white-space:pre-wrap;word-break:break-all}
img{max-width:480px;border:1px solid #ddd;background:#fff}.del{background:#fbb}.ins{background:#bfb}
.note{color:#a00;font-size:12px}.meta{color:#555;font-size:13px}"""


def _diff_html(gold, pred):
    """Token diff: gold tokens missing/replaced in red (.del), predicted tokens not in gold in green (.ins)."""
    g_out, p_out = [], []
    sm = difflib.SequenceMatcher(None, gold, pred, autojunk=False)
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        g = html.escape(' '.join(gold[i1:i2]))
        p = html.escape(' '.join(pred[j1:j2]))
        if op == 'equal':
            g_out.append(g), p_out.append(p)
        else:
            if g:
                g_out.append(f'<span class="del">{g}</span>')
            if p:
                p_out.append(f'<span class="ins">{p}</span>')
    return ' '.join(g_out), ' '.join(p_out)


def write_report(path, samples, title, meta_lines, render_fn=None):
    """samples: dicts with name, image (uint8 or None), gold, pred (token lists), lev, ned.
    render_fn(latex) -> uint8 image, or raises; its failure becomes a note in the page."""
    parts = ['<!DOCTYPE html><html><head><meta charset="utf-8">', f'<title>{html.escape(title)}</title>',
             f'<style>{_CSS}</style></head><body>', f'<h1>{html.escape(title)}</h1>']
    parts += [f'<div class="meta">{html.escape(m)}</div>' for m in meta_lines]
    parts.append('<table><tr><th>#</th><th>sample</th><th>input image</th><th>gold / prediction</th>'
                 '<th>rendered prediction</th></tr>')
    for rank, s in enumerate(samples, 1):
        img = (f'<img src="data:image/png;base64,{png_base64(s["image"])}" alt="input">'
               if s['image'] is not None else f'<span class="note">{html.escape(s.get("image_note", "no image"))}</span>')
        if render_fn is None:
            rendered = '<span class="note">not rendered</span>'
        else:
            try:
                rendered = f'<img src="data:image/png;base64,{png_base64(render_fn(data.detokenize(s["pred"])))}" alt="rendered">'
            except Exception as e:  # noqa: BLE001 -- any renderer failure is shown, never fatal
                rendered = f'<span class="note">does not render: {html.escape(str(e)[:300])}</span>'
        g, p = _diff_html(s['gold'], s['pred'])
        parts.append(f'<tr><td>{rank}</td><td><code>{html.escape(s["name"])}</code><br>edit distance {s["lev"]}<br>'
                     f'normalized {s["ned"]:.3f}</td><td>{img}</td>'
                     f'<td><b>gold</b> ({len(s["gold"])} tokens)<br><code>{g}</code><br><b>prediction</b> '
                     f'({len(s["pred"])} tokens)<br><code>{p}</code></td><td>{rendered}</td></tr>')
    parts.append('</table></body></html>\n')
    write_text(path, '\n'.join(parts))


def worst_samples(records, n):
    """The n records with the largest normalized edit distance (ties: longer gold first, then index)."""
    lev, longest = edit_distances([r.gold for r in records], [r.pred for r in records])
    scored = [(d / m if m else 0.0, d, r) for d, m, r in zip(lev, longest, records)]
    scored.sort(key=lambda t: (-t[0], -len(t[2].gold), t[2].index))
    return scored[:n]


# -----------------------------------------------------------------------------
# the run

class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default unless it is None / False / empty (those say nothing)."""

    def _get_help_string(self, action):
        text = action.help or ''
        if '%(default)' not in text and action.default not in (None, False, '', argparse.SUPPRESS) \
                and action.option_strings:
            text += ' (default: %(default)s)'
        return text


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], epilog=__doc__.split('\n', 1)[1],
                                formatter_class=lambda prog: _HelpFormatter(prog, max_help_position=32))
    g = p.add_argument_group('what to evaluate')
    g.add_argument('--root_dir', default=data.DEFAULT_ROOT,
                   help='data root (layout: README.md, "Data layout"; docs/formats.md)')
    g.add_argument('--test_on', default='openai', choices=data.DOMAINS, help='domain to evaluate on')
    g.add_argument('--split', default=SPLIT, choices=('train', 'val', 'test'), help='split to evaluate')
    g.add_argument('--cache', action='store_true', help='use/build <root_dir>/.cache of decoded images')
    g.add_argument('--out_dir', default=OUT_DIR,
                   help='predictions/metrics go to <out_dir>/<test_on>/; also where --weights is looked for')
    g.add_argument('--weights', default=None, metavar='CKPT',
                   help='checkpoint to evaluate (default: <out_dir>/<test_on>/best.pt)')
    g.add_argument('--mean_teacher', action='store_true',
                   help='evaluate the checkpoint\'s teacher (EMA) weights instead of the student\'s')
    g.add_argument('--tag', default='', help='suffix for the output files, e.g. beam5 -> predictions_math_test_beam5.tsv')
    g.add_argument('--exclude_overlap', action='store_true',
                   help='score only the formulas whose tokens occur in no train split (of --test_on and of the '
                        'checkpoint\'s training domain); output files get the suffix _unseen. Without it the '
                        'metrics JSON still counts them (overlap_with_train)')

    g = p.add_argument_group('decoding')
    g.add_argument('--beam', type=int, default=BEAM,
                   help='beam size (1 = greedy, cached; train.py validates greedily)')
    g.add_argument('--ctc_weight', type=float, default=CTC_WEIGHT, metavar='W',
                   help='with --beam >= 2 and a model trained with --ctc: the beam ranks its hypotheses at '
                        'every step by (1 - W) log P_attention + W log P_CTC of the prefix (joint CTC-attention '
                        'decoding); 0 = attention only')
    g.add_argument('--length_penalty', type=float, default=LENGTH_PENALTY,
                   help='beam search ranks hypotheses by sum log p / ((5 + length) / 6) ** this (GNMT); '
                        '0 = no length normalisation')
    g.add_argument('--max_len', type=int, default=MAX_LEN, help='decode at most this many tokens')
    g.add_argument('--batchsz', type=int, default=BATCHSZ,
                   help='images per decoding batch: each image size is encoded alone, and consecutive sizes are '
                        'decoded together up to this many images, their memories padded and masked (1: one image '
                        'at a time)')
    g.add_argument('--workers', type=int, default=-1,
                   help='DataLoader workers / image-loading threads (-1: 0 on CPU, 4 on CUDA)')
    g.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    prec = g.add_mutually_exclusive_group()
    prec.add_argument('--fp16', action='store_true',
                      help='CUDA autocast float16 (on a CPU: fp32, said so; use --bf16 there)')
    prec.add_argument('--bf16', action='store_true', help='autocast bfloat16 (CUDA or CPU)')

    g = p.add_argument_group('extras')
    g.add_argument('--errors', action='store_true',
                   help='also print (and save in the metrics JSON as token_errors) the tokens the model gets wrong: '
                        'the most common substitutions, missed and inserted tokens (token-level Levenshtein '
                        'alignment), and the share of gold tokens recovered by how often each occurs in the training labels')
    g.add_argument('--render_eval', action='store_true',
                   help='also render gold and prediction (render.py) and report image match and column edit '
                        'accuracy (Deng); a prediction that does not render is a mismatch')
    g.add_argument('--renderer', default='auto', choices=('auto', 'mathtext', 'latex'),
                   help='how --render_eval (and --report) render formulas: latex = pdflatex (draws environments '
                        'such as matrix, cases, aligned), mathtext = matplotlib (no TeX needed; environments '
                        'are left out and counted), auto = latex when pdflatex and pdftoppm are installed, '
                        'else mathtext (default). The metrics JSON records which one scored')
    g.add_argument('--report', default=None, metavar='HTML',
                   help='write a self-contained HTML page of the worst samples (by normalized edit distance)')
    g.add_argument('--report_n', type=int, default=REPORT_N, help='samples in the --report page')

    g.add_argument('--score', default=None, metavar='TSV',
                   help='only print the metrics of an existing predictions file (the 5 columns above, e.g. '
                        'from an earlier run or from im2markup) and exit; no model needed')

    g = p.add_argument_group('transcription')
    g.add_argument('--image', nargs='+', default=None, metavar='PATH',
                   help='transcribe these images / folders (recursive, sorted) instead of evaluating: prints '
                        '"path<TAB>latex" per image in input order, "path<TAB>ERROR: reason" for an unreadable one')
    g.add_argument('--preprocess', default=PREPROCESS, choices=('crop', 'deng', 'none'),
                   help='--image: how to bring an image to the training images\' form after converting it to gray. '
                        f'crop: crop to ink + pad {CROP_PAD} px, keep the resolution (shrunk to {MAX_SIDE} px if larger): '
                        'for images already at the scale of the training set (screenshots, scans cropped to a '
                        'formula, the math/chemistry sets). deng: crop, pad, paste into the smallest of Deng\'s 21 '
                        'buckets and downsample x2, as im2latex-100k was made from full-resolution page renders: '
                        'for such renders only (it halves the resolution). none: as loaded')
    args = p.parse_args(argv)
    if args.beam < 1:
        p.error('--beam must be >= 1')
    if not 0.0 <= args.ctc_weight <= 1.0:
        p.error(f'--ctc_weight is a weight in [0, 1], got {args.ctc_weight}')
    if args.batchsz < 1 or args.max_len < 1 or args.report_n < 1:
        p.error('--batchsz, --max_len and --report_n must be >= 1')
    if args.image is not None and (args.render_eval or args.report or args.score or args.exclude_overlap):
        p.error('--render_eval, --report, --score and --exclude_overlap belong to an evaluation, not to --image')
    if args.exclude_overlap and args.split == 'train':
        p.error('--exclude_overlap compares with the train split: evaluate val or test')
    return args


def default_weights(args):
    return args.weights or os.path.join(args.out_dir, args.test_on, 'best.pt')


def build_loader(args, vocab, device, problems, train_on=None, rank=0, world=1):
    """-> (data set, a loader over this process's share of it (all of it without torchrun), overlap dict
    for the metrics JSON). With --exclude_overlap the data set holds only the formulas not in train."""
    try:
        ds = data.FormulaDataset(args.root_dir, args.test_on, args.split, vocab=vocab, cache=args.cache,
                                 problems=problems, trim=args.trim)
    except FileNotFoundError as e:       # data.DataRootError names what is missing and how to make it
        raise SystemExit(f'error: {e}') from None
    if len(ds) == 0:
        raise SystemExit(f'error: no usable samples in {args.test_on}/{args.split} under {args.root_dir}'
                         + (f' ({problems.summary()})' if len(problems) else ''))
    seen, domains = train_overlap(args, ds, train_on)
    overlap = {'overlap_with_train': None if seen is None else len(seen), 'overlap_train_domains': domains,
               'exclude_overlap': args.exclude_overlap}
    if args.exclude_overlap:
        if seen is None:
            raise SystemExit(f'error: --exclude_overlap needs a train label file, none found for '
                             f'{" or ".join(domains_to_compare(args, train_on))} under {args.root_dir}')
        seen = set(seen)
        ds = ds.select([i for i in range(len(ds)) if i not in seen])
        if len(ds) == 0:
            raise SystemExit(f'error: every formula of {args.test_on}/{args.split} also occurs in train: '
                             'nothing left to score with --exclude_overlap')
    loader, _ = data.make_loader(ds, args.batchsz, shuffle=False, workers=args.workers,
                                 pin_memory=device.type == 'cuda', num_replicas=world, rank=rank,
                                 equal_shards=False)
    return ds, loader, overlap


def domains_to_compare(args, train_on):
    """The evaluated domain and, if another, the checkpoint's training domain."""
    return [args.test_on] + ([train_on] if train_on in data.DOMAINS and train_on != args.test_on else [])


def train_overlap(args, ds, train_on):
    """-> (indexes of ds's formulas whose tokens occur in a train split, the domains whose train labels
    were compared); (None, []) for the train split itself or when there are no train labels."""
    if args.split == 'train':
        return None, []
    train, used = [], []
    for domain in domains_to_compare(args, train_on):
        rows = data.split_tokens(args.root_dir, domain, 'train')
        if rows is not None:
            train += [tokens for _, tokens in rows]
            used.append(domain)
    return (data.overlap_with_train(train, ds.tokens), used) if used else (None, [])


def train_token_counts(args, train_on):
    """{token: occurrences} in the train labels of the checkpoint's training domain (the evaluated one when
    the checkpoint does not name it) under --root_dir, or None without that label file."""
    rows = data.split_tokens(args.root_dir, train_on if train_on in data.DOMAINS else args.test_on, 'train')
    return None if rows is None else collections.Counter(t for _, tokens in rows for t in tokens)


def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or 'cpu'


def decoding_name(model, args):
    """'greedy', 'beam K' or 'beam K + CTC w' (the joint decoding of transformer.decode_batch)."""
    if args.beam == 1:
        return 'greedy'
    return f'beam {args.beam}' + (f' + CTC {args.ctc_weight:g}' if uses_ctc(model, args.beam, args.ctc_weight) else '')


def evaluate(args, model, loader, vocab, device, amp_dtype, checkpoint, weights, problems=None, ckpt_meta=None,
             overlap=None, rank=0, world=1):
    """Decode the split (this rank's share; rank 0 gathers the others'), compute the metrics, print the
    table, write the TSV + JSON (+ report). -> metrics dict (None on the other ranks).
    overlap: build_loader's counts of formulas also in train, copied into the JSON."""
    ds = loader.dataset
    overlap = overlap or {}
    decoding = decoding_name(model, args)
    if rank == 0:
        info(f'{args.test_on}/{args.split}: {len(ds)} formulas' + (' not in train' if args.exclude_overlap else '')
             + f', {checkpoint} ({weights} weights), {decoding}, '
             f'max_len {args.max_len}, {device}' + (f', autocast {amp_dtype}' if amp_dtype else ''))
    t0 = time.perf_counter()
    records = decode_dataset(model, loader, vocab, beam=args.beam, max_len=args.max_len, amp_dtype=amp_dtype,
                             device=device, length_penalty=args.length_penalty, desc=f'{args.test_on}/{args.split}',
                             ctc_weight=args.ctc_weight, batch_rows=args.batchsz,
                             progress=rank == 0)
    records = sorted(gather_lists(records, world), key=lambda r: r.index)
    elapsed = time.perf_counter() - t0
    if rank != 0:
        return None
    golds = [r.gold for r in records]
    preds = [r.pred for r in records]
    metrics = compute_metrics(golds, preds)
    if args.render_eval:
        from metrics import image_metrics
        info(f'rendering gold and predicted formulas for the image metrics ({args.renderer}) ...')
        img = image_metrics(golds, preds, workers=args.workers if args.workers > 0 else None,
                            renderer=args.renderer)
        metrics.update({k: v for k, v in img.items() if k not in ('n', 'n_total', 'samples')})
        metrics['image_n'] = img['n']          # samples whose gold rendered (the others are left out)
        metrics['renderer'] = args.renderer

    out_dir = os.path.join(args.out_dir, args.test_on)
    suffix = (f'_{args.tag}' if args.tag else '') + ('_unseen' if args.exclude_overlap else '')
    tsv = os.path.join(out_dir, f'predictions_{args.test_on}_{args.split}{suffix}.tsv')
    js = os.path.join(out_dir, f'metrics_{args.test_on}_{args.split}{suffix}.json')
    write_predictions(tsv, [(ds.names[r.index], r.gold, r.pred, r.score_pred, r.score_gold) for r in records])
    result = dict(metrics)
    result.update(overlap)
    # a search error: the model prefers the gold (higher log-prob) but the search returned something else
    search_errors = sum(r.gold != r.pred and r.score_gold > r.score_pred + 1e-4 for r in records)  # nan -> False
    result.update({
        'n_dataset': len(ds), 'search_errors': search_errors,
        'domain': args.test_on, 'split': args.split, 'checkpoint': os.path.abspath(checkpoint), 'weights': weights,
        'decoding': decoding, 'beam': args.beam, 'length_penalty': args.length_penalty, 'max_len': args.max_len,
        'ctc_weight': args.ctc_weight if uses_ctc(model, args.beam, args.ctc_weight) else 0.0,
        'time_s': round(elapsed, 3), 'formulas_per_s': round(len(records) / elapsed, 3) if elapsed > 0 else None,
        'device': str(device), 'device_name': device_name(device),
        'amp_dtype': str(amp_dtype).replace('torch.', '') if amp_dtype else None,
        'torch': torch.__version__, 'threads': torch.get_num_threads(), 'skipped': problems.summary() if problems else '',
        'predictions': os.path.abspath(tsv), 'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        'args': vars(args)})
    result.update({f'ckpt_{k}': v for k, v in (ckpt_meta or {}).items()})
    if args.errors:
        result['token_errors'] = token_errors(golds, preds, train_token_counts(args, (ckpt_meta or {}).get('train_on')))
    write_json(js, result)

    print(f'{args.test_on}/{args.split}: {len(records)} formulas, {weights} weights of {checkpoint}, {decoding}')
    print(format_metrics(metrics))
    if overlap.get('overlap_with_train') is not None:
        n_split = len(ds) + overlap['overlap_with_train'] if args.exclude_overlap else len(ds)
        how = 'left out of these metrics' if args.exclude_overlap else 'scored; --exclude_overlap leaves them out'
        print(f'  also in train         {overlap["overlap_with_train"]} of {n_split} formulas (same tokens; {how})')
    if 'render_failures_pred' in metrics:
        print(f'  (image metrics rendered with {metrics["renderer"]}: {metrics["image_n"]} scored; predictions '
              f'that did not render {metrics["render_failures_pred"]}, golds left out '
              f'{metrics["render_failures_gold"]})')
    print(f'  search errors         {search_errors} (wrong predictions with a lower '
          f'{"joint score" if result["ctc_weight"] else "summed log-prob"} than the gold)')
    if args.errors:
        print(format_token_errors(result['token_errors']))
    print(f'  {len(records) / elapsed:.1f} formulas/s on {device}' if elapsed > 0 else '')
    if problems is not None and len(problems):
        print(f'  {problems.summary()}')
    print(f'wrote {tsv}\n      {js}')

    if args.report:
        make_report(args, ds, records, metrics, checkpoint, weights, decoding)
        print(f'      {args.report}')
    return result


def make_report(args, ds, records, metrics, checkpoint, weights, decoding):
    samples = []
    for ned, lev, r in worst_samples(records, args.report_n):
        name = ds.names[r.index]
        s = {'name': name, 'gold': r.gold, 'pred': r.pred, 'lev': lev, 'ned': ned, 'image': None}
        try:
            s['image'] = ds.gray(r.index)                 # uint8 (H, W) as the model saw it (cache or file)
        except data.ImageError as e:
            s['image_note'] = f'cannot read image: {e.reason}'
        samples.append(s)
    try:
        import render
        render_fn = functools.partial(render.render_latex, renderer=args.renderer)
    except ImportError as e:
        info(f'warning: render.py not importable ({e}); the report shows no rendered predictions')
        render_fn = None
    title = f'worst {len(samples)} of {len(records)}: {args.test_on}/{args.split}'
    meta = [f'checkpoint {checkpoint} ({weights} weights), {decoding}, max_len {args.max_len}',
            '; '.join(f'{label} {fmt.format(metrics[k])}' for k, label, fmt in METRIC_NAMES if k in metrics),
            'gold tokens missing or replaced are red, predicted tokens not in the gold are green']
    write_report(args.report, samples, title, meta, render_fn)


def score_file(path):
    """--score: metrics of a predictions TSV -> printed table; exit code."""
    try:
        rows = read_predictions(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f'error: {e}') from None
    metrics = compute_metrics([r.gold for r in rows], [r.pred for r in rows])
    print(f'{path}: {len(rows)} formulas')
    print(format_metrics(metrics))
    return 0


def main(argv=None):
    args = get_args(argv)
    if args.score:
        return score_file(args.score)
    rank, world, local_rank = init_distributed(args.device)
    device = pick_device(args.device, local_rank)
    flush_denormals(device)
    if args.workers < 0:
        args.workers = 4 if device.type == 'cuda' else 0
    amp_dtype = pick_amp(args, device)
    checkpoint = default_weights(args)
    hint = (f'Train one first, e.g.\n  python3 train.py --train_on {args.test_on} --root_dir {args.root_dir} '
            f'--out_dir {args.out_dir}\nor pass --weights PATH.')
    model, vocab, ckpt, weights = load_model(checkpoint, args.mean_teacher, device, hint)
    args.trim = trained_with_trim(ckpt)
    if args.trim:
        info(f'{checkpoint} was trained with --trim: images are cropped to their ink as in its training')
    if args.max_len > model_max_len(model):
        info(f'--max_len {args.max_len} is more than the model\'s {model_max_len(model)} positions: '
             f'decoding at most {model_max_len(model)} tokens')
        args.max_len = model_max_len(model)
    if args.image is not None:
        return transcribe(args, model, vocab, device, amp_dtype) if rank == 0 else 0

    if args.render_eval or args.report:   # the one renderer choice (render.resolve_renderer), before decoding
        import render
        try:
            args.renderer = render.resolve_renderer(args.renderer)
        except render.RenderError as e:
            raise SystemExit(f'error: --renderer latex: {e}') from None
    if ckpt.get('train_on') and ckpt['train_on'] != args.test_on:
        info(f'note: the checkpoint was trained on {ckpt["train_on"]}, evaluating on {args.test_on}')
    problems = data.Problems(quiet=rank != 0)
    _, loader, overlap = build_loader(args, vocab, device, problems, ckpt.get('train_on'), rank, world)
    meta = {k: ckpt[k] for k in ('train_on', 'epoch', 'step', 'best_metric') if k in ckpt}
    evaluate(args, model, loader, vocab, device, amp_dtype, checkpoint, weights, problems, meta, overlap,
             rank, world)
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(main())
