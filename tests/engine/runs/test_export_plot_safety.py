"""`fusedrl export` and `fusedrl plot` as careful as training: an export holds --out's lock and
looks at it again before its rename (a file put there meanwhile survives, the export is refused);
a plot writes new files or its own earlier PNGs only, never through a link, never over a user's
file."""
import json
import os

import pytest

from fusedrl.engine import cli
from fusedrl.engine.runs import run_dir
from fusedrl.engine.errors import UsageError
from fusedrl.engine.model import peft_io
from fusedrl.engine.train.plot import is_plot, plot_run
from cli_testing import cli_error
from test_run_dirs import adapter_dir, listing  # noqa: F401 (a fixture)


def export(adapter, out, *extra):
    return ["export", str(adapter), "--merge", "--out", str(out), *extra]


def test_export_holds_the_lock_of_out(adapter_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    run_dir.claim(out, "export", overwrite=False, option="--out")  # another export, still writing
    try:
        code, err = cli_error(export(adapter_dir, out), capsys)
    finally:
        run_dir.release(out)
    assert code == 2, err
    assert f"--out={out} is in use by another fusedrl run (pid {os.getpid()})" in err


def test_a_file_written_into_out_during_the_export_survives(
        adapter_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "merged"
    assert cli.main(export(adapter_dir, out)) == 0
    before = listing(out)
    real_load = peft_io.load_adapter

    def load_while_someone_writes(model, directory):  # another process writes into --out
        (out / "notes.txt").write_text("mine")
        return real_load(model, directory)

    monkeypatch.setattr(peft_io, "load_adapter", load_while_someone_writes)
    code, err = cli_error(export(adapter_dir, out, "--overwrite"), capsys)
    assert (code, err) == (2, f"fusedrl export: --out={out}: notes.txt appeared in it while "
                              "fusedrl was writing, not made by fusedrl; nothing was replaced: "
                              "move it out and run again, or choose another --out\n")
    assert (out / "notes.txt").read_text() == "mine"
    after = listing(out)
    assert {k: v for k, v in after.items() if k not in ("notes.txt", run_dir.LOCK)} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no temp left


def metrics_run(path):
    path.mkdir()
    rows = [{"kind": "train", "step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plot_replaces_only_its_own_pngs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    run = metrics_run(tmp_path / "run")
    assert cli.main(["plot", str(run)]) == 0
    png = run / "plots" / "train.png"
    assert is_plot(png)
    assert cli.main(["plot", str(run)]) == 0  # its own earlier PNG: replaced
    users = tmp_path / "photo.png"
    users.write_bytes(png.read_bytes()[:100])
    png.unlink()
    png.symlink_to(users)
    code, err = cli_error(["plot", str(run)], capsys)
    assert (code, err) == (2, f"fusedrl plot: {png} is a symbolic link: fusedrl plot never "
                              "replaces it; move it or give --out another folder\n")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.png").write_text("a user's file")
    code, err = cli_error(["plot", str(run), "--out", "."], capsys)
    assert code == 2 and "train.png is a file fusedrl plot did not write" in err
    assert (tmp_path / "train.png").read_text() == "a user's file"
    assert users.stat().st_size == 100
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "linked").symlink_to("elsewhere")
    code, err = cli_error(["plot", str(run), "--out", "linked"], capsys)
    assert code == 2 and "--out linked is a symbolic link" in err
    assert not any((tmp_path / "elsewhere").iterdir())


def test_a_fifo_at_the_png_name_is_refused_without_opening_it(tmp_path):
    pytest.importorskip("matplotlib")
    run = metrics_run(tmp_path / "run")
    (run / "plots").mkdir()
    os.mkfifo(run / "plots" / "train.png")
    with pytest.raises(UsageError, match="a file fusedrl plot did not write"):
        plot_run(run)


def test_the_plot_command_never_writes_through_a_link(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = metrics_run(tmp_path / "run")
    (run / "plots").mkdir()
    users = tmp_path / "thesis.txt"
    users.write_text("a user's file")
    (run / "plots" / "train.png").symlink_to(users)
    code, err = cli_error(["plot", str(run)], capsys)
    assert code == 2 and err.count("\n") == 1 and "is a symbolic link: fusedrl plot never replaces it" in err, err
    assert users.read_text() == "a user's file"
