#!/usr/bin/env python3
# What a real client sees: the official `openai` Python SDK pointed at chutes-proxy.
#
# Usage: test_openai_sdk.py RATE_LIMITED_URL QUOTA_URL STREAM_URL [BUSY_URL]
# (or the env vars SDK_RATE_LIMITED_URL, SDK_QUOTA_URL, SDK_STREAM_URL), each a proxy base URL
# ending in /v1, whose upstream is a mock that
#   RATE_LIMITED_URL: answers every request with a 429 (cooldown.initial = 1s, multiplier 2);
#   QUOTA_URL:        answers with Chutes' 402 quota message (reset well ahead);
#   STREAM_URL:       streams one chunk, then Chutes' raw `{"error": "boom"}` line;
#   BUSY_URL:         a capacity 429 for the model first, then success (the proxy retries).
# tests/it/signals.rs starts those and runs this script; it is not a pytest module because
# it needs those servers. It prints one line per check and a closing "N passed, N failed",
# and exits non-zero if anything failed.
#
# Why these checks: services behind the proxy use the SDKs, so the proxy's 429s only help if
# the SDK (a) raises RateLimitError with a code it can branch on, (b) waits the proxy's
# Retry-After rather than its own short backoff, (c) stops retrying when told
# `x-should-retry: false`, and (d) raises on an error inside a stream instead of ending it
# as if it had succeeded.

import json
import os
import sys
import time

import httpx
import openai

MESSAGES = [{"role": "user", "content": "hi"}]
results = []


def check(name, ok, detail=""):
    results.append(ok)
    print(f"{'PASS' if ok else 'FAIL'}: {name}" + (f" ({detail})" if detail else ""), flush=True)


def recording_client(base_url, max_retries):
    """An SDK client whose every HTTP attempt (first try and retries) is timestamped."""
    attempts = []

    def on_request(request):
        attempts.append(time.monotonic())

    http = httpx.Client(event_hooks={"request": [on_request]}, timeout=30.0)
    client = openai.OpenAI(
        base_url=base_url, api_key="dummy", max_retries=max_retries, http_client=http
    )
    return client, attempts


def rate_limited(base_url):
    client, attempts = recording_client(base_url, max_retries=1)
    try:
        client.chat.completions.create(model="m", messages=MESSAGES)
        check("rate-limited: raises", False, "no exception")
        return
    except openai.RateLimitError as e:
        err = e
    except Exception as e:  # noqa: BLE001 - report any other outcome as a failure
        check("rate-limited: raises RateLimitError", False, repr(e))
        return
    check("rate-limited: raises RateLimitError", True)
    check("rate-limited: .code", err.code == "rate_limit_exceeded", repr(err.code))
    check("rate-limited: .type", err.type == "requests", repr(err.type))
    proxy = (err.body or {}).get("proxy", {}) if isinstance(err.body, dict) else {}
    check("rate-limited: proxy reason", proxy.get("reason") == "upstream_rate_limited", json.dumps(proxy))
    check("rate-limited: upstream status in body", proxy.get("upstream_status") == 429)
    check("rate-limited: two attempts (max_retries=1)", len(attempts) == 2, f"{len(attempts)} attempts")
    if len(attempts) >= 2:
        gap = attempts[1] - attempts[0]
        # Without Retry-After the SDK's first backoff is 0.375-0.5 s; the proxy said ~1 s.
        check("rate-limited: retry waited the proxy's Retry-After (~1 s)", gap >= 0.9, f"gap {gap:.3f}s")
    headers = err.response.headers
    # The final answer is the probe's 429 after the first cooldown: the next one is 2 s
    # (retry-after-ms, as the SDK reads it first; over 1000 means it escalated).
    ms = headers.get("retry-after-ms", "")
    check("rate-limited: final cooldown escalated (1-2 s)", ms.isdigit() and 1000 < int(ms) <= 2000, ms)
    check("rate-limited: x-should-retry true", headers.get("x-should-retry") == "true")
    print(
        "observed: rate-limited attempts at +"
        + ", +".join(f"{t - attempts[0]:.3f}s" for t in attempts)
        + f"; final retry-after={headers.get('retry-after')} retry-after-ms={headers.get('retry-after-ms')}",
        flush=True,
    )


def quota(base_url):
    client, attempts = recording_client(base_url, max_retries=2)
    for call in (1, 2):
        try:
            client.chat.completions.create(model="m", messages=MESSAGES)
            check(f"quota call {call}: raises", False, "no exception")
            continue
        except openai.RateLimitError as e:
            err = e
        except Exception as e:  # noqa: BLE001
            check(f"quota call {call}: raises RateLimitError", False, repr(e))
            continue
        check(f"quota call {call}: raises RateLimitError", True)
        check(f"quota call {call}: .code", err.code == "insufficient_quota", repr(err.code))
        proxy = err.body.get("proxy", {}) if isinstance(err.body, dict) else {}
        check(
            f"quota call {call}: proxy reason",
            proxy.get("reason") == "daily_quota_exhausted",
            json.dumps(proxy),
        )
        check(
            f"quota call {call}: x-should-retry false",
            err.response.headers.get("x-should-retry") == "false",
        )
        # max_retries=2 and a Retry-After the SDK would honour (<= 60 s): only
        # `x-should-retry: false` stops it from retrying.
        if call == 1:
            ra = err.response.headers.get("retry-after", "")
            check("quota call 1: Retry-After short enough to be honoured", ra.isdigit() and int(ra) <= 60, ra)
        check(f"quota call {call}: not retried", len(attempts) == call, f"{len(attempts)} attempts so far")
        print(f"observed: quota call {call} retry-after={err.response.headers.get('retry-after')}", flush=True)


def stream(base_url):
    client, _ = recording_client(base_url, max_retries=0)
    got = []
    try:
        for chunk in client.chat.completions.create(model="m", messages=MESSAGES, stream=True):
            for choice in chunk.choices:
                if choice.delta and choice.delta.content:
                    got.append(choice.delta.content)
        check("stream: raises on the upstream's error line", False, f"ended normally after {got!r}")
    except openai.APIError as e:
        check("stream: raises APIError on the upstream's error line", True, f"{type(e).__name__}: {e.message}")
        check("stream: error message is the upstream's", "boom" in str(e.message), repr(e.message))
        check("stream: content before the error was delivered", got == ["Hel"], repr(got))


def busy(base_url):
    # The proxy retries on the client's behalf: an SDK that never retries still succeeds.
    client, attempts = recording_client(base_url, max_retries=0)
    try:
        raw = client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
        done = raw.parse()
        check("busy model: success through a capacity 429 with max_retries=0", True)
        check("busy model: one attempt by the SDK", len(attempts) == 1, f"{len(attempts)} attempts")
        check("busy model: x-proxy-retries: 1", raw.headers.get("x-proxy-retries") == "1", raw.headers.get("x-proxy-retries"))
        check("busy model: the answer is the upstream's", done.choices[0].message.content == "hi")
    except openai.APIError as e:
        check("busy model: success through a capacity 429 with max_retries=0", False, f"{type(e).__name__}: {e}")


def main():
    busy_url = sys.argv[4] if len(sys.argv) > 4 else os.environ.get("SDK_BUSY_URL")
    urls = sys.argv[1:4]
    if len(urls) != 3:
        env = [os.environ.get(k) for k in ("SDK_RATE_LIMITED_URL", "SDK_QUOTA_URL", "SDK_STREAM_URL")]
        if not all(env):
            print(__doc__ or "usage: test_openai_sdk.py RATE_LIMITED_URL QUOTA_URL STREAM_URL", file=sys.stderr)
            return 2
        urls = env
    print(f"openai {openai.__version__}, httpx {httpx.__version__}, python {sys.version.split()[0]}", flush=True)
    rate_limited(urls[0])
    quota(urls[1])
    stream(urls[2])
    if busy_url:
        busy(busy_url)
    passed = sum(results)
    failed = len(results) - passed
    print(f"sdk: {passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
