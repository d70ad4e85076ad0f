"""Window manager invariants, checked by replaying each plan on a simulated cache."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_flashinfer.flash.window import LayerWindow


@st.composite
def scenarios(draw):
    neurons = draw(st.integers(1, 60))
    capacity = draw(st.integers(0, neurons))
    k = draw(st.integers(0, 6))
    compact = draw(st.booleans())
    decay = draw(st.sampled_from([None, 0.5, 0.9]))
    steps = draw(
        st.lists(st.sets(st.integers(0, neurons - 1), max_size=neurons), max_size=25)
    )
    sets = [np.array(sorted(s), dtype=np.int64) for s in steps]
    return neurons, capacity, k, (compact, decay), sets


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_window_plans_keep_every_invariant(scenario):
    neurons, capacity, k, (compact, decay), steps = scenario
    window = LayerWindow(neurons, capacity, k, compact=compact, decay=decay)
    matrix = np.full(capacity, -1)  # what each cache row holds, moved as the plan says
    history = []
    rng = np.random.default_rng(len(steps))
    for active in steps:
        before = set(window.cached.tolist())
        slots_before = {int(n): int(window.slot_of[n]) for n in window.cached}
        # loads marked `first` (read ahead) take the first load slots, each group sorted
        first = rng.random(neurons) < 0.5 if rng.random() < 0.5 else None
        plan = window.step(active, first)
        if first is not None:
            marked = first[plan.load_ids]
            ahead = int(np.count_nonzero(marked))
            assert marked[:ahead].all() and not marked[ahead:].any()
            for group in (plan.load_ids[:ahead], plan.load_ids[ahead:]):
                assert np.all(np.diff(group) > 0)
        matrix[plan.move_dst] = matrix[plan.move_src]  # swap-delete moves first
        matrix[plan.load_slots] = plan.load_ids  # then appends
        used = plan.used
        cached = set(window.cached.tolist())
        # the cache never holds more rows than its capacity, and rows are where the map
        # says
        assert used == window.used <= capacity
        assert np.all(plan.load_slots < capacity)
        assert np.all(matrix[window.slot_of[window.cached]] == window.cached)
        assert np.count_nonzero(window.slot_of >= 0) == len(window.cached) <= capacity
        if compact:  # rows [:used] hold the cached neurons, no holes
            assert matrix[:used].tolist() == window.cached.tolist()
            assert np.all(window.slot_of[window.cached] == np.arange(used))
        else:  # no row ever moves: a kept neuron stays in its slot
            assert len(plan.move_src) == 0
            for n in (cached & before) if k else ():  # k = 0 reloads everything
                assert window.slot_of[n] == slots_before[n]
        # every predicted neuron is cached or read into scratch when the FFN runs
        assert set(active.tolist()) <= cached | set(plan.scratch_ids.tolist())
        assert not set(plan.scratch_ids.tolist()) & cached
        # loads are exactly the new neurons; hits were already there (k = 0: no reuse)
        kept_before = before if k else set()
        assert set(plan.load_ids.tolist()) == cached - kept_before
        assert plan.hits == len(set(active.tolist()) & kept_before)
        if k == 0:  # no reuse: every predicted neuron is read
            assert len(plan.load_ids) + len(plan.scratch_ids) == len(active)
        assert plan.evicted == len(before - cached) + (k == 0) * len(before & cached)
        history.append(set(active.tolist()))
        union = set().union(*history[-k:]) if k else set(active.tolist())
        assert cached <= union  # nothing outside the window stays
        if len(union) <= capacity:  # room for the whole window: exactly the window
            # (least recent first: what was evicted for room has left the window;
            # by decayed counts it may still be inside, not routed again)
            assert plan.lru_evicted == 0 and (cached == union or decay)
        if len(active) <= capacity:
            assert len(plan.scratch_ids) == 0
        # moves only fill holes below the new end from rows past it
        if compact:
            assert np.all(plan.move_dst < used - len(plan.load_ids))
            assert np.all(plan.move_src >= used - len(plan.load_ids))


@settings(max_examples=200, deadline=None)
@given(scenarios(), st.integers(0, 2**32 - 1))
def test_which_neurons_stay_does_not_depend_on_slot_order(scenario, seed):
    """Reads ahead reorder the load slots (`first`); the set of cached neurons, the
    loads and the scratch must stay what they would have been: on a SiLU model every
    cached row adds to the output."""
    neurons, capacity, k, (compact, decay), steps = scenario
    rng = np.random.default_rng(seed)
    plain, reordered = (
        LayerWindow(neurons, capacity, k, compact=compact, decay=decay),
        LayerWindow(neurons, capacity, k, compact=compact, decay=decay),
    )
    for active in steps:
        a = plain.step(active)
        b = reordered.step(active, rng.random(neurons) < 0.5)
        assert set(plain.cached.tolist()) == set(reordered.cached.tolist())
        assert sorted(a.load_ids.tolist()) == sorted(b.load_ids.tolist())
        assert a.scratch_ids.tolist() == b.scratch_ids.tolist()


def test_decayed_counts_keep_the_popular_expert_least_recent_would_evict():
    """With room for two, after a routed 5 times, then b, then c: least recent
    first evicts a; decayed counts evict b (routed once), keeping a."""
    steps = [[0]] * 5 + [[1], [2]]
    kept = {}
    for decay in (None, 0.9):
        window = LayerWindow(3, 2, 1 << 40, compact=False, decay=decay)
        for ids in steps:
            window.step(np.array(ids))
        kept[decay] = sorted(window.cached.tolist())
    assert kept[None] == [1, 2] and kept[0.9] == [0, 2]


@settings(max_examples=100, deadline=None)
@given(scenarios(), st.integers(0, 2**32 - 1))
def test_reserved_neurons_take_free_or_evicted_slots_and_go_unless_used(scenario, seed):
    """Reads ahead into the cache: `reserve` caches guessed neurons in slots that
    were free or evicted (never a kept one's), within capacity; the next step
    keeps those it uses (as hits) and drops those never used."""
    neurons, capacity, k, (_, decay), steps = scenario
    rng = np.random.default_rng(seed)
    window = LayerWindow(neurons, capacity, 1 << 40, compact=False, decay=decay)
    ever = set()  # neurons active in some step so far
    for active in steps:
        cached = window.cached
        guess = np.flatnonzero(rng.random(neurons) < 0.3)
        missing = guess[window.slot_of[guess] < 0]
        kept = {int(n): int(window.slot_of[n]) for n in cached if n in set(guess)}
        slots = window.reserve(missing, guess)
        got = missing[: len(slots)]
        assert len(window.cached) <= capacity
        assert np.all(window.slot_of[got] == slots) and len(set(slots)) == len(slots)
        assert all(window.slot_of[n] == s for n, s in kept.items())  # guess kept
        if len(got) < len(missing):  # no room: only guessed neurons are cached
            assert set(window.cached.tolist()) <= set(guess.tolist())
        plan = window.step(active)
        now = set(window.cached.tolist())
        assert set(active.tolist()) <= now | set(plan.scratch_ids.tolist())
        ever |= set(active.tolist())
        unused = set(got.tolist()) - ever
        assert not unused & now  # a wrong guess never used is dropped at once
        assert plan.hits >= len(set(got.tolist()) & set(active.tolist()))
