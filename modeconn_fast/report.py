"""A markdown report made of sections, each with its text and pictures (the demo writes one)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


@dataclass
class Section:
    title: str
    body: str
    figures: list[str] = field(default_factory=list)  # file names relative to the report's folder


@dataclass
class Report:
    title: str
    intro: str = ""
    sections: list[Section] = field(default_factory=list)

    def add(self, section: Section) -> None:
        self.sections.append(section)

    def markdown(self) -> str:
        parts = [f"# {self.title}\n"]
        if self.intro:
            parts.append(self.intro.strip() + "\n")
        for section in self.sections:
            parts.append(f"## {section.title}\n\n{section.body.strip()}\n")
            parts.extend(f"![{section.title}]({figure})\n" for figure in section.figures)
        return "\n".join(parts)

    def write(self, file: str | Path) -> Path:
        file = Path(file)
        file.parent.mkdir(parents=True, exist_ok=True)
        temporary = file.with_suffix(file.suffix + ".tmp")
        temporary.write_text(self.markdown(), encoding="utf-8")
        temporary.replace(file)
        return file


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; floats are written with 4 decimals."""
    def cell(value: object) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
