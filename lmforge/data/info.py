"""`lmforge data info`: describe a prepared shard directory, or measure a source spec."""

from __future__ import annotations

from pathlib import Path

from lmforge.data.prepare import read_meta
from lmforge.data.sources import SourceStats, iter_documents
from lmforge.utils import human_count


def describe(path: str, text_field: str = "text") -> str:
    """What `lmforge data info` prints: a `data prepare` directory's splits, or a source's documents.

    Args:
        path: a `data prepare` output directory, or a --data source spec
        text_field: JSON/Parquet field that holds the text
    """
    meta = read_meta(path) if Path(path).is_dir() else None
    if meta is not None:
        lines = [
            f"token shards in {path}",
            f"  source: {meta['source']}   tokenizer: {meta['tokenizer_hash']} (vocab {meta['vocab_size']})",
            f"  dtype: {meta['dtype']}   documents read: {meta['documents_read']}   "
            f"duplicates removed: {meta['duplicates_removed']}",
        ]
        for name, s in meta["splits"].items():
            bpt = s["bytes"] / max(s["tokens"], 1)
            lines.append(
                f"  {name:>5}: {human_count(s['tokens'])} tokens, {s['documents']} documents, "
                f"{s['bytes'] / 1e6:.2f} MB of text ({bpt:.2f} bytes/token), {len(s['shards'])} shard(s)"
            )
        return "\n".join(lines)
    stats = SourceStats()
    n_bytes = 0
    first = None
    for doc in iter_documents(path, text_field=text_field, stats=stats):
        n_bytes += len(doc.text.encode("utf-8"))
        first = first or doc
    where = f" in {stats.files} file(s)" if stats.files else ""
    lines = [f"source {path}: {stats.documents} documents, {n_bytes / 1e6:.2f} MB of text{where}"]
    lines += [f"  {x}" for x in stats.summary()]
    if first is not None:
        lines.append(f"  first document ({first.id}): {first.text[:200]!r}")
    return "\n".join(lines)
