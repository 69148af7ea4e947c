"""render.py, formulas.py and the image metrics of metrics.py: rendering, mathtext rewrites, generators,
pre_vocab coverage, demo layout, image metrics."""
import os
import time

import numpy as np
import pytest
from PIL import Image

import data
import formulas
import metrics
import proc
import render
from data import DOMAINS, SPLITS, detokenize, tokenize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Real-looking im2latex-100k formulas in the data set's normalised, space-tokenized style
# (written from the published data's conventions, incl. arrays, old font commands and sized delimiters).
REAL_FORMULAS = [
    r'\frac { 1 } { 2 } \int d ^ { 4 } x \sqrt { - g } \left( R - 2 \Lambda \right)',
    r'S = - \frac { 1 } { 4 } \int d ^ { 4 } x \, F _ { \mu \nu } F ^ { \mu \nu }',
    r'\psi ( x ) = \sum _ { n = 0 } ^ { \infty } c _ { n } \phi _ { n } ( x )',
    r'{ \cal L } = \bar { \psi } ( i \gamma ^ { \mu } \partial _ { \mu } - m ) \psi',
    r'Z = \int { \cal D } \phi \, e ^ { - S [ \phi ] }',
    r'\langle 0 | T \{ \phi ( x ) \phi ( y ) \} | 0 \rangle = \int \frac { d ^ { 4 } k } { ( 2 \pi ) ^ { 4 } } '
    r'\frac { i e ^ { - i k ( x - y ) } } { k ^ { 2 } - m ^ { 2 } + i \epsilon }',
    r'\mathrm { T r } \, ( - 1 ) ^ { F } e ^ { - \beta H }',
    r'E = m c ^ { 2 }',
    r'\delta S = \int d ^ { 2 } \sigma \, \partial _ { \alpha } X ^ { \mu } \partial ^ { \alpha } \delta X _ { \mu }',
    r'a _ { n } = \frac { 1 } { 2 \pi i } \oint \frac { d z } { z ^ { n + 1 } } f ( z ) ,',
    r'\Gamma ( z ) = \int _ { 0 } ^ { \infty } t ^ { z - 1 } e ^ { - t } d t',
    r'\hat { H } = \frac { \hat { p } ^ { 2 } } { 2 m } + V ( \hat { x } )',
    r'\lim _ { N \to \infty } \frac { 1 } { N } \sum _ { i = 1 } ^ { N } x _ { i } = \mu',
    r'\epsilon _ { \mu \nu \rho \sigma } \, \mathrm { t r } \, ( F ^ { \mu \nu } F ^ { \rho \sigma } )',
    r'd s ^ { 2 } = - d t ^ { 2 } + a ^ { 2 } ( t ) \left( \frac { d r ^ { 2 } } { 1 - k r ^ { 2 } } + r '
    r'^ { 2 } d \Omega ^ { 2 } \right)',
    r'\nabla \times { \bf E } = - \frac { \partial { \bf B } } { \partial t }',
    r'\phi ( x ) \to e ^ { i \alpha ( x ) } \phi ( x ) \; , \qquad A _ { \mu } \to A _ { \mu } + \partial '
    r'_ { \mu } \alpha',
    r'\tilde { g } _ { \mu \nu } = \Omega ^ { 2 } ( x ) g _ { \mu \nu }',
    r'f ( x ) = \left\{ \begin{array} { l l } { 1 } & { x > 0 } \\ { 0 } & { x \leq 0 } \end{array} \right.',
    r'\sigma _ { i } \sigma _ { j } = \delta _ { i j } + i \varepsilon _ { i j k } \sigma _ { k }',
    r'\| \Psi \| ^ { 2 } = \langle \Psi | \Psi \rangle',
    r'\frac { \partial ^ { 2 } \phi } { \partial t ^ { 2 } } - \nabla ^ { 2 } \phi + m ^ { 2 } \phi = 0',
    r'U ( 1 ) \times S U ( 2 ) _ { L } \times S U ( 3 ) _ { c }',
    r'\beta ( g ) = \mu \frac { d g } { d \mu } = - \frac { g ^ { 3 } } { 1 6 \pi ^ { 2 } } \left( \frac '
    r'{ 1 1 } { 3 } N - \frac { 2 } { 3 } n _ { f } \right)',
    r'x ^ { \pm } = \frac { 1 } { \sqrt { 2 } } ( x ^ { 0 } \pm x ^ { 1 } )',
    r'\widetilde { \cal M } _ { k } \simeq { \bf C } ^ { 2 k } / S _ { k }',
    r'\operatorname { d e t } ( 1 - K ) = \exp \left( - \sum _ { n \geq 1 } \frac { 1 } { n } \mathrm { T '
    r'r } \, K ^ { n } \right)',
    r'\hbar \omega _ { k } = \sqrt { c ^ { 2 } k ^ { 2 } + m ^ { 2 } c ^ { 4 } / \hbar ^ { 2 } }',
    r'M = \left( \begin{array} { c c } { a } & { b } \\ { c } & { d } \end{array} \right)',
    r'\int _ { \partial M } \omega = \int _ { M } d \omega',
    r'{ \frac { 1 } { 2 } } \, \mathrm { s i g n } ( \omega ) \, \Theta ( | \omega | - m )',
    r'\Big \langle \prod _ { i } V _ { i } \Big \rangle _ { \mathrm { c o n n } }',
    r'\vec { \nabla } \cdot \vec { J } + \frac { \partial \rho } { \partial t } = 0 \label { c o n t }',
    r'{ \displaystyle \sum _ { k = 1 } ^ { n } } k = { n ( n + 1 ) \over 2 } \quad \mathrm { a n d } '
    r'\quad \dot { x } ^ { i } \equiv { \frac { d x ^ { i } } { d \tau } }',
    r'\left[ Q _ { \alpha } , \bar { Q } _ { \dot { \beta } } \right] = 2 \sigma _ { \alpha \dot { \beta '
    r'} } ^ { \mu } P _ { \mu } \, ,',
]


def _ink(img):
    return int((img < 128).sum())


# -----------------------------------------------------------------------------
# rendering

def test_render_basic():
    img = render.render_latex(r'\frac{a^2+b}{\sqrt{x_1}} = \sum_{i=0}^{n} \alpha_i')
    assert img.dtype == np.uint8 and img.ndim == 2
    assert _ink(img) > 50
    p = render.PAD   # cropped to the ink with a white margin of PAD px
    assert (img[:p] == 255).all() and (img[-p:] == 255).all()
    assert (img[:, :p] == 255).all() and (img[:, -p:] == 255).all()
    assert (img[p] < 255).any() and (img[:, p] < 255).any()
    # raw and space-tokenized LaTeX, and a token list, give the same image
    raw = r'\frac{a}{b}+x_{1}^{2}'
    a = render.render_latex(raw)
    assert np.array_equal(a, render.render_latex(detokenize(tokenize(raw))))
    assert np.array_equal(a, render.render_latex(tokenize(raw)))
    # size follows fontsize * dpi
    big = render.render_latex(raw, dpi=200)
    assert 1.7 < big.shape[1] / a.shape[1] < 2.3


@pytest.mark.parametrize('font', render.FONTS)
def test_fonts(font):
    img = render.render_latex(r'\int_0^1 \mathcal{L} \, dx = \mathbb{R}', font=font)
    assert _ink(img) > 30


def test_unknown_font_and_renderer():
    with pytest.raises(ValueError, match='font'):
        render.render_latex('x', font='comic')
    with pytest.raises(ValueError, match='renderer'):
        render.render_latex('x', renderer='mathjax')


@pytest.mark.parametrize('a, b', [
    (r'a \le b \ge c', r'a \leq b \geq c'),
    (r'{a \over b}', r'\frac{a}{b}'),
    (r'{n \choose k}', r'\binom{n}{k}'),
    (r'\stackrel{!}{=}', r'\overset{!}{=}'),
    (r'\tfrac{1}{2}', r'\frac{1}{2}'),
    (r'a \not= b', r'a \neq b'),
    (r'\text{if} x', r'\mathrm{if} x'),
    (r'\textbf{v}', r'\mathbf{v}'),
    (r'\mbox{for} x', r'\mathrm{for} x'),
    (r'\xrightarrow{\Delta}', r'\overset{\Delta}{\longrightarrow}'),
    (r'\displaystyle \sum_{i} x_{i} \nonumber \label{eq1}', r'\sum_{i} x_{i}'),
    (r'\big( x \big)', r'( x )'),
    (r'\sum\limits_{i} x', r'\sum_{i} x'),
    (r'\operatorname*{argmax}_x f', r'\operatorname{argmax}_x f'),
    (r'\mathop{\rm lim}', r'{\rm lim}'),
    (r'\lvert x \rvert', r'| x |'),
    (r'\hspace{1em} x', r'\quad x'),
])
def test_mathtext_rewrites_same_image(a, b):
    assert np.array_equal(render.render_latex(a), render.render_latex(b))


def test_left_right_not_smaller_than_text():
    """mathtext shrinks \\left( \\right) below the text size around short content; the strut keeps them
    at least as tall as a plain '('."""
    plain = render.render_latex('( x )')
    sized = render.render_latex(r'\left( x \right)')
    assert sized.shape[0] >= plain.shape[0]
    assert abs(sized.shape[1] - plain.shape[1]) <= 2   # the strut has no width
    for font in render.FONTS:
        assert render.render_latex(r'\left\{ x \right\}', font=font).shape[0] >= \
            render.render_latex(r'\{ x \}', font=font).shape[0]


@pytest.mark.parametrize('latex, why', [
    (r'\begin{array}{cc} a & b \end{array}', 'environments'),
    (r'a \\ b', 'line breaks'),
    (r'\ce{H2O}', 'mhchem'),
    ('', 'empty'),
    ('   ', 'empty'),
    (r'\frac{a}{b', 'unbalanced'),
    (r'\left( x', 'never closed'),
    ('x^a^b', 'mathtext cannot render'),
    (r'\foobar x', 'mathtext cannot render'),
    (r'\,', 'blank'),
    (r'{\bf \Longrightarrow}', 'lacks a glyph'),   # mathtext would draw a dummy box
])
def test_render_errors(latex, why):
    for _ in range(2):   # the same the second time (no cache hides a failure)
        with pytest.raises(render.RenderError, match=why):
            render.render_latex(latex)


def test_latex_renderer_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(render.shutil, 'which', lambda name: None)
    assert render.latex_tools() is None
    with pytest.raises(render.RenderError) as e:
        render.render_latex(r'\frac{a}{b}', renderer='latex')
    msg = str(e.value)
    assert 'pdftoppm' in msg and 'pdflatex' in msg and 'apt-get install preview-latex-style' not in msg
    assert 'apt-get install ' + ' '.join(render.LATEX_PACKAGES) in msg and 'mathtext' in msg
    with pytest.raises(render.RenderError, match='pdflatex'):
        render.write_demo(tmp_path / 'd', renderer='latex', sizes={d: (1, 1, 1) for d in DOMAINS}, quiet=True)
    with pytest.raises(render.RenderError, match='pdflatex'):
        metrics.image_metrics(['x'], ['x'], renderer='latex')
    assert render.resolve_renderer('auto') == 'mathtext'   # without TeX, mathtext stays the default
    assert render.main(['--root_dir', str(tmp_path / 'd'), '--renderer', 'latex']) == 2
    assert not os.path.exists(tmp_path / 'd')


# -----------------------------------------------------------------------------
# generators and pre_vocab

def test_generators_deterministic_and_round_trip():
    for domain in DOMAINS:
        labels = [render.make_sample(domain, 0, 'train', i)['label'] for i in range(60)]
        again = [render.make_sample(domain, 0, 'train', i)['label'] for i in reversed(range(60))][::-1]
        assert labels == again
        other = [render.make_sample(domain, 1, 'train', i)['label'] for i in range(60)]
        assert labels != other
        assert len(set(labels)) > 40, domain   # variety
        for lab in labels:
            toks = tokenize(lab)
            assert toks and detokenize(toks) == lab and tokenize(detokenize(toks)) == toks
            assert lab.count('{') == lab.count('}')


def test_openai_lengths_like_im2latex():
    lens = np.array([len(tokenize(render.make_sample('openai', 0, 'train', i)['label'])) for i in range(300)])
    assert lens.max() <= formulas.MAX_TOKENS
    assert 40 <= lens.mean() <= 90          # im2latex-100k: mean ~60 tokens
    assert (lens < 25).mean() > 0.1 and (lens > 100).mean() > 0.05


def _pre_vocab():
    path = os.path.join(REPO, 'pre_vocab.txt')
    with open(path, encoding='utf-8') as f:
        lines = [ln.rstrip('\n') for ln in f if ln.strip()]
    return lines, data.read_token_list(path)


def test_pre_vocab_well_formed():
    lines, toks = _pre_vocab()
    assert len(lines) == len(set(lines)) == len(toks), 'duplicate lines in pre_vocab.txt'
    for t in toks:  # every entry is one token as tokenize() produces it
        assert tokenize(t) == [t], t
    for must in [r'\frac', r'\left', r'\right', r'\\', r'\{', r'\,', r'\!', r'\;', r'\|', r'\begin{array}', r'\end{array}',
                 r'\begin{pmatrix}', r'\begin{cases}', r'\begin{aligned}', r'\left(', r'\right.', r'\left\{', r'\operatorname*',
                 r'\mathbb', r'\cal', r'\rm', r'\longrightarrow', r'\rightleftharpoons', r'\xrightarrow',
                 r'\uparrow', r'\downarrow', r'\Delta', r'\cdot', '&', '{', '}', '^', '_', 'a', 'Z', '0',
                 data.CONTROL_SPACE]:
        assert must in toks, must


def _coverage(formulas, vocab):
    toks = [t for f in formulas for t in tokenize(f)]
    return sum(t in vocab for t in toks) / len(toks), sorted({t for t in toks if t not in vocab})


def test_pre_vocab_coverage():
    _, toks = _pre_vocab()
    vocab = set(toks)
    cov, missing = _coverage(REAL_FORMULAS, vocab)
    assert cov >= 0.98, missing
    for domain in DOMAINS:
        labels = [render.make_sample(domain, 0, 'train', i)['label'] for i in range(200)]
        cov, missing = _coverage(labels, vocab)
        assert cov >= 0.98, (domain, missing)


def test_real_formulas_render_or_say_why():
    """Every real-looking formula renders with mathtext, except environments (arrays), which raise
    RenderError naming the construct."""
    for f in REAL_FORMULAS:
        if r'\begin' in f:
            with pytest.raises(render.RenderError, match='environments'):
                render.render_latex(f)
        else:
            assert _ink(render.render_latex(f)) > 20, f


# -----------------------------------------------------------------------------
# demo data

def _read_labels(root, domain, split):
    with open(data.label_path(root, domain, split), encoding='utf-8') as f:
        return [ln.rstrip('\n').split('\t') for ln in f if ln.strip()]


def test_demo_layout(demo_root):
    from conftest import TINY_DEMO_SIZES
    deng = {(h // proc.DENG_DOWNSAMPLE, w // proc.DENG_DOWNSAMPLE) for w, h in proc.DENG_BUCKETS_WH}
    for domain in DOMAINS:
        raw_dir = render._raw_dir(demo_root, domain)
        seen = {}
        for split, count in zip(SPLITS, TINY_DEMO_SIZES[domain]):
            rows = _read_labels(demo_root, domain, split)
            assert len(rows) == count, (domain, split)
            for name, label in rows:
                assert name.startswith(f'{domain}_') and name.endswith('.png')
                with Image.open(os.path.join(raw_dir, name)) as im:
                    assert im.mode == 'L' and im.info['latex'] == label
                assert tokenize(label) and name not in seen
                seen[name] = label
        train = {lab for _, lab in _read_labels(demo_root, domain, 'train')}
        assert not train & {lab for _, lab in _read_labels(demo_root, domain, 'test')}
        sizes = {data.load_gray(os.path.join(data.image_dir(demo_root, domain), n)).shape for n in seen}
        if domain == 'openai':
            assert sizes <= deng, sizes - deng          # Deng's buckets after the x2 downsample
            assert len(sizes) >= 3
        else:
            assert os.path.isdir(raw_dir) and raw_dir != data.image_dir(demo_root, domain)
            assert 2 <= len(sizes) <= 32
            raw_sizes = {data.load_gray(os.path.join(raw_dir, n)).shape for n in seen}
            assert len(raw_sizes) > len(sizes) / 2      # continuous raw sizes


def test_demo_deterministic_any_workers_and_resume(tmp_path):
    sizes = {'openai': (6, 2, 2), 'math': (6, 2, 2), 'chemistry': (6, 2, 2)}
    a, b = tmp_path / 'a', tmp_path / 'b'
    ra = render.write_demo(a, seed=3, workers=1, quiet=True, sizes=sizes)
    render.write_demo(b, seed=3, workers=2, quiet=True, sizes=sizes)
    for domain in DOMAINS:
        assert ra['domains'][domain]['counts'] == {'train': 6, 'val': 2, 'test': 2}
        for split in SPLITS:
            la, lb = _read_labels(a, domain, split), _read_labels(b, domain, split)
            assert la == lb
            for name, _ in la:
                pa = os.path.join(render._raw_dir(a, domain), name)
                pb = os.path.join(render._raw_dir(b, domain), name)
                assert np.array_equal(data.load_gray(pa), data.load_gray(pb))
    # one domain alone (train.py renders only the domain it trains on) is the same set as with the others
    c = tmp_path / 'c'
    render.write_demo(c, seed=3, workers=1, quiet=True, sizes=sizes, domains=['math'])
    assert not os.path.exists(data.label_path(c, 'openai', 'train'))
    for split in SPLITS:
        assert _read_labels(c, 'math', split) == _read_labels(a, 'math', split)
        for name, _ in _read_labels(c, 'math', split):
            assert np.array_equal(data.load_gray(os.path.join(render._raw_dir(c, 'math'), name)),
                                  data.load_gray(os.path.join(render._raw_dir(a, 'math'), name)))
    # a complete root: nothing is rendered again
    again = render.write_demo(a, seed=3, workers=1, quiet=True, sizes=sizes)
    assert all(again['domains'][d]['rendered'] == 0 and again['domains'][d]['reused'] == 10 for d in DOMAINS)
    # a lost image is rendered again, identically
    victim = os.path.join(a, 'images', 'openai_000003.png')
    before = data.load_gray(victim)
    os.remove(victim)
    again = render.write_demo(a, seed=3, workers=1, quiet=True, sizes=sizes, domains=['openai'])
    assert again['domains']['openai']['rendered'] == 1
    assert np.array_equal(before, data.load_gray(victim))
    # another seed is another sample: images are not reused
    other = render.write_demo(a, seed=4, workers=1, quiet=True, sizes=sizes, domains=['math'])
    assert other['domains']['math']['rendered'] == 10 and other['domains']['math']['stale'] == 0
    # a smaller set: the images it does not use are kept and reported
    small = render.write_demo(a, seed=4, workers=1, quiet=True, sizes={'math': (3, 1, 1)}, domains=['math'])
    assert small['domains']['math']['stale'] == 5 and small['domains']['math']['rendered'] == 2
    assert len(_read_labels(a, 'math', 'train')) == 3
    assert not [f for f in os.listdir(a / 'images') if f.endswith('.tmp')]


def test_failed_render_is_replaced(tmp_path, monkeypatch):
    """A formula that does not render is replaced by the next candidate and counted."""
    real = render.make_sample

    def flaky(domain, seed, split, index, attempt=0, renderer='mathtext'):
        s = real(domain, seed, split, index, attempt, renderer)
        if index == 1 and attempt == 0:
            s = dict(s, label=r'\begin { array } { c } x \end { array }')
        return s
    monkeypatch.setattr(render, 'make_sample', flaky)
    res = render.write_demo(tmp_path, seed=0, workers=1, quiet=True, domains=['math'],
                            sizes={'math': (3, 1, 1)})
    info = res['domains']['math']
    assert info['failures'] == 1 and info['dropped'] == 0 and info['counts']['train'] == 3
    assert any('environments' in m for m in info['errors'])
    labels = [lab for _, lab in _read_labels(tmp_path, 'math', 'train')]
    assert r'\begin' not in ' '.join(labels)


def test_cli_single_formula_and_demo(tmp_path, capsys):
    out = tmp_path / 'f.png'
    assert render.main(['--latex', r'\frac{a}{b}', '--out', str(out), '--dpi', '150']) == 0
    assert _ink(data.load_gray(out)) > 10
    assert render.main(['--latex', r'\begin{array}{c}x\end{array}', '--out', str(tmp_path / 'g.png')]) == 1
    assert not (tmp_path / 'g.png').exists()
    t = time.time()
    assert render.main(['--root_dir', str(tmp_path / 'd'), '--n', '3', '--domains', 'math', '--workers', '1']) == 0
    text = capsys.readouterr().out
    assert 'math' in text and 'train 3 / val 1 / test 1' in text and 'images/s' in text and 'distinct sizes' in text
    assert time.time() - t < 60


# -----------------------------------------------------------------------------
# image metrics

def test_compare_images():
    img = render.render_latex(r'x^{2} + \frac{a}{b}')
    r = metrics.compare_images(img, img.copy())
    assert r['match'] and r['col_edit'] == 0 and r['col_len'] > 10
    # one extra ink column: no match, edit distance 1
    extra = np.concatenate([img[:, :5], np.where(np.arange(img.shape[0])[:, None] % 2 == 0, 0, 255)
                            .astype(np.uint8), img[:, 5:]], axis=1)
    r = metrics.compare_images(img, extra)
    assert not r['match'] and r['col_edit'] == 1
    assert r['col_len'] == metrics.compare_images(img, img)['col_len'] + 1
    # blank columns (margins, gaps) and blank rows at the bottom are ignored
    wide = np.pad(img, ((0, 7), (9, 13)), constant_values=255)
    gap = np.concatenate([img[:, :8], np.full((img.shape[0], 6), 255, np.uint8), img[:, 8:]], axis=1)
    assert metrics.compare_images(img, wide)['match']
    assert metrics.compare_images(gap, img)['match']
    # light gray (> 128) is background after binarization
    assert metrics.compare_images(img, np.where(img == 255, 200, img).astype(np.uint8))['match']
    # a different formula differs
    other = render.render_latex(r'x^{3} + \frac{a}{b}')
    r = metrics.compare_images(img, other)
    assert not r['match'] and 0 < r['col_edit'] <= r['col_len']


def test_image_metrics():
    golds = [r'\frac{a}{b} + c', r'x^{2}', r'\alpha \beta', r'\sum_{i} i']
    perfect = metrics.image_metrics(golds, golds, workers=1)
    assert perfect['image_match'] == 1.0 and perfect['column_edit_accuracy'] == 1.0
    assert perfect['render_failures_pred'] == 0 and perfect['n'] == 4
    preds = [r'{a \over b} + c',              # other tokens, same image: a match
             r'x^{3}',                         # wrong
             r'\begin{array}{c} x \end{array}',  # does not render: a mismatch
             r'\sum _ { i } i']                # tokenized form of the gold: a match
    m = metrics.image_metrics(golds, preds, workers=1, per_sample=True)
    assert m['image_match'] == 0.5 and m['render_failures_pred'] == 1 and m['render_failures_gold'] == 0
    assert 0.0 < m['column_edit_accuracy'] < 1.0
    s = m['samples']
    assert s[0]['match'] and not s[1]['match'] and not s[2]['match'] and 'pred_error' in s[2] and s[3]['match']
    assert s[2]['col_edit'] == s[2]['col_len'] > 0
    edits = sum(x['col_edit'] for x in s)
    assert m['column_edit_accuracy'] == pytest.approx(1 - edits / sum(x['col_len'] for x in s))
    # an empty prediction is a mismatch; a gold that cannot render is left out and counted
    m = metrics.image_metrics([r'x', r'\begin{array}{c} x \end{array}'], ['', 'x'], workers=1)
    assert m['n'] == 1 and m['render_failures_gold'] == 1 and m['image_match'] == 0.0
    assert m['render_failures_pred'] == 1
    # token lists work, and the pool gives the same result as one process
    many_g = [tokenize(g) for g in golds] * 10
    many_p = [tokenize(p) for p in preds] * 10
    assert metrics.image_metrics(many_g, many_p, workers=2) == metrics.image_metrics(many_g, many_p, workers=1)
    with pytest.raises(ValueError):
        metrics.image_metrics(['x'], [])


def test_image_metrics_baseline_alignment():
    """A prediction that only adds a trailing superscript changes only the last columns (both renders are
    aligned on their baselines, as on a page), not every column."""
    m = metrics.image_metrics([r'a + b + c + d'], [r'a + b + c + d^{2}'], workers=1, per_sample=True)
    s = m['samples'][0]
    assert not s['match'] and s['col_edit'] < s['col_len'] / 3
