"""Data: sources -> documents; prepare -> token shards; loaders -> batches; SFT rendering and loss masks.

    sources.py          iter_documents(spec): text/JSON/Parquet files, C4 shards, hub datasets, embedded
    pydocs.py           the embedded python-docs corpus (built locally from CPython's own docs)
    pystdlib.py         the embedded python-stdlib corpus (CPython's standard-library source)
    embedded.py         the names of the embedded corpora: python-docs, python-stdlib, embedded (both)
    tokenize_corpus.py  train_tokenizer_on(spec, vocab_size, out): `lmforge tokenizer train`
    prepare.py          prepare(spec, tokenizer, out): `lmforge data prepare` (parallel, dedup, split)
    loader.py           TokenLoader: packed (x, y) batches, seeded shuffle, ranks, exact resume
    sft.py              SFTLoader, render_with_mask: chat JSONL with an assistant-only loss mask
    info.py             describe(path): `lmforge data info`

Names are imported lazily (`from lmforge.data import TokenLoader` works), so that importing the
package, as spawned tokenizer workers do, costs nothing. `prepare` is also a module's name: import
the function as `from lmforge.data.prepare import prepare`.
"""

from importlib import import_module

_EXPORTS = {
    "Document": "sources",
    "SourceStats": "sources",
    "iter_documents": "sources",
    "build_python_docs": "pydocs",
    "iter_python_docs": "pydocs",
    "build_python_stdlib": "pystdlib",
    "iter_python_stdlib": "pystdlib",
    "train_tokenizer_on": "tokenize_corpus",
    "read_meta": "prepare",
    "TokenLoader": "loader",
    "SFTLoader": "sft",
    "load_conversations": "sft",
    "render_with_mask": "sft",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"lmforge.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lmforge.data' has no attribute {name!r}")


__all__ = list(_EXPORTS)
