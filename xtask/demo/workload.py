"""The demo's scripted workload, driven with the official SDKs.

    workload.py checkout URL KEY N   -- service "checkout-assistant" through the enforcer (base_url)
    workload.py batch URL CA N       -- service "batch-summarizer" straight at the provider (bypass);
                                        CA "-" means the system roots and OPENAI_API_KEY (--real)

Prints one JSON line per call on stdout: {"service", "ok", "status", "cost", "error"}. Never prints
prompts or keys.
"""

import ctypes
import json
import os
import sys
import time

import httpx
import openai

PROMPTS = [
    "Summarise the return policy for order 1042 in two sentences.",
    "Which shipping option arrives before Friday for a 2kg parcel to Lyon?",
    "Draft a polite reply to a customer whose discount code expired yesterday.",
    "Explain the difference between our gift card and store credit.",
]


def set_comm(name: str) -> None:
    """Names this process (what `ps` and the observer's attribution see as comm)."""
    libc = ctypes.CDLL(None)
    PR_SET_NAME = 15
    libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def checkout(base_url: str, key: str, n: int) -> None:
    set_comm("checkout-assist")
    client = openai.OpenAI(
        base_url=base_url,
        api_key=key,
        max_retries=0,
        default_headers={"X-Tenant-ID": "acme", "X-Feature-Name": "checkout-assistant"},
    )
    for i in range(n):
        prompt = PROMPTS[i % len(PROMPTS)]
        try:
            if i % 2 == 0:
                r = client.chat.completions.with_raw_response.create(
                    model="gpt-4.1", max_tokens=400, messages=[{"role": "user", "content": prompt}]
                )
                emit(service="checkout-assistant", ok=True, status=r.status_code,
                     cost=r.headers.get("x-warden-cost-usd"), stream=False)
            else:
                stream = client.chat.completions.create(
                    model="gpt-4.1", max_tokens=400, stream=True,
                    messages=[{"role": "user", "content": prompt}],
                )
                chunks = sum(1 for _ in stream)
                emit(service="checkout-assistant", ok=True, status=200, chunks=chunks, stream=True)
        except openai.APIStatusError as e:
            emit(service="checkout-assistant", ok=False, status=e.status_code,
                 error=str(getattr(e, "message", ""))[:200])
        time.sleep(0.4)


def batch(base_url: str, ca: str, n: int) -> None:
    set_comm("batch-summarize")
    real = ca == "-"
    client = openai.OpenAI(
        base_url=base_url,
        api_key=os.environ["OPENAI_API_KEY"] if real else "sk-demo-direct",
        max_retries=0,
        http_client=httpx.Client(verify=True if real else ca, http2=False),
        default_headers={"X-Tenant-ID": "acme", "X-Feature-Name": "batch-summarizer"},
    )
    for i in range(n):
        try:
            r = client.chat.completions.create(
                model="gpt-4.1", max_tokens=300,
                messages=[{"role": "user", "content": "Summarise document %d of the nightly batch." % i}],
            )
            emit(service="batch-summarizer", ok=True, status=200,
                 tokens=r.usage.total_tokens if r.usage else None, bypass=True)
        except openai.APIError as e:
            emit(service="batch-summarizer", ok=False, status=getattr(e, "status_code", None),
                 error=type(e).__name__)
        time.sleep(0.6)


if __name__ == "__main__":
    which, url, secret, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    {"checkout": checkout, "batch": batch}[which](url, secret, count)
