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


def test_train_gates_saves_weights_that_the_method_loads(tmp_path, capsys):
    import torch

    import infercache
    from infercache.models import load

    out = tmp_path / "gates.safetensors"
    code = main(["train-gates", "--model", "tiny-random-llama", "--steps", "3", "--sequences", "4", "--seq-len", "24",
                 "--memory", "8", "--batch-size", "2", "--threads", "1", "--out", str(out)])
    assert code == 0
    assert "capacity" in capsys.readouterr().out
    model, _ = load("tiny-random-llama")
    cache = infercache.compressed_cache(model, "retention_gates", 0.5, gates=str(out))
    ids = torch.randint(3, 200, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    kept = sum(int(t.sum()) for t in cache.lengths() if t is not None)
    assert kept == 15 * model.config.num_key_value_heads * model.config.num_hidden_layers


def test_train_gates_rejects_a_memory_at_or_above_the_sequence(capsys):
    assert main(["train-gates", "--model", "tiny-random-llama", "--memory", "64", "--seq-len", "64"]) == 2
    assert "memory" in capsys.readouterr().err
