"""Tests of data.py: tokenizer, vocab, label files and bad input, datasets and .cache, image loading,
augmentation, batch samplers, collate, make_loader. Everything is made in tmp_path (tiny PNGs)."""
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402

# -----------------------------------------------------------------------------
# helpers

SIZES = [(16, 48), (24, 64), (16, 80)]          # (H, W)


def ink_image(h, w, seed):
    """A white uint8 (H, W) image with a few dark strokes, different for every seed."""
    rng = np.random.default_rng(seed)
    im = Image.new('L', (w, h), 255)
    d = ImageDraw.Draw(im)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w - 4)), int(rng.integers(0, h - 4))
        d.rectangle([x0, y0, x0 + int(rng.integers(2, 8)), y0 + int(rng.integers(2, 6))], fill=0)
    d.line([(1, h // 2), (w - 2, int(rng.integers(1, h - 1)))], fill=30, width=1)
    return np.asarray(im)


def make_root(root, n=12, domain='openai', splits=('train', 'val'), formulas=None):
    """A data root in the data layout of docs/formats.md with n images per split (sizes cycling through SIZES)."""
    idir = data.image_dir(root, domain)
    os.makedirs(idir, exist_ok=True)
    for split in splits:
        lines = []
        for i in range(n):
            h, w = SIZES[i % len(SIZES)]
            name = f'{split}_{i:03d}.png'
            Image.fromarray(ink_image(h, w, hash((split, i)) % 1000)).save(os.path.join(idir, name))
            f = formulas[i % len(formulas)] if formulas else f'\\frac{{x_{i}}}{{y}} + {i}'
            lines.append(f'{name}\t{f}')
        lp = data.label_path(root, domain, split)
        os.makedirs(os.path.dirname(lp), exist_ok=True)
        with open(lp, 'w', encoding='utf-8') as fh:
            fh.write('\n'.join(lines) + '\n')
    return str(root)


def quiet():
    return data.Problems(quiet=True)


# -----------------------------------------------------------------------------
# tokenizer

REAL_FORMULAS = [
    r'\frac{\partial^2 u}{\partial x^2}+\frac{\partial^2 u}{\partial y^2}=0',
    r'\left\{ \begin{array}{cc} x & y \\ z & w \end{array} \right.',
    r'\operatorname*{lim}_{n\to\infty}a_{n}=\hat{a}',
    r'ds^{2}=-dt^{2}+a^{2}(t)\left[\frac{dr^{2}}{1-kr^{2}}+r^{2}d\Omega^{2}\right]',
    r'\int_{0}^{\infty}dx\,e^{-x^{2}}=\frac{\sqrt{\pi}}{2}',
    r'\mathcal{L}=-\frac{1}{4}F_{\mu\nu}F^{\mu\nu}+\bar{\psi}(i\gamma^{\mu}D_{\mu}-m)\psi',
    r'\langle\phi|\hat{H}|\psi\rangle',
    r'{\cal N}=2\;\;{\rm SU}(N)',
    r'\tilde{g}_{ab}=e^{2\sigma}g_{ab}\quad,\quad\sigma\in C^{\infty}(M)',
    r'\sum_{i=1}^{N}\vec{p}_{i}\cdot\dot{\vec{q}}_{i}',
    r'\mathbf{A}\times\mathbf{B}\neq 0\, ,\qquad \forall\,\mathbf{A}',
    r'\begin{array}{l}{{x=1}}\\ {{y=2}}\end{array}',
    r'\Gamma(z)=\int_0^\infty t^{z-1}e^{-t}\,dt \ ,',
    r'\left(\begin{matrix}a&b\\c&d\end{matrix}\right)^{-1}',
    r'\not{p}-m\,\,\,\,{\bf 1}\%',
    r'\overline{\psi}\psi\,\widehat{x}\,\check{y}\,\breve{z}\,\acute{a}\,\grave{b}\,\ddot{c}',
    r'\sqrt[3]{x^{3}+y^{3}}\leq\|x\|_{3}',
    r'e^{i\pi}+1=0\ \ \ \mathrm{(Euler)}',
    r'{\it f}(x)=\left\{\begin{array}{ll}{0,}&{x<0}\\ {1,}&{x\geq0}\end{array}\right.',
    r'\hbar\omega\approx\frac{3}{2}k_{B}T\,;\;\;\textstyle\frac{1}{2}~\mathrm{CO_{2}}\uparrow',
    'x_{1}\t+\ny^{\\prime\\prime}\\\\[2mm]\\!\\!z',
]


def test_tokenize_known_tokens():
    assert data.tokenize(r'\frac{a}{b}') == ['\\frac', '{', 'a', '}', '{', 'b', '}']
    assert data.tokenize(r'\left\{x\right.') == ['\\left\\{', 'x', '\\right.']
    assert data.tokenize(r'a\\b\,c\;d\!e') == ['a', '\\\\', 'b', '\\,', 'c', '\\;', 'd', '\\!', 'e']
    assert data.tokenize(r'\operatorname*{argmax}') == ['\\operatorname*', '{', 'a', 'r', 'g', 'm', 'a', 'x', '}']
    assert data.tokenize(r'\hat{a}\alpha2') == ['\\hat', '{', 'a', '}', '\\alpha', '2']
    assert data.tokenize('\\%\\_\\&\\#\\$') == ['\\%', '\\_', '\\&', '\\#', '\\$']


@pytest.mark.parametrize('latex', REAL_FORMULAS)
def test_tokenize_round_trip_and_raw_equals_tokenized(latex):
    tokens = data.tokenize(latex)
    assert tokens and all(t and not t.isspace() for t in tokens)
    joined = data.detokenize(tokens)
    assert data.tokenize(joined) == tokens
    # the space-tokenized form of a file line (and its stripped form) gives the same tokens
    assert data.tokenize(joined.strip()) == tokens
    # nothing but white space is lost
    assert ''.join('\\' if t == data.CONTROL_SPACE else t for t in tokens) == ''.join(latex.split())


# lines of im2latex-100k's normalized formulas (im2markup's formulas.norm.lst), as published
IM2LATEX_NORM_LINES = [
    r'\tilde { \alpha } = \alpha \beta ^ { - m } = \left( \begin{array} { c c c } { \omega _ { k } ^ { - 2 y } '
    r'\omega _ { 2 d } ^ { 2 m } } & { 0 } & { 0 } \\ { 0 } & { \omega _ { k } ^ { y } \omega _ { 2 d } ^ { - m } } & '
    r'{ 0 } \\ { 0 } & { 0 } & { \omega _ { k } ^ { y } \omega _ { 2 d } ^ { - m } } \\ \end{array} \right)',
    r'\left\{ \begin{array} { l c l l } { \phi ~ ( \infty ) } & { = } & { 0 } & { , \vspace { 3 m m } } \\ '
    r'{ \phi ~ ( 0 ) } & { = } & { 1 } & { . } \\ \end{array} \right.',
    r'\left. \begin{array} { c c c } { S _ { \sigma \sigma ^ { \prime } } \nonumber } \\ { S _ { \Delta } '
    r'\nonumber } \\ { \tilde { S } _ { \Delta } } \\ \end{array} \right\} \varpi = ( \varpi + 2 ) \left\{ '
    r'\begin{array} { c c c } { S _ { \Delta } } \\ \end{array} \right. .',
    r'\psi ( x ) = [ 2 \pi \sigma ^ { 2 } ] ^ { - 1 / 4 } \operatorname { e x p } \left[ - \left( \frac { x - '
    r'x _ { 0 } } { 2 \sigma } \right) ^ { 2 } + i p _ { 0 } x \right] ,',
    r'\hat { e } = e / \varepsilon , \ \ \ \hat { G } _ { 4 } = G _ { 4 } ,',
    r'P _ { n } ^ { p } = \frac { ( - 1 ) ^ { p + n } } { n ! ( p - n ) ! } \mathop { { \prod } ^ { \prime } } '
    r'_ { k = 0 } ^ { p } ( N - k ) , \quad n = 0 , . . . , p ,',
    r'E _ { \mathrm { q u a s i l o c a l } } = \left( r \left[ 1 - \left| r , _ { y } \right| \right] \right) '
    r'_ { y = y _ { + } }',
    r'\operatorname* { l i m } _ { n \rightarrow \infty } a _ { n } = \left\langle x \right\rangle',
    r'X = \begin{matrix} { a } & { b } \\ \end{matrix} + \begin{pmatrix} { 1 } \\ { 2 } \\ \end{pmatrix}',
]


@pytest.mark.parametrize('line', IM2LATEX_NORM_LINES)
def test_tokenize_im2latex_normalized_lines(line):
    """A line in the release's normalized form tokenizes to exactly its space-separated tokens, so BLEU on
    the real data counts the tokens the published numbers count."""
    # TeX's control space `\ ` is the token CONTROL_SPACE; split on white space it reads as `\`
    tokens = ['\\' if t == data.CONTROL_SPACE else t for t in data.tokenize(line)]
    assert tokens == line.split()


def test_tokenize_glued_tokens():
    assert data.tokenize(r'\begin{array} { c c } a & b \\ \end{array}') == \
        ['\\begin{array}', '{', 'c', 'c', '}', 'a', '&', 'b', '\\\\', '\\end{array}']
    # raw LaTeX and this project's older space-tokenized labels give the same glued tokens
    for spaced in (r'\begin { a r r a y } { c c } a & b \\ \end { a r r a y }', r'\begin{array}{cc}a&b\\\end{array}',
                   '\\begin {array}\n{cc} a&b \\\\ \\end{ array }'):
        assert data.tokenize(spaced) == data.tokenize(r'\begin{array} { c c } a & b \\ \end{array}')
    assert data.tokenize(r'\begin{align*} x \end{align*}') == ['\\begin{align*}', 'x', '\\end{align*}']
    assert data.tokenize(r'\operatorname * {a}') == ['\\operatorname*', '{', 'a', '}']
    assert data.tokenize(r'\left ( x \right \rangle') == ['\\left(', 'x', '\\right\\rangle']
    # commands that only start like \left / \right, and what is no delimiter, stay apart
    assert data.tokenize(r'\leftarrow \rightarrow \left x \right{') == \
        ['\\leftarrow', '\\rightarrow', '\\left', 'x', '\\right', '{']
    assert data.tokenize(r'\left\\ \begin x') == ['\\left', '\\\\', '\\begin', 'x']
    # unglue gives the pieces TeX reads
    assert data.unglue(data.tokenize(r'\left( \operatorname*{a} \begin{array}')) == \
        ['\\left', '(', '\\operatorname', '*', '{', 'a', '}', '\\begin', '{', 'a', 'r', 'r', 'a', 'y', '}']


def test_tokenize_edge_cases():
    cs = data.CONTROL_SPACE
    assert data.tokenize('a\\ b') == ['a', cs, 'b']                       # control space stays a token
    assert data.tokenize('a\\\tb') == data.tokenize('a\\\nb') == ['a', cs, 'b']   # \<tab>, \<newline> = \
    assert data.tokenize('a \\') == ['a', cs]                             # trailing lone backslash
    assert data.tokenize('\\') == [cs]
    for toks in (['a', cs, 'b'], ['a', cs], [cs, cs]):                    # round trips, also stripped
        assert data.tokenize(data.detokenize(toks)) == toks
        assert data.tokenize(data.detokenize(toks).strip()) == toks
    assert data.tokenize('x\t=\n\r1') == ['x', '=', '1']                   # tabs/newlines separate
    assert data.tokenize('αβ + 中') == ['α', 'β', '+', '中']                # non-ASCII: one char each
    assert data.tokenize('e\u0301') == data.tokenize('\u00e9') == ['\u00e9']   # NFC
    assert data.tokenize('a\u200b\ufeffb\u00a0c') == ['a', 'b', 'c']      # invisible chars, NBSP
    assert data.tokenize('\\é') == ['\\é']
    assert data.tokenize('') == [] and data.tokenize(' \t\n ') == []


def test_read_token_list(tmp_path):
    p = tmp_path / 'pre_vocab.txt'
    p.write_text('\\frac\n\n{\r\n}\n  \\alpha  \n\\\n\\frac\n', encoding='utf-8')
    assert data.read_token_list(p) == ['\\frac', '{', '}', '\\alpha', data.CONTROL_SPACE]


# -----------------------------------------------------------------------------
# vocab

def test_vocab_build_encode_decode_extend():
    train = [data.tokenize(f) for f in REAL_FORMULAS]
    v = data.Vocab.build(['\\frac', '{', '}', '\\frac'], train)
    assert v.itos[:4] == list(data.SPECIALS) and v.itos[4:7] == ['\\frac', '{', '}']
    assert len(set(v.itos)) == len(v)
    for toks in train:
        ids = v.encode(toks)
        assert ids[0] == data.SOS and ids[-1] == data.EOS and data.UNK not in ids
        assert v.decode(ids) == toks
        assert v.decode(torch.tensor(ids + [data.PAD, data.PAD])) == toks
    assert v.encode(['\\frac', '\\neverseen'], add_sos_eos=False) == [v.stoi['\\frac'], data.UNK]
    assert v.decode([data.SOS, v.stoi['{'], data.EOS, v.stoi['}']]) == ['{']      # stops at EOS
    assert v.decode([10 ** 6]) == ['<unk>']
    v2 = v.extend([['\\newtoken', '\\frac', '\\other']])
    assert v2.itos[:len(v)] == v.itos and v2.itos[len(v):] == ['\\newtoken', '\\other']
    assert v.extend([]) == v and '\\newtoken' not in v and '\\newtoken' in v2
    assert data.Vocab(v2.itos).stoi == v2.stoi


def test_vocab_validates_specials():
    with pytest.raises(ValueError, match='specials'):
        data.Vocab(['a', '<pad>', '<sos>', '<eos>', '<unk>'])
    with pytest.raises(ValueError, match='duplicate'):
        data.Vocab(list(data.SPECIALS) + ['a', 'a'])
    with pytest.raises(ValueError, match='non-empty'):
        data.Vocab(list(data.SPECIALS) + [''])


# -----------------------------------------------------------------------------
# label files and bad input

def test_label_path_and_image_dir(tmp_path):
    r = str(tmp_path)
    assert data.label_path(r, 'openai', 'train') == os.path.join(r, 'labels', 'train.txt')
    assert data.label_path(r, 'math', 'test') == os.path.join(r, 'adaptation_data', 'math_labels', 'test.txt')
    assert data.image_dir(r, 'openai') == os.path.join(r, 'images')
    assert data.image_dir(r, 'chemistry') == os.path.join(r, 'adaptation_data', 'chemistry_images_resized')
    assert data.label_path(r, 'openai', 'val').endswith('val.txt')
    os.makedirs(tmp_path / 'labels')
    (tmp_path / 'labels' / 'validate.txt').write_text('a.png\tx\n')
    assert data.label_path(r, 'openai', 'val').endswith('validate.txt')
    (tmp_path / 'labels' / 'val.txt').write_text('a.png\tx\n')
    assert data.label_path(r, 'openai', 'val').endswith('val.txt')
    with pytest.raises(ValueError):
        data.label_path(r, '../x', 'train')


def test_read_labels_raw_and_tokenized(tmp_path):
    p = tmp_path / 'l.txt'
    raw = REAL_FORMULAS[3]
    p.write_text(f'\ufeffa.png\t{raw}\r\n\n   \nb.png\t{data.detokenize(data.tokenize(raw))}\n', encoding='utf-8')
    pr = quiet()
    rows = data.read_labels(p, pr)
    assert [(r[0], r[2]) for r in rows] == [('a.png', 1), ('b.png', 4)]
    assert rows[0][1] == rows[1][1] == data.tokenize(raw)
    assert len(pr) == 0


def write_bad_root(root):
    """A root whose train split has one of each bad-input case; returns (label file, expected kinds)."""
    make_root(root, n=6, splits=('train',))
    idir = data.image_dir(root, 'openai')
    with open(os.path.join(idir, 'corrupt.png'), 'wb') as f:                 # truncated PNG
        f.write(open(os.path.join(idir, 'train_000.png'), 'rb').read()[:60])
    with open(os.path.join(idir, 'garbage.png'), 'wb') as f:
        f.write(b'this is not an image')
    Image.fromarray(ink_image(16, 48, 99)).save(os.path.join(idir, 'dup.png'))
    lp = data.label_path(root, 'openai', 'train')
    with open(lp, 'ab') as f:
        f.write(b'missing.png\tx+1\n'                     # line 7
                b'corrupt.png\tx+2\n'                     # line 8
                b'garbage.png\tx+3\n'                     # line 9
                b'no tab here x+4\n'                      # line 10
                b'dup.png\t   \n'                         # line 11: empty formula
                b'latin.png\t\xe9t\xe9\n'                 # line 12: not UTF-8
                b'\n'                                     # line 13: blank, silently skipped
                b'dup.png\t\\alpha\n'                     # line 14
                b'dup.png\t\\beta\n')                     # line 15: duplicate image
    expected = {('missing image', 7), ('corrupt image', 8), ('corrupt image', 9), ('line without tab', 10),
                ('empty formula', 11), ('not utf-8', 12), ('duplicate image', 15)}
    return lp, expected


@pytest.mark.parametrize('cache', [False, True])
def test_bad_input_reported_once_skipped_counted(tmp_path, capsys, cache):
    root = str(tmp_path / 'root')
    lp, expected = write_bad_root(root)
    pr = data.Problems()
    ds = data.FormulaDataset(root, 'openai', 'train', problems=pr, cache=cache)
    err = capsys.readouterr().err
    assert ds.names == [f'train_{i:03d}.png' for i in range(6)] + ['dup.png']
    assert ds.tokens[-1] == ['\\alpha'] and ds.lines[-1] == 14
    got = {(kind, line) for _, line, kind, _ in pr.entries}
    assert got == expected
    assert len(pr) == 7 and pr.counts['corrupt image'] == 2
    for kind, line in expected:
        assert err.count(f'{lp}:{line}:') == 1, (kind, line, err)
    assert 'missing.png' in err and 'corrupt.png' in err and 'garbage.png' in err
    assert pr.summary().startswith('skipped 7: 2 corrupt image')
    # the problems of a cached split are reported again (once) when the cache is used
    if cache:
        pr2 = data.Problems()
        ds2 = data.FormulaDataset(root, 'openai', 'train', problems=pr2, cache=True)
        assert 'building' not in capsys.readouterr().out
        assert ds2.names == ds.names and {(k, ln) for _, ln, k, _ in pr2.entries} == expected


def test_not_utf8_file(tmp_path):
    p = tmp_path / 'l16.txt'
    p.write_bytes('a.png\tx\n'.encode('utf-16'))
    pr = quiet()
    assert data.read_labels(p, pr) == []
    assert pr.counts['not utf-8'] == 1 and pr.entries[0][1] is None


def test_problems_print_cap(capsys):
    pr = data.Problems(max_print=3)
    for i in range(10):
        pr.report('f.txt', i, 'not utf-8', 'bad')
    pr.report('f.txt', 1, 'not utf-8', 'bad')                  # same problem twice: once
    err = capsys.readouterr().err
    assert err.count('f.txt:') == 3 and 'counted, not printed' in err
    assert len(pr) == 10


@pytest.mark.parametrize('domain', ['openai', 'math'])
def test_missing_root_gives_clear_error(tmp_path, domain):
    with pytest.raises(data.DataRootError) as e:
        data.FormulaDataset(str(tmp_path / 'nowhere'), domain, 'train')
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert 'nowhere' in msg and 'python3 render.py --root_dir' in msg and 'python3 proc.py --import_im2latex' in msg
    root = str(tmp_path / 'r')
    make_root(root, n=3, domain=domain, splits=('train',))
    with pytest.raises(data.DataRootError, match='test.txt'):
        data.FormulaDataset(root, domain, 'test')
    if domain == 'math':       # originals present but not resized: say how to resize
        os.rename(data.image_dir(root, 'math'), os.path.join(root, 'adaptation_data', 'math_images'))
        with pytest.raises(data.DataRootError, match='math_images_resized.*python3 proc.py'):
            data.FormulaDataset(root, 'math', 'train')


# -----------------------------------------------------------------------------
# dataset and cache

def test_dataset_items_sizes_max_tokens_select(tmp_path, capsys):
    root = make_root(tmp_path, n=9, formulas=['x', 'a+b', REAL_FORMULAS[0]])
    ds = data.FormulaDataset(root, 'openai', 'train', problems=data.Problems())
    assert len(ds) == 9 and ds.sizes == [SIZES[i % 3] for i in range(9)]
    assert 'ids' not in ds[0]
    ds.vocab = data.Vocab.build([], ds.tokens)
    it = ds[4]
    h, w = ds.sizes[4]
    assert it['index'] == 4 and it['image'].shape == (1, h, w) and it['image'].dtype == torch.float32
    assert 'image2' not in it and it['ids'].tolist() == ds.vocab.encode(ds.tokens[4])
    gray = np.asarray(Image.open(ds.path(4)))
    assert torch.equal(it['image'][0], torch.from_numpy((255 - gray.astype(np.float32)) / 255))
    short = data.FormulaDataset(root, 'openai', 'train', problems=data.Problems(), max_tokens=3)
    assert 'dropped 3 of 9' in capsys.readouterr().out
    assert short.dropped_long == 3 and len(short) == 6 and all(len(t) <= 3 for t in short.tokens)
    sub = ds.select([8, 0])
    assert sub.names == [ds.names[8], ds.names[0]] and torch.equal(sub[0]['image'], ds[8]['image'])


def test_dataset_views_and_seeded_augmentation(tmp_path):
    root = make_root(tmp_path, n=3)
    ds = data.FormulaDataset(root, 'openai', 'train', augment=data.Augment(1.0), views=2, problems=quiet())
    a, b = ds[(1, 123)], ds[(1, 123)]
    assert torch.equal(a['image'], b['image']) and torch.equal(a['image2'], b['image2'])
    assert not torch.equal(a['image'], a['image2'])                    # two independent views
    assert not torch.equal(a['image'], ds[(1, 124)]['image'])
    with pytest.raises(ValueError):
        data.FormulaDataset(root, 'openai', 'train', views=3)


def test_trimmed_size_worked_example_and_trim_image():
    # trimmed_size's docstring: 36 x 430 px of ink 4 px from the top-left corner of a 100 x 500 bucket
    page = np.full((100, 500), 255, np.uint8)
    page[4:40, 4:434] = 0
    assert data.trim_box(page) == (4, 40, 4, 434)
    assert data.trimmed_size((4, 40, 4, 434), (100, 500)) == (48, 448)
    assert data.trimmed_size((7, 33, 4, 174), (40, 200)) == (40, 192)       # 48 rows would be more than 40
    assert data.trimmed_size((0, 40, 0, 200), (40, 200)) == (40, 200)
    out = data.trim_image(page)
    p = data.TRIM_PAD
    assert out.shape == (48, 448) and (out[p:p + 36, p:p + 430] == 0).all() and (out == 0).sum() == 36 * 430
    page[40, 4:434] = 250                    # an antialiased fringe below the ink belongs to it
    assert data.trim_box(page) == (4, 41, 4, 434)
    page[90, 490] = 250                      # a faint speck far from the ink does not
    assert data.trim_box(page) == (4, 41, 4, 434)
    tight = np.full((40, 200), 255, np.uint8)
    tight[7:33, 4:174] = 0
    t = data.trim_image(tight)                      # rows kept as they are, columns trimmed
    assert t.shape == (40, 192) and (t[7:33, p:p + 170] == 0).all() and (t == 0).sum() == 26 * 170
    blank = np.full((20, 30), 255, np.uint8)
    assert data.trim_box(blank) is None and data.trim_image(blank) is blank


def bucketed_root(root, n=10):
    """An openai root whose images are small ink patches at (3, 2) of 64 x 200 white pages (fixed buckets)."""
    idir = data.image_dir(root, 'openai')
    os.makedirs(idir, exist_ok=True)
    lines = []
    for i in range(n):
        page = np.full((64, 200), 255, np.uint8)
        h, w = SIZES[i % len(SIZES)]
        page[3:3 + h, 2:2 + w] = ink_image(h, w, i)
        Image.fromarray(page).save(os.path.join(idir, f'p{i}.png'))
        lines.append(f'p{i}.png\tx + {i}\n')
    os.makedirs(os.path.dirname(data.label_path(root, 'openai', 'train')))
    with open(data.label_path(root, 'openai', 'train'), 'w') as f:
        f.write(''.join(lines))
    return str(root)


@pytest.mark.parametrize('cache', [False, True])
def test_dataset_trim_keeps_all_ink_and_batches_one_size(tmp_path, capsys, cache):
    root = bucketed_root(tmp_path)
    full = data.FormulaDataset(root, 'openai', 'train', cache=cache, problems=quiet())
    ds = data.FormulaDataset(root, 'openai', 'train', cache=cache, problems=data.Problems(), trim=True)
    assert 'trimmed 10 images to their ink' in capsys.readouterr().out
    assert full.sizes == [(64, 200)] * 10 and ds.stored_sizes == full.sizes and 'trim=True' in repr(ds)
    mh, mw = data.TRIM_MULTIPLE
    for i in range(len(ds)):
        a, page = ds.gray(i), full.gray(i)
        assert a.shape == ds.sizes[i] and a.shape[0] % mh == 0 and a.shape[1] % mw == 0
        assert a.size < page.size and np.sum(255 - a.astype(np.int64)) == np.sum(255 - page.astype(np.int64))
        assert torch.equal(ds[i]['image'], data.to_tensor(data.trim_image(page)))
    assert len(set(ds.sizes)) > 1
    loader, _ = data.make_loader(ds, 4, shuffle=True, seed=0)
    seen = []
    for micro in loader:
        assert len(micro) == 1                           # the sampler batches one trimmed size
        idx = micro[0]['indices'].tolist()
        assert {ds.sizes[i] for i in idx} == {tuple(micro[0]['images'].shape[-2:])}
        seen += idx
    assert sorted(seen) == list(range(10))
    sub = ds.select([7, 2])
    assert sub.sizes == [ds.sizes[7], ds.sizes[2]] and np.array_equal(sub.gray(0), ds.gray(7))


def test_cache_used_identical_and_pickles(tmp_path, capsys, monkeypatch):
    root = make_root(tmp_path, n=12)
    plain = data.FormulaDataset(root, 'openai', 'train', problems=data.Problems())
    first = data.FormulaDataset(root, 'openai', 'train', cache=True, problems=data.Problems())
    assert 'building cache' in capsys.readouterr().out
    cache_file = os.path.join(root, '.cache', 'openai_train.bin')
    assert os.path.isfile(cache_file) and first.cache_file == cache_file
    assert not [f for f in os.listdir(os.path.dirname(cache_file)) if f.endswith('.tmp')]

    def no_decoding(path):
        raise AssertionError('the cached load decoded an image')
    monkeypatch.setattr(data, 'load_gray', no_decoding)
    second = data.FormulaDataset(root, 'openai', 'train', cache=True, problems=data.Problems())
    out = capsys.readouterr().out
    assert 'building' not in out and 'rebuilding' not in out
    assert second.names == plain.names and second.tokens == plain.tokens and second.sizes == plain.sizes
    for i in range(len(plain)):
        assert torch.equal(second[i]['image'], first[i]['image'])
    monkeypatch.undo()
    for i in range(len(plain)):
        assert torch.equal(second[i]['image'], plain[i]['image'])
    # spawn-started workers get a pickled data set: the memory map is re-opened, not copied
    blob = pickle.dumps(second)
    assert len(blob) < 20000
    assert torch.equal(pickle.loads(blob)[5]['image'], plain[5]['image'])


def test_cache_invalidated_by_label_edit_and_image_touch(tmp_path, capsys):
    root = make_root(tmp_path, n=6)
    data.FormulaDataset(root, 'openai', 'train', cache=True, problems=data.Problems())
    capsys.readouterr()
    lp = data.label_path(root, 'openai', 'train')
    with open(lp, 'a') as f:
        f.write('train_000.png\t\\gamma\n')      # a duplicate line: reported, label file changed
        f.write('extra.png\t\\omega\n')
    Image.fromarray(ink_image(24, 64, 7)).save(os.path.join(data.image_dir(root, 'openai'), 'extra.png'))
    ds = data.FormulaDataset(root, 'openai', 'train', cache=True, problems=data.Problems())
    out = capsys.readouterr().out
    assert 'out of date' in out and 'label file' in out and 'rebuilding' in out
    assert ds.names[-1] == 'extra.png' and ds.tokens[-1] == ['\\omega'] and len(ds) == 7
    # an image rewritten with new pixels (and a new mtime) is named and picked up
    p = os.path.join(data.image_dir(root, 'openai'), 'train_002.png')
    new = ink_image(*SIZES[2], seed=555)
    Image.fromarray(new).save(p)
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    ds = data.FormulaDataset(root, 'openai', 'train', cache=True, problems=data.Problems())
    out = capsys.readouterr().out
    assert 'out of date' in out and 'train_002.png' in out and 'label file' not in out
    assert torch.equal(ds[2]['image'], data.to_tensor(new))
    # touching alone (same bytes, new mtime) also invalidates
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10 ** 9))
    data.FormulaDataset(root, 'openai', 'train', cache=True, problems=data.Problems())
    assert 'train_002.png' in capsys.readouterr().out
    data.FormulaDataset(root, 'openai', 'train', cache=True, problems=data.Problems())
    assert 'rebuilding' not in capsys.readouterr().out


@pytest.mark.parametrize('damage', ['truncate', 'garbage', 'flip_header', 'empty'])
def test_corrupt_cache_rebuilds(tmp_path, capsys, damage):
    root = make_root(tmp_path, n=6)
    ref = data.FormulaDataset(root, 'openai', 'train', cache=True, problems=data.Problems())
    path = ref.cache_file
    blob = bytearray(open(path, 'rb').read())
    if damage == 'truncate':
        blob = blob[:len(blob) // 2]
    elif damage == 'garbage':
        blob = bytearray(os.urandom(len(blob)))
    elif damage == 'flip_header':
        blob[-60] ^= 0xFF                               # inside the JSON header
    else:
        blob = bytearray()
    with open(path, 'wb') as f:
        f.write(blob)
    capsys.readouterr()
    ds = data.FormulaDataset(root, 'openai', 'train', cache=True, problems=data.Problems())
    assert 'unreadable' in capsys.readouterr().out
    assert ds.names == ref.names and all(torch.equal(ds[i]['image'], ref[i]['image']) for i in range(len(ds)))
    data.FormulaDataset(root, 'openai', 'train', cache=True, problems=data.Problems())
    assert 'rebuilding' not in capsys.readouterr().out


def test_unwritable_cache_folder_still_loads(tmp_path, capsys):
    root = make_root(tmp_path, n=4)
    with open(os.path.join(root, '.cache'), 'w') as f:   # a file where the folder should be
        f.write('x')
    ds = data.FormulaDataset(root, 'openai', 'train', cache=True, problems=data.Problems())
    assert 'without' in capsys.readouterr().out and len(ds) == 4 and ds[3]['image'].shape[0] == 1
    data.FormulaDataset(root, 'openai', 'train', cache=True, problems=quiet())     # quiet: nothing printed
    assert capsys.readouterr() == ('', '')


def test_image_damaged_after_loading_is_reported_and_dropped(tmp_path):
    root = make_root(tmp_path, n=4)
    pr = quiet()
    ds = data.FormulaDataset(root, 'openai', 'train', problems=pr)
    with open(ds.path(1), 'wb') as f:
        f.write(b'gone')
    item = ds[1]
    assert 'error' in item and pr.counts['corrupt image'] == 1
    micro = data.collate([ds[0], item, ds[3]])
    assert [mb['indices'].tolist() for mb in micro] == [[0, 3]]


def test_unlabeled_dataset(tmp_path):
    d = tmp_path / 'u'
    (d / 'sub').mkdir(parents=True)
    Image.fromarray(ink_image(16, 48, 1)).save(d / 'b.png')
    Image.fromarray(ink_image(24, 64, 2)).convert('RGB').save(d / 'sub' / 'a.jpg')
    (d / 'bad.png').write_bytes(b'nope')
    (d / 'notes.txt').write_text('not an image')
    pr = quiet()
    ds = data.UnlabeledDataset(d, augment=data.Augment(1.0), views=2, problems=pr)
    assert ds.names == ['b.png', os.path.join('sub', 'a.jpg')] and ds.sizes == [(16, 48), (24, 64)]
    assert pr.counts['corrupt image'] == 1
    it = ds[(1, 5)]
    assert set(it) == {'index', 'image', 'image2'} and it['image'].shape == (1, 24, 64)
    with pytest.raises(data.DataRootError):
        data.UnlabeledDataset(tmp_path / 'none')


# -----------------------------------------------------------------------------
# image loading

def test_load_gray_modes(tmp_path):
    g = ink_image(10, 20, 3)                         # uint8 (H, W), ink dark
    rgb = np.stack([g, g, g], -1)
    cases = {
        'L.png': Image.fromarray(g),
        'RGB.png': Image.fromarray(rgb),
        'P.png': Image.fromarray(rgb).convert('P', palette=Image.Palette.ADAPTIVE),
        'LA.png': Image.fromarray(np.stack([g, np.full_like(g, 255)], -1), 'LA'),
        'I16.png': Image.fromarray(g.astype(np.uint16) * 257),
        'CMYK.jpg': Image.fromarray(rgb).convert('CMYK'),
        'F.tif': Image.fromarray(g.astype(np.float32) / 255.0, 'F'),
    }
    for name, im in cases.items():
        im.save(tmp_path / name, quality=100) if name.endswith('jpg') else im.save(tmp_path / name)
        a = data.load_gray(tmp_path / name)
        assert a.dtype == np.uint8 and a.shape == (10, 20), name
        tol = 12 if name.endswith('jpg') else 1
        assert np.abs(a.astype(int) - g).max() <= tol, name
    # transparent background (black, alpha 0) -> white; opaque black ink stays black
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[2:5, 3:9] = (0, 0, 0, 255)
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'RGBA.png')
    a = data.load_gray(tmp_path / 'RGBA.png')
    assert a[0, 0] == 255 and a[3, 4] == 0 and (a == 255).sum() == 200 - 18
    la = np.zeros((10, 20, 2), np.uint8)
    la[2:5, 3:9, 1] = 255
    Image.fromarray(la, 'LA').save(tmp_path / 'LA0.png')
    assert data.load_gray(tmp_path / 'LA0.png')[0, 0] == 255
    pal = Image.fromarray(rgba, 'RGBA').convert('P')            # palette with a transparent entry
    pal.save(tmp_path / 'Pt.png')
    assert data.load_gray(tmp_path / 'Pt.png')[0, 0] == 255
    # 16-bit: full range maps to 0..255
    Image.fromarray(np.array([[0, 65535]], np.uint16)).save(tmp_path / 'r16.png')
    assert data.load_gray(tmp_path / 'r16.png').tolist() == [[0, 255]]
    for bad in (b'', b'\x89PNG\r\n\x1a\n broken', b'hello'):
        (tmp_path / 'bad.png').write_bytes(bad)
        with pytest.raises(data.ImageError, match='bad.png'):
            data.load_gray(tmp_path / 'bad.png')
        with pytest.raises(data.ImageError):
            data.image_size(tmp_path / 'bad.png')
    with pytest.raises(data.ImageError, match='not found'):
        data.load_gray(tmp_path / 'absent.png')
    assert data.image_size(tmp_path / 'RGB.png') == (10, 20)


def test_to_tensor():
    t = data.to_tensor(np.array([[255, 0], [51, 255]], np.uint8))
    assert t.shape == (1, 2, 2) and t.dtype == torch.float32
    assert torch.allclose(t, torch.tensor([[[0.0, 1.0], [0.8, 0.0]]]))


def test_atomic_write(tmp_path):
    p = tmp_path / 'sub' / 'f.txt'
    data.atomic_write(p, lambda tmp: open(tmp, 'w').write('one'))
    assert p.read_text() == 'one' and (os.stat(p).st_mode & 0o777) != 0o600

    def fail(tmp):
        open(tmp, 'w').write('half')
        raise RuntimeError('interrupted')
    with pytest.raises(RuntimeError):
        data.atomic_write(p, fail)
    assert p.read_text() == 'one' and os.listdir(tmp_path / 'sub') == ['f.txt']


# -----------------------------------------------------------------------------
# augmentation

def test_augment():
    g = torch.Generator()
    for h, w in [(32, 128), (17, 61), (3, 3), (1, 5)]:
        x = data.to_tensor(ink_image(max(h, 6), max(w, 6), 1)[:h, :w].copy())
        assert data.Augment(1.0)(x, g.manual_seed(0)).shape == x.shape
    x = data.to_tensor(ink_image(32, 128, 1))
    aug = data.Augment(1.0)
    a, b = aug(x, torch.Generator().manual_seed(7)), aug(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    c = aug(x, torch.Generator().manual_seed(8))
    assert not torch.equal(a, c) and not torch.equal(a, x)
    assert torch.equal(data.Augment(0.0)(x, torch.Generator().manual_seed(7)), x)
    # small changes, never a mirror: ink in the top-left corner stays near the top-left corner
    corner = torch.zeros(1, 32, 128)
    corner[:, 4:10, 6:30] = 1.0
    rows, cols = torch.arange(32.0)[:, None], torch.arange(128.0)[None, :]
    for s in range(20):
        y = data.Augment(1.0, noise=0.0)(corner, torch.Generator().manual_seed(s))[0]
        cy, cx = float((y * rows).sum() / y.sum()), float((y * cols).sum() / y.sum())
        assert abs(cy - 6.5) < 4 and abs(cx - 17.5) < 8, (s, cy, cx)
    weak = data.Augment(0.1)(x, torch.Generator().manual_seed(7))
    assert (weak - x).abs().mean() < (a - x).abs().mean()


def test_augment_keeps_ink_on_a_tight_canvas():
    # ink up to 3 px from every border (a tightly cropped formula): no draw may push it off the canvas
    x = torch.zeros(1, 40, 300)
    x[:, 3:37, 3:297:6] = 1.0                   # vertical strokes from the left to the right margin
    x[:, 3:5, 3:297] = 1.0                      # and a rule along the top
    moved = 0
    for seed in range(40):
        y = data.Augment(1.0, noise=0.0, blur_p=0.0, thickness=0.0, contrast=0.0)(
            x, torch.Generator().manual_seed(seed))
        assert not data._border_ink(y), seed
        row = (y[0, 18:23].amax(0) > 0.3).int()                          # a band across the strokes
        assert int((row[1:] - row[:-1] == 1).sum()) + int(row[0]) == 49, seed   # no stroke cut away
        moved += not torch.equal(y, x)
    assert moved >= 30                          # the geometry still varies: most draws fit
    edge = torch.zeros(1, 20, 60)
    edge[:, :, 0] = 1.0                         # ink already on the border: any draw is accepted
    assert not torch.equal(data.Augment(1.0, noise=0.0)(edge, torch.Generator().manual_seed(0)), edge)


# -----------------------------------------------------------------------------
# samplers

def random_sizes(n, n_sizes, seed):
    rng = np.random.default_rng(seed)
    pool = [(int(16 * (1 + k % 3)), int(64 + 32 * k)) for k in range(n_sizes)]
    return [pool[int(i)] for i in rng.integers(0, n_sizes, n)]


CONFIGS = [  # (n, distinct sizes, batch size, replicas)
    (50, 3, 4, 1), (50, 5, 8, 3), (7, 1, 4, 4), (101, 7, 16, 2), (64, 4, 64, 4), (13, 2, 4, 3), (30, 30, 4, 2),
]


@pytest.mark.parametrize('split', [False, True])
@pytest.mark.parametrize('n,n_sizes,bs,R', CONFIGS)
def test_sampler_invariants(n, n_sizes, bs, R, split):
    sizes = random_sizes(n, n_sizes, seed=n)
    cls = data.SplitBatchSampler if split else data.BucketBatchSampler
    samplers = [cls(sizes, bs, shuffle=True, seed=3, num_replicas=R, rank=r) for r in range(R)]
    orders = {}
    for epoch in range(3):
        shards = []
        for s in samplers:
            s.set_epoch(epoch)
            shards.append(list(s))
        assert len({len(sh) for sh in shards}) == 1 and len(shards[0]) == len(samplers[0])   # equal per rank
        flat = [i for sh in shards for b in sh for i in b]
        assert sorted(flat) == list(range(n))                        # every index once, shards disjoint
        for sh in shards:
            for b in sh:
                assert 1 <= len(b) <= bs
                if not split:
                    assert len({sizes[i] for i in b}) == 1           # one size per batch
        orders[epoch] = shards
        # deterministic for (seed, epoch): a fresh sampler gives the same shard
        again = cls(sizes, bs, shuffle=True, seed=3, num_replicas=R, rank=R - 1)
        again.set_epoch(epoch)
        assert list(again) == shards[-1]
        # resume: skip_batches gives the tail of the same order
        k = len(shards[0]) // 2
        samplers[0].set_epoch(epoch, skip_batches=k)
        assert list(samplers[0]) == shards[0][k:]
    if n >= 30:
        assert orders[0] != orders[1] != orders[2]                    # reshuffled every epoch
        other = cls(sizes, bs, shuffle=True, seed=4, num_replicas=R, rank=0)
        assert list(other) != orders[0][0]
    assert len(samplers[0]) == len(orders[0][0])


@pytest.mark.parametrize('split', [False, True])
def test_sampler_curriculum_orders_small_images_first(split):
    """--curriculum 1: epoch 0 goes from small to large images (the docstring's example), with the same
    batches as without it, every index once over all ranks, resumable; epoch 1 is shuffled as usual."""
    sizes = random_sizes(120, 6, seed=5)
    area = {i: h * w for i, (h, w) in enumerate(sizes)}
    cls = data.SplitBatchSampler if split else data.BucketBatchSampler

    def shards(epoch, curriculum, R=1):
        out = []
        for r in range(R):
            s = cls(sizes, 8, shuffle=True, seed=3, num_replicas=R, rank=r, curriculum=curriculum)
            s.set_epoch(epoch)
            out.append(list(s))
        return out

    def mean_area(b):
        return sum(area[i] for i in b) / len(b)

    first = shards(0, 1)[0]
    assert [mean_area(b) for b in first] == sorted(mean_area(b) for b in first)
    assert sorted(map(tuple, first)) == sorted(map(tuple, shards(0, 0)[0]))       # same batches, new order
    assert first != shards(0, 0)[0]
    assert shards(1, 1) == shards(1, 0)                                          # after the curriculum
    two = shards(0, 1, R=2)
    assert sorted(i for sh in two for b in sh for i in b) == list(range(120))
    s = cls(sizes, 8, shuffle=True, seed=3, curriculum=1)
    s.set_epoch(0, skip_batches=5)
    assert list(s) == first[5:]                                                 # resume mid-curriculum
    if not split:   # sizes 40x150, 32x90, 40x150, 48x300 -> 32x90, 40x150, 40x150, 48x300
        s = data.BucketBatchSampler([(40, 150), (32, 90), (40, 150), (48, 300)], 1, shuffle=False, curriculum=1)
        assert list(s) == [[1], [0], [2], [3]]


def test_sampler_split_rule_and_no_shuffle():
    sizes = [(1, 1)] * 10 + [(2, 2)] * 3                            # the docstring's worked example
    assert data._plan_batches([10, 3], 4, 3) == [[2, 2, 2, 2, 2], [3]]
    s = data.BucketBatchSampler(sizes, 4, shuffle=False)
    assert list(s) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12]]
    shards = [list(data.BucketBatchSampler(sizes, 4, shuffle=False, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(sh) for sh in shards] == [2, 2, 2]
    assert sorted(i for sh in shards for b in sh for i in b) == list(range(13))


def test_sampler_unequal_shards_for_evaluation():
    sizes = [(1, k) for k in range(1, 6)]                           # 5 images of 5 sizes: no equal split
    with pytest.raises(ValueError, match='cannot be split'):
        data.BucketBatchSampler(sizes, 4, shuffle=False, num_replicas=2, rank=0)
    for R in (2, 3, 7):                                             # 7 processes: two get nothing
        shards = [data.BucketBatchSampler(sizes, 4, shuffle=False, num_replicas=R, rank=r, equal_shards=False)
                  for r in range(R)]
        assert [len(s) for s in shards] == [len(list(s)) for s in shards]
        assert [len(s) for s in shards] == [len(range(r, 5, R)) for r in range(R)]
        assert sorted(i for s in shards for b in s for i in b) == list(range(5))


def test_sampler_errors():
    with pytest.raises(ValueError, match='3 images cannot be shared by 4'):
        data.BucketBatchSampler([(1, 1)] * 3, 2, num_replicas=4, rank=0)
    with pytest.raises(ValueError, match='fewer processes'):   # 5 sizes of one image each, 4 ranks
        data.BucketBatchSampler([(1, k) for k in range(1, 6)], 1, num_replicas=4, rank=0)
    with pytest.raises(ValueError, match='empty'):
        data.SplitBatchSampler([], 4)
    with pytest.raises(ValueError, match='rank'):
        data.BucketBatchSampler([(1, 1)] * 8, 2, num_replicas=2, rank=2)


# -----------------------------------------------------------------------------
# collate and loader

def test_collate_micro_batches_and_padding():
    def item(i, h, w, ids, two=False):
        it = {'index': i, 'image': torch.full((1, h, w), float(i)), 'ids': torch.tensor(ids)}
        if two:
            it['image2'] = it['image'] + 1
        return it
    items = [item(0, 4, 8, [1, 5, 6, 2]), item(1, 6, 8, [1, 7, 2]), item(2, 4, 8, [1, 9, 2]),
             {'index': 3, 'error': 'x.png: broken'}]
    out = data.collate(items)
    assert [mb['indices'].tolist() for mb in out] == [[0, 2], [1]]
    a = out[0]
    assert a['images'].shape == (2, 1, 4, 8) and a['images2'] is None
    assert a['tgt'].tolist() == [[1, 5, 6, 2], [1, 9, 2, data.PAD]]
    assert a['tgt_pad_mask'].tolist() == [[False] * 4, [False, False, False, True]]
    assert out[1]['tgt'].tolist() == [[1, 7, 2]] and out[1]['tgt_pad_mask'].dtype == torch.bool
    two = data.collate([item(0, 4, 8, [1, 2], True), item(1, 4, 8, [1, 3, 2], True)])
    assert torch.equal(two[0]['images2'], two[0]['images'] + 1)
    no_ids = data.collate([{'index': 0, 'image': torch.zeros(1, 2, 2)}])
    assert no_ids[0]['tgt'] is None and no_ids[0]['tgt_pad_mask'] is None


def test_split_batch_loader_micro_batches(tmp_path):
    root = make_root(tmp_path, n=20)
    ds = data.FormulaDataset(root, 'openai', 'train', problems=quiet())
    ds.vocab = data.Vocab.build([], ds.tokens)
    loader, sampler = data.make_loader(ds, 8, split_batch=True, seed=1)
    assert isinstance(sampler, data.SplitBatchSampler) and len(loader) == 3
    seen = []
    for micro in loader:
        assert sum(mb['images'].shape[0] for mb in micro) <= 8
        assert len({tuple(mb['images'].shape[-2:]) for mb in micro}) == len(micro)
        for mb in micro:
            idx = mb['indices'].tolist()
            assert all(ds.sizes[i] == tuple(mb['images'].shape[-2:]) for i in idx)
            seen += idx
    assert sorted(seen) == list(range(20))


def loader_batches(ds, workers, epoch, skip=0):
    loader, sampler = data.make_loader(ds, 4, seed=5, workers=workers)
    sampler.set_epoch(epoch, skip_batches=skip)
    return [[{k: v for k, v in mb.items()} for mb in micro] for micro in loader]


def same_batches(a, b):
    assert len(a) == len(b)
    for ma, mb_ in zip(a, b):
        assert len(ma) == len(mb_)
        for x, y in zip(ma, mb_):
            for k in ('images', 'images2', 'tgt', 'tgt_pad_mask', 'indices'):
                assert torch.equal(x[k], y[k]), k


def test_make_loader_same_with_workers_and_resume(tmp_path):
    root = make_root(tmp_path, n=16)
    ds = data.FormulaDataset(root, 'openai', 'train', augment=data.Augment(1.0), views=2, problems=quiet())
    ds.vocab = data.Vocab.build([], ds.tokens)
    b0 = loader_batches(ds, 0, epoch=1)
    b2 = loader_batches(ds, 2, epoch=1)
    same_batches(b0, b2)
    assert not torch.equal(b0[0][0]['images'], b0[0][0]['images2'])
    same_batches(loader_batches(ds, 0, epoch=1, skip=2), b0[2:])          # resumed epoch: same tail
    other = loader_batches(ds, 0, epoch=2)
    assert [mb['indices'].tolist() for m in other for mb in m] != [mb['indices'].tolist() for m in b0 for mb in m]


def test_item_seed():
    assert data.item_seed(0, 1, 2) == data.item_seed(0, 1, 2)
    seeds = {data.item_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 450 and all(0 <= x < 2 ** 63 for x in seeds)
    torch.Generator().manual_seed(data.item_seed(-1, 2 ** 70))


def test_check_root_cli(tmp_path, capsys):
    root = make_root(tmp_path, n=5)
    data.main(['--root_dir', root, '--domains', 'openai', 'math', '--splits', 'train', '--cache'])
    out = capsys.readouterr().out
    assert 'openai/train: 5 samples, 3 sizes' in out and 'math/train: math/train data not found' in out


def test_demo_root_loads_all_domains(request):
    """With the render helper's session fixture (tests/conftest.py): every domain and split of the
    rendered demo loads without problems, in few sizes, and batches through make_loader."""
    try:
        root = request.getfixturevalue('demo_root')
    except pytest.FixtureLookupError:
        pytest.skip('no demo_root fixture (tests/conftest.py) in this checkout')
    for domain in data.DOMAINS:
        for split in ('train', 'val'):
            pr = quiet()
            ds = data.FormulaDataset(root, domain, split, problems=pr)
            assert len(ds) > 0 and len(pr) == 0, (domain, split, pr.summary())
            assert len(set(ds.sizes)) <= 32
        ds.vocab = data.Vocab.build([], ds.tokens)
        loader, sampler = data.make_loader(ds, 8)
        n = 0
        for micro in loader:
            for mb in micro:
                assert mb['images'].shape[0] == mb['tgt'].shape[0] == len(mb['indices'])
                n += len(mb['indices'])
        assert n == len(ds)


def test_vocab_coverage_hand_computed():
    share, missing = data.vocab_coverage([['a', 'b'], ['a', 'c']], {'a', 'b'})
    assert share == 0.75 and missing == {'c': 1}
    share, missing = data.vocab_coverage([['\\frac', '{', 'x', '}'], ['\\foo', '\\foo']], data.read_token_list(
        data.PRE_VOCAB))
    assert share == pytest.approx(4 / 6) and missing == {'\\foo': 2}
    assert data.vocab_coverage([], {'a'}) == (1.0, {})


def test_overlap_report_counts_formulas_planted_in_train(tmp_path, capsys):
    # train holds a+b and \frac{1}{2}; test repeats a+b (spaced: the same tokens), val repeats \frac{1}{2}
    root = make_root(tmp_path / 'root', n=3, splits=('train',), formulas=['a+b', '\\frac{1}{2}', 'x^2'])
    make_root(tmp_path / 'root', n=3, splits=('val',), formulas=['y', '\\frac {1} {2}', 'x^{2}'])
    make_root(tmp_path / 'root', n=4, splits=('test',), formulas=['c', 'a + b', 'd', 'e'])
    assert data.overlap_with_train([['a'], ['b', 'c']], [['b', 'c'], ['c'], ['b', 'c']]) == [0, 2]
    r = data.overlap_report(root, 'openai')
    assert (r['val']['n'], r['val']['in_train']) == (3, 1) and (r['test']['n'], r['test']['in_train']) == (4, 1)
    assert r['test']['examples'] == [(2, 1, ['a', '+', 'b'])]          # test line 2 = train line 1
    assert r['val']['examples'] == [(2, 2, data.tokenize('\\frac{1}{2}'))]
    data.main(['--root_dir', root, '--domains', 'openai', 'math'])
    out = capsys.readouterr().out
    assert 'openai: 1 of 3 val, 1 of 4 test formulas also in train' in out
    assert f'{data.label_path(root, "openai", "test")}:2 = train line 1: a + b' in out
    assert 'math:' not in out.replace('math/', '')                   # no math labels: no overlap line
    assert data.overlap_report(tmp_path / 'nowhere', 'openai') == {}
