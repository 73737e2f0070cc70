"""Fixtures for the training tests."""
import pytest

from hybrid_jax.data import shakespeare_documents


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """64 KiB of Shakespeare as a .txt source: ~62k train and ~3k validation byte tokens."""
    path = tmp_path_factory.mktemp("corpus") / "shakespeare_64k.txt"
    path.write_text("\n".join(shakespeare_documents())[:65536])
    return str(path)
