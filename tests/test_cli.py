"""The infercache command: store stats/clear, models list, clear errors with exit code 2."""

from infercache import store
from infercache.cli import main


def test_store_stats_and_clear(tmp_path, capsys):
    url = f"disk:{tmp_path}"
    kv = store.open(url)
    kv.put("a" * 64, b"hello")
    kv.put("b" * 64, b"world!")
    kv.close()
    assert main(["store", "stats", url]) == 0
    assert "2 entries" in capsys.readouterr().out
    assert main(["store", "clear", url]) == 0
    assert "removed 2 of 2" in capsys.readouterr().out
    assert main(["store", "stats", url]) == 0
    assert "0 entries" in capsys.readouterr().out


def test_models_list_names_every_model(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("smollm2-135m", "gemma3-270m", "stories260k", "tiny-random-phi3", "dit-digits"):
        assert name in out
    assert "dequantized from 4-bit" in out


def test_bad_input_exits_with_a_clear_message(capsys):
    assert main(["run", "--model", "nope", "--prompt", "hi"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["bench", "--model", "tiny-random-llama", "--methods", "nope", "--out", "/tmp/never"]) == 2
    assert "unknown method" in capsys.readouterr().err
