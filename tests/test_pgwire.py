"""The sans-IO protocol core and the upstream login state machine, byte by byte (no sockets)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidegate_proxy import pgwire
from sidegate_proxy.pgauth import AuthFailed, UpstreamLogin, md5_password
from sidegate_proxy.pgcatalog import view_column_origins
from sidegate_proxy.pgwire import BackendParser, FrontendParser, ProtocolError

# --------------------------------------------------------------------------- startup phase


def test_startup_phase_messages() -> None:
    p = FrontendParser()
    [ssl] = p.feed(pgwire.ssl_request())
    assert isinstance(ssl, pgwire.SSLRequest) and p.in_startup
    [gss] = p.feed(pgwire.gssenc_request())
    assert isinstance(gss, pgwire.GSSENCRequest)
    params = {"user": "bot", "database": "orders", "application_name": "x y"}
    [startup] = p.feed(pgwire.startup_message(params))
    assert isinstance(startup, pgwire.StartupMessage)
    assert startup.params == params
    assert startup.minor == 0 and not p.in_startup
    [q] = p.feed(pgwire.query("select 1"))
    assert isinstance(q, pgwire.Query) and q.sql == "select 1"


def test_cancel_request() -> None:
    [c] = FrontendParser().feed(pgwire.cancel_request(1234, -5))
    assert isinstance(c, pgwire.CancelRequest) and (c.pid, c.secret) == (1234, -5)


def test_startup_fed_byte_by_byte_and_raw_kept() -> None:
    data = pgwire.startup_message({"user": "u"}) + pgwire.query("select 1") + pgwire.sync()
    p = FrontendParser()
    out = []
    for i in range(len(data)):
        out += p.feed(data[i : i + 1])
    assert [type(m).__name__ for m in out] == ["StartupMessage", "Query", "Sync"]
    assert b"".join(m.raw for m in out) == data
    assert p.pending == 0


@pytest.mark.parametrize(
    "packet",
    [
        struct.pack("!ii", 7, 196608),  # shorter than the header
        struct.pack("!ii", 20000, 196608),  # above the startup limit
        struct.pack("!ii", 8, 2 << 16) ,  # protocol 2
        struct.pack("!ii", 12, 80877103) + b"\0\0\0\0",  # SSLRequest with a body
        struct.pack("!ii", 12, 80877102) + b"\0\0\0\0",  # short CancelRequest
        struct.pack("!ii", 11, 196608) + b"u\0x",  # not terminated
        struct.pack("!ii", 13, 196608) + b"user\0",  # name without value
        struct.pack("!ii", 12, 196608) + b"\0x\0\0",  # empty name
        struct.pack("!ii", 14, 196608) + b"\xff\0x\0\0\0",  # not UTF-8
    ],
)
def test_bad_startup_packets(packet: bytes) -> None:
    with pytest.raises(ProtocolError):
        FrontendParser().feed(packet)


def test_startup_limit_is_configurable() -> None:
    big = pgwire.startup_message({"user": "u", "application_name": "a" * 500})
    with pytest.raises(ProtocolError):
        FrontendParser(startup_max=200).feed(big)
    assert FrontendParser().feed(big)


# --------------------------------------------------------------------------- frontend messages


def test_extended_protocol_round_trip() -> None:
    data = b"".join([
        pgwire.parse("s1", "select $1::int", [23]),
        pgwire.bind("p1", "s1", [b"42", None], [1], [1, 0]),
        pgwire.describe("P", "p1"),
        pgwire.execute("p1", 10),
        pgwire.close("S", "s1"),
        pgwire.flush(),
        pgwire.sync(),
        pgwire.copy_data(b"1\t2\n"),
        pgwire.copy_done(),
        pgwire.copy_fail("nope"),
        pgwire.password_message("tok"),
        pgwire.terminate(),
    ])
    msgs = FrontendParser(startup=False).feed(data)
    parse, bind, describe, execute, close, flush, sync, cd, cdone, cfail, pw, term = msgs
    assert (parse.name, parse.sql, parse.param_types) == ("s1", "select $1::int", (23,))
    assert (bind.portal, bind.statement, bind.params, bind.param_formats) == ("p1", "s1", (b"42", None), (1,))
    assert bind.result_formats == (1, 0) and bind.result_format(0) == 1 and bind.result_format(5) == 0
    assert (describe.kind, describe.name) == ("P", "p1")
    assert (execute.portal, execute.max_rows) == ("p1", 10)
    assert (close.kind, close.name) == ("S", "s1")
    assert isinstance(flush, pgwire.Flush) and isinstance(sync, pgwire.Sync)
    assert bytes(cd.data) == b"1\t2\n" and isinstance(cdone, pgwire.CopyDone) and cfail.message == "nope"
    assert pw.password() == "tok" and isinstance(term, pgwire.Terminate)
    assert b"".join(m.raw for m in msgs) == data


@pytest.mark.parametrize(
    "frame",
    [
        b"Z\0\0\0\4",  # unknown frontend type
        b"Q\0\0\0\3",  # length below 4
        b"Q\0\0\0\5x",  # unterminated string
        b"Q\0\0\0\7a\0b",  # trailing bytes
        b"D\0\0\0\6X\0",  # Describe of neither S nor P
        b"E\0\0\0\6p\0",  # Execute without max_rows
        pgwire.bind("", "", [b"x"], [2]),  # invalid format code
        b"B\0\0\0\x08\0\0\xff\xff",  # negative count
        b"S\0\0\0\5x",  # Sync with a body
        b"Q\0\0\0\6\xff\xfe\0",  # not UTF-8
    ],
)
def test_malformed_frontend_messages(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        FrontendParser(startup=False).feed(frame)


def test_message_length_limit() -> None:
    p = FrontendParser(1024, startup=False)
    with pytest.raises(ProtocolError):
        p.feed(b"Q" + struct.pack("!i", 4096))
    # a huge declared length is refused before any of it is buffered
    with pytest.raises(ProtocolError):
        FrontendParser(startup=False).feed(b"Q" + struct.pack("!i", (1 << 30) + 1))


def test_incomplete_message_waits() -> None:
    p = FrontendParser(startup=False)
    frame = pgwire.query("select 1")
    assert p.feed(frame[:6]) == [] and p.pending == 6
    [q] = p.feed(frame[6:])
    assert q.sql == "select 1"


# --------------------------------------------------------------------------- backend messages


def test_backend_round_trip() -> None:
    fields = [pgwire.Field("id", 16384, 1, 23, 4, -1, 1), pgwire.Field("email", 16384, 3, 25, -1, -1, 0)]
    data = b"".join([
        pgwire.authentication(pgwire.AUTH_MD5, b"salt"),
        pgwire.parameter_status("server_version", "15.0"),
        pgwire.backend_key_data(7, -9),
        pgwire.row_description(fields),
        pgwire.data_row([b"\0\0\0\1", None, "é"]),
        pgwire.command_complete("SELECT 1"),
        pgwire.error_response("ERROR", "42501", "no", detail="d", hint="h"),
        pgwire.notice_response("NOTICE", "00000", "fyi"),
        pgwire.ready_for_query("T"),
        pgwire.parse_complete() + pgwire.bind_complete() + pgwire.close_complete(),
        pgwire.no_data() + pgwire.portal_suspended() + pgwire.empty_query_response(),
    ])
    msgs = BackendParser().feed(data)
    auth, ps, key, rd, dr, cc, err, notice, rfq, *rest = msgs
    assert (auth.code, auth.data) == (5, b"salt")
    assert (ps.name, ps.value) == ("server_version", "15.0")
    assert (key.pid, key.secret) == (7, -9)
    assert rd.fields == tuple(fields)
    assert isinstance(dr, pgwire.DataRow) and dr.values() == [b"\0\0\0\1", None, "é".encode()]
    assert cc.tag == "SELECT 1" and cc.rows == 1
    assert (err.severity, err.sqlstate, err.message) == ("ERROR", "42501", "no")
    assert (err.fields["D"], err.fields["H"]) == ("d", "h")
    assert isinstance(notice, pgwire.NoticeResponse) and notice.message == "fyi"
    assert rfq.status == b"T"
    assert [type(m).__name__ for m in rest] == [
        "ParseComplete", "BindComplete", "CloseComplete", "NoData", "PortalSuspended", "EmptyQueryResponse"]
    assert b"".join(m.raw for m in msgs) == data


def test_unknown_backend_messages_pass_through_raw() -> None:
    frame = b"v\0\0\0\x0c\0\0\0\0\0\0\0\0"  # NegotiateProtocolVersion
    [m] = BackendParser().feed(frame)
    assert isinstance(m, pgwire.Raw) and m.raw == frame


@pytest.mark.parametrize(("tag", "rows"), [("SELECT 5", 5), ("INSERT 0 3", 3), ("COPY 10", 10),
                                           ("BEGIN", None), ("CREATE TABLE", None)])
def test_command_complete_rows(tag: str, rows: int | None) -> None:
    [m] = BackendParser().feed(pgwire.command_complete(tag))
    assert m.rows == rows


def test_data_row_is_lazy_and_checked() -> None:
    bad = b"D\0\0\0\x0a\0\1\0\0\0\x09"  # says 9 bytes, has none
    [m] = BackendParser().feed(bad)  # framing alone does not decode the row
    with pytest.raises(ProtocolError):
        m.values()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.none(), st.binary(max_size=20)), max_size=8))
def test_data_row_round_trip(values: list[bytes | None]) -> None:
    assert pgwire.decode_data_row(pgwire.data_row(values)) == values


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40) | st.lists(st.one_of(st.none(), st.binary(max_size=6)), max_size=4).map(
    lambda vs: pgwire.data_row(vs)[5:]))
def test_data_row_decoder_accepts_only_canonical_frames(body: bytes) -> None:
    """Whatever the decoder accepts re-encodes to the very frame: a row the masker leaves alone
    can be forwarded as received (pgproxy relies on it), and a malformed one is a ProtocolError."""
    frame = b"D" + (len(body) + 4).to_bytes(4, "big") + body
    try:
        values = pgwire.decode_data_row(frame)
    except ProtocolError:
        return
    assert pgwire.data_row(values) == frame


def test_error_response_strings_with_nul_are_escaped() -> None:
    [m] = BackendParser().feed(pgwire.error_response("ERROR", "XX000", "a\0b"))
    assert m.message == "a\\0b"


def test_ready_for_query_status_checked() -> None:
    with pytest.raises(ProtocolError):
        BackendParser().feed(b"Z\0\0\0\5X")
    with pytest.raises(ValueError):
        pgwire.ready_for_query("X")


# --------------------------------------------------------------------------- fuzzing


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=50))
def test_frontend_parser_never_crashes(data: bytes, chunk: int) -> None:
    for startup in (True, False):
        p = FrontendParser(4096, startup=startup)
        try:
            for i in range(0, len(data), chunk):
                for m in p.feed(data[i : i + chunk]):
                    assert isinstance(m, pgwire.Message) and m.raw
                    if isinstance(m, pgwire.PasswordMessage):
                        with contextlib.suppress(ProtocolError):
                            m.password()
        except ProtocolError:
            pass


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=300))
def test_backend_parser_never_crashes(data: bytes) -> None:
    try:
        for m in BackendParser(4096).feed(data):
            if isinstance(m, pgwire.DataRow):
                with contextlib.suppress(ProtocolError):
                    m.values()
    except ProtocolError:
        pass


_message = st.one_of(
    st.text(max_size=20).filter(lambda s: "\0" not in s).map(pgwire.query),
    st.builds(lambda n, q: pgwire.parse(n, q, [23]), st.sampled_from(["", "s1"]),
              st.sampled_from(["select 1", "x"])),
    st.lists(st.one_of(st.none(), st.binary(max_size=8)), max_size=4).map(lambda ps: pgwire.bind("", "", ps)),
    st.just(pgwire.sync()),
    st.just(pgwire.flush()),
    st.binary(max_size=30).map(pgwire.copy_data),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_message, max_size=12), st.integers(min_value=1, max_value=17))
def test_valid_streams_frame_identically_in_any_chunking(frames: list[bytes], chunk: int) -> None:
    data = b"".join(frames)
    p = FrontendParser(startup=False)
    out = []
    for i in range(0, len(data), chunk):
        out += p.feed(data[i : i + chunk])
    assert [m.raw for m in out] == frames


# --------------------------------------------------------------------------- upstream login


def _auth(code: int, data: bytes = b"") -> pgwire.Authentication:
    [m] = BackendParser().feed(pgwire.authentication(code, data))
    assert isinstance(m, pgwire.Authentication)
    return m


def _body(frame: bytes) -> bytes:
    return frame[5:]


def test_scram_rfc7677_vector() -> None:
    login = UpstreamLogin("user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO", sasl_user="user")
    first = login.feed(_auth(pgwire.AUTH_SASL, b"SCRAM-SHA-256\0\0"))
    assert _body(first) == b"SCRAM-SHA-256\0" + struct.pack("!i", 32) + b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    final = login.feed(_auth(pgwire.AUTH_SASL_CONTINUE, server_first))
    assert _body(final) == (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                            b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    assert login.feed(_auth(pgwire.AUTH_SASL_FINAL, b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")) == b""
    assert login.feed(_auth(pgwire.AUTH_OK)) == b"" and login.done
    assert "pencil" not in repr(login)


def _scram_started() -> UpstreamLogin:
    login = UpstreamLogin("u", "pencil", nonce="abc")
    login.feed(_auth(pgwire.AUTH_SASL, b"SCRAM-SHA-256\0\0"))
    salt = base64.b64encode(b"salty").decode()
    login.feed(_auth(pgwire.AUTH_SASL_CONTINUE, f"r=abcdef,s={salt},i=4096".encode()))
    return login


def test_scram_server_must_prove_itself() -> None:
    with pytest.raises(AuthFailed):
        _scram_started().feed(_auth(pgwire.AUTH_SASL_FINAL, b"v=" + base64.b64encode(b"x" * 32)))
    with pytest.raises(AuthFailed, match="skipped"):
        _scram_started().feed(_auth(pgwire.AUTH_OK))


@pytest.mark.parametrize(
    "server_first",
    [b"r=zzz,s=c2FsdA==,i=4096", b"r=abc,s=c2FsdA==,i=4096", b"r=abcd,s=c2FsdA==,i=0",
     b"r=abcd,s=c2FsdA==,i=99999999", b"r=abcd,s=!!,i=1", b"garbage", b"r=abcd,i=1"],
)
def test_scram_bad_server_first(server_first: bytes) -> None:
    login = UpstreamLogin("u", "p", nonce="abc")
    login.feed(_auth(pgwire.AUTH_SASL, b"SCRAM-SHA-256\0\0"))
    with pytest.raises(AuthFailed):
        login.feed(_auth(pgwire.AUTH_SASL_CONTINUE, server_first))


def test_md5_and_cleartext() -> None:
    salt = b"\1\2\3\4"
    inner = hashlib.md5(b"secretalice").hexdigest().encode()
    expected = b"md5" + hashlib.md5(inner + salt).hexdigest().encode()
    assert md5_password("alice", "secret", salt) == expected
    login = UpstreamLogin("alice", "secret")
    assert _body(login.feed(_auth(pgwire.AUTH_MD5, salt))) == expected + b"\0"
    login = UpstreamLogin("alice", "secret")
    assert _body(login.feed(_auth(pgwire.AUTH_CLEARTEXT))) == b"secret\0"


def test_methods_can_be_restricted() -> None:
    login = UpstreamLogin("alice", "secret", allowed={"scram-sha-256"})
    for code, data in ((pgwire.AUTH_CLEARTEXT, b""), (pgwire.AUTH_MD5, b"salt")):
        with pytest.raises(AuthFailed, match="not allowed"):
            login.feed(_auth(code, data))
    with pytest.raises(AuthFailed, match="trust"):
        login.feed(_auth(pgwire.AUTH_OK))
    with pytest.raises(AuthFailed, match="unsupported"):
        UpstreamLogin("a", "b").feed(_auth(7))  # GSSAPI
    with pytest.raises(AuthFailed, match="no supported SASL"):
        UpstreamLogin("a", "b").feed(_auth(pgwire.AUTH_SASL, b"SCRAM-SHA-256-PLUS\0\0"))


# --------------------------------------------------------------------------- view rules


def test_view_rule_target_entries() -> None:
    # shape of pg_rewrite.ev_action for: CREATE VIEW v AS SELECT id, upper(email) AS e, email FROM t
    action = (
        "({QUERY :commandType 1 :querySource 0 :canSetTag true :utilityStmt <> :resultRelation 0 "
        ":rtable ({RTE :alias <> :eref {ALIAS :aliasname t :colnames (\"id\" \"email\")} :rtekind 0}) "
        ":targetList ({TARGETENTRY :expr {VAR :varno 1 :varattno 1} :resno 1 :resname id "
        ":ressortgroupref 0 :resorigtbl 16384 :resorigcol 1 :resjunk false} "
        "{TARGETENTRY :expr {FUNCEXPR :funcid 871 :args ({VAR :varno 1 :varattno 2})} :resno 2 "
        ":resname e :ressortgroupref 0 :resorigtbl 0 :resorigcol 0 :resjunk false} "
        "{TARGETENTRY :expr {SUBLINK :subselect {QUERY :targetList ({TARGETENTRY :resno 1 "
        ":resorigtbl 99 :resorigcol 9 :resjunk false})}} :resno 3 :resname weird\\ name "
        ":ressortgroupref 0 :resorigtbl 16384 :resorigcol 2 :resjunk false}) :override 0})"
    )
    assert view_column_origins(action) == {1: (16384, 1), 3: (16384, 2)}
