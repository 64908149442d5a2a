"""Tables in, tensors out: the one pipeline under the command line and the scikit-learn faces.

A data file (CSV, Parquet, NPZ, or a UCI folder) is read into a :class:`Table`: named columns,
each a numpy array of numbers (``float64``) or of text (``object``), with the file's name and the
row number of its first row, so that every error can name the file, the row and the column.

A :class:`TabularPipeline` is fitted on a table and a target column. Numeric columns are
standardised (the mean and standard deviation of the training rows), text columns are one-hot
encoded (the categories seen in training, sorted). The target is a class (text or a few
integers; the classes are stored, sorted) or a number (standardised). The pipeline is plain JSON
(:meth:`TabularPipeline.to_json`), saved in the model file, so a model file predicts from a raw
table with no code of the user's.

Formats:

* ``.csv`` (and ``.tsv``, ``.txt`` with tabs): a header row of column names, then one row per
  example. A column is numeric when every value parses as a number; empty cells, ``NA`` and
  ``NaN`` are missing values, which the pipeline refuses with the row and column.
* ``.parquet``: read with pyarrow (``pip install 'bayesdl[parquet]'``).
* ``.npz``: one 1-D array per column (``numpy.savez(path, age=..., sex=...)``); a 2-D array
  ``x`` gives the columns ``x0, x1, ...``. Read with ``allow_pickle=False``: no code runs.
* a UCI folder (``data.txt``, ``index_features.txt``, ``index_target.txt``, ...): the columns
  ``x0, x1, ...`` and the target ``y``.

Large files are read in batches (:func:`iter_table`), so predicting a million rows takes bounded
memory.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DataError",
    "Table",
    "TabularPipeline",
    "infer_task",
    "iter_table",
    "read_table",
]

#: Text read as a missing value in CSV files.
MISSING = frozenset({"", "na", "nan", "n/a", "null", "none", "-"})
#: A numeric target with at most this many distinct integer values is taken as classes.
MAX_INTEGER_CLASSES = 20
DEFAULT_BATCH_ROWS = 65_536


class DataError(ValueError):
    """Data that cannot be used: the message names the file, row and column, and what to do."""


@dataclass
class Table:
    """Named columns of one data file (or a batch of its rows).

    Attributes
    ----------
    columns: name -> ``(N,)`` array, ``float64`` (numbers, NaN where missing) or ``object``
        (text, ``None`` where missing).
    source: the file it came from, for messages.
    first_row: the number of the row ``columns[...][0]`` in its file, counting data rows from 1
        (a CSV header is not counted).
    """

    columns: dict[str, np.ndarray]
    source: str = "<data>"
    first_row: int = 1

    def __post_init__(self) -> None:
        lengths = {len(v) for v in self.columns.values()}
        if len(lengths) > 1:
            raise DataError(f"{self.source}: columns of different lengths {sorted(lengths)}.")

    @property
    def n_rows(self) -> int:
        """Rows ``N`` of every column."""
        return len(next(iter(self.columns.values()))) if self.columns else 0

    @property
    def names(self) -> list[str]:
        """The column names, in file order."""
        return list(self.columns)

    def column(self, name: str) -> np.ndarray:
        """Column ``name``, ``(N,)``; a :class:`DataError` listing the columns if absent."""
        if name not in self.columns:
            raise DataError(
                f"{self.source}: no column {name!r}; the columns are {_names(self.names)}."
            )
        return self.columns[name]

    def take(self, rows: np.ndarray) -> Table:
        """The rows at ``rows`` (their row numbers are no longer contiguous: messages then
        count rows of the subset)."""
        return Table({k: v[rows] for k, v in self.columns.items()}, self.source, 1)

    def where(self, row: int) -> str:
        """``"file.csv, row 17"`` for the ``row``-th row of this table (0-based)."""
        return f"{self.source}, row {self.first_row + row}"


def _names(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# --------------------------------------------------------------------------------- reading
def _kind(path: Path) -> str:
    if path.is_dir():
        return "uci"
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".txt"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".npz":
        return "npz"
    raise DataError(
        f"{path}: unknown data format {suffix or '(no extension)'!r}; bayesdl reads .csv, "
        ".parquet, .npz files and UCI folders."
    )


def read_table(path: str | Path) -> Table:
    """The whole file at ``path`` as one :class:`Table`."""
    batches = list(iter_table(path, batch_rows=None))
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    return Table(
        {k: np.concatenate([b.columns[k] for b in batches]) for k in first.columns},
        first.source,
        first.first_row,
    )


def iter_table(path: str | Path, batch_rows: int | None = DEFAULT_BATCH_ROWS) -> Iterator[Table]:
    """The file at ``path`` in tables of at most ``batch_rows`` rows (``None``: one table).

    Raises ``FileNotFoundError`` for a missing path and :class:`DataError` for a file that
    cannot be read as a table.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {str(path)!r}")
    kind = _kind(path)
    if kind == "csv":
        yield from _iter_csv(path, batch_rows)
    elif kind == "parquet":
        yield from _iter_parquet(path, batch_rows)
    elif kind == "npz":
        yield from _batches(_read_npz(path), batch_rows)
    else:
        yield from _batches(_read_uci(path), batch_rows)


def _batches(table: Table, batch_rows: int | None) -> Iterator[Table]:
    if batch_rows is None or table.n_rows <= batch_rows:
        yield table
        return
    for start in range(0, table.n_rows, batch_rows):
        part = {k: v[start : start + batch_rows] for k, v in table.columns.items()}
        yield Table(part, table.source, table.first_row + start)


def _typed(values: list[str]) -> np.ndarray:
    """A CSV column: ``float64`` if every present value is a number, else text."""
    numbers = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        text = v.strip()
        if text.lower() in MISSING:
            numbers[i] = math.nan
            continue
        try:
            numbers[i] = float(text)
        except ValueError:
            out = np.empty(len(values), dtype=object)
            out[:] = [None if s.strip().lower() in MISSING else s.strip() for s in values]
            return out
    return numbers


def _iter_csv(path: Path, batch_rows: int | None) -> Iterator[Table]:
    source = str(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        sample = f.read(65_536)
        f.seek(0)
        delimiter = (
            "\t" if path.suffix.lower() == ".tsv" or ("\t" in sample and "," not in sample) else ","
        )
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(
                f"{source} is empty; a CSV file needs a header row of column names."
            ) from None
        except (csv.Error, UnicodeDecodeError) as err:
            raise DataError(f"{source} is not a readable CSV file: {err}") from None
        header = [h.strip() for h in header]
        if not all(header) or len(set(header)) != len(header):
            raise DataError(
                f"{source}: the header row must name every column once, got {header!r}."
            )
        rows: list[list[str]] = []
        first = 1
        try:
            for line in reader:
                if not line or (len(line) == 1 and not line[0].strip()):
                    continue  # a blank line
                if len(line) != len(header):
                    raise DataError(
                        f"{source}, row {first + len(rows)}: {len(line)} values, but the header "
                        f"names {len(header)} columns."
                    )
                rows.append(line)
                if batch_rows is not None and len(rows) == batch_rows:
                    yield _csv_table(header, rows, source, first)
                    first += len(rows)
                    rows = []
        except (csv.Error, UnicodeDecodeError) as err:
            raise DataError(f"{source}, row {first + len(rows)}: not readable CSV: {err}") from None
        if rows or first == 1:
            if not rows:
                raise DataError(f"{source} has a header but no rows.")
            yield _csv_table(header, rows, source, first)


def _csv_table(header: list[str], rows: list[list[str]], source: str, first: int) -> Table:
    columns = list(zip(*rows, strict=True))
    return Table({h: _typed(list(c)) for h, c in zip(header, columns, strict=True)}, source, first)


def _arrow_column(values) -> np.ndarray:
    import pyarrow as pa

    t = values.type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return values.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
    out = np.empty(len(values), dtype=object)
    out[:] = [None if v is None else str(v) for v in values.to_pylist()]
    return out


def _iter_parquet(path: Path, batch_rows: int | None) -> Iterator[Table]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet needs pyarrow: pip install 'bayesdl[parquet]' (or pyarrow)."
        ) from None
    try:
        parquet = pq.ParquetFile(path)
        first = 1
        for batch in parquet.iter_batches(
            batch_size=batch_rows or max(parquet.metadata.num_rows, 1)
        ):
            columns = {
                name: _arrow_column(batch.column(i)) for i, name in enumerate(batch.schema.names)
            }
            yield Table(columns, str(path), first)
            first += batch.num_rows
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not a readable Parquet file: {err}") from None


def _read_npz(path: Path) -> Table:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not a readable .npz file: {err}") from None
    columns: dict[str, np.ndarray] = {}
    with archive:
        for name in archive.files:
            try:
                a = archive[name]
            except ValueError as err:  # object arrays need pickle: refused
                raise DataError(
                    f"{path}: array {name!r} cannot be read without pickle ({err}); "
                    "save text as a string array (dtype 'U')."
                ) from None
            if a.ndim == 1:
                columns[name] = _npz_column(a)
            elif a.ndim == 2:
                for j in range(a.shape[1]):
                    columns[f"{name}{j}"] = _npz_column(a[:, j])
            else:
                raise DataError(
                    f"{path}: array {name!r} has shape {a.shape}; an .npz table holds 1-D columns "
                    "or 2-D blocks of columns."
                )
    if not columns:
        raise DataError(f"{path} holds no arrays.")
    return Table(columns, str(path), 1)


def _npz_column(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "biuf":
        return a.astype(np.float64)
    out = np.empty(len(a), dtype=object)
    out[:] = [str(v) for v in a.tolist()]
    return out


def _read_uci(path: Path) -> Table:
    from bayesdl.data.uci import UCIFormatError, load_uci

    try:
        data = load_uci(path)
    except UCIFormatError as err:
        raise DataError(str(err)) from None
    values = data.data.numpy()
    columns = {f"x{i}": values[:, c].astype(np.float64) for i, c in enumerate(data.features)}
    columns["y"] = values[:, data.target].astype(np.float64)
    return Table(columns, str(path / "data.txt"), 1)


# -------------------------------------------------------------------------------- the task
def infer_task(values: np.ndarray) -> tuple[str, str]:
    """``(task, reason)`` for a target column: text or at most
    :data:`MAX_INTEGER_CLASSES` distinct integers are classes, other numbers are regression."""
    if values.dtype == object:
        return "classification", "the target holds text"
    present = values[~np.isnan(values)]
    distinct = np.unique(present)
    if len(distinct) <= MAX_INTEGER_CLASSES and np.all(distinct == np.round(distinct)):
        return (
            "classification",
            f"the target holds {len(distinct)} distinct integers (at most {MAX_INTEGER_CLASSES})",
        )
    return "regression", "the target holds numbers that are not a few integers"


def _label(value) -> str:
    """A class label as text: ``3.0`` -> ``"3"``."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


# ---------------------------------------------------------------------------- the pipeline
@dataclass(frozen=True)
class Column:
    """How one input column is encoded: ``numeric`` (standardised with ``mean`` and ``std``)
    or ``categorical`` (one-hot over ``categories``)."""

    name: str
    kind: str
    mean: float | None = None
    std: float | None = None
    categories: tuple[str, ...] | None = None

    @property
    def width(self) -> int:
        """Encoded features of this column: 1, or one per category."""
        return 1 if self.kind == "numeric" else len(self.categories)

    @property
    def feature_names(self) -> list[str]:
        """Names of this column's encoded features."""
        if self.kind == "numeric":
            return [self.name]
        return [f"{self.name}={c}" for c in self.categories]


@dataclass(frozen=True)
class TabularPipeline:
    """Encodes a table's columns into a float tensor ``(N, F)`` and its target into labels
    ``(N,)`` or standardised numbers ``(N,)``; fitted by :meth:`fit`, saved as JSON.

    Attributes
    ----------
    columns: the input columns, in the order their features appear.
    target: the target column's name.
    task: ``"classification"`` or ``"regression"``.
    classes: classification: the class labels (text), index ``k`` is class ``k``.
    y_mean, y_std: regression: the target's standardisation.
    """

    columns: tuple[Column, ...]
    target: str
    task: str
    classes: tuple[str, ...] | None = None
    y_mean: float | None = None
    y_std: float | None = None
    notes: tuple[str, ...] = field(default=(), compare=False)

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        table: Table,
        target: str,
        *,
        task: str | None = None,
        features: Sequence[str] | None = None,
        categorical: Sequence[str] = (),
    ) -> TabularPipeline:
        """Fit the encoders on ``table`` (the training rows).

        Parameters
        ----------
        table: the training data.
        target: the target column.
        task: ``"classification"`` or ``"regression"``; inferred from the target when ``None``
            (:func:`infer_task`; the reason is in :attr:`notes`).
        features: the input columns (default: every column but the target).
        categorical: numeric columns to one-hot encode anyway (codes, zip codes, ...).
        """
        y = table.column(target)
        notes = []
        if task is None:
            task, reason = infer_task(y)
            notes.append(f"task: {task} ({reason}; pass --task to choose)")
        elif task not in ("classification", "regression"):
            raise DataError(f"task must be 'classification' or 'regression', got {task!r}.")
        names = [n for n in table.names if n != target] if features is None else list(features)
        if not names:
            raise DataError(f"{table.source}: no input columns besides the target {target!r}.")
        for name in (*names, *categorical):
            table.column(name)
            if name == target:
                raise DataError(f"the target {target!r} cannot also be an input column.")
        columns = []
        for name in names:
            values = table.column(name)
            if values.dtype == object or name in categorical:
                labels = _present_labels(table, name, values)
                columns.append(Column(name, "categorical", categories=tuple(sorted(set(labels)))))
            else:
                _check_numbers(table, name, values)
                mean, std = float(values.mean()), float(values.std())
                columns.append(Column(name, "numeric", mean=mean, std=std if std > 0 else 1.0))
        if task == "classification":
            labels = _present_labels(table, target, y)
            classes = tuple(sorted(set(labels), key=_class_order))
            if len(classes) < 2:
                raise DataError(
                    f"{table.source}: the target {target!r} has only one class ({classes[0]!r}); "
                    "a classifier needs at least two."
                )
            return cls(tuple(columns), target, task, classes=classes, notes=tuple(notes))
        if y.dtype == object:
            raise DataError(
                f"{table.source}: the target {target!r} holds text, so it cannot be regressed; "
                "use --task classification, or clean the column."
            )
        _check_numbers(table, target, y)
        std = float(y.std())
        return cls(
            tuple(columns),
            target,
            task,
            y_mean=float(y.mean()),
            y_std=std if std > 0 else 1.0,
            notes=tuple(notes),
        )

    # ------------------------------------------------------------------ shapes
    @property
    def n_features(self) -> int:
        """Width ``F`` of the encoded inputs."""
        return sum(c.width for c in self.columns)

    @property
    def feature_names(self) -> list[str]:
        """Names of the encoded features, ``(F,)``: a numeric column's name, ``"col=value"``
        per category."""
        return [n for c in self.columns for n in c.feature_names]

    @property
    def input_columns(self) -> list[str]:
        """Names of the raw input columns the pipeline reads."""
        return [c.name for c in self.columns]

    @property
    def n_outputs(self) -> int:
        """Classes, or 1 for regression."""
        return len(self.classes) if self.task == "classification" else 1

    # ------------------------------------------------------------------ encoding
    def transform(self, table: Table, *, dtype: torch.dtype = torch.float32) -> Tensor:
        """The inputs of ``table`` encoded, ``(N, F)``; extra columns are ignored.

        Raises :class:`DataError` naming the row and column of a missing input column, a
        missing value, text in a numeric column, or a category not seen in training.
        """
        missing = [c.name for c in self.columns if c.name not in table.columns]
        if missing:
            raise DataError(
                f"{table.source}: the model needs the column(s) {_names(missing)}, which the "
                f"file lacks; it has {_names(table.names)}."
            )
        blocks = []
        for col in self.columns:
            values = table.columns[col.name]
            if col.kind == "numeric":
                numbers = _as_numbers(table, col.name, values)
                blocks.append(((numbers - col.mean) / col.std)[:, None])
            else:
                codes = _codes(table, col.name, values, col.categories, "category")
                one_hot = np.zeros((len(codes), col.width), dtype=np.float64)
                one_hot[np.arange(len(codes)), codes] = 1.0
                blocks.append(one_hot)
        x = np.concatenate(blocks, axis=1) if blocks else np.zeros((table.n_rows, 0))
        return torch.from_numpy(x).to(dtype)

    def transform_target(self, table: Table, *, dtype: torch.dtype = torch.float32) -> Tensor:
        """The target of ``table``: class indices ``(N,)`` long, or standardised numbers
        ``(N,)``."""
        y = table.column(self.target)
        if self.task == "classification":
            return torch.from_numpy(_codes(table, self.target, y, self.classes, "class"))
        numbers = _as_numbers(table, self.target, y)
        return torch.from_numpy((numbers - self.y_mean) / self.y_std).to(dtype)

    def target_values(self, table: Table) -> np.ndarray:
        """The target in its own units: labels (text) or numbers, ``(N,)``."""
        y = table.column(self.target)
        if self.task == "classification":
            return np.asarray(_present_labels(table, self.target, y), dtype=object)
        return _as_numbers(table, self.target, y)

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict:
        """The pipeline as plain JSON values (what model files store)."""
        return {
            "columns": [
                {"name": c.name, "kind": c.kind, "mean": c.mean, "std": c.std}
                if c.kind == "numeric"
                else {"name": c.name, "kind": c.kind, "categories": list(c.categories)}
                for c in self.columns
            ],
            "target": self.target,
            "task": self.task,
            "classes": None if self.classes is None else list(self.classes),
            "y_mean": self.y_mean,
            "y_std": self.y_std,
        }

    @classmethod
    def from_json(cls, data: object) -> TabularPipeline:
        """The pipeline :meth:`to_json` wrote; ``ValueError`` for anything malformed."""
        try:
            columns = []
            for c in data["columns"]:
                if c["kind"] == "numeric":
                    mean, std = float(c["mean"]), float(c["std"])
                    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
                        raise ValueError("bad statistics")
                    columns.append(Column(str(c["name"]), "numeric", mean=mean, std=std))
                elif c["kind"] == "categorical":
                    cats = tuple(str(v) for v in c["categories"])
                    if not cats:
                        raise ValueError("no categories")
                    columns.append(Column(str(c["name"]), "categorical", categories=cats))
                else:
                    raise ValueError(f"unknown column kind {c['kind']!r}")
            task = data["task"]
            if task == "classification":
                classes = tuple(str(v) for v in data["classes"])
                if len(classes) < 2:
                    raise ValueError("fewer than two classes")
                return cls(tuple(columns), str(data["target"]), task, classes=classes)
            if task != "regression":
                raise ValueError(f"unknown task {task!r}")
            y_mean, y_std = float(data["y_mean"]), float(data["y_std"])
            if not (math.isfinite(y_mean) and math.isfinite(y_std) and y_std > 0):
                raise ValueError("bad target statistics")
            return cls(tuple(columns), str(data["target"]), task, y_mean=y_mean, y_std=y_std)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a tabular pipeline: {err}") from None


def _class_order(label: str):
    """Numeric labels in numeric order ("2" before "10"), then text."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def _present_labels(table: Table, name: str, values: np.ndarray) -> list[str]:
    """Values as text labels; a missing one is an error naming its row."""
    if values.dtype == object:
        for i, v in enumerate(values):
            if v is None:
                raise DataError(f"{table.where(i)}, column {name!r}: missing value.")
        return [str(v) for v in values]
    bad = np.flatnonzero(np.isnan(values))
    if len(bad):
        raise DataError(f"{table.where(int(bad[0]))}, column {name!r}: missing value.")
    return [_label(v) for v in values]


def _codes(table: Table, name: str, values: np.ndarray, known: Sequence[str], what: str):
    """Index into ``known`` of each value of a column, ``(N,)`` int64; a missing value or one
    not seen in training (a ``what``: category or class) is an error naming its row."""
    index = {c: i for i, c in enumerate(known)}
    labels = _present_labels(table, name, values)
    codes = np.empty(len(labels), dtype=np.int64)
    for i, label in enumerate(labels):
        if label not in index:
            raise DataError(
                f"{table.where(i)}, column {name!r}: {what} {label!r} was not seen in training "
                f"(known: {_names(list(known))})."
            )
        codes[i] = index[label]
    return codes


def _check_numbers(table: Table, name: str, values: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        i = int(bad[0])
        what = "missing value (NaN)" if np.isnan(values[i]) else "infinite value"
        raise DataError(
            f"{table.where(i)}, column {name!r}: {what}; bayesdl needs every value of a numeric "
            "column. Fill or drop such rows first."
        )


def _as_numbers(table: Table, name: str, values: np.ndarray) -> np.ndarray:
    """A numeric column as float64; text or a missing value is an error naming its row."""
    if values.dtype == object:
        out = np.empty(len(values), dtype=np.float64)
        for i, v in enumerate(values):
            try:
                out[i] = float(v) if v is not None else math.nan
            except (TypeError, ValueError):
                raise DataError(
                    f"{table.where(i)}, column {name!r}: text {v!r} in a numeric column."
                ) from None
        values = out
    _check_numbers(table, name, values)
    return values
