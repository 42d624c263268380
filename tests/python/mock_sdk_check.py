"""The official openai and anthropic SDKs parse the mock provider's responses (tests/tests/mock_provider.rs).

usage: mock_sdk_check.py BASE_URL CA_PEM  -- prints one JSON line with the usage each SDK reported.
"""

import json
import sys

import anthropic
import openai

base, ca = sys.argv[1], sys.argv[2]
KEY = "sk-mock"
USAGE = {"x-mock-usage": "input=100,cached=20,output=30,reasoning=5"}
CACHE = {"x-mock-usage": "input=12,cached=4096,cache_write_5m=2048,cache_write_1h=512,output=40"}
report = {}

oa = openai.OpenAI(
    base_url=f"{base}/v1", api_key=KEY, max_retries=0, http_client=openai.DefaultHttpxClient(verify=ca)
)
msgs = [{"role": "user", "content": "Say hello"}]

r = oa.chat.completions.create(model="gpt-4o-mini", messages=msgs, extra_headers=USAGE)
assert r.choices[0].message.content, r
report["openai_chat"] = {
    "prompt": r.usage.prompt_tokens,
    "completion": r.usage.completion_tokens,
    "cached": r.usage.prompt_tokens_details.cached_tokens,
    "reasoning": r.usage.completion_tokens_details.reasoning_tokens,
}

text, usage = "", None
for chunk in oa.chat.completions.create(
    model="gpt-4o-mini", messages=msgs, stream=True, stream_options={"include_usage": True}, extra_headers=USAGE
):
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.usage is not None:
        usage = chunk.usage
report["openai_chat_stream"] = {
    "prompt": usage.prompt_tokens,
    "completion": usage.completion_tokens,
    "text_words": len(text.split()),
}

r = oa.responses.create(model="gpt-4.1", input="Tell me a story", extra_headers=USAGE)
assert r.output_text, r
report["openai_responses"] = {"input": r.usage.input_tokens, "output": r.usage.output_tokens}

e = oa.embeddings.create(model="text-embedding-3-small", input=["a", "b"], extra_headers={"x-mock-usage": "input=8"})
assert all(len(d.embedding) == 8 and isinstance(d.embedding[0], float) for d in e.data), e
report["openai_embeddings"] = {"n": len(e.data), "prompt": e.usage.prompt_tokens}

# anthropic >= 2.14 is built on httpx2: use its own client class to pass the CA.
an = anthropic.Anthropic(
    base_url=base, api_key=KEY, max_retries=0, http_client=anthropic.DefaultHttpxClient(verify=ca)
)
m = an.messages.create(model="claude-sonnet-4-5", max_tokens=1024, messages=msgs, extra_headers=CACHE)
assert m.content[0].text, m


def anth(u):
    return {
        "input": u.input_tokens,
        "output": u.output_tokens,
        "cache_read": u.cache_read_input_tokens,
        "cache_write": u.cache_creation_input_tokens,
    }


report["anthropic_messages"] = anth(m.usage)
with an.messages.stream(model="claude-sonnet-4-5", max_tokens=1024, messages=msgs, extra_headers=CACHE) as s:
    streamed = "".join(s.text_stream)
    final = s.get_final_message()
assert streamed == final.content[0].text and streamed, final
report["anthropic_messages_stream"] = anth(final.usage)

print(json.dumps(report))
