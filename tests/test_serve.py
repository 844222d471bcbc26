"""`--run_mode serve`: a real server on 127.0.0.1 (its own process, a free port, stopped at the end), driven by
the official `openai` client: the same tokens as `--run_mode predict` (greedy), streamed and not; batching
that never mixes rows; a tool round trip; disconnects that free their row; 4xx errors that name the problem.

The tiny default model's random weights are seeded, so the server and the in-process predict runs hold the
same weights. The tool round trip serves a tiny model fine-tuned (150 steps, here) until it has memorised one
tool conversation, so it really emits the `<tool_call>` block the server parses.
"""
import concurrent.futures
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import REPO_ROOT

openai = pytest.importorskip("openai")

SEQ = 256
COMMON = ["--seq_length", str(SEQ), "--generate.max_new_tokens", "24", "--generate.stream", "false"]
MODEL = "tiny"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
TOOL_ARGS = {"city": "Paris"}
TOOL_RESULT = '{"celsius": 21}'
FINAL_ANSWER = "It is 21 C in Paris."
HEARTBEAT_WAIT = 12  # seconds; serving/engine.HEARTBEAT_SECONDS is 10
# the servers of single tests compile each step on its first use (the module's server and the msrun one warm
# every shape up first)
LAZY = ["--serve.warm_up", "false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, directory, args, name="tiny"):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(directory, "server.log"), "w")
        env = dict(os.environ, GLOG_v="3")
        self.proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "run_telechat2.py"), "--run_mode", "serve",
                                      "--serve.port", str(self.port)] + COMMON + list(args),
                                     cwd=directory, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.read_log()}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        else:
            self.stop()
            raise RuntimeError(f"server did not come up: {self.read_log()}")
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0, timeout=120)
        self.name = name

    def read_log(self) -> str:
        self.log.flush()
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()[-4000:]

    def health(self):
        with urllib.request.urlopen(self.base + "/health", timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str, data: bytes):
        req = urllib.request.Request(self.base + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve")
    # decode steps of 16 rows read 64, 128 or all 257 slots per row (serve.key_window, engine.WINDOW_ROWS): the
    # sixteen concurrent requests below answer as each does alone (whole cache, fewer rows)
    served = Served(str(directory), ["--serve.max_batch", "16", "--serve.prefill_bucket", "16",
                                     "--serve.key_window", "64"])
    yield served
    served.stop()


def _predict(prompts, raw=False, extra=()):
    from telechat2_ms.predict import run_predict
    from telechat2_ms.settings import load_settings

    args = COMMON + (["--prompt_format", "raw"] if raw else []) + list(extra)
    overrides = dict({args[i][2:]: args[i + 1] for i in range(0, len(args), 2)}, predict_data=list(prompts))
    return run_predict(load_settings(None, [overrides]), io.StringIO())


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == ["tiny"]
    health = server.health()
    assert health["status"] == "ok" and health["max_batch"] == 16
    assert "compiled the decode step for (rows, key slots) (1, 257)" in server.read_log()  # serve.warm_up: true


def test_chat_and_completion_equal_predict_streamed_and_not(server):
    prompts = ["What is 3 plus 4?", "你好"]
    want_chat = [_predict([p])[0] for p in prompts]  # one prompt per run: no padding in predict either
    want_raw = [_predict([p], raw=True)[0] for p in prompts]
    for prompt, chat_answer, raw_answer in zip(prompts, want_chat, want_raw):
        messages = [{"role": "user", "content": prompt}]
        got = server.client.chat.completions.create(model=MODEL, messages=messages, temperature=0)
        assert got.choices[0].message.content == chat_answer
        assert got.choices[0].finish_reason in ("stop", "length")
        assert got.usage.prompt_tokens > 0 and got.usage.completion_tokens > 0
        parts = [c.choices[0].delta.content or "" for c in server.client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, stream=True) if c.choices]
        assert "".join(parts) == chat_answer
        got = server.client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=24)
        assert got.choices[0].text == raw_answer
        parts = [c.choices[0].text for c in server.client.completions.create(
            model=MODEL, prompt=prompt, temperature=0, max_tokens=24, stream=True) if c.choices]
        assert "".join(parts) == raw_answer


def test_sixteen_concurrent_requests_return_what_they_return_alone(server):
    """Different prompt lengths, max_tokens, penalties, stops and seeded sampling: batching never mixes rows."""
    requests = []
    for i in range(16):
        kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "tell me " + "more " * (i * 3) + str(i)}],
                      max_tokens=4 + (i * 5) % 20)
        if i % 4 == 1:
            kwargs.update(temperature=0.8, top_p=0.9, seed=100 + i)  # sampled, its own seed
        else:
            kwargs.update(temperature=0)
        if i % 4 == 2:
            kwargs["extra_body"] = {"repetition_penalty": 1.3, "top_k": 3}
        requests.append(kwargs)

    def ask(kwargs):
        r = server.client.chat.completions.create(**kwargs)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

    alone = [ask(kwargs) for kwargs in requests]
    steps = server.health()["decode_steps"]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, requests))
    assert together == alone
    health = server.health()
    assert health["running"] == 0
    assert health["decode_steps"] - steps < sum(tokens for _, _, tokens in together) / 2  # rows shared steps


def test_a_client_that_disconnects_mid_stream_frees_its_row(tmp_path):
    served = Served(str(tmp_path), ["--serve.max_batch", "1", "--seq_length", "1024"] + LAZY)
    try:
        stream = served.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                       temperature=0, max_tokens=900, stream=True,
                                                       extra_body={"repetition_penalty": 1.0})
        for n, _ in enumerate(stream):
            if n == 3:
                break
        stream.close()  # the client goes away mid-stream
        deadline = time.time() + 30
        while served.health()["cancelled"] < 1 and time.time() < deadline:
            time.sleep(0.1)
        health = served.health()
        assert health["cancelled"] == 1 and health["running"] == 0
        got = served.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "next"}],
                                                    temperature=0, max_tokens=5)
        assert got.choices[0].finish_reason in ("stop", "length")  # the one row was free for it
        assert "compiled the decode step" not in served.read_log()  # serve.warm_up: false
    finally:
        served.stop()


@pytest.mark.parametrize("body, status, needle", [
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model 'nope' is not served"),
    ({"model": MODEL, "messages": []}, 400, "messages must be a non-empty list"),
    ({"model": MODEL, "messages": ["hi"]}, 400, "messages[0] must be an object"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role is 'wizard'"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": SEQ}, 400,
     "more than the context of 256 tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
     "tools[0] must be"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "function", "function": {"name": ""}}]}, 400, "tools[0].function.name"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p must be in"),
    ({"model": MODEL}, 400, "messages"),
    (b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
    # OpenAI fields that would change the answer and are not built are refused, not ignored
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400,
     "logprobs: log probabilities are not returned"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
     400, "response_format: only {'type': 'text'} is built"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5}, 400,
     "presence_penalty: not built; use repetition_penalty"),
])
def test_bad_requests_get_a_4xx_that_names_the_problem_and_the_server_keeps_serving(server, body, status, needle):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    got_status, got = server.post("/v1/chat/completions", data)
    assert got_status == status
    assert needle in got["error"]["message"], got
    assert set(got["error"]) == {"message", "type", "param", "code"}
    ok = server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "still there?"}],
                                               temperature=0, max_tokens=3)
    assert ok.choices[0].message.role == "assistant"


def test_fields_not_built_are_refused_by_name_and_their_neutral_values_accepted(server):
    """The completions endpoint's own fields; the neutral values some clients always send pass."""
    for extra, needle in [({"echo": True}, "echo: not built"), ({"best_of": 2}, "best_of: must be 1"),
                          ({"logprobs": 0}, "logprobs: log probabilities"), ({"suffix": "x"}, "suffix: not built")]:
        got_status, got = server.post("/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", **extra}).encode())
        assert got_status == 400 and needle in got["error"]["message"] and got["error"]["param"] in extra, got
    neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "logprobs": False}
    ok = server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               temperature=0, max_tokens=2, response_format={"type": "text"},
                                               **neutral)
    assert ok.choices[0].message.role == "assistant" and ok.usage.completion_tokens >= 1
    ok = server.client.completions.create(model=MODEL, prompt="hi", temperature=0, max_tokens=2, echo=False,
                                          best_of=1, **neutral)
    assert ok.usage.completion_tokens >= 1


def test_a_full_queue_answers_429(tmp_path):
    served = Served(str(tmp_path), ["--serve.max_batch", "1", "--serve.queue_size", "1", "--seq_length", "1024"] + LAZY)
    try:
        def ask(_):
            try:
                served.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                      temperature=0, max_tokens=600,
                                                      extra_body={"repetition_penalty": 1.0})
                return 200
            except openai.RateLimitError as err:
                assert "serve.queue_size 1" in str(err)
                return 429

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(ask, range(8)))
        assert codes.count(429) >= 1 and codes.count(200) >= 2
    finally:
        served.stop()


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    """The tiny model fine-tuned until it has memorised one tool conversation (the SFT record renders exactly
    as the server's chat template renders the same messages)."""
    from telechat2_ms.chat_template import tools_system_prompt
    from telechat2_ms.settings import load_settings
    from telechat2_ms.train import run_train

    directory = tmp_path_factory.mktemp("tool_model")
    call = '<tool_call>\n{"name": "get_weather", "arguments": ' + json.dumps(TOOL_ARGS) + "}\n</tool_call>"
    record = {"system": tools_system_prompt(TOOLS)[:-1], "tool": True, "multiturn": True, "dialog": [
        {"role": "user", "content": "Weather in Paris?"}, {"role": "bot", "content": call},
        {"role": "user", "content": f"<tool_response>\n{TOOL_RESULT}\n</tool_response>"},
        {"role": "bot", "content": FINAL_ANSWER}]}
    data = directory / "tool.jsonl"
    data.write_text(json.dumps(record) + "\n", encoding="utf-8")
    out = directory / "out"
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        run_train(load_settings(None, [{"run_mode": "finetune", "train.train_dataset": str(data), "seq_length": "512",
                                        "train.total_steps": "150", "train.learning_rate": "0.01",
                                        "train.min_learning_rate": "0.001", "train.warmup_steps": "10",
                                        "train.weight_decay": "0", "output_dir": str(out), "train.log_steps": "50"}]))
    finally:
        os.chdir(cwd)
    return str(out)


def test_tool_round_trip_streamed_and_not(tmp_path, tool_model):
    served = Served(str(tmp_path), ["--load_checkpoint", tool_model, "--seq_length", "512"] + LAZY)
    try:
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        first = served.client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0,
                                                      max_tokens=200)
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == TOOL_ARGS
        assert choice.message.content is None

        chunks = list(served.client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                                            temperature=0, max_tokens=200, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        streamed = [tc for d in deltas for tc in (d.tool_calls or [])]
        assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in streamed] == [
            (0, "get_weather", TOOL_ARGS)]
        assert "".join(d.content or "" for d in deltas).strip() == ""
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": TOOL_RESULT}]
        final = served.client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0,
                                                      max_tokens=200)
        assert final.choices[0].finish_reason == "stop"
        assert final.choices[0].message.content == FINAL_ANSWER
        assert final.choices[0].message.tool_calls is None
    finally:
        served.stop()


@pytest.mark.msrun
def test_tensor_parallel_server_under_msrun_answers_as_predict(tmp_path):
    """msrun tp2: rank 0 serves HTTP and runs the scheduler, rank 1 steps every batch with it."""
    import threading

    from tests.msrun.launcher import run_msrun

    prompts = ["What is 3 plus 4?", "你好", "tell me more"]
    want = [_predict([p])[0] for p in prompts]
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    result = {}

    def drive():
        try:
            deadline = time.time() + 240
            while time.time() < deadline:
                try:
                    with urllib.request.urlopen(base + "/health", timeout=2):
                        break
                except (urllib.error.URLError, ConnectionError, OSError):
                    time.sleep(0.5)
            client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)

            def ask(prompt):
                r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                   temperature=0)
                return r.choices[0].message.content

            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                result["together"] = list(pool.map(ask, prompts))
            time.sleep(HEARTBEAT_WAIT)  # idle longer than the heartbeat: rank 1 keeps waiting in its collective
            result["after_idle"] = ask(prompts[0])
        except Exception as err:  # reported by the assertion below
            result["error"] = repr(err)
        finally:
            result["done"] = True

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    job = run_msrun(REPO_ROOT / "run_telechat2.py", ["--run_mode", "serve", "--serve.port", str(port),
                                                     "--parallel_config.model_parallel", "2"] + COMMON,
                    workers=2, timeout=400, workdir=str(tmp_path), kill_when=lambda: result.get("done", False))
    thread.join(timeout=10)
    assert "error" not in result and job.killed, (result, job.output[-2000:], job.all_logs()[-4000:])
    assert result["together"] == want
    assert result["after_idle"] == want[0]


def test_stop_strings_end_the_text_before_them(server):
    messages = [{"role": "user", "content": "What is 3 plus 4?"}]
    full = server.client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)
    text = full.choices[0].message.content
    assert len(text) >= 8, text
    stop = text[4:7]
    cut = server.client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24,
                                                stop=[stop, "never-there"])
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    parts = [c.choices[0].delta.content or "" for c in server.client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=24, stop=stop, stream=True) if c.choices]
    assert "".join(parts) == text[:text.index(stop)]


def test_qwen2_is_served_through_its_chatml_template(qwen2_dir, tmp_path):
    """Another family: a converted Qwen2 checkpoint with its BPE tokenizer; the ChatML prompt (and the Hermes
    tools block) come from the family's template, answers equal predict's."""
    ms_file = tmp_path / "qwen2_tiny.safetensors"
    subprocess.run([sys.executable, "-m", "convert", "hf2ms", str(qwen2_dir), str(ms_file), "--no-progress"],
                   check=True, cwd=REPO_ROOT, env=dict(os.environ, GLOG_v="3"), capture_output=True)
    extra = ["--load_checkpoint", str(ms_file), "--tokenizer", str(qwen2_dir)]
    want = _predict(["你好, who are you?"], extra=extra)[0]
    served = Served(str(tmp_path), extra + ["--serve.served_model_name", "qwen2-tiny"] + LAZY)
    try:
        assert [m.id for m in served.client.models.list().data] == ["qwen2-tiny"]
        messages = [{"role": "user", "content": "你好, who are you?"}]
        got = served.client.chat.completions.create(model="qwen2-tiny", messages=messages, temperature=0)
        assert got.choices[0].message.content == want
        with_tools = served.client.chat.completions.create(model="qwen2-tiny", messages=messages, tools=TOOLS,
                                                           temperature=0, max_tokens=8)
        assert with_tools.usage.prompt_tokens > got.usage.prompt_tokens + 20  # the tools block is in the prompt
    finally:
        served.stop()


def test_a_mixture_of_experts_model_is_served_as_predict_answers(tmp_path):
    """A mixture-of-experts model (tiny TeleChat2-MoE, random weights) through the same server: the chat answer and
    its stream equal `--run_mode predict`'s (the sparse layers in the cached, batched decode)."""
    extra = ["--model", "telechat2_moe_tiny"]
    want = _predict(["What is 3 plus 4?"], extra=extra)[0]
    served = Served(str(tmp_path), extra + LAZY, name="telechat2_moe_tiny")
    try:
        messages = [{"role": "user", "content": "What is 3 plus 4?"}]
        got = served.client.chat.completions.create(model="telechat2_moe_tiny", messages=messages, temperature=0)
        assert got.choices[0].message.content == want
        parts = [c.choices[0].delta.content or "" for c in served.client.chat.completions.create(
            model="telechat2_moe_tiny", messages=messages, temperature=0, stream=True) if c.choices]
        assert "".join(parts) == want
    finally:
        served.stop()
