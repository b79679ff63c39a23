"""The meta block names the code that ran, also where the commit cannot (a dirty or copied checkout)."""

from kvpolicy import provenance


def test_source_digest_follows_the_files(tmp_path, monkeypatch):
    (tmp_path / "kvpolicy" / "core").mkdir(parents=True)
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "configs").mkdir()
    (tmp_path / "kvpolicy" / "core" / "cache.py").write_text("x = 1\n")
    (tmp_path / "configs" / "a.yaml").write_text("policy: full\n")
    monkeypatch.setattr(provenance, "_REPO", tmp_path)
    first = provenance.source_digest()
    assert first == provenance.source_digest() and len(first) == 16
    (tmp_path / "kvpolicy" / "core" / "cache.py").write_text("x = 2\n")
    assert provenance.source_digest() != first
    (tmp_path / "kvpolicy" / "core" / "cache.py").write_text("x = 1\n")
    assert provenance.source_digest() == first
    (tmp_path / "benchmarks" / "new.py").write_text("")  # a new file counts too
    assert provenance.source_digest() != first


def test_run_meta_has_the_keys_results_files_need():
    meta = provenance.run_meta(["bench.py", "--batch", "8"], shape="tiny")
    for key in ("command", "argv", "commit", "dirty", "source_digest", "versions", "machine", "date"):
        assert key in meta, key
    assert meta["command"] == "python bench.py --batch 8" and meta["shape"] == "tiny"  # pasteable
    assert meta["versions"]["torch"] and meta["versions"]["transformers"]
