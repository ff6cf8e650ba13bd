"""The rollout state machine: stages, soak, gates, rollback, blue-green, operator actions."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from edgeserve.errors import ConfigError
from edgeserve.fleet.rollouts import (
    CohortMetrics,
    DeviceView,
    Pause,
    Promote,
    Resume,
    Rollback,
    RolloutSpec,
    RolloutState,
    SetDesired,
    Snapshot,
    Tick,
    initial_state,
    parse_gate,
    step,
)

GOOD = CohortMetrics(requests=1000, errors=1, p95_ms=2.0)
CONTROL = CohortMetrics(requests=5000, errors=5, p95_ms=2.0)


class Fleet:
    """A tiny simulated fleet: devices apply desired state at once and report it back."""

    def __init__(self, n: int, version: str = "1.0.0") -> None:
        self.devices = {f"d{i:03d}": DeviceView(device_id=f"d{i:03d}", active=version,
                                                state="committed", last_seen=0.0)
                        for i in range(n)}

    def apply(self, commands: list[SetDesired], fail_version: str | None = None) -> None:
        for c in commands:
            d = self.devices[c.device_id]
            if fail_version and c.active == fail_version:
                self.devices[c.device_id] = d.model_copy(update={
                    "state": "rolled-back", "last_error": "sample outputs differ",
                    "error_version": fail_version})
            else:
                self.devices[c.device_id] = d.model_copy(update={
                    "active": c.active, "shadow": c.shadow, "state": "committed"})

    def snap(self, now: float, canary: CohortMetrics = GOOD,
             control: CohortMetrics | None = CONTROL) -> Snapshot:
        devices = [d.model_copy(update={"last_seen": now}) if d.online else d
                   for d in self.devices.values()]
        return Snapshot(now=now, devices=devices, canary=canary, control=control)

    def count(self, version: str) -> int:
        return sum(1 for d in self.devices.values() if d.active == version)


def spec(**kw: object) -> RolloutSpec:
    base: dict[str, object] = {"id": "r1", "model": "m", "version": "2.0.0", "soak_seconds": 10,
                               "gates": ["error_rate<=0.01", "p95_ms<=1.5*control"],
                               "min_requests": 100}
    base.update(kw)
    return RolloutSpec.model_validate(base)


def run(s: RolloutSpec, fleet: Fleet, ticks: int, metrics: CohortMetrics = GOOD,
        fail_version: str | None = None, state: RolloutState | None = None,
        start: float = 0.0) -> RolloutState:
    state = state or initial_state(s, start)
    for i in range(ticks):
        now = start + i * 5.0
        state, commands = step(s, state, Tick(snapshot=fleet.snap(now, metrics)))
        fleet.apply(commands, fail_version)
        if state.done:
            break
    return state


def test_good_version_goes_through_all_stages() -> None:
    """A healthy version passes 1/10/50/100 % with no manual step and reaches every device."""
    fleet = Fleet(200)
    state = run(spec(), fleet, 40)
    assert state.phase == "completed"
    assert fleet.count("2.0.0") == 200
    stages = [h for h in state.history if h.event == "stage"]
    assert len(stages) == 3


def test_stage_sizes_respect_percent_and_minimum() -> None:
    """Stage 1 at 1% of 50 devices still moves min_devices (2), not zero."""
    fleet = Fleet(50)
    s = spec(min_devices=2)
    state, commands = step(s, initial_state(s, 0), Tick(snapshot=fleet.snap(0)))
    assert len(commands) == 2 and len(state.assigned) == 2


def test_failing_gate_rolls_back_at_first_stage() -> None:
    """An error rate over the bound stops the rollout at stage 1 and reverts every device."""
    fleet = Fleet(100)
    bad = CohortMetrics(requests=500, errors=40, p95_ms=2.0)
    state = run(spec(), fleet, 10, metrics=bad)
    assert state.phase == "rolled-back"
    assert state.failed_gate == "error_rate<=0.01" and state.stage == 0
    assert fleet.count("2.0.0") == 0 and fleet.count("1.0.0") == 100


def test_relative_latency_gate() -> None:
    """A version 3x slower than control fails the p95 gate, naming it."""
    fleet = Fleet(100)
    slow = CohortMetrics(requests=500, errors=0, p95_ms=6.0)
    state = run(spec(), fleet, 10, metrics=slow)
    assert state.failed_gate == "p95_ms<=1.5*control"
    assert "6" in (state.reason or "")


def test_gate_waits_for_evidence() -> None:
    """With fewer requests than min_requests, a bad-looking canary neither fails nor passes."""
    fleet = Fleet(10)
    few = CohortMetrics(requests=5, errors=5, p95_ms=2.0)
    state = run(spec(), fleet, 6, metrics=few)
    assert state.phase == "running" and state.stage == 0
    assert all(r.verdict == "pending" for r in state.gate_results)


def test_soak_counts_inferences_too() -> None:
    """Wall-clock soak alone does not end a stage when too few inferences were seen."""
    fleet = Fleet(10)
    state = run(spec(soak_inferences=5000), fleet, 8)
    assert state.phase == "running" and state.stage == 0


def test_device_health_failure_rolls_back() -> None:
    """Devices failing their on-device health check roll the rollout back."""
    fleet = Fleet(100)
    state = run(spec(), fleet, 5, fail_version="2.0.0")
    assert state.phase in ("rolling-back", "rolled-back")
    assert state.failed_gate == "device_health"
    assert "sample outputs differ" in (state.reason or "")


def test_silent_devices_do_not_block() -> None:
    """An offline device in a stage does not block promotion; it converges later."""
    fleet = Fleet(20)
    s = spec(stages=[50, 100], silent_after_s=30)
    state = initial_state(s, 0)
    state, commands = step(s, state, Tick(snapshot=fleet.snap(0)))
    offline = commands[0].device_id
    fleet.devices[offline] = fleet.devices[offline].model_copy(update={"online": False})
    fleet.apply(commands[1:])
    state = run(s, fleet, 20, state=state, start=5)
    assert state.phase == "completed"
    assert fleet.devices[offline].active == "1.0.0"  # it gets 2.0.0 from retained desired state


def test_manual_promotion_when_auto_promote_off() -> None:
    """Without auto_promote the rollout waits after each stage until promoted."""
    fleet = Fleet(10)
    s = spec(auto_promote=False, stages=[10, 100])
    state = run(s, fleet, 6)
    assert state.phase == "awaiting-promotion" and state.stage == 0
    state, _ = step(s, state, Promote(now=100))
    assert state.phase == "running" and state.stage == 1


def test_pause_resume_and_operator_rollback() -> None:
    """Pause freezes assignment; resume continues; rollback reverts everything assigned."""
    fleet = Fleet(100)
    s = spec()
    state = run(s, fleet, 1)
    state, _ = step(s, state, Pause(now=6))
    state, commands = step(s, state, Tick(snapshot=fleet.snap(7)))
    assert commands == [] and state.phase == "paused"
    state, _ = step(s, state, Resume(now=8))
    assert state.phase == "running"
    state, commands = step(s, state, Rollback(now=9, reason="operator"))
    assert state.phase == "rolling-back" and all(c.active == "1.0.0" for c in commands)
    fleet.apply(commands)
    state, _ = step(s, state, Tick(snapshot=fleet.snap(10)))
    assert state.phase == "rolled-back"


def test_blue_green_shadow_then_switch_then_drop() -> None:
    """Blue-green: shadow first, switch with the old version as shadow, then drop the shadow."""
    fleet = Fleet(10)
    s = spec(strategy="blue-green", stages=[100], gates=["disagreement<=0.05"])
    metrics = CohortMetrics(requests=1000, shadow_compared=1000, shadow_disagreements=3)
    state = initial_state(s, 0)
    state, commands = step(s, state, Tick(snapshot=fleet.snap(0, metrics)))
    assert all(c.active == "1.0.0" and c.shadow == "2.0.0" for c in commands)
    fleet.apply(commands)
    state = run(s, fleet, 30, metrics=metrics, state=state, start=5)
    assert state.phase == "completed"
    assert all(d.active == "2.0.0" and d.shadow is None for d in fleet.devices.values())
    assert any(h.event == "switched" for h in state.history)


def test_blue_green_disagreement_rolls_back() -> None:
    """Shadow outputs that disagree stop a blue-green rollout before any device switches."""
    fleet = Fleet(10)
    s = spec(strategy="blue-green", stages=[100], gates=["disagreement<=0.05"])
    metrics = CohortMetrics(requests=1000, shadow_compared=1000, shadow_disagreements=300)
    state = run(s, fleet, 10, metrics=metrics)
    assert state.phase == "rolled-back" and state.failed_gate == "disagreement<=0.05"
    assert all(d.active == "1.0.0" and d.shadow is None for d in fleet.devices.values())


def test_terminal_states_ignore_events() -> None:
    """A completed rollout does not react to further events."""
    fleet = Fleet(5)
    s = spec(stages=[100])
    state = run(s, fleet, 10)
    assert state.phase == "completed"
    after, commands = step(s, state, Rollback(now=1000))
    assert after.phase == "completed" and commands == []


@pytest.mark.parametrize(("text", "metric", "value", "factor"), [
    ("error_rate<=0.01", "error_rate", 0.01, None),
    ("p95_ms <= 1.2*control", "p95_ms", None, 1.2),
    ("p95_ms<=control*1.2", "p95_ms", None, 1.2),
    ("drift_psi<0.25", "drift_psi", 0.25, None),
    ("requests>=200", "requests", 200, None),
    ("p99_ms<=control", "p99_ms", None, 1.0),
])
def test_parse_gates(text: str, metric: str, value: float | None, factor: float | None) -> None:
    """Gate expressions parse into metric, bound and optional control factor."""
    gate = parse_gate(text)
    assert (gate.metric, gate.value, gate.factor) == (metric, value, factor)


@pytest.mark.parametrize(("text", "match"), [
    ("latency<=3", "unknown metric"), ("error_rate=0.1", "not of the form"),
    ("requests>=2*control", "absolute minimum"), ("", "not of the form")])
def test_bad_gates(text: str, match: str) -> None:
    """Bad gate expressions give a ConfigError saying what is allowed."""
    with pytest.raises(ConfigError, match=match):
        parse_gate(text)


def test_spec_validation() -> None:
    """Stages must increase and end at 100; gates must parse."""
    with pytest.raises(ValidationError):
        spec(stages=[10, 5, 100])
    with pytest.raises(ValidationError):
        spec(stages=[10, 50])
    with pytest.raises(ValidationError):
        spec(gates=["nonsense"])


def test_relative_gates_use_last_control_once_everyone_moved() -> None:
    """At 100% there is no control cohort left: relative gates compare with the last one seen."""
    fleet = Fleet(10)
    s = spec(stages=[50, 100])
    state = run(s, fleet, 4)
    assert state.stage == 1 and state.baseline is not None
    for i in range(10):
        state, commands = step(s, state, Tick(snapshot=fleet.snap(100 + i * 5, control=None)))
        fleet.apply(commands)
    assert state.phase == "completed"
    slow = spec(stages=[50, 100], id="r2")
    state = run(slow, Fleet(10), 4)
    state, _ = step(slow, state, Tick(snapshot=Fleet(10).snap(
        100, CohortMetrics(requests=1000, p95_ms=9.0), control=None)))
    assert state.phase == "rolling-back" and state.failed_gate == "p95_ms<=1.5*control"


def _report(fleet: Fleet, version: str, **update: object) -> None:
    """Every device running ``version`` now reports ``update`` (e.g. its state)."""
    for device_id, device in fleet.devices.items():
        if device.active == version:
            fleet.devices[device_id] = device.model_copy(update=update)


def test_no_stage_ends_before_its_devices_pass_their_health_check() -> None:
    """Devices that run the version but are still under watch hold the stage, without gates
    or soak, and their later health failure rolls the rollout back instead of completing it."""
    fleet = Fleet(4)
    s = spec(stages=[100], gates=[], soak_seconds=0)
    state, commands = step(s, initial_state(s, 0), Tick(snapshot=fleet.snap(0)))
    fleet.apply(commands)
    _report(fleet, "2.0.0", state="health-check")
    for now in (1.0, 2.0, 3.0):
        state, _ = step(s, state, Tick(snapshot=fleet.snap(now)))
        assert state.phase == "running", state.history[-1]
    _report(fleet, "2.0.0", active=None, state="unhealthy", last_error="health check failed",
            error_version="2.0.0")
    state, commands = step(s, state, Tick(snapshot=fleet.snap(4.0)))
    assert state.phase == "rolling-back" and state.failed_gate == "device_health"
    assert {c.active for c in commands} == {"1.0.0"}


def test_a_committed_stage_completes() -> None:
    """The same rollout completes once every device reports the version committed."""
    fleet = Fleet(4)
    s = spec(stages=[100], gates=[], soak_seconds=0)
    state, commands = step(s, initial_state(s, 0), Tick(snapshot=fleet.snap(0)))
    fleet.apply(commands)
    state, _ = step(s, state, Tick(snapshot=fleet.snap(1.0)))
    assert state.phase == "completed"


def test_a_device_retrying_its_download_is_not_a_failure() -> None:
    """'retrying' (a cut download being resumed) holds the stage but does not roll back."""
    fleet = Fleet(4)
    s = spec(stages=[100], gates=[], soak_seconds=0)
    state, commands = step(s, initial_state(s, 0), Tick(snapshot=fleet.snap(0)))
    for device_id in fleet.devices:
        fleet.devices[device_id] = fleet.devices[device_id].model_copy(update={
            "state": "retrying", "error_version": "2.0.0"})
    for now in (1.0, 2.0):
        state, _ = step(s, state, Tick(snapshot=fleet.snap(now)))
    assert state.phase == "running" and not state.failed_devices
    fleet.apply(commands)
    state, _ = step(s, state, Tick(snapshot=fleet.snap(3.0)))
    assert state.phase == "completed"


def test_rollback_returns_each_device_to_what_it_reported_never_removing_its_model() -> None:
    """A device that already ran the version keeps it, one on an older version returns to it,
    and only a device the rollout brought the model to loses it."""
    fleet = Fleet(3)
    fleet.devices["d001"] = fleet.devices["d001"].model_copy(update={"active": "2.0.0"})
    fleet.devices["d002"] = fleet.devices["d002"].model_copy(update={"active": None})
    s = spec(stages=[100], gates=[], soak_seconds=0)
    state, commands = step(s, initial_state(s, 0), Tick(snapshot=fleet.snap(0)))
    assert state.assigned == {"d000": "1.0.0", "d001": "2.0.0", "d002": None}
    state, commands = step(s, state, Rollback(now=1.0))
    assert {c.device_id: c.active for c in commands} == {"d000": "1.0.0", "d001": "2.0.0",
                                                         "d002": None}
    fleet.apply(commands)
    state, _ = step(s, state, Tick(snapshot=fleet.snap(2.0)))
    assert state.phase == "rolled-back"


def test_a_stage_that_cannot_finish_times_out_naming_what_it_waited_for() -> None:
    """Past the stage time limit the rollout rolls back, and the reason lists the pending gate."""
    fleet = Fleet(10)
    s = spec(stage_timeout_s=60, gates=["p95_ms<=1.5*control"])
    state = initial_state(s, 0)
    for now in range(0, 60, 5):  # within the limit: waiting, no verdict
        state, commands = step(s, state, Tick(snapshot=fleet.snap(now, control=None)))
        fleet.apply(commands)
        assert state.phase == "running"
    state, commands = step(s, state, Tick(snapshot=fleet.snap(61.0, control=None)))
    assert state.phase == "rolling-back" and state.failed_gate == "stage_timeout"
    assert "did not complete within 60 s" in (state.reason or "")
    assert "p95_ms<=1.5*control pending (control has no data)" in (state.reason or "")
    assert {c.active for c in commands} == {"1.0.0"}


def test_paused_time_does_not_count_towards_the_stage_limit() -> None:
    """A pause of an hour leaves the stage its remaining time after resuming."""
    fleet = Fleet(10)
    s = spec(stage_timeout_s=60, soak_inferences=10**9)
    state, _ = step(s, initial_state(s, 0), Tick(snapshot=fleet.snap(0)))
    state, _ = step(s, state, Pause(now=10.0))
    state, _ = step(s, state, Resume(now=3610.0))
    state, _ = step(s, state, Tick(snapshot=fleet.snap(3650.0)))
    assert state.phase == "running"
    state, _ = step(s, state, Tick(snapshot=fleet.snap(3661.0)))
    assert state.failed_gate == "stage_timeout"
