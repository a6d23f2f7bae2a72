"""The room check before a shared-memory window (hpcopt.comm.shared): a window larger than the free
space of Open MPI's backing directory would fault when touched, so the run uses messages."""

from hpcopt.comm.shared import _no_room


def test_a_window_that_does_not_fit_the_backing_directory_is_refused_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("OMPI_MCA_osc_sm_backing_directory", str(tmp_path))
    assert _no_room(4 * 1000) == ""
    why = _no_room(10**18)  # an exabyte
    assert str(tmp_path) in why and "MB free" in why and "1000000000000 MB" in why


def test_an_unknown_backing_directory_is_left_to_mpi(monkeypatch, tmp_path):
    monkeypatch.setenv("OMPI_MCA_osc_sm_backing_directory", str(tmp_path / "missing"))
    assert _no_room(10**18) == ""
