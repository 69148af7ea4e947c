"""LaTeX -> image rendering, and the built-in demo data sets.

1. render_latex: a formula -> uint8 (H, W) image, dark ink on white, cropped to the ink with a small
   margin. Default renderer: matplotlib's mathtext (no TeX installation needed). mathtext covers most
   of what im2latex formulas use; what it lacks is rewritten to the same or a close visual first
   (`mathtext_source`, table below), and what it cannot draw at all (environments such as
   \\begin{array}, line breaks, mhchem) raises RenderError naming the token. renderer='latex' uses a
   real TeX when installed: pdflatex with the preview package typesets many formulas per call (one page
   each, LATEX_CHUNK per call), pdftoppm rasterizes the pages; a formula that stops pdflatex is found
   (from the error's line, else by halving the batch), reported and left out, the others are kept.
   render_boxes renders a list at once; resolve_renderer is the one place 'auto' is decided.
2. write_demo: the demo data sets, in the data layout of README.md / docs/formats.md, drawn from the
   formula generators of formulas.py (openai = im2latex-100k style, math = school math, chemistry =
   reaction equations): openai images are processed like im2latex-100k (proc.deng_process: crop,
   pad 8, bucket, x2 downsample), math/chemistry images keep continuous sizes and are then clustered
   into 32 sizes by proc.kmeans_for_img_size. Deterministic for a seed, whatever the number of workers.
The image metrics that compare renders of gold and predicted formulas are in metrics.py.

    python3 render.py --root_dir data/demo                 # the default demo (about a minute on 2 cores)
    python3 render.py --root_dir data/big --n 20000        # 20000 training formulas per domain
    python3 render.py --latex '\\frac{a}{b}' --out f.png    # one formula to a PNG

mathtext rewrites (token -> what mathtext draws; exact unless marked "approx."):
  \\le \\ge -> \\leq \\geq; \\gets \\lnot \\land \\lor \\owns -> \\leftarrow \\neg \\wedge \\vee \\ni;
  \\iff \\implies \\impliedby -> \\; \\Longleftrightarrow \\; (etc.); \\tfrac -> \\frac; \\cfrac -> \\dfrac;
  \\dbinom \\tbinom -> \\binom; \\stackrel -> \\overset; \\xrightarrow[b]{a} (and \\xleftarrow, \\xleftrightarrow,
  \\xRightarrow, \\xrightleftharpoons, \\xlongequal) -> \\underset{b}{\\overset{a}{\\longrightarrow}} (approx.:
  the arrow does not stretch); A \\over B, A \\choose B, A \\atop B, \\brace, \\brack -> \\frac \\binom \\genfrac;
  \\text \\textrm \\mbox \\hbox \\textnormal \\textup -> \\mathrm, \\textbf -> \\mathbf, \\textit \\emph -> \\mathit,
  \\textsf -> \\mathsf, \\texttt -> \\mathtt (text-mode spaces are not kept: labels are tokenized);
  \\Bbb \\bold \\bm \\pmb -> \\mathbb \\mathbf \\boldsymbol; \\sl \\em \\mit -> \\it; \\sc -> \\rm;
  \\mathop \\mathrel \\mathbin \\mathord \\ensuremath \\smash \\rlap \\llap -> their argument (approx.);
  \\boxed \\fbox -> their argument (approx., no frame); \\overbrace \\underbrace -> \\overline \\underline
  (approx.); \\big \\Big \\bigg \\Bigg (l/r/m) -> dropped, the delimiter keeps its normal size (approx.);
  \\left X ... \\right Y: zero-width struts keep each delimiter at least its normal size (mathtext would
  otherwise shrink it below the text size around short content);
  \\hspace{dim} \\kern \\mkern \\hskip -> \\hspace in em (1em = 10pt); \\hfill \\hfil \\hss -> \\quad;
  \\vspace \\vskip \\vphantom \\label \\tag \\nonumber \\notag \\displaystyle \\textstyle \\scriptstyle
  \\limits \\nolimits \\relax \\protect \\strut \\mathstrut \\tiny ... \\Huge -> dropped;
  \\not= \\not\\in \\not< ... -> \\neq \\notin \\nless ...; \\lvert \\rvert \\lVert \\rVert -> | \\Vert;
  \\dotsc \\dotsb \\dotsm \\dotsi \\hdots -> \\ldots / \\cdots; \\varGamma ... -> \\Gamma ... (approx.);
  \\pmod{n} \\bmod \\mod -> (\\mathrm{mod}\\,n) etc.; \\' \\` \\" \\^ \\~ \\= \\. \\u \\v -> \\acute \\grave \\ddot
  \\hat \\tilde \\bar \\dot \\breve \\check; \\Box \\square \\Diamond \\lozenge \\surd \\pounds -> their Unicode
  glyphs; \\sp \\sb -> ^ _; \\& -> &; " -> '' and ` -> ' (approx.).
Not drawable with mathtext (RenderError): \\begin/\\end environments, \\\\ and & (alignment), \\cr,
\\hline, \\multicolumn, \\ce/\\pu (mhchem), \\cancel, \\color, macro definitions, a bare $ # %, and a
symbol missing from the chosen font (mathtext would draw a dummy box instead).
Rasterization is mathtext's own, except that the baseline is put on a whole pixel row (see
_raster_on_integer_baseline), so equal sub-formulas get equal pixels in any two renders.
"""
import argparse
import functools
import logging
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

import numpy as np
from PIL import Image

import formulas
from data import DEFAULT_ROOT, DOMAINS, SPLITS, detokenize, label_path, tokenize, unglue
from utils import crop_to_ink, imap_progress, n_workers, process_pool, save_png, write_text

# -----------------------------------------------------------------------------
# defaults

FONTS = ('cm', 'stix', 'stixsans', 'dejavuserif', 'dejavusans')  # mathtext fontsets
FONTSIZE = 12          # pt
DPI = 100              # at 12 pt and 100 dpi 1 em = 16.7 px, about the scale of im2latex-100k's processed images
PAD = 4                # white margin (px) around the cropped ink of render_latex
RENDERERS = ('mathtext', 'latex')
# Default demo sizes (train, val, test) per domain. Measured CPU cost per image (mathtext, matplotlib 3.11):
# openai ~45 ms (long formulas, page-size renders + Deng processing), chemistry ~25 ms, math ~8 ms, so
# the default demo (6,600 images, ~135-150 CPU-s) renders in about 1.5 minutes on 2 idle cores, leaving
# the README quick start (render + a short CPU training run) within ~10 minutes. math is the largest set:
# the quick start trains on it (500 formulas seen 15 times taught the model the labels' language, not
# reading; see README, "Learning"). `--n` scales it for real runs.
DEMO_SIZES = {'openai': (1500, 150, 150), 'math': (4000, 400, 400), 'chemistry': (500, 50, 50)}
EVAL_FRACTION = 0.1    # with --n N: val and test get round(0.1 * N) formulas each
MAX_ATTEMPTS = 5       # a formula that does not render is replaced by the next candidate, at most this often
MAX_CANDIDATES = 50    # val/test: candidates equal to a train formula are skipped, at most this many per sample
# openai renders: page scale before Deng's x2 downsample (so ~2x the scale of DPI above)
OPENAI_FONTS = (('cm', 0.55), ('stix', 0.15), ('dejavuserif', 0.1), ('dejavusans', 0.1), ('stixsans', 0.1))
OPENAI_FONTSIZE = (10.5, 13.0)   # uniform range, pt
OPENAI_DPI = (170, 230)          # uniform range (integers)
# math / chemistry renders: continuous sizes (photographed or scanned formulas come at any scale)
ADAPT_FONTSIZE = (11.0, 15.0)
ADAPT_DPI = (100, 160)
ADAPT_MARGIN = (2, 16)           # random white margin per side, px
MIN_TASKS_PER_WORKER = 4         # write_demo starts a process pool only for at least this many images per worker


class RenderError(Exception):
    """A formula that the chosen renderer cannot draw; str() says why (and what to do)."""


# -----------------------------------------------------------------------------
# mathtext: token rewrites (see the table in the module docstring)

_RENAME = {
    r'\le': r'\leq', r'\ge': r'\geq', r'\gets': r'\leftarrow', r'\lnot': r'\neg', r'\land': r'\wedge',
    r'\lor': r'\vee', r'\owns': r'\ni', r'\intop': r'\int', r'\smallint': r'\int', r'\ldotp': '.',
    r'\dotsc': r'\ldots', r'\dotso': r'\ldots', r'\hdots': r'\ldots', r'\mathellipsis': r'\ldots',
    r'\dotsb': r'\cdots', r'\dotsm': r'\cdots', r'\dotsi': r'\cdots', r'\iddots': r'\ddots',
    r'\lvert': '|', r'\rvert': '|', r'\lVert': r'\Vert', r'\rVert': r'\Vert', r'\i': r'\imath', r'\j': r'\jmath',
    r'\Bbb': r'\mathbb', r'\bold': r'\mathbf', r'\bm': r'\boldsymbol', r'\pmb': r'\boldsymbol',
    r'\mit': r'\it', r'\sl': r'\it', r'\em': r'\it', r'\sc': r'\rm', r'\mathnormal': r'\mathit',
    r'\tfrac': r'\frac', r'\cfrac': r'\dfrac', r'\dbinom': r'\binom', r'\tbinom': r'\binom',
    r'\hphantom': r'\phantom', r'\stackrel': r'\overset', r'\overbrace': r'\overline',
    r'\underbrace': r'\underline', r'\overbar': r'\overline', r'\hfill': r'\quad', r'\hfil': r'\quad',
    r'\hss': r'\quad', r'\enskip': r'\enspace', r'\space': '\\ ', r'\nobreakspace': '~', r'\medspace': r'\:',
    r'\thickspace': r'\;', r'\negthinspace': r'\!', r'\>': r'\:',
    "\\'": r'\acute', r'\`': r'\grave', r'\"': r'\ddot', r'\^': r'\hat', r'\~': r'\tilde', r'\=': r'\bar',
    r'\.': r'\dot', r'\u': r'\breve', r'\v': r'\check', r'\H': r'\ddot',
    r'\lq': "'", r'\rq': "'", '`': "'", r'\&': '&',
    r'\Box': '\u25a1', r'\square': '\u25a1', r'\Diamond': '\u25c7', r'\lozenge': '\u25ca', r'\surd': '\u221a',
    r'\pounds': '\u00a3', r'\varliminf': r'\liminf', r'\varlimsup': r'\limsup', r'\nni': r'\not\ni',
    r'\varGamma': r'\Gamma', r'\varDelta': r'\Delta', r'\varTheta': r'\Theta', r'\varLambda': r'\Lambda',
    r'\varXi': r'\Xi', r'\varPi': r'\Pi', r'\varSigma': r'\Sigma', r'\varUpsilon': r'\Upsilon',
    r'\varPhi': r'\Phi', r'\varPsi': r'\Psi', r'\varOmega': r'\Omega', r'\sp': '^', r'\sb': '_',
    r'\operatornamewithlimits': r'\operatorname',
}
_EXPAND = {  # token -> several tokens
    r'\iff': [r'\;', r'\Longleftrightarrow', r'\;'], r'\implies': [r'\;', r'\Longrightarrow', r'\;'],
    r'\impliedby': [r'\;', r'\Longleftarrow', r'\;'], '"': ["'", "'"], r'\coloneqq': [':', '='],
    r'\bmod': [r'\mathrm', '{', 'm', 'o', 'd', '}'], r'\mod': [r'\quad', r'\mathrm', '{', 'm', 'o', 'd', '}', r'\,'],
    r'\negmedspace': [r'\hspace', '{', '-0.2222', '}'], r'\negthickspace': [r'\hspace', '{', '-0.2778', '}'],
}
_SIZES = {r'\big', r'\Big', r'\bigg', r'\Bigg', r'\bigl', r'\Bigl', r'\biggl', r'\Biggl', r'\bigr', r'\Bigr',
          r'\biggr', r'\Biggr', r'\bigm', r'\Bigm', r'\biggm', r'\Biggm'}
_DROP = _SIZES | {
    r'\nonumber', r'\notag', r'\displaystyle', r'\textstyle', r'\scriptstyle', r'\scriptscriptstyle',
    r'\limits', r'\nolimits', r'\displaylimits', r'\protect', r'\relax', r'\strut', r'\mathstrut', r'\tiny',
    r'\scriptsize', r'\footnotesize', r'\small', r'\normalsize', r'\large', r'\Large', r'\LARGE', r'\huge',
    r'\Huge', r'\boldmath', r'\unboldmath', r'\null', r'\nobreak', r'\allowbreak', r'\noindent',
    r'\leavevmode', r'\smallskip', r'\medskip', r'\bigskip', r'\vfill', r'\/', r'\-', r'\*', r'\@',
    r'\(', r'\)', r'\[', r'\]'}
_DROP_WITH_ARG = {r'\label', r'\vspace', r'\vphantom', r'\tag', r'\mathversion'}
_DIMENSION = {r'\hspace', r'\kern', r'\mkern', r'\hskip', r'\mskip', r'\vskip'}   # followed by a dimension
_TEXT_FONT = {r'\text': r'\mathrm', r'\textrm': r'\mathrm', r'\textnormal': r'\mathrm', r'\textup': r'\mathrm',
              r'\textmd': r'\mathrm', r'\textsc': r'\mathrm', r'\mbox': r'\mathrm', r'\hbox': r'\mathrm',
              r'\textbf': r'\mathbf', r'\textit': r'\mathit', r'\textsl': r'\mathit', r'\emph': r'\mathit',
              r'\textsf': r'\mathsf', r'\texttt': r'\mathtt'}
_WRAPPERS = {r'\mathop', r'\mathrel', r'\mathbin', r'\mathord', r'\mathpunct', r'\mathinner', r'\mathopen',
             r'\mathclose', r'\ensuremath', r'\smash', r'\rlap', r'\llap', r'\mathrlap', r'\mathllap',
             r'\boxed', r'\fbox'}
_XARROWS = {r'\xrightarrow': r'\longrightarrow', r'\xleftarrow': r'\longleftarrow',
            r'\xleftrightarrow': r'\longleftrightarrow', r'\xRightarrow': r'\Longrightarrow',
            r'\xLeftarrow': r'\Longleftarrow', r'\xrightleftharpoons': r'\rightleftharpoons',
            r'\xlongequal': '='}
_NOT = {'=': r'\neq', r'\in': r'\notin', '<': r'\nless', '>': r'\ngtr', r'\leq': r'\nleq', r'\le': r'\nleq',
        r'\geq': r'\ngeq', r'\ge': r'\ngeq', r'\equiv': r'\nequiv', r'\subset': r'\nsubset',
        r'\supset': r'\nsupset', r'\subseteq': r'\nsubseteq', r'\supseteq': r'\nsupseteq', r'\sim': r'\nsim',
        r'\simeq': r'\nsimeq', r'\approx': r'\napprox', r'\cong': r'\ncong', r'\parallel': r'\nparallel',
        r'\mid': r'\nmid', r'\exists': r'\nexists', r'\prec': r'\nprec', r'\succ': r'\nsucc', '|': r'\nmid'}
_INFIX = {r'\over', r'\atop', r'\choose', r'\brace', r'\brack', r'\above'}
_UNSUPPORTED = {
    r'\begin': 'environments (\\begin{...})', r'\end': 'environments (\\end{...})',
    '\\\\': 'line breaks (\\\\)', '&': 'alignment (&)', r'\cr': 'line breaks (\\cr)', r'\crcr': 'line breaks',
    r'\hline': 'tables (\\hline)', r'\cline': 'tables', r'\multicolumn': 'tables', r'\multirow': 'tables',
    r'\noalign': 'tables', r'\vline': 'tables', r'\array': 'arrays', r'\matrix': 'matrices',
    r'\pmatrix': 'matrices', r'\bmatrix': 'matrices', r'\cases': 'cases', r'\eqno': '\\eqno', r'\leqno': '\\leqno',
    r'\ce': 'mhchem (\\ce)', r'\pu': 'mhchem (\\pu)', r'\cancel': '\\cancel', r'\bcancel': '\\bcancel',
    r'\xcancel': '\\xcancel', r'\sout': '\\sout', r'\color': 'colour', r'\textcolor': 'colour',
    r'\def': 'macro definitions', r'\newcommand': 'macro definitions', r'\renewcommand': 'macro definitions',
    r'\let': 'macro definitions', r'\sideset': '\\sideset', r'\underrightarrow': '\\underrightarrow',
    r'\underleftarrow': '\\underleftarrow', r'\buildrel': '\\buildrel', r'\raise': '\\raise', r'\lower': '\\lower',
    '$': 'a bare $ (math shift)', '#': 'a bare # (macro parameter)', '%': 'a bare % (a comment in TeX; write \\%)',
}
# TeX dimensions -> em at 10 pt (1 em = 10 pt)
_UNITS_EM = {'em': 1.0, 'ex': 0.431, 'pt': 0.1, 'pc': 1.2, 'bp': 0.1004, 'dd': 0.107, 'cc': 1.284,
             'mm': 0.2845, 'cm': 2.845, 'in': 7.227, 'mu': 1 / 18, 'sp': 0.1 / 65536}
_COMMAND = re.compile(r'\\[A-Za-z]+')


def _group_end(toks, i):
    """toks[i] == '{': index of its matching '}' (ValueError if unbalanced)."""
    depth = 0
    for j in range(i, len(toks)):
        if toks[j] == '{':
            depth += 1
        elif toks[j] == '}':
            depth -= 1
            if depth == 0:
                return j
    raise ValueError('unbalanced braces: a { is never closed')


def _take_arg(toks, i):
    """A TeX argument starting at toks[i]: a {...} group or one token. -> (inner tokens, next index)."""
    if i >= len(toks):
        raise ValueError('a command at the end of the formula is missing its argument')
    if toks[i] == '{':
        j = _group_end(toks, i)
        return toks[i + 1:j], j + 1
    if toks[i] == '}':
        raise ValueError('a command is missing its argument (found })')
    return [toks[i]], i + 1


def _take_optional(toks, i):
    """An optional [...] argument at toks[i] -> (inner tokens or None, next index)."""
    if i < len(toks) and toks[i] == '[':
        depth = 0
        for j in range(i, len(toks)):
            depth += toks[j] == '{'
            depth -= toks[j] == '}'
            if toks[j] == ']' and depth == 0:
                return toks[i + 1:j], j + 1
        raise ValueError('an optional argument [ is never closed')
    return None, i


def _take_dimension(toks, i):
    """A TeX dimension after \\hspace / \\kern ...: '{ - 0 . 5 c m }' or '1 pt' or '- 2 m u' ->
    (em as float or None for glue such as \\fill, next index)."""
    if i < len(toks) and toks[i] == '*':  # \hspace*
        i += 1
    braced = i < len(toks) and toks[i] == '{'
    if braced:
        inner, nxt = _take_arg(toks, i)
    else:
        inner, nxt = toks[i:i + 12], None
    s, k = '', 0
    while k < len(inner) and (inner[k] in '+-.,' or inner[k].isdigit()) and len(inner[k]) == 1:
        s += '.' if inner[k] == ',' else inner[k]
        k += 1
    unit = ''.join(inner[k:k + 2])
    try:
        value = float(s) if s not in ('', '+', '-') else (-1.0 if s == '-' else 1.0)
    except ValueError:
        value = None
    em = value * _UNITS_EM[unit] if value is not None and unit in _UNITS_EM else None
    if not braced:
        nxt = i + k + (2 if unit in _UNITS_EM else 0)
    return em, nxt


def _rewrite(toks):
    """Token-level rewrites of the module docstring's table (recursing into arguments)."""
    out, i, n = [], 0, len(toks)
    while i < n:
        t = toks[i]
        if t in _DROP:
            i += 1
        elif t in _DROP_WITH_ARG:
            _, i = _take_arg(toks, i + 1)
        elif t in _DIMENSION:
            em, i = _take_dimension(toks, i + 1)
            if t != r'\vskip' and em:
                out += [r'\hspace', '{', f'{em:.4f}', '}']
        elif t == r'\not' and i + 1 < n and toks[i + 1] in _NOT:
            out.append(_NOT[toks[i + 1]])
            i += 2
        elif t in _TEXT_FONT or t in _WRAPPERS:
            arg, i = _take_arg(toks, i + 1)
            head = [_TEXT_FONT[t]] if t in _TEXT_FONT else []
            out += head + ['{'] + _rewrite(arg) + ['}']
        elif t in _XARROWS:
            below, j = _take_optional(toks, i + 1)
            above, i = _take_arg(toks, j)
            arrow = [_XARROWS[t]]
            if above:
                arrow = [r'\overset', '{'] + _rewrite(above) + ['}', '{'] + arrow + ['}']
            if below:
                arrow = [r'\underset', '{'] + _rewrite(below) + ['}', '{'] + arrow + ['}']
            out += arrow
        elif t == r'\operatorname' and i + 1 < n and toks[i + 1] == '*':
            out.append(t)
            i += 2
        elif t in (r'\pmod', r'\pod'):
            arg, i = _take_arg(toks, i + 1)
            mod = [r'\mathrm', '{', 'm', 'o', 'd', '}', r'\,'] if t == r'\pmod' else []
            out += [r'\quad', '('] + mod + _rewrite(arg) + [')']
        elif t == r'\raisebox':
            _, j = _take_arg(toks, i + 1)
            _, j = _take_optional(toks, j)
            _, j = _take_optional(toks, j)
            arg, i = _take_arg(toks, j)
            out += ['{'] + _rewrite(arg) + ['}']
        elif t in _EXPAND:
            out += _EXPAND[t]
            i += 1
        else:
            out.append(_RENAME.get(t, t))
            i += 1
    return out


def _infix(body):
    """'A \\over B' at the top level of a group body -> \\frac{A}{B} (likewise \\choose \\atop \\brace \\brack)."""
    depth, at = 0, []
    for k, t in enumerate(body):
        if t in ('{', r'\left'):
            depth += 1
        elif t in ('}', r'\right'):
            depth -= 1
        elif t in _INFIX and depth == 0:
            at.append(k)
    if not at:
        return body
    if len(at) > 1:
        raise ValueError(f'ambiguous: two of {body[at[0]]} {body[at[1]]} in one group')
    k = at[0]
    a, op, b = body[:k], body[k], body[k + 1:]
    if op == r'\above':  # '\above <dimension>' : drop the rule thickness
        _, j = _take_dimension(b, 0)
        b, op = b[j:], r'\over'
    if op == r'\over':
        return [r'\frac', '{'] + a + ['}', '{'] + b + ['}']
    if op == r'\choose':
        return [r'\binom', '{'] + a + ['}', '{'] + b + ['}']
    left, right = {r'\atop': ('', ''), r'\brace': (r'\{', r'\}'), r'\brack': ('[', ']')}[op]
    return [r'\genfrac', '{', left, '}', '{', right, '}', '{', '0', '}', '{', '}', '{'] + a + ['}', '{'] + b + ['}']


@functools.lru_cache(maxsize=None)
def _strut(font, delim):
    """Tokens of a zero-width strut as tall as the delimiter: \\phantom{delim}, then \\hspace back by its width."""
    if delim == '.':
        delim = '('
    parser = _parser()
    from matplotlib.font_manager import FontProperties
    prop = FontProperties(size=100, math_fontfamily=font)
    try:
        w = (parser.parse(f'$x\\phantom{{{delim}}}x$', dpi=72, prop=prop).width
             - parser.parse('$xx$', dpi=72, prop=prop).width)
    except ValueError:  # not a symbol mathtext knows; the \\left itself will report it
        return ()
    return (r'\phantom', '{', delim, '}', r'\hspace', '{', f'{-w / 100:.4f}', '}')


def _groups(toks, font):
    """Walk the {...} and \\left...\\right groups: apply _infix to every group body and put a strut
    next to every \\left and \\right delimiter (mathtext sizes them to the content, which can be shorter
    than the delimiter itself)."""
    stack, opener, i = [[]], [], 0
    while i < len(toks):
        t = toks[i]
        if t == '{':
            stack.append([])
            opener.append(['{'])
        elif t == r'\left':
            if i + 1 >= len(toks):
                raise ValueError('\\left at the end of the formula')
            stack.append([])
            opener.append([r'\left', toks[i + 1]] + list(_strut(font, toks[i + 1])))
            i += 1
        elif t in ('}', r'\right'):
            if not opener:
                raise ValueError(f'unbalanced: {t} without a matching opener')
            op = opener.pop()
            if (op[0] == '{') != (t == '}'):
                raise ValueError(f'unbalanced: {op[0]} closed by {t}')
            body = _infix(stack.pop())
            if t == '}':
                stack[-1] += op + body + ['}']
            else:
                if i + 1 >= len(toks):
                    raise ValueError('\\right at the end of the formula')
                stack[-1] += op + body + list(_strut(font, toks[i + 1])) + [r'\right', toks[i + 1]]
                i += 1
        else:
            stack[-1].append(t)
        i += 1
    if opener:
        raise ValueError(f'unbalanced: {opener[-1][0]} is never closed')
    return _infix(stack[0])


def _join(toks):
    """Tokens -> a compact mathtext string. mathtext treats some spaces as content (e.g. 'x _ {3}' loses
    the subscript), so tokens are glued, with a space only where a command would swallow a letter."""
    out = []
    for t in toks:
        if out and _COMMAND.fullmatch(out[-1]) and t[:1].isalpha():
            out.append(' ')
        out.append(t)
    return ''.join(out)


def mathtext_source(latex, font='cm'):
    """LaTeX (raw or space-tokenized) -> the string handed to mathtext (without the $ $), after the
    rewrites of the module docstring. RenderError for what mathtext cannot draw."""
    toks = unglue(tokenize(latex))    # '\\left(' -> '\\left', '(': the rewrites walk TeX's grammar
    if not toks:
        raise RenderError('empty formula')
    for t in toks:
        if t in _UNSUPPORTED:
            raise RenderError(f'mathtext cannot render {_UNSUPPORTED[t]}; use renderer=\'latex\' '
                              '(needs a TeX installation)')
    try:
        return _join(_groups(_rewrite(toks), font))
    except ValueError as e:
        raise RenderError(f'malformed LaTeX: {e}') from None


@functools.lru_cache(maxsize=None)
def _parser():
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib.mathtext import MathTextParser
    return MathTextParser('agg')


@functools.lru_cache(maxsize=None)
def _box_parser():
    from matplotlib import _mathtext
    return _mathtext.Parser()


def _raster_on_integer_baseline(src, fontsize, dpi, font):
    """mathtext's rasterizer (matplotlib 3.x _mathtext.Output.to_raster) with one change: the box is
    shifted so that its baseline lies on a whole pixel row. mathtext truncates glyph positions to whole
    pixels after shifting the box by its (fractional) top, so the same sub-formula can land 1 px apart in
    two renders that differ elsewhere (e.g. a superscript further right); on an integer baseline equal
    sub-formulas get equal pixels (image_metrics relies on it). Uses matplotlib's private _mathtext module
    (not cached, unlike the public parser); the caller falls back to the public parser if it changes.
    -> (ink uint8 (H, W), 255 = ink; baseline row)."""
    import matplotlib as mpl
    from matplotlib import _mathtext
    from matplotlib.backends import backend_agg
    from matplotlib.font_manager import FontProperties
    from matplotlib.mathtext import MathTextParser
    prop = FontProperties(size=fontsize, math_fontfamily=font)
    fontset = MathTextParser._font_type_mapping[font](prop, backend_agg.get_hinting_flag())
    box = _box_parser().parse(f'${src}$', fontset, prop.get_size_in_points(), dpi)
    out = _mathtext.ship(box)
    xmin = min([ox + g.metrics.xmin for ox, oy, g in out.glyphs] + [x for x, y, w, h in out.rects] + [0]) - 1
    ymin = min([oy - g.metrics.ymax for ox, oy, g in out.glyphs] + [y for x, y, w, h in out.rects] + [0]) - 1
    xmax = max([ox + g.metrics.xmax for ox, oy, g in out.glyphs] + [x + w for x, y, w, h in out.rects] + [0]) + 1
    ymax = max([oy - g.metrics.ymin for ox, oy, g in out.glyphs] + [y + h for x, y, w, h in out.rects] + [0]) + 1
    dx = math.ceil(-xmin)
    baseline = math.ceil(box.height - ymin)   # row of the baseline after the shift (an integer)
    dy = baseline - box.height
    image = np.zeros((math.ceil(ymax + dy) + 1, math.ceil(xmax + dx) + 1), np.uint8)  # (H, W)
    shifted = _mathtext.ship(box, (dx, dy))
    antialiased = mpl.rcParams['text.antialiased']
    for ox, oy, g in shifted.glyphs:
        g.font.draw_glyph_to_bitmap(image, int(ox), int(oy - g.metrics.iceberg), g.glyph, antialiased=antialiased)
    for x, y, bw, bh in shifted.rects:  # rules (fraction bars, roots, overlines) as in to_raster
        height = max(int(bh) - 1, 0)
        y = int(y + bh / 2 - (height + 1) / 2) if height == 0 else int(y)
        image[y:y + height + 1, math.floor(x):math.ceil(x + bw) + 1] = 0xff
    return image, baseline


class _GlyphWarnings(logging.Handler):
    """Collects mathtext's 'Font ... does not have a glyph ..., substituting with a dummy symbol' warnings
    (the image would show a box instead of the symbol) without printing them."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.logger = logging.getLogger('matplotlib.mathtext')
        self.propagate = self.logger.propagate
        self.logger.addHandler(self)
        self.logger.propagate = False
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.propagate = self.propagate


def _render_mathtext(latex, fontsize, dpi, font):
    """-> (uint8 (H, W) white background, uncropped mathtext box; baseline row).
    RenderError also when a font lacks a glyph (mathtext would draw a dummy box)."""
    if font not in FONTS:
        raise ValueError(f'unknown font {font!r} (mathtext fontsets: {", ".join(FONTS)})')
    src = mathtext_source(latex, font)
    from matplotlib.font_manager import FontProperties
    with _GlyphWarnings() as warnings:
        try:
            try:
                ink, baseline = _raster_on_integer_baseline(src, fontsize, dpi, font)
            except (ImportError, AttributeError, TypeError):  # matplotlib's internals changed: public API
                r = _parser().parse(f'${src}$', dpi=dpi, prop=FontProperties(size=fontsize, math_fontfamily=font))
                ink, baseline = np.asarray(r.image, dtype=np.uint8), int(round(r.height - r.depth))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # pyparsing / mathtext errors
            msg = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise RenderError(f'mathtext cannot render this formula: {msg}') from None
    dummy = [m for m in warnings.messages if 'dummy' in m]
    if dummy:
        raise RenderError(f'mathtext ({font}) lacks a glyph: {dummy[0]}')
    if ink.size == 0 or not ink.any():
        raise RenderError('the formula renders to a blank image')
    return 255 - ink, baseline


# -----------------------------------------------------------------------------
# real TeX (optional): pdflatex + the preview package, many formulas per call, one page each

# Debian / Ubuntu packages that give everything renderer='latex' uses (pdflatex, amsmath, amssymb,
# graphicx, preview, pdftoppm); .ci/run installs the same list
LATEX_PACKAGES = ('texlive-latex-base', 'texlive-latex-recommended', 'texlive-fonts-recommended',
                  'preview-latex-style', 'poppler-utils')
LATEX_INSTALL_HINT = ("renderer='latex' needs `pdflatex` (with the amsmath, amssymb and preview packages) and "
                      '`pdftoppm` on PATH; install them, e.g. `apt-get install ' + ' '.join(LATEX_PACKAGES)
                      + "`, or use renderer='mathtext' (the default)")
LATEX_CHUNK = 32          # formulas per pdflatex call
LATEX_DPI = 100           # pdftoppm resolution; each formula is scaled inside TeX to its fontsize * dpi
LATEX_TIMEOUT = (20, 1)   # seconds a pdflatex call may take: base + per formula
# commands that reach outside the formula (files, macros, pages, catcodes): refused before TeX runs
_TEX_FORBIDDEN = {r'\def', r'\gdef', r'\edef', r'\xdef', r'\let', r'\newcommand', r'\renewcommand',
                  r'\providecommand', r'\input', r'\include', r'\write', r'\immediate', r'\openout', r'\openin',
                  r'\read', r'\catcode', r'\csname', r'\special', r'\end{document}', r'\begin{document}',
                  r'\end{preview}', r'\begin{preview}', r'\newpage', r'\clearpage', r'\pagebreak', r'\output',
                  r'\usepackage', r'\documentclass', r'\loop', r'\expandafter', r'\pdfprimitive', r'\directlua',
                  '$', '#', '%'}
_TEX_HEAD = (r'\documentclass[12pt]{article}' '\n'
             r'\usepackage{amsmath,amssymb,graphicx}' '\n'
             r'\usepackage[active,tightpage]{preview}' '\n'
             r'\setlength{\PreviewBorder}{0pt}\pagestyle{empty}\newsavebox{\imbox}' '\n'
             r'\begin{document}' '\n')
# one formula per line, then a blank line (a runaway argument stops there, on the formula's own lines)
_TEX_ITEM = (r'\begin{preview}\sbox{\imbox}{\scalebox{%.5f}{$\displaystyle %s$}}'
             r'\typeout{IMBOX \the\ht\imbox\space\the\dp\imbox}\usebox{\imbox}\end{preview}' '\n\n')
_TEX_BOX = re.compile(r'^IMBOX (-?[\d.]+)pt (-?[\d.]+)pt', re.M)


def latex_tools():
    """(pdflatex, pdftoppm) paths when both are on PATH, else None."""
    tex, conv = shutil.which('pdflatex'), shutil.which('pdftoppm')
    return (tex, conv) if tex and conv else None


def _opener(t):
    """'{', '\\begin{x}' or '\\left<delim>' -> what closes it ('}', '\\end{x}', '\\right'); else None."""
    if t == '{':
        return '}'
    if t.startswith('\\begin{'):
        return '\\end{' + t[7:]
    if t.startswith('\\left') and len(t) > 5 and not t[5].isalpha():
        return '\\right'
    return None


def _is_closer(t):
    return t == '}' or t.startswith('\\end{') or (t.startswith('\\right') and len(t) > 6 and not t[6].isalpha())


def tex_check(tokens):
    """Why a token list cannot go to TeX as it is (unbalanced groups, \\left without \\right, \\begin{x}
    closed by \\end{y}, a command that reaches outside the formula), or None. Catches most malformed
    predictions without starting TeX."""
    stack = []
    for t in tokens:
        if t in _TEX_FORBIDDEN:
            return f'{t} is not allowed in a formula'
        if _opener(t):
            stack.append(t)
        elif _is_closer(t):
            want = t if t == '}' or t.startswith('\\end{') else '\\right'
            if not stack or _opener(stack[-1]) != want:
                return f'unbalanced: {t} without its opener'
            stack.pop()
    return f'unbalanced: {stack[-1]} is never closed' if stack else None


def _tex_run(tmp, items, tools):
    """One pdflatex + pdftoppm run over items [(LaTeX, scale)]. -> ('ok', [(page uint8, baseline row)]) or
    ('error', index of the failing formula or None when unknown, message)."""
    tex, conv = tools
    body = ''.join(_TEX_ITEM % (scale, src) for src, scale in items)
    first = _TEX_HEAD.count('\n') + 1                       # line of the first formula
    with open(os.path.join(tmp, 'f.tex'), 'w', encoding='utf-8') as f:
        f.write(_TEX_HEAD + body + '\\end{document}\n')
    for old in os.listdir(tmp):
        if old.endswith('.png') or old == 'f.pdf':
            os.remove(os.path.join(tmp, old))
    timeout = LATEX_TIMEOUT[0] + LATEX_TIMEOUT[1] * len(items)
    p = subprocess.run([tex, '-interaction=nonstopmode', '-halt-on-error', '-no-shell-escape', 'f.tex'], cwd=tmp,
                       capture_output=True, text=True, errors='replace', timeout=timeout)
    with open(os.path.join(tmp, 'f.log'), encoding='utf-8', errors='replace') as f:
        log = f.read()
    if p.returncode != 0:
        err = re.search(r'^(! .*)$', log, re.M)
        line = re.search(r'^l\.(\d+)', log[err.start():] if err else log, re.M)
        k = (int(line.group(1)) - first) // 2 if line else -1
        return 'error', (k if 0 <= k < len(items) else None), (err.group(1) if err else 'pdflatex failed')
    q = subprocess.run([conv, '-r', str(LATEX_DPI), '-gray', '-png', 'f.pdf', 'p'], cwd=tmp, capture_output=True,
                       text=True, errors='replace', timeout=timeout)
    pages = sorted(f for f in os.listdir(tmp) if f.startswith('p-') and f.endswith('.png'))
    boxes = _TEX_BOX.findall(log)
    if q.returncode != 0 or len(pages) != len(items) or len(boxes) != len(items):
        return 'error', None, f'{len(pages)} pages for {len(items)} formulas ({(q.stderr or "").strip()[-200:]})'
    out = []
    for name, (ht, _) in zip(pages, boxes):
        with Image.open(os.path.join(tmp, name)) as im:
            out.append((np.asarray(im.convert('L'), dtype=np.uint8).copy(), round(float(ht) * LATEX_DPI / 72.27)))
    return 'ok', out


def _tex_batch(tmp, items, tools):
    """Render items [(LaTeX, scale)] -> a list, per item, of (page, baseline) or RenderError. A formula that
    stops pdflatex is found from the error's line (else by halving the batch), reported and left out; the
    others are rendered again without it."""
    results, todo = [None] * len(items), list(range(len(items)))
    while todo:
        try:
            r = _tex_run(tmp, [items[i] for i in todo], tools)
        except subprocess.TimeoutExpired as e:
            r = 'error', None, f'{os.path.basename(e.cmd[0])} took more than {e.timeout:.0f} s'
        if r[0] == 'ok':
            for i, page in zip(todo, r[1]):
                results[i] = page
            break
        _, k, msg = r
        if k is not None:
            results[todo.pop(k)] = RenderError(f'latex failed: {msg}')
        elif len(todo) == 1:
            results[todo.pop()] = RenderError(f'latex failed: {msg}')
        else:                        # unknown culprit: each half on its own
            half = len(todo) // 2
            for part in (todo[:half], todo[half:]):
                for i, res in zip(part, _tex_batch(tmp, [items[i] for i in part], tools)):
                    results[i] = res
            break
    return results


def _render_tex_many(jobs):
    """jobs [(LaTeX, fontsize, dpi)] -> per job (uint8 page, white background; baseline row) or RenderError,
    LATEX_CHUNK formulas per pdflatex call (12pt article, amsmath + amssymb, \\displaystyle)."""
    tools = latex_tools()
    if tools is None:
        raise RenderError(LATEX_INSTALL_HINT)
    results, items, where = [None] * len(jobs), [], []
    for i, (latex, fontsize, dpi) in enumerate(jobs):
        toks = tokenize(latex)
        why = 'empty formula' if not toks else tex_check(toks)
        if why:
            results[i] = RenderError(why)
        else:        # the document is 12pt at LATEX_DPI: scale the formula instead of the font
            items.append((detokenize(toks), fontsize / 12.0 * dpi / LATEX_DPI))
            where.append(i)
    with tempfile.TemporaryDirectory(prefix='render_') as tmp:
        for c in range(0, len(items), LATEX_CHUNK):
            for i, res in zip(where[c:c + LATEX_CHUNK], _tex_batch(tmp, items[c:c + LATEX_CHUNK], tools)):
                results[i] = res
    for i, res in enumerate(results):
        if not isinstance(res, RenderError) and (res[0].size == 0 or (res[0] == 255).all()):
            results[i] = RenderError('the formula renders to a blank image')
    return results


# -----------------------------------------------------------------------------
# public rendering API

def resolve_renderer(renderer):
    """The one place the renderer is chosen (render.py, test.py --render_eval): 'auto' -> 'latex' when
    pdflatex and pdftoppm are installed, else 'mathtext'; a named one is checked (check_renderer)."""
    if renderer == 'auto':
        return 'latex' if latex_tools() is not None else 'mathtext'
    check_renderer(renderer)
    return renderer


def check_renderer(renderer):
    """ValueError for an unknown renderer; RenderError (saying what to install) for 'latex' without TeX."""
    if renderer not in RENDERERS:
        raise ValueError(f'unknown renderer {renderer!r} (expected one of {", ".join(RENDERERS)})')
    if renderer == 'latex' and latex_tools() is None:
        raise RenderError(LATEX_INSTALL_HINT)


def render_boxes(jobs, renderer='mathtext'):
    """Many formulas at once. jobs: [(LaTeX or tokens, fontsize, dpi, font)] -> per job (uint8 (H, W) white
    background, not cropped; baseline row or None) or a RenderError instance (why it failed). With 'latex'
    LATEX_CHUNK formulas share one pdflatex call; a formula that fails is reported, the others are kept."""
    jobs = [(detokenize(j[0]) if isinstance(j[0], (list, tuple)) else j[0],) + tuple(j[1:]) for j in jobs]
    if renderer == 'latex':
        return _render_tex_many([(latex, fontsize, dpi) for latex, fontsize, dpi, _ in jobs])
    if renderer != 'mathtext':
        raise ValueError(f'unknown renderer {renderer!r} (expected one of {", ".join(RENDERERS)})')
    out = []
    for latex, fontsize, dpi, font in jobs:
        try:
            out.append(_render_mathtext(latex, fontsize, dpi, font))
        except RenderError as e:
            out.append(e)
    return out


def render_box(latex, fontsize=FONTSIZE, dpi=DPI, font='cm', renderer='mathtext'):
    """-> (uint8 (H, W) white background, not cropped; baseline row or None). RenderError if it fails."""
    res = render_boxes([(latex, fontsize, dpi, font)], renderer)[0]
    if isinstance(res, RenderError):
        raise res
    return res


def render_latex(latex, fontsize=FONTSIZE, dpi=DPI, font='cm', renderer='mathtext', pad=PAD):
    """Render LaTeX (raw or space-tokenized; a token list works too) to a uint8 (H, W) image, dark ink
    on white (255), cropped to the ink with `pad` px of white around it.
    font: a mathtext fontset (FONTS); ignored by renderer='latex' (Computer Modern).
    Raises RenderError when the renderer cannot draw the formula (the message says why)."""
    img, _ = render_box(latex, fontsize, dpi, font, renderer)
    out = crop_to_ink(img, pad)           # any non-white pixel is ink
    if out is None:
        raise RenderError('the formula renders to a blank image')
    return out


def sample_rng(seed, domain, split, index, attempt=0):
    """The random stream of one sample: depends only on (seed, domain, split, index, attempt), never on
    the order or the process that draws it (random.Random seeds a str through SHA-512)."""
    return random.Random(f'im2latex-demo/{seed}/{domain}/{split}/{index}/{attempt}')


def make_sample(domain, seed, split, index, attempt=0, renderer='mathtext'):
    """One demo sample: {'label': tokenized LaTeX, 'font', 'fontsize', 'dpi', 'margin': (top, bottom,
    left, right) or None}. Deterministic. With renderer='latex' the generators also write environments
    (matrices, cases, aligned equations), which mathtext cannot draw."""
    rng = sample_rng(seed, domain, split, index, attempt)
    label = formulas.generate(domain, rng, environments=renderer == 'latex')
    if domain == 'openai':
        font = formulas.choice_weighted(rng, list(OPENAI_FONTS))
        fontsize = round(rng.uniform(*OPENAI_FONTSIZE), 2)
        dpi = rng.randint(*OPENAI_DPI)
        margin = None
    else:
        font = rng.choice(FONTS)
        fontsize = round(rng.uniform(*ADAPT_FONTSIZE), 2)
        dpi = rng.randint(*ADAPT_DPI)
        margin = tuple(rng.randint(*ADAPT_MARGIN) for _ in range(4))
    return {'label': label, 'font': font, 'fontsize': fontsize, 'dpi': dpi, 'margin': margin}


# -----------------------------------------------------------------------------
# demo data sets

def _buckets():
    import proc
    return proc.DENG_BUCKETS_WH, proc.DENG_PAD


def _fit_scale(h, w, buckets_wh, pad):
    """Scale (<= 1) so that an h x w crop fits a Deng bucket other than the huge 1600x1600 one
    (a 150-token line would otherwise be padded to an 800x800 image after the downsample)."""
    largest = max(buckets_wh, key=lambda b: b[0] * b[1])
    best = 0.0
    for bw, bh in buckets_wh:
        if (bw, bh) != largest:
            best = max(best, min(1.0, (bw - 2 * pad) / w, (bh - 2 * pad) / h))
    return best


def _render_cropped(labels, kws, renderer):
    """Render labels (kws: fontsize, dpi, font per label) in one render_boxes call -> per label the image
    cropped to the ink (no margin) or a RenderError."""
    boxes = render_boxes([(lab, kw['fontsize'], kw['dpi'], kw['font']) for lab, kw in zip(labels, kws)], renderer)
    out = []
    for b in boxes:
        img = b if isinstance(b, RenderError) else crop_to_ink(b[0], 0)
        out.append(RenderError('the formula renders to a blank image') if img is None else img)
    return out


def _render_chunk(tasks):
    """Worker: render a chunk of samples (one pdflatex call with renderer='latex') and write their PNGs.
    -> per task (slot, label, (H, W)) or (slot, None, error)."""
    renderer = tasks[0][5]
    kws = [dict(fontsize=t[3]['fontsize'], dpi=t[3]['dpi'], font=t[3]['font']) for t in tasks]
    imgs = _render_cropped([t[3]['label'] for t in tasks], kws, renderer)
    buckets, pad = _buckets()
    for _ in range(3):  # openai pages too big for the normal buckets: render smaller (deterministic)
        redo = [k for k, (t, img) in enumerate(zip(tasks, imgs)) if t[1] == 'openai'
                and not isinstance(img, RenderError) and _fit_scale(*img.shape, buckets, pad) < 1.0]
        for k in redo:
            kws[k]['dpi'] = kws[k]['dpi'] * _fit_scale(*imgs[k].shape, buckets, pad) * 0.97
        if not redo:
            break
        for k, img in zip(redo, _render_cropped([tasks[k][3]['label'] for k in redo], [kws[k] for k in redo],
                                                renderer)):
            imgs[k] = img
    return [_finish_sample(t, img, kw['dpi']) for t, img, kw in zip(tasks, imgs, kws)]


def _finish_sample(task, img, dpi):
    """Deng-process (openai) or pad (math, chemistry) one render and write its PNG."""
    slot, domain, key, sample, path, renderer = task
    if isinstance(img, RenderError):
        return slot, None, str(img)
    if domain == 'openai':
        import proc
        img = proc.deng_process(img)
        if img is None:
            return slot, None, 'blank after processing'
    else:
        top, bottom, left, right = sample['margin']
        img = np.pad(img, ((top, bottom), (left, right)), constant_values=255)
    meta = {'latex': sample['label'], 'key': key, 'font': sample['font'] if renderer == 'mathtext' else 'tex-cm',
            'fontsize': sample['fontsize'], 'dpi': round(dpi, 2), 'renderer': renderer, 'Software': 'render.py'}
    save_png(img, path, meta)
    return slot, sample['label'], img.shape


def _existing(path, key, renderer):
    """Label and (H, W) of an image written earlier for this sample key and renderer, else None."""
    try:
        with Image.open(path) as im:
            if im.info.get('key') == key and im.info.get('renderer', 'mathtext') == renderer and im.info.get('latex'):
                return im.info['latex'], (im.size[1], im.size[0])
    except (OSError, ValueError, SyntaxError):
        return None
    return None


def demo_sizes(n=None):
    """(train, val, test) per domain: DEMO_SIZES, or n training formulas and round(EVAL_FRACTION * n)
    for val and test."""
    if n is None:
        return dict(DEMO_SIZES)
    n = int(n)
    if n < 1:
        raise ValueError(f'--n must be >= 1, got {n}')
    k = max(1, round(EVAL_FRACTION * n))
    return {d: (n, k, k) for d in DOMAINS}


def _raw_dir(root_dir, domain):
    if domain == 'openai':
        return os.path.join(root_dir, 'images')
    return os.path.join(root_dir, 'adaptation_data', f'{domain}_images')


def _render_split(pool, nw, root_dir, domain, split, count, offset, seed, renderer, forbidden, quiet, stats):
    """Render one split; a formula that fails to render is replaced by its next candidate (attempt + 1),
    val/test candidates equal to a train formula are skipped. -> list of (name, label, (H, W))."""
    out_dir = _raw_dir(root_dir, domain)
    attempt = [0] * count
    done = {}
    pending = list(range(count))
    for round_ in range(MAX_ATTEMPTS):
        tasks = []
        for i in pending:
            name = f'{domain}_{offset + i:06d}.png'
            path = os.path.join(out_dir, name)
            key = f'{seed}/{domain}/{split}/{i}'
            if round_ == 0:
                old = _existing(path, key, renderer)
                if old is not None and old[0] not in forbidden:
                    done[i] = (name, old[0], old[1])
                    stats['reused'] += 1
                    continue
            while attempt[i] < MAX_CANDIDATES:
                sample = make_sample(domain, seed, split, i, attempt[i], renderer)
                if sample['label'] not in forbidden:
                    break
                attempt[i] += 1
                stats['duplicates_skipped'] += 1
            else:
                continue
            tasks.append((i, domain, key, sample, path, renderer))
        pending = []
        t0 = time.time()
        size = 1 if renderer == 'mathtext' else max(1, min(LATEX_CHUNK, -(-len(tasks) // nw)))
        chunks = [tasks[c:c + size] for c in range(0, len(tasks), size)]
        done_chunks = imap_progress(pool, nw, _render_chunk, chunks, f'{domain}/{split}', quiet)
        for i, label, res in (r for chunk in done_chunks for r in chunk):
            if label is None:
                stats['failures'] += 1
                stats['errors'][res] += 1
                attempt[i] += 1
                if attempt[i] < MAX_CANDIDATES:
                    pending.append(i)
            else:
                done[i] = (f'{domain}_{offset + i:06d}.png', label, res)
                stats['rendered'] += 1
        stats['render_seconds'] += time.time() - t0
        if not pending:
            break
    stats['dropped'] += count - len(done)
    return [done[i] for i in sorted(done)]


def _write_domain(pool, nw, root_dir, domain, sizes, seed, renderer, workers, quiet):
    """Render the splits of one domain, write its label files (and, for math and chemistry, the k-means
    resized copies). -> the domain's entry of write_demo's result."""
    import proc
    stats = {'rendered': 0, 'reused': 0, 'failures': 0, 'dropped': 0, 'duplicates_skipped': 0,
             'errors': Counter(), 'render_seconds': 0.0}
    t0 = time.time()
    forbidden, offset, counts, shapes = set(), 0, {}, []
    for split, count in zip(SPLITS, sizes):
        rows = _render_split(pool, nw, root_dir, domain, split, count, offset, seed, renderer,
                             forbidden, quiet, stats)
        offset += count
        if split != 'test':  # val avoids train formulas; test avoids train and val formulas
            forbidden |= {label for _, label, _ in rows}
        write_text(label_path(root_dir, domain, split), ''.join(f'{name}\t{label}\n' for name, label, _ in rows))
        counts[split] = len(rows)
        shapes += [tuple(s) for _, _, s in rows]
    info = dict(stats, counts=counts, errors=dict(stats['errors']))
    # images of an earlier run with other --n/--seed are kept, but are in no label file
    names = {f'{domain}_{k:06d}.png' for k in range(offset)}
    raw = _raw_dir(root_dir, domain)
    info['stale'] = sum(1 for f in os.listdir(raw) if re.fullmatch(rf'{domain}_\d{{6}}\.png', f)
                        and f not in names) if os.path.isdir(raw) else 0
    if domain == 'openai':
        info['distinct_sizes'] = len(set(shapes))
    else:
        km = proc.kmeans_for_img_size(raw, caching=True, resize=True, workers=workers)
        info['distinct_sizes_raw'] = len(set(shapes))
        info['distinct_sizes'] = km['distinct']
        info['aspect_mean'], info['aspect_max'] = km['aspect_mean'], km['aspect_max']
    info['seconds'] = time.time() - t0
    info['images_per_s'] = stats['rendered'] / stats['render_seconds'] if stats['render_seconds'] > 0 else None
    return info


def write_demo(root_dir, n=None, seed=0, workers=None, renderer='mathtext', domains=DOMAINS, quiet=False,
               sizes=None):
    """Write the demo data sets into root_dir, in the data layout of README.md (docs/formats.md):
    openai: <root>/images/openai_NNNNNN.png (Deng-processed, ~20 bucket sizes) + <root>/labels/{split}.txt;
    math, chemistry: <root>/adaptation_data/<domain>_images/ (continuous sizes), then
    proc.kmeans_for_img_size -> <domain>_images_resized/ (<= 32 sizes), + <domain>_labels/{split}.txt.
    n: training formulas per domain (val/test: 10% of n each); None = DEMO_SIZES.
    sizes: {domain: (train, val, test)} instead of n (e.g. a tiny set for tests).
    workers: render processes (None: utils.n_workers' rule, every core this process may use).
    quiet: no progress bars.
    Deterministic for a seed, whatever `workers` is; existing images of the same sample are kept, so a
    re-run on a complete root only rewrites the label files. Every file is written atomically.
    Each PNG carries its label and render settings as text chunks ('latex', 'key', 'font', ...).
    Returns {'root_dir', 'seconds', 'domains': {domain: {'counts': {split: n}, 'rendered', 'reused',
    'failures', 'dropped', 'duplicates_skipped', 'errors': {message: count}, 'distinct_sizes',
    'images_per_s', ...}}}."""
    t_start = time.time()
    root_dir = os.fspath(root_dir)
    renderer = resolve_renderer(renderer)
    domains = list(domains)
    bad = [d for d in domains if d not in DOMAINS]
    if bad:
        raise ValueError(f'unknown domain(s) {bad} (expected some of {", ".join(DOMAINS)})')
    sizes = demo_sizes(n) if sizes is None else {d: tuple(int(k) for k in sizes[d]) for d in domains}
    nw = n_workers(workers)
    total = sum(sum(sizes[d]) for d in domains)
    result = {'root_dir': root_dir, 'domains': {}}
    with process_pool(nw, use=total >= MIN_TASKS_PER_WORKER * nw) as pool:
        for domain in domains:
            result['domains'][domain] = _write_domain(pool, nw, root_dir, domain, sizes[domain], seed, renderer,
                                                      workers, quiet)
    result['seconds'] = time.time() - t_start
    return result


# -----------------------------------------------------------------------------
# command line

def _print_summary(res):
    print(f'demo data in {res["root_dir"]} ({res["seconds"]:.1f} s)')
    for d, info in res['domains'].items():
        c = info['counts']
        speed = f'{info["images_per_s"]:.1f} images/s' if info['images_per_s'] else 'nothing to render'
        extra = ''
        if d != 'openai':
            extra = (f' (raw {info["distinct_sizes_raw"]}; aspect change mean {info["aspect_mean"]:.3f}, '
                     f'max {info["aspect_max"]:.3f})')
        print(f'  {d:10s} train {c["train"]} / val {c["val"]} / test {c["test"]}; rendered {info["rendered"]}, '
              f'reused {info["reused"]}; {speed}; {info["distinct_sizes"]} distinct sizes{extra}; '
              f'render failures {info["failures"]} (replaced; dropped {info["dropped"]})')
        for msg, k in sorted(info['errors'].items(), key=lambda x: -x[1])[:3]:
            print(f'      {k} x {msg}')
        if info['stale']:
            print(f'      note: {info["stale"]} {d} images of an earlier run (other --n) are in no label file; '
                  'they were kept' + ('' if d == 'openai' else ' and are clustered by proc.py too'))


def main(argv=None):
    ap = argparse.ArgumentParser(description='Render the demo data sets (openai, math, chemistry) into --root_dir '
                                 '(data layout: README.md, docs/formats.md), or one formula to a PNG with '
                                 '--latex/--out.')
    ap.add_argument('--root_dir', default=DEFAULT_ROOT, help=f'output root (default {DEFAULT_ROOT})')
    ap.add_argument('--n', type=int, default=None,
                    help='training formulas per domain; val and test get 10%% of it each (default: '
                    + ', '.join(f'{d} {s[0]}/{s[1]}/{s[2]}' for d, s in DEMO_SIZES.items()) + ')')
    ap.add_argument('--seed', type=int, default=0,
                    help='seed of the formula generators and render settings (default 0)')
    ap.add_argument('--workers', type=int, default=None,
                    help='render processes (default: every CPU core this process may use)')
    ap.add_argument('--renderer', choices=RENDERERS + ('auto',), default='mathtext',
                    help='mathtext (matplotlib, no TeX needed; default, so the demo is the same on every machine), '
                         'latex (pdflatex + pdftoppm, Debian packages: ' + ' '.join(LATEX_PACKAGES) + '; the demo '
                         'then also holds environments: matrices, cases, aligned equations) or auto (latex when '
                         'installed, else mathtext)')
    ap.add_argument('--domains', nargs='+', choices=DOMAINS, default=list(DOMAINS),
                    help='which demo sets to write (default: all three)')
    ap.add_argument('--latex', default=None, help='render this one formula to --out instead of writing the demo')
    ap.add_argument('--out', default=None, help='PNG path for --latex')
    ap.add_argument('--font', choices=FONTS, default='cm', help='mathtext fontset for --latex (default cm)')
    ap.add_argument('--fontsize', type=float, default=FONTSIZE,
                    help=f'font size in pt for --latex (default {FONTSIZE})')
    ap.add_argument('--dpi', type=float, default=DPI, help=f'resolution for --latex (default {DPI})')
    args = ap.parse_args(argv)
    if args.latex is not None:
        if not args.out:
            ap.error('--latex needs --out PATH.png')
        try:
            img = render_latex(args.latex, fontsize=args.fontsize, dpi=args.dpi, font=args.font,
                               renderer=resolve_renderer(args.renderer))
        except RenderError as e:
            print(f'cannot render: {e}', file=sys.stderr)
            return 1
        save_png(img, args.out)
        print(f'{args.out}: {img.shape[0]}x{img.shape[1]} (H x W)')
        return 0
    try:
        res = write_demo(args.root_dir, n=args.n, seed=args.seed, workers=args.workers, renderer=args.renderer,
                         domains=args.domains)
    except (RenderError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    _print_summary(res)
    return 0


if __name__ == '__main__':
    sys.exit(main())
