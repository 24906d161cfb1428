"""Drives a running `autoglm serve` with the official `openai` Python SDK.

Run by crates/autoglm-cli/tests/serve.rs, which starts the servers; each
check raises (and the script exits non-zero) with a message on failure.

    openai_suite.py main   --base URL --key KEY --samples DIR --max-body N
    openai_suite.py busy   --base URL --key KEY --metrics URL --pid SERVER_PID --samples DIR
    openai_suite.py mtls   --base URL --key KEY --ca CA.pem --cert C.pem --client-key K.pem --samples DIR
"""

import argparse
import base64
import concurrent.futures
import functools
import http.server
import json
import math
import os
import pathlib
import re
import signal
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request

import openai


def client(args, key=None, **kw):
    # No retries: a 429 or a refused connection must reach the check as is.
    return openai.OpenAI(base_url=args.base + "/v1", api_key=key or args.key, max_retries=0, timeout=60, **kw)


def data_url(path):
    return "data:image/png;base64," + base64.b64encode(pathlib.Path(path).read_bytes()).decode()


def samples(args):
    d = pathlib.Path(args.samples)
    return [json.loads(l) | {"path": d / json.loads(l)["image"]} for l in (d / "questions.jsonl").read_text().splitlines() if l.strip()]


def ask(c, path, question, **kw):
    return c.chat.completions.create(
        model="autoglm-tiny",
        temperature=0,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": question},
            {"type": "image_url", "image_url": {"url": data_url(path)}},
        ]}],
        **kw,
    )


def expect_status(status, fn, what):
    try:
        fn()
    except openai.APIStatusError as e:
        assert e.status_code == status, f"{what}: expected {status}, got {e.status_code}: {e}"
        return e
    raise AssertionError(f"{what}: expected HTTP {status}, the request succeeded")


def check_main(args):
    c = client(args)
    ids = {m.id for m in c.models.list()}
    assert {"autoglm-tiny", "all-MiniLM-L6-v2"} <= ids, ids

    # Plain chat with an image: the default model's answers to the samples.
    qs = samples(args)
    for q in qs:
        r = ask(c, q["path"], q["question"])
        got = r.choices[0].message.content
        assert got == q["answer"], f"{q['image']} {q['question']!r}: {got!r} != {q['answer']!r}"
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens >= 1
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    print(f"chat: {len(qs)} sample questions answered as expected")

    # Streaming gives the same answer in deltas, then the usage.
    q = qs[0]
    chunks = list(ask(c, q["path"], q["question"], stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == q["answer"], (text, q["answer"])
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    print(f"stream: {len(chunks)} chunks, {text!r}")

    # Embeddings: text through MiniLM (the SDK asks for base64 by default).
    e = c.embeddings.create(model="all-MiniLM-L6-v2", input=["a photo of a cat", "a kitten", "the stock market fell"])
    v = [d.embedding for d in e.data]
    assert all(len(x) == 384 for x in v) and all(abs(math.hypot(*x) - 1) < 1e-4 for x in v)
    dot = lambda a, b: sum(p * q for p, q in zip(a, b))
    assert dot(v[0], v[1]) > dot(v[0], v[2]) + 0.2, (dot(v[0], v[1]), dot(v[0], v[2]))
    f = c.embeddings.create(model="all-MiniLM-L6-v2", input="a kitten", encoding_format="float")
    assert max(abs(p - q) for p, q in zip(f.data[0].embedding, v[1])) < 1e-6, "float and base64 agree"
    # Images through the model's vision tower.
    img = {"type": "image_url", "image_url": {"url": data_url(qs[0]["path"])}}
    other = {"type": "image_url", "image_url": {"url": data_url(qs[-1]["path"])}}
    ie = c.embeddings.create(model="autoglm-tiny", input=[img, img, other], encoding_format="float")
    w = [d.embedding for d in ie.data]
    assert len(w[0]) == 1280 and w[0] == w[1] and w[0] != w[2]
    print("embeddings: text 384-d, images 1280-d")

    # 401: a wrong key and no key.
    e = expect_status(401, lambda: client(args, key="sk-wrong-key").models.list(), "wrong key")
    assert isinstance(e, openai.AuthenticationError)
    req = urllib.request.Request(args.base + "/v1/models")
    try:
        urllib.request.urlopen(req)
        raise AssertionError("no key: expected 401")
    except urllib.error.HTTPError as h:
        assert h.code == 401, h.code

    # Probes need no key; the scheme is case-insensitive; wrong methods get JSON.
    assert json.load(urllib.request.urlopen(args.base + "/health")) == {"status": "ok"}
    req = urllib.request.Request(args.base + "/v1/models", headers={"authorization": "bearer " + args.key})
    assert json.load(urllib.request.urlopen(req))["object"] == "list"
    try:
        urllib.request.urlopen(urllib.request.Request(args.base + "/v1/chat/completions", headers={"authorization": "Bearer " + args.key}))
        raise AssertionError("GET on chat completions: expected 405")
    except urllib.error.HTTPError as h:
        assert h.code == 405 and "POST" in json.load(h)["error"]["message"], h.code
    m = urllib.request.urlopen(args.base + "/metrics").read().decode()
    for name in ["autoglm_http_requests_total", "autoglm_queue_depth", "autoglm_generated_tokens_total",
                 "autoglm_time_to_first_token_seconds_bucket", "autoglm_http_request_duration_seconds_bucket"]:
        assert name in m, f"/metrics lacks {name}"
    assert re.search(r'autoglm_http_requests_total\{endpoint="/v1/chat/completions",status="200"\} \d+', m), m[:2000]

    # 413: a body over --max-body-bytes.
    big = "data:image/png;base64," + "A" * (args.max_body + 1000)
    expect_status(413, lambda: c.chat.completions.create(
        model="autoglm-tiny", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": big}}]}]), "big body")

    # 400s name the field; 404 for an unknown model.
    e = expect_status(400, lambda: c.chat.completions.create(model="autoglm-tiny", messages=[{"role": "user", "content": "hi"}], temperature=5), "temperature")
    assert e.body["param"] == "temperature", e.body
    e = expect_status(400, lambda: c.chat.completions.create(model="autoglm-tiny", messages=[{"role": "user", "content": "word " * 400}]), "long prompt")
    assert e.body["code"] == "context_length_exceeded" and "256" in e.body["message"], e.body
    e = expect_status(400, lambda: c.chat.completions.create(model="autoglm-tiny", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]), "local file")
    assert "local paths" in e.body["message"], e.body
    many = [{"type": "image_url", "image_url": {"url": data_url(qs[0]["path"])}}] * 9
    e = expect_status(400, lambda: c.chat.completions.create(model="autoglm-tiny", messages=[{"role": "user", "content": many}]), "9 images")
    assert "limit of 8" in e.body["message"], e.body
    e = expect_status(400, lambda: c.chat.completions.create(model="autoglm-tiny", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]), "remote image")
    assert "remote image URLs are disabled" in e.body["message"], e.body
    expect_status(404, lambda: c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}]), "unknown model")
    print("errors: 401, 413, 400 (field named), 404")


def metric(url, name):
    text = urllib.request.urlopen(url).read().decode()
    m = re.search(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def check_busy(args):
    """Against a server with --max-batch 1 --queue 1 and a slow model."""
    c = client(args)

    def one(_):
        try:
            r = c.chat.completions.create(model="slow", messages=[{"role": "user", "content": "count"}], max_tokens=1500, temperature=0)
            return r.choices[0].finish_reason
        except openai.RateLimitError as e:
            assert e.body["code"] == "queue_full", e.body
            return 429
        except openai.APIStatusError as e:
            return e.status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        out = list(pool.map(one, range(16)))
    assert out.count(429) >= 1, f"a full queue answers 429: {out}"
    assert all(o in (429, "length", "stop") for o in out), f"only 200s and 429s: {out}"
    print(f"busy: {out.count(429)} of 16 answered 429, the rest completed")

    # With --allow-remote-images, http(s) image URLs are fetched (here from
    # a local file server); a URL that fails is a 400 naming the field.
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=args.samples)
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{files.server_address[1]}"
    msg = lambda u: [{"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": u}}]}]
    r = c.chat.completions.create(model="slow", messages=msg(url + "/0.png"), max_tokens=3)
    assert r.usage.prompt_tokens > 16, r.usage
    e = expect_status(400, lambda: c.chat.completions.create(model="slow", messages=msg(url + "/missing.png"), max_tokens=3), "missing remote image")
    assert e.body["param"] == "messages[0].content[1]" and "cannot fetch" in e.body["message"], e.body
    files.shutdown()
    print("remote images: fetched when allowed; a failed fetch is a 400")

    # A client that stops reading a stream cancels its sequence.
    before = metric(args.metrics, "autoglm_cancelled_sequences_total")
    # Greedy: this prompt's answer on the random model has no end token in
    # 3,000 tokens (sampled, one can come early and finish the stream first).
    s = c.chat.completions.create(model="slow", messages=[{"role": "user", "content": "go on"}], max_tokens=3000, temperature=0, stream=True)
    n = 0
    for ch in s:
        n += 1
        if n == 3:
            break
    s.close()
    for _ in range(100):
        if metric(args.metrics, "autoglm_cancelled_sequences_total") > before:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the closed stream was not cancelled")
    assert metric(args.metrics, "autoglm_active_sequences") == 0
    r = c.chat.completions.create(model="slow", messages=[{"role": "user", "content": "again"}], max_tokens=5)
    assert 1 <= r.usage.completion_tokens <= 5
    print("cancel: the closed stream's sequence left the batch; the server goes on")

    # SIGTERM during a stream: the stream still ends normally (within the
    # grace period), and new connections are refused.
    s = c.chat.completions.create(model="slow", messages=[{"role": "user", "content": "go on"}], max_tokens=1500, temperature=0, stream=True)
    it = iter(s)
    next(it)
    os.kill(args.pid, signal.SIGTERM)
    time.sleep(0.3)
    finish = [ch.choices[0].finish_reason for ch in it if ch.choices]
    assert finish and finish[-1] in ("length", "stop"), finish
    try:
        c.models.list()
        raise AssertionError("a new request was served after SIGTERM")
    except openai.APIConnectionError:
        pass
    print(f"sigterm: the stream in flight ended with {finish[-1]!r}; new connections are refused")


def check_mtls(args):
    q = samples(args)[0]
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.load_cert_chain(args.cert, args.client_key)
    c = client(args, http_client=openai.DefaultHttpxClient(verify=ctx))
    got = ask(c, q["path"], q["question"]).choices[0].message.content
    assert got == q["answer"], (got, q["answer"])
    print("mtls: a client with a certificate signed by the CA is served")
    bare = ssl.create_default_context(cafile=args.ca)
    c = client(args, http_client=openai.DefaultHttpxClient(verify=bare))
    try:
        c.models.list()
        raise AssertionError("a client without a certificate was served")
    except openai.APIConnectionError:
        pass
    print("mtls: a client without a certificate is refused")


def check_kg(args):
    """The --kg model: a photo and a question, answered from WordNet facts."""
    c = client(args)
    ids = {m.id for m in c.models.list()}
    assert "kg-reader" in ids, ids

    def kg(question, n_images=1, **kw):
        parts = [{"type": "text", "text": question}]
        parts += [{"type": "image_url", "image_url": {"url": data_url(args.photo)}}] * n_images
        return c.chat.completions.create(model="kg-reader", messages=[{"role": "user", "content": parts}], **kw)

    r = kg("Is this an animal?")
    assert r.choices[0].message.content == "yes", r
    g = r.model_extra["grounding"]
    assert g["seen_as"]["wnid"] == "n02123159", g  # tiger cat
    assert g["chain_reaches_question"] and g["facts"][-1].endswith("animal"), g
    assert g["rule_answer"] == "yes" and r.usage.prompt_tokens > 0, r
    r = kg("Is this a vehicle?")
    assert r.choices[0].message.content == "no", r
    e = expect_status(400, lambda: kg("Is this an animal?", n_images=2), "two photos")
    assert "exactly one image_url" in str(e), e
    e = expect_status(400, lambda: kg("Is this an animal?", stream=True), "a stream")
    assert "stream" in str(e), e


def main():
    p = argparse.ArgumentParser()
    p.add_argument("check", choices=["main", "busy", "mtls", "kg"])
    p.add_argument("--base", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--samples")
    p.add_argument("--max-body", type=int)
    p.add_argument("--metrics")
    p.add_argument("--pid", type=int)
    p.add_argument("--ca")
    p.add_argument("--cert")
    p.add_argument("--client-key")
    p.add_argument("--photo")
    args = p.parse_args()
    {"main": check_main, "busy": check_busy, "mtls": check_mtls, "kg": check_kg}[args.check](args)
    print(f"openai {openai.__version__}: {args.check} checks passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
