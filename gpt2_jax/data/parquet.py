"""Parquet files, the way FineWeb, OpenWebText and most Hugging Face Hub datasets are published: one document per
row, its text in the `text` column (or the column `--text_column` names).

The file is read through pyarrow one row group at a time, in batches of rows, and only the text column: the whole
file is never in memory. The texts come out as bytes and files.py decodes them, so bytes that are not valid UTF-8
become U+FFFD and are counted as in every other format (pyarrow would fail on them); it skips a null text like an
empty one, and counts it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from gpt2_jax.errors import UserError

ROWS_PER_BATCH = 1024
DEFAULT_COLUMN = "text"


def parquet_batches(path: str, column: str | None) -> Iterator[tuple[list[bytes | None], int]]:
    """Batches of rows, in order: (each row's text as UTF-8 bytes, None where it is null; the file's bytes those rows
    account for, for progress)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, ValueError) as e:
        raise UserError(f"{path} is not a readable parquet file ({str(e).splitlines()[0]}); write it again.")
    name = column or DEFAULT_COLUMN
    _check_text_column(parquet.schema_arrow, name, path)
    size, n_rows = os.path.getsize(path), max(parquet.metadata.num_rows, 1)
    rows_done = bytes_done = 0
    for group in range(parquet.num_row_groups):
        # One column: nothing to decode in parallel, and pyarrow's threads would each hold memory of their own.
        batches = parquet.iter_batches(ROWS_PER_BATCH, row_groups=[group], columns=[name], use_threads=False)
        for batch in batches:
            # As bytes: the caller decodes them, so invalid UTF-8 (which a writer may have put in a string column)
            # is replaced and counted as in every other format, instead of failing here.
            rows_done += batch.num_rows
            accounted = size * rows_done // n_rows  # the file's bytes, shared out by rows
            yield batch.column(0).cast(pa.large_binary()).to_pylist(), accounted - bytes_done
            bytes_done = accounted


def _check_text_column(schema, name: str, path: str) -> None:
    import pyarrow as pa

    if name not in schema.names:
        columns = ", ".join(schema.names[:12]) + (", ..." if len(schema.names) > 12 else "")
        raise UserError(
            f"Parquet file {path} has no column {name!r} (its columns: {columns}); name the text column with "
            "--text_column."
        )
    kind = schema.field(name).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or _is_string_view(kind)):
        raise UserError(
            f"Column {name!r} of parquet file {path} holds {kind} values, not text; name the text column with "
            "--text_column."
        )


def _is_string_view(kind) -> bool:
    import pyarrow as pa

    return hasattr(pa.types, "is_string_view") and pa.types.is_string_view(kind)
