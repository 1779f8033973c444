"""`kvserve serve` flags: environment fallbacks, the engine config they build, refused combinations."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from server import cli


def test_flags_and_environment_build_the_engine_config(monkeypatch):
    monkeypatch.setenv("KVSERVE_MAX_NUM_SEQS", "12")
    monkeypatch.setenv("KVSERVE_NO_RUN_AHEAD", "1")
    monkeypatch.setenv("KVSERVE_ENABLE_PDL", "1")
    args = cli.build_parser().parse_args(["serve", "--device", "cuda", "--gemv-max-rows", "4", "--enforce-eager",
                                          "--no-enable-prefix-caching", "--scheduling-policy", "priority"])
    config = cli.engine_config("smollm2", args)
    assert config.device == "cuda" and config.gemv_max_rows == 4 and config.enable_pdl
    assert config.scheduler.policy == "priority"
    assert not config.cache.enable_prefix_caching
    assert config.scheduler.max_num_seqs == 12  # from the environment
    assert config.decode_graphs is False and config.run_ahead is False
    monkeypatch.delenv("KVSERVE_NO_RUN_AHEAD")
    monkeypatch.delenv("KVSERVE_ENABLE_PDL")
    default = cli.engine_config("smollm2", cli.build_parser().parse_args(["serve"]))
    assert default.gemv_max_rows == 0 and default.decode_graphs is None and default.run_ahead is None
    assert not default.enable_pdl and default.cache.enable_prefix_caching and default.scheduler.policy == "fcfs"


@pytest.mark.parametrize("flags", [["--gemv-max-rows", "2"], ["--enable-pdl"]])
def test_gpu_kernel_flags_on_cpu_are_refused_before_anything_loads(flags, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_cuda_devices", lambda: 0)  # so it refuses on a GPU machine too
    monkeypatch.setattr(cli, "serve", lambda args: pytest.fail("serve must not start"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{flags[0]} " in err and "needs --device cuda" in err


def test_out_of_range_gemv_rows_are_refused():
    from engine.config import MAX_GEMV_ROWS, EngineConfig
    from engine.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="gemv_max_rows"):
        EngineConfig(model="smollm2", device="cuda", gemv_max_rows=MAX_GEMV_ROWS + 1)


@pytest.mark.parametrize(("device", "dtype", "gpus", "want"), [
    ("auto", "auto", 0, ("cpu", "float32")),  # no GPU found: CPU stays the default
    ("auto", "auto", 1, ("cuda", "bfloat16")),
    ("cpu", "auto", 2, ("cpu", "float32")),  # an explicit device wins over a GPU being there
    ("cuda:1", "auto", 2, ("cuda:1", "bfloat16")),
    ("auto", "float16", 1, ("cuda", "float16")),
    ("cpu", "bfloat16", 0, ("cpu", "bfloat16")),
])
def test_device_and_dtype_resolve_like_vllms_defaults(device, dtype, gpus, want):
    assert cli.resolve_placement(device, dtype, gpus) == want


@pytest.mark.parametrize(("argv", "message"), [
    (["--device", "cuda"], "torch sees no CUDA device"),
    (["--device", "cuda:3"], "torch sees no CUDA device"),
    (["--device", "gpu"], "--device must be auto, cpu or cuda[:N]"),
    (["--dtype", "fp8"], "--dtype must be auto or one of float32, bfloat16, float16"),
])
def test_placement_that_cannot_run_here_is_refused_before_anything_loads(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(cli, "_cuda_devices", lambda: 0)
    monkeypatch.setattr(cli, "serve", lambda args: pytest.fail("serve must not start"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults_serve_on_the_cpu_without_a_gpu(monkeypatch):
    served = []
    monkeypatch.setattr(cli, "_cuda_devices", lambda: 0)
    monkeypatch.setattr(cli, "serve", served.append)
    cli.main(["serve"])
    assert (served[0].device, served[0].dtype) == ("cpu", "float32")
    config = cli.engine_config("smollm2", served[0])
    assert (config.device, config.dtype) == ("cpu", "float32")


def test_models_are_built_with_their_kv_share_and_a_budget_error_exits_cleanly(monkeypatch):
    from engine.errors import InvalidRequestError

    tasks = {"smol": "generate", "mini": "embed", "marian": "translate"}
    built = []

    def build(model, task, args, share, served_name=None):
        built.append((model, task, share))
        if model == "marian":
            raise InvalidRequestError("no GPU memory left for marian's KV cache")
        return SimpleNamespace(info=SimpleNamespace(name=model, task=task, path=model),
                               stats=lambda: SimpleNamespace(num_blocks_total=0))

    monkeypatch.setattr(cli, "model_task", tasks.__getitem__)
    monkeypatch.setattr(cli, "build_engine", build)
    args = cli.build_parser().parse_args(["serve", "--model", "smol", "--model", "mini", "--model", "marian"])
    with pytest.raises(SystemExit, match="cannot serve marian: no GPU memory left"):
        cli.serve(args)
    assert built == [("smol", "generate", 0.5), ("mini", "embed", 1.0), ("marian", "translate", 1.0)]


def test_speculative_config_builds_the_engine_config_and_bad_json_is_refused(monkeypatch, capsys):
    from engine.speculative import SpeculativeConfig

    args = cli.build_parser().parse_args(["serve", "--speculative-config",
                                          '{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3}'])
    assert cli.engine_config("smollm2", args).speculative == SpeculativeConfig(num_speculative_tokens=5,
                                                                              prompt_lookup_max=3)
    assert cli.engine_config("smollm2", cli.build_parser().parse_args(["serve"])).speculative is None
    monkeypatch.setattr(cli, "serve", lambda args: pytest.fail("serve must not start"))
    for text, message in (("{nope", "must be a JSON object"), ('{"num_speculative_tokens": 0}', "num_speculative"),
                          ('{"draft_model": "x"}', "unknown keys"), ('{"method": "eagle"}', "ngram")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["serve", "--device", "cpu", "--speculative-config", text])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_lora_flags(monkeypatch, capsys, tmp_path):
    """--lora-modules takes vLLM's two forms and implies --enable-lora; bad ones exit 2 before any model loads."""
    from engine.lora import LoRAModule

    args = cli.build_parser().parse_args(["serve", "--lora-modules", "sql=/a", '{"name": "chat", "path": "/b", '
                                          '"base_model_name": "smol"}', "--max-loras", "2"])
    assert cli.lora_modules(args) == [LoRAModule("sql", "/a"), LoRAModule("chat", "/b", "smol")]
    monkeypatch.setenv("KVSERVE_LORA_MODULES", "x=/x y=/y")
    assert cli.lora_modules(cli.build_parser().parse_args(["serve"])) == [LoRAModule("x", "/x"), LoRAModule("y", "/y")]
    monkeypatch.delenv("KVSERVE_LORA_MODULES")
    started = []
    monkeypatch.setattr(cli, "serve", lambda args: started.append(args))
    cli.main(["serve", "--device", "cpu", "--lora-modules", "sql=/a"])
    assert started[0].enable_lora and started[0].max_loras == 4 and started[0].max_lora_rank == 16
    for argv, message in ((["--lora-modules", "sql"], "name=path"), (["--enable-lora", "--max-loras", "0"], "max_loras"),
                          (["--allow-runtime-lora-updating"], "needs --enable-lora")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["serve", "--device", "cpu", *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_lora_modules_load_into_their_base_model():
    """Each adapter goes to the model it names (else the first generation model); names stay unique.
    The same function serves POST /v1/load_lora_adapter (tests/test_lora.py)."""
    from engine.errors import InvalidRequestError
    from engine.lora import LoRAModule
    from server.state import load_lora

    class Gen:
        def __init__(self):
            self.lora_names: list[str] = []

        def add_lora(self, name, path):
            self.lora_names.append(name)

    class Embed:
        pass

    served = {"mini": Embed(), "smol": Gen(), "qwen": Gen()}
    load_lora(served, LoRAModule("a", "/a"))
    load_lora(served, LoRAModule("b", "/b", "qwen"))
    assert served["smol"].lora_names == ["a"] and served["qwen"].lora_names == ["b"]
    for module, message in ((LoRAModule("a", "/x", "qwen"), "already served"), (LoRAModule("smol", "/x"), "already"),
                            (LoRAModule("c", "/c", "mini"), "not a served generation model")):
        with pytest.raises(InvalidRequestError, match=message):
            load_lora(served, module)


def test_parser_names_are_checked_before_anything_loads(monkeypatch, capsys):
    started = []
    monkeypatch.setattr(cli, "serve", lambda args: started.append(args))
    monkeypatch.setenv("KVSERVE_REASONING_PARSER", "qwen3")
    cli.main(["serve", "--device", "cpu", "--tool-call-parser", "hermes"])
    assert (started[0].reasoning_parser, started[0].tool_call_parser) == ("qwen3", "hermes")
    for flag in ("--reasoning-parser", "--tool-call-parser"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["serve", "--device", "cpu", flag, "granite"])
        assert exit_info.value.code == 2 and f"{flag} must be one of" in capsys.readouterr().err


def test_served_model_names_pair_with_the_models(monkeypatch, tiny_llama):
    """--served-model-name renames each --model in order (what requests and /v1/models use); a count
    that does not pair one to one exits before any model loads."""
    built = []

    def build(model, task, args, share, served_name=None):
        built.append((model, served_name))
        return SimpleNamespace(info=SimpleNamespace(name=served_name or model, task=task, path=model),
                               stats=lambda: SimpleNamespace(num_blocks_total=0))

    monkeypatch.setattr(cli, "model_task", lambda model: "generate")
    monkeypatch.setattr(cli, "build_engine", build)
    parse = cli.build_parser().parse_args
    args = parse(["serve", "--model", "smol", "--model", "mini", "--served-model-name", "chat", "embed"])
    assert cli.served_model_names(args, 2) == ["chat", "embed"]
    assert cli.served_model_names(parse(["serve"]), 2) == [None, None]
    monkeypatch.setenv("KVSERVE_SERVED_MODEL_NAME", "a,b")  # read when the parser is built
    assert cli.served_model_names(cli.build_parser().parse_args(["serve"]), 2) == ["a", "b"]
    assert cli.served_model_names(args, 2) == ["chat", "embed"]  # the flag wins
    monkeypatch.delenv("KVSERVE_SERVED_MODEL_NAME")
    for argv in (["--model", "smol", "--served-model-name", "a", "b"], ["--model", "smol", "--model", "mini",
                                                                       "--served-model-name", "a"]):
        with pytest.raises(SystemExit, match="one non-empty name per --model"):
            cli.serve(parse(["serve", *argv]))
    assert built == []
    # the name reaches the loaded engine: requests, /v1/models and LoRA bases go by it
    from engine.engine import LLMEngine

    config = cli.engine_config(str(tiny_llama), parse(["serve", "--device", "cpu", "--dtype", "float32",
                                                       "--num-kv-blocks", "16"]), served_name="tiny-chat")
    assert config.served_name == "tiny-chat"
    engine = LLMEngine.from_config(config)
    assert engine.info.name == "tiny-chat" and engine.info.path == str(tiny_llama)
