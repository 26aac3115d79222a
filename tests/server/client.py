"""Drives `bitnet serve` with the official `openai` client (and raw HTTP for malformed requests).

Run by tests/server.rs against a server it started on the tiny fixture:
    client.py SCENARIO --base-url http://127.0.0.1:PORT --model ID [--expect JSON]
Each scenario exits non-zero with a message on the first mismatch.
"""

import argparse
import concurrent.futures
import json
import random
import sys
import time
import urllib.error
import urllib.request

import openai

MAX_BODY_BYTES = 1 << 20
# Nearly the fixture's whole context (4096): seconds of decoding, so still running when the
# test acts on it, and cancelled long before it ends.
LONG = 4000


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


class Server:
    def __init__(self, base_url, model, api_key=None):
        self.base = base_url
        self.model = model
        self.api_key = api_key
        self.client = openai.OpenAI(
            base_url=f"{base_url}/v1", api_key=api_key or "unused", max_retries=0, timeout=120
        )

    def raw(self, method, path, body=None, headers=None, timeout=60):
        """(status, decoded JSON or text) of one HTTP request; `body` bytes, str or JSON value."""
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        hdrs = {"Content-Type": "application/json"}
        if self.api_key:
            hdrs["Authorization"] = f"Bearer {self.api_key}"
        hdrs.update(headers or {})
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text

    def metrics(self):
        status, text = self.raw("GET", "/metrics")
        check(status == 200, f"/metrics answered {status}")
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def wait_healthy(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status, body = self.raw("GET", "/health", timeout=5)
                if status == 200:
                    check(body == {"status": "ok"}, f"/health body {body}")
                    return
            except OSError:
                pass
            time.sleep(0.05)
        fail("the server did not become healthy")

    def complete(self, prompt, stream, max_tokens, chat=False, logprobs=None, **extra):
        """(text, finish_reason, usage, tokens) of one greedy request, EOS ignored; `tokens`
        lists (token, logprob, top alternatives) when `logprobs` alternatives were asked for."""
        body = {"ignore_eos": True, **extra.pop("extra_body", {})}
        args = dict(model=self.model, max_tokens=max_tokens, temperature=0, extra_body=body, **extra)
        if logprobs is not None:
            args.update({"logprobs": True, "top_logprobs": logprobs} if chat else {"logprobs": logprobs})
        if stream:
            args["stream"] = True
            args["stream_options"] = {"include_usage": True}
        if chat:
            out = self.client.chat.completions.create(
                messages=[{"role": "user", "content": prompt}], **args
            )
        else:
            out = self.client.completions.create(prompt=prompt, **args)
        if not stream:
            choice = out.choices[0]
            text = choice.message.content if chat else choice.text
            check(out.object == ("chat.completion" if chat else "text_completion"), out.object)
            return text, choice.finish_reason, out.usage, token_logprobs(choice.logprobs, chat)
        pieces, finish, usage, ids, tokens = [], None, None, set(), []
        for i, chunk in enumerate(out):
            ids.add(chunk.id)
            check(finish is None or not chunk.choices, "a chunk after the finish reason")
            if chunk.usage is not None:
                usage = chunk.usage
                check(not chunk.choices, "usage chunk with choices")
                continue
            choice = chunk.choices[0]
            if chat:
                check((choice.delta.role == "assistant") == (i == 0), f"delta.role in chunk {i}")
                piece = choice.delta.content
            else:
                piece = choice.text
            if piece:
                pieces.append(piece)
            tokens += token_logprobs(choice.logprobs, chat)
            if choice.finish_reason is not None:
                finish = choice.finish_reason
        check(len(ids) == 1, f"chunks of one stream carry one id, got {ids}")
        check(usage is not None, "no usage chunk with include_usage")
        return "".join(pieces), finish, usage, tokens


def token_logprobs(logprobs, chat):
    """[(token, logprob, [(token, logprob), ...])] of a choice's logprobs, either format."""
    if logprobs is None:
        return []
    if chat:
        return [(t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs]) for t in logprobs.content]
    return [
        (t, lp, sorted(top.items(), key=lambda kv: -kv[1]))
        for t, lp, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs)
    ]


def expect_complete(server, prompt, stream, max_tokens, chat=False, **extra):
    text, finish, usage, tokens = server.complete(prompt, stream, max_tokens, chat, **extra)
    check(finish == "length", f"finish_reason {finish}, expected length (EOS ignored)")
    check(usage.completion_tokens == max_tokens, f"{usage.completion_tokens} tokens, asked {max_tokens}")
    check(usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, f"usage {usage}")
    if "logprobs" in extra:
        check(len(tokens) == max_tokens, f"{len(tokens)} logprobs for {max_tokens} tokens")
        for token, lp, top in tokens:
            # Completions key alternatives by their text: tokens decoding alike (U+FFFD) merge.
            want = extra["logprobs"]
            check(len(top) == want or (not chat and 0 < len(top) < want), f"{len(top)} alternatives, asked {want}")
            # Greedy: the chosen token is the most likely one.
            check(top and top[0][1] == lp and lp <= 0, f"greedy token {token!r} {lp} vs {top}")
    return text, usage, tokens


def basic(server, expect):
    """Chat and completions, streaming and not, against `bitnet generate`'s greedy output."""
    status, body = server.raw("GET", "/v1/models")
    check(status == 200 and [m["id"] for m in body["data"]] == [server.model], f"/v1/models {body}")
    check(server.client.models.retrieve(server.model).id == server.model, "models.retrieve")
    n = expect["max_tokens"]
    for stream in (False, True):
        text, usage, _ = expect_complete(server, expect["prompt_ids"], stream, n)
        check(text == expect["ids_text"], f"stream={stream}: {text!r} != generate's {expect['ids_text']!r}")
        check(usage.prompt_tokens == len(expect["prompt_ids"]), f"prompt_tokens {usage.prompt_tokens}")
        text, _, _ = expect_complete(server, expect["prompt"], stream, n)
        check(text == expect["text_text"], f"stream={stream}: {text!r} != generate's {expect['text_text']!r}")
        text, usage, _ = expect_complete(server, expect["prompt"], stream, n, chat=True)
        # Log probabilities in both formats; with them the text is unchanged.
        for chat in (False, True):
            prompt = expect["prompt"] if chat else expect["prompt_ids"]
            want = expect["chat_text"] if chat else expect["ids_text"]
            text, _, tokens = expect_complete(server, prompt, stream, n, chat, logprobs=3)
            check(text == want, f"logprobs chat={chat} stream={stream}: {text!r} != {want!r}")
        check(text == expect["chat_text"], f"chat stream={stream}: {text!r} != {expect['chat_text']!r}")
        check(usage.prompt_tokens == expect["chat_prompt_len"], f"chat prompt_tokens {usage.prompt_tokens}")
    # A stop string ends the text before it; the model's defaults apply to unset parameters.
    stop = expect["ids_text"][len(expect["ids_text"]) // 2 :][:3]
    text, finish, _, _ = server.complete(expect["prompt_ids"], False, n, stop=[stop])
    check(finish == "stop" and stop not in text, f"stop {stop!r}: {finish} {text!r}")
    check(expect["ids_text"].startswith(text), f"stop {stop!r}: {text!r} is not a prefix")
    out = server.client.completions.create(model=server.model, prompt="Hello", max_tokens=4, seed=7)
    check(out.usage.completion_tokens <= 4 and out.choices[0].finish_reason in ("stop", "length"), f"{out}")
    print("basic: ok")


def concurrent_streams(server, expect):
    """16 concurrent streaming clients each receive exactly what they receive alone."""
    rng = random.Random(16)
    requests = [
        ([rng.randrange(502) for _ in range(rng.randrange(1, 40))], rng.randrange(4, 48), i % 2 == 0)
        for i in range(16)
    ]

    def run(req):
        prompt, max_tokens, chat = req
        if chat:
            prompt = "".join(chr(ord("a") + id % 26) for id in prompt)
        text, _, tokens = expect_complete(server, prompt, True, max_tokens, chat, logprobs=2)
        return text, tokens

    alone = [run(r) for r in requests]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, requests))
    for i, ((text_a, lp_a), (text_t, lp_t)) in enumerate(zip(alone, together)):
        check(text_a == text_t, f"client {i}: alone {text_a!r}, concurrently {text_t!r}")
        check([t for t, _, _ in lp_a] == [t for t, _, _ in lp_t], f"client {i}: other tokens concurrently")
        # Tokens must match exactly; logprobs were seen to differ by ~1e-6 in another batch.
        worst = max(abs(a - t) for (_, a, _), (_, t, _) in zip(lp_a, lp_t))
        check(worst < 1e-4, f"client {i}: logprobs differ by {worst} concurrently")
    check(all(len(lp) > 0 for _, lp in alone), "no logprobs")
    print("concurrent: ok, 16 streams")


def load(server, expect):
    """300 requests from 32 concurrent clients: none failed, lost, truncated or duplicated."""
    rng = random.Random(300)
    prompts = [[502] + [rng.randrange(502) for _ in range(rng.randrange(1, 30))] for _ in range(6)]
    kinds = [(p, n, chat, stream) for p in range(6) for n in (3, 12) for chat in (False, True) for stream in (False, True)]

    def run(kind):
        p, n, chat, stream = kind
        prompt = "".join(chr(ord("a") + id % 26) for id in prompts[p]) if chat else prompts[p]
        return expect_complete(server, prompt, stream, n, chat)[0]

    reference = {(p, n, chat): run((p, n, chat, False)) for p, n, chat, _ in kinds}
    jobs = [rng.choice(kinds) for _ in range(300)]
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(run, job) for job in jobs]
        results = [f.result() for f in futures]
    secs = time.monotonic() - started
    for job, text in zip(jobs, results):
        check(text == reference[job[:3]], f"{job}: {text!r} != {reference[job[:3]]!r}")
    m = server.metrics()
    check(m.get("bitnet_queue_depth") == 0 and m.get("bitnet_running_requests") == 0, "idle after the load")
    print(f"load: ok, 300 requests, 32 clients, {secs:.1f} s")


def malformed(server, expect):
    """Each bad request gets a 4xx with the error object naming the problem; the server stays up."""
    m = server.model
    ok_chat = {"model": m, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    ok_cmpl = {"model": m, "prompt": [502, 1], "max_tokens": 2}
    ctx = expect["context_len"]
    cases = [
        ("/v1/chat/completions", '{"model": ', 400, None, "invalid JSON"),
        ("/v1/chat/completions", "[1, 2]", 400, None, "JSON object"),
        ("/v1/chat/completions", {**ok_chat, "temperature": "hot"}, 400, "temperature", "invalid type"),
        ("/v1/chat/completions", {**ok_chat, "max_tokens": -1}, 400, "max_tokens", "max_tokens"),
        ("/v1/chat/completions", {**ok_chat, "messages": "hi"}, 400, "messages", "invalid type"),
        ("/v1/chat/completions", {**ok_chat, "model": "gpt-4"}, 404, "model", "gpt-4"),
        ("/v1/chat/completions", {**ok_chat, "model": None}, 400, "model", "model"),
        ("/v1/chat/completions", {**ok_chat, "messages": []}, 400, "messages", "empty"),
        ("/v1/chat/completions", {k: v for k, v in ok_chat.items() if k != "messages"}, 400, "messages", "messages"),
        ("/v1/chat/completions", {**ok_chat, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "robot"),
        ("/v1/chat/completions", {**ok_chat, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "content"),
        ("/v1/chat/completions", {**ok_chat, "max_tokens": ctx}, 400, "max_tokens", "context"),
        ("/v1/chat/completions", {**ok_chat, "max_completion_tokens": 0}, 400, "max_completion_tokens", "at least 1"),
        ("/v1/chat/completions", {**ok_chat, "n": 2}, 400, "n", "`n` must be 1"),
        ("/v1/chat/completions", {**ok_chat, "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
        ("/v1/chat/completions", {**ok_chat, "temperature": 5}, 400, "temperature", "[0, 2]"),
        ("/v1/chat/completions", {**ok_chat, "top_p": 0}, 400, "top_p", "(0, 1]"),
        ("/v1/chat/completions", {**ok_chat, "presence_penalty": 3}, 400, "presence_penalty", "[-2, 2]"),
        ("/v1/chat/completions", {**ok_chat, "repeat_penalty": 0}, 400, "repeat_penalty", "> 0"),
        ("/v1/chat/completions", {**ok_chat, "stop": [""]}, 400, "stop", "stop"),
        ("/v1/chat/completions", {**ok_chat, "stop": 5}, 400, "stop", "stop"),
        ("/v1/chat/completions", {**ok_chat, "logprobs": 3}, 400, "logprobs", "boolean"),
        ("/v1/chat/completions", {**ok_chat, "top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
        ("/v1/chat/completions", {**ok_chat, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "at most 20"),
        ("/v1/completions", {**ok_cmpl, "prompt": ""}, 400, "prompt", "empty"),
        ("/v1/completions", {**ok_cmpl, "prompt": []}, 400, "prompt", "empty"),
        ("/v1/completions", {**ok_cmpl, "prompt": ["a", "b"]}, 400, "prompt", "several prompts"),
        ("/v1/completions", {**ok_cmpl, "prompt": [502, 999999]}, 400, "prompt", "999999"),
        ("/v1/completions", {**ok_cmpl, "prompt": [502, -1]}, 400, "prompt", "-1"),
        ("/v1/completions", {**ok_cmpl, "prompt": [1] * ctx}, 400, "prompt", "context"),
        ("/v1/completions", {**ok_cmpl, "max_tokens": ctx - 1}, 400, "max_tokens", "context"),
        ("/v1/completions", {**ok_cmpl, "logprobs": 21}, 400, "logprobs", "at most 20"),
        ("/v1/completions", {**ok_cmpl, "echo": True}, 400, "echo", "not supported"),
        ("/v1/completions", {**ok_cmpl, "best_of": 3}, 400, "best_of", "not supported"),
        ("/v1/completions", {**ok_cmpl, "prompt": "x" * (MAX_BODY_BYTES + 1)}, 413, None, "limit"),
        ("/v1/nothing", ok_cmpl, 404, None, "/v1/nothing"),
    ]
    for path, body, status, param, needle in cases:
        got, answer = server.raw("POST", path, body)
        label = f"{path} {str(body)[:80]}"
        check(got == status, f"{label}: status {got}, expected {status}: {answer}")
        check(isinstance(answer, dict) and "error" in answer, f"{label}: no error object: {answer!r}"[:300])
        err = answer["error"]
        check(set(err) == {"message", "type", "param", "code"}, f"{label}: error fields {err}")
        check(err["param"] == param, f"{label}: param {err['param']!r}, expected {param!r}")
        check(needle in err["message"], f"{label}: {err['message']!r} does not name {needle!r}")
    # The official client raises the matching exception.
    try:
        server.client.chat.completions.create(model=m, messages=[{"role": "user", "content": "x"}], n=2)
        fail("n=2 was accepted")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and "`n` must be 1" in str(e), str(e))
    status, body = server.raw("GET", "/health")
    check(status == 200, f"unhealthy after the bad requests: {status} {body}")
    expect_complete(server, [502, 7, 8], True, 5)
    print(f"malformed: ok, {len(cases)} cases")


def wait_metric(server, name, want, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = server.metrics().get(name, 0.0)
        if got == want:
            return
        time.sleep(0.05)
    fail(f"{name} is {got}, expected {want}")


def cancelled_count(server):
    return sum(v for k, v in server.metrics().items() if k.startswith("bitnet_requests_finished_total") and 'reason="cancelled"' in k)


def long_stream(server):
    stream = server.client.completions.create(
        model=server.model, prompt=[502, 3, 4], max_tokens=LONG, temperature=0,
        stream=True, extra_body={"ignore_eos": True},
    )
    # Running once its first token arrived.
    next(iter(stream))
    return stream


def cancel(server, expect):
    """A client leaving mid-stream, or before a non-streamed answer, frees its slot."""
    before = cancelled_count(server)
    stream = long_stream(server)
    wait_metric(server, "bitnet_running_requests", 1)
    stream.close()
    wait_metric(server, "bitnet_running_requests", 0)
    check(cancelled_count(server) == before + 1, "the closed stream is not counted as cancelled")
    # A non-streamed request whose client times out.
    try:
        server.client.with_options(timeout=0.3).completions.create(
            model=server.model, prompt=[502, 5], max_tokens=LONG, temperature=0, extra_body={"ignore_eos": True}
        )
        fail(f"{LONG} tokens within the timeout")
    except openai.APITimeoutError:
        pass
    wait_metric(server, "bitnet_running_requests", 0)
    wait_metric(server, "bitnet_queue_depth", 0)
    deadline = time.monotonic() + 60
    while cancelled_count(server) != before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    check(cancelled_count(server) == before + 2, "the timed-out request is not counted as cancelled")
    expect_complete(server, [502, 7, 8], False, 5)
    print("cancel: ok")


def overload(server, expect):
    """With --max-batch 1 --max-queue 1: one running, one queued, the third answered 429 at once."""
    running = long_stream(server)
    queued_response = []

    def queued():
        try:
            queued_response.append(expect_complete(server, [502, 9], False, 2))
        except openai.APIError as e:
            queued_response.append(e)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(queued)
        wait_metric(server, "bitnet_queue_depth", 1)
        try:
            server.client.completions.create(model=server.model, prompt=[502, 10], max_tokens=2)
            fail("a request beyond --max-queue was accepted")
        except openai.RateLimitError as e:
            check(e.status_code == 429 and e.body["type"] == "rate_limit_error", f"{e.body}")
        running.close()
        waiting.result()
    check(not isinstance(queued_response[0], Exception), f"the queued request failed: {queued_response}")
    wait_metric(server, "bitnet_running_requests", 0)
    wait_metric(server, "bitnet_queue_depth", 0)
    m = server.metrics()
    check(m.get('bitnet_http_requests_total{route="/v1/completions",status="429"}') == 1, "429 not counted")
    print("overload: ok")


def auth(server, expect):
    """With an API key: /v1 needs `Authorization: Bearer <key>`; /health does not."""
    key = server.api_key
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
        status, body = server.raw("GET", "/v1/models", headers=headers)
        check(status == 401 and body["error"]["code"] == "invalid_api_key", f"{headers}: {status} {body}")
    status, body = server.raw("POST", "/v1/completions", {"model": server.model, "prompt": "x"}, headers={"Authorization": ""})
    check(status == 401 and "Authorization: Bearer" in body["error"]["message"], f"{status} {body}")
    try:
        openai.OpenAI(base_url=f"{server.base}/v1", api_key="wrong", max_retries=0).models.list()
        fail("a wrong key was accepted")
    except openai.AuthenticationError:
        pass
    check(server.raw("GET", "/health", headers={"Authorization": ""})[0] == 200, "/health needs no key")
    check([m.id for m in server.client.models.list()] == [server.model], "models with the key")
    expect_complete(server, [502, 7, 8], True, 3)
    print("auth: ok")


def shutdown(server, expect):
    """Streams until SIGTERM; the stream must end with the server's error, not hang."""
    stream = long_stream(server)
    print("streaming", flush=True)
    try:
        for _ in stream:
            pass
        fail("the stream ended without an error")
    except openai.APIError as e:
        check("shutting down" in str(e), f"stream ended with {e!r}")
    print("shutdown: ok")


SCENARIOS = {f.__name__: f for f in (basic, concurrent_streams, load, malformed, cancel, overload, auth, shutdown)}

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--api-key")
    parser.add_argument("--expect", default="{}", help="JSON: what `bitnet generate` produced")
    a = parser.parse_args()
    server = Server(a.base_url, a.model, a.api_key)
    server.wait_healthy()
    SCENARIOS[a.scenario](server, json.loads(a.expect))
