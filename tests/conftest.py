"""Shared pytest setup: the repository root on sys.path (so `python3 -m pytest -q tests` and a plain
`pytest` from the root import the top-level modules), and a tiny rendered demo data set."""
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# (train, val, test) per domain of the tiny demo: a few dozen images each, ~10 s on 2 cores
TINY_DEMO_SIZES = {'openai': (32, 8, 8), 'math': (32, 8, 8), 'chemistry': (32, 8, 8)}


@pytest.fixture(scope='session')
def demo_root(tmp_path_factory):
    """Path (str) of a tiny demo root in the data layout of docs/formats.md, rendered once per test session by
    render.write_demo (seed 0): all three domains, TINY_DEMO_SIZES images per split, math and
    chemistry already clustered by proc.kmeans_for_img_size. Shared by every test: treat it as
    read-only; copy it (shutil.copytree) before changing anything in it."""
    import render
    root = tmp_path_factory.mktemp('demo_root')
    render.write_demo(root, seed=0, workers=2, quiet=True, sizes=TINY_DEMO_SIZES)
    return str(root)
