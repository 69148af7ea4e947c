"""LaTeX -> image rendering, the built-in demo data sets, and render-based image metrics.

1. render_latex: a formula -> uint8 (H, W) image, dark ink on white, cropped to the ink with a small
   margin. Default renderer: matplotlib's mathtext (no TeX installation needed). mathtext covers most
   of what im2latex formulas use; what it lacks is rewritten to the same or a close visual first
   (`mathtext_source`, table below), and what it cannot draw at all (environments such as
   \\begin{array}, line breaks, mhchem) raises RenderError naming the token. renderer='latex' uses a
   real TeX (latex + dvipng, or pdflatex + pdftoppm) when installed.
2. write_demo: the demo data sets of DESIGN.md, rendered from three formula generators
   (openai = im2latex-100k style, math = school math, chemistry = reaction equations):
   openai images are processed like im2latex-100k (proc.deng_process: crop, pad 8, bucket, x2
   downsample), math/chemistry images keep continuous sizes and are then clustered into 32 sizes by
   proc.kmeans_for_img_size. Deterministic for a seed, whatever the number of workers.
3. compare_images / image_metrics: the image evaluation of Deng et al., "Image-to-Markup Generation
   with Coarse-to-Fine Attention", ICML 2017 (im2markup scripts/evaluation/evaluate_image.py): render
   gold and prediction the same way, binarize, drop blank columns, compare the column sequences
   (exact match and column edit distance).

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
import multiprocessing
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
from PIL import Image, PngImagePlugin
from tqdm import tqdm

from data import DEFAULT_ROOT, DOMAINS, SPLITS, atomic_write, detokenize, label_path, tokenize

# -----------------------------------------------------------------------------
# defaults

FONTS = ('cm', 'stix', 'stixsans', 'dejavuserif', 'dejavusans')  # mathtext fontsets
FONTSIZE = 12          # pt
DPI = 100              # at 12 pt and 100 dpi 1 em = 16.7 px, about the scale of im2latex-100k's processed images
PAD = 4                # white margin (px) around the cropped ink of render_latex
RENDERERS = ('mathtext', 'latex')
# Default demo sizes (train, val, test) per domain. Measured CPU cost per image (mathtext, matplotlib 3.11):
# openai ~45 ms (long formulas, page-size renders + Deng processing), chemistry ~25 ms, math ~8 ms, so
# the default demo (3000 images, ~105-120 CPU-s) renders in about a minute on 2 idle cores (~3 min on a
# 2-core machine shared with 3-4 other busy processes), leaving the README quick start (render + a short
# CPU training run) within ~10 minutes. `--n` scales it for real runs.
DEMO_SIZES = {'openai': (1500, 150, 150), 'math': (500, 50, 50), 'chemistry': (500, 50, 50)}
EVAL_FRACTION = 0.1    # with --n N: val and test get round(0.1 * N) formulas each
MAX_TOKENS = 150       # openai formulas longer than this are redrawn (Deng's filter)
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
BINARIZE = 128                   # Deng's evaluate_image.py: a pixel <= 128 is ink


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
    toks = tokenize(latex)
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
# real TeX (optional)

LATEX_INSTALL_HINT = ("renderer='latex' needs `latex` and `dvipng` (or `pdflatex` and `pdftoppm`) on PATH; "
                      'install them, e.g. `apt-get install texlive-latex-base texlive-latex-recommended '
                      'texlive-fonts-recommended dvipng`, or use renderer=\'mathtext\' (the default)')
_LATEX_DOC = (r'\documentclass[12pt]{article}\usepackage{amsmath,amssymb}\pagestyle{empty}'
              r'\setlength{\textwidth}{55cm}\pdfpagewidth=60cm\pdfpageheight=20cm'  # no clipping of long lines
              r'\begin{document}\noindent$\displaystyle %s$\end{document}')


def latex_tools():
    """The TeX toolchain found on PATH: ('dvipng', latex, dvipng), ('pdftoppm', pdflatex, pdftoppm) or None."""
    if shutil.which('latex') and shutil.which('dvipng'):
        return 'dvipng', shutil.which('latex'), shutil.which('dvipng')
    if shutil.which('pdflatex') and shutil.which('pdftoppm'):
        return 'pdftoppm', shutil.which('pdflatex'), shutil.which('pdftoppm')
    return None


def _render_tex(latex, fontsize, dpi):
    try:
        return _render_tex_run(latex, fontsize, dpi)
    except subprocess.TimeoutExpired as e:
        raise RenderError(f'{os.path.basename(e.cmd[0])} took more than {e.timeout} s') from None


def _render_tex_run(latex, fontsize, dpi):
    """Real LaTeX (12pt article, amsmath + amssymb, \\displaystyle). -> (uint8 page cropped to the
    formula, white background; baseline row or None)."""
    tools = latex_tools()
    if tools is None:
        raise RenderError(LATEX_INSTALL_HINT)
    if not tokenize(latex):
        raise RenderError('empty formula')
    kind, tex, conv = tools
    dpi = dpi * fontsize / 12.0  # the document is 12pt; scale the resolution instead of the font
    with tempfile.TemporaryDirectory(prefix='render_') as tmp:
        with open(os.path.join(tmp, 'f.tex'), 'w', encoding='utf-8') as f:
            f.write(_LATEX_DOC % latex)
        p = subprocess.run([tex, '-interaction=nonstopmode', '-halt-on-error', 'f.tex'], cwd=tmp,
                           capture_output=True, text=True, errors='replace', timeout=60)
        if p.returncode != 0:
            err = [ln for ln in p.stdout.splitlines() if ln.startswith('!')]
            raise RenderError(f'latex failed: {err[0] if err else p.stdout.strip()[-200:]}')
        baseline = None
        if kind == 'dvipng':
            q = subprocess.run([conv, '-D', str(int(round(dpi))), '-T', 'tight', '-bg', 'rgb 1.0 1.0 1.0',
                                '-fg', 'rgb 0.0 0.0 0.0',
                                '--depth', '-o', 'f.png', 'f.dvi'], cwd=tmp, capture_output=True, text=True,
                               timeout=60)
            m = re.search(r'depth=(-?\d+)', q.stdout)
        else:
            q = subprocess.run([conv, '-r', str(int(round(dpi))), '-gray', '-png', '-singlefile', 'f.pdf', 'f'],
                               cwd=tmp, capture_output=True, text=True, timeout=60)
            m = None
        out = os.path.join(tmp, 'f.png')
        if q.returncode != 0 or not os.path.exists(out):
            raise RenderError(f'{conv} failed: {(q.stderr or q.stdout).strip()[-200:]}')
        with Image.open(out) as im:
            page = np.asarray(im.convert('L'), dtype=np.uint8).copy()
    if m:
        baseline = page.shape[0] - int(m.group(1))
    return page, baseline


# -----------------------------------------------------------------------------
# public rendering API

def _render_box(latex, fontsize=FONTSIZE, dpi=DPI, font='cm', renderer='mathtext'):
    """-> (uint8 (H, W) white background, not cropped; baseline row or None)."""
    if isinstance(latex, (list, tuple)):
        latex = detokenize(latex)
    if renderer == 'mathtext':
        return _render_mathtext(latex, fontsize, dpi, font)
    if renderer == 'latex':
        return _render_tex(latex, fontsize, dpi)
    raise ValueError(f'unknown renderer {renderer!r} (expected one of {", ".join(RENDERERS)})')


def _crop(img, pad):
    """Crop a white-background uint8 image to its ink (any non-white pixel), keeping `pad` px of white."""
    ink = img < 255
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if rows.size == 0:
        raise RenderError('the formula renders to a blank image')
    crop = img[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    return np.pad(crop, pad, constant_values=255) if pad else crop.copy()


def render_latex(latex, fontsize=FONTSIZE, dpi=DPI, font='cm', renderer='mathtext', pad=PAD):
    """Render LaTeX (raw or space-tokenized; a token list works too) to a uint8 (H, W) image, dark ink
    on white (255), cropped to the ink with `pad` px of white around it.
    font: a mathtext fontset (FONTS); ignored by renderer='latex' (Computer Modern).
    Raises RenderError when the renderer cannot draw the formula (the message says why)."""
    img, _ = _render_box(latex, fontsize, dpi, font, renderer)
    return _crop(img, pad)


# -----------------------------------------------------------------------------
# formula generators. Each takes a random.Random and returns a list of tokens (strings that
# tokenize() splits back into themselves, or short raw LaTeX); labels are normalised afterwards.

LOWER = list('abcdefghijklmnopqrstuvwxyz')
UPPER = list('ABCDEFGHIJKLMNOPQRSTUVWXYZ')
GREEK = (r'\alpha \beta \gamma \delta \epsilon \varepsilon \zeta \eta \theta \vartheta \iota \kappa \lambda '
         r'\mu \nu \xi \pi \rho \varrho \sigma \tau \upsilon \phi \varphi \chi \psi \omega').split()
GREEK_UPPER = r'\Gamma \Delta \Theta \Lambda \Xi \Pi \Sigma \Upsilon \Phi \Psi \Omega'.split()
SYMBOLS = r'\infty \partial \nabla \hbar \ell \emptyset \aleph \Re \Im \wp'.split()
BINOPS = (['+'] * 8 + ['-'] * 6 + r'\pm \mp \times \cdot \otimes \oplus \wedge \cup \cap \circ / \ast \star '
          r'\vee \setminus \bullet \odot \ominus \cdot \times'.split())
RELATIONS = (['='] * 12 + r'\neq < > \leq \geq \le \ge \approx \equiv \sim \simeq \propto \to \rightarrow '
             r'\Rightarrow \Leftrightarrow \in \subset \subseteq \ll \gg \cong \mapsto \perp \parallel \longrightarrow '
             r'\neq \leq \approx \equiv \notin \supset \prec \succ \vdash \asymp'.split())
FUNCS = (r'\sin \cos \tan \cot \sec \csc \log \ln \exp \det \dim \ker \tanh \sinh \cosh \arctan \arcsin '
         r'\arg \deg \Pr').split()
ACCENTS = r'\hat \bar \vec \tilde \dot \ddot \check \breve \acute \grave \mathring'.split()
WIDE_ACCENTS = r'\widehat \widetilde \overline \underline \overrightarrow \overleftarrow'.split()
FONTS_NEW = [(r'\mathbf', LOWER + UPPER), (r'\mathcal', UPPER), (r'\mathrm', LOWER + UPPER),
             (r'\mathbb', list('RCNZQHEPF')), (r'\mathit', LOWER + UPPER), (r'\mathsf', UPPER),
             (r'\mathtt', LOWER), (r'\boldsymbol', None), (r'\mathfrak', list('gshuabAB'))]
FONTS_OLD = [(r'\rm', LOWER + UPPER), (r'\bf', LOWER + UPPER), (r'\cal', UPPER), (r'\it', LOWER), (r'\sf', UPPER),
             (r'\tt', LOWER)]
SPACES = r'\, \; \quad \qquad \: \! ~'.split()
DELIMS = [('(', ')'), ('(', ')'), ('(', ')'), ('[', ']'), (r'\{', r'\}'), ('|', '|'), (r'\langle', r'\rangle'),
          (r'\|', r'\|'), (r'\lfloor', r'\rfloor'), (r'\lceil', r'\rceil'), ('(', ']'), ('.', '|')]
WORDS = ['for', 'and', 'if', 'with', 'where', 'const', 'otherwise', 'Tr', 'tr', 'diag', 'sgn', 'rank', 'min',
         'max', 'eff', 'int', 'ext', 'tot', 'Re', 'Im', 'd', 'e', 'i']


def _choice_w(rng, pairs):
    """Weighted choice from [(item, weight), ...]."""
    r = rng.random() * sum(w for _, w in pairs)
    for item, w in pairs:
        r -= w
        if r < 0:
            return item
    return pairs[-1][0]


def _braced(x):
    return ['{'] + list(x) + ['}']


def _word(w):
    return list(w)


class OpenAIGenerator:
    """im2latex-100k style formulas (Deng's normalised form: every argument and script braced):
    sub/superscripts, nested fractions, roots, big operators with bounds, functions, \\left \\right
    groups, accents, Greek, old and new font commands, physics idioms; lengths from a few tokens
    to ~150."""

    def __init__(self, rng):
        self.rng = rng

    def letter(self):
        rng = self.rng
        r = rng.random()
        if r < 0.55:
            return [rng.choice(LOWER)]
        if r < 0.72:
            return [rng.choice(UPPER)]
        if r < 0.94:
            return [rng.choice(GREEK)]
        return [rng.choice(GREEK_UPPER)]

    def number(self):
        rng = self.rng
        r = rng.random()
        if r < 0.6:
            return list(str(rng.choice([1, 2, 2, 2, 3, 4, 0, 1, 5, 6, 8, 10, 12, 16, 32, 100])))
        if r < 0.85:
            return list(str(rng.randint(0, 999)))
        return list(str(rng.randint(0, 9))) + ['.'] + list(str(rng.randint(0, 99)))

    def small(self):
        """A short script / bound: i, n+1, 2, -1, \\mu\\nu, ..."""
        rng = self.rng
        r = rng.random()
        if r < 0.35:
            return [rng.choice(list('ijknmlpqrstxyzNTa'))]
        if r < 0.55:
            return [rng.choice(['0', '1', '2', '3', '4', 'n', 'N'])]
        if r < 0.65:
            return [rng.choice(GREEK[:20])] + ([rng.choice(GREEK[:20])] if rng.random() < 0.5 else [])
        if r < 0.75:
            return [rng.choice(list('nkijNm')), rng.choice(['+', '-']), rng.choice(['1', '2'])]
        if r < 0.82:
            return ['-', rng.choice(['1', '2', 'n', r'\alpha'])]
        if r < 0.88:
            return [rng.choice([r'\prime', r'\dagger', '*', r'\ast', 'T', r'\perp'])]
        if r < 0.94:
            return [rng.choice(list('ijkabc')), rng.choice(list('jklbcd'))]
        return self.atom(depth=3)

    def scripts(self, base, depth):
        rng = self.rng
        r = rng.random()
        if r < 0.25:
            return base + ['_'] + _braced(self.small())
        if r < 0.5:
            return base + ['^'] + _braced(self.small() if rng.random() < 0.7 else self.expr(depth + 2, 2))
        if r < 0.62:
            return base + ['_'] + _braced(self.small()) + ['^'] + _braced(self.small())
        if r < 0.66:
            return base + ['^'] + _braced(self.small()) + ['_'] + _braced(self.small())
        if r < 0.7:
            return base + ["'"] * rng.choice([1, 1, 2])
        return base

    def decorated(self):
        rng = self.rng
        r = rng.random()
        if r < 0.1:
            return [rng.choice(ACCENTS)] + _braced(self.letter())
        if r < 0.13:
            return [rng.choice(WIDE_ACCENTS)] + _braced(self.letter() + (self.letter() if rng.random() < 0.5 else []))
        if r < 0.2:
            cmd, pool = rng.choice(FONTS_NEW)
            arg = [rng.choice(pool)] if pool else [rng.choice(GREEK + LOWER)]
            return [cmd] + _braced(arg)
        if r < 0.24:
            cmd, pool = rng.choice(FONTS_OLD)
            return _braced([cmd] + [rng.choice(pool) for _ in range(rng.choice([1, 1, 2]))])
        if r < 0.28:
            return [rng.choice(SYMBOLS)]
        return self.letter()

    def atom(self, depth):
        return self.scripts(self.decorated(), depth) if self.rng.random() < 0.5 else self.decorated()

    def term(self, depth):
        rng = self.rng
        if depth >= 3:
            return self.atom(depth) if rng.random() < 0.8 else self.number()
        kind = _choice_w(rng, [('atom', 26), ('product', 12), ('number', 7), ('frac', 10), ('sqrt', 4),
                               ('bigop', 7), ('func', 6), ('left', 7), ('paren', 6), ('deriv', 3),
                               ('list', 2), ('exp', 3), ('braket', 1.5), ('binom', 1), ('over', 1.5),
                               ('physics', 4), ('word', 2)])
        if kind == 'atom':
            return self.atom(depth)
        if kind == 'product':
            return sum((self.atom(depth) for _ in range(rng.choice([2, 2, 3, 4]))), [])
        if kind == 'number':
            return self.number() + (self.atom(depth) if rng.random() < 0.4 else [])
        if kind == 'frac':
            if rng.random() < 0.25:
                return [r'\frac'] + _braced(self.number()) + _braced(self.number() if rng.random() < 0.6
                                                                      else self.atom(depth))
            return ([rng.choice([r'\frac'] * 9 + [r'\dfrac', r'\tfrac'])] + _braced(self.expr(depth + 1))
                    + _braced(self.expr(depth + 1)))
        if kind == 'sqrt':
            index = ['['] + rng.choice([['3'], ['n'], ['4'], ['p']]) + [']'] if rng.random() < 0.2 else []
            return [r'\sqrt'] + index + _braced(self.expr(depth + 1, 3))
        if kind == 'bigop':
            return self.bigop(depth)
        if kind == 'func':
            f = [rng.choice(FUNCS)]
            if rng.random() < 0.2:
                f += ['^'] + _braced([rng.choice(['2', '-1', 'n'])] if rng.random() < 0.8 else ['-', '1'])
            r = rng.random()
            if r < 0.4:
                return f + self.atom(depth + 1)
            if r < 0.75:
                return f + ['('] + self.expr(depth + 1, 3) + [')']
            return f + [r'\left', '('] + self.expr(depth + 1) + [r'\right', ')']
        if kind == 'left':
            lo, rc = rng.choice(DELIMS)
            body = self.expr(depth + 1)
            if rng.random() < 0.3:
                body = [r'\frac'] + _braced(self.expr(depth + 2, 2)) + _braced(self.expr(depth + 2, 2))
            out = [r'\left', lo] + body + [r'\right', rc]
            if rng.random() < 0.3:
                out += [rng.choice(['^', '_'])] + _braced(self.small())
            return out
        if kind == 'paren':
            lo, rc = rng.choice(DELIMS[:10])
            out = [lo] + self.expr(depth + 1, 3) + [rc]
            return out + (['^'] + _braced(self.small()) if rng.random() < 0.25 else [])
        if kind == 'deriv':
            v = rng.choice(list('xtyzrs') + [r'\mu', r'\tau'])
            r = rng.random()
            if r < 0.35:
                return [r'\frac', '{', r'\partial', '}', '{', r'\partial', v, '}']
            if r < 0.6:
                f = self.letter()
                return [r'\frac', '{', r'\partial'] + f + ['}', '{', r'\partial', v, '}']
            if r < 0.8:
                return [r'\frac', '{', 'd', '}', '{', 'd', v, '}']
            return ([r'\frac', '{', 'd', '^', '{', '2', '}'] + self.letter()
                    + ['}', '{', 'd', v, '^', '{', '2', '}', '}'])
        if kind == 'list':
            a = rng.choice(LOWER + GREEK[:6])
            dots = rng.choice([r'\ldots', r'\cdots', r'\dots'])
            sep = rng.choice([',', '+', r'\otimes', r'\times'])
            return ([a, '_', '{', '1', '}', sep, dots, sep, a, '_', '{', rng.choice(['n', 'N', 'k', 'm']), '}'])
        if kind == 'exp':
            return ['e', '^'] + _braced(([] if rng.random() < 0.5 else ['-']) + self.expr(depth + 2, 2))
        if kind == 'braket':
            a, b = rng.choice([r'\psi', r'\phi', '0', 'n', r'\Omega', 'k']), rng.choice([r'\psi', r'\phi', 'm', '0'])
            mid = [] if rng.random() < 0.5 else ['|'] + self.atom(depth + 1)
            return [r'\langle', a] + mid + ['|', b, r'\rangle']
        if kind == 'binom':
            return [r'\binom'] + _braced(self.small()) + _braced(self.small())
        if kind == 'over':
            cmd = rng.choice([r'\overset', r'\underset', r'\stackrel'])
            return [cmd] + _braced(self.small()) + _braced(self.atom(depth + 1))
        if kind == 'physics':
            return rng.choice([
                lambda: [r'\partial', '_', '{', rng.choice([r'\mu', r'\nu', 'i', 'x']), '}'] + self.atom(depth + 1),
                lambda: [r'\bar', '{', r'\psi', '}', r'\gamma', '^', '{', r'\mu', '}', r'\psi'],
                lambda: ['g', '_', '{', r'\mu', r'\nu', '}'],
                lambda: [r'\delta', '_', '{', rng.choice(['i', r'\mu', 'a']), rng.choice(['j', r'\nu', 'b']), '}'],
                lambda: [r'\hbar', r'\omega'],
                lambda: [rng.choice([r'{\cal O}', 'O', r'\mathcal{O}']), '('] + self.atom(depth + 1) + [')'],
                lambda: [r'\mathrm', '{', 'T', 'r', '}'] + self.atom(depth + 1),
                lambda: [r'\operatorname', '{', 'T', 'r', '}', '('] + self.expr(depth + 1, 2) + [')'],
                lambda: [r'\int', 'd', '^', '{', rng.choice(['4', '3', 'D', 'd']), '}', 'x',
                         r'\sqrt', '{', '-', 'g', '}'],
                lambda: [r'\epsilon', '^', '{', r'\mu', r'\nu', r'\rho', r'\sigma', '}'],
                lambda: [r'\Gamma', '_', '{', r'\mu', r'\nu', '}', '^', '{', r'\lambda', '}'],
                lambda: [r'\mathrm', '{', 'd', '}'] + self.letter(),
            ])()
        # word
        return [r'\mathrm'] + _braced(_word(rng.choice(WORDS)))

    def bigop(self, depth):
        rng = self.rng
        r = rng.random()
        i = rng.choice(list('ijknm'))
        if r < 0.3:
            op = [rng.choice([r'\sum'] * 5 + [r'\prod', r'\bigcup', r'\bigoplus', r'\coprod', r'\bigotimes'])]
            top = rng.choice(['N', 'n', r'\infty'])
            bounds = rng.choice([['_', '{', i, '=', rng.choice(['0', '1']), '}', '^', '{', top, '}'],
                                 ['_', '{', i, '}'], ['_', '{', i, r'\in', rng.choice(UPPER), '}'], []])
            return op + bounds + self.expr(depth + 1, 2)
        if r < 0.6:
            op = [rng.choice([r'\int'] * 5 + [r'\oint', r'\iint', r'\iiint'])]
            lo, hi = rng.choice([('0', '1'), ('0', r'\infty'), ('a', 'b'), (r'-\infty', r'\infty'), ('0', 't'),
                                 (None, None)])
            bounds = [] if lo is None else ['_', '{'] + tokenize(lo) + ['}', '^', '{'] + tokenize(hi) + ['}']
            var = rng.choice(list('xtsyzk') + [r'\tau'])
            d = rng.choice([['d', var], [r'\,', 'd', var], [r'\mathrm', '{', 'd', '}', var],
                            ['d', '^', '{', '3', '}', var]])
            return op + bounds + self.expr(depth + 1, 2) + d
        if r < 0.8:
            v = rng.choice(list('xnNtk') + [r'\epsilon'])
            to = rng.choice([['0'], [r'\infty'], ['0', '^', '{', '+', '}'], ['a']])
            arrow = rng.choice([r'\to', r'\rightarrow'])
            return [r'\lim', '_', '{', v, arrow] + to + ['}'] + self.expr(depth + 1, 2)
        op = rng.choice([r'\sup', r'\inf', r'\max', r'\min', r'\limsup', r'\liminf'])
        return [op, '_', '{'] + self.small() + ['}'] + self.expr(depth + 1, 2)

    def expr(self, depth, max_terms=4):
        rng = self.rng
        n = rng.randint(1, max(1, min(max_terms, 4 - depth)))
        out = ['-'] if rng.random() < 0.1 else []
        for k in range(n):
            if k:
                out.append(rng.choice(BINOPS) if rng.random() < 0.8 else rng.choice(SPACES[:2]))
            out += self.term(depth)
        return out

    def __call__(self):
        """A formula of about `target` tokens (im2latex-100k: mean ~60, at most 150 after Deng's filter)."""
        rng = self.rng
        r = rng.random()
        target = rng.randint(3, 20) if r < 0.35 else rng.randint(20, 60) if r < 0.85 else rng.randint(60, 130)
        for _ in range(20):  # redraw what comes out longer than MAX_TOKENS (tokenized)
            out = self.formula(target)
            if len(tokenize(' '.join(out))) <= MAX_TOKENS:
                return out
        return ['x']

    def formula(self, target):
        rng = self.rng
        out = self.expr(0, 3)
        while len(out) < target:
            c = rng.random()
            if c < 0.45:
                out.append(rng.choice(RELATIONS))
            elif c < 0.8:
                out.append(rng.choice(BINOPS))
            elif c < 0.92:
                out += rng.choice([[','], [',', r'\quad'], [r'\qquad'], [r';'], [',', r'\;']])
            else:
                word = _word(rng.choice(['for', 'and', 'with', 'if', 'where']))
                out += [r'\quad', r'\mathrm'] + _braced(word) + [r'\quad']
            out += self.expr(0, 3)
        if rng.random() < 0.15:
            out.append(rng.choice([',', '.', ';']))
        return out


class MathGenerator:
    """School-style math: equations, fractions, roots, powers, inequalities, angles, functions,
    percentages, logarithms, simple systems written on one line."""

    def __init__(self, rng):
        self.rng = rng

    def n(self, lo=1, hi=12):
        return str(self.rng.randint(lo, hi))

    def var(self):
        return self.rng.choice(['x', 'x', 'x', 'y', 'a', 'b', 'm', 'n', 't'])

    def lin(self, v=None):
        """a x + b (random signs)."""
        rng = self.rng
        v = v or self.var()
        a = rng.choice(['', self.n(2, 9)])
        out = f'{a}{v}'
        if rng.random() < 0.8:
            out += f' {rng.choice("+-")} {self.n(1, 20)}'
        return out

    def frac(self, a=None, b=None):
        return fr'\frac{{{a or self.n()}}}{{{b or self.n(2, 12)}}}'

    def __call__(self):
        rng = self.rng
        v = self.var()
        t = rng.choice(['linear', 'linear', 'quadratic', 'formula', 'fracs', 'fracs', 'roots', 'powers',
                        'powers', 'ineq', 'ineq', 'angles', 'angles', 'function', 'percent', 'log', 'system',
                        'arith', 'arith', 'abs', 'mixed', 'geometry', 'ratio', 'sci'])
        n = self.n
        if t == 'linear':
            return f'{self.lin(v)} = {self.lin(v) if rng.random() < 0.6 else n(1, 30)}'
        if t == 'quadratic':
            s = rng.choice(['', '2', '3'])
            return f'{s}{v}^{{2}} {rng.choice("+-")} {n(1, 9)}{v} {rng.choice("+-")} {n(1, 20)} = 0'
        if t == 'formula':
            return rng.choice([r'x = \frac{-b \pm \sqrt{b^{2} - 4ac}}{2a}', r'a^{2} + b^{2} = c^{2}',
                               r'S = \pi r^{2}', r'V = \frac{4}{3} \pi r^{3}', r'\Delta = b^{2} - 4ac',
                               r'(a + b)^{2} = a^{2} + 2ab + b^{2}', r'a^{2} - b^{2} = (a - b)(a + b)',
                               r'S = \frac{1}{2} a h', r'C = 2 \pi r', r'y = kx + b', r'v = \frac{s}{t}',
                               r'x_{1} + x_{2} = -\frac{b}{a}', r'x_{1} x_{2} = \frac{c}{a}',
                               r'S_{n} = \frac{n(a_{1} + a_{n})}{2}', r'a_{n} = a_{1} + (n - 1)d',
                               r'\sin^{2} \alpha + \cos^{2} \alpha = 1',
                               r'\tan \alpha = \frac{\sin \alpha}{\cos \alpha}'])
        if t == 'fracs':
            op = rng.choice(['+', '-', r'\times', r'\div'])
            out = f'{self.frac()} {op} {self.frac()}'
            return out + (f' = {self.frac()}' if rng.random() < 0.6 else '')
        if t == 'roots':
            r = rng.random()
            if r < 0.4:
                return fr'\sqrt{{{n(2, 200)}}} = {n(1, 9)}\sqrt{{{n(2, 7)}}}'
            if r < 0.7:
                return fr'\sqrt[{rng.choice([3, 3, 4, 5])}]{{{n(2, 125)}}} = {n(1, 9)}'
            return fr'\sqrt{{{v}^{{2}} + {n()}}} = {n()}'
        if t == 'powers':
            a, p, q = n(2, 9), n(2, 9), n(2, 9)
            return rng.choice([f'{a}^{{{p}}} \\times {a}^{{{q}}} = {a}^{{{int(p) + int(q)}}}',
                               f'({v}^{{{p}}})^{{{q}}} = {v}^{{{int(p) * int(q)}}}',
                               f'{a}^{{-{p}}} = \\frac{{1}}{{{a}^{{{p}}}}}',
                               f'({v}{self.var()}^{{2}})^{{{p}}}', f'{v}^{{\\frac{{{p}}}{{{q}}}}}',
                               f'{a}^{{0}} = 1', f'(-{a})^{{{p}}}'])
        if t == 'ineq':
            rel = rng.choice(['<', '>', r'\leq', r'\geq', r'\le', r'\ge', r'\neq'])
            if rng.random() < 0.3:
                r1, r2 = rng.choice(['<', r'\leq']), rng.choice(['<', r'\leq'])
                return f'-{n(1, 9)} {r1} {self.lin(v)} {r2} {n(1, 20)}'
            return f'{self.lin(v)} {rel} {self.lin(v) if rng.random() < 0.4 else n(0, 20)}'
        if t == 'angles':
            a = rng.choice([30, 45, 60, 90, 120, 135, 150, 180, rng.randint(1, 179)])
            P = rng.sample(UPPER[:16], 3)
            val = rng.choice([r'\frac{1}{2}', r'\frac{\sqrt{3}}{2}', r'\frac{\sqrt{2}}{2}', '1', '0'])
            x, y = rng.choice([r'\alpha', r'\theta', v]), rng.choice([r'\alpha', r'\beta', '1', '2'])
            return rng.choice([fr'\angle {P[0]}{P[1]}{P[2]} = {a}^{{\circ}}',
                               fr'\sin {a}^{{\circ}} = {val}',
                               fr'\angle {P[0]} + \angle {P[1]} + \angle {P[2]} = 180^{{\circ}}',
                               fr'\cos {x} = \frac{{{n()}}}{{{n()}}}',
                               fr'\angle {y} = {a}^{{\circ}}',
                               fr'\tan {a}^{{\circ}} \approx {rng.randint(0, 9)}.{rng.randint(0, 99)}'])
        if t == 'function':
            f = rng.choice(['f', 'g', 'h', 'y'])
            lhs = f'{f}({v})' if f != 'y' else 'y'
            return rng.choice([f'{lhs} = {n(1, 5)}{v}^{{2}} {rng.choice("+-")} {n()}{v} {rng.choice("+-")} {n()}',
                               f'{lhs} = \\frac{{{n()}}}{{{v} {rng.choice("+-")} {n()}}}',
                               f'{lhs} = \\sqrt{{{v} - {n()}}}', f'{lhs} = {n(2, 5)}^{{{v}}}',
                               f'{lhs} = \\log_{{{n(2, 10)}}} {v}', f'{lhs} = {self.lin(v)}',
                               f'{lhs} = |{self.lin(v)}|'])
        if t == 'percent':
            return f'{n(1, 99)}\\% \\times {n(10, 500)} = {n(1, 200)}'
        if t == 'log':
            b = n(2, 10)
            w = self.var()
            return rng.choice([f'\\log_{{{b}}} {n(2, 100)} = {n(1, 6)}',
                               f'\\lg {n(10, 1000)} \\approx {n(1, 3)}.{n(0, 99)}',
                               f'\\ln e^{{{n(1, 9)}}} = {n(1, 9)}',
                               f'\\log_{{{b}}} {v} + \\log_{{{b}}} {w} = \\log_{{{b}}} {v}{w}'])
        if t == 'system':
            v2 = 'y' if v != 'y' else 'x'
            sp = rng.choice([r'\quad', r'\qquad', ''])
            return (f'{n(1, 5)}{v} {rng.choice("+-")} {n(1, 5)}{v2} = {n(1, 20)}, '
                    f'{sp} {n(1, 5)}{v} {rng.choice("+-")} {v2} = {n(1, 20)}')
        if t == 'arith':
            ops = [rng.choice(['+', '-', r'\times', r'\div', r'\cdot']) for _ in range(rng.randint(1, 3))]
            out = n(1, 99)
            for op in ops:
                nxt = n(1, 30) if rng.random() < 0.8 else f'({n(1, 9)} {rng.choice("+-")} {n(1, 9)})'
                out += f' {op} {nxt}'
            return out + (f' = {n(0, 200)}' if rng.random() < 0.7 else '')
        if t == 'abs':
            rel = rng.choice(['=', '<', '>', r'\leq', r'\geq'])
            return f'|{self.lin(v)}| {rel} {n(0, 12)}'
        if t == 'mixed':
            op = rng.choice(['+', '-', r'\times'])
            return f'{n(1, 9)}\\frac{{{n(1, 5)}}}{{{n(6, 9)}}} {op} {n(1, 9)}\\frac{{{n(1, 5)}}}{{{n(6, 9)}}}'
        if t == 'geometry':
            P = rng.sample(UPPER[:16], 4)
            return rng.choice([fr'{P[0]}{P[1]} \parallel {P[2]}{P[3]}', fr'{P[0]}{P[1]} \perp {P[2]}{P[3]}',
                               fr'\triangle {P[0]}{P[1]}{P[2]} \cong \triangle {P[3]}{P[1]}{P[2]}',
                               fr'\triangle {P[0]}{P[1]}{P[2]} \sim \triangle {P[3]}{P[1]}{P[2]}',
                               fr'{P[0]}{P[1]} = {n(2, 20)} \mathrm{{cm}}', fr'\overline{{{P[0]}{P[1]}}}',
                               fr'\overrightarrow{{{P[0]}{P[1]}}} + \overrightarrow{{{P[1]}{P[2]}}} = '
                               fr'\overrightarrow{{{P[0]}{P[2]}}}'])
        if t == 'ratio':
            return f'{n()} : {n()} = {v} : {n()}'
        # sci
        return f'{n(1, 9)}.{n(0, 99)} \\times 10^{{{rng.choice(["", "-"])}{n(1, 12)}}}'


ELEMENTS = ('H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Fe Cu Zn Ag Ba Mn Cr Pb Hg Br I Au Sn Co Ni Pt '
            'Ti Sr Li Cs').split()
COMPOUNDS = ('H2O H2 O2 N2 Cl2 CO2 CO SO2 SO3 NO NO2 NH3 CH4 C2H6 C2H4 C2H2 C2H5OH CH3COOH C6H12O6 HCl H2SO4 '
             'HNO3 H3PO4 H2CO3 NaOH KOH Ca(OH)2 Ba(OH)2 Fe(OH)3 Cu(OH)2 Al(OH)3 Mg(OH)2 NaCl KCl CaCl2 MgCl2 '
             'FeCl3 FeCl2 CuCl2 AgCl BaCl2 Na2CO3 NaHCO3 CaCO3 K2CO3 Na2SO4 CuSO4 BaSO4 FeSO4 ZnSO4 KNO3 AgNO3 '
             'Cu(NO3)2 NH4Cl (NH4)2SO4 KMnO4 K2MnO4 MnO2 KClO3 H2O2 Fe2O3 Fe3O4 CuO Cu2O Al2O3 MgO CaO ZnO Na2O '
             'Na2O2 SiO2 P2O5 H2S FeS NaNO3 Ca(HCO3)2 CH3OH HCOOH C3H8 C6H6 NaAlO2 Na2SiO3 K2Cr2O7 Fe Cu Zn Mg Al '
             'Na K Ca Ag C S P Si N2O4 HClO NaClO').split()
IONS = [('H', '+'), ('OH', '-'), ('Na', '+'), ('K', '+'), ('Cl', '-'), ('Ca', '2+'), ('Mg', '2+'), ('Ba', '2+'),
        ('Cu', '2+'), ('Fe', '3+'), ('Fe', '2+'), ('Al', '3+'), ('Zn', '2+'), ('Ag', '+'), ('NH4', '+'),
        ('SO4', '2-'), ('CO3', '2-'), ('NO3', '-'), ('PO4', '3-'), ('HCO3', '-'), ('S', '2-'), ('MnO4', '-'),
        ('Cr2O7', '2-'), ('O', '2-'), ('Br', '-'), ('I', '-'), ('SO3', '2-'), ('ClO', '-')]
REACTIONS = [  # (reactants, products, typical condition)
    ('2H2 + O2', '2H2O', 'ignite'), ('CaCO3', 'CaO + CO2', 'heat'), ('2KClO3', '2KCl + 3O2', 'MnO2'),
    ('2H2O2', '2H2O + O2', 'MnO2'), ('2KMnO4', 'K2MnO4 + MnO2 + O2', 'heat'), ('N2 + 3H2', '2NH3', 'eq'),
    ('CaCO3 + 2HCl', 'CaCl2 + H2O + CO2', 'up'), ('Zn + H2SO4', 'ZnSO4 + H2', 'up'), ('Fe + CuSO4', 'FeSO4 + Cu', ''),
    ('NaOH + HCl', 'NaCl + H2O', ''), ('CuSO4 + 2NaOH', 'Cu(OH)2 + Na2SO4', 'down'),
    ('BaCl2 + Na2SO4', 'BaSO4 + 2NaCl', 'down'), ('AgNO3 + NaCl', 'AgCl + NaNO3', 'down'),
    ('CH4 + 2O2', 'CO2 + 2H2O', 'ignite'), ('C2H5OH + 3O2', '2CO2 + 3H2O', 'ignite'),
    ('Fe2O3 + 3CO', '2Fe + 3CO2', 'heat'), ('2SO2 + O2', '2SO3', 'eq'), ('CO2 + Ca(OH)2', 'CaCO3 + H2O', 'down'),
    ('2Na + 2H2O', '2NaOH + H2', 'up'), ('MnO2 + 4HCl', 'MnCl2 + Cl2 + 2H2O', 'heat'),
    ('2Al + 6HCl', '2AlCl3 + 3H2', 'up'),
    ('3Fe + 2O2', 'Fe3O4', 'ignite'), ('C + O2', 'CO2', 'ignite'), ('2Mg + O2', '2MgO', 'ignite'),
    ('Cl2 + H2O', 'HCl + HClO', 'eq'), ('NH4Cl + NaOH', 'NaCl + NH3 + H2O', 'heat'),
    ('2NaHCO3', 'Na2CO3 + H2O + CO2', 'heat'),
    ('Cu + 2AgNO3', 'Cu(NO3)2 + 2Ag', ''), ('CuO + H2', 'Cu + H2O', 'heat'), ('2NO + O2', '2NO2', ''),
    ('2NO2', 'N2O4', 'eq'), ('CH3COOH + C2H5OH', 'CH3COOC2H5 + H2O', 'eq'),
    ('Na2CO3 + 2HCl', '2NaCl + H2O + CO2', 'up'),
    ('Fe + 2HCl', 'FeCl2 + H2', 'up'), ('4Al + 3O2', '2Al2O3', ''), ('2H2O', '2H2 + O2', 'electrolysis'),
    ('C6H12O6 + 6O2', '6CO2 + 6H2O', 'enzyme'), ('SiO2 + 2C', 'Si + 2CO', 'high T'), ('2Fe + 3Cl2', '2FeCl3', 'ignite'),
    ('Ca(OH)2 + Na2CO3', 'CaCO3 + 2NaOH', 'down'), ('H2 + Cl2', '2HCl', 'ignite'), ('4NH3 + 5O2', '4NO + 6H2O', 'Pt'),
]
STATES = ['(g)', '(aq)', '(s)', '(l)']
CONDITIONS = {'heat': [r'\Delta'], 'MnO2': ['MnO2', r'\Delta'], 'ignite': [r'\Delta', 'ignite'],
              'Pt': ['Pt', r'\Delta', 'cat'], 'electrolysis': ['elec'], 'enzyme': ['enzyme', 'cat'],
              'high T': ['highT', r'\Delta']}
CONDITION_TEX = {'MnO2': r'\mathrm{MnO}_{2}', 'Pt': r'\mathrm{Pt}', 'ignite': r'\mathrm{ignite}',
                 'cat': r'\mathrm{cat.}', 'elec': r'\mathrm{electrolysis}', 'enzyme': r'\mathrm{enzyme}',
                 'highT': r'\mathrm{high}\ T', r'\Delta': r'\Delta'}
_CHEM_TOKEN = re.compile(r'[A-Z][a-z]?|\d+|[()]|\S')


class ChemistryGenerator:
    """Chemistry: reaction equations (coefficients, subscript counts, states, arrows with conditions,
    gas/precipitate arrows, equilibria), ionic equations with charges, hydrates, isotopes, electron
    configurations, thermochemistry and equilibrium constants. Element letters are upright
    (\\mathrm{...}) or italic, chosen per formula, as printed and handwritten chemistry differ."""

    def __init__(self, rng):
        self.rng = rng
        self.upright = rng.random() < 0.6

    def compound(self, s):
        """'Ca(OH)2' -> Ca(OH)_{2} with element runs in \\mathrm{} when upright; a leading coefficient stays."""
        m = re.match(r'(\d*)(.*)', s)
        coef, body = m.group(1), m.group(2)
        out, run = [coef] if coef else [], ''
        for piece in _CHEM_TOKEN.findall(body):
            if piece.isdigit():
                out.append(self._run(run) + f'_{{{piece}}}')
                run = ''
            elif piece in '()':
                out.append(self._run(run) + piece)
                run = ''
            else:
                run += piece
        out.append(self._run(run))
        return ''.join(out)

    def _run(self, run):
        if not run:
            return ''
        return fr'\mathrm{{{run}}}' if self.upright else run

    def ion(self, name, charge):
        return f'{self.compound(name)}^{{{charge}}}'

    def state(self):
        s = self.rng.choice(STATES)
        return fr'\mathrm{{{s}}}' if self.upright else s

    def side(self, species, states):
        parts = []
        for sp in species.split(' + '):
            t = self.compound(sp)
            if states:
                t += self.state()
            parts.append(t)
        return ' + '.join(parts)

    def arrow(self, cond):
        rng = self.rng
        if cond == 'eq':
            return rng.choice([r'\rightleftharpoons', r'\rightleftarrows', r'\leftrightarrow', r'\rightleftharpoons'])
        opts = CONDITIONS.get(cond)
        if opts and rng.random() < 0.8:
            c = CONDITION_TEX[rng.choice(opts)]
            return rng.choice([fr'\xrightarrow{{{c}}}', fr'\overset{{{c}}}{{\longrightarrow}}',
                               fr'\xrightarrow{{{c}}}', fr'\overset{{{c}}}{{=}}',
                               fr'\stackrel{{{c}}}{{\longrightarrow}}'])
        return rng.choice(['=', r'\rightarrow', r'\longrightarrow', '=', r'\rightarrow'])

    def reaction(self):
        rng = self.rng
        if rng.random() < 0.7:
            lhs, rhs, cond = rng.choice(REACTIONS)
        else:  # random (not necessarily balanced) reactions from the compound list
            def side():
                k = rng.choice([1, 2, 2, 3])
                return ' + '.join((rng.choice(['', '', '2', '3', '4']) + rng.choice(COMPOUNDS)) for _ in range(k))
            lhs, rhs, cond = side(), side(), rng.choice(['', '', 'heat', 'eq', 'up', 'down', 'MnO2', 'Pt'])
        states = rng.random() < 0.25
        left, right = self.side(lhs, states), self.side(rhs, states)
        if cond in ('up', 'down') and not states:
            right += ' ' + (r'\uparrow' if cond == 'up' else r'\downarrow')
        return f'{left} {self.arrow(cond)} {right}'

    def __call__(self):
        rng = self.rng
        t = rng.random()
        if t < 0.55:
            return self.reaction()
        if t < 0.72:  # ionic equation
            a, b = rng.sample(IONS, 2)
            out = f'{rng.choice(["", "", "2", "3"])}{self.ion(*a)} + {rng.choice(["", "", "2"])}{self.ion(*b)}'
            prod = rng.choice(COMPOUNDS)
            mark = rng.choice(['', r' \downarrow', r' \uparrow', ''])
            arrow = rng.choice(['=', r'\rightarrow', r'\longrightarrow', r'\rightleftharpoons'])
            return f'{out} {arrow} {self.compound(prod)}{mark}'
        if t < 0.77:  # hydrate
            salt = rng.choice(['CuSO4', 'Na2CO3', 'CaSO4', 'FeSO4', 'MgSO4', 'CoCl2'])
            return f'{self.compound(salt)} \\cdot {rng.choice(["", "2", "5", "7", "10"])}{self.compound("H2O")}'
        if t < 0.82:  # isotope / nuclear
            el, (z, a) = rng.choice([('C', (6, 14)), ('U', (92, 235)), ('H', (1, 2)), ('H', (1, 3)), ('He', (2, 4)),
                                     ('O', (8, 16)), ('N', (7, 14)), ('Co', (27, 60)), ('I', (53, 131))])
            iso = f'{{}}_{{{z}}}^{{{a}}}{self._run(el) or el}'
            if rng.random() < 0.5:
                return iso
            return f'{iso} + {{}}_{{0}}^{{1}}n \\rightarrow {{}}_{{{z}}}^{{{a + 1}}}{self._run(el) or el}'
        if t < 0.87:  # electron configuration
            shells = ['1s', '2s', '2p', '3s', '3p', '4s', '3d', '4p']
            k = rng.randint(2, len(shells))
            full = {'s': 2, 'p': 6, 'd': 10}
            counts = [full[sh[1]] if i < k - 1 else rng.randint(1, full[sh[1]]) for i, sh in enumerate(shells[:k])]
            parts = [f'{sh}^{{{c}}}' for sh, c in zip(shells, counts)]
            return ' '.join(parts)
        if t < 0.93:  # thermochemistry
            lhs, rhs, _ = rng.choice(REACTIONS)
            dh = rng.choice(['-', '+', '-']) + str(rng.randint(10, 2900))
            dh += f'.{rng.randint(0, 9)}' if rng.random() < 0.3 else ''
            return (f'{self.side(lhs, True)} = {self.side(rhs, True)} \\quad \\Delta H = {dh} '
                    r'\mathrm{kJ} \cdot \mathrm{mol}^{-1}')
        if t < 0.97:  # equilibrium constant
            return rng.choice([
                fr'K = \frac{{[{self.compound("NH3")}]^{{2}}}}{{[{self.compound("N2")}][{self.compound("H2")}]^{{3}}}}',
                fr'K_{{a}} = \frac{{[{self.compound("H")}^{{+}}][{self.compound("A")}^{{-}}]}}'
                fr'{{[{self.compound("HA")}]}}',
                fr'\mathrm{{pH}} = -\lg [{self.compound("H")}^{{+}}]',
                fr'K_{{sp}} = [{self.compound("Ag")}^{{+}}][{self.compound("Cl")}^{{-}}]',
                fr'c = \frac{{n}}{{V}} = \frac{{{rng.randint(1, 9)}.{rng.randint(0, 9)} \mathrm{{mol}}}}'
                fr'{{{rng.randint(1, 5)} \mathrm{{L}}}}'])
        # half reaction / redox with electrons
        el, ch = rng.choice([('Fe', '3+'), ('Cu', '2+'), ('Zn', '2+'), ('Ag', '+'), ('Al', '3+')])
        k = {'+': 1, '2+': 2, '3+': 3}[ch]
        e = f'{k if k > 1 else ""}e^{{-}}'
        return rng.choice([f'{self.ion(el, ch)} + {e} \\rightarrow {self._run(el) or el}',
                           f'{self._run(el) or el} - {e} = {self.ion(el, ch)}'])


GENERATORS = {'openai': OpenAIGenerator, 'math': MathGenerator, 'chemistry': ChemistryGenerator}


def sample_rng(seed, domain, split, index, attempt=0):
    """The random stream of one sample: depends only on (seed, domain, split, index, attempt), never on
    the order or the process that draws it (random.Random seeds a str through SHA-512)."""
    return random.Random(f'im2latex-demo/{seed}/{domain}/{split}/{index}/{attempt}')


def make_sample(domain, seed, split, index, attempt=0):
    """One demo sample: {'label': tokenized LaTeX, 'font', 'fontsize', 'dpi', 'margin': (top, bottom,
    left, right) or None}. Deterministic."""
    rng = sample_rng(seed, domain, split, index, attempt)
    raw = GENERATORS[domain](rng)()
    label = detokenize(tokenize(raw if isinstance(raw, str) else ' '.join(raw)))
    if domain == 'openai':
        font = _choice_w(rng, list(OPENAI_FONTS))
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


def _write_text(path, text):
    def writer(tmp):
        with open(tmp, 'w', encoding='utf-8', newline='\n') as f:
            f.write(text)
    atomic_write(path, writer)


def _save_png(img, path, meta):
    info = PngImagePlugin.PngInfo()
    for k, v in meta.items():
        info.add_text(k, str(v))
    atomic_write(path, lambda tmp: Image.fromarray(img, mode='L').save(tmp, format='PNG', pnginfo=info))


def _render_sample(task):
    """Worker: render one sample and write its PNG. -> (slot, label, (H, W)) or (slot, None, error)."""
    slot, domain, key, sample, path, renderer = task
    try:
        kw = dict(fontsize=sample['fontsize'], dpi=sample['dpi'], font=sample['font'], renderer=renderer)
        if domain == 'openai':
            import proc
            buckets, pad = _buckets()
            page = render_latex(sample['label'], pad=0, **kw)
            for _ in range(3):  # too big for the normal buckets: render smaller (deterministic)
                s = _fit_scale(*page.shape, buckets, pad)
                if s >= 1.0:
                    break
                kw['dpi'] = kw['dpi'] * s * 0.97
                page = render_latex(sample['label'], pad=0, **kw)
            img = proc.deng_process(page)
            if img is None:
                raise RenderError('blank after processing')
        else:
            img = render_latex(sample['label'], pad=0, **kw)
            top, bottom, left, right = sample['margin']
            img = np.pad(img, ((top, bottom), (left, right)), constant_values=255)
    except RenderError as e:
        return slot, None, str(e)
    meta = {'latex': sample['label'], 'key': key, 'font': sample['font'], 'fontsize': sample['fontsize'],
            'dpi': round(kw['dpi'], 2), 'renderer': renderer, 'Software': 'render.py'}
    _save_png(img, path, meta)
    return slot, sample['label'], img.shape


def _existing(path, key):
    """Label and (H, W) of an image written earlier for this sample key, else None."""
    try:
        with Image.open(path) as im:
            if im.info.get('key') == key and im.info.get('latex'):
                return im.info['latex'], (im.size[1], im.size[0])
    except (OSError, ValueError, SyntaxError):
        return None
    return None


def _n_workers(workers):
    if workers is None:
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:
            return os.cpu_count() or 1
    return max(1, int(workers))


def _imap(pool, nw, fn, tasks, desc, quiet):
    """Ordered map over tasks, in a pool of nw processes when given, with a progress bar."""
    chunk = max(1, min(32, len(tasks) // (8 * nw)))  # ~8 chunks per worker: balanced, little overhead
    it = pool.imap(fn, tasks, chunksize=chunk) if pool is not None else map(fn, tasks)
    yield from tqdm(it, total=len(tasks), desc=desc, disable=quiet or not tasks, leave=False, dynamic_ncols=True)


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
                old = _existing(path, key)
                if old is not None and old[0] not in forbidden:
                    done[i] = (name, old[0], old[1])
                    stats['reused'] += 1
                    continue
            while attempt[i] < MAX_CANDIDATES:
                sample = make_sample(domain, seed, split, i, attempt[i])
                if sample['label'] not in forbidden:
                    break
                attempt[i] += 1
                stats['duplicates_skipped'] += 1
            else:
                continue
            tasks.append((i, domain, key, sample, path, renderer))
        pending = []
        t0 = time.time()
        for i, label, res in _imap(pool, nw, _render_sample, tasks, f'{domain}/{split}', quiet):
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


def write_demo(root_dir, n=None, seed=0, workers=None, renderer='mathtext', domains=DOMAINS, quiet=False,
               sizes=None):
    """Write the demo data sets into root_dir in the DESIGN.md layout:
    openai: <root>/images/openai_NNNNNN.png (Deng-processed, ~20 bucket sizes) + <root>/labels/{split}.txt;
    math, chemistry: <root>/adaptation_data/<domain>_images/ (continuous sizes), then
    proc.kmeans_for_img_size -> <domain>_images_resized/ (<= 32 sizes), + <domain>_labels/{split}.txt.
    n: training formulas per domain (val/test: 10% of n each); None = DEMO_SIZES.
    sizes: {domain: (train, val, test)} instead of n (e.g. a tiny set for tests).
    quiet: no progress bars.
    Deterministic for a seed, whatever `workers` is; existing images of the same sample are kept, so a
    re-run on a complete root only rewrites the label files. Every file is written atomically.
    Each PNG carries its label and render settings as text chunks ('latex', 'key', 'font', ...).
    Returns {'root_dir', 'seconds', 'domains': {domain: {'counts': {split: n}, 'rendered', 'reused',
    'failures', 'dropped', 'duplicates_skipped', 'errors': {message: count}, 'distinct_sizes',
    'images_per_s', ...}}}."""
    import proc
    t_start = time.time()
    root_dir = os.fspath(root_dir)
    if renderer not in RENDERERS:
        raise ValueError(f'unknown renderer {renderer!r} (expected one of {", ".join(RENDERERS)})')
    if renderer == 'latex' and latex_tools() is None:
        raise RenderError(LATEX_INSTALL_HINT)
    domains = list(domains)
    bad = [d for d in domains if d not in DOMAINS]
    if bad:
        raise ValueError(f'unknown domain(s) {bad} (expected some of {", ".join(DOMAINS)})')
    sizes = demo_sizes(n) if sizes is None else {d: tuple(int(k) for k in sizes[d]) for d in domains}
    nw = _n_workers(workers)
    total = sum(sum(sizes[d]) for d in domains)
    pool = multiprocessing.Pool(nw) if nw > 1 and total >= 4 * nw else None
    result = {'root_dir': root_dir, 'domains': {}}
    try:
        for domain in domains:
            stats = {'rendered': 0, 'reused': 0, 'failures': 0, 'dropped': 0, 'duplicates_skipped': 0,
                     'errors': Counter(), 'render_seconds': 0.0}
            t0 = time.time()
            forbidden, offset, counts, shapes = set(), 0, {}, []
            for split, count in zip(SPLITS, sizes[domain]):
                rows = _render_split(pool, nw, root_dir, domain, split, count, offset, seed, renderer,
                                     forbidden, quiet, stats)
                offset += count
                if split != 'test':  # val avoids train formulas; test avoids train and val formulas
                    forbidden |= {label for _, label, _ in rows}
                text = ''.join(f'{name}\t{label}\n' for name, label, _ in rows)
                _write_text(label_path(root_dir, domain, split), text)
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
                km = proc.kmeans_for_img_size(_raw_dir(root_dir, domain), caching=True, resize=True,
                                              workers=workers)
                info['distinct_sizes_raw'] = len(set(shapes))
                info['distinct_sizes'] = km['distinct']
                info['aspect_mean'], info['aspect_max'] = km['aspect_mean'], km['aspect_max']
            info['seconds'] = time.time() - t0
            info['images_per_s'] = stats['rendered'] / stats['render_seconds'] if stats['render_seconds'] > 0 else None
            result['domains'][domain] = info
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    result['seconds'] = time.time() - t_start
    return result


# -----------------------------------------------------------------------------
# image metrics (Deng et al. 2017, evaluate_image.py)

def _columns(img, height):
    """Binarized columns of a uint8 image padded (at the bottom, with white) to `height` rows, as bytes,
    blank columns dropped."""
    ink = np.asarray(img) <= BINARIZE                            # (H, W) bool
    if ink.shape[0] < height:
        ink = np.pad(ink, ((0, height - ink.shape[0]), (0, 0)))  # blank rows below
    keep = ink.any(axis=0)
    packed = np.packbits(ink[:, keep].T, axis=1)                 # (W', ceil(height / 8)) one row per column
    return [row.tobytes() for row in packed]


def compare_images(a, b):
    """Deng's image comparison of two renders (uint8 (H, W), white background): binarize (ink <= 128),
    pad the shorter image with blank rows at the bottom, drop blank columns, then compare the column
    sequences. -> {'match': bool (identical sequences), 'col_edit': Levenshtein distance between the
    column sequences, 'col_len': max of the two lengths}."""
    from rapidfuzz.distance import Levenshtein
    h = max(np.asarray(a).shape[0], np.asarray(b).shape[0])
    ca, cb = _columns(a, h), _columns(b, h)
    dist = Levenshtein.distance(ca, cb)
    return {'match': dist == 0 and len(ca) == len(cb), 'col_edit': int(dist), 'col_len': max(len(ca), len(cb))}


def _aligned_pair(gold, pred, fontsize, dpi, font, renderer):
    """Render both boxes and pad the tops so that their baselines are on the same row (like formulas
    typeset on one page); -> (gold image, pred image or None, error of pred or None)."""
    g, gb = _render_box(gold, fontsize, dpi, font, renderer)
    try:
        p, pb = _render_box(pred, fontsize, dpi, font, renderer)
    except RenderError as e:
        return g, None, str(e)
    if gb is not None and pb is not None:
        shift = gb - pb
        if shift > 0:
            p = np.pad(p, ((shift, 0), (0, 0)), constant_values=255)
        elif shift < 0:
            g = np.pad(g, ((-shift, 0), (0, 0)), constant_values=255)
    return g, p, None


def _metric_task(task):
    gold, pred, fontsize, dpi, font, renderer = task
    try:
        g, p, err = _aligned_pair(gold, pred, fontsize, dpi, font, renderer)
    except RenderError as e:
        return {'gold_error': str(e)}
    if p is None:
        return {'match': False, 'col_edit': len(_columns(g, g.shape[0])), 'col_len': len(_columns(g, g.shape[0])),
                'pred_error': err}
    return compare_images(g, p)


def image_metrics(golds, preds, workers=None, fontsize=FONTSIZE, dpi=DPI, font='cm', renderer='mathtext',
                  per_sample=False, quiet=False):
    """Deng's image evaluation over a corpus. golds, preds: LaTeX strings (raw or tokenized) or token lists.
    Gold and prediction are rendered the same way (font, size, dpi), aligned on their baselines,
    binarized, blank columns dropped, and compared column by column.
    A prediction that fails to render is a mismatch with col_edit = the gold's column count.
    A gold that fails to render leaves the sample out (counted in render_failures_gold).
    -> {'image_match': fraction of evaluated samples whose images match,
        'column_edit_accuracy': 1 - sum(col_edit) / sum(col_len), 'render_failures_pred': int,
        'render_failures_gold': int, 'n': evaluated samples, 'n_total': int,
        'samples': per-sample dicts (only with per_sample=True)}."""
    golds, preds = list(golds), list(preds)
    if len(golds) != len(preds):
        raise ValueError(f'{len(golds)} golds but {len(preds)} predictions')
    join = lambda x: detokenize(x) if isinstance(x, (list, tuple)) else x  # noqa: E731
    tasks = [(join(g), join(p), fontsize, dpi, font, renderer) for g, p in zip(golds, preds)]
    if renderer == 'latex' and latex_tools() is None:
        raise RenderError(LATEX_INSTALL_HINT)
    nw = _n_workers(workers)
    pool = multiprocessing.Pool(nw) if nw > 1 and len(tasks) >= 16 * nw else None
    try:
        results = list(_imap(pool, nw, _metric_task, tasks, 'image metrics', quiet))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    ok = [r for r in results if 'gold_error' not in r]
    edits, lens = sum(r['col_edit'] for r in ok), sum(r['col_len'] for r in ok)
    out = {'image_match': sum(r['match'] for r in ok) / len(ok) if ok else 0.0,
           'column_edit_accuracy': 1.0 - edits / lens if lens else (1.0 if ok else 0.0),
           'render_failures_pred': sum('pred_error' in r for r in ok),
           'render_failures_gold': len(results) - len(ok), 'n': len(ok), 'n_total': len(results)}
    if per_sample:
        out['samples'] = results
    return out


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
                                 'in the layout of DESIGN.md, or one formula to a PNG with --latex/--out.')
    ap.add_argument('--root_dir', default=DEFAULT_ROOT, help=f'output root (default {DEFAULT_ROOT})')
    ap.add_argument('--n', type=int, default=None,
                    help='training formulas per domain; val and test get 10%% of it each (default: '
                    + ', '.join(f'{d} {s[0]}/{s[1]}/{s[2]}' for d, s in DEMO_SIZES.items()) + ')')
    ap.add_argument('--seed', type=int, default=0,
                    help='seed of the formula generators and render settings (default 0)')
    ap.add_argument('--workers', type=int, default=None, help='render processes (default: all CPU cores)')
    ap.add_argument('--renderer', choices=RENDERERS, default='mathtext',
                    help="mathtext (matplotlib, no TeX needed; default) or latex (latex+dvipng or pdflatex+pdftoppm)")
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
            img = render_latex(args.latex, fontsize=args.fontsize, dpi=args.dpi, font=args.font, renderer=args.renderer)
        except RenderError as e:
            print(f'cannot render: {e}', file=sys.stderr)
            return 1
        atomic_write(args.out, lambda tmp: Image.fromarray(img, mode='L').save(tmp, format='PNG'))
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
