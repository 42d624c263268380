"""The official OpenAI and Anthropic Python SDKs through the enforcer, unmodified except base_url.

Usage: enforcer_sdk.py PROXY_BASE KEY
Prints one JSON object with what each scenario saw; the Rust test (tests/tests/enforcer_sdk.rs)
checks it against the ledger and the mock.
"""

import json
import sys
import time

import anthropic
import openai

base, key = sys.argv[1], sys.argv[2]
out = {}
t0 = time.monotonic()


def lap(name):
    out.setdefault("timings_ms", {})[name] = round((time.monotonic() - t0) * 1000)


oa = openai.OpenAI(base_url=f"{base}/proxy/openai", api_key=key, default_headers={"X-Tenant-ID": "sdk"})
r = oa.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "say hello"}], max_tokens=20
)
out["openai_text"] = r.choices[0].message.content
out["openai_usage"] = r.usage.total_tokens
lap("openai")

chunks, text = 0, []
stream = oa.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "stream please"}], max_tokens=20, stream=True
)
for c in stream:
    chunks += 1
    if c.choices and c.choices[0].delta.content:
        text.append(c.choices[0].delta.content)
    out["openai_stream_saw_usage"] = out.get("openai_stream_saw_usage", False) or c.usage is not None
out["openai_stream_chunks"] = chunks
out["openai_stream_text"] = "".join(text)
lap("openai_stream")

an = anthropic.Anthropic(base_url=f"{base}/proxy/anthropic", api_key=key, default_headers={"X-Tenant-ID": "sdk"})
m = an.messages.create(model="claude-sonnet-4-5", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
out["anthropic_text"] = m.content[0].text
out["anthropic_output_tokens"] = m.usage.output_tokens
lap("anthropic")
with an.messages.stream(
    model="claude-sonnet-4-5", max_tokens=20, messages=[{"role": "user", "content": "stream hi"}]
) as s:
    out["anthropic_stream_text"] = "".join(s.text_stream)
lap("anthropic_stream")

# A denial: 402 surfaces as APIStatusError, and the SDK does not retry it (max_retries left at default).
broke = openai.OpenAI(base_url=f"{base}/proxy/openai", api_key=key, default_headers={"X-Tenant-ID": "broke"})
try:
    broke.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], max_tokens=20)
    out["denial"] = None
except openai.APIStatusError as e:
    out["denial"] = {"status": e.status_code, "code": (e.body or {}).get("code"), "message": str(e.message)}

broke_an = anthropic.Anthropic(base_url=f"{base}/proxy/anthropic", api_key=key, default_headers={"X-Tenant-ID": "broke"})
try:
    broke_an.messages.create(model="claude-sonnet-4-5", max_tokens=20, messages=[{"role": "user", "content": "x"}])
    out["anthropic_denial"] = None
except anthropic.APIStatusError as e:
    out["anthropic_denial"] = {"status": e.status_code}

lap("denials")
print(json.dumps(out))
