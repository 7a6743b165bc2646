"""quarantine: a damaged file or folder is moved aside with its reason, never deleted."""

from __future__ import annotations

from widesparse.train.quarantine import quarantine


def test_a_folder_and_a_file_are_moved_with_their_reason(tmp_path):
    run = tmp_path / "runs" / "train-a"
    run.mkdir(parents=True)
    (run / "result.json").write_text("{ truncated")
    dest = quarantine(run, tmp_path, "result.json: Expecting ',' delimiter")
    assert not run.exists() and (dest / "train-a" / "result.json").read_text() == "{ truncated"
    assert dest.parent == tmp_path / "quarantine" and "delimiter" in (dest / "REASON.txt").read_text()
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(b"garbage")
    again = quarantine(ckpt, tmp_path, "unreadable")
    assert again != dest and (again / "checkpoint.pt").read_bytes() == b"garbage"
