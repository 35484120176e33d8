"""The README's quick-start examples, run as they are written (only the port differs) against a
real `lightvlm serve` of the bundled demo model; and that server's log: JSON lines only."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def quick_start_blocks(language: str, marker: str) -> list[str]:
    """The ```language blocks of the README's quick start that contain `marker`."""
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)
    return [b for b in blocks if marker in b]


def on_port(block: str, url: str) -> str:
    port = url.rsplit(":", 1)[1]
    return block.replace("localhost:8000", f"localhost:{port}").replace("127.0.0.1:8000", f"127.0.0.1:{port}")


def test_curl_example_as_written(open_server) -> None:  # noqa: ANN001
    (block,) = quick_start_blocks("bash", "curl ")
    assert "examples/scene-4.png" in block and (ROOT / "examples" / "scene-4.png").is_file()
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", on_port(block, open_server.url)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    events = [line.removeprefix("data: ") for line in proc.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    text = "".join(p["text"] for p in payloads if p["type"] == "token")
    assert text == "purple triangle, yellow square and blue circle"  # examples/questions.json
    assert payloads[-1]["type"] == "done" and payloads[-1]["finish_reason"] == "stop"


def test_openai_example_as_written(open_server) -> None:  # noqa: ANN001
    (block,) = quick_start_blocks("python", "OpenAI(")
    assert 'model="shapes-demo"' in block
    proc = subprocess.run([sys.executable, "-c", on_port(block, open_server.url)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "one"  # scene 4 has one circle (and the block's comment says so)


def test_served_name_is_the_directory_name(open_server) -> None:  # noqa: ANN001
    models = httpx.get(f"{open_server.url}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["shapes-demo"]
    assert httpx.get(f"{open_server.url}/ready", timeout=30).json()["model"] == "shapes-demo"
    assert "/" not in httpx.get(f"{open_server.url}/metrics", timeout=30).text.split('model="')[1].split('"')[0]


def test_server_log_is_json_lines_only(open_server) -> None:  # noqa: ANN001
    """Startup included: the model load (transformers' progress bar) and the engine process."""
    httpx.get(f"{open_server.url}/", timeout=30)
    lines = [line for line in open_server.log.read_text().splitlines() if line.strip()]
    assert any('"ready"' in line for line in lines)
    for line in lines:
        entry = json.loads(line)  # raises on any line that is not JSON
        assert {"level", "logger", "message"} <= set(entry), line
        assert {"ts", "time"} & set(entry), line  # the engine process names its timestamp "time"
