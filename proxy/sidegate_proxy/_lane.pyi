# The native lane of PostgreSQL sessions (_lane.c): their steady state relayed in a thread of its own.
BIND: int
DESCRIBE_PORTAL: int
DESCRIBE_STATEMENT: int
INJECT: int
EXECUTE: int
SYNC: int
QUERY: int
STOP_CLIENT: int
STOP_SERVER: int
STOP_SLICE: int
STOP_CLIENT_EOF: int
STOP_SERVER_EOF: int
STOP_CLIENT_ERROR: int
STOP_SERVER_ERROR: int
STOP_NO_MEMORY: int

# token, statement (or query shape) index, wall time, seconds, rows, sqlstate, query string (simple query)
Record = tuple[int, int, float, float, int | None, str | None, bytes | None]
# kind, statement (or query shape) index, bind serial, started (monotonic), query string, answered
InFlight = tuple[int, int, int, float, bytes | None, int]
# stop, client_rest, server_rest, to_client, to_server, in flight, bound, last_client, the current
# result's shape (index in the shapes adopted; -1: none)
HandedBack = tuple[int, bytes, bytes, bytes, bytes, list[InFlight], tuple[int, int] | None, float, int]

SEAL_TIME: int
SEAL_TIME_DT: int
SEAL_DURATION: int
SEAL_ROWS: int
SEAL_QUERY: int
SEAL_SEQ: int
SEAL_PREV_HASH: int
SEAL_UID: int
SEAL_CHAIN_ID: int

# an audit record's canonical JSON cut at the slots the sealer fills per run (audit.lane_shape)
Shape = tuple[bytes | int, ...]
# per session token: (shapes of its statements by index, shapes of its simple queries by index)
Shapes = dict[int, tuple[tuple[Shape | None, ...], tuple[Shape | None, ...]]]
# wall time, seconds, rows, sqlstate, simple query string
Run = tuple[float, float, int | None, str | None, bytes | None]

def literal_key(text: bytes, /) -> bytes | None: ...
def tls_ready() -> bool: ...
def tls_drivable(sslobj: object, /) -> bool: ...

class Sealer:
    """audit.Chain.seal_run in C (_seal.c); ``chain`` is an audit.Chain, read and advanced."""

    openssl: bool
    def __init__(self, sensitive: tuple[bytes, ...], max_command: int, openssl: bool = True) -> None: ...
    def seal(self, chain: object, shape: Shape, runs: list[Run], /) -> tuple[bytes, int]: ...
    def sha256(self, data: bytes, /) -> bytes: ...

class Loop:
    def __init__(self, report_every: float = 0.001, report_records: int = 0) -> None: ...
    def adopt(
        self, token: int, client_fd: int, server_fd: int, client_bytes: bytes, server_bytes: bytes,
        statements: tuple[bytes, ...], queries: tuple[bytes, ...], shapes: tuple[bytes, ...] | None, inject: bool,
        max_message: int, seconds: float, client_tls: object = None, server_tls: object = None,
        filters: tuple[bytes, ...] | None = None, /,
    ) -> None: ...
    def recall(self, token: int, /) -> None: ...
    def drain(self) -> tuple[list[Record], list[tuple[int, HandedBack]]]: ...
    # lines, how many, statements sealed per token, (latency bucket counts, their sum) or None, the
    # records left for Python (after every sealed one), sessions handed back
    def drain_sealed(
        self, sealer: Sealer, chain: object, shapes: Shapes, bounds: tuple[float, ...] | None, /,
    ) -> tuple[bytes, int, dict[int, int], tuple[list[int], float] | None, list[Record], list[tuple[int, HandedBack]]]:
        ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...
