"""Config loading and validation (no MPI)."""

import pytest

from hpcopt import config as C


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_and_file(tmp_path):
    cfg = C.load(write(tmp_path, '[run]\nmethod = "eamsgd"\n[easgd]\ntau = 4\n[train]\nlr = 1\n'))
    assert cfg.run.method == "eamsgd" and cfg.easgd.tau == 4
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # ints are fine for floats
    assert cfg.momentum == 0.9  # EAMSGD's default delta
    assert C.load(None).momentum == 0.0  # EASGD: plain SGD local steps


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(C.ConfigError) as e:
        C.load(write(tmp_path, "[easgd]\ntua = 4\n"))
    assert "easgd.tua" in str(e.value) and "tau, beta, alpha" in str(e.value)


def test_unknown_section_lists_sections(tmp_path):
    with pytest.raises(C.ConfigError, match="valid sections: run, model, data"):
        C.load(write(tmp_path, "[optimizer]\nlr = 1\n"))


@pytest.mark.parametrize("text,match", [
    ('[run]\nmethod = "adam"\n', "run.method = 'adam' is not one of: easgd, eamsgd"),
    ("[easgd]\ntau = 0\n", "easgd.tau must be >= 1, got 0"),
    ("[easgd]\nbeta = 1.5\n", r"easgd.beta must be in \(0, 1\], got 1.5"),
    ('[train]\nlr = "fast"\n', "train.lr must be a float, got 'fast'"),
    ("[train]\nlr = -0.1\n", "train.lr must be > 0, got -0.1"),
    ("[data]\nbatch_size = 2.5\n", "data.batch_size must be a int, got 2.5"),
    ("[run]\ndeterministic = 3\n", "run.deterministic must be a bool"),
    ("[train]\nmomentum = 1.0\n", r"train.momentum must be in \[0, 1\)"),
    ("run = 3\n", r"\[run\] must be a table"),
])
def test_bad_values_say_what_is_allowed(tmp_path, text, match):
    with pytest.raises(C.ConfigError, match=match):
        C.load(write(tmp_path, text))


def test_overrides_beat_the_file_and_are_checked(tmp_path):
    p = write(tmp_path, "[easgd]\ntau = 4\n")
    cfg = C.load(p, {"easgd.tau": "16", "run.deterministic": "true", "model.kwargs": '{"channels": 8}'})
    assert cfg.easgd.tau == 16 and cfg.run.deterministic is True and cfg.model.kwargs == {"channels": 8}
    with pytest.raises(C.ConfigError, match="easgd.tau must be a int, got 'x'"):
        C.load(p, {"easgd.tau": "x"})
    with pytest.raises(C.ConfigError, match="unknown key"):
        C.load(p, {"easgd.nope": "1"})


def test_file_errors(tmp_path):
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load(tmp_path / "missing.toml")
    with pytest.raises(C.ConfigError, match="not valid TOML"):
        C.load(write(tmp_path, "[run\n"))


def test_toml_round_trip(tmp_path):
    cfg = C.load(None, {"model.kwargs": '{"hidden": [10, 20]}', "train.lr": "0.3"})
    again = C.load(write(tmp_path, cfg.to_toml()))
    assert again == cfg


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[2] / "configs").glob("*.toml"))
    assert configs
    for path in configs:
        C.load(path)
