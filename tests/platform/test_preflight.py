"""Driver-side input checks and how failures read: the cause first, on one line, the traceback only
when asked for."""

from __future__ import annotations

import pytest

from llava_platform import preflight
from llava_platform.preflight import InputError


def test_model_dir_checks_name_the_key_and_the_path(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    preflight.require_model_dir(str(tmp_path / "model"), "processor")
    preflight.require_model_dir("lmsys/vicuna-7b-v1.5", "model.language_model")  # a hub id: cannot check offline
    with pytest.raises(InputError, match=r"^processor: model directory \.llava/models/base does not exist$"):
        preflight.require_model_dir(".llava/models/base", "processor")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"^--model: .*empty is not a model directory \(no config.json\)$"):
        preflight.require_model_dir(str(tmp_path / "empty"), "--model")


def test_registry_alias_that_does_not_exist_is_named(mlflow_sqlite):
    with pytest.raises(InputError, match=r"^--model: model URI 'models:/nothing-here@champion'"):
        preflight.require_model_dir("models:/nothing-here@champion", "--model", tracking_uri=mlflow_sqlite.tracking_uri)


def test_paths_and_tracking_store(tmp_path):
    preflight.require_path(str(tmp_path), "data.image_root")
    with pytest.raises(InputError, match=r"^data.image_root: .*/missing does not exist$"):
        preflight.require_path(str(tmp_path / "missing"), "data.image_root")
    preflight.require_tracking_store(f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(InputError, match="directory .*/no/such does not exist"):
        preflight.require_tracking_store(f"sqlite:///{tmp_path}/no/such/mlflow.db")
    with pytest.raises(InputError, match=r"^tracking store http://127.0.0.1:9 does not answer"):
        preflight.require_tracking_store("http://127.0.0.1:9")


def _fails():
    def inner():
        raise RuntimeError("the real cause\nand a second line")
    inner()


def test_guarded_prints_one_line_unless_verbose(capsys, monkeypatch):
    monkeypatch.delenv(preflight.VERBOSE_ENV, raising=False)
    assert preflight.guarded("llavactl x", lambda: _fails()) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "llavactl x: RuntimeError: the real cause" and "Traceback" not in "\n".join(err)
    assert preflight.guarded("llavactl x", lambda: (_ for _ in ()).throw(InputError("data.records: /x does not exist"))) == 2
    assert capsys.readouterr().err == "llavactl x: data.records: /x does not exist\n"
    monkeypatch.setenv(preflight.VERBOSE_ENV, "1")
    assert preflight.guarded("llavactl x", lambda: _fails()) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "in inner" in err and err.rstrip().endswith("RuntimeError: the real cause")
