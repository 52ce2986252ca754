"""`report.pdf`: a run's compliance record as a PDF (`silofed audit report RUN_DIR --pdf`).

Rendered with reportlab (pure Python wheels, no system libraries) from the same sections as the
HTML (`server.compliance.sections`), so the two say the same. Text is set in DejaVu Sans, the font
matplotlib ships, embedded in the file: the record's Greek letters (ε, δ) and any BU or column
name print as written, on any machine, without fonts installed. Charts are matplotlib figures
embedded as PNG. The file is reproducible: the same record gives the same bytes.
"""

from __future__ import annotations

import io

from server.compliance import Bullets, Chart, ComplianceRecord, Paragraph, Table, sections

_FONT, _BOLD = "DejaVuSans", "DejaVuSans-Bold"
_DPI = 150


def pdf_bytes(record: ComplianceRecord) -> bytes:
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import ParagraphStyle
    from reportlab.lib.units import mm
    from reportlab.platypus import (
        Image,
        KeepTogether,
        ListFlowable,
        ListItem,
        SimpleDocTemplate,
        Spacer,
    )
    from reportlab.platypus import Paragraph as Text

    _register_fonts()
    body = ParagraphStyle("body", fontName=_FONT, fontSize=9, leading=12, spaceAfter=4)
    cell = ParagraphStyle("cell", fontName=_FONT, fontSize=7, leading=9)
    head = ParagraphStyle("head", parent=cell, fontName=_BOLD)
    h1 = ParagraphStyle("h1", fontName=_BOLD, fontSize=15, leading=19, spaceAfter=8)
    h2 = ParagraphStyle(
        "h2", fontName=_BOLD, fontSize=11.5, leading=15, spaceBefore=10, spaceAfter=5
    )

    buffer = io.BytesIO()
    document = SimpleDocTemplate(
        buffer,
        pagesize=A4,
        leftMargin=15 * mm,
        rightMargin=15 * mm,
        topMargin=15 * mm,
        bottomMargin=15 * mm,
        title=f"silofed compliance record {record.run_id}",
        author="silofed",
        subject="compliance record rendered from the run's audit log",
        invariant=True,  # no creation date or random id: the same record gives the same bytes
    )
    width = document.width
    story: list = [
        Text(f"Compliance record of run {_x(record.run_id)}", h1),
        Text(
            f"Rendered from the run's audit log (audit.jsonl, entries 0 to {record.entries - 1}), "
            "not from report.json.",
            body,
        ),
    ]
    for section in sections(record):
        parts: list = [Text(_x(section.title), h2)]
        for block in section.blocks:
            if isinstance(block, Paragraph):
                parts.append(Text(_x(block.text), body))
            elif isinstance(block, Bullets):
                parts.append(
                    ListFlowable(
                        [ListItem(Text(_x(item), body), leftIndent=10) for item in block.items],
                        bulletType="bullet",
                        bulletFontName=_FONT,
                        leftIndent=10,
                    )
                )
            elif isinstance(block, Table):
                parts.append(_grid(block, cell, head, width))
                parts.append(Spacer(1, 4))
            elif isinstance(block, Chart):
                png, (w, h) = _png(block)
                scale = min(1.0, 0.7 * width / w)
                parts.append(Image(io.BytesIO(png), width=w * scale, height=h * scale))
                parts.append(Text(_x(block.caption), cell))
        # a section's title stays with its first block
        story += [KeepTogether(parts[:2]), *parts[2:]]
    document.build(story)
    return buffer.getvalue()


def _grid(block: Table, cell, head, width: float):
    from reportlab.lib import colors
    from reportlab.platypus import Paragraph as Text
    from reportlab.platypus import Table as Grid

    header = [Text(_x(h), head) for h in block.header]
    rows = [[Text(_x(v), cell) for v in row] for row in block.rows]
    data = [header, *rows] if any(block.header) else rows
    grid = Grid(data, colWidths=_widths(block, width), repeatRows=1 if any(block.header) else 0)
    grid.setStyle(
        [
            ("GRID", (0, 0), (-1, -1), 0.25, colors.HexColor("#bbbbbb")),
            ("VALIGN", (0, 0), (-1, -1), "TOP"),
            ("LEFTPADDING", (0, 0), (-1, -1), 3),
            ("RIGHTPADDING", (0, 0), (-1, -1), 3),
            *(
                [("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#f0f0f0"))]
                if any(block.header)
                else []
            ),
        ]
    )
    return grid


def _widths(block: Table, width: float) -> list[float]:
    """Column widths in proportion to each column's text (long texts wrap), and never narrower
    than the column's longest word, so that words are not broken where the line allows."""
    columns = len(block.header) if block.header else len(block.rows[0])
    cells = [[str(block.header[i]), *(str(row[i]) for row in block.rows)] for i in range(columns)]
    wanted = [min(max(len(c) for c in column), 60) + 3 for column in cells]
    words = [max(len(w) for c in column for w in (c.split() or [""])) + 2 for column in cells]
    share = [max(a, b) for a, b in zip(wanted, words, strict=True)]
    return [width * s / sum(share) for s in share]


def _png(chart: Chart) -> tuple[bytes, tuple[float, float]]:
    """The chart as PNG, and its size in points."""
    import matplotlib
    from matplotlib.figure import Figure

    from server.html import CHART_STYLE

    with matplotlib.rc_context(CHART_STYLE):
        figure = Figure(figsize=chart.size, layout="constrained")
        chart.draw(figure)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    width, height = chart.size
    return buffer.getvalue(), (width * 72, height * 72)


def _x(value: object) -> str:
    """Text for reportlab's paragraph markup: escaped, without the backquotes of `code` spans."""
    import html

    return html.escape(str(value), quote=False).replace("`", "")


def _register_fonts() -> None:
    from matplotlib import font_manager
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont

    registered = pdfmetrics.getRegisteredFontNames()
    for name, weight in ((_FONT, "normal"), (_BOLD, "bold")):
        if name not in registered:
            path = font_manager.findfont(
                font_manager.FontProperties(family="DejaVu Sans", weight=weight),
                fallback_to_default=False,
            )
            pdfmetrics.registerFont(TTFont(name, path))
