"""`hessd spectrum`: the Hessian spectrum at a file of points, in resumable chunks.

    hessd spectrum --function f.toml --points x.npy --out result.npz --method lanczos --k 4

The function file (.json or .toml) holds what `Client.register` takes:

    expression = "0.5 * x @ A @ x"        # required
    dtype = "float64"                     # optional, "float32" by default
    [inputs]                              # required: name -> shape of one point
    x = [4]
    [constants]                           # optional: a nested list in the function's
    A = "A.npy"                           # dtype, or a .npy path relative to this file

The points are a .npy array (batch, *shape) for a function of one input, or a .npz with one
(batch, *shape) array per input name. The result (np.savez) holds, per point:

    eigenvalues      exact (batch, n) ascending; lanczos (batch, 2k): k smallest, k largest
    eigenvectors     with --eigenvectors: (batch, n, n) or (batch, n, 2k)
    residuals        lanczos (batch, 2k)
    nodes, weights   density (batch, probes, steps); grid, density (batch, grid_size)
    point_class      (batch,) "minimum", "maximum", "saddle" or "degenerate"
    stationary       (batch,) bool; tol, gtol (batch,) the tolerances used
    gradient_norm    (batch,)
    method, function_id   0-d strings; with --data also operator and data_sha256

Over a data set (--data), the function is a model of the parameters and one example, say

    hessd spectrum --function model.json --points checkpoints.npy --data data.npz \
        --loss softmax_cross_entropy --operator ggn --out ggn.npz

with model.json's inputs w (the parameters, one value per point: the checkpoints) and x
(one example), and data.npz holding x (N, *shape of x) and the targets y (N,) or (N, ...)
(--target names another array). The spectrum is then of the operator (--operator hessian,
ggn, fisher or empirical_fisher) of L(w) = mean (--reduction sum: the sum) over the
examples of --loss (mse, softmax_cross_entropy, or an expression in output and target); without
--loss the function is itself the per-example loss. The data set is checked here (its
names against the function's inputs, every shape, one N) and uploaded once per server
(Client.put); the requests name it by its content address, so a server that lost it is
given it again. The server sums over the examples in chunks of --data-chunk-size (it picks
one from its memory by default; --chunk-size is the points per request). The data file's
sha256 and the objective's flags are in the manifest, so a resume with other data or
another operator is refused.

Several servers: --address repeated, and --concurrency K requests in flight at once, the
servers taken in turn (each request its own channel); the chunks go to whichever is free,
so a job spreads over the replicas of a deployment. The result does not depend on which
server computed which chunk.

The server classifies every point; for density from the extreme SLQ Ritz values, which lie
inside [λmin, λmax], converge to its ends, and equal them once --num-steps reaches n. Counts
not given (--k, --num-steps, --num-probes) are the server's defaults, as with
Client.spectrum.

Resume: every finished chunk is written to `<out>.parts/chunk-<start:08d>.npz` beside a
manifest.json that records what defines the job. The same command run again skips the chunks
on disk; the result is assembled from the chunk files in either case, so it does not depend
on how often the job was interrupted. The same --seed goes with every chunk and the server
derives each point's probes from it, so results do not depend on the chunking either.

A server that is unavailable is waited for, up to --retry-seconds in all per request; one
that restarted and forgot the function is given it again. --token (or $HESSD_TOKEN) and
--tls, --tls-ca, --tls-cert/--tls-key reach a server with tokens or TLS.

Exit codes: 0 done; 1 the server stayed unavailable; 2 a refused file, flag or request; 130
interrupted (Ctrl-C, SIGINT), the finished chunks kept for a resume.

The modules: _flags (the flags and the options they give), _job (main, the points and the
data set, the requests in flight, the progress bar), _server (retries), _parts (chunks,
manifest, atomic writes), _report (the summary and the picture, whose symlog histogram
helpers are public).
"""

from hessd.tools.spectrum._flags import add_arguments
from hessd.tools.spectrum._job import main
from hessd.tools.spectrum._report import (
    eigenvalue_histogram,
    plot,
    spectrum_figure,
    symlog_axis,
    symlog_edges,
    symlog_linthresh,
)

__all__ = [
    "add_arguments",
    "eigenvalue_histogram",
    "main",
    "plot",
    "spectrum_figure",
    "symlog_axis",
    "symlog_edges",
    "symlog_linthresh",
]
