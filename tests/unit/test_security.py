"""Key files, allow lists, rights and exposure checks (no sockets here)."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from ventilator import protocol as p
from ventilator.broker import BrokerConfig
from ventilator.errors import UsageError
from ventilator.gate import KeyRefusals
from ventilator.security import (
    CLIENT,
    NOT_PERMITTED,
    WORKER,
    Admission,
    Identity,
    KeyStore,
    Rights,
    client_keys,
    fingerprint,
    generate_keys,
    is_loopback,
    qualified_session,
    read_public_key,
    read_secret_key,
    right_name,
)
from ventilator.worker import Worker, WorkerConfig


def test_generated_secret_key_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    public, secret = generate_keys("alice", tmp_path)

    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert read_secret_key(secret)[0] == read_public_key(public)
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        "alice.key",
        "alice.key_secret",
    ]


def test_generate_refuses_to_overwrite_a_key(tmp_path: Path) -> None:
    generate_keys("alice", tmp_path)

    with pytest.raises(UsageError, match="exists"):
        generate_keys("alice", tmp_path)


@pytest.mark.parametrize(
    ("functions", "refusal"),
    [
        ([""], "lets the key use no function at all"),
        (["reports:*", "  "], "lets the key use no function at all"),
        (["mytasks:["], "'mytasks:\\[' is not a valid glob"),
        (["reports:a\nb"], "control character"),
    ],
)
def test_generate_refuses_a_pattern_that_would_not_mean_what_it_says(
    tmp_path: Path, functions: list[str], refusal: str
) -> None:
    with pytest.raises(UsageError, match=refusal):
        generate_keys("alice", tmp_path, functions)

    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["", "../alice", "a/b", ".hidden"])
def test_generate_refuses_names_that_are_not_plain_file_names(
    tmp_path: Path, name: str
) -> None:
    with pytest.raises(UsageError, match="plain file name"):
        generate_keys(name, tmp_path)


def test_rights_are_globs_over_function_names() -> None:
    rights = Rights(("reports:*", "images.thumbs:make"))

    assert rights.allows("reports:monthly")
    assert rights.allows("images.thumbs:make")
    assert not rights.allows("images.thumbs:delete")
    assert not rights.unrestricted
    assert Rights().unrestricted


def test_a_pickled_task_is_checked_as_pickled_whatever_its_label_says() -> None:
    assert right_name("reports:monthly", 0) == "reports:monthly"
    assert right_name("reports:monthly", p.Flags.PICKLED) == "pickled:reports:monthly"
    assert right_name("pickled:f", p.Flags.PICKLED) == "pickled:f"
    assert not Rights(("reports:*",)).allows(right_name("reports:x", p.Flags.PICKLED))


def allow(tmp_path: Path, folder: str, name: str, functions: str = "") -> str:
    public, _ = generate_keys(name, tmp_path / "home")
    target = tmp_path / folder
    target.mkdir(exist_ok=True)
    (target / public.name).write_bytes(public.read_bytes())
    if functions:
        (target / f"{name}.functions").write_text(functions)
    return read_public_key(public).decode()


def test_key_store_reads_rights_and_keeps_roles_apart(tmp_path: Path) -> None:
    alice = allow(tmp_path, "clients", "alice", "# reports only\nreports:*\n")
    worker = allow(tmp_path, "workers", "w1")

    keys = KeyStore({CLIENT: tmp_path / "clients", WORKER: tmp_path / "workers"})

    identity = keys.identity(CLIENT, alice)
    assert identity is not None and identity.name == "alice"
    assert identity.rights == Rights(("reports:*",))
    assert keys.identity(WORKER, alice) is None
    assert keys.identity(CLIENT, worker) is None


def damage_rights_file(path: Path, damage: str) -> None:
    """Make a ``.functions`` file unreadable in one of the ways testers did."""
    if damage == "not UTF-8":
        path.write_bytes(b"\xff\xfe garbage\n")
    elif damage == "a folder":
        path.unlink(missing_ok=True)
        path.mkdir()
    else:
        path.write_text("reports:[a\n")


RIGHTS_DAMAGE = ["not UTF-8", "a folder", "a bad glob"]


@pytest.mark.parametrize("damage", RIGHTS_DAMAGE)
def test_a_key_whose_rights_file_turns_bad_keeps_its_old_rights_on_reload(
    tmp_path: Path, damage: str
) -> None:
    # A tester's SIGHUP over a .functions file that was not UTF-8 (or was a
    # folder) killed the broker with a traceback; later it refused the whole
    # reload. Now the key keeps what it had: a file being edited must not
    # lock a good peer out, nor widen its rights.
    alice = allow(tmp_path, "clients", "alice", "reports:*\n")
    bob = allow(tmp_path, "clients", "bob")
    keys = KeyStore({CLIENT: tmp_path / "clients"})
    rights = tmp_path / "clients" / "alice.functions"
    damage_rights_file(rights, damage)
    (tmp_path / "clients" / "bob.key").unlink()

    reloaded = keys.reload()

    identity = keys.identity(CLIENT, alice)
    assert identity is not None and identity.rights == Rights(("reports:*",))
    assert keys.identity(CLIENT, bob) is None  # the removal is applied
    [unread] = reloaded.unread
    assert unread.path == rights and str(rights) in unread.problem
    assert unread.kept == (identity,)
    assert [i.name for i in reloaded.changed] == ["bob"]


def test_a_key_whose_certificate_turns_bad_keeps_its_old_identity_on_reload(
    tmp_path: Path,
) -> None:
    alice = allow(tmp_path, "clients", "alice", "reports:*\n")
    keys = KeyStore({CLIENT: tmp_path / "clients"})
    before = keys.identity(CLIENT, alice)
    certificate = tmp_path / "clients" / "alice.key"
    certificate.write_text("# being edited\n")
    carol = allow(tmp_path, "clients", "carol")

    reloaded = keys.reload()

    assert keys.identity(CLIENT, alice) == before is not None
    assert keys.identity(CLIENT, carol) is not None  # the addition is applied
    [unread] = reloaded.unread
    assert unread.path == certificate and unread.kept == (before,)
    assert reloaded.changed == ()


def test_a_certificate_cut_short_is_not_read_as_a_key(tmp_path: Path) -> None:
    # pyzmq takes whatever follows "public-key =": a file cut short in the
    # middle of a copy would have replaced a good key with a wrong one.
    alice = allow(tmp_path, "clients", "alice")
    keys = KeyStore({CLIENT: tmp_path / "clients"})
    certificate = tmp_path / "clients" / "alice.key"
    certificate.write_text(f'public-key = "{alice[:17]}"\n')

    reloaded = keys.reload()

    assert keys.identity(CLIENT, alice) is not None
    [unread] = reloaded.unread
    assert unread.path == certificate and "40" in unread.problem


@pytest.mark.parametrize("bad", ["certificate", *RIGHTS_DAMAGE])
def test_a_new_key_with_a_bad_file_is_not_let_in_and_the_rest_is_applied(
    tmp_path: Path, bad: str
) -> None:
    # Tester 23 removed a key beside a garbage key file: the whole reload
    # was refused, and the removed key went on working.
    allow(tmp_path, "clients", "alice")
    bob = allow(tmp_path, "clients", "bob")
    keys = KeyStore({CLIENT: tmp_path / "clients"})
    eve = allow(tmp_path, "clients", "eve")
    bad_file = tmp_path / "clients" / "eve.key"
    if bad == "certificate":
        bad_file.write_text("not a key\n")
    else:
        bad_file = bad_file.with_suffix(".functions")
        damage_rights_file(bad_file, bad)
    (tmp_path / "clients" / "bob.key").unlink()

    reloaded = keys.reload()

    assert keys.identity(CLIENT, eve) is None
    assert keys.identity(CLIENT, bob) is None
    assert keys.counts() == {CLIENT: 1}
    [unread] = reloaded.unread
    assert unread.path == bad_file and unread.kept == ()
    assert str(bad_file) in unread.problem


def test_reload_reports_the_keys_removed_or_changed(tmp_path: Path) -> None:
    alice = allow(tmp_path, "clients", "alice")
    allow(tmp_path, "clients", "bob")
    allow(tmp_path, "clients", "carol")
    keys = KeyStore({CLIENT: tmp_path / "clients"})

    (tmp_path / "clients" / "alice.key").unlink()
    (tmp_path / "clients" / "bob.functions").write_text("reports:*\n")
    reloaded = keys.reload()

    assert sorted(i.name for i in reloaded.changed) == ["alice", "bob"]
    assert reloaded.unread == ()
    assert keys.identity(CLIENT, alice) is None


def test_reload_of_a_missing_folder_keeps_that_roles_list_and_applies_the_others(
    tmp_path: Path,
) -> None:
    # A folder renamed or not yet mounted again must not remove every key of
    # its role, which would lock every peer of that role out.
    alice = allow(tmp_path, "clients", "alice")
    w1 = allow(tmp_path, "workers", "w1")
    keys = KeyStore({CLIENT: tmp_path / "clients", WORKER: tmp_path / "workers"})
    (tmp_path / "clients").rename(tmp_path / "clients.old")
    (tmp_path / "workers" / "w1.key").unlink()

    reloaded = keys.reload()

    assert keys.identity(CLIENT, alice) is not None
    assert keys.identity(WORKER, w1) is None
    [unread] = reloaded.unread
    assert unread.path == tmp_path / "clients"
    assert str(unread.path) in unread.problem
    assert [i.name for i in unread.kept] == ["alice"]


def test_a_bad_file_at_start_is_a_usage_error_naming_every_bad_file(
    tmp_path: Path,
) -> None:
    # With no lists in force there is nothing to keep: the broker must not
    # start with fewer keys than its operator gave it.
    allow(tmp_path, "clients", "alice", "reports:[a\n")
    allow(tmp_path, "clients", "bob")
    (tmp_path / "clients" / "eve.key").write_text("not a key\n")

    with pytest.raises(UsageError) as refused:
        KeyStore({CLIENT: tmp_path / "clients", WORKER: tmp_path / "workers"})

    said = str(refused.value)
    assert "alice.functions" in said and "eve.key" in said
    assert str(tmp_path / "workers") in said


def test_fingerprint_is_the_same_for_z85_text_and_raw_bytes(tmp_path: Path) -> None:
    public, _ = generate_keys("alice", tmp_path)
    z85_key = read_public_key(public)

    assert fingerprint(z85_key) == fingerprint(z85_key.decode())
    assert len(fingerprint(z85_key)) == 16


def test_a_peer_needs_both_key_files_or_neither(tmp_path: Path) -> None:
    _, secret = generate_keys("alice", tmp_path)

    assert client_keys(None, None) is None
    with pytest.raises(UsageError, match="both"):
        client_keys(str(secret), None)


def test_a_brokers_secret_key_given_as_its_public_key_is_refused(
    tmp_path: Path,
) -> None:
    _, secret = generate_keys("alice", tmp_path)
    broker_public, broker_secret = generate_keys("broker", tmp_path)

    assert client_keys(str(secret), str(broker_public)) is not None
    with pytest.raises(UsageError, match=r"is a secret key file.*\.key file"):
        client_keys(str(secret), str(broker_secret))


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.0.0.1:*", True),
        ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True),
        ("ipc:///tmp/broker", True),
        ("tcp://*:5555", False),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://192.0.2.7:5555", False),
        ("tcp://eth0:5555", False),
    ],
)
def test_loopback_endpoints_are_told_from_exposed_ones(
    endpoint: str, loopback: bool
) -> None:
    assert is_loopback(endpoint) is loopback
    assert BrokerConfig(frontend=endpoint).exposed() is not loopback


def test_worker_refuses_pickled_callables_from_an_exposed_broker_without_curve() -> (
    None
):
    config = WorkerConfig(
        ("ventilator.examples",), connect="tcp://192.0.2.7:5556", allow_pickle=True
    )

    with pytest.raises(UsageError, match="--insecure"):
        Worker(config)


# --- admission: what a key's command becomes ----------------------------------------
OPERATOR = Identity("ops", CLIENT, "o" * 40)

REPORTER = Identity("alice", CLIENT, "k" * 40, Rights(("reports:*",)))


def test_admission_rejects_each_task_outside_the_rights_and_keeps_the_others() -> None:
    admission = Admission(curve=True, pickle_permitted=True)
    submit = p.Submit(
        [p.TaskSpec(1, "reports:daily", b""), p.TaskSpec(2, "billing:charge", b"")]
    )

    admitted = admission.client(REPORTER, submit)

    assert isinstance(admitted.command, p.Submit)
    assert [spec.task_id for spec in admitted.command.tasks] == [1]
    [(task_id, reason)] = admitted.rejected
    assert task_id == 2 and "may not submit billing:charge" in reason


def test_admission_refuses_a_task_id_once_however_many_copies_the_submit_holds() -> (
    None
):
    # A raw client repeats ids: copies outside the rights, and a copy within
    # them of an id whose other copy is outside. One answer per task id: the
    # client must not hear task 3 both accepted and refused.
    admission = Admission(curve=True, pickle_permitted=True)
    submit = p.Submit(
        [
            p.TaskSpec(2, "billing:charge", b""),
            p.TaskSpec(2, "billing:charge", b""),
            p.TaskSpec(3, "reports:daily", b""),
            p.TaskSpec(3, "billing:charge", b""),
            p.TaskSpec(4, "reports:daily", b""),
        ]
    )

    admitted = admission.client(REPORTER, submit)

    assert [task_id for task_id, _ in admitted.rejected] == [2, 3]
    assert isinstance(admitted.command, p.Submit)
    assert [spec.task_id for spec in admitted.command.tasks] == [4]


def test_admission_keeps_a_session_inside_its_key_and_guards_sinks() -> None:
    admission = Admission(curve=True, pickle_permitted=True)

    opened = admission.client(REPORTER, p.Hello("s1"))
    sink = admission.client(REPORTER, p.Hello("s1", sink="payroll"))

    assert opened.command == p.Hello(f"{REPORTER.fingerprint}.s1")
    assert sink.command is None
    assert sink.forbidden is not None and "sink 'payroll'" in sink.forbidden


def test_admission_keeps_the_client_instance_that_tells_clients_apart() -> None:
    admission = Admission(curve=True, pickle_permitted=True)

    opened = admission.client(REPORTER, p.Hello("s1", instance=7))

    assert opened.command == p.Hello(f"{REPORTER.fingerprint}.s1", instance=7)


def test_a_limited_key_may_cancel_only_in_its_own_sessions() -> None:
    admission = Admission(curve=True, pickle_permitted=True)
    own = f"{REPORTER.fingerprint}.s1"
    other = f"{'0' * 16}.s1"

    bare = admission.client(REPORTER, p.CancelTask("s1", 7))
    full = admission.client(REPORTER, p.CancelTask(own, 7))
    foreign = admission.client(REPORTER, p.CancelTask(other, 7))
    by_operator = admission.client(OPERATOR, p.CancelTask(other, 7))

    assert bare.command == full.command == p.CancelTask(own, 7)
    assert foreign.command is None and foreign.code == NOT_PERMITTED
    assert foreign.forbidden is not None and repr(other) in foreign.forbidden
    assert by_operator.command == p.CancelTask(other, 7)


def test_purge_which_reaches_every_keys_tasks_is_for_keys_with_every_right() -> None:
    admission = Admission(curve=True, pickle_permitted=True)
    purge = p.Purge("reports:daily")

    limited = admission.client(REPORTER, purge)
    unlimited = admission.client(OPERATOR, purge)
    without_curve = Admission(curve=False, pickle_permitted=True).client(
        REPORTER, purge
    )

    assert limited.command is None and limited.code == NOT_PERMITTED
    assert limited.forbidden is not None and ".functions" in limited.forbidden
    assert unlimited.command == without_curve.command == purge


@pytest.mark.parametrize("command", [p.StatusRequest(), p.ListFailed()])
def test_a_limited_keys_status_and_failures_are_within_its_own_work(
    command: p.Command,
) -> None:
    admission = Admission(curve=True, pickle_permitted=True)

    limited = admission.client(REPORTER, command)
    unlimited = admission.client(OPERATOR, command)
    without_curve = Admission(curve=False, pickle_permitted=True).client(
        REPORTER, command
    )

    assert limited.command == command and limited.scope is not None
    assert limited.scope.sessions == f"{REPORTER.fingerprint}."
    assert limited.scope.may_submit("reports:daily", 0)
    assert not limited.scope.may_submit("billing:charge", 0)
    assert not limited.scope.may_submit("reports:daily", p.Flags.PICKLED)
    assert unlimited.scope is None and without_curve.scope is None


def test_a_limited_key_retries_only_into_a_sink_its_rights_name() -> None:
    admission = Admission(curve=True, pickle_permitted=True)
    collector = Identity(
        "carol", CLIENT, "c" * 40, Rights(("reports:*", "sink:retried"))
    )
    retry = p.Retry([1], "retried")
    retry_all = p.Retry([], "retried")

    refused = admission.client(REPORTER, retry_all)
    named = admission.client(REPORTER, retry)
    allowed = admission.client(collector, retry)

    assert refused.command is None and refused.code == NOT_PERMITTED
    assert refused.forbidden is not None and "sink:retried" in refused.forbidden
    # Named tickets go on to be refused one by one: the sink for the key's
    # own failures, another key's as not its own (the scheduler knows whose).
    assert named.command == retry and named.scope is not None
    assert "sink:retried" in (named.scope.retry_refusal or "")
    assert allowed.command == retry and allowed.scope is not None
    assert allowed.scope.sessions == f"{collector.fingerprint}."
    assert allowed.scope.retry_refusal is None


def test_broker_sessions_are_taken_as_named() -> None:
    assert qualified_session(REPORTER, "ventilator:retry") == "ventilator:retry"


def test_admission_turns_pickle_off_where_it_is_not_permitted() -> None:
    worker = Identity("w1", WORKER, "w" * 40)
    ready = p.Ready("w1", ["reports:daily"], 2, allow_pickle=True)

    exposed = Admission(curve=False, pickle_permitted=False).ready(worker, ready)
    loopback = Admission(curve=False, pickle_permitted=True).ready(worker, ready)

    assert not exposed.allow_pickle
    assert loopback.allow_pickle
    assert list(loopback.services) == ["reports:daily"]


def test_a_worker_whose_rights_allow_none_of_its_functions_says_why() -> None:
    # Tester 23's worker with an empty .functions file showed "not serving",
    # with no problem in status and nothing in its own log.
    worker = Identity("w1", WORKER, "w" * 40, Rights(("billing:*",)))
    ready = p.Ready("w1", ["reports:daily", "reports:weekly"], 2)

    admitted = Admission(curve=True, pickle_permitted=False).ready(worker, ready)

    assert list(admitted.services) == []
    assert admitted.problem is not None
    assert "w1" in admitted.problem and "billing:*" in admitted.problem


def test_a_key_given_in_place_of_a_key_file_is_refused_without_showing_it(
    tmp_path: Path,
) -> None:
    public_file, secret_file = generate_keys("alice", tmp_path)
    public, secret = read_secret_key(secret_file)

    for given in (secret, secret.decode("ascii")):
        with pytest.raises(UsageError) as refused:
            client_keys(given, public_file)  # type: ignore[arg-type]
        message = str(refused.value)
        assert "secret_key" in message and "path to a key file" in message
        assert secret.decode("ascii") not in message
        assert public.decode("ascii") not in message


def test_a_garbage_key_file_is_named_as_not_a_key_file(tmp_path: Path) -> None:
    public, _ = generate_keys("broker", tmp_path)
    garbage = tmp_path / "garbage.key_secret"
    garbage.write_text("this is no key\n")

    with pytest.raises(UsageError, match="is not a CURVE key file"):
        client_keys(str(garbage), str(public))


# --- the log of refused keys ------------------------------------------------------


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno >= logging.WARNING and "refused" in record.getMessage()
    ]


def test_a_refused_key_that_keeps_trying_is_said_less_and_less_often(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A peer whose key is not allowed tries again every 3 s for as long as it
    # runs: that was a WARNING every 3 s, for ever.
    caplog.set_level(logging.DEBUG)
    refusals = KeyRefusals()

    for attempt in range(21):  # a minute of tries
        refusals.refused(attempt * 3.0, "fp-a", "CURVE key refused key=%s", "fp-a")

    lines = refusal_lines(caplog)
    assert 2 <= len(lines) <= 4, lines
    assert "more like it" in lines[-1]


def test_each_refused_key_is_said_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    refusals = KeyRefusals()

    refusals.refused(0.0, "fp-a", "CURVE key refused key=%s", "fp-a")
    refusals.refused(1.0, "fp-b", "CURVE key refused key=%s", "fp-b")

    assert len(refusal_lines(caplog)) == 2


def test_a_key_held_back_by_a_burst_is_said_at_its_next_try(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Two keys refused within a second: the second key's first line went to
    # the burst's count, and its own dwindling had begun, so its next tries
    # were at DEBUG: the key was not named at WARNING for ten seconds.
    caplog.set_level(logging.DEBUG)
    refusals = KeyRefusals()

    refusals.refused(0.0, "fp-a", "CURVE key refused key=%s", "fp-a")
    refusals.refused(0.1, "fp-b", "CURVE key refused key=%s", "fp-b")
    refusals.refused(3.1, "fp-b", "CURVE key refused key=%s", "fp-b")

    lines = refusal_lines(caplog)
    assert len(lines) == 2, lines
    assert "key=fp-b" in lines[1]


def test_the_refused_keys_remembered_are_bounded() -> None:
    refusals = KeyRefusals()

    for number in range(3 * KeyRefusals.REMEMBERED):
        refusals.refused(float(number), f"fp-{number}", "refused %s", number)

    assert len(refusals) == KeyRefusals.REMEMBERED


def test_a_secret_key_others_may_read_is_a_warning_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Tester 23 ran every peer with 0644 and 0666 secret keys, and an allow
    # list any user could write to, and heard nothing.
    _, secret = generate_keys("alice", tmp_path)
    secret.chmod(0o644)
    allow(tmp_path, "clients", "bob")
    (tmp_path / "clients").chmod(0o777)

    with caplog.at_level(logging.WARNING, logger="ventilator.security"):
        read_secret_key(secret)
        KeyStore({CLIENT: tmp_path / "clients"})

    said = [r.getMessage() for r in caplog.records]
    assert any(str(secret) in m and "chmod 600" in m for m in said), said
    assert any("clients" in m and "chmod go-w" in m for m in said), said


def test_a_secret_key_only_its_owner_reads_is_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, secret = generate_keys("alice", tmp_path)

    with caplog.at_level(logging.WARNING, logger="ventilator.security"):
        read_secret_key(secret)

    assert caplog.records == []
