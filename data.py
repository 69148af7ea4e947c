"""Data: label files, tokenizer + vocab, the three domain datasets, .cache, size-bucketed batch
samplers, collate and augmentation. Also the small I/O helpers every script shares (atomic writes,
the bad-input reporter, image loading).

    python3 data.py --root_dir data/demo [--cache]      # check a data root: counts, sizes, problems, overlap
"""
import argparse
import contextlib
import copy
import hashlib
import json
import os
import re
import struct
import sys
import tempfile
import time
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageOps

DEFAULT_ROOT = 'data/demo'  # demo data root (relative to the current directory, git-ignored)
PRE_VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'pre_vocab.txt')   # known tokens
DOMAINS = ('openai', 'math', 'chemistry')
SPLITS = ('train', 'val', 'test')
SPECIALS = ('<pad>', '<sos>', '<eos>', '<unk>')
PAD, SOS, EOS, UNK = 0, 1, 2, 3
CONTROL_SPACE = '\\ '        # the token of TeX's control space (`\ `)
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp')
CACHE_VERSION = 2            # bump when the cache layout or what goes into it changes (2: glued tokens)
DECODE_THREADS = min(4, os.cpu_count() or 1)   # Pillow releases the GIL while decoding
HOW_TO_GET_DATA = ('make the demo data with `python3 render.py --root_dir {root}`, or import the real '
                   'im2latex-100k with `python3 proc.py --import_im2latex SRC --root_dir {root}`')


# -----------------------------------------------------------------------------
# shared I/O helpers

def _read_umask():
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


_UMASK = _read_umask()


def atomic_write(path, writer):
    """Write `path` atomically: `writer(tmp_path)` writes a temp file in the same folder, which then
    replaces `path` with os.replace. An interrupted write leaves the old file (or none), never half a file.
    The file gets the usual permissions (0666 minus umask), not mkstemp's private 0600."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # the temp name's pattern is also atomic_write_leftovers'
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_leftovers(path):
    """The temp files that atomic_write(path, ...) calls left behind when their process was killed
    (SIGKILL allows no clean-up). Only safe to remove while nothing writes `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    prefix = '.' + os.path.basename(path) + '.'
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [os.path.join(folder, n) for n in sorted(names) if n.startswith(prefix) and n.endswith('.tmp')]


class Problems:
    """Bad-input reporter: each problem is printed once as `path:line: message` (to stderr),
    counted by kind, and summed up at the end with `summary()`.
    After `max_print` messages of one kind the rest are only counted (None: print all), so a
    badly broken 100k-line file does not flood the console."""

    def __init__(self, quiet=False, max_print=100):
        self.quiet = quiet
        self.max_print = max_print
        self.counts = Counter()
        self.seen = set()
        self.entries = []        # (path, line, kind, message) in report order

    def report(self, path, line, kind, message):
        """Record one problem; returns False if this (path, line, kind) was already reported."""
        key = (os.fspath(path), line, kind)
        if key in self.seen:
            return False
        self.seen.add(key)
        self.counts[kind] += 1
        self.entries.append((os.fspath(path), line, kind, message))
        if not self.quiet:
            n = self.counts[kind]
            if self.max_print is None or n <= self.max_print:
                where = f'{path}:{line}' if line is not None else f'{path}'
                print(f'{where}: {message}', file=sys.stderr)
            if self.max_print is not None and n == self.max_print:
                print(f'(further "{kind}" problems are counted, not printed)', file=sys.stderr)
        return True

    def __len__(self):
        return sum(self.counts.values())

    def summary(self):
        if not self.counts:
            return ''
        parts = ', '.join(f'{n} {kind}' for kind, n in self.counts.most_common())
        return f'skipped {len(self)}: {parts}'


class ImageError(Exception):
    """An image file that cannot be read; str() names the file and the reason."""

    def __init__(self, path, reason):
        super().__init__(f'{path}: {reason}')
        self.path, self.reason = path, reason

    def __reduce__(self):        # picklable (DataLoader workers send exceptions to the main process)
        return ImageError, (self.path, self.reason)


class DataRootError(FileNotFoundError):
    """A data root without the expected folders; the message names what is missing and how to make it."""


@contextlib.contextmanager
def _reading(path):
    """Turn any failure to read the image at `path` into ImageError(path, reason)."""
    try:
        yield
    except FileNotFoundError:
        raise ImageError(path, 'file not found') from None
    except IsADirectoryError:
        raise ImageError(path, 'is a folder, not an image') from None
    except MemoryError:
        raise
    except Exception as e:       # Pillow raises OSError, SyntaxError, ValueError, EOFError, zlib.error, ...
        raise ImageError(path, f'cannot read image ({type(e).__name__}: {e})') from None


def load_gray(path):
    """Read any image file as a uint8 (H, W) array, dark ink on white (255).
    Modes: 1, L, P, RGB, CMYK, ... ; RGBA/LA/PA and palette or gray transparency are composited on
    white (a transparent background becomes white); 16-bit and float images are scaled to 0..255.
    The EXIF orientation (photos) is applied. Raises ImageError(path, reason) for unreadable files."""
    with _reading(path), Image.open(path) as im:
        im.load()
        if im.format != 'PNG' and im.getexif().get(0x0112, 1) != 1:
            im = ImageOps.exif_transpose(im)
        if im.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I', 'F'):
            a = np.asarray(im, dtype=np.float64)
            if im.mode.startswith('I;16'):
                hi = 65535.0
            elif im.mode == 'F' and a.size and a.max() <= 1.0:
                hi = 1.0
            else:
                hi = 65535.0 if a.size and a.max() > 255 else 255.0
            return np.clip(np.round(a / hi * 255.0), 0, 255).astype(np.uint8)
        if im.mode in ('P', 'PA') or (im.mode in ('L', 'RGB') and 'transparency' in im.info):
            im = im.convert('RGBA')
        if im.mode in ('RGBA', 'LA', 'RGBa', 'La'):
            white = Image.new('RGBA', im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, im.convert('RGBA'))
        if im.mode != 'L':
            try:
                im = im.convert('L')
            except ValueError:              # e.g. LAB/HSV: no direct conversion
                im = im.convert('RGB').convert('L')
        return np.asarray(im, dtype=np.uint8).copy()


def image_size(path):
    """(H, W) of an image file without decoding its pixels. PNG files are also checked end to end
    (chunk CRCs up to IEND), which catches truncated and damaged files for the cost of reading them.
    Raises ImageError."""
    with _reading(path), Image.open(path) as im:
        w, h = im.size
        if im.format == 'PNG':
            im.verify()
        elif im.getexif().get(0x0112, 1) in (5, 6, 7, 8):     # rotated by 90 degrees (load_gray applies it)
            w, h = h, w
    if w < 1 or h < 1:
        raise ImageError(path, f'empty image ({w}x{h})')
    return h, w


def to_tensor(u8):
    """uint8 (H, W), white = 255 -> float32 (1, H, W), ink = 1.0, background = 0.0."""
    x = np.subtract(255, u8, dtype=np.float32)
    x /= 255.0
    return torch.from_numpy(x)[None]                                   # (1, H, W)


# -----------------------------------------------------------------------------
# trimming (--trim): the white around the ink costs compute and carries nothing

TRIM_PAD = 4               # px of white kept on every side of the ink
TRIM_MULTIPLE = (16, 64)   # trimmed sizes are rounded up to multiples of (H, W): few sizes, full batches
TRIM_INK = 240             # a pixel darker than this is ink (with its antialiased fringe)


def trim_box(u8):
    """(top, bottom, left, right) of the ink of a uint8 (H, W) page (bottom/right exclusive), or None
    for a blank image (left as it is by --trim)."""
    from utils import ink_bounds          # utils imports data: import here
    return ink_bounds(u8, TRIM_INK, fringe=True)


def _trim_axis(lo, hi, n, multiple):
    """One axis of --trim: ink at [lo, hi) of n pixels -> (src_lo, src_hi, dst_lo, out_n): the ink plus
    TRIM_PAD on both sides, rounded up to `multiple`; (0, n, 0, n), the axis as it is, where that would
    not be shorter (trimming never grows an image)."""
    out = -(-(hi - lo + 2 * TRIM_PAD) // multiple) * multiple
    return (lo, hi, TRIM_PAD, out) if out < n else (0, n, 0, n)


def _trim_axes(box, shape):
    top, bottom, left, right = box
    return (_trim_axis(top, bottom, shape[0], TRIM_MULTIPLE[0]), _trim_axis(left, right, shape[1], TRIM_MULTIPLE[1]))


def trimmed_size(box, shape):
    """The (H, W) that --trim gives an image of `shape` with ink box `box`. Worked example: im2latex-100k's
    (Deng's) buckets pad a one-line formula of 36 x 430 px of ink (4 px from the top-left corner) to
    100 x 500; trimmed it is 36 + 8 = 44 -> 48 rows and 430 + 8 = 438 -> 448 columns, 43% of the pixels
    (and at output stride 16x8 3 x 56 memory positions instead of 7 x 63). A 40 x 200 bucket with 26 x 170
    px of ink keeps its 40 rows (34 -> 48 would be more) and gets 192 columns."""
    return tuple(axis[3] for axis in _trim_axes(box, shape))


def trim_image(u8, box=None):
    """uint8 (H, W) -> the image as --trim feeds it to the model (see trimmed_size): the ink of `box`
    (default: trim_box(u8)) TRIM_PAD px from the top-left corner of a white page; a blank image unchanged."""
    box = trim_box(u8) if box is None else box
    if box is None:
        return u8
    (r0, r1, rd, oh), (c0, c1, cd, ow) = _trim_axes(box, u8.shape)
    out = np.full((oh, ow), 255, dtype=np.uint8)
    out[rd:rd + r1 - r0, cd:cd + c1 - c0] = u8[r0:r1, c0:c1]
    return out


# -----------------------------------------------------------------------------
# tokens

# As im2latex-100k's normalized formulas (im2markup's KaTeX normalizer) write them, some commands and
# what follows them are one token: \begin{name} and \end{name} (environment names: letters and *),
# \operatorname*, and \left / \right with their delimiter (\left( \right. \left\{ \right\rangle).
# White space inside them is dropped, so '\begin { a r r a y }' and '\left (' read as '\begin{array}'
# and '\left('. Otherwise: a command (\ + letters), a control symbol (\ + one other character, e.g.
# \{ \, \\ or \ + space), a backslash at the very end, or one character; white space separates
# tokens and is dropped.
_GLUED = (r'\\(?:begin|end)\s*\{\s*[A-Za-z*](?:\s*[A-Za-z*])*\s*\}'
          r'|\\operatorname\s*\*'
          r'|\\(?:left|right)(?![A-Za-z])\s*(?:\\[A-Za-z]+|\\[^A-Za-z\s\\]|[()\[\]<>/|.])')
_PLAIN = r'\\(?:[A-Za-z]+|.|\Z)|\S'
_TOKEN_RE = re.compile(_GLUED + '|' + _PLAIN, re.DOTALL)
_PLAIN_RE = re.compile(_PLAIN, re.DOTALL)
_SPACED_GLUE_RE = re.compile(r'\\(?:begin|end|operatorname|left|right)(?![A-Za-z])\s|\\(?:begin|end)\s*\{[^}]*\s')
_SPACE_RE = re.compile(r'\s+')
_CONTROL_SPACE_RE = re.compile(r'\\(?:\s|\Z)')       # may also hit `\\ `: then the check below is a no-op


def _clean_text(latex):
    """NFC-normalise (so a composed and a decomposed accent give one token) and drop invisible
    characters: format characters (zero-width space, BOM, soft hyphen, invisible times, ...) and
    control characters other than white space."""
    latex = unicodedata.normalize('NFC', latex)
    return ''.join(c for c in latex
                   if c.isspace() or unicodedata.category(c) not in ('Cf', 'Cc'))


def tokenize(latex):
    """'\\frac{a}{b}' -> ['\\frac', '{', 'a', '}', '{', 'b', '}']; the space-tokenized form gives the same.

    Rules (docs/formats.md, "Tokens and vocab"): a command (`\\` + letters), a control symbol
    (`\\` + one non-letter, e.g. `\\{`, `\\,`, `\\\\`), or one character (any script); white space
    separates tokens and is dropped. As in im2latex-100k's normalized formulas, `\\begin{name}`,
    `\\end{name}`, `\\operatorname*` and `\\left` / `\\right` with their delimiter (`\\left(`, `\\right.`,
    `\\left\\{`) are one token each, written without spaces whatever spaces the input had inside them.
    A backslash before white space (space, tab, newline) or at the very end of the text is TeX's
    control space (TeX reads the end of a line as a space, and plain TeX/LaTeX define `\\<tab>` and
    `\\<return>` as `\\ `): it becomes the token `\\ `, which detokenize writes back as `\\ ` so it
    survives a round trip, even through a file whose lines were stripped."""
    if not latex.isascii() or not latex.isprintable():
        latex = _clean_text(latex)
    tokens = _TOKEN_RE.findall(latex)
    if _SPACED_GLUE_RE.search(latex):   # rare: a glued token written with spaces ('\\left (')
        tokens = [_SPACE_RE.sub('', t) if len(t) > 2 and t[0] == '\\' and t[1].isalpha() else t for t in tokens]
    if _CONTROL_SPACE_RE.search(latex):
        tokens = [CONTROL_SPACE if t[0] == '\\' and (len(t) == 1 or t[1].isspace()) else t for t in tokens]
    return tokens


def unglue(tokens):
    """Tokens with the glued ones split into the pieces TeX reads: '\\left(' -> '\\left', '(';
    '\\operatorname*' -> '\\operatorname', '*'; '\\begin{array}' -> '\\begin', '{', 'a', ..., '}'.
    For code that walks TeX's grammar token by token (render.py's mathtext rewrites)."""
    return [p for t in tokens for p in (_PLAIN_RE.findall(t) if len(t) > 2 and t[0] == '\\' else (t,))]


def detokenize(tokens):
    """Tokens -> the space-separated form; tokenize(detokenize(t)) == t for tokens made by tokenize."""
    return ' '.join(tokens)


def read_token_list(path):
    """pre_vocab.txt reader: one token per line, blank lines skipped, duplicates dropped (first kept).
    A line holding only a backslash (or `\\ `) is the control space token `\\ `."""
    tokens, seen = [], set()
    with open(path, encoding='utf-8-sig', newline='\n') as f:
        for line in f:
            line = line.rstrip('\r\n')
            if not line.strip():
                continue
            tok = line.strip()
            if tok == '\\':
                tok = CONTROL_SPACE
            if tok not in seen:
                seen.add(tok)
                tokens.append(tok)
    return tokens


def vocab_coverage(token_lists, known):
    """Share of token occurrences in `token_lists` that are in `known` (1.0 for no tokens), and a Counter
    of the missing ones. Example: [['a', 'b'], ['a', 'c']] with known {'a', 'b'} -> (0.75, {'c': 1})."""
    known = set(known)
    missing = Counter(t for toks in token_lists for t in toks if t not in known)
    total = sum(len(toks) for toks in token_lists)
    return (1.0 - sum(missing.values()) / total if total else 1.0), missing


class Vocab:
    """Token <-> id. itos = specials (<pad> <sos> <eos> <unk>, ids 0-3) + pre_vocab + training tokens.
    The list travels inside every checkpoint; test time uses it as stored."""

    def __init__(self, itos):
        itos = list(itos)
        if tuple(itos[:len(SPECIALS)]) != SPECIALS:
            raise ValueError(f'a vocab must start with the specials {list(SPECIALS)}, got {itos[:len(SPECIALS)]}')
        bad = [t for t in itos if not isinstance(t, str) or not t]
        if bad:
            raise ValueError(f'vocab entries must be non-empty strings, got {bad[:5]}')
        dup = [t for t, n in Counter(itos).items() if n > 1]
        if dup:
            raise ValueError(f'vocab has duplicate tokens: {dup[:10]}')
        self.itos = itos
        self.stoi = {t: i for i, t in enumerate(itos)}

    @classmethod
    def build(cls, pre_vocab, token_lists):
        """Specials + pre_vocab (in its order) + tokens of `token_lists` not in it (first-seen order)."""
        itos = list(SPECIALS)
        seen = set(itos)
        for t in pre_vocab:
            if t not in seen:
                seen.add(t)
                itos.append(t)
        return cls(itos).extend(token_lists)

    def extend(self, token_lists):
        """A new Vocab: old ids unchanged, unseen tokens appended in first-seen order."""
        itos = list(self.itos)
        seen = set(itos)
        for tokens in token_lists:
            for t in tokens:
                if t not in seen:
                    seen.add(t)
                    itos.append(t)
        return Vocab(itos)

    def encode(self, tokens, add_sos_eos=True):
        """Tokens -> ids; unknown tokens -> UNK; [SOS] + ids + [EOS] when add_sos_eos."""
        get = self.stoi.get
        ids = [get(t, UNK) for t in tokens]
        return [SOS] + ids + [EOS] if add_sos_eos else ids

    def decode(self, ids):
        """Ids (list or 1-D tensor) -> tokens; drops SOS/PAD, stops at EOS; out-of-range ids -> '<unk>'."""
        if hasattr(ids, 'tolist'):
            ids = ids.tolist()
        out, n = [], len(self.itos)
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i in (SOS, PAD):
                continue
            out.append(self.itos[i] if 0 <= i < n else SPECIALS[UNK])
        return out

    def coverage(self, token_lists):
        """Fraction of the tokens of `token_lists` that are in the vocab (1.0 for none)."""
        n = known = 0
        for tokens in token_lists:
            n += len(tokens)
            known += sum(t in self.stoi for t in tokens)
        return known / n if n else 1.0

    def __len__(self):
        return len(self.itos)

    def __contains__(self, token):
        return token in self.stoi

    def __eq__(self, other):
        return isinstance(other, Vocab) and self.itos == other.itos

    def __repr__(self):
        return f'Vocab({len(self.itos)} tokens)'


# -----------------------------------------------------------------------------
# data layout and label files

def _check_domain(domain):
    if domain == 'openai' or re.fullmatch(r'[A-Za-z0-9][\w.-]*', domain or ''):
        return domain
    raise ValueError(f'unknown domain {domain!r} (expected one of {", ".join(DOMAINS)})')


def label_path(root_dir, domain, split):
    """openai: <root>/labels/<split>.txt; other domains: <root>/adaptation_data/<domain>_labels/<split>.txt.
    For 'val' (or 'validate') an existing validate.txt is used when val.txt is absent."""
    _check_domain(domain)
    root_dir = os.fspath(root_dir)
    folder = (os.path.join(root_dir, 'labels') if domain == 'openai'
              else os.path.join(root_dir, 'adaptation_data', f'{domain}_labels'))
    if split in ('val', 'validate'):
        val, validate = os.path.join(folder, 'val.txt'), os.path.join(folder, 'validate.txt')
        return validate if not os.path.exists(val) and os.path.exists(validate) else val
    return os.path.join(folder, f'{split}.txt')


def image_dir(root_dir, domain):
    """openai: <root>/images; math: <root>/adaptation_data/math_images_resized; chemistry likewise."""
    _check_domain(domain)
    root_dir = os.fspath(root_dir)
    if domain == 'openai':
        return os.path.join(root_dir, 'images')
    return os.path.join(root_dir, 'adaptation_data', f'{domain}_images_resized')


def read_labels(path, problems):
    """Read a label file: lines `<image name>\\t<LaTeX>` (raw or space-tokenized LaTeX), UTF-8.
    Returns [(image name, tokens, line number)]. Blank lines are skipped silently; a line without a
    tab, an empty image name or formula, a line that is not UTF-8, or an image listed twice is
    reported to `problems` with file and line and skipped. A file in another encoding (UTF-16,
    NUL bytes) is reported once and gives []. Raises FileNotFoundError if the file is missing."""
    path = os.fspath(path)
    with open(path, 'rb') as f:
        raw = f.read()
    head = raw[:4096]
    if raw.startswith((b'\xff\xfe', b'\xfe\xff')) or head.count(b'\x00') * 4 > len(head):
        problems.report(path, None, 'not utf-8', 'not a UTF-8 text file (UTF-16 or binary); save it as UTF-8')
        return []
    if raw.startswith(b'\xef\xbb\xbf'):
        raw = raw[3:]
    out, first_line = [], {}
    for lineno, bline in enumerate(raw.split(b'\n'), 1):
        try:
            line = bline.decode('utf-8')
        except UnicodeDecodeError as e:
            problems.report(path, lineno, 'not utf-8', f'not UTF-8 ({e.reason} at byte {e.start}); line skipped')
            continue
        if not line.strip():
            continue
        if '\x00' in line:
            problems.report(path, lineno, 'not utf-8', 'NUL bytes in the line (binary data?); line skipped')
            continue
        name, tab, latex = line.partition('\t')
        name = name.strip()
        if not tab:
            problems.report(path, lineno, 'line without tab',
                            'no tab between image name and LaTeX; line skipped')
            continue
        if not name:
            problems.report(path, lineno, 'empty image name', 'no image name before the tab; line skipped')
            continue
        tokens = tokenize(latex)
        if not tokens:
            problems.report(path, lineno, 'empty formula', f'empty formula for {name}; line skipped')
            continue
        if name in first_line:
            problems.report(path, lineno, 'duplicate image',
                            f'{name} already listed on line {first_line[name]}; line skipped')
            continue
        first_line[name] = lineno
        out.append((name, tokens, lineno))
    return out


def _missing_root_error(root_dir, domain, split, lpath, idir):
    missing = []
    if not os.path.isdir(root_dir):
        missing.append(f'the folder {root_dir}')
    else:
        if not os.path.isfile(lpath):
            missing.append(f'the label file {lpath}' + (' (or validate.txt)' if split in ('val', 'validate') else ''))
        if not os.path.isdir(idir):
            missing.append(f'the image folder {idir}')
    how = HOW_TO_GET_DATA.format(root=root_dir)
    orig = os.path.join(root_dir, 'adaptation_data', f'{domain}_images')
    if domain != 'openai' and not os.path.isdir(idir) and os.path.isdir(orig):
        how = (f'{orig} exists: resize it with `python3 proc.py --root_dir {root_dir}` '
               f'(k-means into 32 sizes, written to {idir}); or ' + how)
    return DataRootError(f'{domain}/{split} data not found: missing {", ".join(missing)}. To get data: {how}.')


# -----------------------------------------------------------------------------
# overlap between splits

def overlap_with_train(train_tokens, token_lists):
    """Indexes of the formulas of token_lists whose token sequence is also one of train_tokens.
    Example: train [['a'], ['b', 'c']], test [['b', 'c'], ['c'], ['b', 'c']] -> [0, 2]."""
    seen = {tuple(t) for t in train_tokens}
    return [i for i, t in enumerate(token_lists) if tuple(t) in seen]


def split_tokens(root_dir, domain, split, problems=None):
    """[(line number, tokens)] of a split's label file (images are not read), or None without one."""
    path = label_path(root_dir, domain, split)
    if not os.path.isfile(path):
        return None
    return [(lineno, tokens) for _, tokens, lineno in read_labels(path, problems or Problems(quiet=True))]


def overlap_report(root_dir, domain, problems=None, n_examples=3):
    """How many val and test formulas of a domain also occur in its train split (same tokens) ->
    {split: {'n', 'in_train', 'examples': [(line, train line, tokens)]}} for the splits that have a
    label file; {} when train has none."""
    train = split_tokens(root_dir, domain, 'train', problems)
    if train is None:
        return {}
    first_line = {}
    for lineno, tokens in train:
        first_line.setdefault(tuple(tokens), lineno)
    out = {}
    for split in ('val', 'test'):
        rows = split_tokens(root_dir, domain, split, problems)
        if rows is None:
            continue
        hits = overlap_with_train([t for _, t in train], [t for _, t in rows])
        out[split] = {'n': len(rows), 'in_train': len(hits), 'label_file': label_path(root_dir, domain, split),
                      'examples': [(rows[i][0], first_line[tuple(rows[i][1])], rows[i][1]) for i in hits[:n_examples]]}
    return out


def format_overlap(domain, report, train_file):
    """overlap_report as printable lines."""
    if not report:
        return [f'{domain}: no train labels ({train_file}), no overlap to count']
    counts = ', '.join(f'{r["in_train"]} of {r["n"]} {s}' for s, r in report.items())
    lines = [f'{domain}: {counts} formulas also in train (same tokens, {train_file})']
    for split, r in report.items():
        for line, train_line, tokens in r['examples']:
            text = detokenize(tokens)
            lines.append(f'  {r["label_file"]}:{line} = train line {train_line}: '
                         f'{text if len(text) <= 80 else text[:77] + "..."}')
    return lines


# -----------------------------------------------------------------------------
# item seeds and augmentation

_M64 = (1 << 64) - 1


def _splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def item_seed(*values):
    """A well-mixed 63-bit seed from integers, e.g. item_seed(seed, epoch, index) (splitmix64 chain).
    Used so that an item's augmentation depends only on (seed, epoch, index, view), not on which
    DataLoader worker fetches it or whether the epoch was resumed."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _M64))
    return h >> 1


class Augment:
    """Random, label-preserving perturbations of a formula image (1, H, W), ink = 1, background = 0:
    a small affine (rotation, scale, translation, shear; background fill), stroke thickness
    (blend towards a 3x3 dilation or erosion), Gaussian blur, lighter ink (contrast) and pixel noise.
    Never flips (a mirrored formula is another formula); output size == input size.

    The two views of the mean teacher (Tarvainen & Valpola, "Mean teachers are better role models",
    NeurIPS 2017) are two independent draws; the paper's perturbations are translations and input
    noise, extended here with the scan-like changes formula images show (blur, stroke width, ink).

    strength scales every range (0 = identity, 1 = defaults below). All randomness comes from the
    given torch.Generator, so a seed gives the same result in any process."""

    def __init__(self, strength=1.0, rotate=2.0, scale=(0.9, 1.05), translate=(0.02, 0.05), shear=2.0,
                 thickness=0.3, blur_p=0.5, blur_sigma=0.6, contrast=0.3, noise=0.04, tries=4):
        self.strength = float(strength)
        self.rotate = rotate                # degrees, +-
        self.scale = scale                  # scale range at strength 1
        self.translate = translate          # fraction of (W, H), +-
        self.shear = shear                  # degrees, +- (x shear)
        self.thickness = thickness          # max blend towards dilation / erosion
        self.blur_p, self.blur_sigma = blur_p, blur_sigma
        self.contrast = contrast            # ink darkness reduced by up to this fraction
        self.noise = noise                  # max std of the Gaussian pixel noise
        self.tries = tries                  # geometric draws tried before leaving the geometry unchanged

    def __repr__(self):
        return f'Augment(strength={self.strength})'

    def __call__(self, img, generator):
        s = self.strength
        if s <= 0:
            return img
        import torch.nn.functional as F
        import torchvision.transforms.v2.functional as TF
        from torchvision.transforms import InterpolationMode

        def u(lo, hi):
            return lo + (hi - lo) * float(torch.rand((), generator=generator))

        _, H, W = img.shape
        # Formula images are cropped tight (Deng pads 8 px, 4 after downsampling), so a shift, rotation or
        # zoom can push a symbol off the canvas and make the label wrong. A draw that moves ink onto the
        # border (where the input has none) is redrawn, weaker each time; after `tries` the geometry is
        # left unchanged. Example: 4 px margins on a 360 px wide image, shift 6 px -> redrawn.
        x, border_ink = img, _border_ink(img)
        for k in range(self.tries):
            g = s * 0.5 ** k
            angle = u(-1, 1) * self.rotate * g
            scale = 1.0 + u(self.scale[0] - 1.0, self.scale[1] - 1.0) * g
            tx, ty = u(-1, 1) * self.translate[0] * W * g, u(-1, 1) * self.translate[1] * H * g
            shear = u(-1, 1) * self.shear * g
            y = TF.affine(img, angle=angle, translate=[tx, ty], scale=scale, shear=[shear, 0.0],
                          interpolation=InterpolationMode.BILINEAR, fill=[0.0])
            if border_ink or not _border_ink(y):
                x = y
                break
        t = u(-1, 1) * self.thickness * s
        x4 = x[None]                                                    # (1, 1, H, W) for pooling
        if t > 0:      # thicker strokes
            x = x + t * (F.max_pool2d(x4, 3, 1, 1)[0] - x)
        else:          # thinner strokes
            x = x - t * (-F.max_pool2d(-x4, 3, 1, 1)[0] - x)
        if u(0, 1) < self.blur_p:
            sigma = u(0.1, 0.1 + self.blur_sigma * s)
            k = 3 if sigma < 0.8 else 5
            if min(H, W) > k:
                x = TF.gaussian_blur(x, kernel_size=[k, k], sigma=[sigma, sigma])
        x = x * (1.0 - u(0, self.contrast) * s)
        std = u(0, self.noise) * s
        if std > 0:
            x = x + std * torch.randn(x.shape, generator=generator)
        return x.clamp_(0.0, 1.0)


def _border_ink(x, level=0.25):
    """True if the (1, H, W) image (ink = 1) has ink above `level` in its outermost rows or columns."""
    return bool((x[:, [0, -1], :] > level).any() or (x[:, :, [0, -1]] > level).any())


# -----------------------------------------------------------------------------
# datasets

class _Recorder:
    """Forwards reports to a Problems and keeps them (so a cache can replay them)."""

    def __init__(self, problems):
        self.problems, self.entries = problems, []

    def report(self, path, line, kind, message):
        self.entries.append((os.fspath(path), line, kind, message))
        return self.problems.report(path, line, kind, message)


def _check_images(paths):
    """[(H, W) or ImageError] per path, in order (threads: mostly file I/O and CRC)."""
    def one(p):
        try:
            return image_size(p)
        except ImageError as e:
            return e
    if len(paths) < 64:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(DECODE_THREADS) as ex:
        return list(ex.map(one, paths, chunksize=64))


def _decode_images(paths, progress=''):
    """Yields uint8 (H, W) arrays or ImageError, in order (threads: Pillow decodes without the GIL)."""
    def one(p):
        try:
            return load_gray(p)
        except ImageError as e:
            return e
    bar = None
    if progress and len(paths) >= 2000:
        from tqdm import tqdm
        bar = tqdm(total=len(paths), desc=progress, unit='img', leave=False, mininterval=1.0)
    with ThreadPoolExecutor(DECODE_THREADS) as ex:
        for r in ex.map(one, paths, chunksize=32):
            if bar is not None:
                bar.update(1)
            yield r
    if bar is not None:
        bar.close()


class _ImageItems(torch.utils.data.Dataset):
    """What FormulaDataset and UnlabeledDataset share: file names, sizes, optional decoded pixels
    (one uint8 buffer with per-image offsets), and the item dict with its augmented views."""

    def _init_items(self, augment, views, problems):
        if views not in (1, 2):
            raise ValueError(f'views must be 1 or 2, got {views}')
        self.augment, self.views = augment, views
        self.problems = problems if problems is not None else Problems()
        self.names, self.sizes = [], []
        self._offsets = None      # int64 (N,) start of each image in the pixel buffer, or None: read files
        self._pixels = None       # uint8 (total,) buffer (np.memmap of the cache file or an array)
        self._pixel_file = None   # (path, offset, length) to re-open the memmap in another process
        self.boxes = None         # trim_(): per image its ink box (or None: blank), else None
        self.stored_sizes = None  # trim_(): per image its (H, W) as stored (sizes are then the trimmed ones)

    def path(self, i):
        return os.path.join(self.img_dir, self.names[i])

    def _log(self, *args, **kw):
        """print, unless the problems reporter is quiet (e.g. DDP ranks other than 0)."""
        if not self.problems.quiet:
            print(*args, **kw)

    def __len__(self):
        return len(self.names)

    def __getstate__(self):       # DataLoader workers started with spawn: re-open the memmap, don't copy it
        state = self.__dict__.copy()
        if self._pixel_file is not None:
            state['_pixels'] = None
        return state

    def _buffer(self):
        if self._pixels is None and self._pixel_file is not None:
            path, offset, length = self._pixel_file
            self._pixels = np.memmap(path, dtype=np.uint8, mode='r', offset=offset, shape=(length,))
        return self._pixels

    def gray(self, i):
        """Image i as uint8 (H, W), white = 255 (from the cache or the file; after trim_() trimmed to its
        ink, of size sizes[i]). Raises ImageError."""
        a = self._stored(i)
        box = None if self.boxes is None else self.boxes[i]       # None: not trimmed, or blank / unreadable
        return a if box is None else trim_image(a, box)

    def _stored(self, i):
        h, w = (self.sizes if self.stored_sizes is None else self.stored_sizes)[i]
        if self._offsets is not None:
            o = int(self._offsets[i])
            return np.array(self._buffer()[o:o + h * w]).reshape(h, w)
        a = load_gray(self.path(i))
        if a.shape != (h, w):
            raise ImageError(self.path(i), f'changed size since the data set was loaded ({h}x{w} -> '
                                           f'{a.shape[0]}x{a.shape[1]})')
        return a

    def trim_(self):
        """--trim: from now on every image is its ink plus TRIM_PAD px, on a page rounded up to
        TRIM_MULTIPLE where that is smaller (trim_image), and `sizes` are those trimmed sizes, so that
        batches group them.
        Reads every image once (from the cache: seconds per 10,000). Blank images stay as they are;
        unreadable ones too (they are reported when fetched). -> self."""
        if self.boxes is not None:
            return self
        t0 = time.time()

        def box(i):
            try:
                return trim_box(self._stored(i))
            except ImageError:
                return None
        with ThreadPoolExecutor(DECODE_THREADS) as ex:
            boxes = list(ex.map(box, range(len(self)), chunksize=64))
        before = sum(h * w for h, w in self.sizes)
        self.stored_sizes, self.boxes = list(self.sizes), boxes
        self.sizes = [s if b is None else trimmed_size(b, s) for s, b in zip(self.stored_sizes, boxes)]
        self._per_item = type(self)._per_item + ('stored_sizes', 'boxes')
        if len(self):
            after = sum(h * w for h, w in self.sizes)
            self._log(f'{getattr(self, "label_file", self.img_dir)}: trimmed {len(self)} images to their ink in '
                      f'{time.time() - t0:.1f} s: {after / max(before, 1):.0%} of the pixels, '
                      f'{len(set(self.stored_sizes))} -> {len(set(self.sizes))} sizes'
                      + (f', {boxes.count(None)} blank or unreadable left as they are' if None in boxes else ''))
        return self

    def _item(self, key):
        """-> (index, item dict with 'index', 'image' and 'image2' (views == 2)), or an item
        {'index', 'error'} if the image cannot be decoded (reported; collate drops it)."""
        if isinstance(key, (tuple, list)):
            index, seed = int(key[0]), int(key[1])
        else:
            index, seed = int(key), None
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f'index {index} out of range for {len(self)} items')
        try:
            x = to_tensor(self.gray(index))                               # (1, H, W), ink = 1
        except ImageError as e:
            self.problems.report(e.path, None, 'corrupt image', f'{e.reason}; image skipped')
            return index, {'index': index, 'error': str(e)}
        item = {'index': index}
        views = []
        for v in range(self.views):
            if self.augment is None:
                views.append(x)
                continue
            if seed is None:         # no seed from make_loader: a fresh draw
                seed = int(torch.randint(0, 2 ** 62, ()))
            g = torch.Generator().manual_seed(item_seed(seed, v))
            views.append(self.augment(x, g))
        item['image'] = views[0]
        if self.views == 2:
            item['image2'] = views[1]
        return index, item

    def select(self, indices):
        """A new data set of the given items (same images, cache and settings), e.g. ds.select(range(100))."""
        indices = [int(i) for i in indices]
        sub = copy.copy(self)
        for name in self._per_item:
            values = getattr(self, name)
            setattr(sub, name, [values[i] for i in indices])
        if self._offsets is not None:
            sub._offsets = self._offsets[np.asarray(indices, dtype=np.int64)]
        return sub

    _per_item = ('names', 'sizes')


class FormulaDataset(_ImageItems):
    """Labelled formula images of one domain and split of a data root (layout: docs/formats.md).

    Attributes: names (image file names), tokens (token lists), sizes ((H, W) per image), lines (line
    numbers in the label file), label_file, img_dir, vocab (set it before fetching items to get 'ids').

    Bad input (missing or unreadable image, bad label line) is reported to `problems` with file and line
    and skipped. max_tokens drops longer formulas (counted in `dropped_long`).

    cache=False: image sizes come from the file headers (PNG files are checked end to end without
    decoding); pixels are decoded when an item is fetched.
    trim=True: every image is cropped to its ink (plus TRIM_PAD px, rounded up to TRIM_MULTIPLE where
    that is smaller; see trimmed_size), and `sizes` are the trimmed sizes.
    cache=True: all images are decoded once into <root>/.cache/<domain>_<split>.bin (see _write_cache
    for the layout), which later runs memory-map. The cache is keyed by a fingerprint of the label
    file's bytes and every listed image's (name, size, mtime_ns): a change is named and the cache
    rebuilt; a missing or corrupt cache is (re)built. Concurrent processes (DDP ranks) take turns
    through a lock file, so the cache is built once.

    Item (key = index or (index, seed); the seed drives the augmentation):
      {'index': int, 'image': (1, H, W) float32 (ink = 1), 'image2': (1, H, W) (views == 2 only),
       'ids': LongTensor (T,) = [SOS] + ids + [EOS] (only when vocab is set)}
    """

    _per_item = ('names', 'sizes', 'tokens', 'lines')

    def __init__(self, root_dir, domain, split, vocab=None, cache=False, augment=None, views=1,
                 problems=None, max_tokens=None, trim=False):
        self._init_items(augment, views, problems)
        self.root_dir, self.domain, self.split = os.fspath(root_dir), _check_domain(domain), split
        self.vocab = vocab
        self.label_file = label_path(self.root_dir, domain, split)
        self.img_dir = image_dir(self.root_dir, domain)
        if not (os.path.isfile(self.label_file) and os.path.isdir(self.img_dir)):
            raise _missing_root_error(self.root_dir, domain, split, self.label_file, self.img_dir)
        self.tokens, self.lines = [], []
        self.dropped_long = 0
        before = len(self.problems)
        t0 = time.time()
        if cache:
            self._load_cached()
        else:
            self._load_plain()
        if max_tokens is not None:
            keep = [i for i, t in enumerate(self.tokens) if len(t) <= max_tokens]
            self.dropped_long = len(self.tokens) - len(keep)
            if self.dropped_long:
                self._log(f'{self.label_file}: dropped {self.dropped_long} of {len(self.tokens)} formulas longer '
                          f'than {max_tokens} tokens')
                kept = self.select(keep)
                self.__dict__.update({k: kept.__dict__[k] for k in (*self._per_item, '_offsets')})
        if trim:
            self.trim_()
        self.load_seconds = time.time() - t0
        skipped = len(self.problems) - before
        if skipped:
            self._log(f'{self.label_file}: {skipped} problem(s), {len(self)} usable samples')
        if not len(self):
            self._log(f'{self.label_file}: no usable samples', file=sys.stderr)

    def __repr__(self):
        return (f'FormulaDataset({self.domain}/{self.split}: {len(self)} samples, '
                f'{len(set(self.sizes))} sizes, cache={self._offsets is not None}, trim={self.boxes is not None})')

    def __getitem__(self, key):
        index, item = self._item(key)
        if 'error' not in item and self.vocab is not None:
            item['ids'] = torch.tensor(self.vocab.encode(self.tokens[index]), dtype=torch.long)   # (T,)
        return item

    # -- plain load: label file + image headers
    def _load_plain(self):
        rows = read_labels(self.label_file, self.problems)
        paths = [os.path.join(self.img_dir, name) for name, _, _ in rows]
        for (name, tokens, lineno), r in zip(rows, _check_images(paths)):
            if isinstance(r, ImageError):
                self._report_image(r, lineno, self.problems)
                continue
            self.names.append(name)
            self.tokens.append(tokens)
            self.lines.append(lineno)
            self.sizes.append(r)

    def _report_image(self, err, lineno, problems):
        if err.reason == 'file not found':
            problems.report(self.label_file, lineno, 'missing image',
                            f'image {err.path} not found; sample skipped')
        else:
            problems.report(self.label_file, lineno, 'corrupt image', f'{err}; sample skipped')

    # -- cached load
    @property
    def cache_file(self):
        return os.path.join(self.root_dir, '.cache', f'{self.domain}_{self.split}.bin')

    def _load_cached(self):
        path = self.cache_file
        with open(self.label_file, 'rb') as f:
            label_hash = hashlib.blake2b(f.read(), digest_size=16).hexdigest()
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            lock = _file_lock(path[:-len('.bin')] + '.lock')
        except OSError as e:
            self._log(f'cannot use the cache folder {os.path.dirname(path)} ({e}); '
                      'loading without writing a cache')
            self._build(label_hash, None)
            return
        with lock:
            meta = None
            if os.path.exists(path):
                try:
                    meta = _read_cache_meta(path)
                except (OSError, ValueError) as e:
                    self._log(f'cache {path} is unreadable ({e}); rebuilding it')
            if meta is not None:
                why = self._stale(meta, label_hash)
                if why is None:
                    self._use_cache(path, meta)
                    return
                self._log(f'cache {path} is out of date ({why}); rebuilding it')
            elif not os.path.exists(path):
                self._log(f'building cache {path}')
            self._build(label_hash, path)

    def _stale(self, meta, label_hash):
        """None if the cache matches the label file and the images, else what changed (a phrase)."""
        if meta.get('version') != CACHE_VERSION:
            return f'cache format {meta.get("version")}, this code writes {CACHE_VERSION}'
        reasons = []
        if meta['label_hash'] != label_hash:
            reasons.append(f'label file {self.label_file} changed')
        names = meta['stat_names'].split('\n') if meta['stat_names'] else []
        changed = [n for n, old in zip(names, meta['stat']) if list(_stat(os.path.join(self.img_dir, n))) != old]
        if changed:
            shown = ', '.join(changed[:3]) + (', ...' if len(changed) > 3 else '')
            reasons.append(f'{len(changed)} image file(s) changed, added or removed: {shown}')
        return '; '.join(reasons) or None

    def _build(self, label_hash, path):
        rec = _Recorder(self.problems)
        rows = read_labels(self.label_file, rec)
        names = [name for name, _, _ in rows]
        stats = [list(_stat(os.path.join(self.img_dir, n))) for n in names]   # before decoding: safe side
        t0 = time.time()
        keep, shapes = [], []

        def decoded(sink):
            for (name, tokens, lineno), a in zip(rows, _decode_images(
                    [os.path.join(self.img_dir, n) for n in names],
                    progress='' if self.problems.quiet else f'decoding {self.domain}/{self.split}')):
                if isinstance(a, ImageError):
                    self._report_image(a, lineno, rec)
                    continue
                keep.append((name, tokens, lineno))
                shapes.append(a.shape)
                sink.write(memoryview(np.ascontiguousarray(a)).cast('B'))

        meta = {'version': CACHE_VERSION, 'domain': self.domain, 'split': self.split,
                'label_file': os.path.relpath(self.label_file, self.root_dir), 'label_hash': label_hash,
                'stat_names': '\n'.join(names), 'stat': stats}
        written = False
        if path is not None:
            try:
                atomic_write(path, lambda tmp: _write_cache(tmp, decoded, keep, shapes, meta, rec, self.root_dir))
                written = True
            except OSError as e:
                self._log(f'cannot write cache {path} ({e}); continuing without it')
                keep.clear()
                shapes.clear()
                rec.entries.clear()
        if written:
            self._use_cache(path, _read_cache_meta(path), replay=False)
        else:
            import io
            buf = io.BytesIO()
            decoded(buf)
            self._set_items(keep, shapes, np.frombuffer(buf.getbuffer(), dtype=np.uint8), None)
        dt = time.time() - t0
        if len(names):
            self._log(f'{self.domain}/{self.split}: decoded {len(names)} images in {dt:.1f} s '
                      f'({len(names) / max(dt, 1e-9):.0f} images/s)' + (f'; cached in {path}' if written else ''))

    def _set_items(self, rows, shapes, pixels, pixel_file):
        self.names = [r[0] for r in rows]
        self.tokens = [r[1] for r in rows]
        self.lines = [r[2] for r in rows]
        self.sizes = [(int(h), int(w)) for h, w in shapes]
        sizes = np.asarray(self.sizes, dtype=np.int64).reshape(-1, 2)
        self._offsets = np.concatenate([[0], np.cumsum(sizes[:, 0] * sizes[:, 1])[:-1]]).astype(np.int64) \
            if len(sizes) else np.zeros(0, np.int64)
        self._pixels, self._pixel_file = pixels, pixel_file

    def _use_cache(self, path, meta, replay=True):
        shapes = meta['shapes']
        names = meta['names'].split('\n') if meta['n'] else []
        tokens = [t.split('\t') for t in meta['tokens'].split('\n')] if meta['n'] else []
        rows = list(zip(names, tokens, meta['lines']))
        pixel_file = (path, meta['pixel_offset'], meta['pixel_bytes'])
        self._set_items(rows, shapes, None, pixel_file if meta['pixel_bytes'] else None)
        if not meta['pixel_bytes']:
            self._pixels = np.zeros(0, np.uint8)
        if replay:               # the problems found when the cache was built, reported again for this run
            for p, line, kind, message in meta['problems']:
                self.problems.report(os.path.join(self.root_dir, p), line, kind, message)


def _stat(path):
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


@contextlib.contextmanager
def _locked(f):
    try:
        import fcntl
    except ImportError:          # not on POSIX: no lock (concurrent builders then both write, atomically)
        yield
        return
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _file_lock_cm(f):
    try:
        with _locked(f):
            yield
    finally:
        f.close()


def _file_lock(path):
    """An exclusive lock on `path` (created if needed) for a `with` block."""
    return _file_lock_cm(open(path, 'a+b'))


# .cache file layout (little-endian), written in one pass and then renamed into place:
#   b'I2LCACHE' | u32 version | u32 0 | pixels: uint8, every image's H*W bytes row-major, back to back |
#   zero padding to 8 | shapes: int32 (N, 2) (H, W) | JSON header (UTF-8) |
#   trailer: u64 shapes_offset | u64 N | u64 json_offset | u64 json_length | u32 crc32(json) | u32 0 | b'I2LEND!!'
# offset of image i = 16 + sum of H*W of the images before it. JSON header: version, domain, split,
# label_file, label_hash, names ('\n'-joined), tokens ('\n'-joined items of '\t'-joined tokens: no token
# holds a tab or newline), lines, stat_names + stat ([size, mtime_ns] per listed image: the fingerprint),
# problems (path relative to the root, line, kind, message), pixel_bytes.
_MAGIC, _END = b'I2LCACHE', b'I2LEND!!'
_TRAILER = struct.Struct('<QQQQII8s')
_PIXEL_OFFSET = 16


def _write_cache(tmp, decoded, keep, shapes, meta, rec, root_dir):
    import zlib
    with open(tmp, 'wb') as f:
        f.write(_MAGIC + struct.pack('<II', CACHE_VERSION, 0))
        decoded(f)
        pixel_bytes = f.tell() - _PIXEL_OFFSET
        f.write(b'\0' * (-f.tell() % 8))
        shapes_offset = f.tell()
        f.write(np.asarray(shapes, dtype='<i4').reshape(-1, 2).tobytes())
        meta = dict(meta, n=len(keep), names='\n'.join(r[0] for r in keep),
                    tokens='\n'.join('\t'.join(r[1]) for r in keep), lines=[r[2] for r in keep],
                    pixel_bytes=pixel_bytes, pixel_offset=_PIXEL_OFFSET,
                    problems=[[os.path.relpath(p, root_dir), line, kind, msg] for p, line, kind, msg in rec.entries])
        js = json.dumps(meta, ensure_ascii=False).encode('utf-8')
        json_offset = f.tell()
        f.write(js)
        f.write(_TRAILER.pack(shapes_offset, len(keep), json_offset, len(js), zlib.crc32(js), 0, _END))


def _read_cache_meta(path):
    """The JSON header of a cache file plus 'shapes'; ValueError if the file is damaged."""
    import zlib
    size = os.path.getsize(path)
    if size < _PIXEL_OFFSET + _TRAILER.size:
        raise ValueError('file too short')
    with open(path, 'rb') as f:
        head = f.read(_PIXEL_OFFSET)
        if head[:8] != _MAGIC:
            raise ValueError('not a cache file')
        f.seek(size - _TRAILER.size)
        shapes_offset, n, json_offset, json_len, crc, _, end = _TRAILER.unpack(f.read(_TRAILER.size))
        if end != _END or json_offset + json_len + _TRAILER.size != size or shapes_offset + 8 * n != json_offset:
            raise ValueError('damaged trailer')
        f.seek(json_offset)
        js = f.read(json_len)
        if zlib.crc32(js) != crc:
            raise ValueError('damaged header (checksum)')
        meta = json.loads(js.decode('utf-8'))
        f.seek(shapes_offset)
        shapes = np.frombuffer(f.read(8 * n), dtype='<i4').reshape(-1, 2)
    if meta.get('version') != CACHE_VERSION:
        return meta              # _stale names the version change
    if meta['n'] != n or len(meta['lines']) != n or (shapes <= 0).any() or \
            int((shapes[:, 0].astype(np.int64) * shapes[:, 1]).sum()) != meta['pixel_bytes'] or \
            _PIXEL_OFFSET + meta['pixel_bytes'] > shapes_offset:
        raise ValueError('inconsistent sizes')
    meta['shapes'] = shapes.tolist()
    return meta


class UnlabeledDataset(_ImageItems):
    """Every image file under a folder (recursive, sorted), for --unlabeled (mean-teacher consistency
    on target-domain images without labels). Unreadable files are reported and skipped.
    Attributes: names (paths relative to img_dir), sizes ((H, W)), img_dir.
    Item: {'index', 'image', 'image2' (views == 2)}, as FormulaDataset without 'ids'."""

    def __init__(self, img_dir, augment=None, views=2, problems=None, trim=False):
        self._init_items(augment, views, problems)
        self.img_dir = os.fspath(img_dir)
        if not os.path.isdir(self.img_dir):
            raise DataRootError(f'image folder {self.img_dir} not found')
        names = []
        for folder, dirs, files in os.walk(self.img_dir):
            dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
            for f in files:
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.'):
                    names.append(os.path.relpath(os.path.join(folder, f), self.img_dir))
        names.sort()
        for name, r in zip(names, _check_images([os.path.join(self.img_dir, n) for n in names])):
            if isinstance(r, ImageError):
                self.problems.report(r.path, None, 'corrupt image', f'{r.reason}; image skipped')
                continue
            self.names.append(name)
            self.sizes.append(r)
        if trim:
            self.trim_()
        if not self.names:
            self._log(f'{self.img_dir}: no readable images ({", ".join(IMAGE_EXTENSIONS)})', file=sys.stderr)
        n_sizes = len(set(self.sizes))
        if n_sizes > 64:
            self._log(f'{self.img_dir}: {n_sizes} distinct image sizes make small batches; '
                      f'`python3 proc.py --img_root {self.img_dir} --out DIR` clusters them into 32 sizes')

    def __repr__(self):
        return f'UnlabeledDataset({self.img_dir}: {len(self)} images, {len(set(self.sizes))} sizes)'

    def __getitem__(self, key):
        return self._item(key)[1]


# -----------------------------------------------------------------------------
# batch samplers

def _plan_batches(group_sizes, batch_size, num_replicas):
    """Batch sizes per group: each group cut into batches of `batch_size` (the last one smaller), then
    the largest batch split in two halves until the batch count divides by num_replicas, so every DDP
    rank gets the same number of batches (a rank with one batch fewer would hang the others).

    Worked example: groups of 10 and 3 images, batch_size 4, 3 replicas.
      cut:   [4, 4, 2] [3]          -> 4 batches, 4 % 3 != 0
      split: [2, 2, 4, 2] [3]       -> 5 batches (the first largest 4 split into 2 + 2)
      split: [2, 2, 2, 2, 2] [3]    -> 6 batches: 2 per rank; all 13 images used once.
    Splitting is only impossible when every batch has one image; a multiple of num_replicas between the
    batch count and the image count must exist, else ValueError."""
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    if num_replicas < 1:
        raise ValueError(f'num_replicas must be >= 1, got {num_replicas}')
    plan = [[min(batch_size, n - s) for s in range(0, n, batch_size)] for n in group_sizes]
    n_images = sum(group_sizes)
    total = sum(len(p) for p in plan)
    if n_images == 0:
        raise ValueError('no samples to batch (the data set is empty)')
    if n_images < num_replicas:
        raise ValueError(f'{n_images} images cannot be shared by {num_replicas} processes (each needs at '
                         f'least one batch): use fewer processes or more data')
    target = -(-total // num_replicas) * num_replicas
    if target > n_images:
        raise ValueError(f'{n_images} images in {total} batches cannot be split into a multiple of '
                         f'{num_replicas} batches of one size each: use fewer processes, a smaller '
                         f'batch size, or --split_batch')
    while total % num_replicas:
        g, j = max(((g, j) for g, p in enumerate(plan) for j in range(len(p))),
                   key=lambda gj: (plan[gj[0]][gj[1]], -gj[0], -gj[1]))
        b = plan[g][j]
        plan[g][j:j + 1] = [b - b // 2, b // 2]
        total += 1
    return plan


class BucketBatchSampler:
    """Batches of indices in which every image has the same (H, W); every index exactly once per epoch
    across all ranks; rank r takes batches r, r + R, r + 2R, ... of the epoch's batch list (disjoint
    shards, equal counts: see _plan_batches).

    Per epoch (torch.Generator seeded with seed + epoch): the indices of each size group are permuted
    and cut into batches, then the order of all batches is permuted. shuffle=False keeps index order
    within a group and groups in order of size. Example, batch_size 2, sizes
    [A, B, A, A, B] (A, B two image sizes): groups A = [0, 2, 3], B = [1, 4]; cut A -> [0, 2] [3],
    B -> [1, 4]; three batches, shuffled, e.g. [1, 4] [3] [0, 2].

    set_epoch(epoch, skip_batches) selects the epoch; skip_batches drops the first batches of this
    rank's list (a run resumed mid-epoch continues with the same order). len() is the full number of
    batches per rank per epoch, the same on every rank and every epoch.

    equal_shards=False (evaluation: no rank waits for another inside a step) cuts the batches as for one
    process and deals them out the same way, so the ranks may get different numbers of batches (some
    none at all); len() is this rank's count."""

    def __init__(self, sizes, batch_size, shuffle=True, seed=0, num_replicas=1, rank=0, equal_shards=True,
                 curriculum=0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} not in [0, {num_replicas})')
        self.batch_size, self.shuffle, self.seed = int(batch_size), bool(shuffle), int(seed)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.epoch, self.skip_batches = 0, 0
        self.n, self.curriculum = len(sizes), int(curriculum)
        self._area = torch.tensor([int(s[0]) * int(s[1]) for s in sizes], dtype=torch.float64)   # (n,) pixels
        self._groups = self._make_groups([tuple(int(v) for v in s) for s in sizes])
        replicas = self.num_replicas if equal_shards else 1
        self._plan = _plan_batches([len(g) for g in self._groups], self.batch_size, replicas)
        total = sum(len(p) for p in self._plan)
        self._len = len(range(self.rank, total, self.num_replicas))

    def _make_groups(self, sizes):
        by_size = {}
        for i, s in enumerate(sizes):
            by_size.setdefault(s, []).append(i)
        return [torch.tensor(by_size[s], dtype=torch.long) for s in sorted(by_size)]

    def set_epoch(self, epoch, skip_batches=0):
        self.epoch, self.skip_batches = int(epoch), int(skip_batches)

    def _epoch_batches(self, g):
        batches = []
        for idx, plan in zip(self._groups, self._plan):
            if self.shuffle:
                idx = idx[torch.randperm(len(idx), generator=g)]
            batches += _cut(idx, plan)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def _ordered(self, batches):
        """In a curriculum epoch (epoch < curriculum): batches sorted by their images' mean area, small
        first (stable: shuffled order within equal areas). A formula's image grows with its length, so
        the first steps see the shortest formulas (curriculum learning, Bengio et al. ICML 2009).
        Example: batches of sizes 40x150, 32x90, 40x150, 48x300 -> 32x90, 40x150, 40x150, 48x300."""
        if self.epoch >= self.curriculum:
            return batches
        return sorted(batches, key=lambda b: float(self._area[b].mean()))

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        mine = self._ordered(self._epoch_batches(g))[self.rank::self.num_replicas]
        yield from mine[self.skip_batches:]

    def __len__(self):
        return self._len


def _cut(idx, plan):
    out, pos = [], 0
    for b in plan:
        out.append(idx[pos:pos + b].tolist())
        pos += b
    return out


class SplitBatchSampler(BucketBatchSampler):
    """--split_batch: random batches of batch_size indices of mixed image sizes (collate splits each into
    same-size micro-batches; the train loop accumulates gradients over them). Same sharding, epochs,
    skip_batches and len() rules as BucketBatchSampler."""

    def _make_groups(self, sizes):
        return [torch.arange(len(sizes), dtype=torch.long)]

    def _epoch_batches(self, g):
        idx = self._groups[0]
        if self.shuffle:
            idx = idx[torch.randperm(len(idx), generator=g)]
        return _cut(idx, self._plan[0])


# -----------------------------------------------------------------------------
# collate and loader

def collate(items):
    """Items -> micro-batches, one per distinct image size, in first-seen order; items with 'error'
    (unreadable images, already reported) are dropped. Each micro-batch:
      {'images': (B, 1, H, W), 'images2': (B, 1, H, W) or None,
       'tgt': LongTensor (B, T) PAD-padded or None, 'tgt_pad_mask': BoolTensor (B, T) True at padding or None,
       'indices': LongTensor (B,)}
    Example: items of sizes [32x128, 64x256, 32x128] -> two micro-batches, of items [0, 2] and [1];
    ids [SOS a b EOS] and [SOS c EOS] -> tgt [[1 a b 2], [1 c 2 0]], mask [[F F F F], [F F F T]]."""
    groups = {}
    for it in items:
        if 'error' in it:
            continue
        groups.setdefault(tuple(it['image'].shape[-2:]), []).append(it)
    out = []
    for its in groups.values():
        mb = {'images': torch.stack([it['image'] for it in its]),                # (B, 1, H, W)
              'images2': torch.stack([it['image2'] for it in its]) if 'image2' in its[0] else None,
              'tgt': None, 'tgt_pad_mask': None,
              'indices': torch.tensor([it['index'] for it in its], dtype=torch.long)}
        if 'ids' in its[0]:
            lengths = [len(it['ids']) for it in its]
            tgt = torch.full((len(its), max(lengths)), PAD, dtype=torch.long)  # (B, T)
            for row, it in enumerate(its):
                tgt[row, :lengths[row]] = it['ids']
            mb['tgt'] = tgt
            mb['tgt_pad_mask'] = torch.arange(tgt.shape[1])[None, :] >= torch.tensor(lengths)[:, None]
        out.append(mb)
    return out


class _SeededBatches:
    """Wraps a batch sampler: each index i goes to the data set as (i, item_seed(seed, epoch, i)), so
    an item's augmentation is the same with any number of workers and after a resume."""

    def __init__(self, sampler, seed):
        self.sampler, self.seed = sampler, int(seed)

    def __iter__(self):
        epoch = self.sampler.epoch
        for batch in self.sampler:
            yield [(i, item_seed(self.seed, epoch, i)) for i in batch]

    def __len__(self):
        return len(self.sampler)


def make_loader(dataset, batch_size, split_batch=False, shuffle=True, seed=0, num_replicas=1, rank=0,
                workers=0, pin_memory=False, equal_shards=True, curriculum=0):
    """-> (DataLoader, sampler). Each loader batch is collate's list of same-size micro-batches.
    Call sampler.set_epoch(epoch[, skip_batches]) before each epoch. With workers > 0 the workers stay
    alive between epochs (persistent_workers) and prefetch 4 batches each. equal_shards: every rank the
    same number of batches (training under DDP); False for evaluation (see BucketBatchSampler).
    curriculum: epochs whose batches go from small to large images (see BucketBatchSampler._ordered)."""
    cls = SplitBatchSampler if split_batch else BucketBatchSampler
    sampler = cls(dataset.sizes, batch_size, shuffle=shuffle, seed=seed, num_replicas=num_replicas, rank=rank,
                  equal_shards=equal_shards, curriculum=curriculum)
    kw = dict(persistent_workers=True, prefetch_factor=4) if workers > 0 else {}
    # a private generator: creating an iterator then draws its worker base seed from it, not from the
    # global RNG, so dropout masks are the same whether a run was resumed or not
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=_SeededBatches(sampler, seed), collate_fn=collate,
                                         num_workers=workers, pin_memory=pin_memory,
                                         generator=torch.Generator().manual_seed(seed), **kw)
    return loader, sampler


# -----------------------------------------------------------------------------
# command line: check a data root

def main(argv=None):
    p = argparse.ArgumentParser(description='Check a data root: samples, image sizes, token counts and '
                                            'bad input per domain and split (optionally building the .cache), '
                                            'and per domain how many val and test formulas also occur in train.')
    p.add_argument('--root_dir', default=DEFAULT_ROOT,
                   help='data root (layout: README.md, "Data layout"; docs/formats.md)')
    p.add_argument('--domains', nargs='+', default=list(DOMAINS), help='domains to check')
    p.add_argument('--splits', nargs='+', default=list(SPLITS), help='splits to check')
    p.add_argument('--cache', action='store_true', help='build / verify <root>/.cache for each split')
    args = p.parse_args(argv)
    problems = Problems()
    known = read_token_list(PRE_VOCAB)
    for domain in args.domains:
        for split in args.splits:
            try:
                ds = FormulaDataset(args.root_dir, domain, split, cache=args.cache, problems=problems)
            except DataRootError as e:
                print(f'{domain}/{split}: {e}')
                continue
            n_tok = [len(t) for t in ds.tokens] or [0]
            share, missing = vocab_coverage(ds.tokens, known)
            print(f'{domain}/{split}: {len(ds)} samples, {len(set(ds.sizes))} sizes, tokens/formula '
                  f'mean {np.mean(n_tok):.1f} max {max(n_tok)}, {100 * share:.2f}% of tokens in pre_vocab.txt'
                  + (' (missing: ' + ' '.join(f'{t} x{n}' for t, n in missing.most_common(10)) + ')'
                     if missing else '') + f', loaded in {ds.load_seconds:.2f} s')
    for domain in args.domains:    # a formula of val or test that is also in train measures memory, not reading
        report = overlap_report(args.root_dir, domain, problems)
        if report or any(os.path.isfile(label_path(args.root_dir, domain, s)) for s in ('val', 'test')):
            print('\n'.join(format_overlap(domain, report, label_path(args.root_dir, domain, 'train'))))
    if problems.summary():
        print(problems.summary())


if __name__ == '__main__':
    main()
