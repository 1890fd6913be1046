"""Seeded fault scenarios: several change sets against a loopback simulator while faults are
injected (429 storms with growing Retry-After, 5xx bursts, connections reset mid-body,
truncated JSON, responses slower than the client's timeout, tokens expiring mid-paging,
repeated nextLinks, records changed and deleted while paging, delta tokens expiring). After the
faults stop and one clean run follows, the mirror equals the source, table by table."""

import random
import time

import pytest

from dataverse_assets.simulator import FaultPlan, serve_on_loopback
from dataverse_assets_tests.chaos.conftest import SOAK, seeds
from dataverse_assets_tests.chaos.harness import (
    GROUPS,
    REQUEST_TIMEOUT_SECONDS,
    ScenarioResult,
    VersionLog,
    check_invariants,
    fetch_retries,
    make_chaos_mirror,
    mutate_source,
    new_simulator,
    rows_lost,
)

# Per request; a server_error starts a burst of 1-3, a throttle a storm of 2-4 429s.
NETWORK_RATES = {
    "server_error": 0.06, "reset": 0.06, "malformed": 0.06, "slow": 0.006,
    "token_expiry": 0.05, "throttle": 0.05, "repeat_next_link": 0.005,
}
PAGING_MUTATION_RATES = {"modify_records": 0.04, "delete_records": 0.02}
STEPS = 8 if SOAK else 3
ATTEMPTS_PER_STEP = 8  # a scheduler retrying the change set while the faults go on
DELTA_EXPIRY_CHANCE = 0.35


def run_scenario(tmp_path, name: str, seed: int, rates: dict[str, float],
                 store_for=None) -> ScenarioResult:
    """Faulty and never-faulted mirrors of one simulator; each step changes the source, the
    faulty mirror syncs under faults until a change set gets through, the reference syncs
    cleanly; then the faults stop and both sync once more."""
    result = ScenarioResult(name, seed)
    rng = random.Random(seed)
    simulator = new_simulator()
    log = VersionLog(simulator)
    mutates_while_paging = any(k in rates for k in PAGING_MUTATION_RATES)
    same_observations = not mutates_while_paging
    with serve_on_loopback(simulator) as url:
        faulty = make_chaos_mirror(tmp_path, simulator, url, "faulty", store_for=store_for)
        reference = make_chaos_mirror(tmp_path, simulator, url, "reference",
                                      store_for=store_for)
        expiry_step = rng.randrange(1, STEPS)  # every scenario meets one at least
        for step in range(STEPS):
            if step:
                result.source_changes.update(mutate_source(simulator, rng))
                if step == expiry_step or rng.random() < DELTA_EXPIRY_CHANCE:
                    simulator.expire_delta_tokens()
                    result.faults["delta_token_expiry"] += 1
            for index, group in enumerate(GROUPS):
                simulator.fault_plan = FaultPlan(
                    seed=seed * 1000 + step * 10 + index, rates=rates,
                    slow_seconds=(0.1, REQUEST_TIMEOUT_SECONDS * 1.4), retry_after=0.02)
                for _ in range(ATTEMPTS_PER_STEP):
                    outcome = faulty.sync(group)
                    result.change_sets += 1
                    if not any(outcome.values()):
                        break
                    result.failed_runs += 1
                else:
                    same_observations = False
                    result.notes.append(f"step {step} {group}: no change set got through")
                simulator.fault_plan = None
                outcome = reference.sync(group)
                assert not any(outcome.values()), outcome
        result.faults.update(simulator.stats.faults)
        # The faults stop; one clean run.
        outcome = faulty.sync_all()
        result.change_sets += 2
        assert not any(outcome.values()), f"the clean run failed: {outcome}"
        assert not any(reference.sync_all().values())
        result.invariants = check_invariants(faulty, reference, log,
                                             same_observations=same_observations)
        result.rows_lost = rows_lost(faulty)
        result.retries = fetch_retries(faulty)
        result.requests = simulator.stats.requests
    result.seconds = time.perf_counter() - result.started
    return result


# SQLite only (the CI budget, docs/store-backends.md): its faults are the source's, and on
# PostgreSQL the paging-mutation scenario below injects the same network faults and more.
@pytest.mark.parametrize("chaos_store", ["sqlite"], indirect=True)
@pytest.mark.parametrize("seed", seeds([1], 12))
def test_network_faults_leave_the_mirror_equal_to_a_never_faulted_one(tmp_path, seed,
                                                                      chaos_store, chaos_report):
    result = run_scenario(tmp_path, "network", seed, NETWORK_RATES, chaos_store)
    chaos_report(result.as_json())
    assert result.faults.total() >= 30, result.faults
    assert result.invariants.get("whole_database_equals_reference") == "ok" or result.notes
    assert result.passed, result.invariants


@pytest.mark.parametrize("seed", seeds([3], 12, offset=100))
def test_records_changing_while_paging_still_converge_to_the_source(tmp_path, seed,
                                                                    chaos_store, chaos_report):
    result = run_scenario(tmp_path, "paging_mutations", seed,
                          {**NETWORK_RATES, **PAGING_MUTATION_RATES}, chaos_store)
    chaos_report(result.as_json())
    assert result.faults["modify_records"] + result.faults["delete_records"] > 0
    assert result.passed, result.invariants
