"""Per-epoch metrics: a CSV file always, TensorBoard when it is installed."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from distill.checkpoints import atomic_write
from distill.errors import DistillError


class MetricsLog:
    """Rows of ``{column: value}``, one per epoch, rewritten to ``path`` after each row."""

    def __init__(self, path: str | Path | None, tensorboard_dir: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self.rows: list[dict[str, float]] = []
        self._columns: list[str] | None = None
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tb = None  # optional: pip install 'distill[tensorboard]'
            else:
                self._tb = SummaryWriter(str(tensorboard_dir))

    def restore(self, rows: list[dict[str, float]]) -> None:
        """Start from ``rows`` (a resumed run); the file is rewritten on the next append."""
        self.rows = [dict(r) for r in rows]
        self._columns = None

    def append(self, row: dict[str, float]) -> None:
        self.rows.append(dict(row))
        if self.path is not None:
            columns = list(dict.fromkeys(k for r in self.rows for k in r))
            if columns == self._columns:  # the common case: one more line
                with open(self.path, "a", newline="") as f:
                    csv.DictWriter(f, fieldnames=columns).writerow(row)
            else:  # first row, new columns, or a resumed run: write the whole file afresh
                buffer = io.StringIO()
                writer = csv.DictWriter(buffer, fieldnames=columns)
                writer.writeheader()
                writer.writerows(self.rows)
                data = buffer.getvalue().encode()
                atomic_write(self.path, lambda f: f.write(data))
                self._columns = columns
        if self._tb is not None:
            step = int(row.get("epoch", len(self.rows)))
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """Rows of a metrics CSV, values as floats (empty cells dropped); a cell that is not a number
    is a :class:`DistillError` naming the file, line and column."""
    rows = []
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                parsed = {}
                for key, value in row.items():
                    if value in ("", None) or key is None:  # empty cell, or cells beyond the header
                        continue
                    try:
                        parsed[key] = float(value)
                    except ValueError:
                        raise DistillError(
                            f"metrics file {path} is corrupt: line {reader.line_num}, column '{key}' holds "
                            f"{value[:40]!r}, not a number"
                        ) from None
                rows.append(parsed)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DistillError(f"metrics file {path} is corrupt ({exc})") from None
    return rows
