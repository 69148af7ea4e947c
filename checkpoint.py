"""The checkpoint format, in one place: its version, saving (atomic and durable), loading (checked,
tensors and plain values only), the choice of student or teacher weights, and a model from a file.

A checkpoint is a dict that torch.load(..., weights_only=True) reads; its keys are listed in
docs/formats.md ("Checkpoints"). train.py writes it with save(); test.py, bench.py and train.py's
--init_from read it with load_checkpoint() / load_model().
"""
import os
import pickle
import re

import torch

import data
import transformer
from utils import info

FORMAT_VERSION = 1          # 'format_version' of the checkpoint dict; bump when its keys change meaning
REQUIRED_KEYS = ('hparams', 'vocab', 'model')
WEIGHTS = ('model', 'teacher')   # the two sets of weights a checkpoint can hold ('model' = the student)


# -----------------------------------------------------------------------------
# saving

def save(path, ckpt):
    """Write the checkpoint dict to path atomically and durably: torch.save into a temp file in the same
    folder, fsync it, rename it over path, fsync the folder. On any failure (a full disk, a value
    torch.save cannot store) the previous file at path is left as it was, and the OSError raised
    says so."""
    path = os.fspath(path)

    def writer(tmp):
        with open(tmp, 'wb') as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
    try:
        data.atomic_write(path, writer)
    except (OSError, RuntimeError, pickle.PicklingError) as e:
        kept = f'the previous {path} is unchanged' if os.path.exists(path) else 'nothing was written'
        errno = e.errno if isinstance(e, OSError) else None
        raise OSError(errno, f'cannot save checkpoint {path} ({_one_line(e)}); {kept}') from e
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


def _fsync_folder(folder):
    """Make a rename in folder durable (best effort: not every file system lets a folder be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _one_line(e):
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), '')
    return f'{type(e).__name__}: {first[:200]}' if first else type(e).__name__


# -----------------------------------------------------------------------------
# loading

def _why_unreadable(e):
    """One line on why torch.load could not read a file. torch's own message for a file that is not
    only tensors and plain values spans many lines and proposes loading it as arbitrary code; neither
    belongs in this error."""
    text = str(e)
    if 'Weights only load failed' in text:
        found = re.search(r'Unsupported global: GLOBAL (\S+)', text)
        if found:
            return f'it holds a Python object of type {found.group(1)}, not only tensors and plain values'
        return 'not a torch.save file of tensors and plain values'
    if isinstance(e, (pickle.UnpicklingError, EOFError, KeyError)):
        return 'not a torch.save file'
    return _one_line(e)


def load(path, map_location='cpu'):
    """Read a checkpoint written by train.py -> its dict, checked: FileNotFoundError for no file,
    ValueError (one line, naming the file) for a file that is not such a checkpoint, has another
    format_version or lacks a required key. Only tensors and plain values are loaded (weights_only)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: checkpoint not found')
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- whatever torch.load raises, the file is not readable
        raise ValueError(f'{path}: not a readable checkpoint ({_why_unreadable(e)})') from None
    if not isinstance(ckpt, dict) or 'format_version' not in ckpt:
        raise ValueError(f'{path}: not a checkpoint written by train.py (no format_version)')
    if ckpt['format_version'] != FORMAT_VERSION:
        raise ValueError(f'{path}: unknown checkpoint format_version {ckpt["format_version"]!r} '
                         f'(this code reads {FORMAT_VERSION})')
    for key in REQUIRED_KEYS:
        if key not in ckpt:
            raise ValueError(f'{path}: checkpoint has no {key!r}')
    return ckpt


def _weights_name(which):
    """'model' | 'student' | 'teacher' -> the checkpoint key of those weights; ValueError otherwise."""
    which = 'model' if which == 'student' else which
    if which not in WEIGHTS:
        raise ValueError(f"which={which!r}: must be 'model' (or 'student') or 'teacher'")
    return which


def has_teacher(ckpt):
    """True when the checkpoint holds mean-teacher (EMA) weights."""
    return ckpt.get('teacher') is not None


def model_state(ckpt, which='model', path='checkpoint'):
    """The state dict of the student ('model', also 'student') or of the mean teacher ('teacher').
    ValueError naming `path` when the teacher is asked for and the checkpoint has none."""
    which = _weights_name(which)
    if which == 'teacher' and not has_teacher(ckpt):
        raise ValueError(f'{path}: checkpoint has no teacher weights (trained without --mean_teacher)')
    return ckpt[which]


def _build(ckpt, which, path):
    """The checkpoint's architecture with its `which` weights, in eval mode on the CPU."""
    sd = model_state(ckpt, which, path)
    try:
        model = transformer.build_model(ckpt['hparams'])
    except (TypeError, ValueError) as e:
        raise ValueError(f'{path}: bad model hyperparameters ({e})') from None
    if len(ckpt['vocab']) != model.vocab_size:
        raise ValueError(f'{path}: vocab has {len(ckpt["vocab"])} tokens but the model '
                         f'{model.vocab_size} outputs')
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f'{path}: {which} weights do not fit the model ({e})') from None
    return model.eval()


def load_checkpoint(path, which='model', map_location='cpu'):
    """A model from a checkpoint written by train.py -> (model in eval mode, vocab itos, checkpoint
    dict). which='teacher' loads the mean-teacher weights. Errors as load() and model_state(), and a
    ValueError naming the file when the weights do not fit the stored architecture or vocab."""
    path = os.fspath(path)
    which = _weights_name(which)                     # an unknown `which` fails before the file is read
    ckpt = load(path, map_location)
    model = _build(ckpt, which, path)
    model.to(map_location if isinstance(map_location, (str, torch.device)) else 'cpu')
    return model, list(ckpt['vocab']), ckpt


def trained_with_trim(ckpt):
    """True when the checkpoint's run cropped its images to their ink (train.py --trim): its model must
    be fed images trimmed the same way (data.trim_image)."""
    return bool((ckpt.get('args') or {}).get('trim', False))


def load_model(path, mean_teacher=False, device='cpu', hint=None):
    """For the command lines: -> (model in eval mode on `device`, data.Vocab, checkpoint dict,
    'teacher' | 'student'). SystemExit with a clear message (and `hint` for a missing file) for a
    missing or unreadable checkpoint or a missing teacher; says on stderr which weights it uses."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SystemExit(f'error: no checkpoint at {path}.\n{hint or ""}'.rstrip())
    try:
        ckpt = load(path)
        if mean_teacher and not has_teacher(ckpt):
            raise SystemExit(f'error: {path} has no teacher weights: --mean_teacher evaluates the teacher '
                             '(EMA) weights, which only a checkpoint trained with `train.py --mean_teacher` '
                             'has. Drop --mean_teacher to evaluate its student weights.')
        model = _build(ckpt, 'teacher' if mean_teacher else 'model', path)
        vocab = data.Vocab(list(ckpt['vocab']))
    except ValueError as e:                 # the messages of load() and _build() name the file
        raise SystemExit(f'error: {e}') from None
    except (KeyError, OSError) as e:
        raise SystemExit(f'error: cannot load checkpoint {path}: {type(e).__name__}: {e}') from None
    if mean_teacher:
        info(f'evaluating the teacher (EMA) weights of {path}')
    elif has_teacher(ckpt):
        info(f'evaluating the student weights of {path} (it also holds teacher weights: --mean_teacher)')
    return model.to(device).eval(), vocab, ckpt, ('teacher' if mean_teacher else 'student')
