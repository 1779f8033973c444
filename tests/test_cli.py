"""`kvserve serve` flags: environment fallbacks, the engine config they build, refused combinations."""
from __future__ import annotations

import pytest

from server import cli


def test_flags_and_environment_build_the_engine_config(monkeypatch):
    monkeypatch.setenv("KVSERVE_MAX_NUM_SEQS", "12")
    monkeypatch.setenv("KVSERVE_NO_RUN_AHEAD", "1")
    args = cli.build_parser().parse_args(["serve", "--device", "cuda", "--gemv-max-rows", "4", "--enforce-eager"])
    config = cli.engine_config("smollm2", args)
    assert config.device == "cuda" and config.gemv_max_rows == 4
    assert config.scheduler.max_num_seqs == 12  # from the environment
    assert config.decode_graphs is False and config.run_ahead is False
    monkeypatch.delenv("KVSERVE_NO_RUN_AHEAD")
    default = cli.engine_config("smollm2", cli.build_parser().parse_args(["serve"]))
    assert default.gemv_max_rows == 0 and default.decode_graphs is None and default.run_ahead is None


def test_gemv_on_cpu_is_refused_before_anything_loads(monkeypatch, capsys):
    monkeypatch.setattr(cli, "serve", lambda args: pytest.fail("serve must not start"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--gemv-max-rows", "2"])
    assert exit_info.value.code == 2
    assert "needs --device cuda" in capsys.readouterr().err


def test_out_of_range_gemv_rows_are_refused():
    from engine.config import MAX_GEMV_ROWS, EngineConfig
    from engine.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="gemv_max_rows"):
        EngineConfig(model="smollm2", device="cuda", gemv_max_rows=MAX_GEMV_ROWS + 1)
