"""The artefact layer (genret._io): manifests that list every file, a swap that never loses the user's files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genret._io import ArtefactError, ManifestError, OutputError, check_files, read_manifest, verify
from genret._swap import atomic_dir, atomic_update, foreign_files, overwrite_allowed, remove_artefact
from genret._io import _digest

FMT = "genret.test_thing"


def _write(path, files: dict[str, bytes], fmt=FMT):
    """An artefact of ``fmt`` holding ``files`` at ``path``, through the layer."""
    with atomic_dir(path, (fmt,)) as tmp:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        (tmp / "manifest.json").write_text(json.dumps({"format": fmt, "version": 1}))
    return path


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _load(path):
    return read_manifest(path, FMT, 1, "test thing")


def test_the_manifest_lists_every_file_with_size_and_hashes(tmp_path):
    _write(tmp_path / "a", {"x.bin": b"1" * 10, "sub/y.json": b"{}"})
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["owner"] == "genret" and sorted(manifest["files"]) == ["sub/y.json", "x.bin"]
    assert manifest["files"]["x.bin"]["size"] == 10 and manifest["files"]["sub/y.json"]["format"] == "json"
    assert len(manifest["files"]["x.bin"]["sha256"]) == 64
    assert _load(tmp_path / "a")["format"] == FMT


@pytest.mark.parametrize("damage, message", [
    (lambda d, other: (d / "x.bin").write_bytes(b"1" * 5), r"x.bin: 5 bytes, the manifest of this test thing says 10"),
    (lambda d, other: (d / "x.bin").write_bytes(b"2" * 10), r"x.bin: its content is not what the manifest"),
    (lambda d, other: (d / "x.bin").unlink(), r"x.bin: missing from the test thing"),
    (lambda d, other: (d / "x.bin").write_bytes((other / "x.bin").read_bytes()), r"x.bin: its content is not"),
    (lambda d, other: (d / "sub" / "y.json").write_text('{"metric": "l2"}'), r"sub/y.json: "),
])
def test_loading_names_the_file_that_is_not_as_saved(tmp_path, damage, message):
    """Cut short, edited, removed, or taken from another artefact of the same kind: named, never used."""
    _write(tmp_path / "a", {"x.bin": b"1" * 10, "sub/y.json": b"{}"})
    _write(tmp_path / "b", {"x.bin": b"3" * 10, "sub/y.json": b"{}"})
    damage(tmp_path / "a", tmp_path / "b")
    with pytest.raises(ArtefactError, match=message):
        _load(tmp_path / "a")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["format", "version", "metric", "files", "owner", "count", "extra"]),
       value=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                          max_leaves=6))
def test_any_hand_edit_of_a_manifest_is_refused(tmp_path_factory, key, value):
    """Property: a sealed manifest with any field changed, added or given another type is refused by name on load
    (``ManifestError``, never another exception, never loaded as if saved so)."""
    path = tmp_path_factory.mktemp("edit") / "a"
    with atomic_dir(path, (FMT,)) as tmp:
        (tmp / "x.bin").write_bytes(b"1")
        (tmp / "manifest.json").write_text(json.dumps({"format": FMT, "version": 1, "metric": "ip", "count": 1}))
    manifest = json.loads((path / "manifest.json").read_text())
    if manifest.get(key, object()) == value:
        return
    manifest[key] = value
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError):
        _load(path)


def test_a_manifest_listing_a_path_outside_its_folder_is_refused(tmp_path):
    _write(tmp_path / "a", {"x.bin": b"1"})
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest["files"]["../../etc/passwd"] = manifest["files"]["x.bin"]
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtefactError, match="its manifest was edited after it was saved"):
        _load(tmp_path / "a")
    manifest["digest"] = _digest(manifest)  # an edit that fixes the digest too is still refused
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtefactError, match="lists '../../etc/passwd' oddly"):
        _load(tmp_path / "a")


def test_a_large_file_is_checked_by_samples_on_load_and_whole_by_verify(tmp_path, capsys):
    """Loading reads a few blocks of a large file (constant time); ``genret verify`` reads all of it."""
    from genret.cli import main

    big = bytes(range(256)) * (9 * 4096)  # 9 MiB: past the size hashed whole on load
    _write(tmp_path / "a", {"weights.safetensors": big})
    data = bytearray(big)
    data[len(data) // 2 + 12345] ^= 1  # between two sampled blocks
    (tmp_path / "a" / "weights.safetensors").write_bytes(bytes(data))
    assert check_files(tmp_path / "a", json.loads((tmp_path / "a" / "manifest.json").read_text())) == 1
    [record] = verify(tmp_path / "a")
    assert "weights.safetensors: its content is not" in record["error"]
    assert main(["-q", "verify", str(tmp_path / "a")]) == 1
    assert "FAILED" in capsys.readouterr().out
    data[0] ^= 1  # in the first block: sampled
    (tmp_path / "a" / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtefactError, match="weights.safetensors: its content is not"):
        _load(tmp_path / "a")


def test_verify_walks_nested_artefacts_and_says_when_there_are_none(tmp_path, capsys):
    from genret.cli import main

    _write(tmp_path / "top" / "one", {"x": b"1"})
    _write(tmp_path / "top" / "two", {"y": b"2"})
    assert main(["-q", "verify", str(tmp_path / "top"), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert sorted(r["folder"].rsplit("/", 1)[1] for r in records) == ["one", "two"]
    assert all(r["error"] is None and r["files"] == 1 for r in records)
    (tmp_path / "empty").mkdir()
    assert main(["-q", "verify", str(tmp_path / "empty")]) == 2
    assert "no genret artefact here" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- writes

def test_a_folder_holding_the_users_file_is_refused_and_with_overwrite_kept(tmp_path):
    path = _write(tmp_path / "p", {"x": b"old"})
    (path / "MY-NOTES.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"1 files genret did not write there \(e.g. 'MY-NOTES.txt'\)"):
        _write(path, {"x": b"new"})
    assert _tree(path)["x"] == b"old"
    with overwrite_allowed(path):
        _write(path, {"x": b"new"})
    assert _tree(path)["x"] == b"new" and (path / "MY-NOTES.txt").read_text() == "mine"
    assert foreign_files(path) == ["MY-NOTES.txt"]
    _load(path)  # the user's file beside it does not trouble loading


def test_neighbours_named_like_old_swap_folders_are_never_touched(tmp_path):
    """A user's ``.p.old`` beside ``--out p`` was deleted; a ``.q.old`` with no ``q`` was moved to ``q``."""
    for name in (".p.old", ".q.old", ".p.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text(name)
    _write(tmp_path / "p", {"x": b"1"})
    _write(tmp_path / "p", {"x": b"2"})
    _write(tmp_path / "q", {"x": b"3"})
    for name in (".p.old", ".q.old", ".p.tmp"):
        assert (tmp_path / name / "keep.txt").read_text() == name
    assert _tree(tmp_path / "q")["x"] == b"3" and sorted(p.name for p in tmp_path.iterdir()) == [
        ".p.old", ".p.tmp", ".q.old", "p", "q"]


def test_an_artefact_of_another_kind_or_an_older_genret_is_replaced_only_with_overwrite(tmp_path):
    other = _write(tmp_path / "o", {"x": b"1"}, fmt="genret.other")
    with pytest.raises(OutputError, match="is a 'genret.other' artefact, not a 'genret.test_thing' one"):
        _write(other, {"x": b"2"})
    with overwrite_allowed(other):
        _write(other, {"x": b"2"})
    assert _tree(other)["x"] == b"2"
    legacy = tmp_path / "legacy"  # saved before manifests listed files: every file counts as the user's
    legacy.mkdir()
    (legacy / "manifest.json").write_text(json.dumps({"format": FMT, "version": 1}))
    (legacy / "index.faiss").write_bytes(b"old")
    with pytest.raises(OutputError, match="saved by an earlier genret"):
        _write(legacy, {"x": b"new"})
    with overwrite_allowed(legacy):
        _write(legacy, {"x": b"new"})
    assert (legacy / "index.faiss").read_bytes() == b"old" and _tree(legacy)["x"] == b"new"


@pytest.mark.parametrize("kind", ["file", "symlink", "cwd"])
def test_an_output_that_is_a_file_a_link_or_the_working_folder_is_refused(tmp_path, monkeypatch, kind):
    (tmp_path / "real").mkdir()
    target = {"file": tmp_path / "f", "symlink": tmp_path / "link", "cwd": tmp_path}[kind]
    if kind == "file":
        target.write_text("keep")
    elif kind == "symlink":
        target.symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError), overwrite_allowed(target):
        _write(target, {"x": b"1"})
    assert not (tmp_path / "real" / "x").exists() and not [p for p in tmp_path.iterdir() if ".genret-" in p.name]


def test_remove_artefact_keeps_the_users_files(tmp_path):
    path = _write(tmp_path / "p", {"a/x": b"1", "y": b"2"})
    (path / "a" / "mine.txt").write_text("mine")
    remove_artefact(path)
    assert _tree(path) == {"a/mine.txt": b"mine"}
    remove_artefact(_write(tmp_path / "q", {"x": b"1"}))
    assert not (tmp_path / "q").exists()


def test_an_update_changes_the_artefact_as_a_whole_and_keeps_the_users_files(tmp_path):
    path = _write(tmp_path / "p", {"a.json": b'{"v": 1}', "b": b"2"})
    (path / "mine.txt").write_text("mine")
    inode = (path / "b").stat().st_ino
    with atomic_update(path, (FMT,)) as tmp:
        (tmp / "a.json").unlink()  # replaced, not written through the link
        (tmp / "a.json").write_text('{"v": 2}')
    assert _tree(path) == {"a.json": b'{"v": 2}', "b": b"2", "mine.txt": b"mine",
                           "manifest.json": (path / "manifest.json").read_bytes()}
    assert (path / "b").stat().st_ino == inode  # the unchanged file is the same file
    _load(path)
    with pytest.raises(ValueError, match="not a saved genret genret.other"):
        with atomic_update(path, ("genret.other",)):
            pass


_names = st.text(alphabet="abcXYZ019._-", min_size=1, max_size=8).filter(lambda n: n not in (".", "..")
                                                                           and ".genret-" not in n)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=st.dictionaries(st.lists(_names, min_size=1, max_size=3).map("/".join), st.binary(max_size=64),
                            max_size=6),
       new=st.dictionaries(_names, st.binary(max_size=32), min_size=1, max_size=4))
def test_any_user_files_in_an_artefact_survive_any_overwrite(tmp_path_factory, user, new):
    """Property: whatever the user put in an artefact folder, a write without --overwrite changes nothing, and
    one with it leaves every user file whose name genret does not write byte-identical (the same inode)."""
    path = tmp_path_factory.mktemp("prop") / "p"
    _write(path, {"old.bin": b"old"})
    kept = {}
    for rel, data in user.items():
        dest = path / rel
        if any(p.is_file() for p in [*dest.parents][: len(dest.relative_to(path).parts) - 1]) or dest.is_dir():
            continue  # a name that collides with a folder or file already there
        if rel in ("manifest.json", "old.bin"):
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        kept[rel] = (data, dest.stat().st_ino)
    before = _tree(path)
    new = {k: v for k, v in new.items() if k != "manifest.json" and not any(r.split("/")[0] == k for r in kept)}
    if kept:
        with pytest.raises(OutputError):
            _write(path, new)
        assert _tree(path) == before
    with overwrite_allowed(path):
        _write(path, new)
    after = _tree(path)
    for rel, (data, inode) in kept.items():
        if rel in new:
            assert after[rel] == new[rel]  # --overwrite: genret's new file of that name
        else:
            assert after[rel] == data and (path / rel).stat().st_ino == inode
    assert "old.bin" not in after or "old.bin" in new
    assert not [p for p in path.parent.iterdir() if ".genret-" in p.name]


_KILLER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import genret._io as io
    import genret._swap as sw
    stop, path = int(sys.argv[1]), Path(sys.argv[2])
    calls = [0]
    def counted(fn):
        def wrapped(*a, **k):
            calls[0] += 1
            if calls[0] == stop:
                os._exit(9)  # killed here, before this filesystem step
            return fn(*a, **k)
        return wrapped
    for mod, name in [(os, "rename"), (os, "replace"), (os, "link"), (os, "unlink"), (os, "rmdir"),
                      (sw, "_exchange"), (io, "write_json")]:
        setattr(mod, name, counted(getattr(mod, name)))
    with sw.overwrite_allowed(path):
        with sw.atomic_dir(path, ("genret.test_thing",)) as tmp:
            for i in range(3):
                (tmp / f"f{i}").write_text("new" * (i + 1))
            io.write_json(tmp / "manifest.json", {"format": "genret.test_thing", "version": 1})
    print("steps", calls[0])
""")


def test_a_kill_at_every_step_of_a_write_leaves_the_old_or_the_new_artefact_and_the_users_files(tmp_path):
    """The write is killed before each of its filesystem steps in turn (every instant that matters: between
    steps nothing on disk changes); after each, the folder is the old artefact or the new one, whole, and the
    user's files are byte-identical."""
    def run(stop, path):
        return subprocess.run([sys.executable, "-c", _KILLER, str(stop), str(path)], capture_output=True, text=True,
                              timeout=120)

    probe = tmp_path / "probe"
    _write(probe, {"f0": b"old"})
    done = run(10_000, probe)
    assert done.returncode == 0, done.stderr
    steps = int(done.stdout.split()[-1])
    assert steps >= 4
    outcomes = set()
    for stop in range(1, steps + 1):
        path = tmp_path / f"p{stop}"
        _write(path, {"f0": b"old", "f9": b"old"})
        (path / "notes").mkdir()
        (path / "notes" / "MY-NOTES.txt").write_text("mine")
        (path / "thesis.tex").write_text("years")
        assert run(stop, path).returncode == 9
        tree = _tree(path)
        assert tree["notes/MY-NOTES.txt"] == b"mine" and tree["thesis.tex"] == b"years"
        _load(path)  # whole: every listed file as saved
        state = "old" if tree.get("f9") == b"old" else "new"
        assert (tree["f0"], "f2" in tree) == ((b"old", False) if state == "old" else (b"new", True))
        outcomes.add(state)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".p{stop}.") and "old" in p.name]
    assert outcomes == {"old", "new"}  # the kills fell both before and after the exchange


# --- what a second review found (issue 25) --------------------------------------------------------------------

def test_pruning_a_checkpoint_never_deletes_what_its_manifest_names_outside_it(tmp_path):
    """A manifest (digest fixed up) naming ``../../victim`` or an absolute path, or a listed folder turned into a
    link: only files inside the folder, reached through no link, are genret's to remove."""
    from genret._io import _digest

    victim, elsewhere = tmp_path / "victim.txt", tmp_path / "elsewhere"
    victim.write_text("mine")
    elsewhere.mkdir()
    (elsewhere / "y").write_text("mine too")
    step = _write(tmp_path / "run" / "checkpoints" / "step-1", {"x": b"1", "sub/y": b"2"})
    (step / "extra.txt").write_text("user")
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["files"]["../../../victim.txt"] = manifest["files"]["x"]
    manifest["files"][str(victim)] = manifest["files"]["x"]
    manifest["digest"] = _digest(manifest)
    (step / "manifest.json").write_text(json.dumps(manifest))
    import shutil

    shutil.rmtree(step / "sub")
    (step / "sub").symlink_to(elsewhere)
    remove_artefact(step)
    assert victim.read_text() == "mine" and (elsewhere / "y").read_text() == "mine too"
    assert (step / "extra.txt").read_text() == "user"
    link = tmp_path / "run" / "checkpoints" / "step-2"
    link.symlink_to(elsewhere)
    remove_artefact(link)  # a link is left alone, never followed
    assert link.is_symlink() and (elsewhere / "y").is_file()


def test_a_run_never_claims_checkpoints_or_logs_folders_the_user_had(tmp_path):
    from genret._swap import mark_run

    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "mine.bin").write_text("mine")
    mark_run(out)
    (out / "logs").mkdir()
    (out / "logs" / "events").write_text("genret's")
    assert foreign_files(out) == ["checkpoints/mine.bin"]
    with overwrite_allowed(out):
        _write(out, {"weights": b"1"})
    assert (out / "checkpoints" / "mine.bin").read_text() == "mine" and not (out / "logs").exists()


def test_overwrite_never_replaces_a_users_file_of_a_name_genret_writes(tmp_path):
    """--overwrite keeps the user's files: one of a name the new artefact holds refuses the swap, and the finished
    artefact waits at the temporary name the message gives."""
    path = _write(tmp_path / "p", {"report.md": b"genret's"})
    (path / "report.md").write_text("my edits")  # a listed file the user changed is the user's now
    assert foreign_files(path) == ["report.md"]
    with pytest.raises(OutputError, match="files genret did not write there"):
        _write(path, {"report.md": b"new"})
    with overwrite_allowed(path), pytest.raises(OutputError, match=r"already holds your 'report.md'.* complete at (\S+)") as err:
        _write(path, {"report.md": b"new"})
    assert (path / "report.md").read_text() == "my edits"
    kept = err.value.args[0].rsplit("complete at ", 1)[1]
    assert (tmp_path / kept.rsplit("/", 1)[1] / "report.md").read_bytes() == b"new"


def test_the_users_empty_folders_and_folder_permissions_are_kept(tmp_path):
    path = _write(tmp_path / "p", {"x": b"1"})
    (path / "private").mkdir(mode=0o700)
    (path / "private" / "key").write_text("secret")
    (path / "empty" / "deeper").mkdir(parents=True)
    assert sorted(foreign_files(path)) == ["empty/deeper/", "private/key"]
    with overwrite_allowed(path):
        _write(path, {"x": b"2"})
    assert (path / "private").stat().st_mode & 0o777 == 0o700 and (path / "private" / "key").read_text() == "secret"
    assert (path / "empty" / "deeper").is_dir() and _tree(path)["x"] == b"2"


def test_verify_fails_a_damaged_or_linked_manifest(tmp_path, capsys):
    from genret.cli import main

    top = _write(tmp_path / "top", {"x": b"1"})
    _write(top / "inner", {"y": b"2"})
    (top / "manifest.json").write_text("{ not json")
    assert main(["-q", "verify", str(top)]) == 1
    assert "not a readable genret manifest" in capsys.readouterr().out
    (top / "manifest.json").unlink()
    (top / "manifest.json").symlink_to(top / "inner" / "manifest.json")
    assert [r["error"] is not None for r in verify(top)] == [True, False]


def test_a_local_model_with_its_owner_edited_is_still_checked(tmp_path):
    from genret._io import check_local_model

    model = _write(tmp_path / "m", {"adapter_config.json": b'{"r": 4}'}, fmt="genret.rerank_adapter")
    (model / "adapter_config.json").write_text('{"r": 64}')
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["owner"] = "me"
    (model / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtefactError):
        check_local_model(model, "adapter")


@pytest.mark.skipif(not os.path.ismount("/dev/shm"), reason="no /dev/shm mount here")
def test_a_mount_point_is_refused_before_any_work():
    with overwrite_allowed("/dev/shm"), pytest.raises(OutputError, match="is a mount point"):
        with atomic_dir("/dev/shm", (FMT,)):
            raise AssertionError("the block must not run")


def test_without_an_atomic_exchange_a_kill_between_the_renames_is_put_back(tmp_path):
    """Where the system has no atomic exchange, the old folder waits at a marked name for the one moment between
    two renames; the next write puts it back before anything else."""
    import genret._swap as sw

    path = _write(tmp_path / "p", {"x": b"old"})
    (path / "mine").write_text("mine")
    script = _KILLER.replace('(sw, "_exchange"), ', "").replace("with sw.overwrite_allowed(path):",
                                                                 "sw._exchange = lambda a, b: False\n"
                                                                 "with sw.overwrite_allowed(path):")
    assert "sw._exchange = lambda" in script
    states = set()
    for stop in range(1, 40):
        done = subprocess.run([sys.executable, "-c", script, str(stop), str(path)], capture_output=True, text=True,
                              timeout=120)
        if done.returncode == 0:
            break
        if not path.exists():
            states.add("aside")
            sw._recover(path)
        tree = _tree(path)
        assert tree["mine"] == b"mine"
        states.add("new" if "f2" in tree else "old")
        _load(path)
        if "f2" in tree:  # back to the old one for the next kill
            with overwrite_allowed(path):
                _write(path, {"x": b"old"})
    assert "aside" in states and {"old", "new"} <= states


def test_verify_leaves_caches_alone(tmp_path):
    """A cache (append-only shards, checked as read) is not a saved artefact: verify neither checks nor fails it."""
    _write(tmp_path / "top" / "art", {"x": b"1"})
    cache = tmp_path / "top" / "cache" / "rewrites" / "abc"
    cache.mkdir(parents=True)
    (cache / "manifest.json").write_text(json.dumps({"format": "genret.text_cache", "key": {}}))
    (cache / "shard-1.json").write_text("{}")
    assert [r["format"] for r in verify(tmp_path / "top")] == [FMT]
