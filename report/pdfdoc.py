"""A tiny flowing-layout PDF writer on matplotlib's PDF backend (no LaTeX on these machines):
headings, wrapped paragraphs, mathtext lines, monospace tables and PNG figures, top to bottom,
with a new A4 page whenever the current one is full."""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402

PAGE_W, PAGE_H = 8.27, 11.69          # A4, inches
MARGIN_X, MARGIN_TOP, MARGIN_BOTTOM = 0.6, 0.55, 0.5
TEXT_W = PAGE_W - 2 * MARGIN_X


class Document:
    def __init__(self, path: Path, title: str, subtitle: str = "", body_size: float = 8.6):
        self.path = Path(path)
        self.body_size = body_size
        self.pdf = PdfPages(self.path.with_name(f".{self.path.name}.tmp"))
        self.pages = 0
        self.texts = []                  # everything written, in order (for tests and checks)
        self.fig = None
        self._new_page()
        self._text(title, size=14, weight="bold")
        if subtitle:
            for line in _wrap(subtitle, int(TEXT_W * 72 / (8.5 * 0.5))):
                self._text(line, size=8.5, style="italic")
        self.space(0.05)

    # -- layout primitives -------------------------------------------------------------------
    def _new_page(self):
        if self.fig is not None:
            self._finish_page()
        self.fig = plt.figure(figsize=(PAGE_W, PAGE_H))
        self.pages += 1
        self.y = PAGE_H - MARGIN_TOP                     # inches from the bottom

    def _finish_page(self):
        self.fig.text(0.5, MARGIN_BOTTOM / 2 / PAGE_H, str(self.pages), ha="center", fontsize=7,
                      color="0.4")
        self.pdf.savefig(self.fig)
        plt.close(self.fig)

    def _need(self, height: float):
        if self.y - height < MARGIN_BOTTOM:
            self._new_page()

    def _text(self, text, size, x=MARGIN_X, family="sans-serif", **kw):
        self.texts.append(text)
        line_h = size * 1.32 / 72
        lines = text.split("\n")
        self._need(line_h * len(lines))
        self.fig.text(x / PAGE_W, self.y / PAGE_H, text, fontsize=size, va="top", ha="left",
                      family=family, linespacing=1.25, **kw)
        self.y -= line_h * len(lines)

    def space(self, inches: float):
        self.y -= inches

    # -- content -------------------------------------------------------------------------------
    def heading(self, text: str, level: int = 1):
        size = {1: 11.5, 2: 9.8}[level]
        self._need(0.6)                                   # keep a heading with what follows
        self.space(0.08 if level == 1 else 0.04)
        self._text(text, size=size, weight="bold")
        self.space(0.02)

    def para(self, text: str, size: float | None = None, indent: float = 0.0):
        """A paragraph wrapped to the text width (plain text; keep $math$ short, it is not split
        inside $...$ because those words contain no spaces)."""
        size = size or self.body_size
        chars = int((TEXT_W - indent) * 72 / (size * 0.50))
        for chunk in _wrap(text, chars):
            self._text(chunk, size=size, x=MARGIN_X + indent)
        self.space(0.05)

    def bullets(self, items, size: float | None = None):
        for item in items:
            size = size or self.body_size
            chars = int((TEXT_W - 0.2) * 72 / (size * 0.50))
            lines = _wrap(item, chars)
            self._text("\u2022", size=size, x=MARGIN_X + 0.05)
            self.y += size * 1.32 / 72
            for line in lines:
                self._text(line, size=size, x=MARGIN_X + 0.2)
        self.space(0.04)

    def math(self, lines, size: float = 9.5, indent: float = 0.3):
        """Display equations (matplotlib mathtext), one per line."""
        for line in lines:
            self.texts.append(line)
            self._need(size * 2.0 / 72)
            self.fig.text((MARGIN_X + indent) / PAGE_W, self.y / PAGE_H, line, fontsize=size,
                          va="top", ha="left")
            self.y -= size * 2.0 / 72
        self.space(0.04)

    def table(self, rows, size: float = 7.6):
        """Rows of cells, laid out in monospace columns."""
        rows = [[str(c) for c in row] for row in rows]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        text = "\n".join("  ".join(c.rjust(w) if k else c.ljust(w)
                                   for k, (c, w) in enumerate(zip(r, widths))) for r in rows)
        self._text(text, size=size, family="monospace", x=MARGIN_X + 0.1)
        self.space(0.06)

    def images(self, paths, width: float = 1.0, caption: str | None = None,
               max_height: float | None = None):
        """PNG figures side by side across `width` of the text width, scaled to a common height."""
        imgs = [mpimg.imread(str(p)) for p in paths]
        ratios = [im.shape[1] / im.shape[0] for im in imgs]
        gap = 0.1
        total_w = TEXT_W * width - gap * (len(imgs) - 1)
        height = total_w / sum(ratios)
        if max_height and height > max_height:
            height = max_height
        cap_h = 0 if not caption else self.body_size * 1.32 / 72 * len(_wrap(caption, 150)) + 0.05
        self._need(height + cap_h + 0.05)
        x = MARGIN_X + (TEXT_W - (height * sum(ratios) + gap * (len(imgs) - 1))) / 2
        for im, r in zip(imgs, ratios):
            ax = self.fig.add_axes([x / PAGE_W, (self.y - height) / PAGE_H, height * r / PAGE_W,
                                    height / PAGE_H])
            ax.imshow(im, interpolation="lanczos")
            ax.set_axis_off()
            x += height * r + gap
        self.y -= height + 0.04
        if caption:
            self.para(caption, size=self.body_size - 0.8)

    def text(self) -> str:
        """All text written so far, as one string with paragraph lines rejoined."""
        return " ".join(self.texts)

    def save(self):
        """Write the PDF (temporary file, then rename); returns the document."""
        self._finish_page()
        self.pdf.close()
        self.path.with_name(f".{self.path.name}.tmp").replace(self.path)
        return self


def _wrap(text, chars):
    out = []
    for paragraph in text.split("\n"):
        out.extend(textwrap.wrap(paragraph, chars, break_long_words=False) or [""])
    return out
