"""Fixtures shared by many test files, defined once here.

pytest caches a session-scoped fixture per place it is defined: imported into several test modules
(`from train_data import corpus`), it is built again in each. Defined here, the training corpus and the
trained compression model are built once per session, whatever the modules that use them.

- corpus: {"tokenizer", "data", "chat", "root"}: Python's stdlib source, a 512-token BPE trained on it,
  its token shards and synthetic chat data (train_data.py)
- trained: final/ of a small llama trained on the corpus for 150 steps (compress_data.py)
- one_thread: run the test on one torch thread (tiny models: faster, no OpenMP stalls on a shared CPU);
  a whole file opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`
"""

from __future__ import annotations

import pytest
from compress_data import TEACHER
from train_data import VOCAB, make_config, single_threaded, write_chat, write_corpus


@pytest.fixture
def one_thread():
    """Run the test on one torch thread (see train_data.single_threaded)."""
    with single_threaded():
        yield


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """{"tokenizer": dir, "data": token-shard dir, "chat": chat.jsonl, "root": dir}, built once."""
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("train_corpus")
    docs = write_corpus(root / "text")
    texts = [p.read_text() for p in sorted(docs.glob("*.txt"))]
    tok = train_tokenizer(texts, VOCAB)
    tok.save(root / "tok")
    prepare(
        str(docs), root / "tok", root / "data", workers=1, val_fraction=0.1, progress=False, verbose=False
    )
    return {
        "tokenizer": root / "tok",
        "data": root / "data",
        "chat": write_chat(root / "chat.jsonl"),
        "root": root,
    }


@pytest.fixture(scope="session")
def trained(corpus, tmp_path_factory):
    """final/ of a llama (d_model 128, 2 layers) trained for 150 steps: ~4.4 nats/token on validation."""
    from lmforge.train import train

    root = tmp_path_factory.mktemp("compress")
    with single_threaded():
        train(make_config(corpus, root, "teacher", **TEACHER))
    return root / "teacher" / "final"
