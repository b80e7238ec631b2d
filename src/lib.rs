//! tandem: a sidecar proxy that forwards an application's outbound HTTP
//! calls and sends copies of tagged calls to a secondary API without ever
//! slowing or failing the primary call.

pub mod admin;
pub mod config;
pub mod demo;
pub mod dlq;
pub mod errors;
pub mod proxy;
pub mod readiness;
pub mod routes;
pub mod spool;
pub mod telemetry;
