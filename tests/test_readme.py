"""The README's Python examples that need no GPU, network or weights run as written."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"
NEEDS_MORE = ("microsoft/", "cuda", "device_map={", "weights/", "OpenAI(")  # hub ids, GPUs, real weights, a server


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_s_cpu_examples_run(tmp_path, monkeypatch, capsys):
    runnable = [block for block in _blocks() if not any(marker in block for marker in NEEDS_MORE)]
    assert runnable, "no Python example of the README runs on a CPU without weights"
    monkeypatch.chdir(tmp_path)  # examples write relative paths (tiny-phi3v/)
    for block in runnable:
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})  # our own README
    assert (tmp_path / "tiny-phi3v" / "model.safetensors").exists()
    assert "tensor(" in capsys.readouterr().out  # the generated ids were printed
