"""train.py: schedules, mean-teacher pieces, and short real runs on CPU (overfit, resume, NaN skip,
--init_from vocab extension, --split_batch, --mean_teacher, 2-process torchrun), and the faults of long
runs (SIGKILL with --save_every, resume from args.json, a lost torchrun worker, uneven validation, a
full disk, a file that is not a checkpoint)."""
import errno
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import data
import render
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a tiny decoder so that the runs take seconds; the encoder is the real EfficientNet-B0
TINY = ['--d_model', '64', '--nhead', '4', '--num_layers', '2', '--dim_ff', '128', '--dropout', '0.0',
        '--max_len', '24', '--workers', '0', '--device', 'cpu', '--log_every', '1']
SIZE = (32, 96)   # (H, W) of every image of the uniform root: one bucket


def short_formulas(n, seed=0):
    """n distinct short formulas (3-7 tokens) such as `x ^ { 2 } + 7`."""
    rng = random.Random(seed)
    out = set()
    while len(out) < n:
        a, b = rng.choice('abcxyz'), rng.choice('0123456789')
        op = rng.choice(['+', '-', '=', '<', '>'])
        f = f'{a} {op} {b}' if rng.random() < 0.5 else f'{a} ^ {{ {b} }} {op} {rng.choice("pqrs")}'
        out.add(f)
    return sorted(out)


@pytest.fixture(scope='module')
def uniform_root(tmp_path_factory):
    """A math-domain root whose 32 images all have one size; train == val == test (an overfit set)."""
    root = tmp_path_factory.mktemp('uniform')
    img_dir = root / 'adaptation_data' / 'math_images_resized'
    lab_dir = root / 'adaptation_data' / 'math_labels'
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True)
    lines = []
    for i, f in enumerate(short_formulas(32)):
        ink = render.render_latex(f, fontsize=14, dpi=100)
        canvas = np.full(SIZE, 255, np.uint8)
        h, w = min(ink.shape[0], SIZE[0] - 4), min(ink.shape[1], SIZE[1] - 4)
        canvas[2:2 + h, 2:2 + w] = ink[:h, :w]
        Image.fromarray(canvas).save(img_dir / f'm{i:03d}.png')
        lines.append(f'm{i:03d}.png\t{f}\n')
    for split in data.SPLITS:
        (lab_dir / f'{split}.txt').write_text(''.join(lines))
    return str(root)


def run(root, out, *extra):
    return train.main(['--root_dir', root, '--train_on', 'math', '--out_dir', str(out)] + TINY + list(extra))


def load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


# -----------------------------------------------------------------------------
# small pieces

def test_sigmoid_rampup_values():
    assert train.sigmoid_rampup(0, 5) == pytest.approx(math.exp(-5))
    assert train.sigmoid_rampup(2.5, 5) == pytest.approx(math.exp(-5 * 0.25))
    assert train.sigmoid_rampup(5, 5) == 1.0
    assert train.sigmoid_rampup(9, 5) == 1.0
    assert train.sigmoid_rampup(0, 0) == 1.0


def test_token_dropout_replaces_only_real_tokens():
    tgt_in = torch.tensor([[data.SOS, 10, 11, 12, data.EOS, data.PAD],
                           [data.SOS, 20, data.UNK, data.EOS, data.PAD, data.PAD]])
    assert torch.equal(train.token_dropout(tgt_in, 0.0), tgt_in)
    all_dropped = train.token_dropout(tgt_in, 1.0)
    special = tgt_in <= data.UNK                                   # <pad> <sos> <eos> <unk> stay
    assert torch.equal(all_dropped[special], tgt_in[special])
    assert (all_dropped[~special] == data.UNK).all()
    torch.manual_seed(0)
    big = torch.randint(data.UNK + 1, 100, (200, 50))
    rate = (train.token_dropout(big, 0.3) == data.UNK).float().mean().item()
    assert 0.27 < rate < 0.33
    for bad in ('-0.1', '1.5'):
        with pytest.raises(SystemExit):
            train.get_args(['--token_dropout', bad])


def test_output_stride_flag():
    assert train.get_args(['--output_stride', '32']).output_stride == 32
    assert train.get_args(['--output_stride', '16x8']).output_stride == [16, 8]
    assert train.get_args([]).output_stride == [16, 8]                 # the default, rows x columns
    hp = train.model_hparams(train.get_args(['--output_stride', '32X16']), 50)
    assert hp['output_stride'] == [32, 16]
    for bad in ('4', '16x', '16x8x8', 'x8', 'sixteen'):
        with pytest.raises(SystemExit):
            train.get_args(['--output_stride', bad])


def test_update_ema_follows_formula():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    s = [p.detach().clone() for p in student.parameters()]
    train.update_ema(teacher, student, decay=0.99, step=0)      # a = min(1 - 1/1, .99) = 0: copy
    for t, x in zip(teacher.parameters(), s):
        assert torch.equal(t, x)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    train.update_ema(teacher, student, decay=0.99, step=3)      # a = min(0.75, .99) = 0.75
    for t, x in zip(teacher.parameters(), s):
        torch.testing.assert_close(t, 0.75 * x + 0.25 * (x + 1.0))
    train.update_ema(teacher, student, decay=0.5, step=1000)    # a = decay
    assert not torch.equal(next(teacher.parameters()), t0[0])


def test_ema_horizon_note_warns_only_for_runs_short_for_the_decay():
    # decay 0.999: uniform averaging over the first 1000 steps; runs under 3000 steps are warned
    note = train.ema_horizon_note(0.999, 480)
    assert note is not None and '480 steps' in note and '1000 steps' in note
    assert note.endswith('use --ema_decay 0.99')             # largest listed decay with 3 windows <= 480
    assert train.ema_horizon_note(0.999, 3000) is None
    assert train.ema_horizon_note(0.99, 480) is None          # window 100 steps
    assert train.ema_horizon_note(0.99, 299).endswith('use --ema_decay 0.98')
    assert 'use' not in train.ema_horizon_note(0.9, 10)       # nothing smaller to suggest


def test_consistency_loss_masks_padding_and_is_zero_for_equal_inputs():
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    for kind in ('kl', 'mse'):
        assert float(train.consistency_loss(s, s.clone(), mask, kind)) == pytest.approx(0.0, abs=1e-6)
        full = train.consistency_loss(s, t, mask, kind)
        t2 = t.clone()
        t2[0, 2:] = 100.0                                     # padded positions change: no effect
        assert float(train.consistency_loss(s, t2, mask, kind)) == pytest.approx(float(full))
    # KL by hand for one token
    p, q = torch.softmax(t[0, 0], -1), torch.softmax(s[0, 0], -1)
    one = torch.zeros(2, 4, dtype=torch.bool)
    one[0, 0] = True
    assert float(train.consistency_loss(s, t, one, 'kl')) == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-5)


def schedule(argv, steps_per_epoch):
    args = train.get_args(argv)
    model = torch.nn.Linear(2, 2)
    opt = train.make_optimizer(args, model)
    return args, opt, train.make_scheduler(args, opt, steps_per_epoch)


def test_onecycle_schedule_expected_lr():
    args, opt, sched = schedule(['--initlr', '0.1', '--epochs', '10'], steps_per_epoch=10)   # 100 steps
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]['lr'])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1 / 25)                  # starts at max_lr / 25
    assert max(lrs) == pytest.approx(0.1, rel=1e-3)           # peak at 30% of the steps
    assert int(np.argmax(lrs)) in (29, 30)
    assert lrs[-1] == pytest.approx(0.1 / 25 / 1e4, rel=0.5)  # anneals to max_lr / 25 / 1e4
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]['nesterov']


def test_pct_start_moves_the_peak_and_is_checked():
    """--pct_start 0.5: the lr peaks at step 49 of 100 (not 29) and still starts and ends where it did."""
    args, opt, sched = schedule(['--initlr', '0.1', '--epochs', '10', '--pct_start', '0.5'], steps_per_epoch=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]['lr'])
        opt.step()
        sched.step()
    assert int(np.argmax(lrs)) == 49 and max(lrs) == pytest.approx(0.1)
    assert lrs[0] == pytest.approx(0.1 / 25) and lrs[-1] == pytest.approx(0.1 / 25 / 1e4, rel=0.5)
    assert lrs[20] < 0.6 * 0.1                                # still rising at 20%, where 0.3 would be near 0.1
    for bad in ('0', '1', '-0.2', '1.5'):
        with pytest.raises(SystemExit):
            train.get_args(['--pct_start', bad])


def test_initlr_default_depends_on_the_optimizer():
    """SGD's OneCycle peak and Adam's initial lr have their own defaults; a given --initlr wins."""
    assert train.get_args([]).initlr == train.SGD_PEAK_LR == 0.3
    assert train.get_args(['--Adam']).initlr == train.ADAM_LR == 1e-3
    assert train.get_args(['--initlr', '0.05']).initlr == 0.05
    assert train.get_args(['--Adam', '--initlr', '0.05']).initlr == 0.05


def test_zero_init_residual_only_for_new_models_when_asked():
    """A new model starts with zero gamma in its residual blocks (--zero_init_residual, the default);
    --no-zero_init_residual keeps efficientnet_pytorch's init (gamma 1)."""
    d = SimpleNamespace(train_set=SimpleNamespace(tokens=[['x']], vocab=None), val_set=SimpleNamespace(vocab=None))
    for flags, gamma in (([], 0.0), (['--no-zero_init_residual'], 1.0)):
        args = train.get_args(['--d_model', '32', '--nhead', '2', '--num_layers', '1', '--dim_ff', '32'] + flags)
        model, _, _, _ = train.build_model(args, None, d, torch.device('cpu'))
        blocks = model.encoder.backbone._blocks
        assert torch.all(blocks[2]._bn2.weight == gamma) and torch.all(blocks[14]._bn2.weight == gamma)
        assert torch.all(blocks[1]._bn2.weight == 1.0)       # a stage-entry block: no shortcut, untouched


def test_adam_exponential_schedule_expected_lr():
    args, opt, sched = schedule(['--Adam', '--initlr', '1e-3', '--gamma', '0.5'], steps_per_epoch=10)
    assert isinstance(opt, torch.optim.Adam)
    for epoch in range(4):
        assert opt.param_groups[0]['lr'] == pytest.approx(1e-3 * 0.5 ** epoch)
        for _ in range(10):                                   # per step: 10 steps an epoch
            opt.step()
            sched.step()


def test_weight_decay_skips_biases_and_norms():
    args = train.get_args(['--weight_decay', '0.01'])
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    groups = train.make_optimizer(args, model).param_groups
    assert [len(g['params']) for g in groups] == [1, 3]
    assert [g['weight_decay'] for g in groups] == [0.01, 0.0]


def test_unlabeled_needs_mean_teacher():
    with pytest.raises(SystemExit):
        train.get_args(['--unlabeled', 'somewhere'])


# -----------------------------------------------------------------------------
# real runs on the uniform overfit set

def test_overfit_reaches_high_exact_match(uniform_root, tmp_path):
    # one batch of 32 per epoch; Adam with a slowly decaying lr (exact match 1.0 after ~75 steps here)
    state = run(uniform_root, tmp_path, '--Adam', '--initlr', '1e-3', '--gamma', '0.97', '--batchsz', '32',
                '--epochs', '80')
    assert state['val_metrics']['exact_match'] >= 0.9, state['val_metrics']
    run_dir = tmp_path / 'math'
    assert (run_dir / 'last.pt').exists() and (run_dir / 'best.pt').exists()
    assert (run_dir / 'args.json').exists() and list((run_dir / 'tb').iterdir())
    ckpt = load(run_dir / 'best.pt')
    assert ckpt['format_version'] == checkpoint.FORMAT_VERSION and ckpt['epoch'] >= 1
    assert ckpt['args']['batchsz'] == 32 and ckpt['vocab'][:4] == list(data.SPECIALS)
    assert all(torch.is_tensor(v) for v in ckpt['model'].values())


def test_resume_after_interrupt_equals_uninterrupted(uniform_root, tmp_path, monkeypatch):
    common = ('--mean_teacher', '--ema_decay', '0.9', '--rampup', '1', '--batchsz', '8', '--epochs', '2',
              '--val_max', '4', '--initlr', '0.05')
    run(uniform_root, tmp_path / 'a', *common)
    full = load(tmp_path / 'a' / 'math' / 'last.pt')
    assert full['step'] == 8 and full['epoch'] == 2

    # interrupted: a SIGINT during step 6 (epoch 2) stops after that step and saves last.pt
    calls = {'n': 0}
    original = train.supervised_loss

    def interrupting(*a, **k):
        calls['n'] += 1
        if calls['n'] == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*a, **k)

    monkeypatch.setattr(train, 'supervised_loss', interrupting)
    with pytest.raises(SystemExit) as e:
        run(uniform_root, tmp_path / 'b', *common)
    assert e.value.code == 130
    part = load(tmp_path / 'b' / 'math' / 'last.pt')
    assert (part['epoch'], part['step'], part['batch_in_epoch']) == (1, 6, 2)
    monkeypatch.setattr(train, 'supervised_loss', original)
    run(uniform_root, tmp_path / 'b', '--resume', '--workers', '0')
    resumed = load(tmp_path / 'b' / 'math' / 'last.pt')
    assert resumed['step'] == 8 and resumed['epoch'] == 2
    for key in ('model', 'teacher'):
        for name, v in full[key].items():
            assert torch.equal(v, resumed[key][name]), (key, name)
    assert resumed['best_metric'] == full['best_metric']
    assert resumed['scheduler']['last_epoch'] == full['scheduler']['last_epoch']
    # the teacher is an EMA, not a copy of the student
    assert any(not torch.equal(full['model'][k], full['teacher'][k]) for k in full['model']
               if full['model'][k].is_floating_point())


def test_nan_loss_is_skipped(uniform_root, tmp_path, monkeypatch):
    calls = {'n': 0}
    original = train.supervised_loss

    def poisoned(*a, **k):
        calls['n'] += 1
        loss = original(*a, **k)
        return loss * float('nan') if calls['n'] == 2 else loss

    monkeypatch.setattr(train, 'supervised_loss', poisoned)
    state = run(uniform_root, tmp_path, '--mean_teacher', '--batchsz', '16', '--epochs', '1', '--val_max', '4')
    assert state['skipped_steps'] == 1 and state['step'] == 2
    ckpt = load(tmp_path / 'math' / 'last.pt')
    for key in ('model', 'teacher'):
        assert all(torch.isfinite(v).all() for v in ckpt[key].values() if v.is_floating_point()), key


def test_split_batch_trains(uniform_root, tmp_path):
    state = run(uniform_root, tmp_path, '--split_batch', '--batchsz', '16', '--epochs', '1', '--val_max', '4')
    assert state['step'] == 2 and math.isfinite(state['val_metrics']['bleu4'])


def test_init_from_extends_vocab(uniform_root, tmp_path):
    run(uniform_root, tmp_path / 'src', '--batchsz', '16', '--epochs', '1', '--val_max', '4')
    src = load(tmp_path / 'src' / 'math' / 'best.pt')
    # a new domain whose labels use tokens the source vocab lacks
    root = tmp_path / 'chem'
    shutil.copytree(os.path.join(uniform_root, 'adaptation_data', 'math_images_resized'),
                    root / 'adaptation_data' / 'chemistry_images_resized')
    lab = root / 'adaptation_data' / 'chemistry_labels'
    lab.mkdir(parents=True)
    names = sorted(os.listdir(root / 'adaptation_data' / 'chemistry_images_resized'))
    new_tokens = ['\\novelA', '\\novelB']
    lines = ''.join(f'{n}\tx {new_tokens[i % 2]} 2\n' for i, n in enumerate(names))
    for split in data.SPLITS:
        (lab / f'{split}.txt').write_text(lines)
    train.main(['--root_dir', str(root), '--train_on', 'chemistry', '--out_dir', str(tmp_path / 'dst'),
                '--init_from', str(tmp_path / 'src' / 'math' / 'best.pt'), '--batchsz', '16', '--epochs', '1',
                '--val_max', '4', '--initlr', '0'] + TINY)
    dst = load(tmp_path / 'dst' / 'chemistry' / 'last.pt')
    assert dst['vocab'][:len(src['vocab'])] == src['vocab']
    assert dst['vocab'][len(src['vocab']):] == new_tokens
    assert dst['hparams']['vocab_size'] == len(src['vocab']) + 2
    emb = [k for k, v in src['model'].items() if v.dim() == 2 and v.shape[0] == len(src['vocab'])]
    assert emb, 'no vocab-sized weight found'
    for k in emb:                  # lr 0 with SGD: the old rows are exactly the source's
        assert torch.equal(dst['model'][k][:len(src['vocab'])], src['model'][k])


def test_init_from_takes_run_strides_and_checkpoint_shapes(uniform_root, tmp_path):
    """--init_from: a given --output_stride / --dropout rebuilds the model around the same weights; the
    architecture flags not given take the checkpoint's values (in the saved args too); a given flag that
    the weights' shapes contradict stops the run, naming it."""
    run(uniform_root, tmp_path / 'src', '--output_stride', '16', '--batchsz', '16', '--epochs', '1', '--val_max', '4')
    src_path = str(tmp_path / 'src' / 'math' / 'best.pt')
    src = load(src_path)
    assert src['hparams']['output_stride'] == 16
    run(uniform_root, tmp_path / 'same', '--init_from', src_path, '--batchsz', '16', '--epochs', '1', '--val_max', '4')
    same = load(tmp_path / 'same' / 'math' / 'last.pt')
    assert same['hparams']['output_stride'] == 16 and same['args']['output_stride'] == 16   # not the default 16x8
    run(uniform_root, tmp_path / 'fine', '--init_from', src_path, '--output_stride', '8', '--batchsz', '16',
        '--epochs', '1', '--val_max', '4', '--initlr', '0')
    fine = load(tmp_path / 'fine' / 'math' / 'last.pt')
    assert fine['hparams']['output_stride'] == 8 and fine['args']['output_stride'] == 8
    weights = [k for k, v in src['model'].items() if k.endswith('weight') and v.dim() == 4]
    assert weights and all(torch.equal(fine['model'][k], src['model'][k]) for k in weights)   # lr 0
    for name in ('last.pt', 'best.pt'):          # stopped before its first checkpoint: restarted from args.json
        os.remove(tmp_path / 'fine' / 'math' / name)
    run(uniform_root, tmp_path / 'fine', '--resume', '--batchsz', '16', '--epochs', '1', '--val_max', '4')
    assert load(tmp_path / 'fine' / 'math' / 'last.pt')['hparams']['output_stride'] == 8
    with pytest.raises(SystemExit, match='--num_layers 3 but'):
        run(uniform_root, tmp_path / 'clash', '--init_from', src_path, '--num_layers', '3', '--epochs', '1')


def test_freeze_keeps_the_stem_and_first_blocks(uniform_root, tmp_path):
    run(uniform_root, tmp_path / 'src', '--batchsz', '16', '--epochs', '1', '--val_max', '4')
    src = load(tmp_path / 'src' / 'math' / 'best.pt')
    run(uniform_root, tmp_path / 'dst', '--init_from', str(tmp_path / 'src' / 'math' / 'best.pt'),
        '--freeze', '3', '--batchsz', '16', '--epochs', '1', '--val_max', '4')
    dst = load(tmp_path / 'dst' / 'math' / 'last.pt')
    frozen = ('encoder.backbone._conv_stem.', 'encoder.backbone._bn0.', 'encoder.backbone._blocks.0.',
              'encoder.backbone._blocks.1.', 'encoder.backbone._blocks.2.')
    weights = [k for k in src['model'] if k.endswith('weight')]
    kept = [k for k in weights if k.startswith(frozen)]
    assert kept and all(torch.equal(dst['model'][k], src['model'][k]) for k in kept)
    trained = [k for k in weights if k.startswith('encoder.backbone._blocks.3.')]
    assert trained and any(not torch.equal(dst['model'][k], src['model'][k]) for k in trained)
    assert dst['args']['freeze'] == 3


def test_freeze_needs_loaded_weights(uniform_root, tmp_path):
    with pytest.raises(SystemExit):
        run(uniform_root, tmp_path, '--freeze', '3', '--dry_run')


def test_trim_is_saved_and_applied_by_test_py(tmp_path, capsys):
    # a math root of 24 x 96 formulas on 64 x 160 pages: --trim crops them in training and test.py does too
    root = tmp_path / 'root'
    img_dir, lab_dir = root / 'adaptation_data' / 'math_images_resized', root / 'adaptation_data' / 'math_labels'
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True)
    lines = []
    for i, f in enumerate(short_formulas(8)):
        ink = render.render_latex(f, fontsize=12, dpi=100)[:24, :96]
        page = np.full((64, 160), 255, np.uint8)
        page[4:4 + ink.shape[0], 4:4 + ink.shape[1]] = ink
        Image.fromarray(page).save(img_dir / f'm{i}.png')
        lines.append(f'm{i}.png\t{f}\n')
    for split in data.SPLITS:
        (lab_dir / f'{split}.txt').write_text(''.join(lines))
    run(str(root), tmp_path, '--trim', '--batchsz', '8', '--max_steps', '1', '--val_max', '4')
    assert 'trimmed 8 images to their ink' in capsys.readouterr().out
    ckpt = load(tmp_path / 'math' / 'best.pt')
    assert ckpt['args']['trim'] is True and checkpoint.trained_with_trim(ckpt)
    import test as ev
    assert ev.main(['--root_dir', str(root), '--test_on', 'math', '--out_dir', str(tmp_path), '--beam', '1',
                    '--workers', '0']) == 0
    out = capsys.readouterr()
    assert 'was trained with --trim' in out.err and 'trimmed 8 images to their ink' in out.out
    assert not checkpoint.trained_with_trim({'args': {'trim': False}})
    assert not checkpoint.trained_with_trim({'args': {}})          # checkpoints from before --trim


def test_dry_run_saves_nothing(uniform_root, tmp_path):
    state = run(uniform_root, tmp_path, '--dry_run', '--batchsz', '8', '--epochs', '3', '--val_max', '4')
    assert state['step'] == 2
    assert not (tmp_path / 'math' / 'last.pt').exists()


def test_batch_without_readable_images_is_skipped_on_every_process(uniform_root, tmp_path):
    # 4 BMPs of their own size that pass the size scan (header) but fail to decode (truncated): their
    # batch is empty after loading. Every process must skip that step together, or DDP would hang.
    root = tmp_path / 'root'
    shutil.copytree(uniform_root, root)
    img_dir = root / 'adaptation_data' / 'math_images_resized'
    lines = []
    for i in range(4):
        buf = io.BytesIO()
        Image.fromarray(np.full((40, 100), 255, np.uint8)).save(buf, 'BMP')
        (img_dir / f'bad{i}.bmp').write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
        lines.append(f'bad{i}.bmp\tx + {i}\n')
    train_txt = root / 'adaptation_data' / 'math_labels' / 'train.txt'
    train_txt.write_text(train_txt.read_text() + ''.join(lines))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    common = ['--root_dir', str(root), '--train_on', 'math', '--batchsz', '8', '--epochs', '1', '--val_max', '8']
    # one process: batches [8 8 8 8] [4] -> 5 steps, the bad one skipped
    state = train.main(common + ['--out_dir', str(tmp_path / 'one')] + TINY)
    assert (state['step'], state['skipped_steps']) == (5, 1)
    # two processes: the 8s split until 6 batches (3 per process); the bad batch lands on one of them
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           os.path.join(REPO, 'train.py')] + common + ['--out_dir', str(tmp_path / 'two')] + TINY
    res = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count('no readable image in the batch') == 1
    ckpt = load(tmp_path / 'two' / 'math' / 'last.pt')
    assert (ckpt['step'], ckpt['skipped_steps']) == (3, 1)


def test_torchrun_two_processes_gloo(uniform_root, tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           os.path.join(REPO, 'train.py'), '--root_dir', uniform_root, '--train_on', 'math',
           '--out_dir', str(tmp_path), '--batchsz', '8', '--epochs', '1', '--val_max', '8'] + TINY
    env = dict(os.environ, OMP_NUM_THREADS='1')
    res = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count('epoch 1/1 |') == 1                # only rank 0 prints
    assert res.stdout.count('saved ') == 1
    ckpt = load(tmp_path / 'math' / 'last.pt')
    assert ckpt['step'] == 2                                   # 4 batches of 8 shared by 2 ranks
    assert not any(k.startswith('module.') for k in ckpt['model'])


# -----------------------------------------------------------------------------
# learning-recipe pieces: warm-up, step budget, CTC auxiliary loss, history

def test_warmup_scales_the_schedule_linearly():
    for opt in (['--Adam'], []):
        args = train.get_args(opt + ['--warmup', '4', '--initlr', '0.01', '--epochs', '2'])
        plain = train.get_args(opt + ['--initlr', '0.01', '--epochs', '2'])
        for step in range(8):
            lr, _ = train.lr_schedule(args, step, 10)
            base, _ = train.lr_schedule(plain, step, 10)
            assert lr == pytest.approx(base * min(1.0, (step + 1) / 4))


def test_time_schedule_position_by_hand():
    """schedule_position: the larger of the step and the time share of the way to the last step (total - 1),
    the share capped at 1."""
    assert train.schedule_position(250, 1001, 0.5) == 500
    assert train.schedule_position(700, 1001, 0.5) == 700
    assert train.schedule_position(10, 1001, 3.0) == 1000
    assert train.schedule_position(7, 1001, 0.0) == 7


def test_time_schedule_follows_the_clock_only_when_asked():
    """With --time_schedule a clock share of 0.5 at step 10 of 100 puts OneCycle at step 49.5 (past its
    peak at 29), a share of 1 at its last step (initlr / 25 / 1e4); without the flag the clock changes
    nothing."""
    steps = ['--initlr', '0.1', '--max_steps', '100', '--max_minutes', '5']
    for flags, at_half, at_end in (([], 10, 10), (['--time_schedule'], 49.5, 99)):
        args = train.get_args(steps + flags)
        opt = train.make_optimizer(args, torch.nn.Linear(2, 2))
        clock = train.RunClock(budget_s=300.0)
        sched = train.make_scheduler(args, opt, 10, clock)
        sched.go_to(10)
        assert opt.param_groups[0]['lr'] == pytest.approx(train.lr_schedule(args, 10, 10)[0])
        clock.share = 0.5
        sched.go_to(10)
        assert opt.param_groups[0]['lr'] == pytest.approx(train.lr_schedule(args, at_half, 10)[0])
        clock.share = 1.0
        sched.go_to(10)
        assert opt.param_groups[0]['lr'] == pytest.approx(train.lr_schedule(args, at_end, 10)[0])
    assert train.lr_schedule(args, 99, 10)[0] == pytest.approx(0.1 / 25 / 1e4)
    with pytest.raises(SystemExit):
        train.get_args(['--time_schedule'])                  # no --max_minutes: nothing to follow


def test_time_schedule_run_ends_annealed_and_its_minutes_count_over_resumes(uniform_root, tmp_path, capsys):
    """A run that --max_minutes stops long before --max_steps: with --time_schedule its last lr is the
    schedule's end; last.pt keeps the minutes spent, so a resume with the same budget has nothing to do
    and one with a larger budget goes on from there, annealing again by the end of the new budget."""
    common = ('--batchsz', '8', '--max_steps', '100000', '--initlr', '0.05', '--time_schedule', '--val_max', '4')
    state = run(uniform_root, tmp_path, *common, '--max_minutes', '0.08')
    assert 2 <= state['step'] < 100000
    ckpt = load(tmp_path / 'math' / 'last.pt')
    assert ckpt['train_seconds'] >= 0.08 * 60
    rows = [json.loads(line) for line in (tmp_path / 'math' / 'history.jsonl').read_text().splitlines()]
    lrs = [r['lr'] for r in rows if 'lr' in r]
    assert lrs[-1] == pytest.approx(0.05 / 25 / 1e4) and max(lrs) > 100 * lrs[-1]
    capsys.readouterr()
    run(uniform_root, tmp_path, '--resume', '--max_minutes', '0.08')
    assert 'already finished' in capsys.readouterr().out
    more = run(uniform_root, tmp_path, '--resume', '--max_minutes', '0.12')
    assert more['step'] > state['step']
    later = load(tmp_path / 'math' / 'last.pt')
    assert later['train_seconds'] >= 0.12 * 60 > ckpt['train_seconds']
    rows = [json.loads(line) for line in (tmp_path / 'math' / 'history.jsonl').read_text().splitlines()]
    assert [r['lr'] for r in rows if 'lr' in r][-1] == pytest.approx(0.05 / 25 / 1e4)


def test_ctc_loss_by_hand():
    """Three frames, vocab {blank=<pad>, <sos>, <eos>, a}: target `a`. The frames put probability p_t on
    `a` and 1 - p_t on blank; the paths that emit `a` are a--, -a-, --a, aa-, -aa, aaa (CTC collapses
    repeats), so P = sum of those products."""
    a = 3
    p = torch.tensor([0.6, 0.3, 0.2])
    probs = torch.full((3, 1, 4), 1e-9)
    probs[:, 0, a], probs[:, 0, data.PAD] = p, 1 - p
    log_probs = probs.log()
    tgt_out = torch.tensor([[a, data.EOS, data.PAD]])
    q = 1 - p
    paths = (p[0] * q[1] * q[2] + q[0] * p[1] * q[2] + q[0] * q[1] * p[2] + p[0] * p[1] * q[2]
             + q[0] * p[1] * p[2] + p[0] * p[1] * p[2])
    assert float(train.ctc_loss(log_probs, tgt_out)) == pytest.approx(-math.log(float(paths)), rel=1e-4)
    too_long = torch.tensor([[a, a, a, a, data.EOS]])              # 4 tokens (3 repeats) in 3 frames
    assert float(train.ctc_loss(log_probs, too_long)) == 0.0        # cannot align: counted as 0


def test_objective_adds_the_ctc_part_weighted():
    args = train.get_args(['--ctc', '0.5'])
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6)
    tgt_out = torch.tensor([[4, 5, data.EOS], [5, data.EOS, data.PAD]])
    log_probs = torch.randn(4, 2, 6).log_softmax(-1)
    out = {'logits': logits, 'tgt_out': tgt_out, 'labeled': True, 'teacher_logits': None,
           'ctc_log_probs': log_probs, 'n_tok': 5}
    total, parts = train.objective(args, out, train.loss_weights(args, 0.0))
    assert set(parts) == {'ce', 'ctc'}
    assert float(parts['ctc']) == pytest.approx(float(train.ctc_loss(log_probs, tgt_out)) / 5)
    assert float(total) == pytest.approx(float(parts['ce'] + 0.5 * parts['ctc']))


def test_max_steps_budget_history_and_ctc_run(uniform_root, tmp_path):
    """--max_steps 3 (an epoch has 4 steps at batch 8): 3 optimizer steps, validated and saved at the
    budget; history.jsonl holds a row per step with the CTC part and the validation row."""
    state = run(uniform_root, tmp_path, '--Adam', '--batchsz', '8', '--max_steps', '3', '--ctc', '0.3',
                '--warmup', '2')
    assert state['step'] == 3 and state['epoch'] == 1
    ckpt = load(tmp_path / 'math' / 'last.pt')
    assert ckpt['step'] == 3 and ckpt['hparams']['ctc_frames'] == train.CTC_FRAMES
    assert ckpt['hparams']['memory_norm'] is True
    rows = [json.loads(line) for line in (tmp_path / 'math' / 'history.jsonl').read_text().splitlines()]
    steps = [r for r in rows if 'loss' in r]
    assert [r['step'] for r in steps] == [1, 2, 3]
    assert all(r['ctc'] > 0 and r['loss'] == pytest.approx(r['ce'] + 0.3 * r['ctc'], rel=1e-5) for r in steps)
    assert rows[-1]['step'] == 3 and set(rows[-1]['val']) >= {'bleu4', 'exact_match', 'edit_accuracy'}


def test_val_every_validates_every_nth_epoch_and_the_last(uniform_root, tmp_path, capsys):
    """--val_every 3 over 4 epochs (one step each): validation rows after epochs 3 and 4 (the last),
    best.pt written by the first of them; epochs 1 and 2 save last.pt and say they did not validate."""
    state = run(uniform_root, tmp_path, '--Adam', '--batchsz', '32', '--epochs', '4', '--val_every', '3',
                '--val_max', '4')
    assert state['epoch'] == 4 and state['step'] == 4
    rows = [json.loads(line) for line in (tmp_path / 'math' / 'history.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows if 'val' in r] == [3, 4]
    assert load(tmp_path / 'math' / 'best.pt')['epoch'] in (3, 4)
    assert capsys.readouterr().out.count('no validation (--val_every 3)') == 2
    with pytest.raises(SystemExit):
        train.get_args(['--val_every', '0'])


def test_torchrun_ctc_with_unlabeled_images(uniform_root, tmp_path):
    """Under DDP the unlabeled micro-batch's backward is the one that syncs gradients; the CTC head must
    take part in it (with a zero gradient), or DDP waits for it forever / raises."""
    unlabeled = os.path.join(uniform_root, 'adaptation_data', 'math_images_resized')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           os.path.join(REPO, 'train.py'), '--root_dir', uniform_root, '--train_on', 'math',
           '--out_dir', str(tmp_path), '--batchsz', '8', '--max_steps', '2', '--val_max', '8', '--ctc', '0.3',
           '--mean_teacher', '--unlabeled', unlabeled, '--ema_decay', '0.9'] + TINY
    env = dict(os.environ, OMP_NUM_THREADS='1')
    res = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ckpt = load(tmp_path / 'math' / 'last.pt')
    assert ckpt['step'] == 2 and ckpt['hparams']['ctc_frames'] > 0


# -----------------------------------------------------------------------------
# faults of long runs: SIGKILL, resume without a checkpoint, a lost torchrun worker, uneven validation,
# a full disk, a file that is not a checkpoint

FAULT = os.path.join(REPO, 'tests', 'fault_train.py')     # train.py that SIGKILLs itself after a step
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']


def launch(cmd, tmp_path, kill_step=None, kill_rank=0, timeout=600, threads=1):
    """Run cmd (threads: OMP_NUM_THREADS; a run compared with one in this process needs the same count)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if kill_step is not None:
        env.update(FAULT_KILL_STEP=str(kill_step), FAULT_KILL_RANK=str(kill_rank))
    return subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=timeout)


def same_weights(a, b, keys=('model',)):
    for key in keys:
        assert a[key].keys() == b[key].keys()
        for name, v in a[key].items():
            assert torch.equal(v, b[key][name]), (key, name)


def test_save_every_parses_steps_and_minutes():
    assert train.save_interval('500') == (500, 0) and train.save_interval('0') == (0, 0)
    assert train.save_interval('10m') == (0, 600.0) and train.save_interval('0.5m') == (0, 30.0)
    assert train.get_args([]).save_every == train.SAVE_EVERY == '10m'
    for bad in ('5x', '-3', 'm', '1.5'):
        with pytest.raises(SystemExit):
            train.get_args(['--save_every', bad])


def test_sigkill_mid_epoch_loses_at_most_save_every_steps(uniform_root, tmp_path):
    """SIGKILL right after step 5 of an epoch of 8 with --save_every 3: last.pt is the step-3 checkpoint;
    --resume ends with the weights of an uninterrupted run, and the history holds each step once."""
    common = ('--batchsz', '4', '--epochs', '1', '--val_max', '4', '--initlr', '0.05', '--save_every', '3')
    run(uniform_root, tmp_path / 'a', *common)
    full = load(tmp_path / 'a' / 'math' / 'last.pt')
    assert full['step'] == 8

    argv = ['--root_dir', uniform_root, '--train_on', 'math', '--out_dir', str(tmp_path / 'b')] + TINY + list(common)
    res = launch([sys.executable, FAULT] + argv, tmp_path, kill_step=5, threads=torch.get_num_threads())
    assert res.returncode == -signal.SIGKILL, res.stdout[-2000:] + res.stderr[-2000:]
    assert 'saved' in res.stdout and 'at step 3' in res.stdout
    part = checkpoint.load(tmp_path / 'b' / 'math' / 'last.pt')        # readable, at a step boundary
    assert (part['epoch'], part['step'], part['batch_in_epoch']) == (0, 3, 3)
    assert part['step'] >= 5 - 3
    leftover = tmp_path / 'b' / 'math' / '.last.pt.x1y2.tmp'         # as from a kill during a write
    leftover.write_bytes(b'partial')
    run(uniform_root, tmp_path / 'b', '--resume')
    assert not leftover.exists()
    resumed = load(tmp_path / 'b' / 'math' / 'last.pt')
    assert resumed['step'] == 8 and resumed['epoch'] == 1
    same_weights(full, resumed)
    assert resumed['best_metric'] == full['best_metric']
    rows = [json.loads(x) for x in (tmp_path / 'b' / 'math' / 'history.jsonl').read_text().splitlines()]
    assert [r['step'] for r in rows if 'loss' in r] == list(range(1, 9))     # step 4 was logged, then trimmed
    assert [r['epoch'] for r in rows if 'val' in r] == [1]


def test_resume_before_the_first_checkpoint_keeps_the_runs_settings(uniform_root, tmp_path):
    """A run killed before any checkpoint leaves args.json only; --resume restarts that run (Adam, batch 4)
    instead of a default one, and refuses a conflicting experiment flag."""
    out = tmp_path / 'o'
    argv = (['--root_dir', uniform_root, '--train_on', 'math', '--out_dir', str(out)] + TINY
            + ['--Adam', '--batchsz', '4', '--max_steps', '3', '--val_max', '4', '--save_every', '0'])
    res = launch([sys.executable, FAULT] + argv, tmp_path, kill_step=2)
    assert res.returncode == -signal.SIGKILL, res.stdout[-2000:] + res.stderr[-2000:]
    assert sorted(p.name for p in (out / 'math').iterdir() if p.suffix in ('.pt', '.json')) == ['args.json']
    with pytest.raises(SystemExit, match=r"--batchsz 8 differs from the run's 4 .*args\.json.*another --out_dir"):
        run(uniform_root, out, '--resume', '--batchsz', '8')
    state = run(uniform_root, out, '--resume', '--save_every', '5')     # how to run: may change
    ckpt = load(out / 'math' / 'last.pt')
    assert state['step'] == ckpt['step'] == 3
    assert ckpt['epoch'] == 1                                            # 8 steps an epoch (batch 64: 1)
    assert ckpt['args']['Adam'] and ckpt['args']['batchsz'] == 4 and ckpt['args']['save_every'] == '5'
    assert 'exp_avg' in ckpt['optimizer']['state'][0]                   # Adam's state, not SGD's


def test_torchrun_max_restarts_recovers_a_lost_worker(uniform_root, tmp_path):
    """2 gloo processes, 4 steps an epoch, 2 epochs, --save_every 2; rank 1 is SIGKILLed after step 7.
    torchrun restarts the group, which resumes the step-6 checkpoint by itself; exit 0 and the final
    weights of an uninterrupted run. The first launch uses --resume on an empty folder (a new run)."""
    common = ['--root_dir', uniform_root, '--train_on', 'math', '--batchsz', '4', '--epochs', '2', '--val_max', '4',
              '--save_every', '2', '--resume'] + TINY
    res = launch(TORCHRUN + [os.path.join(REPO, 'train.py'), '--out_dir', str(tmp_path / 'a')] + common, tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert 'starting a new run' in res.stdout
    full = load(tmp_path / 'a' / 'math' / 'last.pt')
    assert full['step'] == 8 and len(full['rng_ranks']) == 2

    res = launch(TORCHRUN + ['--max-restarts', '1', FAULT, '--out_dir', str(tmp_path / 'b')] + common, tmp_path,
                 kill_step=7, kill_rank=1)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert 'SIGKILL after step 7 (rank 1)' in res.stdout
    assert 'resuming' in res.stdout and 'epoch 1, step 6' in res.stdout
    resumed = load(tmp_path / 'b' / 'math' / 'last.pt')
    assert resumed['step'] == 8
    same_weights(full, resumed)


def test_torchrun_validates_an_uneven_val_split(uniform_root, tmp_path):
    """A val split of 5 images of 5 sizes cannot be cut into equal shares for 2 processes; validation
    (and test.py) shard it unevenly and gather all 5."""
    root = tmp_path / 'root'
    shutil.copytree(uniform_root, root)
    img_dir = root / 'adaptation_data' / 'math_images_resized'
    lines = []
    for i, (h, w) in enumerate([(32, 64), (32, 128), (48, 96), (48, 160), (64, 128)]):
        Image.fromarray(np.full((h, w), 255, np.uint8)).save(img_dir / f'v{i}.png')
        lines.append(f'v{i}.png\tx + {i}\n')
    (root / 'adaptation_data' / 'math_labels' / 'val.txt').write_text(''.join(lines))
    cmd = TORCHRUN + [os.path.join(REPO, 'train.py'), '--root_dir', str(root), '--train_on', 'math',
                      '--out_dir', str(tmp_path), '--batchsz', '8', '--max_steps', '1'] + TINY
    res = launch(cmd, tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / 'math' / 'history.jsonl').read_text().splitlines()]
    assert [r['val']['n'] for r in rows if 'val' in r] == [5]
    cmd = TORCHRUN + [os.path.join(REPO, 'test.py'), '--root_dir', str(root), '--test_on', 'math', '--split', 'val',
                      '--out_dir', str(tmp_path), '--weights', str(tmp_path / 'math' / 'last.pt'), '--device', 'cpu',
                      '--max_len', '8']
    res = launch(cmd, tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count('wrote ') == 1                       # rank 0 writes
    tsv = (tmp_path / 'math' / 'predictions_math_val.tsv').read_text().splitlines()
    assert [line.split('\t')[0] for line in tsv] == [f'v{i}.png' for i in range(5)]
    assert json.loads((tmp_path / 'math' / 'metrics_math_val.json').read_text())['n'] == 5


def test_full_disk_keeps_the_previous_last_pt(uniform_root, tmp_path, monkeypatch, capsys):
    """ENOSPC from the second checkpoint write on: the step-1 last.pt stays as it was, each failure is
    said, and training goes on to its end."""
    real_save, calls = torch.save, {'n': 0}

    def disk_full_after_one(obj, f, *a, **k):
        calls['n'] += 1
        if calls['n'] > 1:
            f.write(b'partial')
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, 'save', disk_full_after_one)
    state = run(uniform_root, tmp_path, '--batchsz', '8', '--max_steps', '3', '--val_max', '4', '--save_every', '1')
    monkeypatch.setattr(torch, 'save', real_save)
    assert state['step'] == 3 and calls['n'] == 3                 # steps 1 and 2, then the end of the run
    run_dir = tmp_path / 'math'
    assert load(run_dir / 'last.pt')['step'] == 1
    assert sorted(p.name for p in run_dir.iterdir() if p.suffix in ('.pt', '.tmp')) == ['last.pt']
    out = capsys.readouterr().out
    assert out.count('No space left on device') == 2 and 'last.pt is unchanged' in out


def test_a_file_that_is_not_a_checkpoint_is_named_in_one_line(uniform_root, tmp_path, capsys):
    import test as ev
    odd = tmp_path / 'odd.pt'
    torch.save(torch.nn.Linear(2, 2), odd)                       # a pickled module: code, not a checkpoint
    with pytest.raises(SystemExit) as e:
        run(uniform_root, tmp_path, '--init_from', str(odd))
    with pytest.raises(SystemExit) as e2:
        ev.main(['--weights', str(odd), '--image', str(odd)])
    for msg in (str(e.value.code), str(e2.value.code)):
        assert 'odd.pt' in msg and 'torch.nn.modules.linear.Linear' in msg
        assert '\n' not in msg and 'weights_only' not in msg
