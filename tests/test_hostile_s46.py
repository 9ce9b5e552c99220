"""Hostile round of session 22 (attack46): a stranger, a token holder, a
lying device and a task, where no round looked (the newest code: rc map's
--results, the Python client, rc-files, the checkpoint path)."""
import os
from types import SimpleNamespace


def test_rc_map_results_folder_planted_as_a_link_is_not_written_through(tmp_path):
    """`rc map --results DIR` made DIR/N with os.makedirs, which follows a
    link: in a shared DIR another local user who planted DIR/1 as a link to
    a folder of the user's had its state, stdout, stderr, input and
    exit_code replaced (and an exit_code there removed) by the map's
    results. DIR/N is now made and entered with O_NOFOLLOW (as --into's
    folders are): the link is left alone and the input says why."""
    from rc import map_cli
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "state").write_text("the user's own\n")
    (victim / "exit_code").write_text("the user's too\n")
    results = tmp_path / "results"
    results.mkdir()
    os.symlink(str(victim), str(results / "1"))
    outcome = map_cli.Outcome.__new__(map_cli.Outcome)
    outcome.job = SimpleNamespace(number=1, value="a.txt", state="failed")
    outcome.stdout, outcome.stderr, outcome.exit_code, outcome.notes = "bytes\n", "", None, []
    try:
        outcome.write_results(SimpleNamespace(connection=None, config=None), str(results))
    except OSError as e:
        assert "is a link" in str(e)
    else:
        raise AssertionError("wrote DIR/1 through a link")
    assert sorted(os.listdir(str(victim))) == ["exit_code", "state"]
    assert (victim / "state").read_text() == "the user's own\n"
    assert (victim / "exit_code").read_text() == "the user's too\n"
    # An honest DIR/2 is written as before.
    outcome.job = SimpleNamespace(number=2, value="b.txt", state="completed")
    outcome.exit_code = 0
    outcome.write_results(SimpleNamespace(connection=None, config=None), str(results))
    assert sorted(os.listdir(str(results / "2"))) == ["exit_code", "input", "state", "stderr",
                                                     "stdout"]
    assert (results / "2" / "stdout").read_text() == "bytes\n"
    assert (results / "2" / "input").read_text() == "b.txt\n"
