//! Integration tests: the real binary, real sockets on 127.0.0.1, real clients.

mod util;

/// A seeded fault campaign: nodes, Redis and their paths fail at random moments; a checker proves exactly once.
mod campaign;
/// Several nodes and a real Redis: shared rooms, presence, Redis failures.
mod cluster;
/// permessage-deflate on WebSocket: negotiation, compressed states, compressed commands, bombs.
mod compression;
/// Configuration errors: each names its source (flag, variable, file key) and what is accepted, before anything listens.
mod config_errors;
/// CORS: which origins may read the client module, the certificate hash and the room reads.
mod cors;
/// Subscribing, publishing and receiving: states, events, recovery, slow consumers.
mod delivery;
/// Delta states: a bracket's changes as fossil deltas over both transports, under loss and across nodes.
mod deltas;
/// CloudWatch Embedded Metric Format documents on standard output.
mod emf;
/// Every accepted event exactly once across Redis and node failures, for a client that follows the docs.
mod exactly_once;
/// The HTTP API: publishing, auth, room queries, batches, health and metrics.
mod http_api;
/// Bad input and limits: each gets its documented error or close code.
mod limits;
/// The operations page and its figures, on one node and through Redis.
mod ops;
/// The publish API's gate: credentials before the per-address rate, 413 before the body.
mod publish_admission;
/// The quinn engine (`--wt-engine quinn`, the fallback) against the default engine's expectations.
mod quinn_engine;
/// Graceful shutdown on SIGTERM.
mod shutdown;
/// Nothing accepted is stranded: publishes during a resync, events in flight when Redis dies empty.
mod stranded;
/// Subscriber tokens, private rooms and publish scopes.
mod tokens;
/// WebTransport: datagram states, the control stream, loss repair, certificates.
mod webtransport;
