"""utils.py and checkpoint.py: eval mode, atomic writers, cropping to ink, the worker count, and
checkpoint saving / loading errors."""
import argparse
import errno
import json
import os

import numpy as np
import pytest
import torch

import checkpoint
import utils


def test_eval_mode_restores_the_previous_mode_also_on_error():
    model = torch.nn.Sequential(torch.nn.Dropout(0.5))
    with utils.eval_mode(model):
        assert not model.training and not model[0].training
    assert model.training and model[0].training
    model.eval()
    with pytest.raises(RuntimeError):
        with utils.eval_mode(model):
            raise RuntimeError('boom')
    assert not model.training


def test_write_json_pretty_and_compact(tmp_path):
    obj = {'a': [1, 2], 'path': tmp_path}                    # a Path is written as its str()
    utils.write_json(tmp_path / 'p.json', obj)
    utils.write_json(tmp_path / 'c.json', obj, indent=None)
    pretty, compact = (tmp_path / 'p.json').read_text(), (tmp_path / 'c.json').read_text()
    assert json.loads(pretty) == json.loads(compact) == {'a': [1, 2], 'path': str(tmp_path)}
    assert compact.count('\n') == 1 and ', ' not in compact and pretty.endswith('}\n')
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]


def test_crop_to_ink_thresholds_and_fringe():
    page = np.full((20, 30), 255, np.uint8)
    page[5:8, 10:20] = 0          # ink
    page[4, 10:20] = 250          # faint antialiased edge right above it
    page[15, 2] = 250             # a faint speck far away
    assert utils.crop_to_ink(page).shape == (15 - 4 + 1, 20 - 2)           # every non-white pixel
    assert utils.crop_to_ink(page, threshold=240).shape == (3, 10)         # dark ink only
    assert utils.crop_to_ink(page, threshold=240, fringe=True).shape == (4, 10)   # + its faint edge
    assert utils.crop_to_ink(page, pad=2, threshold=240).shape == (7, 14)
    assert utils.crop_to_ink(np.full((4, 4), 255, np.uint8)) is None


def test_n_workers_rule():
    assert utils.n_workers(3) == 3
    assert utils.n_workers(0) == 1
    assert utils.n_workers(8, n_tasks=2) == 2
    assert utils.n_workers(None) == len(os.sched_getaffinity(0))


def test_png_round_trip_with_text_chunks(tmp_path):
    from PIL import Image
    img = (np.arange(12, dtype=np.uint8).reshape(3, 4) * 20)
    utils.save_png(img, tmp_path / 'a.png', meta={'latex': r'\frac { a } { b }', 'fontsize': 12.5})
    with Image.open(tmp_path / 'a.png') as im:
        assert im.mode == 'L' and np.array_equal(np.asarray(im), img)
        assert im.info['latex'] == r'\frac { a } { b }' and im.info['fontsize'] == '12.5'


def test_checkpoint_save_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / 'last.pt'
    checkpoint.save(path, {'format_version': checkpoint.FORMAT_VERSION, 'step': 1})
    before = path.read_bytes()

    def disk_full(obj, f):
        f.write(b'partial')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(torch, 'save', disk_full)
    with pytest.raises(OSError, match='No space left.*previous .*last.pt is unchanged') as e:
        checkpoint.save(path, {'step': 2})
    assert e.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ['last.pt']


def test_checkpoint_load_says_why_in_one_line(tmp_path):
    odd = tmp_path / 'odd.pt'
    torch.save({'format_version': 1, 'args': argparse.Namespace(x=1)}, odd)    # a pickled object
    with pytest.raises(ValueError) as e:
        checkpoint.load(odd)
    msg = str(e.value)
    assert 'odd.pt' in msg and 'argparse.Namespace' in msg
    assert '\n' not in msg and 'weights_only' not in msg
    ckpt = {'format_version': 1, 'model': {'w': torch.ones(1)}, 'teacher': None, 'hparams': {}, 'vocab': []}
    assert checkpoint.model_state(ckpt, 'student') is ckpt['model']
    with pytest.raises(ValueError, match='x.pt.*no teacher'):
        checkpoint.model_state(ckpt, 'teacher', path='x.pt')


def test_flush_denormals_on_cpu_only():
    try:
        torch.set_flush_denormal(False)               # train.py / test.py run in-process by other tests set it
        tiny = torch.tensor([1e-39])                  # a float32 denormal (made while denormals are kept)
        utils.flush_denormals(torch.device('meta'))   # not a CPU: nothing changes
        assert (tiny * 1.0).item() != 0.0
        utils.flush_denormals(torch.device('cpu'))
        assert (tiny * 1.0).item() == 0.0
    finally:
        torch.set_flush_denormal(False)
