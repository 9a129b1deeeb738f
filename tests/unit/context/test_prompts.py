"""The prompt vaults with no network: the reveal cache, the switched-off vault, the twin."""

from __future__ import annotations

import pytest

from nilai.auth.base import PromptDocument
from nilai.context.prompts import CachedPrompts, MemoryPromptVault, PromptsOff
from nilai.errors import ContextNotAccessible, ContextUnavailable

OWNER = "did:nil:02" + "ab" * 32
OTHER_OWNER = "did:nil:03" + "cd" * 32


def document(number: int = 1, owner: str = OWNER) -> PromptDocument:
    return PromptDocument(document_id=f"00000000-0000-4000-8000-{number:012d}", owner_did=owner)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cached(vault: MemoryPromptVault, clock: FakeClock, *, ttl_s: float, max_entries: int = 8):
    return CachedPrompts(vault, ttl_s=ttl_s, max_entries=max_entries, clock=clock)


# --- CachedPrompts ---------------------------------------------------------------------------


async def test_a_prompt_is_served_from_the_cache_within_its_ttl():
    vault, clock = MemoryPromptVault(), FakeClock()
    vault.documents[document()] = "be brief"
    prompts = cached(vault, clock, ttl_s=30)
    assert await prompts.reveal(document()) == "be brief"
    clock.now += 29.9
    vault.documents[document()] = "changed behind the cache"
    assert await prompts.reveal(document()) == "be brief"
    assert vault.reads == 1


async def test_the_vault_is_asked_again_once_the_ttl_has_passed():
    vault, clock = MemoryPromptVault(), FakeClock()
    vault.documents[document()] = "first"
    prompts = cached(vault, clock, ttl_s=30)
    await prompts.reveal(document())
    vault.documents[document()] = "second"
    clock.now += 30.0
    assert await prompts.reveal(document()) == "second"
    assert vault.reads == 2
    clock.now += 29.0  # the fresh answer is cached again from its own reveal time
    assert await prompts.reveal(document()) == "second"
    assert vault.reads == 2


async def test_the_cache_key_is_the_document_and_its_owner():
    vault, clock = MemoryPromptVault(), FakeClock()
    vault.documents[document()] = "mine"
    prompts = cached(vault, clock, ttl_s=30)
    await prompts.reveal(document())
    # Same document id, another owner: not served from the first owner's entry.
    with pytest.raises(ContextNotAccessible):
        await prompts.reveal(document(owner=OTHER_OWNER))
    assert vault.reads == 2


async def test_a_failure_is_not_cached():
    vault, clock = MemoryPromptVault(), FakeClock()
    vault.documents[document()] = "kept"
    vault.down = True
    prompts = cached(vault, clock, ttl_s=30)
    with pytest.raises(ContextUnavailable):
        await prompts.reveal(document())
    vault.down = False
    assert await prompts.reveal(document()) == "kept"
    assert vault.reads == 2


async def test_a_not_accessible_document_is_not_cached_either():
    vault, clock = MemoryPromptVault(), FakeClock()
    prompts = cached(vault, clock, ttl_s=30)
    with pytest.raises(ContextNotAccessible):
        await prompts.reveal(document())
    vault.documents[document()] = "stored since"
    assert await prompts.reveal(document()) == "stored since"


async def test_the_oldest_entries_are_evicted_beyond_max_entries():
    vault, clock = MemoryPromptVault(), FakeClock()
    for number in range(1, 5):
        vault.documents[document(number)] = f"prompt {number}"
    prompts = cached(vault, clock, ttl_s=30, max_entries=3)
    for number in range(1, 5):
        await prompts.reveal(document(number))
    assert vault.reads == 4
    for number in (2, 3, 4):  # still cached
        await prompts.reveal(document(number))
    assert vault.reads == 4
    assert await prompts.reveal(document(1)) == "prompt 1"  # evicted: read again
    assert vault.reads == 5


async def test_a_cache_hit_does_not_refresh_eviction_order_but_a_fresh_reveal_does():
    vault, clock = MemoryPromptVault(), FakeClock()
    for number in range(1, 4):
        vault.documents[document(number)] = f"prompt {number}"
    prompts = cached(vault, clock, ttl_s=30, max_entries=2)
    await prompts.reveal(document(1))
    await prompts.reveal(document(2))
    await prompts.reveal(document(3))  # evicts 1, the oldest revealed
    reads = vault.reads
    await prompts.reveal(document(2))
    await prompts.reveal(document(3))
    assert vault.reads == reads
    await prompts.reveal(document(1))
    assert vault.reads == reads + 1


async def test_a_refreshed_entry_becomes_the_newest_for_eviction():
    vault, clock = MemoryPromptVault(), FakeClock()
    for number in range(1, 4):
        vault.documents[document(number)] = f"prompt {number}"
    prompts = cached(vault, clock, ttl_s=30, max_entries=2)
    await prompts.reveal(document(1))
    clock.now += 20
    await prompts.reveal(document(2))
    clock.now += 11  # 1 has expired, 2 has not
    await prompts.reveal(document(1))  # read again: now newer than 2
    await prompts.reveal(document(3))  # evicts 2, not the refreshed 1
    reads = vault.reads
    assert await prompts.reveal(document(1)) == "prompt 1"
    assert vault.reads == reads
    await prompts.reveal(document(2))
    assert vault.reads == reads + 1


async def test_ttl_zero_means_every_reveal_asks_the_vault():
    vault, clock = MemoryPromptVault(), FakeClock()
    vault.documents[document()] = "uncached"
    prompts = cached(vault, clock, ttl_s=0)
    for _ in range(3):
        assert await prompts.reveal(document()) == "uncached"
    assert vault.reads == 3


# --- PromptsOff ------------------------------------------------------------------------------


async def test_prompts_off_refuses_with_503_naming_the_reason():
    vault = PromptsOff("NILAI_NILDB_NODES is not set")
    with pytest.raises(ContextUnavailable) as caught:
        await vault.reveal(document())
    assert caught.value.status == 503
    assert caught.value.code == "nildb_not_configured"
    assert "NILAI_NILDB_NODES is not set" in caught.value.message
    assert caught.value.headers.get("Retry-After") is not None


# --- MemoryPromptVault -----------------------------------------------------------------------


async def test_the_twin_reveals_a_stored_document_and_counts_reads():
    vault = MemoryPromptVault()
    vault.documents[document()] = "you are a pirate"
    assert await vault.reveal(document()) == "you are a pirate"
    assert vault.reads == 1


async def test_the_twin_refuses_an_unknown_document_or_another_owner_with_403():
    vault = MemoryPromptVault()
    vault.documents[document()] = "secret"
    for wanted in (document(2), document(owner=OTHER_OWNER)):
        with pytest.raises(ContextNotAccessible) as caught:
            await vault.reveal(wanted)
        assert caught.value.status == 403
        assert "secret" not in caught.value.message


async def test_the_twin_when_down_is_a_503_even_for_a_stored_document():
    vault = MemoryPromptVault()
    vault.documents[document()] = "secret"
    vault.down = True
    with pytest.raises(ContextUnavailable) as caught:
        await vault.reveal(document())
    assert caught.value.status == 503
    assert vault.reads == 1
