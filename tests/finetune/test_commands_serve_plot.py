"""`finetune serve` and `finetune plot` as commands: a real server process answering the official client, and a
picture from a run's metrics."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.cli import main
from llama_core.weights import save_hf

ROOT = Path(__file__).resolve().parent.parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_answers_the_openai_client(tiny_model, tokenizer, tmp_path):
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    model = tiny_model()
    save_hf(model, model.config, tmp_path / "m", extra_files={"tokenizer.model": tokenizer.path})
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "serve", "--model", str(tmp_path / "m"), "--port",
                             str(port), "--name", "tiny"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
        deadline = time.time() + 120
        while True:
            try:
                assert [m.id for m in client.models.list().data] == ["tiny"]
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
                time.sleep(0.2)
        reply = client.chat.completions.create(model="tiny", temperature=0, max_tokens=5,
                                               messages=[{"role": "user", "content": "Name a color."}])
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", messages=[], max_tokens=5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # The port is checked before the model is loaded: a busy port is a clear error.
    with socket.create_server(("127.0.0.1", 0)) as busy:
        code = main(["serve", "--model", str(tmp_path / "m"), "--port", str(busy.getsockname()[1])])
    assert code == 2


def test_plot_command(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train_loss": 3 - s / 10, "lr": 1e-3,
                                                           "tokens": 100 * s}) + "\n" for s in range(1, 11)))
    assert main(["plot", str(run)]) == 0
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shutil.copytree(run, tmp_path / "other")
    assert main(["plot", str(run), str(tmp_path / "other"), "--output", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").stat().st_size > 1000
    assert main(["plot", str(tmp_path / "missing")]) == 2
    (tmp_path / "precious.png").write_bytes(b"the user's")  # an existing --output only with --overwrite
    assert main(["plot", str(run), "--output", str(tmp_path / "precious.png")]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "precious.png").read_bytes() == b"the user's"
    assert main(["plot", str(run), "--output", str(tmp_path / "precious.png"), "--overwrite"]) == 0
    assert (tmp_path / "precious.png").read_bytes()[:4] == b"\x89PNG"
