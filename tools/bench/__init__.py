"""`hessd bench`: throughput and latency of one derivative kind, in the spirit of Triton's
perf_analyzer.

    hessd bench --address 127.0.0.1:50051 --expression "sum(tanh(A @ x)**2)" \
        --inputs x=256 --constant A=random:256x256 --kind gradient --batch 1 \
        --concurrency 1,2,4,8,16,32,64 --out results/bench --plot

The function is an expression with --inputs (NAME=SHAPE, SHAPE as `256`, `4x3`, or `()` for
a scalar) and --constant NAME=SOURCE (`random:SHAPE`: standard normal from --seed, scaled by
1/√(last axis) so that `A @ x` stays of order one; `zeros:SHAPE`; or a .npy path), or a
function file (--function, the format of `hessd spectrum --function`). The points
(batch, *shape) per input, and for hvp, jvp, vjp and taylor a vector, are drawn once from
--seed; every request sends the same ones. --token (or $HESSD_TOKEN) and --tls, --tls-ca,
--tls-cert/--tls-key reach a server with tokens or TLS.

Two load models, one asyncio loop over one AsyncClient (grpc.aio) channel:

    --concurrency 1,4,16   closed loop: at each level c, c coroutines each await one request
                           after another, so c requests are in flight at all times
    --request-rate 100,500 open loop: requests start at Poisson arrivals of that mean rate
                           (--arrivals constant: evenly spaced) whether or not earlier ones
                           have finished; in-flight is unbounded and reported

Latency is measured around `await client.compute(...)`: the client's encoding and event-loop
delays are part of it, as they are of what an asyncio caller sees, and so are the retries the
client makes on UNAVAILABLE (a retried request counts once, as a success or an error).

Each level is measured in windows of --window-seconds, repeated until the last 3 windows
agree within --stability on throughput and on p95 latency (every one within that fraction of
their mean), or until --max-windows; then the level is marked "unstable". A request belongs
to the window in which it completes. The row reports the last 3 windows together:

    requests_per_s         successful requests per second
    points_per_s           requests_per_s * batch
    p50_ms … p99_ms        latency percentiles of the successful requests
    completed, errors      counts; errors_by_code by gRPC status name (a failed request is
                           an error, never a latency)
    sent_per_s             requests started per second (open loop: the arrival rate achieved)
    in_flight_mean, _max   requests in flight as each request started, itself included
    windows, status        windows measured; "stable", "unstable", or for a level cut short
                           "interrupted" or "server unavailable"

Output: the table on stdout, `<out>.csv` (one row per level, the columns of COLUMNS),
`<out>.json` ({"metadata": {...}, "rows": [...]}, each row also with its window_stats), and
with --plot `<out>-throughput.png` and `<out>-latency.png`.

Exit codes: 0 measured; 1 no server answered at --address within --connect-timeout, or the
setup did not finish within --setup-timeout, or every request of a window failed with
UNAVAILABLE (the client retries UNAVAILABLE with backoff first); 2 a refused flag, file or
request (the first request is sent before the sweep, so a kind the function does not take
fails there); 130 interrupted (Ctrl-C, SIGINT), after printing and writing what was measured
so far.

The modules: _flags (the flags and what they make), _load (the sweep and its recorder),
_statistics (windows, stability, rows), _report (table, CSV and JSON, pictures), _command
(main).
"""

from hessd.tools.bench._command import main
from hessd.tools.bench._flags import add_arguments
from hessd.tools.bench._report import COLUMNS, format_table, plot, write_results
from hessd.tools.bench._statistics import Row, Window, is_stable, summarize

__all__ = [
    "COLUMNS",
    "Row",
    "Window",
    "add_arguments",
    "format_table",
    "is_stable",
    "main",
    "plot",
    "summarize",
    "write_results",
]
