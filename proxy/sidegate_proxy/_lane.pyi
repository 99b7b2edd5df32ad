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
# stop, client_rest, server_rest, to_client, to_server, in flight, bound, last_client
HandedBack = tuple[int, bytes, bytes, bytes, bytes, list[InFlight], tuple[int, int] | None, float]

def literal_key(text: bytes, /) -> bytes | None: ...

class Loop:
    def __init__(self, report_every: float = 0.001) -> None: ...
    def adopt(
        self, token: int, client_fd: int, server_fd: int, client_bytes: bytes, server_bytes: bytes,
        statements: tuple[bytes, ...], queries: tuple[bytes, ...], shapes: tuple[bytes, ...] | None, inject: bool,
        max_message: int, seconds: float, /,
    ) -> None: ...
    def recall(self, token: int, /) -> None: ...
    def drain(self) -> tuple[list[Record], list[tuple[int, HandedBack]]]: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...
