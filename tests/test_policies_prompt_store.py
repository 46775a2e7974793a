"""Which saved prompt caches stay on disk and which load back (policies/prompt_store.py)."""

from policies.prompt_store import StoredFile, to_delete, to_restore


def files(*sizes_and_times: tuple[int, float]) -> list[StoredFile]:
    return [StoredFile(f"f{i}", size, used) for i, (size, used) in enumerate(sizes_and_times)]


def names(chosen: list[StoredFile]) -> list[str]:
    return [f.path for f in chosen]


def test_nothing_goes_while_under_the_bound():
    assert to_delete(files((40, 1), (60, 2)), limit_bytes=100) == []
    assert to_delete([], limit_bytes=1) == []


def test_the_least_recently_used_go_first_until_under_the_bound():
    stored = files((40, 3), (30, 1), (50, 2), (10, 4))  # 130 bytes
    assert names(to_delete(stored, limit_bytes=100)) == ["f1"]  # 100 left
    assert names(to_delete(stored, limit_bytes=99)) == ["f1", "f2"]  # 50 left
    assert names(to_delete(stored, limit_bytes=0)) == ["f1", "f2", "f0", "f3"]


def test_a_file_larger_than_the_bound_goes_even_when_newest():
    assert names(to_delete(files((10, 1), (500, 2)), limit_bytes=100)) == ["f0", "f1"]


def test_restore_takes_the_newest_that_fit_and_returns_them_oldest_first():
    stored = files((40, 3), (30, 1), (50, 2), (10, 4))
    assert names(to_restore(stored, budget_bytes=1000, max_entries=10)) == ["f1", "f2", "f0", "f3"]
    # Newest first: f3 (10), f0 (40); then neither f2 (50) nor f1 (30) fits in what is left of 60.
    assert names(to_restore(stored, budget_bytes=60, max_entries=10)) == ["f0", "f3"]
    # A newer entry too large to fit leaves room for older, smaller ones.
    assert names(to_restore(stored, budget_bytes=85, max_entries=10)) == ["f1", "f0", "f3"]
    assert names(to_restore(stored, budget_bytes=1000, max_entries=2)) == ["f0", "f3"]
    assert to_restore(stored, budget_bytes=5, max_entries=10) == []
