"""test.py, metrics.py and transformer.decode_dataset: metrics against hand computations, prediction
files, decoding records, transcription of mixed image files, teacher selection, out-of-vocab gold
tokens and an end-to-end run on the demo data."""
import collections
import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[0] != REPO:
    sys.path.insert(0, REPO)   # the standard library has a package named `test`: ours must win
import data
import metrics
import test as ev
import transformer
import utils

assert os.path.dirname(os.path.abspath(ev.__file__)) == REPO, (
    f'imported {ev.__file__} instead of {REPO}/test.py (the standard library\'s test package?)')


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP threads spinning for a core
    slow them down many times over; restored afterwards for the other test files."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def T(s):
    """'a b c' -> ['a', 'b', 'c']"""
    return s.split()


# -----------------------------------------------------------------------------
# metrics, each against a hand computation

def test_bleu_perfect_match_is_100():
    golds = [T('\\frac { a } { b }'), T('x ^ { 2 } + y ^ { 2 }')]
    assert metrics.bleu4(golds, [list(g) for g in golds]) == pytest.approx(100.0)


def test_bleu_pools_ngram_counts_over_the_corpus():
    # s1: gold a b c d e, pred a b c d f -> correct/total: 1-grams 4/5, 2-grams 3/4, 3-grams 2/3, 4-grams 1/2
    # s2: gold = pred = x y z w        ->                  1-grams 4/4, 2-grams 3/3, 3-grams 2/2, 4-grams 1/1
    # corpus: 8/9, 6/7, 4/5, 2/3; hyp length 9 = ref length 9 -> BP 1
    golds, preds = [T('a b c d e'), T('x y z w')], [T('a b c d f'), T('x y z w')]
    expected = 100 * (8 / 9 * 6 / 7 * 4 / 5 * 2 / 3) ** 0.25
    assert metrics.bleu4(golds, preds) == pytest.approx(expected, abs=1e-9)
    # not the mean of sentence BLEUs (sentence 1 alone: (4/5 3/4 2/3 1/2)^(1/4))
    s1 = 100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert metrics.bleu4(golds, preds) != pytest.approx((s1 + 100) / 2, abs=1e-3)


def test_bleu_clips_repeated_ngrams():
    # gold a b a c, pred a a a a: unigram 'a' clipped to 2 of 4; 2-gram 'a a' never in gold -> 0 (no smoothing)
    assert metrics.bleu4([T('a b a c')], [T('a a a a')]) == 0.0
    # gold a a b c d, pred a a a b c d: 1-grams 5/6 (a clipped 3->2), 2-grams 4/5 (a a clipped 2->1),
    # 3-grams 3/4 (a a a absent), 4-grams 2/3; pred longer -> BP 1
    expected = 100 * (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25
    assert metrics.bleu4([T('a a b c d')], [T('a a a b c d')]) == pytest.approx(expected, abs=1e-9)


def test_bleu_zero_4gram_count_gives_zero():
    # 1-, 2-, 3-gram matches exist but no 4-gram matches: multi-bleu.perl gives exactly 0
    golds, preds = [T('a b c d e')], [T('a b c x e')]
    assert metrics.bleu4(golds, preds) == 0.0
    # predictions too short to have any 4-gram (total 0): also 0, as multi-bleu.perl
    assert metrics.bleu4([T('a b c')], [T('a b c')]) == 0.0


def test_bleu_brevity_penalty_by_hand():
    # pred is a 6-token prefix of an 8-token gold: every n-gram precision is 1, BP = exp(1 - 8/6)
    golds, preds = [T('a b c d e f g h')], [T('a b c d e f')]
    assert metrics.bleu4(golds, preds) == pytest.approx(100 * math.exp(1 - 8 / 6), abs=1e-9)  # 71.653...


def test_bleu_with_empty_predictions():
    # one empty prediction: hyp length 4, ref length 8 -> BP exp(1 - 8/4) = 1/e; precisions 4/4 3/3 2/2 1/1
    golds, preds = [T('a b c d'), T('e f g h')], [T('a b c d'), []]
    assert metrics.bleu4(golds, preds) == pytest.approx(100 / math.e, abs=1e-9)
    # all predictions empty -> 0; no samples -> 0
    assert metrics.bleu4([T('a b c d')], [[]]) == 0.0
    assert metrics.bleu4([], []) == 0.0


def test_bleu_rejects_length_mismatch():
    with pytest.raises(ValueError):
        metrics.bleu4([T('a')], [])


def test_edit_metrics_by_hand():
    # (a b c) vs (a x c d): 1 substitution + 1 insertion = 2, max length 4
    # () vs (): 0, max 0 ; (a b) vs (): 2, max 2
    golds = [T('a b c'), [], T('a b')]
    preds = [T('a x c d'), [], []]
    assert metrics.edit_accuracy(golds, preds) == pytest.approx(1 - (2 + 0 + 2) / (4 + 0 + 2))
    assert metrics.normalized_edit_distance(golds, preds) == pytest.approx((2 / 4 + 0 + 2 / 2) / 3)
    assert metrics.exact_match(golds, preds) == pytest.approx(1 / 3)
    m = metrics.compute_metrics(golds, preds)
    assert set(m) == {'bleu4', 'edit_accuracy', 'norm_edit_distance', 'exact_match', 'n'}
    assert m['n'] == 3
    assert m['edit_accuracy'] == pytest.approx(1 / 3)
    assert m['norm_edit_distance'] == pytest.approx(0.5)


def test_edit_distance_is_over_tokens_not_characters():
    # one token replaced (\alpha -> \beta) is distance 1, although 4 characters differ
    assert metrics.edit_accuracy([T('\\alpha + 1')], [T('\\beta + 1')]) == pytest.approx(1 - 1 / 3)
    # a transposition is 2 edits in Levenshtein distance
    assert metrics.normalized_edit_distance([T('a b')], [T('b a')]) == pytest.approx(1.0)


def test_token_errors_by_hand():
    """Substitution, deletion and insertion from the Levenshtein alignment; recall per training-count band."""
    golds = [['x', '^', '{', '2', '}'], ['a', '+', 'b'], ['a', 'b']]
    preds = [['x', '^', '{', '3', '}'], ['a', 'b'], ['a', 'b', 'c']]
    counts = {'x': 5, '^': 200, '{': 2000, '}': 2000, '2': 50, 'b': 3}      # a and + never seen in train
    e = metrics.token_errors(golds, preds, counts)
    assert e['substitutions'] == [['2', '3', 1]]
    assert sorted(e['missed']) == [['+', 1, 1], ['2', 1, 1]] and e['inserted'] == [['c', 1]]
    bands = {r['band']: (r['types'], r['gold'], r['recall']) for r in e['recall_by_train_count']}
    assert bands == {'0': (2, 3, pytest.approx(2 / 3)), '1-9': (2, 3, 1.0), '10-99': (1, 1, 0.0),
                     '100-999': (1, 1, 1.0), '1000+': (2, 2, 1.0)}
    assert 'recall_by_train_count' not in metrics.token_errors(golds, preds)
    perfect = metrics.token_errors(golds, golds, counts)
    assert perfect['substitutions'] == perfect['missed'] == perfect['inserted'] == []
    assert all(r['recall'] == 1.0 for r in perfect['recall_by_train_count'])
    assert '2 -> 3 1' in metrics.format_token_errors(e)


def test_metrics_of_empty_and_perfect_inputs():
    assert metrics.edit_accuracy([[], []], [[], []]) == 1.0
    assert metrics.normalized_edit_distance([[]], [[]]) == 0.0
    m = metrics.compute_metrics([], [])
    assert m == {'bleu4': 0.0, 'edit_accuracy': 1.0, 'norm_edit_distance': 0.0, 'exact_match': 0.0, 'n': 0}
    golds = [T('x = 1'), T('\\sqrt { 2 }')]
    m = metrics.compute_metrics(golds, golds)
    assert (m['edit_accuracy'], m['norm_edit_distance'], m['exact_match']) == (1.0, 0.0, 1.0)
    # all predictions empty
    m = metrics.compute_metrics(golds, [[], []])
    assert (m['bleu4'], m['edit_accuracy'], m['norm_edit_distance'], m['exact_match']) == (0.0, 0.0, 1.0, 0.0)


# -----------------------------------------------------------------------------
# prediction files

def test_predictions_tsv_round_trip(tmp_path):
    rows = [('a.png', T('\\frac { a } { b }'), T('\\frac { a } { c }'), -1.25, -0.5),
            ('sub/b c.png', ['\\\\', '\\{', '\\ ', '\\,', '%', '#', '&', '\\'], ['<unk>', '\\ ', '\\%'], -3.0, -2.0),
            ('empty.png', T('x'), [], float('nan'), -0.125)]
    path = tmp_path / 'out' / 'predictions_math_test.tsv'
    ev.write_predictions(path, rows)
    text = path.read_text(encoding='utf-8')
    assert text.count('\n') == 3 and all(line.count('\t') == 4 for line in text.splitlines())
    assert text.splitlines()[0] == 'a.png\t\\frac { a } { b }\t\\frac { a } { c }\t-1.2500\t-0.5000'
    back = ev.read_predictions(path)
    assert [(r.image, r.gold, r.pred) for r in back] == [(a, b, c) for a, b, c, _, _ in rows]
    assert back[0].score_pred == -1.25 and back[1].score_gold == -2.0 and math.isnan(back[2].score_pred)
    # a control symbol \<tab> becomes the same control space `\ `, never a column break
    ev.write_predictions(path, [('t.png', ['a', '\\\t', 'b'], ['\\\n'], 0.0, 0.0)])
    back = ev.read_predictions(path)
    assert back[0].gold == ['a', '\\ ', 'b'] and back[0].pred == ['\\ ']
    # no stray temp files from the atomic write
    assert sorted(os.listdir(path.parent)) == ['predictions_math_test.tsv']


def test_score_an_existing_predictions_file(tmp_path, capsys):
    path = tmp_path / 'p.tsv'
    # the brevity-penalty example: BLEU 100 exp(1 - 8/6) = 71.65, edit accuracy 1 - 2/8
    ev.write_predictions(path, [('a.png', T('a b c d e f g h'), T('a b c d e f'), -1.0, -1.0)])
    assert ev.main(['--score', str(path)]) == 0
    out = capsys.readouterr().out
    assert f'{100 * math.exp(1 - 8 / 6):.2f}' in out and '0.7500' in out


def test_read_predictions_names_bad_line(tmp_path):
    path = tmp_path / 'p.tsv'
    path.write_text('a.png\tx\tx\t0\t0\nb.png\tx\tx\n', encoding='utf-8')
    with pytest.raises(ValueError, match=r'p\.tsv:2'):
        ev.read_predictions(path)


def test_record_is_a_tuple_and_a_mapping():
    r = transformer.Record(3, ['a'], ['b'], -1.0, -2.0)
    index, gold, pred, sp, sg = r
    assert (index, gold, pred, sp, sg) == (3, ['a'], ['b'], -1.0, -2.0)
    assert (r['pred'], r['score_gold'], r[3], r.index) == (['b'], -2.0, -1.0, 3)


# -----------------------------------------------------------------------------
# preprocessing of arbitrary images

def test_crop_to_ink_pads_and_keeps_resolution():
    page = np.full((100, 200), 255, np.uint8)
    page[40:50, 60:90] = 0
    out = utils.crop_to_ink(page, pad=8)
    assert out.shape == (10 + 16, 30 + 16)
    assert (out[8:18, 8:38] == 0).all() and (out[:8] == 255).all() and (out[:, -8:] == 255).all()
    assert utils.crop_to_ink(np.full((10, 10), 255, np.uint8)) is None
    with pytest.raises(ValueError, match='blank'):
        ev.preprocess_image(np.full((10, 10), 250, np.uint8), 'crop')
    big = np.zeros((100, 3000), np.uint8)
    assert ev.shrink_to_fit(big, 800).shape == (27, 800)


# -----------------------------------------------------------------------------
# a tiny data root and tiny checkpoints (d_model 32, one decoder layer)

MAX_LEN = 6
LABELS = ['x ^ { 2 }', '\\frac { a } { b }', 'a + b = c', '\\sqrt { x }', 'y _ { 1 }']


def _draw(i, hw=(32, 96)):
    """A distinct black-on-white drawing, uint8 (H, W)."""
    a = np.full(hw, 255, np.uint8)
    a[6:26, 4 + 6 * i:10 + 6 * i] = 0
    a[10 + i:14 + i, 40:80] = 0
    return a


@pytest.fixture(scope='module')
def tiny_root(tmp_path_factory):
    """math/test of 5 same-size images (one batch, index order) and a label file."""
    root = tmp_path_factory.mktemp('root')
    img_dir = root / 'adaptation_data' / 'math_images_resized'
    lab_dir = root / 'adaptation_data' / 'math_labels'
    img_dir.mkdir(parents=True), lab_dir.mkdir(parents=True)
    lines = []
    for i, latex in enumerate(LABELS):
        Image.fromarray(_draw(i)).save(img_dir / f'f{i}.png')
        lines.append(f'f{i}.png\t{latex}\n')
    (lab_dir / 'test.txt').write_text(''.join(lines), encoding='utf-8')
    return str(root)


def _tiny_model(vocab_size, seed):
    torch.manual_seed(seed)
    return transformer.build_model({'vocab_size': vocab_size, 'd_model': 32, 'nhead': 2, 'num_layers': 1,
                                    'dim_ff': 64, 'max_len': 32}).eval()


def _save_ckpt(path, itos, student, teacher=None):
    ckpt = {'format_version': 1, 'model': student.state_dict(),
            'teacher': teacher.state_dict() if teacher is not None else None,
            'optimizer': {}, 'scheduler': {}, 'scaler': None, 'epoch': 1, 'step': 10, 'batch_in_epoch': 0,
            'best_metric': 0.0, 'vocab': list(itos), 'hparams': student.hparams, 'args': {}, 'train_on': 'math'}
    torch.save(ckpt, path)
    return str(path)


@pytest.fixture(scope='module')
def tiny_ckpts(tmp_path_factory):
    """A checkpoint with different student and teacher weights, and one without a teacher. The vocab
    lacks \\sqrt (a gold token of sample 3)."""
    d = tmp_path_factory.mktemp('ckpt')
    tokens = sorted({t for latex in LABELS for t in data.tokenize(latex)} - {'\\sqrt'})
    itos = list(data.SPECIALS) + tokens
    student, teacher = _tiny_model(len(itos), 0), _tiny_model(len(itos), 1)
    return {'itos': itos, 'student': student, 'teacher': teacher,
            'mt': _save_ckpt(d / 'mt.pt', itos, student, teacher),
            'plain': _save_ckpt(d / 'plain.pt', itos, student)}


def _direct(model, vocab, arrays, max_len=MAX_LEN):
    """Greedy tokens and gold log-probs computed straight from the model, one batch in index order."""
    images = torch.stack([data.to_tensor(a) for a in arrays])                    # (B, 1, H, W)
    ids, _ = model.greedy(images=images, max_len=max_len)
    return [vocab.decode(s) for s in ids]


def _run_eval(tiny_root, ckpt, out_dir, *extra):
    """test.py on the tiny set, greedy (the expectations below are greedy) unless `extra` gives --beam."""
    return ev.main(['--root_dir', tiny_root, '--test_on', 'math', '--weights', ckpt, '--out_dir', str(out_dir),
                    '--max_len', str(MAX_LEN), '--batchsz', '8', '--device', 'cpu', '--beam', '1', *extra])


def test_mean_teacher_selects_the_teacher(tiny_root, tiny_ckpts, tmp_path, capsys):
    vocab = data.Vocab(tiny_ckpts['itos'])
    arrays = [_draw(i) for i in range(len(LABELS))]
    tgt = torch.nn.utils.rnn.pad_sequence([torch.tensor(vocab.encode(data.tokenize(x))) for x in LABELS],
                                          batch_first=True, padding_value=data.PAD)   # (B, T)
    images = torch.stack([data.to_tensor(a) for a in arrays])
    expected = {}
    for which in ('student', 'teacher'):
        m = tiny_ckpts[which]
        expected[which] = (_direct(m, vocab, arrays), m.sequence_logprob(images, tgt).tolist())
    assert expected['student'][1] != pytest.approx(expected['teacher'][1], abs=1e-3)   # the test can tell them apart

    for which, flags in (('teacher', ['--mean_teacher']), ('student', [])):
        out = tmp_path / which
        assert _run_eval(tiny_root, tiny_ckpts['mt'], out, *flags) == 0
        rows = ev.read_predictions(out / 'math' / 'predictions_math_test.tsv')
        assert [r.image for r in rows] == [f'f{i}.png' for i in range(len(LABELS))]
        preds, gold_scores = expected[which]
        assert [r.pred for r in rows] == preds
        assert [r.score_gold for r in rows] == pytest.approx(gold_scores, abs=1e-3)
        meta = json.loads((out / 'math' / 'metrics_math_test.json').read_text())
        assert meta['weights'] == which
    assert 'teacher (EMA) weights' in capsys.readouterr().err


def test_exclude_overlap_scores_only_formulas_not_in_train(tiny_root, tiny_ckpts, tmp_path):
    with pytest.raises(SystemExit, match='needs a train label file'):          # tiny_root has no train.txt
        _run_eval(tiny_root, tiny_ckpts['plain'], tmp_path, '--exclude_overlap')
    root = tmp_path / 'root'
    shutil.copytree(tiny_root, root)
    with open(root / 'adaptation_data' / 'math_labels' / 'train.txt', 'w', encoding='utf-8') as f:
        f.write(f't0.png\t{LABELS[1]}\nt1.png\tq\nt2.png\t{LABELS[3].replace(" ", "")}\n')  # f1, f3 planted
    out = tmp_path / 'out'
    assert _run_eval(str(root), tiny_ckpts['plain'], out) == 0
    full = json.loads((out / 'math' / 'metrics_math_test.json').read_text())
    assert (full['n'], full['overlap_with_train'], full['exclude_overlap']) == (5, 2, False)
    assert full['overlap_train_domains'] == ['math']
    assert _run_eval(str(root), tiny_ckpts['plain'], out, '--exclude_overlap') == 0
    unseen = json.loads((out / 'math' / 'metrics_math_test_unseen.json').read_text())
    assert (unseen['n'], unseen['overlap_with_train'], unseen['exclude_overlap']) == (3, 2, True)
    rows = ev.read_predictions(out / 'math' / 'predictions_math_test_unseen.tsv')
    assert [r.image for r in rows] == ['f0.png', 'f2.png', 'f4.png']
    by_image = {r.image: r for r in ev.read_predictions(out / 'math' / 'predictions_math_test.tsv')}
    subset = metrics.compute_metrics([by_image[r.image].gold for r in rows], [by_image[r.image].pred for r in rows])
    assert unseen['edit_accuracy'] == pytest.approx(subset['edit_accuracy'])
    assert unseen['norm_edit_distance'] == pytest.approx(subset['norm_edit_distance'])


def test_mean_teacher_without_teacher_is_a_clear_error(tiny_root, tiny_ckpts, tmp_path):
    with pytest.raises(SystemExit, match='no teacher weights'):
        _run_eval(tiny_root, tiny_ckpts['plain'], tmp_path, '--mean_teacher')


def test_missing_checkpoint_says_how_to_train(tiny_root, tmp_path):
    with pytest.raises(SystemExit) as e:
        ev.main(['--root_dir', tiny_root, '--test_on', 'math', '--out_dir', str(tmp_path)])
    msg = str(e.value)
    assert os.path.join(str(tmp_path), 'math', 'best.pt') in msg and 'python3 train.py --train_on math' in msg


class _Oracle(torch.nn.Module):
    """Predicts the gold ids of each image as the vocab encodes them (unknown tokens -> <unk>)."""

    def __init__(self, arrays, token_lists, vocab):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.table = {data.to_tensor(a).numpy().tobytes(): vocab.encode(t, add_sos_eos=False)
                      for a, t in zip(arrays, token_lists)}

    def encode(self, images):
        return images.flatten(1)[:, :, None]                  # the "memory" (B, H*W, 1) is the image itself

    def greedy(self, images=None, memory=None, max_len=150, memory_pad_mask=None):
        rows = memory if memory_pad_mask is None else [m[~p] for m, p in zip(memory, memory_pad_mask)]
        ids = [self.table[m.flatten().numpy().tobytes()][:max_len] for m in rows]
        return ids, torch.zeros(len(ids))

    def sequence_logprob(self, images, tgt, memory=None):
        return torch.full((tgt.shape[0],), -1.0)


def test_gold_tokens_outside_the_vocab_count_as_errors(tiny_root, tiny_ckpts):
    vocab = data.Vocab(tiny_ckpts['itos'])                    # lacks \sqrt
    ds = data.FormulaDataset(tiny_root, 'math', 'test', vocab=vocab)
    oracle = _Oracle([_draw(i) for i in range(len(LABELS))], ds.tokens, vocab)
    loader, _ = data.make_loader(ds, 2, shuffle=False)
    records = transformer.decode_dataset(oracle, loader, vocab, max_len=50, progress=False)
    assert [r.index for r in records] == list(range(len(LABELS)))
    assert records[3].gold == ['\\sqrt', '{', 'x', '}'] and records[3].pred == ['<unk>', '{', 'x', '}']
    assert records[0]['score_gold'] == -1.0
    m = metrics.compute_metrics([r.gold for r in records], [r.pred for r in records])
    n_tokens = sum(len(data.tokenize(x)) for x in LABELS)
    assert m['exact_match'] == pytest.approx(4 / 5)
    assert m['edit_accuracy'] == pytest.approx(1 - 1 / n_tokens)
    assert m['norm_edit_distance'] == pytest.approx((1 / 4) / 5)


def test_beam_scores_are_summed_logprobs_like_the_gold_score(tiny_root, tiny_ckpts, tmp_path):
    assert _run_eval(tiny_root, tiny_ckpts['mt'], tmp_path, '--beam', '3', '--tag', 'beam3') == 0
    rows = ev.read_predictions(tmp_path / 'math' / 'predictions_math_test_beam3.tsv')
    meta = json.loads((tmp_path / 'math' / 'metrics_math_test_beam3.json').read_text())
    assert meta['beam'] == 3 and meta['decoding'] == 'beam 3' and meta['args']['beam'] == 3
    vocab, model = data.Vocab(tiny_ckpts['itos']), tiny_ckpts['student']
    checked = 0
    for i, r in enumerate(rows):
        if len(r.pred) < MAX_LEN:                             # finished with <eos>
            tgt = torch.tensor([vocab.encode(r.pred)])
            lp = model.sequence_logprob(torch.stack([data.to_tensor(_draw(i))]), tgt).item()
            assert r.score_pred == pytest.approx(lp, abs=1e-3)
            checked += 1
    assert checked or all(len(r.pred) == MAX_LEN for r in rows)


# -----------------------------------------------------------------------------
# transcription of arbitrary image files

def test_image_transcription_of_a_mixed_folder(tiny_ckpts, tmp_path, capsys):
    folder = tmp_path / 'imgs'
    (folder / 'sub').mkdir(parents=True)
    page = np.full((60, 160), 255, np.uint8)
    page[15:40, 20:30] = 0
    page[20:24, 50:120] = 0
    Image.fromarray(page).convert('RGB').save(folder / 'a_rgb.png')
    rgba = np.zeros((60, 160, 4), np.uint8)                   # black ink on a transparent background
    rgba[..., 3] = 255 - page
    Image.fromarray(rgba, 'RGBA').save(folder / 'b_rgba.png')
    Image.fromarray(page).convert('RGB').save(folder / 'c.jpg', quality=95)
    Image.fromarray(page.astype(np.uint16) * 257).save(folder / 'd_16bit.png')
    assert Image.open(folder / 'd_16bit.png').mode.startswith('I')
    (folder / 'e_corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n not really a png')
    Image.fromarray(page).convert('P').save(folder / 'sub' / 'f_palette.gif')
    (folder / 'notes.txt').write_text('not an image')
    missing = tmp_path / 'missing.png'

    code = ev.main(['--weights', tiny_ckpts['plain'], '--image', str(missing), str(folder),
                    '--max_len', str(MAX_LEN), '--device', 'cpu', '--beam', '1'])
    out = capsys.readouterr().out.splitlines()
    assert code == 1
    names = ['a_rgb.png', 'b_rgba.png', 'c.jpg', 'd_16bit.png', 'e_corrupt.png', os.path.join('sub', 'f_palette.gif')]
    assert [line.split('\t')[0] for line in out] == [str(missing)] + [str(folder / n) for n in names]
    assert all(line.count('\t') == 1 for line in out)
    latex = {line.split('\t')[0]: line.split('\t')[1] for line in out}
    assert latex[str(missing)].startswith('ERROR: ') and 'not found' in latex[str(missing)]
    assert latex[str(folder / 'e_corrupt.png')].startswith('ERROR: ')
    good = [str(folder / n) for n in names if 'corrupt' not in n]
    assert not any(latex[p].startswith('ERROR') for p in good)
    # every mode converts to the same gray image, so the same transcription as a direct model call
    vocab = data.Vocab(tiny_ckpts['itos'])
    expected = ' '.join(_direct(tiny_ckpts['student'], vocab, [utils.crop_to_ink(page)])[0])
    for p in good:
        if not p.endswith('.jpg'):
            assert latex[p] == expected, p


def test_image_transcription_all_good_exits_zero_and_uses_the_teacher(tiny_ckpts, tmp_path, capsys):
    paths = []
    for i in (2, 0):                                          # input order, not name order
        p = tmp_path / f'{i}.png'
        Image.fromarray(_draw(i)).save(p)
        paths.append(str(p))
    code = ev.main(['--weights', tiny_ckpts['mt'], '--mean_teacher', '--image', *paths, '--preprocess', 'none',
                    '--max_len', str(MAX_LEN), '--device', 'cpu', '--beam', '1'])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    vocab = data.Vocab(tiny_ckpts['itos'])
    expected = _direct(tiny_ckpts['teacher'], vocab, [_draw(2)]) + _direct(tiny_ckpts['teacher'], vocab, [_draw(0)])
    assert out == [f'{p}\t{" ".join(t)}' for p, t in zip(paths, expected)]


# -----------------------------------------------------------------------------
# report and end to end on the demo data

def test_report_escapes_and_notes_render_failures(tmp_path):
    samples = [{'name': 'a<b>.png', 'image': _draw(0), 'gold': ['a', '<', 'b', '&'], 'pred': ['<unk>', '&'],
                'lev': 3, 'ned': 0.75},
               {'name': 'c.png', 'image': None, 'image_note': 'cannot read image', 'gold': ['x'], 'pred': ['x'],
                'lev': 0, 'ned': 0.0}]

    def render_fn(latex):
        if 'unk' in latex:
            raise ValueError('Unknown symbol: <unk>')
        return _draw(1)

    path = tmp_path / 'r.html'
    ev.write_report(path, samples, 'worst <2>', ['meta & more'], render_fn)
    page = path.read_text(encoding='utf-8')
    assert '&lt;unk&gt;' in page and '<unk>' not in page and 'a&lt;b&gt;.png' in page
    assert 'does not render: Unknown symbol: &lt;unk&gt;' in page
    assert page.count('data:image/png;base64,') == 2            # input of sample 1, rendering of sample 2
    assert 'cannot read image' in page and 'meta &amp; more' in page


def test_end_to_end_on_demo_data(demo_root, tmp_path, capsys):
    train = data.FormulaDataset(demo_root, 'chemistry', 'train')
    vocab = data.Vocab.build([], train.tokens)
    ckpt = _save_ckpt(tmp_path / 'demo.pt', vocab.itos, _tiny_model(len(vocab), 0))
    report = tmp_path / 'worst.html'
    code = ev.main(['--root_dir', demo_root, '--test_on', 'chemistry', '--weights', ckpt, '--out_dir',
                    str(tmp_path / 'runs'), '--max_len', '8', '--batchsz', '16', '--device', 'cpu',
                    '--render_eval', '--report', str(report), '--report_n', '3', '--errors'])
    assert code == 0
    out = capsys.readouterr().out
    assert 'BLEU-4' in out and 'exact match' in out and 'image match' in out
    test_ds = data.FormulaDataset(demo_root, 'chemistry', 'test')
    d = tmp_path / 'runs' / 'chemistry'
    rows = ev.read_predictions(d / 'predictions_chemistry_test.tsv')
    assert [r.image for r in rows] == test_ds.names
    assert [r.gold for r in rows] == test_ds.tokens
    assert all(len(r.pred) <= 8 and math.isfinite(r.score_pred) for r in rows)
    # the tiny model has 32 positions: longer golds get no gold score (nan), and never a crash
    assert any(len(r.gold) > 31 for r in rows) and any(len(r.gold) <= 31 for r in rows)
    assert all(math.isfinite(r.score_gold) == (len(r.gold) <= 31) for r in rows)
    meta = json.loads((d / 'metrics_chemistry_test.json').read_text())
    for key in ('bleu4', 'edit_accuracy', 'norm_edit_distance', 'exact_match', 'n', 'image_match',
                'column_edit_accuracy', 'render_failures_pred', 'checkpoint', 'weights', 'beam', 'split',
                'domain', 'time_s', 'formulas_per_s', 'torch', 'device', 'args', 'search_errors', 'n_dataset'):
        assert key in meta, key
    assert meta['n'] == len(test_ds) and meta['weights'] == 'student' and meta['split'] == 'test'
    import render
    assert meta['renderer'] == render.resolve_renderer('auto')   # pdflatex where installed, else mathtext
    assert meta['checkpoint'] == os.path.abspath(ckpt) and meta['args']['max_len'] == 8
    assert meta['search_errors'] == sum(r.gold != r.pred and r.score_gold > r.score_pred + 1e-4 for r in rows)
    m = metrics.compute_metrics([r.gold for r in rows], [r.pred for r in rows])
    assert meta['bleu4'] == pytest.approx(m['bleu4']) and meta['exact_match'] == pytest.approx(m['exact_match'])
    # --errors: bands by occurrences in the train labels of the checkpoint's domain (math), not chemistry's
    counts = collections.Counter(t for _, tokens in data.split_tokens(demo_root, 'math', 'train') for t in tokens)
    assert meta['token_errors'] == json.loads(json.dumps(metrics.token_errors([r.gold for r in rows],
                                                                              [r.pred for r in rows], counts)))
    assert sum(r['gold'] for r in meta['token_errors']['recall_by_train_count']) == sum(len(r.gold) for r in rows)
    assert 'gold tokens recovered, by training count' in out
    page = report.read_text(encoding='utf-8')
    assert page.count('<tr>') == 1 + 3 and 'data:image/png;base64,' in page


def test_a_batch_the_model_fails_on_is_reported_per_image():
    class Picky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def greedy(self, images=None, memory=None, max_len=150):
            if images.shape[-1] > 50:
                raise RuntimeError('out of memory\nmore detail')
            return [[4, 5]] * images.shape[0], torch.zeros(images.shape[0])

    vocab = data.Vocab(list(data.SPECIALS) + ['a', 'b'])
    small, big = np.zeros((10, 20), np.uint8), np.zeros((10, 60), np.uint8)
    out = ev.transcribe_arrays(Picky(), vocab, [big, small, big])
    assert out[1] == ['a', 'b']
    assert isinstance(out[0], RuntimeError) and 'out of memory' in str(out[0]) and '10x60' in str(out[0])


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'not a checkpoint')
    with pytest.raises(SystemExit, match=r'bad\.pt.*not a readable checkpoint'):
        ev.main(['--weights', str(bad), '--image', str(bad)])
