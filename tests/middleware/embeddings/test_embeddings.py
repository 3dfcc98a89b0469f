"""`POST /v1/embeddings`: relayed to the provider's /embeddings, metered on input tokens (real Redis).

The official `openai` SDK is the client. The simulated provider answers with
deterministic vectors (`proxy.devtools.mock_upstream.embedding`), so the
relayed floats and base64 can be compared with what it computed.
"""

from __future__ import annotations

import base64
import struct
import uuid

import openai
import pytest

from proxy.core.settings import DEFAULT_PIPELINE
from proxy.devtools.mock_upstream import embedding
from proxy.store.accounts import Accounts
from tests.support import REDIS_URL, make_settings

CHAT_MODEL = "sovereign-alpha"
EMBEDDER = "sovereign-embed"
PRICE = 1_000_000  # credits per million input tokens: one credit per token
MODELS = {
    CHAT_MODEL: {"upstream": "default", "price": {"input_per_million": 1_000_000, "output_per_million": 2_000_000}},
    EMBEDDER: {"upstream": "default", "upstream_model": "mock-embedder", "kind": "embeddings",
               "price": {"input_per_million": PRICE}},
}


@pytest.fixture
async def setup(mock, gateway_factory, redis_prefix):
    settings = make_settings(mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=DEFAULT_PIPELINE, models=MODELS)
    running = await gateway_factory(settings)
    accounts = Accounts(running.gateway.store)
    tenant = "t-" + uuid.uuid4().hex[:10]
    await accounts.create_tenant(tenant, 10_000)
    key, _ = await accounts.create_key(tenant)
    return running, accounts, tenant, running.openai(key)


async def test_floats_are_relayed_and_charged_from_the_providers_usage(setup, mock):
    running, accounts, tenant, client = setup
    texts = ["the quick brown fox", "jumps over the lazy dog, twice over"]
    result = await client.embeddings.create(model=EMBEDDER, input=texts, encoding_format="float", dimensions=16)
    sent = mock.requests[-1]
    assert sent["path"] == "/v1/embeddings"
    assert sent["body"] == {"model": "mock-embedder", "input": texts, "encoding_format": "float", "dimensions": 16}
    assert [item.embedding for item in result.data] == [embedding(text, 16) for text in texts]
    assert [item.index for item in result.data] == [0, 1]
    tokens = sum(len(text) // 4 for text in texts)
    assert result.usage.prompt_tokens == tokens == result.usage.total_tokens
    await running.gateway.drain()  # settles in the background
    view = await accounts.tenant(tenant)
    assert view["balance"] == 10_000 - tokens and view["reserved"] == 0
    entry = (await accounts.ledger(tenant))[0]  # newest first
    assert (entry["model"], entry["input_tokens"], entry["output_tokens"], entry["credits"]) == (EMBEDDER, tokens, 0, -tokens)
    assert entry["usage_source"] == "reported"


async def test_base64_is_relayed_untouched(setup, mock):
    running, accounts, tenant, client = setup
    raw = await client.embeddings.with_raw_response.create(model=EMBEDDER, input="hello", encoding_format="base64")
    body = raw.http_response.json()
    encoded = body["data"][0]["embedding"]
    assert isinstance(encoded, str)
    assert list(struct.unpack("<8f", base64.b64decode(encoded))) == embedding("hello", 8)
    # The SDK's default asks for base64 and decodes it itself: the same vector.
    decoded = await client.embeddings.create(model=EMBEDDER, input="hello")
    assert mock.requests[-1]["body"]["encoding_format"] == "base64"
    assert decoded.data[0].embedding == embedding("hello", 8)
    tokens = await client.embeddings.create(model=EMBEDDER, input=[[1, 2, 3], [4, 5]], encoding_format="float")
    assert tokens.usage.prompt_tokens == 5


async def test_model_kinds_are_kept_apart(setup, mock):
    running, accounts, tenant, client = setup
    requests_before = len(mock.requests)
    with pytest.raises(openai.BadRequestError) as chat_here:
        await client.embeddings.create(model=CHAT_MODEL, input="hello", encoding_format="float")
    assert chat_here.value.body["param"] == "model" and CHAT_MODEL in chat_here.value.body["message"]
    with pytest.raises(openai.BadRequestError) as embedder_there:
        await client.chat.completions.create(model=EMBEDDER, messages=[{"role": "user", "content": "hi"}])
    assert EMBEDDER in embedder_there.value.body["message"]
    with pytest.raises(openai.BadRequestError) as on_responses:
        await client.responses.create(model=EMBEDDER, input="hi")
    assert EMBEDDER in on_responses.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        await client.embeddings.create(model="no-such-embedder", input="hello")
    with pytest.raises(openai.BadRequestError) as bad_input:
        await client.embeddings.create(model=EMBEDDER, input=[], encoding_format="float")
    assert bad_input.value.body["param"] == "input"
    for too_many in (["a"] * 2049, [[1]] * 2049):  # the error names the length, not a type the list never meant
        with pytest.raises(openai.BadRequestError) as over:
            await client.embeddings.create(model=EMBEDDER, input=too_many, encoding_format="float")
        assert over.value.body["param"] == "input" and "at most 2048 items" in over.value.body["message"]
    with pytest.raises(openai.BadRequestError) as mixed:  # a type error still names the element
        await client.embeddings.create(model=EMBEDDER, input=["a", 1], encoding_format="float")  # type: ignore[list-item]
    assert mixed.value.body["param"] == "input[1]"
    with pytest.raises(openai.BadRequestError) as bad_format:
        await client.embeddings.create(model=EMBEDDER, input="x", encoding_format="int8")  # type: ignore[arg-type]
    assert bad_format.value.body["param"] == "encoding_format"
    assert len(mock.requests) == requests_before  # none of these reached the provider
    await running.gateway.drain()
    assert (await accounts.tenant(tenant))["balance"] == 10_000
    listed = {model.id for model in (await client.models.list()).data}
    assert {CHAT_MODEL, EMBEDDER} <= listed


async def test_insufficient_credits_and_no_usage(setup, mock):
    running, accounts, tenant, client = setup
    poor = "t-" + uuid.uuid4().hex[:10]
    await accounts.create_tenant(poor, 2)
    key, _ = await accounts.create_key(poor)
    with pytest.raises(openai.APIStatusError) as refused:
        await running.openai(key).embeddings.create(model=EMBEDDER, input="a long enough text to cost more than two credits")
    assert refused.value.status_code == 402 and refused.value.body["code"] == "insufficient_credits"
    # Vectors without usage: the estimate is charged, flagged as such.
    text = "no usage reported here"
    await client.embeddings.create(model=EMBEDDER, input=text, encoding_format="float", extra_headers={"x-mock-no-usage": "1"})
    await running.gateway.drain()
    entry = (await accounts.ledger(tenant))[0]  # newest first
    assert entry["usage_source"] == "estimated" and entry["output_tokens"] == 0
    body_bytes = len(mock.requests[-1]["body"]["input"]) + 60  # the JSON around the text
    assert 0 < entry["input_tokens"] <= body_bytes
