"""The formula generators of the demo data sets, one per domain. Each is a class whose instance takes a
random.Random and, when called, returns one formula: a list of tokens or a LaTeX string.

    openai     im2latex-100k style (Deng's normalised form: every argument and script braced), 3-150 tokens
    math       school math: equations, fractions, roots, powers, inequalities, angles, functions, ...
    chemistry  reaction equations, ionic equations, hydrates, isotopes, electron configurations, ...

generate(domain, rng) gives the label as the data sets store it (tokenized, tokens joined by spaces).
render.py draws the formulas (render.make_sample adds the render settings) and writes the data sets.
"""
import re

from data import detokenize, tokenize

# -----------------------------------------------------------------------------
# defaults and vocabularies. A generator returns tokens (strings that tokenize() splits back into
# themselves) or short raw LaTeX; generate() normalises the label afterwards.

MAX_TOKENS = 150       # openai formulas longer than this are redrawn (Deng's filter)

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


def choice_weighted(rng, pairs):
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


# -----------------------------------------------------------------------------
# openai: im2latex-100k style

class OpenAIGenerator:
    """im2latex-100k style formulas (Deng's normalised form: every argument and script braced):
    sub/superscripts, nested fractions, roots, big operators with bounds, functions, \\left \\right
    groups, accents, Greek, old and new font commands, physics idioms; lengths from a few tokens
    to ~150."""

    ENV_SHARE = 0.1        # with environments=True: share of formulas that hold an environment

    def __init__(self, rng, environments=False):
        self.rng = rng
        self.environments = environments

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

    # term kinds and their weights
    TERMS = (('atom', 26), ('product', 12), ('number', 7), ('frac', 10), ('sqrt', 4), ('bigop', 7), ('func', 6),
             ('left', 7), ('paren', 6), ('deriv', 3), ('list', 2), ('exp', 3), ('braket', 1.5), ('binom', 1),
             ('over', 1.5), ('physics', 4), ('word', 2))

    def term(self, depth):
        rng = self.rng
        if depth >= 3:
            return self.atom(depth) if rng.random() < 0.8 else self.number()
        kind = choice_weighted(rng, list(self.TERMS))
        return getattr(self, f'_term_{kind}')(depth)

    def _term_atom(self, depth):
        return self.atom(depth)

    def _term_product(self, depth):
        return sum((self.atom(depth) for _ in range(self.rng.choice([2, 2, 3, 4]))), [])

    def _term_number(self, depth):
        return self.number() + (self.atom(depth) if self.rng.random() < 0.4 else [])

    def _term_frac(self, depth):
        rng = self.rng
        if rng.random() < 0.25:
            return [r'\frac'] + _braced(self.number()) + _braced(self.number() if rng.random() < 0.6
                                                                  else self.atom(depth))
        return ([rng.choice([r'\frac'] * 9 + [r'\dfrac', r'\tfrac'])] + _braced(self.expr(depth + 1))
                + _braced(self.expr(depth + 1)))

    def _term_sqrt(self, depth):
        rng = self.rng
        index = ['['] + rng.choice([['3'], ['n'], ['4'], ['p']]) + [']'] if rng.random() < 0.2 else []
        return [r'\sqrt'] + index + _braced(self.expr(depth + 1, 3))

    def _term_bigop(self, depth):
        return self.bigop(depth)

    def _term_func(self, depth):
        rng = self.rng
        f = [rng.choice(FUNCS)]
        if rng.random() < 0.2:
            f += ['^'] + _braced([rng.choice(['2', '-1', 'n'])] if rng.random() < 0.8 else ['-', '1'])
        r = rng.random()
        if r < 0.4:
            return f + self.atom(depth + 1)
        if r < 0.75:
            return f + ['('] + self.expr(depth + 1, 3) + [')']
        return f + [r'\left', '('] + self.expr(depth + 1) + [r'\right', ')']

    def _term_left(self, depth):
        rng = self.rng
        lo, rc = rng.choice(DELIMS)
        body = self.expr(depth + 1)
        if rng.random() < 0.3:
            body = [r'\frac'] + _braced(self.expr(depth + 2, 2)) + _braced(self.expr(depth + 2, 2))
        out = [r'\left', lo] + body + [r'\right', rc]
        if rng.random() < 0.3:
            out += [rng.choice(['^', '_'])] + _braced(self.small())
        return out

    def _term_paren(self, depth):
        rng = self.rng
        lo, rc = rng.choice(DELIMS[:10])
        out = [lo] + self.expr(depth + 1, 3) + [rc]
        return out + (['^'] + _braced(self.small()) if rng.random() < 0.25 else [])

    def _term_deriv(self, depth):
        rng = self.rng
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

    def _term_list(self, depth):
        rng = self.rng
        a = rng.choice(LOWER + GREEK[:6])
        dots = rng.choice([r'\ldots', r'\cdots', r'\dots'])
        sep = rng.choice([',', '+', r'\otimes', r'\times'])
        return ([a, '_', '{', '1', '}', sep, dots, sep, a, '_', '{', rng.choice(['n', 'N', 'k', 'm']), '}'])

    def _term_exp(self, depth):
        return ['e', '^'] + _braced(([] if self.rng.random() < 0.5 else ['-']) + self.expr(depth + 2, 2))

    def _term_braket(self, depth):
        rng = self.rng
        a, b = rng.choice([r'\psi', r'\phi', '0', 'n', r'\Omega', 'k']), rng.choice([r'\psi', r'\phi', 'm', '0'])
        mid = [] if rng.random() < 0.5 else ['|'] + self.atom(depth + 1)
        return [r'\langle', a] + mid + ['|', b, r'\rangle']

    def _term_binom(self, depth):
        return [r'\binom'] + _braced(self.small()) + _braced(self.small())

    def _term_over(self, depth):
        cmd = self.rng.choice([r'\overset', r'\underset', r'\stackrel'])
        return [cmd] + _braced(self.small()) + _braced(self.atom(depth + 1))

    def _term_physics(self, depth):
        rng = self.rng
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

    def _term_word(self, depth):
        return [r'\mathrm'] + _braced(_word(self.rng.choice(WORDS)))

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
        env = self.environments and rng.random() < self.ENV_SHARE
        r = rng.random()
        target = rng.randint(3, 20) if r < 0.35 else rng.randint(20, 60) if r < 0.85 else rng.randint(60, 130)
        for _ in range(20):  # redraw what comes out longer than MAX_TOKENS (tokenized)
            out = self.environment() if env else self.formula(target)
            if len(tokenize(' '.join(out))) <= MAX_TOKENS:
                return out
        return ['x']

    def cell(self):
        """One cell of an array / matrix, braced as im2latex-100k's normalized formulas write it."""
        rng = self.rng
        inner = self.number() if rng.random() < 0.3 else self.expr(2, 2) if rng.random() < 0.5 else self.atom(2)
        return _braced(inner)

    def grid(self, rows, cols):
        """Rows of cells joined by & and \\\\ (no \\\\ after the last row)."""
        out = []
        for r in range(rows):
            out += (['\\\\'] if r else []) + sum((([] if c == 0 else ['&']) + self.cell() for c in range(cols)), [])
        return out

    def environment(self):
        """A formula with an environment: an array with column alignment in \\left( \\right), a matrix
        (matrix, pmatrix, bmatrix, vmatrix), a case distinction (cases, or an array in \\left\\{ \\right.),
        aligned equations, or lines broken with \\\\ in a one-column array."""
        rng = self.rng
        lhs = self.atom(2) + [rng.choice(['=', '=', r'\equiv', r'\to'])] if rng.random() < 0.6 else []
        kind = rng.choice(['array', 'matrix', 'matrix', 'cases', 'cases', 'aligned', 'lines'])
        rows, cols = rng.randint(2, 3), rng.randint(1, 3)
        if kind == 'array':
            spec = ['{'] + [rng.choice('lcr') for _ in range(cols)] + ['}']
            lo, rc = rng.choice([('(', ')'), ('[', ']'), ('|', '|')])
            return lhs + [r'\left' + lo, r'\begin{array}'] + spec + self.grid(rows, cols) + [r'\end{array}', r'\right' + rc]
        if kind == 'matrix':
            name = rng.choice(['matrix', 'pmatrix', 'pmatrix', 'bmatrix', 'vmatrix'])
            return lhs + [rf'\begin{{{name}}}'] + self.grid(rows, max(cols, 2)) + [rf'\end{{{name}}}']
        if kind == 'cases':
            cond = lambda: _braced(self.atom(3) + [rng.choice(['>', '<', r'\geq', r'\leq', '='])] + self.number())  # noqa: E731
            body = []
            for r in range(rows):
                body += (['\\\\'] if r else []) + self.cell() + ['&'] + cond()
            if rng.random() < 0.5:
                return lhs + [r'\begin{cases}'] + body + [r'\end{cases}']
            return lhs + [r'\left\{', r'\begin{array}', '{', 'l', 'l', '}'] + body + [r'\end{array}', r'\right.']
        if kind == 'aligned':
            body = []
            for r in range(rows):
                left = self.atom(2) if r == 0 else []
                body += (['\\\\'] if r else []) + left + ['&', '='] + self.expr(1, 3)
            return [r'\begin{aligned}'] + body + [r'\end{aligned}']
        body = []
        for r in range(rows):
            body += (['\\\\'] if r else []) + _braced(self.expr(1, 3))
        return [r'\begin{array}', '{', 'l', '}'] + body + [r'\end{array}']

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


# -----------------------------------------------------------------------------
# math: school math

class MathGenerator:
    """School-style math: equations, fractions, roots, powers, inequalities, angles, functions,
    percentages, logarithms, simple systems written on one line."""

    SYSTEM_EXTRA = 0.06    # with environments=True: extra share of systems of equations (written as cases / aligned)

    def __init__(self, rng, environments=False):
        self.rng = rng
        self.environments = environments

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

    # formula kinds (repeated = more likely)
    KINDS = ('linear', 'linear', 'quadratic', 'formula', 'fracs', 'fracs', 'roots', 'powers',
             'powers', 'ineq', 'ineq', 'angles', 'angles', 'function', 'percent', 'log', 'system',
             'arith', 'arith', 'abs', 'mixed', 'geometry', 'ratio', 'sci')

    def __call__(self):
        v = self.var()
        if self.environments and self.rng.random() < self.SYSTEM_EXTRA:
            return self._system(v)
        kind = self.rng.choice(self.KINDS)
        return getattr(self, f'_{kind}')(v)

    def _linear(self, v):
        rng, n = self.rng, self.n
        return f'{self.lin(v)} = {self.lin(v) if rng.random() < 0.6 else n(1, 30)}'

    def _quadratic(self, v):
        rng, n = self.rng, self.n
        s = rng.choice(['', '2', '3'])
        return f'{s}{v}^{{2}} {rng.choice("+-")} {n(1, 9)}{v} {rng.choice("+-")} {n(1, 20)} = 0'

    def _formula(self, v):
        rng = self.rng
        return rng.choice([r'x = \frac{-b \pm \sqrt{b^{2} - 4ac}}{2a}', r'a^{2} + b^{2} = c^{2}',
                           r'S = \pi r^{2}', r'V = \frac{4}{3} \pi r^{3}', r'\Delta = b^{2} - 4ac',
                           r'(a + b)^{2} = a^{2} + 2ab + b^{2}', r'a^{2} - b^{2} = (a - b)(a + b)',
                           r'S = \frac{1}{2} a h', r'C = 2 \pi r', r'y = kx + b', r'v = \frac{s}{t}',
                           r'x_{1} + x_{2} = -\frac{b}{a}', r'x_{1} x_{2} = \frac{c}{a}',
                           r'S_{n} = \frac{n(a_{1} + a_{n})}{2}', r'a_{n} = a_{1} + (n - 1)d',
                           r'\sin^{2} \alpha + \cos^{2} \alpha = 1',
                           r'\tan \alpha = \frac{\sin \alpha}{\cos \alpha}'])

    def _fracs(self, v):
        rng = self.rng
        op = rng.choice(['+', '-', r'\times', r'\div'])
        out = f'{self.frac()} {op} {self.frac()}'
        return out + (f' = {self.frac()}' if rng.random() < 0.6 else '')

    def _roots(self, v):
        rng, n = self.rng, self.n
        r = rng.random()
        if r < 0.4:
            return fr'\sqrt{{{n(2, 200)}}} = {n(1, 9)}\sqrt{{{n(2, 7)}}}'
        if r < 0.7:
            return fr'\sqrt[{rng.choice([3, 3, 4, 5])}]{{{n(2, 125)}}} = {n(1, 9)}'
        return fr'\sqrt{{{v}^{{2}} + {n()}}} = {n()}'

    def _powers(self, v):
        rng, n = self.rng, self.n
        a, p, q = n(2, 9), n(2, 9), n(2, 9)
        return rng.choice([f'{a}^{{{p}}} \\times {a}^{{{q}}} = {a}^{{{int(p) + int(q)}}}',
                           f'({v}^{{{p}}})^{{{q}}} = {v}^{{{int(p) * int(q)}}}',
                           f'{a}^{{-{p}}} = \\frac{{1}}{{{a}^{{{p}}}}}',
                           f'({v}{self.var()}^{{2}})^{{{p}}}', f'{v}^{{\\frac{{{p}}}{{{q}}}}}',
                           f'{a}^{{0}} = 1', f'(-{a})^{{{p}}}'])

    def _ineq(self, v):
        rng, n = self.rng, self.n
        rel = rng.choice(['<', '>', r'\leq', r'\geq', r'\le', r'\ge', r'\neq'])
        if rng.random() < 0.3:
            r1, r2 = rng.choice(['<', r'\leq']), rng.choice(['<', r'\leq'])
            return f'-{n(1, 9)} {r1} {self.lin(v)} {r2} {n(1, 20)}'
        return f'{self.lin(v)} {rel} {self.lin(v) if rng.random() < 0.4 else n(0, 20)}'

    def _angles(self, v):
        rng, n = self.rng, self.n
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

    def _function(self, v):
        rng, n = self.rng, self.n
        f = rng.choice(['f', 'g', 'h', 'y'])
        lhs = f'{f}({v})' if f != 'y' else 'y'
        return rng.choice([f'{lhs} = {n(1, 5)}{v}^{{2}} {rng.choice("+-")} {n()}{v} {rng.choice("+-")} {n()}',
                           f'{lhs} = \\frac{{{n()}}}{{{v} {rng.choice("+-")} {n()}}}',
                           f'{lhs} = \\sqrt{{{v} - {n()}}}', f'{lhs} = {n(2, 5)}^{{{v}}}',
                           f'{lhs} = \\log_{{{n(2, 10)}}} {v}', f'{lhs} = {self.lin(v)}',
                           f'{lhs} = |{self.lin(v)}|'])

    def _percent(self, v):
        n = self.n
        return f'{n(1, 99)}\\% \\times {n(10, 500)} = {n(1, 200)}'

    def _log(self, v):
        rng, n = self.rng, self.n
        b = n(2, 10)
        w = self.var()
        return rng.choice([f'\\log_{{{b}}} {n(2, 100)} = {n(1, 6)}',
                           f'\\lg {n(10, 1000)} \\approx {n(1, 3)}.{n(0, 99)}',
                           f'\\ln e^{{{n(1, 9)}}} = {n(1, 9)}',
                           f'\\log_{{{b}}} {v} + \\log_{{{b}}} {w} = \\log_{{{b}}} {v}{w}'])

    def _system(self, v):
        rng, n = self.rng, self.n
        v2 = 'y' if v != 'y' else 'x'
        if self.environments:   # a system of equations as cases / aligned
            eqs = [f'{n(1, 5)}{v} {rng.choice("+-")} {n(1, 5)}{v2} & = {n(1, 20)}',
                   f'{n(1, 5)}{v} {rng.choice("+-")} {v2} & = {n(1, 20)}']
            if rng.random() < 0.3:
                eqs.append(f'{v} {rng.choice("+-")} {n(1, 5)}{v2} & = {n(1, 9)}')
            env = rng.choice(['cases', 'cases', 'aligned'])
            body = r' \\ '.join(e.replace('& ', '') if env == 'cases' else e for e in eqs)
            out = rf'\begin{{{env}}} {body} \end{{{env}}}'
            return out if env == 'cases' or rng.random() < 0.5 else rf'\left\{{ {out} \right.'
        sp = rng.choice([r'\quad', r'\qquad', ''])
        return (f'{n(1, 5)}{v} {rng.choice("+-")} {n(1, 5)}{v2} = {n(1, 20)}, '
                f'{sp} {n(1, 5)}{v} {rng.choice("+-")} {v2} = {n(1, 20)}')

    def _arith(self, v):
        rng, n = self.rng, self.n
        ops = [rng.choice(['+', '-', r'\times', r'\div', r'\cdot']) for _ in range(rng.randint(1, 3))]
        out = n(1, 99)
        for op in ops:
            nxt = n(1, 30) if rng.random() < 0.8 else f'({n(1, 9)} {rng.choice("+-")} {n(1, 9)})'
            out += f' {op} {nxt}'
        return out + (f' = {n(0, 200)}' if rng.random() < 0.7 else '')

    def _abs(self, v):
        rng, n = self.rng, self.n
        rel = rng.choice(['=', '<', '>', r'\leq', r'\geq'])
        return f'|{self.lin(v)}| {rel} {n(0, 12)}'

    def _mixed(self, v):
        rng, n = self.rng, self.n
        op = rng.choice(['+', '-', r'\times'])
        return f'{n(1, 9)}\\frac{{{n(1, 5)}}}{{{n(6, 9)}}} {op} {n(1, 9)}\\frac{{{n(1, 5)}}}{{{n(6, 9)}}}'

    def _geometry(self, v):
        rng, n = self.rng, self.n
        P = rng.sample(UPPER[:16], 4)
        return rng.choice([fr'{P[0]}{P[1]} \parallel {P[2]}{P[3]}', fr'{P[0]}{P[1]} \perp {P[2]}{P[3]}',
                           fr'\triangle {P[0]}{P[1]}{P[2]} \cong \triangle {P[3]}{P[1]}{P[2]}',
                           fr'\triangle {P[0]}{P[1]}{P[2]} \sim \triangle {P[3]}{P[1]}{P[2]}',
                           fr'{P[0]}{P[1]} = {n(2, 20)} \mathrm{{cm}}', fr'\overline{{{P[0]}{P[1]}}}',
                           fr'\overrightarrow{{{P[0]}{P[1]}}} + \overrightarrow{{{P[1]}{P[2]}}} = '
                           fr'\overrightarrow{{{P[0]}{P[2]}}}'])

    def _ratio(self, v):
        n = self.n
        return f'{n()} : {n()} = {v} : {n()}'

    def _sci(self, v):
        rng, n = self.rng, self.n
        return f'{n(1, 9)}.{n(0, 99)} \\times 10^{{{rng.choice(["", "-"])}{n(1, 12)}}}'


# -----------------------------------------------------------------------------
# chemistry: equations and notation

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

    def __init__(self, rng, environments=False):   # environments: none in this domain
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


# -----------------------------------------------------------------------------
# all domains

GENERATORS = {'openai': OpenAIGenerator, 'math': MathGenerator, 'chemistry': ChemistryGenerator}


def generate(domain, rng, environments=False):
    """One formula of `domain` drawn with rng -> its label: tokenized, tokens joined by single spaces.
    environments: also write environments (openai: about ENV_SHARE of the formulas; math: systems of
    equations as cases / aligned); only a real TeX renders them."""
    raw = GENERATORS[domain](rng, environments)()
    return detokenize(tokenize(raw if isinstance(raw, str) else ' '.join(raw)))
