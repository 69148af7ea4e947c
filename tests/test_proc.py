"""Tests of proc.py: size k-means + resizing (incremental, resumable, atomic), Deng's processing,
import of the im2latex-100k release. Tiny synthetic images in tmp_path only."""
import hashlib
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import proc  # noqa: E402


def make_image(path, h, w, seed=0, mode='L'):
    """A white h x w image with a dark bar and a few random dark pixels (dark ink on white)."""
    rng = np.random.default_rng(seed)
    a = np.full((h, w), 255, np.uint8)
    a[h // 3:h // 3 + max(1, h // 4), w // 8:w - w // 8] = 0
    a[rng.integers(0, h, 5), rng.integers(0, w, 5)] = 30
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(a).convert(mode).save(path)
    return a


def digest_tree(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, 'rb') as fh:
                out[os.path.relpath(p, root)] = (hashlib.sha256(fh.read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


def out_mtimes(out_root):
    return {f: os.stat(os.path.join(out_root, f)).st_mtime_ns for f in proc.list_images(out_root)}


def run(img_root, **kw):
    problems = data.Problems(quiet=True)
    kw.setdefault('workers', 1)
    return proc.kmeans_for_img_size(img_root, problems=problems, **kw), problems


# -----------------------------------------------------------------------------
# k-means over sizes

def test_fewer_distinct_sizes_than_clusters_are_kept_exactly(tmp_path):
    root = tmp_path / 'imgs'
    sizes = [(20, 60), (20, 60), (24, 90), (31, 140), (40, 41), (18, 300)]
    for i, (h, w) in enumerate(sizes):
        make_image(str(root / f'{i}.png'), h, w, seed=i)
    r, problems = run(str(root))
    assert r['distinct'] == 5 and len(problems) == 0
    assert r['aspect_mean'] == 0 and r['aspect_max'] == 0
    for i, (h, w) in enumerate(sizes):
        assert r['sizes'][f'{i}.png'] == (h, w)
        with Image.open(root.parent / 'imgs_resized' / f'{i}.png') as im:
            assert im.mode == 'L' and im.size == (w, h)


def test_many_sizes_cluster_to_at_most_32_and_each_image_gets_its_cluster_size(tmp_path):
    root = tmp_path / 'imgs'
    rng = np.random.default_rng(0)
    names = []
    for i in range(60):  # 60 distinct sizes, in a subfolder too, some jpg
        h, w = int(rng.integers(16, 80)), int(rng.integers(40, 400))
        ext = '.jpg' if i % 7 == 0 else '.png'
        name = f'{"sub/" if i % 2 else ""}{i}{ext}'
        make_image(str(root / name), h, w, seed=i)
        names.append(name)
    out = tmp_path / 'out'
    r, problems = run(str(root), out_root=str(out), workers=2)
    assert len(problems) == 0 and r['images'] == 60 and r['written'] == 60
    assert 16 < r['distinct'] <= 32
    assert sum(r['counts']) == 60 and set(r['centres']) == set(r['sizes'].values())
    assert 0 < r['aspect_mean'] <= r['aspect_max'] < 1
    on_disk = set()
    for name in names:
        with Image.open(out / (os.path.splitext(name)[0] + '.png')) as im:
            assert im.format == 'PNG' and im.mode == 'L'
            assert (im.size[1], im.size[0]) == r['sizes'][name]
            on_disk.add(im.size)
    assert len(on_disk) == r['distinct']
    # deterministic: the same sizes again without the cache
    r2, _ = run(str(root), out_root=str(out), caching=False)
    assert r2['sizes'] == r['sizes'] and r2['written'] == 60
    # fewer clusters
    r3, _ = run(str(root), out_root=str(tmp_path / 'out4'), n_clusters=4, resize=False)
    assert r3['distinct'] <= 4 and r3['aspect_max'] >= r['aspect_max']
    assert not (tmp_path / 'out4').exists()  # resize=False writes nothing


def test_cluster_sizes_uses_relative_distance():
    # a small pair 2x apart and a large pair 8% apart: in log space (relative distortion) the large
    # pair merges and the small one is split; in pixels it would be the other way round
    hw = [(10, 20), (20, 40), (500, 1000), (540, 1080)]
    centres, labels = proc.cluster_sizes(hw, n_clusters=3, seed=0)
    assert labels[0] != labels[1] and labels[2] == labels[3]
    assert [tuple(c) for c in centres] == [(10, 20), (20, 40), (520, 1039)]  # geometric mean, rounded
    centres, labels = proc.cluster_sizes(hw * 3, n_clusters=32)  # <= 32 distinct: kept as they are
    assert [tuple(c) for c in centres] == sorted(set(hw)) and len(labels) == 12


def test_rerun_writes_nothing_then_only_new_and_changed(tmp_path):
    root = tmp_path / 'imgs'
    for i, (h, w) in enumerate([(20, 60), (24, 90), (31, 140)]):
        make_image(str(root / f'{i}.png'), h, w, seed=i)
    out = str(tmp_path / 'imgs_resized')
    r, _ = run(str(root))
    assert r['written'] == 3 and os.path.isfile(os.path.join(out, proc.CACHE_NAME))
    before = out_mtimes(out)
    r, _ = run(str(root))
    assert r['written'] == 0 and r['unchanged'] == 3 and out_mtimes(out) == before
    # a changed image (new content and size) and a new one
    make_image(str(root / '1.png'), 50, 70, seed=9)
    st = os.stat(root / '1.png')
    os.utime(root / '1.png', ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    make_image(str(root / 'new.png'), 33, 33, seed=5)
    r, _ = run(str(root))
    assert r['written'] == 2 and r['unchanged'] == 2
    after = out_mtimes(out)
    assert after['0.png'] == before['0.png'] and after['2.png'] == before['2.png']
    with Image.open(os.path.join(out, '1.png')) as im:
        assert im.size == (70, 50)
    # a removed source: its output goes too
    os.remove(root / 'new.png')
    r, _ = run(str(root))
    assert r['removed'] == 1 and r['written'] == 0 and not os.path.exists(os.path.join(out, 'new.png'))


def test_centres_moving_rewrites_the_affected_images(tmp_path):
    root = tmp_path / 'imgs'
    for i, (h, w) in enumerate([(20, 60), (21, 63), (60, 300)]):
        make_image(str(root / f'{i}.png'), h, w, seed=i)
    r1, _ = run(str(root), n_clusters=2)
    # a new size near the first pair moves that centre: images 0 and 1 get a new target
    make_image(str(root / '3.png'), 26, 80, seed=3)
    r2, _ = run(str(root), n_clusters=2)
    changed = {n for n in r1['sizes'] if r1['sizes'][n] != r2['sizes'][n]}
    assert changed == {'0.png', '1.png'}
    assert r2['written'] == 3 and r2['unchanged'] == 1
    for n, (h, w) in r2['sizes'].items():
        with Image.open(tmp_path / 'imgs_resized' / n) as im:
            assert im.size == (w, h)


def test_interrupted_run_completes_and_originals_untouched(tmp_path):
    root = tmp_path / 'imgs'
    for i in range(8):
        make_image(str(root / f'{i}.png'), 20 + i, 60 + 7 * i, seed=i, mode='RGB' if i % 2 else 'L')
    originals = digest_tree(root)
    out = tmp_path / 'imgs_resized'
    r, _ = run(str(root))
    assert r['written'] == 8
    # what a killed run leaves: some outputs missing, a stray temp file of atomic_write
    for i in (2, 5):
        os.remove(out / f'{i}.png')
    stray = out / '.3.png.abcd1234.tmp'
    stray.write_bytes(b'half a png')
    mine = out / '.mine.tmp'  # not an atomic_write name: left alone
    mine.write_text('x')
    r, _ = run(str(root))
    assert r['written'] == 2 and r['unchanged'] == 6
    assert not stray.exists() and mine.exists()
    mine.unlink()
    assert sorted(os.listdir(out)) == sorted([f'{i}.png' for i in range(8)] + [proc.CACHE_NAME])
    # killed before the cache was ever written: everything is redone, correctly
    os.remove(out / proc.CACHE_NAME)
    r, _ = run(str(root))
    assert r['written'] == 8
    # a corrupt cache is ignored with a message
    (out / proc.CACHE_NAME).write_text('{not json')
    r, _ = run(str(root))
    assert r['written'] == 8 and json.loads((out / proc.CACHE_NAME).read_text())['version'] == proc.CACHE_VERSION
    assert digest_tree(root) == originals  # bytes and mtimes of the originals unchanged


def test_ctrl_c_mid_run_keeps_what_was_written(tmp_path, monkeypatch):
    root = tmp_path / 'imgs'
    for i in range(10):
        make_image(str(root / f'{i}.png'), 20 + i, 60, seed=i)
    calls = []
    real = proc._resize_task

    def interrupted(task):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(task)
        return real(task)
    monkeypatch.setattr(proc, '_resize_task', interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(str(root))
    monkeypatch.setattr(proc, '_resize_task', real)
    assert len(proc.list_images(tmp_path / 'imgs_resized')) == 4
    r, _ = run(str(root))
    assert r['written'] == 6 and r['unchanged'] == 4  # the cache recorded the 4 written before Ctrl-C


def test_corrupt_images_reported_counted_rest_processed(tmp_path):
    root = tmp_path / 'imgs'
    for i in range(4):
        make_image(str(root / f'{i}.png'), 20, 40 + 10 * i, seed=i)
    (root / 'garbage.png').write_bytes(b'this is not an image')
    good = (root / '0.png').read_bytes()
    (root / 'truncated.png').write_bytes(good[:len(good) // 2])
    (root / 'notes.txt').write_text('not an image file: ignored')
    r, problems = run(str(root), workers=2)
    assert problems.counts['corrupt image'] == 2 and r['skipped'] == 2
    assert r['images'] == 4 and r['written'] == 4
    assert set(r['sizes']) == {f'{i}.png' for i in range(4)}
    assert sorted(os.listdir(tmp_path / 'imgs_resized')) == [proc.CACHE_NAME] + [f'{i}.png' for i in range(4)]
    assert 'corrupt image' in problems.summary()


def test_name_collision_and_same_folder(tmp_path):
    root = tmp_path / 'imgs'
    make_image(str(root / 'a.png'), 20, 40)
    make_image(str(root / 'a.jpg'), 20, 50)
    r, problems = run(str(root))
    assert problems.counts['name collision'] == 1 and r['images'] == 1
    with pytest.raises(ValueError):
        proc.kmeans_for_img_size(str(root), out_root=str(root), workers=1)


def test_cli_img_root_and_missing_root(tmp_path, capsys):
    root = tmp_path / 'imgs'
    for i in range(3):
        make_image(str(root / f'{i}.png'), 20, 40 + 10 * i, seed=i)
    assert proc.main(['--img_root', str(root), '--out', str(tmp_path / 'o'), '--workers', '1']) == 0
    out = capsys.readouterr().out
    assert '3 distinct sizes' in out and 'aspect-ratio change' in out
    assert len(os.listdir(tmp_path / 'o')) == 4
    assert proc.main(['--root_dir', str(tmp_path / 'nothing')]) == 1
    err = capsys.readouterr().err
    assert 'math_images' in err and 'chemistry_images' in err and 'render.py --root_dir' in err
    # the default mode over a root with one domain present
    make_image(str(tmp_path / 'r' / 'adaptation_data' / 'math_images' / 'x.png'), 20, 30)
    assert proc.main(['--root_dir', str(tmp_path / 'r'), '--workers', '1']) == 0
    assert (tmp_path / 'r' / 'adaptation_data' / 'math_images_resized' / 'x.png').is_file()


# -----------------------------------------------------------------------------
# Deng's processing

def test_deng_buckets():
    assert len(proc.DENG_BUCKETS_WH) == 21 and proc.DENG_BUCKETS_WH[0] == (240, 100)
    assert proc.DENG_BUCKETS_WH[-1] == (1600, 1600)


def test_deng_process_crops_pads_buckets_and_downsamples():
    page = np.full((900, 700), 255, np.uint8)
    page[300:330, 200:300] = 0           # ink 30 x 100 -> padded 46 x 116 -> bucket 240x100 (W x H)
    page[299, 200:300] = 200             # an antialiased fringe row: part of the ink
    page[330, 200:300] = 250             # a faint fringe row: kept (within 1 px of the ink)
    page[332, 200:300] = 250             # faint, 2 px below the last dark row: not ink
    page[800, 600] = 252                 # a faint speck far away: ignored
    out = deng_out = proc.deng_process(page)
    assert out.dtype == np.uint8 and out.shape == (50, 120)
    # ink (33 rows incl. fringe) at (8, 8) before the x2 downsample -> rows 4..20, cols 4..54
    dark = out < 128
    rows, cols = np.flatnonzero(dark.any(1)), np.flatnonzero(dark.any(0))
    assert 4 <= rows[0] <= 5 and 19 <= rows[-1] <= 21 and 4 <= cols[0] <= 5 and 53 <= cols[-1] <= 54
    assert dark.sum() == pytest.approx(15 * 50, rel=0.15)  # the ink's area / 4
    assert (out[25:, :] == 255).all() and (out[:, 60:] == 255).all()  # white elsewhere
    # no downsample: exactly the bucket, crop pasted at (pad, pad)
    full = proc.deng_process(page, downsample=1)
    assert full.shape == (100, 240)
    assert (full[8:9, 8:108] == 200).all() and (full[9:39, 8:108] == 0).all() and (full[39, 8:108] == 250).all()
    assert (full[40:] == 255).all() and (full[:8] == 255).all() and (full[:, :8] == 255).all()
    assert deng_out is not None


def test_deng_process_bucket_choice_blank_and_too_large():
    page = np.full((400, 1200), 255, np.uint8)
    page[10:80, 10:470] = 0              # 70 x 460 -> 86 x 476: 480x100 (480x80 is too low)
    assert proc.deng_process(page).shape == (50, 240)
    page = np.full((400, 1200), 255, np.uint8)
    page[10:70, 10:470] = 0              # 60 x 460 -> 76 x 476: 480x80
    assert proc.deng_process(page).shape == (40, 240)
    assert proc.deng_process(np.full((50, 50), 255, np.uint8)) is None
    assert proc.deng_process(np.full((50, 50), 245, np.uint8)) is None  # faint gray is not ink
    big = np.full((100, 2000), 255, np.uint8)
    big[10:90, 5:1995] = 0               # wider than every bucket: shrunk into 1600x1600
    out = proc.deng_process(big)
    assert out.shape == (800, 800) and (out[:, :4] >= 235).all() and (out[:4] >= 235).all() and (out[40:] == 255).all()  # Lanczos ringing
    assert (out[10:20, 10:780] < 128).all()
    with pytest.raises(ValueError):
        proc.deng_process(np.zeros((4, 4, 3), np.uint8))


# -----------------------------------------------------------------------------
# im2latex-100k import

FORMULAS = [b'\\frac{a}{b}', b'x^2\r+ y', b'\xe9\\alpha', b'  ', b'a+b', b'\\sqrt{c}', b'\\int_0^1 f', b'q']


def make_release(src, variant):
    """A tiny release with a formula containing '\\r', a non-UTF-8 line, an empty formula, a bad line,
    an out-of-range index, a missing image, a blank page and a corrupt image."""
    os.makedirs(src)
    suffix = '_filter' if variant == 'processed' else ''
    name = 'im2latex_formulas.norm.lst' if variant == 'processed' else 'im2latex_formulas.lst'
    with open(os.path.join(src, name), 'wb') as f:
        f.write(b'\n'.join(FORMULAS) + b'\n')
    img_dir = os.path.join(src, 'formula_images_processed' if variant == 'processed' else 'formula_images')
    splits = {
        'train': [(0, 'img0'), (1, 'img1'), (2, 'img2'), (3, 'img3'), (99, 'img4'), None, (4, 'missing'),
                  (5, 'blank'), (6, 'corrupt')],
        'validate': [(4, 'img5')],
        'test': [(5, 'img6'), (7, 'img0')],  # img0 again: duplicate
    }
    for split, items in splits.items():
        lines = []
        for it in items:
            if it is None:
                lines.append('this line is bad')
            elif variant == 'raw':
                lines.append(f'{it[0]} {it[1]} basic')
            else:
                lines.append(f'{it[1]}.png {it[0]}')
            if it and it[1] != 'missing' and not os.path.exists(os.path.join(img_dir, it[1] + '.png')):
                path = os.path.join(img_dir, it[1] + '.png')
                if it[1] == 'corrupt':
                    os.makedirs(img_dir, exist_ok=True)
                    with open(path, 'wb') as f:
                        f.write(b'\x89PNG broken')
                elif it[1] == 'blank':
                    make_blank(path, variant)
                elif variant == 'raw':
                    page = np.full((300, 400), 255, np.uint8)
                    page[100:120, 50:50 + 20 * (1 + it[0] % 5)] = 0
                    os.makedirs(img_dir, exist_ok=True)
                    Image.fromarray(page).convert('RGBA').save(path)
                else:
                    make_image(path, 50, 120 if it[0] % 2 else 160, mode='RGB' if it[0] % 2 else 'L')
        with open(os.path.join(src, f'im2latex_{split}{suffix}.lst'), 'w') as f:
            f.write('\n'.join(lines) + '\n')


def make_blank(path, variant):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((300, 400) if variant == 'raw' else (50, 120), 255, np.uint8)).save(path)


EXPECTED = {
    'train': [('img0.png', '\\frac{a}{b}'), ('img1.png', 'x^2 + y'), ('img2.png', '\u00e9\\alpha')],
    'val': [('img5.png', 'a+b')],
    'test': [('img6.png', '\\sqrt{c}')],
}


def read_label_file(path):
    with open(path, encoding='utf-8', newline='') as f:
        return [tuple(line.rstrip('\n').split('\t')) for line in f]


@pytest.mark.parametrize('variant', ['raw', 'processed'])
def test_import_im2latex(tmp_path, variant):
    src, root = str(tmp_path / 'release'), str(tmp_path / 'root')
    make_release(src, variant)
    problems = data.Problems(quiet=True)
    r = proc.import_im2latex(src, root, workers=2, problems=problems)
    assert r['variant'] == variant
    assert r['splits'] == {'train': 3, 'val': 1, 'test': 1}
    for split, expected in EXPECTED.items():
        assert read_label_file(os.path.join(root, 'labels', f'{split}.txt')) == expected
    c = problems.counts
    assert c['not utf-8'] == 1 and c['empty formula'] == 1 and c['bad line'] == 1
    assert c['formula index out of range'] == 1 and c['missing image'] == 1 and c['duplicate image'] == 1
    assert c['corrupt image'] == 1
    assert c['blank page'] == 1
    assert len(problems) == 8 and r['skipped'] == 8
    expected_images = ['img0.png', 'img1.png', 'img2.png', 'img5.png', 'img6.png']
    assert sorted(os.listdir(os.path.join(root, 'images'))) == expected_images
    for name in expected_images:
        with Image.open(os.path.join(root, 'images', name)) as im:
            assert im.format == 'PNG' and im.mode == 'L'
            if variant == 'raw':  # bucket 240x100 / 2
                assert im.size == (120, 50)
    if variant == 'processed':  # grayscale PNGs are copied byte for byte
        with open(os.path.join(src, 'formula_images_processed', 'img0.png'), 'rb') as a, \
                open(os.path.join(root, 'images', 'img0.png'), 'rb') as b:
            assert a.read() == b.read()
    # resumable: a second run writes no image and the same labels
    problems2 = data.Problems(quiet=True)
    r2 = proc.import_im2latex(src, root, workers=1, problems=problems2)
    assert r2['written'] == 0 and r2['existing'] == len(expected_images)
    assert r2['splits'] == r['splits']
    # interrupted: an image missing, a stray temp file -> completed
    os.remove(os.path.join(root, 'images', 'img1.png'))
    stray = os.path.join(root, 'images', '.img1.png.k2j4h5g6.tmp')
    open(stray, 'wb').close()
    r3 = proc.import_im2latex(src, root, workers=1, problems=data.Problems(quiet=True))
    assert r3['written'] == 1 and not os.path.exists(stray)
    assert sorted(os.listdir(os.path.join(root, 'images'))) == expected_images


def test_import_missing_release_and_image_dir(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match='not an im2latex-100k release'):
        proc.import_im2latex(str(tmp_path), str(tmp_path / 'root'))
    (tmp_path / 'im2latex_formulas.lst').write_text('a\n')
    (tmp_path / 'im2latex_train.lst').write_text('0 x basic\n')
    with pytest.raises(FileNotFoundError, match='formula_images'):
        proc.import_im2latex(str(tmp_path), str(tmp_path / 'root'))
    assert proc.main(['--import_im2latex', str(tmp_path / 'nope'), '--root_dir', str(tmp_path / 'r')]) == 2
    assert 'no such folder' in capsys.readouterr().err


def test_import_loads_with_read_labels(tmp_path):
    if not hasattr(data, 'read_labels'):
        pytest.skip('data.read_labels not there yet')
    src, root = str(tmp_path / 'release'), str(tmp_path / 'root')
    make_release(src, 'raw')
    proc.import_im2latex(src, root, workers=1, problems=data.Problems(quiet=True))
    for split, expected in EXPECTED.items():
        problems = data.Problems(quiet=True)
        rows = data.read_labels(os.path.join(root, 'labels', f'{split}.txt'), problems)
        assert len(problems) == 0
        assert [(name, tokens) for name, tokens, _ in rows] == [(n, data.tokenize(f)) for n, f in expected]
        for name, _, _ in rows:
            assert data.load_gray(os.path.join(root, 'images', name)).shape == (50, 120)


# the im2markup sample layout: formulas.lst, {train,validate,test}.lst ('idx name render_type', names
# without .png), full pages in images/; formulas with what no image shows
SAMPLE_FORMULAS = [
    '\\frac{a}{b} \\label{eq:one}',                 # 0 \label (train)
    'x^2 = 5\\% % a note\ry',                       # 1 comment ends at \r; \% stays (train)
    'a+b \\nonumber \\\\',                          # 2 \nonumber and a trailing line break (train)
    '\\label{only}',                                # 3 nothing visible: dropped (train)
    '%c=d \\notag',                                 # 4 leading %: no comment; \notag (val)
    '\\sqrt{2}',                                    # 5 unchanged (test)
]
SAMPLE_EXPECTED = {
    'train': [('p0.png', '\\frac{a}{b}'), ('p1.png', 'x^2 = 5\\% y'), ('p2.png', 'a+b')],
    'val': [('p4.png', 'c=d')],
    'test': [('p5.png', '\\sqrt{2}')],
}


def make_im2markup_sample(src):
    os.makedirs(os.path.join(src, 'images'))
    with open(os.path.join(src, 'formulas.lst'), 'w', encoding='utf-8', newline='') as f:
        f.write(''.join(s + '\n' for s in SAMPLE_FORMULAS))
    for i in range(len(SAMPLE_FORMULAS)):
        page = np.full((120, 200), 255, np.uint8)
        page[40:52, 20:40 + 10 * i] = 0
        Image.fromarray(page).save(os.path.join(src, 'images', f'p{i}.png'))
    lists = {'train': '0 p0 basic\n1 p1 basic\n2 p2 basic\n3 p3 basic\n', 'validate': '4 p4 basic\n',
             'test': 'p5.png 5\n'}                     # the 'image idx' order is read too
    for split, text in lists.items():
        with open(os.path.join(src, f'{split}.lst'), 'w') as f:
            f.write(text)


def test_import_im2markup_sample_layout_normalizes_labels(tmp_path, capsys):
    src, root = str(tmp_path / 'sample'), str(tmp_path / 'root')
    make_im2markup_sample(src)
    assert proc.main(['--import_im2latex', src, '--root_dir', root, '--workers', '1']) == 0
    out = capsys.readouterr().out
    assert 'im2markup sample' in out and '4 changed, 1 dropped' in out
    hidden = {'\\label', '\\nonumber', '\\notag', '%'}
    for split, expected in SAMPLE_EXPECTED.items():
        assert read_label_file(os.path.join(root, 'labels', f'{split}.txt')) == expected
        rows = data.read_labels(os.path.join(root, 'labels', f'{split}.txt'), data.Problems(quiet=True))
        assert not hidden & {t for _, tokens, _ in rows for t in tokens}
        orig = read_label_file(os.path.join(root, 'labels', f'{split}.orig.txt'))
        assert [n for n, _ in orig] == [n for n, _ in expected]   # line for line beside the labels
    assert '\\%' in data.tokenize(SAMPLE_EXPECTED['train'][1][1])
    assert read_label_file(os.path.join(root, 'labels', 'train.orig.txt'))[1][1] == 'x^2 = 5\\% % a note y'
    assert sorted(os.listdir(os.path.join(root, 'images'))) == ['p0.png', 'p1.png', 'p2.png', 'p4.png', 'p5.png']
    with open(os.path.join(root, 'labels', 'import.json')) as f:
        record = json.load(f)
    norm = record['normalization']
    assert record['layout'] == 'im2markup sample' and record['splits'] == {'train': 3, 'val': 1, 'test': 1}
    assert (norm['formulas'], norm['changed'], norm['dropped']) == (6, 4, 1)
    assert norm['removed'] == {'\\label': 2, '% comment': 1, '\\nonumber': 1, 'trailing \\\\': 1,
                               'nothing visible': 1, 'leading %': 1, '\\notag': 1}
    assert record['skipped_by_kind'] == {'dropped by normalization': 1}


@pytest.mark.parametrize('raw, label, removed', [
    ('E=mc^2 \\label{eq:1} % Einstein', 'E=mc^2', ['% comment', '\\label']),
    ('a \\\\%c\r b', 'a \\\\ b', ['% comment']),            # \\ then a comment, which \r ends
    ('\\label{a{b}c}x\\labelled', 'x\\labelled', ['\\label']),  # balanced braces; another command stays
    ('%%x_1%%', 'x_1', ['leading %', '% comment']),
    ('a \\tag{1} \\, \\eqno(2)', 'a \\tag{1} \\, \\eqno(2)', []),  # visible: kept
    ('a\\label{open', '', ['unclosed \\label argument']),
    ('\\notag % x', '', ['% comment', '\\notag', 'nothing visible']),
])
def test_normalize_formula(raw, label, removed):
    assert proc.normalize_formula(raw) == (label, removed)


def test_unknown_layout_lists_the_file_names_looked_for(tmp_path, capsys):
    (tmp_path / 'labels.lst').write_text('0 a\n')
    (tmp_path / 'pics').mkdir()
    assert proc.main(['--import_im2latex', str(tmp_path), '--root_dir', str(tmp_path / 'r')]) == 2
    err = capsys.readouterr().err
    assert f'Looked in {tmp_path} for' in err
    for name in ('im2latex_formulas.lst', 'im2latex_{train,validate,test}.lst', 'formula_images/',
                 'im2latex_formulas.norm.lst', 'formulas.lst + {train,validate,test}.lst, images in images/',
                 'formulas.norm.lst'):
        assert name in err, name
    assert 'It holds: labels.lst, pics' in err
    assert not os.path.exists(tmp_path / 'r')


def test_clean_formula():
    assert proc.clean_formula('  a\r+\tb \u00a0 c\r') == 'a + b c'
    assert proc.clean_formula('a\\ ') == 'a\\ '      # control space kept
    assert proc.clean_formula('a\\\\ ') == 'a\\\\'   # \\ then a plain space
