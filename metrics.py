"""Every metric of the project, as train.py validates and test.py evaluates (definitions with
worked examples: docs/formats.md, "Metrics").

Text metrics, on token sequences (all take lists of token lists, golds[i] against preds[i]):
    BLEU-4               corpus BLEU of the space-joined tokens, == multi-bleu.perl (0-100)
    edit accuracy        1 - sum lev(g, p) / sum max(len g, len p)       (Deng et al. 2017)
    norm. edit distance  mean of lev(g, p) / max(len g, len p)          (pix2tex)
    exact match          share of samples whose token sequences are equal
Token errors (diagnostics, not a score): the most common substitutions, missed and inserted tokens and
the share of gold tokens recovered by how often each occurs in train (token_errors).
Image metrics, on renders (render.py) of gold and prediction: Deng et al., "Image-to-Markup
Generation with Coarse-to-Fine Attention", ICML 2017 (im2markup scripts/evaluation/evaluate_image.py):
render both the same way, binarize, drop blank columns, compare the column sequences
    image match          share of samples whose column sequences are equal
    column edit accuracy 1 - sum of column edit distances / sum of the longer column counts
"""
from collections import Counter

import numpy as np
from rapidfuzz.distance import Levenshtein
from sacrebleu.metrics import BLEU

import render
from data import detokenize
from utils import imap_progress, n_workers, process_pool

# -----------------------------------------------------------------------------
# defaults

BINARIZE = 128        # Deng's evaluate_image.py: a pixel <= 128 is ink
MIN_TASKS_PER_WORKER = 16   # image metrics start a process pool only for at least this many samples per worker
CHUNK = {'mathtext': 4, 'latex': render.LATEX_CHUNK // 2}   # samples per worker task (latex: one pdflatex call)
TOP_ERRORS = 15      # token_errors: the most common substitutions / missed / inserted tokens listed
TRAIN_COUNT_BANDS = (1, 10, 100, 1000)   # token_errors: bands of training occurrences 0, 1-9, 10-99, 100-999, 1000+
# (key in the metrics dict, label, format) in the order tables show them
METRIC_NAMES = (('bleu4', 'BLEU-4', '{:.2f}'), ('edit_accuracy', 'edit accuracy', '{:.4f}'),
                ('norm_edit_distance', 'norm. edit distance', '{:.4f}'), ('exact_match', 'exact match', '{:.4f}'),
                ('image_match', 'image match', '{:.4f}'), ('column_edit_accuracy', 'column edit accuracy', '{:.4f}'))


# -----------------------------------------------------------------------------
# text metrics

def _check_pairs(golds, preds):
    if len(golds) != len(preds):
        raise ValueError(f'{len(golds)} gold sequences but {len(preds)} predictions')


def _bleu_stats(golds, preds):
    _check_pairs(golds, preds)
    # tokenize='none': the space-joined tokens are split on white space, exactly as multi-bleu.perl;
    # no smoothing: a zero n-gram count gives 0, as multi-bleu.perl
    metric = BLEU(tokenize='none', smooth_method='none', lowercase=False, force=True, effective_order=False)
    return metric.corpus_score([' '.join(p) for p in preds], [[' '.join(g) for g in golds]])


def bleu4(golds, preds):
    """Corpus BLEU-4 (Papineni et al. 2002) in 0-100, equal to multi-bleu.perl on the space-joined
    tokens: clipped n-gram precisions pooled over the corpus, geometric mean of orders 1-4, brevity
    penalty exp(1 - ref_len / hyp_len) when the predictions are shorter in total. 0 for no samples
    (multi-bleu.perl would print 0 too) and when any order has no matching n-gram."""
    if len(golds) == 0 and len(preds) == 0:
        return 0.0
    return float(_bleu_stats(golds, preds).score)


def edit_distances(golds, preds):
    """Token-level Levenshtein distances and max lengths, one pair per sample -> (lev, longest)."""
    _check_pairs(golds, preds)
    lev = [Levenshtein.distance(list(g), list(p)) for g, p in zip(golds, preds)]
    longest = [max(len(g), len(p)) for g, p in zip(golds, preds)]
    return lev, longest


def edit_accuracy(golds, preds):
    """Deng et al. 2017: 1 - sum lev(g, p) / sum max(len g, len p); 1.0 when every sequence is empty."""
    return _edit_accuracy(*edit_distances(golds, preds))


def _edit_accuracy(lev, longest):
    total = sum(longest)
    return 1.0 - sum(lev) / total if total else 1.0


def normalized_edit_distance(golds, preds):
    """Mean over samples of lev(g, p) / max(len g, len p) (0 for two empty sequences); 0.0 for no samples."""
    return _norm_edit_distance(*edit_distances(golds, preds))


def _norm_edit_distance(lev, longest):
    per = [d / m if m else 0.0 for d, m in zip(lev, longest)]
    return sum(per) / len(per) if per else 0.0


def exact_match(golds, preds):
    """Share of samples whose token sequences are equal (token strings compared; 0.0 for no samples)."""
    _check_pairs(golds, preds)
    return sum(list(g) == list(p) for g, p in zip(golds, preds)) / len(golds) if golds else 0.0


def compute_metrics(golds, preds):
    """All text metrics of token sequences golds[i] vs preds[i] -> dict
    {'bleu4' (0-100), 'edit_accuracy', 'norm_edit_distance', 'exact_match' (0-1), 'n'}."""
    lev, longest = edit_distances(golds, preds)
    return {'bleu4': bleu4(golds, preds),
            'edit_accuracy': _edit_accuracy(lev, longest),
            'norm_edit_distance': _norm_edit_distance(lev, longest),
            'exact_match': exact_match(golds, preds),
            'n': len(golds)}


def format_metrics(metrics):
    """A small two-column table of the metrics present in `metrics`."""
    lines = [f'  {label:<22}{fmt.format(metrics[key])}' for key, label, fmt in METRIC_NAMES if key in metrics]
    return '\n'.join(lines)


def _band_names(edges):
    """(1, 10, 100) -> ['0', '1-9', '10-99', '100+']"""
    names = ['0' if edges[0] == 1 else f'<{edges[0]}']
    names += [f'{lo}-{hi - 1}' for lo, hi in zip(edges, edges[1:])]
    return names + [f'{edges[-1]}+']


def token_errors(golds, preds, train_counts=None, top=TOP_ERRORS, bands=TRAIN_COUNT_BANDS):
    """What the predictions get wrong, token by token, from the token-level Levenshtein alignment of each
    pair (rapidfuzz editops: 'replace' = a gold token read as another, 'delete' = a gold token missing,
    'insert' = a predicted token not in the gold; a gold token no op touches is recovered). -> dict
      'substitutions': [[gold, pred, n]], 'missed': [[token, n missed, n in gold]], 'inserted': [[token, n]]
                       (the `top` most common each; missed = replaced or deleted),
      'recall_by_train_count': [{'band', 'types', 'gold', 'recall'}] with train_counts ({token: training
                       occurrences}): share of gold tokens recovered, per band of training occurrences.
    Example: gold `x ^ { 2 }`, pred `x ^ { 3 }`: substitution 2 -> 3, missed 2 (1 of 1), recall 4 / 5.
    Where several alignments have the same distance rapidfuzz picks one (deterministically)."""
    _check_pairs(golds, preds)
    subs, missed, inserted, gold_n, kept = Counter(), Counter(), Counter(), Counter(), Counter()
    for g, p in zip(golds, preds):
        g, p = list(g), list(p)
        gold_n.update(g)
        lost = set()
        for op, i, j in Levenshtein.editops(g, p).as_list():
            if op == 'insert':
                inserted[p[j]] += 1
                continue
            lost.add(i)
            missed[g[i]] += 1
            if op == 'replace':
                subs[(g[i], p[j])] += 1
        kept.update(t for i, t in enumerate(g) if i not in lost)
    out = {'substitutions': [[a, b, n] for (a, b), n in subs.most_common(top)],
           'missed': [[t, n, gold_n[t]] for t, n in missed.most_common(top)],
           'inserted': [[t, n] for t, n in inserted.most_common(top)]}
    if train_counts is not None:
        rows = []
        for k, name in enumerate(_band_names(bands)):
            lo, hi = (bands[k - 1] if k else 0), (bands[k] if k < len(bands) else float('inf'))
            types = [t for t in gold_n if lo <= train_counts.get(t, 0) < hi]
            n = sum(gold_n[t] for t in types)
            rows.append({'band': name, 'types': len(types), 'gold': n,
                         'recall': sum(kept[t] for t in types) / n if n else None})
        out['recall_by_train_count'] = rows
    return out


def format_token_errors(errors, top=8):
    """A few printed lines of token_errors()' result."""
    lines = []
    if 'recall_by_train_count' in errors:
        cells = [f'{r["band"]}: {r["recall"]:.2f} ({r["gold"]} tokens, {r["types"]} types)'
                 for r in errors['recall_by_train_count'] if r['gold']]
        lines.append('  gold tokens recovered, by training count: ' + '; '.join(cells))
    lines.append('  read as another token: ' + ', '.join(f'{a} -> {b} {n}' for a, b, n in errors['substitutions'][:top]))
    lines.append('  missed (of gold):      ' + ', '.join(f'{t} {n}/{g}' for t, n, g in errors['missed'][:top]))
    lines.append('  inserted:              ' + ', '.join(f'{t} {n}' for t, n in errors['inserted'][:top]))
    return '\n'.join(lines)


# -----------------------------------------------------------------------------
# image metrics

def _columns(img, height):
    """Binarized columns of a uint8 image padded (at the bottom, with white) to `height` rows, as bytes,
    blank columns dropped."""
    ink = np.asarray(img) <= BINARIZE                            # (H, W) bool
    if ink.shape[0] < height:
        ink = np.pad(ink, ((0, height - ink.shape[0]), (0, 0)))  # blank rows below
    keep = ink.any(axis=0)
    packed = np.packbits(ink[:, keep].T, axis=1)                 # (W', ceil(height / 8)) one row per column
    return [row.tobytes() for row in packed]


def compare_images(a, b):
    """Deng's image comparison of two renders (uint8 (H, W), white background): binarize (ink <= 128),
    pad the shorter image with blank rows at the bottom, drop blank columns, then compare the column
    sequences. -> {'match': bool (identical sequences), 'col_edit': Levenshtein distance between the
    column sequences, 'col_len': max of the two lengths}."""
    h = max(np.asarray(a).shape[0], np.asarray(b).shape[0])
    ca, cb = _columns(a, h), _columns(b, h)
    dist = Levenshtein.distance(ca, cb)
    return {'match': dist == 0 and len(ca) == len(cb), 'col_edit': int(dist), 'col_len': max(len(ca), len(cb))}


def _aligned(gold_box, pred_box):
    """Two renders (image, baseline row or None): pad the tops so that their baselines are on the same row
    (like formulas typeset on one page). -> (gold image, pred image)."""
    (g, gb), (p, pb) = gold_box, pred_box
    if gb is not None and pb is not None:
        shift = gb - pb
        if shift > 0:
            p = np.pad(p, ((shift, 0), (0, 0)), constant_values=255)
        elif shift < 0:
            g = np.pad(g, ((-shift, 0), (0, 0)), constant_values=255)
    return g, p


def _metric_chunk(chunk):
    """Worker: render the golds and predictions of a chunk of samples together (one pdflatex call with the
    latex renderer) and compare each pair -> per sample dict (see image_metrics)."""
    fontsize, dpi, font, renderer = chunk[0][2:]
    boxes = render.render_boxes([(x, fontsize, dpi, font) for g, p, *_ in chunk for x in (g, p)], renderer)
    out = []
    for gold_box, pred_box in zip(boxes[0::2], boxes[1::2]):
        if isinstance(gold_box, render.RenderError):
            out.append({'gold_error': str(gold_box)})
        elif isinstance(pred_box, render.RenderError):
            cols = len(_columns(gold_box[0], gold_box[0].shape[0]))
            out.append({'match': False, 'col_edit': cols, 'col_len': cols, 'pred_error': str(pred_box)})
        else:
            out.append(compare_images(*_aligned(gold_box, pred_box)))
    return out


def image_metrics(golds, preds, workers=None, fontsize=render.FONTSIZE, dpi=render.DPI, font='cm',
                  renderer='mathtext', per_sample=False, quiet=False):
    """Deng's image evaluation over a corpus. golds, preds: LaTeX strings (raw or tokenized) or token lists.
    Gold and prediction are rendered the same way (font, size, dpi), aligned on their baselines,
    binarized, blank columns dropped, and compared column by column.
    A prediction that fails to render is a mismatch with col_edit = the gold's column count.
    A gold that fails to render leaves the sample out (counted in render_failures_gold).
    renderer: 'mathtext' or 'latex' (render.resolve_renderer picks one for 'auto'); with 'latex' the golds
    and predictions of 16 samples share one pdflatex call.
    -> {'image_match': fraction of evaluated samples whose images match,
        'column_edit_accuracy': 1 - sum(col_edit) / sum(col_len), 'render_failures_pred': int,
        'render_failures_gold': int, 'n': evaluated samples, 'n_total': int,
        'samples': per-sample dicts (only with per_sample=True)}."""
    golds, preds = list(golds), list(preds)
    if len(golds) != len(preds):
        raise ValueError(f'{len(golds)} golds but {len(preds)} predictions')
    join = lambda x: detokenize(x) if isinstance(x, (list, tuple)) else x  # noqa: E731
    tasks = [(join(g), join(p), fontsize, dpi, font, renderer) for g, p in zip(golds, preds)]
    render.check_renderer(renderer)
    nw = n_workers(workers)
    size = CHUNK[renderer]
    chunks = [tasks[c:c + size] for c in range(0, len(tasks), size)]
    with process_pool(nw, use=len(tasks) >= MIN_TASKS_PER_WORKER * nw) as pool:
        results = [r for chunk in imap_progress(pool, nw, _metric_chunk, chunks, 'image metrics', quiet)
                   for r in chunk]
    ok = [r for r in results if 'gold_error' not in r]
    edits, lens = sum(r['col_edit'] for r in ok), sum(r['col_len'] for r in ok)
    out = {'image_match': sum(r['match'] for r in ok) / len(ok) if ok else 0.0,
           'column_edit_accuracy': 1.0 - edits / lens if lens else (1.0 if ok else 0.0),
           'render_failures_pred': sum('pred_error' in r for r in ok),
           'render_failures_gold': len(results) - len(ok), 'n': len(ok), 'n_total': len(results)}
    if per_sample:
        out['samples'] = results
    return out
