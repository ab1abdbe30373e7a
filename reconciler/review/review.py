"""``heteroscale plan --base REV --head REV``: everything a reviewer needs to judge a
change to the desired state, computed from the Git objects of both revisions (no
checkout): the config diff, the fleet diff, and the what-if replay.

Validation errors at head block the rest: the review then carries only the located
errors (exit 1). A base that does not validate is reported, and the fleet diff and
replay are skipped (there is nothing sound to compare against).

The review runs on untrusted pull requests, so it has a time budget
(``ReviewOptions.timeout_s``): what is not done when it runs out (the fleet diff, the
replay of some services) is skipped and named in the report, and the review exits 1
rather than pass a change nobody evaluated. A what-if replay that cannot run (a bad
trace, a service the simulator cannot size) is named in the report and exits 1 too.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from reconciler.desired.loader import DesiredState, load_desired_state
from reconciler.errors import ConfigError, ConfigIssue, PermanentError
from reconciler.placement.base import PlacementOptions, Placer
from reconciler.policy.base import Autoscaler
from reconciler.review.config_diff import ConfigChange, config_diff
from reconciler.review.files import ChangedFiles, changed_files
from reconciler.review.fleet_diff import FleetReview, ReviewTimeout, review_fleet
from reconciler.review.whatif import WhatIf, describe_trace, replay
from reconciler.sim.engine import SimConfig
from reconciler.sim.evaluate import EvaluationResult


@dataclass(frozen=True)
class ReviewOptions:
    trace: Path | None = None  # recorded load for the what-if; None = synthetic day
    rate_scale: float | None = None
    diurnal_hours: float | None = None
    warm_up_hours: float = 0.0  # the load's first hours run but not judged
    seed: int = 0
    what_if: bool = True
    placement: PlacementOptions = field(default_factory=PlacementOptions)
    timeout_s: float = 600.0  # the whole review; what does not fit is skipped and named


@dataclass(frozen=True)
class Review:
    base_label: str
    head_label: str
    errors: tuple[ConfigIssue, ...] = ()  # head does not validate: nothing else is computed
    base_errors: tuple[ConfigIssue, ...] = ()
    config_changes: tuple[ConfigChange, ...] = ()
    # Every file the change touches, and how heteroscale reads it (None: not from Git).
    files: ChangedFiles | None = None
    fleet: FleetReview | None = None
    what_if: tuple[WhatIf, ...] = ()
    evaluations: dict[str, tuple[EvaluationResult | None, EvaluationResult | None]] = field(
        default_factory=dict
    )
    # Out of time: services whose replay did not run, and whether the fleet diff did not.
    skipped: tuple[str, ...] = ()
    fleet_skipped: bool = False
    timeout_s: float = 0.0
    # The what-if replay could not run (a bad trace, a load with nothing to judge, a
    # service the simulator cannot size): its message, reported with the rest.
    what_if_error: str = ""

    @property
    def incomplete(self) -> bool:
        # Files that could not be listed may be the ones a reviewer must see.
        unlisted = self.files is not None and bool(self.files.error)
        return bool(self.skipped) or self.fleet_skipped or unlisted

    @property
    def has_changes(self) -> bool:
        """Does the change do anything? Config that differs, or a fleet that would be
        sized or placed differently under head than under base. Changes the reconciler
        would make anyway (under base too) are reported but are not the PR's doing."""
        return bool(self.config_changes) or (self.fleet is not None and self.fleet.differs)

    @property
    def exit_code(self) -> int:
        """0 no change, 1 error, 3 changes present (like terraform plan -detailed-exitcode)."""
        if self.errors or self.base_errors or self.incomplete or self.what_if_error:
            return 1
        return 3 if self.has_changes else 0


def changed_services(
    changes: tuple[ConfigChange, ...], base: DesiredState, head: DesiredState
) -> list[str]:
    """Services whose behaviour a change can alter: their own file, or their cluster's."""
    names = {c.name for c in changes if c.kind == "service"}
    touched_clusters = {c.name for c in changes if c.kind == "cluster"}
    for state in (base, head):
        names |= {p.name for p in state.policies.values() if p.cluster in touched_clusters}
    return sorted(names)


def run_review(
    repo: Path,
    base_rev: str,
    head_rev: str,
    *,
    autoscaler_factory: Callable[[], Autoscaler],
    placer: Placer,
    options: ReviewOptions | None = None,
    edges: Callable[[str], tuple[object, object]] | None = None,
) -> Review:
    options = options or ReviewOptions()
    deadline = time.monotonic() + options.timeout_s
    try:
        head = load_desired_state(repo, rev=head_rev)
    except ConfigError as exc:
        return Review(base_rev, head_rev, errors=tuple(exc.issues))
    try:
        base = load_desired_state(repo, rev=base_rev)
    except ConfigError as exc:
        return Review(base_rev, head.source_label, base_errors=tuple(exc.issues))

    changes = tuple(config_diff(base, head))
    files = changed_files(repo, base, head, changes)
    services = changed_services(changes, base, head) if options.what_if else []
    # The what-if replay and the fleet diff are independent and each CPU-bound: the
    # replay runs in a second process while this one plans the fleet.
    pending = _start_replay(base, head, services, options, deadline) if services else None
    fleet: FleetReview | None = None
    with contextlib.suppress(ReviewTimeout):  # fleet stays None: reported as skipped
        fleet = review_fleet(
            base,
            head,
            autoscaler_factory=autoscaler_factory,
            placer=placer,
            edges=edges,  # type: ignore[arg-type]
            seed=options.seed,
            placement_options=options.placement,
            deadline=deadline,
        )
    what_if: list[WhatIf] = []
    evaluations: dict[str, tuple[EvaluationResult | None, EvaluationResult | None]] = {}
    skipped: list[str] = []
    what_if_error = ""
    if pending is not None:
        try:
            what_if, evaluations, skipped = pending()
        except WhatIfError as exc:
            # In the report, not only on stderr: in CI the report is what a reviewer reads.
            what_if_error = str(exc)
    return Review(
        base_label=base.source_label,
        head_label=head.source_label,
        config_changes=changes,
        files=files,
        fleet=fleet,
        what_if=tuple(what_if),
        evaluations=evaluations,
        skipped=tuple(skipped),
        fleet_skipped=fleet is None,
        timeout_s=options.timeout_s,
        what_if_error=what_if_error,
    )


Evaluations = dict[str, tuple[EvaluationResult | None, EvaluationResult | None]]
ReplayResult = tuple[list[WhatIf], Evaluations, list[str]]
_GRACE_S = 5.0  # for the worker to send what it finished after the deadline


def replay_services(
    base: DesiredState,
    head: DesiredState,
    services: list[str],
    options: ReviewOptions,
    deadline: float | None = None,
) -> ReplayResult:
    """The what-if replay of ``services`` on the load the options describe (the load
    ``heteroscale simulate`` builds from the same options); services not started by
    ``deadline`` (``time.monotonic()``) are returned as skipped."""
    from reconciler.sim.load import after_warm_up, load_with_requests

    config = SimConfig()
    return replay(
        base,
        head,
        services,
        lambda state, service: after_warm_up(
            load_with_requests(
                state,
                service,
                options.trace,
                options.rate_scale,
                options.diurnal_hours,
                options.seed,
                config,
            ).profile,
            options.warm_up_hours,
        ),
        lambda service: describe_trace(
            options.trace, options.rate_scale, options.diurnal_hours, options.warm_up_hours
        ),
        seed=options.seed,
        config=config,
        deadline=deadline,
    )


def _replay_worker(
    conn: Connection,
    base: DesiredState,
    head: DesiredState,
    services: list[str],
    options: ReviewOptions,
    deadline: float,
) -> None:
    # The parent raises what went wrong. Sent as text: an exception object need not
    # survive pickling (TraceError's did not, and the parent died in the unpickling).
    try:
        conn.send(("ok", replay_services(base, head, services, options, deadline)))
    except PermanentError as exc:  # bad input: the message is what the user needs
        conn.send(("error", str(exc)))
    except Exception:  # a bug: keep where it was raised
        conn.send(("crash", traceback.format_exc()))
    finally:
        conn.close()


class WhatIfError(PermanentError):
    """The what-if replay could not run on the load asked for (a bad trace, a warm-up
    that leaves nothing to judge); the message says why."""


def _start_replay(
    base: DesiredState,
    head: DesiredState,
    services: list[str],
    options: ReviewOptions,
    deadline: float,
) -> Callable[[], ReplayResult]:
    """Run ``replay_services`` in a forked worker; the returned callable waits for it
    until the deadline (plus a grace to hand over what it finished) and then stops
    it, counting every service it did not return as skipped. Where a worker cannot be
    started, the replay runs here when asked for."""
    import multiprocessing

    try:
        context = multiprocessing.get_context("fork")
        receiver, sender = context.Pipe(duplex=False)
        worker = context.Process(
            target=_replay_worker,
            args=(sender, base, head, services, options, deadline),
            daemon=True,
        )
        worker.start()
        sender.close()
    except (OSError, ValueError):

        def here() -> ReplayResult:
            try:
                return replay_services(base, head, services, options, deadline)
            except PermanentError as exc:
                raise WhatIfError(f"what-if replay: {exc}") from exc

        return here

    def wait() -> ReplayResult:
        try:
            remaining = max(0.0, deadline - time.monotonic()) + _GRACE_S
            if not receiver.poll(remaining):
                return [], {}, list(services)
            try:
                status, payload = receiver.recv()
            except EOFError:  # the worker died without an answer
                return [], {}, list(services)
            if status == "error":
                raise WhatIfError(f"what-if replay: {payload}")
            if status == "crash":
                raise RuntimeError(f"what-if replay failed in its worker:\n{payload}")
            return payload
        finally:
            receiver.close()
            if worker.is_alive():
                worker.terminate()
            worker.join()

    return wait
