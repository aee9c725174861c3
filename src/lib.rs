//! ladle: merges fine-tuned checkpoints into model soups, tensor by tensor.
//!
//! Module map (one concern each; see README.md):
//! - [`api`]: axum router, request/response types, error → HTTP mapping.
//! - [`intake`]: the one path a merge request takes in (API and `ladle merge`).
//! - [`recipe`]: parse and validate merge requests into a [`recipe::Recipe`].
//! - [`queue`]: job rows, leases, retries, cancellation (SQLite and Postgres).
//! - [`worker`]: claim → run → complete, heartbeats, cancellation.
//! - [`engine`]: plans and streams one merge through storage (plan, merge, publish).
//! - [`checkpoint`]: safetensors headers, sharded indexes, shard planning, reading.
//! - [`storage`]: URL → object store, allowed roots.
//! - [`methods`]: the merge methods (one module each) and their registry.
//! - [`merge`]: pure kernels over slices and dtype conversion.
//! - [`error`]: the table of stable error codes.
//! - [`failpoints`]: test-only crash points and throttles (feature `failpoints`).
//! - [`config`], [`service`]: settings and process wiring.
//! - [`client`]: `ladle submit | status | list | cancel | watch`, a client of the API.
//! - [`webhooks`]: a job's `notify`: validation, signing, the delivery loop.

pub mod api;
pub mod checkpoint;
pub mod client;
pub mod config;
pub mod engine;
pub mod error;
pub mod failpoints;
pub mod intake;
pub mod merge;
pub mod methods;
pub mod metrics;
pub mod queue;
pub mod recipe;
pub mod retention;
pub mod search;
pub mod service;
pub mod storage;
pub mod telemetry;
pub mod ui;
pub mod webhooks;
pub mod worker;
