"""The pdflatex renderer (render.py renderer='latex'): environments render, many formulas per call with
failing ones isolated, the latex demo holds environments, and --render_eval scores environments.
Skipped where TeX is not installed; .ci/run installs it, so CI runs them."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import metrics
import render
import test as ev
import transformer

pytestmark = pytest.mark.skipif(
    render.latex_tools() is None,
    reason='pdflatex and pdftoppm are not installed (apt-get install ' + ' '.join(render.LATEX_PACKAGES) + ')')

PMATRIX = r'A = \begin{pmatrix} a & b \\ c & d \end{pmatrix}'
ALIGNED = r'\begin{aligned} x & = 1 + y \\ y & = 2 \end{aligned}'
ONE_LINE = r'x = 1 + y'


def _ink_rows(img):
    return int((img < 128).any(axis=1).sum())


def test_environments_render():
    line = render.render_latex(ONE_LINE, renderer='latex')
    for latex in (PMATRIX, ALIGNED):
        img = render.render_latex(latex, renderer='latex')
        assert img.dtype == np.uint8 and img.ndim == 2
        assert (img[:render.PAD] == 255).all() and (img[:, -render.PAD:] == 255).all()   # cropped, margin kept
        assert _ink_rows(img) > 1.6 * _ink_rows(line), latex          # two rows / lines: about twice as tall
    # raw, space-tokenized and old-style tokenized LaTeX give the same image
    a = render.render_latex(r'\begin{pmatrix}a&b\\c&d\end{pmatrix}', renderer='latex')
    b = render.render_latex(r'\begin { p m a t r i x } a & b \\ c & d \end { p m a t r i x }', renderer='latex')
    assert np.array_equal(a, b)
    # the size follows fontsize * dpi, as with mathtext
    big = render.render_latex(ONE_LINE, renderer='latex', dpi=2 * render.DPI)
    assert 1.8 < big.shape[1] / line.shape[1] < 2.2


def test_batch_isolates_failing_formulas():
    good = [rf'x ^ {{ {k} }} + \frac {{ a }} {{ b }}' for k in range(6)] + [PMATRIX]
    bad = {2: r'\undefinedcommand x', 4: r'\frac { a } { b', 5: r'\begin{array} { c } x \end{matrix}',
           7: r'\def \x { y } \x', 8: ''}
    jobs = list(good)
    for k in sorted(bad):
        jobs.insert(k, bad[k])
    res = render.render_boxes([(j, render.FONTSIZE, render.DPI, 'cm') for j in jobs], 'latex')
    assert len(res) == len(jobs)
    for k, r in enumerate(res):
        assert isinstance(r, render.RenderError) == (k in bad), (k, jobs[k], r)
    assert 'Undefined control sequence' in str(res[2]) and 'never closed' in str(res[4])
    assert 'without its opener' in str(res[5]) and 'not allowed' in str(res[7]) and 'empty' in str(res[8])
    # every good formula renders exactly as it does alone
    for k, r in enumerate(res):
        if k not in bad:
            alone = render.render_box(jobs[k], renderer='latex')
            assert np.array_equal(r[0], alone[0]) and r[1] == alone[1]


def test_latex_demo_holds_environments(tmp_path):
    res = render.write_demo(tmp_path, seed=0, workers=2, renderer='latex', domains=['openai'], quiet=True,
                            sizes={'openai': (40, 10, 10)})
    info = res['domains']['openai']
    assert sum(info['counts'].values()) == 60 and info['dropped'] == 0
    labels = []
    for split in data.SPLITS:
        with open(data.label_path(tmp_path, 'openai', split), encoding='utf-8') as f:
            rows = [ln.rstrip('\n').split('\t') for ln in f if ln.strip()]
        for name, label in rows:
            with Image.open(os.path.join(tmp_path, 'images', name)) as im:
                assert im.info['renderer'] == 'latex' and im.info['latex'] == label
            labels.append(label)
    envs = [lab for lab in labels if r'\begin{' in lab]
    assert envs, 'no environment in 60 latex demo formulas'
    for lab in envs:   # glued tokens, and in pre_vocab.txt
        toks = data.tokenize(lab)
        assert any(t.startswith(r'\begin{') for t in toks) and data.detokenize(toks) == lab
    known = set(data.read_token_list(data.PRE_VOCAB))
    assert all(t in known for lab in envs for t in data.tokenize(lab) if t.startswith((r'\begin{', r'\end{')))


def test_image_metrics_score_environments():
    golds = [PMATRIX, ALIGNED, ONE_LINE]
    preds = [r'A = \begin{pmatrix} a&b\\c&d \end{pmatrix}', r'\begin{aligned} x & = 1 + y \\ y & = 3 \end{aligned}',
             r'\begin{cases} x \end{array}']
    m = metrics.image_metrics(golds, preds, workers=1, renderer='latex', per_sample=True)
    assert m['n'] == 3 and m['render_failures_gold'] == 0 and m['render_failures_pred'] == 1
    s = m['samples']
    assert s[0]['match'] and not s[1]['match'] and 0 < s[1]['col_edit'] < s[1]['col_len'] and not s[2]['match']
    mt = metrics.image_metrics(golds, preds, workers=1, renderer='mathtext')
    assert mt['n'] == 1 and mt['render_failures_gold'] == 2    # mathtext leaves environments out


def test_render_eval_scores_an_environment(tmp_path, capsys):
    """test.py --render_eval with TeX installed renders with latex, scores the environment gold and says
    so in the metrics JSON; --renderer mathtext leaves it out."""
    labels = [PMATRIX, ONE_LINE, r'\frac { a } { b }']
    img_dir = tmp_path / 'adaptation_data' / 'math_images_resized'
    lab_dir = tmp_path / 'adaptation_data' / 'math_labels'
    img_dir.mkdir(parents=True), lab_dir.mkdir(parents=True)
    for i in range(len(labels)):
        a = np.full((32, 96), 255, np.uint8)
        a[6:26, 4 + 6 * i:10 + 6 * i] = 0
        Image.fromarray(a).save(img_dir / f'f{i}.png')
    (lab_dir / 'test.txt').write_text(''.join(f'f{i}.png\t{lab}\n' for i, lab in enumerate(labels)), encoding='utf-8')
    itos = list(data.SPECIALS) + sorted({t for lab in labels for t in data.tokenize(lab)})
    torch.manual_seed(0)
    model = transformer.build_model({'vocab_size': len(itos), 'd_model': 32, 'nhead': 2, 'num_layers': 1,
                                     'dim_ff': 64, 'max_len': 32}).eval()
    ckpt = tmp_path / 'm.pt'
    torch.save({'format_version': 1, 'model': model.state_dict(), 'teacher': None, 'vocab': itos,
                'hparams': model.hparams, 'args': {}, 'train_on': 'math'}, ckpt)
    for renderer, scored, left_out in (('auto', 3, 0), ('mathtext', 2, 1)):
        out = tmp_path / renderer
        assert ev.main(['--root_dir', str(tmp_path), '--test_on', 'math', '--weights', str(ckpt), '--out_dir',
                        str(out), '--max_len', '8', '--device', 'cpu', '--render_eval', '--renderer', renderer]) == 0
        meta = json.loads((out / 'math' / 'metrics_math_test.json').read_text())
        assert meta['renderer'] == ('latex' if renderer == 'auto' else 'mathtext')
        assert meta['image_n'] == scored and meta['render_failures_gold'] == left_out
        assert f'rendered with {meta["renderer"]}' in capsys.readouterr().out
