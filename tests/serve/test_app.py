"""``phi3v serve`` through the official ``openai`` client and raw HTTP: answers equal ``phi3v generate``'s, adapters
are picked by name, concurrent requests are batched, and every bad request gets its 4xx in OpenAI's shape."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from phi3v.cli import main
from phi3v.eval.inference import load_for_inference
from phi3v.processing import load_image
from tests.serve.conftest import SMALL_LIMITS, ServerThread, png_data_url, save_png

openai = pytest.importorskip("openai", reason="the serve tests talk through the official openai client")

QUESTION = "Which digit is this?"


def client(server, key="unused"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def ask(images, question=QUESTION):
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in images),
                                          {"type": "text", "text": question}]}]  # fmt: skip


def cli_generate(capsys, model_dir, image_files, max_new_tokens, adapter=None, question=QUESTION) -> str:
    argv = ["generate", "--model", str(model_dir), "--no-stream", "--max-new-tokens", str(max_new_tokens)]
    argv += [a for f in image_files for a in ("--image", str(f))] + (["--adapter", str(adapter)] if adapter else [])
    capsys.readouterr()
    assert main([*argv, question]) == 0
    return capsys.readouterr().out.removesuffix("\n")


def test_models_lists_the_base_and_each_adapter(server):
    assert [m.id for m in client(server).models.list()] == ["base", "a", "b"]


def test_greedy_answer_equals_phi3v_generate_token_for_token(server, served_model, tmp_path, capsys):
    image = save_png(tmp_path / "x.png", seed=3)
    reply = client(server).chat.completions.create(model="base", messages=ask([png_data_url(3)]), max_tokens=12,
                                                   temperature=0)  # fmt: skip
    assert reply.choices[0].message.content == cli_generate(capsys, served_model / "base", [image], 12)
    # the tokens themselves, from transformers' generate on the processor's documented prompt
    model, processor = load_for_inference(served_model / "base")
    inputs = processor.prompt(QUESTION, [load_image(image)])
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=processor.eos_token_ids,
                         pad_token_id=processor.pad_token_id)[0, inputs["input_ids"].shape[1] :].tolist()  # fmt: skip
    tokens = [t for t in out if t not in processor.eos_token_ids]
    assert reply.usage.completion_tokens == len(tokens) and reply.choices[0].message.content == processor.decode(tokens)
    assert reply.usage.prompt_tokens == inputs["input_ids"].shape[1]
    assert reply.choices[0].finish_reason == ("stop" if len(tokens) < len(out) else "length")


def test_two_images_and_each_adapter_by_name_equal_phi3v_generate(server, served_model, tmp_path, capsys):
    files = [save_png(tmp_path / "1.png", seed=1), save_png(tmp_path / "2.png", seed=2, size=(24, 50))]
    answers = {}
    for name, adapter in (("base", None), ("a", served_model / "a"), ("b", served_model / "b")):
        reply = client(server).chat.completions.create(model=name, messages=ask([png_data_url(1),
                                                       png_data_url(2, (24, 50))]), max_tokens=10)  # fmt: skip
        answers[name] = reply.choices[0].message.content
        assert answers[name] == cli_generate(capsys, served_model / "base", files, 10, adapter), name
    assert len(set(answers.values())) == 3  # the adapters really differ from the base and from each other


# the second case's answer holds the byte tokens <0x5D><0xA9>: alone the first decodes as "]", together "��"
@pytest.mark.parametrize(("seed", "question"), [(5, QUESTION), (7, "What is this?")])
def test_streamed_answer_arrives_in_pieces_and_equals_the_plain_one(server, seed, question):
    messages = ask([png_data_url(seed)], question)
    plain = client(server).chat.completions.create(model="a", messages=messages, max_tokens=16)
    pieces, finish = [], []
    stream = client(server).chat.completions.create(model="a", messages=messages, max_tokens=16, stream=True,
                                                    stream_options={"include_usage": True})  # fmt: skip
    usage = None
    for event in stream:
        if event.choices:
            pieces.append(event.choices[0].delta.content or "")
            finish.append(event.choices[0].finish_reason)
        usage = event.usage or usage
    assert "".join(pieces) == plain.choices[0].message.content
    assert sum(1 for p in pieces if p) > 2 and finish[-1] == plain.choices[0].finish_reason
    assert usage.completion_tokens == plain.usage.completion_tokens


def test_stop_strings_cut_the_answer(server):
    full = client(server).chat.completions.create(model="base", messages=ask([png_data_url(3)]), max_tokens=12)
    text = full.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 2]  # two characters from the middle of the answer
    assert len(stop) == 2
    cut = client(server).chat.completions.create(model="base", messages=ask([png_data_url(3)]), max_tokens=12,
                                                 stop=[stop])  # fmt: skip
    assert cut.choices[0].message.content == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats_and_max_tokens_caps(server):
    def sample(seed):
        return client(server).chat.completions.create(model="b", messages=ask([png_data_url(4)]), max_tokens=7,
                                                      temperature=1.5, top_p=0.9, seed=seed)  # fmt: skip

    first, again = sample(11), sample(11)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.usage.completion_tokens <= 7


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server):
    engine = server.app.state.engine
    questions = [f"question {k}" for k in range(6)]
    alone = [client(server).chat.completions.create(model="base", messages=ask([png_data_url(k)], q), max_tokens=8)
             .choices[0].message.content for k, q in enumerate(questions)]  # fmt: skip
    before = len(engine.batch_sizes)
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda kq: client(server).chat.completions.create(
            model="base", messages=ask([png_data_url(kq[0])], kq[1]), max_tokens=8).choices[0].message.content,
            enumerate(questions)))  # fmt: skip
    assert together == alone
    assert max(engine.batch_sizes[before:]) > 1  # some of them shared a batch


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):
        _Recorder.hits.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def _image_part(url):
    return {"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                                       {"type": "text", "text": "hi"}]}]}  # fmt: skip


def test_bad_requests_get_their_4xx_naming_the_field_and_the_server_stays_up(server, tmp_path):
    from PIL import Image

    remote = http.server.HTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=remote.serve_forever, daemon=True).start()
    big = tmp_path / "big.png"
    Image.new("RGB", (400, 400), "white").save(big)  # small file, too many pixels
    big_url = "data:image/png;base64," + base64.b64encode(big.read_bytes()).decode()
    heavy = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + bytes(SMALL_LIMITS["max_image_bytes"])).decode()
    good = {"model": "base", "messages": ask([png_data_url(0)])}
    part = "messages[0].content[0].image_url.url"
    cases = [
        (b"{not json", 400, None, "JSON"),
        (b"[1, 2]", 400, None, "JSON object"),
        ({**good, "model": "nope"}, 404, "model", "'nope' does not exist"),
        ({**good, "messages": ask([png_data_url(k) for k in range(4)])}, 400, "messages[0].content", "4 images"),
        ({**good, "max_tokens": 65}, 400, "max_tokens", "limit of 64"),
        ({**good, "messages": ask([], "x" * 400)}, 400, "messages", "limit of 300"),
        ({**good, "temperature": 3}, 400, "temperature", "from 0 to 2"),
        ({**good, "messages": []}, 400, "messages", "non-empty"),
        ({**good, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "robot"),
        (_image_part("data:image/png;base64," + base64.b64encode(b"not an image").decode()), 400, part, "decode"),
        (_image_part("data:image/png;base64,@@@"), 400, part, "base64"),
        (_image_part(f"http://127.0.0.1:{remote.server_port}/cat.png"), 400, part, "not fetched"),
        (_image_part(f"file://{big}"), 400, part, "--allow-local-files"),
        (_image_part(big_url), 413, part, "400x400 pixels"),
        (_image_part(heavy), 413, part, "bytes"),
        (json.dumps({**good, "pad": "x" * SMALL_LIMITS["max_body_bytes"]}).encode(), 413, None, "body"),
        ({**good, "messages": ask([png_data_url(0)], "<|image_2|> two?")}, 400, "messages", "image tags"),
    ]
    for body, status, param, words in cases:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        code, answer = post(server.url + "/v1/chat/completions", content)
        error = answer["error"]
        assert (code, error["param"]) == (status, param), body if len(content) < 300 else words
        assert words in error["message"] and error["type"], error
    remote.shutdown()
    assert _Recorder.hits == []  # the remote URL was never fetched
    code, answer = post(server.url + "/v1/chat/completions", json.dumps({**good, "max_tokens": 3}).encode())
    assert code == 200 and answer["choices"][0]["message"]["role"] == "assistant"


def post(url: str, content: bytes) -> tuple[int, dict]:
    """POST raw bytes as JSON; the status and the decoded answer (errors included)."""
    request = urllib.request.Request(url, data=content, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_api_key_and_local_files_are_settings(server, served_model, tmp_path):
    from phi3v.serve import ServeConfig
    from phi3v.serve.app import create_app

    engine = server.app.state.engine  # shared: no second model load
    config = ServeConfig(model=str(served_model / "base"), model_name="base", adapters={"a": "", "b": ""},
                         api_key="secret", allow_local_files=True, **SMALL_LIMITS)  # fmt: skip
    with ServerThread(create_app(config, engine)) as keyed:
        with pytest.raises(openai.AuthenticationError, match="API key"):
            client(keyed, "wrong").models.list()
        image = save_png(tmp_path / "local.png", seed=6)
        by_file = client(keyed, "secret").chat.completions.create(model="a", messages=ask([f"file://{image}"]),
                                                                  max_tokens=8)  # fmt: skip
        by_data = client(server).chat.completions.create(model="a", messages=ask([png_data_url(6)]), max_tokens=8)
        assert by_file.choices[0].message.content == by_data.choices[0].message.content
    assert client(server).models.list().data[0].id == "base"  # the first server still serves


def test_the_phi3v_serve_command_answers_the_openai_client(served_model, server):
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "phi3v", "serve", "--model", str(served_model / "base"), "--adapter",
               f"mine={served_model / 'a'}", "--port", str(port), "--max-tokens", "16"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        remote = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 120
        while True:
            try:
                names = [m.id for m in remote.models.list()]
                break
            except openai.APIConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
                time.sleep(0.2)
        assert names == ["base", "mine"]
        reply = remote.chat.completions.create(model="mine", messages=ask([png_data_url(1)]), max_tokens=6)
        in_process = client(server).chat.completions.create(model="a", messages=ask([png_data_url(1)]), max_tokens=6)
        assert reply.choices[0].message.content == in_process.choices[0].message.content
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize("adapter", ["noequals", "=dir", "name="])
def test_serve_refuses_a_malformed_adapter_flag(adapter, capsys):
    assert main(["serve", "--model", "m", "--adapter", adapter]) == 2
    assert "expected NAME=DIR" in capsys.readouterr().err
