"""The prefix cache's index alone: block keys, the longest match, LRU eviction chain end first. No model."""

from cpm_deploy.engine.prefix_cache import PrefixCache


def test_keys_name_whole_prefixes_and_a_match_is_the_longest_cached_run():
    c = PrefixCache(blocks=8, block_size=4)
    a = list(range(10))  # blocks [0..3], [4..7]; the last two tokens are no block
    assert len(c.keys(a)) == 2 and c.keys(a) == c.keys(a[:8])
    assert c.keys([9] + a[1:])[1] != c.keys(a)[1]  # same tokens after another start: another key
    assert c.insert(a, c.keys(a), 2) == [(0, 0), (1, 1)] and c.cached_tokens == 8
    assert c.insert(a, c.keys(a), 2) == []  # already there: nothing to copy
    assert c.match(a, c.keys(a)) == [0, 1]
    diverging = a[:6] + [99, 99]
    assert c.match(diverging, c.keys(diverging)) == [0]  # diverges inside block 1
    assert c.match(a, c.keys(a), limit=1) == [0]
    assert c.cached_run(c.keys(a)) == 2


def test_eviction_takes_the_least_recently_used_chain_end_first():
    c = PrefixCache(blocks=4, block_size=2)
    old, new = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10]
    c.insert(old, c.keys(old), 3)
    assert c.insert(new, c.keys(new), 2) == [(0, 3), (1, 2)]  # one free block, then old's last block
    assert c.match(old, c.keys(old)) == [0, 1]  # old's start stays usable
    c.match(new, c.keys(new))  # new is now the most recent
    third = [11, 12]
    assert c.insert(third, c.keys(third), 1) == [(0, 1)]  # old's end again, never its start first
    assert c.match(old, c.keys(old)) == [0]


def test_a_prompt_larger_than_the_store_keeps_what_fits_and_evicts_nothing_of_its_own():
    c = PrefixCache(blocks=3, block_size=2)
    long = list(range(20))
    assert [i for i, _ in c.insert(long, c.keys(long), 10)] == [0, 1, 2]
    assert c.match(long, c.keys(long)) == [0, 1, 2] and c.cached_tokens == 6


def test_a_match_compares_tokens_not_only_keys():
    c = PrefixCache(blocks=4, block_size=2)
    a = [1, 2, 3, 4]
    keys = c.keys(a)
    c.insert(a, keys, 2)
    assert c.match([1, 2, 3, 5], keys) == [0]  # a forged key for other tokens is not trusted


def test_no_store_means_nothing_is_kept():
    c = PrefixCache(blocks=0, block_size=8)
    a = list(range(32))
    assert c.insert(a, c.keys(a), 4) == [] and c.match(a, c.keys(a)) == []
